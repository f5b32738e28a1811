//! The refresh-and-persist sequence for oauth2/auth0 connections (I/O edge). Every choice is
//! made by `decide`; this module only carries them out, in the order the README promises, so
//! that no refresh token is ever lost silently:
//! 1. read the state Secret live from the API server (a cached token would be a replay);
//! 2. ask "may I write?" (the leader-election seam) and dry-run the Secret writes, so RBAC,
//!    admission and ownership problems surface before a refresh token is spent;
//! 3. record the token about to be spent (the in-flight mark), call the token endpoint once;
//!    an unknown outcome is retried exactly once with the same refresh token;
//! 4. persist the new refresh token to the state Secret first, guarded against a token someone
//!    else stored meanwhile; on conflict or server errors retry only the write, never the
//!    grant; tokens that cannot be written yet stay in memory (`TokenPersistPending`) and are
//!    flushed before the process exits;
//! 5. then write the access token to the generated Secret.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::ResourceExt;
use secrecy::SecretString;
use tracing::{info, warn};

use crate::api::{GrantType, VaultConnection};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::names::*;
use crate::oauth::decide::{
    self, AfterFailure, AfterFirstCall, Decider, Decision, Fingerprints, NextSend,
};
use crate::oauth::state::{self, format_time, OAuthSettings, Plan, RefreshCause, TokenState};
use crate::oauth::token::{self, TokenClient, TokenClientConfig, TokenError, TokenRequest};
use crate::reason::Reason;
use crate::secret::{self, Inputs, SecretBytes, SecretData};
use crate::status::Outcome;
use crate::sync::lock;
use crate::writer::{DryRun, GuardedWriteError, SecretWrite, SecretWriter, StateFight};

type Key = (String, String);

/// New tokens that the token endpoint returned but the API server has not accepted yet.
struct PendingPersist {
    vc: VaultConnection,
    state: TokenState,
    /// The refresh token the state Secret held when this refresh started (see `persist_state`).
    guard: Option<SecretBytes>,
    /// Failed write attempts so far: the retries back off (a refused write must not become a
    /// write every 2 s forever).
    attempts: u32,
}

/// The longest one refresh's token calls can take: the call, the one retry after an unknown
/// outcome, and slack for the state write in between. Another process's in-flight mark younger
/// than this may belong to a call still running.
fn max_call_time(request_timeout: Duration) -> Duration {
    request_timeout * 2 + Duration::from_secs(5)
}

/// Pending state writes flushed at once on shutdown.
const FLUSH_CONCURRENCY: usize = 16;

/// How long one reconcile keeps retrying a failed state write before handing it to `pending`.
const PERSIST_RETRY_BUDGET: Duration = Duration::from_secs(20);

/// The controller's form of a requeue decision.
fn action(requeue: decide::Requeue) -> Action {
    match requeue {
        decide::Requeue::After(delay) => Action::requeue(delay),
        decide::Requeue::OnChange => Action::await_change(),
    }
}

/// Turn a decision into what the controller returns.
fn carry_out(d: Decision) -> (Outcome, Action) {
    (d.outcome, action(d.requeue))
}

pub struct OAuthEngine {
    client: TokenClient,
    identity: String,
    /// The longest one refresh's token calls can take (see `max_call_time`).
    max_call: Duration,
    pending: Mutex<HashMap<Key, PendingPersist>>,
    failures: Mutex<HashMap<Key, u32>>,
    /// Connections whose last refresh stored everything: their next refresh skips the dry
    /// runs (nothing about RBAC or admission changed as far as we know; a failure clears it).
    writes_proven: Mutex<HashSet<Key>>,
    /// The state this process last stored per connection (with the connection's UID): a state
    /// Secret deleted by hand or lost in a restore is rewritten from it, with no provider call.
    last_stored: Mutex<HashMap<Key, (String, TokenState)>>,
    /// The last failure's decision and when its backoff ends: a wake-up before then (a watch
    /// event of our own write, a touched Secret) repeats it instead of calling the provider.
    backoff: Mutex<HashMap<Key, (Timestamp, Decision)>>,
    metrics: Arc<Metrics>,
}

/// What one refresh works with, gathered before the token call.
struct Refresh<'a> {
    vc: &'a VaultConnection,
    key: Key,
    settings: OAuthSettings,
    inputs: &'a SecretData,
    state: TokenState,
    fps: Fingerprints<'a>,
    cause: RefreshCause,
    decider: Decider<'a>,
}

impl OAuthEngine {
    /// `identity`: this process's name in in-flight marks (unique per process).
    pub fn new(
        client_config: TokenClientConfig,
        metrics: Arc<Metrics>,
        identity: String,
    ) -> std::result::Result<Self, TokenError> {
        let max_call = max_call_time(client_config.request_timeout);
        Ok(OAuthEngine {
            identity,
            max_call,
            client: TokenClient::new(client_config)?,
            pending: Mutex::default(),
            failures: Mutex::default(),
            writes_proven: Mutex::default(),
            backoff: Mutex::default(),
            last_stored: Mutex::default(),
            metrics,
        })
    }

    fn failures(&self, key: &Key) -> u32 {
        lock(&self.failures).get(key).copied().unwrap_or(0)
    }

    fn set_failures(&self, key: &Key, n: u32) {
        let mut f = lock(&self.failures);
        if n == 0 {
            f.remove(key);
        } else {
            f.insert(key.clone(), n);
        }
    }

    fn set_writes_proven(&self, key: &Key, proven: bool) {
        let mut set = lock(&self.writes_proven);
        if proven {
            set.insert(key.clone());
        } else {
            set.remove(key);
        }
    }

    /// Drop everything held for a deleted connection: a connection re-created under the same
    /// name must not inherit its tokens, failures or backoff. (Its metric series are the
    /// controller's to drop, with the rest of the connection's series.)
    pub fn forget(&self, namespace: &str, name: &str) {
        let key: Key = (namespace.to_string(), name.to_string());
        lock(&self.pending).remove(&key);
        lock(&self.failures).remove(&key);
        lock(&self.writes_proven).remove(&key);
        lock(&self.backoff).remove(&key);
        lock(&self.last_stored).remove(&key);
    }

    /// Write every pending state, all at once (each retrying within `PERSIST_RETRY_BUDGET`),
    /// and give up on what is still unwritten after `within`. Called on shutdown so a SIGTERM
    /// does not drop a rotated refresh token; concurrent so that many pending writes fit in
    /// the pod's termination grace period together, not one after another.
    pub async fn flush_pending(&self, w: &SecretWriter, within: Duration) {
        let items: Vec<(Key, PendingPersist)> = lock(&self.pending).drain().collect();
        if items.is_empty() {
            return;
        }
        let total = items.len();
        let flushed = std::sync::atomic::AtomicUsize::new(0);
        let flushes = futures::stream::iter(items)
            .map(|((ns, name), p)| {
                let flushed = &flushed;
                async move {
                    match self.persist(w, &p.vc, &p.state, p.guard.as_ref()).await {
                        Ok(()) => {
                            flushed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            info!(namespace = %ns, name = %name, "flushed pending token state");
                        }
                        Err(e) => {
                            warn!(namespace = %ns, name = %name, error = %e, "could not flush pending token state before exit")
                        }
                    }
                }
            })
            .buffer_unordered(FLUSH_CONCURRENCY)
            .collect::<Vec<()>>();
        if tokio::time::timeout(within, flushes).await.is_err() {
            let done = flushed.load(std::sync::atomic::Ordering::Relaxed);
            warn!(
                unwritten = total - done,
                "shutdown timeout: pending token states were not all written"
            );
        }
    }

    pub async fn reconcile(
        &self,
        vc: &VaultConnection,
        w: &SecretWriter,
        inputs: Inputs,
    ) -> Result<(Outcome, Action)> {
        let key: Key = (vc.namespace().unwrap_or_default(), vc.name_any());
        let decider = Decider {
            vc,
            now: Timestamp::now(),
        };
        // Tokens already obtained but not yet stored come first: they are the only copy.
        match self.flush_one(w, &key).await {
            Flush::Done => {}
            Flush::StillPending(attempts) => {
                return Ok(carry_out(decider.persist_pending(attempts)))
            }
            Flush::Superseded => return Ok(carry_out(decider.held_tokens_superseded())),
        }
        let inputs = match inputs {
            Inputs::Complete(d) => d,
            Inputs::Missing {
                missing_keys,
                message,
            } => {
                let kept = w.last_good_kept(vc);
                let o = crate::status::pending(vc, missing_keys, message, kept);
                return Ok((o, Action::await_change()));
            }
        };
        // The state is read live: a cached refresh token would be a replay.
        let live_state = w.get(&key.0, &state_secret_name(&key.1)).await?;
        let settings = state::settings(vc);
        let config_fp = state::config_fingerprint(&settings, &inputs);
        let seed_fp = state::seed_fingerprint(&inputs);
        let now = decider.now;
        // What this process stored, if someone else has changed the state Secret since.
        let overwritten = live_state
            .as_ref()
            .and_then(|live| self.stored_if_overwritten(vc, &key, live));
        let refresh_request = vc.annotations().get(REFRESH_REQUESTED_ANNOTATION).cloned();
        let fps = Fingerprints {
            config: &config_fp,
            seed: &seed_fp,
            refresh_request: refresh_request.as_deref(),
        };
        let plan_for = |st: &TokenState| {
            state::plan(&state::DecisionInput {
                now,
                state: st,
                config_fp: &config_fp,
                seed_fp: &seed_fp,
                refresh_request: fps.refresh_request,
                renew: &settings.renew,
                jitter_key: &decider.jitter_key(),
            })
        };
        let mut token_state = match &live_state {
            Some(live) => {
                let probe = secret::desired_state_secret(vc, SecretData::default());
                if let Some(msg) = secret::write_conflict(vc, &probe, live) {
                    return Ok(carry_out(decider.conflict(msg)));
                }
                TokenState::from_data(&SecretData::from_secret(live))
            }
            None => match self.last_stored_for(vc, &key) {
                Some(ours) => {
                    // Writing it again is a repair: another writer that deletes it on sight
                    // must not get a create per deletion. Beyond the budget it is written only
                    // when a refresh on schedule needs it.
                    let stored = secret::desired_state_secret(vc, ours.to_data());
                    let fight = StateFight::Deleted;
                    if let Some((message, until)) =
                        w.may_repair_state(vc, stored.content_hash(), fight)
                    {
                        let mut seeded = ours.clone();
                        decide::seed_from_inputs(&mut seeded, &settings, &inputs, &config_fp, now);
                        if let Some(at) = decide::while_contested(&plan_for(&seeded), until) {
                            return Ok(carry_out(decider.state_contested(message, at)));
                        }
                    }
                    self.persist(w, vc, &ours, None).await?;
                    info!(namespace = %key.0, name = %key.1, "the state Secret was missing; rewrote it from this process's copy");
                    ours
                }
                None => {
                    let spent = vc
                        .status
                        .as_ref()
                        .and_then(|s| s.spent_seed_fingerprint.as_deref());
                    if decide::seed_already_spent(settings.grant, spent, &seed_fp) {
                        return Ok(carry_out(decider.state_lost()));
                    }
                    TokenState::default()
                }
            },
        };
        decide::seed_from_inputs(&mut token_state, &settings, &inputs, &config_fp, now);
        let plan = plan_for(&token_state);
        let cause = match plan {
            Plan::Wait { next_refresh } => {
                let (o, retry) = self
                    .publish_access(w, &decider, &token_state, Some(next_refresh))
                    .await?;
                let at = retry.map_or(next_refresh, |r| r.min(next_refresh));
                return Ok((o, action(decider.requeue_at(at))));
            }
            Plan::Failed { reason, retry_at } => {
                let reason = Reason::parse(&reason).unwrap_or(Reason::TokenRequestRejected);
                return Ok(carry_out(decider.remembered_failure(reason, retry_at)));
            }
            Plan::Refresh(cause) => cause,
        };
        // A refresh only a rollback of the state Secret asks for (what this process stored
        // would wait) is a repair: within the budget, or not at all (a fight over the state
        // Secret must not spend a token per rollback).
        if let Some(mut ours) = overwritten {
            decide::seed_from_inputs(&mut ours, &settings, &inputs, &config_fp, now);
            let ours_plan = plan_for(&ours);
            if !matches!(ours_plan, Plan::Refresh(_)) {
                let stored = secret::desired_state_secret(vc, ours.to_data());
                if let Some((message, until)) =
                    w.may_repair_state(vc, stored.content_hash(), StateFight::RolledBack)
                {
                    // Refreshes on our own schedule go on meanwhile (they are not repairs).
                    let at = decide::while_contested(&ours_plan, until).unwrap_or(until);
                    return Ok(carry_out(decider.state_contested(message, at)));
                }
            }
        }
        let r = Refresh {
            vc,
            key,
            settings,
            inputs: &inputs,
            state: token_state,
            fps,
            cause,
            decider,
        };
        self.refresh_unless_backing_off(w, r).await.map(carry_out)
    }

    /// Refresh now, unless the last counted failure's backoff still holds: then its decision
    /// stands (a wake-up is not a reason to call the provider again).
    async fn refresh_unless_backing_off(
        &self,
        w: &SecretWriter,
        r: Refresh<'_>,
    ) -> Result<Decision> {
        let held = lock(&self.backoff).get(&r.key).cloned();
        if let Some((until, last)) = held {
            if r.decider.backoff_holds(r.cause, Some(until)) {
                return Ok(Decision {
                    outcome: last.outcome,
                    requeue: r.decider.requeue_at(until),
                });
            }
        }
        let (key, vc, now) = (r.key.clone(), r.vc, r.decider.now);
        let d = self.refresh(w, r).await?;
        match (Decider { vc, now }).backoff_end(&d) {
            Some(until) => lock(&self.backoff).insert(key, (until, d.clone())),
            None => lock(&self.backoff).remove(&key),
        };
        Ok(d)
    }

    /// Write a held-back state for `key`, if there is one. False while it still cannot be
    /// written (it stays held).
    async fn flush_one(&self, w: &SecretWriter, key: &Key) -> Flush {
        let Some(p) = lock(&self.pending).remove(key) else {
            return Flush::Done;
        };
        match self.persist(w, &p.vc, &p.state, p.guard.as_ref()).await {
            Ok(()) => Flush::Done,
            // Someone else wrote the state Secret meanwhile (the guard no longer matches and
            // it does not hold our tokens): retrying would fail the same way forever. Their
            // token is what the state says now; ours are dropped, and the status says so.
            Err(Error::StateChanged) => {
                warn!(namespace = %key.0, name = %key.1, "the state Secret was changed by another writer while new tokens waited to be written; using the stored refresh token and discarding the held one");
                Flush::Superseded
            }
            Err(e) => {
                warn!(namespace = %key.0, name = %key.1, error = %e, "token state still not persisted");
                let attempts = p.attempts.saturating_add(1);
                lock(&self.pending).insert(key.clone(), PendingPersist { attempts, ..p });
                Flush::StillPending(attempts)
            }
        }
    }

    /// Make the generated Secret hold the current access token; Ready while it is valid. The
    /// time is when to try again if another writer holds the Secret (`SecretContested`).
    async fn publish_access(
        &self,
        w: &SecretWriter,
        d: &Decider<'_>,
        st: &TokenState,
        next_refresh: Option<Timestamp>,
    ) -> Result<(Outcome, Option<Timestamp>)> {
        let Some(access) = &st.access else {
            return Ok((d.access_outcome(st, "", None), None));
        };
        let data = secret::oauth_outputs(
            &access.token.expose_str(),
            &access.token_type,
            &format_time(access.expires_at),
            access.scope.as_deref(),
        );
        let desired = secret::desired_output_secret(d.vc, data);
        let outcome = d.access_outcome(st, &desired.name, next_refresh);
        match w.ensure(d.vc, &desired, false).await? {
            SecretWrite::Conflict(msg) => Ok((Outcome::new(Reason::SecretConflict, msg), None)),
            // The tokens stay valid and refreshed on schedule; the status keeps saying so.
            SecretWrite::Contested { message, retry_at } => {
                let contested = Outcome::new(Reason::SecretContested, message)
                    .with_secret(Some(desired.name.clone()));
                let o = Outcome {
                    oauth: outcome.oauth,
                    ..contested
                };
                Ok((o, Some(retry_at)))
            }
            // The expiry series follows from the outcome's `expiresAt` (metrics::Metrics::report).
            SecretWrite::Unchanged | SecretWrite::Created | SecretWrite::Updated => {
                Ok((outcome, None))
            }
        }
    }

    /// Steps 2–5 of the module docs for one connection whose plan says "refresh now".
    async fn refresh(&self, w: &SecretWriter, mut r: Refresh<'_>) -> Result<Decision> {
        // Fenced: only the Lease holder spends a refresh token.
        if !w.gate.may_write() {
            return Ok(r.decider.not_leader());
        }
        let guard = r.state.refresh_token.clone();
        if let Some(stop) = self.prove_writable(w, &r).await? {
            return Ok(stop);
        }
        let seed = r.inputs.get("refresh_token");
        let rt_sent = decide::token_to_send(r.settings.grant, r.cause, &r.state, r.fps.seed, seed);
        let ca = match load_ca_bundle(w, r.vc).await? {
            Ok(ca) => ca,
            Err(msg) => return Ok(r.decider.ca_bundle_missing(msg)),
        };
        // Record which refresh token is about to be spent. If this process dies before the
        // result is stored, the next attempt knows the outcome of this one is unknown.
        let mut send = None;
        if let Some(rt) = &rt_sent {
            let fp = state::token_fingerprint(rt);
            let now = r.decider.now;
            if let Some(wait) =
                decide::wait_for_foreign_call(&r.state, &fp, &self.identity, now, self.max_call)
            {
                info!(namespace = %r.key.0, name = %r.key.1, wait = ?wait, "another process's token request with this refresh token may still be running; waiting for its result");
                return Ok(r.decider.wait_for_other_call(wait));
            }
            let written_here = self
                .last_stored_for(r.vc, &r.key)
                .is_some_and(|m| m.inflight_retry && m.inflight_by == r.state.inflight_by);
            let next = decide::next_send(&r.state, &fp, written_here);
            if next == NextSend::RetrySpent {
                warn!(namespace = %r.key.0, name = %r.key.1, "the one retry after an unknown outcome was sent by a process that stopped before storing its answer; this refresh token is not sent again");
                let reason = Reason::RefreshResponseLost;
                self.metrics.failure(reason.metric_label());
                return self.store_terminal(w, r, reason, guard).await;
            }
            let mut intent = r.state.clone();
            intent.mark_inflight(fp, &self.identity, now, next == NextSend::Retry);
            match self.persist_once(w, r.vc, &intent, guard.as_ref()).await {
                Ok(()) => r.state = intent,
                Err(GuardedWriteError::NotWritable(msg)) => return Ok(self.not_writable(&r, &msg)),
                Err(GuardedWriteError::Concurrent) => return Ok(r.decider.adopted()),
                Err(GuardedWriteError::Kube(e)) => return Err(e.into()),
                Err(GuardedWriteError::NotLeader) => return Err(Error::NotLeader),
            }
            send = Some(next);
        }
        let previous_attempt_unknown = send == Some(NextSend::Retry);
        let req = token_request(&r.settings, r.inputs, rt_sent.as_ref());
        info!(namespace = %r.key.0, name = %r.key.1, cause = ?r.cause, "requesting token");
        let mut sent_at = Timestamp::now();
        let mut result = self.call(&req, ca.as_deref()).await;
        let mut retried_unknown = false;
        if let Err(e) = &result {
            match decide::after_first_call(send, e) {
                AfterFirstCall::Settle => {}
                AfterFirstCall::KeepSalvaged(new_rt) => {
                    let st = decide::salvaged_state(&r.state, new_rt, r.fps);
                    if self.persist(w, r.vc, &st, guard.as_ref()).await.is_ok() {
                        let failures = self.count_failure(&r);
                        return Ok(r.decider.salvaged(failures, &st));
                    }
                    // The token in hand may be the only live one: hold it and retry only the
                    // write. Retrying the grant with the old token would revoke it on a
                    // provider without an overlap window.
                    return Ok(self.hold(&r, st, guard));
                }
                AfterFirstCall::RetryOnce => {
                    // The mark says "retry" before it goes out: should this process die before
                    // it stores the answer, the next one must not send the token a third time.
                    let mut intent = r.state.clone();
                    intent.inflight_retry = true;
                    match self.persist_once(w, r.vc, &intent, guard.as_ref()).await {
                        Ok(()) => {
                            r.state = intent;
                            warn!(namespace = %r.key.0, name = %r.key.1, "token response lost; retrying once with the same refresh token");
                            retried_unknown = true;
                            sent_at = Timestamp::now();
                            result = self.call(&req, ca.as_deref()).await;
                        }
                        // Not retried now; the mark stays, so the next attempt is the retry.
                        Err(err) => {
                            warn!(namespace = %r.key.0, name = %r.key.1, error = %err, "token response lost; could not mark the retry, so it waits for the next attempt");
                        }
                    }
                }
            }
        }
        match result {
            Ok(resp) => {
                let st = decide::state_after_success(&r.state, &resp, sent_at, rt_sent, r.fps);
                self.store_success(w, &r, st, guard).await
            }
            Err(e) => {
                let sent = Sent {
                    token: rt_sent.as_ref(),
                    guard: guard.as_ref(),
                    retried_unknown,
                    previous_attempt_unknown,
                };
                let failed = self.failed_call(w, &r, &e, sent).await?;
                self.on_failure(w, r, failed, &e, guard).await
            }
        }
    }

    /// Dry-run the Secret writes unless the last refresh proved them: `Some` stops the refresh
    /// before anything is spent. A refresh-token grant's state write is proven by the real
    /// in-flight mark write instead.
    async fn prove_writable(&self, w: &SecretWriter, r: &Refresh<'_>) -> Result<Option<Decision>> {
        if lock(&self.writes_proven).contains(&r.key) {
            return Ok(None);
        }
        let mut probes = vec![secret::desired_output_secret(
            r.vc,
            secret::oauth_outputs("probe", "Bearer", &format_time(r.decider.now), None),
        )];
        if r.settings.grant == GrantType::ClientCredentials {
            let probe_state = decide::settled_state(&r.state, r.fps);
            probes.push(secret::desired_state_secret(r.vc, probe_state.to_data()));
        }
        for probe in &probes {
            match w.dry_run(r.vc, probe).await? {
                DryRun::Accepted => {}
                DryRun::Conflict(msg) => return Ok(Some(r.decider.conflict(msg))),
                DryRun::Refused(msg) => return Ok(Some(self.not_writable(r, &msg))),
            }
        }
        Ok(None)
    }

    /// One more failure in a row for this connection (continuing the status's count).
    fn count_failure(&self, r: &Refresh<'_>) -> u32 {
        let status_count = r.vc.status.as_ref().and_then(|s| s.failed_refresh_attempts);
        let failures = decide::failure_count(self.failures(&r.key), status_count);
        self.set_failures(&r.key, failures);
        failures
    }

    fn not_writable(&self, r: &Refresh<'_>, msg: &str) -> Decision {
        self.set_writes_proven(&r.key, false);
        let failures = self.failures(&r.key) + 1;
        self.set_failures(&r.key, failures);
        r.decider.not_writable(failures, msg)
    }

    /// The facts `decide::after_failure` needs; after an `invalid_grant` this re-reads the
    /// state Secret to see whether another writer stored a different token meanwhile.
    async fn failed_call(
        &self,
        w: &SecretWriter,
        r: &Refresh<'_>,
        e: &TokenError,
        sent: Sent<'_>,
    ) -> Result<decide::FailedCall> {
        let invalid_grant = matches!(e, TokenError::InvalidGrant { .. }) && sent.token.is_some();
        let mut stored_token_changed = false;
        if invalid_grant {
            // If the read fails, the refusal still stands: treat the store as unchanged. The
            // terminal state is written guarded, so another writer's token is not overwritten.
            // Failing the reconcile instead would resend the refused token on the retry (the
            // in-flight mark would make it look like a lost response).
            match w.get(&r.key.0, &state_secret_name(&r.key.1)).await {
                Ok(live) => {
                    let stored = live
                        .map(|s| TokenState::from_data(&SecretData::from_secret(&s)))
                        .and_then(|s| s.refresh_token);
                    stored_token_changed = stored.is_some() && stored.as_ref() != sent.guard;
                }
                Err(err) => {
                    warn!(namespace = %r.key.0, name = %r.key.1, error = %err, "could not re-read the state Secret after invalid_grant; taking the refusal as it is");
                }
            }
        }
        Ok(decide::FailedCall {
            reason: e.reason(),
            class: decide::classify(e, sent.token.is_some()),
            invalid_grant,
            stored_token_changed,
            retried_unknown: sent.retried_unknown,
            previous_attempt_unknown: sent.previous_attempt_unknown,
        })
    }

    async fn on_failure(
        &self,
        w: &SecretWriter,
        mut r: Refresh<'_>,
        failed: decide::FailedCall,
        e: &TokenError,
        guard: Option<SecretBytes>,
    ) -> Result<Decision> {
        self.metrics.failure(failed.reason.metric_label());
        match decide::after_failure(&failed) {
            AfterFailure::Adopt => {
                info!(namespace = %r.key.0, name = %r.key.1, "refresh token was rotated elsewhere; adopting the stored one");
                Ok(r.decider.adopted())
            }
            AfterFailure::Terminal(reason) => self.store_terminal(w, r, reason, guard).await,
            AfterFailure::Transient {
                reason,
                retry_after,
                clear_inflight,
            } => {
                if let Some(st) = decide::state_after_transient(&r.state, clear_inflight, r.fps) {
                    // If this write fails, a mark that still says "retry" makes the next
                    // attempt report the loss rather than send again: cautious, never a replay.
                    match self.persist(w, r.vc, &st, guard.as_ref()).await {
                        Ok(()) => r.state = st,
                        Err(err) => {
                            warn!(namespace = %r.key.0, name = %r.key.1, error = %err, "could not update the in-flight mark");
                        }
                    }
                }
                let failures = self.count_failure(&r);
                let current = r.state.access.as_ref();
                Ok(r.decider
                    .transient(failures, current, reason, retry_after, &e.to_string()))
            }
        }
    }

    /// Store a terminal failure, remembered under the current inputs so that neither a requeue
    /// nor a restart sends the refused request again.
    async fn store_terminal(
        &self,
        w: &SecretWriter,
        r: Refresh<'_>,
        reason: Reason,
        guard: Option<SecretBytes>,
    ) -> Result<Decision> {
        let st = decide::terminal_state(&r.state, reason, r.fps, r.decider.now);
        self.set_failures(&r.key, 0);
        let spent = decide::spent_after_terminal(&r.state, &st, reason, r.fps.seed);
        let terminal = r
            .decider
            .terminal(reason, r.cause == RefreshCause::Reseeded, spent);
        if let Err(e) = self.persist(w, r.vc, &st, guard.as_ref()).await {
            // Until the failure is stored, a requeue or wake-up would re-run the refused
            // request: hold it like tokens, for write-only retries.
            warn!(namespace = %r.key.0, name = %r.key.1, error = %e, "could not store the failure; holding it and retrying the write");
            let held = self.hold(&r, st, guard);
            return Ok(Decision {
                outcome: terminal.outcome,
                requeue: held.requeue,
            });
        }
        Ok(terminal)
    }

    /// Store the tokens of a successful call (state first, then the generated Secret).
    async fn store_success(
        &self,
        w: &SecretWriter,
        r: &Refresh<'_>,
        st: TokenState,
        guard: Option<SecretBytes>,
    ) -> Result<Decision> {
        self.set_failures(&r.key, 0);
        if let Err(e) = self.persist(w, r.vc, &st, guard.as_ref()).await {
            warn!(namespace = %r.key.0, name = %r.key.1, error = %e, "could not persist new tokens; keeping them in memory and retrying the write");
            return Ok(self.hold(r, st, guard));
        }
        let next = st
            .access
            .as_ref()
            .map(|a| r.decider.next_refresh(a, &r.settings.renew));
        let outcome = self.publish_access(w, &r.decider, &st, next).await;
        let (outcome, retry) = match outcome {
            Ok(o) => o,
            Err(e) => {
                self.set_writes_proven(&r.key, false);
                return Err(e);
            }
        };
        self.set_writes_proven(&r.key, outcome.ready);
        let at = match (next, retry) {
            (Some(n), Some(r)) => Some(n.min(r)),
            (n, r) => n.or(r),
        };
        let requeue = at.map_or(decide::Requeue::OnChange, |t| r.decider.requeue_at(t));
        Ok(Decision { outcome, requeue })
    }

    /// Write the state Secret (write-only retries, see `persist_state`) and remember what it
    /// holds now.
    async fn persist(
        &self,
        w: &SecretWriter,
        vc: &VaultConnection,
        st: &TokenState,
        guard: Option<&SecretBytes>,
    ) -> Result<()> {
        persist_state(w, vc, st, guard).await?;
        self.remember(vc, st);
        Ok(())
    }

    /// One guarded write of the state Secret (see `persist_state_once`), remembered on success.
    async fn persist_once(
        &self,
        w: &SecretWriter,
        vc: &VaultConnection,
        st: &TokenState,
        guard: Option<&SecretBytes>,
    ) -> std::result::Result<(), GuardedWriteError> {
        persist_state_once(w, vc, st, guard).await?;
        self.remember(vc, st);
        Ok(())
    }

    fn remember(&self, vc: &VaultConnection, st: &TokenState) {
        let key: Key = (vc.namespace().unwrap_or_default(), vc.name_any());
        let uid = vc.metadata.uid.clone().unwrap_or_default();
        lock(&self.last_stored).insert(key, (uid, st.clone()));
    }

    /// What this process last stored for this very connection (same UID), if the live state
    /// Secret no longer holds it.
    fn stored_if_overwritten(
        &self,
        vc: &VaultConnection,
        key: &Key,
        live: &k8s_openapi::api::core::v1::Secret,
    ) -> Option<TokenState> {
        let uid = vc.metadata.uid.as_deref().unwrap_or_default();
        let known = lock(&self.last_stored).get(key).cloned();
        let (_, ours) = known.filter(|(u, _)| u == uid)?;
        (ours.to_data() != SecretData::from_secret(live)).then_some(ours)
    }

    /// What this process last stored for this very connection (same UID), if anything: what
    /// a missing state Secret is written again from (no provider call).
    fn last_stored_for(&self, vc: &VaultConnection, key: &Key) -> Option<TokenState> {
        let uid = vc.metadata.uid.as_deref().unwrap_or_default();
        let known = lock(&self.last_stored).get(key).cloned();
        known.filter(|(u, _)| u == uid).map(|(_, st)| st)
    }

    /// Keep `st` in memory until the state Secret accepts it (`TokenPersistPending`).
    fn hold(&self, r: &Refresh<'_>, st: TokenState, guard: Option<SecretBytes>) -> Decision {
        self.set_writes_proven(&r.key, false);
        let held = PendingPersist {
            vc: r.vc.clone(),
            state: st,
            guard,
            attempts: 1,
        };
        lock(&self.pending).insert(r.key.clone(), held);
        r.decider.persist_pending(1)
    }

    async fn call(
        &self,
        req: &TokenRequest,
        ca: Option<&[u8]>,
    ) -> std::result::Result<token::TokenResponse, TokenError> {
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
}

/// What became of tokens held for writing.
enum Flush {
    /// Written (or there were none).
    Done,
    /// Still not accepted after this many attempts; held for the next one.
    StillPending(u32),
    /// Another writer stored a different token meanwhile; the held tokens were dropped.
    Superseded,
}

/// What was sent in a refresh that failed.
#[derive(Clone, Copy)]
struct Sent<'a> {
    /// The refresh token spent, if the grant uses one.
    token: Option<&'a SecretBytes>,
    /// The refresh token the state Secret held when the refresh started.
    guard: Option<&'a SecretBytes>,
    retried_unknown: bool,
    previous_attempt_unknown: bool,
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
            Some(rt) => token::Grant::RefreshToken(SecretString::from(rt.expose_str())),
            None => token::Grant::ClientCredentials,
        },
        client_id: secret("client_id"),
        client_secret: secret("client_secret"),
        auth_method: match s.auth_method {
            crate::api::ClientAuthMethod::Basic => token::ClientAuthMethod::Basic,
            crate::api::ClientAuthMethod::Post => token::ClientAuthMethod::Post,
        },
        scopes: s.scopes.clone(),
        audience: s.audience.clone(),
        extra_params: s.extra_params.clone(),
    }
}

/// The PEM bundle `caBundleRef` names; `Ok(Err(msg))` when it is missing.
async fn load_ca_bundle(
    w: &SecretWriter,
    vc: &VaultConnection,
) -> Result<std::result::Result<Option<Vec<u8>>, String>> {
    let Some(r) = vc
        .spec
        .oauth2
        .as_ref()
        .and_then(|o| o.ca_bundle_ref.as_ref())
    else {
        return Ok(Ok(None));
    };
    let ns = vc.namespace().unwrap_or_default();
    let key = r.key.clone().unwrap_or_else(|| "ca.crt".into());
    let data = w
        .get(&ns, &r.name)
        .await?
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

/// One attempt to write the state Secret, refused if its refresh token is no longer `guard`
/// (the one this refresh started from) or the one being written: someone else rotated it,
/// and it is never overwritten blindly.
async fn persist_state_once(
    w: &SecretWriter,
    vc: &VaultConnection,
    st: &TokenState,
    guard: Option<&SecretBytes>,
) -> std::result::Result<(), GuardedWriteError> {
    // Fencing: a write guarded by the refresh token it started from still lands after the
    // lease was lost mid-refresh. It cannot overwrite a newer leader's token (the guard fails
    // then), and dropping the token in hand would strand a rotated chain. Unguarded writes (a
    // rewrite from memory) are the leader's alone.
    if guard.is_none() && !w.gate.may_write() {
        return Err(GuardedWriteError::NotLeader);
    }
    let desired = secret::desired_state_secret(vc, st.to_data());
    w.write_guarded(vc, &desired, |live| {
        let live_rt = TokenState::from_data(&SecretData::from_secret(live)).refresh_token;
        match (guard, live_rt.as_ref()) {
            (Some(g), Some(l)) => g == l || Some(l) == st.refresh_token.as_ref(),
            _ => true,
        }
    })
    .await
}

/// Write the state Secret, retrying only the write (same tokens) on conflicts and server
/// errors, with backoff, for up to `PERSIST_RETRY_BUDGET`.
async fn persist_state(
    w: &SecretWriter,
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
        let once = persist_state_once(w, vc, st, guard);
        let err = match tokio::time::timeout(left.max(Duration::from_secs(1)), once).await {
            Err(_) => {
                return Err(Error::Retry(
                    "the state Secret write did not finish within its retry budget".into(),
                ))
            }
            Ok(Ok(())) => return Ok(()),
            Ok(Err(GuardedWriteError::Concurrent)) => return Err(Error::StateChanged),
            Ok(Err(GuardedWriteError::NotWritable(msg))) => return Err(Error::Retry(msg)),
            Ok(Err(GuardedWriteError::NotLeader)) => return Err(Error::NotLeader),
            Ok(Err(GuardedWriteError::Kube(e))) => e,
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
