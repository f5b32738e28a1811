//! Operator processes of a test's own (not the binary's shared one in [`super::operator`]):
//! the real `vaultconn` binary, optionally behind an [`ApiFaultProxy`] of its own, and the
//! token servers and checks the tests that run them share.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use vaultconn_testkit::api_proxy::{ApiFaultProxy, MethodMatch};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};
use vaultconn_testkit::token_server::{TokenServer, TokenServerConfig};

use super::{wait_for, TestNs};

/// Where a test's own operators log: `VAULTCONN_TEST_LOG_DIR` (kept after the run), else `dir`
/// (a control plane's temp dir, removed with it).
pub fn log_dir(dir: &Path) -> PathBuf {
    std::env::var_os("VAULTCONN_TEST_LOG_DIR").map_or_else(|| dir.to_path_buf(), PathBuf::from)
}

/// Write `<control plane dir>/kubeconfig-<name>`: this binary's control plane as the admin,
/// reached through `proxy` (to count and fail that process's requests).
pub async fn proxy_kubeconfig(proxy: &ApiFaultProxy, name: &str) -> PathBuf {
    let cp = super::cluster().await;
    let path = cp.dir().join(format!("kubeconfig-{name}"));
    proxy
        .write_kubeconfig(&path, cp.admin_token())
        .expect("writing the proxy kubeconfig");
    path
}

/// A fresh [`ApiFaultProxy`] in front of this binary's control plane, and a kubeconfig
/// `kubeconfig-<name>` through it.
pub async fn proxied_kubeconfig(name: &str) -> (ApiFaultProxy, PathBuf) {
    let cp = super::cluster().await;
    let proxy = ApiFaultProxy::start(&cp.server_url()).expect("proxy starts");
    let path = proxy_kubeconfig(&proxy, name).await;
    (proxy, path)
}

/// Options for an operator process: the real binary with `--allow-http-loopback` (the tests'
/// token servers listen on 127.0.0.1) and `args`, logging vaultconn's debug lines to
/// `log_path`. Change what a test needs with `..own_operator_options(..)`.
pub fn own_operator_options<S: AsRef<str>>(
    kubeconfig: PathBuf,
    log_path: PathBuf,
    args: &[S],
) -> OperatorOptions {
    let mut extra_args = vec!["--allow-http-loopback".to_string()];
    extra_args.extend(args.iter().map(|a| a.as_ref().to_string()));
    OperatorOptions {
        binary: env!("CARGO_BIN_EXE_vaultconn").into(),
        kubeconfig,
        log_path,
        extra_args,
        log_filter: "info,vaultconn=debug".into(),
    }
}

/// Start an operator process and wait until it serves its metrics; a failure fails the test.
pub async fn start_own_operator(opts: OperatorOptions) -> OperatorProcess {
    OperatorProcess::start(opts).await.expect("operator starts")
}

/// An operator process named `instance` (`--instance`; its log `operator-<instance>.log` in
/// `logs`), talking to `kubeconfig` (direct or via a proxy), with `args`.
pub async fn named_operator(
    logs: &Path,
    instance: &str,
    kubeconfig: PathBuf,
    args: &[&str],
) -> OperatorProcess {
    let mut all = vec!["--instance", instance];
    all.extend_from_slice(args);
    start_own_operator(own_operator_options(
        kubeconfig,
        logs.join(format!("operator-{instance}.log")),
        &all,
    ))
    .await
}

/// SIGTERM and wait for a clean exit, off the test's runtime: `OperatorProcess::stop` blocks,
/// and the token server the operator is still talking to runs on this runtime.
pub async fn stop_cleanly(op: OperatorProcess, timeout: Duration) -> bool {
    let mut op = op;
    tokio::task::spawn_blocking(move || op.stop(timeout))
        .await
        .expect("stopping the operator")
}

/// No token the provider issued or saw, and no client secret, is in the operator's log. An
/// empty or unreadable log fails: the scan would pass vacuously.
pub fn assert_no_secret_in_log(log: &str, ts: &TokenServer, secrets: &[&str]) {
    assert!(!log.is_empty(), "the operator log is empty or unreadable");
    let mut values: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
    for c in ts.calls() {
        values.extend(c.refresh_token);
        if let Some(o) = c.outcome {
            values.extend(o.access_token);
            values.extend(o.refresh_token);
        }
    }
    let leaked = values
        .iter()
        .filter(|v| v.len() >= 8 && log.contains(v.as_str()))
        .count();
    assert_eq!(leaked, 0, "{leaked} secret values are in the operator log");
}

/// A token server that rotates refresh tokens (reuse detection on, no overlap window) and
/// issues access tokens valid for `ttl`.
pub async fn rotating_token_server(ttl: Duration) -> TokenServer {
    rotating_token_server_with(TokenServerConfig::default(), ttl).await
}

/// [`rotating_token_server`] on top of `config` (its clients, say).
pub async fn rotating_token_server_with(config: TokenServerConfig, ttl: Duration) -> TokenServer {
    TokenServer::start(config.with_rotation(true).with_ttl(ttl))
        .await
        .expect("token server starts")
}

/// The writes (as `METHOD path`) that `proxy` forwarded other than to Leases: what a standby
/// must never send.
pub fn writes_besides_leases(proxy: &ApiFaultProxy) -> Vec<String> {
    proxy
        .requests()
        .into_iter()
        .filter(|r| MethodMatch::AnyWrite.matches(&r.method) && !r.path.contains("/leases"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// The holder of the Lease `lease` as the API server stores it (`None` while unheld or
/// missing).
pub async fn lease_holder(ns: &TestNs, lease: &str) -> Option<String> {
    let l = ns.api::<Lease>().get_opt(lease).await.ok()??;
    l.spec?.holder_identity.filter(|h| !h.is_empty())
}

/// Waits until the Lease `lease` is held by the instance named `instance` (holder identities
/// are `<instance>_<pid>`).
pub async fn wait_for_holder(
    ns: &TestNs,
    lease: &str,
    instance: &str,
    within: Duration,
    what: &str,
) {
    let prefix = format!("{instance}_");
    wait_for(within, what, || async {
        lease_holder(ns, lease)
            .await
            .is_some_and(|h| h.starts_with(&prefix))
    })
    .await;
}

/// Exactly one of two electing operators leads: each reports its role where the NoLeader
/// alert reads it, and the API server saw no write from the standby (through its
/// `standby_proxy`) but its Lease requests.
pub async fn assert_one_leads(
    leader: &OperatorProcess,
    standby: &OperatorProcess,
    standby_proxy: &ApiFaultProxy,
) {
    assert_eq!(leader.metric("vaultconn_leader").await, Some(1.0));
    assert_eq!(standby.metric("vaultconn_leader").await, Some(0.0));
    let writes = writes_besides_leases(standby_proxy);
    assert!(writes.is_empty(), "the standby wrote: {writes:?}");
}
