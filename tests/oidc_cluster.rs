//! Interop with a real OAuth server no one here wrote: oidc-provider (panva, OpenID Certified)
//! on loopback, driven through the operator and the real API server. Each test ends with the
//! provider-side invariants checked on oidc-provider's own record (its token requests and
//! `grant.revoked` events): no replay, no revocation, a bounded request rate.
mod support;

use k8s_openapi::api::core::v1::Secret;
use serde_json::json;
use std::time::Duration;
use support::objects::*;
use support::operator::ensure_operator;
use support::{test_namespace, wait_for_some, TestNs};
use vaultconn_testkit::oidc::{
    OidcClient, OidcOptions, OidcProvider, M2M, M2M_POST, M2M_SPECIAL, RT_CLIENT,
};
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, scheduled_per_minute, Invariants,
};

async fn creds(ns: &TestNs, name: &str, c: &OidcClient, rt: Option<&str>) {
    let mut data = vec![("client_id", c.id), ("client_secret", c.secret)];
    if let Some(rt) = rt {
        data.push(("refresh_token", rt));
    }
    put_secret(ns, name, &data).await;
}

async fn token(ns: &TestNs, name: &str, not: Option<&str>) -> String {
    wait_for_some(WAIT, &format!("{name}: a new access token"), || async {
        let s = ns.api::<Secret>().get_opt(name).await.ok()??;
        data_of(&s)
            .get("access_token")
            .cloned()
            .filter(|t| Some(t.as_str()) != not)
    })
    .await
}

#[tokio::test]
async fn client_credentials_with_basic_post_and_special_characters() {
    ensure_operator().await;
    let ns = test_namespace("oidc-cc").await;
    let op = OidcProvider::start(OidcOptions {
        rotate: true,
        access_token_ttl_secs: 60,
    })
    .await
    .unwrap();
    for (name, client, method) in [
        ("basic", &M2M, "basic"),
        ("post", &M2M_POST, "post"),
        ("special", &M2M_SPECIAL, "basic"),
    ] {
        creds(&ns, &format!("{name}-creds"), client, None).await;
        apply_vc(
            &ns,
            name,
            json!({"type": "oauth2", "credentialsRef": {"name": format!("{name}-creds")},
            "oauth2": {"tokenUrl": op.token_url(), "clientAuthMethod": method}}),
        )
        .await;
    }
    for name in ["basic", "post", "special"] {
        token(&ns, name, None).await;
        let vc = ready(&ns, name).await;
        let st = vc.status.unwrap();
        let (last, exp) = (st.last_refresh_time.unwrap(), st.expires_at.unwrap());
        let lifetime = exp
            .parse::<jiff::Timestamp>()
            .unwrap()
            .duration_since(last.parse().unwrap());
        assert_eq!(lifetime.as_secs(), 60, "{name}: expires_in honoured");
    }
    let events = op.events().await.unwrap();
    assert_eq!(events.grant_error, 0, "no token request was refused");
    assert_eq!(events.grant_revoked, 0);
    // Each connection (its own client) on the schedule of 60 s tokens: 3 in any minute.
    let bound = scheduled_per_minute(Duration::from_secs(60));
    let record = events.provider_record("oidc-provider");
    assert_provider_invariants(&record, &Invariants::new(bound));
}

#[tokio::test]
async fn refresh_token_rotation_through_several_cycles_revokes_nothing() {
    ensure_operator().await;
    let ns = test_namespace("oidc-rt").await;
    let op = OidcProvider::start(OidcOptions {
        rotate: true,
        access_token_ttl_secs: 3,
    })
    .await
    .unwrap();
    let seed = op.mint_refresh_token().await.unwrap();
    creds(&ns, "crm-creds", &RT_CLIENT, Some(&seed)).await;
    apply_vc(
        &ns,
        "crm",
        json!({"type": "oauth2", "credentialsRef": {"name": "crm-creds"},
        "oauth2": {"tokenUrl": op.token_url(), "grantType": "refreshToken"}}),
    )
    .await;
    let mut t = token(&ns, "crm", None).await;
    for _ in 0..3 {
        t = token(&ns, "crm", Some(&t)).await;
    }
    ready(&ns, "crm").await;
    let state = ns.api::<Secret>().get("crm-vaultconn-state").await.unwrap();
    let rt = data_of(&state)["refresh_token"].clone();
    assert_ne!(rt, seed, "rotated");
    assert!(
        op.is_refresh_token_live(&rt).await.unwrap(),
        "the stored refresh token works at the provider"
    );
    assert!(!op.is_refresh_token_live(&seed).await.unwrap());
    let events = op.events().await.unwrap();
    assert!(events.refresh_token_consumed >= 4, "{events:?}");
    assert_eq!(
        events.grant_revoked, 0,
        "the provider logged a revoked grant"
    );
    assert_eq!(events.grant_error, 0);
    // No replay and no revocation in the provider's own record; 3 s tokens, no faults: the
    // schedule alone (34 a minute).
    let bound = scheduled_per_minute(Duration::from_secs(3));
    let record = events.provider_record("oidc-provider");
    assert_provider_invariants(&record, &Invariants::new(bound));
}
