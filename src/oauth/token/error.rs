//! Why a token request failed and how the caller should react. Pure: no I/O.
//!
//! `Display` of a [`TokenError`] never contains a secret, a token, a URL query or a response
//! body; server and transport text reaches it only through `sanitize_text`.
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

/// A failed token request. `Display` never contains secrets, tokens, URL queries or bodies.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token URL violates the URL rules (see [`validate_token_url`](super::validate_token_url)).
    #[error("invalid token URL: {0}")]
    InvalidUrl(String),
    /// The token host is, or only resolves to, a forbidden address (metadata, link-local, …).
    #[error("token endpoint refused: {0}")]
    ForbiddenAddress(String),
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
    #[error("cannot reach the token endpoint: {0}")]
    Connect(String),
    /// The TLS handshake failed (untrusted or mismatched certificate, protocol error). Not sent.
    #[error("TLS handshake with the token endpoint failed: {0}")]
    Tls(String),
    /// The request may have been processed but no complete response arrived (timeout, reset).
    #[error("the token request was sent but no complete response arrived: {0}")]
    UnknownOutcome(String),
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
            TokenError::ForbiddenAddress(_) => Reason::ForbiddenTokenEndpoint,
            TokenError::InvalidCaBundle(_) => Reason::InvalidCaBundle,
            TokenError::ClientSetup(_) => Reason::TokenClientSetupFailed,
            TokenError::InvalidGrant { .. } => Reason::RefreshTokenRejected,
            TokenError::InvalidClient { .. } => Reason::InvalidClient,
            TokenError::Rejected { .. } => Reason::TokenRequestRejected,
            TokenError::RateLimited { .. } => Reason::RateLimited,
            TokenError::ServerError { .. } => Reason::TokenEndpointUnavailable,
            TokenError::Redirected { .. } => Reason::TokenEndpointRedirected,
            TokenError::Connect(_) => Reason::TokenEndpointUnreachable,
            TokenError::Tls(_) => Reason::TlsError,
            TokenError::UnknownOutcome(_) => Reason::TokenResponseLost,
            TokenError::Unparseable { .. } => Reason::UnparseableTokenResponse,
        }
    }

    /// How to react; see [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        match self {
            TokenError::InvalidUrl(_)
            | TokenError::ForbiddenAddress(_)
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
            TokenError::Connect(_) | TokenError::Tls(_) => {
                ErrorClass::Transient { retry_after: None }
            }
            TokenError::UnknownOutcome(_) | TokenError::Unparseable { .. } => {
                ErrorClass::UnknownOutcome
            }
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
    let mut text = s.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if text.contains(secret) {
            text = text.replace(secret, "[REDACTED]");
        }
    }
    let mut out = String::new();
    let mut count = 0usize;
    let mut last_space = true;
    for ch in text.chars() {
        let ch = if ch.is_whitespace() { ' ' } else { ch };
        if ch.is_control() || (ch == ' ' && last_space) {
            continue;
        }
        // Bidi overrides and zero-width characters could disguise the text.
        if matches!(ch, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
        {
            continue;
        }
        if count == max_chars {
            out.push('…');
            break;
        }
        last_space = ch == ' ';
        out.push(ch);
        count += 1;
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::token::test_support::{assert_clean, NEW_RT};

    #[test]
    fn every_error_display_is_clean() {
        let all = vec![
            TokenError::InvalidUrl("x".into()),
            TokenError::ForbiddenAddress("x".into()),
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
            TokenError::Connect("x".into()),
            TokenError::Tls("x".into()),
            TokenError::UnknownOutcome("x".into()),
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
}
