//! Write fights: another writer keeps putting its own content into the connection's generated
//! Secret (a second controller, a GitOps self-heal, a script). The operator must not answer
//! every revert with a repair forever: it repairs at most its budget (3 repairs within 10 min),
//! then stops, says so in the status (`SecretContested`, naming the Secret and what to do) and
//! retries with a backoff; a change by the user (here: a spec edit) gives it a new budget.
//!
//! What the API server saw is the proof: the operator reaches it through the recording proxy
//! of `tests/support/operator.rs`, whose log counts the operator's writes to the Secret, its
//! status writes and its Events. The fighter uses its own client (not behind the proxy), so
//! its writes are not counted as the operator's; it counts its own.
//!
//! The state Secret of an OAuth connection is fought over too (labels, annotations and data
//! reverted to a snapshot), counting token requests at the token server: the rotation code must
//! not spend tokens in a fight.
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;
use support::objects::*;
use support::operator::{ensure_operator, writes_in_namespace};
use support::{test_namespace, TestNs};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vaultconn_testkit::leak_scan::register_secret;
use vaultconn_testkit::reliability::{self, Fact};
use vaultconn_testkit::token_server::{TokenServer, TokenServerConfig};

/// The operator's repair budget (README, "Write fights"): repairs within the window.
const REPAIR_BUDGET: usize = 3;
/// How long the fight is watched. The operator's first backoff (1 min) is longer, so no
/// retry falls into it: every write the operator makes in it is one of its budget.
const FIGHT: Duration = Duration::from_secs(15);
const REASON: &str = "SecretContested";

/// Watches Secret `name` and calls `act` with each version it sees (no timers) until `stop`;
/// returns how many times `act` said the API server accepted its write.
fn on_each_version<F, Fut>(
    client: kube::Client,
    ns: &str,
    name: &str,
    mut stop: watch::Receiver<bool>,
    act: F,
) -> JoinHandle<usize>
where
    F: Fn(Api<Secret>, String, Secret) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let api: Api<Secret> = Api::namespaced(client, ns);
    let name = name.to_string();
    tokio::spawn(async move {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(api.clone(), cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        let mut accepted = 0;
        loop {
            let live = tokio::select! {
                _ = stop.wait_for(|s| *s) => return accepted,
                ev = events.try_next() => match ev {
                    Ok(Some(s)) => s,
                    Ok(None) => return accepted,
                    Err(_) => continue,
                },
            };
            if act(api.clone(), name.clone(), live).await {
                accepted += 1;
            }
        }
    })
}

/// A writer that rewrites Secret `name` whenever `fix` says it differs from what it wants
/// (`fix` returns the object to write), as soon as its own watch shows the change.
/// Returns how many writes the API server accepted from it.
fn fighter(
    client: kube::Client,
    ns: &str,
    name: &str,
    fix: impl Fn(&Secret) -> Option<Secret> + Send + Sync + 'static,
    stop: watch::Receiver<bool>,
) -> JoinHandle<usize> {
    let fix = std::sync::Arc::new(fix);
    on_each_version(client, ns, name, stop, move |api, name, live| {
        let fix = fix.clone();
        async move {
            let Some(mut mine) = fix(&live) else {
                return false;
            };
            mine.metadata.managed_fields = None;
            // A 409 means the Secret changed meanwhile: its watch event comes next.
            api.replace(&name, &PostParams::default(), &mine)
                .await
                .is_ok()
        }
    })
}

/// A fighter's `fix` that keeps the metadata as it finds it and puts `content` into `data`,
/// like a tool that manages only `data`.
fn data_is(content: BTreeMap<String, ByteString>) -> impl Fn(&Secret) -> Option<Secret> {
    move |live| {
        (live.data.as_ref() != Some(&content)).then(|| Secret {
            data: Some(content.clone()),
            ..live.clone()
        })
    }
}

fn bytes(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// The operator's writes to Secret `name` (a create is a POST to the collection, counted when
/// the Secret did not exist: `creates`), its status writes and its Events, so far.
struct Writes {
    secret: usize,
    status: usize,
    events: usize,
}

async fn operator_writes(ns: &TestNs, secret: &str, vc: &str) -> Writes {
    let all = writes_in_namespace(&ns.name).await;
    let secret_path = format!("/namespaces/{}/secrets/{secret}", ns.name);
    let create = format!("POST /api/v1/namespaces/{}/secrets", ns.name);
    Writes {
        secret: all
            .iter()
            .filter(|w| w.ends_with(&secret_path) || **w == create)
            .count(),
        status: all
            .iter()
            .filter(|w| w.ends_with(&format!("/vaultconnections/{vc}/status")))
            .count(),
        events: all.iter().filter(|w| w.contains("/events")).count(),
    }
}

/// One fight over the generated Secret `target` of bearerToken connection `vc`, whose
/// fighter's content is `theirs`. `adopt`: the Secret existed before (with `theirs`) and is
/// adopted; else the operator creates it.
async fn fight_over_the_target(ns: &TestNs, adopt: bool) {
    ensure_operator().await;
    let (vc, target) = ("conn", "out");
    let ours = format!("ours-{}", rand::random::<u64>());
    let theirs = format!("theirs-{}", rand::random::<u64>());
    register_secret(&theirs, "the fighter's token");
    put_secret(ns, "creds", &[("token", &ours)]).await;
    let fighter_content = bytes(&[("token", &theirs)]);
    if adopt {
        let s = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(target.into()),
                ..Default::default()
            },
            data: Some(fighter_content.clone()),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        ns.api::<Secret>()
            .create(&PostParams::default(), &s)
            .await
            .unwrap();
    }
    let spec = json!({"type": "bearerToken", "credentialsRef": {"name": "creds"},
        "target": {"name": target, "adopt": adopt}});
    apply_vc(ns, vc, spec.clone()).await;
    ready(ns, vc).await;
    let our_data = map(&[
        ("token", &ours),
        ("authorization", &format!("Bearer {ours}")),
    ]);
    secret_data_eq(ns, target, our_data.clone()).await;
    let before = operator_writes(ns, target, vc).await;
    // (An adoption may first try a create, answered 409: every request counts.)
    assert!(
        before.secret >= 1,
        "the operator wrote {target} before the fight"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let fight = fighter(
        support::client().await,
        &ns.name,
        target,
        data_is(fighter_content.clone()),
        stop_rx,
    );
    // The measured window (not a synchronisation: the counts over it are the result).
    tokio::time::sleep(FIGHT).await;
    let during = operator_writes(ns, target, vc).await;
    let _ = stop_tx.send(true);
    let fighter_writes = fight.await.unwrap();
    let repairs = during.secret - before.secret;
    eprintln!(
        "fight over {target} (adopt {adopt}): operator {repairs} writes to it, {} status writes, {} Event writes; fighter {fighter_writes} writes",
        during.status - before.status,
        during.events - before.events,
    );
    assert!(
        repairs <= REPAIR_BUDGET,
        "the operator wrote {target} {repairs} times in the fight (the fighter {fighter_writes} times); at most {REPAIR_BUDGET} repairs"
    );
    assert!(
        fighter_writes >= repairs,
        "the fighter answered every repair"
    );
    assert!(
        during.status - before.status <= 3,
        "status writes in the fight: {}",
        during.status - before.status
    );
    assert!(
        during.events - before.events <= REPAIR_BUDGET + 2,
        "Event writes in the fight: {} (one per repair and one per state change at most)",
        during.events - before.events
    );
    // The operator gave up within its budget, and the status says so.
    let contested = with_reason(ns, vc, REASON).await;
    let msg = message(&contested);
    assert!(
        msg.contains(&format!("Secret {}/{target}", ns.name))
            && msg.contains("another writer")
            && msg.contains("spec.target.name"),
        "message names the Secret, the other writer and what to do: {msg}"
    );
    for value in [&ours, &theirs] {
        assert!(!msg.contains(value.as_str()), "no secret value in {msg}");
    }
    let visible = visible_text(ns).await;
    for value in [&ours, &theirs] {
        assert!(
            !visible.contains(value.as_str()),
            "a secret value in the status, Events or log"
        );
    }

    // The fighter is gone; the user edits the spec (a field that changes nothing written):
    // the operator repairs the Secret once and is Ready again.
    let mut edited = spec;
    edited["suspend"] = json!(false);
    apply_vc(ns, vc, edited).await;
    ready(ns, vc).await;
    secret_data_eq(ns, target, our_data).await;
    let after = operator_writes(ns, target, vc).await;
    assert_eq!(
        after.secret - during.secret,
        1,
        "one repair after the spec edit"
    );
    reliability::record(
        Fact::survived(
            format!(
                "Another writer reverting the {} Secret's data on every change",
                if adopt { "adopted (Opaque, ownerless)" } else { "generated" }
            ),
            format!("a watch-driven fighter with its own client, {}s fight; operator writes counted by the API proxy", FIGHT.as_secs()),
            fighter_writes,
        )
        .note(format!(
            "{repairs} repairs (budget {REPAIR_BUDGET}), then `{REASON}`; {} status and {} Event writes in the fight; 1 repair after the spec edit",
            during.status - before.status,
            during.events - before.events
        )),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_secret_another_writer_reverts_is_repaired_only_within_the_budget() {
    let ns = test_namespace("fight-adopt").await;
    fight_over_the_target(&ns, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_secret_another_writer_rewrites_is_repaired_only_within_the_budget() {
    let ns = test_namespace("fight-gen").await;
    fight_over_the_target(&ns, false).await;
}

const CLIENT: &str = "fight-app";
const CLIENT_SECRET: &str = "fight-client-SECRET";

/// A client-credentials connection `conn` against a fresh token server issuing tokens that
/// live `ttl`; returns the server once the connection is Ready.
async fn oauth_connection(ns: &TestNs, ttl: Duration) -> TokenServer {
    ensure_operator().await;
    let ts = TokenServer::start(
        TokenServerConfig::default()
            .with_client(CLIENT, CLIENT_SECRET)
            .with_ttl(ttl),
    )
    .await
    .unwrap();
    put_secret(
        ns,
        "creds",
        &[("client_id", CLIENT), ("client_secret", CLIENT_SECRET)],
    )
    .await;
    apply_vc(
        ns,
        "conn",
        json!({"type": "oauth2", "credentialsRef": {"name": "creds"},
            "oauth2": {"tokenUrl": ts.token_url()}}),
    )
    .await;
    ready(ns, "conn").await;
    ts
}

/// The note of the operator's `SecretContested` Event in `ns` (waits for it).
async fn contested_event_note(ns: &TestNs) -> String {
    support::wait_for_some(WAIT, "a SecretContested Event", || async {
        ns.api::<Event>()
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(REASON))
            .and_then(|e| e.note)
    })
    .await
}

/// The operator's writes to the state Secret of `conn` (its creates are not expected here).
async fn state_writes(ns: &TestNs) -> usize {
    let path = format!("/namespaces/{}/secrets/conn-vaultconn-state", ns.name);
    writes_in_namespace(&ns.name)
        .await
        .iter()
        .filter(|w| w.ends_with(&path))
        .count()
}

/// Another writer keeps the state Secret's labels and annotations its way (its own label, and
/// vaultconn's content-hash annotation and role label overwritten): the operator writes the
/// state Secret only to store new tokens, so a metadata fight costs it nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_secret_metadata_fight_costs_no_write_and_no_token() {
    let ns = test_namespace("fight-state-meta").await;
    let ts = oauth_connection(&ns, Duration::from_secs(3600)).await;
    let (calls, writes) = (ts.call_count(), state_writes(&ns).await);
    let (stop_tx, stop_rx) = watch::channel(false);
    let fix = |live: &Secret| {
        let mut s = live.clone();
        let labels = s.metadata.labels.get_or_insert_with(Default::default);
        labels.insert("fighter.example/owner".into(), "me".into());
        labels.insert("vaultconn.dev/secret-role".into(), "mine".into());
        let ann = s.metadata.annotations.get_or_insert_with(Default::default);
        ann.insert("vaultconn.dev/content-hash".into(), "mine".into());
        (s.metadata.labels != live.metadata.labels
            || s.metadata.annotations != live.metadata.annotations)
            .then_some(s)
    };
    let fight = fighter(
        support::client().await,
        &ns.name,
        "conn-vaultconn-state",
        fix,
        stop_rx,
    );
    // The measured window.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (calls, writes) = (ts.call_count() - calls, state_writes(&ns).await - writes);
    let _ = stop_tx.send(true);
    let fighter_writes = fight.await.unwrap();
    eprintln!("state metadata fight: operator {writes} state writes, {calls} token calls; fighter {fighter_writes} writes");
    assert!(fighter_writes >= 1, "the fighter changed the metadata");
    assert_eq!(
        (writes, calls),
        (0, 0),
        "state writes and token calls in the fight"
    );
    ready(&ns, "conn").await;
}

/// Another writer keeps rolling the state Secret's data back to a snapshot (a backup restore
/// or a GitOps self-heal that captured it once) whose access token is due for refresh: every
/// rollback would make the operator request a token and store it, forever. The token server
/// counts the requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_secret_rolled_back_to_a_snapshot_spends_tokens_only_within_the_budget() {
    let ns = test_namespace("fight-state-data").await;
    // Tokens of 12 s are renewed after about 8 s: the snapshot is due within the fight.
    let ts = oauth_connection(&ns, Duration::from_secs(12)).await;
    let snapshot = ns
        .api::<Secret>()
        .get("conn-vaultconn-state")
        .await
        .unwrap()
        .data
        .unwrap_or_default();
    let (calls, writes) = (ts.call_count(), state_writes(&ns).await);
    let (stop_tx, stop_rx) = watch::channel(false);
    let fight = fighter(
        support::client().await,
        &ns.name,
        "conn-vaultconn-state",
        data_is(snapshot),
        stop_rx,
    );
    tokio::time::sleep(FIGHT).await;
    let (calls, writes) = (ts.call_count() - calls, state_writes(&ns).await - writes);
    let _ = stop_tx.send(true);
    let fighter_writes = fight.await.unwrap();
    eprintln!("state data fight: operator {writes} state writes, {calls} token calls; fighter {fighter_writes} writes");
    // On schedule alone (refreshes go on while repairs are stopped): a refresh every ~8 s
    // (tokens of 12 s), at most 3 in the window counting jitter; the rest are repairs (token
    // requests the rollbacks asked for), at most the budget.
    let bound = 3 + REPAIR_BUDGET;
    assert!(
        calls <= bound,
        "{calls} token requests in the {FIGHT:?} fight (the fighter wrote {fighter_writes} times); at most {bound}"
    );
    assert!(
        writes <= bound,
        "{writes} state writes in the fight; at most {bound}"
    );
    // Said once, when the block began (its Event): by now a refresh on schedule may have
    // turned the status Ready again, as it should while repairs are stopped.
    let msg = contested_event_note(&ns).await;
    assert!(
        msg.contains(&format!("Secret {}/conn-vaultconn-state", ns.name))
            && msg.contains("another writer"),
        "message names the state Secret and the other writer: {msg}"
    );
    // The fighter is gone; the user edits the spec: the operator refreshes and is Ready.
    apply_vc(
        &ns,
        "conn",
        json!({"type": "oauth2", "credentialsRef": {"name": "creds"}, "suspend": false,
            "oauth2": {"tokenUrl": ts.token_url()}}),
    )
    .await;
    ready(&ns, "conn").await;
    reliability::record(
        Fact::survived(
            "Another writer rolling the token state Secret's data back to a snapshot on every change",
            format!("a watch-driven fighter with its own client, {}s fight, client-credentials tokens of 12 s; token requests counted by the token server", FIGHT.as_secs()),
            fighter_writes,
        )
        .note(format!("{calls} token requests and {writes} state writes in the fight (bound {bound}: the schedule plus {REPAIR_BUDGET} repairs), then `{REASON}`; a metadata-only fight: 0 writes, 0 token requests")),
    );
}

/// A client that deletes Secret `name` whenever its watch shows it (a cleanup job or a GitOps
/// prune that considers it unwanted). Returns how many deletes the API server accepted.
fn deleter(
    client: kube::Client,
    ns: &str,
    name: &str,
    stop: watch::Receiver<bool>,
) -> JoinHandle<usize> {
    on_each_version(client, ns, name, stop, |api, name, _| async move {
        api.delete(&name, &Default::default()).await.is_ok()
    })
}

/// The operator's creates of Secrets in `ns` (POSTs to the collection): with the target
/// Secret in place, creates of the state Secret.
async fn secret_creates(ns: &TestNs) -> usize {
    let create = format!("POST /api/v1/namespaces/{}/secrets", ns.name);
    writes_in_namespace(&ns.name)
        .await
        .iter()
        .filter(|w| **w == create)
        .count()
}

/// Another writer deletes the state Secret as soon as it appears. The operator writes it
/// again from the copy in its memory (no token request), but that is a repair like any other.
/// Measured before the budget applied to it: 858 creates in the 15 s fight (860 deletes). Now
/// at most the budget, then `SecretContested` saying the tokens are only in memory; an edit of
/// the connection writes it again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_secret_deleted_on_sight_is_written_again_only_within_the_budget() {
    let ns = test_namespace("fight-state-delete").await;
    let ts = oauth_connection(&ns, Duration::from_secs(3600)).await;
    let (calls, creates) = (ts.call_count(), secret_creates(&ns).await);
    let (stop_tx, stop_rx) = watch::channel(false);
    let fight = deleter(
        support::client().await,
        &ns.name,
        "conn-vaultconn-state",
        stop_rx,
    );
    tokio::time::sleep(FIGHT).await;
    let (calls, creates) = (ts.call_count() - calls, secret_creates(&ns).await - creates);
    let _ = stop_tx.send(true);
    let deletes = fight.await.unwrap();
    eprintln!("state deletion fight: operator {creates} creates, {calls} token calls; fighter {deletes} deletes");
    assert!(deletes >= 1, "the fighter deleted the state Secret");
    assert!(
        creates <= REPAIR_BUDGET,
        "{creates} creates of the state Secret in the {FIGHT:?} fight ({deletes} deletes); at most {REPAIR_BUDGET}"
    );
    assert_eq!(calls, 0, "token requests in the fight");
    let contested = with_reason(&ns, "conn", REASON).await;
    let msg = message(&contested);
    assert!(
        msg.contains(&format!("Secret {}/conn-vaultconn-state", ns.name))
            && msg.contains("keeps being deleted")
            && msg.contains("only in this operator process"),
        "message names the state Secret, the deletions and where the tokens are: {msg}"
    );
    // The fighter is gone; the user edits the spec: the state is written again, Ready.
    apply_vc(
        &ns,
        "conn",
        json!({"type": "oauth2", "credentialsRef": {"name": "creds"}, "suspend": false,
            "oauth2": {"tokenUrl": ts.token_url()}}),
    )
    .await;
    ready(&ns, "conn").await;
    support::wait_for(WAIT, "the state Secret written again", || async {
        ns.api::<Secret>()
            .get_opt("conn-vaultconn-state")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    reliability::record(
        Fact::survived(
            "Another writer deleting the token state Secret whenever it appears",
            format!("a watch-driven deleter with its own client, {}s fight, client-credentials tokens of 1 h; creates counted at the API proxy, token requests at the token server", FIGHT.as_secs()),
            deletes,
        )
        .note(format!("{creates} creates (budget {REPAIR_BUDGET}) and {calls} token requests in the fight, then `{REASON}` (tokens held in memory); an edit writes it again")),
    );
}
