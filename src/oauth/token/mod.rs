//! OAuth 2.0 token endpoint client (RFC 6749 §4.4 client credentials, §6 refresh).
//!
//! One call of [`TokenClient::request_token`] sends **at most one** HTTP request and never
//! retries: whether and when to retry depends on the grant (a refresh token may have been
//! rotated) and is the caller's decision, guided by [`TokenError::class`].
//!
//! # Hardening
//!
//! * `https` only; plain `http` only with [`TokenClientConfig::allow_http_loopback`] and a
//!   loopback IP literal or `localhost` host. No userinfo, no fragment.
//! * No redirects (a 3xx is [`TokenError::Redirected`]), no proxies (environment proxies are
//!   ignored), connect and total timeouts, response size cap, no connection reuse.
//! * Link-local, cloud-metadata, unspecified and (unless allowed) loopback addresses are refused
//!   **on the resolved address**: a custom resolver filters what DNS returns, and reqwest
//!   connects to exactly the addresses the resolver hands back, so the check and the use are the
//!   same set (no TOCTOU / DNS rebinding window). IP-literal hosts never reach a resolver in
//!   reqwest, so [`validate_token_url`] checks them with the same rules.
//!
//! # Was the request sent?
//!
//! The distinction matters for rotating refresh tokens: a request that never left the host can
//! be retried freely, a request that may have been processed cannot.
//!
//! * reqwest reports everything that fails inside the connector — DNS, TCP connect, the connect
//!   timeout, the TLS handshake, our resolver's refusals — as `is_connect()`. The connector runs
//!   before a single byte of the HTTP request is written, so these are "not sent" →
//!   [`ErrorClass::Transient`].
//! * Every other transport failure (`is_timeout()` of the total timeout, `is_request()` resets
//!   and "connection closed before message completed", `is_body()`/`is_decode()` while reading
//!   the response) happens after the request may have been written → [`ErrorClass::UnknownOutcome`].
//! * Pooled keep-alive connections are disabled (`pool_max_idle_per_host(0)`): a server closing
//!   an idle connection just as we reuse it would otherwise turn into a spurious unknown outcome.
//!   Token requests are minutes apart, so pooling buys nothing.
//!
//! # Secrets
//!
//! Client secret, refresh token and access token live in [`SecretString`]; `Debug` of every type
//! here redacts them; no error message contains a token, a secret, a URL query or a response
//! body. The OAuth `error` code and a sanitized, length-capped `error_description` (server
//! text, with any of the request's secrets blanked out) are the only server text surfaced.
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

mod error;
mod request;
#[cfg(test)]
mod test_support;
mod url_policy;

use error::sanitize_text;
pub use error::{ErrorClass, TokenError};
use request::encode_request;
pub use request::{ClientAuthMethod, Grant, TokenRequest};
pub use url_policy::validate_token_url;
use url_policy::{check_host_name, filter_resolved, ForbiddenAddressError, NameCheck};

/// A successful token response (RFC 6749 §5.1), parsed leniently.
#[derive(Debug, Clone)]
pub struct TokenResponse {
    pub access_token: SecretString,
    /// As sent by the server; `"Bearer"` when omitted.
    pub token_type: String,
    /// `None` when the server omitted it or sent an unusable value (non-numeric, negative,
    /// zero); the caller applies its default (`schedule::default_expires_in`). Capped at
    /// [`MAX_EXPIRES_IN`].
    pub expires_in: Option<Duration>,
    /// `None` when the server sent none: for a refresh grant the caller **keeps** its old one.
    pub refresh_token: Option<SecretString>,
    pub scope: Option<String>,
}

/// Upper bound applied to `expires_in` (10 years), so date arithmetic cannot overflow.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Upper bound applied to `Retry-After` / `x-ratelimit-reset`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Maximum length (chars) of a server `error_description` surfaced in errors.
const MAX_DESCRIPTION_CHARS: usize = 200;

/// Maximum length of an OAuth `error` code surfaced in errors.
const MAX_ERROR_CODE_CHARS: usize = 64;

/// Maximum length of a transport error message.
const MAX_TRANSPORT_MESSAGE_CHARS: usize = 300;

/// Maximum number of cached per-CA-bundle HTTP clients.
const MAX_CACHED_CLIENTS: usize = 64;

/// Client configuration.
#[derive(Debug, Clone)]
pub struct TokenClientConfig {
    /// Allow plain `http` to loopback hosts and connections to loopback addresses (tests, local
    /// development). Off in production.
    pub allow_http_loopback: bool,
    /// TCP connect (+ DNS) timeout. Default 5 s.
    pub connect_timeout: Duration,
    /// Total timeout from connect to the end of the response body. Default 15 s.
    pub request_timeout: Duration,
    /// Response body cap. Default 64 KiB.
    pub max_response_bytes: usize,
}

impl Default for TokenClientConfig {
    fn default() -> Self {
        TokenClientConfig {
            allow_http_loopback: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_response_bytes: 64 * 1024,
        }
    }
}

/// DNS resolver that refuses forbidden names and filters forbidden resolved addresses.
#[derive(Debug, Clone)]
struct GuardedResolver {
    allow_loopback: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let check = check_host_name(name.as_str(), self.allow_loopback);
        let allow_loopback = self.allow_loopback;
        Box::pin(async move {
            let kept = match check? {
                NameCheck::Local(addrs) => addrs,
                NameCheck::Lookup(host) => {
                    let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
                    filter_resolved(resolved, allow_loopback)?
                }
            };
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Response interpretation
// ---------------------------------------------------------------------------------------------

/// Outcome of reading a response body under the size cap.
enum BodyRead {
    Complete(Vec<u8>),
    /// The cap was hit; holds the first `cap` bytes.
    TooLarge(Vec<u8>),
    /// The transfer failed midway; holds what arrived.
    Failed(Vec<u8>, String),
}

async fn read_capped(mut resp: reqwest::Response, cap: usize) -> BodyRead {
    let hint = resp
        .content_length()
        .map(|l| usize::try_from(l).unwrap_or(usize::MAX))
        .unwrap_or(0);
    let mut buf = Vec::with_capacity(hint.min(cap).min(16 * 1024));
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = cap.saturating_sub(buf.len());
                if chunk.len() > room {
                    buf.extend_from_slice(&chunk[..room]);
                    return BodyRead::TooLarge(buf);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return BodyRead::Complete(buf),
            Err(e) => return BodyRead::Failed(buf, transport_message(&e.without_url())),
        }
    }
}

/// Result of parsing a 2xx body.
enum SuccessParse {
    Token(TokenResponse),
    /// A 2xx carrying an OAuth error object (some servers, e.g. GitHub, do this).
    OAuthError(OAuthError),
    Unusable {
        refresh_token: Option<SecretString>,
    },
}

/// An OAuth error object (RFC 6749 §5.2), already sanitized.
struct OAuthError {
    error: String,
    description: Option<String>,
}

fn non_empty_str(v: Option<&serde_json::Value>) -> Option<&str> {
    v.and_then(|v| v.as_str()).filter(|s| !s.is_empty())
}

/// `expires_in` as a number or numeric string; zero, negative or garbage ⇒ `None`.
fn parse_expires_in(v: &serde_json::Value) -> Option<Duration> {
    let secs: f64 = match v {
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                return (u > 0).then(|| Duration::from_secs(u).min(MAX_EXPIRES_IN));
            }
            n.as_f64()?
        }
        serde_json::Value::String(s) => {
            let s = s.trim();
            if let Ok(u) = s.parse::<u64>() {
                return (u > 0).then(|| Duration::from_secs(u).min(MAX_EXPIRES_IN));
            }
            s.parse::<f64>().ok()?
        }
        _ => return None,
    };
    if !secs.is_finite() || secs < 1.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(MAX_EXPIRES_IN.as_secs_f64()),
    ))
}

fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// Parse a 2xx body. Never fails on `expires_in`, `token_type`, `scope` or unknown members;
/// the refresh token is extracted first, so it survives any later failure.
fn parse_success(body: &[u8], content_type: Option<&str>, secrets: &[&str]) -> SuccessParse {
    let body = strip_bom(body);
    let map = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(_) => {
            return SuccessParse::Unusable {
                refresh_token: None,
            }
        }
        Err(_) => {
            let is_form = content_type.is_some_and(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            });
            if is_form {
                // Legacy form-encoded token response (e.g. GitHub without Accept: json).
                let map: serde_json::Map<String, serde_json::Value> =
                    url::form_urlencoded::parse(body)
                        .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
                        .collect();
                map
            } else {
                return SuccessParse::Unusable {
                    refresh_token: scan_refresh_token(body).map(SecretString::from),
                };
            }
        }
    };

    let refresh_token = non_empty_str(map.get("refresh_token")).map(SecretString::from);
    let Some(access_token) = non_empty_str(map.get("access_token")) else {
        if let Some(code) = non_empty_str(map.get("error")) {
            if refresh_token.is_none() {
                return SuccessParse::OAuthError(sanitize_oauth_error(
                    code,
                    non_empty_str(map.get("error_description")),
                    secrets,
                ));
            }
        }
        return SuccessParse::Unusable { refresh_token };
    };
    let token_type = non_empty_str(map.get("token_type"))
        .unwrap_or("Bearer")
        .to_string();
    let expires_in = map.get("expires_in").and_then(parse_expires_in);
    let scope = match map.get("scope") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(a)) => Some(
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    };
    SuccessParse::Token(TokenResponse {
        access_token: SecretString::from(access_token),
        token_type,
        expires_in,
        refresh_token,
        scope,
    })
}

/// Extract `refresh_token` from a top-level JSON object that may be truncated or otherwise
/// invalid after the member. Walks members token by token (string-aware), so a
/// `"refresh_token"` inside another string value is not mistaken for the member. Returns
/// `None` unless the member's string value is complete.
fn scan_refresh_token(body: &[u8]) -> Option<String> {
    let mut s = Scanner { b: body, i: 0 };
    s.ws();
    s.eat(b'{')?;
    loop {
        s.ws();
        let key = s.string()?;
        s.ws();
        s.eat(b':')?;
        s.ws();
        if key == "refresh_token" && s.peek() == Some(b'"') {
            return s.string().filter(|v| !v.is_empty());
        }
        s.skip_value()?;
        s.ws();
        s.eat(b',')?;
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.b.get(self.i..self.i + 4)?;
        self.i += 4;
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    }

    /// A complete JSON string literal, unescaped; `None` if truncated or malformed.
    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                self.eat(b'\\')?;
                                self.eat(b'u')?;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return None;
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            char::from_u32(cp)?
                        }
                        _ => return None,
                    };
                    let mut tmp = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                }
                c if c < 0x20 => return None,
                c => out.push(c),
            }
        }
    }

    /// Skip one complete value; `None` if truncated.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                let start = self.i;
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.i += 1;
                }
                // A scalar running to the end of the buffer may be truncated.
                (self.i > start && self.i < self.b.len()).then_some(())
            }
        }
    }
}

/// RFC 6749 §5.2 restricts `error` to %x20-21 / %x23-5B / %x5D-7E; keep a conservative subset.
fn sanitize_error_code(code: &str) -> String {
    let c: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
        .take(MAX_ERROR_CODE_CHARS)
        .collect();
    if c.is_empty() {
        "unknown_error".to_string()
    } else {
        c
    }
}

fn sanitize_oauth_error(code: &str, description: Option<&str>, secrets: &[&str]) -> OAuthError {
    OAuthError {
        error: sanitize_error_code(code),
        description: description
            .map(|d| sanitize_text(d, MAX_DESCRIPTION_CHARS, secrets))
            .filter(|d| !d.is_empty()),
    }
}

/// Parse an OAuth error object from an error-status body; anything else (HTML, text) ⇒ `None`.
fn parse_oauth_error(body: &[u8], secrets: &[&str]) -> Option<OAuthError> {
    let v: serde_json::Value = serde_json::from_slice(strip_bom(body)).ok()?;
    let code = non_empty_str(v.get("error"))?;
    Some(sanitize_oauth_error(
        code,
        non_empty_str(v.get("error_description")),
        secrets,
    ))
}

/// Parse `Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date. Capped at
/// [`MAX_RETRY_AFTER`]; a date in the past gives zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// `Retry-After`, else Auth0-style `x-ratelimit-reset` (Unix seconds, or delta seconds when
/// small).
fn retry_after_from(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ra) = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now))
    {
        return Some(ra);
    }
    let reset = headers
        .get("x-ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())?;
    const EPOCH_THRESHOLD: u64 = 1_000_000_000;
    let d = if reset >= EPOCH_THRESHOLD {
        let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(reset))?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    } else {
        Duration::from_secs(reset)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

fn oauth_error_to_token_error(
    status: u16,
    e: OAuthError,
    is_refresh: bool,
    headers: &HeaderMap,
    now: SystemTime,
) -> TokenError {
    match e.error.as_str() {
        "invalid_grant" if is_refresh => TokenError::InvalidGrant {
            description: e.description,
        },
        "invalid_client" => TokenError::InvalidClient {
            description: e.description,
        },
        "slow_down" => TokenError::RateLimited {
            retry_after: retry_after_from(headers, now),
        },
        "server_error" | "temporarily_unavailable" => TokenError::ServerError {
            status,
            retry_after: retry_after_from(headers, now),
        },
        _ => TokenError::Rejected {
            status,
            error: e.error,
            description: e.description,
        },
    }
}

/// Classify a complete HTTP exchange. Pure, for testing.
fn interpret_response(
    status: u16,
    headers: &HeaderMap,
    body: BodyRead,
    is_refresh: bool,
    secrets: &[&str],
    now: SystemTime,
) -> Result<TokenResponse, TokenError> {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if (200..300).contains(&status) {
        return match body {
            BodyRead::Complete(b) => match parse_success(&b, content_type, secrets) {
                SuccessParse::Token(t) => Ok(t),
                SuccessParse::OAuthError(e) => Err(oauth_error_to_token_error(
                    status, e, is_refresh, headers, now,
                )),
                SuccessParse::Unusable { refresh_token } => {
                    Err(TokenError::Unparseable { refresh_token })
                }
            },
            // The exchange happened (a rotation may have too): keep whatever refresh token the
            // prefix yields.
            BodyRead::TooLarge(prefix) => {
                tracing::warn!(
                    status,
                    "token response exceeded the size cap; treating it as unparseable"
                );
                Err(TokenError::Unparseable {
                    refresh_token: scan_refresh_token(strip_bom(&prefix)).map(SecretString::from),
                })
            }
            BodyRead::Failed(prefix, msg) => match scan_refresh_token(strip_bom(&prefix)) {
                Some(rt) => Err(TokenError::Unparseable {
                    refresh_token: Some(SecretString::from(rt)),
                }),
                None => Err(TokenError::UnknownOutcome(format!(
                    "the success response body was interrupted: {msg}"
                ))),
            },
        };
    }

    let oauth = match &body {
        BodyRead::Complete(b) => parse_oauth_error(b, secrets),
        // Error statuses: classify by status when the body is unusable.
        BodyRead::TooLarge(_) | BodyRead::Failed(..) => None,
    };
    match status {
        300..=399 => Err(TokenError::Redirected { status }),
        401 => Err(TokenError::InvalidClient {
            description: oauth.and_then(|e| e.description),
        }),
        429 => Err(TokenError::RateLimited {
            retry_after: retry_after_from(headers, now),
        }),
        408 | 500..=599 => {
            if let Some(e) = &oauth {
                tracing::debug!(status, error = %e.error, "token endpoint server error");
            }
            Err(TokenError::ServerError {
                status,
                retry_after: retry_after_from(headers, now),
            })
        }
        400..=499 => Err(match oauth {
            Some(e) => oauth_error_to_token_error(status, e, is_refresh, headers, now),
            None => TokenError::Rejected {
                status,
                error: format!("http_{status}"),
                description: None,
            },
        }),
        // 1xx leftovers or nonstandard codes: nothing reliable to say about the outcome.
        _ => Err(TokenError::UnknownOutcome(format!(
            "unexpected HTTP status {status}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Transport errors
// ---------------------------------------------------------------------------------------------

/// Find a `T` in an error's source chain, looking inside `io::Error` wrappers too (their
/// `source()` skips the wrapped error itself).
fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(t) = inner.downcast_ref::<T>() {
                    return Some(t);
                }
                if let Some(t) = find_cause::<T>(inner) {
                    return Some(t);
                }
            }
        }
        cur = e.source();
    }
    None
}

/// A transport error as text: the source chain without the URL, sanitized and capped.
fn transport_message(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    if parts.is_empty() {
        parts.push(err.to_string());
    }
    sanitize_text(&parts.join(": "), MAX_TRANSPORT_MESSAGE_CHARS, &[])
}

fn classify_send_error(err: reqwest::Error) -> TokenError {
    let err = err.without_url();
    if let Some(f) = find_cause::<ForbiddenAddressError>(&err) {
        return TokenError::ForbiddenAddress(f.to_string());
    }
    if err.is_builder() {
        return TokenError::InvalidUrl(transport_message(&err));
    }
    if err.is_connect() {
        // Failed inside the connector (DNS, TCP, connect timeout, TLS handshake): the request
        // was never written.
        if let Some(tls) = find_cause::<rustls::Error>(&err) {
            return TokenError::Tls(sanitize_text(
                &tls.to_string(),
                MAX_TRANSPORT_MESSAGE_CHARS,
                &[],
            ));
        }
        return TokenError::Connect(transport_message(&err));
    }
    // Total timeout, reset, connection closed before the response: the request may have been
    // (partly or fully) written and processed.
    let what = if err.is_timeout() {
        "timed out"
    } else {
        "connection failed"
    };
    TokenError::UnknownOutcome(format!("{what}: {}", transport_message(&err)))
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// Token endpoint client. Cheap to share (`Arc`), safe to use concurrently.
pub struct TokenClient {
    cfg: TokenClientConfig,
    default_client: reqwest::Client,
    /// HTTP clients with an extra CA bundle, keyed by the bundle's SHA-256.
    ca_clients: Mutex<HashMap<[u8; 32], reqwest::Client>>,
}

impl fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenClient")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn build_http_client(
    cfg: &TokenClientConfig,
    extra_roots: Vec<reqwest::Certificate>,
) -> Result<reqwest::Client, reqwest::Error> {
    crate::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .no_proxy()
        .https_only(!cfg.allow_http_loopback)
        // A connect phase outliving the total timeout would be misreported as an unknown
        // outcome; keep it inside.
        .connect_timeout(cfg.connect_timeout.min(cfg.request_timeout))
        .timeout(cfg.request_timeout)
        .pool_max_idle_per_host(0)
        .tls_version_min(reqwest::tls::Version::TLS_1_2)
        .dns_resolver(GuardedResolver {
            allow_loopback: cfg.allow_http_loopback,
        })
        .user_agent(concat!("vaultconn/", env!("CARGO_PKG_VERSION")));
    if !extra_roots.is_empty() {
        // Merged with the platform roots (rustls-platform-verifier with extra roots).
        builder = builder.tls_certs_merge(extra_roots);
    }
    builder.build()
}

impl TokenClient {
    /// Build the client (platform CA roots via rustls-platform-verifier; installs the ring
    /// provider if none is installed yet).
    pub fn new(cfg: TokenClientConfig) -> Result<Self, TokenError> {
        let default_client = build_http_client(&cfg, Vec::new())
            .map_err(|e| TokenError::ClientSetup(transport_message(&e)))?;
        Ok(TokenClient {
            cfg,
            default_client,
            ca_clients: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &TokenClientConfig {
        &self.cfg
    }

    fn client_for(&self, ca_bundle_pem: Option<&[u8]>) -> Result<reqwest::Client, TokenError> {
        let Some(pem) = ca_bundle_pem else {
            return Ok(self.default_client.clone());
        };
        let key: [u8; 32] = Sha256::digest(pem).into();
        {
            let cache = self.ca_clients.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(&key) {
                return Ok(c.clone());
            }
        }
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|_| {
            TokenError::InvalidCaBundle("not a valid PEM certificate bundle".to_string())
        })?;
        if certs.is_empty() {
            return Err(TokenError::InvalidCaBundle(
                "contains no PEM certificate".to_string(),
            ));
        }
        let client = build_http_client(&self.cfg, certs).map_err(|e| {
            TokenError::InvalidCaBundle(format!(
                "the certificates cannot be used as trust anchors ({})",
                transport_message(&e)
            ))
        })?;
        let mut cache = self.ca_clients.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_CLIENTS {
            cache.clear();
        }
        cache.insert(key, client.clone());
        Ok(client)
    }

    /// Validates the URL (same rules as [`validate_token_url`]), sends one request, never
    /// retries. `ca_bundle_pem`: extra trusted roots (PEM), merged with the platform roots.
    pub async fn request_token(
        &self,
        req: &TokenRequest,
        ca_bundle_pem: Option<&[u8]>,
    ) -> Result<TokenResponse, TokenError> {
        let url = validate_token_url(&req.token_url, self.cfg.allow_http_loopback)
            .map_err(TokenError::InvalidUrl)?;
        let client = self.client_for(ca_bundle_pem)?;
        let encoded = encode_request(req);

        let mut builder = client
            .post(url)
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .body(encoded.body.expose_secret().to_string());
        if let Some(auth) = &encoded.authorization {
            let mut value = HeaderValue::from_str(auth.expose_secret()).map_err(|_| {
                // Base64 output is always a valid header value; unreachable in practice.
                TokenError::ClientSetup("cannot encode the Authorization header".to_string())
            })?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }

        let resp = builder.send().await.map_err(classify_send_error)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = read_capped(resp, self.cfg.max_response_bytes).await;

        let rt_secret = match &req.grant {
            Grant::RefreshToken(rt) => rt.expose_secret(),
            Grant::ClientCredentials => "",
        };
        let secrets = [req.client_secret.expose_secret(), rt_secret];
        interpret_response(
            status,
            &headers,
            body,
            req.grant.is_refresh(),
            &secrets,
            SystemTime::now(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::post;
    use axum::Router;
    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::request::basic_authorization;
    use super::test_support::*;

    #[test]
    fn token_response_debug_is_redacted() {
        let resp = TokenResponse {
            access_token: SecretString::from(AT),
            token_type: "Bearer".into(),
            expires_in: None,
            refresh_token: Some(SecretString::from(NEW_RT)),
            scope: None,
        };
        let d = format!("{resp:?}");
        assert!(!d.contains(AT) && !d.contains(NEW_RT), "{d}");
    }

    // ----------------------------------------------------------------------------------------
    // Parsing
    // ----------------------------------------------------------------------------------------

    fn ok(body: &str) -> TokenResponse {
        match parse_success(body.as_bytes(), Some("application/json"), &[]) {
            SuccessParse::Token(t) => t,
            _ => panic!("expected a token"),
        }
    }

    fn unusable(body: &[u8]) -> Option<String> {
        match parse_success(body, Some("application/json"), &[]) {
            SuccessParse::Unusable { refresh_token } => {
                refresh_token.map(|s| s.expose_secret().to_string())
            }
            SuccessParse::Token(_) => panic!("unexpectedly parsed"),
            SuccessParse::OAuthError(_) => panic!("unexpected oauth error"),
        }
    }

    #[test]
    fn lenient_success_parsing() {
        let t = ok(&format!(
            r#"{{"access_token":"{AT}","token_type":"bearer","expires_in":3600,"refresh_token":"{NEW_RT}","scope":"a b","id_token":"x","nested":{{"k":[1,2]}}}}"#
        ));
        assert_eq!(t.access_token.expose_secret(), AT);
        assert_eq!(t.token_type, "bearer");
        assert_eq!(t.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(t.refresh_token.unwrap().expose_secret(), NEW_RT);
        assert_eq!(t.scope.as_deref(), Some("a b"));

        // String expires_in (Azure AD, SAP), padded.
        let t = ok(r#"{"access_token":"a","token_type":"Bearer","expires_in":" 3599 "}"#);
        assert_eq!(t.expires_in, Some(Duration::from_secs(3599)));
        // Float.
        let t = ok(r#"{"access_token":"a","expires_in":59.9}"#);
        assert_eq!(t.expires_in, Some(Duration::from_secs_f64(59.9)));
        let t = ok(r#"{"access_token":"a","expires_in":"120.5"}"#);
        assert_eq!(t.expires_in, Some(Duration::from_secs_f64(120.5)));
        // Missing / zero / negative / garbage / null / huge.
        for v in [
            "",
            r#","expires_in":0"#,
            r#","expires_in":-5"#,
            r#","expires_in":"soon""#,
            r#","expires_in":null"#,
            r#","expires_in":"0""#,
            r#","expires_in":true"#,
        ] {
            let t = ok(&format!(r#"{{"access_token":"a"{v}}}"#));
            assert_eq!(t.expires_in, None, "{v}");
        }
        let t = ok(r#"{"access_token":"a","expires_in":99999999999999999999}"#);
        assert_eq!(t.expires_in, Some(MAX_EXPIRES_IN));
        let t = ok(r#"{"access_token":"a","expires_in":"18446744073709551615"}"#);
        assert_eq!(t.expires_in, Some(MAX_EXPIRES_IN));
        // Missing token_type defaults to Bearer; missing refresh_token is None.
        let t = ok(r#"{"access_token":"a"}"#);
        assert_eq!(t.token_type, "Bearer");
        assert!(t.refresh_token.is_none());
        assert!(t.scope.is_none());
        // Empty refresh_token counts as absent (never blank out the stored one).
        let t = ok(r#"{"access_token":"a","refresh_token":""}"#);
        assert!(t.refresh_token.is_none());
        // Scope as array.
        let t = ok(r#"{"access_token":"a","scope":["x","y"]}"#);
        assert_eq!(t.scope.as_deref(), Some("x y"));
        // BOM and whitespace.
        let t = ok("\u{feff}  {\"access_token\":\"a\"}\n");
        assert_eq!(t.access_token.expose_secret(), "a");
        // Odd content type but JSON body.
        match parse_success(br#"{"access_token":"a"}"#, Some("text/html"), &[]) {
            SuccessParse::Token(_) => {}
            _ => panic!("json with odd content type"),
        }
    }

    #[test]
    fn form_encoded_success_is_accepted() {
        let body = format!("access_token={AT}&token_type=bearer&scope=repo&refresh_token={NEW_RT}&expires_in=28800");
        match parse_success(
            body.as_bytes(),
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            &[],
        ) {
            SuccessParse::Token(t) => {
                assert_eq!(t.access_token.expose_secret(), AT);
                assert_eq!(t.refresh_token.unwrap().expose_secret(), NEW_RT);
                assert_eq!(t.expires_in, Some(Duration::from_secs(28800)));
            }
            _ => panic!("form body"),
        }
        // Without a form content type, a non-JSON body is unusable.
        assert_eq!(unusable(body.as_bytes()), None);
    }

    #[test]
    fn unusable_success_bodies_keep_the_refresh_token() {
        // Missing access_token, valid JSON.
        assert_eq!(
            unusable(format!(r#"{{"refresh_token":"{NEW_RT}","expires_in":10}}"#).as_bytes()),
            Some(NEW_RT.to_string())
        );
        // Truncated JSON after the refresh token.
        let full = format!(
            r#"{{"access_token":"{AT}","token_type":"Bearer","refresh_token":"{NEW_RT}","expires_in":3600}}"#
        );
        let cut = &full[..full.find("expires_in").unwrap() + 5];
        assert_eq!(unusable(cut.as_bytes()), Some(NEW_RT.to_string()));
        // Truncated inside the refresh token: nothing trustworthy.
        let cut = &full[..full.find(NEW_RT).unwrap() + 4];
        assert_eq!(unusable(cut.as_bytes()), None);
        // Truncated before it.
        assert_eq!(unusable(&full.as_bytes()[..20]), None);
        // Invalid JSON later in the object.
        let bad = format!(r#"{{"refresh_token":"{NEW_RT}","access_token":}}"#);
        assert_eq!(unusable(bad.as_bytes()), Some(NEW_RT.to_string()));
        // A "refresh_token" inside another value is not the member.
        let tricky = r#"{"note":"\"refresh_token\":\"fake\"","x":{"refresh_token":"nested"},"refresh_token":"real\u0041\n","a":"#;
        assert_eq!(unusable(tricky.as_bytes()), Some("realA\n".to_string()));
        let tricky =
            r#"{"note":"{\"refresh_token\":\"fake\"}","x":[1,{"refresh_token":"nested"}],"#;
        assert_eq!(unusable(tricky.as_bytes()), None);
        // Surrogate pair escapes.
        let s = r#"{"refresh_token":"a\ud83d\ude00b","#;
        assert_eq!(unusable(s.as_bytes()), Some("a😀b".to_string()));
        // Non-object JSON, HTML, empty.
        assert_eq!(unusable(b"[1,2]"), None);
        assert_eq!(unusable(b"<html>oops</html>"), None);
        assert_eq!(unusable(b""), None);
        // A number value truncated at the end is skipped safely.
        assert_eq!(unusable(br#"{"expires_in":36"#), None);
    }

    #[test]
    fn success_status_with_oauth_error_is_an_error() {
        let r = interpret_response(
            200,
            &HeaderMap::new(),
            BodyRead::Complete(
                br#"{"error":"invalid_grant","error_description":"expired"}"#.to_vec(),
            ),
            true,
            &[],
            SystemTime::now(),
        );
        assert!(matches!(r, Err(TokenError::InvalidGrant { .. })), "{r:?}");
    }

    #[test]
    fn retry_after_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("999999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(86_400 * 3));
        assert_eq!(parse_retry_after(&far, now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);

        // x-ratelimit-reset fallback (Auth0: Unix seconds).
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1700000030"));
        assert_eq!(retry_after_from(&h, now), Some(Duration::from_secs(30)));
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("5"));
        assert_eq!(retry_after_from(&h, now), Some(Duration::from_secs(5)));
    }

    #[test]
    fn sanitized_descriptions() {
        let long = "x".repeat(1000);
        let body = format!(
            r#"{{"error":"invalid_grant\u0007<b>","error_description":"bad\u0000 token {RT}\r\n\u202e{long}"}}"#
        );
        let e = interpret_response(
            400,
            &HeaderMap::new(),
            BodyRead::Complete(body.into_bytes()),
            false,
            &[CLIENT_SECRET, RT],
            SystemTime::now(),
        )
        .unwrap_err();
        let TokenError::Rejected {
            error, description, ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(error, "invalid_grantb");
        let d = description.as_deref().unwrap();
        assert!(d.starts_with("bad token [REDACTED] xxx"), "{d}");
        assert!(d.chars().count() <= MAX_DESCRIPTION_CHARS + 1);
        assert!(!d.chars().any(|c| c.is_control()));
        assert_clean(&e);
    }

    fn interp(
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: &str,
        is_refresh: bool,
    ) -> TokenError {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        let e = interpret_response(
            status,
            &h,
            BodyRead::Complete(body.as_bytes().to_vec()),
            is_refresh,
            &[CLIENT_SECRET, RT],
            SystemTime::now(),
        )
        .unwrap_err();
        assert_clean(&e);
        e
    }

    #[test]
    fn status_classification_table() {
        let t = ErrorClass::Terminal;
        let cases: Vec<(TokenError, &str, ErrorClass)> = vec![
            (
                interp(400, &[], r#"{"error":"invalid_grant"}"#, true),
                "RefreshTokenRejected",
                t,
            ),
            (
                interp(400, &[], r#"{"error":"invalid_grant"}"#, false),
                "TokenRequestRejected",
                t,
            ),
            (
                interp(400, &[], r#"{"error":"invalid_client"}"#, false),
                "InvalidClient",
                t,
            ),
            (
                interp(401, &[("www-authenticate", "Basic")], "", false),
                "InvalidClient",
                t,
            ),
            (
                interp(401, &[], r#"{"error":"invalid_token"}"#, true),
                "InvalidClient",
                t,
            ),
            (
                interp(400, &[], r#"{"error":"invalid_scope"}"#, false),
                "TokenRequestRejected",
                t,
            ),
            (
                interp(400, &[], r#"{"error":"unauthorized_client"}"#, false),
                "TokenRequestRejected",
                t,
            ),
            (
                interp(400, &[], r#"{"error":"unsupported_grant_type"}"#, false),
                "TokenRequestRejected",
                t,
            ),
            (
                interp(400, &[], r#"{"error":"invalid_request"}"#, false),
                "TokenRequestRejected",
                t,
            ),
            (
                interp(400, &[], "<html>bad</html>", false),
                "TokenRequestRejected",
                t,
            ),
            (
                interp(403, &[], "Forbidden", false),
                "TokenRequestRejected",
                t,
            ),
            (interp(404, &[], "", false), "TokenRequestRejected", t),
            (
                interp(302, &[("location", "https://evil.example/")], "", false),
                "TokenEndpointRedirected",
                t,
            ),
            (interp(307, &[], "", true), "TokenEndpointRedirected", t),
            (
                interp(429, &[("retry-after", "2")], "", true),
                "RateLimited",
                ErrorClass::Transient {
                    retry_after: Some(Duration::from_secs(2)),
                },
            ),
            (
                interp(429, &[], "", true),
                "RateLimited",
                ErrorClass::Transient { retry_after: None },
            ),
            (
                interp(400, &[], r#"{"error":"slow_down"}"#, false),
                "RateLimited",
                ErrorClass::Transient { retry_after: None },
            ),
            (
                interp(
                    500,
                    &[],
                    "<html><h1>Internal Server Error</h1></html>",
                    true,
                ),
                "TokenEndpointUnavailable",
                ErrorClass::Transient { retry_after: None },
            ),
            (
                interp(
                    500,
                    &[],
                    r#"{"error":"access_denied","error_description":"Global limit has been reached"}"#,
                    false,
                ),
                "TokenEndpointUnavailable",
                ErrorClass::Transient { retry_after: None },
            ),
            (
                interp(503, &[("retry-after", "7")], "", true),
                "TokenEndpointUnavailable",
                ErrorClass::Transient {
                    retry_after: Some(Duration::from_secs(7)),
                },
            ),
            (
                interp(400, &[], r#"{"error":"temporarily_unavailable"}"#, true),
                "TokenEndpointUnavailable",
                ErrorClass::Transient { retry_after: None },
            ),
            (
                interp(408, &[], "", true),
                "TokenEndpointUnavailable",
                ErrorClass::Transient { retry_after: None },
            ),
            (
                interp(200, &[], "<html>login</html>", true),
                "UnparseableTokenResponse",
                ErrorClass::UnknownOutcome,
            ),
        ];
        for (e, reason, class) in cases {
            assert_eq!(e.reason(), reason, "{e:?}");
            assert_eq!(e.class(), class, "{e:?}");
        }
    }

    #[test]
    fn oversized_and_interrupted_bodies() {
        let h = HeaderMap::new();
        let now = SystemTime::now();
        let prefix = format!(r#"{{"refresh_token":"{NEW_RT}","access_token":"{AT}"#).into_bytes();
        // 2xx too large: unparseable, refresh token recovered from the prefix if complete.
        let e = interpret_response(200, &h, BodyRead::TooLarge(prefix.clone()), true, &[], now)
            .unwrap_err();
        assert_eq!(e.recovered_refresh_token().unwrap().expose_secret(), NEW_RT);
        assert_eq!(e.class(), ErrorClass::UnknownOutcome);
        assert_clean(&e);
        let e = interpret_response(
            200,
            &h,
            BodyRead::TooLarge(b"xxxx".to_vec()),
            true,
            &[],
            now,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            TokenError::Unparseable {
                refresh_token: None
            }
        ));
        // 2xx interrupted.
        let e = interpret_response(
            200,
            &h,
            BodyRead::Failed(prefix, "reset".into()),
            true,
            &[],
            now,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "UnparseableTokenResponse");
        assert!(e.recovered_refresh_token().is_some());
        let e = interpret_response(
            200,
            &h,
            BodyRead::Failed(vec![], "reset".into()),
            true,
            &[],
            now,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "TokenResponseLost");
        assert_eq!(e.class(), ErrorClass::UnknownOutcome);
        // Error statuses: classified by status.
        let e = interpret_response(400, &h, BodyRead::TooLarge(vec![b'{'; 10]), true, &[], now)
            .unwrap_err();
        assert_eq!(e.reason(), "TokenRequestRejected");
        let e = interpret_response(
            502,
            &h,
            BodyRead::Failed(vec![], "x".into()),
            true,
            &[],
            now,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "TokenEndpointUnavailable");
    }

    #[tokio::test]
    async fn resolver_refuses_names_and_loopback() {
        use reqwest::dns::Resolve;
        let strict = GuardedResolver {
            allow_loopback: false,
        };
        for name in ["metadata.google.internal", "metadata", "localhost"] {
            let r = strict.resolve(name.parse().unwrap()).await;
            let err = r.err().expect("refused");
            assert!(
                err.downcast_ref::<ForbiddenAddressError>().is_some(),
                "{name}"
            );
        }
        let lax = GuardedResolver {
            allow_loopback: true,
        };
        let addrs: Vec<_> = lax
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    // ----------------------------------------------------------------------------------------
    // HTTP
    // ----------------------------------------------------------------------------------------

    fn test_cfg() -> TokenClientConfig {
        TokenClientConfig {
            allow_http_loopback: true,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            max_response_bytes: 64 * 1024,
        }
    }

    fn client() -> TokenClient {
        crate::install_crypto_provider();
        TokenClient::new(test_cfg()).unwrap()
    }

    async fn serve(router: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        addr
    }

    type Seen = Arc<Mutex<Vec<(HeaderMap, String)>>>;

    /// A `/token` endpoint answering with a fixed response and recording requests.
    async fn fixed(
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        body: String,
    ) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let s2 = seen.clone();
        let router = Router::new().route(
            "/token",
            post(move |h: HeaderMap, b: String| {
                let seen = s2.clone();
                let body = body.clone();
                async move {
                    seen.lock().unwrap().push((h, b));
                    let mut hm = HeaderMap::new();
                    for (k, v) in headers {
                        hm.insert(*k, HeaderValue::from_static(v));
                    }
                    (StatusCode::from_u16(status).unwrap(), hm, body).into_response()
                }
            }),
        );
        let addr = serve(router).await;
        (format!("http://{addr}/token"), seen)
    }

    fn token_json() -> String {
        format!(
            r#"{{"access_token":"{AT}","token_type":"Bearer","expires_in":"3600","refresh_token":"{NEW_RT}","unknown":1}}"#
        )
    }

    #[tokio::test]
    async fn client_credentials_basic_end_to_end() {
        let (url, seen) = fixed(200, &[("content-type", "application/json")], token_json()).await;
        let mut r = cc(&url);
        r.scopes = vec!["read".into()];
        let t = client().request_token(&r, None).await.unwrap();
        assert_eq!(t.access_token.expose_secret(), AT);
        assert_eq!(t.expires_in, Some(Duration::from_secs(3600)));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (h, body) = &seen[0];
        let auth = h.get("authorization").unwrap().to_str().unwrap();
        assert_eq!(
            auth,
            basic_authorization(CLIENT_ID, CLIENT_SECRET).expose_secret()
        );
        assert_eq!(
            h.get("content-type").unwrap(),
            "application/x-www-form-urlencoded"
        );
        assert_eq!(h.get("accept").unwrap(), "application/json");
        let pairs = form_pairs(body);
        assert_eq!(get(&pairs, "grant_type"), ["client_credentials"]);
        assert_eq!(get(&pairs, "scope"), ["read"]);
        assert!(get(&pairs, "client_secret").is_empty());
    }

    #[tokio::test]
    async fn post_auth_end_to_end_sends_one_method() {
        let (url, seen) = fixed(200, &[], token_json()).await;
        let r = req(
            &url,
            Grant::RefreshToken(SecretString::from(RT)),
            ClientAuthMethod::Post,
        );
        let t = client().request_token(&r, None).await.unwrap();
        assert_eq!(t.refresh_token.unwrap().expose_secret(), NEW_RT);
        let seen = seen.lock().unwrap();
        let (h, body) = &seen[0];
        assert!(h.get("authorization").is_none());
        let pairs = form_pairs(body);
        assert_eq!(get(&pairs, "client_id"), [CLIENT_ID]);
        assert_eq!(get(&pairs, "client_secret"), [CLIENT_SECRET]);
        assert_eq!(get(&pairs, "refresh_token"), [RT]);
    }

    #[tokio::test]
    async fn localhost_name_goes_through_the_resolver() {
        let (url, _) = fixed(200, &[], token_json()).await;
        let url = url.replace("127.0.0.1", "localhost");
        client().request_token(&cc(&url), None).await.unwrap();
    }

    async fn expect_err(
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        body: String,
        r: fn(&str) -> TokenRequest,
    ) -> TokenError {
        let (url, _) = fixed(status, headers, body).await;
        let e = client().request_token(&r(&url), None).await.unwrap_err();
        assert_clean(&e);
        e
    }

    #[tokio::test]
    async fn http_error_classification() {
        let e = expect_err(
            400,
            &[("content-type", "application/json")],
            r#"{"error":"invalid_grant","error_description":"Unknown or invalid refresh token."}"#
                .into(),
            refresh,
        )
        .await;
        assert!(
            matches!(&e, TokenError::InvalidGrant { description: Some(d) } if d == "Unknown or invalid refresh token."),
            "{e:?}"
        );
        assert_eq!(
            (e.reason(), e.class()),
            ("RefreshTokenRejected", ErrorClass::Terminal)
        );

        let e = expect_err(
            401,
            &[("www-authenticate", "Basic realm=\"x\"")],
            r#"{"error":"invalid_client"}"#.into(),
            cc,
        )
        .await;
        assert_eq!(
            (e.reason(), e.class()),
            ("InvalidClient", ErrorClass::Terminal)
        );

        let e = expect_err(429, &[("retry-after", "2")], "slow down".into(), refresh).await;
        assert_eq!(
            e.class(),
            ErrorClass::Transient {
                retry_after: Some(Duration::from_secs(2))
            }
        );

        let e = expect_err(
            503,
            &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")],
            String::new(),
            refresh,
        )
        .await;
        assert_eq!(
            e.class(),
            ErrorClass::Transient {
                retry_after: Some(Duration::ZERO)
            }
        );

        let html = format!("<html><body><h1>500</h1><pre>{CLIENT_SECRET} {RT}</pre></body></html>");
        let e = expect_err(500, &[("content-type", "text/html")], html, refresh).await;
        assert_eq!(
            (e.reason(), e.class()),
            (
                "TokenEndpointUnavailable",
                ErrorClass::Transient { retry_after: None }
            )
        );

        // 200 with garbage and a truncated body carrying a rotated refresh token.
        let garbage = format!(r#"{{"access_token":"{AT}","refresh_token":"{NEW_RT}","expi"#);
        let e = expect_err(
            200,
            &[("content-type", "application/json")],
            garbage,
            refresh,
        )
        .await;
        assert_eq!(e.reason(), "UnparseableTokenResponse");
        assert_eq!(e.class(), ErrorClass::UnknownOutcome);
        assert_eq!(e.recovered_refresh_token().unwrap().expose_secret(), NEW_RT);
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h2 = hits.clone();
        let router = Router::new()
            .route(
                "/token",
                post(|| async {
                    (StatusCode::FOUND, [("location", "/other")], "").into_response()
                }),
            )
            .route(
                "/other",
                post(move || {
                    h2.fetch_add(1, Ordering::SeqCst);
                    async { token_json() }
                })
                .get(|| async { "x" }),
            );
        let addr = serve(router).await;
        let e = client()
            .request_token(&refresh(&format!("http://{addr}/token")), None)
            .await
            .unwrap_err();
        assert!(matches!(e, TokenError::Redirected { status: 302 }), "{e:?}");
        assert_eq!(e.class(), ErrorClass::Terminal);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        assert_clean(&e);
    }

    #[tokio::test]
    async fn huge_bodies_are_capped() {
        let huge = format!(
            r#"{{"refresh_token":"{NEW_RT}","pad":"{}"}}"#,
            "a".repeat(10 << 20)
        );
        let e = expect_err(200, &[("content-type", "application/json")], huge, refresh).await;
        assert_eq!(e.reason(), "UnparseableTokenResponse");
        // The refresh token at the start of the (capped) prefix is still recovered.
        assert_eq!(e.recovered_refresh_token().unwrap().expose_secret(), NEW_RT);

        let huge = "z".repeat(10 << 20);
        let e = expect_err(200, &[], huge.clone(), refresh).await;
        assert!(matches!(
            e,
            TokenError::Unparseable {
                refresh_token: None
            }
        ));
        let e = expect_err(500, &[], huge, refresh).await;
        assert_eq!(e.reason(), "TokenEndpointUnavailable");
    }

    #[tokio::test]
    async fn closed_after_request_is_unknown_outcome() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 8192];
                let _ = sock.read(&mut buf).await;
                drop(sock);
            }
        });
        let e = client()
            .request_token(&refresh(&format!("http://{addr}/token")), None)
            .await
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::UnknownOutcome, "{e:?}");
        assert_eq!(e.reason(), "TokenResponseLost");
        assert_clean(&e);
    }

    #[tokio::test]
    async fn slow_response_is_unknown_outcome() {
        let router = Router::new().route(
            "/token",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                token_json()
            }),
        );
        let addr = serve(router).await;
        let c = TokenClient::new(TokenClientConfig {
            request_timeout: Duration::from_millis(300),
            ..test_cfg()
        })
        .unwrap();
        let e = c
            .request_token(&refresh(&format!("http://{addr}/token")), None)
            .await
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::UnknownOutcome, "{e:?}");
        assert!(e.to_string().contains("timed out"), "{e}");
        assert_clean(&e);
    }

    #[tokio::test]
    async fn nothing_listening_is_connect_not_unknown() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = client()
            .request_token(&refresh(&format!("http://127.0.0.1:{port}/token")), None)
            .await
            .unwrap_err();
        assert!(matches!(e, TokenError::Connect(_)), "{e:?}");
        assert_eq!(e.reason(), "TokenEndpointUnreachable");
        assert_eq!(e.class(), ErrorClass::Transient { retry_after: None });
        assert_clean(&e);
    }

    #[tokio::test]
    async fn invalid_urls_are_rejected_before_sending() {
        let c = TokenClient::new(TokenClientConfig::default()).unwrap();
        for u in [
            "http://127.0.0.1:1/token",
            "https://169.254.169.254/token",
            "https://u:p@idp.example/token",
        ] {
            let e = c.request_token(&cc(u), None).await.unwrap_err();
            assert_eq!(e.reason(), "InvalidTokenUrl", "{u}");
            assert_eq!(e.class(), ErrorClass::Terminal);
        }
    }

    #[tokio::test]
    async fn resolver_refusals_surface_as_forbidden_address() {
        crate::install_crypto_provider();
        let strict = TokenClient::new(TokenClientConfig::default()).unwrap();
        // Bypass validate_token_url to exercise the connect-time check.
        for u in [
            "https://localhost:1/token",
            "https://metadata.google.internal/token",
        ] {
            let e = strict
                .default_client
                .post(u)
                .send()
                .await
                .map_err(classify_send_error)
                .unwrap_err();
            assert!(matches!(e, TokenError::ForbiddenAddress(_)), "{u}: {e:?}");
            assert_eq!(e.class(), ErrorClass::Terminal);
            assert_eq!(e.reason(), "ForbiddenTokenEndpoint");
        }
    }

    #[tokio::test]
    async fn https_to_plain_http_is_a_tls_error() {
        let (url, seen) = fixed(200, &[], token_json()).await;
        let url = url.replace("http://", "https://");
        let e = client()
            .request_token(&refresh(&url), None)
            .await
            .unwrap_err();
        assert!(matches!(e, TokenError::Tls(_)), "{e:?}");
        assert_eq!(e.class(), ErrorClass::Transient { retry_after: None });
        assert!(seen.lock().unwrap().is_empty());
        assert_clean(&e);
    }

    // Test PKI (P-256, valid 2024–2124): a CA and a leaf for localhost / 127.0.0.1.
    const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBazCCARGgAwIBAgIBATAKBggqhkjOPQQDAjAcMRowGAYDVQQDDBF2YXVsdGNv
bm4gdGVzdCBDQTAgFw0yNDAxMDEwMDAwMDBaGA8yMTI0MDEwMTAwMDAwMFowHDEa
MBgGA1UEAwwRdmF1bHRjb25uIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMB
BwNCAARcJ7n7MfvHadBvkwhrYf48r5eIvxXdq8KxRDa0pOe04nB61xb7Y1kMY7ha
IbCpQ9jR7KMxD8gxq5roJVzoe0tTo0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1Ud
DwEB/wQEAwIBBjAdBgNVHQ4EFgQUSnpBqcONZtuJDKwGnq4fLvz7lt4wCgYIKoZI
zj0EAwIDSAAwRQIgbydQceqeronOZYL93OkshqcpK+3snJepH6ZYoAy3YYsCIQD+
Sdy3KeV2mxeYYsr8zGFoPeW3N+5dRElSkhoZjmc8/A==
-----END CERTIFICATE-----
";
    const TEST_LEAF_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBtDCCAVqgAwIBAgIBAjAKBggqhkjOPQQDAjAcMRowGAYDVQQDDBF2YXVsdGNv
bm4gdGVzdCBDQTAgFw0yNDAxMDEwMDAwMDBaGA8yMTI0MDEwMTAwMDAwMFowFDES
MBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEkH/4
p5pkQDXVdE4hMvHlHrWt+52nSr20Gq/HfpjbAhKUdM+w8KMA1w+Ea20QPPC4wKZQ
zLqzMPXmFXT5hzeZXqOBkjCBjzAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQEAwIH
gDATBgNVHSUEDDAKBggrBgEFBQcDATAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8A
AAEwHQYDVR0OBBYEFBs+Yb1I6sUIK4gjOASlEXCf9K5tMB8GA1UdIwQYMBaAFEp6
QanDjWbbiQysBp6uHy78+5beMAoGCCqGSM49BAMCA0gAMEUCIQDTgb54nXHfQcE5
P+1SmgNr5SZBzqU9PoqAE/EZ7fStmAIgMZ53FiMKam4k+pQtsdZ08MT4Dh1MDjbI
asFkTLRxiCs=
-----END CERTIFICATE-----
";
    const TEST_LEAF_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgMFRbYMcuheE5gDeK
dXjxYIDtXNpZo2YWmThXNj6FvayhRANCAASQf/inmmRANdV0TiEy8eUeta37nadK
vbQar8d+mNsCEpR0z7DwowDXD4RrbRA88LjAplDMurMw9eYVdPmHN5le
-----END PRIVATE KEY-----
";

    /// A blocking rustls HTTPS server answering every request with `body` (200, JSON).
    fn spawn_tls_server(body: String) -> SocketAddr {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(TEST_LEAF_PEM.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(TEST_LEAF_KEY.as_bytes()).unwrap();
        let cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let cfg = cfg.clone();
                let body = body.clone();
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match tls.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text[..end]
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        body.len(),
                        body
                    );
                    let _ = tls.write_all(resp.as_bytes());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn ca_bundle_is_required_for_a_private_ca_and_cached() {
        let addr = spawn_tls_server(token_json());
        let c = client();
        for host in ["127.0.0.1", "localhost"] {
            let url = format!("https://{host}:{}/token", addr.port());
            // Without the CA: TLS error, not sent.
            let e = c.request_token(&refresh(&url), None).await.unwrap_err();
            assert!(matches!(e, TokenError::Tls(_)), "{e:?}");
            assert_clean(&e);
            // With the CA bundle: succeeds.
            let t = c
                .request_token(&refresh(&url), Some(TEST_CA_PEM.as_bytes()))
                .await
                .unwrap();
            assert_eq!(t.access_token.expose_secret(), AT);
        }
        assert_eq!(
            c.ca_clients.lock().unwrap().len(),
            1,
            "one cached client per bundle"
        );
        // The leaf alone is not a trust anchor for itself here (CA:FALSE) → still TLS error,
        // and a different bundle gets its own client.
        let url = format!("https://127.0.0.1:{}/token", addr.port());
        let e = c
            .request_token(&refresh(&url), Some(TEST_LEAF_PEM.as_bytes()))
            .await
            .unwrap_err();
        assert!(matches!(e, TokenError::Tls(_)), "{e:?}");
        assert_eq!(c.ca_clients.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn invalid_ca_bundles() {
        let c = client();
        let url = "https://127.0.0.1:1/token";
        for pem in [
            &b""[..],
            b"not a pem",
            TEST_LEAF_KEY.as_bytes(),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            let e = c.request_token(&cc(url), Some(pem)).await.unwrap_err();
            assert_eq!(e.reason(), "InvalidCaBundle", "{e:?}");
            assert_eq!(e.class(), ErrorClass::Terminal);
        }
    }
}
