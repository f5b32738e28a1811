//! Shared by the tests that use the Helm chart (`chart.rs`, `rbac_rules.rs`, `oidc_ha.rs`): the
//! real helm v4 (`scripts/install-helm.sh`), renders, the chart's RBAC applied exactly as
//! rendered, and logging in as the chart's ServiceAccount (directly or through an API proxy).
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::PostParams;
use serde_json::{json, Value};
use vaultconn_testkit::api_proxy::ApiFaultProxy;

use crate::support::{self, cluster, wait_for_some};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn chart_dir() -> PathBuf {
    repo().join("charts/vaultconn")
}

/// helm v4: `$VAULTCONN_HELM`, else where scripts/install-helm.sh caches it. Missing helm is a
/// failure, not a skip: the chart would otherwise go untested.
pub fn helm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VAULTCONN_HELM").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("VAULTCONN_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vaultconn")))
        .expect("HOME or VAULTCONN_CACHE is set");
    let bin = cache.join("helm/helm");
    assert!(
        bin.is_file(),
        "helm v4 not found at {}: run `bash scripts/install-helm.sh` (`make test` does), or set \
         VAULTCONN_HELM to a helm v4 binary",
        bin.display()
    );
    bin
}

/// Run helm with its own config/cache/data dirs (never the user's repositories or plugins).
pub fn helm(args: &[&str], kubeconfig: Option<&Path>) -> std::process::Output {
    let home =
        std::env::temp_dir().join(format!("vaultconn-chart-test-helm-{}", std::process::id()));
    let mut cmd = Command::new(helm_bin());
    cmd.args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("HELM_NAMESPACE")
        .env_remove("HELM_KUBECONTEXT");
    match kubeconfig {
        Some(k) => cmd.env("KUBECONFIG", k),
        // Rendering must not depend on (or reach) any cluster.
        None => cmd.env("KUBECONFIG", "/dev/null"),
    };
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", helm_bin().display()));
    out
}

pub fn helm_ok(args: &[&str], kubeconfig: Option<&Path>) -> String {
    let out = helm(args, kubeconfig);
    assert!(
        out.status.success(),
        "helm {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `--set` arguments for `pairs`.
pub fn set_args(pairs: &[&str]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|p| ["--set".to_string(), p.to_string()])
        .collect()
}

/// The objects `helm template` renders from `chart` as `release` in `namespace` with `sets`
/// (`key=value`).
pub fn render_release(
    chart: &Path,
    release: &str,
    namespace: &str,
    sets: &[&str],
) -> Result<Vec<Value>, String> {
    let chart = chart.display().to_string();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    let sets = set_args(sets);
    args.extend(sets.iter().map(String::as_str));
    let out = helm(&args, None);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("helm template output is not YAML: {e}\n{text}"));
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The chart's own objects for `release` in `namespace`, namespaced mode watching that
/// namespace only: the operator's Role there, the Lease Role, their bindings and the
/// ServiceAccount (rendered off the test's runtime: helm is a blocking process).
pub async fn render_namespaced(release: &str, namespace: &str) -> Vec<Value> {
    let (release, namespace) = (release.to_string(), namespace.to_string());
    tokio::task::spawn_blocking(move || {
        let watch = format!("watchNamespaces={{{namespace}}}");
        render_release(&chart_dir(), &release, &namespace, &[&watch])
            .unwrap_or_else(|e| panic!("helm template {release} -n {namespace}: {e}"))
    })
    .await
    .expect("the render task")
}

/// The rendered object of `kind` named `name`.
pub fn rendered<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
}

/// The operator's arguments in the rendered Deployment (after `run`), without the metrics
/// address: the harness binds a free loopback port itself.
pub fn rendered_operator_args(objs: &[Value]) -> Vec<String> {
    let deploy = objs
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("the chart renders a Deployment");
    let args: Vec<String> = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("the container has args")
        .iter()
        .map(|a| a.as_str().expect("string args").to_string())
        .collect();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    args[1..]
        .iter()
        .filter(|a| !a.starts_with("--metrics-bind-address"))
        .cloned()
        .collect()
}

/// The ServiceAccount the rendered Deployment runs as.
pub fn rendered_service_account(objs: &[Value]) -> String {
    objs.iter()
        .find(|o| o["kind"] == "Deployment")
        .and_then(|d| d["spec"]["template"]["spec"]["serviceAccountName"].as_str())
        .expect("the Deployment names its ServiceAccount")
        .to_string()
}

/// Create the rendered ServiceAccount, Roles and RoleBindings of namespace `ns` (as rendered;
/// the caller may have edited them). Cluster-scoped objects (the aggregated user roles) are
/// left out: they are not the operator's and would collide between parallel tests.
pub async fn apply_namespaced_rbac(ns: &support::TestNs, objs: &[Value]) {
    for o in objs
        .iter()
        .filter(|o| o["metadata"]["namespace"] == ns.name.as_str())
    {
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        let created = match o["kind"].as_str() {
            Some("ServiceAccount") => ns
                .api::<ServiceAccount>()
                .create(&PostParams::default(), &from_value(o))
                .await
                .map(drop),
            Some("Role") => ns
                .api::<Role>()
                .create(&PostParams::default(), &from_value(o))
                .await
                .map(drop),
            Some("RoleBinding") => ns
                .api::<RoleBinding>()
                .create(&PostParams::default(), &from_value(o))
                .await
                .map(drop),
            _ => continue,
        };
        created.unwrap_or_else(|e| panic!("creating {} {name}: {e}", o["kind"]));
    }
}

fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v:#}"))
}

/// The bearer token of `ns/sa` and the CA it comes with.
pub struct ServiceAccountToken {
    pub token: String,
    pub ca: Vec<u8>,
}

/// A token for `ns/sa` from a token Secret, created the portable way (kube-controller-manager's
/// token controller fills it in; Kubernetes ≥ 1.24 no longer creates one by itself).
pub async fn service_account_token(ns: &support::TestNs, sa: &str) -> ServiceAccountToken {
    let secret_name = format!("{sa}-test-token");
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": secret_name, "annotations": {"kubernetes.io/service-account.name": sa}},
        "type": "kubernetes.io/service-account-token",
    }))
    .expect("a Secret");
    // Several logins as one ServiceAccount share its token Secret.
    match ns
        .api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating the token Secret: {e}"),
    }
    let data = wait_for_some(
        Duration::from_secs(60),
        "the token controller to fill the token Secret",
        || {
            let api = ns.api::<Secret>();
            let name = secret_name.clone();
            async move {
                let data = api.get(&name).await.ok()?.data?;
                (data.contains_key("token") && data.contains_key("ca.crt")).then_some(data)
            }
        },
    )
    .await;
    ServiceAccountToken {
        token: String::from_utf8(data["token"].0.clone()).expect("a UTF-8 token"),
        ca: data["ca.crt"].0.clone(),
    }
}

/// A client and a kubeconfig file that authenticate as `ns/sa`, trusting the CA its token
/// Secret carries.
pub async fn service_account_login(ns: &support::TestNs, sa: &str) -> (kube::Client, PathBuf) {
    let ServiceAccountToken { token, ca } = service_account_token(ns, sa).await;
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": cluster().await.server_url(),
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(&ca),
        }}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "test", "user": sa, "namespace": ns.name}}],
        "current-context": sa,
    });
    let path = cluster()
        .await
        .dir()
        .join(format!("kubeconfig-{}-{sa}", ns.name));
    std::fs::write(&path, serde_json::to_vec(&kubeconfig).expect("JSON")).expect("kubeconfig");
    let parsed = kube::config::Kubeconfig::read_from(&path).expect("the kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(parsed, &Default::default())
        .await
        .expect("a client config");
    (kube::Client::try_from(config).expect("a client"), path)
}

/// A kubeconfig that authenticates as `ns/sa` through a fresh API proxy, which records what
/// the API server answered to each of that process's requests (a 403 is RBAC refusing it).
pub async fn service_account_via_proxy(
    ns: &support::TestNs,
    sa: &str,
    file: &str,
) -> (ApiFaultProxy, PathBuf) {
    let ServiceAccountToken { token, .. } = service_account_token(ns, sa).await;
    let cp = cluster().await;
    let proxy = ApiFaultProxy::start(&cp.server_url()).expect("the API proxy starts");
    let path = cp.dir().join(format!("kubeconfig-{}-{file}", ns.name));
    proxy
        .write_kubeconfig(&path, &token)
        .expect("writing the proxy kubeconfig");
    (proxy, path)
}
