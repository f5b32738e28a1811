//! `vaultconn run` with no cluster configured (the README's run command): it starts a local
//! control plane, installs the CRD, applies the demo (every example, an empty connection, OAuth
//! connections against the demo token server), runs the operator, and on Ctrl-C stops
//! everything cleanly. `--no-demo` gives the bare control plane.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use vaultconn::api::{ConnectionType, GrantType, Phase, VaultConnection};
use vaultconn_testkit::process::spawn_dies_with_parent;
use vaultconn_testkit::shared::{wait_for, wait_for_some};

const DEMO_NAMESPACE: &str = "vaultconn-demo";

/// A `vaultconn run` child process without a configured cluster.
struct LocalRun {
    child: Child,
    kubeconfig: PathBuf,
    /// The control plane's temp dir (named in every server's command line).
    dir: PathBuf,
    metrics: String,
    stderr: Arc<Mutex<String>>,
    home: PathBuf,
}

/// Start `vaultconn <args> --metrics-addr 127.0.0.1:<free>` the way `make run` does, with no
/// cluster configured: no KUBECONFIG, not in a Pod, and a HOME without `.kube/config` (so a
/// developer's own cluster is never used — and no traffic leaves loopback).
fn start(args: &[&str]) -> LocalRun {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let real_home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()));
    let cache = std::env::var_os("VAULTCONN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| real_home.join(".cache/vaultconn"));
    let home = std::env::temp_dir().join(format!(
        "vaultconn-embedded-run-{}-{}",
        std::process::id(),
        args.join("_").replace(['-', '/'], "")
    ));
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vaultconn"));
    cmd.args(args)
        .args(["--metrics-addr", &metrics])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("VAULTCONN_NO_DEMO")
        .env("HOME", &home)
        .env("VAULTCONN_CACHE", &cache)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_dies_with_parent(cmd).unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
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
    // stderr (the banner) is drained so the child never blocks on a full pipe.
    let collected = Arc::new(Mutex::new(String::new()));
    let sink = collected.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let kubeconfig = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the operator printed the local kubeconfig");
    let dir = kubeconfig.parent().unwrap().to_path_buf();
    assert!(dir.exists());
    LocalRun {
        child,
        kubeconfig,
        dir,
        metrics,
        stderr: collected,
        home,
    }
}

impl LocalRun {
    async fn client(&self) -> kube::Client {
        vaultconn_testkit::install_crypto_provider();
        let kc = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// Ctrl-C, then: a successful exit, the temp dir gone, no control-plane process left.
    async fn ctrl_c_stops_everything(mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: plain syscall on our own, not yet reaped child.
        unsafe {
            libc::kill(pid, libc::SIGINT);
        }
        let child = &mut self.child;
        let status = wait_for_some(Duration::from_secs(30), "exit after Ctrl-C", || {
            let s = child.try_wait().unwrap();
            async move { s }
        })
        .await;
        assert!(status.success(), "exit status {status}");
        assert!(
            !self.dir.exists(),
            "the control plane's temp dir was removed"
        );
        let dir = self.dir.to_str().unwrap();
        let leftovers: Vec<_> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(dir))
                    .unwrap_or(false)
            })
            .map(|e| e.file_name())
            .collect();
        assert!(
            leftovers.is_empty(),
            "control-plane processes left running: {leftovers:?}"
        );
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// Every VaultConnection in `examples/`: name → type.
fn example_connections() -> BTreeMap<String, ConnectionType> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        for doc in docs {
            if doc["kind"] == "VaultConnection" {
                let vc: VaultConnection = serde_json::from_value(doc).unwrap();
                out.insert(vc.metadata.name.clone().unwrap(), vc.spec.type_);
            }
        }
    }
    out
}

fn phase_and_reason(vc: &VaultConnection) -> (Option<Phase>, Option<String>) {
    let status = vc.status.as_ref();
    let reason = status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.reason.clone());
    (status.and_then(|s| s.phase), reason)
}

async fn wait_phase(api: &Api<VaultConnection>, name: &str, phase: Phase, reason: &str) {
    let what = format!("{name} to be {phase:?} ({reason})");
    wait_for(Duration::from_secs(60), &what, || async {
        match api.get_opt(name).await {
            Ok(Some(vc)) => phase_and_reason(&vc) == (Some(phase), Some(reason.to_string())),
            _ => false,
        }
    })
    .await;
}

fn secret_value(secret: &Secret, key: &str) -> String {
    let bytes = &secret.data.as_ref().unwrap()[key].0;
    String::from_utf8(bytes.clone()).unwrap()
}

#[tokio::test]
async fn run_without_a_cluster_shows_the_demo_and_stops_cleanly_on_ctrl_c() {
    // Exactly what `make run` runs (after provisioning the binaries).
    let run = start(&["run", "--allow-http-loopback"]);
    let client = run.client().await;
    let api: Api<VaultConnection> = Api::namespaced(client.clone(), DEMO_NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), DEMO_NAMESPACE);

    let examples = example_connections();
    let mut types: Vec<_> = examples.values().copied().collect();
    types.sort_by_key(|t| t.as_str());
    types.dedup();
    assert_eq!(
        types.len(),
        ConnectionType::ALL.len(),
        "an example per type"
    );

    // The empty connection: Pending until its credentials exist.
    wait_phase(&api, "empty", Phase::Pending, "CredentialsMissing").await;
    // Every example turns Ready — except auth0, whose token URL is always a real tenant's
    // https://{domain}/oauth/token: the demo gives it no credentials, so nothing is sent.
    for (name, type_) in &examples {
        match type_ {
            ConnectionType::Auth0 => {
                wait_phase(&api, name, Phase::Pending, "CredentialsMissing").await
            }
            _ => wait_phase(&api, name, Phase::Ready, "Reconciled").await,
        }
    }

    // The OAuth examples get their tokens from the demo token server, and its short lifetime
    // makes the expiry move forward: a refresh happened.
    let oauth2: Vec<&String> = examples
        .iter()
        .filter(|(_, t)| **t == ConnectionType::OAuth2)
        .map(|(n, _)| n)
        .collect();
    assert!(!oauth2.is_empty());
    for name in &oauth2 {
        let vc = api.get(name).await.unwrap();
        let url = vc.spec.oauth2.as_ref().unwrap().token_url.clone();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "{name} uses the demo token server on loopback: {url}"
        );
        let first = vc.status.unwrap().expires_at.expect("expiresAt once Ready");
        let what = format!("{name}'s expiresAt to move past {first}");
        let api = &api;
        let first = &first;
        let later = wait_for_some(Duration::from_secs(90), &what, || async move {
            let vc = api.get(name).await.ok()?;
            let at = vc.status?.expires_at?;
            (at.parse::<jiff::Timestamp>().ok()? > first.parse::<jiff::Timestamp>().ok()?)
                .then_some(at)
        })
        .await;
        assert_ne!(&later, first);
        wait_phase(api, name, Phase::Ready, "Reconciled").await;
    }

    // What the token server saw: each refreshToken connection's seed was spent (rotated
    // away), so the demo server now refuses it.
    let mut refresh_token_examples = 0;
    for name in &oauth2 {
        let vc = api.get(name).await.unwrap();
        let oauth = vc.spec.oauth2.as_ref().unwrap();
        if oauth.grant_type != Some(GrantType::RefreshToken) {
            continue;
        }
        refresh_token_examples += 1;
        let creds = secrets
            .get(&vc.spec.credentials_ref.as_ref().unwrap().name)
            .await
            .unwrap();
        assert!(
            vc.status.unwrap().spent_seed_fingerprint.is_some(),
            "{name}: the status records the seed as spent"
        );
        let replay = reqwest::Client::new()
            .post(&oauth.token_url)
            .basic_auth(
                secret_value(&creds, "client_id"),
                Some(secret_value(&creds, "client_secret")),
            )
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &secret_value(&creds, "refresh_token")),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(replay.status().as_u16(), 400, "{name}");
        let body: serde_json::Value = replay.json().await.unwrap();
        assert_eq!(
            body["error"], "invalid_grant",
            "{name}: the spent seed is refused"
        );
    }
    assert!(refresh_token_examples > 0, "a refreshToken example");

    // The banner tells a human how to watch.
    let banner = run.stderr.lock().unwrap().clone();
    assert!(
        banner.contains(&format!("export KUBECONFIG={}", run.kubeconfig.display())),
        "{banner}"
    );
    assert!(
        banner.contains("kubectl get vaultconnections.vaultconn.dev -A -w"),
        "{banner}"
    );

    run.ctrl_c_stops_everything().await;
}

#[tokio::test]
async fn run_with_no_demo_brings_up_a_bare_local_cluster_and_stops_cleanly_on_ctrl_c() {
    let run = start(&["run", "--no-demo"]);
    let client = run.client().await;
    // Ready means the operator's caches are synced; the demo would have been applied before.
    let url = format!("http://{}/readyz", run.metrics);
    let http = reqwest::Client::new();
    wait_for(Duration::from_secs(60), "the operator to be ready", || {
        let req = http.get(&url).send();
        async move { req.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    let all: Api<VaultConnection> = Api::all(client.clone());
    assert!(all
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    assert!(namespaces.get_opt(DEMO_NAMESPACE).await.unwrap().is_none());

    // The CRD is installed by the operator: applying a VaultConnection works right away.
    let api: Api<VaultConnection> = Api::namespaced(client, "default");
    let vc = json!({"apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection", "metadata": {"name": "demo"}, "spec": {"type": "bearerToken"}});
    api.patch("demo", &PatchParams::apply("test"), &Patch::Apply(&vc))
        .await
        .unwrap();
    wait_phase(&api, "demo", Phase::Pending, "CredentialsMissing").await;

    run.ctrl_c_stops_everything().await;
}
