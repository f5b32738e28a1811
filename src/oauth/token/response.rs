//! What came back: the interpretation of a token endpoint response (status, a few header
//! values, body bytes) into a [`TokenResponse`] or a [`TokenError`]. Pure: the transport reads
//! the response, this module decides what it means.
//!
//! Success bodies are parsed leniently (RFC 6749 §5.1 as servers really send it), and a
//! `refresh_token` is salvaged from unusable ones: the server may already have rotated it.
//! Error bodies yield only the sanitized OAuth `error` code and `error_description`.
use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use super::error::{redact, sanitize_text, LostResponse, TokenError};

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

/// The response headers the interpretation reads, as text. A header whose value is not
/// visible ASCII counts as absent; of a repeated header the first value counts.
#[derive(Debug, Clone, Default)]
pub(super) struct ResponseHeaders {
    pub(super) content_type: Option<String>,
    pub(super) retry_after: Option<String>,
    /// Auth0's `x-ratelimit-reset`.
    pub(super) ratelimit_reset: Option<String>,
}

/// Outcome of reading a response body under the size cap.
pub(super) enum BodyRead {
    Complete(Vec<u8>),
    /// The cap was hit; holds the first `cap` bytes.
    TooLarge(Vec<u8>),
    /// The transfer failed midway; holds what arrived.
    Failed(Vec<u8>, String),
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
    match success_members(strip_bom(body), content_type) {
        Ok(map) => token_from_members(&map, secrets),
        Err(refresh_token) => SuccessParse::Unusable { refresh_token },
    }
}

/// The members of a 2xx body: a JSON object, or form fields when the body is labelled as a
/// form. `Err` means no usable object, carrying whatever refresh token a scan salvages.
fn success_members(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<serde_json::Map<String, serde_json::Value>, Option<SecretString>> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(None),
        // A body that opens like a JSON object is broken JSON whatever its label says: read as
        // form fields it would lose the refresh token the scan below salvages.
        Err(_) if is_form(content_type) && !opens_like_json(body) => {
            // Legacy form-encoded token response (e.g. GitHub without Accept: json).
            Ok(url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
                .collect())
        }
        Err(_) => Err(scan_refresh_token(body).map(SecretString::from)),
    }
}

fn opens_like_json(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    })
}

/// A token response from the members of a 2xx body; without `access_token` it is an OAuth
/// error object (some servers send those with 2xx) or unusable.
fn token_from_members(
    map: &serde_json::Map<String, serde_json::Value>,
    secrets: &[&str],
) -> SuccessParse {
    let refresh_token = non_empty_str(map.get("refresh_token")).map(SecretString::from);
    let Some(access_token) = non_empty_str(map.get("access_token")) else {
        if let Some(code) = non_empty_str(map.get("error")) {
            // A refresh token next to an error is still kept: never drop a rotated one.
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
    SuccessParse::Token(TokenResponse {
        access_token: SecretString::from(access_token),
        token_type,
        expires_in: map.get("expires_in").and_then(parse_expires_in),
        refresh_token,
        scope: parse_scope(map.get("scope")),
    })
}

/// `scope` as a space-delimited string (RFC 6749) or, as some servers send it, an array.
fn parse_scope(v: Option<&serde_json::Value>) -> Option<String> {
    match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(a)) => Some(
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
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
        // Bytes, not text: a member that is not UTF-8 (an access token with a stray 0xff)
        // must not hide a valid refresh token after it.
        let key = s.raw_string()?;
        s.ws();
        s.eat(b':')?;
        s.ws();
        if key == b"refresh_token" && s.peek() == Some(b'"') {
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

    /// A complete JSON string literal, unescaped, as UTF-8; `None` if truncated or malformed.
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.raw_string()?).ok()
    }

    /// A complete JSON string literal, unescaped, as bytes (which need not be UTF-8);
    /// `None` if truncated or malformed.
    fn raw_string(&mut self) -> Option<Vec<u8>> {
        self.eat(b'"')?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'"' => return Some(out),
                b'\\' => {
                    let ch = self.escape()?;
                    let mut tmp = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                }
                c if c < 0x20 => return None,
                c => out.push(c),
            }
        }
    }

    /// The character an escape sequence stands for; the backslash is already consumed.
    fn escape(&mut self) -> Option<char> {
        let e = self.peek()?;
        self.i += 1;
        Some(match e {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => self.unicode_escape()?,
            _ => return None,
        })
    }

    /// `\uXXXX`, or a UTF-16 surrogate pair `\uXXXX\uXXXX`; the first `\u` is already consumed.
    fn unicode_escape(&mut self) -> Option<char> {
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
        char::from_u32(cp)
    }

    /// Skip one complete value; `None` if truncated.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.raw_string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.raw_string()?;
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
/// The request's secrets are blanked out before and after the filter (a server may echo one
/// here too, and the filter may leave part of it).
fn sanitize_error_code(code: &str, secrets: &[&str]) -> String {
    let keep = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
            .collect()
    };
    let filtered: Vec<String> = secrets.iter().map(|s| keep(s)).collect();
    let filtered: Vec<&str> = filtered.iter().map(String::as_str).collect();
    let c = keep(&redact(code, secrets));
    let c: String = redact(&c, &filtered)
        .replace("[REDACTED]", "REDACTED")
        .chars()
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
        error: sanitize_error_code(code, secrets),
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
fn retry_after_from(headers: &ResponseHeaders, now: SystemTime) -> Option<Duration> {
    if let Some(ra) = headers
        .retry_after
        .as_deref()
        .and_then(|v| parse_retry_after(v, now))
    {
        return Some(ra);
    }
    let reset = headers
        .ratelimit_reset
        .as_deref()
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
    headers: &ResponseHeaders,
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

/// Classify a complete HTTP exchange.
pub(super) fn interpret_response(
    status: u16,
    headers: &ResponseHeaders,
    body: BodyRead,
    is_refresh: bool,
    secrets: &[&str],
    now: SystemTime,
) -> Result<TokenResponse, TokenError> {
    if (200..300).contains(&status) {
        return interpret_success(status, headers, body, is_refresh, secrets, now);
    }
    let oauth = match &body {
        BodyRead::Complete(b) => parse_oauth_error(b, secrets),
        // Error statuses: classify by status when the body is unusable.
        BodyRead::TooLarge(_) | BodyRead::Failed(..) => None,
    };
    Err(error_status_to_token_error(
        status, oauth, is_refresh, headers, now,
    ))
}

/// A 2xx: a token, an OAuth error object, or an unusable body that may still carry a rotated
/// refresh token.
fn interpret_success(
    status: u16,
    headers: &ResponseHeaders,
    body: BodyRead,
    is_refresh: bool,
    secrets: &[&str],
    now: SystemTime,
) -> Result<TokenResponse, TokenError> {
    match body {
        BodyRead::Complete(b) => {
            match parse_success(&b, headers.content_type.as_deref(), secrets) {
                SuccessParse::Token(t) => Ok(t),
                SuccessParse::OAuthError(e) => Err(oauth_error_to_token_error(
                    status, e, is_refresh, headers, now,
                )),
                SuccessParse::Unusable { refresh_token } => {
                    Err(TokenError::Unparseable { refresh_token })
                }
            }
        }
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
            None => Err(TokenError::UnknownOutcome {
                lost: LostResponse::ConnectionLost,
                detail: format!("the success response body was interrupted: {msg}"),
            }),
        },
    }
}

/// A non-2xx status, with the OAuth error object if the body was one.
fn error_status_to_token_error(
    status: u16,
    oauth: Option<OAuthError>,
    is_refresh: bool,
    headers: &ResponseHeaders,
    now: SystemTime,
) -> TokenError {
    match status {
        300..=399 => TokenError::Redirected { status },
        401 => TokenError::InvalidClient {
            description: oauth.and_then(|e| e.description),
        },
        429 => TokenError::RateLimited {
            retry_after: retry_after_from(headers, now),
        },
        408 | 500..=599 => {
            if let Some(e) = &oauth {
                tracing::debug!(status, error = %e.error, "token endpoint server error");
            }
            TokenError::ServerError {
                status,
                retry_after: retry_after_from(headers, now),
            }
        }
        400..=499 => match oauth {
            Some(e) => oauth_error_to_token_error(status, e, is_refresh, headers, now),
            None => TokenError::Rejected {
                status,
                error: format!("http_{status}"),
                description: None,
            },
        },
        // 1xx leftovers or nonstandard codes: nothing reliable to say about the outcome.
        _ => TokenError::UnknownOutcome {
            lost: LostResponse::UnexpectedStatus(status),
            detail: format!("unexpected HTTP status {status}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::oauth::token::error::ErrorClass;
    use crate::oauth::token::test_support::*;

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
        // Bytes that are not UTF-8 in another member (before or after) do not hide it.
        let mut bad_utf8 = br#"{"access_token":""#.to_vec();
        bad_utf8.extend_from_slice(b"\xff\xfeat");
        bad_utf8
            .extend_from_slice(format!(r#"","refresh_token":"{NEW_RT}","x":"\u00ff"#).as_bytes());
        bad_utf8.extend_from_slice(b"\xc3\"}");
        assert_eq!(unusable(&bad_utf8), Some(NEW_RT.to_string()));
        // The refresh token itself not UTF-8: nothing trustworthy.
        assert_eq!(unusable(b"{\"refresh_token\":\"a\xffb\"}"), None);
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

    /// Found by `props::a_refresh_token_is_always_salvaged`: a broken JSON body labelled as
    /// a form was read as form fields, and the rotated refresh token in it was lost.
    #[test]
    fn broken_json_labelled_as_a_form_keeps_its_refresh_token() {
        let body = format!(r#"{{"refresh_token":"{NEW_RT}","access_token":}}"#);
        match parse_success(
            body.as_bytes(),
            Some("application/x-www-form-urlencoded"),
            &[],
        ) {
            SuccessParse::Unusable { refresh_token } => assert_eq!(
                refresh_token.map(|s| s.expose_secret().to_string()),
                Some(NEW_RT.to_string())
            ),
            SuccessParse::Token(_) => panic!("unexpectedly parsed"),
            SuccessParse::OAuthError(_) => panic!("unexpected oauth error"),
        }
    }

    /// Found by `props::request_secrets_never_reach_an_error`: the OAuth `error` code was
    /// shown as the server sent it, so a server echoing the client secret (or a refresh
    /// token) there put it into the status.
    #[test]
    fn a_secret_echoed_as_the_error_code_is_redacted() {
        for code in [CLIENT_SECRET, RT, &format!("x{RT}y")] {
            let body = serde_json::json!({ "error": code }).to_string();
            let e = interpret_response(
                400,
                &ResponseHeaders::default(),
                BodyRead::Complete(body.into_bytes()),
                true,
                &[CLIENT_SECRET, RT],
                SystemTime::now(),
            )
            .unwrap_err();
            assert_clean(&e);
            // What is left of a secret after the code's character filter is not shown either.
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("s3cr:et"), "{shown}");
        }
    }

    #[test]
    fn success_status_with_oauth_error_is_an_error() {
        let r = interpret_response(
            200,
            &ResponseHeaders::default(),
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
        let mut h = ResponseHeaders {
            ratelimit_reset: Some("1700000030".into()),
            ..ResponseHeaders::default()
        };
        assert_eq!(retry_after_from(&h, now), Some(Duration::from_secs(30)));
        h.retry_after = Some("5".into());
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
            &ResponseHeaders::default(),
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
        // Only the headers the interpretation reads; the others in the table are context.
        let value = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_string())
        };
        let h = ResponseHeaders {
            content_type: value("content-type"),
            retry_after: value("retry-after"),
            ratelimit_reset: value("x-ratelimit-reset"),
        };
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
            assert_eq!(e.reason().as_str(), reason, "{e:?}");
            assert_eq!(e.class(), class, "{e:?}");
        }
    }

    #[test]
    fn oversized_and_interrupted_bodies() {
        let h = ResponseHeaders::default();
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
        assert_eq!(e.reason().as_str(), "UnparseableTokenResponse");
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
        assert_eq!(e.reason().as_str(), "TokenResponseLost");
        assert_eq!(e.class(), ErrorClass::UnknownOutcome);
        // Error statuses: classified by status.
        let e = interpret_response(400, &h, BodyRead::TooLarge(vec![b'{'; 10]), true, &[], now)
            .unwrap_err();
        assert_eq!(e.reason().as_str(), "TokenRequestRejected");
        let e = interpret_response(
            502,
            &h,
            BodyRead::Failed(vec![], "x".into()),
            true,
            &[],
            now,
        )
        .unwrap_err();
        assert_eq!(e.reason().as_str(), "TokenEndpointUnavailable");
    }
}

/// The checks behind the fuzz targets `token_response` and `retry_after` (`fuzz/`), one
/// function each, with the same assertions whichever harness feeds them bytes: libFuzzer under
/// `cargo fuzz` (`--cfg fuzzing`), or proptest in the unit tests (`props` below).
#[cfg(any(test, fuzzing))]
pub mod fuzz {
    use std::time::{Duration, SystemTime};

    use secrecy::ExposeSecret;

    use super::*;
    use crate::oauth::token::error::ErrorClass;

    /// The request's secrets handed to the interpretation: none may reach an error.
    pub const SECRETS: &[&str] = &["cs-FUZZ-7f3a9c", "rt-FUZZ-b41d20"];

    const STATUSES: &[u16] = &[
        200, 201, 204, 299, 301, 302, 307, 400, 401, 403, 404, 408, 429, 500, 502, 503, 504, 100,
        600, 0,
    ];

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    /// One response from bytes: byte 0 picks the status, byte 1 how the body ended, the content
    /// type and the grant; the `Retry-After` value runs to the first NUL, the body follows it.
    pub fn check_token_response(data: &[u8]) {
        let [s, mode, rest @ ..] = data else {
            return;
        };
        let status = STATUSES[usize::from(*s) % STATUSES.len()];
        let (retry, body) = match rest.iter().position(|b| *b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (&[][..], rest),
        };
        let retry = String::from_utf8_lossy(retry).into_owned();
        let headers = ResponseHeaders {
            content_type: match mode % 3 {
                0 => Some("application/json".into()),
                1 => Some("application/x-www-form-urlencoded".into()),
                _ => None,
            },
            retry_after: (mode & 0x40 == 0 && !retry.is_empty()).then(|| retry.clone()),
            ratelimit_reset: (mode & 0x40 != 0 && !retry.is_empty()).then_some(retry),
        };
        let read = match (mode / 3) % 3 {
            0 => BodyRead::Complete(body.to_vec()),
            1 => BodyRead::TooLarge(body.to_vec()),
            _ => BodyRead::Failed(body.to_vec(), "connection reset".into()),
        };
        let complete = matches!(read, BodyRead::Complete(_));
        let is_refresh = mode & 0x80 != 0;
        let r = interpret_response(status, &headers, read, is_refresh, SECRETS, now());
        let success = (200..300).contains(&status);
        match &r {
            Ok(t) => {
                assert!(
                    success && complete,
                    "a token from HTTP {status} / a cut body"
                );
                assert!(!t.access_token.expose_secret().is_empty());
                assert!(!t.token_type.is_empty());
                if let Some(rt) = &t.refresh_token {
                    assert!(!rt.expose_secret().is_empty(), "an empty refresh token");
                }
                if let Some(e) = t.expires_in {
                    assert!(!e.is_zero() && e <= MAX_EXPIRES_IN, "expires_in {e:?}");
                }
            }
            Err(e) => {
                let shown = format!("{e} {e:?}");
                for s in SECRETS {
                    assert!(!shown.contains(s), "secret {s:?} in {shown:?}");
                }
                if let ErrorClass::Transient {
                    retry_after: Some(ra),
                } = e.class()
                {
                    assert!(ra <= MAX_RETRY_AFTER, "{ra:?}");
                }
                if let Some(rt) = e.recovered_refresh_token() {
                    assert!(success, "a refresh token salvaged from HTTP {status}");
                    assert!(!rt.expose_secret().is_empty());
                }
            }
        }
        // Salvage: a 2xx JSON object carrying a refresh token never loses it, whole or cut
        // (the cap or a broken transfer delivers a prefix: here, all of it).
        if success && salvage_expected(body) {
            let carried = match &r {
                Ok(t) => t.refresh_token.is_some(),
                Err(e) => e.recovered_refresh_token().is_some(),
            };
            assert!(carried, "refresh token lost from a 2xx body");
        }
    }

    /// The body is a JSON object whose every `refresh_token` member is a non-empty string:
    /// whichever of them a parser takes, there is one to keep.
    fn salvage_expected(body: &[u8]) -> bool {
        let Ok(serde_json::Value::Object(map)) =
            serde_json::from_slice::<serde_json::Value>(strip_bom(body))
        else {
            return false;
        };
        let text = String::from_utf8_lossy(body);
        // Duplicate members: serde keeps the last, the salvage scan the first; require both
        // to be usable by accepting only bodies where the member is written once.
        text.matches("\"refresh_token\"").count() == 1
            && non_empty_str(map.get("refresh_token")).is_some()
    }

    /// The property runs' settings: `cases` unless `PROPTEST_CASES` says otherwise (the CI
    /// fallback for the fuzzers raises it), and no regression files: a failure found is kept
    /// as a named unit test instead.
    #[cfg(test)]
    pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
        let default = proptest::test_runner::Config::default();
        proptest::test_runner::Config {
            cases: if std::env::var_os("PROPTEST_CASES").is_some() {
                default.cases
            } else {
                cases
            },
            failure_persistence: None,
            ..default
        }
    }

    #[cfg(test)]
    /// The committed seed inputs of a fuzz target (and any crash reproducers kept there).
    pub fn seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("seed entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds in {}", dir.display());
        files
            .iter()
            .map(|f| std::fs::read(f).expect("readable seed"))
            .collect()
    }

    /// A complete response as the transport would hand it over, for tests of other modules.
    #[cfg(test)]
    pub fn interpret_for_tests(
        status: u16,
        body: &[u8],
        secrets: &[&str],
        now: SystemTime,
    ) -> Result<TokenResponse, TokenError> {
        let headers = ResponseHeaders::default();
        interpret_response(
            status,
            &headers,
            BodyRead::Complete(body.to_vec()),
            true,
            secrets,
            now,
        )
    }

    /// A `Retry-After` (and `x-ratelimit-reset`) value: bytes 0..4 move the clock, the rest
    /// is the header value.
    pub fn check_retry_after(data: &[u8]) {
        let (clock, value) = data.split_at(data.len().min(4));
        let mut c = [0u8; 4];
        c[..clock.len()].copy_from_slice(clock);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::from_be_bytes(c)));
        let value = String::from_utf8_lossy(value);
        let got = parse_retry_after(&value, now);
        if let Some(d) = got {
            assert!(d <= MAX_RETRY_AFTER, "{d:?}");
        }
        let v = value.trim();
        if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
            // Delta-seconds: any length of digits, saturating at the cap.
            let digits = v.trim_start_matches('0');
            let want = match digits.len() {
                0 => Duration::ZERO,
                1..=19 => digits
                    .parse::<u64>()
                    .map_or(MAX_RETRY_AFTER, Duration::from_secs)
                    .min(MAX_RETRY_AFTER),
                _ => MAX_RETRY_AFTER,
            };
            assert_eq!(got, Some(want), "{v:?}");
        } else if let Some(d) = got {
            // An HTTP-date: a later clock never waits longer.
            let later = parse_retry_after(&value, now + Duration::from_secs(30));
            assert!(
                later.is_some_and(|l| l <= d),
                "{v:?}: {later:?} after {d:?}"
            );
        }
        let headers = ResponseHeaders {
            content_type: None,
            retry_after: None,
            ratelimit_reset: Some(value.into_owned()),
        };
        if let Some(d) = retry_after_from(&headers, now) {
            assert!(d <= MAX_RETRY_AFTER, "{d:?}");
        }
    }
}

#[cfg(test)]
mod props {
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;
    use secrecy::ExposeSecret;

    use super::fuzz::{check_retry_after, check_token_response, proptest_config, seeds, SECRETS};
    use super::*;
    use crate::oauth::token::error::ErrorClass;

    /// Any JSON value, with the strings and numbers token responses get wrong.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            prop_oneof![
                Just("".to_string()),
                Just(" 3600 ".to_string()),
                Just("18446744073709551616".to_string()),
                Just(SECRETS[0].to_string()),
                Just(format!("{} leaked", SECRETS[1])),
                "\\PC{0,24}",
                ".{0,12}",
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const KEYS: &[&str] = &[
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "error",
        "error_description",
        "id_token",
        "refresh_token",
    ];

    /// A token-response-like body: members from the OAuth vocabulary with any values, written
    /// as JSON, then maybe cut short or with one byte changed.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let member = (proptest::sample::select(KEYS), json_value());
        (
            proptest::collection::vec(member, 0..6),
            any::<bool>(),
            0usize..1000,
            any::<Option<(usize, u8)>>(),
        )
            .prop_map(|(members, bom, cut, flip)| {
                let map: serde_json::Map<String, serde_json::Value> = members
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                let mut b = if bom {
                    b"\xEF\xBB\xBF".to_vec()
                } else {
                    vec![]
                };
                b.extend(serde_json::to_vec(&map).unwrap_or_default());
                if cut < b.len() && cut % 3 == 0 {
                    b.truncate(cut);
                }
                if let Some((at, byte)) = flip {
                    if !b.is_empty() {
                        let at = at % b.len();
                        b[at] = byte;
                    }
                }
                b
            })
    }

    /// What the fuzz target reads: status, mode, Retry-After, NUL, body.
    fn response_bytes() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u8>(),
            any::<u8>(),
            prop_oneof![Just(String::new()), "[0-9]{1,25}", "\\PC{0,30}"],
            prop_oneof![body(), proptest::collection::vec(any::<u8>(), 0..64)],
        )
            .prop_map(|(s, mode, retry, body)| {
                let mut d = vec![s, mode];
                d.extend(retry.bytes().filter(|b| *b != 0));
                d.push(0);
                d.extend(body);
                d
            })
    }

    proptest! {
        #![proptest_config(proptest_config(512))]

        /// The fuzz target's assertions over structured and raw responses.
        #[test]
        fn fuzz_token_response(data in response_bytes()) {
            check_token_response(&data);
        }

        #[test]
        fn fuzz_retry_after(
            clock in any::<[u8; 4]>(),
            value in prop_oneof![
                "[0-9]{0,30}",
                " *[0-9]{1,4} *",
                "-[0-9]{1,3}",
                "\\PC{0,40}",
                (0u64..4_000_000_000).prop_map(|s| httpdate::fmt_http_date(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(s))),
            ],
        ) {
            let mut d = clock.to_vec();
            d.extend(value.bytes());
            check_retry_after(&d);
        }

        /// A success body with a refresh token keeps it exactly, whether it arrived whole, was
        /// cut by the size cap after the member, or the transfer broke after it; wherever the
        /// member sits among others and whatever the content type says.
        #[test]
        fn a_refresh_token_is_always_salvaged(
            before in proptest::collection::btree_map("[a-z_]{1,10}", json_value(), 0..4),
            after in proptest::collection::btree_map("[a-z_]{1,10}", json_value(), 0..4),
            rt in "[!#-\\[\\]-~]{1,40}|\\PC{1,20}",
            with_access in any::<bool>(),
            cut in any::<prop::sample::Index>(),
            content_type in prop_oneof![
                Just(None),
                Just(Some("application/json")),
                Just(Some("application/x-www-form-urlencoded")),
                Just(Some("text/html")),
            ],
        ) {
            let member = |k: &str, v: &serde_json::Value| {
                format!("{}:{}", serde_json::json!(k), v)
            };
            let mut parts: Vec<String> = before
                .iter()
                .filter(|(k, _)| k.as_str() != "refresh_token")
                .map(|(k, v)| member(k, v))
                .collect();
            if with_access {
                parts.push(member("access_token", &serde_json::json!("at-1")));
            }
            parts.push(member("refresh_token", &serde_json::json!(rt)));
            let rt_end = parts.join(",").len() + 1;
            parts.extend(
                after
                    .iter()
                    .filter(|(k, _)| !["refresh_token", "access_token"].contains(&k.as_str()))
                    .map(|(k, v)| member(k, v)),
            );
            let full = format!("{{{}}}", parts.join(","));
            let headers = ResponseHeaders {
                content_type: content_type.map(str::to_string),
                ..ResponseHeaders::default()
            };
            // Any cut at or after the end of the refresh token's value.
            let cut_at = rt_end + cut.index(full.len() - rt_end + 1);
            let prefix = full.as_bytes()[..cut_at].to_vec();
            let mut broken = prefix.clone();
            broken.extend_from_slice(b",\"x\":}");
            for read in [
                BodyRead::Complete(full.clone().into_bytes()),
                BodyRead::Complete(broken),
                BodyRead::TooLarge(prefix.clone()),
                BodyRead::Failed(prefix.clone(), "reset".into()),
            ] {
                let got = match interpret_response(200, &headers, read, true, SECRETS, SystemTime::now()) {
                    Ok(t) => t.refresh_token.map(|s| s.expose_secret().to_string()),
                    Err(e) => e.recovered_refresh_token().map(|s| s.expose_secret().to_string()),
                };
                prop_assert_eq!(got.as_deref(), Some(rt.as_str()), "body {:?} cut at {}", full, cut_at);
            }
        }

        /// Over the cap: never a token, and an error status is classified by its status alone,
        /// exactly as if the body were empty.
        #[test]
        fn an_oversized_body_is_never_a_token(
            status in proptest::sample::select(vec![200u16, 201, 400, 401, 429, 500, 503]),
            prefix in body(),
            is_refresh in any::<bool>(),
        ) {
            let h = ResponseHeaders::default();
            let now = SystemTime::now();
            let over = interpret_response(status, &h, BodyRead::TooLarge(prefix), is_refresh, SECRETS, now);
            prop_assert!(over.is_err());
            if !(200..300).contains(&status) {
                let empty = interpret_response(status, &h, BodyRead::Complete(vec![]), is_refresh, SECRETS, now);
                let (over, empty) = (over.unwrap_err(), empty.unwrap_err());
                prop_assert_eq!(over.reason(), empty.reason());
                prop_assert_eq!(over.class(), empty.class());
            } else {
                prop_assert_eq!(over.unwrap_err().class(), ErrorClass::UnknownOutcome);
            }
        }
    }

    /// Server text around one of the request's secrets, which may be split by a character
    /// the sanitizer drops (a control, a zero-width or bidi character, a run of whitespace).
    fn text_with_secret() -> impl Strategy<Value = String> {
        (
            "\\PC{0,8}",
            proptest::sample::select(SECRETS),
            any::<prop::sample::Index>(),
            prop_oneof![
                Just(""),
                Just("\u{0}"),
                Just("\u{7}"),
                Just("\u{200B}"),
                Just("\u{202E}"),
                Just("\u{FEFF}"),
                Just("\t\n "),
            ],
            "\\PC{0,8}",
        )
            .prop_map(|(before, secret, at, split, after)| {
                let at = at.index(secret.len() + 1);
                format!("{before}{}{split}{}{after}", &secret[..at], &secret[at..])
            })
    }

    proptest! {
        #![proptest_config(proptest_config(256))]

        /// The request's secrets never reach an error's `Display` (status, Events) or `Debug`
        /// (logs), whichever OAuth member the server echoes them in.
        #[test]
        fn request_secrets_never_reach_an_error(
            status in proptest::sample::select(vec![200u16, 400, 401, 403, 429, 500]),
            code in text_with_secret(),
            description in text_with_secret(),
            is_refresh in any::<bool>(),
        ) {
            let body = serde_json::json!({"error": code, "error_description": description});
            let r = interpret_response(
                status,
                &ResponseHeaders::default(),
                BodyRead::Complete(body.to_string().into_bytes()),
                is_refresh,
                SECRETS,
                SystemTime::now(),
            );
            let e = r.expect_err("an error object is no token");
            let shown = format!("{e} {e:?}");
            for s in SECRETS {
                prop_assert!(!shown.contains(s), "secret {:?} in {:?}", s, shown);
            }
        }
    }

    #[test]
    fn fuzz_seeds_pass_the_checks() {
        for (name, check) in [
            ("token_response", check_token_response as fn(&[u8])),
            ("retry_after", check_retry_after),
        ] {
            for seed in seeds(name) {
                check(&seed);
            }
        }
    }
}
