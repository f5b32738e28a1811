//! HA proven against a real OAuth server (issue 11, "HA proven"): two electing operators, as the
//! chart's ServiceAccount with the chart's RBAC, against oidc-provider with refresh-token
//! rotation and no overlap window (a second use of a refresh token revokes its grant). The
//! leader is SIGKILLed; the standby takes over and keeps refreshing; oidc-provider's own record
//! shows no refresh token presented twice and no grant revoked.
//!
//! A binary of its own: `oidc_cluster.rs` runs a shared, unelected, cluster-wide operator that
//! would be a third writer of these connections.
mod chart_support;
mod support;

use std::time::{Duration, SystemTime};

use serde_json::json;
use support::objects::{apply_vc, put_secret, ready, stored_refresh_token};
use support::own_operator::{assert_one_leads, log_dir, own_operator_options, wait_for_holder};
use support::{cluster, test_namespace, wait_for};
use vaultconn_testkit::oidc::{OidcOptions, OidcProvider, RT_CLIENT};
use vaultconn_testkit::operator::OperatorProcess;
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, scheduled_per_minute, Invariants,
};

use chart_support::{
    apply_namespaced_rbac, render_namespaced, rendered_operator_args, rendered_service_account,
    service_account_login, service_account_via_proxy,
};

const RELEASE: &str = "ha";
const LEASE: &str = "ha-vaultconn";
const CONNECTIONS: usize = 2;
const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(4);

/// An operator named `instance` with the chart's arguments for this namespace, electing on a
/// 6 s Lease. The token request timeout is cut from the chart's 15 s to 3 s: a new leader waits
/// out a killed leader's call in flight for twice that plus 5 s.
async fn operator(
    instance: &str,
    chart_args: &[String],
    kubeconfig: &std::path::Path,
) -> OperatorProcess {
    let mut args: Vec<String> = chart_args
        .iter()
        .filter(|a| !a.starts_with("--token-request-timeout"))
        .cloned()
        .collect();
    args.extend(
        [
            "--lease-duration",
            "6s",
            "--token-request-timeout",
            "3s",
            "--instance",
            instance,
        ]
        .map(String::from),
    );
    let logs = log_dir(cluster().await.dir());
    let log_path = logs.join(format!("operator-oidc-ha-{instance}.log"));
    // `own_operator_options` adds `--allow-http-loopback` (the provider is on 127.0.0.1).
    OperatorProcess::start(own_operator_options(
        kubeconfig.to_path_buf(),
        log_path,
        &args,
    ))
    .await
    .expect("the operator starts as the chart's ServiceAccount")
}

/// The provider-side invariants on oidc-provider's record so far (panics with its call log).
async fn check_provider(idp: &OidcProvider) -> vaultconn_testkit::oidc::OidcEvents {
    let events = idp.events().await.expect("provider events");
    // The schedule of 4 s tokens plus the seed exchange, per connection; both share RT_CLIENT.
    let bound = CONNECTIONS * (scheduled_per_minute(ACCESS_TOKEN_TTL) + 1);
    assert_provider_invariants(
        &events.provider_record(&format!("oidc-provider {}", idp.base_url())),
        &Invariants::new(bound),
    );
    events
}

/// `wait_for`, but a timeout first shows what oidc-provider saw: a connection that stopped
/// refreshing is most often one whose grant a replay got revoked.
async fn wait_or_explain<F, Fut>(idp: &OidcProvider, timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        if tokio::time::Instant::now() >= deadline {
            check_provider(idp).await;
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_of_the_leader_the_standby_refreshes_on_without_replay_at_oidc_provider() {
    let ns = test_namespace("oidc-ha").await;
    // The chart's RBAC for a release watching this namespace, its Lease in the same namespace.
    let objs = render_namespaced(RELEASE, &ns.name).await;
    apply_namespaced_rbac(&ns, &objs).await;
    let sa = rendered_service_account(&objs);
    let (_, kubeconfig_a) = service_account_login(&ns, &sa).await;
    // The standby-to-be talks through a proxy, so that what it sends can be counted.
    let (proxy_b, kubeconfig_b) = service_account_via_proxy(&ns, &sa, "b").await;
    let chart_args = rendered_operator_args(&objs);
    for flag in ["--leader-elect", "--namespaces="] {
        assert!(
            chart_args.iter().any(|a| a.starts_with(flag)),
            "{chart_args:?}"
        );
    }
    // Rotation on, no overlap window: the provider revokes a grant whose spent refresh token
    // comes back.
    let idp = OidcProvider::start(OidcOptions {
        rotate: true,
        access_token_ttl_secs: ACCESS_TOKEN_TTL.as_secs(),
    })
    .await
    .expect("oidc-provider starts");

    let mut a = operator("a", &chart_args, &kubeconfig_a).await;
    wait_for_holder(
        &ns,
        LEASE,
        "a",
        Duration::from_secs(30),
        "a holds the Lease",
    )
    .await;
    let mut b = operator("b", &chart_args, &kubeconfig_b).await;

    let mut names = Vec::new();
    for i in 0..CONNECTIONS {
        let seed = idp
            .mint_refresh_token()
            .await
            .expect("a seed refresh token");
        let creds = format!("crm-{i}-creds");
        put_secret(
            &ns,
            &creds,
            &[
                ("client_id", RT_CLIENT.id),
                ("client_secret", RT_CLIENT.secret),
                ("refresh_token", &seed),
            ],
        )
        .await;
        let name = format!("crm-{i}");
        apply_vc(
            &ns,
            &name,
            json!({"type": "oauth2", "credentialsRef": {"name": creds},
                "oauth2": {"tokenUrl": idp.token_url(), "grantType": "refreshToken"}}),
        )
        .await;
        names.push(name);
    }
    for name in &names {
        ready(&ns, name).await;
    }
    let grants: Vec<String> = idp
        .events()
        .await
        .expect("provider events")
        .mints
        .iter()
        .filter_map(|m| m.grant_id.clone())
        .collect();
    assert_eq!(grants.len(), CONNECTIONS, "one grant per connection");
    // The leader refreshes on its schedule (the seed exchange, then rotations).
    let refreshed = |since: SystemTime, n: usize| {
        let (idp, grants) = (&idp, &grants);
        async move {
            let per_grant = idp
                .events()
                .await
                .map(|e| e.refreshes_since(since))
                .unwrap_or_default();
            grants
                .iter()
                .all(|g| per_grant.get(g).copied().unwrap_or(0) >= n)
        }
    };
    let epoch = SystemTime::UNIX_EPOCH;
    wait_or_explain(
        &idp,
        Duration::from_secs(60),
        "every grant refreshed twice by the leader",
        || refreshed(epoch, 2),
    )
    .await;
    // Exactly one leads: the other stands by, and the API server saw no write from it but
    // its Lease requests (no state Secret, no in-flight mark, no status, no Event).
    assert_one_leads(&a, &b, &proxy_b).await;

    a.kill();
    let killed_at = SystemTime::now();
    wait_for_holder(
        &ns,
        LEASE,
        "b",
        Duration::from_secs(40),
        "b takes over the Lease",
    )
    .await;
    let took_over = killed_at.elapsed().unwrap_or_default();
    eprintln!("b took over {took_over:?} after the SIGKILL (lease duration 6 s)");
    wait_or_explain(
        &idp,
        Duration::from_secs(60),
        "every grant refreshed twice after the kill",
        || refreshed(killed_at, 2),
    )
    .await;
    assert_eq!(b.metric("vaultconn_leader").await, Some(1.0));
    for name in &names {
        ready(&ns, name).await;
        // The token read may be rotated before it is introspected (refreshes every ~2.5 s):
        // read again until one is seen live; a stored spent token would never be.
        wait_for(
            Duration::from_secs(20),
            &format!("{name}: the stored refresh token works at the provider"),
            || async {
                let Some(stored) = stored_refresh_token(&ns, name).await else {
                    return false;
                };
                idp.is_refresh_token_live(&stored).await.unwrap_or(false)
            },
        )
        .await;
    }

    // oidc-provider's own record: no replay, no revocation, the rate of the schedule; and,
    // plainly, no refresh token presented twice and nothing refused.
    let events = check_provider(&idp).await;
    assert_eq!(
        events.refresh_tokens_presented_twice(),
        Default::default(),
        "refresh tokens presented twice (fingerprint → provider request numbers)"
    );
    assert_eq!(events.grant_revoked, 0, "oidc-provider revoked a grant");
    assert_eq!(
        events.grant_error, 0,
        "oidc-provider refused a token request"
    );
    assert!(
        b.stop(Duration::from_secs(30)),
        "b exits cleanly on SIGTERM"
    );
}
