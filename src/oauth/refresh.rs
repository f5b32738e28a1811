//! The refresh-and-persist protocol for oauth2/auth0 connections (I/O edge).
//!
//! Order of a refresh, chosen so that no refresh token is ever lost silently:
//! 1. read the state Secret live from the API server (a cached token would be a replay);
//! 2. ask "may I write?" (the leader-election seam) and dry-run the Secret writes, so RBAC,
//!    admission and ownership problems surface before a refresh token is spent;
//! 3. call the token endpoint once; an unknown outcome is retried exactly once with the same
//!    refresh token;
//! 4. persist the new refresh token to the state Secret first, conditional on the
//!    resourceVersion read; on conflict or server errors retry only the write, never the grant;
//!    tokens that cannot be written yet stay in memory (`TokenPersistPending`) and are flushed
//!    before the process exits;
//! 5. then write the access token to the generated Secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use crate::api::{GrantType, Phase, VaultConnection};
use crate::controller::{ensure_secret, keep_known_fields, pending, Context, SecretWrite};
use crate::error::Result;
use crate::metrics::{ConnectionLabel, Metrics};
use crate::names::*;
use crate::oauth::schedule;
use crate::oauth::state::{
    self, format_time, AccessToken, OAuthSettings, Plan, RefreshCause, TokenState,
};
use crate::oauth::token::{
    self as client, ErrorClass, Grant, TokenClient, TokenClientConfig, TokenError, TokenRequest,
};
use crate::secret::{self, Inputs, Ownership, SecretBytes, SecretData};
use crate::status::{OAuthStatus, Outcome};

type Key = (String, String);

/// New tokens that the token endpoint returned but the API server has not accepted yet.
struct PendingPersist {
    vc: VaultConnection,
    state: TokenState,
    /// The refresh token the state Secret held when this refresh started (see `persist_state`).
    guard: Option<SecretBytes>,
}

/// Decides whether this process may spend refresh tokens right now. Today one process runs
/// the controller; leader election plugs in here so only the Lease holder refreshes.
pub trait WriteGate: Send + Sync {
    fn may_write(&self) -> bool;
}

struct AlwaysWrite;
impl WriteGate for AlwaysWrite {
    fn may_write(&self) -> bool {
        true
    }
}

pub struct OAuthEngine {
    client: TokenClient,
    gate: Box<dyn WriteGate>,
    pending: Mutex<HashMap<Key, PendingPersist>>,
    failures: Mutex<HashMap<Key, u32>>,
    /// Connections whose last refresh stored everything: their next refresh skips the dry
    /// runs (nothing about RBAC or admission changed as far as we know; a failure clears it).
    writes_proven: Mutex<std::collections::HashSet<Key>>,
    pub metrics: Arc<Metrics>,
}

/// How long one reconcile keeps retrying a failed state write before handing it to `pending`.
const PERSIST_RETRY_BUDGET: Duration = Duration::from_secs(20);

impl OAuthEngine {
    pub fn new(
        client_config: TokenClientConfig,
        metrics: Arc<Metrics>,
    ) -> std::result::Result<Self, TokenError> {
        Ok(OAuthEngine {
            client: TokenClient::new(client_config)?,
            gate: Box::new(AlwaysWrite),
            pending: Mutex::default(),
            failures: Mutex::default(),
            writes_proven: Mutex::default(),
            metrics,
        })
    }

    pub fn set_gate(&mut self, gate: Box<dyn WriteGate>) {
        self.gate = gate;
    }

    fn failures(&self, key: &Key) -> u32 {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    fn writes_proven(&self, key: &Key) -> bool {
        self.writes_proven
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    fn set_writes_proven(&self, key: &Key, proven: bool) {
        let mut set = self.writes_proven.lock().unwrap_or_else(|e| e.into_inner());
        if proven {
            set.insert(key.clone());
        } else {
            set.remove(key);
        }
    }

    fn set_failures(&self, key: &Key, n: u32) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if n == 0 {
            f.remove(key);
        } else {
            f.insert(key.clone(), n);
        }
    }

    /// Write every pending state, retrying with backoff for up to `PERSIST_RETRY_BUDGET` each.
    /// Called on shutdown so a SIGTERM does not drop a rotated refresh token.
    pub async fn flush_pending(&self, ctx: &Context) {
        let keys: Vec<Key> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for key in keys {
            let item = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            if let Some(p) = item {
                match persist_state(ctx, &p.vc, &p.state, p.guard.as_ref()).await {
                    Ok(_) => {
                        info!(namespace = %key.0, name = %key.1, "flushed pending token state")
                    }
                    Err(e) => {
                        warn!(namespace = %key.0, name = %key.1, error = %e, "could not flush pending token state before exit")
                    }
                }
            }
        }
    }

    pub async fn reconcile(
        &self,
        vc: &VaultConnection,
        ctx: &Context,
        inputs: Inputs,
    ) -> Result<(Outcome, Action)> {
        let ns = vc.namespace().unwrap_or_default();
        let name = vc.name_any();
        let key: Key = (ns.clone(), name.clone());
        let state_name = state_secret_name(&name);

        // Tokens already obtained but not yet stored come first: they are the only copy.
        let pending_state = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if let Some(p) = pending_state {
            if let Err(e) = persist_state(ctx, vc, &p.state, p.guard.as_ref()).await {
                warn!(namespace = %ns, name = %name, error = %e, "token state still not persisted");
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, p);
                return Ok((
                    persist_pending_outcome(vc, &ns, &state_name),
                    Action::requeue(Duration::from_secs(2)),
                ));
            }
        }

        let inputs = match inputs {
            Inputs::Complete(d) => d,
            Inputs::Missing {
                missing_keys,
                message,
            } => {
                return Ok((
                    pending(vc, ctx, &ns, missing_keys, message),
                    Action::await_change(),
                ));
            }
        };
        let settings = state::settings(vc);
        let state_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let live_state = state_api.get_opt(&state_name).await?;
        if let Some(live) = &live_state {
            if secret::ownership(vc, &live.metadata) != Ownership::Ours {
                let msg = format!("Secret {ns}/{state_name} (the token state Secret) exists and is not this connection's; delete or rename it");
                return Ok((
                    Outcome::new(Phase::Failed, false, "SecretConflict", msg),
                    Action::await_change(),
                ));
            }
        }
        let mut token_state = live_state
            .as_ref()
            .map(|s| TokenState::from_data(&SecretData::from_secret(s)))
            .unwrap_or_default();
        seed_from_inputs(&mut token_state, &settings, &inputs);

        let config_fp = state::config_fingerprint(&settings, &inputs);
        let seed_fp = state::seed_fingerprint(&inputs);
        let refresh_request = vc.annotations().get(REFRESH_REQUESTED_ANNOTATION).cloned();
        let jitter_key = format!("{ns}/{name}");
        let now = Utc::now();
        let plan = state::plan(&state::DecisionInput {
            now,
            state: &token_state,
            config_fp: &config_fp,
            seed_fp: &seed_fp,
            refresh_request: refresh_request.as_deref(),
            renew: &settings.renew,
            jitter_key: &jitter_key,
        });

        match plan {
            Plan::Wait { next_refresh } => {
                let outcome = self
                    .publish_access(ctx, vc, &token_state, Some(next_refresh))
                    .await?;
                Ok((outcome, requeue_at(next_refresh)))
            }
            Plan::Failed { reason, retry_at } => {
                let mut o = failed_outcome(vc, &reason, failure_message(&reason, &ns, &name));
                o = keep_known_fields(vc, o);
                let action = retry_at
                    .map(requeue_at)
                    .unwrap_or_else(Action::await_change);
                Ok((o, action))
            }
            Plan::Refresh(cause) => {
                let ctx_req = RefreshRequest {
                    vc,
                    ns: &ns,
                    name: &name,
                    key: &key,
                    settings: &settings,
                    inputs: &inputs,
                    state: token_state,
                    config_fp: &config_fp,
                    seed_fp: &seed_fp,
                    refresh_request: refresh_request.as_deref(),
                    cause,
                };
                self.refresh(ctx, ctx_req).await
            }
        }
    }

    /// Make the generated Secret hold the current access token; Ready while it is valid.
    async fn publish_access(
        &self,
        ctx: &Context,
        vc: &VaultConnection,
        st: &TokenState,
        next_refresh: Option<DateTime<Utc>>,
    ) -> Result<Outcome> {
        let ns = vc.namespace().unwrap_or_default();
        let name = vc.name_any();
        let Some(access) = &st.access else {
            return Ok(Outcome::new(
                Phase::Pending,
                false,
                "TokenPending",
                "No access token has been issued yet",
            ));
        };
        let data = secret::oauth_outputs(
            &access.token.expose_str(),
            &access.token_type,
            &format_time(access.expires_at),
            access.scope.as_deref(),
        );
        let desired = secret::desired_output_secret(vc, data);
        if let SecretWrite::Conflict(msg) = ensure_secret(ctx, vc, &desired, false).await? {
            return Ok(Outcome::new(Phase::Failed, false, "SecretConflict", msg));
        }
        self.metrics
            .token_expiry
            .get_or_create(&ConnectionLabel {
                namespace: ns.clone(),
                name: name.clone(),
            })
            .set(access.expires_at.timestamp());
        let valid = access.expires_at > Utc::now();
        let oauth = OAuthStatus {
            state_secret_name: Some(state_secret_name(&name)),
            expires_at: Some(format_time(access.expires_at)),
            last_refresh_time: Some(format_time(access.issued_at)),
            next_refresh_time: next_refresh.map(format_time),
            failed_refresh_attempts: 0,
            last_failure_reason: None,
        };
        let mut o = if valid {
            Outcome::new(
                Phase::Ready,
                true,
                "Reconciled",
                format!(
                    "Secret {ns}/{} holds an access token valid until {}",
                    desired.name,
                    format_time(access.expires_at)
                ),
            )
        } else {
            Outcome::new(
                Phase::Failed,
                false,
                "TokenExpired",
                format!(
                    "The access token in Secret {ns}/{} expired at {}",
                    desired.name,
                    format_time(access.expires_at)
                ),
            )
        };
        o.secret_name = Some(desired.name.clone());
        o.oauth = Some(oauth);
        Ok(o)
    }

    async fn refresh(&self, ctx: &Context, r: RefreshRequest<'_>) -> Result<(Outcome, Action)> {
        let RefreshRequest {
            vc,
            ns,
            name,
            key,
            settings,
            inputs,
            mut state,
            config_fp,
            seed_fp,
            refresh_request,
            cause,
        } = r;
        if !self.gate.may_write() {
            // Another replica holds the lease and refreshes; check back soon.
            let o = keep_known_fields(
                vc,
                Outcome::new(
                    Phase::Pending,
                    false,
                    "NotLeader",
                    "Waiting for this replica to hold the leader lease",
                ),
            );
            return Ok((o, Action::requeue(Duration::from_secs(15))));
        }
        let state_name = state_secret_name(name);

        // Pre-flight: prove both writes would be accepted before spending anything. For a
        // refresh token the state write below is real (it records the intent), which proves
        // more than a dry run; client credentials spend nothing and only dry-run it.
        let guard = state.refresh_token.clone();
        let proven = self.writes_proven(key);
        if settings.grant == GrantType::ClientCredentials && !proven {
            let probe_state = desired_state(vc, &state, config_fp, seed_fp, refresh_request);
            if let Err(msg) = preflight(
                ctx,
                vc,
                &secret::desired_state_secret(vc, probe_state.to_data()),
            )
            .await?
            {
                return Ok(self.not_writable(vc, key, msg));
            }
        }
        let probe_output = secret::desired_output_secret(
            vc,
            secret::oauth_outputs("probe", "Bearer", &format_time(Utc::now()), None),
        );
        let output_check = if proven {
            Ok(())
        } else {
            preflight(ctx, vc, &probe_output).await?
        };
        if let Err(msg) = output_check {
            let conflict =
                msg.contains("not managed by vaultconn") || msg.contains("already managed");
            if conflict {
                return Ok((
                    Outcome::new(Phase::Failed, false, "SecretConflict", msg),
                    Action::await_change(),
                ));
            }
            return Ok(self.not_writable(vc, key, msg));
        }

        let rt_sent: Option<SecretBytes> = match settings.grant {
            GrantType::ClientCredentials => None,
            GrantType::RefreshToken => {
                let reseeded = cause == RefreshCause::Reseeded
                    || state.seed_fingerprint.as_deref() != Some(seed_fp);
                if reseeded || state.refresh_token.is_none() {
                    inputs.get("refresh_token").cloned()
                } else {
                    state.refresh_token.clone()
                }
            }
        };
        let ca = match load_ca_bundle(ctx, vc, ns).await? {
            Ok(ca) => ca,
            Err(msg) => {
                return Ok((
                    Outcome::new(Phase::Failed, false, "CABundleMissing", msg),
                    Action::await_change(),
                ))
            }
        };
        // Record which refresh token is about to be spent. If this process dies before the
        // result is stored, the next attempt knows the outcome of this one is unknown.
        let mut previous_attempt_unknown = false;
        if let Some(rt) = &rt_sent {
            let fp = state::token_fingerprint(rt);
            previous_attempt_unknown = state.inflight.as_deref() == Some(fp.as_str());
            let mut intent = state.clone();
            intent.inflight = Some(fp);
            if let Err(e) = persist_state_once(ctx, vc, &intent, guard.as_ref()).await {
                return match e {
                    PersistError::NotWritable(msg) => Ok(self.not_writable(vc, key, msg)),
                    PersistError::Concurrent => Ok((
                        keep_known_fields(
                            vc,
                            Outcome::new(
                                Phase::Pending,
                                false,
                                "RefreshTokenAdopted",
                                "The stored refresh token changed while refreshing; using it",
                            ),
                        ),
                        Action::requeue(Duration::from_secs(1)),
                    )),
                    PersistError::Kube(e) => Err(e.into()),
                };
            }
            state.inflight = intent.inflight;
        }
        let req = token_request(settings, inputs, rt_sent.as_ref());
        info!(namespace = %ns, name = %name, cause = ?cause, "requesting token");
        let mut sent_at = Utc::now();
        let mut result = self.call(&req, ca.as_deref()).await;

        // Unknown outcome with a refresh token: the provider may have rotated already. Retry
        // exactly once with the same token; an overlap window on the provider answers it.
        let mut retried_unknown = false;
        if settings.grant == GrantType::RefreshToken {
            if let Err(e) = &result {
                if e.class() == ErrorClass::UnknownOutcome {
                    if let TokenError::Unparseable {
                        refresh_token: Some(new_rt),
                    } = e
                    {
                        // The body was broken but carried a refresh token: it may be the only
                        // live one now, so keep it before anything else.
                        state.refresh_token =
                            Some(SecretBytes::new(new_rt.expose_secret().as_bytes().to_vec()));
                        let st = desired_state(vc, &state, config_fp, seed_fp, None);
                        if persist_state(ctx, vc, &st, guard.as_ref()).await.is_ok() {
                            return Ok((keep_known_fields(vc, Outcome::new(Phase::Pending, false, "UnparseableTokenResponse", "The token endpoint returned an unparseable response carrying a new refresh token; it was stored and a new access token will be requested")), Action::requeue(Duration::from_secs(1))));
                        }
                    }
                    warn!(namespace = %ns, name = %name, "token response lost; retrying once with the same refresh token");
                    retried_unknown = true;
                    sent_at = Utc::now();
                    result = self.call(&req, ca.as_deref()).await;
                }
            }
        }

        match result {
            Ok(resp) => {
                self.on_success(
                    ctx,
                    vc,
                    key,
                    state,
                    resp,
                    sent_at,
                    rt_sent,
                    guard,
                    config_fp,
                    seed_fp,
                    refresh_request,
                )
                .await
            }
            Err(e) => {
                let reason = e.reason();
                self.metrics.failure(reason);
                if matches!(e, TokenError::InvalidGrant { .. }) {
                    if let Some(sent) = &rt_sent {
                        // Someone else may have rotated it (another replica, a restored backup):
                        // if the stored token differs from what we sent, adopt it.
                        let live = Api::<Secret>::namespaced(ctx.client.clone(), ns)
                            .get_opt(&state_name)
                            .await?;
                        let stored = live
                            .map(|s| TokenState::from_data(&SecretData::from_secret(&s)))
                            .and_then(|s| s.refresh_token);
                        if stored.as_ref().is_some_and(|st| st != sent) {
                            info!(namespace = %ns, name = %name, "refresh token was rotated elsewhere; adopting the stored one");
                            return Ok((keep_known_fields(vc, Outcome::new(Phase::Pending, false, "RefreshTokenAdopted", "The stored refresh token changed while refreshing; using it")), Action::requeue(Duration::from_secs(1))));
                        }
                    }
                    let reason = if retried_unknown || previous_attempt_unknown {
                        "RefreshResponseLost"
                    } else {
                        "RefreshTokenRejected"
                    };
                    return self
                        .terminal(
                            ctx,
                            vc,
                            key,
                            state,
                            guard.as_ref(),
                            config_fp,
                            seed_fp,
                            refresh_request,
                            reason,
                        )
                        .await;
                }
                match e.class() {
                    ErrorClass::Terminal => {
                        self.terminal(
                            ctx,
                            vc,
                            key,
                            state,
                            guard.as_ref(),
                            config_fp,
                            seed_fp,
                            refresh_request,
                            reason,
                        )
                        .await
                    }
                    ErrorClass::Transient { retry_after } => {
                        // The server answered (or was never reached): the token was not spent,
                        // so the in-flight mark goes; a later invalid_grant is then a plain
                        // rejection, not a lost response.
                        if state.inflight.take().is_some() {
                            let st = desired_state(vc, &state, config_fp, seed_fp, None);
                            let mut st = st;
                            st.config_fingerprint = state.config_fingerprint.clone();
                            st.seed_fingerprint = state.seed_fingerprint.clone();
                            if let Err(e) = persist_state(ctx, vc, &st, guard.as_ref()).await {
                                warn!(namespace = %ns, name = %name, error = %e, "could not clear the in-flight mark");
                            }
                        }
                        Ok(self.transient(vc, key, &state, reason, &e.to_string(), retry_after))
                    }
                    ErrorClass::UnknownOutcome => {
                        Ok(self.transient(vc, key, &state, reason, &e.to_string(), None))
                    }
                }
            }
        }
    }

    async fn call(
        &self,
        req: &TokenRequest,
        ca: Option<&[u8]>,
    ) -> std::result::Result<client::TokenResponse, TokenError> {
        self.metrics.refresh_attempts.inc();
        let started = Instant::now();
        let r = self.client.request_token(req, ca).await;
        self.metrics
            .refresh_duration
            .observe(started.elapsed().as_secs_f64());
        if r.is_ok() {
            self.metrics.refresh_successes.inc();
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_success(
        &self,
        ctx: &Context,
        vc: &VaultConnection,
        key: &Key,
        mut state: TokenState,
        resp: client::TokenResponse,
        sent_at: DateTime<Utc>,
        rt_sent: Option<SecretBytes>,
        guard: Option<SecretBytes>,
        config_fp: &str,
        seed_fp: &str,
        refresh_request: Option<&str>,
    ) -> Result<(Outcome, Action)> {
        // Whole seconds, as stored: the schedule computed now and after a restart must agree.
        let sent_at = chrono::SubsecRound::trunc_subsecs(sent_at, 0);
        let expires_in = resp.expires_in.unwrap_or_else(schedule::default_expires_in);
        let expires_at = sent_at + chrono::Duration::from_std(expires_in).unwrap_or_default();
        // RFC 6749 §6: no refresh_token in the response means the current one stays valid.
        state.refresh_token = match resp.refresh_token {
            Some(rt) => Some(SecretBytes::new(rt.expose_secret().as_bytes().to_vec())),
            None => rt_sent,
        };
        state.access = Some(AccessToken {
            token: SecretBytes::new(resp.access_token.expose_secret().as_bytes().to_vec()),
            token_type: if resp.token_type.is_empty() {
                "Bearer".into()
            } else {
                resp.token_type.clone()
            },
            scope: resp.scope.clone(),
            issued_at: sent_at,
            expires_at,
        });
        let new_state = desired_state(vc, &state, config_fp, seed_fp, refresh_request);
        self.set_failures(key, 0);
        if let Err(e) = persist_state(ctx, vc, &new_state, guard.as_ref()).await {
            warn!(namespace = %key.0, name = %key.1, error = %e, "could not persist new tokens; keeping them in memory and retrying the write");
            self.set_writes_proven(key, false);
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    key.clone(),
                    PendingPersist {
                        vc: vc.clone(),
                        state: new_state,
                        guard,
                    },
                );
            return Ok((
                persist_pending_outcome(vc, &key.0, &state_secret_name(&key.1)),
                Action::requeue(Duration::from_secs(2)),
            ));
        }
        let settings = state::settings(vc);
        let next = schedule::next_refresh_at(
            sent_at,
            expires_at,
            &settings.renew,
            &format!("{}/{}", key.0, key.1),
        );
        let outcome = match self.publish_access(ctx, vc, &new_state, Some(next)).await {
            Ok(o) => o,
            Err(e) => {
                self.set_writes_proven(key, false);
                return Err(e);
            }
        };
        self.set_writes_proven(key, outcome.ready);
        Ok((outcome, requeue_at(next)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn terminal(
        &self,
        ctx: &Context,
        vc: &VaultConnection,
        key: &Key,
        mut state: TokenState,
        guard: Option<&SecretBytes>,
        config_fp: &str,
        seed_fp: &str,
        refresh_request: Option<&str>,
        reason: &str,
    ) -> Result<(Outcome, Action)> {
        // Remember the failure with the inputs it happened under, so neither a requeue nor a
        // restart retries it until something changes (no hot loop against the provider).
        state.failed_reason = Some(reason.to_string());
        state.failed_fingerprint = Some(state.failure_key(config_fp, seed_fp, refresh_request));
        state.failed_at = Some(Utc::now());
        let st = desired_state(
            vc,
            &state,
            config_fp,
            seed_fp,
            state.refresh_request.clone().as_deref(),
        );
        let mut st = st;
        st.failed_reason = state.failed_reason.clone();
        st.failed_fingerprint = state.failed_fingerprint.clone();
        st.failed_at = state.failed_at;
        persist_state(ctx, vc, &st, guard).await?;
        self.set_failures(key, 0);
        let msg = failure_message(reason, &key.0, &key.1);
        let mut o = keep_known_fields(vc, failed_outcome(vc, reason, msg));
        if let Some(oauth) = o.oauth.as_mut() {
            oauth.last_failure_reason = Some(reason.to_string());
            oauth.next_refresh_time = None;
        }
        let action = if reason == "RefreshResponseLost" {
            Action::await_change()
        } else {
            Action::requeue(schedule::terminal_retry_interval())
        };
        Ok((o, action))
    }

    fn transient(
        &self,
        vc: &VaultConnection,
        key: &Key,
        state: &TokenState,
        reason: &str,
        detail: &str,
        retry_after: Option<Duration>,
    ) -> (Outcome, Action) {
        let failures = self.failures(key).max(
            vc.status
                .as_ref()
                .and_then(|s| s.failed_refresh_attempts)
                .unwrap_or(0),
        ) + 1;
        self.set_failures(key, failures);
        let delay = schedule::backoff(failures, retry_after, &format!("{}/{}", key.0, key.1));
        let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        let valid = state
            .access
            .as_ref()
            .is_some_and(|a| a.expires_at > Utc::now());
        let msg = format!(
            "Token request failed ({detail}); retrying in {}s (attempt {failures})",
            delay.as_secs().max(1)
        );
        let mut o = if valid {
            Outcome::new(
                Phase::Ready,
                true,
                "RefreshRetrying",
                format!("{msg}; the current access token is still valid"),
            )
        } else {
            Outcome::new(Phase::Failed, false, reason_static(reason), msg)
        };
        o = keep_known_fields(vc, o);
        let oauth = o.oauth.get_or_insert_with(Default::default);
        oauth.state_secret_name = Some(state_secret_name(&key.1));
        oauth.failed_refresh_attempts = failures;
        oauth.last_failure_reason = Some(reason.to_string());
        oauth.next_refresh_time = Some(format_time(next));
        (o, Action::requeue(delay))
    }

    fn not_writable(&self, vc: &VaultConnection, key: &Key, msg: String) -> (Outcome, Action) {
        self.set_writes_proven(key, false);
        let failures = self.failures(key) + 1;
        self.set_failures(key, failures);
        let delay = schedule::backoff(failures, None, &format!("{}/{}", key.0, key.1));
        let o = keep_known_fields(
            vc,
            Outcome::new(
                Phase::Failed,
                false,
                "SecretNotWritable",
                format!("{msg}; no token was requested"),
            ),
        );
        (o, Action::requeue(delay))
    }
}

struct RefreshRequest<'a> {
    vc: &'a VaultConnection,
    ns: &'a str,
    name: &'a str,
    key: &'a Key,
    settings: &'a OAuthSettings,
    inputs: &'a SecretData,
    state: TokenState,
    config_fp: &'a str,
    seed_fp: &'a str,
    refresh_request: Option<&'a str>,
    cause: RefreshCause,
}

/// Map a reason to the fixed set of status reasons.
fn reason_static(reason: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "RefreshTokenRejected",
        "InvalidClient",
        "TokenRequestRejected",
        "TokenEndpointUnreachable",
        "TokenEndpointUnavailable",
        "RateLimited",
        "TokenResponseLost",
        "UnparseableTokenResponse",
        "RefreshResponseLost",
        "ForbiddenTokenEndpoint",
        "TokenEndpointRedirected",
        "TokenResponseTooLarge",
        "TLSError",
        "InvalidTokenUrl",
    ];
    KNOWN
        .iter()
        .find(|k| **k == reason)
        .copied()
        .unwrap_or("TokenRequestFailed")
}

fn failed_outcome(_vc: &VaultConnection, reason: &str, msg: String) -> Outcome {
    Outcome::new(Phase::Failed, false, reason_static(reason), msg)
}

/// What the user should read (and do) for each terminal reason.
fn failure_message(reason: &str, ns: &str, name: &str) -> String {
    match reason {
        "RefreshTokenRejected" => format!("The token endpoint rejected the refresh token (invalid_grant): it was revoked or expired. Re-authorize and put a new refresh_token in the credentials Secret of {ns}/{name}"),
        "InvalidClient" => format!("The token endpoint rejected the client credentials (invalid_client). Fix client_id/client_secret in the credentials Secret of {ns}/{name}"),
        "RefreshResponseLost" => format!("The response to a refresh was lost after the provider rotated the refresh token, and the provider refused the one retry (invalid_grant). The connection needs a new refresh_token in its credentials Secret. Enable a refresh-token rotation overlap (reuse) window on the provider (e.g. Auth0 'Rotation Overlap Period' of 60s) to make this recoverable for {ns}/{name}"),
        "TokenRequestRejected" => format!("The token endpoint rejected the request (e.g. invalid_scope or unauthorized_client); check the scopes, audience and grant type of {ns}/{name}"),
        other => format!("Token request failed with {other}; fix the connection's settings or credentials to retry"),
    }
}

fn persist_pending_outcome(vc: &VaultConnection, ns: &str, state_name: &str) -> Outcome {
    keep_known_fields(vc, Outcome::new(Phase::Pending, false, "TokenPersistPending", format!("New tokens were issued but Secret {ns}/{state_name} could not be written yet; retrying the write (the token endpoint is not called again)")))
}

fn requeue_at(t: DateTime<Utc>) -> Action {
    let d = (t - Utc::now()).to_std().unwrap_or_default();
    Action::requeue(d.max(Duration::from_millis(500)))
}

/// A refreshToken connection starts from the credentials Secret's tokens when there is no state.
fn seed_from_inputs(st: &mut TokenState, settings: &OAuthSettings, inputs: &SecretData) {
    if settings.grant != GrantType::RefreshToken || st.seed_fingerprint.is_some() {
        return;
    }
    st.refresh_token = inputs.get("refresh_token").cloned();
    st.seed_fingerprint = Some(state::seed_fingerprint(inputs));
    if let (Some(at), Some(exp)) = (
        inputs.get("access_token"),
        inputs
            .get("expires_at")
            .and_then(|e| state::parse_time(&e.expose_str())),
    ) {
        st.access = Some(AccessToken {
            token: at.clone(),
            token_type: "Bearer".into(),
            scope: None,
            // Unknown issue time: assume the token was just issued so it is used until
            // the renewal window of the remaining lifetime.
            issued_at: Utc::now(),
            expires_at: exp,
        });
        st.config_fingerprint = None;
    }
}

/// `st` with the fingerprints it is now valid for, failures and the in-flight mark cleared.
fn desired_state(
    _vc: &VaultConnection,
    st: &TokenState,
    config_fp: &str,
    seed_fp: &str,
    refresh_request: Option<&str>,
) -> TokenState {
    TokenState {
        refresh_token: st.refresh_token.clone(),
        seed_fingerprint: Some(seed_fp.to_string()),
        config_fingerprint: Some(config_fp.to_string()),
        access: st.access.clone(),
        refresh_request: refresh_request
            .map(str::to_string)
            .or_else(|| st.refresh_request.clone()),
        failed_reason: None,
        failed_fingerprint: None,
        failed_at: None,
        inflight: None,
    }
}

fn token_request(s: &OAuthSettings, inputs: &SecretData, rt: Option<&SecretBytes>) -> TokenRequest {
    let secret = |k: &str| {
        SecretString::from(
            inputs
                .get(k)
                .map(SecretBytes::expose_str)
                .unwrap_or_default(),
        )
    };
    TokenRequest {
        token_url: s.token_url.clone(),
        grant: match rt {
            Some(rt) => Grant::RefreshToken(SecretString::from(rt.expose_str())),
            None => Grant::ClientCredentials,
        },
        client_id: secret("client_id"),
        client_secret: secret("client_secret"),
        auth_method: match s.auth_method {
            crate::api::ClientAuthMethod::Basic => client::ClientAuthMethod::Basic,
            crate::api::ClientAuthMethod::Post => client::ClientAuthMethod::Post,
        },
        scopes: s.scopes.clone(),
        audience: s.audience.clone(),
        extra_params: s.extra_params.clone(),
    }
}

async fn load_ca_bundle(
    ctx: &Context,
    vc: &VaultConnection,
    ns: &str,
) -> Result<std::result::Result<Option<Vec<u8>>, String>> {
    let Some(r) = vc
        .spec
        .oauth2
        .as_ref()
        .and_then(|o| o.ca_bundle_ref.as_ref())
    else {
        return Ok(Ok(None));
    };
    let key = r.key.clone().unwrap_or_else(|| "ca.crt".into());
    let s = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&r.name)
        .await?;
    let data = s
        .and_then(|s| s.data)
        .and_then(|d| d.get(&key).map(|b| b.0.clone()));
    Ok(match data {
        Some(pem) if !pem.is_empty() => Ok(Some(pem)),
        _ => Err(format!(
            "spec.oauth2.caBundleRef: Secret {ns}/{} has no key {key}",
            r.name
        )),
    })
}

/// Dry-run the write of `desired` (create or replace) and check ownership, without changing
/// anything. `Ok(Err(msg))` says why the write would be refused.
async fn preflight(
    ctx: &Context,
    vc: &VaultConnection,
    desired: &secret::DesiredSecret,
) -> Result<std::result::Result<(), String>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &desired.namespace);
    let pp = PostParams {
        dry_run: true,
        field_manager: Some(FIELD_MANAGER.into()),
    };
    let res = match api.get_opt(&desired.name).await? {
        None => api.create(&pp, &desired.to_new_secret()).await.map(|_| ()),
        Some(live) => {
            match secret::ownership(vc, &live.metadata) {
                Ownership::Ours => {}
                Ownership::Foreign if vc.adopt() && desired.labels.get(ROLE_LABEL).map(String::as_str) == Some(ROLE_OUTPUT) => {}
                Ownership::Foreign => return Ok(Err(format!("Secret {}/{} already exists and is not managed by vaultconn; set spec.target.adopt: true to take it over, or choose another spec.target.name", desired.namespace, desired.name))),
                Ownership::OtherConnection(o) => return Ok(Err(format!("Secret {}/{} is already managed by VaultConnection {}/{o}", desired.namespace, desired.name, desired.namespace))),
            }
            api.replace(&desired.name, &pp, &desired.merged_into(&live))
                .await
                .map(|_| ())
        }
    };
    match res {
        Ok(()) => Ok(Ok(())),
        Err(kube::Error::Api(e))
            if e.code == 403 || e.code == 422 || e.code == 400 || e.code == 413 =>
        {
            Ok(Err(format!(
                "writing Secret {}/{} would be refused by the API server ({} {})",
                desired.namespace, desired.name, e.code, e.reason
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Why a state write did not happen.
#[derive(Debug, thiserror::Error)]
enum PersistError {
    #[error("{0}")]
    NotWritable(String),
    /// The stored refresh token is no longer the one this refresh started from: someone else
    /// rotated it. Never overwritten blindly.
    #[error("the stored refresh token changed concurrently")]
    Concurrent,
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// One attempt to write the state Secret: read it, refuse if its refresh token is not `guard`
/// (the one this refresh started from), then create it or replace it conditional on the
/// resourceVersion just read (a 409 means someone wrote in between).
async fn persist_state_once(
    ctx: &Context,
    vc: &VaultConnection,
    st: &TokenState,
    guard: Option<&SecretBytes>,
) -> std::result::Result<(), PersistError> {
    let ns = vc.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let desired = secret::desired_state_secret(vc, st.to_data());
    let pp = PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.into()),
    };
    let res = match api.get_opt(&desired.name).await? {
        None => api
            .create(&pp, &desired.to_new_secret())
            .await
            .map(|s| s.metadata.resource_version),
        Some(live) => {
            let live_rt = TokenState::from_data(&SecretData::from_secret(&live)).refresh_token;
            if let (Some(g), Some(l)) = (guard, live_rt.as_ref()) {
                if g != l && Some(l) != st.refresh_token.as_ref() {
                    return Err(PersistError::Concurrent);
                }
            }
            if desired.matches(&live) {
                Ok(live.metadata.resource_version)
            } else {
                api.replace(&desired.name, &pp, &desired.merged_into(&live))
                    .await
                    .map(|s| s.metadata.resource_version)
            }
        }
    };
    match res {
        Ok(rv) => {
            // Our own write: its watch event need not wake the connection again.
            ctx.secrets.mark_verified(&ns, &desired.name, rv);
            Ok(())
        }
        Err(kube::Error::Api(e)) if [400, 403, 413, 422].contains(&e.code) => {
            Err(PersistError::NotWritable(format!(
                "writing Secret {ns}/{} is refused by the API server ({} {})",
                desired.name, e.code, e.reason
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Write the state Secret, retrying only the write (same tokens) on conflicts and server
/// errors, with backoff, for up to `PERSIST_RETRY_BUDGET`.
async fn persist_state(
    ctx: &Context,
    vc: &VaultConnection,
    st: &TokenState,
    guard: Option<&SecretBytes>,
) -> Result<()> {
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // Each attempt is bounded by what is left of the budget, whatever the client does.
        let left = PERSIST_RETRY_BUDGET.saturating_sub(started.elapsed());
        let attempt_result = match tokio::time::timeout(
            left.max(Duration::from_secs(1)),
            persist_state_once(ctx, vc, st, guard),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                return Err(crate::error::Error::Retry(
                    "the state Secret write did not finish within its retry budget".into(),
                ))
            }
        };
        let err = match attempt_result {
            Ok(()) => return Ok(()),
            Err(PersistError::Concurrent) => {
                return Err(crate::error::Error::Retry(
                    "the stored refresh token changed concurrently".into(),
                ))
            }
            Err(PersistError::NotWritable(msg)) => return Err(crate::error::Error::Retry(msg)),
            Err(PersistError::Kube(e)) => e,
        };
        let retryable = match &err {
            kube::Error::Api(ae) => ae.code == 409 || ae.code == 429 || ae.code >= 500,
            _ => true,
        };
        if !retryable || started.elapsed() > PERSIST_RETRY_BUDGET {
            return Err(err.into());
        }
        let delay = Duration::from_millis((100u64 << attempt.min(5)).min(3000));
        tokio::time::sleep(delay).await;
    }
}
