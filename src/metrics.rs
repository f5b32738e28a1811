//! Prometheus metrics. Labels are bounded: reasons and phases come from fixed sets; the only
//! per-object labels are namespace/name, and each connection has at most one series per
//! metric. Every per-connection series is set here, from the outcome the status shows, and
//! removed here when the connection goes — one owner, so no series outlives its connection.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::api::Phase;
use crate::reason::Reason;
use crate::status::Outcome;
use crate::sync::lock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub namespace: String,
    pub name: String,
    pub phase: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

/// Every phase, for the `vaultconn_connections` series that exist from the start (a dashboard
/// shows 0, not "no data").
const PHASES: [Phase; 4] = [
    Phase::Pending,
    Phase::Ready,
    Phase::Failed,
    Phase::Suspended,
];

pub fn phase_label(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "Pending",
        Phase::Ready => "Ready",
        Phase::Failed => "Failed",
        Phase::Suspended => "Suspended",
    }
}

/// Whether an outcome with this reason has a token request scheduled at its
/// `nextRefreshTime`. The other reasons wait for a change (their status may still carry an
/// older time), so no next-refresh series is exported for them. Exhaustive on purpose: a new
/// reason must decide.
pub fn refresh_scheduled(reason: Reason) -> bool {
    match reason {
        Reason::Reconciled
        | Reason::RefreshRetrying
        | Reason::TokenEndpointUnavailable
        | Reason::RateLimited
        | Reason::TokenEndpointUnreachable
        | Reason::TokenResponseLost
        | Reason::TlsError
        // Refreshes go on while another writer holds the generated Secret.
        | Reason::SecretContested => true,
        Reason::CredentialsMissing
        | Reason::InvalidSpec
        | Reason::SecretConflict
        | Reason::Suspended
        | Reason::InvalidClient
        | Reason::RefreshTokenRejected
        | Reason::RefreshResponseLost
        | Reason::TokenRequestRejected
        | Reason::UnparseableTokenResponse
        | Reason::TokenPersistPending
        | Reason::SecretNotWritable
        | Reason::TokenExpired
        | Reason::CaBundleMissing
        | Reason::InvalidCaBundle
        | Reason::TokenPending
        | Reason::NotLeader
        | Reason::RefreshTokenAdopted
        | Reason::InvalidTokenUrl
        | Reason::ForbiddenTokenEndpoint
        | Reason::TokenEndpointRedirected
        | Reason::TokenClientSetupFailed
        | Reason::StateLost
        | Reason::TokenUrlNotAllowed => false,
    }
}

type Key = (String, String);

/// A connection the watch says exists, and what this process last reported for it.
struct Live {
    uid: String,
    reported: Option<(Phase, Reason)>,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub refresh_attempts: Counter,
    pub refresh_successes: Counter,
    pub refresh_failures: Family<ReasonLabel, Counter>,
    pub refresh_duration: Histogram,
    pub secret_writes: Counter,
    pub events_dropped: Counter,
    token_expiry: Family<ConnectionLabel, Gauge>,
    connection_ready: Family<ConnectionLabel, Gauge>,
    next_refresh: Family<ConnectionLabel, Gauge>,
    connection_status: Family<StatusLabel, Gauge>,
    connections: Family<PhaseLabel, Gauge>,
    leader: Gauge,
    /// Connections known to exist (by UID). A reconcile that finishes after its connection
    /// was deleted must not bring the series back, so reports for unknown UIDs are dropped;
    /// the same lock orders a report and a removal.
    live: Mutex<HashMap<Key, Live>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vaultconn");
        let m = Metrics {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            refresh_attempts: Counter::default(),
            refresh_successes: Counter::default(),
            refresh_failures: Family::default(),
            refresh_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            secret_writes: Counter::default(),
            events_dropped: Counter::default(),
            token_expiry: Family::default(),
            connection_ready: Family::default(),
            next_refresh: Family::default(),
            connection_status: Family::default(),
            connections: Family::default(),
            leader: Gauge::default(),
            live: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconciles run", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error category",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile (including token requests and writes)",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "token_refresh_attempts",
            "Token requests sent to token endpoints",
            m.refresh_attempts.clone(),
        );
        registry.register(
            "token_refresh_successes",
            "Token requests that returned a token",
            m.refresh_successes.clone(),
        );
        registry.register(
            "token_refresh_failures",
            "Token requests that failed, by status reason",
            m.refresh_failures.clone(),
        );
        registry.register(
            "token_refresh_duration_seconds",
            "Latency of token requests",
            m.refresh_duration.clone(),
        );
        registry.register(
            "token_expiry_timestamp_seconds",
            "Expiry (Unix time) of the access token in each OAuth connection's Secret",
            m.token_expiry.clone(),
        );
        registry.register(
            "secret_writes",
            "Secret creates and updates made by the operator",
            m.secret_writes.clone(),
        );
        registry.register(
            "events_dropped",
            "Events not published because the event queue was full",
            m.events_dropped.clone(),
        );
        registry.register(
            "connection_ready",
            "1 if the connection's Ready condition is True, else 0",
            m.connection_ready.clone(),
        );
        registry.register(
            "connection_status",
            "1 for the connection's current phase and Ready reason (one series per connection)",
            m.connection_status.clone(),
        );
        registry.register(
            "connection_next_refresh_timestamp_seconds",
            "When (Unix time) the next token request of an OAuth connection is scheduled",
            m.next_refresh.clone(),
        );
        registry.register("connections", "Connections by phase", m.connections.clone());
        registry.register(
            "leader",
            "1 if this process leads (or leader election is off), else 0",
            m.leader.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version label names the running build",
            build_info,
        );
        for p in PHASES {
            m.connections.get_or_create(&phase_of(p)).set(0);
        }
        m.leader.set(1);
        Metrics { registry, ..m }
    }
}

fn phase_of(p: Phase) -> PhaseLabel {
    PhaseLabel {
        phase: phase_label(p).to_string(),
    }
}

fn connection(key: &Key) -> ConnectionLabel {
    ConnectionLabel {
        namespace: key.0.clone(),
        name: key.1.clone(),
    }
}

fn status_of(key: &Key, phase: Phase, reason: Reason) -> StatusLabel {
    StatusLabel {
        namespace: key.0.clone(),
        name: key.1.clone(),
        phase: phase_label(phase).to_string(),
        reason: reason.metric_label().to_string(),
    }
}

fn unix_seconds(rfc3339: Option<&str>) -> Option<i64> {
    rfc3339
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .map(|t| t.as_second())
}

impl Metrics {
    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn failure(&self, reason: &str) {
        self.refresh_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Whether this process leads (leader election) or may write anyway (election off).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The watch saw connection `uid` at `namespace/name`. A different UID under the same key
    /// means the old one was deleted without us seeing it: its series go first.
    pub fn connection_seen(&self, namespace: &str, name: &str, uid: &str) {
        let key: Key = (namespace.to_string(), name.to_string());
        let mut live = lock(&self.live);
        if live.get(&key).is_some_and(|l| l.uid != uid) {
            self.remove_series(&key, live.remove(&key));
        }
        live.entry(key).or_insert_with(|| Live {
            uid: uid.to_string(),
            reported: None,
        });
    }

    /// The connection is gone: every series it had goes, and its phase is no longer counted.
    pub fn connection_gone(&self, namespace: &str, name: &str) {
        let key: Key = (namespace.to_string(), name.to_string());
        let mut live = lock(&self.live);
        let gone = live.remove(&key);
        self.remove_series(&key, gone);
    }

    /// The connections the watch says exist, in `namespace` or in all (to find those deleted
    /// while the watch of that scope was down).
    pub fn live_connections(&self, namespace: Option<&str>) -> HashSet<Key> {
        lock(&self.live)
            .keys()
            .filter(|(ns, _)| namespace.is_none_or(|n| n == ns))
            .cloned()
            .collect()
    }

    /// Report the outcome the status of connection `uid` now shows. Ignored unless the watch
    /// knows the connection (it may have been deleted while the reconcile ran).
    pub fn report(&self, namespace: &str, name: &str, uid: &str, outcome: &Outcome) {
        let key: Key = (namespace.to_string(), name.to_string());
        let mut live = lock(&self.live);
        let Some(entry) = live.get_mut(&key).filter(|l| l.uid == uid) else {
            return;
        };
        let now = (outcome.phase, outcome.reason);
        if entry.reported != Some(now) {
            if let Some((phase, reason)) = entry.reported {
                self.connection_status
                    .remove(&status_of(&key, phase, reason));
                self.connections.get_or_create(&phase_of(phase)).dec();
            }
            self.connection_status
                .get_or_create(&status_of(&key, now.0, now.1))
                .set(1);
            self.connections.get_or_create(&phase_of(now.0)).inc();
            entry.reported = Some(now);
        }
        let label = connection(&key);
        self.connection_ready
            .get_or_create(&label)
            .set(i64::from(outcome.ready));
        let oauth = outcome.oauth.as_ref();
        match unix_seconds(oauth.and_then(|o| o.expires_at.as_deref())) {
            Some(t) => {
                self.token_expiry.get_or_create(&label).set(t);
            }
            None => {
                self.token_expiry.remove(&label);
            }
        }
        let next = oauth
            .filter(|_| refresh_scheduled(outcome.reason))
            .and_then(|o| unix_seconds(o.next_refresh_time.as_deref()));
        match next {
            Some(t) => {
                self.next_refresh.get_or_create(&label).set(t);
            }
            None => {
                self.next_refresh.remove(&label);
            }
        }
    }

    fn remove_series(&self, key: &Key, gone: Option<Live>) {
        if let Some((phase, reason)) = gone.and_then(|l| l.reported) {
            self.connection_status
                .remove(&status_of(key, phase, reason));
            self.connections.get_or_create(&phase_of(phase)).dec();
        }
        let label = connection(key);
        self.connection_ready.remove(&label);
        self.token_expiry.remove(&label);
        self.next_refresh.remove(&label);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::OAuthStatus;

    fn oauth_outcome(reason: Reason) -> Outcome {
        let mut o = Outcome::new(reason, "m");
        o.oauth = Some(OAuthStatus {
            expires_at: Some("2030-01-01T01:00:00Z".into()),
            next_refresh_time: Some("2030-01-01T00:40:00Z".into()),
            ..Default::default()
        });
        o
    }

    /// `name{labels} value` lines of the encoded text that mention `needle`.
    fn lines_with(m: &Metrics, needle: &str) -> Vec<String> {
        m.encode()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    fn phase_count(m: &Metrics, phase: &str) -> String {
        let prefix = format!("vaultconn_connections{{phase=\"{phase}\"}} ");
        m.encode()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_default()
    }

    #[test]
    fn a_ready_oauth_connection_has_all_its_series_and_deletion_removes_them() {
        let m = Metrics::default();
        m.connection_seen("ns", "api", "u1");
        m.report("ns", "api", "u1", &oauth_outcome(Reason::Reconciled));
        let text = m.encode();
        for line in [
            "vaultconn_connection_ready{namespace=\"ns\",name=\"api\"} 1",
            "vaultconn_token_expiry_timestamp_seconds{namespace=\"ns\",name=\"api\"} 1893459600",
            "vaultconn_connection_next_refresh_timestamp_seconds{namespace=\"ns\",name=\"api\"} 1893458400",
            "vaultconn_connection_status{namespace=\"ns\",name=\"api\",phase=\"Ready\",reason=\"Reconciled\"} 1",
            "vaultconn_connections{phase=\"Ready\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        m.connection_gone("ns", "api");
        assert_eq!(lines_with(&m, "name=\"api\""), Vec::<String>::new());
        assert_eq!(phase_count(&m, "Ready"), "0");
    }

    #[test]
    fn phase_counts_follow_phase_changes_and_each_connection_has_one_status_series() {
        let m = Metrics::default();
        m.connection_seen("ns", "a", "ua");
        m.connection_seen("ns", "b", "ub");
        m.report(
            "ns",
            "a",
            "ua",
            &Outcome::new(Reason::CredentialsMissing, "m"),
        );
        m.report(
            "ns",
            "b",
            "ub",
            &Outcome::new(Reason::CredentialsMissing, "m"),
        );
        assert_eq!(phase_count(&m, "Pending"), "2");
        m.report("ns", "a", "ua", &Outcome::new(Reason::Reconciled, "m"));
        // The same outcome again counts nothing twice.
        m.report("ns", "a", "ua", &Outcome::new(Reason::Reconciled, "m"));
        assert_eq!(phase_count(&m, "Pending"), "1");
        assert_eq!(phase_count(&m, "Ready"), "1");
        assert_eq!(phase_count(&m, "Failed"), "0");
        assert_eq!(phase_count(&m, "Suspended"), "0");
        m.report("ns", "a", "ua", &Outcome::new(Reason::InvalidSpec, "m"));
        assert_eq!(
            lines_with(&m, "vaultconn_connection_status{namespace=\"ns\",name=\"a\""),
            ["vaultconn_connection_status{namespace=\"ns\",name=\"a\",phase=\"Failed\",reason=\"InvalidSpec\"} 1"]
        );
        assert_eq!(phase_count(&m, "Ready"), "0");
        assert_eq!(phase_count(&m, "Failed"), "1");
        m.connection_gone("ns", "b");
        assert_eq!(phase_count(&m, "Pending"), "0");
    }

    #[test]
    fn a_report_after_deletion_brings_nothing_back() {
        let m = Metrics::default();
        m.connection_seen("ns", "api", "u1");
        m.connection_gone("ns", "api");
        // A reconcile that started before the delete finishes now.
        m.report("ns", "api", "u1", &oauth_outcome(Reason::Reconciled));
        assert_eq!(lines_with(&m, "name=\"api\""), Vec::<String>::new());
        assert_eq!(phase_count(&m, "Ready"), "0");
    }

    #[test]
    fn recreated_under_the_same_name_the_old_series_go() {
        let m = Metrics::default();
        m.connection_seen("ns", "api", "u1");
        m.report("ns", "api", "u1", &oauth_outcome(Reason::Reconciled));
        // The delete was missed (watch down); the new object has a new UID.
        m.connection_seen("ns", "api", "u2");
        assert_eq!(lines_with(&m, "name=\"api\""), Vec::<String>::new());
        assert_eq!(phase_count(&m, "Ready"), "0");
        // A late report for the old object is ignored; the new one counts.
        m.report("ns", "api", "u1", &oauth_outcome(Reason::Reconciled));
        assert_eq!(phase_count(&m, "Ready"), "0");
        m.report(
            "ns",
            "api",
            "u2",
            &Outcome::new(Reason::CredentialsMissing, "m"),
        );
        assert_eq!(phase_count(&m, "Pending"), "1");
    }

    #[test]
    fn next_refresh_only_while_a_token_request_is_scheduled() {
        let m = Metrics::default();
        m.connection_seen("ns", "api", "u1");
        m.report("ns", "api", "u1", &oauth_outcome(Reason::RefreshRetrying));
        assert_eq!(lines_with(&m, "next_refresh_timestamp_seconds{").len(), 1);
        // Suspended keeps the status' old nextRefreshTime, but nothing is scheduled.
        m.report("ns", "api", "u1", &oauth_outcome(Reason::Suspended));
        assert_eq!(lines_with(&m, "next_refresh_timestamp_seconds{").len(), 0);
        assert_eq!(
            lines_with(&m, "vaultconn_connection_ready{"),
            ["vaultconn_connection_ready{namespace=\"ns\",name=\"api\"} 0"]
        );
        // The token in the Secret still expires, suspended or not.
        assert_eq!(lines_with(&m, "token_expiry_timestamp_seconds{").len(), 1);
        // A non-OAuth outcome has neither.
        m.report("ns", "api", "u1", &Outcome::new(Reason::Reconciled, "m"));
        assert_eq!(lines_with(&m, "token_expiry_timestamp_seconds{").len(), 0);
    }

    #[test]
    fn live_connections_of_a_scope() {
        let m = Metrics::default();
        m.connection_seen("a", "x", "u1");
        m.connection_seen("b", "y", "u2");
        let key = |ns: &str, n: &str| (ns.to_string(), n.to_string());
        assert_eq!(
            m.live_connections(Some("a")),
            HashSet::from([key("a", "x")])
        );
        assert_eq!(
            m.live_connections(None),
            HashSet::from([key("a", "x"), key("b", "y")])
        );
        m.connection_gone("a", "x");
        assert!(m.live_connections(Some("a")).is_empty());
    }

    #[test]
    fn leader_and_build_info() {
        let m = Metrics::default();
        let text = m.encode();
        assert!(text.contains("vaultconn_leader 1\n"), "{text}");
        let build = format!(
            "vaultconn_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        m.set_leader(false);
        assert!(m.encode().contains("vaultconn_leader 0\n"));
    }
}
