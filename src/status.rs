//! Status computation without I/O: what the connection's `status` should say given the outcome
//! of a reconcile. The controller writes it only when it differs from the live status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{Phase, VaultConnection, VaultConnectionStatus};
use crate::reason::Reason;

/// Condition type every connection carries (Argo CD and `kubectl wait` key off it).
pub const READY: &str = "Ready";

/// The outcome of one reconcile, as the user should see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub phase: Phase,
    pub ready: bool,
    pub reason: Reason,
    /// Human-readable; never contains a secret value.
    pub message: String,
    pub secret_name: Option<String>,
    pub missing_keys: Vec<String>,
    pub oauth: Option<OAuthStatus>,
}

/// Token lifecycle fields of oauth2/auth0 connections.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OAuthStatus {
    pub state_secret_name: Option<String>,
    pub expires_at: Option<String>,
    pub last_refresh_time: Option<String>,
    pub next_refresh_time: Option<String>,
    pub failed_refresh_attempts: u32,
    pub last_failure_reason: Option<String>,
    /// See `VaultConnectionStatus::spent_seed_fingerprint`.
    pub spent_seed_fingerprint: Option<String>,
}

impl Outcome {
    /// The phase and readiness follow from the reason (see [`Reason::phase`]).
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Outcome {
            phase: reason.phase(),
            ready: reason.is_ready(),
            reason,
            message: message.into(),
            secret_name: None,
            missing_keys: vec![],
            oauth: None,
        }
    }
    pub fn with_secret(mut self, name: Option<String>) -> Self {
        self.secret_name = name;
        self
    }
}

/// The status `vc` should have after `outcome`. `lastTransitionTime` only moves when the
/// condition's status flips, so an unchanged outcome yields an identical status (no write).
pub fn desired_status(vc: &VaultConnection, outcome: &Outcome, now: Time) -> VaultConnectionStatus {
    let prev = vc.status.as_ref();
    let generation = vc.metadata.generation;
    let cond_status = if outcome.ready { "True" } else { "False" };
    let prev_ready = prev.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let last_transition_time = match prev_ready {
        Some(c) if c.status == cond_status => c.last_transition_time.clone(),
        _ => now,
    };
    let ready = Condition {
        type_: READY.into(),
        status: cond_status.into(),
        reason: outcome.reason.as_str().into(),
        message: truncate(&outcome.message, 1024),
        observed_generation: generation,
        last_transition_time,
    };
    // Keep conditions of other types (none today) so a later feature's condition survives.
    let mut conditions: Vec<Condition> = prev
        .map(|s| {
            s.conditions
                .iter()
                .filter(|c| c.type_ != READY)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    conditions.insert(0, ready);
    let oauth = outcome.oauth.clone().unwrap_or_default();
    VaultConnectionStatus {
        phase: Some(outcome.phase),
        conditions,
        observed_generation: generation,
        secret_name: outcome.secret_name.clone(),
        missing_keys: outcome.missing_keys.clone(),
        state_secret_name: oauth.state_secret_name,
        expires_at: oauth.expires_at,
        last_refresh_time: oauth.last_refresh_time,
        next_refresh_time: oauth.next_refresh_time,
        failed_refresh_attempts: (oauth.failed_refresh_attempts > 0)
            .then_some(oauth.failed_refresh_attempts),
        last_failure_reason: oauth.last_failure_reason,
        spent_seed_fingerprint: oauth.spent_seed_fingerprint,
    }
}

/// `outcome` with `secretName` and the token fields carried over from the live status: a
/// non-Ready outcome must not make the user lose sight of the existing Secret and tokens.
pub fn keep_known_fields(vc: &VaultConnection, mut o: Outcome) -> Outcome {
    if let Some(s) = &vc.status {
        o.secret_name = s.secret_name.clone();
        if vc.spec.type_.is_oauth() && o.oauth.is_none() {
            o.oauth = Some(OAuthStatus {
                state_secret_name: s.state_secret_name.clone(),
                expires_at: s.expires_at.clone(),
                last_refresh_time: s.last_refresh_time.clone(),
                next_refresh_time: s.next_refresh_time.clone(),
                failed_refresh_attempts: s.failed_refresh_attempts.unwrap_or(0),
                last_failure_reason: s.last_failure_reason.clone(),
                spent_seed_fingerprint: s.spent_seed_fingerprint.clone(),
            });
        }
    }
    o
}

/// Pending for missing credentials. `last_good_kept`: the target Secret exists, is ours, and
/// the status already names it, so the message says the last good Secret stays unchanged.
pub fn pending(
    vc: &VaultConnection,
    missing_keys: Vec<String>,
    message: String,
    last_good_kept: bool,
) -> Outcome {
    let message = if last_good_kept {
        let ns = vc.metadata.namespace.as_deref().unwrap_or_default();
        let target = vc.target_name();
        format!("{message}; the last good Secret {ns}/{target} is kept unchanged")
    } else {
        message
    };
    let mut o = keep_known_fields(vc, Outcome::new(Reason::CredentialsMissing, message));
    o.missing_keys = missing_keys;
    if !last_good_kept {
        o.secret_name = None;
    }
    o
}

/// The reason of the live `Ready` condition, if any.
pub fn current_reason(vc: &VaultConnection) -> Option<&str> {
    vc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vc(status: Option<VaultConnectionStatus>) -> VaultConnection {
        let mut v: VaultConnection = serde_json::from_value(json!({
            "apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection",
            "metadata": {"name": "conn", "namespace": "ns", "generation": 3},
            "spec": {"type": "apiKey"}
        }))
        .unwrap();
        v.status = status;
        v
    }

    fn time(s: &str) -> Time {
        serde_json::from_value(json!(s)).unwrap()
    }

    #[test]
    fn pending_status_lists_missing_keys() {
        let mut o = Outcome::new(Reason::CredentialsMissing, "Secret ns/c has no key api_key");
        o.missing_keys = vec!["api_key".into()];
        let s = desired_status(&vc(None), &o, time("2026-01-01T00:00:00Z"));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(s.missing_keys, vec!["api_key"]);
        assert_eq!(s.observed_generation, Some(3));
        let c = &s.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Ready", "False", "CredentialsMissing")
        );
        assert_eq!(c.observed_generation, Some(3));
    }

    #[test]
    fn unchanged_outcome_gives_identical_status() {
        let o = Outcome::new(Reason::Reconciled, "ok").with_secret(Some("s".into()));
        let first = desired_status(&vc(None), &o, time("2026-01-01T00:00:00Z"));
        let again = desired_status(&vc(Some(first.clone())), &o, time("2026-01-02T00:00:00Z"));
        assert_eq!(first, again);
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let ready = Outcome::new(Reason::Reconciled, "ok");
        let first = desired_status(&vc(None), &ready, time("2026-01-01T00:00:00Z"));
        let pending = Outcome::new(Reason::CredentialsMissing, "x");
        let second = desired_status(&vc(Some(first)), &pending, time("2026-01-02T00:00:00Z"));
        assert_eq!(
            second.conditions[0].last_transition_time,
            time("2026-01-02T00:00:00Z")
        );
        let failed = Outcome::new(Reason::InvalidSpec, "y");
        let third = desired_status(&vc(Some(second)), &failed, time("2026-01-03T00:00:00Z"));
        assert_eq!(
            third.conditions[0].last_transition_time,
            time("2026-01-02T00:00:00Z")
        );
        assert_eq!(third.conditions[0].reason, "InvalidSpec");
    }

    #[test]
    fn long_messages_are_truncated() {
        let o = Outcome::new(Reason::InvalidSpec, "é".repeat(2000));
        let s = desired_status(&vc(None), &o, time("2026-01-01T00:00:00Z"));
        assert!(s.conditions[0].message.len() <= 1024 + 3);
    }
}
