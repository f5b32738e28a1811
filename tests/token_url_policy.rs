//! Cluster tests of the token URL policy (issue 10): a token host on a private network is
//! refused before anything is sent, with a reason that says what to do; transport failures
//! reach the status and Events only as their class, the transport's own text only the log;
//! TLS to the token endpoint is verified, against `caBundleRef` when given.
//!
//! Loopback only, even if the policy were broken: the operator runs with
//! `--token-url-private-ranges-for-tests` (hidden), so loopback addresses in [`PRIVATE`] stand
//! in for a private network, and listeners there count every connection the operator opens.
//! The allow-list below only configures the operator; no connection names its entries.
mod support;

use std::net::TcpListener;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use serde_json::json;
use support::objects::*;
use support::{test_namespace, wait_for_some, TestNs};
use tokio::sync::OnceCell;
use vaultconn::api::Phase;
use vaultconn_testkit::operator::{fetch_metrics, parse_metric, OperatorOptions, OperatorProcess};
use vaultconn_testkit::reliability::{record, Fact};
use vaultconn_testkit::tls_front::{TlsFront, TEST_CA_PEM, TEST_LEAF_PEM};
use vaultconn_testkit::token_server::{TokenServer, TokenServerConfig};

const CLIENT: &str = "app";
const CLIENT_SECRET: &str = "client-SECRET-value";
/// The operator's allow-list here: a range no test connects to, and a name nothing resolves.
const ALLOW: &str = "10.99.0.0/16,idp.corp.test";
/// Loopback addresses the operator treats as a private network here.
const PRIVATE: &str = "127.0.0.8/29";
/// The address in [`PRIVATE`] the refused connections name.
const PRIVATE_HOST: &str = "127.0.0.9";
const ATTEMPTS: &str = "vaultconn_token_refresh_attempts_total";

/// Transport wording that must never reach a status or an Event (OS, hyper, rustls texts).
const TRANSPORT_TEXT: &[&str] = &[
    "os error",
    "Connection refused",
    "tcp connect",
    "client error",
    "corrupt",
    "InvalidContentType",
    "invalid peer certificate",
    "rustls",
];

static OPERATOR: OnceCell<Mutex<OperatorProcess>> = OnceCell::const_new();
/// The tests compare the operator's process-wide attempt counter: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This file's operator: the shared test settings plus the allow-list.
async fn operator() -> MutexGuard<'static, OperatorProcess> {
    let cell = OPERATOR
        .get_or_init(|| async {
            support::ensure_crds().await;
            let cp = support::cluster().await;
            let opts = OperatorOptions {
                binary: env!("CARGO_BIN_EXE_vaultconn").into(),
                kubeconfig: cp.kubeconfig_path().to_path_buf(),
                log_path: cp.dir().join("operator-token-url-policy.log"),
                extra_args: vec![
                    "--allow-http-loopback".into(),
                    "--token-request-timeout".into(),
                    "3s".into(),
                    "--token-url-allow".into(),
                    ALLOW.into(),
                    "--token-url-private-ranges-for-tests".into(),
                    PRIVATE.into(),
                ],
                log_filter: "info,vaultconn=debug".into(),
            };
            match OperatorProcess::start(opts).await {
                Ok(op) => Mutex::new(op),
                Err(e) => panic!("starting the operator: {e}"),
            }
        })
        .await;
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

async fn attempts() -> f64 {
    let url = operator().await.metrics_url();
    let text = fetch_metrics(&url).await.unwrap_or_default();
    parse_metric(&text, ATTEMPTS).unwrap_or(0.0)
}

async fn operator_logs() -> String {
    operator().await.logs()
}

fn oauth2(token_url: &str, creds: &str) -> serde_json::Value {
    json!({"type": "oauth2", "credentialsRef": {"name": creds}, "oauth2": {"tokenUrl": token_url}})
}

async fn creds(ns: &TestNs) {
    put_secret(
        ns,
        "creds",
        &[("client_id", CLIENT), ("client_secret", CLIENT_SECRET)],
    )
    .await;
}

/// The Event about `name` with `reason`, once the background queue has sent it.
async fn event(ns: &TestNs, name: &str, reason: &str) -> Event {
    wait_for_some(WAIT, &format!("{name}: a {reason} Event"), || async {
        ns.api::<Event>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
    })
    .await
}

fn assert_no_transport_text(what: &str, text: &str) {
    for t in TRANSPORT_TEXT {
        assert!(
            !text.contains(t),
            "transport text {t:?} leaked into {what}: {text}"
        );
    }
}

#[tokio::test]
async fn private_literal_token_host_is_refused_without_a_request() {
    let _serial = SERIAL.lock().await;
    drop(operator().await);
    let ns = test_namespace("private").await;
    creds(&ns).await;
    let before = attempts().await;

    // Whatever the policy does, a connection to the "private" host lands here and is counted.
    let trap = tokio::net::TcpListener::bind((PRIVATE_HOST, 0))
        .await
        .unwrap();
    let port = trap.local_addr().unwrap().port();
    let trapped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = trapped.clone();
    let trap_task = tokio::spawn(async move {
        while trap.accept().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    apply_vc(
        &ns,
        "literal",
        oauth2(&format!("https://{PRIVATE_HOST}:{port}/token"), "creds"),
    )
    .await;
    apply_vc(
        &ns,
        "mapped",
        oauth2(
            &format!("https://[::ffff:{PRIVATE_HOST}]:{port}/t?x=1"),
            "creds",
        ),
    )
    .await;

    for name in ["literal", "mapped"] {
        let vc = with_reason(&ns, name, "TokenURLNotAllowed").await;
        assert_eq!(phase(&vc), Some(Phase::Failed));
        let msg = message(&vc);
        assert!(
            msg.contains("which the operator does not contact unless allowed"),
            "{msg}"
        );
        assert!(
            msg.contains("--token-url-allow") && msg.contains("tokenUrlAllow"),
            "the message says what to do: {msg}"
        );
        assert!(!msg.contains("/t"), "the URL is not echoed: {msg}");
        let ev = event(&ns, name, "TokenURLNotAllowed").await;
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.note.as_deref(), Some(msg.as_str()));
    }
    assert!(
        operator_logs()
            .await
            .contains("token_url_allow=idp.corp.test,10.99.0.0/16"),
        "the operator reports the allow-list it was given"
    );

    // Nothing was requested (the "private" side saw no connection) and nothing was written.
    assert_eq!(
        trapped.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the operator connected to the private host"
    );
    trap_task.abort();
    assert_eq!(
        attempts().await,
        before,
        "the operator made a token request"
    );
    let secrets: Vec<String> = ns
        .api::<Secret>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.type_.as_deref() != Some("kubernetes.io/service-account-token"))
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(secrets, ["creds"], "only the credentials Secret exists");
    record(
        Fact::survived(
            "Token URL on a private network (IPv4 literal, IPv4-mapped IPv6)",
            "VaultConnections naming an IPv4 literal and its IPv4-mapped IPv6 spelling in a range the operator treats as private (loopback standing in, with a listener counting connections)",
            2,
        )
        .note("TokenURLNotAllowed; 0 token requests, nothing written"),
    );
}

#[tokio::test]
async fn transport_failures_show_only_their_class() {
    let _serial = SERIAL.lock().await;
    drop(operator().await);
    let ns = test_namespace("transport").await;
    creds(&ns).await;

    // Nothing listens on this loopback port.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    apply_vc(
        &ns,
        "refused",
        oauth2(&format!("http://127.0.0.1:{closed}/token"), "creds"),
    )
    .await;
    // TLS to a plain-http token server: the handshake fails before any HTTP request.
    let ts = TokenServer::start(TokenServerConfig::default().with_client(CLIENT, CLIENT_SECRET))
        .await
        .unwrap();
    let tls_url = ts.token_url().replace("http://", "https://");
    apply_vc(&ns, "tls", oauth2(&tls_url, "creds")).await;

    for (name, reason, class) in [
        (
            "refused",
            "TokenEndpointUnreachable",
            "cannot reach the token endpoint: connection refused",
        ),
        (
            "tls",
            "TLSError",
            "TLS handshake with the token endpoint failed",
        ),
    ] {
        let vc = with_reason(&ns, name, reason).await;
        let msg = message(&vc);
        assert!(msg.contains(class), "{name}: {msg}");
        assert_no_transport_text(&format!("the status of {name}"), &msg);
        let status = serde_json::to_string(&vc.status).unwrap();
        assert_no_transport_text(&format!("the status of {name}"), &status);
        let ev = event(&ns, name, reason).await;
        let note = ev.note.unwrap_or_default();
        assert!(note.contains(class), "{name}: {note}");
        assert_no_transport_text(&format!("the Event of {name}"), &note);
    }
    assert_eq!(
        ts.call_count(),
        0,
        "no HTTP request reached the token server"
    );

    // The detail is in the operator's log, with the connection it belongs to.
    let logs = operator_logs().await;
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("token request failed") && l.contains(&ns.name))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("name=\"refused\"") && l.contains("os error")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("name=\"tls\"") && l.contains("TLSError")),
        "{lines:#?}"
    );
    assert!(
        !logs.contains(CLIENT_SECRET),
        "the client secret was logged"
    );
    record(
        Fact::survived(
            "Token endpoint unreachable (connection refused, TLS to a plain-HTTP server)",
            "loopback port with no listener; https:// to the plain-HTTP token server",
            2,
        )
        .note("status and Events name only the failure class; detail in the log only"),
    );
}

/// A bad allow-list entry stops the operator at start-up with an error naming the entry.
#[test]
fn bad_allow_list_entries_stop_the_operator_at_start() {
    for (how, entry, why) in [
        ("flag", "10.0.0.0/33", "is not a valid CIDR"),
        (
            "env",
            "idp.corp.test:8443",
            "a port is not part of an entry",
        ),
        ("flag", "https://idp.corp.test/token", "is a URL"),
        ("env", "169.254.169.254", "never contacted"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vaultconn"));
        cmd.arg("run")
            // Should parsing pass, the run fails at once on this kubeconfig instead of
            // starting a control plane.
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("VAULTCONN_TOKEN_URL_ALLOW")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if how == "flag" {
            cmd.args([
                "--token-url-allow",
                &format!("idp.vaultconn.invalid,{entry}"),
            ]);
        } else {
            cmd.env(
                "VAULTCONN_TOKEN_URL_ALLOW",
                format!("idp.vaultconn.invalid,{entry}"),
            );
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{how} {entry}: the operator kept running");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status.code(), Some(2), "{how} {entry}: {stderr}");
        assert!(
            stderr.contains(&format!("{entry:?}")) && stderr.contains(why),
            "{how} {entry}: {stderr}"
        );
    }
}

/// TLS verification of the token endpoint, over loopback: a certificate no trusted CA signed is
/// refused during the handshake (nothing reaches the token server); the same endpoint is
/// trusted once `caBundleRef` names the right CA; a `caBundleRef` whose Secret is absent from the
/// connection's namespace (present only in another one) is `CABundleMissing` with no connection
/// attempted; a bundle holding only the server's own certificate (not a CA) is refused too.
/// Each connection gets its own TLS front, so what each front saw is that connection's doing.
#[tokio::test]
async fn token_endpoint_tls_is_verified_against_the_ca_bundle() {
    let _serial = SERIAL.lock().await;
    drop(operator().await);
    let other = test_namespace("tls-other").await;
    put_secret(&other, "ca", &[("ca.crt", TEST_CA_PEM)]).await;
    let ns = test_namespace("tls").await;
    creds(&ns).await;
    put_secret(&ns, "leaf-only", &[("ca.crt", TEST_LEAF_PEM)]).await;
    let ts = TokenServer::start(
        TokenServerConfig::default()
            .with_client(CLIENT, CLIENT_SECRET)
            .with_ttl(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let front = || async { TlsFront::start(ts.addr()).await.unwrap() };
    let (untrusted, leaf, trusted, local) =
        (front().await, front().await, front().await, front().await);
    let with_ca = |url: String, secret: &str| {
        json!({"type": "oauth2", "credentialsRef": {"name": "creds"},
            "oauth2": {"tokenUrl": url, "caBundleRef": {"name": secret, "key": "ca.crt"}}})
    };
    apply_vc(
        &ns,
        "untrusted",
        oauth2(&untrusted.url("127.0.0.1", "/oauth/token"), "creds"),
    )
    .await;
    apply_vc(
        &ns,
        "leaf",
        with_ca(leaf.url("127.0.0.1", "/oauth/token"), "leaf-only"),
    )
    .await;
    apply_vc(
        &ns,
        "trusted",
        with_ca(trusted.url("127.0.0.1", "/oauth/token"), "ca"),
    )
    .await;
    apply_vc(
        &ns,
        "by-name",
        with_ca(local.url("localhost", "/oauth/token"), "ca"),
    )
    .await;

    for name in ["trusted", "by-name"] {
        let vc = with_reason(&ns, name, "CABundleMissing").await;
        assert_eq!(phase(&vc), Some(Phase::Failed));
        let msg = message(&vc);
        assert!(
            msg.contains(&format!("Secret {}/ca has no key ca.crt", ns.name)),
            "{msg}"
        );
    }
    assert_eq!(
        (trusted.connections(), local.connections()),
        (0, 0),
        "a connection without its CA bundle contacted the endpoint"
    );
    for (name, f) in [("untrusted", &untrusted), ("leaf", &leaf)] {
        let vc = with_reason(&ns, name, "TLSError").await;
        assert_no_transport_text(&format!("the status of {name}"), &message(&vc));
        wait_for_some(WAIT, &format!("{name}: a refused handshake"), || async {
            (f.failed_handshakes() > 0).then_some(())
        })
        .await;
        assert_eq!(f.handshakes(), 0, "{name}: the handshake completed");
    }
    assert_eq!(
        ts.call_count(),
        0,
        "a request got through an untrusted handshake"
    );

    // The CA arrives in the connections' own namespace: both turn Ready, trusting it.
    put_secret(&ns, "ca", &[("ca.crt", TEST_CA_PEM)]).await;
    for name in ["trusted", "by-name"] {
        ready(&ns, name).await;
        let out = ns.api::<Secret>().get(name).await.unwrap();
        let at = data_of(&out)
            .get("access_token")
            .cloned()
            .unwrap_or_default();
        assert!(ts.is_access_token_valid(&at), "{name}: no valid token");
    }
    assert!(trusted.handshakes() >= 1 && local.handshakes() >= 1);
    assert_eq!(
        ts.call_count(),
        2,
        "one token request per trusted connection"
    );
    assert_eq!(
        (untrusted.handshakes(), leaf.handshakes()),
        (0, 0),
        "an untrusted endpoint was trusted later"
    );
    record(Fact::survived(
        "Token endpoint with a certificate no trusted CA signed (none, or only the leaf as bundle)",
        "loopback TLS front with a test-CA certificate",
        untrusted.failed_handshakes() + leaf.failed_handshakes(),
    ).note("every handshake refused, 0 requests reached the server; CABundleMissing while the bundle was absent, Ready with it"));
}
