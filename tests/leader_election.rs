//! Leader election and namespace scoping, with two (or one) real operator processes against the
//! test control plane. Every claim is checked on the other side: the Lease as the API server
//! stores it, the requests the API fault proxy forwarded, and the token server's own call log.
//! This binary runs its own operators (the shared one would take part in the election).
mod support;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use serde_json::json;
use support::objects::*;
use support::own_operator::{
    assert_one_leads, lease_holder, log_dir, named_operator, proxied_kubeconfig,
    rotating_token_server, wait_for_holder,
};
use support::{test_namespace, wait_for, wait_for_some, TestNs};
use vaultconn_testkit::api_proxy::{FaultRule, MethodMatch};
use vaultconn_testkit::operator::OperatorProcess;
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, scheduled_per_minute, Invariants,
};
use vaultconn_testkit::reliability::{record, Fact};
use vaultconn_testkit::token_server::TokenServer;

const CONNECTIONS: usize = 2;

/// Start an operator named `instance`, talking to `kubeconfig` (direct or via a proxy).
async fn operator(instance: &str, kubeconfig: PathBuf, args: &[&str]) -> OperatorProcess {
    support::ensure_crds().await;
    let logs = log_dir(support::cluster().await.dir());
    named_operator(&logs, instance, kubeconfig, args).await
}

async fn direct_kubeconfig() -> PathBuf {
    support::cluster().await.kubeconfig_path().to_path_buf()
}

/// Tests in this binary run in parallel, each with its own operators: each watches only its
/// test's namespace, or two elections would reconcile the same connections.
fn election_args<'a>(ns: &'a TestNs, lease: &'a str, duration: &'a str) -> Vec<&'a str> {
    vec![
        "--namespaces",
        ns.name.as_str(),
        "--leader-elect",
        "--lease-name",
        lease,
        "--lease-namespace",
        ns.name.as_str(),
        "--lease-duration",
        duration,
    ]
}

/// Connections against `ts` with the refresh-token grant, one client each.
async fn oauth_connections(ns: &TestNs, ts: &TokenServer, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..CONNECTIONS {
        let name = format!("{prefix}-{i}");
        refresh_token_connection(ns, ts, &format!("{prefix}-client-{i}"), &name).await;
        names.push(name);
    }
    names
}

/// The provider's record: no refresh token was refused or presented twice, no family was
/// revoked, and no client was asked more than `per_minute` times in any minute. With rotation
/// and reuse detection on, any replay by either replica shows here.
fn assert_no_replay(ts: &TokenServer, per_minute: usize) {
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(per_minute));
    let calls = ts.calls();
    let mut presented = std::collections::HashSet::new();
    for c in calls
        .iter()
        .filter(|c| c.grant_type.as_deref() == Some("refresh_token"))
    {
        let rt = c.refresh_token.clone().unwrap_or_default();
        assert!(
            presented.insert(rt),
            "refresh token presented twice (call #{})",
            c.seq
        );
        let error = c.outcome.as_ref().and_then(|o| o.error.clone());
        assert_eq!(error, None, "call #{} was refused by the provider", c.seq);
    }
    assert_eq!(ts.revocations(), 0, "the provider revoked a grant");
}

/// Successful refresh calls per client after `since`, from the token server's log.
fn refreshes_since(ts: &TokenServer, since: SystemTime) -> Vec<usize> {
    let calls = ts.calls();
    (0..CONNECTIONS)
        .map(|i| {
            calls
                .iter()
                .filter(|c| c.at > since)
                .filter(|c| {
                    c.client_id
                        .as_deref()
                        .is_some_and(|id| id.ends_with(&format!("-client-{i}")))
                })
                .filter(|c| c.outcome.as_ref().and_then(|o| o.status) == Some(200))
                .count()
        })
        .collect()
}

#[tokio::test]
async fn one_leader_refreshes_and_after_its_sigkill_the_standby_takes_over_without_replay() {
    let ns = test_namespace("ha-kill").await;
    let ts = rotating_token_server(Duration::from_secs(4)).await;
    let lease = "vaultconn-ha-kill";
    let args = election_args(&ns, lease, "6s");
    // The standby-to-be runs through a proxy, so that what it sends can be counted.
    let (proxy_b, kubeconfig_b) = proxied_kubeconfig("ha-kill-b").await;
    let mut a = operator("a", direct_kubeconfig().await, &args).await;
    wait_for_holder(
        &ns,
        lease,
        "a",
        Duration::from_secs(30),
        "a holds the Lease",
    )
    .await;
    let mut b = operator("b", kubeconfig_b, &args).await;
    let names = oauth_connections(&ns, &ts, "ha").await;
    for name in &names {
        ready(&ns, name).await;
    }
    // Both are ready: the leader with synced caches, the standby standing by.
    wait_for(
        Duration::from_secs(30),
        "both replicas report ready",
        || async { a.probe("/readyz").await == Some(200) && b.probe("/readyz").await == Some(200) },
    )
    .await;
    // Each reports its role; the standby wrote nothing but the Lease.
    assert_one_leads(&a, &b, &proxy_b).await;

    a.kill();
    let killed_at = SystemTime::now();
    wait_for_holder(
        &ns,
        lease,
        "b",
        Duration::from_secs(40),
        "b takes over the Lease",
    )
    .await;
    // The new leader keeps refreshing (4 s tokens: a refresh every few seconds).
    wait_for(
        Duration::from_secs(60),
        "every connection refreshed twice after the kill",
        || async { refreshes_since(&ts, killed_at).iter().all(|n| *n >= 2) },
    )
    .await;
    for name in &names {
        ready(&ns, name).await;
    }
    // The schedule of 4 s tokens, plus the seed exchange.
    assert_no_replay(&ts, scheduled_per_minute(Duration::from_secs(4)) + 1);
    b.stop(Duration::from_secs(30));
    record(
        Fact::survived(
            "SIGKILL of the leader while it refreshes (2 replicas, leader election)",
            "kill(2) of the Lease holder; the standby takes over",
            1,
        )
        .note(format!(
            "{} connections, 4 s tokens: no replay at the provider",
            names.len()
        )),
    );
}

#[tokio::test]
async fn sigterm_flushes_and_releases_the_lease() {
    let ns = test_namespace("ha-term").await;
    let lease = "vaultconn-ha-term";
    let args = election_args(&ns, lease, "30s");
    let mut a = operator("term-a", direct_kubeconfig().await, &args).await;
    let h = wait_for_some(Duration::from_secs(30), "a holds the Lease", || async {
        lease_holder(&ns, lease).await
    })
    .await;
    assert!(h.starts_with("term-a_"), "holder {h}");
    assert!(a.stop(Duration::from_secs(30)), "clean exit on SIGTERM");
    // Released, not left to expire: the stored Lease has no holder right after the exit.
    assert_eq!(
        lease_holder(&ns, lease).await,
        None,
        "the Lease was not released"
    );
    record(
        Fact::survived("SIGTERM of the leader", "SIGTERM to the Lease holder", 1)
            .note("clean exit; the Lease released, not left to expire"),
    );
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_writing_before_the_standby_starts() {
    let ns = test_namespace("ha-fence").await;
    let ts = rotating_token_server(Duration::from_secs(3)).await;
    let lease = "vaultconn-ha-fence";
    let args = election_args(&ns, lease, "6s");
    let (proxy_a, kubeconfig_a) = proxied_kubeconfig("ha-fence-a").await;
    let mut a = operator("fence-a", kubeconfig_a, &args).await;
    wait_for_holder(
        &ns,
        lease,
        "fence-a",
        Duration::from_secs(30),
        "a holds the Lease",
    )
    .await;
    let mut b = operator("fence-b", direct_kubeconfig().await, &args).await;
    let names = oauth_connections(&ns, &ts, "fence").await;
    for name in &names {
        ready(&ns, name).await;
    }
    // Cut a off from the Lease only: it can still write Secrets and status, which is exactly
    // what it must stop doing before its Lease can expire.
    let cut = proxy_a.fail_until_cleared(FaultRule::requests(MethodMatch::Any, "/leases", 503));
    let acquired_by_b = wait_for_some(Duration::from_secs(60), "b takes over", || async {
        let l = ns.api::<Lease>().get_opt(lease).await.ok()??;
        let spec = l.spec?;
        let holder = spec.holder_identity?;
        holder
            .starts_with("fence-b_")
            .then(|| spec.acquire_time.map(|t| SystemTime::from(t.0)))
            .flatten()
    })
    .await;
    // b refreshes from now on; a must have gone quiet before b acquired.
    wait_for(Duration::from_secs(60), "b refreshes", || async {
        refreshes_since(&ts, acquired_by_b).iter().all(|n| *n >= 1)
    })
    .await;
    let late_writes: Vec<String> = proxy_a
        .requests()
        .into_iter()
        .filter(|r| MethodMatch::AnyWrite.matches(&r.method) && !r.path.contains("/leases"))
        .filter(|r| r.succeeded() && r.at >= acquired_by_b)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        late_writes.is_empty(),
        "a wrote after b acquired the Lease: {late_writes:?}"
    );
    wait_for(
        Duration::from_secs(30),
        "a exits after losing the Lease",
        || {
            let exited = a.exit_status().is_some_and(|s| !s.success());
            async move { exited }
        },
    )
    .await;
    proxy_a.clear(cut);
    // The schedule of 3 s tokens, plus the seed exchange.
    assert_no_replay(&ts, scheduled_per_minute(Duration::from_secs(3)) + 1);
    b.stop(Duration::from_secs(30));
    record(
        Fact::survived(
            "The leader cut off from the Lease API while it can still write (fencing)",
            "API fault proxy answers 503 to every Lease request of the leader",
            proxy_a.injected(cut),
        )
        .note("no write after the standby acquired; no double leader; no replay"),
    );
}

#[tokio::test]
async fn with_namespaces_the_operator_watches_and_touches_only_those() {
    let watched = test_namespace("scope-in").await;
    let other = test_namespace("scope-out").await;
    let spec = json!({"type": "apiKey", "credentialsRef": {"name": "creds"}});
    // The connection outside the list exists first, so it would be handled first if seen.
    put_secret(&other, "creds", &[("api_key", "k-out")]).await;
    apply_vc(&other, "outside", spec.clone()).await;
    put_secret(&watched, "creds", &[("api_key", "k-in")]).await;
    apply_vc(&watched, "inside", spec).await;

    let (proxy, kubeconfig) = proxied_kubeconfig("scope").await;
    let list = watched.name.clone();
    let mut op = operator("scoped", kubeconfig, &["--namespaces", &list]).await;
    ready(&watched, "inside").await;
    wait_for(
        Duration::from_secs(30),
        "the scoped operator is ready",
        || async { op.probe("/readyz").await == Some(200) },
    )
    .await;
    let vc = other
        .api::<vaultconn::api::VaultConnection>()
        .get("outside")
        .await
        .expect("outside exists");
    assert!(
        vc.status.is_none(),
        "a connection outside --namespaces got a status"
    );
    // The API server saw no request outside the namespace, and no cluster-wide list/watch.
    let outside: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|r| {
            let namespaced = r.path.contains(&format!("/namespaces/{}/", watched.name));
            let discovery = r.method == Method::GET
                && !r.path.contains("/secrets")
                && !r.path.contains("/vaultconnections");
            !namespaced && !discovery
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        outside.is_empty(),
        "requests outside the namespace: {outside:?}"
    );
    op.stop(Duration::from_secs(30));
}

#[tokio::test]
async fn a_new_leader_waits_for_the_old_leaders_call_in_flight_instead_of_replaying_its_token() {
    use vaultconn_testkit::token_server::Fault;
    let ns = test_namespace("ha-mark").await;
    // Rotation without an overlap window, reuse detection on: a second use of a refresh
    // token revokes the whole family.
    let ts = rotating_token_server(Duration::from_secs(3600)).await;
    let lease = "vaultconn-ha-mark";
    let args = election_args(&ns, lease, "6s");
    let (proxy_a, kubeconfig_a) = proxied_kubeconfig("ha-mark-a").await;
    let mut a = operator("mark-a", kubeconfig_a, &args).await;
    wait_for_holder(
        &ns,
        lease,
        "mark-a",
        Duration::from_secs(30),
        "a holds the Lease",
    )
    .await;
    let mut b = operator("mark-b", direct_kubeconfig().await, &args).await;
    let names = oauth_connections(&ns, &ts, "mark").await;
    let name = &names[0];
    ready(&ns, name).await;
    let sent = stored_refresh_token(&ns, name)
        .await
        .expect("a stored refresh token");

    // a's next call commits the rotation at the provider, then the reply takes 10 s.
    ts.push_fault(Fault::SlowReply {
        delay: Duration::from_secs(10),
        after_commit: true,
    });
    request_refresh(&ns, name, "1").await;
    wait_for(
        Duration::from_secs(30),
        "a's token call is in flight",
        || async { ts.in_flight() == 1 },
    )
    .await;
    // Now a loses its Lease mid-call; b takes over while a's call is still running.
    let cut = proxy_a.fail_until_cleared(FaultRule::requests(MethodMatch::Any, "/leases", 503));
    wait_for_holder(
        &ns,
        lease,
        "mark-b",
        Duration::from_secs(30),
        "b takes over",
    )
    .await;
    // The rotated token a received is stored (a's write is guarded by the token it sent, so
    // it cannot overwrite anything newer), and b carries on from it.
    wait_for(
        Duration::from_secs(60),
        "the rotated refresh token is stored",
        || async {
            stored_refresh_token(&ns, name)
                .await
                .is_some_and(|rt| rt != sent && ts.is_refresh_token_live(&rt))
        },
    )
    .await;
    ready(&ns, name).await;
    let presented: Vec<_> = ts
        .calls()
        .into_iter()
        .filter(|c| c.refresh_token.as_deref() == Some(sent.as_str()))
        .map(|c| c.seq)
        .collect();
    assert_eq!(
        presented.len(),
        1,
        "the in-flight token was sent again: calls {presented:?}"
    );
    proxy_a.clear(cut);
    // Per client: the seed exchange and the one requested refresh (1 h tokens).
    assert_no_replay(&ts, 2);
    let _ = a.exit_status();
    b.stop(Duration::from_secs(30));
    record(Fact::survived(
        "Leadership lost with a token call in flight",
        "token server holds the committed reply 10 s; proxy answers 503 to the leader's Lease requests",
        proxy_a.injected(cut),
    ).note("the in-flight refresh token sent exactly once; the rotated one stored"));
}
