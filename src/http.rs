//! The operator's HTTP endpoints: `/metrics` (OpenMetrics), `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

/// What `/readyz` reports: set by the operator once its caches are synced (or, when electing,
/// once it stands by correctly), cleared when it stops.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// `/healthz` and `/readyz` alone (for a separate health-probe address).
pub fn probe_router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// All three endpoints, or only `/metrics` when the probes are served elsewhere.
pub fn router(metrics: Arc<Metrics>, health: Option<Arc<Health>>) -> Router {
    let metrics_only = Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics);
    match health {
        Some(h) => metrics_only.merge(probe_router(h)),
        None => metrics_only,
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: caches not synced",
        )
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

/// Serve `router` on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving HTTP endpoints");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
