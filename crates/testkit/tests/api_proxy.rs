//! Self-tests of the API fault proxy's hold rules against the real API server: a held write
//! is committed while its client still waits, body matching tells two writes to the same
//! object apart, dry runs are never held, and a client that gives up during a hold has still
//! written (what a crash test relies on).
use vaultconn_testkit::shared as support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::Method;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use support::{data_of, secret_obj, test_namespace, TestNs};
use vaultconn_testkit::api_proxy::{ApiFaultProxy, FaultRule};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A proxy in front of the test API server and a client of `ns` that talks through it.
async fn proxied(ns: &TestNs) -> (ApiFaultProxy, Api<Secret>) {
    let cp = support::cluster().await;
    let proxy = ApiFaultProxy::start(&cp.server_url()).expect("proxy starts");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    proxy.write_kubeconfig(&path, cp.admin_token()).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    (proxy, Api::namespaced(client, &ns.name))
}

/// `name` replaced with `data` through `api`, on the live resourceVersion.
async fn replace(api: &Api<Secret>, name: &str, d: &[(&str, &str)], dry_run: bool) {
    let live = api.get(name).await.unwrap();
    let mut s = secret_obj(name, d);
    s.metadata.resource_version = live.metadata.resource_version;
    let pp = PostParams {
        dry_run,
        ..Default::default()
    };
    api.replace(name, &pp, &s).await.unwrap();
}

/// The Secret as the API server holds it, read directly (not through the proxy).
async fn direct(ns: &TestNs, name: &str) -> BTreeMap<String, String> {
    data_of(&ns.api::<Secret>().get(name).await.unwrap())
}

async fn create_direct(ns: &TestNs, name: &str, d: &[(&str, &str)]) {
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret_obj(name, d))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_held_write_is_committed_while_its_client_still_waits() {
    let ns = test_namespace("hold").await;
    let (proxy, api) = proxied(&ns).await;
    create_direct(&ns, "held", &[("k", "v1")]).await;
    let hold = Duration::from_secs(3);
    let path = format!("/namespaces/{}/secrets/held", ns.name);
    let rule = proxy.fail(FaultRule::hold_response(&path, Method::PUT, hold));

    let started = Instant::now();
    let api2 = api.clone();
    let write = tokio::spawn(async move { replace(&api2, "held", &[("k", "v2")], false).await });
    assert!(
        proxy.wait_held(rule, TIMEOUT).await,
        "the write was not held"
    );
    // Committed at the API server, while the client has no answer yet.
    assert_eq!(direct(&ns, "held").await["k"], "v2");
    assert!(
        !write.is_finished(),
        "the client got its answer during the hold"
    );
    tokio::time::timeout(TIMEOUT, write)
        .await
        .expect("the held answer arrives after the hold")
        .unwrap();
    assert!(
        started.elapsed() >= hold,
        "answered after {:?}, before the {hold:?} hold ended",
        started.elapsed()
    );

    assert_eq!(proxy.held(rule), 1);
    assert_eq!(proxy.injected(rule), 0);
    assert!(!proxy.is_active(rule), "a one-time hold rule is used up");
    let held: Vec<_> = proxy.requests().into_iter().filter(|r| r.held).collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].method, Method::PUT);
    assert_eq!(held[0].status, 200);
    assert_eq!(held[0].rule, Some(rule));
    assert!(!held[0].injected);

    // Used up: the next write goes through unheld.
    replace(&api, "held", &[("k", "v3")], false).await;
    assert_eq!(proxy.held(rule), 1);
    assert_eq!(direct(&ns, "held").await["k"], "v3");
}

#[tokio::test]
async fn body_matching_tells_two_writes_to_one_object_apart() {
    let ns = test_namespace("hold-body").await;
    let (proxy, api) = proxied(&ns).await;
    create_direct(&ns, "state", &[("token", "t0")]).await;
    let path = format!("/namespaces/{}/secrets/state", ns.name);
    // Refuse only the write that carries the marker key.
    let refuse = proxy.fail(FaultRule::writes(&path, 409).body_contains("marker_key"));
    replace(&api, "state", &[("token", "t1")], false).await;
    assert_eq!(
        proxy.injected(refuse),
        0,
        "a write without the marker was refused"
    );
    let s = {
        let live = api.get("state").await.unwrap();
        let mut s = secret_obj("state", &[("token", "t1"), ("marker_key", "x")]);
        s.metadata.resource_version = live.metadata.resource_version;
        s
    };
    let err = api
        .replace("state", &PostParams::default(), &s)
        .await
        .expect_err("the marked write is refused");
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err}"
    );
    assert_eq!(proxy.injected(refuse), 1);
    assert_eq!(
        direct(&ns, "state").await,
        data_of(&secret_obj("state", &[("token", "t1")]))
    );

    // Hold only the write that lacks the marker.
    let hold = proxy.fail(
        FaultRule::hold_response(&path, Method::PUT, Duration::from_millis(500))
            .body_lacks("marker_key"),
    );
    replace(
        &api,
        "state",
        &[("token", "t2"), ("marker_key", "x")],
        false,
    )
    .await;
    assert_eq!(proxy.held(hold), 0, "the marked write was held");
    replace(&api, "state", &[("token", "t3")], false).await;
    assert_eq!(proxy.held(hold), 1, "the unmarked write was not held");
    assert_eq!(direct(&ns, "state").await["token"], "t3");
}

#[tokio::test]
async fn dry_runs_are_never_held() {
    let ns = test_namespace("hold-dry").await;
    let (proxy, api) = proxied(&ns).await;
    create_direct(&ns, "out", &[("k", "v1")]).await;
    let path = format!("/namespaces/{}/secrets/out", ns.name);
    let rule = proxy.fail(FaultRule::hold_response(
        &path,
        Method::PUT,
        Duration::from_millis(500),
    ));
    replace(&api, "out", &[("k", "dry")], true).await;
    assert_eq!(proxy.held(rule), 0, "a dry run was held");
    assert!(proxy.is_active(rule));
    assert_eq!(direct(&ns, "out").await["k"], "v1");
    replace(&api, "out", &[("k", "v2")], false).await;
    assert_eq!(proxy.held(rule), 1);
    let puts = proxy.requests_matching(Method::PUT, &path);
    assert_eq!(puts.len(), 2);
    assert!(puts[0]
        .query
        .as_deref()
        .unwrap_or_default()
        .contains("dryRun=All"));
    assert!(!puts[0].held && puts[1].held);
}

#[tokio::test]
async fn a_client_that_gives_up_during_a_hold_has_still_written() {
    let ns = test_namespace("hold-gone").await;
    let (proxy, api) = proxied(&ns).await;
    create_direct(&ns, "gone", &[("k", "v1")]).await;
    let path = format!("/namespaces/{}/secrets/gone", ns.name);
    let rule = proxy.fail(FaultRule::hold_response(
        &path,
        Method::PUT,
        Duration::from_secs(60),
    ));
    let api2 = api.clone();
    let write = tokio::spawn(async move { replace(&api2, "gone", &[("k", "v2")], false).await });
    assert!(proxy.wait_held(rule, TIMEOUT).await);
    // The client dies (as a SIGKILLed operator would) without an answer.
    write.abort();
    assert!(write.await.unwrap_err().is_cancelled());
    assert_eq!(direct(&ns, "gone").await["k"], "v2");
    // The proxy serves on while the abandoned hold runs out.
    replace(&api, "gone", &[("k", "v3")], false).await;
    assert_eq!(direct(&ns, "gone").await["k"], "v3");
    assert_eq!(proxy.held(rule), 1);
}
