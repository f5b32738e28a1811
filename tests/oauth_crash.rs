//! The operator is SIGKILLed while it rotates refresh tokens (2 s access tokens, so a refresh
//! is always close), then restarted. This binary runs its own operator process (the shared one
//! would be killed under other tests' feet). Most kills come after a random pause; some are
//! aimed at the vulnerable moment: the provider has committed a rotation and holds its reply
//! (`SlowReply { after_commit: true }`), and the kill lands before the reply is sent, so the
//! new refresh token never reaches the operator. The kill timing is seeded
//! (`VAULTCONN_TEST_SEED` repeats it; the seed is printed first).
//!
//! - Against a provider with a rotation overlap window longer than a restart, a lost response
//!   is recovered by the one retry: each aimed kill shows at the provider as a reuse inside the
//!   window (the restarted operator re-presented the token the held rotation spent). The one
//!   exception is a second kill that interrupts that retry before its answer is stored: the
//!   next process reports `RefreshResponseLost` instead of sending the token a third time, and
//!   the provider must show each such report as an interrupted retry (accepted inside the
//!   window, then nothing more of that chain), never a refusal or a revocation.
//! - Without a window, a kill between the provider's rotation and our write does lose the
//!   chain; every such loss must show as `RefreshResponseLost`, never silently. The aimed kills
//!   make losses certain: each one's connection must report `RefreshResponseLost`, and the
//!   provider must match each to a reported loss.
//!
//! Both phases end with the provider-side invariants on the token server's own call log: no
//! replay (with the window, reuse the provider accepted inside it is allowed), no revocation
//! beyond the `RefreshResponseLost` reports of each connection (exactly as many), and a request
//! rate the schedule and the kills explain.
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use support::objects::*;
use support::{test_namespace, wait_for, wait_for_some, TestNs};
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, max_in_any_minute, scheduled_per_minute, Answer, Invariants, Loss,
};
use vaultconn_testkit::reliability::{record, Fact};
use vaultconn_testkit::token_server::{
    Fault, GrantEvent, RecordedCall, TokenServer, TokenServerConfig,
};

const KILLS: usize = 50;
/// Of the `KILLS` of each phase, how many are aimed at a held reply (the rest are random).
const AIMED: usize = 5;
const CONNECTIONS: usize = 3;
/// How long the token server holds an aimed reply after committing the rotation: far longer
/// than noticing the commit (one 50 ms poll) and a kill take, far shorter than the operator's
/// 15 s request timeout (which would lose the reply without any kill). Each aimed kill waits
/// it out before the restart.
const HOLD: Duration = Duration::from_secs(1);

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

/// A kill aimed at the vulnerable moment: call `call` of connection `connection` rotated its
/// refresh token at the provider, and the operator died before the reply reached it.
struct Aimed {
    connection: usize,
    call: u64,
}

/// What a kill storm did: when it killed, which kills it aimed, and how many
/// `RefreshResponseLost` reports it saw (and re-seeded) per connection.
struct Storm {
    kills: Vec<SystemTime>,
    aimed: Vec<Aimed>,
    losses: [usize; CONNECTIONS],
}

fn connection_of(call: &RecordedCall) -> Option<usize> {
    (0..CONNECTIONS).find(|i| call.client_id.as_deref() == Some(client(*i).as_str()))
}

/// Arm a held reply and wait until the provider has committed a rotation under it. Returns
/// the connection, the call, and when the rotation was committed (the reply goes out `HOLD`
/// later). A held reply that another kind of request took (a refused replay) is re-armed.
async fn held_rotation(ts: &TokenServer) -> (usize, u64, SystemTime) {
    loop {
        let from = ts.call_count();
        ts.push_fault(Fault::SlowReply {
            delay: HOLD,
            after_commit: true,
        });
        let call = wait_for_some(
            Duration::from_secs(30),
            "a token request under the held reply is decided",
            || async move {
                ts.calls()
                    .into_iter()
                    .skip(from)
                    .find(|c| c.fault.is_some() && c.outcome.is_some())
            },
        )
        .await;
        let Some(outcome) = call.outcome.as_ref() else {
            continue;
        };
        if let (Some(GrantEvent::Rotated), Some(i)) = (outcome.event, connection_of(&call)) {
            return (i, call.seq, outcome.decided_at);
        }
    }
}

/// Re-seed every connection that reports `RefreshResponseLost` (counting each once).
async fn reseed_reported_losses(ns: &TestNs, ts: &TokenServer, prefix: &str, storm: &mut Storm) {
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

/// `KILLS` kills, `AIMED` of them (chosen by `rng`) at a held reply, the rest after a random
/// pause; every connection that reports `RefreshResponseLost` is re-seeded. With `aimed_lost`
/// (no overlap window), each aimed kill must end in `RefreshResponseLost` for its connection.
async fn kill_storm(
    op: &mut OperatorProcess,
    ns: &TestNs,
    ts: &TokenServer,
    prefix: &str,
    aimed_lost: bool,
    rng: &mut StdRng,
) -> Storm {
    let mut storm = Storm {
        kills: Vec::with_capacity(KILLS),
        aimed: Vec::with_capacity(AIMED),
        losses: [0; CONNECTIONS],
    };
    let aimed: BTreeSet<usize> = rand::seq::index::sample(rng, KILLS, AIMED)
        .into_iter()
        .collect();
    for k in 0..KILLS {
        let mut held = None;
        if aimed.contains(&k) {
            // A connection waiting for a new seed makes no request to aim at.
            reseed_reported_losses(ns, ts, prefix, &mut storm).await;
            held = Some(held_rotation(ts).await);
        } else {
            let pause = rng.random_range(0..1500u64);
            // The random moment of the kill (not a wait for a condition).
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        op.kill();
        let killed = SystemTime::now();
        storm.kills.push(killed);
        if let Some((connection, call, committed)) = held {
            assert!(
                killed < committed + HOLD,
                "the aimed kill came {:?} after call #{call} committed its rotation, so the \
                 held reply ({HOLD:?}) may have been sent",
                killed.duration_since(committed).unwrap_or_default()
            );
            storm.aimed.push(Aimed { connection, call });
            // The held request ends at the provider (its client is gone) before the operator
            // comes back: a retry meeting it there is the hold's doing, not a second request
            // of the operator's for the family.
            wait_for(
                Duration::from_secs(10),
                "the token server drops the held request",
                || async { ts.in_flight() == 0 },
            )
            .await;
        }
        op.start_again().await.expect("operator restarts");
        if aimed_lost {
            if let Some((connection, call, _)) = held {
                let name = format!("{prefix}-{connection}");
                assert_eq!(
                    settled(ns, ts, &name).await,
                    "RefreshResponseLost",
                    "{name}: the operator was killed while the provider held the reply of the \
                     rotation it had committed (call #{call}); the lost chain must be reported \
                     as RefreshResponseLost"
                );
            }
        }
        reseed_reported_losses(ns, ts, prefix, &mut storm).await;
    }
    storm
}

/// Wait until every connection of `prefix` settles; add the ones that end in
/// `RefreshResponseLost` to `reports` (per connection). Returns how many did.
async fn final_losses(
    ns: &TestNs,
    ts: &TokenServer,
    prefix: &str,
    reports: &mut [usize; CONNECTIONS],
) -> usize {
    let mut lost = 0;
    for (i, per_connection) in reports.iter_mut().enumerate() {
        let name = format!("{prefix}-{i}");
        let r = settled(ns, ts, &name).await;
        match r.as_str() {
            "Reconciled" => {}
            "RefreshResponseLost" => {
                lost += 1;
                *per_connection += 1;
            }
            other => panic!("{name}: a lost chain reported as {other}"),
        }
    }
    lost
}

#[tokio::test]
async fn sigkill_during_rotation_never_loses_a_credential_silently() {
    let seed: u64 = std::env::var("VAULTCONN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash storm seed {seed} (VAULTCONN_TEST_SEED={seed} repeats the kill timing)");
    let mut rng = StdRng::seed_from_u64(seed);
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
    let storm = kill_storm(&mut op, &ns, &ts, "ov", false, &mut rng).await;
    let mut ov_reports = storm.losses;
    let ov_final = final_losses(&ns, &ts, "ov", &mut ov_reports).await;
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
    // schedule from the state Secret and re-mints nothing), plus the first request of each
    // chain re-seeded after a reported loss.
    let kills_per_minute = max_in_any_minute(&storm.kills);
    let reseeded: usize = storm.losses.iter().sum();
    let with_window_bound =
        scheduled_per_minute(Duration::from_secs(2)) + kills_per_minute + reseeded;
    let with_window = assert_provider_invariants(
        &ts.provider_record(),
        &ov_reports.iter().enumerate().fold(
            Invariants::new(with_window_bound)
                .overlap_window()
                .kills(&storm.kills),
            |inv, (i, n)| inv.lost_responses(&client(i), *n),
        ),
    );
    // Inside the window nothing is refused: every loss reported is a retry a second kill
    // interrupted (accepted by the provider, then nothing more of that chain), or a rotation
    // whose retry a second kill stopped before it was sent.
    let interrupted = with_window.losses.len();
    assert!(
        with_window.losses.iter().all(|l| !l.refused && !l.revoked),
        "with a window, a loss that is not an interrupted retry: {:?}",
        with_window.losses
    );
    // Each aimed kill did land in the window: the restarted operator re-presented the token the
    // held rotation had spent, and the provider accepted it inside its overlap window; or the
    // next kill came before that retry was sent, and the loss was reported (the rotation
    // abandoned by two kills).
    let aimed_with_window = storm.aimed.len();
    for a in &storm.aimed {
        let id = Some(client(a.connection));
        let reused = with_window.replays.iter().any(|r| {
            r.superseded_by == a.call && r.answer == Answer::OverlapReuse && r.client_id == id
        });
        let abandoned = with_window
            .losses
            .iter()
            .any(|l| l.refused_by == a.call && l.replays.is_empty() && l.client_id == id);
        assert!(
            reused || abandoned,
            "ov-{}: no reuse inside the window of the token call #{} rotated while its reply \
             was held and the operator killed, nor a reported loss of it",
            a.connection,
            a.call
        );
    }

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
    let storm = kill_storm(&mut op, &ns, &ts2, "nw", true, &mut rng).await;
    let reported: usize = storm.losses.iter().sum();
    let mut reports = storm.losses;
    let final_losses = final_losses(&ns, &ts2, "nw", &mut reports).await;
    // The provider's record: every replay and revocation is one of the losses the connections
    // reported, per connection and exactly as many. Rate: the schedule, plus per kill at most
    // the retry of the interrupted attempt and the first request of the re-seeded chain.
    let kills_per_minute = max_in_any_minute(&storm.kills);
    let bound = scheduled_per_minute(Duration::from_secs(2)) + 2 * kills_per_minute;
    let provider = reports
        .iter()
        .enumerate()
        .fold(Invariants::new(bound).kills(&storm.kills), |inv, (i, n)| {
            inv.lost_responses(&client(i), *n)
        });
    let without_window = assert_provider_invariants(&ts2.provider_record(), &provider);
    // The aimed kills made losses certain; the provider matched each (the chain its held
    // rotation spent) to a `RefreshResponseLost` the connection reported.
    assert_eq!(storm.aimed.len(), AIMED);
    for a in &storm.aimed {
        assert!(
            without_window.losses.iter().any(|l| l.spent_by == a.call
                && l.client_id.as_deref() == Some(client(a.connection).as_str())),
            "nw-{}: the chain call #{} rotated (reply held, operator killed) is not among the \
             losses reported as RefreshResponseLost: {:?}",
            a.connection,
            a.call,
            without_window.losses
        );
    }
    assert!(
        without_window.losses.len() >= AIMED && reported + final_losses >= AIMED,
        "{AIMED} aimed kills, yet the provider saw {} losses and the connections reported {}",
        without_window.losses.len(),
        reported + final_losses
    );
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
    // How each phase's reported losses show at the provider: a refused retry, a retry after
    // which nothing more came (interrupted), or a rotation no retry followed (abandoned).
    let shapes = |losses: &[Loss]| {
        let refused = losses.iter().filter(|l| l.refused).count();
        let abandoned = losses
            .iter()
            .filter(|l| !l.refused && l.spent_by == l.refused_by)
            .count();
        format!(
            "{refused} refused, {} interrupted retries, {abandoned} abandoned rotations",
            losses.len() - refused - abandoned
        )
    };
    eprintln!(
        "losses at the provider: with overlap {}; without overlap {}",
        shapes(&with_window.losses),
        shapes(&without_window.losses)
    );
    eprintln!("kill storm: {rotations} refreshes with overlap, {interrupted} lost to a second kill during the retry and reported ({ov_final} at the end); without overlap {} refreshes, {} chains lost and reported ({reported} during, {final_losses} at the end; {revoked} revoked by the provider; {AIMED} kills aimed at a held reply in each phase)", ts2.calls().len(), reported + final_losses);
    // Every revocation is a refused retry of a reported loss; the other reported losses are
    // chains a second kill abandoned before their retry (the checker matched each).
    assert_eq!(
        reported + final_losses,
        without_window.losses.len(),
        "reported losses: {reported} during + {final_losses} at the end"
    );
    assert_eq!(
        revoked,
        without_window.losses.iter().filter(|l| l.revoked).count(),
        "revocations: {revoked}, losses: {:?}",
        without_window.losses
    );
    op.stop(Duration::from_secs(10));
    let how = "kill(2) SIGKILL after a random 0–1.5 s pause, or (5 of the 50) while the provider \
               holds the reply of a committed rotation; restart; 3 connections, 2 s access tokens";
    record(Fact::survived(
        "SIGKILL at random moments while rotating refresh tokens (provider with a 60 s overlap window)",
        how,
        KILLS,
    ).note(format!("{rotations} refreshes, 0 revocations, {} reuses inside the window ({aimed_with_window} from aimed kills); {interrupted} chains lost to a second kill during the one retry, each reported as RefreshResponseLost", with_window.replays.len())));
    record(Fact::survived(
        "SIGKILL at random moments while rotating refresh tokens (no overlap window)",
        how,
        KILLS,
    ).note(format!("{} refreshes; {} chains lost at the provider ({revoked} revoked on the refused retry), each reported as RefreshResponseLost (0 silent)", ts2.calls().len(), without_window.losses.len())));
}
