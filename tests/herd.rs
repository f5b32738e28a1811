//! A herd at the provider (issue 10, scenario 9; fault matrix row 44): connections created
//! together must not keep refreshing together. Measured at the token server, from its own
//! call log, against the real operator process and API server.
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde_json::json;
use support::objects::*;
use support::operator::ensure_operator;
use support::{test_namespace, wait_for};
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, scheduled_per_minute, Invariants,
};
use vaultconn_testkit::token_server::{RecordedCall, TokenServer, TokenServerConfig};

/// Connections created together.
const N: usize = 60;
/// Their token lifetime: the refresh window is [3 s, 20.1 s] after issue (10 % and 67 %).
const TTL: Duration = Duration::from_secs(30);
/// Most refresh requests the provider may see within one second. Spread evenly over the 17 s
/// window, 60 connections are 3.5 per second; their phases come from hashes of their names,
/// so not perfectly even: over 3,000 simulated random namespaces the busiest second held at
/// most 14. The 0–5 % jitter this replaced put all 60 into the ~3 s after 19.2 s (creation
/// spread included): at least 23 in one second over 300 simulated namespaces, 30–40 typical.
const MAX_PER_SECOND: usize = 16;

fn client(i: usize) -> String {
    format!("herd-{i}")
}

/// Arrival times at the token server per client, in order.
fn arrivals(calls: &[RecordedCall]) -> BTreeMap<String, Vec<SystemTime>> {
    let mut by: BTreeMap<String, Vec<SystemTime>> = BTreeMap::new();
    for c in calls {
        if let Some(id) = &c.client_id {
            by.entry(id.clone()).or_default().push(c.at);
        }
    }
    for v in by.values_mut() {
        v.sort();
    }
    by
}

/// Most instants within any one second (a sliding window).
fn busiest_second(times: &mut [SystemTime]) -> usize {
    times.sort();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]).unwrap_or_default() >= Duration::from_secs(1) {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[tokio::test]
async fn connections_created_together_refresh_spread_out() {
    ensure_operator().await;
    let ns = test_namespace("herd").await;
    let ts = TokenServer::start(
        (0..N)
            .fold(TokenServerConfig::default(), |c, i| {
                c.with_client(client(i), "herd-SECRET-value")
            })
            .with_ttl(TTL),
    )
    .await
    .unwrap();
    // Created together: all credentials Secrets and connections at once.
    futures::future::join_all((0..N).map(|i| {
        let (ns, ts) = (&ns, &ts);
        async move {
            let creds = format!("c-{i}-creds");
            put_secret(
                ns,
                &creds,
                &[
                    ("client_id", &client(i)),
                    ("client_secret", "herd-SECRET-value"),
                ],
            )
            .await;
            apply_vc(
                ns,
                &format!("c-{i}"),
                json!({"type": "oauth2", "credentialsRef": {"name": creds},
                       "oauth2": {"tokenUrl": ts.token_url()}}),
            )
            .await;
        }
    }))
    .await;

    // Until every connection has made its first token request and one refresh after it (the
    // last refresh point is at most 20.1 s after the last first token).
    wait_for(
        Duration::from_secs(60),
        "every connection refreshed once after its first token",
        || async {
            let calls = ts.calls();
            let by = arrivals(&calls);
            by.len() == N
                && by.values().all(|t| t.len() >= 2)
                && calls.iter().all(|c| c.outcome.is_some())
        },
    )
    .await;

    let calls = ts.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.outcome.as_ref().and_then(|o| o.status) == Some(200)),
        "every token request succeeded"
    );
    let by = arrivals(&calls);
    let mut refreshes: Vec<SystemTime> = Vec::new();
    for (id, times) in &by {
        // The first refresh lies in the window the schedule promises, as the provider saw it:
        // not before 10 % of the lifetime (less 1 s: issue times are stored in whole seconds),
        // never after 67 % (plus up to 3 s for the reconcile and the request to arrive).
        let gap = times[1].duration_since(times[0]).unwrap_or_default();
        assert!(
            gap >= Duration::from_millis(1900) && gap <= Duration::from_millis(23_100),
            "{id}: first refresh {gap:?} after its first token"
        );
        refreshes.extend(&times[1..]);
    }
    let busiest = busiest_second(&mut refreshes);
    println!(
        "{} refresh requests from {N} connections; busiest second at the provider: {busiest}",
        refreshes.len()
    );
    assert!(
        busiest <= MAX_PER_SECOND,
        "{busiest} of {} refresh requests reached the provider within one second",
        refreshes.len()
    );
    // The provider's own record: no replay or revocation, and per client no more requests in
    // any minute than the schedule of 30 s tokens allows plus the one early refresh that moves a
    // new token into its phase.
    assert_provider_invariants(
        &ts.provider_record(),
        &Invariants::new(scheduled_per_minute(Duration::from_secs(30)) + 1),
    );
}
