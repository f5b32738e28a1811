//! One operator process per test binary, running the real `vaultconn` binary against the test
//! control plane with `--allow-http-loopback` (token servers in tests listen on 127.0.0.1).
//!
//! The operator reaches the API server through an [`ApiFaultProxy`] that injects nothing: its
//! request log is the API server's side of the story (which requests, in which namespaces),
//! so tests count the operator's writes there instead of trusting its own counters.
//! Its log and metrics are in the binary's secret-leak scan (`vaultconn_testkit::leak_scan`).
use std::sync::{Mutex, MutexGuard};

use tokio::sync::OnceCell;
use vaultconn_testkit::api_proxy::{ApiFaultProxy, MethodMatch, RecordedRequest};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};

static OPERATOR: OnceCell<Mutex<OperatorProcess>> = OnceCell::const_new();
static PROXY: OnceCell<ApiFaultProxy> = OnceCell::const_new();

/// The running operator (started on first use, after the CRDs are installed).
#[allow(dead_code)]
pub async fn operator() -> MutexGuard<'static, OperatorProcess> {
    let cell = OPERATOR
        .get_or_init(|| async {
            super::ensure_crds().await;
            let cp = super::cluster().await;
            let proxy = PROXY
                .get_or_init(|| async {
                    ApiFaultProxy::start(&cp.server_url())
                        .unwrap_or_else(|e| panic!("starting the API proxy: {e}"))
                })
                .await;
            let kubeconfig = cp.dir().join("kubeconfig-operator-via-proxy");
            proxy
                .write_kubeconfig(&kubeconfig, cp.admin_token())
                .unwrap_or_else(|e| panic!("writing the operator's kubeconfig: {e}"));
            let opts = OperatorOptions {
                binary: env!("CARGO_BIN_EXE_vaultconn").into(),
                kubeconfig,
                // Inside the control plane's temp dir: removed with it.
                log_path: cp.dir().join("operator.log"),
                // A short token timeout lets tests reach "slow reply" faults quickly.
                extra_args: vec![
                    "--allow-http-loopback".into(),
                    "--token-request-timeout".into(),
                    "3s".into(),
                ],
                log_filter: "info,vaultconn=debug".into(),
            };
            match OperatorProcess::start(opts).await {
                Ok(op) => Mutex::new(op),
                Err(e) => panic!("starting the operator: {e}"),
            }
        })
        .await;
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

/// Make sure the operator runs (without holding the lock).
#[allow(dead_code)]
pub async fn ensure_operator() {
    drop(operator().await);
}

/// The operator's logs so far. Panics if the log cannot be read or is empty (the operator logs
/// at start-up): a check for secrets in an empty string would pass for nothing.
#[allow(dead_code)]
pub async fn operator_logs() -> String {
    operator().await.logs()
}

/// The proxy between the operator and the API server (to inject faults with).
#[allow(dead_code)]
pub async fn api_proxy() -> &'static ApiFaultProxy {
    ensure_operator().await;
    match PROXY.get() {
        Some(p) => p,
        None => panic!("the operator's API proxy is not running"),
    }
}

/// Every request the operator made to the API server so far, as the proxy in front of the API
/// server saw it.
#[allow(dead_code)]
pub async fn api_requests() -> Vec<RecordedRequest> {
    api_proxy().await.requests()
}

/// The operator's writes (POST, PUT, PATCH, DELETE; not dry runs, which store nothing) to
/// objects in namespace `ns` so far, as `METHOD path` lines.
#[allow(dead_code)]
pub async fn writes_in_namespace(ns: &str) -> Vec<String> {
    let prefix = format!("/namespaces/{ns}/");
    api_requests()
        .await
        .into_iter()
        .filter(|r| MethodMatch::AnyWrite.matches(&r.method) && r.path.contains(&prefix))
        .filter(|r| !r.query.as_deref().unwrap_or_default().contains("dryRun"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// An unlabelled metric of the operator.
#[allow(dead_code)]
pub async fn operator_metric(name: &str) -> f64 {
    let url = operator().await.metrics_url();
    let text = vaultconn_testkit::operator::fetch_metrics(&url)
        .await
        .unwrap_or_default();
    vaultconn_testkit::operator::parse_metric(&text, name).unwrap_or(0.0)
}

/// The operator's whole `/metrics` text.
#[allow(dead_code)]
pub async fn operator_metrics_text() -> String {
    let url = operator().await.metrics_url();
    vaultconn_testkit::operator::fetch_metrics(&url)
        .await
        .unwrap_or_default()
}
