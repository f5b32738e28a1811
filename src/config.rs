//! The operator's configuration: `vaultconn run`'s flags, each with a `VAULTCONN_*` environment
//! fallback, named as users of controller-runtime operators expect (`--leader-elect`,
//! `--metrics-bind-address`, `--health-probe-bind-address`, ...). Parsing only; what the flags
//! mean is decided where they are used.

use std::net::SocketAddr;
use std::time::Duration;

use crate::oauth::token::url_policy::TokenUrlPolicy;

/// Log line format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// Namespaces to watch, comma-separated; empty watches all namespaces (needs a ClusterRole).
    /// With a list, every watch is per namespace, so Roles in those namespaces are enough.
    #[arg(long, env = "VAULTCONN_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Elect a leader on a coordination.k8s.io Lease so that only one replica writes and
    /// refreshes (the chart turns this on; local runs leave it off).
    #[arg(long, env = "VAULTCONN_LEADER_ELECT")]
    pub leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "VAULTCONN_LEASE_NAME", default_value = "vaultconn")]
    pub lease_name: String,

    /// Namespace of the Lease (default: $POD_NAMESPACE, else the kubeconfig's namespace).
    #[arg(long, env = "VAULTCONN_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a Lease stays valid after its last renewal; a standby takes over after this
    /// (e.g. 15s).
    #[arg(long, env = "VAULTCONN_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// Address of /metrics (and of /healthz and /readyz unless --health-probe-bind-address is set).
    #[arg(
        long,
        alias = "metrics-addr",
        env = "VAULTCONN_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_bind_address: SocketAddr,

    /// Separate address for /healthz and /readyz (default: served on the metrics address).
    #[arg(long, env = "VAULTCONN_HEALTH_PROBE_BIND_ADDRESS")]
    pub health_probe_bind_address: Option<SocketAddr>,

    /// Log format.
    #[arg(long, env = "VAULTCONN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Maximum reconciles in flight (per watched namespace).
    #[arg(long, env = "VAULTCONN_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,

    /// Average requests per second to the Kubernetes API (0 = no client-side limit; the API
    /// server's priority and fairness still applies).
    #[arg(long, env = "VAULTCONN_KUBE_API_QPS", default_value_t = 0)]
    pub kube_api_qps: u32,

    /// Requests that may go to the Kubernetes API at once before --kube-api-qps paces them
    /// (default: twice the QPS).
    #[arg(long, env = "VAULTCONN_KUBE_API_BURST")]
    pub kube_api_burst: Option<u32>,

    /// Total time limit of one token request (e.g. 15s).
    #[arg(long, env = "VAULTCONN_TOKEN_REQUEST_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub token_request_timeout: Duration,

    /// On SIGTERM, how long running reconciles and the flush of held token writes may take
    /// before the process exits (the flush always gets at least 5 s); the chart's
    /// terminationGracePeriodSeconds covers it.
    #[arg(long, env = "VAULTCONN_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Hosts and CIDRs allowed as token URLs despite the private-range rule, comma-separated
    /// (e.g. `keycloak.auth.svc.cluster.local,*.corp.internal,10.20.0.0/16`).
    #[arg(
        long,
        env = "VAULTCONN_TOKEN_URL_ALLOW",
        default_value = "",
        hide_default_value = true
    )]
    pub token_url_allow: TokenUrlPolicy,

    /// Allow plain-http token URLs on loopback addresses (tests and local demos only).
    #[arg(long, env = "VAULTCONN_ALLOW_HTTP_LOOPBACK")]
    pub allow_http_loopback: bool,

    /// Address ranges to treat as private networks as well (hidden: end-to-end tests of the
    /// token-URL policy put loopback addresses here, because a test must never contact a real
    /// private address, not even when the policy is broken).
    #[arg(long, value_delimiter = ',', hide = true)]
    pub token_url_private_ranges_for_tests: Vec<ipnet::IpNet>,

    /// This process's name in Events and in the Lease (default: $POD_NAME, else the host name
    /// and process id).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,

    /// $POD_NAMESPACE, set by the chart from the downward API.
    #[arg(long, env = "POD_NAMESPACE", hide = true)]
    pub pod_namespace: Option<String>,

    /// Without a configured cluster, start only the local control plane: no demo connections
    /// and no demo token server.
    #[cfg(feature = "local-cluster")]
    #[arg(long, env = "VAULTCONN_NO_DEMO")]
    pub no_demo: bool,
}

impl RunConfig {
    /// The namespaces to watch: `None` means all of them. Blank entries (a trailing comma, an
    /// empty variable) are ignored, and duplicates collapse.
    pub fn watched_namespaces(&self) -> Option<Vec<String>> {
        let mut list: Vec<String> = self
            .namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        list.sort();
        list.dedup();
        (!list.is_empty()).then_some(list)
    }

    /// The client-side API rate limit as `(requests, per)`: `burst` requests per window of
    /// `burst / qps` seconds, i.e. `qps` on average with bursts of up to `burst`. `None`: off.
    pub fn kube_api_rate(&self) -> Option<(u64, Duration)> {
        if self.kube_api_qps == 0 {
            return None;
        }
        let qps = u64::from(self.kube_api_qps);
        let burst = u64::from(
            self.kube_api_burst
                .unwrap_or(self.kube_api_qps.saturating_mul(2)),
        )
        .max(1);
        Some((burst, Duration::from_secs_f64(burst as f64 / qps as f64)))
    }

    /// The identity in the Lease and in Events: unique per process, so that a restarted
    /// process never mistakes its predecessor's lease or in-flight mark for its own.
    pub fn identity(&self) -> String {
        let base = self.instance.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "vaultconn".to_string())
        });
        format!("{base}_{}", std::process::id())
    }

    /// Where the Lease lives: the flag, else the pod's namespace, else `default_namespace`
    /// (the kubeconfig's).
    pub fn lease_namespace_or(&self, default_namespace: &str) -> String {
        self.lease_namespace
            .clone()
            .or_else(|| self.pod_namespace.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| default_namespace.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunConfig,
    }

    fn parse(args: &[&str]) -> RunConfig {
        Cli::try_parse_from(std::iter::once("vaultconn").chain(args.iter().copied()))
            .expect("parses")
            .run
    }

    #[test]
    fn namespaces_are_a_comma_separated_list_and_empty_means_all() {
        assert_eq!(parse(&[]).watched_namespaces(), None);
        assert_eq!(parse(&["--namespaces", ""]).watched_namespaces(), None);
        assert_eq!(
            parse(&["--namespaces", "b,a, ,b"]).watched_namespaces(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn metrics_addr_stays_an_alias_of_metrics_bind_address() {
        let c = parse(&["--metrics-addr", "127.0.0.1:9"]);
        assert_eq!(c.metrics_bind_address, "127.0.0.1:9".parse().unwrap());
    }

    #[test]
    fn lease_namespace_falls_back_to_the_pod_namespace_then_the_default() {
        let mut c = parse(&[]);
        c.pod_namespace = None;
        assert_eq!(c.lease_namespace_or("kube-ns"), "kube-ns");
        c.pod_namespace = Some("ops".into());
        assert_eq!(c.lease_namespace_or("kube-ns"), "ops");
        c.lease_namespace = Some("lease-ns".into());
        assert_eq!(c.lease_namespace_or("kube-ns"), "lease-ns");
    }

    #[test]
    fn identity_is_unique_per_process_of_one_pod() {
        let mut c = parse(&[]);
        c.instance = Some("vaultconn-7d9f".into());
        assert_eq!(
            c.identity(),
            format!("vaultconn-7d9f_{}", std::process::id())
        );
    }

    #[test]
    fn api_rate_is_off_by_default_and_bursts_twice_the_qps() {
        assert_eq!(parse(&[]).kube_api_rate(), None);
        assert_eq!(
            parse(&["--kube-api-qps", "50"]).kube_api_rate(),
            Some((100, Duration::from_secs(2)))
        );
        assert_eq!(
            parse(&["--kube-api-qps", "20", "--kube-api-burst", "30"]).kube_api_rate(),
            Some((30, Duration::from_millis(1500)))
        );
    }

    #[test]
    fn durations_and_log_format_parse() {
        let c = parse(&["--lease-duration", "20s", "--log-format", "json"]);
        assert_eq!(c.lease_duration, Duration::from_secs(20));
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["vaultconn", "--log-format", "xml"]).is_err());
    }
}
