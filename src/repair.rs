//! The repair budget of a generated Secret (pure; time passed in).
//!
//! A *repair* is a write that puts back content someone else changed: the operator already
//! wrote (or found) exactly this content, and the live Secret no longer holds it. Writes of new
//! content (the first write, a spec or credentials change, a token refresh) are not repairs.
//! Another writer that reverts every repair (a second controller, a GitOps self-heal, a script)
//! would otherwise turn each watch event into a write on both sides, forever. So: at most
//! [`RepairPolicy::budget`] repairs within [`RepairPolicy::window`]; beyond it the Secret is
//! left as the other writer made it (`SecretContested`) until a backoff passes (doubling up to
//! [`RepairPolicy::max_backoff`]), when one more repair is tried. A change by the user (the
//! connection's generation, its credentials Secret) starts a new budget.

use jiff::{SignedDuration, Timestamp};

/// How many repairs are allowed, and how the retries after that back off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairPolicy {
    /// Repairs allowed within `window` before the operator stops.
    pub budget: usize,
    pub window: SignedDuration,
    /// The first wait after the budget is spent; each failed retry doubles it.
    pub first_backoff: SignedDuration,
    pub max_backoff: SignedDuration,
}

/// The operator's policy (README, "Write fights").
pub const POLICY: RepairPolicy = RepairPolicy {
    budget: 3,
    window: SignedDuration::from_mins(10),
    first_backoff: SignedDuration::from_mins(1),
    max_backoff: SignedDuration::from_hours(1),
};

impl RepairPolicy {
    /// The wait after the `level`-th failed retry (0: the budget was just spent).
    pub fn backoff(&self, level: u32) -> SignedDuration {
        let factor = 1i32.checked_shl(level.min(30)).unwrap_or(i32::MAX);
        self.first_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// What the user controls: a change of it starts a new budget.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInputs {
    /// The connection's `metadata.generation` (spec edits).
    pub generation: Option<i64>,
    /// The credentials Secret's resourceVersion (any edit of it).
    pub credentials_version: Option<String>,
}

/// Repairs stopped until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    until: Timestamp,
    /// How many retries failed before this block (the backoff's exponent).
    level: u32,
    /// When the one repair after `until` was made.
    probed_at: Option<Timestamp>,
}

/// One connection's repair history.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RepairHistory {
    inputs: Option<UserInputs>,
    /// Content hash of what this process last wrote or found in the Secret.
    known_good: Option<String>,
    /// Repairs within the window.
    repairs: Vec<Timestamp>,
    block: Option<Block>,
}

/// What to do about a Secret that does not hold the desired content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// New content: write it (not a repair).
    Write,
    /// Put the content back: a repair within the budget (or the one retry after a backoff).
    Repair,
    /// Leave it: the budget is spent. `started`: this decision began the block (log it once).
    Blocked {
        until: Timestamp,
        /// Repairs within the window when the block began.
        repairs: usize,
        started: bool,
    },
}

impl RepairHistory {
    /// The history under the user's current `inputs`: a change resets the budget and any block.
    pub fn with_inputs(mut self, inputs: UserInputs) -> Self {
        if self.inputs.as_ref() != Some(&inputs) {
            self.repairs.clear();
            self.block = None;
            self.inputs = Some(inputs);
        }
        self
    }

    /// The Secret holds (was written with, or found with) the content of `hash`.
    pub fn known_good(mut self, hash: &str) -> Self {
        if self.known_good.as_deref() != Some(hash) {
            self.known_good = Some(hash.to_string());
        }
        self
    }

    /// Whether a block is in force at `now`.
    pub fn blocked_at(&self, now: Timestamp) -> bool {
        self.block.is_some_and(|b| now < b.until)
    }

    /// The live Secret does not hold `desired_hash` (or is gone): what to do, and the history
    /// to keep once it is done (for `Write` and `Repair`: after the write succeeded, then
    /// marked [`Self::known_good`]; for `Blocked`: at once).
    pub fn decide(
        &self,
        policy: &RepairPolicy,
        desired_hash: &str,
        now: Timestamp,
    ) -> (Verdict, RepairHistory) {
        let mut next = self.clone();
        if self.known_good.as_deref() != Some(desired_hash) {
            return (Verdict::Write, next);
        }
        let window_start = now - policy.window;
        next.repairs.retain(|t| *t > window_start);
        if let Some(b) = next.block {
            if now < b.until {
                let v = Verdict::Blocked {
                    until: b.until,
                    repairs: next.repairs.len(),
                    started: false,
                };
                return (v, next);
            }
            match b.probed_at {
                // The backoff passed: one more repair.
                None => {
                    next.block = Some(Block {
                        probed_at: Some(now),
                        ..b
                    });
                    next.repairs.push(now);
                    return (Verdict::Repair, next);
                }
                // That repair held for a whole window: the other writer is gone; start afresh.
                Some(at) if now - policy.window >= at => {
                    next.block = None;
                    next.repairs = vec![now];
                    return (Verdict::Repair, next);
                }
                // Reverted again soon after: wait longer.
                Some(_) => {
                    let level = b.level.saturating_add(1);
                    return next.start_block(policy, now, level);
                }
            }
        }
        if next.repairs.len() < policy.budget {
            next.repairs.push(now);
            return (Verdict::Repair, next);
        }
        next.start_block(policy, now, 0)
    }

    fn start_block(
        mut self,
        policy: &RepairPolicy,
        now: Timestamp,
        level: u32,
    ) -> (Verdict, RepairHistory) {
        let until = now + policy.backoff(level);
        self.block = Some(Block {
            until,
            level,
            probed_at: None,
        });
        let v = Verdict::Blocked {
            until,
            repairs: self.repairs.len(),
            started: true,
        };
        (v, self)
    }
}

/// The window in minutes and `until` as the messages show them.
fn window_and_until(policy: &RepairPolicy, until: Timestamp) -> (i64, String) {
    (
        policy.window.as_secs() / 60,
        until.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// The status message while repairs are stopped: names the Secret and what to do, never its
/// content.
pub fn contested_message(
    namespace: &str,
    name: &str,
    policy: &RepairPolicy,
    repairs: usize,
    until: Timestamp,
) -> String {
    let (window, until) = window_and_until(policy, until);
    format!(
        "Secret {namespace}/{name} keeps being changed by another writer: vaultconn put its content back {repairs} times in the last {window} minutes and stops repairing it until {until} (then it tries once more, waiting longer each time). Find and stop the other writer (another controller, a GitOps sync or a script that writes this Secret), or choose another spec.target.name; an edit of the VaultConnection or of its credentials Secret repairs it at once"
    )
}

/// The status message while token requests caused by rollbacks of the state Secret are
/// stopped: names the Secret and what to do, never its content.
pub fn state_contested_message(
    namespace: &str,
    name: &str,
    policy: &RepairPolicy,
    repairs: usize,
    until: Timestamp,
) -> String {
    let (window, until) = window_and_until(policy, until);
    format!(
        "Secret {namespace}/{name} (the token state) keeps being rolled back by another writer: vaultconn requested new tokens {repairs} times in the last {window} minutes because of it and requests none for that reason until {until} (then it tries once more, waiting longer each time). Find and stop the other writer (a backup restore, a GitOps sync or a script that writes this Secret): the token state belongs to vaultconn alone; an edit of the VaultConnection or of its credentials Secret lets it refresh at once"
    )
}

/// The status message while rewrites of a deleted state Secret are stopped: names the Secret,
/// says where the tokens are meanwhile and what to do, never their values.
pub fn state_deleted_message(
    namespace: &str,
    name: &str,
    policy: &RepairPolicy,
    repairs: usize,
    until: Timestamp,
) -> String {
    let (window, until) = window_and_until(policy, until);
    format!(
        "Secret {namespace}/{name} (the token state) keeps being deleted by another writer: vaultconn wrote it again {repairs} times in the last {window} minutes and stops until {until} (then it tries once more, waiting longer each time), except to store tokens it refreshes on schedule. Meanwhile the current tokens are kept only in this operator process: a restart before the Secret is back loses them (StateLost). Find and stop the other writer (a cleanup job, a GitOps prune, a script): the token state belongs to vaultconn alone; an edit of the VaultConnection or of its credentials Secret writes it again at once"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("in range")
    }

    fn inputs(generation: i64) -> UserInputs {
        UserInputs {
            generation: Some(generation),
            credentials_version: Some("1".into()),
        }
    }

    /// A history whose Secret was written with content "h".
    fn written() -> RepairHistory {
        RepairHistory::default()
            .with_inputs(inputs(1))
            .known_good("h")
    }

    /// Carry out `decide` the way the writer does (the write succeeds).
    fn step(h: RepairHistory, now: Timestamp) -> (Verdict, RepairHistory) {
        let (v, next) = h.decide(&POLICY, "h", now);
        match v {
            Verdict::Blocked { .. } => (v, next),
            _ => (v, next.known_good("h")),
        }
    }

    #[test]
    fn new_content_is_never_a_repair() {
        // The first write, and a write of other content (a spec change, a token refresh).
        let (v, _) = RepairHistory::default().decide(&POLICY, "h", t(0));
        assert_eq!(v, Verdict::Write);
        let mut h = written();
        for i in 0..10 {
            let (v, next) = h.decide(&POLICY, &format!("h{i}"), t(i));
            assert_eq!(v, Verdict::Write);
            h = next.known_good(&format!("h{i}"));
        }
    }

    #[test]
    fn the_budget_allows_three_repairs_then_blocks_with_a_specific_verdict() {
        let mut h = written();
        for i in 0..3 {
            let (v, next) = step(h, t(i));
            assert_eq!(v, Verdict::Repair, "repair {i}");
            h = next;
        }
        let (v, h) = step(h, t(3));
        assert_eq!(
            v,
            Verdict::Blocked {
                until: t(63),
                repairs: 3,
                started: true
            }
        );
        // Every revert during the block: blocked, not a new block (no new log or Event).
        let (v, h2) = step(h.clone(), t(30));
        assert_eq!(
            v,
            Verdict::Blocked {
                until: t(63),
                repairs: 3,
                started: false
            }
        );
        assert_eq!(h2, h, "nothing changes while blocked");
    }

    #[test]
    fn repairs_older_than_the_window_do_not_count() {
        let mut h = written();
        for i in 0..3 {
            h = step(h, t(i * 300)).1;
        }
        // 0, 300, 600: at 601 the first one (0) has left the 10 min window.
        let (v, _) = step(h, t(601));
        assert_eq!(v, Verdict::Repair);
    }

    #[test]
    fn after_the_backoff_one_repair_is_tried_and_the_backoff_doubles_up_to_an_hour() {
        let mut h = written();
        for i in 0..3 {
            h = step(h, t(i)).1;
        }
        let (_, mut h) = step(h, t(3));
        let mut until = t(63);
        let mut waits = vec![];
        for _ in 0..9 {
            // Reverted again at once after the retry.
            let (v, next) = step(h, until);
            assert_eq!(v, Verdict::Repair, "the retry after the backoff");
            let (v, next) = step(next, until + SignedDuration::from_secs(1));
            let Verdict::Blocked {
                until: u,
                started: true,
                ..
            } = v
            else {
                panic!("blocked again: {v:?}");
            };
            waits.push(
                u.duration_since(until + SignedDuration::from_secs(1))
                    .as_secs(),
            );
            until = u;
            h = next;
        }
        assert_eq!(waits, [120, 240, 480, 960, 1920, 3600, 3600, 3600, 3600]);
    }

    #[test]
    fn a_retry_that_holds_for_a_window_starts_a_fresh_budget() {
        let mut h = written();
        for i in 0..3 {
            h = step(h, t(i)).1;
        }
        let (_, h) = step(h, t(3));
        let (v, h) = step(h, t(63));
        assert_eq!(v, Verdict::Repair);
        // Quiet for 10 minutes, then another change: a repair, with a new budget of 3.
        let mut h = h;
        for i in 0..3 {
            let (v, next) = step(h, t(63 + 600 + i));
            assert_eq!(v, Verdict::Repair, "repair {i} of the fresh budget");
            h = next;
        }
        assert!(matches!(step(h, t(700)).0, Verdict::Blocked { .. }));
    }

    #[test]
    fn a_user_change_resets_the_budget_and_the_block() {
        let mut h = written();
        for i in 0..4 {
            h = step(h, t(i)).1;
        }
        assert!(h.blocked_at(t(10)));
        let same = h.clone().with_inputs(inputs(1));
        assert!(same.blocked_at(t(10)), "unchanged inputs keep the block");
        let edited = h.clone().with_inputs(inputs(2));
        assert!(!edited.blocked_at(t(10)));
        assert_eq!(step(edited, t(10)).0, Verdict::Repair);
        let creds = h.with_inputs(UserInputs {
            generation: Some(1),
            credentials_version: Some("2".into()),
        });
        assert_eq!(step(creds, t(10)).0, Verdict::Repair);
    }

    #[test]
    fn the_message_names_the_secret_and_what_to_do() {
        let m = contested_message("ns", "out", &POLICY, 3, t(63));
        assert_eq!(
            m,
            "Secret ns/out keeps being changed by another writer: vaultconn put its content back 3 times in the last 10 minutes and stops repairing it until 2023-11-14T22:14:23Z (then it tries once more, waiting longer each time). Find and stop the other writer (another controller, a GitOps sync or a script that writes this Secret), or choose another spec.target.name; an edit of the VaultConnection or of its credentials Secret repairs it at once"
        );
    }

    #[test]
    fn the_state_message_names_the_secret_and_what_to_do() {
        let m = state_contested_message("ns", "c-vaultconn-state", &POLICY, 3, t(63));
        assert!(m.starts_with("Secret ns/c-vaultconn-state (the token state) keeps being rolled back by another writer: vaultconn requested new tokens 3 times in the last 10 minutes"), "{m}");
        assert!(m.contains("Find and stop the other writer"), "{m}");
    }

    #[test]
    fn the_deleted_state_message_says_where_the_tokens_are() {
        let m = state_deleted_message("ns", "c-vaultconn-state", &POLICY, 3, t(63));
        assert!(m.starts_with("Secret ns/c-vaultconn-state (the token state) keeps being deleted by another writer: vaultconn wrote it again 3 times in the last 10 minutes"), "{m}");
        assert!(m.contains("only in this operator process"), "{m}");
        assert!(m.contains("Find and stop the other writer"), "{m}");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b: Vec<i64> = (0..9).map(|l| POLICY.backoff(l).as_secs()).collect();
        assert_eq!(b, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(POLICY.backoff(u32::MAX).as_secs(), 3600);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use crate::oauth::token::response::fuzz::proptest_config;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(proptest_config(64))]
        /// Whatever the timing of the reverts, no 10-minute window holds more than the budget
        /// plus one retry per backoff that ended in it; a block always lies ahead.
        #[test]
        fn repairs_per_window_are_bounded(gaps in proptest::collection::vec(0i64..400, 1..200)) {
            let mut h = RepairHistory::default().with_inputs(UserInputs::default()).known_good("h");
            let mut now = Timestamp::from_second(1_700_000_000).expect("in range");
            let mut repairs = vec![];
            for g in gaps {
                now += SignedDuration::from_secs(g);
                let (v, next) = h.decide(&POLICY, "h", now);
                match v {
                    Verdict::Repair => { repairs.push(now); h = next.known_good("h"); }
                    Verdict::Blocked { until, .. } => { prop_assert!(until > now); h = next; }
                    Verdict::Write => prop_assert!(false, "known content is never new"),
                }
            }
            for (i, start) in repairs.iter().enumerate() {
                let in_window = repairs[i..].iter().take_while(|t| **t < *start + POLICY.window).count();
                // 3 from the budget, then retries after backoffs of 1, 2, 4 min (sum 7 < 10).
                prop_assert!(in_window <= POLICY.budget + 3, "{} repairs in a window", in_window);
            }
        }
    }
}
