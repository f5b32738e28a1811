//! The only part that touches the network: [`TokenClient`] over reqwest. It validates the URL,
//! encodes the request, sends it, reads the response under a size cap and hands status, headers
//! and body to the response interpretation.
//!
//! One call of [`TokenClient::request_token`] sends **at most one** HTTP request and never
//! retries: whether and when to retry depends on the grant (a refresh token may have been
//! rotated) and is the caller's decision, guided by [`TokenError::class`].
//!
//! # Hardening
//!
//! * No redirects (a 3xx is [`TokenError::Redirected`]), no proxies (environment proxies are
//!   ignored), connect and total timeouts, response size cap, no connection reuse.
//! * The DNS resolver applies the address policy of `url_policy` (forbidden ranges, loopback,
//!   private ranges and the operator's allow-list) to what DNS returns, and reqwest connects to
//!   exactly the addresses the resolver hands back: a name resolving to 10.x is refused before
//!   any connect.
//! * Transport failures become a [`TokenError`] naming only their class (DNS, refused, TLS,
//!   timeout, …); the transport's own text goes to the operator's log here, never further.
//!
//! # Was the request sent?
//!
//! The distinction matters for rotating refresh tokens: a request that never left the host can
//! be retried freely, a request that may have been processed cannot.
//!
//! * reqwest reports everything that fails inside the connector — DNS, TCP connect, the connect
//!   timeout, the TLS handshake, our resolver's refusals — as `is_connect()`. The connector runs
//!   before a single byte of the HTTP request is written, so these are "not sent" →
//!   [`ErrorClass::Transient`](super::ErrorClass::Transient).
//! * Every other transport failure (`is_timeout()` of the total timeout, `is_request()` resets
//!   and "connection closed before message completed", `is_body()`/`is_decode()` while reading
//!   the response) happens after the request may have been written →
//!   [`ErrorClass::UnknownOutcome`](super::ErrorClass::UnknownOutcome).
//! * Pooled keep-alive connections are disabled (`pool_max_idle_per_host(0)`): a server closing
//!   an idle connection just as we reuse it would otherwise turn into a spurious unknown outcome.
//!   Token requests are minutes apart, so pooling buys nothing.
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::error::{sanitize_text, ConnectFailure, LostResponse, TokenError};
use super::request::{encode_request, Grant, TokenRequest};
use super::response::{interpret_response, BodyRead, ResponseHeaders, TokenResponse};
use super::url_policy::{
    check_host_name, filter_resolved, validate_token_url, ForbiddenAddressError, NameCheck,
    TokenUrlPolicy, UrlError,
};

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
    /// Which private-network hosts may be contacted (`--token-url-allow`). Default: none.
    pub token_url_policy: TokenUrlPolicy,
}

impl Default for TokenClientConfig {
    fn default() -> Self {
        TokenClientConfig {
            allow_http_loopback: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_response_bytes: 64 * 1024,
            token_url_policy: TokenUrlPolicy::default(),
        }
    }
}

/// Turns a host name into addresses: the system resolver, or a fixed table in tests (which is
/// how the resolver's policy is tested with names that resolve to loopback).
type Lookup =
    Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

fn system_lookup() -> Lookup {
    Arc::new(|host: String| {
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.collect()) })
    })
}

/// Marker error of a failed name lookup, found again in reqwest's error chain.
#[derive(Debug)]
struct DnsFailure(String);

impl fmt::Display for DnsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DNS lookup failed: {}", self.0)
    }
}

impl std::error::Error for DnsFailure {}

/// DNS resolver that refuses forbidden names and filters the resolved addresses through the
/// address policy: forbidden ones always, loopback without the flag, private ones unless the
/// name or the address is allow-listed.
#[derive(Clone)]
struct GuardedResolver {
    allow_loopback: bool,
    policy: Arc<TokenUrlPolicy>,
    lookup: Lookup,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let check = check_host_name(name.as_str(), self.allow_loopback, &self.policy);
        let (allow_loopback, policy, lookup) = (
            self.allow_loopback,
            self.policy.clone(),
            self.lookup.clone(),
        );
        Box::pin(async move {
            let kept = match check? {
                NameCheck::Local(addrs) => addrs,
                NameCheck::Lookup { host, allow_listed } => {
                    let resolved = lookup(host).await.map_err(|e| DnsFailure(e.to_string()))?;
                    if resolved.is_empty() {
                        return Err(DnsFailure("no addresses".to_string()).into());
                    }
                    filter_resolved(resolved, allow_listed, &policy, allow_loopback)?
                }
            };
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the response (its meaning is decided in `response`)
// ---------------------------------------------------------------------------------------------

/// The headers `interpret_response` reads; see [`ResponseHeaders`] for the rules.
fn response_headers(headers: &HeaderMap) -> ResponseHeaders {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    ResponseHeaders {
        content_type: text("content-type"),
        retry_after: text("retry-after"),
        ratelimit_reset: text("x-ratelimit-reset"),
    }
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

/// Whether the OS refused the connection (nothing listening, or a firewall's reset).
fn connection_refused(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A reqwest failure as a [`TokenError`]: the class from the error's kind and source chain,
/// the transport's text only as `detail`.
fn classify_send_error(err: reqwest::Error) -> TokenError {
    let err = err.without_url();
    if let Some(f) = find_cause::<ForbiddenAddressError>(&err) {
        let detail = f.to_string();
        return if f.not_allowed {
            TokenError::NotAllowed { detail }
        } else {
            TokenError::ForbiddenAddress { detail }
        };
    }
    if err.is_builder() {
        return TokenError::InvalidUrl(transport_message(&err));
    }
    if err.is_connect() {
        // Failed inside the connector (DNS, TCP, connect timeout, TLS handshake): the request
        // was never written.
        if let Some(tls) = find_cause::<rustls::Error>(&err) {
            return TokenError::Tls {
                detail: sanitize_text(&tls.to_string(), MAX_TRANSPORT_MESSAGE_CHARS, &[]),
            };
        }
        let failure = if find_cause::<DnsFailure>(&err).is_some() {
            ConnectFailure::Dns
        } else if err.is_timeout() {
            ConnectFailure::Timeout
        } else if connection_refused(&err) {
            ConnectFailure::Refused
        } else {
            ConnectFailure::Other
        };
        return TokenError::Connect {
            failure,
            detail: transport_message(&err),
        };
    }
    // Total timeout, reset, connection closed before the response: the request may have been
    // (partly or fully) written and processed.
    let lost = if err.is_timeout() {
        LostResponse::Timeout
    } else {
        LostResponse::ConnectionLost
    };
    TokenError::UnknownOutcome {
        lost,
        detail: transport_message(&err),
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// Token endpoint client. Cheap to share (`Arc`), safe to use concurrently.
pub struct TokenClient {
    cfg: TokenClientConfig,
    lookup: Lookup,
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
    lookup: &Lookup,
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
            policy: Arc::new(cfg.token_url_policy.clone()),
            lookup: lookup.clone(),
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
        Self::with_lookup(cfg, system_lookup())
    }

    fn with_lookup(cfg: TokenClientConfig, lookup: Lookup) -> Result<Self, TokenError> {
        let default_client = build_http_client(&cfg, &lookup, Vec::new())
            .map_err(|e| TokenError::ClientSetup(transport_message(&e)))?;
        Ok(TokenClient {
            cfg,
            lookup,
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
        let client = build_http_client(&self.cfg, &self.lookup, certs).map_err(|e| {
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
    /// A failure's transport detail is logged here (with the host, inside the reconcile's
    /// span) and goes no further.
    pub async fn request_token(
        &self,
        req: &TokenRequest,
        ca_bundle_pem: Option<&[u8]>,
    ) -> Result<TokenResponse, TokenError> {
        let result = self.send(req, ca_bundle_pem).await;
        if let Err(e) = &result {
            if let Some(detail) = e.detail() {
                let host = url::Url::parse(&req.token_url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .unwrap_or_default();
                tracing::warn!(%host, reason = %e.reason(), error = %e, detail, "token request failed");
            }
        }
        result
    }

    async fn send(
        &self,
        req: &TokenRequest,
        ca_bundle_pem: Option<&[u8]>,
    ) -> Result<TokenResponse, TokenError> {
        let url = validate_token_url(
            &req.token_url,
            self.cfg.allow_http_loopback,
            &self.cfg.token_url_policy,
        )
        .map_err(|e| match e {
            UrlError::Invalid(m) => TokenError::InvalidUrl(m),
            UrlError::NotAllowed(detail) => TokenError::NotAllowed { detail },
        })?;
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
        let headers = response_headers(resp.headers());
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

    use secrecy::SecretString;

    use crate::oauth::token::error::ErrorClass;
    use crate::oauth::token::request::{basic_authorization, ClientAuthMethod};
    use crate::oauth::token::test_support::*;

    fn resolver(allow_loopback: bool) -> GuardedResolver {
        GuardedResolver {
            allow_loopback,
            policy: Arc::default(),
            lookup: system_lookup(),
        }
    }

    #[tokio::test]
    async fn resolver_refuses_names_and_loopback() {
        use reqwest::dns::Resolve;
        let strict = resolver(false);
        for name in ["metadata.google.internal", "metadata", "localhost"] {
            let r = strict.resolve(name.parse().unwrap()).await;
            let err = r.err().expect("refused");
            assert!(
                err.downcast_ref::<ForbiddenAddressError>().is_some(),
                "{name}"
            );
        }
        let lax = resolver(true);
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
            ..Default::default()
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
            (e.reason().as_str(), e.class()),
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
            (e.reason().as_str(), e.class()),
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
            (e.reason().as_str(), e.class()),
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
        assert_eq!(e.reason().as_str(), "UnparseableTokenResponse");
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
        assert_eq!(e.reason().as_str(), "UnparseableTokenResponse");
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
        assert_eq!(e.reason().as_str(), "TokenEndpointUnavailable");
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
        assert_eq!(e.reason().as_str(), "TokenResponseLost");
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
        assert!(
            matches!(
                e,
                TokenError::Connect {
                    failure: ConnectFailure::Refused,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "cannot reach the token endpoint: connection refused"
        );
        assert!(e.detail().is_some_and(|d| d.contains("os error")), "{e:?}");
        assert_eq!(e.reason().as_str(), "TokenEndpointUnreachable");
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
            assert_eq!(e.reason().as_str(), "InvalidTokenUrl", "{u}");
            assert_eq!(e.class(), ErrorClass::Terminal);
        }
    }

    // ----------------------------------------------------------------------------------------
    // The resolver hook and the operator's allow-list. Tests must never contact a private
    // address, so loopback stands in for one: `with_private_range` puts (part of) 127.0.0.0/8
    // under the allow-list, and a fixed lookup table maps invented names to it.
    // ----------------------------------------------------------------------------------------

    /// A lookup answering from a fixed table; an unknown name fails like NXDOMAIN.
    fn table_lookup(entries: &[(&'static str, &[&'static str])]) -> Lookup {
        let table: HashMap<String, Vec<SocketAddr>> = entries
            .iter()
            .map(|(name, ips)| {
                let addrs = ips
                    .iter()
                    .map(|ip| SocketAddr::new(ip.parse().unwrap(), 0))
                    .collect();
                (name.to_string(), addrs)
            })
            .collect();
        let table = Arc::new(table);
        Arc::new(move |host: String| {
            let answer = table.get(&host).cloned().ok_or_else(|| {
                std::io::Error::other(format!("failed to lookup address information: {host}"))
            });
            Box::pin(async move { answer })
        })
    }

    fn hook_client(policy: TokenUrlPolicy, lookup: Lookup) -> TokenClient {
        crate::install_crypto_provider();
        let cfg = TokenClientConfig {
            token_url_policy: policy,
            ..test_cfg()
        };
        TokenClient::with_lookup(cfg, lookup).unwrap()
    }

    /// One POST through the client's own HTTP client (its resolver hook included). Bypasses
    /// `validate_token_url`, which allows plain http only for loopback literals and
    /// `localhost`, neither of which reaches a resolver.
    async fn send_raw(c: &TokenClient, url: &str) -> Result<u16, TokenError> {
        let resp = c
            .default_client
            .post(url)
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(classify_send_error)?;
        Ok(resp.status().as_u16())
    }

    const NAME: &str = "tokens.internal.test";

    #[tokio::test]
    async fn resolver_hook_refuses_a_name_resolving_to_a_denied_range_before_connecting() {
        let (url, seen) = fixed(200, &[], token_json()).await;
        let url = url.replace("127.0.0.1", NAME);
        let lookup = table_lookup(&[(NAME, &["127.0.0.1"])]);
        let denied = |allow: &str| {
            allow
                .parse::<TokenUrlPolicy>()
                .unwrap()
                .with_private_range("127.0.0.0/8")
        };

        // (a) Not allow-listed (nothing, or other names and ranges): refused, never connected.
        for allow in ["", "other.internal.test", "*.other.test", "10.0.0.0/8"] {
            let c = hook_client(denied(allow), lookup.clone());
            let e = send_raw(&c, &url).await.unwrap_err();
            assert!(matches!(e, TokenError::NotAllowed { .. }), "{allow}: {e:?}");
            assert_eq!(e.reason().as_str(), "TokenURLNotAllowed");
            assert_eq!(e.class(), ErrorClass::Transient { retry_after: None });
            assert!(!e.to_string().contains("127.0.0.1"), "{e}");
            assert!(
                e.detail().is_some_and(|d| d.contains("does not allow")),
                "{e:?}"
            );
        }
        assert!(
            seen.lock().unwrap().is_empty(),
            "the token server received a request"
        );

        // (b) Allow-listed by name or by a wildcard: the request reaches the token server.
        for (n, allow) in [NAME, "*.internal.test", "TOKENS.Internal.Test."]
            .into_iter()
            .enumerate()
        {
            let c = hook_client(denied(allow), lookup.clone());
            assert_eq!(send_raw(&c, &url).await.unwrap(), 200, "{allow}");
            assert_eq!(seen.lock().unwrap().len(), n + 1, "{allow}");
        }
    }

    #[tokio::test]
    async fn resolver_hook_drops_denied_addresses_from_a_mixed_answer() {
        let (url, seen) = fixed(200, &[], token_json()).await;
        let port: u16 = url
            .split(':')
            .nth(2)
            .unwrap()
            .trim_end_matches("/token")
            .parse()
            .unwrap();
        // A trap on the denied address, same port: it must never see a connection.
        let trap = tokio::net::TcpListener::bind(("127.0.0.2", port))
            .await
            .unwrap();
        let trapped = Arc::new(AtomicUsize::new(0));
        let t2 = trapped.clone();
        tokio::spawn(async move {
            while trap.accept().await.is_ok() {
                t2.fetch_add(1, Ordering::SeqCst);
            }
        });
        let url = url.replace("127.0.0.1", NAME);
        // Rebinding-style answer: the denied address first.
        let lookup = table_lookup(&[(NAME, &["127.0.0.2", "127.0.0.1"])]);
        let policy = TokenUrlPolicy::default().with_private_range("127.0.0.2/32");
        let c = hook_client(policy, lookup);
        assert_eq!(send_raw(&c, &url).await.unwrap(), 200);
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert_eq!(
            trapped.load(Ordering::SeqCst),
            0,
            "the denied address was connected"
        );
    }

    #[tokio::test]
    async fn dns_failures_are_a_class_without_the_resolver_text() {
        let c = hook_client(
            TokenUrlPolicy::default(),
            table_lookup(&[("empty.internal.test", &[])]),
        );
        for host in ["nxdomain.internal.test", "empty.internal.test"] {
            let e = send_raw(&c, &format!("http://{host}:1/token"))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    TokenError::Connect {
                        failure: ConnectFailure::Dns,
                        ..
                    }
                ),
                "{host}: {e:?}"
            );
            assert_eq!(
                e.to_string(),
                "cannot reach the token endpoint: DNS lookup failed"
            );
            assert_eq!(e.reason().as_str(), "TokenEndpointUnreachable");
        }
    }

    #[tokio::test]
    async fn a_literal_in_a_denied_range_is_refused_before_sending() {
        let (url, seen) = fixed(200, &[], token_json()).await;
        let policy = TokenUrlPolicy::default().with_private_range("127.0.0.0/8");
        let c = hook_client(policy, table_lookup(&[]));
        let e = c.request_token(&cc(&url), None).await.unwrap_err();
        assert!(matches!(e, TokenError::NotAllowed { .. }), "{e:?}");
        assert_eq!(e.reason().as_str(), "TokenURLNotAllowed");
        assert!(seen.lock().unwrap().is_empty());
        // Without the range rule the same client reaches the server.
        let c = hook_client(TokenUrlPolicy::default(), table_lookup(&[]));
        c.request_token(&cc(&url), None).await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 1);
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
            assert!(
                matches!(e, TokenError::ForbiddenAddress { .. }),
                "{u}: {e:?}"
            );
            assert_eq!(e.class(), ErrorClass::Terminal);
            assert_eq!(e.reason().as_str(), "ForbiddenTokenEndpoint");
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
        assert!(matches!(e, TokenError::Tls { .. }), "{e:?}");
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
            assert!(matches!(e, TokenError::Tls { .. }), "{e:?}");
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
        assert!(matches!(e, TokenError::Tls { .. }), "{e:?}");
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
            assert_eq!(e.reason().as_str(), "InvalidCABundle", "{e:?}");
            assert_eq!(e.class(), ErrorClass::Terminal);
        }
    }
}
