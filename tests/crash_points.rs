//! The operator is SIGKILLed at each step of the refresh protocol in turn (oauth.md §6 row 26),
//! restarted, and the provider's own record is checked after every restart. Where
//! `oauth_crash.rs` kills at random moments, this binary holds the operator at one exact step
//! from outside (no hooks in the product) and kills it there:
//!
//! 1. the in-flight mark is committed to the state Secret, the token request is not sent: the
//!    API fault proxy forwards the mark write and holds its answer;
//! 2. the token request is sent, the provider has not committed it: the token server holds the
//!    request unprocessed (`SlowReply { after_commit: false }`) for longer than the test runs,
//!    i.e. the request is lost with the dead process's connection;
//! 3. the provider rotated, the response has not arrived: the token server commits, then holds
//!    its reply (`SlowReply { after_commit: true }`) for longer than the test runs;
//! 4. the new refresh token is stored, the output Secret is not written: the proxy forwards the
//!    state write (the one without an in-flight mark) and holds its answer;
//! 5. the output Secret is written, the status is not: the proxy forwards the output Secret
//!    write and holds its answer;
//! 6. a second crash, after the one retry: killed as at step 3, the restarted operator resends
//!    the token, the provider answers (accepts it inside its window, or refuses it and revokes
//!    the family), and the proxy stalls the state write that would store that answer (not
//!    forwarded: nothing committed); the operator is killed again there.
//!
//! Each step has two connections of its own, one against a provider with a rotation overlap
//! window and one against a provider without; both are held at the step together and one kill
//! hits both. Refreshes are triggered with the force-refresh annotation on 1 h access tokens,
//! so every token call is one the test caused.
//!
//! After every restart, from the token server's record: no refresh token is presented after
//! the provider issued a newer one to us, except the one retry the protocol allows after an
//! unknown outcome (step 3: the restarted process finds the dead one's in-flight mark and
//! resends that token once); no family is revoked unless its connection reports
//! `RefreshResponseLost`. With a window every step ends Ready on a live stored refresh token
//! and a valid access token; without one, steps 1, 2, 4 and 5 do too and step 3 ends in
//! `RefreshResponseLost`. Step 6 ends in `RefreshResponseLost` with and without a window, and
//! the token is never sent a third time: the operator cannot tell an answer that died with the
//! process (a refusal, without a window) from one it could have had again (a window), and a
//! third send would replay a refused token. Each step makes exactly the token calls it needs
//! (no hot loop, no refresh of the connections not asked to).
//!
//! A restarted operator waits out the dead process's in-flight mark (twice the token request
//! timeout plus 5 s) before it resends, so the timeout is lowered to 8 s to keep the run short;
//! the kill lands well inside those 8 s, before the dead process could retry by itself.
mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use http::Method;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::objects::*;
use support::{test_namespace, TestNs};
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::api_proxy::{ApiFaultProxy, FaultRule, RuleId};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};
use vaultconn_testkit::reliability::{record, Fact};
use vaultconn_testkit::token_server::{
    Fault, GrantEvent, RecordedCall, RefreshTokenState, TokenServer, TokenServerConfig,
};

const CLIENT_SECRET: &str = "crash-points-client-secret";
/// The operator's token request timeout (`--token-request-timeout`).
const TOKEN_TIMEOUT: &str = "8s";
/// Provider overlap window: longer than a restart plus the wait for the dead process's mark.
const OVERLAP: Duration = Duration::from_secs(90);
/// How long a held write's answer or a held token request/reply is kept back: longer than the
/// whole test, so what is held never reaches the killed operator (nor the provider, step 2).
const HELD: Duration = Duration::from_secs(600);
/// Reaching a crash point (a refresh the test just requested).
const REACH: Duration = Duration::from_secs(30);
/// Settling after a restart: the wait for the dead process's mark (21 s) plus a refresh.
const SETTLE: Duration = Duration::from_secs(75);
/// The state key that only the in-flight mark write carries (the final state write clears it).
const INFLIGHT_KEY: &str = "inflight_refresh_token";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Overlap,
    NoWindow,
}

/// One connection: the crash point it is killed at and the provider it talks to.
struct Conn {
    name: String,
    step: u8,
    window: Window,
}

impl Conn {
    /// Also the connection's OAuth client id.
    fn client(&self) -> &str {
        &self.name
    }
    /// The output Secret: not a prefix of the state Secret's name, so the proxy's path
    /// substrings tell the two apart.
    fn out(&self) -> String {
        format!("{}-out", self.name)
    }
    fn state(&self) -> String {
        format!("{}-vaultconn-state", self.name)
    }
    /// The one outcome allowed after this connection's step.
    fn expect_lost(&self) -> bool {
        (self.step == 3 && self.window == Window::NoWindow) || self.step == 6
    }
    /// Token calls the step takes: 2 where a request was lost with the killed process and is
    /// sent again by the restarted one (2, 3, 6), else 1.
    fn step_calls(&self) -> usize {
        if matches!(self.step, 2 | 3 | 6) {
            2
        } else {
            1
        }
    }
}

struct Harness {
    ns: TestNs,
    proxy: ApiFaultProxy,
    op: OperatorProcess,
    overlap: TokenServer,
    no_window: TokenServer,
    conns: Vec<Conn>,
}

impl Harness {
    fn ts(&self, c: &Conn) -> &TokenServer {
        match c.window {
            Window::Overlap => &self.overlap,
            Window::NoWindow => &self.no_window,
        }
    }

    fn calls(&self, c: &Conn) -> Vec<RecordedCall> {
        self.ts(c)
            .calls()
            .into_iter()
            .filter(|k| k.client_id.as_deref() == Some(c.client()))
            .collect()
    }

    fn path(&self, secret: &str) -> String {
        format!("/api/v1/namespaces/{}/secrets/{secret}", self.ns.name)
    }

    async fn secret(&self, name: &str) -> BTreeMap<String, String> {
        self.ns
            .api::<Secret>()
            .get_opt(name)
            .await
            .unwrap()
            .map(|s| data_of(&s))
            .unwrap_or_default()
    }

    async fn vc(&self, c: &Conn) -> VaultConnection {
        self.ns.api::<VaultConnection>().get(&c.name).await.unwrap()
    }
}

async fn start() -> Harness {
    support::ensure_crds().await;
    let cp = support::cluster().await;
    let proxy = ApiFaultProxy::start(&cp.server_url()).expect("proxy starts");
    let kubeconfig = cp.dir().join("kubeconfig-crash-points");
    proxy
        .write_kubeconfig(&kubeconfig, cp.admin_token())
        .expect("writing the proxy kubeconfig");
    let op = OperatorProcess::start(OperatorOptions {
        binary: env!("CARGO_BIN_EXE_vaultconn").into(),
        kubeconfig,
        log_path: cp.dir().join("operator-crash-points.log"),
        extra_args: vec![
            "--allow-http-loopback".into(),
            "--token-request-timeout".into(),
            TOKEN_TIMEOUT.into(),
        ],
        log_filter: "info".into(),
    })
    .await
    .expect("operator starts");
    let mut conns = Vec::new();
    for step in 1..=6 {
        for (window, prefix) in [(Window::Overlap, "ov"), (Window::NoWindow, "nw")] {
            conns.push(Conn {
                name: format!("{prefix}{step}"),
                step,
                window,
            });
        }
    }
    let config = |window: Window| {
        let c = conns
            .iter()
            .filter(|c| c.window == window)
            .fold(TokenServerConfig::default(), |cfg, c| {
                cfg.with_client(c.client(), CLIENT_SECRET)
            })
            .with_rotation(true)
            .with_ttl(Duration::from_secs(3600));
        match window {
            Window::Overlap => c.with_overlap(Some(OVERLAP)),
            Window::NoWindow => c,
        }
    };
    let overlap = TokenServer::start(config(Window::Overlap)).await.unwrap();
    let no_window = TokenServer::start(config(Window::NoWindow)).await.unwrap();
    Harness {
        ns: test_namespace("crashpoints").await,
        proxy,
        op,
        overlap,
        no_window,
        conns,
    }
}

async fn create(h: &Harness, c: &Conn) {
    let seed = h.ts(c).mint_refresh_token(c.client());
    let creds = format!("{}-creds", c.name);
    put_secret(
        &h.ns,
        &creds,
        &[
            ("client_id", c.client()),
            ("client_secret", CLIENT_SECRET),
            ("refresh_token", &seed),
        ],
    )
    .await;
    apply_vc(
        &h.ns,
        &c.name,
        json!({"type": "oauth2", "credentialsRef": {"name": creds},
            "oauth2": {"tokenUrl": h.ts(c).token_url(), "grantType": "refreshToken"},
            "target": {"name": c.out()}}),
    )
    .await;
}

async fn request_refresh(h: &Harness, c: &Conn, value: &str) {
    let patch = json!({"metadata": {"annotations": {"vaultconn.dev/refresh-requested-at": value}}});
    h.ns.api::<VaultConnection>()
        .patch(&c.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotating the connection");
}

/// Poll `f` every 50 ms until it returns `Ok`; on timeout panic with its last `Err`, which
/// describes what was seen.
async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The refresh and access token of the provider's last call that issued a pair to `c`.
fn last_issued(h: &Harness, c: &Conn) -> Option<(String, String)> {
    h.calls(c).iter().rev().find_map(|k| {
        let o = k.outcome.as_ref()?;
        Some((o.refresh_token.clone()?, o.access_token.clone()?))
    })
}

/// What a connection looked like before its step.
#[derive(Debug)]
struct Before {
    rt: String,
    at: String,
    status_expires: Option<String>,
    calls: usize,
}

async fn before(h: &Harness, c: &Conn) -> Before {
    let vc = h.vc(c).await;
    Before {
        rt: h.secret(&c.state()).await["refresh_token"].clone(),
        at: h.secret(&c.out()).await["access_token"].clone(),
        status_expires: vc.status.and_then(|s| s.expires_at),
        calls: h.calls(c).len(),
    }
}

/// How a connection ended up after a restart.
#[derive(Debug)]
enum Settled {
    /// Ready on the provider's last issued pair: stored, live, published, in the status.
    Ready,
    /// Failed with this reason.
    Failed(String),
}

/// Wait until `c` has made at least `calls` token calls and is Ready on the pair the provider
/// issued last (refresh token stored and live, access token in the output Secret and valid,
/// status caught up, no in-flight mark left), or Failed.
async fn settled(h: &Harness, c: &Conn, calls: usize) -> Settled {
    let what = format!("{} (step {}, {:?}) to settle", c.name, c.step, c.window);
    eventually(SETTLE, &what, || async {
        let vc = h.vc(c).await;
        let status = vc.status.clone().unwrap_or_default();
        let seen = format!(
            "phase {:?}, reason {}, {} token calls",
            status.phase,
            reason(&vc),
            h.calls(c).len()
        );
        if h.calls(c).len() < calls {
            return Err(seen);
        }
        if status.phase == Some(Phase::Failed) {
            return Ok(Settled::Failed(reason(&vc)));
        }
        let Some((rt, at)) = last_issued(h, c) else {
            return Err(seen);
        };
        let state = h.secret(&c.state()).await;
        let out = h.secret(&c.out()).await;
        let ts = h.ts(c);
        let ready = status.phase == Some(Phase::Ready)
            && reason(&vc) == "Reconciled"
            && state.get("refresh_token") == Some(&rt)
            && !state.contains_key(INFLIGHT_KEY)
            && ts.is_refresh_token_live(&rt)
            && out.get("access_token") == Some(&at)
            && ts.is_access_token_valid(&at)
            && status.expires_at.is_some()
            && status.expires_at.as_ref() == out.get("expires_at");
        if ready {
            Ok(Settled::Ready)
        } else {
            Err(format!(
                "{seen}; stored token is the last issued: {}, in-flight mark: {}, output holds the last access token: {}, status expiresAt {:?} vs Secret {:?}",
                state.get("refresh_token") == Some(&rt),
                state.contains_key(INFLIGHT_KEY),
                out.get("access_token") == Some(&at),
                status.expires_at,
                out.get("expires_at")
            ))
        }
    })
    .await
}

/// Calls that presented a refresh token after the provider had issued a newer one in the
/// chain that started at the connection's seed.
fn stale_presentations(calls: &[RecordedCall]) -> Vec<usize> {
    let mut newest: Option<&str> = None;
    let mut stale = Vec::new();
    for (i, k) in calls.iter().enumerate() {
        if let (Some(rt), Some(n)) = (k.refresh_token.as_deref(), newest) {
            if rt != n {
                stale.push(i);
            }
        }
        if let Some(issued) = k.outcome.as_ref().and_then(|o| o.refresh_token.as_deref()) {
            newest = Some(issued);
        }
    }
    stale
}

/// The invariants that hold for every connection after every restart (`done`: the steps
/// carried out so far).
async fn check_invariants(h: &Harness, done: u8) {
    for c in &h.conns {
        let calls = h.calls(c);
        let stale = stale_presentations(&calls);
        // The one retry the protocol allows after an unknown outcome: the restarted operator
        // resends the token of the dead process's in-flight mark, whose reply never came.
        let allowed = usize::from(matches!(c.step, 3 | 6) && done >= c.step);
        assert!(
            stale.len() <= allowed,
            "{}: a refresh token was presented after a newer one had been issued (calls {stale:?} of {})",
            c.name,
            calls.len()
        );
        for &i in &stale {
            let (prev, retry) = (&calls[i - 1], &calls[i]);
            assert_eq!(
                prev.refresh_token, retry.refresh_token,
                "{}: the stale presentation is not a retry of the call before it",
                c.name
            );
            assert!(
                matches!(
                    prev.fault,
                    Some(Fault::SlowReply {
                        after_commit: true,
                        ..
                    })
                ),
                "{}: a token was resent although the reply to it was delivered",
                c.name
            );
        }
        let revoked = calls
            .iter()
            .filter(|k| k.outcome.as_ref().and_then(|o| o.event) == Some(GrantEvent::ReuseDetected))
            .count();
        if revoked > 0 {
            let vc = h.vc(c).await;
            assert_eq!(
                reason(&vc),
                "RefreshResponseLost",
                "{}: the provider revoked the family but the connection does not report it",
                c.name
            );
        }
        assert!(
            !calls.iter().any(
                |k| k.outcome.as_ref().and_then(|o| o.event) == Some(GrantEvent::FamilyRevoked)
            ),
            "{}: a token of a revoked family was sent again",
            c.name
        );
    }
}

/// Arm the crash point of `c`'s step: a proxy hold rule (1, 4, 5) or a token server fault
/// (2, 3, queued for the next call to that provider, which is `c`'s).
fn arm(h: &Harness, c: &Conn) -> Option<RuleId> {
    let hold = |path: String| FaultRule::hold_response(path, Method::PUT, HELD);
    match c.step {
        1 => Some(
            h.proxy
                .fail(hold(h.path(&c.state())).body_contains(INFLIGHT_KEY)),
        ),
        2 | 3 | 6 => {
            h.ts(c).push_fault(Fault::SlowReply {
                delay: HELD,
                after_commit: c.step != 2,
            });
            None
        }
        4 => Some(
            h.proxy
                .fail(hold(h.path(&c.state())).body_lacks(INFLIGHT_KEY)),
        ),
        5 => Some(h.proxy.fail(hold(h.path(&c.out())))),
        _ => unreachable!(),
    }
}

/// Wait until `c` is held at its step, and check from outside that it is exactly there.
/// Returns when it got there (the held request's arrival at the proxy or token server).
async fn reach(h: &Harness, c: &Conn, rule: Option<RuleId>, b: &Before) -> SystemTime {
    let what = format!("{} held at step {}", c.name, c.step);
    if let Some(rule) = rule {
        assert!(h.proxy.wait_held(rule, REACH).await, "timed out: {what}");
    } else {
        eventually(REACH, &what, || async {
            let calls = h.calls(c);
            match calls.get(b.calls) {
                Some(k) if c.step == 2 || k.outcome.is_some() => Ok(()),
                _ => Err(format!("{} calls", calls.len())),
            }
        })
        .await;
    }
    let calls = h.calls(c);
    let state = h.secret(&c.state()).await;
    let out = h.secret(&c.out()).await;
    let new_calls = &calls[b.calls..];
    match c.step {
        1 => {
            assert!(new_calls.is_empty(), "{what}: a token call was made");
            assert!(state.contains_key(INFLIGHT_KEY), "{what}: no mark stored");
        }
        2 | 3 | 6 => {
            assert_eq!(new_calls.len(), 1, "{what}");
            assert!(
                matches!(new_calls[0].fault, Some(Fault::SlowReply { .. })),
                "{what}: another call took the held reply (did another connection refresh?)"
            );
            assert_eq!(new_calls[0].refresh_token.as_ref(), Some(&b.rt));
            let outcome = new_calls[0].outcome.as_ref();
            if c.step == 2 {
                assert!(outcome.is_none(), "{what}: the provider processed it");
            } else {
                let event = outcome.and_then(|o| o.event);
                assert_eq!(event, Some(GrantEvent::Rotated), "{what}");
            }
            assert!(state.contains_key(INFLIGHT_KEY), "{what}: no mark stored");
            assert_eq!(state["refresh_token"], b.rt, "{what}");
        }
        4 | 5 => {
            assert_eq!(new_calls.len(), 1, "{what}");
            let issued = new_calls[0].outcome.as_ref().expect("decided");
            assert_eq!(issued.event, Some(GrantEvent::Rotated), "{what}");
            assert_eq!(state.get("refresh_token"), issued.refresh_token.as_ref());
            assert!(
                !state.contains_key(INFLIGHT_KEY),
                "{what}: mark not cleared"
            );
            let published = out.get("access_token") == issued.access_token.as_ref();
            assert_eq!(published, c.step == 5, "{what}: output Secret");
            assert_eq!(out["access_token"] == b.at, c.step == 4, "{what}");
            if c.step == 5 {
                let vc = h.vc(c).await;
                let status_expires = vc.status.and_then(|s| s.expires_at);
                assert_eq!(status_expires, b.status_expires, "{what}: status written");
            }
        }
        _ => unreachable!(),
    }
    match rule {
        Some(rule) => h
            .proxy
            .requests()
            .iter()
            .find(|r| r.rule == Some(rule))
            .map(|r| r.at)
            .expect("the held request is recorded"),
        None => new_calls[0].at,
    }
}

/// The token calls of the connections not at the step, before it.
struct Untouched(Vec<(String, usize)>);

impl Untouched {
    /// None of them made a token call since (no refresh without being asked).
    fn assert_untouched(&self, h: &Harness) {
        for (name, n) in &self.0 {
            let c = h.conns.iter().find(|c| c.name == *name).unwrap();
            assert_eq!(h.calls(c).len(), *n, "{name} refreshed without being asked");
        }
    }
}

/// How each connection at the step looked before it, and the others' token calls.
async fn start_step(h: &Harness, at_step: &[&Conn]) -> (Vec<Before>, Untouched) {
    let mut befores = Vec::new();
    for c in at_step {
        befores.push(before(h, c).await);
    }
    let others = h
        .conns
        .iter()
        .filter(|c| !at_step.iter().any(|a| a.name == c.name))
        .map(|c| (c.name.clone(), h.calls(c).len()))
        .collect();
    (befores, Untouched(others))
}

/// Step 6: killed as at step 3, restarted; the restarted operator's retry is answered and the
/// state write that would store the answer is stalled at the proxy (not forwarded); killed
/// again. The third process finds the mark of a retry whose answer it cannot know and reports
/// `RefreshResponseLost` without a token call. Before the retry flag it sent the token a third
/// time: a replay of a refused token without a window (the provider's record shows it).
async fn double_crash(h: &mut Harness, report: &mut Vec<String>) {
    let step = 6;
    let at_step: Vec<&Conn> = h.conns.iter().filter(|c| c.step == step).collect();
    let (befores, others) = start_step(h, &at_step).await;
    for c in &at_step {
        assert!(arm(h, c).is_none());
        request_refresh(h, c, "step-6").await;
    }
    for (c, b) in at_step.iter().zip(&befores) {
        reach(h, c, None, b).await;
    }
    // The restarted operator's store of the retry's answer (the state write without an
    // in-flight mark) is stalled at the proxy: never forwarded, never answered.
    let stalls: Vec<RuleId> = at_step
        .iter()
        .map(|c| {
            h.proxy.fail(
                FaultRule::stall(h.path(&c.state()), Method::PUT, HELD).body_lacks(INFLIGHT_KEY),
            )
        })
        .collect();
    h.op.kill();
    h.op.start_again().await.expect("operator restarts");
    for ((c, b), rule) in at_step.iter().zip(&befores).zip(&stalls) {
        let what = format!("{}: the retry answered and its store stalled", c.name);
        eventually(REACH, &what, || async {
            let calls = h.calls(c);
            let answered = calls
                .get(b.calls + 1)
                .and_then(|k| k.outcome.as_ref())
                .is_some();
            let stalled = h.proxy.dropped(*rule) > 0;
            if answered && stalled {
                Ok(())
            } else {
                Err(format!(
                    "{} token calls, retry answered: {answered}, store stalled: {stalled}",
                    calls.len()
                ))
            }
        })
        .await;
        // From outside: the stored mark says the retry is on its way.
        let state = h.secret(&c.state()).await;
        assert!(
            state.contains_key(INFLIGHT_KEY) && state.contains_key("inflight_retry"),
            "{what}: the stored mark does not say the retry was sent: {:?}",
            state.keys().collect::<Vec<_>>()
        );
    }
    h.op.kill();
    let killed = Instant::now();
    h.op.start_again().await.expect("operator restarts");
    for (c, b) in at_step.iter().zip(&befores) {
        let end = settled(h, c, b.calls + c.step_calls()).await;
        let calls = h.calls(c);
        let new_calls = &calls[b.calls..];
        let events: Vec<Option<GrantEvent>> = new_calls
            .iter()
            .map(|k| k.outcome.as_ref().and_then(|o| o.event))
            .collect();
        let answer = match c.window {
            Window::Overlap => GrantEvent::OverlapReissued,
            Window::NoWindow => GrantEvent::ReuseDetected,
        };
        assert_eq!(
            events,
            [Some(GrantEvent::Rotated), Some(answer)],
            "{}: the token was sent a third time",
            c.name
        );
        assert!(
            matches!(&end, Settled::Failed(r) if r == "RefreshResponseLost"),
            "{}: a retry whose answer died with the process must be reported, got {end:?}",
            c.name
        );
        report.push(format!(
            "step 6 {:?}: {} token calls; {end:?} {:.1} s after the second kill",
            c.window,
            new_calls.len(),
            killed.elapsed().as_secs_f64()
        ));
    }
    others.assert_untouched(h);
    check_invariants(h, step).await;
}

#[tokio::test]
async fn sigkill_at_each_refresh_step_loses_nothing_or_says_so() {
    let started = Instant::now();
    let mut h = start().await;
    for c in &h.conns {
        create(&h, c).await;
    }
    for c in &h.conns {
        assert!(
            matches!(settled(&h, c, 1).await, Settled::Ready),
            "{}",
            c.name
        );
        assert_eq!(h.calls(c).len(), 1, "{}: first refresh", c.name);
    }
    let mut report = Vec::new();
    for step in 1..=5u8 {
        let at_step: Vec<&Conn> = h.conns.iter().filter(|c| c.step == step).collect();
        let (befores, others) = start_step(&h, &at_step).await;
        let rules: Vec<Option<RuleId>> = at_step.iter().map(|c| arm(&h, c)).collect();
        for c in &at_step {
            request_refresh(&h, c, &format!("step-{step}")).await;
        }
        let mut reached = Vec::new();
        for ((c, rule), b) in at_step.iter().zip(&rules).zip(&befores) {
            reached.push(reach(&h, c, *rule, b).await);
        }

        h.op.kill();
        let killed = Instant::now();
        let margins: Vec<Duration> = reached
            .iter()
            .map(|r| SystemTime::now().duration_since(*r).unwrap_or_default())
            .collect();
        for (c, b) in at_step.iter().zip(&befores) {
            // Not retried by the dead process itself before the kill (its timeout is 8 s).
            let expected = b.calls + usize::from(step > 1);
            assert_eq!(
                h.calls(c).len(),
                expected,
                "{}: the crash point was passed before the kill",
                c.name
            );
        }
        h.op.start_again().await.expect("operator restarts");

        for ((c, b), margin) in at_step.iter().zip(&befores).zip(&margins) {
            let end = settled(&h, c, b.calls + c.step_calls()).await;
            let took = killed.elapsed();
            let calls = h.calls(c);
            let new_calls = &calls[b.calls..];
            assert_eq!(
                new_calls.len(),
                c.step_calls(),
                "{}: token calls in step {step}",
                c.name
            );
            let events: Vec<Option<GrantEvent>> = new_calls
                .iter()
                .map(|k| k.outcome.as_ref().and_then(|o| o.event))
                .collect();
            if c.expect_lost() {
                assert!(
                    matches!(&end, Settled::Failed(r) if r == "RefreshResponseLost"),
                    "{}: a chain lost at step 3 without a window must be reported, got {end:?}",
                    c.name
                );
                assert_eq!(
                    events,
                    [Some(GrantEvent::Rotated), Some(GrantEvent::ReuseDetected)]
                );
            } else {
                assert!(
                    matches!(end, Settled::Ready),
                    "{} lost its credential at step {step}: {end:?}",
                    c.name
                );
                let stored = h.secret(&c.state()).await["refresh_token"].clone();
                assert_ne!(stored, b.rt, "{}: the chain did not move on", c.name);
                assert_eq!(
                    h.ts(c).refresh_token_state(&b.rt),
                    RefreshTokenState::Spent,
                    "{}",
                    c.name
                );
                let expected_events: &[Option<GrantEvent>] = match step {
                    // The held request never reached the provider's grant logic.
                    2 => &[None, Some(GrantEvent::Rotated)],
                    // The restarted operator's retry of the dead one's token, inside the window.
                    3 => &[Some(GrantEvent::Rotated), Some(GrantEvent::OverlapReissued)],
                    _ => &[Some(GrantEvent::Rotated)],
                };
                assert_eq!(events, expected_events, "{}", c.name);
            }
            report.push(format!(
                "step {step} {:?}: killed {} ms after reaching it; {} token calls; {end:?} {:.1} s after the kill",
                c.window,
                margin.as_millis(),
                new_calls.len(),
                took.as_secs_f64()
            ));
        }
        others.assert_untouched(&h);
        for rule in rules.into_iter().flatten() {
            assert_eq!(h.proxy.held(rule), 1);
        }
        check_invariants(&h, step).await;
    }

    double_crash(&mut h, &mut report).await;

    // No hot loop: after the last step nothing more was sent, also not for the lost chain.
    for c in &h.conns {
        assert_eq!(h.calls(c).len(), 1 + c.step_calls(), "{}", c.name);
    }
    assert_eq!(h.overlap.revocations(), 0, "revocation despite the window");
    assert_eq!(
        h.no_window.revocations(),
        2,
        "only the step-3 and step-6 chains are revoked"
    );
    assert_eq!(h.overlap.pending_faults() + h.no_window.pending_faults(), 0);
    check_invariants(&h, 6).await;
    // The operator logged none of the tokens it handled.
    let logs = h.op.logs();
    for c in &h.conns {
        for k in h.calls(c) {
            // Step 2's held request is never decided.
            let (rt, at) = k
                .outcome
                .map(|o| (o.refresh_token, o.access_token))
                .unwrap_or_default();
            for t in [k.refresh_token, rt, at].into_iter().flatten() {
                assert!(
                    !logs.contains(&t),
                    "{}: a token in the operator's log",
                    c.name
                );
            }
        }
    }
    eprintln!(
        "crash points ({:.0}s):\n{}",
        started.elapsed().as_secs_f64(),
        report.join("\n")
    );
    h.op.stop(Duration::from_secs(10));
    record(Fact::survived(
        "SIGKILL at each step of the refresh protocol (5 steps and a second crash after the retry, × with and without an overlap window)",
        "API fault proxy or token server holds the step's write/request/reply; kill(2) there; restart",
        h.conns.len(),
    ).note("lost and reported as RefreshResponseLost: step 3 without a window, and the second crash after the retry (no third send); exactly the token calls each step needs"));
}
