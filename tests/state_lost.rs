//! Rotation issue, scenario 2 (fault matrix row 39): the state Secret is deleted (by a person,
//! or lost in a restore) after the provider rotated the seed away. The spent seed must never be
//! sent again: a rotating provider treats that as token theft and revokes the grant.
//!
//! Two tests, in their own binary, because they restart the operator (one at a time:
//! `RESTARTS`): while the operator still holds
//! the state it rewrites the Secret without a provider call; after a restart it knows nothing
//! and reports `StateLost` instead of replaying the seed. Everything is checked against the
//! token server's own record.
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use support::objects::*;
use support::operator::{api_proxy, operator};
use support::{test_namespace, wait_for, wait_for_some, TestNs};
use vaultconn_testkit::api_proxy::FaultRule;
use vaultconn_testkit::provider_invariants::{assert_provider_invariants, Invariants};
use vaultconn_testkit::reliability::{record, Fact};
use vaultconn_testkit::token_server::{Fault, TokenServer, TokenServerConfig};

/// The tests restart the one operator of this binary; they take turns.
static RESTARTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CLIENT: &str = "app";
const CLIENT_SECRET: &str = "client-SECRET-value";

async fn put_creds(ns: &TestNs, refresh_token: &str) {
    put_secret(
        ns,
        "creds",
        &[
            ("client_id", CLIENT),
            ("client_secret", CLIENT_SECRET),
            ("refresh_token", refresh_token),
        ],
    )
    .await;
}

async fn delete_state(ns: &TestNs) {
    ns.api::<Secret>()
        .delete("crm-vaultconn-state", &DeleteParams::default())
        .await
        .unwrap();
}

/// A rotating token server (no overlap window) and connection `crm` seeded from it; `first`:
/// a fault for its first token request. Returns the server and the seed.
async fn rotating_connection(ns: &TestNs, first: Option<Fault>) -> (TokenServer, String) {
    let ts = TokenServer::start(
        TokenServerConfig::default()
            .with_rotation(true)
            .with_client(CLIENT, CLIENT_SECRET),
    )
    .await
    .unwrap();
    let seed = ts.mint_refresh_token(CLIENT);
    if let Some(fault) = first {
        ts.push_fault(fault);
    }
    put_creds(ns, &seed).await;
    let spec = serde_json::json!({
        "type": "oauth2",
        "credentialsRef": {"name": "creds"},
        "oauth2": {"tokenUrl": ts.token_url(), "grantType": "refreshToken"},
    });
    apply_vc(ns, "crm", spec).await;
    (ts, seed)
}

/// Waits until the status of `crm` records a spent seed.
async fn spent_seed_recorded(ns: &TestNs, what: &str) {
    wait_for(WAIT, what, || async {
        let vc = ns
            .api::<vaultconn::api::VaultConnection>()
            .get("crm")
            .await
            .unwrap();
        vc.status.and_then(|s| s.spent_seed_fingerprint).is_some()
    })
    .await;
}

fn sends_of(ts: &TokenServer, token: &str) -> usize {
    ts.calls()
        .iter()
        .filter(|c| c.refresh_token.as_deref() == Some(token))
        .count()
}

#[tokio::test]
// The guard is held across the restart on purpose: nothing else in this binary uses the
// operator meanwhile, and holding it keeps anyone from seeing it half started.
#[allow(clippy::await_holding_lock)]
async fn a_lost_state_secret_never_replays_the_spent_seed() {
    let _turn = RESTARTS.lock().await;
    drop(operator().await);
    let ns = test_namespace("statelost").await;
    let (ts, seed) = rotating_connection(&ns, None).await;
    ready(&ns, "crm").await;
    let chain = wait_for_some(WAIT, "the rotated token stored", || async {
        stored_refresh_token(&ns, "crm")
            .await
            .filter(|t| *t != seed)
    })
    .await;
    spent_seed_recorded(&ns, "the status to know the seed is spent").await;
    let calls = ts.call_count();

    // 1. Deleted while the operator runs: rewritten from its own copy, nothing sent.
    delete_state(&ns).await;
    wait_for(WAIT, "the state Secret rewritten", || async {
        stored_refresh_token(&ns, "crm").await.as_deref() == Some(chain.as_str())
    })
    .await;
    force_reconcile(&ns, "creds", "crm").await;
    assert_eq!(ts.call_count(), calls, "no token request for the rewrite");

    // 2. Deleted while the operator is down: after the restart it knows nothing but the status.
    assert!(operator().await.stop(Duration::from_secs(20)), "clean stop");
    delete_state(&ns).await;
    operator().await.start_again().await.unwrap();
    let vc = with_reason(&ns, "crm", "StateLost").await;
    assert!(
        message(&vc).contains("new refresh_token"),
        "{}",
        message(&vc)
    );
    force_reconcile(&ns, "creds", "crm").await;
    assert_eq!(
        sends_of(&ts, &seed),
        1,
        "the spent seed was sent once, at the start"
    );
    assert_eq!(ts.call_count(), calls, "nothing was sent at all");
    assert_eq!(ts.revocations(), 0, "the provider revoked nothing");
    assert!(ts.is_refresh_token_live(&chain));

    // 3. A new seed from the user starts a new chain.
    let fresh = ts.mint_refresh_token(CLIENT);
    put_creds(&ns, &fresh).await;
    ready(&ns, "crm").await;
    assert_eq!(sends_of(&ts, &fresh), 1);
    assert_eq!(ts.revocations(), 0);
    let text = visible_text(&ns).await;
    for secret in [&seed, &chain, &fresh, &CLIENT_SECRET.to_string()] {
        assert!(!text.contains(secret.as_str()), "a token leaked");
    }
    // The provider's own record: no replay (the spent seed above all), no revocation; one
    // request for the seed and one for the new seed (1 h tokens, the rewrite and the restart
    // ask nothing).
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(2));
    record(Fact::survived(
        "State Secret deleted (operator running; operator down)",
        "DELETE of the state Secret by another client",
        2,
    ).note("running: rewritten, nothing sent; down: StateLost reported, the spent seed never replayed"));
}

/// Found by the refresh model (`decide::props`): the seed's response was lost after the provider
/// rotated it, and the one retry was refused (no overlap window): `RefreshResponseLost`. The
/// state Secret was then the only record that the seed is spent; deleted while the operator was
/// down, the seed was sent once more. The status now records it as spent too.
///
/// The operator's watch of VaultConnections lags 5 s behind the API server here (the proxy
/// delays its events, as a loaded API server does): the state Secret's event then reconciles
/// the connection with a copy older than the status that recorded the spent seed. Found by a
/// CI run that hit this by chance: that reconcile wrote its status over the newer one and
/// dropped the record, and after the restart the seed was sent a third time. A status is now
/// written only over the version it was computed from.
#[tokio::test]
#[allow(clippy::await_holding_lock)]
async fn a_seed_refused_after_a_lost_response_is_not_resent_when_the_state_is_lost() {
    let _turn = RESTARTS.lock().await;
    // Restart the operator so that its VaultConnection watch starts under the lag rule.
    assert!(operator().await.stop(Duration::from_secs(20)), "clean stop");
    let lag = api_proxy().await.fail_until_cleared(FaultRule::lag_watch(
        "/vaultconnections",
        Duration::from_secs(5),
    ));
    operator().await.start_again().await.unwrap();
    let ns = test_namespace("seedlost").await;
    // The provider rotates the seed, then the connection drops before the answer.
    let (ts, seed) = rotating_connection(&ns, Some(Fault::ResetAfterCommit)).await;
    with_reason(&ns, "crm", "RefreshResponseLost").await;
    spent_seed_recorded(&ns, "the status to record the refused seed as spent").await;
    assert_eq!(sends_of(&ts, &seed), 2, "the lost call and its one retry");
    // A reconcile now, well within the lag, works from a copy without that status.
    force_reconcile(&ns, "creds", "crm").await;

    // Stopped, the operator has written all it will: the record must still be there.
    assert!(operator().await.stop(Duration::from_secs(20)), "clean stop");
    assert!(api_proxy().await.held(lag) > 0, "the watch lagged");
    api_proxy().await.clear(lag);
    let vc = ns
        .api::<vaultconn::api::VaultConnection>()
        .get("crm")
        .await
        .unwrap();
    let status = vc.status.unwrap_or_default();
    assert!(
        status.spent_seed_fingerprint.is_some(),
        "the spent seed's record survived the reconciles that followed ({:?})",
        status.last_failure_reason
    );
    delete_state(&ns).await;
    operator().await.start_again().await.unwrap();
    with_reason(&ns, "crm", "StateLost").await;
    force_reconcile(&ns, "creds", "crm").await;
    assert_eq!(
        sends_of(&ts, &seed),
        2,
        "the refused seed was not sent again after the restart"
    );
    let text = visible_text(&ns).await;
    for secret in [&seed, &CLIENT_SECRET.to_string()] {
        assert!(!text.contains(secret.as_str()), "a token leaked");
    }
    // The provider's record: the lost call and its retry, no other request; the one lost
    // response was reported as such.
    assert_provider_invariants(
        &ts.provider_record(),
        &Invariants::new(2).lost_response(CLIENT),
    );
    record(Fact::survived(
        "State Secret deleted after a refused seed (RefreshResponseLost), operator down",
        "reset after the provider committed a rotation, no overlap window; the operator's VaultConnection watch lagging 5 s (a reconcile from the stale copy forced inside the lag); DELETE of the state Secret while stopped",
        1,
    ).note("the stale copy's status write refused (409) and decided again: the spent-seed record kept; StateLost reported; the refused seed never sent a third time"));
}
