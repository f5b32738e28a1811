//! Status computation without I/O: what the connection's `status` should say given the outcome
//! of a reconcile. The controller writes it only when it differs from the live status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{Phase, VaultConnection, VaultConnectionStatus};

/// Condition type every connection carries (Argo CD and `kubectl wait` key off it).
pub const READY: &str = "Ready";

/// The outcome of one reconcile, as the user should see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub phase: Phase,
    pub ready: bool,
    /// CamelCase reason from a fixed set (see the README's table).
    pub reason: &'static str,
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
}

impl Outcome {
    pub fn new(
        phase: Phase,
        ready: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Outcome {
            phase,
            ready,
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
        reason: outcome.reason.into(),
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
    }
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
        let mut o = Outcome::new(
            Phase::Pending,
            false,
            "CredentialsMissing",
            "Secret ns/c has no key api_key",
        );
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
        let o = Outcome::new(Phase::Ready, true, "Reconciled", "ok").with_secret(Some("s".into()));
        let first = desired_status(&vc(None), &o, time("2026-01-01T00:00:00Z"));
        let again = desired_status(&vc(Some(first.clone())), &o, time("2026-01-02T00:00:00Z"));
        assert_eq!(first, again);
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let ready = Outcome::new(Phase::Ready, true, "Reconciled", "ok");
        let first = desired_status(&vc(None), &ready, time("2026-01-01T00:00:00Z"));
        let pending = Outcome::new(Phase::Pending, false, "CredentialsMissing", "x");
        let second = desired_status(&vc(Some(first)), &pending, time("2026-01-02T00:00:00Z"));
        assert_eq!(
            second.conditions[0].last_transition_time,
            time("2026-01-02T00:00:00Z")
        );
        let failed = Outcome::new(Phase::Failed, false, "InvalidSpec", "y");
        let third = desired_status(&vc(Some(second)), &failed, time("2026-01-03T00:00:00Z"));
        assert_eq!(
            third.conditions[0].last_transition_time,
            time("2026-01-02T00:00:00Z")
        );
        assert_eq!(third.conditions[0].reason, "InvalidSpec");
    }

    #[test]
    fn long_messages_are_truncated() {
        let o = Outcome::new(Phase::Failed, false, "InvalidSpec", "é".repeat(2000));
        let s = desired_status(&vc(None), &o, time("2026-01-01T00:00:00Z"));
        assert!(s.conditions[0].message.len() <= 1024 + 3);
    }
}
