//! SIGTERM with rotated refresh tokens still waiting to be stored (the API server refused the
//! state writes): the operator writes them all at once, within the shutdown timeout that the
//! chart's terminationGracePeriodSeconds (30 s) covers — not one after another with a 20 s
//! retry budget each. State writes fail through the API fault proxy; the token server holds
//! each committed reply so the outage can be armed between the rotation and the write.
//! This binary runs its own operator (the test stops it).
mod support;

use std::time::{Duration, Instant};

use http::Method;

use support::objects::*;
use support::own_operator::{
    own_operator_options, proxy_kubeconfig, rotating_token_server, start_own_operator,
};
use support::{test_namespace, wait_for, TestNs};
use vaultconn::api::VaultConnection;
use vaultconn_testkit::api_proxy::{ApiFaultProxy, FaultRule, MethodMatch};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};
use vaultconn_testkit::provider_invariants::{assert_provider_invariants, Invariants};
use vaultconn_testkit::reliability::{record, Fact};
use vaultconn_testkit::token_server::{Fault, TokenServer};

const CONNECTIONS: usize = 3;
/// The chart's terminationGracePeriodSeconds: after it, the kubelet sends SIGKILL.
const GRACE: Duration = Duration::from_secs(30);

async fn operator(proxy: &ApiFaultProxy, name: &str) -> OperatorProcess {
    support::ensure_crds().await;
    let kubeconfig = proxy_kubeconfig(proxy, name).await;
    let log_path = support::cluster()
        .await
        .dir()
        .join(format!("operator-{name}.log"));
    start_own_operator(OperatorOptions {
        log_filter: "info".into(),
        ..own_operator_options::<&str>(kubeconfig, log_path, &[])
    })
    .await
}

/// Ready connections, then a refresh of each whose rotated tokens the API server refuses to
/// store: returns once every connection holds its new tokens only in memory.
async fn rotated_but_unstored(
    ns: &TestNs,
    ts: &TokenServer,
    proxy: &ApiFaultProxy,
) -> (Vec<String>, vaultconn_testkit::api_proxy::RuleId) {
    let mut names = Vec::new();
    for i in 0..CONNECTIONS {
        let name = format!("c{i}");
        refresh_token_connection(ns, ts, &format!("{}-client-{i}", ns.name), &name).await;
        ready(ns, &name).await;
        names.push(name);
    }
    // Each refresh commits at the provider, and its reply is held until the outage is armed.
    for _ in 0..CONNECTIONS {
        ts.push_fault(Fault::SlowReply {
            delay: Duration::from_secs(3),
            after_commit: true,
        });
    }
    for name in &names {
        request_refresh(ns, name, "1").await;
    }
    wait_for(
        Duration::from_secs(30),
        "all refreshes in flight",
        || async { ts.in_flight() == CONNECTIONS },
    )
    .await;
    let path = format!("/namespaces/{}/secrets/", ns.name);
    let outage = proxy.fail_until_cleared(FaultRule::writes(path, 503));
    for name in &names {
        // After the 20 s write budget the tokens are held in memory and retried.
        wait_for(Duration::from_secs(60), "TokenPersistPending", || async {
            let vc = ns.api::<VaultConnection>().get(name).await.ok();
            vc.is_some_and(|v| reason(&v) == "TokenPersistPending")
        })
        .await;
    }
    (names, outage)
}

/// SIGTERM in a thread (stopping blocks): whether it exited cleanly, and how long it took.
fn sigterm(mut op: OperatorProcess) -> std::thread::JoinHandle<(bool, Duration)> {
    std::thread::spawn(move || {
        let started = Instant::now();
        // Longer than the grace period: a process that overruns it is seen, not killed early.
        let clean = op.stop(GRACE * 3);
        (clean, started.elapsed())
    })
}

#[tokio::test]
async fn sigterm_writes_held_tokens_concurrently_and_exits_within_the_grace_period() {
    let cp = support::cluster().await;
    let proxy = ApiFaultProxy::start(&cp.server_url()).expect("proxy starts");
    let ts = rotating_token_server(Duration::from_secs(3600)).await;

    // 1. The API server keeps refusing: the held tokens cannot be saved, but the process must
    //    still exit cleanly before the kubelet's SIGKILL, not after 3 × 20 s.
    let op = operator(&proxy, "outage").await;
    let ns = test_namespace("term-outage").await;
    let (lost, outage) = rotated_but_unstored(&ns, &ts, &proxy).await;
    let (clean, took) = sigterm(op).join().expect("stop thread");
    assert!(clean, "no clean exit (took {took:?})");
    assert!(
        took < GRACE,
        "shutdown took {took:?}, beyond the {GRACE:?} grace period"
    );
    proxy.clear(outage);
    // Those tokens are lost (the API server never took them); the next operator would report
    // that as RefreshResponseLost. Out of scope here: remove the connections first.
    for name in &lost {
        ns.api::<VaultConnection>()
            .delete(name, &Default::default())
            .await
            .expect("delete");
    }

    // 2. The API server recovers during the shutdown: every held token is stored, and it is
    //    the provider's live one.
    let op = operator(&proxy, "recovers").await;
    let ns = test_namespace("term-recovers").await;
    let (names, outage) = rotated_but_unstored(&ns, &ts, &proxy).await;
    let stopping = sigterm(op);
    // A short outage into the shutdown (the proxy's own time, not a guess about ours).
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.clear(outage);
    let (clean, took) = stopping.join().expect("stop thread");
    assert!(clean, "no clean exit (took {took:?})");
    assert!(took < GRACE, "shutdown took {took:?}");
    for name in &names {
        let stored = stored_refresh_token(&ns, name)
            .await
            .expect("a stored refresh token");
        assert!(
            ts.is_refresh_token_live(&stored),
            "{name}: the stored refresh token is not the provider's live one"
        );
    }
    // Per client: the seed exchange and the one requested refresh (1 h tokens). The first
    // part's clients lost their rotated tokens with the API server down, but their connections
    // were deleted before anything could replay them: no revocation either.
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(2));
    record(Fact::survived(
        "SIGTERM with rotated tokens not yet stored; the API server recovers during the shutdown",
        "API fault proxy refuses the state writes; SIGTERM; outage cleared 3 s later",
        names.len(),
    ).note(format!("every held token stored and live; exit in {took:.1?} < {GRACE:?} grace")));
}

/// SIGTERM while the operator is still listing its connections (the proxy holds the list's
/// answer back): it exits at once and cleanly. kube-runtime's graceful shutdown waited for a
/// store it had stopped filling, so such a process hung until SIGKILL (a pod deleted right
/// after it started took the whole grace period and exited by signal).
#[tokio::test]
async fn sigterm_before_the_first_list_exits_cleanly_at_once() {
    let cp = support::cluster().await;
    let proxy = ApiFaultProxy::start(&cp.server_url()).expect("proxy starts");
    // The watcher's list (page size 500), not the one-item probes of the same path.
    let list = proxy.fail(
        FaultRule::hold_response(
            "/vaultconnections",
            MethodMatch::Only(Method::GET),
            Duration::from_secs(300),
        )
        .query_contains("limit=500"),
    );
    let op = operator(&proxy, "early-sigterm").await;
    assert!(
        proxy.wait_held(list, Duration::from_secs(30)).await,
        "the operator's list of connections reached the API server"
    );
    let (clean, took) = sigterm(op).join().expect("stopping thread");
    assert!(clean, "exited cleanly (after {took:?})");
    // The list is answered only after 300 s: the operator did not wait for it.
    assert!(took < GRACE, "exited within the grace period: {took:?}");
}
