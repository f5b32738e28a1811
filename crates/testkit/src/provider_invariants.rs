//! Provider-side invariants of refresh-token rotation, checked from the provider's own records
//! — the token server's call log ([`crate::token_server::TokenServer::provider_record`]) or
//! oidc-provider's request and `grant.revoked` log ([`crate::oidc::OidcProvider::provider_record`])
//! — never from what the operator reports about itself.
//!
//! Every rotation test ends with [`assert_provider_invariants`]:
//!
//! 1. **No replay.** No refresh token is presented after the provider issued a newer one in its
//!    family (including in a response that never reached the client), except where the provider
//!    itself sanctioned the reuse inside a rotation overlap window the test configured
//!    ([`Invariants::overlap_window`]), or the test re-seeded a spent token by hand and says so
//!    ([`Invariants::hand_reseeded`]), or the provider itself withheld the newer token
//!    ([`ProviderCall::withheld`]: it rotated but left `refresh_token` out of its 200, so the
//!    client kept the one it sent, RFC 6749 §6): then the first presentation of that kept token,
//!    up to the provider's first refusal of it, is the provider's doing
//!    ([`Sanction::Undelivered`]), and so is a revocation it causes. Any later presentation is
//!    a replay again.
//! 2. **No revocation unless reported.** No family (grant) is revoked unless the operator reported
//!    the lost response as `RefreshResponseLost`; the test passes the connections (client ids)
//!    that did ([`Invariants::lost_response`]). The declaration is exact: each one must match one
//!    refused replay at the provider (the replays of that token up to and including the refused
//!    one form the loss, [`Report::losses`]) or, failing that, one interrupted retry: the one
//!    retry after an unknown outcome, not refused, after which the client presented nothing more
//!    of that family (the operator stopped before storing the retry's answer and reports the
//!    loss instead of sending the token a third time). In a test that kills the operator
//!    ([`Invariants::kills`]) it may also be a rotation abandoned by two kills: the rotation's
//!    reply was lost to one kill and the next process died after marking its retry, before the
//!    retry reached the provider; the rotation's new token is never presented, and at least
//!    two kills fall between it (less a second: the provider may log a request after the kill
//!    of its sender) and the client's next call. A declared loss the provider never
//!    saw is a violation too (a false `RefreshResponseLost`).
//! 3. **Bounded rate.** No client id makes more token requests in any 60 s window than the test's
//!    bound, which the test derives from the schedule and its fault mode
//!    ([`scheduled_per_minute`] gives the schedule's part).
//!
//! Tokens are identified by [`fingerprint`]s (a 16-hex SHA-256 prefix, as the operator's
//! `spentSeedFingerprint`), so a failure message never shows a token.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

/// The refresh token fingerprint used throughout: the first 16 hex digits of its SHA-256.
/// oidc-provider's event log (`crates/testkit/oidc/server.mjs`) computes the same.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(16);
    for b in &digest[..8] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// How the provider answered a call, as far as the invariants care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Not decided yet (still in flight when the record was taken).
    Pending,
    /// Answered without the grant logic looking at the token: an injected fault (status, reset
    /// before processing, redirect, …) or failed client authentication.
    NotProcessed,
    /// Tokens issued: `client_credentials`, or a refresh with or without rotation.
    Issued,
    /// A spent refresh token accepted inside the provider's rotation overlap window.
    OverlapReuse,
    /// A spent refresh token refused; `revoked`: the provider revoked its family for it.
    SpentRefused { revoked: bool },
    /// Any other refusal (unknown token, revoked family, wrong client, …): the OAuth error and
    /// what the provider knew about it.
    Refused(String),
}

/// One token request as the provider recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderCall {
    /// Arrival order at the provider.
    pub seq: u64,
    /// Arrival time.
    pub at: SystemTime,
    /// When the provider decided the outcome (`None` while in flight).
    pub decided_at: Option<SystemTime>,
    /// Client id as presented (Basic or form), authenticated or not.
    pub client_id: Option<String>,
    pub grant_type: Option<String>,
    /// [`fingerprint`] of the refresh token presented.
    pub presented: Option<String>,
    /// [`fingerprint`] of a *new* refresh token the provider committed in this call, whether or
    /// not the response reached the client (`None` when none was issued or the presented one was
    /// echoed).
    pub issued: Option<String>,
    /// The provider committed `issued` but left it out of a 200 on purpose (a fault stripped
    /// `refresh_token`): unlike a lost response, the client got an answer and was told nothing
    /// new, so it rightly keeps the token it sent. `false` when nothing was issued.
    pub withheld: bool,
    /// The provider's own family (grant) id of the presented token, when it knows it; otherwise
    /// the family is derived from the record (presented → issued links, minted seeds).
    pub family: Option<String>,
    /// HTTP status sent (`None`: no response, e.g. a reset).
    pub status: Option<u16>,
    pub answer: Answer,
    /// The injected fault, for failure messages.
    pub fault: Option<String>,
}

/// A family (grant) revocation at the provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderRevocation {
    /// The provider's family (grant) id, if it reports one.
    pub family: Option<String>,
    pub at: SystemTime,
    /// The token request that made the provider revoke (reuse detection). `None`: revoked by
    /// other means, i.e. by the test through a revocation endpoint.
    pub by_call: Option<u64>,
}

/// What a provider issued, received and revoked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderRecord {
    /// Which provider, for messages.
    pub provider: String,
    /// Every token request, in arrival order.
    pub calls: Vec<ProviderCall>,
    /// Seeds minted by the test: fingerprint → the provider's family id (if it reports one).
    pub minted: Vec<(String, Option<String>)>,
    pub revocations: Vec<ProviderRevocation>,
    /// Reasons the record may be incomplete (a reset or capped log, revocations the log does not
    /// explain). Each is a violation: the invariants cannot be checked on a partial record.
    pub gaps: Vec<String>,
}

/// What a test allows and expects. Start from [`Invariants::new`] with the rate bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Invariants {
    /// Most token requests any one client id may make in any 60 s window.
    pub max_requests_per_minute: usize,
    /// The test configured a rotation overlap window: reuse the provider accepted inside it
    /// ([`Answer::OverlapReuse`]) is not a replay.
    pub overlap_window: bool,
    /// Fingerprints of spent tokens the test put back by hand (see [`Invariants::hand_reseeded`]).
    pub hand_reseeded: BTreeSet<String>,
    /// client id → how many times its connection reported `RefreshResponseLost`.
    pub lost_responses: BTreeMap<String, usize>,
    /// Revocations the test itself made through a revocation endpoint.
    pub revoked_by_test: usize,
    /// When the test killed the operator (see [`Invariants::kills`]).
    pub kills: Vec<SystemTime>,
}

impl Invariants {
    /// No replay, no revocation, at most `max_requests_per_minute` requests per client id per
    /// minute. Derive the bound in the test (schedule, retries, forced refreshes) and say how.
    pub fn new(max_requests_per_minute: usize) -> Self {
        Self {
            max_requests_per_minute,
            ..Self::default()
        }
    }

    /// The test configured a rotation overlap window at the provider.
    pub fn overlap_window(mut self) -> Self {
        self.overlap_window = true;
        self
    }

    /// The test re-seeds `token`, already spent, by hand: presenting it again is the test's doing.
    pub fn hand_reseeded(mut self, token: &str) -> Self {
        self.hand_reseeded.insert(fingerprint(token));
        self
    }

    /// The connection of `client_id` reported `RefreshResponseLost` (once more).
    pub fn lost_response(self, client_id: &str) -> Self {
        self.lost_responses(client_id, 1)
    }

    /// The connection of `client_id` reported `RefreshResponseLost` `n` times (a no-op for 0).
    pub fn lost_responses(mut self, client_id: &str, n: usize) -> Self {
        if n > 0 {
            *self.lost_responses.entry(client_id.to_owned()).or_insert(0) += n;
        }
        self
    }

    /// The test revoked `n` grants itself (oidc-provider's revocation endpoint).
    pub fn revoked_by_test(mut self, n: usize) -> Self {
        self.revoked_by_test += n;
        self
    }

    /// The test killed the operator at these times: a declared loss may then also be a rotation
    /// abandoned by two kills (see the module docs).
    pub fn kills(mut self, at: &[SystemTime]) -> Self {
        self.kills.extend_from_slice(at);
        self
    }
}

/// The fewest seconds between two scheduled refreshes of a token with this lifetime: the
/// operator refreshes at 2/3 of the lifetime (`renewBeforePercentage` 33) less at most 5 %
/// jitter, i.e. at ≥ 62 %, and never sooner than 10 % of the lifetime or 1 s after issue
/// (README, "Schedule"; `src/oauth/schedule.rs`).
pub fn min_refresh_gap(access_token_ttl: Duration) -> Duration {
    let ttl_ms = access_token_ttl.as_millis();
    let jittered = ttl_ms * 62 / 100;
    let floor = (ttl_ms / 10).max(1000);
    Duration::from_millis(u64::try_from(jittered.max(floor)).unwrap_or(u64::MAX))
}

/// Most token requests one connection's schedule makes in any 60 s window with access tokens
/// of `access_token_ttl` and no failures: ⌊60 s / [`min_refresh_gap`]⌋ + 2. One because a
/// window can hold both ends of its span; one because the gap is kept between the moments the
/// operator *sends* (it measures the lifetime from there), while the provider records arrivals,
/// and the time from send to arrival varies (client setup, a loaded machine: up to a few
/// hundred ms, less than one gap), which can pull two arrivals closer than the gap. Tests add
/// their retries and forced refreshes to it.
pub fn scheduled_per_minute(access_token_ttl: Duration) -> usize {
    let gap_ms = min_refresh_gap(access_token_ttl).as_millis().max(1);
    usize::try_from(60_000 / gap_ms).unwrap_or(usize::MAX) + 2
}

/// Most of `times` that fall into any window `[t, t + 60 s)`.
pub fn max_in_any_minute(times: &[SystemTime]) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    let minute = Duration::from_secs(60);
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end]
            .duration_since(sorted[start])
            .unwrap_or_default()
            >= minute
        {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// How long before a rotation's logged arrival a kill may still have lost its reply: the
/// request was sent before the kill, and the provider logged it after.
const KILL_SLACK: Duration = Duration::from_secs(1);

/// Why a replay is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sanction {
    /// Accepted by the provider inside the overlap window the test configured.
    OverlapWindow,
    /// The test re-seeded the spent token by hand.
    HandReseeded,
    /// Part of a lost response the operator reported as `RefreshResponseLost` (the one retry,
    /// and a retry after a transient answer to it, up to the provider's refusal or, failing
    /// that, up to an interrupted retry: not refused, and nothing more of the family presented
    /// after it, the operator having stopped before storing its answer).
    ReportedLoss,
    /// Every newer token was withheld by the provider in its answer to the presentation of
    /// this very token ([`ProviderCall::withheld`]), and this is a presentation of it up to the
    /// provider's first refusal: the client kept what it was entitled to keep.
    Undelivered,
}

/// A refresh token presented after the provider had issued a newer one in its family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// The call that presented it.
    pub call: u64,
    pub client_id: Option<String>,
    /// Fingerprint of the token.
    pub token: String,
    /// The call in which the provider issued the newer token.
    pub superseded_by: u64,
    pub answer: Answer,
    pub sanction: Option<Sanction>,
}

/// A lost response as the provider saw it: the token spent by `spent_by` (response lost), then
/// presented again by `replays`, the last of which (`refused_by`) the provider refused, or
/// (`refused: false`) the last of which was an interrupted retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loss {
    pub client_id: Option<String>,
    /// Fingerprint of the token.
    pub token: String,
    pub spent_by: u64,
    /// The presentations the loss excuses ([`Sanction::ReportedLoss`]); those another sanction
    /// covers (an interrupted retry accepted inside the overlap window) are not listed.
    pub replays: Vec<u64>,
    /// The refusing call; for `refused: false`, the last call of the chain: the interrupted
    /// retry's, or the abandoned rotation's when no retry reached the provider (`replays` empty).
    pub refused_by: u64,
    /// The provider refused a replay (`false`: an interrupted retry or a rotation abandoned by
    /// two kills, see the module docs).
    pub refused: bool,
    /// The provider revoked the family for it.
    pub revoked: bool,
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The record cannot be trusted to be complete.
    IncompleteRecord(String),
    /// Invariant 1.
    Replay(Replay),
    /// Invariant 2: a family revoked without a reported `RefreshResponseLost` for its client
    /// (`by_call: None`: revoked outside the token endpoint, more often than the test says it did).
    UnexplainedRevocation {
        by_call: Option<u64>,
        client_id: Option<String>,
        family: Option<String>,
    },
    /// Invariant 2, the other way: the test says the connection reported `RefreshResponseLost`
    /// this many more times than the provider refused a replay of its or saw it interrupt a
    /// retry.
    ReportedLossNotSeen { client_id: String, missing: usize },
    /// Invariant 3: `count` requests of `client_id` within 60 s, calls `first`..=`last`.
    RateExceeded {
        client_id: Option<String>,
        count: usize,
        bound: usize,
        first: u64,
        last: u64,
    },
}

/// The outcome of [`ProviderRecord::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub violations: Vec<Violation>,
    /// Every replay, sanctioned or not.
    pub replays: Vec<Replay>,
    /// Lost responses matched to the test's `RefreshResponseLost` declarations.
    pub losses: Vec<Loss>,
    /// client id (`None`: unauthenticated) → most requests in any 60 s window.
    pub max_per_minute: BTreeMap<Option<String>, usize>,
    /// The record the report is about (for the failure message).
    pub record: ProviderRecord,
    /// The test's kills ([`Invariants::kills`], for the failure message).
    pub kills: Vec<SystemTime>,
}

impl Report {
    /// Panic with every violation and the provider's call log if any invariant is broken.
    pub fn assert_clean(&self) {
        if !self.violations.is_empty() {
            panic!("{self}");
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "provider invariants broken at {} ({} violation(s)):",
            self.record.provider,
            self.violations.len()
        )?;
        for v in &self.violations {
            writeln!(f, "  - {v:?}")?;
        }
        writeln!(f, "losses matched: {:?}", self.losses)?;
        writeln!(f, "requests per minute: {:?}", self.max_per_minute)?;
        if !self.kills.is_empty() {
            let t0 = self.record.calls.first().map(|c| c.at);
            let at: Vec<String> = self
                .kills
                .iter()
                .map(|k| match t0.map(|t0| k.duration_since(t0)) {
                    Some(Ok(d)) => format!("+{:.3}s", d.as_secs_f64()),
                    Some(Err(e)) => format!("-{:.3}s", e.duration().as_secs_f64()),
                    None => "?".to_owned(),
                })
                .collect();
            writeln!(f, "kills: {}", at.join(" "))?;
        }
        writeln!(f, "{}", self.record.call_table())
    }
}

impl ProviderRecord {
    /// The calls as a table, tokens as fingerprints, times relative to the first call.
    pub fn call_table(&self) -> String {
        let t0 = self.calls.first().map(|c| c.at);
        let rel = |t: SystemTime| {
            t0.and_then(|t0| t.duration_since(t0).ok())
                .map_or_else(|| "?".to_owned(), |d| format!("{:.3}s", d.as_secs_f64()))
        };
        let mut out = format!(
            "{} call(s) (minted: {:?}; revocations: {:?}; gaps: {:?}):\n",
            self.calls.len(),
            self.minted,
            self.revocations
                .iter()
                .map(|r| (r.family.clone(), r.by_call))
                .collect::<Vec<_>>(),
            self.gaps
        );
        for c in &self.calls {
            let _ = writeln!(
                out,
                "  #{} +{} client={} grant={} presented={} family={} issued={} status={} {:?}{}",
                c.seq,
                rel(c.at),
                c.client_id.as_deref().unwrap_or("-"),
                c.grant_type.as_deref().unwrap_or("-"),
                c.presented.as_deref().unwrap_or("-"),
                c.family.as_deref().unwrap_or("-"),
                c.issued.as_deref().unwrap_or("-"),
                c.status
                    .map_or_else(|| "none".to_owned(), |s| s.to_string()),
                c.answer,
                c.fault
                    .as_deref()
                    .map(|f| format!(" fault={f}"))
                    .unwrap_or_default(),
            );
        }
        out
    }

    /// Check the invariants (see the module docs).
    pub fn check(&self, inv: &Invariants) -> Report {
        let mut violations: Vec<Violation> = self
            .gaps
            .iter()
            .map(|g| Violation::IncompleteRecord(g.clone()))
            .collect();
        let mut calls = self.calls.clone();
        calls.sort_by_key(|c| c.seq);

        let (mut replays, families) = find_replays(&calls, &self.minted, inv);
        let losses = match_losses(
            &calls,
            &families,
            &mut replays,
            &self.revocations,
            inv,
            &mut violations,
        );
        violations.extend(
            replays
                .iter()
                .filter(|r| r.sanction.is_none())
                .cloned()
                .map(Violation::Replay),
        );
        let max_per_minute = check_rate(&calls, inv, &mut violations);
        Report {
            violations,
            replays,
            losses,
            max_per_minute,
            record: self.clone(),
            kills: inv.kills.clone(),
        }
    }
}

/// Find every presentation of a superseded refresh token. A token is superseded once the
/// provider has decided a call that issued a token of the same family after it (a seed is older
/// than everything issued in its family). Also returns the family of each call's presented
/// token, by call.
fn find_replays(
    calls: &[ProviderCall],
    minted: &[(String, Option<String>)],
    inv: &Invariants,
) -> (Vec<Replay>, HashMap<u64, String>) {
    // Family of each token: the provider's id where known, else the family of the token it
    // was issued for, else a family of its own rooted at the token.
    let mut family_of: HashMap<String, String> = HashMap::new();
    for (fp, fam) in minted {
        family_of.insert(fp.clone(), fam.clone().unwrap_or_else(|| format!("~{fp}")));
    }
    // The call that issued each token.
    let mut issued_by: HashMap<String, u64> = HashMap::new();
    // Per family: (issuing call, when decided, token).
    let mut issues: HashMap<String, Vec<(u64, SystemTime, String)>> = HashMap::new();
    // Issuing calls whose new token was withheld → the token they were presented.
    let mut withheld_for: HashMap<u64, String> = HashMap::new();
    let mut presented_family: HashMap<u64, String> = HashMap::new();
    for c in calls {
        let Some(x) = &c.presented else { continue };
        let fam = c
            .family
            .clone()
            .or_else(|| family_of.get(x).cloned())
            .unwrap_or_else(|| format!("~{x}"));
        family_of.entry(x.clone()).or_insert_with(|| fam.clone());
        presented_family.insert(c.seq, fam.clone());
        if let Some(y) = c.issued.as_ref().filter(|y| *y != x) {
            family_of.insert(y.clone(), fam.clone());
            issued_by.insert(y.clone(), c.seq);
            if c.withheld {
                withheld_for.insert(c.seq, x.clone());
            }
            issues
                .entry(fam)
                .or_default()
                .push((c.seq, c.decided_at.unwrap_or(c.at), y.clone()));
        }
    }

    let mut replays = Vec::new();
    // Kept tokens (withheld successors) the provider has refused once: no longer excused.
    let mut refused_kept: BTreeSet<String> = BTreeSet::new();
    for c in calls {
        let (Some(x), Some(fam)) = (&c.presented, presented_family.get(&c.seq)) else {
            continue;
        };
        // The provider looks at the token when it decides; a call not decided yet (or one
        // answered without processing) is placed at its arrival.
        let when = match c.answer {
            Answer::Pending | Answer::NotProcessed => c.at,
            _ => c.decided_at.unwrap_or(c.at),
        };
        let born = issued_by.get(x).copied();
        let newer: Vec<u64> = issues
            .get(fam)
            .map(|list| {
                list.iter()
                    .filter(|(seq, decided, y)| {
                        *seq != c.seq && y != x && *decided < when && born.is_none_or(|b| b < *seq)
                    })
                    .map(|(seq, _, _)| *seq)
                    .collect()
            })
            .unwrap_or_default();
        let Some(&superseded_by) = newer.first() else {
            continue;
        };
        let kept = newer
            .iter()
            .all(|s| withheld_for.get(s).is_some_and(|p| p == x));
        let undelivered = kept && !refused_kept.contains(x);
        if kept && !matches!(c.answer, Answer::Pending | Answer::NotProcessed) {
            refused_kept.insert(x.clone());
        }
        let sanction = if c.answer == Answer::OverlapReuse && inv.overlap_window {
            Some(Sanction::OverlapWindow)
        } else if inv.hand_reseeded.contains(x) {
            Some(Sanction::HandReseeded)
        } else if undelivered {
            Some(Sanction::Undelivered)
        } else {
            None
        };
        replays.push(Replay {
            call: c.seq,
            client_id: c.client_id.clone(),
            token: x.clone(),
            superseded_by,
            answer: c.answer.clone(),
            sanction,
        });
    }
    (replays, presented_family)
}

/// Match the provider's refusals of spent tokens (with or without a revocation) to the losses the
/// test declares, then what is left of each client's declarations to its interrupted retries,
/// exactly; report revocations nothing explains.
fn match_losses(
    calls: &[ProviderCall],
    families: &HashMap<u64, String>,
    replays: &mut [Replay],
    revocations: &[ProviderRevocation],
    inv: &Invariants,
    violations: &mut Vec<Violation>,
) -> Vec<Loss> {
    let mut budget = inv.lost_responses.clone();
    let mut losses = Vec::new();
    let revoked_by: BTreeSet<u64> = revocations.iter().filter_map(|r| r.by_call).collect();
    for c in calls {
        let refused =
            matches!(c.answer, Answer::SpentRefused { .. }) || revoked_by.contains(&c.seq);
        // The provider's own doing (it withheld the newer token): no loss of the operator's,
        // no report owed.
        let undelivered = replays
            .iter()
            .any(|r| r.call == c.seq && r.sanction == Some(Sanction::Undelivered));
        if !refused || undelivered {
            continue;
        }
        let revoked = revoked_by.contains(&c.seq)
            || matches!(c.answer, Answer::SpentRefused { revoked: true });
        let left = budget_left(&mut budget, c.client_id.as_ref());
        let (Some(left), Some(token)) = (left, c.presented.clone()) else {
            if revoked {
                violations.push(Violation::UnexplainedRevocation {
                    by_call: Some(c.seq),
                    client_id: c.client_id.clone(),
                    family: c.family.clone(),
                });
            }
            continue;
        };
        *left -= 1;
        let mut matched = Vec::new();
        for r in replays.iter_mut().filter(|r| {
            r.sanction.is_none()
                && r.token == token
                && r.client_id == c.client_id
                && r.call <= c.seq
        }) {
            r.sanction = Some(Sanction::ReportedLoss);
            matched.push((r.call, r.superseded_by));
        }
        let loss = Loss {
            client_id: c.client_id.clone(),
            token,
            spent_by: matched.first().map_or(c.seq, |m| m.1),
            replays: matched.iter().map(|m| m.0).collect(),
            refused_by: c.seq,
            refused: true,
            revoked,
        };
        losses.push(loss);
    }
    // Interrupted retries, in call order: a replay the provider did not refuse, after which
    // its client presented nothing more of the family.
    for i in 0..replays.len() {
        let r = &replays[i];
        let refused = matches!(r.answer, Answer::SpentRefused { .. } | Answer::Refused(_))
            || revoked_by.contains(&r.call);
        // As above: the provider's own doing is no loss of the operator's.
        if refused || r.sanction == Some(Sanction::Undelivered) {
            continue;
        }
        let Some(left) = budget_left(&mut budget, r.client_id.as_ref()) else {
            continue;
        };
        let family = families.get(&r.call);
        let last = calls
            .iter()
            .filter(|c| c.seq > r.call && c.client_id == r.client_id)
            .all(|c| families.get(&c.seq) != family);
        if family.is_none() || !last {
            continue;
        }
        *left -= 1;
        let (retry, superseded_by) = (r.call, r.superseded_by);
        let (client_id, token) = (r.client_id.clone(), r.token.clone());
        let mut matched = Vec::new();
        for r in replays.iter_mut().filter(|r| {
            r.sanction.is_none() && r.token == token && r.client_id == client_id && r.call <= retry
        }) {
            r.sanction = Some(Sanction::ReportedLoss);
            matched.push((r.call, r.superseded_by));
        }
        losses.push(Loss {
            client_id,
            token,
            spent_by: matched.first().map_or(superseded_by, |m| m.1),
            replays: matched.iter().map(|m| m.0).collect(),
            refused_by: retry,
            refused: false,
            revoked: false,
        });
    }
    // Rotations abandoned by two kills, in call order: a rotation whose new token nobody ever
    // presented, the last call of its family, with two kills before the client's next call.
    for c in calls {
        let Some(issued) = &c.issued else { continue };
        let Some(left) = budget_left(&mut budget, c.client_id.as_ref()) else {
            continue;
        };
        let later: Vec<&ProviderCall> = calls.iter().filter(|k| k.seq > c.seq).collect();
        let family = families.get(&c.seq);
        let presented = later.iter().any(|k| k.presented.as_ref() == Some(issued));
        let family_goes_on = later.iter().any(|k| {
            k.client_id == c.client_id && family.is_some() && families.get(&k.seq) == family
        });
        let next = later
            .iter()
            .filter(|k| k.client_id == c.client_id)
            .map(|k| k.at)
            .min();
        // The provider may log a request's arrival after the kill of the process that sent it
        // (the request was on its way), hence the second of slack before the arrival.
        let from = c.at.checked_sub(KILL_SLACK).unwrap_or(c.at);
        let kills = inv
            .kills
            .iter()
            .filter(|k| **k > from && next.is_none_or(|n| **k < n))
            .count();
        if presented || family_goes_on || kills < 2 {
            continue;
        }
        *left -= 1;
        losses.push(Loss {
            client_id: c.client_id.clone(),
            token: c.presented.clone().unwrap_or_default(),
            spent_by: c.seq,
            replays: Vec::new(),
            refused_by: c.seq,
            refused: false,
            revoked: false,
        });
    }
    for (client_id, missing) in budget.into_iter().filter(|(_, n)| *n > 0) {
        violations.push(Violation::ReportedLossNotSeen { client_id, missing });
    }
    let by_test = revocations.iter().filter(|r| r.by_call.is_none()).count();
    if by_test != inv.revoked_by_test {
        for r in revocations
            .iter()
            .filter(|r| r.by_call.is_none())
            .skip(inv.revoked_by_test)
        {
            violations.push(Violation::UnexplainedRevocation {
                by_call: None,
                client_id: None,
                family: r.family.clone(),
            });
        }
        if by_test < inv.revoked_by_test {
            violations.push(Violation::IncompleteRecord(format!(
                "the test revoked {} grant(s) itself, the provider recorded {by_test}",
                inv.revoked_by_test
            )));
        }
    }
    losses
}

/// The declared losses of `client_id` not matched yet, if any are left.
fn budget_left<'a>(
    budget: &'a mut BTreeMap<String, usize>,
    client_id: Option<&String>,
) -> Option<&'a mut usize> {
    client_id
        .and_then(|id| budget.get_mut(id))
        .filter(|n| **n > 0)
}

fn check_rate(
    calls: &[ProviderCall],
    inv: &Invariants,
    violations: &mut Vec<Violation>,
) -> BTreeMap<Option<String>, usize> {
    let mut per_client: BTreeMap<Option<String>, Vec<&ProviderCall>> = BTreeMap::new();
    for c in calls {
        per_client.entry(c.client_id.clone()).or_default().push(c);
    }
    let minute = Duration::from_secs(60);
    let mut max = BTreeMap::new();
    for (client_id, list) in per_client {
        let mut sorted = list;
        sorted.sort_by_key(|c| c.at);
        let (mut best, mut best_span) = (0, (0, 0));
        let mut start = 0;
        for end in 0..sorted.len() {
            while sorted[end]
                .at
                .duration_since(sorted[start].at)
                .unwrap_or_default()
                >= minute
            {
                start += 1;
            }
            if end - start + 1 > best {
                best = end - start + 1;
                best_span = (sorted[start].seq, sorted[end].seq);
            }
        }
        if best > inv.max_requests_per_minute {
            violations.push(Violation::RateExceeded {
                client_id: client_id.clone(),
                count: best,
                bound: inv.max_requests_per_minute,
                first: best_span.0,
                last: best_span.1,
            });
        }
        max.insert(client_id, best);
    }
    max
}

/// Check `record` against `inv`, panic with a readable report on any violation, and return the
/// report (for assertions on [`Report::losses`] and [`Report::replays`]).
pub fn assert_provider_invariants(record: &ProviderRecord, inv: &Invariants) -> Report {
    let report = record.check(inv);
    report.assert_clean();
    report
}
