//! The reconcile loop: `VaultConnection` → generated Secret + status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{Phase, VaultConnection, VaultConnectionStatus};
use crate::error::{Error, Result};
use crate::names::*;
use crate::secret::{self, DesiredSecret, Inputs, Ownership};
use crate::secret_index::SecretIndex;
use crate::status::{self, Outcome};
use crate::validation::{self, ValidationOptions};

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
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            allow_http_loopback: false,
            instance: None,
            concurrency: 32,
            token_request_timeout: Duration::from_secs(15),
        }
    }
}

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub events: crate::events::EventSink,
    pub secrets: SecretIndex,
    pub oauth: crate::oauth::refresh::OAuthEngine,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Status this process last wrote per connection (the reflector may lag behind our own
    /// writes; comparing with both keeps a no-op reconcile from writing).
    last_status: Mutex<HashMap<(String, String), VaultConnectionStatus>>,
}

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
        Ok(Arc::new(Context {
            events: crate::events::EventSink::start(
                Recorder::new(client.clone(), reporter),
                metrics.events_dropped.clone(),
            ),
            oauth: crate::oauth::refresh::OAuthEngine::new(
                crate::oauth::token::TokenClientConfig {
                    allow_http_loopback: config.allow_http_loopback,
                    request_timeout: config.token_request_timeout,
                    ..Default::default()
                },
                metrics.clone(),
            )?,
            metrics,
            client,
            config,
            secrets: SecretIndex::default(),
            last_status: Mutex::default(),
        }))
    }

    pub fn validation_options(&self) -> ValidationOptions {
        ValidationOptions {
            allow_http_loopback: self.config.allow_http_loopback,
        }
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
    info!("controller started");
    controller
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                debug!(error = %e, "reconcile failed");
            }
        })
        .await;
    // Token writes that were still retrying get one last chance before the process exits.
    ctx.oauth.flush_pending(&ctx).await;
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
                    Ok(ev) => Some(futures::stream::iter(ctx.secrets.apply_event(ev))),
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
    ctx.metrics.reconciles.inc();
    if vc.metadata.deletion_timestamp.is_some() {
        ctx.secrets.forget_connection(&ns, &name);
        return Ok(Action::await_change());
    }

    let (outcome, action) = decide(&vc, &ctx, &ns).await?;
    write_status(&vc, &ctx, &outcome).await?;
    debug!("reconcile finished: {ns}/{name} ({})", outcome.reason);
    Ok(action)
}

/// Work out (and carry out) what the connection needs; returns what the status should say.
async fn decide(vc: &VaultConnection, ctx: &Context, ns: &str) -> Result<(Outcome, Action)> {
    let name = vc.name_any();
    if vc.spec.suspend {
        let msg =
            "Suspended: the operator writes and refreshes nothing until spec.suspend is false";
        let mut o = Outcome::new(Phase::Suspended, false, "Suspended", msg);
        // Keep what the user needs to see about the existing Secret and tokens.
        o = keep_known_fields(vc, o);
        return Ok((o, Action::await_change()));
    }

    let problems = validation::validate(vc, ctx.validation_options());
    if !problems.is_empty() {
        let o = Outcome::new(Phase::Failed, false, "InvalidSpec", problems.join("; "));
        return Ok((keep_known_fields(vc, o), Action::await_change()));
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
    ctx.secrets.set_reads(ns, &name, reads);

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let creds = match &vc.spec.credentials_ref {
        Some(r) => secrets.get_opt(&r.name).await?,
        None => None,
    };
    let inputs = secret::extract_inputs(vc, creds.as_ref());

    if vc.spec.type_.is_oauth() {
        return ctx.oauth.reconcile(vc, ctx, inputs).await;
    }

    match inputs {
        Inputs::Missing {
            missing_keys,
            message,
        } => Ok((
            pending(vc, ctx, ns, missing_keys, message),
            Action::await_change(),
        )),
        Inputs::Complete(data) => {
            let desired = secret::desired_output_secret(vc, secret::static_outputs(vc, &data));
            match ensure_secret(ctx, vc, &desired, true).await? {
                SecretWrite::Conflict(msg) => Ok((
                    Outcome::new(Phase::Failed, false, "SecretConflict", msg),
                    Action::await_change(),
                )),
                _ => Ok((
                    Outcome::new(
                        Phase::Ready,
                        true,
                        "Reconciled",
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

/// Pending, keeping (and saying so) the last good Secret if there is one.
pub fn pending(
    vc: &VaultConnection,
    ctx: &Context,
    ns: &str,
    missing_keys: Vec<String>,
    message: String,
) -> Outcome {
    let target = vc.target_name();
    let kept = ctx.secrets.managed(ns, &target).is_some()
        && vc.status.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(target.as_str());
    let message = if kept {
        format!("{message}; the last good Secret {ns}/{target} is kept unchanged")
    } else {
        message
    };
    let mut o = Outcome::new(Phase::Pending, false, "CredentialsMissing", message);
    o = keep_known_fields(vc, o);
    o.missing_keys = missing_keys;
    if !kept {
        o.secret_name = None;
    }
    o
}

/// Carry over `secretName` and token fields from the live status into a non-Ready outcome.
pub fn keep_known_fields(vc: &VaultConnection, mut o: Outcome) -> Outcome {
    if let Some(s) = &vc.status {
        o.secret_name = s.secret_name.clone();
        if vc.spec.type_.is_oauth() && o.oauth.is_none() {
            o.oauth = Some(crate::status::OAuthStatus {
                state_secret_name: s.state_secret_name.clone(),
                expires_at: s.expires_at.clone(),
                last_refresh_time: s.last_refresh_time.clone(),
                next_refresh_time: s.next_refresh_time.clone(),
                failed_refresh_attempts: s.failed_refresh_attempts.unwrap_or(0),
                last_failure_reason: s.last_failure_reason.clone(),
            });
        }
    }
    o
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretWrite {
    Unchanged,
    Created,
    Updated,
    Conflict(String),
}

/// Make the live Secret equal `desired`, writing only when it differs and never touching a
/// Secret another object controls.
/// `announce_updates`: publish an Event for updates too (off for routine token rotation, which
/// would otherwise emit an Event per refresh).
pub async fn ensure_secret(
    ctx: &Context,
    vc: &VaultConnection,
    desired: &DesiredSecret,
    announce_updates: bool,
) -> Result<SecretWrite> {
    let ns = &desired.namespace;
    if ctx.secrets.is_verified(
        ns,
        &desired.name,
        vc.metadata.uid.as_deref().unwrap_or_default(),
        desired.content_hash(),
    ) {
        return Ok(SecretWrite::Unchanged);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    // A target the watch has never seen as ours is most likely new: create it straight away
    // (one request instead of a read and a create); 409 means it exists and is looked at below.
    if ctx.secrets.managed(ns, &desired.name).is_none() {
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api.create(&pp, &desired.to_new_secret()).await {
            Ok(created) => {
                ctx.secrets
                    .mark_verified(ns, &desired.name, created.metadata.resource_version);
                ctx.metrics.secret_writes.inc();
                publish(
                    ctx,
                    vc,
                    EventType::Normal,
                    "SecretCreated",
                    format!("Created Secret {ns}/{}", desired.name),
                );
                return Ok(SecretWrite::Created);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let result = match api.get_opt(&desired.name).await? {
        // Deleted between the create attempt (or the index) and this read: try again soon.
        None => {
            return Err(Error::Retry(format!(
                "Secret {ns}/{} changed while writing it",
                desired.name
            )))
        }
        Some(live) => {
            match secret::ownership(vc, &live.metadata) {
                Ownership::Ours => {}
                Ownership::Foreign if vc.adopt() => {}
                Ownership::Foreign => {
                    return Ok(SecretWrite::Conflict(format!(
                        "Secret {ns}/{} already exists and is not managed by vaultconn; set spec.target.adopt: true to take it over, or choose another spec.target.name",
                        desired.name
                    )))
                }
                Ownership::OtherConnection(other) => {
                    return Ok(SecretWrite::Conflict(format!(
                        "Secret {ns}/{} is already managed by VaultConnection {ns}/{other}; two connections cannot share one Secret",
                        desired.name
                    )))
                }
            }
            if desired.matches(&live) {
                ctx.secrets
                    .mark_verified(ns, &desired.name, live.metadata.resource_version);
                SecretWrite::Unchanged
            } else {
                // Replace with the resourceVersion we read: a concurrent writer makes this fail
                // (409) instead of being overwritten blindly.
                let updated = api
                    .replace(
                        &desired.name,
                        &PostParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..Default::default()
                        },
                        &desired.merged_into(&live),
                    )
                    .await?;
                ctx.secrets
                    .mark_verified(ns, &desired.name, updated.metadata.resource_version);
                ctx.metrics.secret_writes.inc();
                if announce_updates {
                    publish(
                        ctx,
                        vc,
                        EventType::Normal,
                        "SecretUpdated",
                        format!("Updated Secret {ns}/{}", desired.name),
                    );
                }
                SecretWrite::Updated
            }
        }
    };
    Ok(result)
}

async fn write_status(vc: &VaultConnection, ctx: &Context, outcome: &Outcome) -> Result<()> {
    let ns = vc.namespace().unwrap_or_default();
    let name = vc.name_any();
    let now = Time(jiff_now());
    let desired = status::desired_status(vc, outcome, now);
    let key = (ns.clone(), name.clone());
    let live = vc.status.clone().unwrap_or_default();
    let last_written = ctx
        .last_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    if desired == live || last_written.as_ref() == Some(&desired) {
        return Ok(());
    }
    let previous_reason = status::current_reason(vc).map(str::to_string);
    let api: Api<VaultConnection> = Api::namespaced(ctx.client.clone(), &ns);
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
    ctx.last_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, desired);
    let first_ready = previous_reason.is_none() && outcome.ready;
    if previous_reason.as_deref() != Some(outcome.reason) && !first_ready {
        let type_ = if outcome.ready
            || outcome.phase == Phase::Pending
            || outcome.phase == Phase::Suspended
        {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(ctx, vc, type_, outcome.reason, outcome.message.clone());
    }
    Ok(())
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// Queue an Event (published in the background; best-effort, see `events`).
pub fn publish(ctx: &Context, vc: &VaultConnection, type_: EventType, reason: &str, note: String) {
    ctx.events.publish(vc.object_ref(&()), type_, reason, note);
}

pub fn error_policy(vc: Arc<VaultConnection>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: error.category().into(),
        })
        .inc();
    warn!(namespace = vc.namespace().unwrap_or_default(), name = %vc.name_any(), category = error.category(), error = %error, "reconcile failed; will retry");
    // Jittered so that many connections failing together (API server restart) spread out.
    let jitter = rand::random::<u64>() % 2000;
    Action::requeue(Duration::from_millis(3000 + jitter))
}
