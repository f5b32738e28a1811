//! Self-test of `ControlPlane::stop_apiserver`/`start_apiserver` and `stop_etcd`/`start_etcd`:
//! a restarted server comes back on the same address with the same data and credentials, so a
//! client built before the restart keeps working, and nothing outlives `stop`.
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use vaultconn_testkit::control_plane::{ControlPlane, ControlPlaneOptions};

const RESTART: Duration = Duration::from_secs(60);

fn process_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z'))
}

fn pid_of(cp: &ControlPlane, name: &str) -> Option<u32> {
    cp.pids()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| p)
}

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some([("k".to_string(), name.to_string())].into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn apiserver_and_etcd_restart_in_place_and_clients_keep_working() {
    let began = std::time::Instant::now();
    let mut cp = ControlPlane::start(ControlPlaneOptions {
        provision_script: Some(
            vaultconn_testkit::repo_root().join("scripts/provision-control-plane.sh"),
        ),
        ..Default::default()
    })
    .await
    .expect("control plane starts");
    eprintln!("control plane started in {:?}", began.elapsed());
    let url = cp.server_url();
    // Built before any restart, used after each: same URL, CA-less TLS, same token.
    let client = cp.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &config_map("before"))
        .await
        .expect("create before the restarts");

    // kube-apiserver.
    let api_pid = pid_of(&cp, "kube-apiserver").expect("apiserver pid");
    let began = std::time::Instant::now();
    cp.stop_apiserver().expect("stop apiserver");
    eprintln!("apiserver stopped in {:?}", began.elapsed());
    assert!(!cp.is_running("kube-apiserver"));
    assert!(!process_alive(api_pid), "the apiserver still runs");
    assert_eq!(
        pid_of(&cp, "kube-apiserver"),
        None,
        "a stopped server has no pid"
    );
    let err = tokio::time::timeout(Duration::from_secs(10), cms.get("before"))
        .await
        .expect("a request to a stopped apiserver fails fast")
        .expect_err("no apiserver answers");
    eprintln!("while stopped: {err}");
    cp.stop_apiserver().expect("stopping again is a no-op");
    let began = std::time::Instant::now();
    cp.start_apiserver(RESTART).await.expect("start apiserver");
    eprintln!("apiserver restarted in {:?}", began.elapsed());
    let new_pid = pid_of(&cp, "kube-apiserver").expect("restarted apiserver pid");
    assert_ne!(new_pid, api_pid);
    assert_eq!(cp.server_url(), url);
    let cm = cms
        .get("before")
        .await
        .expect("same data after the restart");
    assert_eq!(cm.data.unwrap()["k"], "before");
    cp.start_apiserver(RESTART)
        .await
        .expect("starting a running one is a no-op");
    assert_eq!(pid_of(&cp, "kube-apiserver"), Some(new_pid));

    // etcd: the apiserver stays up but cannot serve reads that need etcd.
    let etcd_pid = pid_of(&cp, "etcd").expect("etcd pid");
    let began = std::time::Instant::now();
    cp.stop_etcd().expect("stop etcd");
    eprintln!("etcd stopped in {:?}", began.elapsed());
    assert!(!cp.is_running("etcd"));
    assert!(!process_alive(etcd_pid), "etcd still runs");
    assert!(cp.is_running("kube-apiserver"));
    let during = tokio::time::timeout(
        Duration::from_secs(3),
        cms.create(&PostParams::default(), &config_map("during")),
    )
    .await;
    assert!(
        !matches!(during, Ok(Ok(_))),
        "a write succeeded while etcd was stopped"
    );
    let began = std::time::Instant::now();
    cp.start_etcd(RESTART).await.expect("start etcd");
    eprintln!(
        "etcd restarted (apiserver ready again) in {:?}",
        began.elapsed()
    );
    assert_ne!(pid_of(&cp, "etcd"), Some(etcd_pid));
    cms.create(&PostParams::default(), &config_map("after"))
        .await
        .expect("writes work again after the etcd restart");
    assert_eq!(
        cms.get("before").await.expect("old data").data.unwrap()["k"],
        "before"
    );

    // Everything, restarted servers included, goes with `stop`.
    let pids = cp.pids();
    let dir = cp.dir().to_path_buf();
    drop((cms, client));
    let began = std::time::Instant::now();
    cp.stop();
    eprintln!("control plane stopped in {:?}", began.elapsed());
    for (name, pid) in &pids {
        assert!(!process_alive(*pid), "{name} ({pid}) still running");
    }
    assert!(!Path::new(&dir).exists(), "{} still exists", dir.display());
}
