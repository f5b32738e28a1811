//! Leader election on a `coordination.k8s.io/v1` Lease, and the gate every write asks.
//!
//! `kube-lease-manager` acquires, renews and releases the Lease. It reports when this process
//! becomes or stops being the holder, but not when a renewal fails: a leader cut off from the
//! API server would go on believing it leads after a standby has taken over. So the gate also
//! watches the Lease itself and only opens while the last renewal it *saw* is recent enough that
//! the Lease cannot have expired, minus a safety margin. A leader that cannot renew therefore
//! stops writing before a standby may start (as client-go's leader election does, this assumes
//! clocks agree to within the margin).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::runtime::watcher;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::sync::lock;

/// How often waiting for the gate looks at it (no I/O: it reads memory).
const GATE_POLL: Duration = Duration::from_millis(200);

/// Whether this process may write (Secrets, status, Events) and spend refresh tokens now.
pub struct LeaderGate {
    electing: bool,
    state: std::sync::Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    /// The lease manager says we hold the Lease.
    holder: bool,
    /// Until when the last renewal we observed keeps the Lease ours (minus the margin).
    valid_until: Option<Instant>,
}

impl LeaderGate {
    /// No election: this process is the only writer (local runs, one replica).
    pub fn unelected() -> Arc<Self> {
        Arc::new(LeaderGate {
            electing: false,
            state: Default::default(),
        })
    }

    fn elected() -> Arc<Self> {
        Arc::new(LeaderGate {
            electing: true,
            state: Default::default(),
        })
    }

    pub fn may_write(&self) -> bool {
        self.may_write_at(Instant::now())
    }

    fn may_write_at(&self, now: Instant) -> bool {
        if !self.electing {
            return true;
        }
        let s = lock(&self.state);
        s.holder && s.valid_until.is_some_and(|until| now < until)
    }

    /// Resolves once this process may write.
    pub async fn opened(&self) {
        while !self.may_write() {
            tokio::time::sleep(GATE_POLL).await;
        }
    }

    /// Resolves when this process may no longer write: the Lease went to another holder, or
    /// no renewal was seen in time.
    pub async fn closed(&self) {
        while self.may_write() {
            tokio::time::sleep(GATE_POLL).await;
        }
    }

    fn set_holder(&self, holder: bool) {
        lock(&self.state).holder = holder;
    }

    fn observe(&self, valid_for: Option<Duration>, now: Instant) {
        lock(&self.state).valid_until = valid_for.map(|d| now + d);
    }
}

/// How much longer the Lease as observed keeps `identity` the leader, less `margin`; `None`
/// when it is not ours or already (nearly) expired.
pub fn valid_for(
    spec: &LeaseSpec,
    identity: &str,
    now: Timestamp,
    margin: Duration,
) -> Option<Duration> {
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    let expires = renewed.checked_add(duration).ok()?;
    let left = expires.duration_since(now).unsigned_abs();
    if expires <= now {
        return None;
    }
    left.checked_sub(margin).filter(|d| !d.is_zero())
}

/// Where and how to elect.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
}

impl ElectionConfig {
    /// Whole seconds, at least 3: the manager renews one third before expiry.
    fn duration_secs(&self) -> u64 {
        self.lease_duration.as_secs().max(3)
    }

    /// The gate closes this long before the observed renewal expires.
    fn margin(&self) -> Duration {
        Duration::from_secs(self.duration_secs()).mul_f64(0.2)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("cannot use the leader-election Lease {namespace}/{name}: {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: LeaseManagerError,
    },
}

/// A running election: the gate, and the tasks that keep it up to date.
pub struct Election {
    pub gate: Arc<LeaderGate>,
    forward: JoinHandle<()>,
    observe: JoinHandle<()>,
    manager: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl Election {
    pub async fn start(client: Client, config: ElectionConfig) -> Result<Election, LeaderError> {
        let secs = config.duration_secs();
        let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
            .with_namespace(&config.lease_namespace)
            .with_identity(&config.identity)
            .with_duration(secs)
            .with_grace((secs / 3).max(1))
            .with_field_manager(format!("vaultconn-{}", config.identity))
            .build()
            .await
            .map_err(|source| LeaderError::Lease {
                namespace: config.lease_namespace.clone(),
                name: config.lease_name.clone(),
                source,
            })?;
        let gate = LeaderGate::elected();
        let (mut holder, manager) = manager.watch().await;
        let forward = tokio::spawn({
            let gate = gate.clone();
            async move {
                gate.set_holder(*holder.borrow_and_update());
                while holder.changed().await.is_ok() {
                    let is_holder = *holder.borrow_and_update();
                    info!(leader = is_holder, "leader lease changed hands");
                    gate.set_holder(is_holder);
                }
            }
        });
        let observe = tokio::spawn(observe_lease(client, config.clone(), gate.clone()));
        info!(lease = %format!("{}/{}", config.lease_namespace, config.lease_name), identity = %config.identity, "leader election started");
        Ok(Election {
            gate,
            forward,
            observe,
            manager,
        })
    }

    /// Stop writing, then give the Lease up so that a standby takes over at once instead of
    /// after the lease duration.
    pub async fn release(self, within: Duration) {
        self.gate.set_holder(false);
        self.observe.abort();
        // Dropping the last receiver makes the lease manager release the Lease and return.
        self.forward.abort();
        match tokio::time::timeout(within, self.manager).await {
            Ok(Ok(Ok(_))) => info!("released the leader lease"),
            Ok(Ok(Err(e))) => warn!(error = %e, "could not release the leader lease"),
            Ok(Err(e)) => warn!(error = %e, "the lease manager task failed"),
            Err(_) => warn!("releasing the leader lease timed out"),
        }
    }
}

/// Watch the one Lease and move the gate's deadline with every renewal seen.
async fn observe_lease(client: Client, config: ElectionConfig, gate: Arc<LeaderGate>) {
    let api: Api<Lease> = Api::namespaced(client, &config.lease_namespace);
    let wc = watcher::Config::default().fields(&format!("metadata.name={}", config.lease_name));
    let margin = config.margin();
    let mut events = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(watcher(
        api, wc
    )));
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
                let spec = lease.spec.unwrap_or_default();
                let valid = valid_for(&spec, &config.identity, Timestamp::now(), margin);
                gate.observe(valid, Instant::now());
            }
            Ok(watcher::Event::Delete(_)) => gate.observe(None, Instant::now()),
            Ok(_) => {}
            // The gate's deadline runs out by itself while the watch cannot reach the server.
            Err(e) => warn!(error = %e, "leader lease watch error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    const MARGIN: Duration = Duration::from_secs(3);

    #[test]
    fn a_fresh_renewal_keeps_the_gate_open_until_the_margin_before_expiry() {
        let now = Timestamp::from_second(1_000).unwrap();
        let spec = lease("me", now, 15);
        assert_eq!(
            valid_for(&spec, "me", now, MARGIN),
            Some(Duration::from_secs(12))
        );
        let later = Timestamp::from_second(1_010).unwrap();
        assert_eq!(
            valid_for(&spec, "me", later, MARGIN),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn a_lease_of_another_holder_or_without_renewal_gives_nothing() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(valid_for(&lease("other", now, 15), "me", now, MARGIN), None);
        let mut spec = lease("me", now, 15);
        spec.renew_time = None;
        assert_eq!(valid_for(&spec, "me", now, MARGIN), None);
        spec = lease("me", now, 15);
        spec.lease_duration_seconds = Some(-5);
        assert_eq!(valid_for(&spec, "me", now, MARGIN), None);
    }

    #[test]
    fn within_the_margin_or_after_expiry_the_gate_is_closed() {
        let renewed = Timestamp::from_second(1_000).unwrap();
        let spec = lease("me", renewed, 15);
        for at in [1_012, 1_014, 1_015, 1_100] {
            let now = Timestamp::from_second(at).unwrap();
            assert_eq!(valid_for(&spec, "me", now, MARGIN), None, "at {at}");
        }
    }

    #[test]
    fn the_gate_needs_both_the_holder_flag_and_a_live_deadline() {
        let gate = LeaderGate::elected();
        let now = Instant::now();
        assert!(!gate.may_write_at(now), "closed before anything is known");
        gate.observe(Some(Duration::from_secs(5)), now);
        assert!(!gate.may_write_at(now), "a renewal alone does not open it");
        gate.set_holder(true);
        assert!(gate.may_write_at(now));
        assert!(
            !gate.may_write_at(now + Duration::from_secs(6)),
            "no renewal seen in time: closed although the manager still says holder"
        );
        gate.observe(None, now);
        assert!(!gate.may_write_at(now));
        assert!(LeaderGate::unelected().may_write());
    }
}
