//! The operator is SIGKILLed at random moments while it rotates refresh tokens (2 s access
//! tokens, so a refresh is always close), then restarted. This binary runs its own operator
//! process (the shared one would be killed under other tests' feet).
//!
//! - Against a provider with a rotation overlap window longer than a restart, no credential
//!   is lost over 50 kills.
//! - Without a window, a kill between the provider's rotation and our write does lose the
//!   chain; every such loss must show as `RefreshResponseLost`, never silently.
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use rand::Rng;
use serde_json::json;
use support::objects::*;
use support::{test_namespace, wait_for_some, TestNs};
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};
use vaultconn_testkit::token_server::{TokenServer, TokenServerConfig};

const KILLS: usize = 50;
const CONNECTIONS: usize = 3;

async fn operator() -> OperatorProcess {
    support::ensure_crds().await;
    let cp = support::cluster().await;
    OperatorProcess::start(OperatorOptions {
        binary: env!("CARGO_BIN_EXE_vaultconn").into(),
        kubeconfig: cp.kubeconfig_path().to_path_buf(),
        log_path: cp.dir().join("operator-crash.log"),
        extra_args: vec!["--allow-http-loopback".into()],
        log_filter: "info".into(),
    })
    .await
    .expect("operator starts")
}

fn client(i: usize) -> String {
    format!("client-{i}")
}

async fn seed(ns: &TestNs, ts: &TokenServer, prefix: &str, i: usize) {
    let rt = ts.mint_refresh_token(&client(i));
    put_secret(
        ns,
        &format!("{prefix}-{i}-creds"),
        &[
            ("client_id", &client(i)),
            ("client_secret", "s3cret-value"),
            ("refresh_token", &rt),
        ],
    )
    .await;
}

async fn create(ns: &TestNs, ts: &TokenServer, prefix: &str) {
    for i in 0..CONNECTIONS {
        seed(ns, ts, prefix, i).await;
        apply_vc(
            ns,
            &format!("{prefix}-{i}"),
            json!({"type": "oauth2", "credentialsRef": {"name": format!("{prefix}-{i}-creds")},
            "oauth2": {"tokenUrl": ts.token_url(), "grantType": "refreshToken"}}),
        )
        .await;
    }
}

/// Wait until `name` is settled: Ready with a valid access token and a live stored refresh
/// token, or Failed with a terminal reason. Returns the reason.
async fn settled(ns: &TestNs, ts: &TokenServer, name: &str) -> String {
    let api = ns.api::<VaultConnection>();
    wait_for_some(Duration::from_secs(60), &format!("{name} settles"), || {
        let api = api.clone();
        async move {
            let vc = api.get(name).await.ok()?;
            match phase(&vc) {
                Some(Phase::Ready) => {
                    let out = ns.api::<Secret>().get_opt(name).await.ok()??;
                    let at = data_of(&out).get("access_token").cloned()?;
                    let rt = stored_refresh_token(ns, name).await?;
                    (ts.is_access_token_valid(&at) && ts.is_refresh_token_live(&rt))
                        .then(|| reason(&vc))
                }
                Some(Phase::Failed)
                    if ["RefreshResponseLost", "RefreshTokenRejected"]
                        .contains(&reason(&vc).as_str()) =>
                {
                    Some(reason(&vc))
                }
                _ => None,
            }
        }
    })
    .await
}

async fn kill_storm(
    op: &mut OperatorProcess,
    ns: &TestNs,
    ts: &TokenServer,
    prefix: &str,
    reseed_lost: bool,
) -> usize {
    let mut losses = 0;
    for _ in 0..KILLS {
        let pause = rand::rng().random_range(0..1500u64);
        // The random moment of the kill (not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(pause)).await;
        op.kill();
        op.start_again().await.expect("operator restarts");
        if reseed_lost {
            for i in 0..CONNECTIONS {
                let name = format!("{prefix}-{i}");
                let vc = ns.api::<VaultConnection>().get(&name).await.unwrap();
                if reason(&vc) == "RefreshResponseLost" {
                    losses += 1;
                    seed(ns, ts, prefix, i).await;
                    // Counted once: wait until the operator took up the new seed.
                    vc_where(
                        ns,
                        &name,
                        "the re-seeded connection leaves RefreshResponseLost",
                        |v| reason(v) != "RefreshResponseLost",
                    )
                    .await;
                }
            }
        }
    }
    losses
}

#[tokio::test]
async fn sigkill_during_rotation_never_loses_a_credential_silently() {
    let mut op = operator().await;
    let ns = test_namespace("crash").await;

    // With an overlap window: nothing is lost.
    let ts = TokenServer::start(
        (0..CONNECTIONS)
            .fold(TokenServerConfig::default(), |c, i| {
                c.with_client(client(i), "s3cret-value")
            })
            .with_rotation(true)
            .with_overlap(Some(Duration::from_secs(60)))
            .with_ttl(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    create(&ns, &ts, "ov").await;
    for i in 0..CONNECTIONS {
        assert_eq!(settled(&ns, &ts, &format!("ov-{i}")).await, "Reconciled");
    }
    kill_storm(&mut op, &ns, &ts, "ov", false).await;
    for i in 0..CONNECTIONS {
        assert_eq!(
            settled(&ns, &ts, &format!("ov-{i}")).await,
            "Reconciled",
            "ov-{i} lost its credential"
        );
    }
    assert_eq!(
        ts.revocations(),
        0,
        "the provider saw a replay outside its window"
    );
    assert_eq!(ts.max_concurrent_per_refresh_family(), 1);
    let rotations = ts.calls().len();
    assert!(
        rotations > KILLS,
        "only {rotations} refreshes during {KILLS} kills"
    );

    // Without a window: losses happen, and each one is reported.
    let ts2 = TokenServer::start(
        (0..CONNECTIONS)
            .fold(TokenServerConfig::default(), |c, i| {
                c.with_client(client(i), "s3cret-value")
            })
            .with_rotation(true)
            .with_ttl(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    create(&ns, &ts2, "nw").await;
    let reported = kill_storm(&mut op, &ns, &ts2, "nw", true).await;
    let mut final_losses = 0;
    for i in 0..CONNECTIONS {
        let name = format!("nw-{i}");
        let r = settled(&ns, &ts2, &name).await;
        match r.as_str() {
            "Reconciled" => {}
            "RefreshResponseLost" => final_losses += 1,
            other => panic!("{name}: a lost chain reported as {other}"),
        }
    }
    // Every family the provider revoked corresponds to a reported loss.
    let revoked = ts2.revocations() as usize;
    eprintln!("kill storm: {rotations} refreshes with overlap, 0 lost; without overlap {} refreshes, {revoked} chains lost and reported ({reported} during, {final_losses} at the end)", ts2.calls().len());
    assert_eq!(
        revoked,
        reported + final_losses,
        "revocations: {revoked}, reported losses: {reported} during + {final_losses} at the end"
    );
    op.stop(Duration::from_secs(10));
}
