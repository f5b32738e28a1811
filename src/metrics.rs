//! Prometheus metrics. Labels are bounded: reasons come from fixed sets; the only per-object
//! labels are namespace/name on the expiry gauge (one series per OAuth connection).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    pub namespace: String,
    pub name: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub refresh_attempts: Counter,
    pub refresh_successes: Counter,
    pub refresh_failures: Family<ReasonLabel, Counter>,
    pub refresh_duration: Histogram,
    pub token_expiry: Family<ConnectionLabel, Gauge>,
    pub secret_writes: Counter,
    pub events_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vaultconn");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        let refresh_attempts = Counter::default();
        let refresh_successes = Counter::default();
        let refresh_failures = Family::<ReasonLabel, Counter>::default();
        let refresh_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let token_expiry = Family::<ConnectionLabel, Gauge>::default();
        let secret_writes = Counter::default();
        let events_dropped = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error category",
            reconcile_errors.clone(),
        );
        registry.register(
            "token_refresh_attempts",
            "Token requests sent to token endpoints",
            refresh_attempts.clone(),
        );
        registry.register(
            "token_refresh_successes",
            "Token requests that returned a token",
            refresh_successes.clone(),
        );
        registry.register(
            "token_refresh_failures",
            "Token requests that failed, by status reason",
            refresh_failures.clone(),
        );
        registry.register(
            "token_refresh_duration_seconds",
            "Latency of token requests",
            refresh_duration.clone(),
        );
        registry.register(
            "token_expiry_timestamp_seconds",
            "Expiry (Unix time) of the access token in each OAuth connection's Secret",
            token_expiry.clone(),
        );
        registry.register(
            "secret_writes",
            "Secret creates and updates made by the operator",
            secret_writes.clone(),
        );
        registry.register(
            "events_dropped",
            "Events not published because the event queue was full",
            events_dropped.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            refresh_attempts,
            refresh_successes,
            refresh_failures,
            refresh_duration,
            token_expiry,
            secret_writes,
            events_dropped,
        }
    }
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
}
