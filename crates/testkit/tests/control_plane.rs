//! Cluster tests of the test foundation itself: the control plane is real (garbage collector,
//! service-account controllers), tests are isolated, and nothing outlives its owner.
use vaultconn_testkit::shared as support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use support::{test_namespace, wait_for, wait_for_some};
use vaultconn_testkit::control_plane::{ControlPlane, ControlPlaneOptions};

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let ns = test_namespace("gc").await;
    let cms: Api<ConfigMap> = ns.api();
    let secrets: Api<Secret> = ns.api();

    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let owner_ref = OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().unwrap(),
        block_owner_deletion: Some(false),
        controller: None,
    };
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("dependent".into()),
                    owner_references: Some(vec![owner_ref]),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([("k".into(), "v".into())])),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    wait_for(TIMEOUT, "the GC to delete the dependent Secret", || async {
        secrets.get_opt("dependent").await.unwrap().is_none()
    })
    .await;
    assert!(cms.get_opt("owner").await.unwrap().is_none());
}

#[tokio::test]
async fn controller_manager_creates_default_service_account_and_token() {
    let ns = test_namespace("kcm").await;
    let sas: Api<ServiceAccount> = ns.api();
    let secrets: Api<Secret> = ns.api();
    // serviceaccount controller
    let sa = wait_for_some(TIMEOUT, "the default ServiceAccount", || async {
        sas.get_opt("default").await.unwrap()
    })
    .await;
    assert_eq!(sa.metadata.namespace.as_deref(), Some(ns.name.as_str()));
    // serviceaccount-token controller
    let token = wait_for_some(
        TIMEOUT,
        "a token Secret for the default ServiceAccount",
        || async {
            let list = secrets.list(&ListParams::default()).await.unwrap();
            list.items
                .into_iter()
                .find(|s| s.type_.as_deref() == Some("kubernetes.io/service-account-token"))
        },
    )
    .await;
    assert!(token.data.unwrap().contains_key("token"));
}

// Two tests' worth of work really running at the same time, each in its own namespace with a
// client of its own: both meet at a barrier while their objects exist, then check what each one
// can see. Both run inside one test (joined on a multi-threaded runtime), so the check does not
// depend on libtest running tests in parallel: `--test-threads=1` used to leave one of two
// separate tests waiting at the barrier for the other, which never started.
const SHARED_NAME: &str = "same-name";

struct Rendezvous {
    barrier: tokio::sync::Barrier,
    namespaces: Mutex<Vec<String>>,
}

async fn isolation_check(who: &str, meet: &Rendezvous) {
    let ns = test_namespace("iso").await;
    let cms: Api<ConfigMap> = ns.api();
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta {
                name: Some(SHARED_NAME.into()),
                labels: Some(BTreeMap::from([("isolation".into(), "yes".into())])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("owner".into(), who.into())])),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    meet.namespaces.lock().unwrap().push(ns.name.clone());

    tokio::time::timeout(Duration::from_secs(120), meet.barrier.wait())
        .await
        .expect("the other isolation check never arrived");

    let names = meet.namespaces.lock().unwrap().clone();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_ne!(names[0], names[1]);

    let mine = cms.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(mine.len(), 1, "{who} sees {mine:?}");
    assert_eq!(mine[0].metadata.name.as_deref(), Some(SHARED_NAME));
    assert_eq!(mine[0].data.as_ref().unwrap()["owner"], who);

    // Both objects exist right now, under the same name, in different namespaces.
    let all: Api<ConfigMap> = Api::all(ns.client.clone());
    let both = all
        .list(&ListParams::default().labels("isolation=yes"))
        .await
        .unwrap()
        .items;
    let mut where_: Vec<_> = both
        .iter()
        .filter_map(|c| c.metadata.namespace.clone())
        .collect();
    where_.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(where_, expected);

    // Let the other check list before this one ends.
    tokio::time::timeout(Duration::from_secs(60), meet.barrier.wait())
        .await
        .expect("the other isolation check did not finish its checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tests_at_once_are_isolated() {
    let meet = Rendezvous {
        barrier: tokio::sync::Barrier::new(2),
        namespaces: Mutex::new(Vec::new()),
    };
    tokio::join!(isolation_check("a", &meet), isolation_check("b", &meet));
}

/// Alive and not a zombie (a killed child reparented to a non-reaping init stays a zombie).
fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(pid as libc::pid_t, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // State is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn write_test_crd(dir: &Path) {
    std::fs::write(
        dir.join("widgets.yaml"),
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.testkit.vaultconn.dev
spec:
  group: testkit.vaultconn.dev
  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
---
"#,
    )
    .unwrap();
    std::fs::write(dir.join("ignored.txt"), "not yaml").unwrap();
}

#[tokio::test]
async fn second_control_plane_works_and_stops_cleanly() {
    let began = Instant::now();
    let mut cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap();
    eprintln!("second control plane started in {:?}", began.elapsed());
    let shared = support::cluster().await;
    assert_ne!(cp.server_url(), shared.server_url());
    assert_ne!(cp.dir(), shared.dir());

    let client = cp.client().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("second".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // ... and it is a different cluster from the shared one.
    let shared_ns: Api<Namespace> = Api::all(shared.client().await);
    assert!(shared_ns.get_opt("second").await.unwrap().is_none());

    // install_crds: applies the yaml, waits for Established, the resource is served.
    let crd_dir = tempfile::tempdir().unwrap();
    write_test_crd(crd_dir.path());
    let names = cp.install_crds(crd_dir.path()).await.unwrap();
    assert_eq!(names, ["widgets.testkit.vaultconn.dev"]);
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "testkit.vaultconn.dev",
        "v1",
        "Widget",
    ));
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "second", &ar);
    assert!(widgets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
    // Idempotent (server-side apply).
    cp.install_crds(crd_dir.path()).await.unwrap();

    // kubectl accepts the kubeconfig too.
    if Path::new("/usr/bin/kubectl").exists() || which("kubectl").is_some() {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cp.kubeconfig_path())
            .args(["get", "namespace", "second", "-o", "name"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "namespace/second"
        );
    }

    let pids = cp.pids();
    let names: Vec<_> = pids.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "watchdog"
        ]
    );
    assert!(pids.iter().all(|(_, pid)| process_alive(*pid)));
    let dir = cp.dir().to_path_buf();
    assert!(dir.exists());
    drop(client);

    let began = Instant::now();
    cp.stop();
    eprintln!("second control plane stopped in {:?}", began.elapsed());
    for (name, pid) in &pids {
        assert!(!process_alive(*pid), "{name} ({pid}) still running");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{name} ({pid}) not reaped"
        );
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(cp.pids().is_empty());
    cp.stop(); // idempotent
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

const HELPER_ENV: &str = "VAULTCONN_CP_SIGKILL_HELPER";

/// Not a test on its own: run by `control_plane_dies_with_a_sigkilled_owner` in a child process.
/// Starts a control plane, keeps it in a static (never dropped), reports, and waits to be killed.
#[tokio::test]
#[ignore = "helper process for control_plane_dies_with_a_sigkilled_owner"]
async fn sigkill_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let cp = support::cluster().await;
    let pids: Vec<String> = cp.pids().iter().map(|(_, p)| p.to_string()).collect();
    // Leading newline: libtest has already printed "test sigkill_helper ... " on this line.
    println!("\nREADY {} {}", cp.dir().display(), pids.join(","));
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test]
async fn control_plane_dies_with_a_sigkilled_owner() {
    // Become the reaper of the helper's orphans, so that they do not linger as zombies under an
    // init that reaps lazily; `reap` below collects them.
    // SAFETY: plain prctl on this process.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "sigkill_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = helper.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("READY "))
    });
    let line = match tokio::time::timeout(Duration::from_secs(120), ready).await {
        Ok(Ok(Some(line))) => line,
        other => {
            let _ = helper.kill();
            panic!("helper did not report READY: {other:?}");
        }
    };
    let mut parts = line.split_whitespace().skip(1);
    let dir = PathBuf::from(parts.next().unwrap());
    let pids: Vec<u32> = parts
        .next()
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4);
    assert!(pids.iter().all(|p| process_alive(*p)));
    assert!(dir.exists());

    helper.kill().unwrap(); // SIGKILL: no Drop, no atexit, nothing runs in the owner
    helper.wait().unwrap();

    wait_for(
        TIMEOUT,
        "the killed owner's control plane to go away",
        || {
            let gone = pids.iter().all(|p| !process_alive(*p)) && !dir.exists();
            async move { gone }
        },
    )
    .await;
    // A multi-threaded process shows as a zombie before its last thread is gone and only then
    // can be reaped, so poll.
    let mut unreaped = pids.clone();
    wait_for(TIMEOUT, "reaping the killed owner's servers", || {
        unreaped.retain(|&pid| {
            // SAFETY: non-blocking wait for a (former grand-)child; -1/ECHILD if it is not ours.
            unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) == 0 }
        });
        let done = unreaped.is_empty();
        async move { done }
    })
    .await;
}

const PROXY_HELPER_ENV: &str = "VAULTCONN_CP_PROXY_HELPER";

/// Not a test on its own: run by `control_plane_probes_ignore_proxy_variables` in a child
/// process whose environment names a proxy. Starts and stops a control plane.
#[tokio::test]
#[ignore = "helper process for control_plane_probes_ignore_proxy_variables"]
async fn proxy_helper() {
    if std::env::var_os(PROXY_HELPER_ENV).is_none() {
        return;
    }
    let mut cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("the control plane starts with proxy variables set");
    cp.stop();
    println!("\nSTARTED");
}

/// The start-up probes carry the admin token to loopback: they must never go through a proxy
/// named in the environment. A trap listens where the proxy variables point and counts every
/// connection; the control plane starts in a child process with those variables set.
#[tokio::test]
async fn control_plane_probes_ignore_proxy_variables() {
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = format!("http://{}", trap.local_addr().unwrap());
    let caught = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let caught = std::sync::Arc::clone(&caught);
        std::thread::spawn(move || {
            for conn in trap.incoming() {
                caught.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(conn);
            }
        });
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "proxy_helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(PROXY_HELPER_ENV, "1")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    // reqwest takes HTTP_PROXY for http:// (etcd's /health) and ALL_PROXY for https://
    // (kube-apiserver's /readyz, with the admin token). HTTPS_PROXY stays unset: kube's own
    // client reads that one and refuses to start without its http-proxy feature, which is
    // not what this test is about.
    for var in ["HTTP_PROXY", "ALL_PROXY"] {
        cmd.env(var, &proxy).env(var.to_lowercase(), &proxy);
    }
    for var in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
        cmd.env_remove(var);
    }
    let mut helper = cmd.spawn().unwrap();
    let stdout = helper.stdout.take().unwrap();
    let started = tokio::task::spawn_blocking(move || {
        // Read to the end: a closed pipe would fail the helper's last lines of output.
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l == "STARTED")
            .count()
            > 0
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    while !started.is_finished() {
        let through_proxy = caught.load(std::sync::atomic::Ordering::SeqCst);
        if through_proxy > 0 || Instant::now() > deadline {
            let _ = helper.kill();
            let _ = helper.wait();
            panic!(
                "{through_proxy} connection(s) went to the proxy from the environment \
                 (or the start took over 180 s)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = helper.wait().unwrap();
    assert!(
        started.await.unwrap(),
        "the helper did not start a control plane"
    );
    assert!(status.success(), "helper: {status}");
    assert_eq!(caught.load(std::sync::atomic::Ordering::SeqCst), 0);
}
