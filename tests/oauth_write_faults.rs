//! Faults on the API server writes that follow a successful refresh (oauth.md §6, rows 22, 23
//! and 27): the state Secret write answered with 409, 429, 500 or 503, and SIGTERM while new
//! tokens are still waiting to be written. The invariant every time: the token endpoint is
//! called exactly once per refresh token, the rotated refresh token ends up in the state
//! Secret and is live at the provider, and the provider never had to revoke a family. Every
//! test ends with the provider-side invariants checked on the token server's own call log
//! (`provider_invariants`: no replay, no revocation, a request rate the test derives).
//!
//! The real API server cannot fail one chosen write on demand, so this binary runs its own
//! operator process whose kubeconfig points at an [`ApiFaultProxy`] in front of the test
//! API server. Tests run in parallel in their own namespaces, so every fault rule matches a
//! namespace-specific path; the SIGTERM test stops the shared operator and therefore runs
//! alone (`OPERATOR_USE`).
//!
//! Arming a fault at the right moment: before the token call the operator writes an intent
//! mark to the state Secret (and the first time it creates the Secret), which must not be
//! failed, or no refresh would happen. So the token server holds its committed reply for
//! `HOLD`; the test waits until the call is recorded (the refresh token is rotated at the
//! provider from then on), arms the fault, and the operator's write of the new tokens meets
//! it. Each test then checks that the rule really answered (`injected(rule) >= 1`).
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::Method;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::objects::*;
use support::own_operator::{
    own_operator_options, proxied_kubeconfig, rotating_token_server_with, start_own_operator,
};
use support::{test_namespace, wait_for, wait_for_some, TestNs};
use tokio::sync::{Mutex, OnceCell, RwLock};
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::api_proxy::{ApiFaultProxy, FaultRule, MethodMatch, RuleId};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};
use vaultconn_testkit::provider_invariants::{assert_provider_invariants, Invariants};
use vaultconn_testkit::reliability::{record, Fact};
use vaultconn_testkit::token_server::{Fault, RecordedCall, TokenServer, TokenServerConfig};

const CLIENT: &str = "app";
const CLIENT_SECRET: &str = "client-SECRET-value";
/// How long the token server holds a committed reply while the test arms a fault.
const HOLD: Duration = Duration::from_secs(3);
/// Timeout of waits that span the operator's 20 s write-retry budget (or two of them).
const LONG: Duration = Duration::from_secs(90);
/// A write outage longer than one attempt but well inside the 20 s retry budget.
const SHORT_OUTAGE: Duration = Duration::from_secs(5);
/// The 20 s write-retry budget plus one write attempt and a reconcile.
const BUDGET_AND_SLACK: Duration = Duration::from_secs(35);
/// How long the 503 test waits for `TokenPersistPending` at most (longer than it should take,
/// so a failure shows the delay and the retry timeline).
const PENDING_503_WAIT: Duration = Duration::from_secs(60);
/// SIGTERM to exit: one reconcile's write budget (20 s) plus the flush's (20 s), and margin.
const STOP_TIMEOUT: Duration = Duration::from_secs(90);

/// The proxy and the operator behind it, shared by the tests of this binary.
struct Harness {
    proxy: ApiFaultProxy,
    operator: Mutex<OperatorProcess>,
    log_path: PathBuf,
}

static HARNESS: OnceCell<Harness> = OnceCell::const_new();
/// Read: a test that needs the operator running. Write: a test that stops it.
static OPERATOR_USE: RwLock<()> = RwLock::const_new(());

async fn harness() -> &'static Harness {
    HARNESS
        .get_or_init(|| async {
            support::ensure_crds().await;
            let (proxy, kubeconfig) = proxied_kubeconfig("via-fault-proxy").await;
            let log_path = support::cluster()
                .await
                .dir()
                .join("operator-write-faults.log");
            let operator = start_own_operator(OperatorOptions {
                log_filter: "info".into(),
                ..own_operator_options::<&str>(kubeconfig, log_path.clone(), &[])
            })
            .await;
            Harness {
                proxy,
                operator: Mutex::new(operator),
                log_path,
            }
        })
        .await
}

/// The operator's log; an unreadable or empty one fails the test (a leak check on "" passes
/// for nothing).
fn operator_logs(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.is_empty() => text,
        other => panic!(
            "the operator log {} is unreadable or empty: {other:?}",
            path.display()
        ),
    }
}

/// Requests to `path` the proxy answered with an injected fault.
fn injected_on(proxy: &ApiFaultProxy, path: &str) -> usize {
    proxy
        .requests()
        .iter()
        .filter(|r| r.injected && r.path.contains(path))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// A namespace, its token server (rotation on, 1 h access tokens) and a credentials Secret
/// seeded with a fresh refresh token, which is returned.
async fn setup(prefix: &str) -> (TestNs, TokenServer, String) {
    let ns = test_namespace(prefix).await;
    let ts = rotating_token_server_with(
        TokenServerConfig::default().with_client(CLIENT, CLIENT_SECRET),
        Duration::from_secs(3600),
    )
    .await;
    let rt = ts.mint_refresh_token(CLIENT);
    put_secret(
        &ns,
        "creds",
        &[
            ("client_id", CLIENT),
            ("client_secret", CLIENT_SECRET),
            ("refresh_token", &rt),
        ],
    )
    .await;
    (ns, ts, rt)
}

fn spec(ts: &TokenServer) -> serde_json::Value {
    json!({"type": "oauth2", "credentialsRef": {"name": "creds"},
        "oauth2": {"tokenUrl": ts.token_url(), "grantType": "refreshToken"}})
}

async fn access_token(ns: &TestNs, name: &str) -> Option<String> {
    let s = ns.api::<Secret>().get_opt(name).await.ok()??;
    data_of(&s).get("access_token").cloned()
}

/// Make the token server hold its next reply for `HOLD` after committing the exchange.
fn hold_next_reply(ts: &TokenServer) {
    ts.push_fault(Fault::SlowReply {
        delay: HOLD,
        after_commit: true,
    });
}

/// The refresh token the provider issued in `call` (now the only live one of the family).
fn issued_rt(call: &RecordedCall) -> String {
    let o = call.outcome.as_ref().expect("a decided call");
    assert_eq!(o.status, Some(200), "the token call succeeded");
    o.refresh_token
        .clone()
        .expect("rotation issues a refresh token")
}

fn issued_at(call: &RecordedCall) -> String {
    call.outcome
        .as_ref()
        .and_then(|o| o.access_token.clone())
        .expect("an issued access token")
}

/// Wait until the connection is Ready on the tokens of `call`: its refresh token in the state
/// Secret and its access token in the generated Secret.
async fn ready_on(ns: &TestNs, ts: &TokenServer, name: &str, call: &RecordedCall) {
    let rt = issued_rt(call);
    let at = issued_at(call);
    let api = ns.api::<VaultConnection>();
    let what = format!("{name} Ready on the tokens of token call #{}", call.seq);
    let (rt, at) = (&rt, &at);
    wait_for(LONG, &what, || {
        let api = api.clone();
        async move {
            let Ok(vc) = api.get(name).await else {
                return false;
            };
            phase(&vc) == Some(Phase::Ready)
                && reason(&vc) == "Reconciled"
                && stored_refresh_token(ns, name).await.as_ref() == Some(rt)
                && access_token(ns, name).await.as_ref() == Some(at)
        }
    })
    .await;
    assert!(
        ts.is_refresh_token_live(rt),
        "the stored refresh token is live"
    );
    assert!(
        ts.is_access_token_valid(at),
        "the published access token is valid"
    );
}

/// Wait until `rule` answered at least once: the operator has the new tokens and is writing.
async fn first_injection(proxy: &ApiFaultProxy, rule: RuleId) {
    wait_for(
        Duration::from_secs(30),
        &format!("{rule} to fail a state write"),
        || async move { proxy.injected(rule) >= 1 },
    )
    .await;
}

/// After the last request `rule` answered, the operator read the state Secret again before a
/// successful replace: it re-applied on a fresh read instead of giving up.
fn assert_reread_then_replaced(proxy: &ApiFaultProxy, path: &str, rule: RuleId) {
    let reqs = proxy.requests_matching(MethodMatch::Any, path);
    let last = reqs
        .iter()
        .rposition(|r| r.rule == Some(rule))
        .unwrap_or_else(|| panic!("{rule} never answered"));
    let after = &reqs[last + 1..];
    let put = after
        .iter()
        .position(|r| r.method == Method::PUT && r.succeeded())
        .unwrap_or_else(|| panic!("no successful replace after {rule}: {after:?}"));
    assert!(
        after[..put]
            .iter()
            .any(|r| r.method == Method::GET && r.succeeded()),
        "the state Secret was not read again before the replace: {after:?}"
    );
}

/// The provider's record keeps `provider` (no replay, no revocation, the rate bound), the
/// stored refresh token is live, and no token or secret is in the logs.
fn assert_invariants(ts: &TokenServer, stored: &str, logs: &str, provider: Invariants) {
    assert_provider_invariants(&ts.provider_record(), &provider);
    assert!(
        ts.is_refresh_token_live(stored),
        "the stored refresh token is dead"
    );
    let mut secrets = vec![CLIENT_SECRET.to_string()];
    for c in ts.calls() {
        secrets.extend(c.refresh_token);
        if let Some(o) = c.outcome {
            secrets.extend(o.access_token);
            secrets.extend(o.refresh_token);
        }
    }
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(
            !logs.contains(s.as_str()),
            "a token or secret is in the operator log"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Row 22: 409 Conflict on the state write after a successful refresh
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn conflict_on_state_write_reapplies_the_same_tokens() {
    let h = harness().await;
    let _running = OPERATOR_USE.read().await;
    let (ns, ts, rt0) = setup("wf-conflict").await;
    let name = "conflict";
    let path = state_path(&ns, name);

    // First refresh: the intent mark creates the state Secret (POST to the collection); the new
    // tokens are a replace, answered 409 once.
    hold_next_reply(&ts);
    apply_vc(&ns, name, spec(&ts)).await;
    let call = committed_call(&ts, 0).await;
    assert_eq!(call.refresh_token.as_deref(), Some(rt0.as_str()));
    let rule = h.proxy.fail(FaultRule::writes(&path, 409));
    ready_on(&ns, &ts, name, &call).await;
    assert_eq!(h.proxy.injected(rule), 1, "the 409 was not injected");
    assert_reread_then_replaced(&h.proxy, &path, rule);
    assert_eq!(calls_with(&ts, &rt0), 1, "the refresh token was sent again");
    assert_eq!(ts.call_count(), 1);

    // A forced refresh (the intent mark is a replace now), answered 409 twice in a row.
    let rt1 = issued_rt(&call);
    hold_next_reply(&ts);
    request_refresh(&ns, name, "1").await;
    let call = committed_call(&ts, 1).await;
    assert_eq!(call.refresh_token.as_deref(), Some(rt1.as_str()));
    let rule = h.proxy.fail(FaultRule::writes(&path, 409).times(2));
    ready_on(&ns, &ts, name, &call).await;
    assert_eq!(h.proxy.injected(rule), 2, "the 409s were not injected");
    assert_reread_then_replaced(&h.proxy, &path, rule);
    assert_eq!(calls_with(&ts, &rt1), 1, "the refresh token was sent again");
    assert_eq!(ts.call_count(), 2);
    assert!(!ts.is_refresh_token_live(&rt1));

    // The first refresh and one forced refresh; 1 h tokens, and the 409s retry only writes.
    assert_invariants(
        &ts,
        &issued_rt(&call),
        &operator_logs(&h.log_path),
        Invariants::new(2),
    );
    record(
        Fact::survived(
            "409 Conflict on the state write right after a rotation",
            "API fault proxy answers 409 to the state Secret write",
            injected_on(&h.proxy, &path),
        )
        .note("each refresh token sent once; the rotated one stored and live"),
    );
}

// ---------------------------------------------------------------------------------------------
// Row 23: 429 / 500 / 503 on the state write
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_errors_on_state_write_retry_the_write_never_the_grant() {
    let h = harness().await;
    let _running = OPERATOR_USE.read().await;
    let (ns, ts, _rt0) = setup("wf-5xx").await;
    let name = "outage";
    let path = state_path(&ns, name);
    apply_vc(&ns, name, spec(&ts)).await;
    let call = committed_call(&ts, 0).await;
    ready_on(&ns, &ts, name, &call).await;

    // Throttling (429 with Retry-After, as API priority and fairness sends it), three times.
    let sent = issued_rt(&call);
    hold_next_reply(&ts);
    request_refresh(&ns, name, "1").await;
    let call = committed_call(&ts, 1).await;
    assert_eq!(call.refresh_token.as_deref(), Some(sent.as_str()));
    let rule = h.proxy.fail(FaultRule::writes(&path, 429).times(3));
    ready_on(&ns, &ts, name, &call).await;
    assert_eq!(h.proxy.injected(rule), 3);
    assert_eq!(
        calls_with(&ts, &sent),
        1,
        "the refresh token was sent again"
    );
    assert_eq!(ts.call_count(), 2);

    // A short 503 outage: longer than one write attempt, well inside the 20 s retry budget.
    // Whether TokenPersistPending shows meanwhile is not specified; the end state is.
    let sent = issued_rt(&call);
    hold_next_reply(&ts);
    request_refresh(&ns, name, "2").await;
    let call = committed_call(&ts, 2).await;
    assert_eq!(call.refresh_token.as_deref(), Some(sent.as_str()));
    let rule = h.proxy.fail_until_cleared(FaultRule::writes(&path, 503));
    first_injection(&h.proxy, rule).await;
    // The outage itself.
    tokio::time::sleep(SHORT_OUTAGE).await;
    h.proxy.clear(rule);
    ready_on(&ns, &ts, name, &call).await;
    assert!(
        h.proxy.injected(rule) >= 2,
        "the outage covered only {} write attempt(s)",
        h.proxy.injected(rule)
    );
    assert_eq!(
        calls_with(&ts, &sent),
        1,
        "the refresh token was sent again"
    );
    assert_eq!(ts.call_count(), 3);

    // A long 500 outage, past the 20 s budget: the tokens wait in memory (TokenPersistPending),
    // later reconciles retry the write only, and once the API server accepts writes again the
    // tokens are stored.
    let sent = issued_rt(&call);
    hold_next_reply(&ts);
    request_refresh(&ns, name, "3").await;
    let call = committed_call(&ts, 3).await;
    assert_eq!(call.refresh_token.as_deref(), Some(sent.as_str()));
    let rotated = issued_rt(&call);
    let rule = h.proxy.fail_until_cleared(FaultRule::writes(&path, 500));
    first_injection(&h.proxy, rule).await;
    let api = ns.api::<VaultConnection>();
    let vc = wait_for_some(LONG, &format!("{name} reason TokenPersistPending"), || {
        let api = api.clone();
        async move {
            api.get(name)
                .await
                .ok()
                .filter(|vc| reason(vc) == "TokenPersistPending")
        }
    })
    .await;
    assert_eq!(phase(&vc), Some(Phase::Pending));
    assert!(
        message(&vc).contains(&format!("{name}-vaultconn-state")),
        "the message names the state Secret: {}",
        message(&vc)
    );
    assert_eq!(
        stored_refresh_token(&ns, name).await.as_deref(),
        Some(sent.as_str()),
        "the state Secret changed during the outage"
    );
    assert!(ts.is_refresh_token_live(&rotated));
    // A later reconcile retries the write (and only the write).
    let failed_writes = h.proxy.injected(rule);
    wait_for(
        LONG,
        "a state write retried after TokenPersistPending",
        || {
            let proxy = &h.proxy;
            async move { proxy.injected(rule) > failed_writes }
        },
    )
    .await;
    assert_eq!(
        calls_with(&ts, &sent),
        1,
        "the refresh token was sent again"
    );
    assert_eq!(ts.call_count(), 4);
    assert!(
        h.proxy.clear(rule),
        "the outage rule was gone before it was cleared"
    );
    ready_on(&ns, &ts, name, &call).await;
    assert_eq!(
        calls_with(&ts, &sent),
        1,
        "the refresh token was sent again"
    );
    assert_eq!(ts.call_count(), 4);

    // The first refresh and three forced ones; 1 h tokens, and the outages retry only writes.
    assert_invariants(
        &ts,
        &rotated,
        &operator_logs(&h.log_path),
        Invariants::new(4),
    );
    record(
        Fact::survived(
            "429 (Retry-After), 503 and 500 outages on the state write right after a rotation",
            "API fault proxy: 3 × 429, a 5 s 503 outage, a 500 outage past the 20 s write budget",
            injected_on(&h.proxy, &path),
        )
        .note(
            "only the write retried, never the grant; TokenPersistPending during the long outage",
        ),
    );
}

/// Seconds from the first injected response of `rule` to each of its injected responses.
fn injection_times(proxy: &ApiFaultProxy, rule: RuleId) -> Vec<u64> {
    let at: Vec<SystemTime> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.rule == Some(rule))
        .map(|r| r.at)
        .collect();
    let first = at.first().copied().unwrap_or(UNIX_EPOCH);
    at.iter()
        .map(|t| t.duration_since(first).unwrap_or_default().as_secs())
        .collect()
}

/// Row 23 with 503 (what an overloaded or restarting API server, or API priority and fairness,
/// answers) for longer than the 20 s write-retry budget: the tokens must still be handed over
/// to `TokenPersistPending` about when the budget is spent, not after the client library's own
/// retries (kube-client retries 429/503/504 up to 15 times with exponential backoff by default,
/// inside one write attempt).
#[tokio::test]
async fn unavailable_past_the_budget_hands_over_in_time() {
    let h = harness().await;
    let _running = OPERATOR_USE.read().await;
    let (ns, ts, _rt0) = setup("wf-503").await;
    let name = "unavailable";
    let path = state_path(&ns, name);
    apply_vc(&ns, name, spec(&ts)).await;
    let call = committed_call(&ts, 0).await;
    ready_on(&ns, &ts, name, &call).await;

    let sent = issued_rt(&call);
    hold_next_reply(&ts);
    request_refresh(&ns, name, "1").await;
    let call = committed_call(&ts, 1).await;
    assert_eq!(call.refresh_token.as_deref(), Some(sent.as_str()));
    let rule = h.proxy.fail_until_cleared(FaultRule::writes(&path, 503));
    first_injection(&h.proxy, rule).await;
    let started = Instant::now();
    let api = ns.api::<VaultConnection>();
    // Waits longer than it should take, to report how long it did take.
    let pending = loop {
        if api
            .get(name)
            .await
            .is_ok_and(|vc| reason(&vc) == "TokenPersistPending")
        {
            break Some(started.elapsed());
        }
        if started.elapsed() > PENDING_503_WAIT {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        pending.is_some_and(|took| took <= BUDGET_AND_SLACK),
        "TokenPersistPending showed after {pending:?} (None: not within {PENDING_503_WAIT:?}) \
         of the first failed write (budget 20 s); 503s injected at seconds {:?}",
        injection_times(&h.proxy, rule)
    );
    assert_eq!(
        calls_with(&ts, &sent),
        1,
        "the refresh token was sent again"
    );
    assert!(h.proxy.clear(rule));
    ready_on(&ns, &ts, name, &call).await;
    assert_eq!(
        calls_with(&ts, &sent),
        1,
        "the refresh token was sent again"
    );
    assert_eq!(ts.call_count(), 2);
    // The first refresh and one forced refresh; the outage retries only the write.
    assert_invariants(
        &ts,
        &issued_rt(&call),
        &operator_logs(&h.log_path),
        Invariants::new(2),
    );
    record(
        Fact::survived(
            "503 on the state write for longer than the 20 s write budget",
            "API fault proxy answers 503 until cleared",
            injected_on(&h.proxy, &path),
        )
        .note(format!(
            "TokenPersistPending after {:.1?}; stored once the API server recovered",
            pending.unwrap_or_default()
        )),
    );
}

// ---------------------------------------------------------------------------------------------
// Row 27: SIGTERM while new tokens are not written yet
// ---------------------------------------------------------------------------------------------

/// Send SIGTERM to the operator and run `meanwhile` (on this thread) while it shuts down.
/// Returns whether it exited cleanly within `STOP_TIMEOUT`.
fn stop_operator_while(op: &mut OperatorProcess, meanwhile: impl FnOnce()) -> bool {
    std::thread::scope(|s| {
        let stopper = s.spawn(move || op.stop(STOP_TIMEOUT));
        meanwhile();
        stopper.join().unwrap_or(false)
    })
}

/// The operator's log without colours, minus lines about other tests' namespaces (for failure
/// messages).
fn ns_log(log_path: &Path, ns: &TestNs) -> String {
    let mut plain = String::new();
    let mut in_escape = false;
    for c in operator_logs(log_path).chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (true, c) if c.is_ascii_alphabetic() => in_escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
        .lines()
        .filter(|l| l.contains(&ns.name) || !l.contains("namespace="))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Log lines of `ns` containing `text`.
fn log_lines(log_path: &Path, ns: &TestNs, text: &str) -> usize {
    operator_logs(log_path)
        .lines()
        .filter(|l| l.contains(text) && l.contains(&ns.name))
        .count()
}

#[tokio::test]
async fn sigterm_while_tokens_are_unwritten_persists_them_before_exit() {
    let h = harness().await;
    // Stops the operator: no other test may run meanwhile.
    let _alone = OPERATOR_USE.write().await;
    let mut op = h.operator.lock().await;
    let (ns, ts, _rt0) = setup("wf-sigterm").await;
    let name = "sigterm";
    let path = state_path(&ns, name);
    apply_vc(&ns, name, spec(&ts)).await;
    let call = committed_call(&ts, 0).await;
    ready_on(&ns, &ts, name, &call).await;

    // 1. SIGTERM while the reconcile is still retrying the write (inside its 20 s budget); the
    //    API server accepts writes again a second later. The in-flight write completes.
    let sent = issued_rt(&call);
    hold_next_reply(&ts);
    request_refresh(&ns, name, "1").await;
    let call = committed_call(&ts, 1).await;
    assert_eq!(call.refresh_token.as_deref(), Some(sent.as_str()));
    let rotated = issued_rt(&call);
    let rule = h.proxy.fail_until_cleared(FaultRule::writes(&path, 503));
    first_injection(&h.proxy, rule).await;
    let clean = stop_operator_while(&mut op, || {
        // The outage goes on for a moment after the signal.
        std::thread::sleep(Duration::from_secs(1));
        h.proxy.clear(rule);
    });
    assert!(clean, "the operator did not exit cleanly after SIGTERM");
    assert_eq!(
        stored_refresh_token(&ns, name).await.as_deref(),
        Some(rotated.as_str()),
        "the rotated refresh token was not stored before exit"
    );
    assert!(ts.is_refresh_token_live(&rotated));
    assert_eq!(calls_with(&ts, &sent), 1);
    op.start_again().await.expect("operator restarts");
    ready_on(&ns, &ts, name, &call).await;
    assert_eq!(ts.call_count(), 2, "the restart called the token endpoint");

    // 2. SIGTERM, and the outage outlasts the reconcile's budget, so the tokens go to the
    //    pending set; the API server comes back only then, and the exit flush writes them.
    let sent = rotated;
    hold_next_reply(&ts);
    request_refresh(&ns, name, "2").await;
    let call = committed_call(&ts, 2).await;
    assert_eq!(call.refresh_token.as_deref(), Some(sent.as_str()));
    let rotated = issued_rt(&call);
    // 500, not 503: kube-client retries 503 by itself, which is what
    // `unavailable_past_the_budget_hands_over_in_time` is about.
    let rule = h.proxy.fail_until_cleared(FaultRule::writes(&path, 500));
    first_injection(&h.proxy, rule).await;
    let gave_up = "could not persist new tokens";
    let gave_up_before = log_lines(&h.log_path, &ns, gave_up);
    let flushed_before = log_lines(&h.log_path, &ns, "flushed pending token state");
    let mut handed_over = false;
    let clean = stop_operator_while(&mut op, || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if log_lines(&h.log_path, &ns, gave_up) > gave_up_before {
                handed_over = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        h.proxy.clear(rule);
    });
    assert!(
        handed_over,
        "the reconcile never handed the unwritten tokens over to the exit flush; operator log:\n{}",
        ns_log(&h.log_path, &ns)
    );
    assert!(clean, "the operator did not exit cleanly after SIGTERM");
    assert_eq!(
        log_lines(&h.log_path, &ns, "flushed pending token state"),
        flushed_before + 1,
        "the exit flush did not report writing the tokens"
    );
    assert_eq!(
        stored_refresh_token(&ns, name).await.as_deref(),
        Some(rotated.as_str()),
        "the rotated refresh token was not stored before exit"
    );
    assert!(ts.is_refresh_token_live(&rotated));
    assert_eq!(calls_with(&ts, &sent), 1);

    // 3. Started again, it carries on from the flushed tokens: no RefreshResponseLost, and the
    //    next refresh spends the flushed refresh token.
    op.start_again().await.expect("operator restarts");
    ready_on(&ns, &ts, name, &call).await;
    assert_eq!(ts.call_count(), 3, "the restart called the token endpoint");
    request_refresh(&ns, name, "3").await;
    let call = committed_call(&ts, 3).await;
    assert_eq!(call.refresh_token.as_deref(), Some(rotated.as_str()));
    ready_on(&ns, &ts, name, &call).await;
    let vc = ns.api::<VaultConnection>().get(name).await.expect("get");
    assert_ne!(reason(&vc), "RefreshResponseLost");
    assert_eq!(calls_with(&ts, &rotated), 1);
    assert_eq!(ts.call_count(), 4);

    // The first refresh and three forced ones; restarts and flushes ask the provider nothing.
    assert_invariants(
        &ts,
        &issued_rt(&call),
        &operator_logs(&h.log_path),
        Invariants::new(4),
    );
    record(Fact::survived(
        "SIGTERM while rotated tokens are not yet written",
        "API fault proxy fails the state write (503, then 500 past the budget); SIGTERM meanwhile",
        2,
    ).note(format!("{} failed writes; tokens stored before exit both times, no RefreshResponseLost after restart", injected_on(&h.proxy, &path))));
}

// ---------------------------------------------------------------------------------------------
// Rotation issue, scenario 3 (row 40): a broken 200 that carries the rotated refresh token, then
// a state write that fails for longer than the write budget
// ---------------------------------------------------------------------------------------------

/// The provider rotates and answers 200 without `access_token` but with the new refresh token
/// N; every state write then fails for longer than the 20 s budget. N is the only live token:
/// it must be held and written when the API server recovers, never traded for a new grant
/// with the old token (which, without an overlap window, makes the provider revoke N).
#[tokio::test]
async fn salvaged_token_is_held_not_traded_for_a_new_grant() {
    let h = harness().await;
    let _running = OPERATOR_USE.read().await;
    let (ns, ts, seed) = setup("wf-salvage").await;
    let name = "salvage";
    let path = state_path(&ns, name);
    ts.push_fault(Fault::StripAccessToken { hold: HOLD });
    apply_vc(&ns, name, spec(&ts)).await;
    let call = committed_call(&ts, 0).await;
    assert_eq!(call.refresh_token.as_deref(), Some(seed.as_str()));
    let salvaged = issued_rt(&call);
    let rule = h.proxy.fail_until_cleared(FaultRule::writes(&path, 500));
    first_injection(&h.proxy, rule).await;
    let api = ns.api::<VaultConnection>();
    wait_for_some(LONG, &format!("{name} reason TokenPersistPending"), || {
        let api = api.clone();
        async move {
            api.get(name)
                .await
                .ok()
                .filter(|vc| reason(vc) == "TokenPersistPending")
        }
    })
    .await;
    assert_eq!(calls_with(&ts, &seed), 1, "the spent seed was sent again");
    assert_eq!(
        ts.call_count(),
        1,
        "a new grant was requested while N was held"
    );
    assert!(ts.is_refresh_token_live(&salvaged));
    assert!(
        h.proxy.clear(rule),
        "the outage rule was gone before it was cleared"
    );
    // Written once the API server accepts it; then the next refresh spends N itself.
    let next = committed_call(&ts, 1).await;
    assert_eq!(next.refresh_token.as_deref(), Some(salvaged.as_str()));
    ready_on(&ns, &ts, name, &next).await;
    assert_eq!(calls_with(&ts, &seed), 1);
    // The broken reply, then one request with the salvaged token after a backoff (the broken
    // reply counted as a failure; 1 h tokens after that).
    assert_invariants(
        &ts,
        &issued_rt(&next),
        &operator_logs(&h.log_path),
        Invariants::new(2),
    );
}

// ---------------------------------------------------------------------------------------------
// Rotation issue, scenario 4: tokens held for writing meet a state Secret someone else wrote
// ---------------------------------------------------------------------------------------------

/// New tokens wait for an API outage to end (`TokenPersistPending`); meanwhile a person edits
/// the state Secret's refresh token. The held write's guard no longer matches: instead of
/// failing "changed concurrently" every 2 s forever, the operator re-reads, takes the stored
/// token (saying so) and goes on with it — here a token the provider never issued, which ends
/// in an explained terminal reason after exactly one request with it.
#[tokio::test]
async fn held_tokens_superseded_by_a_hand_edit_do_not_loop() {
    let h = harness().await;
    let _running = OPERATOR_USE.read().await;
    let (ns, ts, seed) = setup("wf-superseded").await;
    let name = "superseded";
    let path = state_path(&ns, name);
    hold_next_reply(&ts);
    apply_vc(&ns, name, spec(&ts)).await;
    committed_call(&ts, 0).await;
    let rule = h.proxy.fail_until_cleared(FaultRule::writes(&path, 500));
    first_injection(&h.proxy, rule).await;
    let api = ns.api::<VaultConnection>();
    let reason_is = |want: &'static str| {
        let api = api.clone();
        move || {
            let api = api.clone();
            async move { api.get(name).await.ok().filter(|vc| reason(vc) == want) }
        }
    };
    wait_for_some(
        LONG,
        "TokenPersistPending",
        reason_is("TokenPersistPending"),
    )
    .await;
    // The hand edit goes to the API server directly, not through the failing proxy.
    let edited = "hand-edited-SECRET-token";
    let patch = json!({"stringData": {"refresh_token": edited}});
    ns.api::<Secret>()
        .patch(
            &format!("{name}-vaultconn-state"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("editing the state Secret");
    assert!(h.proxy.clear(rule));
    let vc = wait_for_some(
        LONG,
        "RefreshTokenRejected",
        reason_is("RefreshTokenRejected"),
    )
    .await;
    assert_eq!(phase(&vc), Some(Phase::Failed));
    assert_eq!(calls_with(&ts, &seed), 1, "the seed was sent again");
    assert_eq!(
        calls_with(&ts, edited),
        1,
        "the stored token was tried once"
    );
    assert_eq!(ts.call_count(), 2);
    assert_eq!(ts.revocations(), 0);
    // The seed once, the hand-edited token (never issued, so no replay) once.
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(2));
}

// ---------------------------------------------------------------------------------------------
// Rotation issue, scenario 6 (client credentials): the state write is refused after a success
// ---------------------------------------------------------------------------------------------

/// A clientCredentials connection whose state writes start being refused (403) after it was
/// Ready. The forced refresh's token is held; the write is retried with backoff (not every 2 s,
/// and never by asking the provider again), and stored once the API server accepts it.
#[tokio::test]
async fn refused_state_write_after_success_backs_off_without_provider_calls() {
    let h = harness().await;
    let _running = OPERATOR_USE.read().await;
    let ns = test_namespace("wf-ccrefused").await;
    let ts = TokenServer::start(TokenServerConfig::default().with_client(CLIENT, CLIENT_SECRET))
        .await
        .expect("token server starts");
    put_secret(
        &ns,
        "creds",
        &[("client_id", CLIENT), ("client_secret", CLIENT_SECRET)],
    )
    .await;
    let name = "ccrefused";
    let path = state_path(&ns, name);
    let spec = json!({"type": "oauth2", "credentialsRef": {"name": "creds"},
        "oauth2": {"tokenUrl": ts.token_url()}});
    apply_vc(&ns, name, spec).await;
    let first = committed_call(&ts, 0).await;
    wait_for(LONG, "the first token published", || async {
        access_token(&ns, name).await == first.outcome.as_ref().and_then(|o| o.access_token.clone())
    })
    .await;
    let rule = h.proxy.fail_until_cleared(FaultRule::writes(&path, 403));
    request_refresh(&ns, name, "1").await;
    let second = committed_call(&ts, 1).await;
    wait_for(LONG, "five refused state writes", || async {
        h.proxy.injected(rule) >= 5
    })
    .await;
    assert_eq!(
        ts.call_count(),
        2,
        "the provider was asked again while the write was refused"
    );
    // Retries every 2 s would put the fifth attempt at ~8 s; backoff (2, 2, ~4, ~8 s) at ≥ 13 s.
    let times = injection_times(&h.proxy, rule);
    assert!(times[4] >= 12, "refused writes retried at {times:?} s");
    assert!(h.proxy.clear(rule));
    let issued = second.outcome.as_ref().and_then(|o| o.access_token.clone());
    wait_for(
        Duration::from_secs(120),
        "the held token published",
        || async { access_token(&ns, name).await == issued },
    )
    .await;
    assert_eq!(ts.call_count(), 2);
    // The first issue and the forced refresh; the refused writes ask the provider nothing.
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(2));
}

// ---------------------------------------------------------------------------------------------
// Rotation issue, scenario 8 (part): an API error while re-reading after `invalid_grant`
// ---------------------------------------------------------------------------------------------

/// The provider refuses the refresh token, and the re-read of the state Secret that follows
/// (to see whether another writer rotated it) fails. The refusal is reported as what it is,
/// `RefreshTokenRejected`; the token is not sent a second time, which would have made the
/// in-flight mark read as a lost response (`RefreshResponseLost`).
#[tokio::test]
async fn failed_reread_after_invalid_grant_is_still_a_plain_rejection() {
    let h = harness().await;
    let _running = OPERATOR_USE.read().await;
    let (ns, ts, seed) = setup("wf-reread").await;
    let name = "reread";
    let path = state_path(&ns, name);
    ts.revoke_family_of(&seed);
    ts.push_fault(Fault::SlowReply {
        delay: HOLD,
        after_commit: false,
    });
    apply_vc(&ns, name, spec(&ts)).await;
    wait_for(LONG, "the token request to arrive", || async {
        !ts.calls().is_empty()
    })
    .await;
    let rule = h
        .proxy
        .fail(FaultRule::requests(http::Method::GET, &path, 500));
    let api = ns.api::<VaultConnection>();
    let vc = wait_for_some(LONG, "a terminal reason", || {
        let api = api.clone();
        async move {
            api.get(name)
                .await
                .ok()
                .filter(|vc| phase(vc) == Some(Phase::Failed))
        }
    })
    .await;
    assert_eq!(h.proxy.injected(rule), 1, "the re-read was not failed");
    assert_eq!(reason(&vc), "RefreshTokenRejected", "{}", message(&vc));
    assert_eq!(
        calls_with(&ts, &seed),
        1,
        "the refused token was sent again"
    );
    // One refused request (the test revoked the family itself; not reuse detection).
    assert_provider_invariants(&ts.provider_record(), &Invariants::new(1));
}
