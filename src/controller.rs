//! The reconcile loop: `VaultConnection` → generated Secret + status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        )?;
        Ok(Arc::new(Context {
            writer: SecretWriter::new(client, events, metrics),
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

    /// Drop what this process holds for a deleted connection (index entries, held tokens,
    /// backoff, the last status written, its metric series).
    fn forget(&self, vc: &VaultConnection) {
        let (ns, name) = (vc.namespace().unwrap_or_default(), vc.name_any());
        self.writer.index.forget_connection(&ns, &name);
        self.oauth.forget(&ns, &name);
        let key = (ns, name);
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

/// Run the controller until `shutdown` resolves (or SIGTERM/SIGINT).
pub async fn run(
    client: Client,
    config: ControllerConfig,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let connections: Api<VaultConnection> = Api::all(client.clone());
    if let Err(e) = connections
        .list(&kube::api::ListParams::default().limit(1))
        .await
    {
        return Err(Error::CrdNotInstalled(e.to_string()));
    }
    let ctx = Context::new(client.clone(), config.clone(), metrics)?;

    let (reader, writer) = reflector::store();
    let vc_stream = watcher(connections, watcher::Config::default())
        .default_backoff()
        // managedFields are the largest part of a stored object and never read here.
        .modify(|vc| vc.managed_fields_mut().clear())
        .reflect(writer)
        .inspect({
            // Without a finalizer a deleted connection is never reconciled: forget it here.
            let ctx = ctx.clone();
            move |ev| {
                if let Ok(watcher::Event::Delete(vc)) = ev {
                    ctx.forget(vc);
                }
            }
        })
        .applied_objects()
        .predicate_filter(trigger_hash, Default::default());

    let secret_triggers = secret_triggers(client.clone(), ctx.clone());

    let mut controller = Controller::for_stream(vc_stream, reader)
        .reconcile_on(secret_triggers)
        .graceful_shutdown_on(shutdown);
    if config.concurrency > 0 {
        controller = controller.with_config(
            kube::runtime::controller::Config::default().concurrency(config.concurrency),
        );
    }
    info!(token_url_allow = %config.token_url_policy, "controller started");
    controller
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile failed");
            }
        })
        .await;
    // Token writes that were still retrying get one last chance before the process exits.
    ctx.oauth.flush_pending(&ctx.writer).await;
    info!("controller stopped");
    Ok(())
}

/// One metadata-only watch of all Secrets, turned into reconcile requests for the connections
/// they concern (see `secret_index`).
fn secret_triggers(
    client: Client,
    ctx: Arc<Context>,
) -> impl Stream<Item = ObjectRef<VaultConnection>> + Send + 'static {
    let api: Api<PartialObjectMeta<Secret>> = Api::all(client);
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
    let ns = vc.namespace().unwrap_or_default();
    let name = vc.name_any();
    ctx.writer.metrics.reconciles.inc();
    if vc.metadata.deletion_timestamp.is_some() {
        ctx.forget(&vc);
        return Ok(Action::await_change());
    }

    let (outcome, action) = decide(&vc, &ctx, &ns).await?;
    write_status(&vc, &ctx, &outcome).await?;
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
