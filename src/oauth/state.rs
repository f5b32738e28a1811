//! The token state of one OAuth connection, kept in its state Secret, and the pure decision of
//! what to do next. Nothing here does I/O.

use jiff::fmt::temporal::Pieces;
use jiff::{SignedDuration, Timestamp};

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
    /// Who wrote the in-flight mark and when (`<identity> <RFC 3339>`): a process never
    /// mistakes another's call that may still be running for its own crash.
    pub const INFLIGHT_BY: &str = "inflight_by";
    /// Present (`"true"`) while the request in flight is the one retry of an earlier attempt
    /// whose outcome is unknown. Found on start-up, it means that retry's answer may have
    /// arrived (a refusal, or tokens) and died with the process: the token is not sent again.
    pub const INFLIGHT_RETRY: &str = "inflight_retry";
}

/// RFC 3339 in UTC with whole seconds (fraction truncated) and a `Z`: `2026-11-28T23:57:50Z`.
/// The state Secret and the status hold this form; it must not change between versions.
pub fn format_time(t: Timestamp) -> String {
    format!("{t:.0}")
}

/// `t` without its fraction of a second (floored, also before 1970): exactly what
/// [`format_time`] keeps, so `parse_time(&format_time(t)) == Some(whole_seconds(t))`.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    t - SignedDuration::from_nanos(i64::from(t.subsec_nanosecond()).rem_euclid(1_000_000_000))
}

/// An RFC 3339 time with any offset, any fraction and surrounding whitespace.
///
/// Accepts everything the parser of earlier versions did, so their state Secrets and the
/// `expires_at` values users wrote still load. jiff's own parser covers all of that except a
/// few corners, handled by [`parse_time_compat`]; it also accepts more (e.g. `+0200`).
pub fn parse_time(s: &str) -> Option<Timestamp> {
    let s = s.trim();
    s.parse().ok().or_else(|| parse_time_compat(s))
}

/// RFC 3339 inputs that earlier versions accepted and jiff rejects: more than nine fractional
/// digits (the rest are dropped), U+2212 MINUS SIGN before the offset, and instants past the end
/// of jiff's range (9999-12-30), such as a `9999-12-31T23:59:59Z` meaning "never expires": these
/// saturate.
fn parse_time_compat(s: &str) -> Option<Timestamp> {
    let mut s = s.replacen('\u{2212}', "-", 1);
    if s.as_bytes().get(19) == Some(&b'.') {
        let digits = s[20..].bytes().take_while(u8::is_ascii_digit).count();
        if digits > 9 {
            s.replace_range(29..20 + digits, "");
        }
    }
    let pieces = Pieces::parse(&s).ok()?;
    let dt = pieces.date().to_datetime(pieces.time()?);
    let offset = pieces.to_numeric_offset()?;
    Some(offset.to_timestamp(dt).unwrap_or(if dt.year() > 0 {
        Timestamp::MAX
    } else {
        Timestamp::MIN
    }))
}

/// The current access token.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessToken {
    pub token: SecretBytes,
    pub token_type: String,
    pub scope: Option<String>,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
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
    pub failed_at: Option<Timestamp>,
    pub inflight: Option<String>,
    pub inflight_by: Option<String>,
    /// The send in flight is the one retry of an earlier unknown outcome (`keys::INFLIGHT_RETRY`).
    pub inflight_retry: bool,
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
            inflight_by: text(data, keys::INFLIGHT_BY),
            inflight_retry: text(data, keys::INFLIGHT_RETRY).is_some(),
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
            (keys::INFLIGHT_BY, &self.inflight_by),
        ] {
            if let Some(v) = v {
                put(k, v.as_bytes().to_vec());
            }
        }
        if self.inflight_retry {
            put(keys::INFLIGHT_RETRY, b"true".to_vec());
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

    /// Mark `fingerprint` as being spent now by `holder`; `retry`: as the one retry of an
    /// earlier attempt whose outcome is unknown.
    pub fn mark_inflight(
        &mut self,
        fingerprint: String,
        holder: &str,
        now: Timestamp,
        retry: bool,
    ) {
        self.inflight = Some(fingerprint);
        self.inflight_by = Some(format!("{holder} {}", format_time(now)));
        self.inflight_retry = retry;
    }

    /// The holder and time of the in-flight mark, if it has them (older marks do not).
    pub fn inflight_holder(&self) -> Option<(&str, Timestamp)> {
        let (holder, at) = self.inflight_by.as_deref()?.rsplit_once(' ')?;
        Some((holder, parse_time(at)?))
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
        next_refresh: Timestamp,
    },
    /// A terminal failure under the same inputs: stay failed until they change or `retry_at`.
    Failed {
        reason: String,
        retry_at: Option<Timestamp>,
    },
}

/// Inputs of the decision, all known without I/O.
pub struct DecisionInput<'a> {
    pub now: Timestamp,
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
        // A token refused for good is remembered without the refresh request (see
        // `decide::terminal_state`): asking for a refresh must not resend it, new inputs do.
        let same_inputs = *fp == s.failure_key(i.config_fp, i.seed_fp, i.refresh_request)
            || (!retryable_terminal(reason) && *fp == s.failure_key(i.config_fp, i.seed_fp, None));
        if same_inputs {
            let retry_at = retryable_terminal(reason).then(|| {
                s.failed_at
                    .unwrap_or(i.now)
                    .checked_add(schedule::terminal_retry_interval())
                    .unwrap_or(Timestamp::MAX)
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

    fn t(s: &str) -> Timestamp {
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
    fn waits_until_the_scheduled_point() {
        let s = state_with_token("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z");
        let next = match plan(&input("2026-01-01T00:05:59Z", &s)) {
            Plan::Wait { next_refresh } => next_refresh,
            p => panic!("{p:?}"),
        };
        // Within the window [10 %, 67 %] of the lifetime (see `schedule`).
        assert!(next <= t("2026-01-01T00:40:12Z"), "{next}");
        assert!(next >= t("2026-01-01T00:06:00Z"), "{next}");
        let mut before = input("2026-01-01T00:05:59Z", &s);
        before.now = next - jiff::SignedDuration::from_millis(1);
        assert_eq!(plan(&before), Plan::Wait { next_refresh: next });
        let mut at = input("2026-01-01T00:05:59Z", &s);
        at.now = next;
        assert_eq!(plan(&at), Plan::Refresh(RefreshCause::Scheduled));
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

    fn ts(second: i64, nanosecond: i32) -> Timestamp {
        Timestamp::new(second, nanosecond).unwrap()
    }

    #[test]
    fn format_time_is_byte_identical_to_earlier_versions() {
        // Expected strings as written by the previous implementation (whole seconds, fraction
        // truncated, `Z`), for the same instants.
        for (t, want) in [
            (ts(0, 0), "1970-01-01T00:00:00Z"),
            (ts(1_795_910_270, 0), "2026-11-28T23:57:50Z"),
            (ts(1_795_910_270, 999_999_999), "2026-11-28T23:57:50Z"),
            (ts(1_700_000_000, 500_000_000), "2023-11-14T22:13:20Z"),
            (ts(951_782_400, 123), "2000-02-29T00:00:00Z"),
            (ts(1_835_395_200, 0), "2028-02-29T00:00:00Z"),
            (ts(-1, -500_000_000), "1969-12-31T23:59:58Z"),
            (ts(253_402_207_199, 0), "9999-12-30T21:59:59Z"),
        ] {
            assert_eq!(format_time(t), want);
        }
    }

    #[test]
    fn parse_time_accepts_what_earlier_versions_accepted() {
        // (input, seconds, nanoseconds) as the previous parser read them.
        for (input, second, nanosecond) in [
            ("2026-11-28T23:57:50Z", 1_795_910_270, 0),
            ("2026-11-28t23:57:50z", 1_795_910_270, 0),
            ("2026-11-28 23:57:50Z", 1_795_910_270, 0),
            ("2026-11-28T23:57:50+02:00", 1_795_903_070, 0),
            ("2026-11-28T23:57:50-05:30", 1_795_930_070, 0),
            ("2026-11-28T23:57:50-00:00", 1_795_910_270, 0),
            ("2026-11-28T23:57:50.25Z", 1_795_910_270, 250_000_000),
            (
                "2026-11-28T23:57:50.123456789+01:00",
                1_795_906_670,
                123_456_789,
            ),
            (" 2026-11-28T23:57:50+02:00\n", 1_795_903_070, 0),
            (
                "\t2026-11-28T23:57:50.5-00:00  ",
                1_795_910_270,
                500_000_000,
            ),
            // Digits past the ninth are dropped.
            (
                "2026-11-28T23:57:50.1234567891234Z",
                1_795_910_270,
                123_456_789,
            ),
            // U+2212 MINUS SIGN.
            ("2026-11-28T23:57:50\u{2212}02:00", 1_795_917_470, 0),
        ] {
            assert_eq!(parse_time(input), Some(ts(second, nanosecond)), "{input:?}");
        }
        // A leap second is accepted (as the second before it: jiff has no leap seconds).
        assert_eq!(
            parse_time("2016-12-31T23:59:60Z"),
            Some(ts(1_483_228_799, 0))
        );
        // Past the end of jiff's range: accepted, saturated.
        assert_eq!(parse_time("9999-12-31T23:59:59Z"), Some(Timestamp::MAX));
        assert_eq!(
            parse_time("9999-12-31T23:59:59-01:00"),
            Some(Timestamp::MAX)
        );
    }

    #[test]
    fn parse_time_rejects_garbage() {
        for input in [
            "",
            "   ",
            "garbage",
            "1795910270",
            "2026-11-28",
            "2026-11-28T23:57:50",
            "2026-11-28T23:57",
            "2026-02-30T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2026-11-28T23:57:50Zjunk",
            "2026-11-28T23:57:50 Z",
            "2026-11-28T23:57:50.Z",
            "2026-11-28T23:57:50+2:00",
            "2026-11-28T23:57:50+02:60",
            "2026-11-28T23:57:50UTC",
            "2026-11-28T23:57:50.1234567891234",
            "2026-11-28T23:57:50\u{2212}",
        ] {
            assert_eq!(parse_time(input), None, "{input:?}");
        }
    }

    #[test]
    fn stored_times_read_back_as_whole_seconds() {
        // What refresh.rs computes the schedule from (whole_seconds) is what a restarted
        // operator reads back from the state Secret.
        for t in [
            ts(1_795_910_270, 0),
            ts(1_795_910_270, 1),
            ts(1_795_910_270, 999_999_999),
            ts(-1, -500_000_000),
        ] {
            assert_eq!(parse_time(&format_time(t)), Some(whole_seconds(t)), "{t}");
            assert_eq!(whole_seconds(t).subsec_nanosecond(), 0);
            assert!(
                whole_seconds(t) <= t
                    && t.duration_since(whole_seconds(t)) < SignedDuration::from_secs(1)
            );
        }
    }
}

/// The checks behind the fuzz targets `time` (the RFC 3339 times of the state Secret and the
/// credentials Secret's `expires_at`, and the `renewBefore` durations) and `state_data` (a
/// state Secret as anything may have left it).
#[cfg(any(test, fuzzing))]
pub mod fuzz {
    use super::*;

    /// Any text as a time and as a duration: no panic; a time read back from how it is
    /// stored is the same instant in whole seconds; a duration is one the schedule can use.
    pub fn check_time(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        if let Some(t) = parse_time(&text) {
            let stored = format_time(t);
            assert_eq!(
                parse_time(&stored),
                Some(whole_seconds(t)),
                "{text:?} → {stored}"
            );
            assert_eq!(format_time(whole_seconds(t)), stored);
        }
        if let Ok(d) = humantime::parse_duration(&text) {
            let issued = Timestamp::UNIX_EPOCH;
            let expires = issued + SignedDuration::from_hours(1);
            let at = schedule::next_refresh_at(issued, expires, &RenewBefore::Duration(d), "k");
            assert!(at > issued && at <= expires, "{text:?}: {at}");
        }
    }

    /// Any key/value pairs as a state Secret's data: reading never panics, and what is read
    /// survives a write and a read unchanged once its times are in stored (whole-second) form.
    pub fn check_state_data(data: &[u8]) {
        const KEYS: &[&str] = &[
            keys::REFRESH_TOKEN,
            keys::SEED_FINGERPRINT,
            keys::CONFIG_FINGERPRINT,
            keys::ACCESS_TOKEN,
            keys::TOKEN_TYPE,
            keys::SCOPE,
            keys::ISSUED_AT,
            keys::EXPIRES_AT,
            keys::REFRESH_REQUEST,
            keys::FAILED_REASON,
            keys::FAILED_FINGERPRINT,
            keys::FAILED_AT,
            keys::INFLIGHT,
            keys::INFLIGHT_BY,
        ];
        // Fields separated by 0xFF: a key index, then its value.
        let mut map = std::collections::BTreeMap::new();
        for field in data.split(|b| *b == 0xFF) {
            if let Some((k, v)) = field.split_first() {
                map.insert(
                    KEYS[usize::from(*k) % KEYS.len()].to_string(),
                    SecretBytes::new(v.to_vec()),
                );
            }
        }
        let read = TokenState::from_data(&SecretData(map));
        let stored = TokenState::from_data(&read.to_data());
        assert_eq!(TokenState::from_data(&stored.to_data()), stored);
        assert_eq!(stored.refresh_token, read.refresh_token);
        assert_eq!(stored.inflight, read.inflight);
        assert_eq!(stored.access.is_some(), read.access.is_some());
        if let (Some(a), Some(b)) = (&read.access, &stored.access) {
            assert_eq!(a.token, b.token);
            assert_eq!(whole_seconds(a.expires_at), b.expires_at);
        }
        let _ = read.inflight_holder();
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::fuzz::{check_state_data, check_time};
    use super::*;
    use crate::oauth::token::response::fuzz::{proptest_config, seeds};

    fn timestamp() -> impl Strategy<Value = Timestamp> {
        prop_oneof![
            (
                Timestamp::MIN.as_second()..=Timestamp::MAX.as_second(),
                0i32..1_000_000_000
            )
                .prop_filter_map("in range", |(s, n)| Timestamp::new(s, n).ok()),
            Just(Timestamp::MIN),
            Just(Timestamp::MAX),
            (0i64..4_000_000_000).prop_map(|s| Timestamp::from_second(s).unwrap()),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        "[^\\x00]{1,24}"
    }

    fn secret() -> impl Strategy<Value = SecretBytes> {
        proptest::collection::vec(any::<u8>(), 1..40).prop_map(SecretBytes::new)
    }

    /// A state as the operator writes it: times in whole seconds, no empty values.
    fn state() -> impl Strategy<Value = TokenState> {
        let access = (
            secret(),
            text(),
            proptest::option::of(text()),
            timestamp(),
            timestamp(),
        )
            .prop_map(|(token, token_type, scope, i, e)| AccessToken {
                token,
                token_type,
                scope,
                issued_at: whole_seconds(i),
                expires_at: whole_seconds(e),
            });
        (
            (
                proptest::option::of(secret()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(access),
                proptest::option::of(text()),
            ),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(timestamp().prop_map(whole_seconds)),
                proptest::option::of(text()),
                proptest::option::of(text()),
                any::<bool>(),
            ),
        )
            .prop_map(
                |((rt, seed, config, access, request), (reason, ffp, fat, infl, by, retry))| {
                    TokenState {
                        refresh_token: rt,
                        seed_fingerprint: seed,
                        config_fingerprint: config,
                        access,
                        refresh_request: request,
                        failed_reason: reason,
                        failed_fingerprint: ffp,
                        failed_at: fat,
                        inflight: infl,
                        inflight_by: by,
                        inflight_retry: retry,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(proptest_config(512))]

        /// The state Secret round trip: whatever the operator stores, it reads back exactly,
        /// across jiff's whole time range (a restart resumes from the same state).
        #[test]
        fn state_round_trips_through_its_secret(s in state()) {
            prop_assert_eq!(TokenState::from_data(&s.to_data()), s);
        }

        #[test]
        fn stored_times_read_back_as_whole_seconds(t in timestamp()) {
            prop_assert_eq!(parse_time(&format_time(t)), Some(whole_seconds(t)));
            prop_assert!(whole_seconds(t) <= t);
        }

        #[test]
        fn fuzz_time(text in prop_oneof![
            "\\PC{0,40}",
            "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,14})?([Zz]|[+\u{2212}-][0-9]{2}:[0-9]{2})",
            "[0-9]{1,20} ?(ns|us|ms|s|m|h|d|w|M|y|sec|min|hours)( [0-9]{1,5}[smh])?",
        ]) {
            check_time(text.as_bytes());
        }

        #[test]
        fn fuzz_state_data(data in proptest::collection::vec(
            prop_oneof![
                4 => any::<u8>(),
                1 => Just(0xFFu8),
            ],
            0..200,
        )) {
            check_state_data(&data);
        }

        /// A plan that waits always names a refresh point in the future and before expiry's
        /// deadline passes: waiting never outlives the token unnoticed.
        #[test]
        fn a_plan_never_waits_past_expiry(
            s in state(),
            now in timestamp(),
            pct in 1u8..=99,
        ) {
            let input = DecisionInput {
                now,
                state: &s,
                config_fp: s.config_fingerprint.as_deref().unwrap_or("cfg"),
                seed_fp: s.seed_fingerprint.as_deref().unwrap_or(""),
                refresh_request: s.refresh_request.as_deref(),
                renew: &RenewBefore::Percentage(pct),
                jitter_key: "ns/conn",
            };
            if let Plan::Wait { next_refresh } = plan(&input) {
                let access = s.access.as_ref().expect("a wait needs a token");
                prop_assert!(now < next_refresh, "{now} {next_refresh}");
                prop_assert!(now < access.expires_at, "waits on an expired token");
            }
        }
    }

    #[test]
    fn fuzz_seeds_pass_the_checks() {
        for seed in seeds("time") {
            check_time(&seed);
        }
        for seed in seeds("state_data") {
            check_state_data(&seed);
        }
    }
}
