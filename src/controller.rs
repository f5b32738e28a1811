//! The reconcile loop: `VaultConnection` → generated Secret + status.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::json;
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
/// the leader gate. `health` turns ready once every scope's caches are synced.
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
            *lock(&stopping_since) = Some(std::time::Instant::now());
            let _ = stop_tx.send(true);
        }
    });
    let synced: Vec<Arc<std::sync::atomic::AtomicBool>> =
        scopes.iter().map(|_| Arc::default()).collect();
    let readiness = tokio::spawn(track_readiness(
        contexts.clone(),
        synced.clone(),
        health.clone(),
    ));
    let runs = scopes
        .iter()
        .zip(&contexts)
        .zip(&synced)
        .map(|((scope, ctx), synced)| {
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            run_scope(
                client.clone(),
                scope.as_deref(),
                ctx.clone(),
                synced.clone(),
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

/// Ready once every scope has listed its connections and Secrets.
async fn track_readiness(
    contexts: Vec<Arc<Context>>,
    synced: Vec<Arc<std::sync::atomic::AtomicBool>>,
    health: Arc<Health>,
) {
    loop {
        let ready = synced
            .iter()
            .all(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            && contexts.iter().all(|c| c.writer.index.is_synced());
        health.set_ready(ready);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The controller of one watch scope (a namespace, or the whole cluster).
async fn run_scope(
    client: Client,
    namespace: Option<&str>,
    ctx: Arc<Context>,
    synced: Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let connections: Api<VaultConnection> = scoped_api(client.clone(), namespace);
    let (reader, writer) = reflector::store();
    let vc_stream = watcher(connections, watcher::Config::default())
        .default_backoff()
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
            move |ev| match ev {
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
                    synced.store(true, std::sync::atomic::Ordering::Relaxed)
                }
                Err(_) => {}
            }
        })
        .applied_objects()
        .predicate_filter(trigger_hash, Default::default());

    let secret_triggers = secret_triggers(scoped_api(client, namespace), ctx.clone());

    let mut controller = Controller::for_stream(vc_stream, reader)
        .reconcile_on(secret_triggers)
        .graceful_shutdown_on(shutdown);
    if ctx.config.concurrency > 0 {
        controller = controller.with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency),
        );
    }
    info!(token_url_allow = %ctx.config.token_url_policy, "controller started");
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile failed");
            }
        })
        .await;
}

/// One metadata-only watch of the scope's Secrets, turned into reconcile requests for the
/// connections they concern (see `secret_index`).
fn secret_triggers(
    api: Api<PartialObjectMeta<Secret>>,
    ctx: Arc<Context>,
) -> impl Stream<Item = ObjectRef<VaultConnection>> + Send + 'static {
    watcher(api, watcher::Config::default())
        .default_backoff()
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
    write_status(vc, ctx, &outcome).await?;
    // What the status now says; ignored if the connection was deleted meanwhile.
    let uid = vc.metadata.uid.as_deref().unwrap_or_default();
    ctx.writer.metrics.report(&ns, &name, uid, &outcome);
    lock(&ctx.errors).remove(&(ns.clone(), name.clone()));
    debug!("reconcile finished: {ns}/{name} ({})", outcome.reason);
    Ok(action)
}

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

async fn write_status(vc: &VaultConnection, ctx: &Context, outcome: &Outcome) -> Result<()> {
    let ns = vc.namespace().unwrap_or_default();
    let name = vc.name_any();
    let now = Time(jiff_now());
    let desired = status::desired_status(vc, outcome, now);
    let key = (ns.clone(), name.clone());
    let live = vc.status.clone().unwrap_or_default();
    let last_written = lock(&ctx.last_status).get(&key).cloned();
    if desired == live || last_written.as_ref() == Some(&desired) {
        return Ok(());
    }
    // A replica without the lease never writes status: its view (e.g. NotLeader) would
    // overwrite the leader's.
    if !ctx.writer.gate.may_write() {
        return Err(Error::NotLeader);
    }
    let previous_reason = status::current_reason(vc).map(str::to_string);
    let api: Api<VaultConnection> = Api::namespaced(ctx.client(), &ns);
    let patch = json!({
        "apiVersion": "vaultconn.dev/v1alpha1",
        "kind": "VaultConnection",
        "status": desired,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
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
    Ok(())
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
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
