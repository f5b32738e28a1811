//! Helpers to create and observe VaultConnections and Secrets in a test namespace.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::token_server::{RecordedCall, TokenServer};

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;

#[allow(unused_imports)]
use super::wait_for;
use super::{wait_for_some, TestNs};
/// Kept here too: tests import the object helpers from this module.
pub use vaultconn_testkit::shared::{data_of, secret_obj};

pub const WAIT: Duration = Duration::from_secs(20);

/// Create or replace the Secret `name`; its secret values join the binary's leak scan.
pub async fn put_secret(ns: &TestNs, name: &str, data: &[(&str, &str)]) {
    vaultconn_testkit::leak_scan::register_secret_data(
        &format!("put_secret {}/{name}", ns.name),
        data.iter().map(|(k, v)| (*k, v.as_bytes())),
    );
    let api: Api<Secret> = ns.api();
    let s = secret_obj(name, data);
    match api.get_opt(name).await.unwrap() {
        Some(live) => {
            let mut s = s;
            s.metadata.resource_version = live.metadata.resource_version;
            api.replace(name, &PostParams::default(), &s).await.unwrap();
        }
        None => {
            api.create(&PostParams::default(), &s).await.unwrap();
        }
    }
}

pub async fn apply_vc(ns: &TestNs, name: &str, spec: serde_json::Value) -> VaultConnection {
    let api: Api<VaultConnection> = ns.api();
    let vc = json!({"apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection", "metadata": {"name": name}, "spec": spec});
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&vc),
    )
    .await
    .unwrap()
}

pub async fn vc_where(
    ns: &TestNs,
    name: &str,
    what: &str,
    f: impl Fn(&VaultConnection) -> bool,
) -> VaultConnection {
    let api: Api<VaultConnection> = ns.api();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let current = api.get_opt(name).await.ok().flatten();
        if let Some(v) = current.as_ref().filter(|v| f(v)) {
            return v.clone();
        }
        if tokio::time::Instant::now() >= deadline {
            let status = current.and_then(|v| v.status);
            panic!("timed out after {WAIT:?} waiting for {what}; last status: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn phase(v: &VaultConnection) -> Option<Phase> {
    v.status.as_ref().and_then(|s| s.phase)
}

pub fn reason(v: &VaultConnection) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

pub fn message(v: &VaultConnection) -> String {
    v.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

pub async fn ready(ns: &TestNs, name: &str) -> VaultConnection {
    vc_where(ns, name, &format!("{name} Ready"), |v| {
        phase(v) == Some(Phase::Ready)
            && v.status.as_ref().and_then(|s| s.observed_generation) == v.metadata.generation
    })
    .await
}

pub async fn with_reason(ns: &TestNs, name: &str, r: &str) -> VaultConnection {
    vc_where(ns, name, &format!("{name} reason {r}"), |v| {
        reason(v) == r
            && v.status.as_ref().and_then(|s| s.observed_generation) == v.metadata.generation
    })
    .await
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub async fn secret_data_eq(ns: &TestNs, name: &str, want: BTreeMap<String, String>) -> Secret {
    let api: Api<Secret> = ns.api();
    wait_for_some(
        WAIT,
        &format!("Secret {name} with {:?}", want.keys().collect::<Vec<_>>()),
        || {
            let api = api.clone();
            let want = want.clone();
            async move {
                api.get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .filter(|s| data_of(s) == want)
            }
        },
    )
    .await
}

/// Every text the operator showed the user or logged: statuses, Events and (the shared
/// operator's) logs.
pub async fn visible_text(ns: &TestNs) -> String {
    let mut out = status_and_event_text(ns).await;
    out.push_str(&super::operator::operator_logs().await);
    out
}

/// The statuses and Events of namespace `ns` as text (what any operator showed there).
pub async fn status_and_event_text(ns: &TestNs) -> String {
    let mut out = String::new();
    for vc in ns
        .api::<VaultConnection>()
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        out.push_str(&serde_json::to_string(&vc.status).unwrap());
    }
    for ev in ns
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        out.push_str(&format!(
            "{} {}\n",
            ev.reason.unwrap_or_default(),
            ev.note.unwrap_or_default()
        ));
    }
    out
}

/// How many reconciles of `ns/name` the operator has finished (from its debug log).
pub async fn reconcile_count(ns: &TestNs, name: &str) -> usize {
    let needle = format!("reconcile finished: {}/{} (", ns.name, name);
    super::operator::operator_logs()
        .await
        .matches(&needle)
        .count()
}

/// Wake `vc` without changing anything it depends on (a label on its credentials Secret) and
/// wait until the operator has finished a reconcile of it.
pub async fn force_reconcile(ns: &TestNs, creds: &str, vc: &str) {
    let before = reconcile_count(ns, vc).await;
    let value = format!("t{}", rand::random::<u32>());
    let patch = json!({"metadata": {"labels": {"test-touch": value}}});
    ns.api::<Secret>()
        .patch(creds, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    super::wait_for(WAIT, &format!("a reconcile of {vc}"), || async {
        reconcile_count(ns, vc).await > before
    })
    .await;
}

/// The refresh token in `name`'s state Secret, read live (None if the Secret or key is absent).
#[allow(dead_code)]
pub async fn stored_refresh_token(ns: &TestNs, name: &str) -> Option<String> {
    let s = ns
        .api::<Secret>()
        .get_opt(&format!("{name}-vaultconn-state"))
        .await
        .ok()??;
    data_of(&s).get("refresh_token").cloned()
}

/// A refresh-token-grant connection `name` against `ts`: registers `client` at the token
/// server, mints it a seed and puts it in the credentials Secret `<name>-creds`.
#[allow(dead_code)]
pub async fn refresh_token_connection(ns: &TestNs, ts: &TokenServer, client: &str, name: &str) {
    ts.add_client(client, "s3cret-value");
    let rt = ts.mint_refresh_token(client);
    let creds = format!("{name}-creds");
    put_secret(
        ns,
        &creds,
        &[
            ("client_id", client),
            ("client_secret", "s3cret-value"),
            ("refresh_token", &rt),
        ],
    )
    .await;
    apply_vc(
        ns,
        name,
        json!({"type": "oauth2", "credentialsRef": {"name": creds},
            "oauth2": {"tokenUrl": ts.token_url(), "grantType": "refreshToken"}}),
    )
    .await;
}

/// Ask for a refresh now: set the `vaultconn.dev/refresh-requested-at` annotation to `value`
/// (a new value each time: the operator acts on a change).
pub async fn request_refresh(ns: &TestNs, name: &str, value: &str) {
    let patch = json!({"metadata": {"annotations": {"vaultconn.dev/refresh-requested-at": value}}});
    ns.api::<VaultConnection>()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotating the connection");
}

/// The API path of connection `name`'s state Secret (what a replace, patch or delete of it
/// targets; a create posts to the collection).
pub fn state_path(ns: &TestNs, name: &str) -> String {
    format!(
        "/api/v1/namespaces/{}/secrets/{name}-vaultconn-state",
        ns.name
    )
}

/// Wait until the token server has decided call number `index` (0-based), i.e. the refresh
/// token it carried is rotated at the provider from then on, and return it.
pub async fn committed_call(ts: &TokenServer, index: usize) -> RecordedCall {
    wait_for_some(
        Duration::from_secs(60),
        &format!("token call #{index}"),
        || async move {
            ts.calls()
                .get(index)
                .filter(|c| c.outcome.is_some())
                .cloned()
        },
    )
    .await
}

/// Token endpoint calls that presented the refresh token `rt`.
pub fn calls_with(ts: &TokenServer, rt: &str) -> usize {
    ts.calls()
        .iter()
        .filter(|c| c.refresh_token.as_deref() == Some(rt))
        .count()
}
