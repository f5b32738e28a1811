//! Pure refresh scheduling: when to refresh a token, how long to back off after a failure.
//!
//! Everything here is deterministic and free of I/O so that a restarted operator recomputes
//! exactly the same times from the persisted `issued_at`/`expires_at` and the same key.
//!
//! # Refresh point
//!
//! For a token valid over `issued_at..expires_at` (the *lifetime*), the nominal refresh point is
//! `expires_at − renewBefore`, where `renewBefore` is either a fixed duration or a percentage of
//! the lifetime (default 33 %, i.e. refresh at ~2/3 of the lifetime).
//!
//! A deterministic jitter of up to [`MAX_JITTER_PERCENT`] % of the lifetime is then subtracted
//! (never added: the refresh never happens *later* than the nominal point), derived from a hash
//! of the caller's `jitter_key` and `issued_at`, so connections minted at the same moment spread
//! out, and every cycle gets a fresh but reproducible offset.
//!
//! Finally a *floor* is applied: the refresh is never scheduled earlier than
//! `issued_at + max(MIN_REFRESH_INTERVAL, 10 % of lifetime)`. This bounds the refresh rate for
//! tiny or bogus lifetimes (a 1 s token is refreshed once per second, not in a hot loop) and
//! caps an oversized `renewBefore` (a duration ≥ the lifetime, or a percentage above 90) at
//! "refresh after 10 % of the lifetime". For lifetimes shorter than `MIN_REFRESH_INTERVAL` the
//! floor lies after `expires_at`: the token is briefly expired rather than refreshed in a loop.
//!
//! # Backoff
//!
//! [`backoff`] is exponential (1 s, 2 s, 4 s, … capped at [`MAX_BACKOFF`] = 5 min) with a
//! per-key deterministic reduction of up to 20 %, so it is monotone in the failure count for a
//! given key but different keys spread out. A server `Retry-After` (capped at
//! [`MAX_RETRY_AFTER`] = 1 h) is a lower bound.
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
/// 1 s keeps a 2 s token usable (refreshed at ~1.3 s, i.e. ~2/3 of its lifetime) while making a
/// hot loop impossible: at most one refresh per second per connection.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Fraction of the lifetime (in percent) below which the refresh is never scheduled.
pub const MIN_REFRESH_PERCENT: i128 = 10;

/// Maximum jitter, in percent of the lifetime, subtracted from the nominal refresh point.
pub const MAX_JITTER_PERCENT: i128 = 5;

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

fn add_ms(t: Timestamp, ms: i128) -> Timestamp {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| t.checked_add(SignedDuration::from_millis(ms)).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Milliseconds since the epoch, floored (also before 1970), as the schedule always hashed them.
fn millis(t: Timestamp) -> i64 {
    // |t| < 2^49 ms over jiff's whole range: the cast cannot truncate.
    t.as_nanosecond().div_euclid(1_000_000) as i64
}

/// When to refresh a token issued at `issued_at` and expiring at `expires_at`.
///
/// `jitter_key` should identify the connection stably (e.g. `namespace/name` or the UID); it is
/// hashed together with `issued_at`, so the result is reproducible after a restart and the
/// jitter differs from one cycle to the next. See the module docs for the exact rule.
pub fn next_refresh_at(
    issued_at: Timestamp,
    expires_at: Timestamp,
    renew: &RenewBefore,
    jitter_key: &str,
) -> Timestamp {
    // i128 milliseconds: the full range cannot overflow.
    let lifetime_ms = i128::from(millis(expires_at)) - i128::from(millis(issued_at));
    let min_ms = MIN_REFRESH_INTERVAL.as_millis() as i128;
    if lifetime_ms <= 0 {
        return add_ms(issued_at, min_ms);
    }

    let renew_ms = match *renew {
        RenewBefore::Duration(d) => (d.as_millis().min(i128::MAX as u128) as i128).min(lifetime_ms),
        RenewBefore::Percentage(p) => lifetime_ms * i128::from(p.clamp(1, 99)) / 100,
    };

    let frac = key_fraction(&[jitter_key.as_bytes(), &millis(issued_at).to_be_bytes()]);
    let max_jitter_ms = lifetime_ms * MAX_JITTER_PERCENT / 100;
    let jitter_ms = (max_jitter_ms * i128::from(frac)) >> 64;

    // Offsets from issued_at.
    let nominal = lifetime_ms - renew_ms;
    let jittered = nominal - jitter_ms;
    let floor = min_ms.max(lifetime_ms * MIN_REFRESH_PERCENT / 100);
    add_ms(issued_at, jittered.max(floor))
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

    #[test]
    fn percentage_refreshes_at_about_two_thirds() {
        let issued = t0();
        let exp = issued + secs(3600);
        let at = next_refresh_at(issued, exp, &RenewBefore::default(), "ns/a");
        let nominal = exp - ms(3600 * 330);
        assert!(at <= nominal, "never later than nominal: {at} vs {nominal}");
        assert!(at >= nominal - ms(3600 * 50), "jitter ≤ 5 %: {at}");
    }

    #[test]
    fn deterministic_for_same_inputs() {
        let issued = t0();
        let exp = issued + secs(86_400);
        let a = next_refresh_at(issued, exp, &RenewBefore::default(), "ns/a");
        let b = next_refresh_at(issued, exp, &RenewBefore::default(), "ns/a");
        assert_eq!(a, b);
        // A different issue time (next cycle) gives a different jitter.
        let issued2 = issued + secs(1);
        let c = next_refresh_at(
            issued2,
            issued2 + secs(86_400),
            &RenewBefore::default(),
            "ns/a",
        );
        assert_ne!(c.duration_since(issued2), a.duration_since(issued));
    }

    #[test]
    fn percentage_bounds_1_and_99() {
        let issued = t0();
        let exp = issued + secs(1000);
        // 1 %: nominal at 990 s, jitter ≤ 50 s.
        let at1 = next_refresh_at(issued, exp, &RenewBefore::Percentage(1), "k");
        assert!(
            at1 <= issued + secs(990) && at1 >= issued + secs(940),
            "{at1}"
        );
        // 99 %: nominal at 10 s minus jitter, floored at 10 % = 100 s.
        let at99 = next_refresh_at(issued, exp, &RenewBefore::Percentage(99), "k");
        assert_eq!(at99, issued + secs(100));
        // Out-of-range percentages are clamped, not panicking.
        let at0 = next_refresh_at(issued, exp, &RenewBefore::Percentage(0), "k");
        assert!(at0 <= exp && at0 >= issued + secs(940));
        let at200 = next_refresh_at(issued, exp, &RenewBefore::Percentage(200), "k");
        assert_eq!(at200, issued + secs(100));
    }

    #[test]
    fn duration_renew_before() {
        let issued = t0();
        let exp = issued + secs(3600);
        let at = next_refresh_at(
            issued,
            exp,
            &RenewBefore::Duration(Duration::from_secs(600)),
            "k",
        );
        assert!(
            at <= exp - secs(600) && at >= exp - secs(600) - secs(180),
            "{at}"
        );
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
        // 2 s: nominal 1.34 s minus ≤ 0.1 s jitter; above the 1 s floor.
        for i in 0..100 {
            let key = format!("k{i}");
            let at = next_refresh_at(issued, issued + secs(2), &RenewBefore::default(), &key);
            assert!(at >= issued + ms(1240) && at <= issued + ms(1340), "{at}");
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
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let issued = t0();
        let lifetime = 3600;
        let exp = issued + secs(lifetime);
        let nominal = exp - ms(lifetime * 330);
        let lower = nominal - ms(lifetime * 50);
        let mut offsets = std::collections::BTreeSet::new();
        let (mut lo, mut hi) = (i128::MAX, i128::MIN);
        for i in 0..1000 {
            let key = format!("ns-{}/conn-{i}", i % 7);
            let at = next_refresh_at(issued, exp, &RenewBefore::default(), &key);
            assert!(at <= nominal && at >= lower, "key {key}: {at}");
            let off = nominal.duration_since(at).as_millis();
            offsets.insert(off);
            lo = lo.min(off);
            hi = hi.max(off);
        }
        // Actually spreads: many distinct values covering most of the 180 s window.
        assert!(offsets.len() > 900, "{} distinct", offsets.len());
        assert!(lo < 10_000 && hi > 170_000, "range {lo}..{hi} ms");
        // Roughly uniform: each half of the window gets a fair share.
        let low_half = offsets.iter().filter(|o| **o < 90_000).count();
        assert!((350..=650).contains(&low_half), "{low_half}");
    }

    #[test]
    fn same_schedule_as_earlier_versions() {
        // Refresh points the previous implementation computed for these inputs: after an
        // upgrade, tokens in existing state Secrets keep their schedule.
        let issued: Timestamp = "2026-11-28T23:57:50Z".parse().unwrap();
        for (lifetime, renew, key, want) in [
            (
                secs(3600),
                RenewBefore::default(),
                "ns/conn",
                "2026-11-29T00:36:06.794Z",
            ),
            (
                secs(3600),
                RenewBefore::default(),
                "ns/other",
                "2026-11-29T00:36:29.084Z",
            ),
            (
                secs(86_400),
                RenewBefore::Duration(Duration::from_secs(600)),
                "ns/conn",
                "2026-11-29T23:01:45.055Z",
            ),
            (
                secs(2),
                RenewBefore::default(),
                "ns/conn",
                "2026-11-28T23:57:51.276Z",
            ),
            (
                secs(300),
                RenewBefore::Percentage(50),
                "team-a/api",
                "2026-11-29T00:00:14.713Z",
            ),
        ] {
            let at = next_refresh_at(issued, issued + lifetime, &renew, key);
            assert_eq!(at, want.parse().unwrap(), "{key} {renew:?}");
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
