//! The operator process: optional leader election around the controller, in the order a
//! rolling update needs. A standby runs no controller and writes nothing; the leader runs the
//! controller until SIGTERM (then flushes pending token writes and releases the Lease, so a
//! standby takes over at once) or until it loses the Lease (then it exits non-zero and its pod
//! restarts as a standby: a process that lost the lease never resumes writing by itself).

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kube::Client;
use tracing::{error, info};

use crate::config::RunConfig;
use crate::controller::{self, ControllerConfig};
use crate::error::{Error, Result};
use crate::http::Health;
use crate::leader::{Election, ElectionConfig, LeaderGate};
use crate::metrics::Metrics;

/// How long releasing the Lease may take on shutdown.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl From<&RunConfig> for ControllerConfig {
    fn from(c: &RunConfig) -> Self {
        ControllerConfig {
            allow_http_loopback: c.allow_http_loopback,
            instance: c.instance.clone(),
            concurrency: c.concurrency,
            token_request_timeout: c.token_request_timeout,
            namespaces: c.watched_namespaces(),
            shutdown_timeout: c.shutdown_timeout,
            identity: c.identity(),
            token_url_policy: c
                .token_url_allow
                .clone()
                .with_private_ranges(c.token_url_private_ranges_for_tests.iter().copied()),
        }
    }
}

/// Kubernetes minor versions this release is tested against (1.20, the test control plane)
/// up to the newest API its client library knows (k8s-openapi 0.29: 1.35).
const SUPPORTED_MINORS: std::ops::RangeInclusive<u32> = 20..=35;

/// Whether the API server's reported version is one we support (`None`: unparseable).
pub fn version_supported(major: &str, minor: &str) -> Option<bool> {
    // Managed clusters report minors like "27+".
    let minor: u32 = minor.trim_end_matches('+').parse().ok()?;
    Some(major == "1" && SUPPORTED_MINORS.contains(&minor))
}

async fn log_server_version(client: &Client) {
    match client.apiserver_version().await {
        Ok(v) => match version_supported(&v.major, &v.minor) {
            Some(true) => info!(version = %v.git_version, "connected to the API server"),
            _ => tracing::warn!(
                version = %v.git_version,
                "this Kubernetes version is outside the supported range 1.{}–1.{}",
                SUPPORTED_MINORS.start(),
                SUPPORTED_MINORS.end()
            ),
        },
        Err(e) => tracing::warn!(error = %e, "could not read the API server version"),
    }
}

pub async fn run(
    client: Client,
    config: &RunConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    log_server_version(&client).await;
    let controller_config = ControllerConfig::from(config);
    if let Some(ns) = &controller_config.namespaces {
        info!(namespaces = %ns.join(","), "watching only these namespaces");
    }
    if !config.leader_elect {
        let gate = LeaderGate::unelected();
        return controller::run(client, controller_config, metrics, gate, health, shutdown).await;
    }
    let election = Election::start(
        client.clone(),
        ElectionConfig {
            lease_name: config.lease_name.clone(),
            lease_namespace: config.lease_namespace_or(client.default_namespace()),
            identity: controller_config.identity.clone(),
            lease_duration: config.lease_duration,
        },
    )
    .await?;
    let shutdown = shutdown.shared();
    // Standing by is a correct, ready state: a rolling update may proceed.
    metrics.set_leader(false);
    health.set_ready(true);
    tokio::select! {
        _ = election.gate.opened() => {}
        _ = shutdown.clone() => {
            health.set_ready(false);
            election.release(RELEASE_TIMEOUT).await;
            return Ok(());
        }
    }
    info!("leading: starting the controller");
    metrics.set_leader(true);
    health.set_ready(false);
    let gate = election.gate.clone();
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = {
        let gate = gate.clone();
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = gate.closed() => { let _ = lost_tx.send(()); }
            }
        }
    };
    let result = controller::run(
        client,
        controller_config,
        metrics.clone(),
        gate,
        health,
        stop,
    )
    .await;
    metrics.set_leader(false);
    if let Ok(()) = lost_rx.await {
        error!("lost the leader lease: stopped writing; exiting so that this replica restarts as a standby");
        return Err(Error::NotLeader);
    }
    election.release(RELEASE_TIMEOUT).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_versions_include_the_test_cluster_and_current_releases() {
        assert_eq!(version_supported("1", "20"), Some(true));
        assert_eq!(version_supported("1", "33"), Some(true));
        assert_eq!(
            version_supported("1", "27+"),
            Some(true),
            "managed clusters"
        );
        assert_eq!(version_supported("1", "19"), Some(false));
        assert_eq!(version_supported("1", "36"), Some(false));
        assert_eq!(version_supported("2", "0"), Some(false));
        assert_eq!(version_supported("1", "x"), None);
    }
}
