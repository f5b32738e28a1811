//! Control-plane faults under a running operator (issue 13, "Faults"), against a real
//! etcd + kube-apiserver + kube-controller-manager:
//!
//! - **Restarts**: kube-apiserver, then etcd, stopped for 30 s (`VAULTCONN_TEST_OUTAGE_SECS`
//!   for longer) and started again in place. The operator process reconnects by itself (same
//!   pid, never restarted, no hot loop while it cannot reach the API), `/readyz` is 503 while
//!   it cannot sync and 200 again after, every connection is refreshed within seconds of the
//!   API server's return (not when its backoff from the outage runs out), and the provider's
//!   own record shows no refresh token lost or replayed.
//! - **Write faults** through the [`ApiFaultProxy`]: the state write right after a rotation
//!   meets a dropped connection (before or after the API server committed it) or a stall past
//!   the write's retry budget (`tests/oauth_write_faults.rs` covers 409/429/500/503 there);
//!   and the Lease writes of two electing operators meet 500s, 429s with `Retry-After`,
//!   dropped connections and stalls: never two writers at once, Lease faults only delay.
//! - **Concurrent editors**: another client edits the generated Secrets, the state Secrets and
//!   the connections' metadata and spec while the operator runs: no lost update, no flapping.
//!
//! The restart tests stop and start a control plane of their own (`plane()`, one at a time:
//! `RESTARTS`); the shared per-binary one cannot be restarted under the other tests, which use
//! it in parallel. Each test runs its own operator(s), scoped with `--namespaces` to its own
//! namespace.
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use support::objects::*;
use support::own_operator::{
    assert_no_secret_in_log, lease_holder, log_dir, named_operator, proxied_kubeconfig,
    rotating_token_server, stop_cleanly, wait_for_holder,
};
use support::{test_namespace, wait_for, wait_for_some, TestNs};
use tokio::sync::{Mutex, OnceCell};
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::api_proxy::{ApiFaultProxy, FaultRule, MethodMatch};
use vaultconn_testkit::control_plane::{ControlPlane, ControlPlaneOptions};
use vaultconn_testkit::operator::OperatorProcess;
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, scheduled_per_minute, Invariants,
};
use vaultconn_testkit::token_server::{Fault, RecordedCall, TokenServer};

// ---------------------------------------------------------------------------------------------
// Harness: a restartable control plane for the restart tests, the shared one for the rest
// ---------------------------------------------------------------------------------------------

struct Plane {
    cp: Mutex<ControlPlane>,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

static PLANE: OnceCell<Plane> = OnceCell::const_new();
/// One restart test at a time.
static RESTARTS: Mutex<()> = Mutex::const_new(());

async fn plane() -> &'static Plane {
    PLANE
        .get_or_init(|| async {
            let cp = ControlPlane::start(ControlPlaneOptions {
                provision_script: Some(
                    vaultconn_testkit::repo_root().join("scripts/provision-control-plane.sh"),
                ),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("starting this binary's control plane: {e}"));
            cp.install_crds(&support::crds_dir())
                .await
                .unwrap_or_else(|e| panic!("installing the CRDs: {e}"));
            Plane {
                kubeconfig: cp.kubeconfig_path().to_path_buf(),
                dir: log_dir(cp.dir()),
                cp: Mutex::new(cp),
            }
        })
        .await
}

/// Start whatever an earlier test stopped and did not restart (it failed mid-outage), so one
/// failure does not fail every later test.
async fn ensure_running() {
    let mut cp = plane().await.cp.lock().await;
    cp.start_etcd(Duration::from_secs(90))
        .await
        .expect("etcd runs");
    cp.start_apiserver(Duration::from_secs(90))
        .await
        .expect("kube-apiserver runs");
}

/// Sole use of the restartable control plane, all of it running.
async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = RESTARTS.lock().await;
    ensure_running().await;
    guard
}

/// An admin client of the restartable plane for the calling test's runtime (kube clients are
/// tied to their runtime).
async fn plane_client() -> kube::Client {
    let p = plane().await;
    vaultconn_testkit::install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(&p.kubeconfig).expect("the admin kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client config");
    kube::Client::try_from(config).expect("a client")
}

/// A fresh namespace `<prefix>-<random>` on the restartable control plane.
async fn plane_namespace(prefix: &str) -> TestNs {
    support::namespace_with(plane_client().await, prefix).await
}

/// CPU seconds (user + system) the process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `)` of the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

const CLIENT_SECRET: &str = "cpfaults-client-SECRET";

fn client_id(prefix: &str, i: usize) -> String {
    format!("{prefix}-client-{i}")
}

/// `n` refresh-token connections against `ts`, one client each; returns their names.
async fn oauth_connections(ns: &TestNs, ts: &TokenServer, prefix: &str, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        let client = client_id(prefix, i);
        ts.add_client(&client, CLIENT_SECRET);
        let rt = ts.mint_refresh_token(&client);
        let creds = format!("{prefix}-{i}-creds");
        put_secret(
            ns,
            &creds,
            &[
                ("client_id", &client),
                ("client_secret", CLIENT_SECRET),
                ("refresh_token", &rt),
            ],
        )
        .await;
        let name = format!("{prefix}-{i}");
        apply_vc(ns, &name, oauth_spec(ts, &creds)).await;
        names.push(name);
    }
    names
}

fn oauth_spec(ts: &TokenServer, creds: &str) -> serde_json::Value {
    json!({"type": "oauth2", "credentialsRef": {"name": creds},
        "oauth2": {"tokenUrl": ts.token_url(), "grantType": "refreshToken"}})
}

async fn secret_data(ns: &TestNs, name: &str) -> Option<BTreeMap<String, String>> {
    let s = ns.api::<Secret>().get_opt(name).await.ok()??;
    Some(data_of(&s))
}

/// `name` is Ready on tokens the provider considers good: the published access token is valid
/// and the stored refresh token is live.
async fn good_tokens(ns: &TestNs, ts: &TokenServer, name: &str) -> bool {
    let Ok(Some(vc)) = ns.api::<VaultConnection>().get_opt(name).await else {
        return false;
    };
    let current = vc.status.as_ref().and_then(|s| s.observed_generation) == vc.metadata.generation;
    if phase(&vc) != Some(Phase::Ready) || !current {
        return false;
    }
    let at = secret_data(ns, name)
        .await
        .and_then(|d| d.get("access_token").cloned());
    let rt = stored_refresh_token(ns, name).await;
    at.is_some_and(|at| ts.is_access_token_valid(&at))
        && rt.is_some_and(|rt| ts.is_refresh_token_live(&rt))
}

/// Successful token calls of `client` decided after `since`.
fn refreshes_since(ts: &TokenServer, client: &str, since: SystemTime) -> usize {
    ts.calls()
        .iter()
        .filter(|c| c.at > since && c.client_id.as_deref() == Some(client))
        .filter(|c| c.outcome.as_ref().and_then(|o| o.status) == Some(200))
        .count()
}

// ---------------------------------------------------------------------------------------------
// API server and etcd restarts
// ---------------------------------------------------------------------------------------------

/// How long kube-apiserver or etcd stays down: `VAULTCONN_TEST_OUTAGE_SECS`, else 30 s. Long
/// enough for every watch to fail and back off five times, for the 6 s tokens to expire, and
/// for the connections' own retries to back off past 20 s; stopping a server closes its
/// watches at once, so the 290 s watch timeout never comes into play (a long run, e.g. 300 s,
/// shows the same; see README "Operator flags").
fn outage() -> Duration {
    let secs = std::env::var("VAULTCONN_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}
/// `/readyz` is 200 again this soon after the API server serves VaultConnections again
/// (within seconds: the watches resume at once, not when their backoff runs out).
const READY_AFTER_RESTART: Duration = Duration::from_secs(15);
/// Every connection refreshed, on good tokens, this soon after `/readyz` is 200 again.
const CONVERGED_AFTER_READY: Duration = Duration::from_secs(15);
const TTL: Duration = Duration::from_secs(6);
const RESTART_CONNECTIONS: usize = 3;
/// Most CPU the operator may burn per second of outage while it cannot reach the API (a hot
/// loop burns about a second per second; idle retries a few milliseconds).
const OUTAGE_CPU_PER_SECOND: f64 = 0.1;

#[derive(Clone, Copy, Debug)]
enum Outage {
    ApiServer,
    Etcd,
}

async fn restart_converges(which: Outage, prefix: &str) {
    let p = plane().await;
    let _exclusive = exclusive().await;
    let ns = plane_namespace(prefix).await;
    let ts = rotating_token_server(TTL).await;
    let names = oauth_connections(&ns, &ts, prefix, RESTART_CONNECTIONS).await;
    put_secret(&ns, "static-creds", &[("api_key", "key-before")]).await;
    apply_vc(
        &ns,
        "static",
        json!({"type": "apiKey", "credentialsRef": {"name": "static-creds"}}),
    )
    .await;
    let mut op = named_operator(
        &p.dir,
        prefix,
        p.kubeconfig.clone(),
        &["--namespaces", &ns.name],
    )
    .await;
    let pid = op.pid().expect("a pid");
    for name in names.iter().chain(["static".to_string()].iter()) {
        ready(&ns, name).await;
    }
    wait_for(Duration::from_secs(30), "the operator is ready", || async {
        op.probe("/readyz").await == Some(200)
    })
    .await;

    let cpu_before = cpu_seconds(pid);
    let began = Instant::now();
    {
        let mut cp = p.cp.lock().await;
        match which {
            Outage::ApiServer => cp.stop_apiserver(),
            Outage::Etcd => cp.stop_etcd(),
        }
        .expect("stopping");
    }
    let outage = self::outage();
    let unready = wait_for_some(outage, "/readyz to turn 503 during the outage", || async {
        (op.probe("/readyz").await == Some(503)).then(Instant::now)
    })
    .await;
    eprintln!(
        "{which:?} down: /readyz 503 after {:?}",
        unready.duration_since(began)
    );
    // The rest of the outage: the process stays up and not ready.
    while began.elapsed() < outage {
        assert_eq!(
            op.exit_status(),
            None,
            "the operator exited during the outage"
        );
        assert_eq!(
            op.probe("/readyz").await,
            Some(503),
            "/readyz turned ready while {which:?} was still down"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu_outage = cpu_seconds(pid) - cpu_before;
    {
        let mut cp = p.cp.lock().await;
        // After a long etcd outage the API server's etcd clients reconnect with a backoff of
        // up to 2 minutes (gRPC's), before the API server is ready again.
        let timeout = Duration::from_secs(180);
        match which {
            Outage::ApiServer => cp.start_apiserver(timeout).await,
            Outage::Etcd => cp.start_etcd(timeout).await,
        }
        .expect("starting again");
    }
    // `/readyz` of the API server passes before it serves every resource again: after a long
    // etcd outage its separate etcd client for the CRD's storage reconnects later. The
    // operator's bounds count from when the API server serves VaultConnections again.
    let restarted = Instant::now();
    let vcs = ns.api::<VaultConnection>();
    wait_for(
        Duration::from_secs(180),
        "the API server to serve VaultConnections again",
        || async {
            let one = kube::api::ListParams::default().limit(1);
            let list = tokio::time::timeout(Duration::from_secs(5), vcs.list(&one));
            matches!(list.await, Ok(Ok(_)))
        },
    )
    .await;
    let serving_after = restarted.elapsed();
    let back = SystemTime::now();
    let back_at = Instant::now();
    wait_for(
        READY_AFTER_RESTART,
        "/readyz 200 again after the restart",
        || async { op.probe("/readyz").await == Some(200) },
    )
    .await;
    eprintln!(
        "{which:?} back (serving VaultConnections {serving_after:?} after the restart): /readyz 200 after {:?}; operator CPU during the {outage:?} outage: {cpu_outage:.2} s",
        back_at.elapsed()
    );
    assert_eq!(op.exit_status(), None, "the operator exited");
    assert_eq!(op.pid(), Some(pid), "the operator process was replaced");
    assert_eq!(op.starts(), 1, "the operator was restarted");
    assert!(
        cpu_outage < OUTAGE_CPU_PER_SECOND * outage.as_secs_f64(),
        "the operator used {cpu_outage:.2} s of CPU in a {outage:?} outage: a hot loop"
    );

    // Converged soon: every token refreshed after the restart, on good tokens. Not when each
    // connection's retry backoff from the outage (by then 20 s and more) runs out: its token
    // expired during the outage.
    let converged_by = tokio::time::Instant::now() + CONVERGED_AFTER_READY;
    for (i, name) in names.iter().enumerate() {
        let client = client_id(prefix, i);
        wait_for(
            converged_by.saturating_duration_since(tokio::time::Instant::now()),
            &format!("{name} refreshed after the restart, on good tokens"),
            || async {
                refreshes_since(&ts, &client, back) >= 1 && good_tokens(&ns, &ts, name).await
            },
        )
        .await;
    }
    // The watch works again: a change made now reaches the generated Secret.
    put_secret(&ns, "static-creds", &[("api_key", "key-after")]).await;
    secret_data_eq(&ns, "static", map(&[("api_key", "key-after")])).await;
    // The provider's record: no replay, no revocation, no more than the schedule (plus the
    // seed exchange): an outage delays refreshes, it never adds any.
    assert_provider_invariants(
        &ts.provider_record(),
        &Invariants::new(scheduled_per_minute(TTL) + 1),
    );
    assert_no_secret_in_log(&op.logs(), &ts, &[CLIENT_SECRET]);
    assert!(
        stop_cleanly(op, Duration::from_secs(30)).await,
        "a clean exit on SIGTERM"
    );
}

#[tokio::test]
async fn apiserver_restart_the_operator_reconnects_and_converges_without_losing_a_token() {
    restart_converges(Outage::ApiServer, "cp-api").await;
}

#[tokio::test]
async fn etcd_restart_the_operator_reconnects_and_converges_without_losing_a_token() {
    restart_converges(Outage::Etcd, "cp-etcd").await;
}

// ---------------------------------------------------------------------------------------------
// Write faults through the API proxy
// ---------------------------------------------------------------------------------------------

/// An operator for `ns` whose every request goes through a fresh [`ApiFaultProxy`].
async fn proxied_operator(
    instance: &str,
    ns: &TestNs,
    extra: &[&str],
) -> (ApiFaultProxy, OperatorProcess) {
    support::ensure_crds().await;
    let (proxy, kubeconfig) = proxied_kubeconfig(instance).await;
    let mut args = vec!["--namespaces", ns.name.as_str()];
    args.extend_from_slice(extra);
    let logs = log_dir(support::cluster().await.dir());
    let op = named_operator(&logs, instance, kubeconfig, &args).await;
    (proxy, op)
}

/// How long the token server holds a committed reply while the test arms an API fault.
const HOLD: Duration = Duration::from_secs(3);

fn issued(call: &RecordedCall) -> (String, String) {
    let o = call.outcome.as_ref().expect("a decided call");
    assert_eq!(o.status, Some(200), "the token call succeeded");
    (
        o.refresh_token
            .clone()
            .expect("rotation issues a refresh token"),
        o.access_token.clone().expect("an access token"),
    )
}

/// `name` ends up Ready on exactly the tokens of `call`: its refresh token stored, its access
/// token published (within `within`: long enough for a write-retry budget to run out).
async fn persisted(ns: &TestNs, name: &str, call: &RecordedCall, within: Duration) {
    let (rt, at) = issued(call);
    let (rt, at) = (&rt, &at);
    wait_for(
        within,
        &format!("{name} Ready on the tokens of call #{}", call.seq),
        || async move {
            let Ok(vc) = ns.api::<VaultConnection>().get(name).await else {
                return false;
            };
            phase(&vc) == Some(Phase::Ready)
                && stored_refresh_token(ns, name).await.as_ref() == Some(rt)
                && secret_data(ns, name)
                    .await
                    .and_then(|d| d.get("access_token").cloned())
                    .as_ref()
                    == Some(at)
        },
    )
    .await;
}

/// The state write right after a rotation meets, in turn: two connections reset before the
/// API server sees them; a reset after the API server committed the write (the operator's
/// retry must recognise its own write, not refuse it as someone else's rotation); and a stall
/// longer than the 20 s write budget (a timeout as the operator sees it). Each time exactly one
/// token request is made with the spent refresh token, and its tokens end up persisted.
#[tokio::test]
async fn dropped_and_stalled_state_writes_after_a_rotation_keep_the_token() {
    let ns = test_namespace("cp-wf").await;
    let ts = rotating_token_server(Duration::from_secs(3600)).await;
    let (proxy, mut op) = proxied_operator("cp-wf", &ns, &[]).await;
    let name = "wf-0";
    let path = state_path(&ns, name);
    let slow = || {
        ts.push_fault(Fault::SlowReply {
            delay: HOLD,
            after_commit: true,
        })
    };

    // 1. The first refresh: its token write is reset twice before reaching the API server.
    slow();
    let names = oauth_connections(&ns, &ts, "wf", 1).await;
    assert_eq!(names, [name]);
    let call = committed_call(&ts, 0).await;
    let rt0 = call.refresh_token.clone().expect("the seed was sent");
    let rule = proxy.fail(FaultRule::drop_connection(&path, MethodMatch::AnyWrite).times(2));
    persisted(&ns, name, &call, Duration::from_secs(60)).await;
    assert_eq!(proxy.dropped(rule), 2, "the resets were not injected");
    assert_eq!(calls_with(&ts, &rt0), 1, "the refresh token was sent again");

    // 2. A forced refresh: the token write is committed, then its answer is lost.
    let (rt1, _) = issued(&call);
    slow();
    request_refresh(&ns, name, "1").await;
    let call = committed_call(&ts, 1).await;
    assert_eq!(call.refresh_token.as_deref(), Some(rt1.as_str()));
    let rule = proxy.fail(FaultRule::drop_after_commit(&path, MethodMatch::AnyWrite));
    persisted(&ns, name, &call, Duration::from_secs(60)).await;
    assert_eq!(
        proxy.dropped(rule),
        1,
        "the reset after the commit was not injected"
    );
    assert_eq!(calls_with(&ts, &rt1), 1, "the refresh token was sent again");

    // 3. A forced refresh: the token write hangs past the write budget (20 s), then resets.
    let (rt2, _) = issued(&call);
    slow();
    request_refresh(&ns, name, "2").await;
    let call = committed_call(&ts, 2).await;
    assert_eq!(call.refresh_token.as_deref(), Some(rt2.as_str()));
    let rule = proxy.fail(FaultRule::stall(
        &path,
        MethodMatch::AnyWrite,
        Duration::from_secs(25),
    ));
    persisted(&ns, name, &call, Duration::from_secs(90)).await;
    assert_eq!(proxy.dropped(rule), 1, "the stall was not injected");
    assert_eq!(calls_with(&ts, &rt2), 1, "the refresh token was sent again");

    assert_eq!(ts.call_count(), 3, "one token request per refresh");
    let (stored, _) = issued(&call);
    assert!(
        ts.is_refresh_token_live(&stored),
        "the stored token is dead"
    );
    // The seed exchange and two forced refreshes of 1 h tokens; the faults add no request.
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(3));
    assert_no_secret_in_log(&op.logs(), &ts, &[CLIENT_SECRET]);
    assert_eq!(op.exit_status(), None, "the operator exited");
    assert!(
        stop_cleanly(op, Duration::from_secs(60)).await,
        "a clean exit on SIGTERM"
    );
}

// ---------------------------------------------------------------------------------------------
// Lease write faults with two electing operators
// ---------------------------------------------------------------------------------------------

/// How long Lease writes are faulted.
const LEASE_STORM: Duration = Duration::from_secs(30);
const LEASE_DURATION: Duration = Duration::from_secs(6);

/// Writes of Secrets and connection status the API server accepted from one process (dry
/// runs commit nothing and are left out), as `(time, process, "METHOD path")`.
fn committed_writes(
    proxy: &ApiFaultProxy,
    who: &'static str,
) -> Vec<(SystemTime, &'static str, String)> {
    proxy
        .requests()
        .into_iter()
        .filter(|r| MethodMatch::AnyWrite.matches(&r.method) && r.succeeded())
        .filter(|r| r.path.contains("/secrets") || r.path.contains("/vaultconnections"))
        .filter(|r| !r.query.as_deref().unwrap_or_default().contains("dryRun"))
        .map(|r| (r.at, who, format!("{} {}", r.method, r.path)))
        .collect()
}

/// Two writers at once would show as writes of one process on both sides of a write of the
/// other within one lease period (`P … Q … P`): a correct handover needs the old leader's
/// Lease to expire before the new one writes, and the old leader stops writing a fifth of a
/// lease period before that, so a legitimate `P … Q … P` spans more than a lease period.
/// Returns the offending triples.
fn interleavings(writes: &[(SystemTime, &'static str, String)], within: Duration) -> Vec<String> {
    let mut bad = Vec::new();
    for (j, (tq, q, wq)) in writes.iter().enumerate() {
        let before = writes[..j].iter().rev().find(|(_, p, _)| p != q);
        let after = writes[j + 1..].iter().find(|(_, p, _)| p != q);
        if let (Some((tp1, p1, w1)), Some((tp2, p2, w2))) = (before, after) {
            let span = tp2.duration_since(*tp1).unwrap_or_default();
            if p1 == p2 && span < within {
                bad.push(format!(
                    "{p1}: {w1} | {q}: {wq} ({:?} later) | {p2}: {w2} ({span:?} after the first)",
                    tq.duration_since(*tp1).unwrap_or_default()
                ));
            }
        }
    }
    bad
}

/// The two processes' accepted writes, merged in time, never interleave (see
/// [`interleavings`]); returns them and how many times the writer changed.
fn assert_one_writer(
    a: &ApiFaultProxy,
    b: &ApiFaultProxy,
) -> (Vec<(SystemTime, &'static str, String)>, usize) {
    let mut writes = committed_writes(a, "a");
    writes.extend(committed_writes(b, "b"));
    writes.sort_by_key(|w| w.0);
    let bad = interleavings(&writes, LEASE_DURATION);
    assert!(bad.is_empty(), "two writers at once:\n{}", bad.join("\n"));
    let handovers = writes.windows(2).filter(|w| w[0].1 != w[1].1).count();
    (writes, handovers)
}

/// Every write of the leader-election Lease may meet a 500, a 429 with `Retry-After`, a
/// connection reset before or after the commit, or a stall, for `LEASE_STORM`, while two
/// electing operators refresh rotating tokens. A leader that cannot renew stops writing and
/// exits (by design; the test restarts it as the kubelet would). Checked on the other side:
/// the two processes' accepted writes never overlap, no refresh token is replayed, and once
/// the faults stop a leader takes over and every connection is Ready on good tokens.
#[tokio::test]
async fn lease_write_faults_never_make_two_writers_and_only_delay() {
    use rand::{Rng, SeedableRng};
    let ns = test_namespace("cp-lease").await;
    let ttl = Duration::from_secs(4);
    let ts = rotating_token_server(ttl).await;
    let lease = "vaultconn-cp-lease";
    let secs = format!("{}s", LEASE_DURATION.as_secs());
    let args = [
        "--leader-elect",
        "--lease-name",
        lease,
        "--lease-namespace",
        ns.name.as_str(),
        "--lease-duration",
        secs.as_str(),
    ];
    let (proxy_a, mut a) = proxied_operator("lease-a", &ns, &args).await;
    wait_for_holder(
        &ns,
        lease,
        "lease-a",
        Duration::from_secs(30),
        "a holds the Lease",
    )
    .await;
    let (proxy_b, mut b) = proxied_operator("lease-b", &ns, &args).await;
    let names = oauth_connections(&ns, &ts, "lease", 2).await;
    for name in &names {
        ready(&ns, name).await;
    }

    let seed: u64 = std::env::var("VAULTCONN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("lease storm seed {seed} (VAULTCONN_TEST_SEED={seed} reproduces the schedule)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lease_path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{lease}",
        ns.name
    );
    let began = Instant::now();
    let mut armed = [None, None];
    let mut exits = 0;
    while began.elapsed() < LEASE_STORM {
        // At most one armed fault per process: about every other Lease write fails.
        for (i, proxy) in [&proxy_a, &proxy_b].into_iter().enumerate() {
            if armed[i].is_some_and(|id| proxy.is_active(id)) || rng.random_bool(0.5) {
                continue;
            }
            let rule = match rng.random_range(0..5) {
                0 => FaultRule::writes(&lease_path, 500),
                1 => FaultRule::writes(&lease_path, 429).retry_after(2),
                2 => FaultRule::drop_connection(&lease_path, MethodMatch::AnyWrite),
                3 => FaultRule::drop_after_commit(&lease_path, MethodMatch::AnyWrite),
                _ => FaultRule::stall(&lease_path, MethodMatch::AnyWrite, Duration::from_secs(3)),
            };
            armed[i] = Some(proxy.fail(rule));
        }
        // A leader that lost the Lease exits (it never resumes writing by itself); the
        // kubelet would restart it as a standby.
        for op in [&mut a, &mut b] {
            if op.exit_status().is_some() {
                exits += 1;
                op.restart().await.expect("restarting an operator");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    proxy_a.clear_all();
    proxy_b.clear_all();
    let calm = SystemTime::now();
    let faulted: Vec<_> = [&proxy_a, &proxy_b]
        .iter()
        .flat_map(|p| p.requests_matching(MethodMatch::AnyWrite, &lease_path))
        .filter(|r| r.rule.is_some())
        .collect();
    let lease_writes = proxy_a.count(MethodMatch::AnyWrite, &lease_path)
        + proxy_b.count(MethodMatch::AnyWrite, &lease_path);

    // Checked now (and again at the end): a double writer would soon show as a failure to
    // converge too, which would hide what went wrong.
    assert_one_writer(&proxy_a, &proxy_b);
    // Only delayed: a leader again, and every connection refreshed after the storm.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for op in [&mut a, &mut b] {
            if op.exit_status().is_some() {
                exits += 1;
                op.restart().await.expect("restarting an operator");
            }
        }
        if lease_holder(&ns, lease).await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no leader 60 s after the storm");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, name) in names.iter().enumerate() {
        let client = client_id("lease", i);
        wait_for(
            Duration::from_secs(60),
            &format!("{name} refreshed after the storm, on good tokens"),
            || async {
                refreshes_since(&ts, &client, calm) >= 1 && good_tokens(&ns, &ts, name).await
            },
        )
        .await;
    }

    let (writes, handovers) = assert_one_writer(&proxy_a, &proxy_b);
    eprintln!(
        "lease storm: {} of {lease_writes} Lease writes faulted ({} injected, {} dropped), \
         {exits} leader exits, {handovers} handovers, {} Secret/status writes checked",
        faulted.len(),
        faulted.iter().filter(|r| r.injected && !r.dropped).count(),
        faulted.iter().filter(|r| r.dropped).count(),
        writes.len()
    );
    assert!(!faulted.is_empty(), "no Lease write was faulted");
    // The schedule of 4 s tokens plus the seed exchange: leader changes add no request.
    assert_provider_invariants(
        &ts.provider_record(),
        &Invariants::new(scheduled_per_minute(ttl) + 1),
    );
    assert_no_secret_in_log(&(a.logs() + &b.logs()), &ts, &[CLIENT_SECRET]);
    stop_cleanly(a, Duration::from_secs(30)).await;
    stop_cleanly(b, Duration::from_secs(30)).await;
}

// ---------------------------------------------------------------------------------------------
// Concurrent editors
// ---------------------------------------------------------------------------------------------

/// How long the other client edits.
const EDITING: Duration = Duration::from_secs(15);
/// After convergence: a window in which the operator must write nothing.
const QUIET_WINDOW: Duration = Duration::from_secs(15);
const STATIC_CONNECTIONS: usize = 3;

async fn merge_patch<K>(api: &Api<K>, name: &str, patch: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    // A conflict with the operator's own write is fine: an editor retries or moves on.
    if let Err(e) = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        eprintln!("editor: patching {name}: {e}");
    }
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The operator's writes the API server saw (dry runs included: they are requests too),
/// after `from` (an index into the proxy's log).
fn writes_since(proxy: &ApiFaultProxy, from: usize) -> Vec<String> {
    proxy.requests()[from..]
        .iter()
        .filter(|r| MethodMatch::AnyWrite.matches(&r.method))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// Another client edits, for `EDITING`, at random moments: the generated Secrets' data (at
/// most the repair budget's number of times per Secret; more is a write fight, see
/// tests/write_fight.rs) and adds its own labels there, the state Secret's annotations, the connections' labels, and
/// their spec (which credentials Secret they read). Afterwards: every spec edit won (each
/// generated Secret holds what its connection's *last* spec says), every hand-tampered value
/// was repaired, none of the editor's labels and annotations was lost, the OAuth tokens were
/// repaired without spending a refresh token, and once all is converged the operator writes
/// nothing at all for `QUIET_WINDOW` (no write war, no flapping).
#[tokio::test]
async fn concurrent_editors_lose_no_update_and_cause_no_flapping() {
    use rand::{Rng, SeedableRng};
    let ns = test_namespace("cp-edit").await;
    let ts = rotating_token_server(Duration::from_secs(3600)).await;
    let oauth = oauth_connections(&ns, &ts, "edit", 1).await.remove(0);
    put_secret(&ns, "creds-a", &[("api_key", "key-a")]).await;
    put_secret(&ns, "creds-b", &[("api_key", "key-b")]).await;
    let spec = |creds: &str| json!({"type": "apiKey", "credentialsRef": {"name": creds}});
    let statics: Vec<String> = (0..STATIC_CONNECTIONS).map(|i| format!("st-{i}")).collect();
    for name in &statics {
        apply_vc(&ns, name, spec("creds-a")).await;
    }
    let (proxy, mut op) = proxied_operator("cp-edit", &ns, &[]).await;
    for name in statics.iter().chain([&oauth]) {
        ready(&ns, name).await;
    }

    let seed: u64 = std::env::var("VAULTCONN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("editor seed {seed} (VAULTCONN_TEST_SEED={seed} repeats its choices)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let secrets = ns.api::<Secret>();
    let vcs = ns.api::<VaultConnection>();
    let state = format!("{oauth}-vaultconn-state");
    let mut last_creds = ["creds-a"; STATIC_CONNECTIONS];
    // What the editor put where, which must all be there at the end.
    let mut secret_labels: BTreeMap<String, String> = BTreeMap::new();
    let mut vc_labels: BTreeMap<String, String> = BTreeMap::new();
    let mut state_note = None;
    let mut edits = BTreeMap::<&str, usize>::new();
    let mut tampered = BTreeMap::<String, usize>::new();
    let log_start = proxy.requests().len();
    let began = Instant::now();
    let mut n = 0u32;
    while began.elapsed() < EDITING {
        n += 1;
        let i = rng.random_range(0..STATIC_CONNECTIONS);
        let st = &statics[i];
        let mut pick = rng.random_range(0..6);
        // Data tampering stays within the repair budget per Secret: beyond it the Secret is
        // fought over and left alone for a while (`SecretContested`, tests/write_fight.rs).
        let target = match pick {
            0 => Some(st),
            1 => Some(&oauth),
            _ => None,
        };
        if let Some(target) = target {
            let count = tampered.entry(target.clone()).or_default();
            if *count >= vaultconn::repair::POLICY.budget {
                pick = 3;
            } else {
                *count += 1;
            }
        }
        let kind = match pick {
            0 => {
                let label = format!("editor-{n}");
                merge_patch(
                    &secrets,
                    st,
                    json!({"metadata": {"labels": {"editor.example/mark": label}},
                        "data": {"api_key": b64("tampered")}}),
                )
                .await;
                secret_labels.insert(st.clone(), label);
                "generated Secret data + label"
            }
            1 => {
                merge_patch(
                    &secrets,
                    &oauth,
                    json!({"data": {"access_token": b64("tampered")}}),
                )
                .await;
                "OAuth generated Secret data"
            }
            2 => {
                let note = format!("note-{n}");
                merge_patch(
                    &secrets,
                    &state,
                    json!({"metadata": {"annotations": {"editor.example/note": note}}}),
                )
                .await;
                state_note = Some(note);
                "state Secret annotation"
            }
            3 => {
                let label = format!("v{n}");
                let name = if rng.random_bool(0.5) { st } else { &oauth };
                merge_patch(
                    &vcs,
                    name,
                    json!({"metadata": {"labels": {"editor.example/seq": label}}}),
                )
                .await;
                vc_labels.insert(name.clone(), label);
                "connection label"
            }
            _ => {
                let creds = if rng.random_bool(0.5) {
                    "creds-a"
                } else {
                    "creds-b"
                };
                merge_patch(
                    &vcs,
                    st,
                    json!({"spec": {"credentialsRef": {"name": creds}}}),
                )
                .await;
                last_creds[i] = creds;
                "connection spec"
            }
        };
        *edits.entry(kind).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
    }
    let during = writes_since(&proxy, log_start);

    // Every spec edit won and every tampered value is repaired.
    for (i, st) in statics.iter().enumerate() {
        let want = if last_creds[i] == "creds-a" {
            "key-a"
        } else {
            "key-b"
        };
        ready(&ns, st).await;
        secret_data_eq(&ns, st, map(&[("api_key", want)])).await;
    }
    wait_for(
        Duration::from_secs(30),
        "the OAuth connection's Secret repaired",
        || good_tokens(&ns, &ts, &oauth),
    )
    .await;
    // No lost update: the editor's labels and annotations are all still there.
    for (name, label) in &secret_labels {
        let s = secrets.get(name).await.expect("generated Secret");
        assert_eq!(
            s.metadata
                .labels
                .unwrap_or_default()
                .get("editor.example/mark"),
            Some(label),
            "the operator dropped the editor's label on Secret {name}"
        );
    }
    for (name, label) in &vc_labels {
        let vc = vcs.get(name).await.expect("connection");
        assert_eq!(
            vc.metadata
                .labels
                .unwrap_or_default()
                .get("editor.example/seq"),
            Some(label),
            "the editor's label on connection {name} was lost"
        );
    }
    if let Some(note) = &state_note {
        let s = secrets.get(&state).await.expect("state Secret");
        assert_eq!(
            s.metadata
                .annotations
                .unwrap_or_default()
                .get("editor.example/note"),
            Some(note),
            "the operator dropped the editor's annotation on the state Secret"
        );
    }
    // Repairs never spend a refresh token: the seed exchange is the only token request.
    assert_eq!(ts.call_count(), 1, "a repair called the token endpoint");
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(1));

    // No flapping: once converged, nothing is written at all.
    let quiet_start = proxy.requests().len();
    tokio::time::sleep(QUIET_WINDOW).await;
    let quiet = writes_since(&proxy, quiet_start);
    eprintln!(
        "editors: {} edits {edits:?}; the operator wrote {} times while they edited, {} times in the {QUIET_WINDOW:?} after",
        n,
        during.len(),
        quiet.len()
    );
    assert!(quiet.is_empty(), "writes after convergence: {quiet:#?}");
    // While editing, each edit costs the operator at most a repair, its dry run, a status
    // update and an Event or two: a write war would cost more.
    assert_no_secret_in_log(&op.logs(), &ts, &[CLIENT_SECRET]);
    assert!(
        during.len() <= 5 * n as usize,
        "{} operator writes for {n} edits: {during:#?}",
        during.len()
    );
    assert_eq!(op.exit_status(), None, "the operator exited");
    assert!(
        stop_cleanly(op, Duration::from_secs(30)).await,
        "a clean exit on SIGTERM"
    );
}
