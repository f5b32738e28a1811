//! Cluster tests of the OAuth token lifecycle against our fault-injecting token server: the real
//! operator process, the real API server, one namespace and one token server per test.
//!
//! Global invariants checked after each test (`assert_invariants`): the stored refresh token is
//! live at the server or the connection shows a specific reason; no token or secret string
//! appears in operator logs, Events or status; and, from the token server's own call log
//! (`provider_invariants`), no refresh token was replayed, no family was revoked unless the test
//! saw the connection report `RefreshResponseLost` (or the provider withheld a rotated token and
//! the connection reports the kept one refused), and no client exceeded the request rate the
//! schedule and the test's fault mode allow (each test derives its bound).
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ResourceQuota, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::objects::*;
use support::operator::ensure_operator;
use support::{test_namespace, wait_for, wait_for_some, TestNs};
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, fingerprint, scheduled_per_minute, Answer, Invariants, Loss,
    Report, Sanction,
};
use vaultconn_testkit::token_server::{
    Fault, FaultBody, GrantEvent, RetryAfter, TokenServer, TokenServerConfig,
};

const CLIENT: &str = "app";
const CLIENT_SECRET: &str = "client-SECRET-value";

async fn server(cfg: TokenServerConfig) -> TokenServer {
    TokenServer::start(cfg.with_client(CLIENT, CLIENT_SECRET))
        .await
        .unwrap()
}

/// The credentials Secret `creds` of the test client, for the client-credentials grant.
async fn client_creds(ns: &TestNs) {
    put_secret(
        ns,
        "creds",
        &[("client_id", CLIENT), ("client_secret", CLIENT_SECRET)],
    )
    .await;
}

/// The credentials Secret `creds` of the test client with the refresh token `rt`.
async fn refresh_creds(ns: &TestNs, rt: &str) {
    put_secret(
        ns,
        "creds",
        &[
            ("client_id", CLIENT),
            ("client_secret", CLIENT_SECRET),
            ("refresh_token", rt),
        ],
    )
    .await;
}

fn cc_spec(ts: &TokenServer, extra: serde_json::Value) -> serde_json::Value {
    let mut oauth2 = json!({"tokenUrl": ts.token_url()});
    if let (Some(o), Some(e)) = (oauth2.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    json!({"type": "oauth2", "credentialsRef": {"name": "creds"}, "oauth2": oauth2})
}

fn rt_spec(ts: &TokenServer) -> serde_json::Value {
    cc_spec(ts, json!({"grantType": "refreshToken"}))
}

async fn access_token(ns: &TestNs, name: &str) -> Option<String> {
    let s = ns.api::<Secret>().get_opt(name).await.unwrap()?;
    data_of(&s).get("access_token").cloned()
}

/// Wait until the generated Secret holds an access token the server considers valid, different
/// from `not`.
async fn valid_token(ns: &TestNs, ts: &TokenServer, name: &str, not: Option<&str>) -> String {
    wait_for_some(WAIT, &format!("{name}: a valid access token"), || async {
        access_token(ns, name)
            .await
            .filter(|t| Some(t.as_str()) != not && ts.is_access_token_valid(t))
    })
    .await
}

/// The stored refresh token, read so that a rotation between reading it and asking the
/// provider about it cannot make a live chain look dead: a dead token counts only if it is
/// still the stored one when read again.
async fn settled_stored_refresh_token(ns: &TestNs, ts: &TokenServer, name: &str) -> Option<String> {
    let mut rt = stored_refresh_token(ns, name).await?;
    for _ in 0..50 {
        if ts.is_refresh_token_live(&rt) {
            return Some(rt);
        }
        let again = stored_refresh_token(ns, name).await?;
        if again == rt {
            return Some(rt);
        }
        rt = again;
    }
    Some(rt)
}

/// The invariants of every test; `secrets` are strings that must never be visible; `provider`
/// is what the token server's record must show (see `provider_invariants`).
async fn assert_invariants(
    ns: &TestNs,
    ts: &TokenServer,
    name: &str,
    secrets: &[String],
    provider: Invariants,
) -> Report {
    let vc = ns.api::<VaultConnection>().get(name).await.unwrap();
    let report = assert_provider_invariants(&ts.provider_record(), &provider);
    // Presentations of a token the client kept because the provider left its rotated
    // successor out of a 200 (`Sanction::Undelivered`), refused with the family revoked.
    let withheld_revocations: Vec<String> = report
        .replays
        .iter()
        .filter(|r| {
            r.sanction == Some(Sanction::Undelivered)
                && r.answer == (Answer::SpentRefused { revoked: true })
        })
        .map(|r| r.token.clone())
        .collect();
    if let Some(rt) = settled_stored_refresh_token(ns, ts, name).await {
        // A dead stored refresh token is excused only by the one loss the test provoked and
        // declared (`lost_response`, which the provider record must match exactly) and the
        // connection reports as such, or by the provider withholding its successor (the
        // record shows it) and the connection reporting the refusal — never by any `Failed`
        // phase.
        let declared_loss = provider.lost_responses.get(CLIENT).copied().unwrap_or(0) > 0;
        let withheld = withheld_revocations.contains(&fingerprint(&rt));
        assert!(
            ts.is_refresh_token_live(&rt)
                || (declared_loss && reason(&vc) == "RefreshResponseLost")
                || (withheld && reason(&vc) == "RefreshTokenRejected"),
            "the stored refresh token is dead ({:?} at the provider) but the test declared no \
             lost response and the connection says {:?}",
            ts.refresh_token_state(&rt),
            reason(&vc)
        );
    }
    // Said in so many words: the provider revoked exactly as many families as the test
    // declared lost responses (none unless it provoked one), plus those it revoked because
    // it had withheld a rotated token (none unless the test withheld one).
    let declared: usize = provider.lost_responses.values().sum();
    assert_eq!(
        ts.revocations() as usize,
        declared + withheld_revocations.len(),
        "families revoked by reuse detection vs the lost responses the test declared and the \
         rotated tokens the provider withheld"
    );
    let text = visible_text(ns).await;
    let mut all: Vec<String> = secrets.to_vec();
    all.push(CLIENT_SECRET.into());
    for c in ts.calls() {
        if let Some(o) = c.outcome {
            all.extend(o.access_token);
            all.extend(o.refresh_token);
        }
        all.extend(c.refresh_token);
    }
    for s in all.iter().filter(|s| s.len() >= 8) {
        assert!(
            !text.contains(s.as_str()),
            "a token or secret leaked into logs/Events/status"
        );
    }
    // The Secret workloads mount never holds the refresh token or the client secret.
    if let Some(out) = ns.api::<Secret>().get_opt(name).await.unwrap() {
        let d = data_of(&out);
        assert!(!d.contains_key("refresh_token") && !d.contains_key("client_secret"));
        assert!(!d.values().any(|v| v == CLIENT_SECRET));
    }
    report
}

/// The loss the provider saw for a `RefreshResponseLost` of `CLIENT`'s connection: the seed
/// spent by call 0 (its response lost), then presented again by `replays`, the last refused
/// with the family revoked.
fn seed_lost_then_refused(seed: &str, replays: Vec<u64>) -> Loss {
    Loss {
        client_id: Some(CLIENT.into()),
        token: vaultconn_testkit::provider_invariants::fingerprint(seed),
        spent_by: 0,
        refused_by: *replays.last().expect("at least the retry"),
        replays,
        refused: true,
        revoked: true,
    }
}

#[tokio::test]
async fn client_credentials_issue_and_schedule() {
    ensure_operator().await;
    let ns = test_namespace("cc").await;
    let ts = server(TokenServerConfig::default().with_ttl(Duration::from_secs(3600))).await;
    client_creds(&ns).await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({"scopes": ["read", "write"], "audience": "https://api.example", "extraParams": {"organization": "org1"}}))).await;
    let token = valid_token(&ns, &ts, "api", None).await;
    let vc = ready(&ns, "api").await;
    let out = data_of(&ns.api::<Secret>().get("api").await.unwrap());
    assert_eq!(
        out.keys().cloned().collect::<Vec<_>>(),
        vec![
            "access_token",
            "authorization",
            "expires_at",
            "scope",
            "token_type"
        ]
    );
    assert_eq!(out["authorization"], format!("Bearer {token}"));
    assert_eq!(out["scope"], "read write");
    let st = vc.status.clone().unwrap();
    assert_eq!(st.state_secret_name.as_deref(), Some("api-vaultconn-state"));
    assert_eq!(st.expires_at.as_deref(), Some(out["expires_at"].as_str()));
    // Next refresh by 2/3 of the 1 h lifetime and not before 10 % (the connection's phase within
    // that window, see `oauth::schedule`), not on every reconcile.
    let last: jiff::Timestamp = st.last_refresh_time.as_deref().unwrap().parse().unwrap();
    let next: jiff::Timestamp = st.next_refresh_time.as_deref().unwrap().parse().unwrap();
    let after = next.duration_since(last).as_secs();
    assert!(
        (360..=2413).contains(&after),
        "next refresh {after}s after issue"
    );
    let calls = ts.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(calls[0].audience.as_deref(), Some("https://api.example"));
    assert_eq!(calls[0].scope.as_deref(), Some("read write"));
    assert_eq!(
        calls[0]
            .extra_params
            .get("organization")
            .map(String::as_str),
        Some("org1")
    );
    // Re-reconciles (a touch of the credentials Secret) do not call the token endpoint.
    force_reconcile(&ns, "creds", "api").await;
    assert_eq!(ts.call_count(), 1);
    // One issue: a 1 h token is not due again within the minute, and reconciles do not ask.
    assert_invariants(&ns, &ts, "api", &[token], Invariants::new(1)).await;
}

#[tokio::test]
async fn client_auth_post_and_form_encoded_basic() {
    ensure_operator().await;
    let ns = test_namespace("auth").await;
    let ts = server(TokenServerConfig::default().with_client("m2m special/1", "s3cr:et+%&")).await;
    client_creds(&ns).await;
    put_secret(
        &ns,
        "special",
        &[
            ("client_id", "m2m special/1"),
            ("client_secret", "s3cr:et+%&"),
        ],
    )
    .await;
    apply_vc(
        &ns,
        "post",
        cc_spec(&ts, json!({"clientAuthMethod": "post"})),
    )
    .await;
    let mut special = cc_spec(&ts, json!({}));
    special["credentialsRef"]["name"] = json!("special");
    apply_vc(&ns, "basic", special).await;
    valid_token(&ns, &ts, "post", None).await;
    valid_token(&ns, &ts, "basic", None).await;
    use vaultconn_testkit::token_server::AuthMethod;
    let calls = ts.calls();
    assert!(calls
        .iter()
        .any(|c| c.client_id.as_deref() == Some(CLIENT)
            && c.auth_method == AuthMethod::ClientSecretPost));
    assert!(calls
        .iter()
        .any(|c| c.client_id.as_deref() == Some("m2m special/1")
            && c.auth_method == AuthMethod::ClientSecretBasic));
    assert!(calls.iter().all(|c| c.auth_method != AuthMethod::Both));
    // One issue per connection (each its own client id), 1 h tokens.
    assert_invariants(&ns, &ts, "post", &[], Invariants::new(1)).await;
}

#[tokio::test]
async fn wrong_client_secret_fails_without_hot_loop_and_recovers_when_fixed() {
    ensure_operator().await;
    let ns = test_namespace("badclient").await;
    let ts = server(TokenServerConfig::default()).await;
    put_secret(
        &ns,
        "creds",
        &[("client_id", CLIENT), ("client_secret", "wrong-SECRET-1")],
    )
    .await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    let vc = with_reason(&ns, "api", "InvalidClient").await;
    assert_eq!(phase(&vc), Some(Phase::Failed));
    assert!(
        message(&vc).contains("client_id/client_secret"),
        "{}",
        message(&vc)
    );
    assert_eq!(ts.call_count(), 1);
    // Forced reconciles without a change do not retry the token endpoint.
    for _ in 0..3 {
        force_reconcile(&ns, "creds", "api").await;
    }
    assert_eq!(ts.call_count(), 1, "retried without any change");
    client_creds(&ns).await;
    valid_token(&ns, &ts, "api", None).await;
    ready(&ns, "api").await;
    assert_eq!(ts.call_count(), 2);
    // The refused attempt (not retried without a change) and the one after the fix.
    assert_invariants(
        &ns,
        &ts,
        "api",
        &["wrong-SECRET-1".into()],
        Invariants::new(2),
    )
    .await;
}

#[tokio::test]
async fn refresh_token_rotation_through_several_cycles() {
    ensure_operator().await;
    let ns = test_namespace("rotate").await;
    let ts = server(
        TokenServerConfig::default()
            .with_rotation(true)
            .with_ttl(Duration::from_secs(3)),
    )
    .await;
    let seed = ts.mint_refresh_token(CLIENT);
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    let mut token = valid_token(&ns, &ts, "crm", None).await;
    let mut seen = vec![seed.clone(), token.clone()];
    for _ in 0..3 {
        token = valid_token(&ns, &ts, "crm", Some(&token)).await;
        seen.push(token.clone());
    }
    let rt = stored_refresh_token(&ns, "crm").await.unwrap();
    assert_ne!(rt, seed, "the rotated refresh token is stored");
    assert!(ts.is_refresh_token_live(&rt));
    assert!(!ts.is_refresh_token_live(&seed));
    // Every refresh spent the token the previous one issued: no replay, no parallel refresh.
    let calls = ts.calls();
    for pair in calls.windows(2) {
        assert_eq!(
            pair[1].refresh_token,
            pair[0]
                .outcome
                .as_ref()
                .and_then(|o| o.refresh_token.clone()),
            "each refresh uses the newest token"
        );
    }
    assert_eq!(ts.max_concurrent_per_refresh_family(), 1);
    seen.push(rt);
    // 3 s tokens, no faults: the schedule alone (34 a minute).
    let bound = scheduled_per_minute(Duration::from_secs(3));
    assert_invariants(&ns, &ts, "crm", &seen, Invariants::new(bound)).await;
}

#[tokio::test]
async fn rotation_off_and_missing_refresh_token_keep_the_current_one() {
    ensure_operator().await;
    let ns = test_namespace("norotate").await;
    let ts = server(
        TokenServerConfig::default()
            .with_rotation(false)
            .with_ttl(Duration::from_secs(2)),
    )
    .await;
    let seed = ts.mint_refresh_token(CLIENT);
    refresh_creds(&ns, &seed).await;
    ts.push_fault(Fault::StripRefreshToken);
    ts.push_fault(Fault::StringExpiresIn);
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    let t1 = valid_token(&ns, &ts, "crm", None).await;
    let t2 = valid_token(&ns, &ts, "crm", Some(&t1)).await;
    valid_token(&ns, &ts, "crm", Some(&t2)).await;
    assert_eq!(
        stored_refresh_token(&ns, "crm").await.as_deref(),
        Some(seed.as_str()),
        "the refresh token is retained, not blanked"
    );
    assert!(ts
        .calls()
        .iter()
        .all(|c| c.refresh_token.as_deref() == Some(seed.as_str())));
    // 2 s tokens; the faults strip fields from successes and cause no retries.
    let bound = scheduled_per_minute(Duration::from_secs(2));
    assert_invariants(&ns, &ts, "crm", &[seed, t1, t2], Invariants::new(bound)).await;
}

/// Rotation on, but the provider leaves the new refresh token out of a 200: it considers the
/// token it was sent spent, while the operator keeps that one (RFC 6749 §6: no `refresh_token`
/// in the response means the client keeps the old one). The next refresh presents the kept
/// token; the provider's reuse detection revokes the family. The operator must have presented
/// exactly the kept token (not nothing, not the spent seed), once, and report the refusal with
/// a specific reason and what to do, without asking again.
#[tokio::test]
async fn rotation_on_and_missing_refresh_token_reports_the_kept_token_refused() {
    ensure_operator().await;
    let ns = test_namespace("withheld").await;
    let ts = server(
        TokenServerConfig::default()
            .with_rotation(true)
            .with_ttl(Duration::from_secs(3)),
    )
    .await;
    let seed = ts.mint_refresh_token(CLIENT);
    // The first refresh rotates and delivers (the fault only sends `expires_in` as a string,
    // which the operator accepts), so the kept token is the chain's, not the seed; the second
    // rotates and withholds the new token.
    ts.push_fault(Fault::StringExpiresIn);
    ts.push_fault(Fault::StripRefreshToken);
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    let vc = with_reason(&ns, "crm", "RefreshTokenRejected").await;
    let msg = message(&vc);
    assert!(
        msg.contains("new refresh_token in the credentials Secret"),
        "says what to do: {msg}"
    );
    assert_eq!(phase(&vc), Some(Phase::Failed));

    // What the provider saw: seed → r1 (delivered), r1 → r2 (withheld), r1 again (refused,
    // family revoked). r2 never reached the operator, so it was never presented.
    let calls = ts.calls();
    assert_eq!(calls.len(), 3, "{calls:#?}");
    let issued = |i: usize| {
        calls[i]
            .outcome
            .as_ref()
            .and_then(|o| o.refresh_token.clone())
            .expect("the provider rotated")
    };
    let (r1, r2) = (issued(0), issued(1));
    // Compared as fingerprints: a failure message shows no token.
    let sent = |i: usize| calls[i].refresh_token.as_deref().map(fingerprint);
    assert_eq!(sent(0), Some(fingerprint(&seed)));
    assert_eq!(sent(1), Some(fingerprint(&r1)));
    assert_eq!(
        sent(2),
        Some(fingerprint(&r1)),
        "the next refresh presents the kept token (seed {}, r1 {})",
        fingerprint(&seed),
        fingerprint(&r1)
    );
    assert_eq!(
        calls[2].outcome.as_ref().and_then(|o| o.event),
        Some(GrantEvent::ReuseDetected)
    );
    assert!(calls
        .iter()
        .all(|c| c.refresh_token.as_deref() != Some(r2.as_str())));
    assert_eq!(ts.revocations(), 1);
    assert_eq!(
        stored_refresh_token(&ns, "crm")
            .await
            .as_deref()
            .map(fingerprint),
        Some(fingerprint(&r1)),
        "the kept refresh token is stored, not dropped"
    );
    // No hot loop: a refused token is not sent again without a change.
    force_reconcile(&ns, "creds", "crm").await;
    assert_eq!(ts.call_count(), 3, "asked again without a change");
    // Three requests in all; the one replay is the provider's own doing (it withheld r2).
    let report =
        assert_invariants(&ns, &ts, "crm", &[seed, r1.clone(), r2], Invariants::new(3)).await;
    assert_eq!(report.replays.len(), 1, "{report}");
    assert_eq!(report.replays[0].call, calls[2].seq);
    assert_eq!(report.replays[0].token, fingerprint(&r1));
    assert_eq!(report.replays[0].sanction, Some(Sanction::Undelivered));
}

#[tokio::test]
async fn missing_expires_in_uses_a_conservative_default() {
    ensure_operator().await;
    let ns = test_namespace("noexp").await;
    let ts = server(TokenServerConfig::default()).await;
    ts.push_fault(Fault::StripExpiresIn);
    client_creds(&ns).await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    valid_token(&ns, &ts, "api", None).await;
    let vc = ready(&ns, "api").await;
    let st = vc.status.unwrap();
    let last: jiff::Timestamp = st.last_refresh_time.as_deref().unwrap().parse().unwrap();
    let exp: jiff::Timestamp = st.expires_at.as_deref().unwrap().parse().unwrap();
    assert_eq!(
        exp.duration_since(last).as_secs(),
        300,
        "default lifetime of 5 minutes"
    );
    // One issue: the assumed 5 min lifetime is not due again within the minute.
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(1));
}

#[tokio::test]
async fn revoked_refresh_token_is_terminal_until_reseeded() {
    ensure_operator().await;
    let ns = test_namespace("revoked").await;
    let ts = server(TokenServerConfig::default()).await;
    let seed = ts.mint_refresh_token(CLIENT);
    ts.revoke_family_of(&seed);
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    let vc = with_reason(&ns, "crm", "RefreshTokenRejected").await;
    assert!(
        message(&vc).contains("new refresh_token"),
        "{}",
        message(&vc)
    );
    assert_eq!(ts.call_count(), 1);
    force_reconcile(&ns, "creds", "crm").await;
    assert_eq!(ts.call_count(), 1, "no retry without a change");
    // Re-seeding with a new refresh token recovers.
    let fresh = ts.mint_refresh_token(CLIENT);
    refresh_creds(&ns, &fresh).await;
    valid_token(&ns, &ts, "crm", None).await;
    ready(&ns, "crm").await;
    assert_eq!(
        ts.calls().last().unwrap().refresh_token.as_deref(),
        Some(fresh.as_str())
    );
    // The test revoked the seed's family itself (the token server does not count that as
    // reuse detection): one refused request, then one with the re-seed; no replay.
    assert_invariants(&ns, &ts, "crm", &[seed, fresh], Invariants::new(2)).await;
}

#[tokio::test]
async fn rate_limit_retry_after_is_honoured() {
    ensure_operator().await;
    let ns = test_namespace("ratelimit").await;
    let ts = server(TokenServerConfig::default()).await;
    // Each Retry-After is well above what the backoff alone waits at that attempt (1 s, then
    // 2 s, each less up to 20 %: `schedule::backoff`), so a gap this long shows it honoured.
    // The 429 comes first (failure 1: ≤ 1 s without it).
    let delta = Duration::from_secs(3);
    ts.push_fault(Fault::Status {
        code: 429,
        retry_after: Some(RetryAfter::Seconds(delta.as_secs())),
        body: FaultBody::OAuthError("slow_down"),
    });
    // The 503 second (failure 2: ≤ 2 s without it), with a date `date_in` after it is sent.
    // HTTP-dates have whole seconds, rounded down, so the operator is told at least
    // `date_in - 1 s` counted from the response, which comes after the request's arrival.
    let date_in = Duration::from_secs(6);
    ts.push_fault(Fault::Status {
        code: 503,
        retry_after: Some(RetryAfter::HttpDateIn(date_in)),
        body: FaultBody::Html,
    });
    client_creds(&ns).await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    let vc = vc_where(&ns, "api", "a failed attempt recorded", |v| {
        v.status
            .as_ref()
            .and_then(|s| s.failed_refresh_attempts)
            .is_some()
    })
    .await;
    assert_eq!(phase(&vc), Some(Phase::Failed), "no valid token yet");
    assert!(!message(&vc).contains("<html"), "no HTML in status");
    valid_token(&ns, &ts, "api", None).await;
    ready(&ns, "api").await;
    let calls = ts.calls();
    assert_eq!(calls.len(), 3);
    let gap1 = calls[1].at.duration_since(calls[0].at).unwrap();
    let gap2 = calls[2].at.duration_since(calls[1].at).unwrap();
    assert!(
        gap1 >= delta,
        "429 Retry-After: {} not honoured ({gap1:?})",
        delta.as_secs()
    );
    assert!(
        gap2 >= date_in - Duration::from_secs(1),
        "503 Retry-After HTTP-date {}s ahead not honoured ({gap2:?})",
        date_in.as_secs()
    );
    assert!(
        gap1 < Duration::from_secs(10) && gap2 < Duration::from_secs(10),
        "retries are capped"
    );
    // The first attempt and one retry after each of the two faults.
    assert_invariants(&ns, &ts, "api", &[], Invariants::new(3)).await;
}

#[tokio::test]
async fn reset_before_processing_is_retried_and_nothing_is_spent() {
    ensure_operator().await;
    let ns = test_namespace("resetbefore").await;
    let ts = server(TokenServerConfig::default()).await;
    let seed = ts.mint_refresh_token(CLIENT);
    ts.push_fault(Fault::ResetBeforeProcessing);
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    valid_token(&ns, &ts, "crm", None).await;
    ready(&ns, "crm").await;
    assert!(ts
        .calls()
        .iter()
        .all(|c| c.refresh_token.as_deref() == Some(seed.as_str())));
    // The reset attempt and its one retry; 1 h tokens.
    assert_invariants(&ns, &ts, "crm", &[seed], Invariants::new(2)).await;
}

#[tokio::test]
async fn lost_response_without_overlap_is_reported_not_hidden() {
    ensure_operator().await;
    let ns = test_namespace("lost").await;
    let ts = server(TokenServerConfig::default().with_rotation(true)).await;
    let seed = ts.mint_refresh_token(CLIENT);
    ts.push_fault(Fault::ResetAfterCommit);
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    let vc = with_reason(&ns, "crm", "RefreshResponseLost").await;
    assert!(message(&vc).contains("overlap"), "{}", message(&vc));
    assert_eq!(ts.call_count(), 2, "exactly one retry with the same token");
    // No further retries, even on forced reconciles.
    force_reconcile(&ns, "creds", "crm").await;
    assert_eq!(ts.call_count(), 2);
    // Provoked on purpose: exactly one loss, reported — the seed spent by call 0 (reset), its
    // one retry (call 1) refused with the family revoked; two requests.
    let report = assert_invariants(
        &ns,
        &ts,
        "crm",
        std::slice::from_ref(&seed),
        Invariants::new(2).lost_response(CLIENT),
    )
    .await;
    assert_eq!(report.losses, vec![seed_lost_then_refused(&seed, vec![1])]);
}

#[tokio::test]
async fn lost_response_with_overlap_window_recovers() {
    ensure_operator().await;
    let ns = test_namespace("overlap").await;
    let ts = server(
        TokenServerConfig::default()
            .with_rotation(true)
            .with_overlap(Some(Duration::from_secs(30)))
            .with_ttl(Duration::from_secs(3)),
    )
    .await;
    let seed = ts.mint_refresh_token(CLIENT);
    ts.push_fault(Fault::ResetAfterCommit);
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    let t1 = valid_token(&ns, &ts, "crm", None).await;
    // The chain continues past the lost response.
    valid_token(&ns, &ts, "crm", Some(&t1)).await;
    let rt = stored_refresh_token(&ns, "crm").await.unwrap();
    assert!(ts.is_refresh_token_live(&rt));
    // 3 s tokens (34 a minute) plus the one retry of the reset attempt, which the provider
    // accepts inside its window.
    let bound = scheduled_per_minute(Duration::from_secs(3)) + 1;
    let report = assert_invariants(
        &ns,
        &ts,
        "crm",
        &[seed, t1],
        Invariants::new(bound).overlap_window(),
    )
    .await;
    assert_eq!(report.replays.len(), 1, "only the retry reused a token");
}

#[tokio::test]
async fn scope_change_and_refresh_annotation_reissue_right_away() {
    ensure_operator().await;
    let ns = test_namespace("reissue").await;
    let ts = server(TokenServerConfig::default()).await;
    client_creds(&ns).await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({"scopes": ["read"]}))).await;
    let t1 = valid_token(&ns, &ts, "api", None).await;
    apply_vc(
        &ns,
        "api",
        cc_spec(&ts, json!({"scopes": ["read", "admin"]})),
    )
    .await;
    let t2 = valid_token(&ns, &ts, "api", Some(&t1)).await;
    assert_eq!(
        ts.calls().last().unwrap().scope.as_deref(),
        Some("read admin")
    );
    let patch = json!({"metadata": {"annotations": {"vaultconn.dev/refresh-requested-at": "1"}}});
    ns.api::<VaultConnection>()
        .patch("api", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let t3 = valid_token(&ns, &ts, "api", Some(&t2)).await;
    assert_eq!(ts.call_count(), 3);
    // The same annotation value again does not refresh again.
    force_reconcile(&ns, "creds", "api").await;
    assert_eq!(ts.call_count(), 3);
    // The first issue, the scope change and the annotation; 1 h tokens.
    assert_invariants(&ns, &ts, "api", &[t1, t2, t3], Invariants::new(3)).await;
}

#[tokio::test]
async fn unwritable_secret_means_no_token_request() {
    ensure_operator().await;
    let ns = test_namespace("quota").await;
    let ts = server(TokenServerConfig::default()).await;
    client_creds(&ns).await;
    // A Secret quota that is used up (no resourcequota controller runs here, so the usage we
    // write stays): the API server refuses every new Secret with 403, which the operator's dry
    // run must see before any token is requested.
    let quota: ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "no-secrets"}, "spec": {"hard": {"secrets": "1"}}}),
    )
    .unwrap();
    let quotas = ns.api::<ResourceQuota>();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    let used = json!({"status": {"hard": {"secrets": "1"}, "used": {"secrets": "1"}}});
    quotas
        .patch_status("no-secrets", &PatchParams::default(), &Patch::Merge(&used))
        .await
        .unwrap();
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    let vc = with_reason(&ns, "api", "SecretNotWritable").await;
    assert!(
        message(&vc).contains("no token was requested"),
        "{}",
        message(&vc)
    );
    assert_eq!(ts.call_count(), 0);
    ns.api::<ResourceQuota>()
        .delete("no-secrets", &DeleteParams::default())
        .await
        .unwrap();
    valid_token(&ns, &ts, "api", None).await;
    assert_eq!(ts.call_count(), 1);
    // Nothing while the write was refused, one issue after.
    assert_invariants(&ns, &ts, "api", &[], Invariants::new(1)).await;
}

#[tokio::test]
async fn tiny_ttl_refreshes_are_bounded_and_never_parallel() {
    ensure_operator().await;
    let ns = test_namespace("tinyttl").await;
    let ts = server(TokenServerConfig::default().with_ttl(Duration::from_secs(1))).await;
    client_creds(&ns).await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    valid_token(&ns, &ts, "api", None).await;
    let start = Instant::now();
    let target = ts.call_count() + 5;
    wait_for(WAIT, "five more refreshes", || async {
        ts.call_count() >= target
    })
    .await;
    // A 1 s token is refreshed at the floor (1 s after issue): five refreshes take ≥ ~5 s, so
    // even a tiny TTL cannot turn into a hot loop; and they do keep happening.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(3500),
        "5 refreshes in {elapsed:?}: too fast"
    );
    assert_eq!(ts.max_concurrent_per_client(), 1);
    // 1 s tokens are refreshed at the 1 s floor: 62 in any minute at most.
    let bound = scheduled_per_minute(Duration::from_secs(1));
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(bound));
}

#[tokio::test]
async fn broken_json_and_huge_bodies_are_retried_for_client_credentials() {
    ensure_operator().await;
    let ns = test_namespace("brokenjson").await;
    let ts = server(TokenServerConfig::default()).await;
    ts.push_fault(Fault::BrokenJson { after_commit: true });
    ts.push_fault(Fault::HugeBody {
        bytes: 10 * 1024 * 1024,
    });
    client_creds(&ns).await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    let vc = vc_where(&ns, "api", "the broken response recorded", |v| {
        v.status
            .as_ref()
            .and_then(|s| s.last_failure_reason.as_deref())
            == Some("UnparseableTokenResponse")
    })
    .await;
    assert!(
        !message(&vc).contains('{'),
        "no response body in status: {}",
        message(&vc)
    );
    valid_token(&ns, &ts, "api", None).await;
    ready(&ns, "api").await;
    assert_eq!(ts.call_count(), 3);
    // The first attempt and a backed-off retry after each broken response.
    assert_invariants(&ns, &ts, "api", &[], Invariants::new(3)).await;
}

#[tokio::test]
async fn broken_json_after_rotation_is_an_unknown_outcome() {
    ensure_operator().await;
    let ns = test_namespace("brokenrt").await;
    let ts = server(
        TokenServerConfig::default()
            .with_rotation(true)
            .with_overlap(Some(Duration::from_secs(30))),
    )
    .await;
    let seed = ts.mint_refresh_token(CLIENT);
    ts.push_fault(Fault::BrokenJson { after_commit: true });
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    // The retry with the same token is answered inside the provider's overlap window.
    valid_token(&ns, &ts, "crm", None).await;
    ready(&ns, "crm").await;
    assert_eq!(ts.call_count(), 2, "one retry with the same refresh token");
    assert!(ts
        .calls()
        .iter()
        .all(|c| c.refresh_token.as_deref() == Some(seed.as_str())));
    let rt = stored_refresh_token(&ns, "crm").await.unwrap();
    assert!(ts.is_refresh_token_live(&rt));
    // The broken reply and its one retry, inside the window the test configured.
    assert_invariants(
        &ns,
        &ts,
        "crm",
        &[seed],
        Invariants::new(2).overlap_window(),
    )
    .await;
}

#[tokio::test]
async fn slow_reply_after_rotation_without_overlap_is_reported() {
    ensure_operator().await;
    let ns = test_namespace("slow").await;
    let ts = server(TokenServerConfig::default().with_rotation(true)).await;
    let seed = ts.mint_refresh_token(CLIENT);
    // Longer than the operator's 3 s token timeout (see support/operator.rs).
    ts.push_fault(Fault::SlowReply {
        delay: Duration::from_secs(6),
        after_commit: true,
    });
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    with_reason(&ns, "crm", "RefreshResponseLost").await;
    assert_eq!(ts.call_count(), 2);
    // Provoked on purpose: the seed spent by call 0 (reply too slow), its one retry refused.
    let report = assert_invariants(
        &ns,
        &ts,
        "crm",
        std::slice::from_ref(&seed),
        Invariants::new(2).lost_response(CLIENT),
    )
    .await;
    assert_eq!(report.losses, vec![seed_lost_then_refused(&seed, vec![1])]);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    ensure_operator().await;
    let ns = test_namespace("redirect").await;
    let ts = server(TokenServerConfig::default()).await;
    let other = server(TokenServerConfig::default()).await;
    ts.set_sticky_fault(Some(Fault::Redirect {
        location: other.token_url(),
    }));
    client_creds(&ns).await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    let vc = with_reason(&ns, "api", "TokenEndpointRedirected").await;
    assert_eq!(phase(&vc), Some(Phase::Failed));
    assert_eq!(
        other.call_count(),
        0,
        "the redirect target was never called"
    );
    assert_eq!(ts.call_count(), 1, "a redirect is terminal: no retries");
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(1));
    assert_provider_invariants(&other.provider_record(), &Invariants::new(0));
}

/// Rotation issue, scenario 1 (fault matrix row 38): a re-seed the provider rejects — a person,
/// or GitOps self-heal re-applying an old seed — is sent once and ends in an explained terminal
/// state. It is not mistaken for "another writer rotated the token" (which used to requeue in
/// 1 s forever), and the chain's own token, still valid, is kept.
#[tokio::test]
async fn rejected_reseed_is_sent_once_and_keeps_the_chain_token() {
    ensure_operator().await;
    let ns = test_namespace("badseed").await;
    let ts = server(TokenServerConfig::default().with_rotation(true)).await;
    let seed = ts.mint_refresh_token(CLIENT);
    let creds = |rt: &str| {
        [
            ("client_id", CLIENT.to_string()),
            ("client_secret", CLIENT_SECRET.to_string()),
            ("refresh_token", rt.to_string()),
        ]
    };
    let put = |rt: String| {
        let ns = &ns;
        async move {
            let data = creds(&rt);
            let pairs: Vec<(&str, &str)> = data.iter().map(|(k, v)| (*k, v.as_str())).collect();
            put_secret(ns, "creds", &pairs).await;
        }
    };
    put(seed.clone()).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    valid_token(&ns, &ts, "crm", None).await;
    let chain = stored_refresh_token(&ns, "crm").await.unwrap();
    assert_ne!(chain, seed);

    let bad = "never-issued-SECRET-reseed".to_string();
    put(bad.clone()).await;
    let vc = with_reason(&ns, "crm", "RefreshTokenRejected").await;
    assert!(message(&vc).contains("refresh_token"), "{}", message(&vc));
    force_reconcile(&ns, "creds", "crm").await;
    let sent_bad = |ts: &TokenServer| {
        ts.calls()
            .iter()
            .filter(|c| c.refresh_token.as_deref() == Some(bad.as_str()))
            .count()
    };
    assert_eq!(sent_bad(&ts), 1, "the rejected seed was sent exactly once");
    assert_eq!(
        stored_refresh_token(&ns, "crm").await.as_deref(),
        Some(chain.as_str()),
        "the chain token is kept"
    );
    assert!(ts.is_refresh_token_live(&chain));
    // Restoring the original (long spent) seed continues the chain; the seed is not replayed.
    put(seed.clone()).await;
    ready(&ns, "crm").await;
    let annotate =
        json!({"metadata": {"annotations": {"vaultconn.dev/refresh-requested-at": "1"}}});
    ns.api::<VaultConnection>()
        .patch("crm", &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .unwrap();
    wait_for(
        WAIT,
        "the forced refresh to spend the chain token",
        || async {
            ts.calls()
                .iter()
                .any(|c| c.refresh_token.as_deref() == Some(chain.as_str()))
        },
    )
    .await;
    ready(&ns, "crm").await;
    let last = ts.calls().last().cloned().unwrap();
    assert_eq!(
        last.refresh_token.as_deref(),
        Some(chain.as_str()),
        "the chain token is spent"
    );
    let seed_sends = ts
        .calls()
        .iter()
        .filter(|c| c.refresh_token.as_deref() == Some(seed.as_str()))
        .count();
    assert_eq!(
        seed_sends, 1,
        "the original seed was sent once, at the start"
    );
    let new_chain = stored_refresh_token(&ns, "crm").await.unwrap();
    // The seed, the rejected re-seed, the forced refresh; 1 h tokens. The test puts the spent
    // seed back by hand, but the operator must not send it, so it is not declared
    // `hand_reseeded`: sending it would be a replay.
    assert_invariants(
        &ns,
        &ts,
        "crm",
        &[seed, chain, bad, new_chain],
        Invariants::new(3),
    )
    .await;
}

/// Rotation issue, scenario 7 (fault matrix row 43): a credentials Secret that carries a current
/// `access_token` + `expires_at` is used as it is; no token request until it is due.
#[tokio::test]
async fn seeded_access_token_is_used_until_due() {
    ensure_operator().await;
    let ns = test_namespace("seedat").await;
    let ts = server(TokenServerConfig::default().with_rotation(true)).await;
    let seed = ts.mint_refresh_token(CLIENT);
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let expires = format!("{expires:.0}");
    put_secret(
        &ns,
        "creds",
        &[
            ("client_id", CLIENT),
            ("client_secret", CLIENT_SECRET),
            ("refresh_token", &seed),
            ("access_token", "seeded-access-SECRET"),
            ("expires_at", &expires),
        ],
    )
    .await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    let vc = ready(&ns, "crm").await;
    assert_eq!(
        access_token(&ns, "crm").await.as_deref(),
        Some("seeded-access-SECRET")
    );
    assert_eq!(
        vc.status.as_ref().and_then(|s| s.expires_at.clone()),
        Some(expires)
    );
    force_reconcile(&ns, "creds", "crm").await;
    assert_eq!(ts.call_count(), 0, "the provider saw no request");
    assert!(ts.is_refresh_token_live(&seed));
    assert_invariants(
        &ns,
        &ts,
        "crm",
        &[seed, "seeded-access-SECRET".into()],
        // Not a single request: the seeded token is not due.
        Invariants::new(0),
    )
    .await;
}

/// Rotation issue, scenario 6 (fault matrix row 42): a provider whose every 200 lacks
/// `access_token` but carries a rotated refresh token. Each token is kept (never replayed), and
/// the attempts count and back off instead of rotating at ~1 Hz.
#[tokio::test]
async fn broken_200s_carrying_refresh_tokens_back_off() {
    ensure_operator().await;
    let ns = test_namespace("salvage").await;
    let ts = server(TokenServerConfig::default().with_rotation(true)).await;
    ts.set_sticky_fault(Some(Fault::StripAccessToken {
        hold: Duration::ZERO,
    }));
    let seed = ts.mint_refresh_token(CLIENT);
    refresh_creds(&ns, &seed).await;
    apply_vc(&ns, "crm", rt_spec(&ts)).await;
    wait_for(Duration::from_secs(40), "four token requests", || async {
        ts.call_count() >= 4
    })
    .await;
    let calls = ts.calls();
    // Backoff of 1 s doubling (less up to 20 % jitter): at least 0.8 + 1.6 + 3.2 s between the
    // first and the fourth request. A fixed 1 s requeue takes about 3 s.
    let span = calls[3].at.duration_since(calls[0].at).unwrap();
    assert!(
        span >= Duration::from_millis(5600),
        "4 requests in {span:?}"
    );
    for pair in calls.windows(2) {
        assert_eq!(
            pair[1].refresh_token,
            pair[0]
                .outcome
                .as_ref()
                .and_then(|o| o.refresh_token.clone()),
            "each request spends the token the previous one issued"
        );
    }
    let vc = vc_where(&ns, "crm", "the failures counted", |v| {
        v.status
            .as_ref()
            .and_then(|s| s.failed_refresh_attempts)
            .is_some_and(|n| n >= 2)
    })
    .await;
    assert_eq!(
        vc.status.unwrap().last_failure_reason.as_deref(),
        Some("UnparseableTokenResponse")
    );
    ts.set_sticky_fault(None);
    valid_token(&ns, &ts, "crm", None).await;
    let rt = stored_refresh_token(&ns, "crm").await.unwrap();
    assert!(ts.is_refresh_token_live(&rt));
    // Every reply is a failure until the fault is lifted, so requests follow the backoff:
    // 1 s doubling less at most 20 % jitter puts request k at ≥ 0.8·(2^(k-1) − 1) s, so the
    // 7th at ≥ 50.4 s and the 8th at ≥ 101.6 s: at most 7 in a minute (the success is one of
    // them; 1 h tokens after it).
    assert_invariants(&ns, &ts, "crm", &[seed, rt], Invariants::new(7)).await;
}

/// Rotation issue, scenario 8 (part): what the operator holds for a connection goes with it. A
/// deleted connection's expiry series leaves `/metrics` (an expiry alert would otherwise fire
/// for it forever), and a connection re-created under the same name starts afresh.
#[tokio::test]
async fn deleting_a_connection_forgets_its_series() {
    ensure_operator().await;
    let ns = test_namespace("forget").await;
    let ts = server(TokenServerConfig::default()).await;
    client_creds(&ns).await;
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    ready(&ns, "api").await;
    let series = format!(
        "vaultconn_token_expiry_timestamp_seconds{{namespace=\"{}\",name=\"api\"}}",
        ns.name
    );
    wait_for(WAIT, "the expiry series", || async {
        support::operator::operator_metrics_text()
            .await
            .contains(&series)
    })
    .await;
    ns.api::<VaultConnection>()
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(WAIT, "the expiry series to go", || async {
        !support::operator::operator_metrics_text()
            .await
            .contains(&series)
    })
    .await;
    // The old connection's Secrets go by garbage collection (kube-controller-manager, slower
    // under load); until then a re-created connection finds them owned by the old one
    // (`SecretConflict`). Re-created after that, it gets its own token.
    wait_for(
        Duration::from_secs(90),
        "the old Secrets garbage-collected",
        || async {
            let secrets = ns.api::<Secret>();
            secrets.get_opt("api").await.unwrap().is_none()
                && secrets
                    .get_opt("api-vaultconn-state")
                    .await
                    .unwrap()
                    .is_none()
        },
    )
    .await;
    let calls_before = ts.call_count();
    apply_vc(&ns, "api", cc_spec(&ts, json!({}))).await;
    ready(&ns, "api").await;
    assert!(ts.call_count() > calls_before);
    // One issue before the deletion, one for the re-created connection.
    assert_invariants(&ns, &ts, "api", &[], Invariants::new(2)).await;
}

/// Rotation issue, scenario 5 (fault matrix row 41): the response to a rotation is lost, the
/// one retry meets a 503 (and, in the second connection, a gateway's 502). The in-flight
/// evidence survives the transient answer, so the eventual refusal of the spent token is
/// reported as `RefreshResponseLost` (never retried), not `RefreshTokenRejected` (retried
/// hourly). The provider's record: exactly one family revoked per connection, after which no
/// request arrives.
#[tokio::test]
async fn unknown_outcome_then_503_still_ends_response_lost() {
    ensure_operator().await;
    let ns = test_namespace("lost503").await;
    for (name, second) in [
        ("svc503", Fault::service_unavailable(None)),
        (
            "svc502",
            Fault::Status {
                code: 502,
                retry_after: None,
                body: FaultBody::Html,
            },
        ),
    ] {
        let ts = server(TokenServerConfig::default().with_rotation(true)).await;
        let seed = ts.mint_refresh_token(CLIENT);
        ts.push_fault(Fault::ResetAfterCommit);
        ts.push_fault(second);
        put_secret(
            &ns,
            &format!("{name}-creds"),
            &[
                ("client_id", CLIENT),
                ("client_secret", CLIENT_SECRET),
                ("refresh_token", &seed),
            ],
        )
        .await;
        let mut spec = rt_spec(&ts);
        spec["credentialsRef"]["name"] = json!(format!("{name}-creds"));
        apply_vc(&ns, name, spec).await;
        let vc = with_reason(&ns, name, "RefreshResponseLost").await;
        assert!(message(&vc).contains("overlap"), "{}", message(&vc));
        let calls = ts.call_count();
        assert_eq!(
            calls, 3,
            "{name}: the reset, its retry, then the refused replay"
        );
        assert!(ts
            .calls()
            .iter()
            .all(|c| c.refresh_token.as_deref() == Some(seed.as_str())));
        assert_eq!(ts.revocations(), 1);
        force_reconcile(&ns, &format!("{name}-creds"), name).await;
        assert_eq!(
            ts.call_count(),
            calls,
            "{name}: no request after the report"
        );
        // Provoked on purpose: the seed spent by call 0 (reset), the retry met the transient
        // answer (call 1), the next one was refused with the family revoked (call 2).
        let report = assert_invariants(
            &ns,
            &ts,
            name,
            std::slice::from_ref(&seed),
            Invariants::new(3).lost_response(CLIENT),
        )
        .await;
        assert_eq!(
            report.losses,
            vec![seed_lost_then_refused(&seed, vec![1, 2])]
        );
    }
}
