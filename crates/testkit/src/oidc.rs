//! A real OAuth 2.0 server on loopback: panva's `oidc-provider` (OpenID Certified), run with Node
//! from `tests/oidc/server.mjs`. See that file's header for the clients, endpoints, fault modes and
//! quirks; this module starts it, talks to its test-only endpoints and kills it on drop.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vaultconn_testkit::oidc::OidcError> {
//! use vaultconn_testkit::oidc::{OidcOptions, OidcProvider, RT_CLIENT};
//! let idp = OidcProvider::start(OidcOptions { rotate: true, access_token_ttl_secs: 5 }).await?;
//! let rt = idp.mint_refresh_token().await?;
//! // POST idp.token_url() with grant_type=refresh_token, authenticated as RT_CLIENT ...
//! assert_eq!(idp.events().await?.grant_revoked, 0);
//! # let _ = (rt, RT_CLIENT); Ok(()) }
//! ```
//!
//! The node process dies with the test: `kill_on_drop`, plus `PR_SET_PDEATHSIG(SIGKILL)` set in the
//! child (from a spawner thread that never exits, so the signal fires only when the whole test
//! process is gone, even on SIGKILL), plus the server exits when its stdin pipe closes.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

pub use crate::provider_invariants::fingerprint;
use crate::provider_invariants::{Answer, ProviderCall, ProviderRecord, ProviderRevocation};

/// Where the server and its `package.json` live.
pub const SERVER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/oidc");
/// Installs `tests/oidc/node_modules` if needed and prints the node binary to use.
pub const INSTALL_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/install-oidc-provider.sh"
);
/// Account (`sub`) that minted refresh tokens belong to.
pub const TEST_ACCOUNT: &str = "test-user";
/// Scope of minted refresh tokens.
pub const REFRESH_TOKEN_SCOPE: &str = "openid offline_access";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STDERR_LINES_KEPT: usize = 400;

/// A client registered in the test provider. Secrets are fixed and test-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OidcClient {
    pub id: &'static str,
    pub secret: &'static str,
    /// `client_secret_basic` or `client_secret_post`.
    pub auth_method: &'static str,
}

impl OidcClient {
    /// `Authorization: Basic …` value per RFC 6749 §2.3.1 / App. B: id and secret are each
    /// form-urlencoded, joined by `:`, then base64-encoded.
    pub fn basic_auth_header(&self) -> String {
        let id: String = url::form_urlencoded::byte_serialize(self.id.as_bytes()).collect();
        let secret: String = url::form_urlencoded::byte_serialize(self.secret.as_bytes()).collect();
        let raw = format!("{id}:{secret}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// The non-compliant form (id and secret not form-urlencoded) that a buggy client would send.
    /// The provider rejects it for [`M2M_SPECIAL`] with 400 `invalid_request`.
    pub fn raw_basic_auth_header(&self) -> String {
        let raw = format!("{}:{}", self.id, self.secret);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// `client_credentials`, `client_secret_basic`.
pub const M2M: OidcClient = OidcClient {
    id: "m2m",
    secret: "m2m-secret",
    auth_method: "client_secret_basic",
};
/// `client_credentials`, `client_secret_post`.
pub const M2M_POST: OidcClient = OidcClient {
    id: "m2m-post",
    secret: "m2m-post-secret",
    auth_method: "client_secret_post",
};
/// `client_credentials`, `client_secret_basic`, with characters that need App. B encoding.
pub const M2M_SPECIAL: OidcClient = OidcClient {
    id: "m2m special/1",
    secret: "s3cr:et+%&",
    auth_method: "client_secret_basic",
};
/// `authorization_code` + `refresh_token`, `client_secret_basic`. Owner of minted refresh tokens.
pub const RT_CLIENT: OidcClient = OidcClient {
    id: "rt-client",
    secret: "rt-client-secret",
    auth_method: "client_secret_basic",
};

/// How to run the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OidcOptions {
    /// `rotateRefreshToken`: a new refresh token per refresh, the spent one is consumed; replaying
    /// a consumed one revokes the whole grant.
    pub rotate: bool,
    /// Lifetime of every access token (client_credentials and refresh), reported as `expires_in`.
    pub access_token_ttl_secs: u64,
}

impl Default for OidcOptions {
    fn default() -> Self {
        Self {
            rotate: true,
            access_token_ttl_secs: 60,
        }
    }
}

/// Errors of the harness (not OAuth errors of the code under test).
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("installing oidc-provider failed: {0}")]
    Install(String),
    #[error("could not spawn node for oidc-provider: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("oidc-provider did not report its port within {timeout:?}; stderr:\n{stderr}")]
    StartTimeout { timeout: Duration, stderr: String },
    #[error("oidc-provider exited before listening; stderr:\n{0}")]
    Exited(String),
    #[error("unexpected startup line from oidc-provider: {0:?}")]
    BadPortLine(String),
    #[error("request to the test provider failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("test provider answered {status} to {what}: {body}")]
    Status {
        what: &'static str,
        status: u16,
        body: String,
    },
}

/// One `/token` request as the provider saw it (never token or secret values: tokens appear as
/// [`fingerprint`]s).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TokenRequestRecord {
    /// Arrival order since start or the last reset.
    #[serde(default)]
    pub seq: u64,
    /// Arrival, milliseconds since the Unix epoch.
    #[serde(default)]
    pub at: u64,
    /// When the outcome was decided (before a fault delays or drops the response).
    pub done_at: Option<u64>,
    pub grant_type: Option<String>,
    /// `client_id` form parameter, if one was sent (absent with pure Basic auth).
    pub client_id: Option<String>,
    /// `basic`, `post` or `none`.
    pub auth: Option<String>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    /// HTTP status sent (absent when the connection was dropped).
    pub status: Option<u16>,
    /// The fault applied to this request, if any.
    pub fault: Option<String>,
    /// Client id as presented, from `Authorization: Basic` or the form.
    pub presented_client_id: Option<String>,
    /// OAuth `error` of an error response produced by the provider (not by a fault).
    pub error: Option<String>,
    /// Fingerprint of the refresh token presented.
    pub refresh_token_fp: Option<String>,
    /// Fingerprint of the new refresh token the provider committed (even if a fault kept it
    /// from the client).
    pub issued_refresh_token_fp: Option<String>,
    /// Grant (refresh token family) of the presented token, when the provider found it.
    pub grant_id: Option<String>,
    /// This request made the provider revoke that grant (reuse of a consumed refresh token).
    pub revoked_grant_id: Option<String>,
}

/// A refresh token minted through `/__mint_rt`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MintRecord {
    pub refresh_token_fp: String,
    pub grant_id: Option<String>,
    pub at: u64,
}

/// One `grant.revoked` event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RevocationRecord {
    pub grant_id: Option<String>,
    /// `token` (reuse detection) or `revocation` (the RFC 7009 endpoint).
    pub route: Option<String>,
    pub at: u64,
    /// The token request that caused it (route `token`).
    pub request_seq: Option<u64>,
}

/// A `grant.error`, `server_error`, `revocation.error` or `introspection.error` event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ProviderErrorEvent {
    pub event: String,
    /// OAuth error code, e.g. `invalid_grant`.
    pub error: String,
    /// Public description (for `invalid_grant` always "grant request is invalid").
    pub error_description: Option<String>,
    /// Internal detail, e.g. "refresh token already used", "refresh token not found".
    pub error_detail: Option<String>,
    pub grant_type: Option<String>,
    pub client_id: Option<String>,
}

/// Provider event counters since start (or the last [`OidcProvider::reset_events`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OidcEvents {
    /// Whole grants revoked: refresh-token reuse with rotation on, or revocation of a refresh
    /// token. Must stay 0 in every non-adversarial test.
    pub grant_revoked: u64,
    pub refresh_token_consumed: u64,
    /// Includes tokens minted by [`OidcProvider::mint_refresh_token`].
    pub refresh_token_saved: u64,
    pub refresh_token_destroyed: u64,
    pub grant_success: u64,
    pub grant_error: u64,
    pub server_error: u64,
    /// Opaque access tokens from the refresh grant.
    pub access_token_saved: u64,
    /// JWT access tokens from the refresh grant (resource-bound).
    pub access_token_issued: u64,
    /// Opaque client_credentials tokens.
    pub client_credentials_saved: u64,
    /// JWT client_credentials tokens (issued with `resource` / `audience`).
    pub client_credentials_issued: u64,
    pub revocation_error: u64,
    pub introspection_error: u64,
    /// Every POST to the token endpoint, including failed and fault-injected ones.
    pub token_requests: u64,
    /// The last ≤10,000 token requests, oldest first.
    pub requests: Vec<TokenRequestRecord>,
    /// Token requests no longer in `requests` (the oldest beyond 10,000).
    pub requests_dropped: u64,
    /// The last ≤1000 error events, oldest first.
    pub errors: Vec<ProviderErrorEvent>,
    /// Refresh tokens minted through [`OidcProvider::mint_refresh_token`].
    pub mints: Vec<MintRecord>,
    /// Every `grant.revoked` event.
    pub revocations: Vec<RevocationRecord>,
}

#[derive(Deserialize)]
struct RawEvents {
    counts: HashMap<String, u64>,
    token_requests: u64,
    #[serde(default)]
    requests: Vec<TokenRequestRecord>,
    #[serde(default)]
    requests_dropped: u64,
    #[serde(default)]
    errors: Vec<ProviderErrorEvent>,
    #[serde(default)]
    mints: Vec<MintRecord>,
    #[serde(default)]
    revocations: Vec<RevocationRecord>,
}

impl From<RawEvents> for OidcEvents {
    fn from(raw: RawEvents) -> Self {
        let c = |name: &str| raw.counts.get(name).copied().unwrap_or(0);
        OidcEvents {
            grant_revoked: c("grant.revoked"),
            refresh_token_consumed: c("refresh_token.consumed"),
            refresh_token_saved: c("refresh_token.saved"),
            refresh_token_destroyed: c("refresh_token.destroyed"),
            grant_success: c("grant.success"),
            grant_error: c("grant.error"),
            server_error: c("server_error"),
            access_token_saved: c("access_token.saved"),
            access_token_issued: c("access_token.issued"),
            client_credentials_saved: c("client_credentials.saved"),
            client_credentials_issued: c("client_credentials.issued"),
            revocation_error: c("revocation.error"),
            introspection_error: c("introspection.error"),
            token_requests: raw.token_requests,
            requests: raw.requests,
            requests_dropped: raw.requests_dropped,
            errors: raw.errors,
            mints: raw.mints,
            revocations: raw.revocations,
        }
    }
}

fn epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl OidcEvents {
    /// The provider's record for the provider-side invariants: every token request with the
    /// presented and issued refresh tokens (as fingerprints) and their grant, the minted seeds
    /// and every `grant.revoked`, tied to the request that caused it.
    pub fn provider_record(&self, provider: &str) -> ProviderRecord {
        let mut record = ProviderRecord {
            provider: provider.to_owned(),
            minted: self
                .mints
                .iter()
                .map(|m| (m.refresh_token_fp.clone(), m.grant_id.clone()))
                .collect(),
            ..ProviderRecord::default()
        };
        if self.requests_dropped > 0 {
            record.gaps.push(format!(
                "{} token request(s) fell out of the provider's log",
                self.requests_dropped
            ));
        }
        for r in &self.requests {
            let answer = match (r.done_at, r.status) {
                (None, _) => Answer::Pending,
                _ if r
                    .fault
                    .as_deref()
                    .is_some_and(|f| ["drop_before", "status", "html500"].contains(&f)) =>
                {
                    Answer::NotProcessed
                }
                (_, Some(200)) => Answer::Issued,
                _ if r.revoked_grant_id.is_some() => Answer::SpentRefused { revoked: true },
                (_, Some(401)) => Answer::NotProcessed,
                _ => Answer::Refused(r.error.clone().unwrap_or_else(|| "no response".into())),
            };
            record.calls.push(ProviderCall {
                seq: r.seq,
                at: epoch_ms(r.at),
                decided_at: r.done_at.map(epoch_ms),
                client_id: r
                    .presented_client_id
                    .clone()
                    .or_else(|| r.client_id.clone()),
                grant_type: r.grant_type.clone(),
                presented: r.refresh_token_fp.clone(),
                issued: r.issued_refresh_token_fp.clone(),
                withheld: r.fault.as_deref() == Some("strip_refresh_token")
                    && r.status == Some(200)
                    && r.issued_refresh_token_fp.is_some(),
                family: r.grant_id.clone(),
                status: r.status,
                answer,
                fault: r.fault.clone(),
            });
        }
        for v in &self.revocations {
            let by_call = match v.route.as_deref() {
                Some("token") => v.request_seq,
                _ => None,
            };
            if v.route.as_deref() == Some("token") && by_call.is_none() {
                record.gaps.push(format!(
                    "grant {:?} was revoked at the token endpoint by a request the log lacks",
                    v.grant_id
                ));
            }
            record.revocations.push(ProviderRevocation {
                family: v.grant_id.clone(),
                at: epoch_ms(v.at),
                by_call,
            });
        }
        if self.grant_revoked != self.revocations.len() as u64 {
            record.gaps.push(format!(
                "{} grant.revoked event(s) counted, {} recorded",
                self.grant_revoked,
                self.revocations.len()
            ));
        }
        record
    }

    /// Refresh-token grants answered 200 that arrived after `since`, per grant (the family a
    /// minted seed started; rotation keeps it).
    pub fn refreshes_since(&self, since: SystemTime) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in &self.requests {
            if r.grant_type.as_deref() == Some("refresh_token")
                && r.status == Some(200)
                && epoch_ms(r.at) > since
            {
                if let Some(grant) = &r.grant_id {
                    *out.entry(grant.clone()).or_insert(0) += 1;
                }
            }
        }
        out
    }

    /// Fingerprints of refresh tokens presented more than once, with the request numbers. With
    /// rotation and no overlap window each second presentation is a replay.
    pub fn refresh_tokens_presented_twice(&self) -> BTreeMap<String, Vec<u64>> {
        let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for r in &self.requests {
            if let Some(fp) = &r.refresh_token_fp {
                seen.entry(fp.clone()).or_default().push(r.seq);
            }
        }
        seen.retain(|_, seqs| seqs.len() > 1);
        seen
    }
}

/// A fault applied by the provider to the next token request(s). "After commit" means the
/// provider has fully processed the grant (a rotated refresh token is already consumed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 200 with `refresh_token` removed.
    StripRefreshToken,
    /// 200 with `expires_in` removed.
    StripExpiresIn,
    /// 200 with `expires_in` as a JSON string (`"60"`).
    ExpiresInString,
    /// 200 `application/json` with truncated JSON, after commit.
    Garbage200,
    /// Connection destroyed before the request is processed (nothing consumed).
    DropBefore,
    /// Request processed, then the connection is destroyed without a response.
    DropAfterCommit,
    /// Request processed, response delayed.
    SlowAfterCommit { delay: Duration },
    /// Reply `status` (e.g. 429, 503) with an optional `Retry-After` value (delta-seconds or an
    /// HTTP-date); the request is not processed.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// 500 with an HTML body; the request is not processed.
    Html500,
}

impl Fault {
    fn to_json(&self, times: u32) -> serde_json::Value {
        let mode = match self {
            Fault::StripRefreshToken => "strip_refresh_token",
            Fault::StripExpiresIn => "strip_expires_in",
            Fault::ExpiresInString => "expires_in_string",
            Fault::Garbage200 => "garbage_200",
            Fault::DropBefore => "drop_before",
            Fault::DropAfterCommit => "drop_after_commit",
            Fault::SlowAfterCommit { .. } => "slow_after_commit",
            Fault::Status { .. } => "status",
            Fault::Html500 => "html500",
        };
        let mut v = serde_json::json!({ "mode": mode, "times": times });
        match self {
            Fault::SlowAfterCommit { delay } => {
                v["delay_ms"] =
                    serde_json::json!(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
            }
            Fault::Status {
                status,
                retry_after,
            } => {
                v["status"] = serde_json::json!(status);
                if let Some(r) = retry_after {
                    v["retry_after"] = serde_json::json!(r);
                }
            }
            _ => {}
        }
        v
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    token_endpoint: String,
    introspection_endpoint: String,
    revocation_endpoint: String,
}

#[derive(Deserialize)]
struct PortLine {
    port: u16,
}

#[derive(Deserialize)]
struct Minted {
    refresh_token: String,
}

#[derive(Deserialize)]
struct Introspection {
    active: bool,
}

type StderrLog = Arc<Mutex<VecDeque<String>>>;

/// A running oidc-provider. Dropping it kills the node process.
pub struct OidcProvider {
    child: Child,
    // Held open: the server exits when this pipe closes.
    _stdin: Option<ChildStdin>,
    _stdout: BufReader<ChildStdout>,
    stderr: StderrLog,
    options: OidcOptions,
    port: u16,
    base_url: String,
    issuer: String,
    token_url: String,
    introspection_url: String,
    revocation_url: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for OidcProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcProvider")
            .field("pid", &self.child.id())
            .field("issuer", &self.issuer)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl OidcProvider {
    /// Installs the provider if needed (`scripts/install-oidc-provider.sh`), starts it on a random
    /// loopback port and waits until it serves its discovery document.
    pub async fn start(options: OidcOptions) -> Result<Self, OidcError> {
        vaultconn_local_cluster::install_crypto_provider();
        for c in [M2M, M2M_POST, M2M_SPECIAL, RT_CLIENT] {
            crate::leak_scan::register_secret(c.secret, "an oidc-provider client secret");
        }
        let node = node_binary().await?;

        let mut cmd = Command::new(&node);
        cmd.arg(Path::new(SERVER_DIR).join("server.mjs"))
            .current_dir(SERVER_DIR)
            .env("PORT", "0")
            .env("ROTATE", if options.rotate { "true" } else { "false" })
            .env("AT_TTL", options.access_token_ttl_secs.max(1).to_string())
            .env("EXIT_ON_STDIN_EOF", "1")
            .env_remove("NODE_OPTIONS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = spawn_with_parent_death_signal(cmd).await?;

        let stderr: StderrLog = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_done = child.stderr.take().map(|pipe| {
            let log = Arc::clone(&stderr);
            tokio::spawn(collect_stderr(pipe, log))
        });
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            return Err(OidcError::Spawn(std::io::Error::other("no stdout pipe")));
        };
        let mut stdout = BufReader::new(stdout);

        let mut line = String::new();
        let read = tokio::time::timeout(START_TIMEOUT, stdout.read_line(&mut line)).await;
        let port = match read {
            Err(_) => {
                let _ = child.start_kill();
                return Err(OidcError::StartTimeout {
                    timeout: START_TIMEOUT,
                    stderr: tail(&stderr),
                });
            }
            Ok(Err(e)) => {
                let _ = child.start_kill();
                return Err(OidcError::Spawn(e));
            }
            Ok(Ok(0)) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                if let Some(done) = stderr_done {
                    let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
                }
                return Err(OidcError::Exited(tail(&stderr)));
            }
            Ok(Ok(_)) => match serde_json::from_str::<PortLine>(line.trim()) {
                Ok(p) => p.port,
                Err(_) => {
                    let _ = child.start_kill();
                    return Err(OidcError::BadPortLine(line));
                }
            },
        };

        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base_url = format!("http://127.0.0.1:{port}");
        let resp = http
            .get(format!("{base_url}/.well-known/openid-configuration"))
            .send()
            .await?;
        let discovery: Discovery = expect_ok(resp, "discovery").await?.json().await?;

        Ok(Self {
            child,
            _stdin: stdin,
            _stdout: stdout,
            stderr,
            options,
            port,
            base_url,
            issuer: discovery.issuer,
            token_url: discovery.token_endpoint,
            introspection_url: discovery.introspection_endpoint,
            revocation_url: discovery.revocation_endpoint,
            http,
        })
    }

    pub fn options(&self) -> OidcOptions {
        self.options
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, where the test-only `/__…` endpoints live.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The issuer from the discovery document (same as [`Self::base_url`]).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// `token_endpoint` from `/.well-known/openid-configuration`.
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// RFC 7662 introspection endpoint.
    pub fn introspection_url(&self) -> &str {
        &self.introspection_url
    }

    /// RFC 7009 revocation endpoint.
    pub fn revocation_url(&self) -> &str {
        &self.revocation_url
    }

    /// Process id of the node server, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines the server wrote to stderr (startup banner, `grant.revoked` lines,
    /// `server_error` stacks). Set `VAULTCONN_OIDC_LOG=1` to also echo them live.
    pub fn stderr_tail(&self) -> String {
        tail(&self.stderr)
    }

    /// A fresh refresh token for [`RT_CLIENT`] (new Grant for [`TEST_ACCOUNT`], scope
    /// [`REFRESH_TOKEN_SCOPE`]), created through the provider's models; no login needed.
    pub async fn mint_refresh_token(&self) -> Result<String, OidcError> {
        let resp = self
            .http
            .post(format!("{}/__mint_rt", self.base_url))
            .send()
            .await?;
        let minted: Minted = expect_ok(resp, "POST /__mint_rt").await?.json().await?;
        crate::leak_scan::register_secret(&minted.refresh_token, "an oidc-provider refresh token");
        Ok(minted.refresh_token)
    }

    /// Event counters since start or the last [`Self::reset_events`].
    pub async fn events(&self) -> Result<OidcEvents, OidcError> {
        let resp = self
            .http
            .get(format!("{}/__events", self.base_url))
            .send()
            .await?;
        let raw: RawEvents = expect_ok(resp, "GET /__events").await?.json().await?;
        Ok(raw.into())
    }

    /// [`OidcEvents::provider_record`] of the events so far.
    pub async fn provider_record(&self) -> Result<ProviderRecord, OidcError> {
        let what = format!("oidc-provider {}", self.base_url);
        Ok(self.events().await?.provider_record(&what))
    }

    pub async fn reset_events(&self) -> Result<(), OidcError> {
        let resp = self
            .http
            .post(format!("{}/__events/reset", self.base_url))
            .send()
            .await?;
        expect_ok(resp, "POST /__events/reset").await?;
        Ok(())
    }

    /// Whether `refresh_token` is live (introspection as [`RT_CLIENT`]: not consumed, expired or
    /// revoked). Introspection does not consume or rotate it.
    pub async fn is_refresh_token_live(&self, refresh_token: &str) -> Result<bool, OidcError> {
        let resp = self
            .http
            .post(&self.introspection_url)
            .header(
                reqwest::header::AUTHORIZATION,
                RT_CLIENT.basic_auth_header(),
            )
            .form(&[
                ("token", refresh_token),
                ("token_type_hint", "refresh_token"),
            ])
            .send()
            .await?;
        let body: Introspection = expect_ok(resp, "introspection").await?.json().await?;
        Ok(body.active)
    }

    /// Revokes `refresh_token` at the RFC 7009 endpoint as [`RT_CLIENT`]. This revokes its whole
    /// grant, so it emits one `grant.revoked` event; a later refresh gets `invalid_grant`.
    pub async fn revoke(&self, refresh_token: &str) -> Result<(), OidcError> {
        let resp = self
            .http
            .post(&self.revocation_url)
            .header(
                reqwest::header::AUTHORIZATION,
                RT_CLIENT.basic_auth_header(),
            )
            .form(&[
                ("token", refresh_token),
                ("token_type_hint", "refresh_token"),
            ])
            .send()
            .await?;
        expect_ok(resp, "revocation").await?;
        Ok(())
    }

    /// Arms `fault` for the next `times` token requests (queued after already armed faults).
    pub async fn inject_fault(&self, fault: Fault, times: u32) -> Result<(), OidcError> {
        let resp = self
            .http
            .post(format!("{}/__fault", self.base_url))
            .json(&fault.to_json(times))
            .send()
            .await?;
        expect_ok(resp, "POST /__fault").await?;
        Ok(())
    }

    /// Disarms every pending fault.
    pub async fn clear_faults(&self) -> Result<(), OidcError> {
        let resp = self
            .http
            .delete(format!("{}/__fault", self.base_url))
            .send()
            .await?;
        expect_ok(resp, "DELETE /__fault").await?;
        Ok(())
    }

    /// Kills the server and waits for it to exit.
    pub async fn shutdown(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn expect_ok(
    resp: reqwest::Response,
    what: &'static str,
) -> Result<reqwest::Response, OidcError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let mut body = resp.text().await.unwrap_or_default();
    body.truncate(2000);
    Err(OidcError::Status {
        what,
        status: status.as_u16(),
        body,
    })
}

fn tail(log: &StderrLog) -> String {
    match log.lock() {
        Ok(lines) => lines.iter().cloned().collect::<Vec<_>>().join("\n"),
        Err(poisoned) => poisoned
            .into_inner()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

async fn collect_stderr(pipe: tokio::process::ChildStderr, log: StderrLog) {
    let echo = std::env::var_os("VAULTCONN_OIDC_LOG").is_some_and(|v| v != "0");
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            eprintln!("{line}");
        }
        let mut guard = match log.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.len() >= STDERR_LINES_KEPT {
            guard.pop_front();
        }
        guard.push_back(line);
    }
}

/// Runs the install script once per process (it is cheap and flock-serialised when repeated) and
/// returns the node binary it chose.
async fn node_binary() -> Result<PathBuf, OidcError> {
    static NODE: Mutex<Option<PathBuf>> = Mutex::new(None);
    if let Ok(guard) = NODE.lock() {
        if let Some(path) = guard.as_ref() {
            return Ok(path.clone());
        }
    }
    let out = Command::new("bash")
        .arg(INSTALL_SCRIPT)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| OidcError::Install(format!("running {INSTALL_SCRIPT}: {e}")))?;
    if !out.status.success() {
        return Err(OidcError::Install(format!(
            "{INSTALL_SCRIPT} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(path) = stdout.lines().rev().find(|l| !l.trim().is_empty()) else {
        return Err(OidcError::Install(format!(
            "{INSTALL_SCRIPT} printed no node path; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    };
    let path = PathBuf::from(path.trim());
    if let Ok(mut guard) = NODE.lock() {
        *guard = Some(path.clone());
    }
    Ok(path)
}

struct SpawnRequest {
    cmd: Command,
    runtime: tokio::runtime::Handle,
    reply: tokio::sync::oneshot::Sender<std::io::Result<Child>>,
}

/// Spawns `cmd` so that the child gets SIGKILL when this process dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process, so
/// the fork happens on a dedicated thread that lives as long as the process. The child is
/// registered with the caller's tokio runtime.
async fn spawn_with_parent_death_signal(mut cmd: Command) -> Result<Child, OidcError> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();

    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe functions
    // (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let spawned = std::thread::Builder::new()
            .name("oidc-spawner".into())
            .spawn(move || {
                while let Ok(mut req) = rx.recv() {
                    let result = {
                        let _entered = req.runtime.enter();
                        req.cmd.spawn()
                    };
                    let _ = req.reply.send(result);
                }
                // Keep the thread (the children's "parent thread") alive even if every sender
                // is gone; exiting would SIGKILL the children.
                loop {
                    std::thread::park();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the oidc spawner thread");
        }
        Mutex::new(tx)
    });

    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = SpawnRequest {
        cmd,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    let sent = match spawner.lock() {
        Ok(tx) => tx.send(request),
        Err(poisoned) => poisoned.into_inner().send(request),
    };
    if sent.is_err() {
        return Err(OidcError::Spawn(std::io::Error::other(
            "the oidc spawner thread is not running",
        )));
    }
    match answer.await {
        Ok(result) => result.map_err(OidcError::Spawn),
        Err(_) => Err(OidcError::Spawn(std::io::Error::other(
            "the oidc spawner thread dropped the request",
        ))),
    }
}
