//! The reconcile loop: `VaultConnection` → generated Secret + status.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tracing::{debug, info, warn};

use crate::api::{Phase, VaultConnection, VaultConnectionStatus};
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::http::Health;
use crate::leader::LeaderGate;
use crate::names::*;
use crate::oauth::refresh::OAuthEngine;
use crate::oauth::token::{TokenClientConfig, TokenUrlPolicy};
use crate::reason::Reason;
use crate::secret::{self, Inputs};
use crate::status::{self, Outcome};
use crate::sync::lock;
use crate::validation::{self, ValidationOptions};
use crate::writer::{SecretWrite, SecretWriter};

/// Operator settings the reconcile loop needs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub allow_http_loopback: bool,
    /// Events' `reportingInstance` (the pod name in a cluster).
    pub instance: Option<String>,
    /// Maximum reconciles in flight (0 = unbounded).
    pub concurrency: u16,
    /// Total time limit of one token request.
    pub token_request_timeout: Duration,
    /// Namespaces to watch; `None` = all (one cluster-wide watch per kind).
    pub namespaces: Option<Vec<String>>,
    /// Bound of the shutdown flush of pending token writes.
    pub shutdown_timeout: Duration,
    /// This process's name in the Lease and in in-flight marks (unique per process).
    pub identity: String,
    /// Private-network token hosts that may be contacted (`--token-url-allow`).
    pub token_url_policy: TokenUrlPolicy,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            allow_http_loopback: false,
            instance: None,
            concurrency: 32,
            token_request_timeout: Duration::from_secs(15),
            namespaces: None,
            shutdown_timeout: Duration::from_secs(20),
            identity: format!("vaultconn_{}", std::process::id()),
            token_url_policy: TokenUrlPolicy::default(),
        }
    }
}

/// Everything a reconcile needs, shared by all reconciles: the controller's own bundle. The
/// OAuth engine gets only the writer, never the whole context.
pub struct Context {
    pub config: ControllerConfig,
    pub writer: SecretWriter,
    pub oauth: OAuthEngine,
    /// Status this process last wrote per connection (the reflector may lag behind our own
    /// writes; comparing with both keeps a no-op reconcile from writing).
    last_status: Mutex<HashMap<Key, VaultConnectionStatus>>,
    /// Consecutive reconcile errors per connection, for the error policy's backoff.
    errors: Mutex<HashMap<Key, u32>>,
}

type Key = (String, String);

impl Context {
    pub fn new(
        client: Client,
        config: ControllerConfig,
        metrics: Arc<crate::metrics::Metrics>,
        gate: Arc<LeaderGate>,
    ) -> Result<Arc<Self>> {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: config.instance.clone(),
        };
        let events = EventSink::start(
            Recorder::new(client.clone(), reporter),
            metrics.events_dropped.clone(),
        );
        let oauth = OAuthEngine::new(
            TokenClientConfig {
                allow_http_loopback: config.allow_http_loopback,
                request_timeout: config.token_request_timeout,
                token_url_policy: config.token_url_policy.clone(),
                ..Default::default()
            },
            metrics.clone(),
            config.identity.clone(),
        )?;
        Ok(Arc::new(Context {
            writer: SecretWriter::new(client, events, metrics, gate),
            oauth,
            config,
            last_status: Mutex::default(),
            errors: Mutex::default(),
        }))
    }

    pub fn validation_options(&self) -> ValidationOptions {
        ValidationOptions {
            allow_http_loopback: self.config.allow_http_loopback,
            token_url_policy: self.config.token_url_policy.clone(),
        }
    }

    fn client(&self) -> Client {
        self.writer.client()
    }

    /// The watch saw `vc`: its metric series may be set from now on.
    fn seen(&self, vc: &VaultConnection) {
        let uid = vc.metadata.uid.as_deref().unwrap_or_default();
        let (ns, name) = (vc.namespace().unwrap_or_default(), vc.name_any());
        self.writer.metrics.connection_seen(&ns, &name, uid);
    }

    /// Drop what this process holds for a deleted connection (index entries, held tokens,
    /// backoff, the last status written, its metric series).
    fn forget(&self, ns: &str, name: &str) {
        self.writer.index.forget_connection(ns, name);
        self.writer.forget_repairs(ns, name);
        self.oauth.forget(ns, name);
        self.writer.metrics.connection_gone(ns, name);
        let key = (ns.to_string(), name.to_string());
        lock(&self.last_status).remove(&key);
        lock(&self.errors).remove(&key);
    }
}

/// Only spec changes, the force-refresh annotation and re-creation wake a connection; our own
/// status writes do not.
fn trigger_hash(vc: &VaultConnection) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    vc.metadata.generation.hash(&mut h);
    vc.metadata.uid.hash(&mut h);
    vc.annotations()
        .get(REFRESH_REQUESTED_ANNOTATION)
        .hash(&mut h);
    Some(h.finish())
}

/// The least time the shutdown flush of held tokens gets (see `run`).
const FLUSH_FLOOR: Duration = Duration::from_secs(5);

/// Run the controller until `shutdown` resolves: one watch scope for the whole cluster, or
/// one per namespace in `config.namespaces` (so that Roles in those namespaces are enough).
/// Every scope has its own caches and in-memory state; they share the client, the metrics and
/// the leader gate. `health` is ready while every scope's caches are synced and the API
/// server answers (see [`Readiness`]).
pub async fn run(
    client: Client,
    config: ControllerConfig,
    metrics: Arc<crate::metrics::Metrics>,
    gate: Arc<LeaderGate>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let scopes: Vec<Option<String>> = match &config.namespaces {
        None => vec![None],
        Some(list) => list.iter().cloned().map(Some).collect(),
    };
    // Probe the CRD once, in a namespace we may list: a missing CRD is a clear start-up error.
    let probe: Api<VaultConnection> = scoped_api(client.clone(), scopes[0].as_deref());
    match probe.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => {}
        // Only a 404 means the CRD is missing; a 403 is RBAC and says so in its message.
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return Err(Error::CrdNotInstalled(e.to_string()))
        }
        Err(e) => return Err(Error::Kube(e)),
    }
    let mut contexts = Vec::with_capacity(scopes.len());
    for _ in &scopes {
        contexts.push(Context::new(
            client.clone(),
            config.clone(),
            metrics.clone(),
            gate.clone(),
        )?);
    }
    // One shutdown signal fanned out to every scope's controller.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping_since: Arc<Mutex<Option<std::time::Instant>>> = Arc::default();
    let stopper = tokio::spawn({
        let stopping_since = stopping_since.clone();
        async move {
            shutdown.await;
            info!("stopping: finishing the reconciles that are running");
            *lock(&stopping_since) = Some(std::time::Instant::now());
            let _ = stop_tx.send(true);
        }
    });
    // Two watches per scope: its connections (2i) and its Secrets' metadata (2i + 1).
    let watches = Arc::new(Mutex::new(Readiness::new(scopes.len() * 2)));
    let (api_back_tx, api_back) = tokio::sync::watch::channel(0u64);
    let readiness = tokio::spawn(track_readiness(
        watches.clone(),
        probe,
        health.clone(),
        api_back_tx,
    ));
    let runs = scopes
        .iter()
        .zip(&contexts)
        .enumerate()
        .map(|(i, (scope, ctx))| {
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            run_scope(
                client.clone(),
                scope.as_deref(),
                ctx.clone(),
                WatchSlot {
                    readiness: watches.clone(),
                    index: 2 * i,
                    api_back: api_back.clone(),
                },
                stopped,
            )
        });
    info!(scopes = scopes.len(), "controller started");
    futures::future::join_all(runs).await;
    readiness.abort();
    stopper.abort();
    health.set_ready(false);
    // Token writes that were still retrying get one last chance before the process exits,
    // within what is left of the shutdown timeout (reconciles finishing took some of it), but
    // never less than `FLUSH_FLOOR`: a reconcile that gave up on a write at the very end hands
    // its tokens to this flush, and they deserve a real attempt. The chart's grace period (30 s)
    // covers the default timeout (20 s) plus the floor.
    let spent = lock(&stopping_since).map_or(Duration::ZERO, |t| t.elapsed());
    let left = config
        .shutdown_timeout
        .saturating_sub(spent)
        .max(FLUSH_FLOOR);
    let flushes = contexts
        .iter()
        .map(|ctx| ctx.oauth.flush_pending(&ctx.writer, left));
    futures::future::join_all(flushes).await;
    info!("controller stopped");
    Ok(())
}

fn scoped_api<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// How often `/readyz` is recomputed from the watches' last signals.
const READINESS_EVERY: Duration = Duration::from_millis(250);
/// How often the API server is probed (one `list` of at most one connection), and how long a
/// probe may take. A live read (no resourceVersion) reaches etcd, so an etcd outage behind a
/// running API server shows too; watches alone stay silently open then.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What `/readyz` says, from what the watches and a periodic probe of the API server showed.
/// Pure (no I/O, no clock), so its rules are unit-tested below.
///
/// Ready when every watch has completed its first list, the last probe succeeded, and no watch
/// is failing. A watch fails on an error event and recovers on the next sign of life (an
/// object listed or changed). If the error was transient (the API server unreachable, a 5xx or
/// 429 answer), a successful probe that *began after* it clears it too: kube-runtime's watcher
/// resumes a broken watch from its resourceVersion without emitting anything, so on a quiet
/// cluster the probe is the only way to learn the API is back (the watcher replays what it
/// missed when it reconnects). Any other answer (403 without `watch` in the RBAC rules, 404…)
/// stays until the watch itself works: the operator cannot sync, and says so.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Readiness {
    /// Orders errors and probes (a logical clock: every observation advances it).
    seq: u64,
    watches: Vec<WatchHealth>,
    /// The last probe succeeded (true until the first probe says otherwise).
    probe_ok: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WatchHealth {
    /// The first list has completed.
    listed: bool,
    /// `seq` of the last error not yet followed by a sign of life, and whether a probe may
    /// clear it (a transient error).
    failed_at: Option<(u64, bool)>,
}

/// What one watcher event says about its watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchSignal {
    /// A (re-)list is about to start: says nothing about the API yet.
    Starting,
    /// An object arrived (listed, created, changed or deleted): the watch works.
    Alive,
    /// A list completed.
    Listed,
    /// The list or watch request failed; `transient`: for want of the API server (no
    /// answer, a 5xx or 429), not because it refused the request.
    Failed { transient: bool },
}

impl WatchSignal {
    fn of<K>(event: &std::result::Result<watcher::Event<K>, watcher::Error>) -> Self {
        match event {
            Ok(watcher::Event::Init) => WatchSignal::Starting,
            Ok(watcher::Event::InitDone) => WatchSignal::Listed,
            Ok(_) => WatchSignal::Alive,
            Err(e) => WatchSignal::Failed {
                transient: transient(e),
            },
        }
    }
}

/// Whether a watch error is for want of the API server rather than its refusal.
fn transient(error: &watcher::Error) -> bool {
    let server_trouble = |code: u16| code >= 500 || code == 429;
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => server_trouble(status.code),
            // Connection refused or reset, TLS, a timeout: no answer at all.
            _ => true,
        },
        watcher::Error::WatchError(status) => server_trouble(status.code),
        watcher::Error::NoResourceVersion => false,
    }
}

impl Readiness {
    fn new(watches: usize) -> Self {
        Readiness {
            seq: 0,
            watches: vec![WatchHealth::default(); watches],
            probe_ok: true,
        }
    }

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn observe(&mut self, watch: usize, signal: WatchSignal) {
        let seq = self.tick();
        let Some(w) = self.watches.get_mut(watch) else {
            return;
        };
        match signal {
            WatchSignal::Starting => {}
            WatchSignal::Alive => w.failed_at = None,
            WatchSignal::Listed => {
                w.listed = true;
                w.failed_at = None;
            }
            WatchSignal::Failed { transient } => w.failed_at = Some((seq, transient)),
        }
    }

    /// A probe begins; pass the returned mark to [`Readiness::probe_finished`].
    fn probe_started(&mut self) -> u64 {
        self.tick()
    }

    /// Record a probe's result. True when it succeeds after a failed one: the API server is
    /// back from an outage, the moment to wake the watches that are backing off and to
    /// reconcile everything. (Not after a watch error alone: a watch that keeps failing while
    /// the API server answers would then be retried, and everything reconciled, every probe.)
    fn probe_finished(&mut self, started: u64, ok: bool) -> bool {
        self.tick();
        let recovered = ok && !self.probe_ok;
        self.probe_ok = ok;
        if ok {
            // Transient errors from before the probe began: the API server has answered since.
            for w in &mut self.watches {
                if w.failed_at
                    .is_some_and(|(at, transient)| transient && at < started)
                {
                    w.failed_at = None;
                }
            }
        }
        recovered
    }

    fn is_ready(&self) -> bool {
        self.probe_ok
            && self
                .watches
                .iter()
                .all(|w| w.listed && w.failed_at.is_none())
    }
}

/// Where a scope reports its two watches' signals.
#[derive(Clone)]
struct WatchSlot {
    readiness: Arc<Mutex<Readiness>>,
    /// The connections' watch; the Secrets' watch is `index + 1`.
    index: usize,
    /// Bumped when a probe finds the API server answering again (see [`watch_backoff`]).
    api_back: tokio::sync::watch::Receiver<u64>,
}

impl WatchSlot {
    fn observe(&self, offset: usize, signal: WatchSignal) {
        lock(&self.readiness).observe(self.index + offset, signal);
    }
}

/// Keep `/readyz` up to date: every [`READINESS_EVERY`] from the watches' signals, and probe
/// the API server every [`PROBE_EVERY`].
async fn track_readiness(
    readiness: Arc<Mutex<Readiness>>,
    probe: Api<VaultConnection>,
    health: Arc<Health>,
    api_back: tokio::sync::watch::Sender<u64>,
) {
    let mut last_probe: Option<Instant> = None;
    loop {
        if last_probe.is_none_or(|t| t.elapsed() >= PROBE_EVERY) {
            let started = lock(&readiness).probe_started();
            let one = kube::api::ListParams::default().limit(1);
            let list = probe.list_metadata(&one);
            let ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, list).await, Ok(Ok(_)));
            if !ok {
                debug!("readiness probe: the API server did not answer a list");
            }
            if lock(&readiness).probe_finished(started, ok) {
                info!("the API server answers again: resuming the watches now");
                api_back.send_modify(|n| *n = n.wrapping_add(1));
            }
            last_probe = Some(Instant::now());
        }
        health.set_ready(lock(&readiness).is_ready());
        tokio::time::sleep(READINESS_EVERY).await;
    }
}

/// The controller of one watch scope (a namespace, or the whole cluster).
async fn run_scope(
    client: Client,
    namespace: Option<&str>,
    ctx: Arc<Context>,
    watches: WatchSlot,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let connections: Api<VaultConnection> = scoped_api(client.clone(), namespace);
    let (reader, writer) = reflector::store();
    let vc_stream = watch_backoff(
        watcher(connections, watcher::Config::default()),
        watches.api_back.clone(),
    )
    // managedFields are the largest part of a stored object and never read here.
    .modify(|vc| vc.managed_fields_mut().clear())
    .reflect(writer)
    .inspect({
        // Without a finalizer a deleted connection is never reconciled: forget it here.
        // After a re-list, the connections of this scope it no longer holds were deleted
        // while the watch was down (no Delete event comes for them).
        let ctx = ctx.clone();
        let scope = namespace.map(str::to_string);
        let mut relisted: Option<HashSet<Key>> = None;
        let watches = watches.clone();
        move |ev| {
            watches.observe(0, WatchSignal::of(ev));
            match ev {
                Ok(watcher::Event::Apply(vc)) => ctx.seen(vc),
                Ok(watcher::Event::Delete(vc)) => {
                    ctx.forget(&vc.namespace().unwrap_or_default(), &vc.name_any())
                }
                Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
                Ok(watcher::Event::InitApply(vc)) => {
                    ctx.seen(vc);
                    if let Some(keys) = relisted.as_mut() {
                        keys.insert((vc.namespace().unwrap_or_default(), vc.name_any()));
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let listed = relisted.take().unwrap_or_default();
                    let known = ctx.writer.metrics.live_connections(scope.as_deref());
                    for (ns, name) in known.difference(&listed) {
                        ctx.forget(ns, name);
                    }
                }
                Err(e) => warn!(error = %e, "connection watch error"),
            }
        }
    })
    .applied_objects()
    .predicate_filter(trigger_hash, Default::default());

    let api_back = watches.api_back.clone();
    let secret_triggers = secret_triggers(scoped_api(client, namespace), ctx.clone(), watches);

    // kube-runtime holds the reconcile runner until the store has listed, and its graceful
    // shutdown stops reading the watch that would fill the store: a stop that comes before the
    // first list never finishes (measured: SIGTERM right after start-up hung until SIGKILL).
    // Nothing has been reconciled then, so such a stop ends the controller at once.
    let shutdown = shutdown.shared();
    let unlisted = reader.clone();
    let stopped_before_listing = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.await;
            if unlisted.wait_until_ready().now_or_never().is_some() {
                std::future::pending::<()>().await;
            }
        }
    };
    let mut controller = Controller::for_stream(vc_stream, reader)
        .reconcile_on(secret_triggers)
        // The watches back off by themselves (`watch_backoff`). Left at its default, the
        // Controller adds a second backoff (800 ms doubling to 30 s) around *all* its triggers
        // on every watch error: after an outage it stopped reading both watches for up to a
        // minute, even when the API server was back.
        .trigger_backoff(NoTriggerBackoff)
        // Once the API server answers again after an outage, reconcile everything at once: the
        // connections retried during the outage have backed off (for minutes after a long
        // one), and their tokens may have fallen due or expired meanwhile.
        .reconcile_all_on(api_back_events(api_back))
        .graceful_shutdown_on(shutdown);
    if ctx.config.concurrency > 0 {
        controller = controller.with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency),
        );
    }
    info!(token_url_allow = %ctx.config.token_url_policy, "controller started");
    let running = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile failed");
            }
        });
    tokio::select! {
        () = running => {}
        () = stopped_before_listing => {
            info!("stopped before the first list of connections: nothing was reconciled");
        }
    }
}

/// One item each time the readiness probe finds the API server answering again.
fn api_back_events(
    api_back: tokio::sync::watch::Receiver<u64>,
) -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(api_back, |mut api_back| async move {
        api_back.changed().await.ok()?;
        Some(((), api_back))
    })
}

/// No pause: see `run_scope` (the watch streams pause themselves after an error).
struct NoTriggerBackoff;

impl Iterator for NoTriggerBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoTriggerBackoff {
    fn reset(&mut self) {}
}

/// kube-runtime's default watch backoff (800 ms doubling to 30 s, with jitter, reset by any
/// success), except that a pause ends early when the readiness probe finds the API server
/// answering again, and that "too old resource version" (410) re-lists at once: the API server
/// answered, and the watch is deaf until it has re-listed. Without these, a watch that gave up
/// during a long outage stays deaf for up to 30 s after the API server is back. Like kube's
/// `StreamBackoff`, an error is passed on at once and the pause comes before the next poll.
fn watch_backoff<S, T>(
    stream: S,
    api_back: tokio::sync::watch::Receiver<u64>,
) -> impl Stream<Item = std::result::Result<T, watcher::Error>> + Send + 'static
where
    S: Stream<Item = std::result::Result<T, watcher::Error>> + Send + 'static,
    T: Send + 'static,
{
    let expired = |e: &watcher::Error| matches!(e, watcher::Error::WatchError(s) if s.code == 410);
    backoff_until_back(
        stream,
        watcher::DefaultBackoff::default(),
        expired,
        api_back,
    )
}

/// [`watch_backoff`] with any backoff, and `resync` saying which errors need no pause (tests
/// use their own).
fn backoff_until_back<S, T, E, B>(
    stream: S,
    backoff: B,
    resync: fn(&E) -> bool,
    api_back: tokio::sync::watch::Receiver<u64>,
) -> impl Stream<Item = std::result::Result<T, E>> + Send + 'static
where
    S: Stream<Item = std::result::Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
    B: kube::runtime::utils::Backoff + 'static,
{
    let state = (Box::pin(stream), backoff, api_back, None::<Duration>);
    futures::stream::unfold(
        state,
        move |(mut stream, mut backoff, mut api_back, pause)| async move {
            if let Some(pause) = pause {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    // A closed channel (the tracker stopped) just means: no early wake-up.
                    Ok(()) = api_back.changed() => debug!("watch backoff cut short: the API server is back"),
                }
            }
            let item = stream.next().await?;
            let pause = match &item {
                Ok(_) => {
                    backoff.reset();
                    None
                }
                Err(e) if resync(e) => {
                    backoff.reset();
                    None
                }
                Err(_) => {
                    // Only a recovery seen from now on ends the coming pause early.
                    api_back.borrow_and_update();
                    backoff.next()
                }
            };
            Some((item, (stream, backoff, api_back, pause)))
        },
    )
}

/// One metadata-only watch of the scope's Secrets, turned into reconcile requests for the
/// connections they concern (see `secret_index`).
fn secret_triggers(
    api: Api<PartialObjectMeta<Secret>>,
    ctx: Arc<Context>,
    watches: WatchSlot,
) -> impl Stream<Item = ObjectRef<VaultConnection>> + Send + 'static {
    let api_back = watches.api_back.clone();
    watch_backoff(watcher(api, watcher::Config::default()), api_back)
        .inspect(move |ev| watches.observe(1, WatchSignal::of(ev)))
        .filter_map(move |ev| {
            let ctx = ctx.clone();
            async move {
                match ev {
                    Ok(ev) => Some(futures::stream::iter(ctx.writer.index.apply_event(ev))),
                    Err(e) => {
                        warn!(error = %e, "secret watch error");
                        None
                    }
                }
            }
        })
        .flatten()
}

#[tracing::instrument(skip_all, fields(namespace = vc.namespace().unwrap_or_default(), name = vc.name_any()))]
pub async fn reconcile(vc: Arc<VaultConnection>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_one(&vc, &ctx).await;
    ctx.writer
        .metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_one(vc: &VaultConnection, ctx: &Context) -> Result<Action> {
    let ns = vc.namespace().unwrap_or_default();
    let name = vc.name_any();
    ctx.writer.metrics.reconciles.inc();
    if vc.metadata.deletion_timestamp.is_some() {
        ctx.forget(&ns, &name);
        return Ok(Action::await_change());
    }

    let (outcome, action) = decide(vc, ctx, &ns).await?;
    if write_status(vc, ctx, &outcome).await? == StatusWrite::Outdated {
        // The cached copy lagged behind the stored one (typically our own last status write,
        // which wakes nothing: `trigger_hash`): decide again shortly, from a copy that has
        // caught up. Not at once over a fresh read: a decision can take a whole write budget
        // (held tokens), and doing it twice would overrun a shutdown's grace period.
        debug!("reconcile finished: {ns}/{name} ({}, computed from an outdated copy: status not written, again in {}s)", outcome.reason, OUTDATED_RETRY.as_secs());
        return Ok(Action::requeue(OUTDATED_RETRY));
    }
    // What the status now says; ignored if the connection was deleted meanwhile.
    let uid = vc.metadata.uid.as_deref().unwrap_or_default();
    ctx.writer.metrics.report(&ns, &name, uid, &outcome);
    lock(&ctx.errors).remove(&(ns.clone(), name.clone()));
    debug!("reconcile finished: {ns}/{name} ({})", outcome.reason);
    Ok(action)
}

/// When a reconcile whose status met a newer stored copy runs again.
const OUTDATED_RETRY: Duration = Duration::from_secs(1);

/// Work out (and carry out) what the connection needs; returns what the status should say.
async fn decide(vc: &VaultConnection, ctx: &Context, ns: &str) -> Result<(Outcome, Action)> {
    let name = vc.name_any();
    if vc.spec.suspend {
        let msg =
            "Suspended: the operator writes and refreshes nothing until spec.suspend is false";
        // Keep what the user needs to see about the existing Secret and tokens.
        let o = status::keep_known_fields(vc, Outcome::new(Reason::Suspended, msg));
        return Ok((o, Action::await_change()));
    }

    let opts = ctx.validation_options();
    let problems = validation::validate(vc, opts.clone());
    if !problems.is_empty() {
        let o = Outcome::new(Reason::InvalidSpec, problems.join("; "));
        return Ok((status::keep_known_fields(vc, o), Action::await_change()));
    }
    // Refused before anything is read or sent; a changed allow-list restarts the operator.
    if let Some(msg) = validation::token_url_not_allowed(vc, &opts) {
        let o = Outcome::new(Reason::TokenUrlNotAllowed, msg);
        return Ok((status::keep_known_fields(vc, o), Action::await_change()));
    }

    // Register interest before reading, so a Secret created right after the read still wakes us.
    let mut reads: Vec<String> = vc
        .spec
        .credentials_ref
        .iter()
        .map(|r| r.name.clone())
        .collect();
    if let Some(ca) = vc
        .spec
        .oauth2
        .as_ref()
        .and_then(|o| o.ca_bundle_ref.as_ref())
    {
        reads.push(ca.name.clone());
    }
    ctx.writer.index.set_reads(ns, &name, reads);

    let creds = match &vc.spec.credentials_ref {
        Some(r) => ctx.writer.get(ns, &r.name).await?,
        None => None,
    };
    ctx.writer.note_user_inputs(vc, creds.as_ref());
    let inputs = secret::extract_inputs(vc, creds.as_ref());

    if vc.spec.type_.is_oauth() {
        return ctx.oauth.reconcile(vc, &ctx.writer, inputs).await;
    }

    match inputs {
        Inputs::Missing {
            missing_keys,
            message,
        } => Ok((
            status::pending(vc, missing_keys, message, ctx.writer.last_good_kept(vc)),
            Action::await_change(),
        )),
        Inputs::Complete(data) => {
            let desired = secret::desired_output_secret(vc, secret::static_outputs(vc, &data));
            match ctx.writer.ensure(vc, &desired, true).await? {
                SecretWrite::Conflict(msg) => Ok((
                    Outcome::new(Reason::SecretConflict, msg),
                    Action::await_change(),
                )),
                SecretWrite::Contested { message, retry_at } => {
                    let wait = retry_at.duration_since(jiff_now());
                    let wait = Duration::try_from(wait).unwrap_or_default();
                    Ok((
                        Outcome::new(Reason::SecretContested, message)
                            .with_secret(Some(desired.name.clone())),
                        Action::requeue(wait.max(Duration::from_secs(1))),
                    ))
                }
                _ => Ok((
                    Outcome::new(
                        Reason::Reconciled,
                        format!("Secret {ns}/{} is up to date", desired.name),
                    )
                    .with_secret(Some(desired.name.clone())),
                    // A slow safety-net resync; changes arrive by watch.
                    Action::requeue(Duration::from_secs(3600)),
                )),
            }
        }
    }
}

/// What became of a status write.
#[derive(Debug, PartialEq, Eq)]
enum StatusWrite {
    /// Written, or already what it should be.
    Current,
    /// Not written (409): the status was computed from an outdated copy of the connection.
    Outdated,
}

async fn write_status(
    vc: &VaultConnection,
    ctx: &Context,
    outcome: &Outcome,
) -> Result<StatusWrite> {
    let ns = vc.namespace().unwrap_or_default();
    let name = vc.name_any();
    // Whole seconds, as the API server stores a Time: what we remember writing must equal
    // what the cache shows afterwards (`status::write_needed`).
    let now = Time(whole_seconds(jiff_now()));
    let desired = status::desired_status(vc, outcome, now);
    let key = (ns.clone(), name.clone());
    let live = vc.status.clone().unwrap_or_default();
    let last_written = lock(&ctx.last_status).get(&key).cloned();
    if !status::write_needed(&desired, &live, last_written.as_ref()) {
        return Ok(StatusWrite::Current);
    }
    // A replica without the lease never writes status: its view (e.g. NotLeader) would
    // overwrite the leader's.
    if !ctx.writer.gate.may_write() {
        return Err(Error::NotLeader);
    }
    // What the stored status says: our last write if the cache does not show it yet.
    let previous_reason = last_written
        .as_ref()
        .and_then(status::ready_reason)
        .or_else(|| status::current_reason(vc))
        .map(str::to_string);
    let api: Api<VaultConnection> = Api::namespaced(ctx.client(), &ns);
    let patch = status::status_apply_patch(vc, &desired);
    let written = api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await;
    match written {
        Ok(_) => {}
        // `vc` is older than the stored object: the newer version is on its way by watch and
        // reconciles again; this status, worked out from the old one, is dropped.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            return Ok(StatusWrite::Outdated);
        }
        Err(e) => return Err(e.into()),
    }
    lock(&ctx.last_status).insert(key, desired);
    let first_ready = previous_reason.is_none() && outcome.ready;
    if previous_reason.as_deref() != Some(outcome.reason.as_str()) && !first_ready {
        let type_ = if outcome.ready
            || outcome.phase == Phase::Pending
            || outcome.phase == Phase::Suspended
        {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.writer
            .publish(vc, type_, outcome.reason.as_str(), outcome.message.clone());
    }
    Ok(StatusWrite::Current)
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

fn whole_seconds(t: k8s_openapi::jiff::Timestamp) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Requeue a failed reconcile after a per-connection exponential backoff whose range depends
/// on the error's category: a persistent RBAC denial backs off to 10 minutes instead of
/// retrying every few seconds forever; a conflict or a blip retries within seconds.
pub fn error_policy(vc: Arc<VaultConnection>, error: &Error, ctx: Arc<Context>) -> Action {
    let category = error.category();
    ctx.writer
        .metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: category.into(),
        })
        .inc();
    let key = (vc.namespace().unwrap_or_default(), vc.name_any());
    let attempt = {
        let mut errors = lock(&ctx.errors);
        let n = errors.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = error.backoff().delay(attempt);
    warn!(namespace = vc.namespace().unwrap_or_default(), name = %vc.name_any(), category, attempt, retry_in_ms = delay.as_millis() as u64, error = %error, "reconcile failed; will retry");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status written with a sub-second transition time comes back truncated, and would
    /// never equal what we remember writing: one more write after every change.
    #[test]
    fn status_times_survive_the_round_trip_through_the_api_format() {
        let t = k8s_openapi::jiff::Timestamp::from_nanosecond(1_764_000_000_123_456_789).unwrap();
        let round_trip =
            |t| -> Time { serde_json::from_value(serde_json::to_value(Time(t)).unwrap()).unwrap() };
        assert_ne!(round_trip(t), Time(t), "the API format keeps whole seconds");
        assert_eq!(round_trip(whole_seconds(t)), Time(whole_seconds(t)));
    }

    /// A watch that lost its connection.
    const BLIP: WatchSignal = WatchSignal::Failed { transient: true };

    fn listed(n: usize) -> Readiness {
        let mut r = Readiness::new(n);
        for w in 0..n {
            r.observe(w, WatchSignal::Starting);
            r.observe(w, WatchSignal::Alive);
            r.observe(w, WatchSignal::Listed);
        }
        r
    }

    #[test]
    fn ready_only_once_every_watch_has_listed() {
        let mut r = Readiness::new(2);
        assert!(!r.is_ready());
        r.observe(0, WatchSignal::Starting);
        r.observe(0, WatchSignal::Alive);
        assert!(!r.is_ready(), "still listing");
        r.observe(0, WatchSignal::Listed);
        assert!(!r.is_ready(), "the other watch has not listed");
        r.observe(1, WatchSignal::Listed);
        assert!(r.is_ready());
    }

    #[test]
    fn a_failing_watch_is_not_ready_until_it_delivers_again() {
        let mut r = listed(2);
        r.observe(1, BLIP);
        assert!(!r.is_ready(), "a broken watch after the first list");
        r.observe(1, WatchSignal::Starting);
        assert!(!r.is_ready(), "a re-list that has not listed anything yet");
        r.observe(1, WatchSignal::Alive);
        assert!(r.is_ready());
    }

    #[test]
    fn a_probe_that_began_after_the_error_clears_it() {
        let mut r = listed(2);
        r.observe(0, BLIP);
        // The watcher resumes silently; a probe that started later and succeeded shows the
        // API is back.
        let p = r.probe_started();
        r.probe_finished(p, true);
        assert!(r.is_ready());
    }

    #[test]
    fn a_probe_that_began_before_the_error_does_not_clear_it() {
        let mut r = listed(2);
        let p = r.probe_started();
        r.observe(0, BLIP);
        r.probe_finished(p, true);
        assert!(!r.is_ready(), "the error came after the probe was sent");
        let p = r.probe_started();
        r.probe_finished(p, true);
        assert!(r.is_ready());
    }

    #[test]
    fn a_failed_probe_is_not_ready_even_with_quiet_watches() {
        // etcd down behind a running API server: watches stay open and silent.
        let mut r = listed(2);
        let p = r.probe_started();
        r.probe_finished(p, false);
        assert!(!r.is_ready());
        let p = r.probe_started();
        r.probe_finished(p, true);
        assert!(r.is_ready());
    }

    #[test]
    fn a_failed_probe_clears_nothing() {
        let mut r = listed(1);
        r.observe(0, BLIP);
        let p = r.probe_started();
        r.probe_finished(p, false);
        let p = r.probe_started();
        r.observe(0, BLIP);
        r.probe_finished(p, true);
        assert!(!r.is_ready(), "the latest error is newer than the probe");
    }

    #[test]
    fn a_probe_reports_recovery_once() {
        let mut r = listed(1);
        let p = r.probe_started();
        assert!(!r.probe_finished(p, true), "nothing was wrong");
        let p = r.probe_started();
        assert!(!r.probe_finished(p, false), "a failure is no recovery");
        let p = r.probe_started();
        assert!(
            r.probe_finished(p, true),
            "the first success after a failure"
        );
        let p = r.probe_started();
        assert!(!r.probe_finished(p, true), "already recovered");
    }

    /// A backoff of fixed pauses that counts its resets.
    struct Fixed(Duration, Arc<std::sync::atomic::AtomicUsize>);

    impl Iterator for Fixed {
        type Item = Duration;
        fn next(&mut self) -> Option<Duration> {
            Some(self.0)
        }
    }

    impl kube::runtime::utils::Backoff for Fixed {
        fn reset(&mut self) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn never(_: &&str) -> bool {
        false
    }

    #[tokio::test]
    async fn watch_backoff_resyncs_at_once() {
        let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (_tx, rx) = tokio::sync::watch::channel(0u64);
        let items = futures::stream::iter([Err::<u32, &str>("gone"), Ok(1)]);
        let backoff = Fixed(Duration::from_secs(600), resets.clone());
        let gone = |e: &&str| *e == "gone";
        let mut s = std::pin::pin!(backoff_until_back(items, backoff, gone, rx));
        assert_eq!(s.next().await, Some(Err("gone")));
        let next = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert_eq!(next, Ok(Some(Ok(1))), "a re-list waited out a pause");
        assert_eq!(resets.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn watch_backoff_pauses_after_an_error_until_the_api_is_back() {
        let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let items = futures::stream::iter([Err::<u32, &str>("down"), Ok(1), Ok(2)]);
        let backoff = Fixed(Duration::from_secs(600), resets.clone());
        let mut s = std::pin::pin!(backoff_until_back(items, backoff, never, rx));
        let t = Instant::now();
        assert_eq!(s.next().await, Some(Err("down")));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "an error is passed on at once"
        );
        // The pause after it (600 s) lasts until a probe sees the API server again.
        let paused = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
        assert!(paused.is_err(), "no pause after the error");
        tx.send_modify(|n| *n += 1);
        let t = Instant::now();
        assert_eq!(s.next().await, Some(Ok(1)));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not woken by the recovery"
        );
        assert_eq!(
            resets.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "a success resets"
        );
        assert_eq!(s.next().await, Some(Ok(2)), "no pause after a success");
        assert_eq!(s.next().await, None);
    }

    #[tokio::test]
    async fn watch_backoff_ignores_a_recovery_seen_before_the_error() {
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        tx.send_modify(|n| *n += 1);
        let items = futures::stream::iter([Err::<u32, &str>("down"), Ok(1)]);
        let backoff = Fixed(Duration::from_secs(600), Arc::default());
        let mut s = std::pin::pin!(backoff_until_back(items, backoff, never, rx));
        assert_eq!(s.next().await, Some(Err("down")));
        let paused = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
        assert!(paused.is_err(), "an old recovery cut the pause short");
    }

    #[tokio::test]
    async fn every_recovery_is_one_reconcile_all_event() {
        let (tx, _) = tokio::sync::watch::channel(0u64);
        tx.send_modify(|n| *n += 1);
        let mut events = std::pin::pin!(api_back_events(tx.subscribe()));
        // A recovery from before the receiver existed is no event.
        let early = tokio::time::timeout(Duration::from_millis(100), events.next()).await;
        assert!(
            early.is_err(),
            "an old recovery triggered a reconcile of everything"
        );
        tx.send_modify(|n| *n += 1);
        assert_eq!(events.next().await, Some(()));
        drop(tx);
        assert_eq!(events.next().await, None, "ends with the readiness tracker");
    }

    fn status(code: u16) -> Box<kube::core::Status> {
        kube::core::Status::failure("injected", "Test")
            .with_code(code)
            .boxed()
    }

    #[test]
    fn a_forbidden_watch_stays_not_ready_and_is_no_recovery() {
        // RBAC without `watch`: the API server answers everything else. The operator cannot
        // sync, so it must not look ready, and must not make up for the watch by
        // reconciling everything after every probe.
        let mut r = listed(2);
        let forbidden = Err::<watcher::Event<()>, _>(watcher::Error::WatchStartFailed(
            kube::Error::Api(status(403)),
        ));
        r.observe(1, WatchSignal::of(&forbidden));
        let p = r.probe_started();
        assert!(!r.probe_finished(p, true), "a forbidden watch is no outage");
        assert!(!r.is_ready(), "a forbidden watch was cleared by a probe");
        r.observe(1, WatchSignal::Alive);
        assert!(r.is_ready());
    }

    #[test]
    fn only_a_probe_after_a_failed_probe_is_a_recovery() {
        // A watch error while every probe succeeds (a server error on the watch, a blip
        // between two probes) clears for readiness, but waking every watch and reconciling
        // everything each time would turn a persistent watch error into a loop.
        let mut r = listed(1);
        let blip = Err::<watcher::Event<()>, _>(watcher::Error::WatchError(status(500)));
        r.observe(0, WatchSignal::of(&blip));
        let p = r.probe_started();
        assert!(
            !r.probe_finished(p, true),
            "a watch error alone is no outage"
        );
        assert!(r.is_ready(), "a server error is cleared by a later probe");
    }

    #[test]
    fn signals_of_watcher_events() {
        type Ev = std::result::Result<watcher::Event<()>, watcher::Error>;
        let of = |e: Ev| WatchSignal::of(&e);
        assert_eq!(of(Ok(watcher::Event::Init)), WatchSignal::Starting);
        assert_eq!(of(Ok(watcher::Event::InitApply(()))), WatchSignal::Alive);
        assert_eq!(of(Ok(watcher::Event::InitDone)), WatchSignal::Listed);
        assert_eq!(of(Ok(watcher::Event::Apply(()))), WatchSignal::Alive);
        assert_eq!(of(Ok(watcher::Event::Delete(()))), WatchSignal::Alive);
        assert_eq!(
            of(Err(watcher::Error::NoResourceVersion)),
            WatchSignal::Failed { transient: false }
        );
        let refused = |code| {
            of(Err(watcher::Error::WatchStartFailed(kube::Error::Api(
                status(code),
            ))))
        };
        assert_eq!(refused(403), WatchSignal::Failed { transient: false });
        assert_eq!(refused(404), WatchSignal::Failed { transient: false });
        assert_eq!(refused(503), WatchSignal::Failed { transient: true });
        assert_eq!(refused(429), WatchSignal::Failed { transient: true });
        assert_eq!(
            of(Err(watcher::Error::WatchError(status(410)))),
            WatchSignal::Failed { transient: false },
            "a re-list follows and clears it"
        );
    }
}
