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

/// The server-side apply body that writes `desired` as `vc`'s status, only over the version
/// of `vc` it was computed from: `metadata.resourceVersion` makes it a precondition, so a
/// status worked out from a cached copy that lags behind (our own last status write not seen
/// yet) is refused with 409 instead of dropping what that write recorded, e.g. a spent seed.
pub fn status_apply_patch(
    vc: &VaultConnection,
    desired: &VaultConnectionStatus,
) -> serde_json::Value {
    let mut patch = serde_json::json!({
        "apiVersion": "vaultconn.dev/v1alpha1",
        "kind": "VaultConnection",
        "status": desired,
    });
    if let Some(rv) = &vc.metadata.resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
    }
    patch
}

/// Whether `desired` must be written over the cached status `live`, given what this process
/// `last_written` (its newest knowledge of the stored status). Matching the cache is not
/// enough when the cache does not show our last write yet: it may be older than what is
/// stored, and the status it matches already replaced (the write then meets its
/// `resourceVersion` precondition, see [`status_apply_patch`]).
pub fn write_needed(
    desired: &VaultConnectionStatus,
    live: &VaultConnectionStatus,
    last_written: Option<&VaultConnectionStatus>,
) -> bool {
    if last_written == Some(desired) {
        return false;
    }
    desired != live || last_written.is_some_and(|w| w != live)
}

/// The reason of the live `Ready` condition, if any.
pub fn current_reason(vc: &VaultConnection) -> Option<&str> {
    ready_reason(vc.status.as_ref()?)
}

/// The reason of `status`'s `Ready` condition, if any.
pub fn ready_reason(status: &VaultConnectionStatus) -> Option<&str> {
    status
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
    fn the_status_patch_is_conditional_on_the_version_it_was_computed_from() {
        let o = Outcome::new(Reason::Reconciled, "ok");
        let mut v = vc(None);
        let desired = desired_status(&v, &o, time("2026-01-01T00:00:00Z"));
        let unconditional = status_apply_patch(&v, &desired);
        assert!(unconditional.get("metadata").is_none(), "{unconditional}");
        v.metadata.resource_version = Some("4711".into());
        let patch = status_apply_patch(&v, &desired);
        assert_eq!(patch["metadata"]["resourceVersion"], "4711");
        assert_eq!(patch["kind"], "VaultConnection");
        assert_eq!(patch["status"], serde_json::to_value(&desired).unwrap());
    }

    #[test]
    fn a_status_is_written_when_it_differs_or_the_cache_lags_behind_our_last_write() {
        let at = time("2026-01-01T00:00:00Z");
        let ready = desired_status(
            &vc(None),
            &Outcome::new(Reason::Reconciled, "ok"),
            at.clone(),
        );
        let retrying = desired_status(
            &vc(None),
            &Outcome::new(Reason::RefreshRetrying, "retrying"),
            at,
        );
        // Quiet: the cache and our last write both hold it.
        assert!(!write_needed(&ready, &ready, Some(&ready)));
        assert!(!write_needed(&ready, &ready, None), "after a restart");
        // Our last write holds it, whatever the cache says.
        assert!(!write_needed(&ready, &retrying, Some(&ready)));
        // A change.
        assert!(write_needed(&retrying, &ready, Some(&ready)));
        assert!(write_needed(&retrying, &ready, None));
        // The cache still shows Ready, but we wrote RefreshRetrying since: Ready is not stored.
        assert!(write_needed(&ready, &ready, Some(&retrying)));
    }

    #[test]
    fn long_messages_are_truncated() {
        let o = Outcome::new(Reason::InvalidSpec, "é".repeat(2000));
        let s = desired_status(&vc(None), &o, time("2026-01-01T00:00:00Z"));
        assert!(s.conditions[0].message.len() <= 1024 + 3);
    }
}

#[cfg(test)]
mod props {
    use std::time::{Duration, SystemTime};

    use jiff::Timestamp;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::ByteString;
    use proptest::prelude::*;

    use super::*;
    use crate::oauth::decide::Decider;
    use crate::oauth::state::{AccessToken, TokenState};
    use crate::oauth::token::response::fuzz::{interpret_for_tests, proptest_config};
    use crate::secret::{extract_inputs, Inputs, SecretBytes};

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("in range"))
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        (
            proptest::sample::select(Reason::ALL),
            "\\PC{0,40}|.{1000,1100}",
            proptest::option::of("[a-z0-9-]{1,20}"),
            proptest::collection::vec("[a-z_]{1,10}", 0..3),
            proptest::option::of((any::<u32>(), proptest::option::of("[A-Za-z]{1,20}"))),
        )
            .prop_map(|(reason, message, secret, missing, oauth)| {
                let mut o = Outcome::new(reason, message).with_secret(secret);
                o.missing_keys = missing;
                o.oauth = oauth.map(|(failed, why)| OAuthStatus {
                    state_secret_name: Some("c-oauth-state".into()),
                    expires_at: Some("2026-01-01T00:00:00Z".into()),
                    failed_refresh_attempts: failed,
                    last_failure_reason: why,
                    ..Default::default()
                });
                o
            })
    }

    fn connection(t: &str) -> VaultConnection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection",
            "metadata": {"name": "conn", "namespace": "ns", "uid": "u1", "generation": 3},
            "spec": {"type": t, "credentialsRef": {"name": "creds"},
                     "oauth2": if t == "oauth2" {
                         serde_json::json!({"tokenUrl": "https://idp.example.invalid/t"})
                     } else { serde_json::Value::Null }}
        }))
        .expect("a valid connection")
    }

    /// Secret values that cannot turn up by chance.
    fn secret_value() -> impl Strategy<Value = String> {
        "[a-z0-9]{6}".prop_map(|s| format!("SeCrEt-{s}-VaLuE"))
    }

    proptest! {
        #![proptest_config(proptest_config(256))]

        /// The same outcome on a connection already showing it yields the very same status:
        /// no write (lastTransitionTime does not move, nothing else changes).
        #[test]
        fn desired_status_is_idempotent(
            first in outcome(),
            second in outcome(),
            t1 in 0i64..2_000_000_000,
            dt in 0i64..1_000_000,
        ) {
            let mut vc = connection("oauth2");
            // Some earlier status, then this outcome, then the same outcome again.
            vc.status = Some(desired_status(&vc, &first, time(t1)));
            let once = desired_status(&vc, &second, time(t1 + dt));
            vc.status = Some(once.clone());
            let twice = desired_status(&vc, &second, time(t1 + 2 * dt + 1));
            prop_assert_eq!(&twice, &once);
            let ready = &once.conditions[0];
            prop_assert!(ready.message.len() <= 1024 + '…'.len_utf8());
            prop_assert_eq!(ready.type_.as_str(), READY);
            prop_assert_eq!(once.conditions.iter().filter(|c| c.type_ == READY).count(), 1);
        }

        /// No secret value ever appears in a status: not from the credentials Secret (missing
        /// or present keys, any connection type), not from the tokens of the state, not from
        /// a token endpoint's error echoing the request's secrets.
        #[test]
        fn no_secret_value_ever_reaches_a_status(
            t in proptest::sample::select(vec!["apiKey", "bearerToken", "basicAuth", "twilio", "stripe", "oauth2"]),
            values in proptest::collection::btree_map(
                prop_oneof![
                    Just("api_key"), Just("token"), Just("username"), Just("password"),
                    Just("account_sid"), Just("auth_token"), Just("secret_key"),
                    Just("client_id"), Just("client_secret"), Just("refresh_token"), Just("other"),
                ],
                prop_oneof![secret_value(), Just("   ".to_string()), Just(String::new())],
                0..6,
            ),
            access in secret_value(),
            refresh in secret_value(),
            failures in 1u32..20,
            now in 1_000_000_000i64..2_000_000_000,
        ) {
            let vc = connection(t);
            let now_ts = Timestamp::from_second(now).unwrap();
            let secrets: Vec<&str> = values.values().map(String::as_str)
                .filter(|v| v.starts_with("SeCrEt"))
                .chain([access.as_str(), refresh.as_str()])
                .collect();
            let creds = Secret {
                data: Some(values.iter().map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes()))).collect()),
                ..Default::default()
            };
            let mut outcomes = vec![];
            match extract_inputs(&vc, Some(&creds)) {
                Inputs::Missing { missing_keys, message } => {
                    outcomes.push(pending(&vc, missing_keys.clone(), message.clone(), false));
                    outcomes.push(pending(&vc, missing_keys, message, true));
                }
                Inputs::Complete(_) => {}
            }
            let state = TokenState {
                refresh_token: Some(SecretBytes::new(refresh.clone().into_bytes())),
                access: Some(AccessToken {
                    token: SecretBytes::new(access.clone().into_bytes()),
                    token_type: "Bearer".into(),
                    scope: None,
                    issued_at: now_ts,
                    expires_at: now_ts + jiff::SignedDuration::from_hours(1),
                }),
                seed_fingerprint: Some("seed".into()),
                ..Default::default()
            };
            let d = Decider { vc: &vc, now: now_ts };
            outcomes.push(d.access_outcome(&state, "conn", Some(now_ts)));
            outcomes.push(d.salvaged(failures, &state).outcome);
            outcomes.push(d.persist_pending(failures).outcome);
            for reason in Reason::ALL {
                outcomes.push(d.terminal(*reason, failures % 2 == 0, Some("0123456789abcdef".into())).outcome);
            }
            // A token endpoint echoing the request's secrets back in its error.
            let body = serde_json::json!({"error": "invalid_request", "error_description": secrets.join(" ")});
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now.unsigned_abs());
            let e = interpret_for_tests(400, body.to_string().as_bytes(), &secrets, at)
                .expect_err("an error object is no token");
            outcomes.push(d.transient(failures, state.access.as_ref(), e.reason(), None, &e.to_string()).outcome);
            for o in outcomes {
                let status = desired_status(&vc, &o, time(now));
                let shown = format!("{} {:?}", serde_json::to_string(&status).unwrap(), o);
                for s in &secrets {
                    prop_assert!(!shown.contains(s), "{} in {}", s, shown);
                }
            }
        }
    }
}
