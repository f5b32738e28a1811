//! One operator process per test binary, running the real `vaultconn` binary against the test
//! control plane with `--allow-http-loopback` (token servers in tests listen on 127.0.0.1).
use std::sync::{Mutex, MutexGuard};

use tokio::sync::OnceCell;
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};

static OPERATOR: OnceCell<Mutex<OperatorProcess>> = OnceCell::const_new();

/// The running operator (started on first use, after the CRDs are installed).
#[allow(dead_code)]
pub async fn operator() -> MutexGuard<'static, OperatorProcess> {
    let cell = OPERATOR
        .get_or_init(|| async {
            super::ensure_crds().await;
            let cp = super::cluster().await;
            let opts = OperatorOptions {
                binary: env!("CARGO_BIN_EXE_vaultconn").into(),
                kubeconfig: cp.kubeconfig_path().to_path_buf(),
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

/// The operator's logs so far.
#[allow(dead_code)]
pub async fn operator_logs() -> String {
    let path = operator().await.log_path().to_path_buf();
    std::fs::read_to_string(path).unwrap_or_default()
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
