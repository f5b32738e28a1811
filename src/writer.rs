//! The one Secret writer (I/O edge): create, replace-if-unchanged, dry run, and guarded writes,
//! each behind the single pure ownership check [`secret::write_conflict`]. It also carries what
//! every write touches: the Secret index (our own writes are not echoed back as work), the
//! Event queue and the metrics. The controller and the OAuth engine both write through it, so
//! neither needs the other's state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;
use kube::{Client, Resource};
use tracing::warn;

use crate::api::VaultConnection;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::leader::LeaderGate;
use crate::metrics::Metrics;
use crate::names::FIELD_MANAGER;
use crate::repair::{self, RepairHistory, UserInputs, Verdict};
use crate::secret::{self, DesiredSecret};
use crate::secret_index::SecretIndex;
use crate::sync::lock;

/// What [`SecretWriter::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretWrite {
    Unchanged,
    Created,
    Updated,
    /// Another object controls the Secret; nothing was written. The message says which.
    Conflict(String),
    /// Another writer keeps changing the Secret and the repair budget is spent (see
    /// `repair`): nothing was written. The message says so; try again at `retry_at`.
    Contested {
        message: String,
        retry_at: jiff::Timestamp,
    },
}

/// How another writer undid the state Secret (see [`SecretWriter::may_repair_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFight {
    /// Its data was put back to older content.
    RolledBack,
    /// It was deleted.
    Deleted,
}

/// Which of a connection's Secrets a repair history is about (see `repair`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Repairing {
    /// The generated Secret: repairs are writes.
    Target,
    /// The state Secret: repairs are token requests a rollback of it asks for.
    State,
}

/// (namespace, connection, which Secret)
type RepairKey = (String, String, Repairing);

/// What a dry run says about a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DryRun {
    Accepted,
    /// Another object controls the Secret (see [`secret::write_conflict`]).
    Conflict(String),
    /// The API server would refuse it (RBAC, admission, size).
    Refused(String),
}

/// Why a guarded write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum GuardedWriteError {
    /// The API server refuses the write for good (RBAC, admission, size, ownership).
    #[error("{0}")]
    NotWritable(String),
    /// The live Secret no longer satisfies the caller's precondition: someone else wrote it.
    #[error("the Secret changed concurrently")]
    Concurrent,
    /// This process does not hold the leader lease and the write was not guarded.
    #[error("not the leader: writes are fenced")]
    NotLeader,
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// HTTP statuses that mean "this write will not be accepted as it is", as opposed to conflicts
/// and server trouble, which a retry can fix.
fn refused(code: u16) -> bool {
    matches!(code, 400 | 403 | 413 | 422)
}

pub struct SecretWriter {
    client: Client,
    pub index: SecretIndex,
    events: EventSink,
    pub metrics: Arc<Metrics>,
    /// Asked before every write: only the leader writes (see `leader`).
    pub gate: Arc<LeaderGate>,
    /// Repair history of each connection's generated Secret, with the connection's UID (a
    /// re-created connection starts afresh). Kept in memory: a restart forgets it, which costs
    /// at most one budget per start; keeping it in the cluster would take writes to an object
    /// under contention, or to the status on every repair.
    repairs: Mutex<HashMap<RepairKey, (String, RepairHistory)>>,
}

impl SecretWriter {
    pub fn new(
        client: Client,
        events: EventSink,
        metrics: Arc<Metrics>,
        gate: Arc<LeaderGate>,
    ) -> Self {
        SecretWriter {
            client,
            index: SecretIndex::default(),
            events,
            metrics,
            gate,
            repairs: Mutex::default(),
        }
    }

    /// What the user controls of `vc` now (its generation, its credentials Secret): a change
    /// gives its Secrets a new repair budget.
    pub fn note_user_inputs(&self, vc: &VaultConnection, credentials: Option<&Secret>) {
        let inputs = UserInputs {
            generation: vc.metadata.generation,
            credentials_version: credentials.and_then(|s| s.metadata.resource_version.clone()),
        };
        for role in [Repairing::Target, Repairing::State] {
            self.update_history(vc, role, |h| h.with_inputs(inputs.clone()));
        }
    }

    /// Drop the repair histories of a deleted connection.
    pub fn forget_repairs(&self, namespace: &str, name: &str) {
        let mut repairs = lock(&self.repairs);
        for role in [Repairing::Target, Repairing::State] {
            repairs.remove(&(namespace.to_string(), name.to_string(), role));
        }
    }

    fn history_key(vc: &VaultConnection, role: Repairing) -> RepairKey {
        (
            vc.metadata.namespace.clone().unwrap_or_default(),
            vc.metadata.name.clone().unwrap_or_default(),
            role,
        )
    }

    fn history(&self, vc: &VaultConnection, role: Repairing) -> RepairHistory {
        let uid = vc.metadata.uid.as_deref().unwrap_or_default();
        match lock(&self.repairs).get(&Self::history_key(vc, role)) {
            Some((u, h)) if u == uid => h.clone(),
            _ => RepairHistory::default(),
        }
    }

    fn set_history(&self, vc: &VaultConnection, role: Repairing, h: RepairHistory) {
        let uid = vc.metadata.uid.clone().unwrap_or_default();
        lock(&self.repairs).insert(Self::history_key(vc, role), (uid, h));
    }

    fn update_history(
        &self,
        vc: &VaultConnection,
        role: Repairing,
        f: impl FnOnce(RepairHistory) -> RepairHistory,
    ) {
        let h = f(self.history(vc, role));
        self.set_history(vc, role, h);
    }

    /// Another writer rolled the state Secret back from, or deleted, what this process stored
    /// (content hash `stored`), and putting it back needs a write (or, for a rollback, a token
    /// request ours did not): may that go ahead? `Some((message, retry_at))` when the budget is
    /// spent.
    pub fn may_repair_state(
        &self,
        vc: &VaultConnection,
        stored: &str,
        fight: StateFight,
    ) -> Option<(String, jiff::Timestamp)> {
        let now = jiff::Timestamp::now();
        let history = self.history(vc, Repairing::State).known_good(stored);
        let (verdict, next) = history.decide(&repair::POLICY, stored, now);
        self.set_history(vc, Repairing::State, next);
        let Verdict::Blocked {
            until,
            repairs,
            started,
        } = verdict
        else {
            return None;
        };
        let ns = vc.metadata.namespace.as_deref().unwrap_or_default();
        let name = crate::names::state_secret_name(vc.metadata.name.as_deref().unwrap_or_default());
        let message = match fight {
            StateFight::RolledBack => {
                if started {
                    warn!(namespace = %ns, secret = %name, repairs, retry_at = %until, "another writer keeps rolling the token state Secret back; no token is requested for that until the backoff passes");
                }
                repair::state_contested_message(ns, &name, &repair::POLICY, repairs, until)
            }
            StateFight::Deleted => {
                if started {
                    warn!(namespace = %ns, secret = %name, repairs, retry_at = %until, "another writer keeps deleting the token state Secret; it is not written again until the backoff passes (tokens are held in memory)");
                }
                repair::state_deleted_message(ns, &name, &repair::POLICY, repairs, until)
            }
        };
        Some((message, until))
    }

    /// The generated Secret does not hold `desired`: may it be written now? `Err` carries the
    /// `Contested` answer; `Ok` the history to keep once the write succeeded.
    fn may_repair(
        &self,
        vc: &VaultConnection,
        desired: &DesiredSecret,
    ) -> std::result::Result<RepairHistory, SecretWrite> {
        let now = jiff::Timestamp::now();
        let (verdict, next) = self.history(vc, Repairing::Target).decide(
            &repair::POLICY,
            desired.content_hash(),
            now,
        );
        match verdict {
            Verdict::Write | Verdict::Repair => Ok(next.known_good(desired.content_hash())),
            Verdict::Blocked {
                until,
                repairs,
                started,
            } => {
                self.set_history(vc, Repairing::Target, next);
                let (ns, name) = (&desired.namespace, &desired.name);
                if started {
                    warn!(namespace = %ns, secret = %name, repairs, retry_at = %until, "another writer keeps changing the generated Secret; repairs stop until the backoff passes");
                }
                let message = repair::contested_message(ns, name, &repair::POLICY, repairs, until);
                Err(SecretWrite::Contested {
                    message,
                    retry_at: until,
                })
            }
        }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Whether `vc`'s target Secret exists, is ours, and the status already names it: then a
    /// connection that loses its credentials keeps serving the last good Secret.
    pub fn last_good_kept(&self, vc: &VaultConnection) -> bool {
        let ns = vc.metadata.namespace.as_deref().unwrap_or_default();
        let target = vc.target_name();
        self.index.managed(ns, &target).is_some()
            && vc.status.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(target.as_str())
    }

    fn api(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// A live read (never from a cache: used where a stale copy would replay a token).
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Option<Secret>> {
        Ok(self.api(namespace).get_opt(name).await?)
    }

    /// Queue an Event about `vc` (published in the background; best-effort, see `events`).
    pub fn publish(&self, vc: &VaultConnection, type_: EventType, reason: &str, note: String) {
        if !self.gate.may_write() {
            return;
        }
        self.events.publish(vc.object_ref(&()), type_, reason, note);
    }

    fn params(dry_run: bool) -> PostParams {
        PostParams {
            dry_run,
            field_manager: Some(FIELD_MANAGER.into()),
        }
    }

    /// Make the live Secret equal `desired`, writing only when it differs and never touching a
    /// Secret another object controls. `announce_updates`: publish an Event for updates too
    /// (off for routine token rotation, which would otherwise emit an Event per refresh).
    pub async fn ensure(
        &self,
        vc: &VaultConnection,
        desired: &DesiredSecret,
        announce_updates: bool,
    ) -> Result<SecretWrite> {
        let ns = &desired.namespace;
        let uid = vc.metadata.uid.as_deref().unwrap_or_default();
        if !self.gate.may_write() {
            return Err(Error::NotLeader);
        }
        if self
            .index
            .is_verified(ns, &desired.name, uid, desired.content_hash())
        {
            self.update_history(vc, Repairing::Target, |h| {
                h.known_good(desired.content_hash())
            });
            return Ok(SecretWrite::Unchanged);
        }
        // A target the watch has never seen as ours is most likely new: create it straight
        // away (one request instead of a read and a create); 409 means it exists. Only once
        // the watch has listed everything: right after a start, every existing Secret is
        // still "unseen", and a create-first would be a write (answered 409) per connection;
        // then read first and create only what is really missing.
        let create_first =
            self.index.is_synced() && self.index.managed(ns, &desired.name).is_none();
        if create_first {
            if let Some(created) = self.create(vc, desired).await? {
                return Ok(created);
            }
        }
        let Some(live) = self.get(ns, &desired.name).await? else {
            return match self.create(vc, desired).await? {
                Some(created) => Ok(created),
                // Created and deleted by someone else around our requests: look again soon.
                None => Err(Error::Retry(format!(
                    "Secret {ns}/{} changed while writing it",
                    desired.name
                ))),
            };
        };
        self.update_if_needed(vc, desired, live, announce_updates)
            .await
    }

    /// Create `desired` (within the repair budget: a Secret this process wrote before was
    /// deleted); `None` when it already exists (409).
    async fn create(
        &self,
        vc: &VaultConnection,
        desired: &DesiredSecret,
    ) -> Result<Option<SecretWrite>> {
        let ns = &desired.namespace;
        let after = match self.may_repair(vc, desired) {
            Ok(h) => h,
            Err(contested) => return Ok(Some(contested)),
        };
        match self
            .api(ns)
            .create(&Self::params(false), &desired.to_new_secret())
            .await
        {
            Ok(created) => {
                self.set_history(vc, Repairing::Target, after);
                self.written(desired, created.metadata.resource_version);
                let note = format!("Created Secret {ns}/{}", desired.name);
                self.publish(vc, EventType::Normal, "SecretCreated", note);
                Ok(Some(SecretWrite::Created))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Make `live` equal `desired` unless another object controls it.
    async fn update_if_needed(
        &self,
        vc: &VaultConnection,
        desired: &DesiredSecret,
        live: Secret,
        announce_updates: bool,
    ) -> Result<SecretWrite> {
        let ns = &desired.namespace;
        if let Some(msg) = secret::write_conflict(vc, desired, &live) {
            return Ok(SecretWrite::Conflict(msg));
        }
        if desired.matches(&live) {
            self.index
                .mark_verified(ns, &desired.name, live.metadata.resource_version);
            self.update_history(vc, Repairing::Target, |h| {
                h.known_good(desired.content_hash())
            });
            return Ok(SecretWrite::Unchanged);
        }
        let after = match self.may_repair(vc, desired) {
            Ok(h) => h,
            Err(contested) => return Ok(contested),
        };
        // Replace with the resourceVersion we read: a concurrent writer makes this fail (409)
        // instead of being overwritten blindly.
        let updated = self
            .api(ns)
            .replace(
                &desired.name,
                &Self::params(false),
                &desired.merged_into(&live),
            )
            .await?;
        self.set_history(vc, Repairing::Target, after);
        self.written(desired, updated.metadata.resource_version);
        if announce_updates {
            let note = format!("Updated Secret {ns}/{}", desired.name);
            self.publish(vc, EventType::Normal, "SecretUpdated", note);
        }
        Ok(SecretWrite::Updated)
    }

    /// Our own write: its watch event need not wake the connection again.
    fn written(&self, desired: &DesiredSecret, resource_version: Option<String>) {
        self.index
            .mark_verified(&desired.namespace, &desired.name, resource_version);
        self.metrics.secret_writes.inc();
    }

    /// Dry-run the write of `desired` (create or replace) and check ownership, without
    /// changing anything.
    pub async fn dry_run(&self, vc: &VaultConnection, desired: &DesiredSecret) -> Result<DryRun> {
        let api = self.api(&desired.namespace);
        let pp = Self::params(true);
        let res = match api.get_opt(&desired.name).await? {
            None => api.create(&pp, &desired.to_new_secret()).await.map(|_| ()),
            Some(live) => {
                if let Some(msg) = secret::write_conflict(vc, desired, &live) {
                    return Ok(DryRun::Conflict(msg));
                }
                api.replace(&desired.name, &pp, &desired.merged_into(&live))
                    .await
                    .map(|_| ())
            }
        };
        match res {
            Ok(()) => Ok(DryRun::Accepted),
            Err(kube::Error::Api(e)) if refused(e.code) => Ok(DryRun::Refused(format!(
                "writing Secret {}/{} would be refused by the API server ({} {})",
                desired.namespace, desired.name, e.code, e.reason
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// One attempt to write `desired` if the live Secret passes `precondition` (and the
    /// ownership check): read it, then create it or replace it conditional on the
    /// resourceVersion just read (a 409 means someone wrote in between). Unchanged content is
    /// not written again.
    pub async fn write_guarded(
        &self,
        vc: &VaultConnection,
        desired: &DesiredSecret,
        precondition: impl FnOnce(&Secret) -> bool,
    ) -> std::result::Result<(), GuardedWriteError> {
        let api = self.api(&desired.namespace);
        let pp = Self::params(false);
        let res = match api.get_opt(&desired.name).await? {
            None => api
                .create(&pp, &desired.to_new_secret())
                .await
                .map(|s| s.metadata.resource_version),
            Some(live) => {
                if let Some(msg) = secret::write_conflict(vc, desired, &live) {
                    return Err(GuardedWriteError::NotWritable(msg));
                }
                if !precondition(&live) {
                    return Err(GuardedWriteError::Concurrent);
                }
                if desired.matches(&live) {
                    self.index.mark_verified(
                        &desired.namespace,
                        &desired.name,
                        live.metadata.resource_version,
                    );
                    return Ok(());
                }
                api.replace(&desired.name, &pp, &desired.merged_into(&live))
                    .await
                    .map(|s| s.metadata.resource_version)
            }
        };
        match res {
            Ok(rv) => {
                self.written(desired, rv);
                Ok(())
            }
            Err(kube::Error::Api(e)) if refused(e.code) => {
                Err(GuardedWriteError::NotWritable(format!(
                    "writing Secret {}/{} is refused by the API server ({} {})",
                    desired.namespace, desired.name, e.code, e.reason
                )))
            }
            Err(e) => Err(e.into()),
        }
    }
}
