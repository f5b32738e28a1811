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
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use url::{Host, Url};

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuthMethod {
    /// `client_secret_basic`: HTTP Basic with form-urlencoded id and secret (the default).
    #[default]
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post,
}

/// The grant to run.
#[derive(Debug, Clone)]
pub enum Grant {
    /// `grant_type=client_credentials` (RFC 6749 §4.4).
    ClientCredentials,
    /// `grant_type=refresh_token` with this refresh token (RFC 6749 §6).
    RefreshToken(SecretString),
}

impl Grant {
    fn is_refresh(&self) -> bool {
        matches!(self, Grant::RefreshToken(_))
    }
}

/// One token request.
#[derive(Clone)]
pub struct TokenRequest {
    pub token_url: String,
    pub grant: Grant,
    pub client_id: SecretString,
    pub client_secret: SecretString,
    pub auth_method: ClientAuthMethod,
    /// Space-joined into `scope`; omitted when empty.
    pub scopes: Vec<String>,
    /// `audience` (Auth0 and others); client-credentials grant only.
    pub audience: Option<String>,
    /// Additional form parameters. `grant_type`, `refresh_token`, `client_id` and
    /// `client_secret` are ignored, as are `scope`/`audience` when the dedicated fields are set
    /// (RFC 6749 §3.2: parameters must not be repeated).
    pub extra_params: BTreeMap<String, String>,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let grant = match self.grant {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken(_) => "refresh_token",
        };
        f.debug_struct("TokenRequest")
            .field("token_url", &redacted_url(&self.token_url))
            .field("grant", &grant)
            .field("client_id", &"[REDACTED]")
            .field("client_secret", &"[REDACTED]")
            .field("auth_method", &self.auth_method)
            .field("scopes", &self.scopes)
            .field("audience", &self.audience)
            // Values may be secrets (e.g. a client assertion): keys only.
            .field("extra_params", &self.extra_params.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A URL for display: scheme, host, port and path only (a query may carry secrets).
fn redacted_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            let q = if u.query().is_some() { "?…" } else { "" };
            format!("{}://{}{}{}{}", u.scheme(), host, port, u.path(), q)
        }
        Err(_) => "<invalid URL>".to_string(),
    }
}

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
    /// The token URL violates the URL rules (see [`validate_token_url`]).
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
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::InvalidUrl(_) => "InvalidTokenUrl",
            TokenError::ForbiddenAddress(_) => "ForbiddenTokenEndpoint",
            TokenError::InvalidCaBundle(_) => "InvalidCaBundle",
            TokenError::ClientSetup(_) => "TokenClientSetupFailed",
            TokenError::InvalidGrant { .. } => "RefreshTokenRejected",
            TokenError::InvalidClient { .. } => "InvalidClient",
            TokenError::Rejected { .. } => "TokenRequestRejected",
            TokenError::RateLimited { .. } => "TokenEndpointRateLimited",
            TokenError::ServerError { .. } => "TokenEndpointError",
            TokenError::Redirected { .. } => "TokenEndpointRedirected",
            TokenError::Connect(_) => "TokenEndpointUnreachable",
            TokenError::Tls(_) => "TokenEndpointTlsError",
            TokenError::UnknownOutcome(_) => "TokenResponseLost",
            TokenError::Unparseable { .. } => "UnparseableTokenResponse",
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

// ---------------------------------------------------------------------------------------------
// URL and address policy
// ---------------------------------------------------------------------------------------------

/// Host names of cloud metadata services (compared lowercase, without a trailing dot).
const FORBIDDEN_HOSTNAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.internal",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
    "metadata.platformequinix.com",
];

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn forbidden_hostname(host: &str) -> bool {
    FORBIDDEN_HOSTNAMES.contains(&normalize_host(host).as_str())
}

fn is_localhost_name(host: &str) -> bool {
    normalize_host(host) == "localhost"
}

/// Why an address must not be connected to, or `None` if it is allowed.
fn forbidden_ip(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4, allow_loopback),
        IpAddr::V6(v6) => {
            // IPv4-mapped (::ffff:a.b.c.d): the kernel connects to the IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4, allow_loopback);
            }
            let seg = v6.segments();
            // NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address.
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6].iter().all(|s| *s == 0) {
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                if let Some(why) = forbidden_v4(Ipv4Addr::new(a, b, c, d), false) {
                    return Some(why);
                }
            }
            if v6.is_unspecified() {
                Some("unspecified address")
            } else if v6.is_loopback() {
                (!allow_loopback).then_some("loopback address")
            } else if (seg[0] & 0xffc0) == 0xfe80 {
                Some("link-local address")
            } else if v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
                Some("cloud metadata address")
            } else if v6.is_multicast() {
                Some("multicast address")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(v4: Ipv4Addr, allow_loopback: bool) -> Option<&'static str> {
    let o = v4.octets();
    if o[0] == 0 {
        Some("unspecified address (0.0.0.0/8)")
    } else if v4.is_loopback() {
        (!allow_loopback).then_some("loopback address")
    } else if v4.is_link_local() {
        Some("link-local address (169.254.0.0/16, includes cloud metadata)")
    } else if v4 == Ipv4Addr::new(100, 100, 100, 200) || v4 == Ipv4Addr::new(192, 0, 0, 192) {
        Some("cloud metadata address")
    } else if v4.is_broadcast() || v4.is_multicast() {
        Some("broadcast or multicast address")
    } else {
        None
    }
}

/// Validate a token endpoint URL. Pure; also used by spec validation.
///
/// Rules: absolute `https` URL with a host; `http` only when `allow_http_loopback` and the host
/// is a loopback IP literal or `localhost`; no userinfo; no fragment (RFC 6749 §3.2); IP-literal
/// hosts and known metadata host names are checked against the forbidden address ranges
/// (link-local, metadata, unspecified, multicast, and loopback unless `allow_http_loopback`).
/// The message never echoes the URL (it may contain secrets).
pub fn validate_token_url(url: &str, allow_http_loopback: bool) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("not a valid absolute URL ({e})"))?;
    match parsed.scheme() {
        "https" | "http" => {}
        other => {
            let shown: String = other.chars().take(16).collect();
            return Err(format!("unsupported scheme \"{shown}\"; use https"));
        }
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "must not contain user information (user:password@); put credentials in the client \
             secret"
                .to_string(),
        );
    }
    if parsed.fragment().is_some() {
        return Err("must not contain a fragment (#...)".to_string());
    }
    let host = parsed
        .host()
        .ok_or_else(|| "has no host".to_string())?
        .to_owned();
    let is_loopback_host = match &host {
        Host::Domain(d) => {
            if forbidden_hostname(d) {
                return Err(format!(
                    "host \"{}\" is a cloud metadata service",
                    normalize_host(d)
                ));
            }
            if is_localhost_name(d) {
                if !allow_http_loopback {
                    return Err("loopback hosts (localhost) are not allowed".to_string());
                }
                true
            } else {
                false
            }
        }
        Host::Ipv4(v4) => {
            if let Some(why) = forbidden_ip(IpAddr::V4(*v4), allow_http_loopback) {
                return Err(format!("host {v4} is a forbidden {why}"));
            }
            v4.is_loopback()
        }
        Host::Ipv6(v6) => {
            if let Some(why) = forbidden_ip(IpAddr::V6(*v6), allow_http_loopback) {
                return Err(format!("host [{v6}] is a forbidden {why}"));
            }
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    if parsed.scheme() == "http" {
        if !allow_http_loopback {
            return Err("must use https".to_string());
        }
        if !is_loopback_host {
            return Err(
                "plain http is only allowed for loopback hosts (127.0.0.1, [::1], localhost); \
                 use https"
                    .to_string(),
            );
        }
    }
    Ok(parsed)
}

/// Marker error returned by [`GuardedResolver`]; found again in reqwest's error chain.
#[derive(Debug)]
struct ForbiddenAddressError(String);

impl fmt::Display for ForbiddenAddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ForbiddenAddressError {}

/// Keep only allowed addresses; error if something was resolved but everything was refused.
fn filter_resolved(
    addrs: impl IntoIterator<Item = SocketAddr>,
    allow_loopback: bool,
) -> Result<Vec<SocketAddr>, ForbiddenAddressError> {
    let mut kept = Vec::new();
    let mut refused: Option<&'static str> = None;
    for a in addrs {
        match forbidden_ip(a.ip(), allow_loopback) {
            None => kept.push(a),
            Some(why) => refused = refused.or(Some(why)),
        }
    }
    match (kept.is_empty(), refused) {
        (true, Some(why)) => Err(ForbiddenAddressError(format!(
            "the token host resolves only to forbidden addresses ({why})"
        ))),
        _ => Ok(kept),
    }
}

/// DNS resolver that refuses forbidden names and filters forbidden resolved addresses.
#[derive(Debug, Clone)]
struct GuardedResolver {
    allow_loopback: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = normalize_host(name.as_str());
        let allow_loopback = self.allow_loopback;
        Box::pin(async move {
            if forbidden_hostname(&host) {
                return Err(Box::new(ForbiddenAddressError(
                    "the token host is a cloud metadata service".to_string(),
                )) as Box<dyn std::error::Error + Send + Sync>);
            }
            if host == "localhost" {
                // RFC 6761: answered locally, never sent to DNS.
                if !allow_loopback {
                    return Err(Box::new(ForbiddenAddressError(
                        "loopback hosts are not allowed".to_string(),
                    )) as Box<dyn std::error::Error + Send + Sync>);
                }
                let addrs: reqwest::dns::Addrs = Box::new(
                    vec![
                        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                        SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
                    ]
                    .into_iter(),
                );
                return Ok(addrs);
            }
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let kept = filter_resolved(resolved, allow_loopback)?;
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Request encoding
// ---------------------------------------------------------------------------------------------

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 Appendix B).
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The HTTP Basic credentials for `client_secret_basic` (RFC 6749 §2.3.1): id and secret are
/// each form-urlencoded, joined with `:`, then base64-encoded.
fn basic_authorization(client_id: &str, client_secret: &str) -> SecretString {
    let joined = format!("{}:{}", form_encode(client_id), form_encode(client_secret));
    let b64 = base64::engine::general_purpose::STANDARD.encode(joined.as_bytes());
    SecretString::from(format!("Basic {b64}"))
}

/// Encoded request: the form body and, for Basic, the `Authorization` value.
struct EncodedRequest {
    body: SecretString,
    authorization: Option<SecretString>,
}

const RESERVED_PARAMS: &[&str] = &["grant_type", "refresh_token", "client_id", "client_secret"];

fn encode_request(req: &TokenRequest) -> EncodedRequest {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    match &req.grant {
        Grant::ClientCredentials => {
            form.append_pair("grant_type", "client_credentials");
        }
        Grant::RefreshToken(rt) => {
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", rt.expose_secret());
        }
    }
    let has_scope = !req.scopes.is_empty();
    if has_scope {
        form.append_pair("scope", &req.scopes.join(" "));
    }
    let has_audience = matches!(req.grant, Grant::ClientCredentials) && req.audience.is_some();
    if let (Grant::ClientCredentials, Some(aud)) = (&req.grant, &req.audience) {
        form.append_pair("audience", aud);
    }
    for (k, v) in &req.extra_params {
        let k = k.as_str();
        if RESERVED_PARAMS.contains(&k)
            || (has_scope && k == "scope")
            || (has_audience && k == "audience")
        {
            continue;
        }
        form.append_pair(k, v);
    }
    let authorization = match req.auth_method {
        ClientAuthMethod::Basic => Some(basic_authorization(
            req.client_id.expose_secret(),
            req.client_secret.expose_secret(),
        )),
        ClientAuthMethod::Post => {
            form.append_pair("client_id", req.client_id.expose_secret());
            form.append_pair("client_secret", req.client_secret.expose_secret());
            None
        }
    };
    EncodedRequest {
        body: SecretString::from(form.finish()),
        authorization,
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
    Unusable { refresh_token: Option<SecretString> },
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
    Some(Duration::from_secs_f64(secs.min(MAX_EXPIRES_IN.as_secs_f64())))
}

fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// Parse a 2xx body. Never fails on `expires_in`, `token_type`, `scope` or unknown members;
/// the refresh token is extracted first, so it survives any later failure.
fn parse_success(
    body: &[u8],
    content_type: Option<&str>,
    secrets: &[&str],
) -> SuccessParse {
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

/// Sanitize server text: drop control characters, collapse whitespace, blank out secrets,
/// cap the length.
fn sanitize_text(s: &str, max_chars: usize, secrets: &[&str]) -> String {
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
        if matches!(ch, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}') {
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
                SuccessParse::OAuthError(e) => {
                    Err(oauth_error_to_token_error(status, e, is_refresh, headers, now))
                }
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
        .connect_timeout(cfg.connect_timeout)
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

