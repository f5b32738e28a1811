//! A fault-injecting reverse proxy in front of the real kube-apiserver, for tests.
//!
//! The real API server cannot be told to fail one specific write on demand (a 409 on the
//! state Secret right after a token refresh, a 503 outage of Secret writes, APF throttling).
//! [`ApiFaultProxy`] sits between the operator and the API server: the operator's kubeconfig
//! ([`ApiFaultProxy::write_kubeconfig`]) points at the proxy, which forwards every request
//! unchanged and injects a fault only on the requests a test chose with a [`FaultRule`].
//!
//! - Listens on `http://127.0.0.1:<random port>` (plain HTTP; kube-rs accepts `http://`
//!   servers) and forwards to the upstream `https://` API server, whose self-signed
//!   certificate is accepted without verification (test clusters only).
//! - Forwards method, path and query, headers (`Authorization` included; hop-by-hop headers
//!   and `Host` dropped) and the body; returns the upstream status, headers and body. Response
//!   bodies are streamed chunk by chunk, so `?watch=true` streams stay live. Redirects are
//!   returned to the client, not followed.
//! - A matching rule answers with its status and a Kubernetes `Status` body (`"message":
//!   "injected by test"`) *without* forwarding the request, so nothing reaches the API server.
//! - A *hold* rule ([`FaultRule::hold_response`]) does the opposite: it forwards the request,
//!   so the write is committed, and then holds the API server's answer back for a while. The
//!   client is left not knowing its write landed: a test kills it during the hold
//!   ([`ApiFaultProxy::wait_held`] says when) to crash it right after a chosen write.
//! - Rules can also match on the request body ([`FaultRule::body_contains`],
//!   [`FaultRule::body_lacks`]), to tell apart two writes to the same object.
//! - Network faults: [`FaultRule::drop_connection`] closes the connection with an RST and
//!   no response, before forwarding (nothing is committed) or, with
//!   [`FaultRule::drop_after_commit`], after the API server answered (committed, but the client
//!   sees only a connection error). [`FaultRule::stall`] forwards nothing and answers nothing
//!   for a while, then resets: a request that times out on the client's side.
//! - A *lag* rule ([`FaultRule::lag_watch`]) delivers every chunk of a watch stream a fixed
//!   time after the API server sent it: a client whose cache lags behind the stored objects,
//!   as on a loaded API server. It applies to watches started while it is active.
//! - 429 and 503 answers carry `Retry-After` (1 s unless [`FaultRule::retry_after`] says
//!   otherwise), like the API server's priority-and-fairness rejections.
//! - Every request is recorded ([`RecordedRequest`]) with the status returned and whether it
//!   was injected or held.
//!
//! The proxy runs on its own thread with its own tokio runtime, so it outlives the runtime of
//! the test that started it (each `#[tokio::test]` has its own runtime, while one proxy and
//! one operator usually serve a whole test binary). Dropping the [`ApiFaultProxy`] stops it.
//!
//! Rules are matched in the order they were added; the first active match applies. Tests that
//! share one proxy should match namespace-specific paths (e.g.
//! `/api/v1/namespaces/<ns>/secrets/<name>`) so they do not disturb each other. Note that a
//! *create* is a `POST` to the collection (`/api/v1/namespaces/<ns>/secrets`): its path does
//! not contain the object's name. Paths are matched by substring, so `/secrets/a` also matches
//! `/secrets/a-vaultconn-state`: pick names where neither is a prefix of the other.
//!
//! The request log grows without bound: the proxy is meant for test runs, not long-lived use.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::Response;
use axum::Extension;
use axum::Router;
use futures::TryStreamExt as _;
use tokio::sync::{oneshot, Notify};

use crate::resettable::{accept_loop, ConnectionKiller};

/// Largest request body forwarded (the API server's own limit is 3 MiB for most objects).
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

/// Which request methods a [`FaultRule`] (or [`ApiFaultProxy::count`]) matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MethodMatch {
    /// Every method.
    Any,
    /// `POST`, `PUT`, `PATCH` and `DELETE`: the requests that change objects.
    AnyWrite,
    /// Exactly this method.
    Only(Method),
}

impl MethodMatch {
    /// Whether `m` is matched.
    pub fn matches(&self, m: &Method) -> bool {
        match self {
            MethodMatch::Any => true,
            MethodMatch::AnyWrite => {
                [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(m)
            }
            MethodMatch::Only(only) => only == m,
        }
    }
}

impl From<Method> for MethodMatch {
    fn from(m: Method) -> Self {
        MethodMatch::Only(m)
    }
}

/// The next `times` requests whose method matches `method`, whose path contains
/// `path_contains` (and whose body matches, if the rule says so) are answered with `status`
/// and a Kubernetes `Status` body, without being forwarded; or, for a hold rule, forwarded
/// and their response held back for `hold_response`. `times` is ignored by
/// [`ApiFaultProxy::fail_until_cleared`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    pub method: MethodMatch,
    /// Substring of the request path (the query string is not part of it).
    pub path_contains: String,
    /// HTTP status to answer with, e.g. 409, 429, 500, 503. An invalid code answers 500.
    /// Not used by a hold rule (the API server's own status is returned).
    pub status: u16,
    pub times: usize,
    /// Forward the request, then hold the API server's response this long before returning
    /// it (see [`FaultRule::hold_response`]).
    pub hold_response: Option<Duration>,
    /// Forward the request and deliver each chunk of its response this long after the API
    /// server sent it (see [`FaultRule::lag_watch`]). Only `watch` requests match such a rule.
    pub lag_stream: Option<Duration>,
    /// Match only requests whose query string contains this, e.g. `limit=500` for a
    /// watcher's list rather than a one-item probe of the same path.
    pub query_contains: Option<String>,
    /// Match only requests whose body contains these bytes.
    pub body_contains: Option<String>,
    /// Match only requests whose body does not contain these bytes.
    pub body_lacks: Option<String>,
    /// Whether dry runs (`dryRun` in the query) match. True for answering rules (a refused
    /// dry run is a fault worth injecting); false for hold rules, since a dry run commits
    /// nothing and holding its answer would model no crash point.
    pub dry_runs: bool,
    /// A network fault instead of an HTTP answer (see [`NetFault`]).
    pub net: Option<NetFault>,
    /// `Retry-After` seconds of a 429/503 answer (default 1).
    pub retry_after_secs: Option<u64>,
}

/// A fault below HTTP: the client gets no status at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetFault {
    /// Close the connection (RST) without forwarding the request: nothing is committed.
    Reset,
    /// Forward the request, then close the connection (RST) instead of returning the API
    /// server's answer: the write is committed, the client only sees a connection error.
    ResetAfterCommit,
    /// Forward nothing and answer nothing for this long, then close the connection (RST): a
    /// request that times out on the client's side unless its own timeout is longer.
    Stall(Duration),
}

impl FaultRule {
    /// Fail the next write (`POST`/`PUT`/`PATCH`/`DELETE`) to a path containing
    /// `path_contains` with `status`; see [`FaultRule::times`] for more than one.
    pub fn writes(path_contains: impl Into<String>, status: u16) -> Self {
        Self::requests(MethodMatch::AnyWrite, path_contains, status)
    }

    /// Fail the next request of `method` to a path containing `path_contains` with `status`.
    pub fn requests(
        method: impl Into<MethodMatch>,
        path_contains: impl Into<String>,
        status: u16,
    ) -> Self {
        FaultRule {
            method: method.into(),
            path_contains: path_contains.into(),
            status,
            times: 1,
            hold_response: None,
            lag_stream: None,
            query_contains: None,
            body_contains: None,
            body_lacks: None,
            dry_runs: true,
            net: None,
            retry_after_secs: None,
        }
    }

    /// Close the connection (RST) of the next request of `method` to a path containing
    /// `path_contains`, without forwarding it: the client sees a connection error, the API
    /// server sees nothing.
    pub fn drop_connection(
        path_contains: impl Into<String>,
        method: impl Into<MethodMatch>,
    ) -> Self {
        FaultRule {
            net: Some(NetFault::Reset),
            ..Self::requests(method, path_contains, 0)
        }
    }

    /// Forward the next matching request (so a write is committed), then close the connection
    /// (RST) instead of returning the answer. Dry runs are not matched (they commit nothing).
    pub fn drop_after_commit(
        path_contains: impl Into<String>,
        method: impl Into<MethodMatch>,
    ) -> Self {
        FaultRule {
            net: Some(NetFault::ResetAfterCommit),
            dry_runs: false,
            ..Self::requests(method, path_contains, 0)
        }
    }

    /// Hold the next matching request for `stall` without forwarding or answering it, then
    /// close the connection (RST): a timeout as the client sees it, and nothing committed.
    pub fn stall(
        path_contains: impl Into<String>,
        method: impl Into<MethodMatch>,
        stall: Duration,
    ) -> Self {
        FaultRule {
            net: Some(NetFault::Stall(stall)),
            ..Self::requests(method, path_contains, 0)
        }
    }

    /// `Retry-After: secs` on a 429 or 503 answer (builder style; default 1).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// Forward the next request of `method` to a path containing `path_contains` to the API
    /// server (so it is committed there), then hold the API server's response for `hold`
    /// before returning it: a client killed meanwhile never learns that its write landed.
    /// Dry runs are not matched. [`ApiFaultProxy::wait_held`] waits until the hold begins.
    pub fn hold_response(
        path_contains: impl Into<String>,
        method: impl Into<MethodMatch>,
        hold: Duration,
    ) -> Self {
        FaultRule {
            hold_response: Some(hold),
            dry_runs: false,
            ..Self::requests(method, path_contains, 200)
        }
    }

    /// Forward `watch` requests to a path containing `path_contains` and deliver each event
    /// `lag` after the API server sent it: the client's informer cache lags behind what is
    /// stored, e.g. it reconciles with a status older than its own last write. Use with
    /// [`ApiFaultProxy::fail_until_cleared`]; it applies to watches that start meanwhile.
    pub fn lag_watch(path_contains: impl Into<String>, lag: Duration) -> Self {
        FaultRule {
            lag_stream: Some(lag),
            dry_runs: false,
            ..Self::requests(Method::GET, path_contains, 200)
        }
    }

    /// Apply to the next `n` matching requests (builder style).
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }

    /// Match only requests whose query string contains `needle` (builder style).
    pub fn query_contains(mut self, needle: impl Into<String>) -> Self {
        self.query_contains = Some(needle.into());
        self
    }

    /// Match only requests whose body contains `needle` (builder style), e.g. a data key
    /// that only one of several writes to the same object carries.
    pub fn body_contains(mut self, needle: impl Into<String>) -> Self {
        self.body_contains = Some(needle.into());
        self
    }

    /// Match only requests whose body does not contain `needle` (builder style).
    pub fn body_lacks(mut self, needle: impl Into<String>) -> Self {
        self.body_lacks = Some(needle.into());
        self
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.method.matches(req.method)
            && req.path.contains(&self.path_contains)
            && (self.dry_runs || !req.is_dry_run())
            && (self.lag_stream.is_none() || req.is_watch())
            && self
                .query_contains
                .as_ref()
                .is_none_or(|n| req.query.is_some_and(|q| q.contains(n.as_str())))
            && self
                .body_contains
                .as_ref()
                .is_none_or(|n| contains(req.body, n.as_bytes()))
            && self
                .body_lacks
                .as_ref()
                .is_none_or(|n| !contains(req.body, n.as_bytes()))
    }
}

/// What rules are matched against.
struct RequestView<'a> {
    method: &'a Method,
    path: &'a str,
    query: Option<&'a str>,
    body: &'a [u8],
}

impl RequestView<'_> {
    fn is_dry_run(&self) -> bool {
        self.query
            .is_some_and(|q| url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "dryRun"))
    }

    fn is_watch(&self) -> bool {
        self.query.is_some_and(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .any(|(k, v)| k == "watch" && (v == "true" || v == "1"))
        })
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// What a matching rule does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Status and `Retry-After` seconds (for 429/503).
    Answer(u16, u64),
    Hold(Duration),
    Lag(Duration),
    Net(NetFault),
}

/// Identifies a rule added with [`ApiFaultProxy::fail`] or [`ApiFaultProxy::fail_until_cleared`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(u64);

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule#{}", self.0)
    }
}

/// One request the proxy answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Arrival order, starting at 0.
    pub seq: u64,
    pub at: SystemTime,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// Status returned to the client: injected, upstream's, or 502 when upstream failed. For
    /// a dropped connection: 0 if nothing was forwarded, else the API server's status that
    /// the client never saw.
    pub status: u16,
    /// Answered by a rule without being forwarded.
    pub injected: bool,
    /// Forwarded, and its response then held back by `rule`.
    pub held: bool,
    /// The connection was closed (RST) instead of answering ([`NetFault`]).
    pub dropped: bool,
    /// The rule that answered, held or dropped it.
    pub rule: Option<RuleId>,
}

impl RecordedRequest {
    /// A 2xx status: the API server accepted it (for a request dropped after the commit, the
    /// client never learned that).
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

struct ActiveRule {
    id: RuleId,
    rule: FaultRule,
    /// Injections left; `None` until cleared.
    remaining: Option<usize>,
}

#[derive(Default)]
struct Rules {
    next_id: u64,
    active: Vec<ActiveRule>,
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    rules: Mutex<Rules>,
    log: Mutex<Vec<RecordedRequest>>,
    next_seq: AtomicU64,
    /// Woken whenever a hold begins (works across runtimes: the proxy has its own).
    hold_started: Notify,
}

/// Lock ignoring poisoning: every update of the protected data is a single step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn add_rule(&self, rule: FaultRule, remaining: Option<usize>) -> RuleId {
        let mut rules = lock(&self.rules);
        let id = RuleId(rules.next_id);
        rules.next_id += 1;
        if remaining != Some(0) {
            rules.active.push(ActiveRule {
                id,
                rule,
                remaining,
            });
        }
        id
    }

    /// The first active rule matching, consuming one of its uses.
    fn take_fault(&self, req: &RequestView<'_>) -> Option<(RuleId, Action)> {
        let mut rules = lock(&self.rules);
        let idx = rules.active.iter().position(|r| r.rule.matches(req))?;
        let r = &mut rules.active[idx];
        let action = match (r.rule.net, r.rule.hold_response, r.rule.lag_stream) {
            (Some(net), _, _) => Action::Net(net),
            (None, Some(d), _) => Action::Hold(d),
            (None, None, Some(d)) => Action::Lag(d),
            (None, None, None) => {
                Action::Answer(r.rule.status, r.rule.retry_after_secs.unwrap_or(1))
            }
        };
        let hit = (r.id, action);
        if let Some(n) = r.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                rules.active.remove(idx);
            }
        }
        Some(hit)
    }

    fn record(&self, req: &RequestView<'_>, status: u16, by: By) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (rule, injected, held, dropped) = match by {
            By::Upstream => (None, false, false, false),
            By::Injected(id) => (Some(id), true, false, false),
            By::Held(id) => (Some(id), false, true, false),
            By::Dropped { rule, forwarded } => (Some(rule), !forwarded, false, true),
        };
        let rec = RecordedRequest {
            seq,
            at: SystemTime::now(),
            method: req.method.clone(),
            path: req.path.to_string(),
            query: req.query.map(str::to_string),
            status,
            injected,
            held,
            dropped,
            rule,
        };
        let mut log = lock(&self.log);
        // Keep arrival order even if two handlers record out of order.
        let pos = log.partition_point(|r| r.seq < seq);
        log.insert(pos, rec);
    }
}

/// Who produced the response to a recorded request.
#[derive(Clone, Copy)]
enum By {
    Upstream,
    Injected(RuleId),
    Held(RuleId),
    Dropped { rule: RuleId, forwarded: bool },
}

/// A running fault-injecting proxy; see the module documentation.
pub struct ApiFaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl ApiFaultProxy {
    /// Start a proxy on `127.0.0.1:<random port>` forwarding to `upstream` (e.g. the test
    /// control plane's `https://127.0.0.1:6443`). Blocks briefly until it listens; may be
    /// called from inside or outside a tokio runtime.
    pub fn start(upstream: &str) -> io::Result<Self> {
        let upstream_url = url::Url::parse(upstream)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{upstream}: {e}")))?;
        if !matches!(upstream_url.scheme(), "http" | "https") || upstream_url.host().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{upstream}: not an http(s) URL"),
            ));
        }
        vaultconn_local_cluster::install_crypto_provider();
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tls_danger_accept_invalid_certs(true)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(io::Error::other)?;
        let listener = StdTcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            client,
            rules: Mutex::default(),
            log: Mutex::default(),
            next_seq: AtomicU64::new(0),
            hold_started: Notify::new(),
        });
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let state = shared.clone();
        std::thread::Builder::new()
            .name(format!("api-fault-proxy-{}", addr.port()))
            .spawn(move || serve_thread(listener, state, shutdown_rx, ready_tx))?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the proxy thread ended during start-up"))??;
        Ok(ApiFaultProxy {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The upstream API server URL.
    pub fn upstream(&self) -> &str {
        &self.shared.upstream
    }

    /// Write a kubeconfig that points at the proxy and authenticates with the bearer `token`
    /// (which the proxy forwards to the API server).
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> io::Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: api-fault-proxy
  cluster:
    server: {server}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: api-fault-proxy
  context:
    cluster: api-fault-proxy
    user: admin
    namespace: default
current-context: api-fault-proxy
",
            server = self.url(),
        );
        std::fs::write(path, kubeconfig)
    }

    /// Answer the next `rule.times` matching requests with `rule.status` instead of
    /// forwarding them (a hold rule: forward them and hold their responses). The rule goes
    /// away once used up (or on [`ApiFaultProxy::clear`]).
    pub fn fail(&self, rule: FaultRule) -> RuleId {
        let times = rule.times;
        self.shared.add_rule(rule, Some(times))
    }

    /// Answer every matching request with `rule.status` until [`ApiFaultProxy::clear`] is
    /// called with the returned id (`rule.times` is ignored): an outage.
    pub fn fail_until_cleared(&self, rule: FaultRule) -> RuleId {
        self.shared.add_rule(rule, None)
    }

    /// Remove a rule; returns whether it was still active.
    pub fn clear(&self, id: RuleId) -> bool {
        let mut rules = lock(&self.shared.rules);
        let before = rules.active.len();
        rules.active.retain(|r| r.id != id);
        rules.active.len() != before
    }

    /// Remove every rule (including other tests' rules on a shared proxy).
    pub fn clear_all(&self) {
        lock(&self.shared.rules).active.clear();
    }

    /// Whether a rule is still active (not used up, not cleared).
    pub fn is_active(&self, id: RuleId) -> bool {
        lock(&self.shared.rules).active.iter().any(|r| r.id == id)
    }

    /// How many requests `id` answered (or dropped, stalled) without forwarding them.
    pub fn injected(&self, id: RuleId) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.rule == Some(id) && r.injected)
            .count()
    }

    /// How many requests the hold rule `id` forwarded and then held (or holds now): each of
    /// them is committed at the API server.
    ///
    /// Requests a [`FaultRule::drop_after_commit`] rule forwarded are counted by
    /// [`ApiFaultProxy::dropped`].
    pub fn held(&self, id: RuleId) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.rule == Some(id) && r.held)
            .count()
    }

    /// How many connections rule `id` closed instead of answering (forwarded or not).
    pub fn dropped(&self, id: RuleId) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.rule == Some(id) && r.dropped)
            .count()
    }

    /// Wait until the hold rule `id` has held at least one response (the write is then
    /// committed at the API server and its client still waits); false after `timeout`.
    pub async fn wait_held(&self, id: RuleId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a hold starting in between is not missed.
            let started = self.shared.hold_started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            if self.held(id) > 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, started).await.is_err() {
                return self.held(id) > 0;
            }
        }
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.log).clone()
    }

    /// The requests of `method` whose path contains `path_contains`, in arrival order.
    pub fn requests_matching(
        &self,
        method: impl Into<MethodMatch>,
        path_contains: &str,
    ) -> Vec<RecordedRequest> {
        let method = method.into();
        lock(&self.shared.log)
            .iter()
            .filter(|r| method.matches(&r.method) && r.path.contains(path_contains))
            .cloned()
            .collect()
    }

    /// How many requests of `method` had a path containing `path_contains`, injected or not.
    pub fn count(&self, method: impl Into<MethodMatch>, path_contains: &str) -> usize {
        let method = method.into();
        lock(&self.shared.log)
            .iter()
            .filter(|r| method.matches(&r.method) && r.path.contains(path_contains))
            .count()
    }
}

impl fmt::Debug for ApiFaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiFaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiFaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            // The thread drops its runtime, and with it every connection, on this signal.
            let _ = tx.send(());
        }
    }
}

/// The proxy thread: its own runtime, serving until the shutdown signal.
fn serve_thread(
    listener: StdTcpListener,
    shared: Arc<Shared>,
    shutdown: oneshot::Receiver<()>,
    ready: mpsc::Sender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api-fault-proxy-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let app = Router::new().fallback(handle).with_state(shared);
        // Not a graceful shutdown: watch streams never end on their own.
        tokio::select! {
            () = accept_loop(listener, app, "api fault proxy") => {}
            _ = shutdown => {}
        }
    });
    // Dropping the runtime here cancels every in-flight (watch) request.
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `Host`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// `headers` without hop-by-hop headers (and those named in `Connection`), `Host`, and the
/// names in `also_drop`.
fn end_to_end(headers: &HeaderMap, also_drop: &[HeaderName]) -> HeaderMap {
    let named_in_connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || named_in_connection.iter().any(|c| c == n)
            || also_drop.contains(name)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The `reason` of a Kubernetes `Status` for an HTTP status (apimachinery `StatusReason`).
fn status_reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// A Kubernetes `Status` failure response. 429 and 503 carry `Retry-After: retry_after` like
/// the API server's priority-and-fairness rejections.
fn status_response(code: u16, message: &str, retry_after: u64) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = status.as_u16();
    let retry = matches!(code, 429 | 503);
    let mut body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": status_reason(code),
        "code": code,
        "message": message,
    });
    if retry {
        body["details"] = serde_json::json!({"retryAfterSeconds": retry_after});
    }
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if retry {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    }
    resp
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Extension(killer): Extension<ConnectionKiller>,
    req: Request<Body>,
) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method;
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    // Read first: rules may match on the body.
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BODY).await {
        Ok(b) => b,
        Err(e) => {
            let view = RequestView {
                method: &method,
                path: &path,
                query: query.as_deref(),
                body: &[],
            };
            shared.record(&view, 400, By::Upstream);
            return status_response(400, &format!("api fault proxy: reading the body: {e}"), 1);
        }
    };
    let view = RequestView {
        method: &method,
        path: &path,
        query: query.as_deref(),
        body: &body,
    };

    let mut hold = None;
    let mut lag = None;
    let mut drop_after_commit = None;
    match shared.take_fault(&view) {
        Some((rule, Action::Answer(code, retry_after))) => {
            let resp = status_response(code, "injected by test", retry_after);
            shared.record(&view, resp.status().as_u16(), By::Injected(rule));
            return resp;
        }
        Some((rule, Action::Net(NetFault::Reset))) => {
            let by = By::Dropped {
                rule,
                forwarded: false,
            };
            shared.record(&view, 0, by);
            return killer.kill().await;
        }
        Some((rule, Action::Net(NetFault::Stall(d)))) => {
            let by = By::Dropped {
                rule,
                forwarded: false,
            };
            shared.record(&view, 0, by);
            tokio::time::sleep(d).await;
            return killer.kill().await;
        }
        Some((rule, Action::Net(NetFault::ResetAfterCommit))) => drop_after_commit = Some(rule),
        Some((rule, Action::Hold(d))) => hold = Some((rule, d)),
        Some((rule, Action::Lag(d))) => lag = Some((rule, d)),
        None => {}
    }

    let url = match &query {
        Some(q) => format!("{}{path}?{q}", shared.upstream),
        None => format!("{}{path}", shared.upstream),
    };
    let upstream = shared
        .client
        .request(method.clone(), url)
        .headers(end_to_end(&parts.headers, &[header::CONTENT_LENGTH]))
        .body(body.clone())
        .send()
        .await;
    let upstream = match upstream {
        Ok(r) => r,
        Err(e) => {
            shared.record(&view, 502, By::Upstream);
            let message = format!("api fault proxy: upstream request failed: {e}");
            return status_response(502, &message, 1);
        }
    };
    let status = upstream.status();
    if let Some(rule) = drop_after_commit {
        // Read the whole answer first, so the API server has finished with the request.
        let _ = upstream.bytes().await;
        let by = By::Dropped {
            rule,
            forwarded: true,
        };
        shared.record(&view, status.as_u16(), by);
        return killer.kill().await;
    }
    let headers = end_to_end(upstream.headers(), &[]);
    match (hold, lag) {
        (Some((rule, d)), _) => {
            // The API server has answered, so the write is committed; the client waits on.
            shared.record(&view, status.as_u16(), By::Held(rule));
            shared.hold_started.notify_waiters();
            tokio::time::sleep(d).await;
        }
        (None, Some((rule, _))) => shared.record(&view, status.as_u16(), By::Held(rule)),
        (None, None) => shared.record(&view, status.as_u16(), By::Upstream),
    }
    // Streamed as it arrives: a watch response is an endless sequence of chunks.
    let stream = upstream.bytes_stream().map_err(io::Error::other);
    let body = match lag {
        Some((_, d)) => Body::from_stream(lagged(stream, d)),
        None => Body::from_stream(stream),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// `stream`, each item delivered `lag` after it arrived (a constant lag, not one that adds up
/// over a burst of events). A task reads ahead and stamps arrivals; it ends when the client
/// goes away.
fn lagged<S, T>(stream: S, lag: Duration) -> impl futures::Stream<Item = T> + Send + 'static
where
    S: futures::Stream<Item = T> + Send + 'static,
    T: Send + 'static,
{
    use futures::StreamExt as _;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send((tokio::time::Instant::now() + lag, item)).is_err() {
                break;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        let (due, item) = rx.recv().await?;
        tokio::time::sleep_until(due).await;
        Some((item, rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_match() {
        assert!(MethodMatch::AnyWrite.matches(&Method::PUT));
        assert!(MethodMatch::AnyWrite.matches(&Method::POST));
        assert!(!MethodMatch::AnyWrite.matches(&Method::GET));
        assert!(MethodMatch::Any.matches(&Method::GET));
        assert!(MethodMatch::from(Method::PATCH).matches(&Method::PATCH));
        assert!(!MethodMatch::from(Method::PATCH).matches(&Method::PUT));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-foo"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("example"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let out = end_to_end(&h, &[header::CONTENT_LENGTH]);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn a_lag_rule_matches_watches_only() {
        let rule = FaultRule::lag_watch("/vaultconnections", Duration::from_secs(2));
        let view = |query: Option<&'static str>| RequestView {
            method: &Method::GET,
            path: "/apis/vaultconn.dev/v1alpha1/vaultconnections",
            query,
            body: &[],
        };
        assert!(rule.matches(&view(Some("watch=true&resourceVersion=5"))));
        assert!(rule.matches(&view(Some("resourceVersion=5&watch=1"))));
        assert!(!rule.matches(&view(Some("limit=500"))), "a list");
        assert!(!rule.matches(&view(None)), "a get");
    }

    #[tokio::test]
    async fn a_lagged_stream_delivers_each_item_no_sooner_than_the_lag() {
        let lag = Duration::from_millis(300);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::time::Instant>();
        let source =
            futures::stream::unfold(rx, |mut rx| async move { Some((rx.recv().await?, rx)) });
        let mut out = std::pin::pin!(lagged(source, lag));
        for _ in 0..3 {
            tx.send(std::time::Instant::now()).unwrap();
        }
        drop(tx);
        let mut n = 0;
        while let Some(sent) = futures::StreamExt::next(&mut out).await {
            assert!(
                sent.elapsed() >= lag,
                "item {n} came after {:?}",
                sent.elapsed()
            );
            n += 1;
        }
        assert_eq!(
            n, 3,
            "every item is delivered, and the stream ends with its source"
        );
    }

    /// An upstream that counts the requests it answered (200, `{}`).
    async fn counting_upstream() -> (String, Arc<AtomicU64>) {
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        let app = Router::new().fallback(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                "{}"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, hits)
    }

    #[tokio::test]
    async fn network_faults_reset_stall_and_drop_after_commit() {
        let (upstream, hits) = counting_upstream().await;
        let proxy = ApiFaultProxy::start(&upstream).unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = |p: &str| format!("{}{p}", proxy.url());

        // Reset before forwarding: no status, nothing reaches the API server.
        let reset = proxy.fail(FaultRule::drop_connection(
            "/secrets/a",
            MethodMatch::AnyWrite,
        ));
        let err = client
            .put(url("/api/v1/namespaces/n/secrets/a"))
            .send()
            .await;
        assert!(err.is_err(), "a reset connection gave a response: {err:?}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        assert_eq!((proxy.dropped(reset), proxy.injected(reset)), (1, 1));

        // Reset after the commit: the API server answered, the client saw only the reset.
        let commit = proxy.fail(FaultRule::drop_after_commit("/secrets/a", Method::PUT));
        let err = client
            .put(url("/api/v1/namespaces/n/secrets/a"))
            .send()
            .await;
        assert!(err.is_err(), "a dropped answer arrived: {err:?}");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "the request was forwarded once"
        );
        assert_eq!((proxy.dropped(commit), proxy.injected(commit)), (1, 0));
        let rec = proxy.requests().pop().unwrap();
        assert!(rec.dropped && rec.succeeded(), "{rec:?}");

        // Stall: nothing for a while, then a reset; a client with a shorter timeout times out.
        let stall = proxy
            .fail(FaultRule::stall("/secrets/a", Method::GET, Duration::from_millis(600)).times(2));
        let quick = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(150))
            .build()
            .unwrap();
        let err = quick
            .get(url("/api/v1/namespaces/n/secrets/a"))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        let began = std::time::Instant::now();
        let err = client
            .get(url("/api/v1/namespaces/n/secrets/a"))
            .send()
            .await;
        assert!(err.is_err(), "a stalled request got an answer: {err:?}");
        assert!(
            began.elapsed() >= Duration::from_millis(550),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(proxy.dropped(stall), 2);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "a stalled request was forwarded"
        );

        // Rules used up: forwarded normally, also on a fresh connection after the resets.
        let ok = client
            .put(url("/api/v1/namespaces/n/secrets/a"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn retry_after_is_configurable() {
        let proxy = ApiFaultProxy::start("http://127.0.0.1:9").unwrap();
        proxy.fail(FaultRule::writes("/leases/x", 429).retry_after(7));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let r = client
            .put(format!(
                "{}/apis/coordination.k8s.io/v1/namespaces/n/leases/x",
                proxy.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["details"]["retryAfterSeconds"], 7);
    }

    #[tokio::test]
    async fn rules_fail_then_pass_through() {
        // An upstream that is never reached by injected requests and refuses the others.
        let proxy = ApiFaultProxy::start("http://127.0.0.1:9").unwrap();
        let once = proxy.fail(FaultRule::writes("/secrets/a", 409).times(2));
        let sticky = proxy.fail_until_cleared(FaultRule::requests(Method::GET, "/b", 503));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = |p: &str| format!("{}{p}", proxy.url());
        for _ in 0..2 {
            let r = client
                .put(url("/api/v1/namespaces/n/secrets/a"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 409);
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["kind"], "Status");
            assert_eq!(v["reason"], "Conflict");
            assert_eq!(v["code"], 409);
            assert_eq!(v["message"], "injected by test");
        }
        assert!(!proxy.is_active(once));
        // Used up: forwarded to the (closed) upstream now.
        let r = client
            .put(url("/api/v1/namespaces/n/secrets/a"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        for _ in 0..3 {
            let r = client.get(url("/b?watch=true")).send().await.unwrap();
            assert_eq!(r.status(), 503);
            assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        }
        assert!(proxy.clear(sticky));
        let r = client.get(url("/b")).send().await.unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(proxy.injected(once), 2);
        assert_eq!(proxy.injected(sticky), 3);
        assert_eq!(proxy.count(Method::PUT, "/secrets/a"), 3);
        assert_eq!(proxy.count(MethodMatch::Any, "/b"), 4);
        let reqs = proxy.requests();
        assert_eq!(reqs.len(), 7);
        assert!(reqs.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(reqs[2].query, None);
        assert_eq!(reqs[3].query.as_deref(), Some("watch=true"));
        assert!(!reqs[2].injected && reqs[3].injected);
    }
}
