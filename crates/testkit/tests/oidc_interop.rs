//! HTTP-level tests of the oidc-provider harness (`vaultconn_testkit::oidc`): they prove the
//! peer behaves as the operator's tests assume (client auth methods, App. B encoding, rotation,
//! reuse detection, TTLs, events, faults, process lifetime).
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::AUTHORIZATION;
use serde_json::Value;
use vaultconn_testkit::oidc::{
    fingerprint, Fault, OidcClient, OidcOptions, OidcProvider, M2M, M2M_POST, M2M_SPECIAL,
    RT_CLIENT,
};
use vaultconn_testkit::provider_invariants::{
    assert_provider_invariants, Answer, Invariants, Violation,
};

fn http() -> reqwest::Client {
    vaultconn_testkit::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

async fn start(rotate: bool, ttl: u64) -> OidcProvider {
    OidcProvider::start(OidcOptions {
        rotate,
        access_token_ttl_secs: ttl,
    })
    .await
    .unwrap()
}

/// POST the token endpoint with Basic (App. B encoded) client auth; returns (status, JSON body).
async fn token_basic(
    http: &reqwest::Client,
    idp: &OidcProvider,
    client: OidcClient,
    form: &[(&str, &str)],
) -> (u16, Value) {
    let resp = http
        .post(idp.token_url())
        .header(AUTHORIZATION, client.basic_auth_header())
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn refresh(http: &reqwest::Client, idp: &OidcProvider, rt: &str) -> (u16, Value) {
    token_basic(
        http,
        idp,
        RT_CLIENT,
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
    )
    .await
}

fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("JWT has 3 parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn client_credentials_with_basic_auth() {
    let idp = start(true, 60).await;
    let http = http();
    let (status, body) =
        token_basic(&http, &idp, M2M, &[("grant_type", "client_credentials")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(body["expires_in"], 60);
    assert!(body.get("refresh_token").is_none(), "RFC 6749 §4.4.3");

    // Wrong secret: 401 invalid_client.
    let bad = OidcClient {
        secret: "wrong",
        ..M2M
    };
    let (status, body) =
        token_basic(&http, &idp, bad, &[("grant_type", "client_credentials")]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "invalid_client");

    let events = idp.events().await.unwrap();
    assert_eq!(events.token_requests, 2);
    assert_eq!(events.grant_success, 1);
    assert_eq!(events.grant_revoked, 0);
    assert_eq!(events.requests[0].auth.as_deref(), Some("basic"));
}

#[tokio::test]
async fn client_credentials_audience_and_resource() {
    let idp = start(true, 30).await;
    let http = http();
    // Auth0-style `audience` is mapped to an RFC 8707 `resource`: JWT with that `aud`.
    let (status, body) = token_basic(
        &http,
        &idp,
        M2M,
        &[
            ("grant_type", "client_credentials"),
            ("audience", "https://api.example.test"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let claims = jwt_claims(body["access_token"].as_str().unwrap());
    assert_eq!(claims["aud"], "https://api.example.test");
    assert_eq!(claims["client_id"], "m2m");
    assert_eq!(body["expires_in"], 30);

    // `resource` directly, with a scope of that resource server.
    let (status, body) = token_basic(
        &http,
        &idp,
        M2M,
        &[
            ("grant_type", "client_credentials"),
            ("resource", "https://other.example.test/"),
            ("scope", "api:read"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "api:read");
    let claims = jwt_claims(body["access_token"].as_str().unwrap());
    assert_eq!(claims["aud"], "https://other.example.test/");

    // A non-URI audience is ignored as an unknown parameter: opaque token.
    let (status, body) = token_basic(
        &http,
        &idp,
        M2M,
        &[("grant_type", "client_credentials"), ("audience", "my-api")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!body["access_token"].as_str().unwrap().contains('.'));

    let events = idp.events().await.unwrap();
    assert_eq!(
        events.requests[0].audience.as_deref(),
        Some("https://api.example.test")
    );
    assert_eq!(events.client_credentials_issued, 2);
    assert_eq!(events.client_credentials_saved, 1);
}

#[tokio::test]
async fn client_credentials_with_post_auth() {
    let idp = start(true, 60).await;
    let http = http();
    let resp = http
        .post(idp.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", M2M_POST.id),
            ("client_secret", M2M_POST.secret),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 60);

    // Two auth methods in one request are refused (RFC 6749 §2.3).
    let resp = http
        .post(idp.token_url())
        .header(AUTHORIZATION, M2M_POST.basic_auth_header())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", M2M_POST.id),
            ("client_secret", M2M_POST.secret),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request", "{body}");

    // Quirk: oidc-provider treats client_secret_basic and client_secret_post as interchangeable,
    // so Basic also works for a client registered with client_secret_post.
    let (status, body) = token_basic(
        &http,
        &idp,
        M2M_POST,
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let events = idp.events().await.unwrap();
    assert_eq!(events.requests[0].auth.as_deref(), Some("post"));
    assert_eq!(events.requests[0].client_id.as_deref(), Some("m2m-post"));
}

#[tokio::test]
async fn basic_credentials_with_special_characters_need_form_encoding() {
    let idp = start(true, 60).await;
    let http = http();
    assert_eq!(M2M_SPECIAL.id, "m2m special/1");
    assert_eq!(M2M_SPECIAL.secret, "s3cr:et+%&");

    // Raw (non-App. B) credentials: refused.
    let resp = http
        .post(idp.token_url())
        .header(AUTHORIZATION, M2M_SPECIAL.raw_basic_auth_header())
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request", "{body}");

    // reqwest's basic_auth does not form-encode either.
    let resp = http
        .post(idp.token_url())
        .basic_auth(M2M_SPECIAL.id, Some(M2M_SPECIAL.secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Encoded per RFC 6749 App. B: accepted.
    let (status, body) = token_basic(
        &http,
        &idp,
        M2M_SPECIAL,
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()));
}

#[tokio::test]
async fn refresh_with_rotation_three_cycles() {
    let idp = start(true, 60).await;
    let http = http();
    let mut rt = idp.mint_refresh_token().await.unwrap();
    assert!(idp.is_refresh_token_live(&rt).await.unwrap());

    for cycle in 0..3 {
        let (status, body) = refresh(&http, &idp, &rt).await;
        assert_eq!(status, 200, "cycle {cycle}: {body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 60);
        assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()));
        let new_rt = body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(new_rt, rt, "cycle {cycle}: rotation must issue a new RT");
        assert!(
            !idp.is_refresh_token_live(&rt).await.unwrap(),
            "cycle {cycle}: spent RT must be dead"
        );
        assert!(
            idp.is_refresh_token_live(&new_rt).await.unwrap(),
            "cycle {cycle}: new RT must be live"
        );
        rt = new_rt;
    }

    let events = idp.events().await.unwrap();
    assert_eq!(events.grant_revoked, 0);
    assert_eq!(events.refresh_token_consumed, 3);
    assert_eq!(events.refresh_token_saved, 4, "1 minted + 3 rotated");
    assert_eq!(events.grant_error, 0);
    assert_eq!(events.server_error, 0);
}

#[tokio::test]
async fn replaying_a_spent_refresh_token_revokes_the_grant() {
    let idp = start(true, 60).await;
    let http = http();
    let rt0 = idp.mint_refresh_token().await.unwrap();
    let (status, body) = refresh(&http, &idp, &rt0).await;
    assert_eq!(status, 200, "{body}");
    let rt1 = body["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(idp.events().await.unwrap().grant_revoked, 0);

    let (status, body) = refresh(&http, &idp, &rt0).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_grant");

    let events = idp.events().await.unwrap();
    assert!(events.grant_revoked >= 1, "{events:?}");
    let err = events.errors.last().unwrap();
    assert_eq!(err.error, "invalid_grant");
    assert_eq!(
        err.error_detail.as_deref(),
        Some("refresh token already used")
    );
    assert_eq!(err.client_id.as_deref(), Some("rt-client"));
    // Reuse detection kills the whole family, including the newest token.
    assert!(!idp.is_refresh_token_live(&rt1).await.unwrap());
    let (status, body) = refresh(&http, &idp, &rt1).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert!(idp.stderr_tail().contains("grant.revoked"));

    idp.reset_events().await.unwrap();
    let events = idp.events().await.unwrap();
    assert_eq!(events.grant_revoked, 0);
    assert_eq!(events.token_requests, 0);
}

#[tokio::test]
async fn refresh_without_rotation_keeps_the_token() {
    let idp = start(false, 60).await;
    let http = http();
    let rt = idp.mint_refresh_token().await.unwrap();
    for _ in 0..3 {
        let (status, body) = refresh(&http, &idp, &rt).await;
        assert_eq!(status, 200, "{body}");
        if let Some(returned) = body.get("refresh_token") {
            assert_eq!(returned.as_str(), Some(rt.as_str()));
        }
        assert!(idp.is_refresh_token_live(&rt).await.unwrap());
    }
    // `audience` on the refresh grant is ignored (not mapped to `resource`).
    let (status, body) = token_basic(
        &http,
        &idp,
        RT_CLIENT,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
            ("audience", "https://api.example.test"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let events = idp.events().await.unwrap();
    assert_eq!(events.refresh_token_consumed, 0);
    assert_eq!(events.refresh_token_saved, 1, "only the minted one");
    assert_eq!(events.grant_revoked, 0);
}

#[tokio::test]
async fn short_access_token_ttl_is_honoured() {
    let idp = start(true, 2).await;
    let http = http();
    let (status, body) =
        token_basic(&http, &idp, M2M, &[("grant_type", "client_credentials")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 2);
    let at = body["access_token"].as_str().unwrap().to_owned();

    let rt = idp.mint_refresh_token().await.unwrap();
    let (status, body) = refresh(&http, &idp, &rt).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 2);

    let introspect = |token: String| {
        let http = http.clone();
        let url = idp.introspection_url().to_owned();
        async move {
            let resp = http
                .post(url)
                .header(AUTHORIZATION, M2M.basic_auth_header())
                .form(&[("token", token.as_str())])
                .send()
                .await
                .unwrap();
            resp.json::<Value>().await.unwrap()["active"]
                .as_bool()
                .unwrap()
        }
    };
    assert!(introspect(at.clone()).await);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(
        !introspect(at).await,
        "access token must expire after AT_TTL"
    );
}

#[tokio::test]
async fn revoked_refresh_token_gets_invalid_grant() {
    let idp = start(true, 60).await;
    let http = http();
    let rt = idp.mint_refresh_token().await.unwrap();
    idp.revoke(&rt).await.unwrap();
    assert!(!idp.is_refresh_token_live(&rt).await.unwrap());
    let (status, body) = refresh(&http, &idp, &rt).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_grant");
    let events = idp.events().await.unwrap();
    assert_eq!(events.grant_revoked, 1, "revocation revokes the grant");
    assert_eq!(
        events.errors.last().unwrap().error_detail.as_deref(),
        Some("refresh token not found")
    );
    // Revoking again (unknown token) is still 200 (RFC 7009 §2.2).
    idp.revoke(&rt).await.unwrap();
}

#[tokio::test]
async fn response_faults() {
    let idp = start(false, 60).await;
    let http = http();
    let rt = idp.mint_refresh_token().await.unwrap();

    idp.inject_fault(Fault::StripRefreshToken, 1).await.unwrap();
    let (status, body) = refresh(&http, &idp, &rt).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("refresh_token").is_none());
    assert!(body.get("access_token").is_some());

    idp.inject_fault(Fault::StripExpiresIn, 1).await.unwrap();
    let (_, body) = refresh(&http, &idp, &rt).await;
    assert!(body.get("expires_in").is_none(), "{body}");

    idp.inject_fault(Fault::ExpiresInString, 1).await.unwrap();
    let (_, body) = refresh(&http, &idp, &rt).await;
    assert_eq!(body["expires_in"], "60");

    idp.inject_fault(Fault::Garbage200, 1).await.unwrap();
    let resp = http
        .post(idp.token_url())
        .header(AUTHORIZATION, RT_CLIENT.basic_auth_header())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().parse::<Value>().is_err());

    idp.inject_fault(
        Fault::Status {
            status: 429,
            retry_after: Some("2".into()),
        },
        1,
    )
    .await
    .unwrap();
    let resp = http
        .post(idp.token_url())
        .header(AUTHORIZATION, RT_CLIENT.basic_auth_header())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "2");

    idp.inject_fault(Fault::Html500, 1).await.unwrap();
    let resp = http
        .post(idp.token_url())
        .header(AUTHORIZATION, RT_CLIENT.basic_auth_header())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert!(resp.text().await.unwrap().contains("<html>"));

    idp.inject_fault(Fault::DropBefore, 1).await.unwrap();
    let sent = http
        .post(idp.token_url())
        .header(AUTHORIZATION, RT_CLIENT.basic_auth_header())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
        .send()
        .await;
    assert!(sent.is_err());

    // Armed faults can be cleared; afterwards the RT still works.
    idp.inject_fault(Fault::Html500, 5).await.unwrap();
    idp.clear_faults().await.unwrap();
    let (status, _) = refresh(&http, &idp, &rt).await;
    assert_eq!(status, 200);

    let events = idp.events().await.unwrap();
    let faults: Vec<_> = events
        .requests
        .iter()
        .map(|r| r.fault.as_deref().unwrap_or("-"))
        .collect();
    assert_eq!(
        faults,
        [
            "strip_refresh_token",
            "strip_expires_in",
            "expires_in_string",
            "garbage_200",
            "status",
            "html500",
            "drop_before",
            "-"
        ]
    );
    assert_eq!(events.grant_revoked, 0);
    assert!(idp.is_refresh_token_live(&rt).await.unwrap());
}

/// Matrix row 15 at the peer: the response is lost after the provider rotated; the one retry with
/// the same RT is a replay and revokes the family.
#[tokio::test]
async fn drop_after_commit_with_rotation_makes_the_retry_a_replay() {
    let idp = start(true, 60).await;
    let http = http();
    let rt = idp.mint_refresh_token().await.unwrap();
    idp.inject_fault(Fault::DropAfterCommit, 1).await.unwrap();
    let lost = http
        .post(idp.token_url())
        .header(AUTHORIZATION, RT_CLIENT.basic_auth_header())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
        .send()
        .await;
    assert!(lost.is_err(), "connection must be dropped");
    assert!(!idp.is_refresh_token_live(&rt).await.unwrap(), "committed");

    let (status, body) = refresh(&http, &idp, &rt).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_grant");
    let events = idp.events().await.unwrap();
    assert_eq!(events.token_requests, 2);
    assert_eq!(events.refresh_token_consumed, 1);
    assert!(events.grant_revoked >= 1);
}

#[tokio::test]
async fn slow_after_commit_delays_the_response() {
    let idp = start(true, 60).await;
    let http = http();
    let rt = idp.mint_refresh_token().await.unwrap();
    idp.inject_fault(
        // Far longer than the client's timeout, so that a busy machine's late timer cannot
        // be mistaken for the reply (a 1.5 s hold against a 1.4 s bound was too close).
        Fault::SlowAfterCommit {
            delay: Duration::from_secs(10),
        },
        1,
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let timed_out = http
        .post(idp.token_url())
        .header(AUTHORIZATION, RT_CLIENT.basic_auth_header())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(timed_out.is_err_and(|e| e.is_timeout()));
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the client gave up only after {:?}",
        started.elapsed()
    );
    // The provider committed anyway.
    assert!(!idp.is_refresh_token_live(&rt).await.unwrap());
}

#[tokio::test]
async fn discovery_and_urls() {
    let idp = start(true, 60).await;
    assert_eq!(idp.issuer(), format!("http://127.0.0.1:{}", idp.port()));
    assert_eq!(idp.token_url(), format!("{}/token", idp.issuer()));
    assert!(idp.introspection_url().starts_with(idp.issuer()));
    assert!(idp.revocation_url().starts_with(idp.issuer()));
    assert_eq!(
        idp.options(),
        OidcOptions {
            rotate: true,
            access_token_ttl_secs: 60
        }
    );
}

#[tokio::test]
async fn drop_kills_the_server() {
    let idp = start(true, 60).await;
    let http = http();
    let url = format!("{}/.well-known/openid-configuration", idp.issuer());
    assert!(http.get(&url).send().await.is_ok());
    drop(idp);
    let mut refused = false;
    for _ in 0..50 {
        if http.get(&url).send().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "server still answering after drop");
}

const HELPER_ENV: &str = "VAULTCONN_OIDC_PDEATHSIG_HELPER";

/// Helper for `server_dies_with_a_sigkilled_parent`: only does something when re-executed by it.
#[tokio::test]
#[ignore = "helper process for server_dies_with_a_sigkilled_parent"]
async fn pdeathsig_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let idp = start(true, 60).await;
    println!("NODE_PID={}", idp.pid().unwrap());
    tokio::time::sleep(Duration::from_secs(120)).await;
    drop(idp);
}

fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // Field 3 is the state; a zombie has already died.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

#[test]
fn server_dies_with_a_sigkilled_parent() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "pdeathsig_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let stdout = helper.0.stdout.take().unwrap();
    let mut node_pid = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest prints "test pdeathsig_helper ... " on the same line first.
        if let Some((_, pid)) = line.split_once("NODE_PID=") {
            node_pid = Some(pid.trim().parse::<u32>().unwrap());
            break;
        }
    }
    let node_pid = node_pid.expect("helper printed the node pid");
    assert!(!process_gone(node_pid));

    helper.0.kill().unwrap(); // SIGKILL: no destructors run in the helper
    helper.0.wait().unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !process_gone(node_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "node {node_pid} survived its SIGKILLed parent"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- the provider record behind the provider-side invariants -----------------------------------

/// The provider's own record of a rotation chain: presented and issued refresh tokens as
/// fingerprints (the same the harness computes), each tied to the grant; a clean chain passes
/// the invariants.
#[tokio::test]
async fn provider_record_of_a_clean_chain_passes_the_invariants() {
    let idp = start(true, 60).await;
    let http = http();
    let seed = idp.mint_refresh_token().await.unwrap();
    let mut rt = seed.clone();
    let mut issued = Vec::new();
    for _ in 0..3 {
        let (status, body) = refresh(&http, &idp, &rt).await;
        assert_eq!(status, 200, "{body}");
        rt = body["refresh_token"].as_str().unwrap().to_owned();
        issued.push(fingerprint(&rt));
    }
    let rec = idp.provider_record().await.unwrap();
    assert_eq!(rec.minted.len(), 1);
    assert_eq!(rec.minted[0].0, fingerprint(&seed));
    let grant = rec.minted[0].1.clone().expect("the mint reports its grant");
    assert_eq!(rec.calls.len(), 3);
    for (i, c) in rec.calls.iter().enumerate() {
        assert_eq!(c.seq, i as u64);
        assert_eq!(
            c.client_id.as_deref(),
            Some(RT_CLIENT.id),
            "decoded from Basic"
        );
        assert_eq!(c.family.as_deref(), Some(grant.as_str()));
        assert_eq!(c.issued.as_ref(), Some(&issued[i]));
        assert_eq!(c.answer, Answer::Issued);
    }
    assert_eq!(rec.calls[0].presented, Some(fingerprint(&seed)));
    assert_eq!(rec.calls[2].presented.as_ref(), Some(&issued[1]));
    assert_provider_invariants(&rec, &Invariants::new(3));
}

/// A replay at the real provider fails the checker from the provider's record alone: the
/// `grant.revoked` event is tied to the request that caused it.
#[tokio::test]
async fn provider_record_shows_a_replay_and_its_revocation() {
    let idp = start(true, 60).await;
    let http = http();
    let seed = idp.mint_refresh_token().await.unwrap();
    let (status, _) = refresh(&http, &idp, &seed).await;
    assert_eq!(status, 200);
    let (status, _) = refresh(&http, &idp, &seed).await;
    assert_eq!(status, 400);
    let rec = idp.provider_record().await.unwrap();
    assert_eq!(rec.revocations.len(), 1);
    assert_eq!(rec.revocations[0].by_call, Some(1));
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
        report.violations.iter().any(|v| matches!(v,
            Violation::UnexplainedRevocation { by_call: Some(1), client_id: Some(c), .. } if c == RT_CLIENT.id)),
        "{report}"
    );
}

/// A response dropped after the provider rotated, then the one retry: the provider's record
/// shows the committed (never delivered) token, and the loss matches a declared
/// `RefreshResponseLost` exactly. A revocation the test makes itself must be declared too.
#[tokio::test]
async fn provider_record_of_a_lost_response_and_a_test_revocation() {
    let idp = start(true, 60).await;
    let http = http();
    let seed = idp.mint_refresh_token().await.unwrap();
    idp.inject_fault(Fault::DropAfterCommit, 1).await.unwrap();
    let lost = http
        .post(idp.token_url())
        .header(AUTHORIZATION, RT_CLIENT.basic_auth_header())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &seed)])
        .send()
        .await;
    assert!(lost.is_err());
    let (status, _) = refresh(&http, &idp, &seed).await;
    assert_eq!(status, 400);
    let other = idp.mint_refresh_token().await.unwrap();
    idp.revoke(&other).await.unwrap();

    let rec = idp.provider_record().await.unwrap();
    assert!(rec.calls[0].issued.is_some(), "the rotation was committed");
    assert!(
        rec.check(&Invariants::new(2).lost_response(RT_CLIENT.id))
            .violations
            .len()
            == 1
    );
    let report = assert_provider_invariants(
        &rec,
        &Invariants::new(2)
            .lost_response(RT_CLIENT.id)
            .revoked_by_test(1),
    );
    assert_eq!(report.losses.len(), 1);
    assert_eq!(report.losses[0].token, fingerprint(&seed));
    assert_eq!(
        (report.losses[0].spent_by, report.losses[0].refused_by),
        (0, 1)
    );
}
