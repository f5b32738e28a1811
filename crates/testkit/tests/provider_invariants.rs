//! Tests of the provider-side invariant checker itself (`vaultconn_testkit::provider_invariants`):
//! a synthetic provider record that breaks each invariant must fail it (so the checker can fail),
//! the allowed exceptions pass only when the test declares them, and the token server's real
//! call log maps onto the record faithfully.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, fingerprint, max_in_any_minute, min_refresh_gap,
    scheduled_per_minute, Answer, Invariants, Loss, ProviderCall, ProviderRecord,
    ProviderRevocation, Sanction, Violation,
};
use vaultconn_testkit::token_server::{Fault, TokenServer, TokenServerConfig};

const APP: &str = "app";

fn t(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
}

/// A refresh call at `ms` by `APP`, presenting `presented` and issuing `issued` (token names
/// are fingerprinted like the real records).
fn refresh(
    seq: u64,
    ms: u64,
    presented: &str,
    issued: Option<&str>,
    answer: Answer,
) -> ProviderCall {
    let status = match answer {
        Answer::Issued | Answer::OverlapReuse => Some(200),
        Answer::Pending => None,
        _ => Some(400),
    };
    ProviderCall {
        seq,
        at: t(ms),
        decided_at: (answer != Answer::Pending).then(|| t(ms + 5)),
        client_id: Some(APP.into()),
        grant_type: Some("refresh_token".into()),
        presented: Some(fingerprint(presented)),
        issued: issued.map(fingerprint),
        withheld: false,
        family: None,
        status,
        answer,
        fault: None,
    }
}

fn cc(seq: u64, ms: u64, client: &str) -> ProviderCall {
    ProviderCall {
        seq,
        at: t(ms),
        decided_at: Some(t(ms + 5)),
        client_id: Some(client.into()),
        grant_type: Some("client_credentials".into()),
        presented: None,
        issued: None,
        withheld: false,
        family: None,
        status: Some(200),
        answer: Answer::Issued,
        fault: None,
    }
}

fn record(minted: &[&str], calls: Vec<ProviderCall>) -> ProviderRecord {
    let revocations = calls
        .iter()
        .filter(|c| c.answer == Answer::SpentRefused { revoked: true })
        .map(|c| ProviderRevocation {
            family: None,
            at: c.decided_at.unwrap_or(c.at),
            by_call: Some(c.seq),
        })
        .collect();
    ProviderRecord {
        provider: "synthetic".into(),
        calls,
        minted: minted.iter().map(|m| (fingerprint(m), None)).collect(),
        revocations,
        gaps: Vec::new(),
    }
}

/// A clean chain: seed → r1 → r2, one refresh every 2 s.
fn chain() -> Vec<ProviderCall> {
    vec![
        refresh(0, 0, "seed", Some("r1"), Answer::Issued),
        refresh(1, 2000, "r1", Some("r2"), Answer::Issued),
        refresh(2, 4000, "r2", Some("r3"), Answer::Issued),
    ]
}

fn panics(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("the checker must fail");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn a_clean_chain_passes() {
    let report = assert_provider_invariants(&record(&["seed"], chain()), &Invariants::new(3));
    assert!(report.replays.is_empty());
    assert!(report.losses.is_empty());
    assert_eq!(report.max_per_minute.get(&Some(APP.into())), Some(&3));
}

#[test]
fn replaying_a_spent_token_fails_even_without_a_revocation() {
    // r1 presented again after the provider issued r2 for it; reuse detection off, so only
    // invalid_grant: still a replay.
    let mut calls = chain();
    calls.push(refresh(
        3,
        6000,
        "r1",
        None,
        Answer::SpentRefused { revoked: false },
    ));
    let rec = record(&["seed"], calls);
    let report = rec.check(&Invariants::new(10));
    assert_eq!(report.violations.len(), 1, "{report}");
    let Violation::Replay(r) = &report.violations[0] else {
        panic!("{report}");
    };
    assert_eq!((r.call, r.superseded_by), (3, 1));
    assert_eq!(r.token, fingerprint("r1"));
    let msg = panics(|| report.assert_clean());
    assert!(msg.contains("Replay"), "{msg}");
    assert!(!msg.contains("\"r1\""), "tokens show as fingerprints only");
}

#[test]
fn replaying_the_seed_fails() {
    let mut calls = chain();
    calls.push(refresh(
        3,
        6000,
        "seed",
        None,
        Answer::Refused("invalid_grant".into()),
    ));
    let report = record(&["seed"], calls).check(&Invariants::new(10));
    assert!(
        matches!(&report.violations[..], [Violation::Replay(r)] if r.call == 3 && r.superseded_by == 0),
        "{report}"
    );
}

#[test]
fn a_lost_response_is_a_replay_and_a_revocation_unless_reported() {
    // #0 rotated seed → r1 but the response was lost (reset); #1 retried the seed: the
    // provider saw a replay and revoked the family.
    let mut lost = refresh(0, 0, "seed", Some("r1"), Answer::Issued);
    lost.status = None;
    let calls = vec![
        lost,
        refresh(1, 100, "seed", None, Answer::SpentRefused { revoked: true }),
    ];
    let rec = record(&["seed"], calls);

    // Not reported: both invariants 1 and 2 fail.
    let report = rec.check(&Invariants::new(2));
    assert!(
        report.violations.iter().any(|v| matches!(v,
            Violation::UnexplainedRevocation { by_call: Some(1), client_id: Some(c), .. } if c == APP)),
        "{report}"
    );
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Replay(r) if r.call == 1)),
        "{report}"
    );

    // Reported as RefreshResponseLost by APP's connection: exactly this loss.
    let report = assert_provider_invariants(&rec, &Invariants::new(2).lost_response(APP));
    assert_eq!(
        report.losses,
        vec![Loss {
            client_id: Some(APP.into()),
            token: fingerprint("seed"),
            spent_by: 0,
            replays: vec![1],
            refused_by: 1,
            refused: true,
            revoked: true,
        }]
    );
    assert_eq!(report.replays[0].sanction, Some(Sanction::ReportedLoss));

    // Reported for another connection only: still unexplained.
    let report = rec.check(&Invariants::new(2).lost_response("other"));
    assert!(report
        .violations
        .iter()
        .any(|v| matches!(v, Violation::UnexplainedRevocation { .. })));
    assert!(report.violations.iter().any(|v| matches!(v,
        Violation::ReportedLossNotSeen { client_id, missing: 1 } if client_id == "other")));
}

#[test]
fn a_reported_loss_the_provider_never_saw_fails() {
    let report = record(&["seed"], chain()).check(&Invariants::new(3).lost_responses(APP, 2));
    assert_eq!(
        report.violations,
        vec![Violation::ReportedLossNotSeen {
            client_id: APP.into(),
            missing: 2
        }]
    );
}

#[test]
fn a_second_revocation_needs_a_second_report() {
    // Two losses in a row (re-seeded in between), one report.
    let calls = vec![
        refresh(0, 0, "seed", Some("r1"), Answer::Issued),
        refresh(1, 100, "seed", None, Answer::SpentRefused { revoked: true }),
        refresh(2, 5000, "seed2", Some("s1"), Answer::Issued),
        refresh(
            3,
            5100,
            "seed2",
            None,
            Answer::SpentRefused { revoked: true },
        ),
    ];
    let rec = record(&["seed", "seed2"], calls);
    let report = rec.check(&Invariants::new(4).lost_response(APP));
    assert!(
        matches!(&report.violations[..], [Violation::UnexplainedRevocation { by_call: Some(3), .. }, Violation::Replay(r)] if r.call == 3),
        "{report}"
    );
    assert_provider_invariants(&rec, &Invariants::new(4).lost_responses(APP, 2));
}

#[test]
fn replays_after_the_refusal_are_not_part_of_the_loss() {
    // The loss is reported, but the operator kept presenting the token afterwards.
    let calls = vec![
        refresh(0, 0, "seed", Some("r1"), Answer::Issued),
        refresh(1, 100, "seed", None, Answer::SpentRefused { revoked: true }),
        refresh(
            2,
            1100,
            "seed",
            None,
            Answer::Refused("invalid_grant".into()),
        ),
    ];
    let report = record(&["seed"], calls).check(&Invariants::new(3).lost_response(APP));
    assert!(
        matches!(&report.violations[..], [Violation::Replay(r)] if r.call == 2),
        "{report}"
    );
}

#[test]
fn a_transient_answer_to_the_retry_belongs_to_the_loss() {
    // Reset after commit, the retry meets a 503 (not processed), the next retry is refused.
    let mut retry = refresh(1, 100, "seed", None, Answer::NotProcessed);
    retry.status = Some(503);
    let calls = vec![
        refresh(0, 0, "seed", Some("r1"), Answer::Issued),
        retry,
        refresh(
            2,
            1200,
            "seed",
            None,
            Answer::SpentRefused { revoked: true },
        ),
    ];
    let report = assert_provider_invariants(
        &record(&["seed"], calls),
        &Invariants::new(3).lost_response(APP),
    );
    assert_eq!(report.losses[0].replays, vec![1, 2]);
    assert_eq!(report.losses[0].spent_by, 0);
}

#[test]
fn overlap_reuse_passes_only_where_the_test_configured_a_window() {
    let calls = vec![
        refresh(0, 0, "seed", Some("r1"), Answer::Issued),
        refresh(1, 100, "seed", Some("r2"), Answer::OverlapReuse),
        refresh(2, 2100, "r2", Some("r3"), Answer::Issued),
    ];
    let rec = record(&["seed"], calls);
    let report = rec.check(&Invariants::new(3));
    assert!(
        matches!(&report.violations[..], [Violation::Replay(r)] if r.call == 1 && r.superseded_by == 0),
        "{report}"
    );
    let report = assert_provider_invariants(&rec, &Invariants::new(3).overlap_window());
    assert_eq!(report.replays[0].sanction, Some(Sanction::OverlapWindow));
    // r2 (issued after r1) is not superseded by r1.
    assert_eq!(report.replays.len(), 1);
}

#[test]
fn a_window_does_not_excuse_a_refused_replay() {
    let calls = vec![
        refresh(0, 0, "seed", Some("r1"), Answer::Issued),
        refresh(1, 100, "r1", Some("r2"), Answer::Issued),
        // The second-to-last token: outside what the overlap allows, refused.
        refresh(2, 200, "seed", None, Answer::SpentRefused { revoked: true }),
    ];
    let report = record(&["seed"], calls).check(&Invariants::new(3).overlap_window());
    assert_eq!(report.violations.len(), 2, "{report}");
}

#[test]
fn a_hand_reseeded_spent_token_passes_only_when_declared() {
    let mut calls = chain();
    calls.push(refresh(
        3,
        6000,
        "seed",
        None,
        Answer::Refused("invalid_grant".into()),
    ));
    let rec = record(&["seed"], calls);
    assert!(!rec.check(&Invariants::new(4)).violations.is_empty());
    let report = assert_provider_invariants(&rec, &Invariants::new(4).hand_reseeded("seed"));
    assert_eq!(report.replays[0].sanction, Some(Sanction::HandReseeded));
}

#[test]
fn a_concurrent_double_spend_is_a_replay() {
    // Two requests with r1 in flight at once: the provider decides #1 first; #2, decided after
    // it, presented a token that was spent by then.
    let mut a = refresh(1, 2000, "r1", Some("r2"), Answer::Issued);
    a.decided_at = Some(t(2010));
    let mut b = refresh(2, 2001, "r1", None, Answer::SpentRefused { revoked: true });
    b.decided_at = Some(t(2020));
    let calls = vec![refresh(0, 0, "seed", Some("r1"), Answer::Issued), a, b];
    let report = record(&["seed"], calls).check(&Invariants::new(3));
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Replay(r) if r.call == 2 && r.superseded_by == 1)),
        "{report}"
    );
}

/// seed → r1 (delivered), r1 → r2 with `r2` withheld (a 200 without `refresh_token`, so the
/// client keeps r1), then r1 presented again: refused, family revoked.
fn withheld_then_kept() -> Vec<ProviderCall> {
    let mut strip = refresh(1, 2000, "r1", Some("r2"), Answer::Issued);
    strip.withheld = true;
    vec![
        refresh(0, 0, "seed", Some("r1"), Answer::Issued),
        strip,
        refresh(2, 4000, "r1", None, Answer::SpentRefused { revoked: true }),
    ]
}

#[test]
fn presenting_the_token_kept_after_a_withheld_rotation_is_the_providers_doing() {
    let report = assert_provider_invariants(
        &record(&["seed"], withheld_then_kept()),
        &Invariants::new(3),
    );
    assert_eq!(report.replays.len(), 1, "{report}");
    let r = &report.replays[0];
    assert_eq!((r.call, r.superseded_by), (2, 1));
    assert_eq!(r.sanction, Some(Sanction::Undelivered));
    assert!(report.losses.is_empty(), "no loss of the operator's");
}

#[test]
fn the_same_presentation_is_a_replay_when_the_newer_token_was_delivered() {
    let mut calls = withheld_then_kept();
    calls[1].withheld = false;
    let report = record(&["seed"], calls).check(&Invariants::new(3));
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Replay(r) if r.call == 2 && r.superseded_by == 1)),
        "{report}"
    );
    assert!(
        report.violations.iter().any(|v| matches!(
            v,
            Violation::UnexplainedRevocation {
                by_call: Some(2),
                ..
            }
        )),
        "{report}"
    );
}

#[test]
fn a_withheld_token_excuses_only_the_kept_token_and_only_until_refused() {
    // The kept token presented again after the provider refused it: a replay.
    let mut calls = withheld_then_kept();
    calls.push(refresh(
        3,
        6000,
        "r1",
        None,
        Answer::Refused("invalid_grant".into()),
    ));
    let report = record(&["seed"], calls).check(&Invariants::new(4));
    assert!(
        matches!(&report.violations[..], [Violation::Replay(r)] if r.call == 3),
        "{report}"
    );
    // An older token than the kept one (the seed, superseded by a delivered r1): a replay.
    let mut calls = withheld_then_kept();
    calls[2] = refresh(
        2,
        4000,
        "seed",
        None,
        Answer::SpentRefused { revoked: true },
    );
    let report = record(&["seed"], calls).check(&Invariants::new(3));
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Replay(r) if r.call == 2 && r.superseded_by == 0)),
        "{report}"
    );
    assert!(report
        .violations
        .iter()
        .any(|v| matches!(v, Violation::UnexplainedRevocation { .. })));
    // A transient answer before the refusal does not use the excuse up.
    let mut calls = withheld_then_kept();
    let mut busy = refresh(2, 4000, "r1", None, Answer::NotProcessed);
    busy.status = Some(503);
    calls[2].seq = 3;
    calls.insert(2, busy);
    let report = assert_provider_invariants(&record(&["seed"], calls), &Invariants::new(4));
    assert!(report
        .replays
        .iter()
        .all(|r| r.sanction == Some(Sanction::Undelivered)));
    assert_eq!(report.replays.len(), 2);
}

#[test]
fn an_unsolicited_revocation_fails_unless_the_test_made_it() {
    let mut rec = record(&["seed"], chain());
    rec.revocations.push(ProviderRevocation {
        family: Some("g1".into()),
        at: t(7000),
        by_call: None,
    });
    let report = rec.check(&Invariants::new(3));
    assert_eq!(
        report.violations,
        vec![Violation::UnexplainedRevocation {
            by_call: None,
            client_id: None,
            family: Some("g1".into())
        }]
    );
    assert_provider_invariants(&rec, &Invariants::new(3).revoked_by_test(1));
    // Claiming a revocation the provider did not record is a gap, not a pass.
    assert!(!rec
        .check(&Invariants::new(3).revoked_by_test(2))
        .violations
        .is_empty());
}

#[test]
fn too_many_requests_in_a_minute_fail() {
    // Five client-credentials requests within 10 s; the bound is four.
    let calls: Vec<_> = (0..5).map(|i| cc(i, i * 2000, "m2m")).collect();
    let rec = record(&[], calls);
    let report = rec.check(&Invariants::new(4));
    assert_eq!(
        report.violations,
        vec![Violation::RateExceeded {
            client_id: Some("m2m".into()),
            count: 5,
            bound: 4,
            first: 0,
            last: 4
        }]
    );
    let msg = panics(|| {
        assert_provider_invariants(&rec, &Invariants::new(4));
    });
    assert!(msg.contains("RateExceeded"), "{msg}");
    assert_provider_invariants(&rec, &Invariants::new(5));
}

#[test]
fn the_rate_is_per_client_and_per_sliding_minute() {
    // One request every 20 s for 3 minutes: at most 3 in any 60 s window.
    let mut calls: Vec<_> = (0..10).map(|i| cc(i, i * 20_000, "a")).collect();
    // Another client's burst does not count against "a".
    calls.extend((10..13).map(|i| cc(i, 1000 + i, "b")));
    let report = assert_provider_invariants(&record(&[], calls), &Invariants::new(3));
    assert_eq!(report.max_per_minute[&Some("a".into())], 3);
    assert_eq!(report.max_per_minute[&Some("b".into())], 3);
    assert_eq!(max_in_any_minute(&[t(0), t(59_999), t(60_000)]), 2);
}

#[test]
fn an_incomplete_record_fails() {
    let mut rec = record(&["seed"], chain());
    rec.gaps
        .push("reset_calls() dropped the start of the call log".into());
    let report = rec.check(&Invariants::new(3));
    assert!(matches!(
        &report.violations[..],
        [Violation::IncompleteRecord(_)]
    ));
}

#[test]
fn schedule_bounds() {
    // 2/3 of the lifetime less 5 % jitter, floors 10 % and 1 s.
    assert_eq!(
        min_refresh_gap(Duration::from_secs(3600)),
        Duration::from_secs(2232)
    );
    assert_eq!(
        min_refresh_gap(Duration::from_secs(1)),
        Duration::from_secs(1)
    );
    // ⌊60 s / gap⌋ + 2 (window edges, send-to-arrival variance).
    assert_eq!(scheduled_per_minute(Duration::from_secs(3600)), 2);
    assert_eq!(scheduled_per_minute(Duration::from_secs(60)), 3);
    assert_eq!(scheduled_per_minute(Duration::from_secs(3)), 34);
    assert_eq!(scheduled_per_minute(Duration::from_secs(2)), 50);
    assert_eq!(scheduled_per_minute(Duration::from_secs(1)), 62);
}

// ---- the token server's real log ----------------------------------------------------------------

// Reported losses that end without a refusal (the operator stopped before storing the one
// retry's answer, and reports the loss instead of sending the token a third time).

/// x rotated to y (response lost), the one retry of x accepted inside the overlap window
/// (issuing y2), then nothing: the operator stopped before storing y2.
fn overlap_retry_interrupted() -> Vec<ProviderCall> {
    vec![
        refresh(0, 0, "x", Some("y"), Answer::Issued),
        refresh(1, 100, "x", Some("y2"), Answer::OverlapReuse),
    ]
}

/// x rotated to y (response lost), the one retry of x answered 503 without processing, then
/// nothing.
fn unprocessed_retry_interrupted() -> Vec<ProviderCall> {
    let mut retry = refresh(1, 100, "x", None, Answer::NotProcessed);
    retry.status = Some(503);
    vec![refresh(0, 0, "x", Some("y"), Answer::Issued), retry]
}

fn interrupted(loss: &Loss, retry: u64, replays: &[u64]) {
    assert_eq!(
        loss,
        &Loss {
            client_id: Some(APP.into()),
            token: fingerprint("x"),
            spent_by: 0,
            replays: replays.to_vec(),
            refused_by: retry,
            refused: false,
            revoked: false,
        }
    );
}

#[test]
fn an_interrupted_retry_inside_the_window_matches_a_reported_loss() {
    let report = record(&["x"], overlap_retry_interrupted())
        .check(&Invariants::new(10).overlap_window().lost_response(APP));
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.losses.len(), 1, "{report}");
    interrupted(&report.losses[0], 1, &[]);
    // The window's sanction stays.
    assert_eq!(report.replays[0].sanction, Some(Sanction::OverlapWindow));
}

/// x rotated to y, logged at 2000 ms (its reply lost to a kill), the restarted operator
/// marked its retry and was killed again before sending it; the client's next call (a new
/// seed, z) comes at 5000 ms.
fn abandoned_rotation() -> Vec<ProviderCall> {
    vec![
        refresh(0, 2000, "x", Some("y"), Answer::Issued),
        refresh(1, 5000, "z", Some("z2"), Answer::Issued),
    ]
}

#[test]
fn a_rotation_abandoned_by_two_kills_matches_a_reported_loss() {
    let inv = Invariants::new(10).lost_response(APP);
    // The first kill may come just before the provider logged the request it lost.
    for kills in [[t(2050), t(2900)], [t(1500), t(2900)]] {
        let report = record(&["x"], abandoned_rotation()).check(&inv.clone().kills(&kills));
        assert!(report.violations.is_empty(), "{kills:?}: {report}");
    }
    let report =
        record(&["x"], abandoned_rotation()).check(&inv.clone().kills(&[t(2050), t(2900)]));
    assert_eq!(
        report.losses,
        vec![Loss {
            client_id: Some(APP.into()),
            token: fingerprint("x"),
            spent_by: 0,
            replays: vec![],
            refused_by: 0,
            refused: false,
            revoked: false,
        }]
    );
    // One kill is not enough (its restart would have sent the retry), nor kills after
    // the client's next call, nor one long before the rotation, nor none at all.
    for kills in [
        vec![t(2050)],
        vec![t(2050), t(6000)],
        vec![t(500), t(2900)],
        vec![],
    ] {
        let report = record(&["x"], abandoned_rotation()).check(&inv.clone().kills(&kills));
        assert_eq!(
            report.violations,
            vec![Violation::ReportedLossNotSeen {
                client_id: APP.into(),
                missing: 1
            }],
            "{kills:?}: {report}"
        );
    }
    // A rotation whose token was presented later is no abandoned one.
    let mut calls = abandoned_rotation();
    calls.push(refresh(2, 7000, "y", Some("y2"), Answer::Issued));
    let report = record(&["x"], calls).check(&inv.kills(&[t(2050), t(2900)]));
    assert!(
        report.violations.contains(&Violation::ReportedLossNotSeen {
            client_id: APP.into(),
            missing: 1
        }),
        "{report}"
    );
}

#[test]
fn an_interrupted_retry_inside_the_window_needs_no_report() {
    let report =
        record(&["x"], overlap_retry_interrupted()).check(&Invariants::new(10).overlap_window());
    assert!(report.violations.is_empty(), "{report}");
    assert!(report.losses.is_empty());
}

#[test]
fn an_unprocessed_interrupted_retry_is_a_replay_unless_reported() {
    let rec = record(&["x"], unprocessed_retry_interrupted());
    let report = rec.check(&Invariants::new(10).lost_response(APP));
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.losses.len(), 1, "{report}");
    interrupted(&report.losses[0], 1, &[1]);
    assert_eq!(report.replays[0].sanction, Some(Sanction::ReportedLoss));

    let report = rec.check(&Invariants::new(10));
    assert!(
        matches!(&report.violations[..], [Violation::Replay(r)] if r.call == 1 && r.superseded_by == 0),
        "{report}"
    );
}

#[test]
fn a_pending_or_issued_interrupted_retry_matches_a_reported_loss() {
    for answer in [Answer::Pending, Answer::Issued] {
        let issued = (answer == Answer::Issued).then_some("y2");
        let calls = vec![
            refresh(0, 0, "x", Some("y"), Answer::Issued),
            refresh(1, 100, "x", issued, answer),
        ];
        let report = record(&["x"], calls).check(&Invariants::new(10).lost_response(APP));
        assert!(report.violations.is_empty(), "{report}");
        interrupted(&report.losses[0], 1, &[1]);
    }
}

#[test]
fn a_retry_followed_by_more_of_its_family_is_not_interrupted() {
    let mut calls = overlap_retry_interrupted();
    calls.push(refresh(2, 2100, "y2", Some("y3"), Answer::Issued));
    let report =
        record(&["x"], calls).check(&Invariants::new(10).overlap_window().lost_response(APP));
    assert_eq!(
        report.violations,
        vec![Violation::ReportedLossNotSeen {
            client_id: APP.into(),
            missing: 1
        }],
        "{report}"
    );
    assert!(report.losses.is_empty());
}

#[test]
fn another_clients_later_call_does_not_hide_an_interrupted_retry() {
    let mut other = refresh(2, 2100, "y2", Some("y3"), Answer::Issued);
    other.client_id = Some("other".into());
    let mut calls = unprocessed_retry_interrupted();
    calls.push(other);
    let report = record(&["x"], calls).check(&Invariants::new(10).lost_response(APP));
    assert_eq!(report.losses.len(), 1, "{report}");
    assert!(!report.losses[0].refused);
}

#[test]
fn a_refused_replay_takes_precedence_over_an_interrupted_retry() {
    let calls = vec![
        refresh(0, 0, "x", Some("y"), Answer::Issued),
        refresh(1, 100, "x", None, Answer::SpentRefused { revoked: true }),
    ];
    let report = record(&["x"], calls).check(&Invariants::new(10).lost_response(APP));
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(
        report.losses,
        vec![Loss {
            client_id: Some(APP.into()),
            token: fingerprint("x"),
            spent_by: 0,
            replays: vec![1],
            refused_by: 1,
            refused: true,
            revoked: true,
        }]
    );

    // A refused loss and an interrupted retry in a second family: two declarations, matched
    // refusal first.
    let mut retry = refresh(3, 5100, "s", None, Answer::NotProcessed);
    retry.status = Some(503);
    let mut rec = record(
        &["x"],
        vec![
            refresh(0, 0, "x", Some("y"), Answer::Issued),
            refresh(1, 100, "x", None, Answer::SpentRefused { revoked: true }),
            refresh(2, 5000, "s", Some("s1"), Answer::Issued),
            retry,
        ],
    );
    rec.minted.push((fingerprint("s"), None));
    let report = rec.check(&Invariants::new(10).lost_responses(APP, 2));
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(
        report
            .losses
            .iter()
            .map(|l| (l.refused, l.refused_by))
            .collect::<Vec<_>>(),
        vec![(true, 1), (false, 3)]
    );
    // One declaration: the refusal takes it, the unprocessed retry stays a replay.
    let report = rec.check(&Invariants::new(10).lost_response(APP));
    assert!(
        matches!(&report.violations[..], [Violation::Replay(r)] if r.call == 3),
        "{report}"
    );
}

#[test]
fn an_interrupted_retry_matches_one_loss_only() {
    let report = record(&["x"], unprocessed_retry_interrupted())
        .check(&Invariants::new(10).lost_responses(APP, 2));
    assert_eq!(report.losses.len(), 1, "{report}");
    assert_eq!(
        report.violations,
        vec![Violation::ReportedLossNotSeen {
            client_id: APP.into(),
            missing: 1
        }]
    );
}

fn http() -> reqwest::Client {
    vaultconn_testkit::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

async fn post_refresh(
    http: &reqwest::Client,
    ts: &TokenServer,
    rt: &str,
) -> reqwest::Result<reqwest::Response> {
    http.post(ts.token_url())
        .basic_auth(APP, Some("app-secret"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", rt)])
        .send()
        .await
}

async fn issued(res: reqwest::Response) -> String {
    let body: serde_json::Value = res.json().await.expect("json");
    body["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_owned()
}

#[tokio::test]
async fn token_server_record_of_a_clean_chain_passes() {
    let ts = TokenServer::start(TokenServerConfig::default().with_client(APP, "app-secret"))
        .await
        .unwrap();
    let http = http();
    let mut rt = ts.mint_refresh_token(APP);
    for _ in 0..3 {
        rt = issued(post_refresh(&http, &ts, &rt).await.unwrap()).await;
    }
    let rec = ts.provider_record();
    assert_eq!(rec.calls.len(), 3);
    assert_eq!(
        rec.calls[2].issued.as_deref(),
        Some(fingerprint(&rt).as_str())
    );
    assert_provider_invariants(&rec, &Invariants::new(3));
}

#[tokio::test]
async fn token_server_record_shows_a_lost_response_retry_as_replay_and_revocation() {
    let ts = TokenServer::start(TokenServerConfig::default().with_client(APP, "app-secret"))
        .await
        .unwrap();
    let http = http();
    let seed = ts.mint_refresh_token(APP);
    ts.push_fault(Fault::ResetAfterCommit);
    assert!(post_refresh(&http, &ts, &seed).await.is_err(), "reset");
    let res = post_refresh(&http, &ts, &seed).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(ts.revocations(), 1);

    let rec = ts.provider_record();
    assert_eq!(rec.calls[0].status, None, "the lost response");
    assert!(rec.calls[0].issued.is_some(), "the rotation was committed");
    assert_eq!(rec.calls[1].answer, Answer::SpentRefused { revoked: true });
    let report = rec.check(&Invariants::new(2));
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Replay(r) if r.call == 1 && r.superseded_by == 0)),
        "{report}"
    );
    assert!(
        report.violations.iter().any(|v| matches!(
            v,
            Violation::UnexplainedRevocation {
                by_call: Some(1),
                ..
            }
        )),
        "{report}"
    );

    let report = assert_provider_invariants(&rec, &Invariants::new(2).lost_response(APP));
    assert_eq!(report.losses.len(), 1);
    assert_eq!(report.losses[0].token, fingerprint(&seed));
}

#[tokio::test]
async fn token_server_record_overlap_reuse_and_reset_calls_gap() {
    let ts = TokenServer::start(
        TokenServerConfig::default()
            .with_client(APP, "app-secret")
            .with_overlap(Some(Duration::from_secs(30))),
    )
    .await
    .unwrap();
    let http = http();
    let seed = ts.mint_refresh_token(APP);
    ts.push_fault(Fault::ResetAfterCommit);
    assert!(post_refresh(&http, &ts, &seed).await.is_err());
    let rt = issued(post_refresh(&http, &ts, &seed).await.unwrap()).await;
    issued(post_refresh(&http, &ts, &rt).await.unwrap()).await;
    let rec = ts.provider_record();
    assert_eq!(rec.calls[1].answer, Answer::OverlapReuse);
    assert!(!rec.check(&Invariants::new(3)).violations.is_empty());
    assert_provider_invariants(&rec, &Invariants::new(3).overlap_window());

    ts.reset_calls();
    let report = ts
        .provider_record()
        .check(&Invariants::new(3).overlap_window());
    assert!(
        matches!(&report.violations[..], [Violation::IncompleteRecord(_)]),
        "{report}"
    );
}

#[tokio::test]
async fn token_server_record_marks_a_withheld_refresh_token() {
    let ts = TokenServer::start(TokenServerConfig::default().with_client(APP, "app-secret"))
        .await
        .unwrap();
    let http = http();
    let seed = ts.mint_refresh_token(APP);
    let r1 = issued(post_refresh(&http, &ts, &seed).await.unwrap()).await;
    ts.push_fault(Fault::StripRefreshToken);
    let res = post_refresh(&http, &ts, &r1).await.unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body.get("refresh_token").is_none(), "stripped");
    // The client keeps r1 (RFC 6749 §6); the provider had rotated it: reuse detection.
    assert_eq!(post_refresh(&http, &ts, &r1).await.unwrap().status(), 400);
    assert_eq!(ts.revocations(), 1);

    let rec = ts.provider_record();
    assert_eq!(
        rec.calls.iter().map(|c| c.withheld).collect::<Vec<_>>(),
        vec![false, true, false]
    );
    assert!(rec.calls[1].issued.is_some(), "the rotation was committed");
    let report = assert_provider_invariants(&rec, &Invariants::new(3));
    assert_eq!(report.replays.len(), 1);
    assert_eq!(report.replays[0].sanction, Some(Sanction::Undelivered));
    // Presenting it once more is the client's replay.
    post_refresh(&http, &ts, &r1).await.unwrap();
    let report = ts.provider_record().check(&Invariants::new(4));
    assert!(
        matches!(&report.violations[..], [Violation::Replay(r)] if r.call == 3),
        "{report}"
    );
}
