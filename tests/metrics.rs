//! Cluster test of the per-connection metric series on the real operator's `/metrics`: they
//! appear with the connection, follow its phase, agree with what the token server issued, and
//! leave with it (an alert on a deleted connection would otherwise fire forever).
//!
//! One test only: the phase counts are per operator process (one per test binary), so a second
//! test creating connections in parallel would move them.
mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use serde_json::json;
use support::objects::*;
use support::operator::{ensure_operator, operator_metrics_text};
use support::test_namespace;
use vaultconn::api::VaultConnection;
use vaultconn_testkit::operator::parse_metric;
use vaultconn_testkit::token_server::{TokenServer, TokenServerConfig};

const CLIENT: &str = "app";
const CLIENT_SECRET: &str = "client-SECRET-value";

fn series(metric: &str, ns: &str, name: &str) -> String {
    format!("{metric}{{namespace=\"{ns}\",name=\"{name}\"}}")
}

fn phase_count(text: &str, phase: &str) -> f64 {
    parse_metric(text, &format!("vaultconn_connections{{phase=\"{phase}\"}}")).unwrap_or(-1.0)
}

/// Wait until the operator's metrics satisfy `f`; panics with the last text otherwise.
async fn metrics_where(what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = operator_metrics_text().await;
        if f(&text) {
            return text;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {WAIT:?} waiting for {what}; /metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[tokio::test]
async fn connection_series_follow_pending_ready_and_leave_on_delete() {
    ensure_operator().await;
    let ns = test_namespace("metrics").await;
    let ts = TokenServer::start(TokenServerConfig::default().with_client(CLIENT, CLIENT_SECRET))
        .await
        .unwrap();
    let base = operator_metrics_text().await;
    let (pending0, ready0) = (phase_count(&base, "Pending"), phase_count(&base, "Ready"));
    assert!(
        pending0 >= 0.0 && ready0 >= 0.0,
        "vaultconn_connections{{phase}} series exist from the start:\n{base}"
    );
    assert!(
        base.contains(&format!(
            "vaultconn_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "build info:\n{base}"
    );
    assert_eq!(parse_metric(&base, "vaultconn_leader"), Some(1.0));

    // Pending: no credentials Secret yet.
    let spec = json!({"type": "oauth2", "credentialsRef": {"name": "creds"}, "oauth2": {"tokenUrl": ts.token_url()}});
    apply_vc(&ns, "api", spec).await;
    with_reason(&ns, "api", "CredentialsMissing").await;
    let ready_series = series("vaultconn_connection_ready", &ns.name, "api");
    let status_pending = format!(
        "vaultconn_connection_status{{namespace=\"{}\",name=\"api\",phase=\"Pending\",reason=\"CredentialsMissing\"}}",
        ns.name
    );
    let text = metrics_where("the Pending connection's series", |t| {
        parse_metric(t, &ready_series) == Some(0.0) && parse_metric(t, &status_pending) == Some(1.0)
    })
    .await;
    assert_eq!(phase_count(&text, "Pending"), pending0 + 1.0, "{text}");
    let expiry_series = series("vaultconn_token_expiry_timestamp_seconds", &ns.name, "api");
    assert_eq!(parse_metric(&text, &expiry_series), None, "no token yet");

    // Ready once the credentials exist.
    put_secret(
        &ns,
        "creds",
        &[("client_id", CLIENT), ("client_secret", CLIENT_SECRET)],
    )
    .await;
    let vc = ready(&ns, "api").await;
    let next_series = series(
        "vaultconn_connection_next_refresh_timestamp_seconds",
        &ns.name,
        "api",
    );
    let text = metrics_where("the Ready connection's series", |t| {
        parse_metric(t, &ready_series) == Some(1.0)
            && parse_metric(t, &expiry_series).is_some()
            && parse_metric(t, &next_series).is_some()
    })
    .await;
    assert!(
        !text.contains(&status_pending),
        "old status series left:\n{text}"
    );
    assert_eq!(phase_count(&text, "Pending"), pending0, "{text}");
    assert_eq!(phase_count(&text, "Ready"), ready0 + 1.0, "{text}");
    // The expiry is the one the token server gave the token in the Secret (whole seconds).
    let secret = ns.api::<Secret>().get("api").await.unwrap();
    let token = data_of(&secret)["access_token"].clone();
    let issued_expiry = unix(ts.access_token_expiry(&token).expect("server issued it"));
    let exported = parse_metric(&text, &expiry_series).unwrap_or_default();
    assert!(
        (exported - issued_expiry).abs() <= 1.0,
        "exported expiry {exported} vs issued {issued_expiry}"
    );
    // The next refresh is the status' nextRefreshTime, before the expiry.
    let status = vc.status.unwrap_or_default();
    let next: jiff::Timestamp = status
        .next_refresh_time
        .as_deref()
        .expect("nextRefreshTime")
        .parse()
        .unwrap();
    assert_eq!(
        parse_metric(&text, &next_series),
        Some(next.as_second() as f64)
    );
    assert!((next.as_second() as f64) < exported);
    assert!(
        parse_metric(&text, "vaultconn_reconcile_duration_seconds_count").unwrap_or(0.0) >= 2.0,
        "reconcile durations are recorded:\n{text}"
    );

    // Deleted: every series naming it goes, and it no longer counts.
    ns.api::<VaultConnection>()
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    let needle = format!("namespace=\"{}\"", ns.name);
    let text = metrics_where("the deleted connection's series to go", |t| {
        !t.contains(&needle)
    })
    .await;
    assert_eq!(phase_count(&text, "Ready"), ready0, "{text}");
    assert_eq!(phase_count(&text, "Pending"), pending0, "{text}");
}
