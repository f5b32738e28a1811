//! The operator is SIGKILLed at random moments while it rotates refresh tokens (2 s access
//! tokens, so a refresh is always close), then restarted. This binary runs its own operator
//! process (the shared one would be killed under other tests' feet).
//!
//! - Against a provider with a rotation overlap window longer than a restart, no credential
//!   is lost over 50 kills.
//! - Without a window, a kill between the provider's rotation and our write does lose the
//!   chain; every such loss must show as `RefreshResponseLost`, never silently.
//!
//! Both phases end with the provider-side invariants on the token server's own call log: no
//! replay (with the window, reuse the provider accepted inside it is allowed), no revocation
//! beyond the `RefreshResponseLost` reports of each connection (exactly as many), and a request
//! rate the schedule and the kills explain.
mod support;

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use rand::Rng;
use serde_json::json;
use support::objects::*;
use support::{test_namespace, wait_for_some, TestNs};
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, max_in_any_minute, scheduled_per_minute, Invariants,
};
use vaultconn_testkit::reliability::{record, Fact};
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

/// What a kill storm did: when it killed, and how many `RefreshResponseLost` reports it saw
/// (and re-seeded) per connection.
struct Storm {
    kills: Vec<SystemTime>,
    losses: [usize; CONNECTIONS],
}

async fn kill_storm(
    op: &mut OperatorProcess,
    ns: &TestNs,
    ts: &TokenServer,
    prefix: &str,
    reseed_lost: bool,
) -> Storm {
    let mut storm = Storm {
        kills: Vec::with_capacity(KILLS),
        losses: [0; CONNECTIONS],
    };
    for _ in 0..KILLS {
        let pause = rand::rng().random_range(0..1500u64);
        // The random moment of the kill (not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(pause)).await;
        op.kill();
        storm.kills.push(SystemTime::now());
        op.start_again().await.expect("operator restarts");
        if reseed_lost {
            for i in 0..CONNECTIONS {
                let name = format!("{prefix}-{i}");
                let vc = ns.api::<VaultConnection>().get(&name).await.unwrap();
                if reason(&vc) == "RefreshResponseLost" {
                    storm.losses[i] += 1;
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
    storm
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
    let storm = kill_storm(&mut op, &ns, &ts, "ov", false).await;
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
    // Rate per connection: the schedule of 2 s tokens (50 a minute), plus at most one extra
    // request per kill (the retry of an attempt whose reply the kill lost; a restart reads the
    // schedule from the state Secret and re-mints nothing).
    let kills_per_minute = max_in_any_minute(&storm.kills);
    let with_window_bound = scheduled_per_minute(Duration::from_secs(2)) + kills_per_minute;
    let with_window = assert_provider_invariants(
        &ts.provider_record(),
        &Invariants::new(with_window_bound).overlap_window(),
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
    let storm = kill_storm(&mut op, &ns, &ts2, "nw", true).await;
    let reported: usize = storm.losses.iter().sum();
    let mut final_losses = 0;
    let mut reports = storm.losses;
    for (i, per_connection) in reports.iter_mut().enumerate() {
        let name = format!("nw-{i}");
        let r = settled(&ns, &ts2, &name).await;
        match r.as_str() {
            "Reconciled" => {}
            "RefreshResponseLost" => {
                final_losses += 1;
                *per_connection += 1;
            }
            other => panic!("{name}: a lost chain reported as {other}"),
        }
    }
    // The provider's record: every replay and revocation is one of the losses the connections
    // reported, per connection and exactly as many. Rate: the schedule, plus per kill at most
    // the retry of the interrupted attempt and the first request of the re-seeded chain.
    let kills_per_minute = max_in_any_minute(&storm.kills);
    let bound = scheduled_per_minute(Duration::from_secs(2)) + 2 * kills_per_minute;
    let provider = reports
        .iter()
        .enumerate()
        .fold(Invariants::new(bound), |inv, (i, n)| {
            inv.lost_responses(&client(i), *n)
        });
    let without_window = assert_provider_invariants(&ts2.provider_record(), &provider);
    eprintln!(
        "provider record: with overlap {} reuses inside the window, busiest minute {:?} \
         (bound {}); without overlap {} losses, busiest minute {:?} (bound {bound})",
        with_window.replays.len(),
        with_window.max_per_minute,
        with_window_bound,
        without_window.losses.len(),
        without_window.max_per_minute,
    );
    // Every family the provider revoked corresponds to a reported loss.
    let revoked = ts2.revocations() as usize;
    eprintln!("kill storm: {rotations} refreshes with overlap, 0 lost; without overlap {} refreshes, {revoked} chains lost and reported ({reported} during, {final_losses} at the end)", ts2.calls().len());
    assert_eq!(
        revoked,
        reported + final_losses,
        "revocations: {revoked}, reported losses: {reported} during + {final_losses} at the end"
    );
    op.stop(Duration::from_secs(10));
    let how =
        "kill(2) SIGKILL after a random 0–1.5 s pause, restart; 3 connections, 2 s access tokens";
    record(Fact::survived(
        "SIGKILL at random moments while rotating refresh tokens (provider with a 60 s overlap window)",
        how,
        KILLS,
    ).note(format!("{rotations} refreshes, 0 revocations, {} reuses inside the window", with_window.replays.len())));
    record(Fact::survived(
        "SIGKILL at random moments while rotating refresh tokens (no overlap window)",
        how,
        KILLS,
    ).note(format!("{} refreshes; {revoked} chains lost at the provider, each reported as RefreshResponseLost (0 silent)", ts2.calls().len())));
}
