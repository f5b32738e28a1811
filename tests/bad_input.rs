//! Bad input, end to end against the real control plane: targets that name Secrets other
//! controllers own (a ServiceAccount token, a TLS Secret, an owned Secret), the corpus of
//! invalid VaultConnections and credentials Secrets in `tests/bad-input-corpus` (plus the bad
//! half of `tests/cli-corpus`), and broken token responses from the fault server.
//!
//! Each case must end in a schema rejection by the API server or a specific status reason,
//! and never in a panic, a crash loop or a hot loop. "What the other side saw" is the proof:
//! this binary runs its own operator process whose kubeconfig points at an [`ApiFaultProxy`]
//! (no faults armed, it only records), so every request the operator made to the API server
//! is counted, and the token server counts every token request. A crash shows as a new
//! process id or an exit status; every test checks the operator still runs as the same
//! process.
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::Method;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::ApiResource;
use kube::ResourceExt;
use serde_json::{json, Value};
use support::objects::*;
use support::{test_namespace, wait_for, wait_for_some, TestNs};
use tokio::sync::OnceCell;
use vaultconn::api::VaultConnection;
use vaultconn_testkit::api_proxy::{ApiFaultProxy, MethodMatch};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};

/// The recording proxy and the operator behind it, shared by the tests of this binary.
struct Harness {
    proxy: ApiFaultProxy,
    operator: std::sync::Mutex<OperatorProcess>,
    /// The operator's process id when it started: a crash loop would change it.
    pid: u32,
    log_path: PathBuf,
}

static HARNESS: OnceCell<Harness> = OnceCell::const_new();

async fn harness() -> &'static Harness {
    HARNESS
        .get_or_init(|| async {
            support::ensure_crds().await;
            let cp = support::cluster().await;
            let proxy = ApiFaultProxy::start(&cp.server_url()).expect("proxy starts");
            let kubeconfig = cp.dir().join("kubeconfig-bad-input");
            proxy
                .write_kubeconfig(&kubeconfig, cp.admin_token())
                .expect("writing the proxy kubeconfig");
            let log_path = cp.dir().join("operator-bad-input.log");
            let operator = OperatorProcess::start(OperatorOptions {
                binary: env!("CARGO_BIN_EXE_vaultconn").into(),
                kubeconfig,
                log_path: log_path.clone(),
                // A short token timeout lets the slow-loris reply run past it quickly.
                extra_args: vec![
                    "--allow-http-loopback".into(),
                    "--token-request-timeout".into(),
                    "3s".into(),
                ],
                log_filter: "info,vaultconn=debug".into(),
            })
            .await
            .expect("operator starts");
            let pid = operator.pid().expect("the operator runs");
            Harness {
                proxy,
                operator: std::sync::Mutex::new(operator),
                pid,
                log_path,
            }
        })
        .await
}

impl Harness {
    /// The operator is still the process that started: no panic, no crash, no restart.
    fn assert_same_process(&self) {
        let mut op = self.operator.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            op.exit_status(),
            None,
            "the operator exited; see {}",
            self.log_path.display()
        );
        assert_eq!(op.pid(), Some(self.pid), "the operator was restarted");
        assert_eq!(op.starts(), 1, "the operator was restarted");
        let logs = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        assert!(
            !logs.contains("panicked"),
            "the operator panicked; see {}",
            self.log_path.display()
        );
    }

    /// Writes (POST/PUT/PATCH/DELETE, dry runs included) the operator made to paths containing
    /// `path`.
    fn writes(&self, path: &str) -> usize {
        self.proxy.count(MethodMatch::AnyWrite, path)
    }

    /// Every request (reads and watches included) the operator made to paths containing `path`.
    fn requests(&self, path: &str) -> usize {
        self.proxy.count(MethodMatch::Any, path)
    }
}

fn secrets_path(ns: &TestNs) -> String {
    format!("/api/v1/namespaces/{}/secrets", ns.name)
}

fn secret_path(ns: &TestNs, name: &str) -> String {
    format!("/api/v1/namespaces/{}/secrets/{name}", ns.name)
}

/// How long the operator is watched for a loop after it has settled.
const QUIET_WINDOW: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Adoption of Secrets other controllers own
// ---------------------------------------------------------------------------------------------

/// The ServiceAccount token Secret the token controller (kube-controller-manager) creates in
/// every namespace for the `default` ServiceAccount.
async fn service_account_token_secret(ns: &TestNs) -> Secret {
    let api: Api<Secret> = ns.api();
    wait_for_some(
        Duration::from_secs(30),
        "the default ServiceAccount's token Secret",
        || {
            let api = api.clone();
            async move {
                api.list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|s| {
                        s.type_.as_deref() == Some("kubernetes.io/service-account-token")
                            && s.data.as_ref().is_some_and(|d| d.contains_key("token"))
                    })
            }
        },
    )
    .await
}

/// The live object's data, as the test sees it (no decoding: token bytes may be anything).
fn raw_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

#[tokio::test]
async fn adopt_refuses_a_service_account_token_secret_and_never_fights_its_controller() {
    let h = harness().await;
    let ns = test_namespace("adopt-sa").await;
    let token_secret = service_account_token_secret(&ns).await;
    let name = token_secret.name_any();
    put_secret(&ns, "creds", &[("token", "bad-input-token-value")]).await;
    apply_vc(
        &ns,
        "grab",
        json!({"type": "bearerToken", "credentialsRef": {"name": "creds"},
               "target": {"name": name, "adopt": true}}),
    )
    .await;
    let vc = vc_where(&ns, "grab", "a final reason for grab", |v| {
        !reason(v).is_empty()
            && v.status.as_ref().and_then(|s| s.observed_generation) == v.metadata.generation
    })
    .await;
    // Whatever the outcome, watch the Secret for a while: a fight with the token controller
    // shows as a stream of writes.
    let started = h.writes(&secret_path(&ns, &name));
    tokio::time::sleep(QUIET_WINDOW).await;
    let in_window = h.writes(&secret_path(&ns, &name)) - started;
    let total = h.writes(&secret_path(&ns, &name));
    assert_eq!(
        (reason(&vc).as_str(), total, in_window),
        ("SecretConflict", 0, 0),
        "reason, writes to {name} in all, writes in the {QUIET_WINDOW:?} after the status settled; message: {}",
        message(&vc)
    );
    assert_eq!(
        message(&vc),
        format!(
            "Secret {}/{name} is of type kubernetes.io/service-account-token, which vaultconn never adopts: only Opaque Secrets can be taken over; choose another spec.target.name",
            ns.name
        )
    );
    let live = ns.api::<Secret>().get(&name).await.unwrap();
    assert_eq!(
        raw_data(&live),
        raw_data(&token_secret),
        "the token is intact"
    );
    assert!(live.owner_references().is_empty());
    assert!(!live.labels().contains_key("app.kubernetes.io/managed-by"));
    h.assert_same_process();
}

#[tokio::test]
async fn adopt_refuses_typed_secrets_and_secrets_another_controller_owns() {
    let h = harness().await;
    let ns = test_namespace("adopt-typed").await;
    put_secret(&ns, "creds", &[("token", "bad-input-token-value")]).await;
    let api: Api<Secret> = ns.api();
    let typed = |name: &str, type_: &str, data: Value| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": name}, "type": type_, "stringData": data
        }))
        .unwrap()
    };
    let cases = [
        typed(
            "tls",
            "kubernetes.io/tls",
            json!({"tls.crt": "not-a-cert", "tls.key": "not-a-key"}),
        ),
        typed(
            "registry",
            "kubernetes.io/dockerconfigjson",
            json!({".dockerconfigjson": "{\"auths\":{}}"}),
        ),
        typed(
            "login",
            "kubernetes.io/basic-auth",
            json!({"username": "u", "password": "p"}),
        ),
        typed(
            "bootstrap-token-abcdef",
            "bootstrap.kubernetes.io/token",
            json!({"token-id": "abcdef", "token-secret": "0123456789abcdef"}),
        ),
        typed("custom", "example.com/custom", json!({"k": "v"})),
    ];
    for s in &cases {
        api.create(&PostParams::default(), s).await.unwrap();
    }
    // An Opaque Secret another controller owns: a ConfigMap stands in for its owner (the
    // owner must exist, or the garbage collector removes the Secret).
    let owner = ns
        .api::<ConfigMap>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let owned: Secret = serde_json::from_value(json!({
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.uid().unwrap(), "controller": true}]},
        "stringData": {"k": "v"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &owned).await.unwrap();
    let mut before2 = BTreeMap::new();
    for n in cases
        .iter()
        .map(|s| s.name_any())
        .chain(["owned".to_string()])
    {
        before2.insert(n.clone(), api.get(&n).await.unwrap());
    }
    for n in before2.keys() {
        apply_vc(
            &ns,
            &format!("grab-{n}"),
            json!({"type": "bearerToken", "credentialsRef": {"name": "creds"},
                   "target": {"name": n, "adopt": true}}),
        )
        .await;
    }
    let want_messages = [
        ("tls", "kubernetes.io/tls"),
        ("registry", "kubernetes.io/dockerconfigjson"),
        ("login", "kubernetes.io/basic-auth"),
        ("bootstrap-token-abcdef", "bootstrap.kubernetes.io/token"),
        ("custom", "example.com/custom"),
    ];
    for (n, type_) in want_messages {
        let vc = with_reason(&ns, &format!("grab-{n}"), "SecretConflict").await;
        assert_eq!(
            message(&vc),
            format!("Secret {}/{n} is of type {type_}, which vaultconn never adopts: only Opaque Secrets can be taken over; choose another spec.target.name", ns.name)
        );
    }
    let vc = with_reason(&ns, "grab-owned", "SecretConflict").await;
    assert_eq!(
        message(&vc),
        format!("Secret {}/owned is controlled by ConfigMap {}/owner, which vaultconn never adopts; choose another spec.target.name", ns.name, ns.name)
    );
    tokio::time::sleep(QUIET_WINDOW).await;
    for (n, was) in &before2 {
        assert_eq!(h.writes(&secret_path(&ns, n)), 0, "writes to Secret {n}");
        let live = api.get(n).await.unwrap();
        assert_eq!(
            (raw_data(&live), live.owner_references()),
            (raw_data(was), was.owner_references()),
            "Secret {n} is untouched"
        );
    }
    h.assert_same_process();
}
