//! Pure refresh scheduling: when to refresh a token, how long to back off after a failure.
//!
//! Everything here is deterministic and free of I/O so that a restarted operator recomputes
//! exactly the same times from the persisted `issued_at`/`expires_at` and the same key.
//!
//! # Refresh point
//!
//! For a token valid over `issued_at..expires_at` (the *lifetime* `L`), the *nominal* refresh
//! point is `expires_at − renewBefore`, where `renewBefore` is either a fixed duration or a
//! percentage of the lifetime (default 33 %, i.e. refresh at ~2/3 of the lifetime). The *floor*
//! is `issued_at + max(MIN_REFRESH_INTERVAL, 10 % of L)`. The refresh point always lies in the
//! window `[floor, nominal]`: never later than `renewBefore` asks, never sooner than the floor.
//!
//! Within the window the point is chosen so that many connections spread evenly over time,
//! whatever made them issue their tokens together (created together, a provider outage, an
//! operator restart). Each connection owns a *phase*: a fixed instant within a cycle of
//! length `C = (nominal − issued_at) − PHASE_MARGIN`, derived from a hash of its `key` alone (so
//! it survives restarts, failures and backoff). Its refresh point is the last *in-phase* instant
//! (absolute time ≡ phase mod `C`) at or before the nominal point. Once a connection refreshes in
//! phase it stays there: its next in-phase instant is exactly one cycle later, 0–1 s before the
//! next nominal point ([`PHASE_MARGIN`] absorbs the issue time being stored in whole seconds), so
//! in the steady state every connection refreshes at ~`nominal` as before, and a cohort of `N`
//! connections with the same lifetime reaches the provider at an even `N / C` per second.
//!
//! The price is paid once per desynchronising event: the first refresh after a token issued
//! out of phase moves *earlier* (never later), anywhere in the window. When the last in-phase
//! instant is below the floor, the refresh instead goes to a per-key point between the floor and
//! one cycle after that instant (less the floor and the margin), from where the next one is in
//! phase. So `N` connections minted at the same instant with 60 s tokens refresh over the whole
//! window `[6 s, 40.2 s]` (1,000 of them: at most 46 in one second, where the 0–5 % jitter this
//! replaced put all 1,000 within 3 s), and from their second refresh on at an even
//! `N / 39.2 s`. The rule applies to stored tokens as well: after an upgrade from that jitter,
//! tokens whose new point has already passed are refreshed right away, once.
//!
//! When the window is empty (tiny or bogus lifetimes, or `renewBefore` of 90 % or more) the floor
//! wins: a 1 s token is refreshed once per second, not in a hot loop, and an oversized
//! `renewBefore` (a duration ≥ the lifetime, or a percentage above 90) means "refresh after
//! 10 % of the lifetime". For lifetimes shorter than `MIN_REFRESH_INTERVAL` the floor lies after
//! `expires_at`: the token is briefly expired rather than refreshed in a loop.
//!
//! # Backoff
//!
//! [`backoff`] is exponential (1 s, 2 s, 4 s, … capped at [`MAX_BACKOFF`] = 5 min) with a
//! per-key deterministic reduction of up to 20 %, so it is monotone in the failure count for a
//! given key but different keys spread out. A server `Retry-After` (capped at
//! [`MAX_RETRY_AFTER`] = 1 h) is a lower bound. The refresh after a backoff is scheduled from
//! the new token's issue time by the rule above, so connections that failed together and
//! recovered together return to their own phases instead of staying together.
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};

/// How long before expiry a token is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewBefore {
    /// Refresh this long before `expires_at`.
    Duration(Duration),
    /// Refresh when this percentage (1–99; other values are clamped) of the lifetime remains.
    Percentage(u8),
}

impl Default for RenewBefore {
    fn default() -> Self {
        RenewBefore::Percentage(33)
    }
}

/// Absolute floor between issue and refresh, whatever the lifetime (see the module docs).
///
/// 1 s keeps a 2 s token usable (refreshed between 1 s and ~1.3 s, i.e. by ~2/3 of its
/// lifetime) while making a hot loop impossible: at most one refresh per second per connection.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Fraction of the lifetime (in percent) below which the refresh is never scheduled.
pub const MIN_REFRESH_PERCENT: i128 = 10;

/// How much shorter a connection's phase cycle is than its nominal renewal interval.
///
/// Issue times are stored in whole seconds, so a refresh made at its in-phase instant can be
/// recorded up to 1 s before it; with the cycle 1 s shorter, the next in-phase instant still
/// lies inside the next window and the connection stays in phase.
pub const PHASE_MARGIN: Duration = Duration::from_secs(1);

/// First backoff step.
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);

/// Cap of the exponential backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5 * 60);

/// Cap applied to a server-supplied `Retry-After`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// Maximum per-key reduction of the backoff, in percent.
const BACKOFF_JITTER_PERCENT: u128 = 20;

/// Maximum per-key addition on top of a `Retry-After`, in percent of it.
const RETRY_AFTER_JITTER_PERCENT: u128 = 10;

/// Deterministic fraction in `[0, 1)` expressed as a `u64` numerator over 2^64.
fn key_fraction(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}

/// `span · fraction` for a non-negative `span` (exact: `span < 2^63`, so no overflow).
fn scale(span: i128, fraction: u64) -> i128 {
    (span * i128::from(fraction)) >> 64
}

fn add_ms(t: Timestamp, ms: i128) -> Timestamp {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| t.checked_add(SignedDuration::from_millis(ms)).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Milliseconds since the epoch, floored (also before 1970).
fn millis(t: Timestamp) -> i64 {
    // |t| < 2^49 ms over jiff's whole range: the cast cannot truncate.
    t.as_nanosecond().div_euclid(1_000_000) as i64
}

/// The connection's phase within a cycle of `cycle_ms` (> 0): an offset in `[0, cycle_ms)`.
fn phase_ms(key: &str, cycle_ms: i128) -> i128 {
    scale(cycle_ms, key_fraction(&[b"phase", key.as_bytes()]))
}

/// When to refresh a token issued at `issued_at` and expiring at `expires_at`.
///
/// `key` identifies the connection stably (`namespace/name`): the connection's phase is
/// derived from it alone, so the result is reproducible after a restart and connections spread
/// over the window whatever their issue times. See the module docs for the exact rule.
pub fn next_refresh_at(
    issued_at: Timestamp,
    expires_at: Timestamp,
    renew: &RenewBefore,
    key: &str,
) -> Timestamp {
    // i128 milliseconds, absolute (since the epoch): the full range cannot overflow.
    let issued = i128::from(millis(issued_at));
    let lifetime_ms = i128::from(millis(expires_at)) - issued;
    let min_ms = MIN_REFRESH_INTERVAL.as_millis() as i128;
    if lifetime_ms <= 0 {
        return add_ms(issued_at, min_ms);
    }

    let renew_ms = match *renew {
        RenewBefore::Duration(d) => (d.as_millis().min(i128::MAX as u128) as i128).min(lifetime_ms),
        RenewBefore::Percentage(p) => lifetime_ms * i128::from(p.clamp(1, 99)) / 100,
    };
    let floor_offset = min_ms.max(lifetime_ms * MIN_REFRESH_PERCENT / 100);
    let nominal_offset = lifetime_ms - renew_ms;
    let at = if nominal_offset <= floor_offset {
        issued + floor_offset
    } else {
        in_window(
            issued + floor_offset,
            issued + nominal_offset,
            // > 0: the floor offset is at least the margin.
            nominal_offset - PHASE_MARGIN.as_millis() as i128,
            floor_offset,
            key,
        )
    };
    add_ms(issued_at, at - issued)
}

/// The refresh instant in `[floor, nominal]` (absolute ms, `floor < nominal`) for a phase
/// cycle of `cycle` ms; `floor_offset` is the floor's distance from the issue time.
fn in_window(floor: i128, nominal: i128, cycle: i128, floor_offset: i128, key: &str) -> i128 {
    let phase = phase_ms(key, cycle);
    // The last in-phase instant at or before the nominal point.
    let in_phase = nominal - (nominal - phase).rem_euclid(cycle);
    if in_phase >= floor {
        return in_phase;
    }
    // Catch up: a point from which the next in-phase instant (`in_phase + cycle`) is at least
    // a floor away, even if the issue time is then stored up to 1 s early. Spread per key so
    // that a cohort catching up does not pile onto the floor.
    let margin = PHASE_MARGIN.as_millis() as i128;
    let latest = (in_phase + cycle - floor_offset - margin).min(nominal);
    if latest <= floor {
        return floor;
    }
    floor + scale(latest - floor, key_fraction(&[b"catch-up", key.as_bytes()]))
}

/// Lifetime assumed when the server omits `expires_in` (or sends an unusable value).
///
/// Deliberately short (5 min): assuming too long a lifetime hands consumers expired tokens,
/// assuming too short merely costs a few extra token requests. The caller should surface a
/// warning condition when this default is used.
pub fn default_expires_in() -> Duration {
    Duration::from_secs(5 * 60)
}

/// Delay before the next attempt after `failures` consecutive transient failures (`0` is
/// treated as `1`).
///
/// `BASE_BACKOFF · 2^(failures−1)`, capped at [`MAX_BACKOFF`], reduced by a per-key
/// deterministic 0–20 %; never less than `retry_after` (itself capped at [`MAX_RETRY_AFTER`],
/// plus a per-key 0–10 % so clients told the same `Retry-After` do not return in lockstep).
pub fn backoff(failures: u32, retry_after: Option<Duration>, jitter_key: &str) -> Duration {
    let exp = failures.saturating_sub(1).min(63);
    let base_ms = BASE_BACKOFF.as_millis();
    let capped_ms = base_ms
        .checked_shl(exp)
        .unwrap_or(u128::MAX)
        .min(MAX_BACKOFF.as_millis());
    let frac = key_fraction(&[b"backoff", jitter_key.as_bytes()]) as u128;
    let reduction = (capped_ms * BACKOFF_JITTER_PERCENT / 100 * frac) >> 64;
    let mut delay = Duration::from_millis((capped_ms - reduction) as u64);

    if let Some(ra) = retry_after {
        let ra = ra.min(MAX_RETRY_AFTER);
        let ra_ms = ra.as_millis();
        let extra = (ra_ms * RETRY_AFTER_JITTER_PERCENT / 100 * frac) >> 64;
        let ra_jittered = Duration::from_millis((ra_ms + extra) as u64).min(MAX_RETRY_AFTER);
        // Never below the (capped) Retry-After itself.
        delay = delay.max(ra_jittered);
    }
    delay
}

/// Slow requeue after a terminal error (bad credentials, revoked refresh token, invalid
/// configuration). The controller should also wake on changes of the CR or referenced Secrets.
pub fn terminal_retry_interval() -> Duration {
    Duration::from_secs(60 * 60)
}

/// Whether a token must be refreshed now: the scheduled refresh point or the expiry has passed.
pub fn needs_refresh(now: Timestamp, next_refresh_at: Timestamp, expires_at: Timestamp) -> bool {
    now >= next_refresh_at || now >= expires_at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Timestamp {
        "2025-01-01T00:00:00Z".parse().unwrap()
    }

    fn secs(s: i64) -> SignedDuration {
        SignedDuration::from_secs(s)
    }

    fn ms(m: i64) -> SignedDuration {
        SignedDuration::from_millis(m)
    }

    #[test]
    fn default_is_33_percent() {
        assert_eq!(RenewBefore::default(), RenewBefore::Percentage(33));
    }

    /// The window `[floor, nominal]` of a token issued at `issued` (see the module docs).
    fn window(issued: Timestamp, lifetime_s: i64, renew: &RenewBefore) -> (Timestamp, Timestamp) {
        let l = lifetime_s * 1000;
        let renew_ms = match *renew {
            RenewBefore::Duration(d) => (d.as_millis() as i64).min(l),
            RenewBefore::Percentage(p) => l * i64::from(p.clamp(1, 99)) / 100,
        };
        let floor = (l / 10).max(1000);
        (issued + ms(floor), issued + ms((l - renew_ms).max(floor)))
    }

    /// Most instants within any 1 s (a sliding window over the sorted instants).
    fn busiest_second(times: &[Timestamp]) -> usize {
        let mut ms: Vec<i64> = times.iter().map(|t| millis(*t)).collect();
        ms.sort_unstable();
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..ms.len() {
            while ms[hi] - ms[lo] >= 1000 {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    /// Whole seconds (floored), as `state_after_success` stores an issue time.
    fn stored(t: Timestamp) -> Timestamp {
        Timestamp::from_second(t.as_nanosecond().div_euclid(1_000_000_000) as i64).unwrap()
    }

    /// A deterministic stand-in for the delay between a refresh point and the request leaving
    /// (requeue wake-up, reads, dry run): 0–900 ms.
    fn latency(key: &str, n: usize) -> SignedDuration {
        let f = key_fraction(&[b"test-latency", key.as_bytes(), &n.to_be_bytes()]);
        ms(scale(900, f) as i64)
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("bench-{}/oauth-{i}", i % 3))
            .collect()
    }

    /// 60 s tokens, default renewBefore: window [6 s, 40.2 s], phase cycle 39.2 s.
    const L: i64 = 60;
    const CYCLE_MS: i128 = 39_200;

    #[test]
    fn every_point_lies_in_the_window() {
        let issued = t0();
        let renews = [
            RenewBefore::default(),
            RenewBefore::Percentage(1),
            RenewBefore::Percentage(50),
            RenewBefore::Percentage(89),
            RenewBefore::Duration(Duration::from_secs(600)),
            RenewBefore::Duration(Duration::from_secs(5)),
        ];
        for lifetime in [2, 3, 10, 30, 60, 300, 3600, 86_400] {
            for renew in &renews {
                let (floor, nominal) = window(issued, lifetime, renew);
                for key in keys(300) {
                    let at = next_refresh_at(issued, issued + secs(lifetime), renew, &key);
                    assert!(
                        at >= floor && at <= nominal,
                        "{key} L={lifetime} {renew:?}: {at} not in [{floor}, {nominal}]"
                    );
                }
            }
        }
    }

    #[test]
    fn deterministic_from_the_key_and_the_stored_times() {
        let issued = t0();
        let exp = issued + secs(86_400);
        let a = next_refresh_at(issued, exp, &RenewBefore::default(), "ns/a");
        // A restart recomputes the same point from the same stored times.
        assert_eq!(
            a,
            next_refresh_at(issued, exp, &RenewBefore::default(), "ns/a")
        );
        // Another connection issued at the same moment gets another point.
        assert_ne!(
            a,
            next_refresh_at(issued, exp, &RenewBefore::default(), "ns/b")
        );
    }

    #[test]
    fn a_cohort_minted_together_spreads_over_the_window() {
        // 1,000 connections issued the same instant with 60 s tokens (the benchmark's herd).
        // The old 0–5 % jitter put all of them into the 3 s before the nominal point, i.e. ≥ 333
        // in one second. Spread evenly over the 34.2 s window they would be 29 per second; the
        // phases of 1,000 hashed keys are not perfectly even (these keys: 46), hence twice that.
        let issued = t0();
        let (floor, nominal) = window(issued, L, &RenewBefore::default());
        let points: Vec<Timestamp> = keys(1000)
            .iter()
            .map(|k| next_refresh_at(issued, issued + secs(L), &RenewBefore::default(), k))
            .collect();
        assert!(points.iter().all(|p| *p >= floor && *p <= nominal));
        let busiest = busiest_second(&points);
        assert!(busiest <= 58, "{busiest} refreshes within one second");
        let distinct: std::collections::BTreeSet<i64> =
            points.iter().map(|p| p.as_second()).collect();
        assert!(
            distinct.len() >= 33,
            "only {} distinct seconds",
            distinct.len()
        );
    }

    /// Refresh points and request times of a connection whose first token was issued at
    /// `issued`, up to `until`: each request leaves [`latency`] after its point, the new token
    /// is stored with a whole-second issue time, and requests sent inside `outage` fail and
    /// are retried after [`backoff`].
    fn run(
        key: &str,
        issued: Timestamp,
        until: Timestamp,
        outage: Option<(Timestamp, Timestamp)>,
    ) -> (Vec<Timestamp>, Vec<Timestamp>) {
        let (mut points, mut requests) = (Vec::new(), Vec::new());
        let mut issued = issued;
        let mut failures = 0;
        loop {
            let point = next_refresh_at(issued, issued + secs(L), &RenewBefore::default(), key);
            let (floor, nominal) = window(issued, L, &RenewBefore::default());
            assert!(point >= floor && point <= nominal, "{key}: {point}");
            points.push(point);
            let mut sent = point + latency(key, requests.len());
            loop {
                if sent >= until {
                    return (points, requests);
                }
                requests.push(sent);
                if !outage.is_some_and(|(from, to)| sent >= from && sent < to) {
                    break;
                }
                failures += 1;
                let delay = SignedDuration::try_from(backoff(failures, None, key)).unwrap();
                sent = sent + delay + latency(key, requests.len());
            }
            failures = 0;
            issued = stored(sent);
        }
    }

    fn in_phase(key: &str, point: Timestamp) -> bool {
        (i128::from(millis(point)) - phase_ms(key, CYCLE_MS)).rem_euclid(CYCLE_MS) == 0
    }

    #[test]
    fn steady_state_is_even_in_phase_and_at_the_nominal_point() {
        let start = t0();
        let until = start + secs(600);
        let mut steady = Vec::new();
        let mut out_of_phase = Vec::new();
        for key in keys(1000) {
            let (points, requests) = run(&key, start, until, None);
            // From the second refresh on: in phase, exactly one cycle apart, i.e. 0–1 s (plus
            // the latency) before the nominal point of the token being replaced.
            for pair in points.windows(2).skip(1) {
                let cycle = pair[1].duration_since(pair[0]) == ms(CYCLE_MS as i64);
                if !(cycle && in_phase(&key, pair[1])) {
                    out_of_phase.push(format!("{key} at {}", pair[1]));
                }
            }
            steady.extend(requests.into_iter().filter(|r| *r >= start + secs(100)));
        }
        // An even 25.5 per second; the phases of 1,000 hashed keys are not perfectly even
        // (these keys: 43), hence twice that.
        let busiest = busiest_second(&steady);
        assert!(busiest <= 51, "{busiest} requests within one second");
        assert!(out_of_phase.is_empty(), "out of phase: {out_of_phase:?}");
        // 500 s at one request per connection per 39.2 s: 12,755 (at the nominal 40.2 s:
        // 12,438; the 0–5 % jitter this replaced averaged 38.7 s: 12,920).
        assert!(
            (12_600..=12_900).contains(&steady.len()),
            "{}",
            steady.len()
        );
    }

    #[test]
    fn connections_failing_together_do_not_recover_together() {
        // 1,000 connections whose tokens were issued at scattered times; then the provider
        // refuses everything for 15 s. The ~380 connections due meanwhile fail, back off
        // (1, 2, 4, 8 s) and all get their new tokens within a few seconds after it: a cohort.
        // Refreshing them a fixed fraction of the lifetime later would keep that cohort
        // together; instead each returns to its own phase.
        let start = t0();
        let (from, to) = (start + secs(200), start + secs(215));
        let until = start + secs(700);
        let mut after = Vec::new();
        let mut out_of_phase = Vec::new();
        for key in keys(1000) {
            let scatter = scale(40, key_fraction(&[b"test-scatter", key.as_bytes()]));
            let issued = start + secs(scatter as i64);
            let (points, requests) = run(&key, issued, until, Some((from, to)));
            // The first point scheduled from a token issued after the outage is in phase or
            // catching up; the ones after it are in phase.
            let recovered = points.iter().filter(|p| **p > to).skip(1);
            out_of_phase.extend(
                recovered
                    .filter(|p| !in_phase(&key, **p))
                    .map(|p| format!("{key} at {p}")),
            );
            after.extend(requests.into_iter().filter(|r| *r >= to + secs(30)));
        }
        // From 30 s after the outage (every backoff then in play is ≤ 8 s, so all have
        // recovered): the steady 25.5 per second, the recovered cohort spread over its window
        // (these keys: 44; refreshing at a fixed fraction of the lifetime instead, 108, again
        // every cycle). The first seconds after the outage carry the retries themselves, one
        // per connection per backoff step: 110 in the first second here with either schedule.
        let busiest = busiest_second(&after);
        assert!(
            busiest <= 60,
            "{busiest} requests within one second after the outage"
        );
        assert!(out_of_phase.is_empty(), "out of phase: {out_of_phase:?}");
    }

    #[test]
    fn percentage_bounds_1_and_99() {
        let issued = t0();
        let exp = issued + secs(1000);
        // 1 %: the window is [100 s, 990 s].
        let at1 = next_refresh_at(issued, exp, &RenewBefore::Percentage(1), "k");
        assert!(
            at1 <= issued + secs(990) && at1 >= issued + secs(100),
            "{at1}"
        );
        // 99 %: nominal at 10 s, below the floor of 10 % = 100 s.
        let at99 = next_refresh_at(issued, exp, &RenewBefore::Percentage(99), "k");
        assert_eq!(at99, issued + secs(100));
        // Out-of-range percentages are clamped, not panicking.
        let at0 = next_refresh_at(issued, exp, &RenewBefore::Percentage(0), "k");
        assert_eq!(at0, at1);
        let at200 = next_refresh_at(issued, exp, &RenewBefore::Percentage(200), "k");
        assert_eq!(at200, issued + secs(100));
    }

    #[test]
    fn duration_renew_before() {
        let issued = t0();
        let exp = issued + secs(3600);
        let renew = RenewBefore::Duration(Duration::from_secs(600));
        for key in keys(100) {
            let at = next_refresh_at(issued, exp, &renew, &key);
            assert!(at <= exp - secs(600) && at >= issued + secs(360), "{at}");
        }
    }

    #[test]
    fn duration_larger_than_lifetime_is_clamped_to_floor() {
        let issued = t0();
        let exp = issued + secs(60);
        let at = next_refresh_at(
            issued,
            exp,
            &RenewBefore::Duration(Duration::from_secs(3600)),
            "k",
        );
        assert_eq!(at, issued + secs(6)); // 10 % of 60 s
        let at = next_refresh_at(issued, exp, &RenewBefore::Duration(Duration::MAX), "k");
        assert_eq!(at, issued + secs(6));
    }

    #[test]
    fn tiny_ttls_cannot_hot_loop() {
        let issued = t0();
        // 1 s: nominal 0.67 s, floored at 1 s.
        let at = next_refresh_at(issued, issued + secs(1), &RenewBefore::default(), "k");
        assert_eq!(at, issued + secs(1));
        // 2 s: window [1 s, 1.34 s].
        for key in keys(100) {
            let at = next_refresh_at(issued, issued + secs(2), &RenewBefore::default(), &key);
            assert!(at >= issued + ms(1000) && at <= issued + ms(1340), "{at}");
        }
        // Zero or negative lifetime (clock skew, bogus server): floor.
        assert_eq!(
            next_refresh_at(issued, issued, &RenewBefore::default(), "k"),
            issued + secs(1)
        );
        assert_eq!(
            next_refresh_at(issued, issued - secs(30), &RenewBefore::default(), "k"),
            issued + secs(1)
        );
        // Sub-second lifetime: still once per second at most.
        assert_eq!(
            next_refresh_at(issued, issued + ms(300), &RenewBefore::default(), "k"),
            issued + secs(1)
        );
    }

    #[test]
    fn huge_lifetimes_do_not_overflow() {
        let issued = t0();
        let exp = Timestamp::MAX;
        let at = next_refresh_at(issued, exp, &RenewBefore::default(), "k");
        assert!(at > issued && at < exp);
        let at = next_refresh_at(Timestamp::MIN, exp, &RenewBefore::Percentage(50), "k");
        assert!(at <= exp);
        let at = next_refresh_at(Timestamp::MIN, exp, &RenewBefore::Percentage(1), "k");
        assert!(at <= exp);
    }

    #[test]
    fn pinned_schedule() {
        // Changing these reschedules every stored token when the operator is upgraded: the
        // points already passed are all refreshed at once. Change them only on purpose.
        let issued: Timestamp = "2026-11-28T23:57:50Z".parse().unwrap();
        for (lifetime, renew, key, want) in [
            (
                3600,
                RenewBefore::default(),
                "ns/conn",
                "2026-11-29T00:04:27.635Z",
            ),
            (
                3600,
                RenewBefore::default(),
                "ns/other",
                "2026-11-29T00:26:37.957Z",
            ),
            (
                86_400,
                RenewBefore::Duration(Duration::from_secs(600)),
                "ns/conn",
                "2026-11-29T11:09:22.4Z",
            ),
            (
                2,
                RenewBefore::default(),
                "ns/conn",
                "2026-11-28T23:57:51.243Z",
            ),
            (
                300,
                RenewBefore::Percentage(50),
                "team-a/api",
                "2026-11-28T23:59:48.24Z",
            ),
        ] {
            let at = next_refresh_at(issued, issued + secs(lifetime), &renew, key);
            assert_eq!(at, want.parse().unwrap(), "{key} {renew:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn prop_point_within_window(
            issued_s in -10_000_000_000i64..10_000_000_000,
            issued_ms in 0i64..1000,
            lifetime_ms in -5_000i64..100_000_000_000,
            pct in 0u8..=255,
            renew_s in proptest::option::of(0u64..200_000_000),
            key in ".{0,40}",
        ) {
            let issued = Timestamp::from_millisecond(issued_s * 1000 + issued_ms).unwrap();
            let exp = issued + ms(lifetime_ms);
            let renew = match renew_s {
                Some(s) => RenewBefore::Duration(Duration::from_secs(s)),
                None => RenewBefore::Percentage(pct),
            };
            let at = next_refresh_at(issued, exp, &renew, &key);
            proptest::prop_assert_eq!(at, next_refresh_at(issued, exp, &renew, &key));
            if lifetime_ms <= 0 {
                proptest::prop_assert_eq!(at, issued + secs(1));
            } else {
                let renew_ms = match renew {
                    RenewBefore::Duration(d) => (d.as_millis() as i64).min(lifetime_ms),
                    RenewBefore::Percentage(p) => lifetime_ms * i64::from(p.clamp(1, 99)) / 100,
                };
                let floor = issued + ms((lifetime_ms / 10).max(1000));
                let nominal = (issued + ms(lifetime_ms - renew_ms)).max(floor);
                proptest::prop_assert!(at >= floor && at <= nominal, "{} not in [{}, {}]", at, floor, nominal);
            }
        }

        /// Whatever the issue time, the second refresh is in phase and every one after it
        /// exactly one cycle later, when requests leave within 1 s of their point.
        #[test]
        fn prop_in_phase_from_the_second_refresh(
            issued_s in 1_000_000_000i64..3_000_000_000,
            lifetime_s in 10i64..10_000_000,
            pct in 1u8..=50,
            delays in proptest::collection::vec(0i64..1000, 4),
            key in "[a-z0-9-]{1,20}/[a-z0-9-]{1,20}",
        ) {
            let renew = RenewBefore::Percentage(pct);
            let mut issued = Timestamp::from_second(issued_s).unwrap();
            let mut points = Vec::new();
            for d in delays {
                let at = next_refresh_at(issued, issued + secs(lifetime_s), &renew, &key);
                points.push(at);
                issued = stored(at + ms(d));
            }
            let l = i128::from(lifetime_s) * 1000;
            let cycle = l - l * i128::from(pct) / 100 - 1000;
            for pair in points[1..].windows(2) {
                proptest::prop_assert_eq!(
                    i128::from(millis(pair[1]) - millis(pair[0])),
                    cycle
                );
            }
            let phase = phase_ms(&key, cycle);
            proptest::prop_assert_eq!((i128::from(millis(points[1])) - phase).rem_euclid(cycle), 0);
        }
    }

    #[test]
    fn default_expires_in_is_conservative() {
        assert_eq!(default_expires_in(), Duration::from_secs(300));
    }

    #[test]
    fn backoff_monotone_and_capped() {
        for key in ["a", "b", "ns/conn", ""] {
            let mut prev = Duration::ZERO;
            for f in 0..200 {
                let d = backoff(f, None, key);
                assert!(d >= prev, "key {key}: failure {f}: {d:?} < {prev:?}");
                assert!(d <= MAX_BACKOFF, "{d:?}");
                assert!(d >= Duration::from_millis(800), "{d:?}");
                prev = d;
            }
            assert!(backoff(u32::MAX, None, key) <= MAX_BACKOFF);
            assert!(backoff(u32::MAX, None, key) >= MAX_BACKOFF * 4 / 5);
        }
        // Starts at about 1 s and doubles.
        let d1 = backoff(1, None, "a");
        let d2 = backoff(2, None, "a");
        assert!(d1 <= Duration::from_secs(1) && d1 >= Duration::from_millis(800));
        assert_eq!(d2, d1 * 2);
        assert_eq!(backoff(0, None, "a"), d1);
    }

    #[test]
    fn backoff_jitter_spreads_keys() {
        let set: std::collections::BTreeSet<_> = (0..100)
            .map(|i| backoff(20, None, &format!("k{i}")))
            .collect();
        assert!(set.len() > 90);
    }

    #[test]
    fn backoff_honours_retry_after() {
        for key in ["a", "b", "c"] {
            let ra = Duration::from_secs(2);
            let d = backoff(1, Some(ra), key);
            assert!(d >= ra && d <= Duration::from_millis(2200), "{d:?}");
            // Retry-After larger than the backoff cap wins.
            let ra = Duration::from_secs(1200);
            assert!(backoff(30, Some(ra), key) >= ra);
            // Retry-After smaller than the current backoff does not shorten it.
            let d = backoff(10, Some(Duration::from_secs(1)), key);
            assert_eq!(d, backoff(10, None, key));
            // Absurd Retry-After is capped at 1 h.
            assert_eq!(
                backoff(1, Some(Duration::from_secs(10 * 86_400)), key),
                MAX_RETRY_AFTER
            );
            assert_eq!(backoff(1, Some(Duration::MAX), key), MAX_RETRY_AFTER);
        }
    }

    #[test]
    fn terminal_interval_is_slow() {
        assert_eq!(terminal_retry_interval(), Duration::from_secs(3600));
        assert!(terminal_retry_interval() > MAX_BACKOFF);
    }

    #[test]
    fn needs_refresh_boundaries() {
        let now = t0();
        assert!(!needs_refresh(now, now + secs(1), now + secs(10)));
        assert!(needs_refresh(now, now, now + secs(10)));
        assert!(needs_refresh(now, now - secs(1), now + secs(10)));
        // Expired even though the refresh point is (bogusly) later.
        assert!(needs_refresh(now, now + secs(100), now));
        assert!(needs_refresh(now, now + secs(100), now - secs(1)));
    }
}

/// Properties of the schedule's documented contracts (module docs): they hold for any jitter
/// that is subtracted from the nominal point, however it is derived.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::oauth::token::response::fuzz::proptest_config;

    const TEN_YEARS_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

    fn renew() -> impl Strategy<Value = RenewBefore> {
        prop_oneof![
            any::<u8>().prop_map(RenewBefore::Percentage),
            (0u64..=TEN_YEARS_MS as u64 * 2)
                .prop_map(|ms| RenewBefore::Duration(Duration::from_millis(ms))),
            Just(RenewBefore::Duration(Duration::MAX)),
        ]
    }

    /// Issue times from 1970 to 2096, lifetimes from −1000 s to 10 years, both in whole
    /// milliseconds or with any fraction of one.
    fn token() -> impl Strategy<Value = (Timestamp, Timestamp)> {
        (
            0i64..4_000_000_000_000,
            prop_oneof![-1_000_000i64..5_000, 5_000i64..TEN_YEARS_MS],
            prop_oneof![Just((0i32, 0i32)), (0i32..1_000_000, 0i32..1_000_000)],
        )
            .prop_map(|(issued_ms, lifetime_ms, (n1, n2))| {
                let issued = Timestamp::from_millisecond(issued_ms).unwrap()
                    + SignedDuration::from_nanos(i64::from(n1));
                let expires = issued
                    + SignedDuration::from_millis(lifetime_ms)
                    + SignedDuration::from_nanos(i64::from(n2));
                (issued, expires)
            })
    }

    proptest! {
        #![proptest_config(proptest_config(1024))]

        /// The refresh point lies between the floor (1 s and 10 % of the lifetime after issue)
        /// and the later of the nominal point and the floor: never after the nominal point
        /// unless the floor is; and for a lifetime of at least the floor interval, never after
        /// expiry. Deterministic for the same inputs.
        #[test]
        fn refresh_lies_between_floor_and_nominal_point(
            (issued, expires) in token(),
            renew in renew(),
            key in "\\PC{0,40}",
        ) {
            let at = next_refresh_at(issued, expires, &renew, &key);
            prop_assert_eq!(at, next_refresh_at(issued, expires, &renew, &key));
            // Millisecond resolution (the schedule counts whole milliseconds): 1 ms of slack.
            let slack = SignedDuration::from_millis(1);
            let lifetime = expires.duration_since(issued);
            let min = SignedDuration::try_from(MIN_REFRESH_INTERVAL).unwrap();
            let floor = if lifetime <= SignedDuration::ZERO {
                min
            } else {
                min.max(lifetime / 10)
            };
            prop_assert!(at >= issued + floor - slack, "{at} before the floor {floor:?} after {issued}");
            if lifetime > SignedDuration::ZERO {
                let renew_by = match renew {
                    RenewBefore::Duration(d) => SignedDuration::try_from(d)
                        .unwrap_or(SignedDuration::MAX)
                        .min(lifetime),
                    RenewBefore::Percentage(p) => lifetime * i32::from(p.clamp(1, 99)) / 100,
                };
                let nominal = expires - renew_by;
                let latest = nominal.max(issued + floor);
                prop_assert!(at <= latest + slack, "{at} after the nominal point {nominal} / floor");
                if lifetime >= min + slack {
                    prop_assert!(at <= expires + slack, "{at} after expiry {expires}");
                }
            } else {
                prop_assert_eq!(at, issued + min);
            }
        }

        /// A plan made with the refresh point never waits past expiry: at expiry (or after) a
        /// refresh is due, whatever the refresh point says.
        #[test]
        fn expiry_always_needs_a_refresh(
            (issued, expires) in token(),
            renew in renew(),
            after_ms in 0i64..1_000_000,
        ) {
            let next = next_refresh_at(issued, expires, &renew, "ns/c");
            let now = expires + SignedDuration::from_millis(after_ms);
            prop_assert!(needs_refresh(now, next, expires));
            prop_assert!(needs_refresh(next, next, expires));
        }

        /// Backoff: monotone in the failure count, never below 80 % of the exponential step,
        /// capped at 5 min without a `Retry-After`; with one, never below it (capped at 1 h)
        /// and never above the larger cap.
        #[test]
        fn backoff_is_monotone_bounded_and_honours_retry_after(
            failures in prop_oneof![0u32..40, any::<u32>()],
            retry_after in proptest::option::of(prop_oneof![
                (0u64..4_000_000).prop_map(Duration::from_millis),
                any::<u64>().prop_map(Duration::from_secs),
            ]),
            key in "\\PC{0,40}",
        ) {
            let d = backoff(failures, retry_after, &key);
            let next = backoff(failures.saturating_add(1), retry_after, &key);
            prop_assert!(next >= d, "{failures}: {next:?} < {d:?}");
            let step = BASE_BACKOFF
                .checked_mul(1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX))
                .unwrap_or(MAX_BACKOFF)
                .min(MAX_BACKOFF);
            prop_assert!(d >= step * 4 / 5, "{d:?} below 80 % of {step:?}");
            match retry_after {
                None => prop_assert!(d <= MAX_BACKOFF, "{d:?}"),
                Some(ra) => {
                    prop_assert!(d >= ra.min(MAX_RETRY_AFTER), "{d:?} < {ra:?}");
                    prop_assert!(d <= MAX_BACKOFF.max(MAX_RETRY_AFTER), "{d:?}");
                }
            }
            prop_assert_eq!(backoff(0, retry_after, &key), backoff(1, retry_after, &key));
        }
    }
}
