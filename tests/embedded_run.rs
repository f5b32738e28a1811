//! `vaultconn run` with no cluster configured (the README's run command): it starts a local
//! control plane, installs the CRD, runs the operator, and on Ctrl-C stops everything cleanly.
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use vaultconn::api::VaultConnection;
use vaultconn_testkit::process::spawn_dies_with_parent;

#[tokio::test]
async fn run_without_kubeconfig_brings_up_a_local_cluster_and_stops_cleanly_on_ctrl_c() {
    vaultconn_testkit::install_crypto_provider();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vaultconn"));
    cmd.args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = spawn_dies_with_parent(cmd).unwrap();
    let stdout = child.stdout.take().unwrap();
    // The log line that names the kubeconfig; read on a thread (blocking pipe).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let plain = line.replace("\u{1b}[", "");
            if let Some(i) = plain.find("export KUBECONFIG=") {
                let path: String = plain[i + 18..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                let _ = tx.send(PathBuf::from(path));
            }
        }
    });
    let kubeconfig = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the operator printed the local kubeconfig");
    let dir = kubeconfig.parent().unwrap().to_path_buf();
    assert!(dir.exists());

    let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let api: Api<VaultConnection> = Api::namespaced(client, "default");
    let vc = json!({"apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection", "metadata": {"name": "demo"}, "spec": {"type": "bearerToken"}});
    // The CRD is installed by the operator: applying a VaultConnection works right away.
    api.patch("demo", &PatchParams::apply("test"), &Patch::Apply(&vc))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live = api.get("demo").await.unwrap();
        if live.status.and_then(|s| s.phase).is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator never reconciled the connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Ctrl-C.
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after Ctrl-C");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    assert!(!dir.exists(), "the control plane's temp dir was removed");
    let leftovers = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(dir.to_str().unwrap()))
                .unwrap_or(false)
        });
    assert_eq!(leftovers.count(), 0, "control-plane processes left running");
}
