//! The token state of one OAuth connection, kept in its state Secret, and the pure decision of
//! what to do next. Nothing here does I/O.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::api::{ConnectionType, GrantType, VaultConnection};
use crate::catalog;
use crate::names::sha256_hex;
use crate::oauth::schedule::{self, RenewBefore};
use crate::secret::{SecretBytes, SecretData};

/// Keys of the state Secret.
pub mod keys {
    /// The refresh token the next refresh will spend (refreshToken grant).
    pub const REFRESH_TOKEN: &str = "refresh_token";
    /// Fingerprint of the credentials Secret's `refresh_token` this chain was seeded from; a
    /// different seed there means the user re-seeded and the new one wins.
    pub const SEED_FINGERPRINT: &str = "seed_fingerprint";
    /// Fingerprint of everything a token depends on (URL, grant, scopes, audience, client).
    pub const CONFIG_FINGERPRINT: &str = "config_fingerprint";
    pub const ACCESS_TOKEN: &str = "access_token";
    pub const TOKEN_TYPE: &str = "token_type";
    pub const SCOPE: &str = "scope";
    pub const ISSUED_AT: &str = "issued_at";
    pub const EXPIRES_AT: &str = "expires_at";
    /// The `refresh-requested-at` annotation value already honoured.
    pub const REFRESH_REQUEST: &str = "refresh_request";
    /// A terminal failure (reason) and the fingerprint it happened under: not retried until
    /// the fingerprint changes or the slow retry interval passes.
    pub const FAILED_REASON: &str = "failed_reason";
    pub const FAILED_FINGERPRINT: &str = "failed_fingerprint";
    pub const FAILED_AT: &str = "failed_at";
    /// Fingerprint of a refresh token that is being spent right now (written before the token
    /// request, cleared with its result). Found on start-up, it means the previous attempt's
    /// outcome is unknown (the process died mid-refresh).
    pub const INFLIGHT: &str = "inflight_refresh_token";
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The current access token.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessToken {
    pub token: SecretBytes,
    pub token_type: String,
    pub scope: Option<String>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What the state Secret holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenState {
    pub refresh_token: Option<SecretBytes>,
    pub seed_fingerprint: Option<String>,
    pub config_fingerprint: Option<String>,
    pub access: Option<AccessToken>,
    pub refresh_request: Option<String>,
    pub failed_reason: Option<String>,
    pub failed_fingerprint: Option<String>,
    pub failed_at: Option<DateTime<Utc>>,
    pub inflight: Option<String>,
}

/// Fingerprint of a refresh token (never the token itself outside the state Secret's data).
pub fn token_fingerprint(token: &SecretBytes) -> String {
    sha256_hex(token.expose())
}

fn text(data: &SecretData, key: &str) -> Option<String> {
    data.get(key)
        .map(SecretBytes::expose_str)
        .filter(|s| !s.is_empty())
}

impl TokenState {
    pub fn from_data(data: &SecretData) -> Self {
        let access = match (
            data.get(keys::ACCESS_TOKEN),
            text(data, keys::ISSUED_AT).and_then(|s| parse_time(&s)),
            text(data, keys::EXPIRES_AT).and_then(|s| parse_time(&s)),
        ) {
            (Some(t), Some(issued_at), Some(expires_at)) if !t.expose().is_empty() => {
                Some(AccessToken {
                    token: t.clone(),
                    token_type: text(data, keys::TOKEN_TYPE).unwrap_or_else(|| "Bearer".into()),
                    scope: text(data, keys::SCOPE),
                    issued_at,
                    expires_at,
                })
            }
            _ => None,
        };
        TokenState {
            refresh_token: data
                .get(keys::REFRESH_TOKEN)
                .filter(|v| !v.expose().is_empty())
                .cloned(),
            seed_fingerprint: text(data, keys::SEED_FINGERPRINT),
            config_fingerprint: text(data, keys::CONFIG_FINGERPRINT),
            access,
            refresh_request: text(data, keys::REFRESH_REQUEST),
            failed_reason: text(data, keys::FAILED_REASON),
            failed_fingerprint: text(data, keys::FAILED_FINGERPRINT),
            failed_at: text(data, keys::FAILED_AT).and_then(|s| parse_time(&s)),
            inflight: text(data, keys::INFLIGHT),
        }
    }

    pub fn to_data(&self) -> SecretData {
        let mut d = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: Vec<u8>| {
            d.insert(k.to_string(), SecretBytes::new(v));
        };
        if let Some(rt) = &self.refresh_token {
            put(keys::REFRESH_TOKEN, rt.expose().to_vec());
        }
        for (k, v) in [
            (keys::SEED_FINGERPRINT, &self.seed_fingerprint),
            (keys::CONFIG_FINGERPRINT, &self.config_fingerprint),
            (keys::REFRESH_REQUEST, &self.refresh_request),
            (keys::FAILED_REASON, &self.failed_reason),
            (keys::FAILED_FINGERPRINT, &self.failed_fingerprint),
            (keys::INFLIGHT, &self.inflight),
        ] {
            if let Some(v) = v {
                put(k, v.as_bytes().to_vec());
            }
        }
        if let Some(t) = self.failed_at {
            put(keys::FAILED_AT, format_time(t).into_bytes());
        }
        if let Some(a) = &self.access {
            put(keys::ACCESS_TOKEN, a.token.expose().to_vec());
            put(keys::TOKEN_TYPE, a.token_type.clone().into_bytes());
            put(keys::ISSUED_AT, format_time(a.issued_at).into_bytes());
            put(keys::EXPIRES_AT, format_time(a.expires_at).into_bytes());
            if let Some(s) = &a.scope {
                put(keys::SCOPE, s.clone().into_bytes());
            }
        }
        SecretData(d)
    }

    /// The fingerprint a terminal failure is remembered under.
    pub fn failure_key(
        &self,
        config_fp: &str,
        seed_fp: &str,
        refresh_request: Option<&str>,
    ) -> String {
        sha256_hex(
            format!(
                "{config_fp}|{seed_fp}|{}",
                refresh_request.unwrap_or_default()
            )
            .as_bytes(),
        )
    }
}

/// The effective OAuth settings of a connection (oauth2 and auth0 unified).
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthSettings {
    pub token_url: String,
    pub grant: GrantType,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub auth_method: crate::api::ClientAuthMethod,
    pub extra_params: std::collections::BTreeMap<String, String>,
    pub renew: RenewBefore,
}

pub fn settings(vc: &VaultConnection) -> OAuthSettings {
    let spec = &vc.spec;
    let renew = |before: Option<&String>, pct: Option<u8>| match (
        before.and_then(|b| humantime::parse_duration(b).ok()),
        pct,
    ) {
        (Some(d), _) => RenewBefore::Duration(d),
        (None, Some(p)) => RenewBefore::Percentage(p),
        _ => RenewBefore::default(),
    };
    match (spec.type_, &spec.oauth2, &spec.auth0) {
        (ConnectionType::Auth0, _, Some(a)) => OAuthSettings {
            token_url: crate::names::auth0_token_url(&a.domain),
            grant: catalog::grant_type(spec),
            scopes: a.scopes.clone(),
            audience: a.audience.clone().filter(|s| !s.is_empty()),
            auth_method: crate::api::ClientAuthMethod::Post,
            extra_params: Default::default(),
            renew: renew(a.renew_before.as_ref(), a.renew_before_percentage),
        },
        (_, Some(o), _) => OAuthSettings {
            token_url: o.token_url.clone(),
            grant: catalog::grant_type(spec),
            scopes: o.scopes.clone(),
            audience: o.audience.clone().filter(|s| !s.is_empty()),
            auth_method: o.client_auth_method.unwrap_or_default(),
            extra_params: o.extra_params.clone(),
            renew: renew(o.renew_before.as_ref(), o.renew_before_percentage),
        },
        _ => OAuthSettings {
            token_url: String::new(),
            grant: GrantType::ClientCredentials,
            scopes: vec![],
            audience: None,
            auth_method: Default::default(),
            extra_params: Default::default(),
            renew: RenewBefore::default(),
        },
    }
}

/// Fingerprint of everything an issued token depends on: a change re-issues right away.
pub fn config_fingerprint(s: &OAuthSettings, inputs: &SecretData) -> String {
    let mut scopes = s.scopes.clone();
    scopes.sort();
    let material = serde_json::json!({
        "url": s.token_url,
        "grant": format!("{:?}", s.grant),
        "scopes": scopes,
        "audience": s.audience,
        "auth": format!("{:?}", s.auth_method),
        "extra": s.extra_params,
        "client_id": sha256_hex(inputs.get("client_id").map(SecretBytes::expose).unwrap_or_default()),
        "client_secret": sha256_hex(inputs.get("client_secret").map(SecretBytes::expose).unwrap_or_default()),
    });
    sha256_hex(material.to_string().as_bytes())
}

pub fn seed_fingerprint(inputs: &SecretData) -> String {
    inputs
        .get("refresh_token")
        .map(|rt| sha256_hex(rt.expose()))
        .unwrap_or_default()
}

/// Why a token must be requested now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshCause {
    /// No access token yet.
    Initial,
    /// Inside the renewal window (or expired).
    Scheduled,
    /// Token URL, grant, scopes, audience or client changed.
    ConfigChanged,
    /// A new refresh token was put in the credentials Secret.
    Reseeded,
    /// The `refresh-requested-at` annotation changed.
    Requested,
    /// The slow retry after a terminal failure.
    RetryAfterFailure,
}

/// What to do for this connection now.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Refresh(RefreshCause),
    /// The current token is good; come back at `next_refresh`.
    Wait {
        next_refresh: DateTime<Utc>,
    },
    /// A terminal failure under the same inputs: stay failed until they change or `retry_at`.
    Failed {
        reason: String,
        retry_at: Option<DateTime<Utc>>,
    },
}

/// Inputs of the decision, all known without I/O.
pub struct DecisionInput<'a> {
    pub now: DateTime<Utc>,
    pub state: &'a TokenState,
    pub config_fp: &'a str,
    pub seed_fp: &'a str,
    pub refresh_request: Option<&'a str>,
    pub renew: &'a RenewBefore,
    pub jitter_key: &'a str,
}

/// Failures that a slow requeue may retry (RefreshResponseLost never is: retrying with a token
/// the provider already rotated would only trigger its reuse detection again).
fn retryable_terminal(reason: &str) -> bool {
    reason != "RefreshResponseLost"
}

pub fn plan(i: &DecisionInput<'_>) -> Plan {
    let s = i.state;
    if let (Some(reason), Some(fp)) = (&s.failed_reason, &s.failed_fingerprint) {
        if *fp == s.failure_key(i.config_fp, i.seed_fp, i.refresh_request) {
            let retry_at = retryable_terminal(reason).then(|| {
                s.failed_at.unwrap_or(i.now)
                    + chrono::Duration::from_std(schedule::terminal_retry_interval())
                        .unwrap_or_default()
            });
            return match retry_at {
                Some(t) if i.now >= t => Plan::Refresh(RefreshCause::RetryAfterFailure),
                _ => Plan::Failed {
                    reason: reason.clone(),
                    retry_at,
                },
            };
        }
    }
    if s.seed_fingerprint
        .as_deref()
        .is_some_and(|f| f != i.seed_fp)
    {
        return Plan::Refresh(RefreshCause::Reseeded);
    }
    if s.config_fingerprint.as_deref() != Some(i.config_fp) && s.access.is_some() {
        return Plan::Refresh(RefreshCause::ConfigChanged);
    }
    if i.refresh_request.is_some() && i.refresh_request != s.refresh_request.as_deref() {
        return Plan::Refresh(RefreshCause::Requested);
    }
    let Some(access) = &s.access else {
        return Plan::Refresh(RefreshCause::Initial);
    };
    let next =
        schedule::next_refresh_at(access.issued_at, access.expires_at, i.renew, i.jitter_key);
    if schedule::needs_refresh(i.now, next, access.expires_at) {
        Plan::Refresh(RefreshCause::Scheduled)
    } else {
        Plan::Wait { next_refresh: next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        parse_time(s).unwrap()
    }

    fn state_with_token(issued: &str, expires: &str) -> TokenState {
        TokenState {
            config_fingerprint: Some("cfg".into()),
            seed_fingerprint: Some("seed".into()),
            access: Some(AccessToken {
                token: SecretBytes::new(b"at".to_vec()),
                token_type: "Bearer".into(),
                scope: None,
                issued_at: t(issued),
                expires_at: t(expires),
            }),
            ..Default::default()
        }
    }

    fn input<'a>(now: &str, state: &'a TokenState) -> DecisionInput<'a> {
        DecisionInput {
            now: t(now),
            state,
            config_fp: "cfg",
            seed_fp: "seed",
            refresh_request: None,
            renew: &RenewBefore::Percentage(33),
            jitter_key: "ns/conn",
        }
    }

    #[test]
    fn state_round_trips_through_secret_data() {
        let mut s = state_with_token("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        s.refresh_token = Some(SecretBytes::new(b"rt".to_vec()));
        s.failed_reason = Some("InvalidClient".into());
        s.failed_at = Some(t("2026-01-01T00:30:00Z"));
        s.inflight = Some("fp".into());
        assert_eq!(TokenState::from_data(&s.to_data()), s);
        assert_eq!(
            TokenState::from_data(&SecretData::default()),
            TokenState::default()
        );
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        let mut s = state_with_token("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        s.refresh_token = Some(SecretBytes::new(b"refresh-SECRET-1".to_vec()));
        s.access.as_mut().unwrap().token = SecretBytes::new(b"access-SECRET-2".to_vec());
        let dbg = format!("{s:?} {:?}", s.to_data());
        assert!(!dbg.contains("SECRET"), "{dbg}");
    }

    #[test]
    fn no_token_means_initial_refresh() {
        let s = TokenState::default();
        assert_eq!(
            plan(&input("2026-01-01T00:00:00Z", &s)),
            Plan::Refresh(RefreshCause::Initial)
        );
    }

    #[test]
    fn waits_until_two_thirds_of_lifetime() {
        let s = state_with_token("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        match plan(&input("2026-01-01T00:30:00Z", &s)) {
            Plan::Wait { next_refresh } => {
                assert!(next_refresh <= t("2026-01-01T00:40:12Z"), "{next_refresh}");
                assert!(next_refresh >= t("2026-01-01T00:37:00Z"), "{next_refresh}");
            }
            p => panic!("{p:?}"),
        }
        assert_eq!(
            plan(&input("2026-01-01T00:41:00Z", &s)),
            Plan::Refresh(RefreshCause::Scheduled)
        );
    }

    #[test]
    fn changes_force_a_refresh() {
        let s = state_with_token("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let mut i = input("2026-01-01T00:01:00Z", &s);
        i.config_fp = "other";
        assert_eq!(plan(&i), Plan::Refresh(RefreshCause::ConfigChanged));
        let mut i = input("2026-01-01T00:01:00Z", &s);
        i.seed_fp = "new-seed";
        assert_eq!(plan(&i), Plan::Refresh(RefreshCause::Reseeded));
        let mut i = input("2026-01-01T00:01:00Z", &s);
        i.refresh_request = Some("1");
        assert_eq!(plan(&i), Plan::Refresh(RefreshCause::Requested));
        let mut s2 = s.clone();
        s2.refresh_request = Some("1".into());
        let mut i = input("2026-01-01T00:01:00Z", &s2);
        i.refresh_request = Some("1");
        assert!(
            matches!(plan(&i), Plan::Wait { .. }),
            "an honoured request is not repeated"
        );
    }

    #[test]
    fn terminal_failures_wait_for_a_change_or_the_slow_retry() {
        let mut s = TokenState::default();
        s.failed_reason = Some("InvalidClient".into());
        s.failed_fingerprint = Some(s.failure_key("cfg", "seed", None));
        s.failed_at = Some(t("2026-01-01T00:00:00Z"));
        assert!(matches!(
            plan(&input("2026-01-01T00:10:00Z", &s)),
            Plan::Failed { .. }
        ));
        assert_eq!(
            plan(&input("2026-01-01T01:00:01Z", &s)),
            Plan::Refresh(RefreshCause::RetryAfterFailure)
        );
        let mut i = input("2026-01-01T00:10:00Z", &s);
        i.config_fp = "fixed";
        assert_eq!(plan(&i), Plan::Refresh(RefreshCause::Initial));

        s.failed_reason = Some("RefreshResponseLost".into());
        assert!(matches!(
            plan(&input("2026-01-02T00:00:00Z", &s)),
            Plan::Failed { retry_at: None, .. }
        ));
    }
}
