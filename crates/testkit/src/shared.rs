//! One control plane per test binary, a fresh namespace per test, and polling helpers.
//!
//! The control plane is kept in a `static` and never dropped: its parent-death signal and
//! watchdog clean up when the test binary exits. Each `#[tokio::test]` has its own runtime, so
//! the static holds only the control plane (paths, token); every test builds its own client.
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use crate::control_plane::{ControlPlane, ControlPlaneOptions};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use rand::Rng;
use tokio::sync::OnceCell;

static CLUSTER: OnceCell<ControlPlane> = OnceCell::const_new();
static CRDS: OnceCell<Vec<String>> = OnceCell::const_new();

/// The control plane of this test binary, started on first use.
pub async fn cluster() -> &'static ControlPlane {
    CLUSTER
        .get_or_init(|| async {
            let opts = ControlPlaneOptions {
                provision_script: Some(
                    crate::repo_root().join("scripts/provision-control-plane.sh"),
                ),
                ..Default::default()
            };
            match ControlPlane::start(opts).await {
                Ok(cp) => cp,
                Err(e) => panic!("starting the test control plane: {e}"),
            }
        })
        .await
}

/// The control plane of this test binary if some test started it (for the exit scan, which
/// must not start one).
pub fn cluster_if_started() -> Option<&'static ControlPlane> {
    CLUSTER.get()
}

/// A fresh admin client for the calling test's runtime.
pub async fn client() -> kube::Client {
    cluster().await.client().await
}

/// `<repo>/crds` (or `$VAULTCONN_TEST_CRDS`), applied once per test binary by [`test_namespace`].
pub fn crds_dir() -> PathBuf {
    match std::env::var_os("VAULTCONN_TEST_CRDS") {
        Some(dir) => PathBuf::from(dir),
        None => crate::repo_root().join("crds"),
    }
}

/// Install the CRDs in `<repo>/crds` (if it has any `*.yaml`) once per test binary.
/// Returns the CRD names.
pub async fn ensure_crds() -> &'static [String] {
    CRDS.get_or_init(|| async {
        let dir = crds_dir();
        let has_yaml = std::fs::read_dir(&dir).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        });
        if !has_yaml {
            return Vec::new();
        }
        match cluster().await.install_crds(&dir).await {
            Ok(names) => names,
            Err(e) => panic!("installing the CRDs from {}: {e}", dir.display()),
        }
    })
    .await
}

/// A fresh namespace of its own for one test, and a client for the test's runtime.
pub struct TestNs {
    pub client: kube::Client,
    pub name: String,
}

impl TestNs {
    /// A namespaced `Api` in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

/// Create a uniquely named namespace `<prefix>-<random>` (prefix: lowercase letters, digits
/// and `-`), after making sure the project's CRDs are installed.
pub async fn test_namespace(prefix: &str) -> TestNs {
    ensure_crds().await;
    namespace_with(client().await, prefix).await
}

/// Create a uniquely named namespace `<prefix>-<random>` through `client`, on whichever control
/// plane it talks to (a test binary may run one of its own besides [`cluster`]).
pub async fn namespace_with(client: kube::Client, prefix: &str) -> TestNs {
    let suffix: u32 = rand::rng().random();
    let name = format!("{prefix}-{suffix:08x}");
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([("vaultconn.dev/test".to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    TestNs { client, name }
}

/// A Secret object `name` holding `data` (UTF-8 values), to create or replace.
pub fn secret_obj(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// A Secret's data as UTF-8 strings (panics on a value that is not UTF-8).
pub fn data_of(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}

/// Poll `f` every 50 ms until it returns true; panic with `what` after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_some(timeout, what, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Poll `f` every 50 ms until it returns `Some`, and return the value; panic with `what`
/// after `timeout`.
pub async fn wait_for_some<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
