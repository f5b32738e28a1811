//! What `vaultconn status` shows and how `vaultconn refresh --wait` reads progress, from the
//! objects alone. Pure: the clock is passed in. Only names and reasons are shown, never a
//! Secret's values (the CLI never reads Secrets).

use k8s_openapi::api::core::v1::Event;
use serde::Serialize;

use crate::api::{Phase, VaultConnection};
use crate::reason::Reason;
use crate::status::READY;

/// One connection as `status` shows it (`-o json` prints exactly this).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// `None` until the operator has processed the connection once.
    pub phase: Option<String>,
    pub ready: Option<bool>,
    pub reason: Option<String>,
    pub message: Option<String>,
    /// When the Ready condition last changed.
    pub since: Option<String>,
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    pub suspended: bool,
    /// The Secret the operator writes (`spec.target.name`, default the connection's name).
    pub target_secret: String,
    /// Set once the operator has written the target Secret.
    pub secret_name: Option<String>,
    pub credentials_secret: Option<String>,
    /// oauth2/auth0: where the refresh token lives (operator state, not for mounting).
    pub state_secret: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_keys: Vec<String>,
    pub expires_at: Option<String>,
    pub next_refresh_time: Option<String>,
    pub last_refresh_time: Option<String>,
    pub failed_refresh_attempts: u32,
    pub last_failure_reason: Option<String>,
    /// Recent Events, oldest first (only for a single connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventView>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    pub time: Option<String>,
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: i32,
}

/// The most recent Events shown for one connection.
pub const EVENTS_SHOWN: usize = 10;

impl StatusView {
    pub fn new(vc: &VaultConnection, events: Option<&[Event]>) -> StatusView {
        let status = vc.status.clone().unwrap_or_default();
        let ready = status.conditions.iter().find(|c| c.type_ == READY);
        let name = vc.metadata.name.clone().unwrap_or_default();
        let is_oauth = vc.spec.type_.is_oauth();
        StatusView {
            namespace: vc.metadata.namespace.clone().unwrap_or_default(),
            type_: vc.spec.type_.as_str().to_string(),
            display_name: vc.spec.display_name.clone(),
            phase: status.phase.map(phase_name),
            ready: ready.map(|c| c.status == "True"),
            reason: ready.map(|c| c.reason.clone()),
            message: ready.map(|c| c.message.clone()),
            since: ready.map(|c| c.last_transition_time.0.to_string()),
            generation: vc.metadata.generation,
            observed_generation: status.observed_generation,
            suspended: vc.spec.suspend,
            target_secret: vc.target_name(),
            secret_name: status.secret_name.clone(),
            credentials_secret: vc.spec.credentials_ref.as_ref().map(|r| r.name.clone()),
            state_secret: is_oauth.then(|| {
                status
                    .state_secret_name
                    .clone()
                    .unwrap_or_else(|| crate::names::state_secret_name(&name))
            }),
            missing_keys: status.missing_keys.clone(),
            expires_at: status.expires_at.clone(),
            next_refresh_time: status.next_refresh_time.clone(),
            last_refresh_time: status.last_refresh_time.clone(),
            failed_refresh_attempts: status.failed_refresh_attempts.unwrap_or(0),
            last_failure_reason: status.last_failure_reason.clone(),
            events: events.map(recent_events),
            name,
        }
    }

    /// The status describes an older spec than the current one.
    pub fn stale(&self) -> bool {
        self.generation.is_some() && self.observed_generation != self.generation
    }

    /// One block, like `kubectl describe` but with what it does not say.
    pub fn block(&self, now: jiff::Timestamp) -> String {
        let mut rows: Vec<(&str, String)> = Vec::new();
        rows.push(("Name", format!("{}/{}", self.namespace, self.name)));
        rows.push((
            "Type",
            match &self.display_name {
                Some(d) => format!("{} ({d})", self.type_),
                None => self.type_.clone(),
            },
        ));
        rows.push((
            "Phase",
            self.phase.clone().unwrap_or_else(|| {
                "(none yet: the operator has not processed it; is it running?)".into()
            }),
        ));
        if let (Some(ready), Some(reason)) = (self.ready, &self.reason) {
            let mut s = format!("{}, {reason}", if ready { "True" } else { "False" });
            if let Some(since) = &self.since {
                s.push_str(&format!(", since {}", when(since, now)));
            }
            rows.push(("Ready", s));
        }
        if let Some(m) = self.message.as_ref().filter(|m| !m.is_empty()) {
            rows.push(("Message", m.clone()));
        }
        if self.stale() {
            rows.push((
                "Note",
                format!(
                    "the status is for generation {} of the spec, the current one is {}: the operator has not caught up yet",
                    self.observed_generation.unwrap_or(0),
                    self.generation.unwrap_or(0)
                ),
            ));
        }
        if self.suspended {
            rows.push((
                "Suspended",
                "yes (spec.suspend): nothing is written or refreshed".into(),
            ));
        }
        rows.push((
            "Secret",
            match &self.secret_name {
                Some(s) if *s == self.target_secret => s.clone(),
                Some(s) => format!("{s} (moving to {})", self.target_secret),
                None => format!("{} (not written yet)", self.target_secret),
            },
        ));
        rows.push((
            "Credentials",
            self.credentials_secret
                .clone()
                .unwrap_or_else(|| "(no spec.credentialsRef)".into()),
        ));
        if !self.missing_keys.is_empty() {
            rows.push(("Missing keys", self.missing_keys.join(", ")));
        }
        if let Some(s) = &self.state_secret {
            rows.push(("State Secret", s.clone()));
        }
        for (label, value) in [
            ("Token expires", &self.expires_at),
            ("Next refresh", &self.next_refresh_time),
            ("Last refresh", &self.last_refresh_time),
        ] {
            if let Some(v) = value {
                rows.push((label, when(v, now)));
            }
        }
        if self.failed_refresh_attempts > 0 || self.last_failure_reason.is_some() {
            let mut s = self.failed_refresh_attempts.to_string();
            if let Some(r) = &self.last_failure_reason {
                s.push_str(&format!(" (last failure: {r})"));
            }
            rows.push(("Failed attempts", s));
        }
        let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
        let mut out = String::new();
        for (label, value) in rows {
            out.push_str(&format!("{:width$} {value}\n", format!("{label}:")));
        }
        if let Some(events) = &self.events {
            out.push_str("Events:\n");
            if events.is_empty() {
                out.push_str("  (none)\n");
            }
            for e in events {
                let age = e
                    .time
                    .as_deref()
                    .map(|t| relative(t, now).unwrap_or_else(|| t.to_string()))
                    .unwrap_or_default();
                let count = if e.count > 1 {
                    format!(" (x{})", e.count)
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "  {age:<9} {:<7} {}{count}: {}\n",
                    e.type_, e.reason, e.message
                ));
            }
        }
        out
    }
}

fn phase_name(p: Phase) -> String {
    match p {
        Phase::Pending => "Pending",
        Phase::Ready => "Ready",
        Phase::Failed => "Failed",
        Phase::Suspended => "Suspended",
    }
    .to_string()
}

/// When an Event last happened: a series' last observation, else its time, else the older
/// core fields.
fn event_time(e: &Event) -> Option<jiff::Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or(e.event_time.as_ref().map(|t| t.0))
        .or(e.last_timestamp.as_ref().map(|t| t.0))
        .or(e.first_timestamp.as_ref().map(|t| t.0))
        .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

fn recent_events(events: &[Event]) -> Vec<EventView> {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| event_time(e));
    let skip = sorted.len().saturating_sub(EVENTS_SHOWN);
    sorted
        .into_iter()
        .skip(skip)
        .map(|e| EventView {
            time: event_time(e).map(|t| t.to_string()),
            type_: e.type_.clone().unwrap_or_default(),
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            count: e
                .series
                .as_ref()
                .and_then(|s| s.count)
                .or(e.count)
                .unwrap_or(1),
        })
        .collect()
}

/// `2026-01-01T10:00:00Z (in 41m)`.
fn when(ts: &str, now: jiff::Timestamp) -> String {
    match relative(ts, now) {
        Some(r) => format!("{ts} ({r})"),
        None => ts.to_string(),
    }
}

/// `in 41m`, `5m ago`, `now`.
pub fn relative(ts: &str, now: jiff::Timestamp) -> Option<String> {
    let t: jiff::Timestamp = ts.parse().ok()?;
    let secs = t.as_second() - now.as_second();
    let d = short_duration(secs.unsigned_abs());
    Some(match secs {
        0 => "now".to_string(),
        s if s > 0 => format!("in {d}"),
        _ => format!("{d} ago"),
    })
}

/// `45s`, `41m`, `2h5m`, `3d4h`: two units at most, as kubectl's ages.
pub fn short_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 || m >= 10 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}

/// How long until the second after `ts` (whole seconds) has begun, if it has not yet.
pub fn until_next_second(ts: &str, now: jiff::Timestamp) -> Option<std::time::Duration> {
    let t: jiff::Timestamp = ts.parse().ok()?;
    let next = t.checked_add(jiff::SignedDuration::from_secs(1)).ok()?;
    let left = now.duration_until(next);
    (left.is_positive()).then(|| left.unsigned_abs())
}

/// Many connections, one line each.
pub fn table(views: &[StatusView], with_namespace: bool, now: jiff::Timestamp) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec![];
    if with_namespace {
        header.push("NAMESPACE");
    }
    header.extend([
        "NAME",
        "TYPE",
        "PHASE",
        "READY",
        "REASON",
        "SECRET",
        "EXPIRES",
        "NEXT REFRESH",
        "MESSAGE",
    ]);
    rows.push(header.iter().map(|h| h.to_string()).collect());
    for v in views {
        let mut row = Vec::new();
        if with_namespace {
            row.push(v.namespace.clone());
        }
        let opt_rel = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| relative(t, now))
                .unwrap_or_else(|| "-".into())
        };
        row.extend([
            v.name.clone(),
            v.type_.clone(),
            v.phase.clone().unwrap_or_else(|| "-".into()),
            match v.ready {
                Some(true) => "True".into(),
                Some(false) => "False".into(),
                None => "-".into(),
            },
            v.reason.clone().unwrap_or_else(|| "-".into()),
            v.target_secret.clone(),
            opt_rel(&v.expires_at),
            opt_rel(&v.next_refresh_time),
            truncate(v.message.as_deref().unwrap_or(""), 80),
        ]);
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c + 1 == columns {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

/// What `refresh --wait` compares against: the connection as it was before the request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Baseline {
    pub last_refresh_time: Option<String>,
    pub failed_refresh_attempts: u32,
    pub last_failure_reason: Option<String>,
    pub reason: Option<String>,
}

impl Baseline {
    pub fn of(vc: &VaultConnection) -> Baseline {
        let v = StatusView::new(vc, None);
        Baseline {
            last_refresh_time: v.last_refresh_time,
            failed_refresh_attempts: v.failed_refresh_attempts,
            last_failure_reason: v.last_failure_reason,
            reason: v.reason,
        }
    }
}

/// Where a requested refresh stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Nothing new yet.
    Waiting,
    /// A new token was issued and published.
    Refreshed {
        expires_at: Option<String>,
        next_refresh: Option<String>,
    },
    /// The attempt failed transiently; the operator retries with backoff and the current
    /// token is still valid.
    Retrying {
        reason: String,
        message: String,
        attempts: u32,
    },
    /// The attempt failed and the connection is not Ready.
    Failed { reason: String, message: String },
}

/// How `vc` compares with `before` after a refresh was requested.
pub fn refresh_progress(before: &Baseline, vc: &VaultConnection) -> Progress {
    let v = StatusView::new(vc, None);
    let reason = v.reason.clone().unwrap_or_default();
    let message = v.message.clone().unwrap_or_default();
    let phase = vc.status.as_ref().and_then(|s| s.phase);
    if v.stale() {
        return Progress::Waiting;
    }
    if v.last_refresh_time.is_some()
        && v.last_refresh_time != before.last_refresh_time
        && phase == Some(Phase::Ready)
    {
        return Progress::Refreshed {
            expires_at: v.expires_at,
            next_refresh: v.next_refresh_time,
        };
    }
    let new_failure = v.failed_refresh_attempts > before.failed_refresh_attempts
        || (v.last_failure_reason.is_some() && v.last_failure_reason != before.last_failure_reason);
    let reason_changed = v.reason != before.reason;
    match phase {
        Some(Phase::Ready) if new_failure && reason == Reason::RefreshRetrying.as_str() => {
            Progress::Retrying {
                reason: v.last_failure_reason.unwrap_or(reason),
                message,
                attempts: v.failed_refresh_attempts,
            }
        }
        Some(Phase::Failed | Phase::Suspended) if new_failure || reason_changed => {
            Progress::Failed { reason, message }
        }
        _ => Progress::Waiting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vc(status: serde_json::Value) -> VaultConnection {
        serde_json::from_value(json!({
            "apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection",
            "metadata": {"name": "billing", "namespace": "pay", "generation": 2},
            "spec": {"type": "oauth2", "displayName": "Billing", "credentialsRef": {"name": "creds"},
                     "oauth2": {"tokenUrl": "https://idp.example/token"}},
            "status": status
        }))
        .unwrap()
    }

    fn ready_status(last: &str, expires: &str) -> serde_json::Value {
        json!({
            "phase": "Ready", "observedGeneration": 2, "secretName": "billing",
            "stateSecretName": "billing-vaultconn-state",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled", "message": "Token valid",
                            "lastTransitionTime": "2026-01-01T09:00:00Z", "observedGeneration": 2}],
            "expiresAt": expires, "nextRefreshTime": "2026-01-01T10:40:00Z", "lastRefreshTime": last
        })
    }

    fn now() -> jiff::Timestamp {
        "2026-01-01T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn block_shows_names_reasons_and_times_never_values() {
        let v = StatusView::new(
            &vc(ready_status("2026-01-01T09:55:00Z", "2026-01-01T11:00:00Z")),
            Some(&[]),
        );
        let text = v.block(now());
        for want in [
            "Name:          pay/billing",
            "Type:          oauth2 (Billing)",
            "Ready:         True, Reconciled, since 2026-01-01T09:00:00Z (1h ago)",
            "Secret:        billing\n",
            "State Secret:  billing-vaultconn-state",
            "Token expires: 2026-01-01T11:00:00Z (in 1h)",
            "Next refresh:  2026-01-01T10:40:00Z (in 40m)",
            "Last refresh:  2026-01-01T09:55:00Z (5m ago)",
            "Events:\n  (none)",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("Note:"));
    }

    #[test]
    fn a_stale_or_unprocessed_status_says_so() {
        let mut s = ready_status("2026-01-01T09:55:00Z", "2026-01-01T11:00:00Z");
        s["observedGeneration"] = json!(1);
        let text = StatusView::new(&vc(s), None).block(now());
        assert!(text.contains("the operator has not caught up"), "{text}");
        let text = StatusView::new(&vc(json!(null)), None).block(now());
        assert!(text.contains("Phase:"), "{text}");
        assert!(text.contains("is it running?"), "{text}");
        assert!(text.contains("billing (not written yet)"), "{text}");
    }

    #[test]
    fn table_aligns_and_uses_relative_times() {
        let a = StatusView::new(
            &vc(ready_status("2026-01-01T09:55:00Z", "2026-01-01T11:00:00Z")),
            None,
        );
        let mut b = a.clone();
        b.name = "x".into();
        b.expires_at = None;
        let text = table(&[a, b], true, now());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   NAME      TYPE"), "{text}");
        assert!(lines[1].contains("in 1h"), "{text}");
        assert!(lines[2].contains(" -   "), "{text}");
    }

    #[test]
    fn a_refresh_request_waits_out_the_second_of_the_last_refresh() {
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        assert_eq!(
            until_next_second("2026-01-01T10:00:00Z", at("2026-01-01T10:00:00.25Z")),
            Some(std::time::Duration::from_millis(750))
        );
        assert_eq!(
            until_next_second("2026-01-01T10:00:00Z", at("2026-01-01T10:00:01Z")),
            None
        );
        assert_eq!(until_next_second("x", now()), None);
    }

    #[test]
    fn durations() {
        for (s, want) in [
            (5, "5s"),
            (61, "1m1s"),
            (600, "10m"),
            (3600, "1h"),
            (3720, "1h2m"),
            (90000, "1d1h"),
            (86400, "1d"),
        ] {
            assert_eq!(short_duration(s), want);
        }
        assert_eq!(relative("2026-01-01T10:00:00Z", now()).unwrap(), "now");
        assert!(relative("garbage", now()).is_none());
    }

    #[test]
    fn refresh_progress_reads_the_status() {
        let before_vc = vc(ready_status("2026-01-01T09:00:00Z", "2026-01-01T10:30:00Z"));
        let before = Baseline::of(&before_vc);
        assert_eq!(refresh_progress(&before, &before_vc), Progress::Waiting);
        let done = vc(ready_status("2026-01-01T10:00:01Z", "2026-01-01T11:00:01Z"));
        assert_eq!(
            refresh_progress(&before, &done),
            Progress::Refreshed {
                expires_at: Some("2026-01-01T11:00:01Z".into()),
                next_refresh: Some("2026-01-01T10:40:00Z".into())
            }
        );
        let mut retrying = ready_status("2026-01-01T09:00:00Z", "2026-01-01T10:30:00Z");
        retrying["conditions"][0]["reason"] = json!("RefreshRetrying");
        retrying["failedRefreshAttempts"] = json!(1);
        retrying["lastFailureReason"] = json!("TokenEndpointUnavailable");
        assert!(matches!(
            refresh_progress(&before, &vc(retrying)),
            Progress::Retrying { attempts: 1, .. }
        ));
        let mut failed = ready_status("2026-01-01T09:00:00Z", "2026-01-01T10:30:00Z");
        failed["phase"] = json!("Failed");
        failed["conditions"][0]["status"] = json!("False");
        failed["conditions"][0]["reason"] = json!("InvalidClient");
        failed["conditions"][0]["message"] = json!("rejected");
        assert_eq!(
            refresh_progress(&before, &vc(failed.clone())),
            Progress::Failed {
                reason: "InvalidClient".into(),
                message: "rejected".into()
            }
        );
        // A status not yet caught up with the spec says nothing about this request.
        failed["observedGeneration"] = json!(1);
        assert_eq!(refresh_progress(&before, &vc(failed)), Progress::Waiting);
    }
}
