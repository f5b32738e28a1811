//! A fault-injecting OAuth 2.0 token endpoint (RFC 6749 §4.4, §6) for tests and benchmarks.
//!
//! [`TokenServer::start`] serves `POST /oauth/token` on `127.0.0.1:<random port>` from an in-process
//! tokio task and stops when the [`TokenServer`] is dropped.
//!
//! What it models:
//! - client authentication with `client_secret_basic` (id and secret each form-urlencoded before
//!   base64, RFC 6749 App. B) or `client_secret_post`; both at once is `invalid_request`;
//! - the `client_credentials` grant (never returns a refresh token);
//! - the `refresh_token` grant with refresh token *families*: rotation, Auth0-style overlap window
//!   (only the immediately previous token may be exchanged again inside the window) and reuse
//!   detection (replaying a spent token revokes the whole family, counted by
//!   [`TokenServer::revocations`], like oidc-provider's `grant.revoked`);
//! - one-shot and sticky [`Fault`]s (error statuses with `Retry-After`, connection resets before and
//!   after the exchange is committed, slow replies and slow-loris bodies, malformed success bodies
//!   (truncated JSON, invalid UTF-8, duplicate members, raw out-of-range numbers), redirects, huge
//!   bodies);
//! - a record of every call ([`RecordedCall`]), per-client and per-family concurrency maxima, and a
//!   registry of issued access tokens with their expiry.
//!
//! Every request that reaches the handler is processed to completion in its own task, even if the
//! client disconnects meanwhile (a `SlowReply { after_commit: false }` whose client gave up still
//! commits once the delay is over), so tests see deterministic server state.
//!
//! Connection resets are real: the server runs its own accept loop on hyper, and a handler that
//! wants "no response" closes the TCP connection with `SO_LINGER = 0` (an RST on Unix), so the
//! client sees a connection error and no HTTP status.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use base64::Engine as _;
use rand::RngCore as _;
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::provider_invariants::{
    fingerprint, Answer, ProviderCall, ProviderRecord, ProviderRevocation,
};
use crate::resettable::{accept_loop, ConnectionKiller};

/// Path of the token endpoint, relative to [`TokenServer::url`].
pub const TOKEN_PATH: &str = "/oauth/token";

// -------------------------------------------------------------------------------------------------
// Configuration
// -------------------------------------------------------------------------------------------------

/// Server configuration. Every field can also be changed at runtime through [`TokenServer`] setters.
#[derive(Clone, Debug)]
pub struct TokenServerConfig {
    /// Registered confidential clients: `client_id` → `client_secret` (any characters allowed).
    pub clients: BTreeMap<String, String>,
    /// Issue a new refresh token on every refresh and mark the presented one spent.
    pub rotate_refresh_tokens: bool,
    /// Lifetime of issued access tokens. `expires_in` is the whole number of seconds (at least 1);
    /// the registry ([`TokenServer::access_token_expiry`]) keeps the exact, possibly sub-second, expiry.
    pub access_token_ttl: Duration,
    /// Auth0-style rotation overlap: within this time after a refresh token was first spent, it (and
    /// only the immediately previous token of its family) may be exchanged again for a fresh pair.
    pub overlap_window: Option<Duration>,
    /// Replaying a spent refresh token (outside the overlap rule) revokes the whole family.
    /// When off, the replay is just `invalid_grant`.
    pub reuse_detection: bool,
    /// With rotation off: echo the (unchanged) refresh token in the response instead of omitting it.
    pub echo_refresh_token_when_not_rotating: bool,
}

impl Default for TokenServerConfig {
    fn default() -> Self {
        Self {
            clients: BTreeMap::new(),
            rotate_refresh_tokens: true,
            access_token_ttl: Duration::from_secs(3600),
            overlap_window: None,
            reuse_detection: true,
            echo_refresh_token_when_not_rotating: false,
        }
    }
}

impl TokenServerConfig {
    /// Register a client (builder style).
    pub fn with_client(
        mut self,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> Self {
        let (id, secret) = (client_id.into(), client_secret.into());
        crate::leak_scan::register_secret(&secret, "a token server client secret");
        self.clients.insert(id, secret);
        self
    }

    /// Set [`TokenServerConfig::rotate_refresh_tokens`] (builder style).
    pub fn with_rotation(mut self, rotate: bool) -> Self {
        self.rotate_refresh_tokens = rotate;
        self
    }

    /// Set [`TokenServerConfig::access_token_ttl`] (builder style).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.access_token_ttl = ttl;
        self
    }

    /// Set [`TokenServerConfig::overlap_window`] (builder style).
    pub fn with_overlap(mut self, window: Option<Duration>) -> Self {
        self.overlap_window = window;
        self
    }

    /// Set [`TokenServerConfig::reuse_detection`] (builder style).
    pub fn with_reuse_detection(mut self, on: bool) -> Self {
        self.reuse_detection = on;
        self
    }

    /// Set [`TokenServerConfig::echo_refresh_token_when_not_rotating`] (builder style).
    pub fn with_echo_refresh_token_when_not_rotating(mut self, on: bool) -> Self {
        self.echo_refresh_token_when_not_rotating = on;
        self
    }
}

// -------------------------------------------------------------------------------------------------
// Faults
// -------------------------------------------------------------------------------------------------

/// Value of a `Retry-After` header (RFC 9110 §10.2.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// `Retry-After: <delta-seconds>`
    Seconds(u64),
    /// `Retry-After: <HTTP-date>`
    HttpDate(SystemTime),
    /// `Retry-After: <HTTP-date>` of this long after the moment the response is sent (not when
    /// the fault was queued, which may be long before the request arrives). HTTP-dates have
    /// whole seconds, rounded down: the client sees between `d − 1 s` and `d`.
    HttpDateIn(Duration),
}

/// Body of an injected [`Fault::Status`] response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultBody {
    /// `{"error": "<code>", "error_description": "injected fault"}` as `application/json`.
    OAuthError(&'static str),
    /// A small HTML error page as `text/html`.
    Html,
    /// No body.
    Empty,
}

/// A fault applied to one token request (queued with [`TokenServer::push_fault`]) or to every
/// request ([`TokenServer::set_sticky_fault`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Respond with this status before processing anything (no token is consumed).
    Status {
        code: u16,
        retry_after: Option<RetryAfter>,
        body: FaultBody,
    },
    /// Close the connection (RST) without a response before processing: no token is consumed.
    ResetBeforeProcessing,
    /// Do the exchange and commit it (rotation included), then close the connection (RST)
    /// without responding.
    ResetAfterCommit,
    /// Delay the response. `after_commit: false` sleeps before processing the request (it is
    /// still processed after the delay even if the client left); `true` commits first, then sleeps.
    SlowReply { delay: Duration, after_commit: bool },
    /// Process normally, then drop `refresh_token` from a successful response.
    StripRefreshToken,
    /// Process normally (rotation included), then drop `access_token` from a successful
    /// response: a broken 200 that still carries the new refresh token. The reply is held back
    /// for `hold` after the commit (so a test can arm an API fault in between).
    StripAccessToken { hold: Duration },
    /// Process normally, then drop `expires_in` from a successful response.
    StripExpiresIn,
    /// Process normally, then send `expires_in` as a JSON string (`"3600"`).
    StringExpiresIn,
    /// Status 200 with truncated JSON. With `after_commit` the real exchange is committed and its
    /// response truncated; without, nothing is processed and a fake response is truncated.
    BrokenJson { after_commit: bool },
    /// `302 Found` to `location`, nothing processed.
    Redirect { location: String },
    /// Status 200 with a streamed (chunked, no `Content-Length`) JSON-looking body of exactly
    /// `bytes` bytes; nothing processed.
    HugeBody { bytes: usize },
    /// Process normally (rotation included), then send the status and headers at once and
    /// the body one byte per `interval`: a slow-loris reply that outlasts any client timeout.
    SlowLoris { interval: Duration },
    /// Process normally (rotation included), then put two bytes that are not UTF-8 (0xff
    /// 0xfe) at the start of the `access_token` value. The rest of the body (a rotated
    /// `refresh_token` after it) stays intact.
    InvalidUtf8,
    /// Process normally, then send the member `field` twice: first with the raw JSON value
    /// `decoy`, then the real one (JSON parsers that keep the last member see the real one).
    DuplicateField { field: String, decoy: String },
    /// Process normally, then send the member `field` with `raw` as its JSON text instead of
    /// its value: numbers a JSON library may not hold (`1e400`, `99999999999999999999`) or
    /// values out of range for the field (`-1`, `1e308`).
    RawField { field: String, raw: String },
}

impl Fault {
    /// `429` with `Retry-After: <secs>` and an OAuth-style JSON error body.
    pub fn too_many_requests(retry_after_secs: u64) -> Self {
        Fault::Status {
            code: 429,
            retry_after: Some(RetryAfter::Seconds(retry_after_secs)),
            body: FaultBody::OAuthError("temporarily_unavailable"),
        }
    }

    /// `503` with the given `Retry-After` and an empty body.
    pub fn service_unavailable(retry_after: Option<RetryAfter>) -> Self {
        Fault::Status {
            code: 503,
            retry_after,
            body: FaultBody::Empty,
        }
    }

    /// `500` with an HTML body (a proxy or crashed IdP).
    pub fn html_500() -> Self {
        Fault::Status {
            code: 500,
            retry_after: None,
            body: FaultBody::Html,
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Recording
// -------------------------------------------------------------------------------------------------

/// How the client authenticated (as presented, whether or not it was accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// No client credentials.
    None,
    /// `Authorization: Basic` (`client_secret_basic`).
    ClientSecretBasic,
    /// `client_secret` in the form body (`client_secret_post`).
    ClientSecretPost,
    /// Both at once (rejected with `invalid_request`).
    Both,
}

/// What the grant logic did with a request (absent when the request was rejected before the grant
/// logic, e.g. bad client authentication, or when a fault prevented processing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrantEvent {
    /// `client_credentials` token issued.
    Issued,
    /// Refresh with rotation: new refresh token issued, presented one spent.
    Rotated,
    /// Refresh without rotation: the presented refresh token stays live.
    NotRotated,
    /// The immediately previous refresh token was exchanged inside the overlap window.
    OverlapReissued,
    /// A spent refresh token was replayed: the family was revoked (counted in `revocations()`).
    ReuseDetected,
    /// A spent refresh token was replayed with reuse detection off: `invalid_grant`, family intact.
    SpentRejected,
    /// The refresh token belongs to a revoked family.
    FamilyRevoked,
    /// The refresh token is unknown.
    UnknownToken,
    /// The refresh token was issued to another client.
    WrongClient,
}

/// State of a refresh token at the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefreshTokenState {
    /// The current token of a live family.
    Live,
    /// Already exchanged (rotated away) in a live family.
    Spent,
    /// Its family was revoked.
    Revoked,
    /// Never issued by this server.
    Unknown,
}

/// What the server decided for a call. Filled in as soon as the outcome is decided, i.e. before a
/// `SlowReply { after_commit: true }` delay and before a `ResetAfterCommit` reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallOutcome {
    /// HTTP status sent, or `None` when the connection was reset without a response.
    pub status: Option<u16>,
    /// OAuth `error` code of an error response produced by the grant logic (not by a fault).
    pub error: Option<String>,
    /// Access token issued (and committed), even if a fault kept it from reaching the client.
    pub access_token: Option<String>,
    /// Refresh token in the server's response (new, or echoed), even if a fault stripped it or
    /// kept it from reaching the client.
    pub refresh_token: Option<String>,
    /// What the grant logic did.
    pub event: Option<GrantEvent>,
    /// When the outcome was decided.
    pub decided_at: SystemTime,
}

/// One request to the token endpoint. The client secret is never recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCall {
    /// Arrival sequence number (monotonic over the server's life, not reset by `reset_calls`).
    pub seq: u64,
    /// Arrival time.
    pub at: SystemTime,
    pub grant_type: Option<String>,
    /// Client id as presented (decoded from Basic, or the body's `client_id`).
    pub client_id: Option<String>,
    pub auth_method: AuthMethod,
    /// Refresh token presented (`refresh_token` parameter).
    pub refresh_token: Option<String>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// All other form parameters (not `grant_type`, `client_id`, `client_secret`, `refresh_token`,
    /// `scope`, `audience`).
    pub extra_params: BTreeMap<String, String>,
    /// Fault applied to this call, if any.
    pub fault: Option<Fault>,
    /// `None` while the call is still being processed.
    pub outcome: Option<CallOutcome>,
}

// -------------------------------------------------------------------------------------------------
// Shared state
// -------------------------------------------------------------------------------------------------

struct Family {
    client_id: String,
    /// The one token that can be exchanged normally.
    live: String,
    /// The immediately previous token and when it was first spent.
    previous: Option<(String, Instant)>,
    revoked: bool,
}

struct AccessTokenRecord {
    expires_at: SystemTime,
    family: Option<u64>,
}

#[derive(Default)]
struct Tokens {
    config: TokenServerConfig,
    next_family: u64,
    families: HashMap<u64, Family>,
    /// Every refresh token ever issued → its family.
    refresh_tokens: HashMap<String, u64>,
    access_tokens: HashMap<String, AccessTokenRecord>,
    revocations: u64,
}

#[derive(Default)]
struct Concurrency {
    in_flight: usize,
    per_client: HashMap<String, usize>,
    per_family: HashMap<u64, usize>,
    max_per_client: HashMap<String, usize>,
    max_any_client: usize,
    max_per_family: usize,
    max_in_flight: usize,
}

#[derive(Default)]
struct Faults {
    queue: VecDeque<Fault>,
    sticky: Option<Fault>,
}

#[derive(Default)]
struct CallLog {
    next_seq: u64,
    calls: Vec<RecordedCall>,
}

#[derive(Default)]
struct Shared {
    tokens: Mutex<Tokens>,
    concurrency: Mutex<Concurrency>,
    faults: Mutex<Faults>,
    log: Mutex<CallLog>,
}

/// Lock ignoring poisoning: the protected maps stay consistent because no code path panics while
/// holding a lock halfway through an update.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every access and refresh token the server mints or issues (the leak scan looks for each).
fn random_token() -> String {
    let mut buf = [0u8; 32];
    rand::rng().fill_bytes(&mut buf);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf);
    crate::leak_scan::register_secret(&token, "a token the token server issued");
    token
}

/// Decrements the in-flight counters when the request's processing task ends.
struct InFlightGuard {
    shared: Arc<Shared>,
    client_id: Option<String>,
    family: Option<u64>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut c = lock(&self.shared.concurrency);
        c.in_flight = c.in_flight.saturating_sub(1);
        if let Some(id) = &self.client_id {
            if let Some(n) = c.per_client.get_mut(id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_client.remove(id);
                }
            }
        }
        if let Some(f) = self.family {
            if let Some(n) = c.per_family.get_mut(&f) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_family.remove(&f);
                }
            }
        }
    }
}

impl Shared {
    fn next_fault(&self) -> Option<Fault> {
        let mut f = lock(&self.faults);
        match f.queue.pop_front() {
            Some(fault) => Some(fault),
            None => f.sticky.clone(),
        }
    }

    fn family_of(&self, refresh_token: &str) -> Option<u64> {
        lock(&self.tokens)
            .refresh_tokens
            .get(refresh_token)
            .copied()
    }

    fn enter(self: &Arc<Self>, client_id: Option<&str>, family: Option<u64>) -> InFlightGuard {
        let mut c = lock(&self.concurrency);
        c.in_flight += 1;
        c.max_in_flight = c.max_in_flight.max(c.in_flight);
        if let Some(id) = client_id {
            let n = {
                let n = c.per_client.entry(id.to_owned()).or_insert(0);
                *n += 1;
                *n
            };
            c.max_any_client = c.max_any_client.max(n);
            let m = c.max_per_client.entry(id.to_owned()).or_insert(0);
            *m = (*m).max(n);
        }
        if let Some(f) = family {
            let n = {
                let n = c.per_family.entry(f).or_insert(0);
                *n += 1;
                *n
            };
            c.max_per_family = c.max_per_family.max(n);
        }
        InFlightGuard {
            shared: Arc::clone(self),
            client_id: client_id.map(str::to_owned),
            family,
        }
    }

    fn record_arrival(&self, req: &ParsedRequest, fault: Option<Fault>) -> u64 {
        let p = &req.params;
        let get = |k: &str| p.get(k).cloned();
        let extra_params = p
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "grant_type"
                        | "client_id"
                        | "client_secret"
                        | "refresh_token"
                        | "scope"
                        | "audience"
                )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut log = lock(&self.log);
        let seq = log.next_seq;
        log.next_seq += 1;
        log.calls.push(RecordedCall {
            seq,
            at: SystemTime::now(),
            grant_type: get("grant_type"),
            client_id: req.presented_client_id(),
            auth_method: req.auth_method(),
            refresh_token: get("refresh_token"),
            scope: get("scope"),
            audience: get("audience"),
            extra_params,
            fault,
            outcome: None,
        });
        seq
    }

    fn record_outcome(&self, seq: u64, outcome: CallOutcome) {
        let mut log = lock(&self.log);
        // Calls are appended in seq order; a `reset_calls` may have removed this one.
        if let Ok(i) = log.calls.binary_search_by_key(&seq, |c| c.seq) {
            log.calls[i].outcome = Some(outcome);
        }
    }

    /// Authenticate the client, then run the grant. One lock acquisition.
    fn process(&self, req: &ParsedRequest) -> Processed {
        if let Some(e) = &req.malformed {
            return Processed::error(StatusCode::BAD_REQUEST, "invalid_request", e, None);
        }
        let now = SystemTime::now();
        let mut t = lock(&self.tokens);
        let client_id = match authenticate(&t.config, req) {
            Ok(id) => id,
            Err(p) => return p,
        };
        match req.params.get("grant_type").map(String::as_str) {
            None => Processed::error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "missing grant_type",
                None,
            ),
            Some("client_credentials") => {
                let ttl = t.config.access_token_ttl;
                let at = t.issue_access_token(now, None);
                let mut body = success_body(&at, ttl);
                if let Some(scope) = req.params.get("scope") {
                    body.insert("scope".into(), Value::String(scope.clone()));
                }
                Processed::success(body, at, None, GrantEvent::Issued)
            }
            Some("refresh_token") => match req.params.get("refresh_token") {
                None => Processed::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "missing refresh_token",
                    None,
                ),
                Some(rt) => t.exchange_refresh_token(&client_id, rt, req.params.get("scope"), now),
            },
            Some(_) => Processed::error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant type not supported",
                None,
            ),
        }
    }
}

impl Tokens {
    fn issue_access_token(&mut self, now: SystemTime, family: Option<u64>) -> String {
        let at = random_token();
        let expires_at = now + self.config.access_token_ttl;
        self.access_tokens
            .insert(at.clone(), AccessTokenRecord { expires_at, family });
        at
    }

    fn new_family(&mut self, client_id: &str) -> String {
        let id = self.next_family;
        self.next_family += 1;
        let rt = random_token();
        self.families.insert(
            id,
            Family {
                client_id: client_id.to_owned(),
                live: rt.clone(),
                previous: None,
                revoked: false,
            },
        );
        self.refresh_tokens.insert(rt.clone(), id);
        rt
    }

    fn rotate(&mut self, family: u64) -> String {
        let new = random_token();
        self.refresh_tokens.insert(new.clone(), family);
        if let Some(f) = self.families.get_mut(&family) {
            f.live = new.clone();
        }
        new
    }

    fn state_of(&self, rt: &str) -> RefreshTokenState {
        let Some(f) = self
            .refresh_tokens
            .get(rt)
            .and_then(|id| self.families.get(id))
        else {
            return RefreshTokenState::Unknown;
        };
        if f.revoked {
            RefreshTokenState::Revoked
        } else if f.live == rt {
            RefreshTokenState::Live
        } else {
            RefreshTokenState::Spent
        }
    }

    fn exchange_refresh_token(
        &mut self,
        client_id: &str,
        rt: &str,
        scope: Option<&String>,
        now: SystemTime,
    ) -> Processed {
        let invalid_grant = |event| {
            Processed::error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "refresh token is invalid, expired or revoked",
                Some(event),
            )
        };
        let Some(&fid) = self.refresh_tokens.get(rt) else {
            return invalid_grant(GrantEvent::UnknownToken);
        };
        let Some(family) = self.families.get(&fid) else {
            return invalid_grant(GrantEvent::UnknownToken);
        };
        if family.client_id != client_id {
            return invalid_grant(GrantEvent::WrongClient);
        }
        if family.revoked {
            return invalid_grant(GrantEvent::FamilyRevoked);
        }
        let rotate = self.config.rotate_refresh_tokens;
        let is_live = family.live == rt;
        let in_overlap = match (&family.previous, self.config.overlap_window) {
            (Some((prev, spent_at)), Some(window)) => prev == rt && spent_at.elapsed() <= window,
            _ => false,
        };

        let (response_rt, event) = if is_live {
            if rotate {
                let new = self.rotate(fid);
                if let Some(f) = self.families.get_mut(&fid) {
                    f.previous = Some((rt.to_owned(), Instant::now()));
                }
                (Some(new), GrantEvent::Rotated)
            } else {
                let echo = self.config.echo_refresh_token_when_not_rotating;
                (echo.then(|| rt.to_owned()), GrantEvent::NotRotated)
            }
        } else if in_overlap {
            // A fresh pair; the previously live token is orphaned (spent). `previous` and its
            // spent-at time stay, so the window is not extended.
            (Some(self.rotate(fid)), GrantEvent::OverlapReissued)
        } else if self.config.reuse_detection {
            if let Some(f) = self.families.get_mut(&fid) {
                f.revoked = true;
            }
            self.revocations += 1;
            tracing::debug!(
                client_id,
                "token server: refresh token reuse detected, family revoked"
            );
            return invalid_grant(GrantEvent::ReuseDetected);
        } else {
            return invalid_grant(GrantEvent::SpentRejected);
        };

        let ttl = self.config.access_token_ttl;
        let at = self.issue_access_token(now, Some(fid));
        let mut body = success_body(&at, ttl);
        if let Some(new_rt) = &response_rt {
            body.insert("refresh_token".into(), Value::String(new_rt.clone()));
        }
        if let Some(scope) = scope {
            body.insert("scope".into(), Value::String(scope.clone()));
        }
        Processed::success(body, at, response_rt, event)
    }
}

fn success_body(access_token: &str, ttl: Duration) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert(
        "access_token".into(),
        Value::String(access_token.to_owned()),
    );
    body.insert("token_type".into(), Value::String("Bearer".into()));
    body.insert("expires_in".into(), Value::from(ttl.as_secs().max(1)));
    body
}

fn authenticate(config: &TokenServerConfig, req: &ParsedRequest) -> Result<String, Processed> {
    let bad_request =
        |d: &str| Processed::error(StatusCode::BAD_REQUEST, "invalid_request", d, None);
    let body_id = req.params.get("client_id");
    let body_secret = req.params.get("client_secret");
    let (id, secret) = match (&req.basic, body_secret) {
        (Some(_), Some(_)) => {
            return Err(bad_request(
                "client authentication must use only one method",
            ))
        }
        (Some(Err(e)), None) => return Err(bad_request(e)),
        (Some(Ok((id, secret))), None) => {
            if body_id.is_some_and(|b| b != id) {
                return Err(bad_request(
                    "client_id does not match the Authorization header",
                ));
            }
            (id, secret)
        }
        (None, Some(secret)) => match body_id {
            Some(id) => (id, secret),
            None => return Err(bad_request("client_secret without client_id")),
        },
        (None, None) => {
            return Err(Processed::invalid_client("no client authentication"));
        }
    };
    match config.clients.get(id) {
        Some(expected) if expected == secret => Ok(id.clone()),
        _ => Err(Processed::invalid_client("client authentication failed")),
    }
}

// -------------------------------------------------------------------------------------------------
// Request parsing
// -------------------------------------------------------------------------------------------------

struct ParsedRequest {
    params: BTreeMap<String, String>,
    /// `Some` when an `Authorization: Basic` header is present.
    basic: Option<Result<(String, String), &'static str>>,
    /// Wrong content type or repeated parameter.
    malformed: Option<String>,
}

impl ParsedRequest {
    fn auth_method(&self) -> AuthMethod {
        match (
            self.basic.is_some(),
            self.params.contains_key("client_secret"),
        ) {
            (true, true) => AuthMethod::Both,
            (true, false) => AuthMethod::ClientSecretBasic,
            (false, true) => AuthMethod::ClientSecretPost,
            (false, false) => AuthMethod::None,
        }
    }

    fn presented_client_id(&self) -> Option<String> {
        match &self.basic {
            Some(Ok((id, _))) => Some(id.clone()),
            _ => self.params.get("client_id").cloned(),
        }
    }
}

fn parse_request(headers: &HeaderMap, body: &[u8]) -> ParsedRequest {
    let mut malformed = None;
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        malformed = Some("content type must be application/x-www-form-urlencoded".to_owned());
    }
    let mut params = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        if params.insert(k.to_string(), v.into_owned()).is_some() && malformed.is_none() {
            malformed = Some(format!("parameter {k} repeated"));
        }
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("basic")
                .then(|| parse_basic(rest.trim()))
        });
    ParsedRequest {
        params,
        basic,
        malformed,
    }
}

/// RFC 6749 §2.3.1 + App. B: base64(form_urlencode(id) ":" form_urlencode(secret)).
fn parse_basic(b64: &str) -> Result<(String, String), &'static str> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "malformed Basic credentials (base64)")?;
    let raw = String::from_utf8(raw).map_err(|_| "malformed Basic credentials (utf-8)")?;
    let (id, secret) = raw
        .split_once(':')
        .ok_or("malformed Basic credentials (no colon)")?;
    Ok((form_urldecode(id)?, form_urldecode(secret)?))
}

/// Strict `application/x-www-form-urlencoded` decoding of one component: `+` is a space, `%XX`
/// a byte; a `%` not followed by two hex digits is an error.
fn form_urldecode(s: &str) -> Result<String, &'static str> {
    const ERR: &str = "malformed Basic credentials (invalid percent-encoding)";
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(ERR)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err(ERR);
                }
                let hex = std::str::from_utf8(hex).map_err(|_| ERR)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| ERR)?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ERR)
}

// -------------------------------------------------------------------------------------------------
// Responses
// -------------------------------------------------------------------------------------------------

struct Processed {
    status: StatusCode,
    body: Map<String, Value>,
    www_authenticate: bool,
    error: Option<String>,
    access_token: Option<String>,
    refresh_token: Option<String>,
    event: Option<GrantEvent>,
}

impl Processed {
    fn success(
        body: Map<String, Value>,
        access_token: String,
        refresh_token: Option<String>,
        event: GrantEvent,
    ) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            www_authenticate: false,
            error: None,
            access_token: Some(access_token),
            refresh_token,
            event: Some(event),
        }
    }

    fn error(
        status: StatusCode,
        error: &str,
        description: &str,
        event: Option<GrantEvent>,
    ) -> Self {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(error.to_owned()));
        body.insert(
            "error_description".into(),
            Value::String(description.to_owned()),
        );
        Self {
            status,
            body,
            www_authenticate: false,
            error: Some(error.to_owned()),
            access_token: None,
            refresh_token: None,
            event,
        }
    }

    fn invalid_client(description: &str) -> Self {
        let mut p = Self::error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            description,
            None,
        );
        p.www_authenticate = true;
        p
    }

    fn outcome(&self, status: Option<u16>) -> CallOutcome {
        CallOutcome {
            status,
            error: self.error.clone(),
            access_token: self.access_token.clone(),
            refresh_token: self.refresh_token.clone(),
            event: self.event,
            decided_at: SystemTime::now(),
        }
    }
}

fn fault_outcome(status: Option<u16>) -> CallOutcome {
    CallOutcome {
        status,
        error: None,
        access_token: None,
        refresh_token: None,
        event: None,
        decided_at: SystemTime::now(),
    }
}

fn json_response(status: StatusCode, body: Vec<u8>, www_authenticate: bool) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if www_authenticate {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"vaultconn-testkit\""),
        );
    }
    res
}

fn serialize(body: &Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec())
}

fn truncated(mut bytes: Vec<u8>) -> Vec<u8> {
    let keep = (bytes.len() / 2).max(1);
    bytes.truncate(keep);
    bytes
}

fn status_fault_response(
    code: u16,
    retry_after: Option<&RetryAfter>,
    body: &FaultBody,
) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = match body {
        FaultBody::OAuthError(e) => {
            let mut m = Map::new();
            m.insert("error".into(), Value::String((*e).to_owned()));
            m.insert(
                "error_description".into(),
                Value::String("injected fault".into()),
            );
            json_response(status, serialize(&m), false)
        }
        FaultBody::Html => {
            let mut res = Response::new(Body::from(format!(
                "<!DOCTYPE html><html><head><title>{code} Error</title></head>\
                 <body><h1>{code} {}</h1><p>injected fault</p></body></html>",
                status.canonical_reason().unwrap_or("Error")
            )));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            res
        }
        FaultBody::Empty => Response::new(Body::empty()),
    };
    *res.status_mut() = status;
    if let Some(ra) = retry_after {
        let value = match ra {
            RetryAfter::Seconds(s) => s.to_string(),
            RetryAfter::HttpDate(t) => httpdate::fmt_http_date(*t),
            RetryAfter::HttpDateIn(d) => httpdate::fmt_http_date(SystemTime::now() + *d),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            res.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    res
}

fn redirect_response(location: &str) -> Response {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// `{"padding":"xxxx…"}` of exactly `total` bytes (just `x`s when `total` is tiny), streamed in
/// 64 KiB chunks without a `Content-Length`.
fn huge_body_response(total: usize) -> Response {
    const PREFIX: &[u8] = b"{\"padding\":\"";
    const SUFFIX: &[u8] = b"\"}";
    const CHUNK: usize = 64 * 1024;
    let framed = total >= PREFIX.len() + SUFFIX.len();
    let mut remaining = if framed {
        total - PREFIX.len() - SUFFIX.len()
    } else {
        total
    };
    let filler = Bytes::from(vec![b'x'; CHUNK]);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(remaining / CHUNK + 3);
    if framed {
        chunks.push(Bytes::from_static(PREFIX));
    }
    while remaining > 0 {
        let n = remaining.min(CHUNK);
        chunks.push(filler.slice(..n));
        remaining -= n;
    }
    if framed {
        chunks.push(Bytes::from_static(SUFFIX));
    }
    let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>));
    let mut res = Response::new(Body::from_stream(stream));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

// -------------------------------------------------------------------------------------------------
// Handler
// -------------------------------------------------------------------------------------------------

enum Reply {
    Respond(Response),
    Reset,
}

async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    Extension(killer): Extension<ConnectionKiller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = parse_request(&headers, &body);
    let fault = shared.next_fault();
    let seq = shared.record_arrival(&req, fault.clone());
    let family = req
        .params
        .get("refresh_token")
        .and_then(|rt| shared.family_of(rt));
    let guard = shared.enter(req.presented_client_id().as_deref(), family);

    if fault == Some(Fault::ResetBeforeProcessing) {
        shared.record_outcome(seq, fault_outcome(None));
        drop(guard);
        return killer.kill().await;
    }
    // Processing runs detached so that a client disconnect cannot cancel it halfway.
    let task: JoinHandle<Reply> = tokio::spawn(run_request(shared, req, fault, seq, guard));
    match task.await {
        Ok(Reply::Respond(res)) => res,
        Ok(Reply::Reset) => killer.kill().await,
        Err(_) => {
            let mut res = Response::new(Body::empty());
            *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            res
        }
    }
}

async fn run_request(
    shared: Arc<Shared>,
    req: ParsedRequest,
    fault: Option<Fault>,
    seq: u64,
    _guard: InFlightGuard,
) -> Reply {
    // Faults that answer without processing.
    match &fault {
        Some(Fault::Status {
            code,
            retry_after,
            body,
        }) => {
            let res = status_fault_response(*code, retry_after.as_ref(), body);
            shared.record_outcome(seq, fault_outcome(Some(res.status().as_u16())));
            return Reply::Respond(res);
        }
        Some(Fault::Redirect { location }) => {
            shared.record_outcome(seq, fault_outcome(Some(302)));
            return Reply::Respond(redirect_response(location));
        }
        Some(Fault::HugeBody { bytes }) => {
            shared.record_outcome(seq, fault_outcome(Some(200)));
            return Reply::Respond(huge_body_response(*bytes));
        }
        Some(Fault::BrokenJson {
            after_commit: false,
        }) => {
            shared.record_outcome(seq, fault_outcome(Some(200)));
            let fake = success_body(&random_token(), Duration::from_secs(3600));
            return Reply::Respond(json_response(
                StatusCode::OK,
                truncated(serialize(&fake)),
                false,
            ));
        }
        Some(Fault::SlowReply {
            delay,
            after_commit: false,
        }) => tokio::time::sleep(*delay).await,
        _ => {}
    }

    let mut p = shared.process(&req);
    let ok = p.status == StatusCode::OK;
    match &fault {
        Some(Fault::ResetAfterCommit) => {
            shared.record_outcome(seq, p.outcome(None));
            return Reply::Reset;
        }
        Some(Fault::StripRefreshToken) if ok => {
            p.body.remove("refresh_token");
        }
        Some(Fault::StripAccessToken { .. }) if ok => {
            p.body.remove("access_token");
        }
        Some(Fault::StripExpiresIn) if ok => {
            p.body.remove("expires_in");
        }
        Some(Fault::StringExpiresIn) if ok => {
            if let Some(v) = p.body.get_mut("expires_in") {
                *v = Value::String(v.to_string());
            }
        }
        _ => {}
    }
    shared.record_outcome(seq, p.outcome(Some(p.status.as_u16())));
    if let Some(Fault::SlowReply {
        delay,
        after_commit: true,
    })
    | Some(Fault::StripAccessToken { hold: delay }) = &fault
    {
        tokio::time::sleep(*delay).await;
    }
    let mut bytes = serialize(&p.body);
    match &fault {
        Some(Fault::BrokenJson { after_commit: true }) => bytes = truncated(bytes),
        Some(Fault::InvalidUtf8) if ok => bytes = invalid_utf8_access_token(bytes),
        Some(Fault::DuplicateField { field, decoy }) if ok => {
            bytes = with_leading_member(bytes, field, decoy);
        }
        Some(Fault::RawField { field, raw }) if ok => {
            p.body.remove(field);
            bytes = with_trailing_member(serialize(&p.body), field, raw);
        }
        Some(Fault::SlowLoris { interval }) => {
            let mut res = json_response(p.status, Vec::new(), p.www_authenticate);
            *res.body_mut() = trickled(bytes, *interval);
            return Reply::Respond(res);
        }
        _ => {}
    }
    Reply::Respond(json_response(p.status, bytes, p.www_authenticate))
}

/// `"name":` as serialized JSON.
fn member_key(field: &str) -> Vec<u8> {
    let mut key = serde_json::to_vec(field).unwrap_or_default();
    key.push(b':');
    key
}

/// 0xff 0xfe inserted at the start of the `access_token` string value.
fn invalid_utf8_access_token(mut bytes: Vec<u8>) -> Vec<u8> {
    let mut key = member_key("access_token");
    key.push(b'"');
    if let Some(at) = bytes.windows(key.len()).position(|w| w == key.as_slice()) {
        let value = at + key.len();
        bytes.splice(value..value, [0xff, 0xfe]);
    }
    bytes
}

/// `{"field":raw,...}`: a member before the others (serialized objects start with `{`).
fn with_leading_member(bytes: Vec<u8>, field: &str, raw: &str) -> Vec<u8> {
    let mut out = b"{".to_vec();
    out.extend(member_key(field));
    out.extend_from_slice(raw.as_bytes());
    if bytes.len() > 2 {
        out.push(b',');
    }
    out.extend_from_slice(&bytes[1..]);
    out
}

/// `{...,"field":raw}`: a member after the others (serialized objects end with `}`).
fn with_trailing_member(mut bytes: Vec<u8>, field: &str, raw: &str) -> Vec<u8> {
    bytes.pop();
    if bytes.len() > 1 {
        bytes.push(b',');
    }
    bytes.extend(member_key(field));
    bytes.extend_from_slice(raw.as_bytes());
    bytes.push(b'}');
    bytes
}

/// The body one byte per `interval`, the first at once.
fn trickled(bytes: Vec<u8>, interval: Duration) -> Body {
    let stream = futures::stream::unfold((bytes, 0usize), move |(bytes, i)| async move {
        let b = *bytes.get(i)?;
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from(vec![b])), (bytes, i + 1)))
    });
    Body::from_stream(stream)
}

// -------------------------------------------------------------------------------------------------
// Server
// -------------------------------------------------------------------------------------------------

/// The running token server. Dropping it stops the server and closes all its connections.
pub struct TokenServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TokenServer {
    /// Bind `127.0.0.1:0` and start serving. Must be called inside a tokio runtime.
    pub async fn start(config: TokenServerConfig) -> std::io::Result<TokenServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            tokens: Mutex::new(Tokens {
                config,
                ..Tokens::default()
            }),
            ..Shared::default()
        });
        let router = Router::new()
            .route(TOKEN_PATH, post(token_endpoint))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(accept_loop(listener, router, "token server"));
        Ok(TokenServer { shared, addr, task })
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `{url}/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}{}", self.addr, TOKEN_PATH)
    }

    // ---- configuration -------------------------------------------------------------------------

    /// Snapshot of the current configuration.
    pub fn config(&self) -> TokenServerConfig {
        lock(&self.shared.tokens).config.clone()
    }

    fn with_config(&self, f: impl FnOnce(&mut TokenServerConfig)) {
        f(&mut lock(&self.shared.tokens).config);
    }

    /// Register (or replace) a client.
    pub fn add_client(&self, client_id: impl Into<String>, client_secret: impl Into<String>) {
        let (id, secret) = (client_id.into(), client_secret.into());
        self.with_config(|c| {
            c.clients.insert(id, secret);
        });
    }

    /// Unregister a client.
    pub fn remove_client(&self, client_id: &str) {
        self.with_config(|c| {
            c.clients.remove(client_id);
        });
    }

    pub fn set_rotation(&self, rotate: bool) {
        self.with_config(|c| c.rotate_refresh_tokens = rotate);
    }

    pub fn set_ttl(&self, ttl: Duration) {
        self.with_config(|c| c.access_token_ttl = ttl);
    }

    pub fn set_overlap(&self, window: Option<Duration>) {
        self.with_config(|c| c.overlap_window = window);
    }

    pub fn set_reuse_detection(&self, on: bool) {
        self.with_config(|c| c.reuse_detection = on);
    }

    pub fn set_echo_refresh_token_when_not_rotating(&self, on: bool) {
        self.with_config(|c| c.echo_refresh_token_when_not_rotating = on);
    }

    // ---- faults --------------------------------------------------------------------------------

    /// Queue a one-shot fault; queued faults are consumed FIFO, one per token request, and take
    /// precedence over the sticky fault.
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.shared.faults).queue.push_back(fault);
    }

    /// Fault applied to every token request while no one-shot fault is queued.
    pub fn set_sticky_fault(&self, fault: Option<Fault>) {
        lock(&self.shared.faults).sticky = fault;
    }

    /// Number of queued one-shot faults not yet consumed.
    pub fn pending_faults(&self) -> usize {
        lock(&self.shared.faults).queue.len()
    }

    /// Drop all queued one-shot faults and the sticky fault.
    pub fn clear_faults(&self) {
        let mut f = lock(&self.shared.faults);
        f.queue.clear();
        f.sticky = None;
    }

    // ---- refresh tokens ------------------------------------------------------------------------

    /// Create a new refresh token family for `client_id` and return its first refresh token.
    pub fn mint_refresh_token(&self, client_id: &str) -> String {
        lock(&self.shared.tokens).new_family(client_id)
    }

    /// Whether `refresh_token` is the live token of a non-revoked family.
    pub fn is_refresh_token_live(&self, refresh_token: &str) -> bool {
        self.refresh_token_state(refresh_token) == RefreshTokenState::Live
    }

    pub fn refresh_token_state(&self, refresh_token: &str) -> RefreshTokenState {
        lock(&self.shared.tokens).state_of(refresh_token)
    }

    /// The live refresh token of the family `refresh_token` belongs to (`None` if unknown or revoked).
    pub fn live_refresh_token_of_family(&self, refresh_token: &str) -> Option<String> {
        let t = lock(&self.shared.tokens);
        let f = t.families.get(t.refresh_tokens.get(refresh_token)?)?;
        (!f.revoked).then(|| f.live.clone())
    }

    /// Revoke the family `refresh_token` belongs to (and the access tokens issued from it), as a
    /// revocation endpoint would. Not counted in [`TokenServer::revocations`]. Returns whether a
    /// live family was revoked.
    pub fn revoke_family_of(&self, refresh_token: &str) -> bool {
        let mut t = lock(&self.shared.tokens);
        let Some(&fid) = t.refresh_tokens.get(refresh_token) else {
            return false;
        };
        match t.families.get_mut(&fid) {
            Some(f) if !f.revoked => {
                f.revoked = true;
                true
            }
            _ => false,
        }
    }

    /// Families revoked by reuse detection (oidc-provider's `grant.revoked`). Should stay 0 in every
    /// non-adversarial test.
    pub fn revocations(&self) -> u64 {
        lock(&self.shared.tokens).revocations
    }

    // ---- access tokens -------------------------------------------------------------------------

    /// Expiry of an access token issued by this server (regardless of revocation).
    pub fn access_token_expiry(&self, access_token: &str) -> Option<SystemTime> {
        lock(&self.shared.tokens)
            .access_tokens
            .get(access_token)
            .map(|r| r.expires_at)
    }

    /// Issued here, not expired, and its refresh token family (if any) not revoked.
    pub fn is_access_token_valid(&self, access_token: &str) -> bool {
        let t = lock(&self.shared.tokens);
        let Some(r) = t.access_tokens.get(access_token) else {
            return false;
        };
        let family_ok = r
            .family
            .is_none_or(|f| t.families.get(&f).is_some_and(|f| !f.revoked));
        family_ok && SystemTime::now() < r.expires_at
    }

    // ---- recording -----------------------------------------------------------------------------

    /// Every token request since the start (or the last `reset_calls`), in arrival order.
    /// Calls still being processed have `outcome: None`.
    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.shared.log).calls.clone()
    }

    /// `calls().len()` without the copy.
    pub fn call_count(&self) -> usize {
        lock(&self.shared.log).calls.len()
    }

    /// Forget recorded calls and reset the concurrency maxima to the current in-flight counts.
    /// Tokens, families, faults and `revocations()` are kept.
    pub fn reset_calls(&self) {
        lock(&self.shared.log).calls.clear();
        let mut c = lock(&self.shared.concurrency);
        c.max_per_client = c.per_client.clone();
        c.max_any_client = c.per_client.values().copied().max().unwrap_or(0);
        c.max_per_family = c.per_family.values().copied().max().unwrap_or(0);
        c.max_in_flight = c.in_flight;
    }

    /// The call log as a [`ProviderRecord`] for the provider-side invariants: tokens as
    /// fingerprints, every reuse-detection revocation tied to the call that caused it. A log
    /// that `reset_calls` shortened, or revocations the log does not account for, are recorded
    /// as gaps (the invariants cannot be checked on a partial log).
    pub fn provider_record(&self) -> ProviderRecord {
        let (calls, arrived) = {
            let log = lock(&self.shared.log);
            (log.calls.clone(), log.next_seq)
        };
        let mut record = ProviderRecord {
            provider: format!("token server {}", self.addr),
            ..ProviderRecord::default()
        };
        // Sequence numbers are dense and only `reset_calls` removes calls.
        if arrived != calls.len() as u64 {
            record
                .gaps
                .push("reset_calls() dropped the start of the call log".to_owned());
        }
        for c in calls {
            let o = c.outcome.as_ref();
            let answer = match (o, o.and_then(|o| o.event)) {
                (None, _) => Answer::Pending,
                (Some(_), None) => Answer::NotProcessed,
                (
                    Some(_),
                    Some(GrantEvent::Issued | GrantEvent::Rotated | GrantEvent::NotRotated),
                ) => Answer::Issued,
                (Some(_), Some(GrantEvent::OverlapReissued)) => Answer::OverlapReuse,
                (Some(_), Some(GrantEvent::ReuseDetected)) => {
                    Answer::SpentRefused { revoked: true }
                }
                (Some(_), Some(GrantEvent::SpentRejected)) => {
                    Answer::SpentRefused { revoked: false }
                }
                (Some(_), Some(e)) => Answer::Refused(format!("invalid_grant ({e:?})")),
            };
            if answer == (Answer::SpentRefused { revoked: true }) {
                record.revocations.push(ProviderRevocation {
                    family: None,
                    at: o.map_or(c.at, |o| o.decided_at),
                    by_call: Some(c.seq),
                });
            }
            let presented = c.refresh_token.as_deref().map(fingerprint);
            let issued = o
                .and_then(|o| o.refresh_token.as_deref())
                .map(fingerprint)
                .filter(|i| Some(i) != presented.as_ref());
            record.calls.push(ProviderCall {
                seq: c.seq,
                at: c.at,
                decided_at: o.map(|o| o.decided_at),
                client_id: c.client_id.clone(),
                grant_type: c.grant_type.clone(),
                withheld: matches!(c.fault, Some(Fault::StripRefreshToken))
                    && o.and_then(|o| o.status) == Some(200)
                    && issued.is_some(),
                issued,
                presented,
                family: None,
                status: o.and_then(|o| o.status),
                answer,
                fault: c.fault.as_ref().map(|f| format!("{f:?}")),
            });
        }
        let logged = record.revocations.len() as u64;
        let counted = self.revocations();
        if counted != logged {
            record.gaps.push(format!(
                "the server revoked {counted} famil(ies) by reuse detection, the call log shows {logged}"
            ));
        }
        record
    }

    /// Requests currently being processed.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.concurrency).in_flight
    }

    /// Highest number of simultaneous requests seen (all clients).
    pub fn max_in_flight(&self) -> usize {
        lock(&self.shared.concurrency).max_in_flight
    }

    /// Highest number of simultaneous requests from any single client id.
    pub fn max_concurrent_per_client(&self) -> usize {
        lock(&self.shared.concurrency).max_any_client
    }

    /// Highest number of simultaneous requests from `client_id`.
    pub fn max_concurrent_for_client(&self, client_id: &str) -> usize {
        lock(&self.shared.concurrency)
            .max_per_client
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }

    /// Highest number of simultaneous refresh requests presenting tokens of any single family
    /// ("max simultaneous refreshes of one connection").
    pub fn max_concurrent_per_refresh_family(&self) -> usize {
        lock(&self.shared.concurrency).max_per_family
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_urldecode_is_strict() {
        assert_eq!(form_urldecode("m2m+special%2F1").unwrap(), "m2m special/1");
        assert_eq!(form_urldecode("s3cr%3Aet%2B%25").unwrap(), "s3cr:et+%");
        assert!(form_urldecode("s3cr:et+%").is_err());
        assert!(form_urldecode("%4").is_err());
        assert!(form_urldecode("%zz").is_err());
        assert!(form_urldecode("%+1").is_err());
    }

    #[test]
    fn body_surgery_produces_the_bytes_a_broken_server_sends() {
        let body = br#"{"access_token":"at","expires_in":3600}"#.to_vec();
        assert_eq!(
            invalid_utf8_access_token(body.clone()),
            b"{\"access_token\":\"\xff\xfeat\",\"expires_in\":3600}".to_vec()
        );
        assert_eq!(
            with_leading_member(body.clone(), "access_token", "\"decoy\""),
            br#"{"access_token":"decoy","access_token":"at","expires_in":3600}"#.to_vec()
        );
        assert_eq!(
            with_trailing_member(br#"{"access_token":"at"}"#.to_vec(), "expires_in", "1e400"),
            br#"{"access_token":"at","expires_in":1e400}"#.to_vec()
        );
        assert_eq!(
            with_trailing_member(b"{}".to_vec(), "expires_in", "-1"),
            br#"{"expires_in":-1}"#.to_vec()
        );
    }
}
