//! A **demo** OAuth 2.0 token endpoint for the local demo of `vaultconn run` — not a provider.
//!
//! It lets the demo's OAuth connections turn Ready and refresh visibly with nothing but this
//! process: `POST /oauth/token` on `http://127.0.0.1:<random port>` with
//! - the `client_credentials` grant (RFC 6749 §4.4; no refresh token is returned), and
//! - the `refresh_token` grant (§6) with rotation: every refresh returns a new refresh token and
//!   the spent one is refused from then on (`invalid_grant`),
//!
//! for confidential clients authenticated with `client_secret_basic` or `client_secret_post`.
//! Access tokens are short-lived (30 s by default) so that a watcher sees the expiry move.
//!
//! What it deliberately is not: there is no authorization endpoint, no TLS, no persistence
//! (state lives in memory and dies with the process), no rotation overlap window and no reuse
//! detection. It ships only with the `local-cluster` feature (the product image is built
//! without it). The fault-injecting token server the tests use is `crates/testkit`'s; the
//! product never depends on that one.
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use rand::Rng as _;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Path of the token endpoint.
pub const TOKEN_PATH: &str = "/oauth/token";

/// Lifetime of the access tokens the demo issues: short, so the expiry visibly moves, and long
/// enough that the operator's default schedule (refresh with a third left) is calm.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(30);

/// How long [`DemoTokenServer::stop`] waits for in-flight requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A client registered with the demo server. `Debug` does not show the secret.
#[derive(Clone)]
pub struct DemoClient {
    pub client_id: String,
    pub client_secret: String,
}

impl std::fmt::Debug for DemoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish()
    }
}

#[derive(Default)]
struct State {
    lifetime: Duration,
    /// `client_id` → `client_secret`.
    clients: HashMap<String, String>,
    /// Live refresh tokens → the `client_id` they were issued to. A refresh removes the one it
    /// spends, which is what "rotating" means here.
    refresh_tokens: HashMap<String, String>,
}

type Shared = Arc<Mutex<State>>;

/// The state is plain maps: a panic in one request cannot leave them half-updated, so a
/// poisoned lock is still usable.
fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running demo token server; stopped by [`DemoTokenServer::stop`] or on drop.
pub struct DemoTokenServer {
    addr: SocketAddr,
    state: Shared,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for DemoTokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoTokenServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DemoTokenServer {
    /// Listen on `127.0.0.1:<random port>` and serve from a task of the current tokio runtime.
    pub async fn start(token_lifetime: Duration) -> io::Result<DemoTokenServer> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::new(Mutex::new(State {
            lifetime: token_lifetime,
            ..State::default()
        }));
        let app = Router::new()
            .route(TOKEN_PATH, post(token))
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(DemoTokenServer {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:<port>/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// Register a new confidential client with a random id and secret. `name` becomes the
    /// readable prefix of the id.
    pub fn register_client(&self, name: &str) -> DemoClient {
        let client = DemoClient {
            client_id: format!("{name}-{}", random_hex(4)),
            client_secret: random_hex(16),
        };
        lock(&self.state)
            .clients
            .insert(client.client_id.clone(), client.client_secret.clone());
        client
    }

    /// Issue a refresh token to a registered client, as an authorization would have: the seed
    /// a `refreshToken` connection starts from.
    pub fn issue_refresh_token(&self, client_id: &str) -> String {
        let token = random_hex(24);
        lock(&self.state)
            .refresh_tokens
            .insert(token.clone(), client_id.to_string());
        token
    }

    /// Stop accepting requests and wait (briefly) for those in flight.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            match tokio::time::timeout(STOP_TIMEOUT, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "demo token server failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "demo token server task failed"),
                Err(_) => task.abort(),
            }
        }
    }
}

impl Drop for DemoTokenServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(&mut buf[..]);
    hex::encode(buf)
}

/// An RFC 6749 §5.2 error response.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut response = (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn invalid_client(used_basic: bool) -> Response {
    let mut response = oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "unknown client or wrong secret",
    );
    if used_basic {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"vaultconn-demo\""),
        );
    }
    response
}

/// RFC 6749 Appendix B: id and secret are form-urlencoded before they are joined for Basic.
fn form_decode(part: &str) -> Option<String> {
    percent_encoding::percent_decode_str(&part.replace('+', " "))
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// `(client_id, client_secret)` from the Basic header, if there is one. `Err` for a malformed one.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, ()> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ())?;
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Err(());
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| ())?;
    let decoded = String::from_utf8(decoded).map_err(|_| ())?;
    let (id, secret) = decoded.split_once(':').ok_or(())?;
    Ok(Some((
        form_decode(id).ok_or(())?,
        form_decode(secret).ok_or(())?,
    )))
}

async fn token(AxumState(state): AxumState<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let mut params: HashMap<String, String> = HashMap::new();
    for (key, value) in form_urlencoded::parse(&body) {
        // §3.2: parameters must not be repeated.
        if params
            .insert(key.clone().into_owned(), value.into_owned())
            .is_some()
        {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("parameter {key} is repeated"),
            );
        }
    }
    let Ok(basic) = basic_credentials(&headers) else {
        return invalid_client(true);
    };
    let used_basic = basic.is_some();
    let in_body = params.contains_key("client_secret");
    let (client_id, client_secret) = match (basic, in_body) {
        (Some(_), true) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "use one client authentication method, not two",
            )
        }
        (Some(pair), false) => pair,
        (None, true) => (
            params.get("client_id").cloned().unwrap_or_default(),
            params.get("client_secret").cloned().unwrap_or_default(),
        ),
        (None, false) => return invalid_client(false),
    };
    let mut st = lock(&state);
    if st.clients.get(&client_id) != Some(&client_secret) {
        return invalid_client(used_basic);
    }
    let new_refresh_token = match params.get("grant_type").map(String::as_str) {
        Some("client_credentials") => None,
        Some("refresh_token") => {
            let Some(presented) = params.get("refresh_token") else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "refresh_token is missing",
                );
            };
            // Spent, unknown, or another client's: refused. The token stays live for its owner.
            if st.refresh_tokens.get(presented) != Some(&client_id) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "the refresh token is unknown, spent or issued to another client",
                );
            }
            st.refresh_tokens.remove(presented);
            let next = random_hex(24);
            st.refresh_tokens.insert(next.clone(), client_id.clone());
            Some(next)
        }
        Some(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "this demo server supports client_credentials and refresh_token",
            )
        }
        None => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is missing",
            )
        }
    };
    let lifetime = st.lifetime.as_secs();
    drop(st);
    tracing::info!(
        client_id = %client_id,
        grant = if new_refresh_token.is_some() { "refresh_token" } else { "client_credentials" },
        expires_in = lifetime,
        rotated = new_refresh_token.is_some(),
        "demo token server issued an access token"
    );
    let mut body = json!({
        "access_token": random_hex(24),
        "token_type": "Bearer",
        "expires_in": lifetime,
    });
    if let Some(scope) = params.get("scope") {
        body["scope"] = json!(scope);
    }
    if let Some(rt) = new_refresh_token {
        body["refresh_token"] = json!(rt);
    }
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn http() -> reqwest::Client {
        crate::install_crypto_provider();
        reqwest::Client::new()
    }

    async fn post(
        server: &DemoTokenServer,
        basic: Option<&DemoClient>,
        form: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = http().post(server.token_url()).form(form);
        if let Some(c) = basic {
            req = req.basic_auth(&c.client_id, Some(&c.client_secret));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn refresh(server: &DemoTokenServer, client: &DemoClient, rt: String) -> (u16, Value) {
        post(
            server,
            Some(client),
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
        )
        .await
    }

    #[tokio::test]
    async fn client_credentials_issues_short_lived_tokens_without_refresh_token() {
        let server = DemoTokenServer::start(Duration::from_secs(30))
            .await
            .unwrap();
        let client = server.register_client("billing");
        let (status, body) = post(
            &server,
            Some(&client),
            &[("grant_type", "client_credentials"), ("scope", "a b")],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["expires_in"], 30);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["scope"], "a b");
        assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(body.get("refresh_token").is_none());
        // client_secret_post works too.
        let (status, _) = post(
            &server,
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client.client_id),
                ("client_secret", &client.client_secret),
            ],
        )
        .await;
        assert_eq!(status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn wrong_secret_and_unknown_grant_are_refused() {
        let server = DemoTokenServer::start(DEFAULT_TOKEN_LIFETIME)
            .await
            .unwrap();
        let mut client = server.register_client("x");
        client.client_secret.push('!');
        let (status, body) = post(
            &server,
            Some(&client),
            &[("grant_type", "client_credentials")],
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
        let client = server.register_client("y");
        let (status, body) = post(&server, Some(&client), &[("grant_type", "password")]).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("unsupported_grant_type"))
        );
    }

    #[tokio::test]
    async fn refresh_rotates_and_refuses_the_spent_token() {
        let server = DemoTokenServer::start(DEFAULT_TOKEN_LIFETIME)
            .await
            .unwrap();
        let client = server.register_client("crm");
        let seed = server.issue_refresh_token(&client.client_id);
        let send = |rt: String| refresh(&server, &client, rt);
        let (status, first) = send(seed.clone()).await;
        assert_eq!(status, 200, "{first}");
        let next = first["refresh_token"].as_str().unwrap().to_string();
        assert_ne!(next, seed, "a new refresh token each refresh");
        let (status, body) = send(seed.clone()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_grant")),
            "the spent seed is refused"
        );
        let (status, second) = send(next.clone()).await;
        assert_eq!(status, 200, "{second}");
        assert_ne!(second["refresh_token"].as_str().unwrap(), next);
        // Another client cannot use this client's token.
        let other = server.register_client("other");
        let live = second["refresh_token"].as_str().unwrap();
        let (status, body) = post(
            &server,
            Some(&other),
            &[("grant_type", "refresh_token"), ("refresh_token", live)],
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_grant"))
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let c = DemoClient {
            client_id: "id".into(),
            client_secret: "s3cr3t".into(),
        };
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
