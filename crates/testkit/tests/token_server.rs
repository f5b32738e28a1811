//! Tests of the fault-injecting token server itself (`vaultconn_testkit::token_server`), over
//! real HTTP with reqwest.
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::Value;
use vaultconn_testkit::token_server::{
    AuthMethod, Fault, FaultBody, GrantEvent, RefreshTokenState, RetryAfter, TokenServer,
    TokenServerConfig,
};

const APP: &str = "app";
const APP_SECRET: &str = "app-secret";
const SPECIAL_ID: &str = "m2m special/1";
const SPECIAL_SECRET: &str = "s3cr:et+%";

fn config() -> TokenServerConfig {
    TokenServerConfig::default()
        .with_client("m2m", "m2m-secret")
        .with_client(SPECIAL_ID, SPECIAL_SECRET)
        .with_client(APP, APP_SECRET)
        .with_client("other", "other-secret")
}

fn client() -> reqwest::Client {
    vaultconn_testkit::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client")
}

async fn start(config: TokenServerConfig) -> (TokenServer, reqwest::Client) {
    let server = TokenServer::start(config)
        .await
        .expect("start token server");
    (server, client())
}

/// RFC 6749 §2.3.1: id and secret each form-urlencoded, then base64.
fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", enc(id), enc(secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

async fn post_basic(
    http: &reqwest::Client,
    server: &TokenServer,
    id: &str,
    secret: &str,
    form: &[(&str, &str)],
) -> reqwest::Result<reqwest::Response> {
    http.post(server.token_url())
        .header(reqwest::header::AUTHORIZATION, basic(id, secret))
        .form(form)
        .send()
        .await
}

async fn refresh(
    http: &reqwest::Client,
    server: &TokenServer,
    rt: &str,
) -> reqwest::Result<reqwest::Response> {
    post_basic(
        http,
        server,
        APP,
        APP_SECRET,
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
    )
    .await
}

async fn cc(http: &reqwest::Client, server: &TokenServer) -> reqwest::Result<reqwest::Response> {
    post_basic(
        http,
        server,
        "m2m",
        "m2m-secret",
        &[("grant_type", "client_credentials")],
    )
    .await
}

async fn json(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let body = res.json::<Value>().await.expect("json body");
    (status, body)
}

async fn refresh_ok(http: &reqwest::Client, server: &TokenServer, rt: &str) -> Value {
    let (status, body) = json(refresh(http, server, rt).await.expect("send")).await;
    assert_eq!(status, 200, "refresh failed: {body}");
    body
}

async fn refresh_err(http: &reqwest::Client, server: &TokenServer, rt: &str) -> String {
    let (status, body) = json(refresh(http, server, rt).await.expect("send")).await;
    assert_eq!(status, 400, "expected an error: {body}");
    body["error"].as_str().expect("error code").to_owned()
}

fn str_field<'a>(body: &'a Value, key: &str) -> &'a str {
    body[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {body}"))
}

/// A transport error with no HTTP status: the connection was closed under the request.
fn assert_connection_error(err: &reqwest::Error) {
    assert!(err.status().is_none(), "got a status: {err:?}");
    assert!(!err.is_timeout(), "timeout instead of a reset: {err:?}");
    assert!(
        !err.is_connect(),
        "the connection itself should have worked: {err:?}"
    );
    assert!(
        err.is_request() || err.is_body(),
        "unexpected error kind: {err:?}"
    );
    // The server closes with SO_LINGER=0: an RST (or, at worst, an incomplete message).
    let mut source = std::error::Error::source(err);
    let mut reset = false;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            reset |= io.kind() == std::io::ErrorKind::ConnectionReset;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            reset |= h.is_incomplete_message();
        }
        source = e.source();
    }
    assert!(reset, "not a connection reset: {err:?}");
}

// ---------------------------------------------------------------------------------------------
// Client authentication and client_credentials
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_basic_happy_path() {
    let (server, http) = start(config()).await;
    let before = SystemTime::now();
    let res = post_basic(
        &http,
        &server,
        "m2m",
        "m2m-secret",
        &[
            ("grant_type", "client_credentials"),
            ("scope", "read write"),
            ("audience", "https://api.example"),
            ("organization", "org_1"),
        ],
    )
    .await
    .expect("send");
    assert_eq!(
        res.headers()
            .get(reqwest::header::CACHE_CONTROL)
            .map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    let (status, body) = json(res).await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert!(body["expires_in"].is_u64());
    assert_eq!(body["scope"], "read write");
    assert!(
        body.get("refresh_token").is_none(),
        "CC must not return an RT"
    );
    let at = str_field(&body, "access_token");
    assert!(at.len() >= 32);
    assert!(server.is_access_token_valid(at));
    let exp = server.access_token_expiry(at).expect("registered");
    let lifetime = exp.duration_since(before).unwrap();
    assert!(lifetime >= Duration::from_secs(3599) && lifetime <= Duration::from_secs(3601));
    assert!(!server.is_access_token_valid("not-a-token"));
    assert_eq!(server.access_token_expiry("not-a-token"), None);

    let calls = server.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(c.client_id.as_deref(), Some("m2m"));
    assert_eq!(c.auth_method, AuthMethod::ClientSecretBasic);
    assert_eq!(c.scope.as_deref(), Some("read write"));
    assert_eq!(c.audience.as_deref(), Some("https://api.example"));
    assert_eq!(
        c.extra_params.get("organization").map(String::as_str),
        Some("org_1")
    );
    assert_eq!(c.extra_params.len(), 1);
    assert_eq!(c.refresh_token, None);
    assert_eq!(c.fault, None);
    let o = c.outcome.as_ref().expect("outcome");
    assert_eq!(o.status, Some(200));
    assert_eq!(o.access_token.as_deref(), Some(at));
    assert_eq!(o.refresh_token, None);
    assert_eq!(o.event, Some(GrantEvent::Issued));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_post_happy_path() {
    let (server, http) = start(config()).await;
    let res = http
        .post(server.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "m2m"),
            ("client_secret", "m2m-secret"),
        ])
        .send()
        .await
        .expect("send");
    let (status, body) = json(res).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.get("scope").is_none(),
        "no scope requested, none echoed"
    );
    assert!(server.is_access_token_valid(str_field(&body, "access_token")));
    let c = &server.calls()[0];
    assert_eq!(c.auth_method, AuthMethod::ClientSecretPost);
    assert_eq!(c.client_id.as_deref(), Some("m2m"));
    assert!(
        c.extra_params.is_empty(),
        "client_secret must not be recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_special_characters_is_form_decoded() {
    let (server, http) = start(config()).await;
    let res = post_basic(
        &http,
        &server,
        SPECIAL_ID,
        SPECIAL_SECRET,
        &[("grant_type", "client_credentials")],
    )
    .await
    .expect("send");
    assert_eq!(res.status(), 200);
    assert_eq!(server.calls()[0].client_id.as_deref(), Some(SPECIAL_ID));

    // A client that forgets App. B sends the raw credentials: `%` is not valid percent-encoding.
    let res = http
        .post(server.token_url())
        .basic_auth(SPECIAL_ID, Some(SPECIAL_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("send");
    let (status, body) = json(res).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");

    // Raw credentials without `%`: `+` decodes to a space, so the secret is wrong.
    server.add_client("plus", "a+b");
    let res = http
        .post(server.token_url())
        .basic_auth("plus", Some("a+b"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), 401);
    let res = post_basic(
        &http,
        &server,
        "plus",
        "a+b",
        &[("grant_type", "client_credentials")],
    )
    .await
    .expect("send");
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_auth_methods_at_once_is_invalid_request() {
    let (server, http) = start(config()).await;
    let res = http
        .post(server.token_url())
        .header(reqwest::header::AUTHORIZATION, basic("m2m", "m2m-secret"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "m2m"),
            ("client_secret", "m2m-secret"),
        ])
        .send()
        .await
        .expect("send");
    let (status, body) = json(res).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");
    let c = &server.calls()[0];
    assert_eq!(c.auth_method, AuthMethod::Both);
    assert_eq!(
        c.outcome.as_ref().unwrap().error.as_deref(),
        Some("invalid_request")
    );

    // Basic plus a *matching* body client_id (no secret) is fine; a mismatching one is not.
    let ok = post_basic(
        &http,
        &server,
        "m2m",
        "m2m-secret",
        &[("grant_type", "client_credentials"), ("client_id", "m2m")],
    )
    .await
    .expect("send");
    assert_eq!(ok.status(), 200);
    let (status, body) = json(
        post_basic(
            &http,
            &server,
            "m2m",
            "m2m-secret",
            &[("grant_type", "client_credentials"), ("client_id", "other")],
        )
        .await
        .expect("send"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_credentials_are_401_invalid_client() {
    let (server, http) = start(config()).await;
    for (id, secret) in [("m2m", "wrong"), ("nobody", "m2m-secret")] {
        let res = post_basic(
            &http,
            &server,
            id,
            secret,
            &[("grant_type", "client_credentials")],
        )
        .await
        .expect("send");
        assert!(res
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .is_some());
        let (status, body) = json(res).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"], "invalid_client");
    }
    // client_secret_post with a wrong secret, and no authentication at all.
    for form in [
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "m2m"),
            ("client_secret", "nope"),
        ][..],
        &[("grant_type", "client_credentials")][..],
    ] {
        let res = http
            .post(server.token_url())
            .form(form)
            .send()
            .await
            .expect("send");
        let (status, body) = json(res).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
    }
    // Runtime client removal.
    server.remove_client("m2m");
    assert_eq!(cc(&http, &server).await.unwrap().status(), 401);
    assert_eq!(server.call_count(), 5);
    assert!(server
        .calls()
        .iter()
        .all(|c| c.outcome.as_ref().unwrap().access_token.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_unsupported_grants() {
    let (server, http) = start(config()).await;
    let (status, body) = json(
        post_basic(
            &http,
            &server,
            "m2m",
            "m2m-secret",
            &[("grant_type", "password")],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );

    let (status, body) = json(
        post_basic(&http, &server, "m2m", "m2m-secret", &[("scope", "x")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // Repeated parameter.
    let (status, body) = json(
        post_basic(
            &http,
            &server,
            "m2m",
            "m2m-secret",
            &[
                ("grant_type", "client_credentials"),
                ("grant_type", "client_credentials"),
            ],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // JSON instead of a form.
    let res = http
        .post(server.token_url())
        .header(reqwest::header::AUTHORIZATION, basic("m2m", "m2m-secret"))
        .json(&serde_json::json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    let (status, body) = json(res).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // refresh_token grant without a refresh_token.
    let (status, body) = json(
        post_basic(
            &http,
            &server,
            APP,
            APP_SECRET,
            &[("grant_type", "refresh_token")],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // GET is not routed to the grant logic.
    let res = http.get(server.token_url()).send().await.unwrap();
    assert_eq!(res.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_second_ttl() {
    let (server, http) = start(config().with_ttl(Duration::from_millis(400))).await;
    let (status, body) = json(cc(&http, &server).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], 1, "integer seconds, at least 1");
    let at = str_field(&body, "access_token").to_owned();
    assert!(server.is_access_token_valid(&at));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!server.is_access_token_valid(&at), "expired after 400 ms");
    assert!(server.access_token_expiry(&at).unwrap() < SystemTime::now());

    server.set_ttl(Duration::from_millis(2500));
    let (_, body) = json(cc(&http, &server).await.unwrap()).await;
    assert_eq!(body["expires_in"], 2);
}

// ---------------------------------------------------------------------------------------------
// Refresh token families
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_with_rotation() {
    let (server, http) = start(config()).await;
    let rt0 = server.mint_refresh_token(APP);
    assert!(server.is_refresh_token_live(&rt0));

    let body = refresh_ok(&http, &server, &rt0).await;
    let rt1 = str_field(&body, "refresh_token").to_owned();
    let at1 = str_field(&body, "access_token").to_owned();
    assert_ne!(rt0, rt1);
    assert_eq!(body["token_type"], "Bearer");
    assert!(server.is_access_token_valid(&at1));
    assert_eq!(server.refresh_token_state(&rt0), RefreshTokenState::Spent);
    assert_eq!(server.refresh_token_state(&rt1), RefreshTokenState::Live);
    assert_eq!(
        server.live_refresh_token_of_family(&rt0).as_deref(),
        Some(rt1.as_str())
    );

    let body = refresh_ok(&http, &server, &rt1).await;
    let rt2 = str_field(&body, "refresh_token").to_owned();
    assert!(server.is_refresh_token_live(&rt2));
    assert!(!server.is_refresh_token_live(&rt1));
    assert_eq!(server.revocations(), 0);

    let calls = server.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].refresh_token.as_deref(), Some(rt0.as_str()));
    let o = calls[0].outcome.as_ref().unwrap();
    assert_eq!(o.refresh_token.as_deref(), Some(rt1.as_str()));
    assert_eq!(o.event, Some(GrantEvent::Rotated));
    assert_eq!(calls[1].seq, calls[0].seq + 1);

    // An RT of one client cannot be used by another; unknown RTs are invalid_grant.
    let (status, body) = json(
        post_basic(
            &http,
            &server,
            "other",
            "other-secret",
            &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(
        server.is_refresh_token_live(&rt2),
        "foreign use does not spend it"
    );
    assert_eq!(
        refresh_err(&http, &server, "made-up").await,
        "invalid_grant"
    );
    assert_eq!(
        server.refresh_token_state("made-up"),
        RefreshTokenState::Unknown
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_spent_token_revokes_the_family() {
    let (server, http) = start(config()).await;
    let rt0 = server.mint_refresh_token(APP);
    let body = refresh_ok(&http, &server, &rt0).await;
    let rt1 = str_field(&body, "refresh_token").to_owned();
    let at1 = str_field(&body, "access_token").to_owned();

    assert_eq!(refresh_err(&http, &server, &rt0).await, "invalid_grant");
    assert_eq!(server.revocations(), 1);
    assert_eq!(server.refresh_token_state(&rt1), RefreshTokenState::Revoked);
    assert!(!server.is_access_token_valid(&at1), "family ATs die too");
    assert!(server.access_token_expiry(&at1).is_some());

    assert_eq!(refresh_err(&http, &server, &rt1).await, "invalid_grant");
    assert_eq!(
        server.revocations(),
        1,
        "already revoked: not counted again"
    );
    let events: Vec<_> = server
        .calls()
        .iter()
        .map(|c| c.outcome.as_ref().unwrap().event)
        .collect();
    assert_eq!(
        events,
        [
            Some(GrantEvent::Rotated),
            Some(GrantEvent::ReuseDetected),
            Some(GrantEvent::FamilyRevoked)
        ]
    );

    // Another family of the same client is unaffected.
    let other = server.mint_refresh_token(APP);
    refresh_ok(&http, &server, &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_detection_off_rejects_without_revoking() {
    let (server, http) = start(config().with_reuse_detection(false)).await;
    let rt0 = server.mint_refresh_token(APP);
    let rt1 = str_field(&refresh_ok(&http, &server, &rt0).await, "refresh_token").to_owned();
    assert_eq!(refresh_err(&http, &server, &rt0).await, "invalid_grant");
    assert_eq!(server.revocations(), 0);
    assert!(server.is_refresh_token_live(&rt1));
    refresh_ok(&http, &server, &rt1).await;
    assert_eq!(
        server.calls()[1].outcome.as_ref().unwrap().event,
        Some(GrantEvent::SpentRejected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_family_revocation() {
    let (server, http) = start(config()).await;
    let rt0 = server.mint_refresh_token(APP);
    assert!(server.revoke_family_of(&rt0));
    assert!(!server.revoke_family_of(&rt0));
    assert!(!server.revoke_family_of("unknown"));
    assert_eq!(refresh_err(&http, &server, &rt0).await, "invalid_grant");
    assert_eq!(
        server.revocations(),
        0,
        "only reuse detection counts as a revocation"
    );
    assert_eq!(server.live_refresh_token_of_family(&rt0), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_window_allows_the_previous_token_once_more() {
    let (server, http) = start(config().with_overlap(Some(Duration::from_secs(5)))).await;
    let rt0 = server.mint_refresh_token(APP);
    let rt1 = str_field(&refresh_ok(&http, &server, &rt0).await, "refresh_token").to_owned();

    // The response carrying rt1 was "lost": the client retries with rt0 inside the window.
    let body = refresh_ok(&http, &server, &rt0).await;
    let rt2 = str_field(&body, "refresh_token").to_owned();
    assert_ne!(rt2, rt1);
    assert!(server.is_access_token_valid(str_field(&body, "access_token")));
    assert_eq!(server.revocations(), 0);
    assert!(server.is_refresh_token_live(&rt2));
    assert_eq!(
        server.calls()[1].outcome.as_ref().unwrap().event,
        Some(GrantEvent::OverlapReissued)
    );

    // The chain continues from rt2; rt0 is now older than the previous token: reuse.
    let rt3 = str_field(&refresh_ok(&http, &server, &rt2).await, "refresh_token").to_owned();
    assert_eq!(refresh_err(&http, &server, &rt0).await, "invalid_grant");
    assert_eq!(server.revocations(), 1);
    assert!(!server.is_refresh_token_live(&rt3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_window_expires() {
    let (server, http) = start(config()).await;
    server.set_overlap(Some(Duration::from_millis(300)));
    let rt0 = server.mint_refresh_token(APP);
    let rt1 = str_field(&refresh_ok(&http, &server, &rt0).await, "refresh_token").to_owned();
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(refresh_err(&http, &server, &rt0).await, "invalid_grant");
    assert_eq!(server.revocations(), 1);
    assert!(!server.is_refresh_token_live(&rt1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_off_keeps_the_refresh_token() {
    let (server, http) = start(config().with_rotation(false)).await;
    let rt = server.mint_refresh_token(APP);
    let body = refresh_ok(&http, &server, &rt).await;
    assert!(body.get("refresh_token").is_none(), "omitted by default");
    assert!(server.is_refresh_token_live(&rt));
    refresh_ok(&http, &server, &rt).await;
    assert_eq!(
        server.calls()[0].outcome.as_ref().unwrap().event,
        Some(GrantEvent::NotRotated)
    );

    server.set_echo_refresh_token_when_not_rotating(true);
    let body = refresh_ok(&http, &server, &rt).await;
    assert_eq!(str_field(&body, "refresh_token"), rt);
    assert!(server.is_refresh_token_live(&rt));

    // Switching rotation on at runtime.
    server.set_rotation(true);
    let new = str_field(&refresh_ok(&http, &server, &rt).await, "refresh_token").to_owned();
    assert_ne!(new, rt);
    assert!(!server.is_refresh_token_live(&rt));
    let cfg = server.config();
    assert!(cfg.rotate_refresh_tokens && cfg.echo_refresh_token_when_not_rotating);
    assert_eq!(server.revocations(), 0);
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_429_with_retry_after_seconds_and_503_with_http_date() {
    let (server, http) = start(config()).await;
    let rt = server.mint_refresh_token(APP);
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    server.push_fault(Fault::too_many_requests(2));
    server.push_fault(Fault::service_unavailable(Some(RetryAfter::HttpDate(date))));
    assert_eq!(server.pending_faults(), 2);

    let res = refresh(&http, &server, &rt).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()[reqwest::header::RETRY_AFTER], "2");
    let (_, body) = json(res).await;
    assert_eq!(body["error"], "temporarily_unavailable");

    let res = refresh(&http, &server, &rt).await.unwrap();
    assert_eq!(res.status(), 503);
    let ra = res.headers()[reqwest::header::RETRY_AFTER]
        .to_str()
        .unwrap();
    assert_eq!(ra, "Wed, 18 May 2033 03:33:20 GMT");
    assert_eq!(httpdate::parse_http_date(ra).unwrap(), date);
    assert!(res.bytes().await.unwrap().is_empty());

    assert!(
        server.is_refresh_token_live(&rt),
        "faults before processing consume nothing"
    );
    assert_eq!(server.pending_faults(), 0);
    let calls = server.calls();
    assert_eq!(calls[0].fault, Some(Fault::too_many_requests(2)));
    assert_eq!(calls[0].outcome.as_ref().unwrap().status, Some(429));
    assert_eq!(calls[1].outcome.as_ref().unwrap().status, Some(503));
    assert_eq!(calls[1].outcome.as_ref().unwrap().event, None);
    refresh_ok(&http, &server, &rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_http_date_retry_after_is_dated_when_sent() {
    let (server, http) = start(config()).await;
    let rt = server.mint_refresh_token(APP);
    let d = Duration::from_secs(30);
    server.push_fault(Fault::service_unavailable(Some(RetryAfter::HttpDateIn(d))));
    // Queued well before the request: the date must not count from here.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = SystemTime::now();
    let res = refresh(&http, &server, &rt).await.unwrap();
    let after = SystemTime::now();
    assert_eq!(res.status(), 503);
    let ra = res.headers()[reqwest::header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .to_owned();
    let date = httpdate::parse_http_date(&ra).unwrap();
    // Whole seconds, rounded down, of the moment the response was sent plus d.
    assert!(date + Duration::from_secs(1) > before + d, "{ra} too early");
    assert!(date <= after + d, "{ra} too late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_html_500_and_custom_status() {
    let (server, http) = start(config()).await;
    server.push_fault(Fault::html_500());
    server.push_fault(Fault::Status {
        code: 500,
        retry_after: None,
        body: FaultBody::OAuthError("access_denied"),
    });
    let res = cc(&http, &server).await.unwrap();
    assert_eq!(res.status(), 500);
    assert!(res.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let text = res.text().await.unwrap();
    assert!(text.starts_with("<!DOCTYPE html>"), "{text}");

    let (status, body) = json(cc(&http, &server).await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("access_denied"))
    );
    assert_eq!(cc(&http, &server).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_reset_before_processing_consumes_nothing() {
    let (server, http) = start(config()).await;
    let rt = server.mint_refresh_token(APP);
    server.push_fault(Fault::ResetBeforeProcessing);
    let err = refresh(&http, &server, &rt)
        .await
        .expect_err("connection must be reset");
    assert_connection_error(&err);
    assert!(server.is_refresh_token_live(&rt));

    let calls = server.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].fault, Some(Fault::ResetBeforeProcessing));
    let o = calls[0].outcome.as_ref().unwrap();
    assert_eq!(
        (o.status, o.event, o.access_token.as_ref()),
        (None, None, None)
    );

    // The retry with the same token succeeds.
    refresh_ok(&http, &server, &rt).await;
    assert_eq!(server.revocations(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_reset_after_commit_consumes_the_token() {
    let (server, http) = start(config()).await;
    let rt0 = server.mint_refresh_token(APP);
    server.push_fault(Fault::ResetAfterCommit);
    let err = refresh(&http, &server, &rt0).await.expect_err("reset");
    assert_connection_error(&err);

    assert_eq!(server.refresh_token_state(&rt0), RefreshTokenState::Spent);
    let o = server.calls()[0].outcome.clone().unwrap();
    assert_eq!(o.status, None, "client saw no response");
    assert_eq!(o.event, Some(GrantEvent::Rotated));
    let lost = o.refresh_token.expect("an RT was issued");
    assert_eq!(
        server.live_refresh_token_of_family(&rt0).as_deref(),
        Some(lost.as_str())
    );
    assert!(server.is_access_token_valid(&o.access_token.unwrap()));

    // Without an overlap window the retry with the old token is a replay (matrix #15).
    assert_eq!(refresh_err(&http, &server, &rt0).await, "invalid_grant");
    assert_eq!(server.revocations(), 1);
    assert_eq!(server.call_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_reset_after_commit_recovers_with_overlap() {
    let (server, http) = start(config().with_overlap(Some(Duration::from_secs(5)))).await;
    let rt0 = server.mint_refresh_token(APP);
    server.push_fault(Fault::ResetAfterCommit);
    assert_connection_error(&refresh(&http, &server, &rt0).await.expect_err("reset"));
    let body = refresh_ok(&http, &server, &rt0).await;
    let rt2 = str_field(&body, "refresh_token");
    assert!(server.is_refresh_token_live(rt2));
    assert_eq!(server.revocations(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_reply() {
    let (server, http) = start(config()).await;
    let rt = server.mint_refresh_token(APP);

    // Before commit: the client waits the delay and gets a normal answer.
    server.push_fault(Fault::SlowReply {
        delay: Duration::from_millis(400),
        after_commit: false,
    });
    let t0 = Instant::now();
    let body = refresh_ok(&http, &server, &rt).await;
    assert!(t0.elapsed() >= Duration::from_millis(400));
    let rt1 = str_field(&body, "refresh_token").to_owned();

    // After commit, with a client timeout shorter than the delay: the token is spent while the
    // client is still waiting.
    server.push_fault(Fault::SlowReply {
        delay: Duration::from_millis(1500),
        after_commit: true,
    });
    let err = http
        .post(server.token_url())
        .header(reqwest::header::AUTHORIZATION, basic(APP, APP_SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt1)])
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("client timeout");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(server.refresh_token_state(&rt1), RefreshTokenState::Spent);
    let o = server.calls()[1]
        .outcome
        .clone()
        .expect("decided before the delay");
    assert_eq!(o.status, Some(200));
    assert!(server.is_refresh_token_live(o.refresh_token.as_deref().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_strip_fields_and_string_expires_in() {
    let (server, http) = start(config()).await;
    let rt0 = server.mint_refresh_token(APP);

    server.push_fault(Fault::StripRefreshToken);
    let body = refresh_ok(&http, &server, &rt0).await;
    assert!(body.get("refresh_token").is_none());
    assert!(body.get("access_token").is_some());
    let o = server.calls()[0].outcome.clone().unwrap();
    let rt1 = o.refresh_token.expect("server still rotated");
    assert!(server.is_refresh_token_live(&rt1));
    assert!(!server.is_refresh_token_live(&rt0));

    server.push_fault(Fault::StripExpiresIn);
    let body = refresh_ok(&http, &server, &rt1).await;
    assert!(body.get("expires_in").is_none());
    let rt2 = str_field(&body, "refresh_token").to_owned();

    server.push_fault(Fault::StringExpiresIn);
    let body = refresh_ok(&http, &server, &rt2).await;
    assert_eq!(body["expires_in"], Value::String("3600".into()));
    let rt3 = str_field(&body, "refresh_token").to_owned();

    server.push_fault(Fault::StripAccessToken {
        hold: Duration::ZERO,
    });
    let body = refresh_ok(&http, &server, &rt3).await;
    assert!(body.get("access_token").is_none());
    let rt4 = str_field(&body, "refresh_token").to_owned();
    assert!(
        server.is_refresh_token_live(&rt4),
        "the rotation was committed"
    );
    assert!(!server.is_refresh_token_live(&rt3));

    // Field faults leave error responses alone (and are consumed by them).
    server.push_fault(Fault::StripExpiresIn);
    assert_eq!(
        refresh_err(&http, &server, "unknown").await,
        "invalid_grant"
    );
    assert_eq!(server.pending_faults(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_broken_json() {
    let (server, http) = start(config()).await;
    let rt0 = server.mint_refresh_token(APP);

    server.push_fault(Fault::BrokenJson {
        after_commit: false,
    });
    let res = refresh(&http, &server, &rt0).await.unwrap();
    assert_eq!(res.status(), 200);
    let bytes = res.bytes().await.unwrap();
    assert!(serde_json::from_slice::<Value>(&bytes).is_err());
    assert!(bytes.starts_with(b"{"));
    assert!(server.is_refresh_token_live(&rt0), "not processed");

    server.push_fault(Fault::BrokenJson { after_commit: true });
    let res = refresh(&http, &server, &rt0).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()[reqwest::header::CONTENT_TYPE],
        "application/json;charset=UTF-8"
    );
    let bytes = res.bytes().await.unwrap();
    assert!(serde_json::from_slice::<Value>(&bytes).is_err());
    assert_eq!(server.refresh_token_state(&rt0), RefreshTokenState::Spent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redirect_is_not_followed() {
    let (server, http) = start(config()).await;
    let rt = server.mint_refresh_token(APP);
    let location = format!("{}/elsewhere", server.url());
    server.push_fault(Fault::Redirect {
        location: location.clone(),
    });
    let res = refresh(&http, &server, &rt).await.unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(res.headers()[reqwest::header::LOCATION], location.as_str());
    assert!(server.is_refresh_token_live(&rt));
    assert_eq!(server.call_count(), 1, "redirect not followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_huge_body() {
    let (server, http) = start(config()).await;
    let size = 10 * 1024 * 1024;
    server.push_fault(Fault::HugeBody { bytes: size });
    let res = cc(&http, &server).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.content_length(),
        None,
        "streamed without Content-Length"
    );
    let bytes = res.bytes().await.unwrap();
    assert_eq!(bytes.len(), size);
    assert!(bytes.starts_with(b"{\"padding\":\""));
    assert!(bytes.ends_with(b"\"}"));

    server.push_fault(Fault::HugeBody { bytes: 5 });
    let bytes = cc(&http, &server).await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_faults_are_fifo_and_sticky_fault_applies_to_all() {
    let (server, http) = start(config()).await;
    server.push_fault(Fault::too_many_requests(1));
    server.push_fault(Fault::html_500());
    assert_eq!(cc(&http, &server).await.unwrap().status(), 429);
    assert_eq!(cc(&http, &server).await.unwrap().status(), 500);
    assert_eq!(cc(&http, &server).await.unwrap().status(), 200);

    server.set_sticky_fault(Some(Fault::service_unavailable(None)));
    server.push_fault(Fault::too_many_requests(1));
    assert_eq!(
        cc(&http, &server).await.unwrap().status(),
        429,
        "queue first"
    );
    assert_eq!(cc(&http, &server).await.unwrap().status(), 503);
    assert_eq!(cc(&http, &server).await.unwrap().status(), 503);
    server.set_sticky_fault(None);
    assert_eq!(cc(&http, &server).await.unwrap().status(), 200);

    server.push_fault(Fault::html_500());
    server.clear_faults();
    assert_eq!(cc(&http, &server).await.unwrap().status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Recording, concurrency, lifecycle
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn call_recording_and_concurrency_maxima() {
    let (server, http) = start(config().with_rotation(false)).await;
    let rt = server.mint_refresh_token(APP);
    // Every reply is held long enough that all five requests are in flight together even on a
    // loaded machine; the test waits for that before it looks at the maxima (a 300 ms hold
    // was not always enough on a busy 2-core runner).
    let hold = Duration::from_secs(5);
    server.set_sticky_fault(Some(Fault::SlowReply {
        delay: hold,
        after_commit: false,
    }));

    // Four simultaneous refreshes of one family, one CC call of another client.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (http, url, rt) = (http.clone(), server.token_url(), rt.clone());
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .header(reqwest::header::AUTHORIZATION, basic(APP, APP_SECRET))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let cc_call = {
        let (http, server_url) = (http.clone(), server.token_url());
        tokio::spawn(async move {
            http.post(server_url)
                .header(reqwest::header::AUTHORIZATION, basic("m2m", "m2m-secret"))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let deadline = Instant::now() + hold;
    while server.in_flight() < 5 {
        assert!(
            Instant::now() < deadline,
            "the five requests were not in flight together within the {hold:?} hold"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cc_call.await.unwrap().unwrap(), 200);
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert_eq!(server.max_concurrent_per_refresh_family(), 4);
    assert_eq!(server.max_concurrent_per_client(), 4);
    assert_eq!(server.max_concurrent_for_client(APP), 4);
    assert_eq!(server.max_concurrent_for_client("m2m"), 1);
    assert_eq!(server.max_in_flight(), 5);
    assert_eq!(server.in_flight(), 0);
    assert_eq!(server.call_count(), 5);
    let calls = server.calls();
    assert!(calls.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.grant_type.as_deref() == Some("refresh_token"))
            .count(),
        4
    );
    assert!(calls.iter().all(|c| c.outcome.is_some()));

    // Sequential calls never overlap.
    server.reset_calls();
    assert_eq!(server.call_count(), 0);
    assert_eq!(server.max_concurrent_per_refresh_family(), 0);
    server.set_sticky_fault(None);
    for _ in 0..3 {
        refresh_ok(&http, &server, &rt).await;
    }
    assert_eq!(server.max_concurrent_per_refresh_family(), 1);
    assert_eq!(server.call_count(), 3);
    assert!(server.calls()[0].seq > calls[4].seq, "seq keeps increasing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_call_is_recorded_without_outcome() {
    let (server, http) = start(config()).await;
    server.push_fault(Fault::SlowReply {
        delay: Duration::from_millis(500),
        after_commit: false,
    });
    let (h, url) = (http.clone(), server.token_url());
    let task = tokio::spawn(async move {
        h.post(url)
            .header(reqwest::header::AUTHORIZATION, basic("m2m", "m2m-secret"))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map(|r| r.status())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.call_count() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.calls()[0].outcome, None);
    assert_eq!(server.in_flight(), 1);
    assert_eq!(task.await.unwrap().unwrap(), 200);
    assert!(server.calls()[0].outcome.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
/// Under 32 concurrent clients every request is answered and recorded. (How fast is the
/// benchmark's business: a timed assertion here failed on a loaded machine.)
async fn answers_and_records_every_one_of_many_concurrent_requests() {
    let (server, http) = start(config()).await;
    let total = 3000usize;
    let workers = 32usize;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (http, url) = (http.clone(), server.token_url());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for _ in (w..total).step_by(workers) {
                let res = http
                    .post(&url)
                    .header(reqwest::header::AUTHORIZATION, basic("m2m", "m2m-secret"))
                    .form(&[("grant_type", "client_credentials")])
                    .send()
                    .await
                    .expect("send");
                if res.status() == 200 {
                    ok += 1;
                }
                let _ = res.bytes().await;
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    let elapsed = t0.elapsed();
    assert_eq!(ok, total);
    assert_eq!(server.call_count(), total);
    let rate = total as f64 / elapsed.as_secs_f64();
    eprintln!("token server: {total} requests in {elapsed:?} ({rate:.0}/s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_and_drop_stops_the_server() {
    let (server, http) = start(config()).await;
    assert!(server.url().starts_with("http://127.0.0.1:"));
    assert_eq!(server.token_url(), format!("{}/oauth/token", server.url()));
    assert_eq!(cc(&http, &server).await.unwrap().status(), 200);
    let url = server.token_url();
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fresh = client();
    let err = fresh
        .post(&url)
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect_err("server stopped");
    assert!(err.is_connect() || err.is_request(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_loris_commits_then_trickles_the_body() {
    let (server, http) = start(config()).await;
    let rt = server.mint_refresh_token(APP);
    let interval = Duration::from_millis(10);
    server.push_fault(Fault::SlowLoris { interval });
    let started = Instant::now();
    let res = refresh(&http, &server, &rt).await.unwrap();
    assert_eq!(res.status(), 200, "the status comes at once");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.refresh_token_state(&rt), RefreshTokenState::Spent);
    let bytes = res.bytes().await.unwrap();
    assert!(
        started.elapsed() >= interval * (bytes.len() as u32 - 1),
        "{} bytes in {:?}",
        bytes.len(),
        started.elapsed()
    );
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(server.is_refresh_token_live(body["refresh_token"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_invalid_utf8_breaks_the_access_token_only() {
    let (server, http) = start(config()).await;
    let rt = server.mint_refresh_token(APP);
    server.push_fault(Fault::InvalidUtf8);
    let bytes = refresh(&http, &server, &rt)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(std::str::from_utf8(&bytes).is_err());
    assert!(serde_json::from_slice::<Value>(&bytes).is_err());
    let text = String::from_utf8_lossy(&bytes);
    let new_rt = text
        .split("\"refresh_token\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap();
    assert!(server.is_refresh_token_live(new_rt), "rotated and intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_duplicate_field_sends_the_decoy_first() {
    let (server, http) = start(config()).await;
    server.push_fault(Fault::DuplicateField {
        field: "access_token".into(),
        decoy: "\"decoy\"".into(),
    });
    let text = cc(&http, &server).await.unwrap().text().await.unwrap();
    assert!(
        text.starts_with("{\"access_token\":\"decoy\",\"access_token\":\""),
        "{text}"
    );
    let last: Value = serde_json::from_str(&text).unwrap();
    assert!(server.is_access_token_valid(last["access_token"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_raw_field_sends_numbers_as_written() {
    let (server, http) = start(config()).await;
    for raw in ["1e400", "-1", "99999999999999999999"] {
        server.push_fault(Fault::RawField {
            field: "expires_in".into(),
            raw: raw.into(),
        });
        let text = cc(&http, &server).await.unwrap().text().await.unwrap();
        assert!(
            text.ends_with(&format!(",\"expires_in\":{raw}}}")),
            "{text}"
        );
        assert_eq!(text.matches("expires_in").count(), 1, "{text}");
    }
}
