//! Why a token request failed and how the caller should react. Pure: no I/O.
//!
//! `Display` of a [`TokenError`] never contains a secret, a token, a URL query or a response
//! body; server text reaches it only through `sanitize_text`. It is what the status and Events
//! show, so for failures below HTTP (DNS, connect, TLS, a lost response, an address refused by
//! policy) it names only the **class** of the failure: the transport's own words would let
//! anyone who can create a connection probe what answers inside the cluster network. Those
//! words are kept in [`TokenError::detail`], for the operator's log only.
use std::fmt;
use std::time::Duration;

use secrecy::SecretString;

use crate::reason::Reason;

/// How the caller should react to a [`TokenError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retrying the same request will not help: needs a human (credentials, configuration,
    /// re-authorization). Requeue slowly and wake on CR/Secret changes.
    Terminal,
    /// The request was not processed (or the server asked us to come back later): safe to retry
    /// with backoff, never sooner than `retry_after`.
    Transient { retry_after: Option<Duration> },
    /// The request may have been processed and the response lost: a refresh token may already
    /// be rotated. For a refresh grant, retry at most once with the same refresh token.
    UnknownOutcome,
}

/// Why a connection to the token endpoint could not be made (the request was never sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The host name did not resolve.
    Dns,
    /// Nothing accepted the connection.
    Refused,
    /// The connect phase (DNS + TCP) ran out of time.
    Timeout,
    /// Any other connect failure (unreachable network, reset during connect, …).
    Other,
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectFailure::Dns => "DNS lookup failed",
            ConnectFailure::Refused => "connection refused",
            ConnectFailure::Timeout => "connect timeout",
            ConnectFailure::Other => "connection failed",
        })
    }
}

/// How a request that may have been processed ended without a complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostResponse {
    /// The total request timeout passed.
    Timeout,
    /// The connection broke (reset, closed early, body interrupted).
    ConnectionLost,
    /// A status the client cannot interpret (1xx leftovers, nonstandard codes).
    UnexpectedStatus(u16),
}

impl fmt::Display for LostResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostResponse::Timeout => f.write_str("timed out"),
            LostResponse::ConnectionLost => f.write_str("connection lost"),
            LostResponse::UnexpectedStatus(s) => write!(f, "unexpected HTTP status {s}"),
        }
    }
}

/// A failed token request. `Display` never contains secrets, tokens, URL queries, bodies or
/// transport error text (see the module documentation).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token URL violates the URL rules (see [`validate_token_url`](super::validate_token_url)).
    #[error("invalid token URL: {0}")]
    InvalidUrl(String),
    /// The token host resolves only to forbidden addresses (metadata, link-local, loopback
    /// without the flag, …).
    #[error("the token host's address is one the operator never contacts (link-local, cloud metadata, loopback or similar)")]
    ForbiddenAddress { detail: String },
    /// The token host resolves only to private addresses the operator's policy does not allow.
    #[error("the token host's address is not allowed by the operator's policy (a private network address)")]
    NotAllowed { detail: String },
    /// The CA bundle could not be parsed or contains no usable certificate.
    #[error("invalid CA bundle: {0}")]
    InvalidCaBundle(String),
    /// The HTTP client could not be built (e.g. no system CA certificates).
    #[error("cannot set up the HTTP client: {0}")]
    ClientSetup(String),
    /// `invalid_grant` on a refresh grant: the refresh token is expired, revoked or already used.
    #[error("the token endpoint rejected the refresh token (invalid_grant){}", desc_suffix(.description))]
    InvalidGrant { description: Option<String> },
    /// `invalid_client` or HTTP 401: wrong client id/secret or auth method.
    #[error("the token endpoint rejected the client credentials (invalid_client){}", desc_suffix(.description))]
    InvalidClient { description: Option<String> },
    /// Any other OAuth error (`invalid_scope`, `unauthorized_client`, `unsupported_grant_type`,
    /// `invalid_request`, `invalid_grant` on a client-credentials grant, …) or another 4xx.
    /// `error` is the sanitized OAuth error code, or `http_<status>` when there was none.
    #[error("the token endpoint rejected the request (HTTP {status}, {error}){}", desc_suffix(.description))]
    Rejected {
        status: u16,
        error: String,
        description: Option<String>,
    },
    /// HTTP 429 (or OAuth `slow_down`).
    #[error("the token endpoint is rate limiting requests (HTTP 429){}", retry_suffix(.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    /// HTTP 5xx, 408, or OAuth `server_error` / `temporarily_unavailable`.
    #[error("the token endpoint failed (HTTP {status}){}", retry_suffix(.retry_after))]
    ServerError {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The token endpoint answered with a redirect, which is never followed.
    #[error("the token endpoint answered with a redirect (HTTP {status}); redirects are not followed, configure the final token URL")]
    Redirected { status: u16 },
    /// The request was never sent: DNS, TCP connect or connect timeout failed.
    #[error("cannot reach the token endpoint: {failure}")]
    Connect {
        failure: ConnectFailure,
        detail: String,
    },
    /// The TLS handshake failed (untrusted or mismatched certificate, protocol error). Not sent.
    #[error("TLS handshake with the token endpoint failed")]
    Tls { detail: String },
    /// The request may have been processed but no complete response arrived (timeout, reset).
    #[error("the token request was sent but no complete response arrived: {lost}")]
    UnknownOutcome { lost: LostResponse, detail: String },
    /// A success status with a body that is not a usable token response (invalid JSON, no
    /// `access_token`, oversized). The server may have rotated the refresh token: any
    /// `refresh_token` that could be extracted is carried so the caller can persist it.
    #[error("the token endpoint returned a success status with an unusable body (refresh token recovered: {})", if .refresh_token.is_some() { "yes" } else { "no" })]
    Unparseable { refresh_token: Option<SecretString> },
}

fn desc_suffix(d: &Option<String>) -> String {
    match d {
        Some(d) if !d.is_empty() => format!(": {d}"),
        _ => String::new(),
    }
}

fn retry_suffix(r: &Option<Duration>) -> String {
    match r {
        Some(r) => format!("; retry after {}s", r.as_secs()),
        None => String::new(),
    }
}

impl TokenError {
    /// Fixed CamelCase category, for a condition reason or a metric label.
    pub fn reason(&self) -> Reason {
        match self {
            TokenError::InvalidUrl(_) => Reason::InvalidTokenUrl,
            TokenError::ForbiddenAddress { .. } => Reason::ForbiddenTokenEndpoint,
            TokenError::NotAllowed { .. } => Reason::TokenUrlNotAllowed,
            TokenError::InvalidCaBundle(_) => Reason::InvalidCaBundle,
            TokenError::ClientSetup(_) => Reason::TokenClientSetupFailed,
            TokenError::InvalidGrant { .. } => Reason::RefreshTokenRejected,
            TokenError::InvalidClient { .. } => Reason::InvalidClient,
            TokenError::Rejected { .. } => Reason::TokenRequestRejected,
            TokenError::RateLimited { .. } => Reason::RateLimited,
            TokenError::ServerError { .. } => Reason::TokenEndpointUnavailable,
            TokenError::Redirected { .. } => Reason::TokenEndpointRedirected,
            TokenError::Connect { .. } => Reason::TokenEndpointUnreachable,
            TokenError::Tls { .. } => Reason::TlsError,
            TokenError::UnknownOutcome { .. } => Reason::TokenResponseLost,
            TokenError::Unparseable { .. } => Reason::UnparseableTokenResponse,
        }
    }

    /// How to react; see [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        match self {
            TokenError::InvalidUrl(_)
            | TokenError::ForbiddenAddress { .. }
            | TokenError::InvalidCaBundle(_)
            | TokenError::ClientSetup(_)
            | TokenError::InvalidGrant { .. }
            | TokenError::InvalidClient { .. }
            | TokenError::Rejected { .. }
            | TokenError::Redirected { .. } => ErrorClass::Terminal,
            TokenError::RateLimited { retry_after }
            | TokenError::ServerError { retry_after, .. } => ErrorClass::Transient {
                retry_after: *retry_after,
            },
            // Not sent: safe to retry. TLS failures are usually configuration, but also
            // certificate rotations on the server side; exponential backoff (capped at
            // minutes) recovers from those without a human.
            TokenError::Connect { .. } | TokenError::Tls { .. } => {
                ErrorClass::Transient { retry_after: None }
            }
            // A name that resolves only to private addresses: nothing was sent. Retried with
            // backoff (capped at minutes), not remembered as terminal: DNS answers change, and
            // after an administrator allow-lists the host (an operator restart) the next
            // attempt goes through at once instead of after the hour-long terminal interval.
            TokenError::NotAllowed { .. } => ErrorClass::Transient { retry_after: None },
            TokenError::UnknownOutcome { .. } | TokenError::Unparseable { .. } => {
                ErrorClass::UnknownOutcome
            }
        }
    }

    /// The transport's or the policy's own account of a failure below HTTP, which `Display`
    /// leaves out: for the operator's log only, never for the status or an Event. Sanitized
    /// (no URL, no secrets, capped).
    pub fn detail(&self) -> Option<&str> {
        match self {
            TokenError::ForbiddenAddress { detail }
            | TokenError::NotAllowed { detail }
            | TokenError::Connect { detail, .. }
            | TokenError::Tls { detail }
            | TokenError::UnknownOutcome { detail, .. } => Some(detail),
            _ => None,
        }
    }

    /// The refresh token recovered from an unusable success response, if any.
    pub fn recovered_refresh_token(&self) -> Option<&SecretString> {
        match self {
            TokenError::Unparseable { refresh_token } => refresh_token.as_ref(),
            _ => None,
        }
    }
}

/// Sanitize server text: drop control characters, collapse whitespace, blank out secrets,
/// cap the length. Lives with the errors because it is the one gate for text entering them
/// (OAuth descriptions and transport messages alike).
pub(super) fn sanitize_text(s: &str, max_chars: usize, secrets: &[&str]) -> String {
    // Secrets are blanked out before and after normalizing: one split by a character that
    // normalizing drops (a NUL, a zero-width space) would otherwise come out whole.
    let text = normalize(&redact(s, secrets));
    let normalized: Vec<String> = secrets.iter().map(|s| normalize(s)).collect();
    let normalized: Vec<&str> = normalized.iter().map(|s| s.trim()).collect();
    let text = redact(&text, &normalized);
    let mut out: String = text.chars().take(max_chars).collect();
    if text.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out.trim_end().to_string()
}

/// `text` with every occurrence of each non-empty secret replaced by `[REDACTED]`.
pub(super) fn redact(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if text.contains(secret) {
            text = text.replace(secret, "[REDACTED]");
        }
    }
    text
}

/// Control characters, bidi overrides and zero-width characters dropped, whitespace runs
/// collapsed to one space, leading whitespace removed.
fn normalize(s: &str) -> String {
    let mut out = String::new();
    let mut last_space = true;
    for ch in s.chars() {
        let ch = if ch.is_whitespace() { ' ' } else { ch };
        if ch.is_control() || (ch == ' ' && last_space) {
            continue;
        }
        // Bidi overrides and zero-width characters could disguise the text.
        if matches!(ch, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
        {
            continue;
        }
        last_space = ch == ' ';
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::token::test_support::{assert_clean, NEW_RT};

    #[test]
    fn every_error_display_is_clean() {
        let all = vec![
            TokenError::InvalidUrl("x".into()),
            TokenError::ForbiddenAddress { detail: "x".into() },
            TokenError::NotAllowed { detail: "x".into() },
            TokenError::InvalidCaBundle("x".into()),
            TokenError::ClientSetup("x".into()),
            TokenError::InvalidGrant { description: None },
            TokenError::InvalidClient {
                description: Some("d".into()),
            },
            TokenError::Rejected {
                status: 400,
                error: "invalid_scope".into(),
                description: None,
            },
            TokenError::RateLimited {
                retry_after: Some(Duration::from_secs(3)),
            },
            TokenError::ServerError {
                status: 502,
                retry_after: None,
            },
            TokenError::Redirected { status: 301 },
            TokenError::Connect {
                failure: ConnectFailure::Refused,
                detail: "x".into(),
            },
            TokenError::Tls { detail: "x".into() },
            TokenError::UnknownOutcome {
                lost: LostResponse::Timeout,
                detail: "x".into(),
            },
            TokenError::Unparseable {
                refresh_token: Some(SecretString::from(NEW_RT)),
            },
        ];
        let mut reasons = std::collections::BTreeSet::new();
        for e in &all {
            assert_clean(e);
            assert!(
                reasons.insert(e.reason().as_str()),
                "duplicate reason {}",
                e.reason().as_str()
            );
            assert!(e
                .reason()
                .as_str()
                .chars()
                .all(|c| c.is_ascii_alphanumeric()));
            assert!(e
                .reason()
                .as_str()
                .starts_with(|c: char| c.is_ascii_uppercase()));
        }
    }

    /// What the status and Events show names the failure's class and never the transport's
    /// text (which could describe an in-cluster service to whoever wrote the token URL).
    #[test]
    fn display_names_the_class_not_the_transport_detail() {
        const DETAIL: &str = "client error (Connect): tcp connect error: Connection refused (os error 111) at 10.0.0.7:8200 (Vault v1.15)";
        let d = || DETAIL.to_string();
        let cases = [
            (
                TokenError::Connect {
                    failure: ConnectFailure::Refused,
                    detail: d(),
                },
                "connection refused",
            ),
            (
                TokenError::Connect {
                    failure: ConnectFailure::Dns,
                    detail: d(),
                },
                "DNS lookup failed",
            ),
            (
                TokenError::Connect {
                    failure: ConnectFailure::Timeout,
                    detail: d(),
                },
                "connect timeout",
            ),
            (
                TokenError::Connect {
                    failure: ConnectFailure::Other,
                    detail: d(),
                },
                "connection failed",
            ),
            (TokenError::Tls { detail: d() }, "TLS handshake"),
            (
                TokenError::UnknownOutcome {
                    lost: LostResponse::Timeout,
                    detail: d(),
                },
                "timed out",
            ),
            (
                TokenError::UnknownOutcome {
                    lost: LostResponse::ConnectionLost,
                    detail: d(),
                },
                "connection lost",
            ),
            (
                TokenError::UnknownOutcome {
                    lost: LostResponse::UnexpectedStatus(101),
                    detail: d(),
                },
                "HTTP status 101",
            ),
            (
                TokenError::NotAllowed { detail: d() },
                "not allowed by the operator's policy",
            ),
            (
                TokenError::ForbiddenAddress { detail: d() },
                "never contacts",
            ),
        ];
        for (e, class) in cases {
            let shown = e.to_string();
            assert!(shown.contains(class), "{shown}");
            for leak in ["tcp connect", "os error", "10.0.0.7", "Vault", "Connect)"] {
                assert!(!shown.contains(leak), "{leak:?} leaked into {shown:?}");
            }
            assert_eq!(e.detail(), Some(DETAIL), "the log still gets the detail");
        }
        let e = TokenError::ServerError {
            status: 503,
            retry_after: None,
        };
        assert!(e.to_string().contains("HTTP 503") && e.detail().is_none());
        assert_eq!(
            TokenError::NotAllowed { detail: d() }.reason().as_str(),
            "TokenURLNotAllowed"
        );
    }

    /// Found by `response::props::request_secrets_never_reach_an_error`: a secret the server
    /// echoes with a character the sanitizer drops inside it (a NUL, a zero-width space) came
    /// out whole once that character was gone.
    #[test]
    fn a_secret_split_by_a_dropped_character_is_still_redacted() {
        for split in ["\u{0}", "\u{7}", "\u{200B}", "\u{202E}", "\u{FEFF}"] {
            let text = format!("token rt-SENS{split}ITIVE-1 was revoked");
            let out = sanitize_text(&text, 200, &["rt-SENSITIVE-1"]);
            assert!(!out.contains("rt-SENSITIVE-1"), "{split:?}: {out}");
            assert!(out.contains("[REDACTED]"), "{split:?}: {out}");
        }
        // A secret that itself holds a run of whitespace is found collapsed as well.
        let out = sanitize_text("a pass  word\tb", 200, &["pass  word"]);
        assert_eq!(out, "a [REDACTED] b");
    }
}
