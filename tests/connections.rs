//! Cluster tests of the VaultConnection API: each runs against the real API server with the
//! real operator process, in its own namespace.
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use kube::ResourceExt;
use serde_json::json;
use support::objects::*;
use support::operator::{ensure_operator, writes_in_namespace};
use support::{test_namespace, wait_for};
use vaultconn::api::{Phase, VaultConnection};

#[tokio::test]
async fn every_static_type_produces_exactly_its_output_keys() {
    ensure_operator().await;
    let ns = test_namespace("types").await;
    put_secret(
        &ns,
        "apikey-creds",
        &[("api_key", "ak-SECRET-1\n"), ("unrelated", "x")],
    )
    .await;
    put_secret(&ns, "bearer-creds", &[("token", "bt-SECRET-2")]).await;
    put_secret(
        &ns,
        "basic-creds",
        &[("username", "alice"), ("password", "pw-SECRET-3")],
    )
    .await;
    put_secret(
        &ns,
        "twilio-creds",
        &[("account_sid", "AC123"), ("auth_token", "tw-SECRET-4")],
    )
    .await;
    put_secret(
        &ns,
        "stripe-creds",
        &[
            ("secret_key", "sk-SECRET-5"),
            ("publishable_key", "pk_live_1"),
        ],
    )
    .await;
    apply_vc(&ns, "apikey", json!({"type": "apiKey", "credentialsRef": {"name": "apikey-creds"}, "apiKey": {"baseUrl": "https://api.vaultconn.invalid", "headerName": "X-API-Key"}})).await;
    apply_vc(
        &ns,
        "bearer",
        json!({"type": "bearerToken", "credentialsRef": {"name": "bearer-creds"}}),
    )
    .await;
    apply_vc(&ns, "basic", json!({"type": "basicAuth", "credentialsRef": {"name": "basic-creds"}, "target": {"name": "basic-out", "labels": {"team": "payments"}, "annotations": {"reloader.stakater.com/match": "true"}}})).await;
    apply_vc(
        &ns,
        "twilio",
        json!({"type": "twilio", "credentialsRef": {"name": "twilio-creds"}}),
    )
    .await;
    apply_vc(&ns, "stripe", json!({"type": "stripe", "displayName": "Stripe live", "credentialsRef": {"name": "stripe-creds"}})).await;

    secret_data_eq(
        &ns,
        "apikey",
        map(&[
            ("api_key", "ak-SECRET-1"),
            ("base_url", "https://api.vaultconn.invalid"),
            ("header_name", "X-API-Key"),
        ]),
    )
    .await;
    secret_data_eq(
        &ns,
        "bearer",
        map(&[
            ("token", "bt-SECRET-2"),
            ("authorization", "Bearer bt-SECRET-2"),
        ]),
    )
    .await;
    // base64("alice:pw-SECRET-3")
    let basic = secret_data_eq(
        &ns,
        "basic-out",
        map(&[
            ("username", "alice"),
            ("password", "pw-SECRET-3"),
            ("authorization", "Basic YWxpY2U6cHctU0VDUkVULTM="),
        ]),
    )
    .await;
    secret_data_eq(
        &ns,
        "twilio",
        map(&[("account_sid", "AC123"), ("auth_token", "tw-SECRET-4")]),
    )
    .await;
    secret_data_eq(
        &ns,
        "stripe",
        map(&[
            ("secret_key", "sk-SECRET-5"),
            ("publishable_key", "pk_live_1"),
        ]),
    )
    .await;

    assert_eq!(
        basic.labels().get("team").map(String::as_str),
        Some("payments")
    );
    assert_eq!(
        basic
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("vaultconn")
    );
    assert_eq!(
        basic
            .annotations()
            .get("reloader.stakater.com/match")
            .map(String::as_str),
        Some("true")
    );
    for name in ["apikey", "bearer", "basic", "twilio", "stripe"] {
        let vc = ready(&ns, name).await;
        let owner = vc.status.as_ref().unwrap().secret_name.clone().unwrap();
        let s: Secret = ns.api::<Secret>().get(&owner).await.unwrap();
        let refs = s.owner_references();
        assert_eq!(refs.len(), 1, "{name}");
        assert_eq!(refs[0].uid, vc.uid().unwrap());
        assert_eq!(refs[0].controller, Some(true));
        assert_eq!(reason(&vc), "Reconciled");
    }
    let text = visible_text(&ns).await;
    for v in [
        "ak-SECRET-1",
        "bt-SECRET-2",
        "pw-SECRET-3",
        "tw-SECRET-4",
        "sk-SECRET-5",
    ] {
        assert!(
            !text.contains(v),
            "secret value {v} leaked into status/Events/logs"
        );
    }
}

#[tokio::test]
async fn empty_connection_is_pending_then_turns_ready_when_credentials_arrive() {
    ensure_operator().await;
    let ns = test_namespace("pending").await;
    apply_vc(
        &ns,
        "pay",
        json!({"type": "basicAuth", "credentialsRef": {"name": "pay-creds"}}),
    )
    .await;
    let vc = with_reason(&ns, "pay", "CredentialsMissing").await;
    assert_eq!(phase(&vc), Some(Phase::Pending));
    let st = vc.status.clone().unwrap();
    assert_eq!(st.missing_keys, vec!["username", "password"]);
    assert!(
        message(&vc).contains(&format!("Secret {}/pay-creds not found", ns.name)),
        "{}",
        message(&vc)
    );
    assert!(
        ns.api::<Secret>().get_opt("pay").await.unwrap().is_none(),
        "no Secret for an empty connection"
    );
    // A Normal Event tells the user.
    wait_for(WAIT, "CredentialsMissing event", || async {
        ns.api::<Event>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("CredentialsMissing")
                    && e.type_.as_deref() == Some("Normal")
            })
    })
    .await;

    // Half-filled: still Pending, naming the missing key.
    put_secret(&ns, "pay-creds", &[("username", "bob")]).await;
    let vc = vc_where(&ns, "pay", "missing password", |v| {
        v.status
            .as_ref()
            .is_some_and(|s| s.missing_keys == vec!["password"])
    })
    .await;
    assert_eq!(
        message(&vc),
        format!(
            "Secret {}/pay-creds has no key password (or it is empty)",
            ns.name
        )
    );

    // Filled: Ready by itself (the credentials Secret is watched).
    put_secret(
        &ns,
        "pay-creds",
        &[("username", "bob"), ("password", "pw-SECRET-9")],
    )
    .await;
    ready(&ns, "pay").await;
    secret_data_eq(
        &ns,
        "pay",
        map(&[
            ("username", "bob"),
            ("password", "pw-SECRET-9"),
            ("authorization", "Basic Ym9iOnB3LVNFQ1JFVC05"),
        ]),
    )
    .await;

    // Removing a key: back to Pending, the last good Secret is kept and the message says so.
    put_secret(&ns, "pay-creds", &[("username", "bob")]).await;
    let vc = with_reason(&ns, "pay", "CredentialsMissing").await;
    assert!(
        message(&vc).contains("last good Secret"),
        "{}",
        message(&vc)
    );
    let kept = ns.api::<Secret>().get("pay").await.unwrap();
    assert_eq!(
        data_of(&kept).get("password").map(String::as_str),
        Some("pw-SECRET-9")
    );
    assert!(!visible_text(&ns).await.contains("pw-SECRET-9"));
}

#[tokio::test]
async fn updates_to_credentials_and_spec_propagate() {
    ensure_operator().await;
    let ns = test_namespace("update").await;
    put_secret(&ns, "c", &[("api_key", "k1")]).await;
    apply_vc(
        &ns,
        "api",
        json!({"type": "apiKey", "credentialsRef": {"name": "c"}}),
    )
    .await;
    secret_data_eq(&ns, "api", map(&[("api_key", "k1")])).await;
    put_secret(&ns, "c", &[("api_key", "k2")]).await;
    secret_data_eq(&ns, "api", map(&[("api_key", "k2")])).await;
    apply_vc(&ns, "api", json!({"type": "apiKey", "credentialsRef": {"name": "c"}, "apiKey": {"headerName": "X-Key"}})).await;
    secret_data_eq(
        &ns,
        "api",
        map(&[("api_key", "k2"), ("header_name", "X-Key")]),
    )
    .await;
    // Removing a setting removes its key (the Secret is replaced, not merged).
    apply_vc(
        &ns,
        "api",
        json!({"type": "apiKey", "credentialsRef": {"name": "c"}}),
    )
    .await;
    secret_data_eq(&ns, "api", map(&[("api_key", "k2")])).await;
}

#[tokio::test]
async fn drift_is_repaired_after_edit_and_delete() {
    ensure_operator().await;
    let ns = test_namespace("drift").await;
    put_secret(&ns, "c", &[("token", "t1")]).await;
    apply_vc(
        &ns,
        "b",
        json!({"type": "bearerToken", "credentialsRef": {"name": "c"}}),
    )
    .await;
    let want = map(&[("token", "t1"), ("authorization", "Bearer t1")]);
    secret_data_eq(&ns, "b", want.clone()).await;
    let api: Api<Secret> = ns.api();
    let patch = json!({"data": {"token": "ZWRpdGVk", "extra": "eA=="}});
    api.patch("b", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    secret_data_eq(&ns, "b", want.clone()).await;
    api.delete("b", &DeleteParams::default()).await.unwrap();
    secret_data_eq(&ns, "b", want).await;
}

#[tokio::test]
async fn foreign_secret_is_refused_unless_adopt() {
    ensure_operator().await;
    let ns = test_namespace("foreign").await;
    put_secret(&ns, "c", &[("token", "t1")]).await;
    put_secret(&ns, "theirs", &[("keep", "me")]).await;
    apply_vc(&ns, "b", json!({"type": "bearerToken", "credentialsRef": {"name": "c"}, "target": {"name": "theirs"}})).await;
    let vc = with_reason(&ns, "b", "SecretConflict").await;
    assert_eq!(phase(&vc), Some(Phase::Failed));
    assert!(message(&vc).contains("adopt"), "{}", message(&vc));
    let untouched = ns.api::<Secret>().get("theirs").await.unwrap();
    assert_eq!(data_of(&untouched), map(&[("keep", "me")]));

    apply_vc(&ns, "b", json!({"type": "bearerToken", "credentialsRef": {"name": "c"}, "target": {"name": "theirs", "adopt": true}})).await;
    ready(&ns, "b").await;
    let adopted = secret_data_eq(
        &ns,
        "theirs",
        map(&[("token", "t1"), ("authorization", "Bearer t1")]),
    )
    .await;
    assert_eq!(adopted.owner_references()[0].name, "b");
}

#[tokio::test]
async fn two_connections_cannot_share_a_secret() {
    ensure_operator().await;
    let ns = test_namespace("share").await;
    put_secret(&ns, "c", &[("token", "t1")]).await;
    apply_vc(&ns, "first", json!({"type": "bearerToken", "credentialsRef": {"name": "c"}, "target": {"name": "shared"}})).await;
    ready(&ns, "first").await;
    apply_vc(&ns, "second", json!({"type": "bearerToken", "credentialsRef": {"name": "c"}, "target": {"name": "shared", "adopt": true}})).await;
    let vc = with_reason(&ns, "second", "SecretConflict").await;
    assert!(message(&vc).contains("first"), "{}", message(&vc));
    let s = ns.api::<Secret>().get("shared").await.unwrap();
    assert_eq!(s.owner_references()[0].name, "first");
}

#[tokio::test]
async fn delete_policy_garbage_collects_and_retain_keeps() {
    ensure_operator().await;
    let ns = test_namespace("deletion").await;
    put_secret(&ns, "c", &[("token", "t1")]).await;
    apply_vc(
        &ns,
        "gone",
        json!({"type": "bearerToken", "credentialsRef": {"name": "c"}}),
    )
    .await;
    apply_vc(&ns, "kept", json!({"type": "bearerToken", "credentialsRef": {"name": "c"}, "target": {"deletionPolicy": "Retain"}})).await;
    ready(&ns, "gone").await;
    ready(&ns, "kept").await;
    let kept = ns.api::<Secret>().get("kept").await.unwrap();
    assert!(
        kept.owner_references().is_empty(),
        "Retain: no owner reference"
    );
    let vcs: Api<VaultConnection> = ns.api();
    vcs.delete("gone", &DeleteParams::default()).await.unwrap();
    vcs.delete("kept", &DeleteParams::default()).await.unwrap();
    let secrets: Api<Secret> = ns.api();
    // kube-controller-manager's garbage collector is not ours and slows down on a loaded
    // machine: give it more than the usual wait.
    wait_for(
        Duration::from_secs(90),
        "garbage collector deletes the owned Secret",
        || async { secrets.get_opt("gone").await.unwrap().is_none() },
    )
    .await;
    wait_for(WAIT, "kept VaultConnection gone", || async {
        vcs.get_opt("kept").await.unwrap().is_none()
    })
    .await;
    // The GC already proved it runs (above); the Retain'ed Secret is still there.
    assert!(secrets.get_opt("kept").await.unwrap().is_some());
    // The credentials Secret is the user's: never touched.
    assert!(secrets.get_opt("c").await.unwrap().is_some());
}

#[tokio::test]
async fn invalid_specs_are_reported_with_the_field() {
    ensure_operator().await;
    let ns = test_namespace("invalid").await;
    let cases = [
        (
            "oauth-no-url",
            json!({"type": "oauth2"}),
            "spec.oauth2 is required",
        ),
        (
            "oauth-http",
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "http://idp.vaultconn.invalid/token"}}),
            "spec.oauth2.tokenUrl",
        ),
        (
            "oauth-metadata",
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://169.254.169.254/token"}}),
            "spec.oauth2.tokenUrl",
        ),
        (
            "wrong-block",
            json!({"type": "bearerToken", "apiKey": {"headerName": "X"}}),
            "spec.apiKey is only valid with type apiKey",
        ),
        (
            "renew-both",
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://idp.vaultconn.invalid/t", "renewBefore": "5m", "renewBeforePercentage": 10}}),
            "mutually exclusive",
        ),
        // The schema rejects a percentage out of 1–99 and what is no duration at all (see
        // `the_schema_rejects_what_can_never_be_valid_and_serves_the_columns`); a duration the
        // pattern lets through can still be too short.
        (
            "renew-dur",
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://idp.vaultconn.invalid/t", "renewBefore": "500ms"}}),
            "at least 1s",
        ),
        (
            "auth0-aud",
            json!({"type": "auth0", "auth0": {"domain": "t.auth0.invalid"}}),
            "spec.auth0.audience is required",
        ),
        (
            "auth0-domain",
            json!({"type": "auth0", "auth0": {"domain": "https://t.auth0.invalid/x", "audience": "a"}}),
            "bare host name",
        ),
        (
            "self-target",
            json!({"type": "apiKey", "credentialsRef": {"name": "self-target"}}),
            "credentials Secret itself",
        ),
        (
            "bad-target",
            json!({"type": "apiKey", "target": {"name": "Not_Valid"}}),
            "not a valid Secret name",
        ),
        (
            "reserved-label",
            json!({"type": "apiKey", "target": {"labels": {"app.kubernetes.io/managed-by": "me"}}}),
            "reserved",
        ),
        (
            "extra-param",
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://idp.vaultconn.invalid/t", "extraParams": {"client_secret": "x"}}}),
            "extraParams",
        ),
    ];
    for (name, spec, _) in &cases {
        apply_vc(&ns, name, spec.clone()).await;
    }
    for (name, _, needle) in &cases {
        let vc = with_reason(&ns, name, "InvalidSpec").await;
        assert_eq!(phase(&vc), Some(Phase::Failed), "{name}");
        assert!(
            message(&vc).contains(needle),
            "{name}: {:?} lacks {needle:?}",
            message(&vc)
        );
    }
    assert!(
        ns.api::<Secret>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .all(|s| s.labels().get("app.kubernetes.io/managed-by").is_none()),
        "no Secret written for invalid specs"
    );
    // Fixing the spec recovers without any restart.
    put_secret(&ns, "c", &[("api_key", "k")]).await;
    apply_vc(
        &ns,
        "bad-target",
        json!({"type": "apiKey", "credentialsRef": {"name": "c"}}),
    )
    .await;
    ready(&ns, "bad-target").await;
}

#[tokio::test]
async fn suspend_freezes_the_connection_until_resumed() {
    ensure_operator().await;
    let ns = test_namespace("suspend").await;
    put_secret(&ns, "c", &[("token", "t1")]).await;
    apply_vc(
        &ns,
        "s",
        json!({"type": "bearerToken", "credentialsRef": {"name": "c"}}),
    )
    .await;
    let before = secret_data_eq(
        &ns,
        "s",
        map(&[("token", "t1"), ("authorization", "Bearer t1")]),
    )
    .await;
    apply_vc(
        &ns,
        "s",
        json!({"type": "bearerToken", "credentialsRef": {"name": "c"}, "suspend": true}),
    )
    .await;
    let vc = with_reason(&ns, "s", "Suspended").await;
    assert_eq!(phase(&vc), Some(Phase::Suspended));
    let reconciles = reconcile_count(&ns, "s").await;
    put_secret(&ns, "c", &[("token", "t2")]).await;
    // The credentials change does wake the connection (a reconcile runs) …
    wait_for(WAIT, "a reconcile after the credentials edit", || async {
        reconcile_count(&ns, "s").await > reconciles
    })
    .await;
    // … and it changes nothing while suspended.
    let during = ns.api::<Secret>().get("s").await.unwrap();
    assert_eq!(during.resource_version(), before.resource_version());
    assert_eq!(
        data_of(&during).get("token").map(String::as_str),
        Some("t1")
    );
    apply_vc(
        &ns,
        "s",
        json!({"type": "bearerToken", "credentialsRef": {"name": "c"}, "suspend": false}),
    )
    .await;
    secret_data_eq(
        &ns,
        "s",
        map(&[("token", "t2"), ("authorization", "Bearer t2")]),
    )
    .await;
    ready(&ns, "s").await;
}

#[tokio::test]
async fn a_reconcile_that_changes_nothing_writes_nothing() {
    ensure_operator().await;
    let ns = test_namespace("quiet").await;
    put_secret(&ns, "c", &[("token", "t1")]).await;
    apply_vc(
        &ns,
        "q",
        json!({"type": "bearerToken", "credentialsRef": {"name": "c"}}),
    )
    .await;
    ready(&ns, "q").await;
    secret_data_eq(
        &ns,
        "q",
        map(&[("token", "t1"), ("authorization", "Bearer t1")]),
    )
    .await;
    // Counted where the writes arrive: the operator reaches the API server through a proxy
    // that records every request. (The resourceVersion cannot tell: the API server does not
    // bump it for an identical write.) First let the operator's own follow-up reconciles
    // (after its writes) settle: until a forced reconcile passes without a write.
    let writes = || writes_in_namespace(&ns.name);
    let mut settle = 0;
    loop {
        let before = writes().await.len();
        force_reconcile(&ns, "c", "q").await;
        if writes().await.len() == before {
            break;
        }
        settle += 1;
        assert!(
            settle < 10,
            "the operator kept writing: {:#?}",
            writes().await
        );
    }
    let before = writes().await;
    assert!(
        before.iter().any(|w| w.contains("/secrets")),
        "the proxy did not see the operator create the Secret: {before:#?}"
    );
    // Force re-reconciles without changing anything the connection depends on: touch an
    // unrelated label on the credentials Secret (wakes the connection), twice.
    for _ in 0..2 {
        force_reconcile(&ns, "c", "q").await;
    }
    let after = writes().await;
    assert_eq!(
        after[before.len()..],
        [] as [String; 0],
        "reconciles that changed nothing wrote (status, Secret or Event)"
    );
}

#[tokio::test]
async fn credentials_ref_cannot_reach_another_namespace() {
    ensure_operator().await;
    let other = test_namespace("other").await;
    put_secret(&other, "shared-creds", &[("token", "t-other")]).await;
    let ns = test_namespace("xns").await;
    // The API has no namespace field: a "namespace/name" value is not a Secret name.
    apply_vc(&ns, "x", json!({"type": "bearerToken", "credentialsRef": {"name": format!("{}/shared-creds", other.name)}})).await;
    let vc = with_reason(&ns, "x", "InvalidSpec").await;
    assert!(message(&vc).contains("credentialsRef.name"));
    // Same name, own namespace: looked up here only (Pending), never in the other namespace.
    apply_vc(
        &ns,
        "y",
        json!({"type": "bearerToken", "credentialsRef": {"name": "shared-creds"}}),
    )
    .await;
    let vc = with_reason(&ns, "y", "CredentialsMissing").await;
    assert!(message(&vc).contains(&format!("{}/shared-creds not found", ns.name)));
}

/// No spelling of a reference reaches into another namespace: not a `namespace` field on
/// `credentialsRef` or `target` (the schema has none: refused or pruned), not `ns/name`, not
/// `adopt`. Checked on what the API server saw: the operator sent no request at all for a path
/// in the other namespace, and the other namespace's Secrets are as they were.
#[tokio::test]
async fn no_reference_reaches_another_namespace() {
    ensure_operator().await;
    let other = test_namespace("xns-other").await;
    put_secret(&other, "shared-creds", &[("token", "xns-other-SECRET")]).await;
    put_secret(&other, "victim", &[("token", "victim-SECRET-value")]).await;
    let victim_before = other.api::<Secret>().get("victim").await.unwrap();
    let ns = test_namespace("xns").await;
    put_secret(&ns, "own", &[("token", "own-SECRET-value")]).await;

    // Raw JSON, as a user could send it: fields the typed API does not have.
    let ar = ApiResource::erase::<VaultConnection>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let create = |name: &str, spec: serde_json::Value| {
        let raw = raw.clone();
        let obj = json!({"apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection",
            "metadata": {"name": name}, "spec": spec});
        async move {
            let obj: DynamicObject = serde_json::from_value(obj).unwrap();
            raw.create(&PostParams::default(), &obj).await
        }
    };
    let cases = [
        (
            "cred-ns-field",
            json!({"type": "bearerToken", "credentialsRef": {"name": "shared-creds", "namespace": other.name}}),
        ),
        (
            "target-ns-field",
            json!({"type": "bearerToken", "credentialsRef": {"name": "own"},
                "target": {"name": "victim", "namespace": other.name, "adopt": true}}),
        ),
        (
            "target-slash",
            json!({"type": "bearerToken", "credentialsRef": {"name": "own"},
                "target": {"name": format!("{}/victim", other.name), "adopt": true}}),
        ),
        (
            "cred-slash",
            json!({"type": "bearerToken", "credentialsRef": {"name": format!("{}/shared-creds", other.name)}}),
        ),
    ];
    for (name, spec) in &cases {
        match create(name, spec.clone()).await {
            // Pruned: the stored object has no namespace field anywhere in its spec.
            Ok(stored) => assert!(
                !stored.data["spec"].to_string().contains("namespace"),
                "{name}: stored with a namespace field: {}",
                stored.data["spec"]
            ),
            Err(kube::Error::Api(e)) => assert!(e.code == 400 || e.code == 422, "{name}: {e:?}"),
            Err(e) => panic!("{name}: {e}"),
        }
    }
    let mut created: Vec<String> = Vec::new();
    for (name, _) in &cases {
        if raw.get_opt(name).await.unwrap().is_some() {
            created.push(name.to_string());
        }
    }
    if created.iter().any(|c| c == "cred-ns-field") {
        let vc = with_reason(&ns, "cred-ns-field", "CredentialsMissing").await;
        assert!(
            message(&vc).contains(&format!("{}/shared-creds not found", ns.name)),
            "{}",
            message(&vc)
        );
    }
    if created.iter().any(|c| c == "target-ns-field") {
        // The target is a Secret of the connection's own namespace.
        ready(&ns, "target-ns-field").await;
        let own = ns.api::<Secret>().get("victim").await.unwrap();
        assert_eq!(
            data_of(&own).get("token").map(String::as_str),
            Some("own-SECRET-value")
        );
    }
    for slash in ["target-slash", "cred-slash"] {
        if created.iter().any(|c| c == slash) {
            with_reason(&ns, slash, "InvalidSpec").await;
        }
    }
    let touched: Vec<String> = support::operator::api_requests()
        .await
        .into_iter()
        .filter(|r| r.path.contains(&format!("/namespaces/{}/", other.name)))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        touched,
        [] as [String; 0],
        "the operator sent requests into the other namespace"
    );
    let victim_after = other.api::<Secret>().get("victim").await.unwrap();
    assert_eq!(
        victim_after.metadata.resource_version, victim_before.metadata.resource_version,
        "the other namespace's Secret changed"
    );
    eprintln!(
        "cross-namespace: stored (pruned) {created:?}, the others refused by the API server; \
         0 requests into {}",
        other.name
    );
}

#[tokio::test]
async fn the_schema_rejects_what_can_never_be_valid_and_serves_the_columns() {
    ensure_operator().await;
    let ns = test_namespace("schema").await;
    let api: Api<VaultConnection> = ns.api();
    // Server-side dry run: the API server validates against the schema and stores nothing.
    let try_spec = |spec: serde_json::Value| {
        let api = api.clone();
        async move {
            let vc = json!({"apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection", "metadata": {"name": "probe"}, "spec": spec});
            let pp = PatchParams::apply("test").force().dry_run();
            match api.patch("probe", &pp, &Patch::Apply(&vc)).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) => Err((status.code, status.message)),
                Err(e) => panic!("dry run failed without an API status: {e}"),
            }
        }
    };

    let (code, msg) = try_spec(json!({"type": "vault"})).await.unwrap_err();
    assert_eq!(code, 422, "{msg}");
    assert!(
        msg.contains(r#"spec.type: Unsupported value: "vault""#),
        "{msg}"
    );
    for t in [
        "apiKey",
        "bearerToken",
        "basicAuth",
        "twilio",
        "stripe",
        "oauth2",
        "auth0",
    ] {
        assert!(msg.contains(&format!("\"{t}\"")), "{msg} lacks {t}");
    }

    // `type: block` with the block's required fields plus `extra`.
    let spec = |block: &str, extra: serde_json::Value| {
        let mut settings = match block {
            "oauth2" => json!({"tokenUrl": "https://idp.vaultconn.invalid/t"}),
            _ => json!({"domain": "t.eu.auth0.invalid", "audience": "https://api"}),
        };
        settings
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let mut spec = json!({"type": block});
        spec.as_object_mut()
            .unwrap()
            .insert(block.to_string(), settings);
        spec
    };
    for block in ["oauth2", "auth0"] {
        let field = format!("spec.{block}.renewBeforePercentage");
        for (pct, bound) in [
            (0, "greater than or equal to 1"),
            (100, "less than or equal to 99"),
        ] {
            let (code, msg) = try_spec(spec(block, json!({"renewBeforePercentage": pct})))
                .await
                .unwrap_err();
            assert_eq!(code, 422, "{msg}");
            assert!(msg.contains(&field) && msg.contains(bound), "{pct}: {msg}");
        }
        for pct in [1, 33, 99] {
            try_spec(spec(block, json!({"renewBeforePercentage": pct})))
                .await
                .unwrap_or_else(|e| panic!("{block} {pct}: {e:?}"));
        }
        // The API server's Go regexp agrees with the unit test's reading of the pattern.
        for d in [
            "5m",
            "90s",
            "1h30m",
            "2h 37min",
            "1.5h",
            "1s 500ms",
            "1\u{a0}h",
            "\t1\u{3000}h\u{2028}",
            "5m\u{85}",
            "2 weeks",
        ] {
            try_spec(spec(block, json!({"renewBefore": d})))
                .await
                .unwrap_or_else(|e| panic!("{block} {d:?}: {e:?}"));
        }
        for d in ["soon", "5", "-5m", "1.h"] {
            let (code, msg) = try_spec(spec(block, json!({"renewBefore": d})))
                .await
                .unwrap_err();
            assert_eq!(code, 422, "{msg}");
            assert!(
                msg.contains(&format!("spec.{block}.renewBefore")),
                "{d:?}: {msg}"
            );
        }
    }
    // Every shipped example passes the served schema.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut examples = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for doc in docs.into_iter().filter(|d| d["kind"] == "VaultConnection") {
            try_spec(doc["spec"].clone())
                .await
                .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
            examples += 1;
        }
    }
    assert!(examples >= 8, "only {examples} examples found");
    let (_, msg) = try_spec(json!({"type": "apiKey", "target": {"deletionPolicy": "Orphan"}}))
        .await
        .unwrap_err();
    assert!(
        msg.contains(r#"supported values: "Delete", "Retain""#),
        "{msg}"
    );

    // The CRD as served lists the columns.
    let crd = Api::<CustomResourceDefinition>::all(ns.client.clone())
        .get("vaultconnections.vaultconn.dev")
        .await
        .unwrap();
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    for name in [
        "Type", "Phase", "Ready", "Reason", "Secret", "Expires", "Age",
    ] {
        assert!(
            columns.iter().any(|c| c == name),
            "{name} not in {columns:?}"
        );
    }

    // And fills them from the Ready condition: the table `kubectl get` prints.
    put_secret(&ns, "c", &[("token", "t")]).await;
    apply_vc(
        &ns,
        "shown",
        json!({"type": "bearerToken", "credentialsRef": {"name": "c"}}),
    )
    .await;
    ready(&ns, "shown").await;
    let request = http::Request::get(format!(
        "/apis/vaultconn.dev/v1alpha1/namespaces/{}/vaultconnections/shown",
        ns.name
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .unwrap();
    let table: serde_json::Value = ns.client.request(request).await.unwrap();
    let headers: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let cells = table["rows"][0]["cells"].as_array().unwrap();
    let cell = |name: &str| {
        let i = headers.iter().position(|h| *h == name).unwrap();
        cells[i].clone()
    };
    assert_eq!(cell("Type"), json!("bearerToken"), "{table}");
    assert_eq!(cell("Phase"), json!("Ready"), "{table}");
    assert_eq!(cell("Ready"), json!("True"), "{table}");
    assert_eq!(cell("Reason"), json!("Reconciled"), "{table}");
    assert_eq!(cell("Secret"), json!("shown"), "{table}");
}
