//! Facts for `docs/RELIABILITY.md`, measured by the tests themselves.
//!
//! `scripts/reliability.sh` runs the reliability suites with `VAULTCONN_RELIABILITY_DIR` set;
//! each test that survived a fault class appends one [`Fact`] (what was injected, how, how many
//! times, what was lost) and every test binary's exit scan ([`crate::leak_scan`]) appends what it
//! scanned and found. `vaultconn-reliability-table` renders the table from them. Without the
//! variable nothing is written: a normal test run is unaffected.
//!
//! A fact is recorded at the end of a test, after its assertions: a failing test records
//! nothing, and the script refuses to render a table from a failed run.
use std::io::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::leak_scan::Summary;

/// The environment variable naming the results directory.
pub const DIR_ENV: &str = "VAULTCONN_RELIABILITY_DIR";
/// Facts of the tests, one JSON object a line.
pub const FACTS_FILE: &str = "facts.jsonl";
/// Exit-scan results of the test binaries, one JSON object a line.
pub const SCANS_FILE: &str = "scans.jsonl";

/// One fault or input class a test survived.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    /// Filled in by [`record`]: the test binary.
    #[serde(default)]
    pub binary: String,
    /// The fault or input class, e.g. "SIGKILL at random moments while rotating refresh tokens".
    pub fault: String,
    /// How it is injected, e.g. "kill(2) after a random 0–1.5 s pause; 3 connections, 2 s tokens".
    pub injected: String,
    /// How many times it was injected in this run (counted, not configured).
    pub times: u64,
    /// Credentials lost silently (a refresh token dead without a reported reason).
    pub credentials_lost: u64,
    /// Hot loops: request-rate bounds exceeded (the test asserts the bound, so 0 when recorded).
    pub hot_loops: u64,
    /// Anything else worth a note in the table (measured numbers).
    #[serde(default)]
    pub note: String,
}

impl Fact {
    /// A fault class a test survived, injected `times` times. Recorded after the test's
    /// assertions, which are what make "nothing lost, no hot loop" true: both start at 0.
    pub fn survived(fault: impl Into<String>, injected: impl Into<String>, times: usize) -> Self {
        Fact {
            fault: fault.into(),
            injected: injected.into(),
            times: u64::try_from(times).unwrap_or(u64::MAX),
            ..Fact::default()
        }
    }

    /// Measured numbers worth a note in the table (builder style).
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// What one test binary's exit scan covered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRecord {
    pub binary: String,
    pub values: usize,
    pub texts: usize,
    pub bytes: usize,
    pub operators: usize,
    pub leaks: usize,
    pub uncaptured: usize,
    pub panics: usize,
}

fn dir() -> Option<PathBuf> {
    std::env::var_os(DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

fn append(file: &str, line: &str) -> std::io::Result<()> {
    let Some(dir) = dir() else { return Ok(()) };
    std::fs::create_dir_all(&dir)?;
    let mut f = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join(file))?;
    // One write per line: concurrent tests and binaries append whole lines.
    f.write_all(format!("{line}\n").as_bytes())
}

/// Record `fact` (a no-op unless [`DIR_ENV`] is set). Call it after the test's assertions.
pub fn record(mut fact: Fact) {
    fact.binary = crate::leak_scan::binary_name();
    let line = serde_json::to_string(&fact).unwrap_or_default();
    if let Err(e) = append(FACTS_FILE, &line) {
        panic!("{DIR_ENV}: cannot append to {FACTS_FILE}: {e}");
    }
}

/// Record an exit scan (called by [`crate::leak_scan`] at process exit, where it must not panic).
pub fn record_scan(binary: &str, summary: &Summary) -> std::io::Result<()> {
    use crate::leak_scan::Finding;
    let count = |f: fn(&Finding) -> bool| summary.findings.iter().filter(|x| f(x)).count();
    let rec = ScanRecord {
        binary: binary.to_owned(),
        values: summary.values,
        texts: summary.texts,
        bytes: summary.bytes,
        operators: summary.operators,
        leaks: count(|f| matches!(f, Finding::Leak { .. })),
        uncaptured: count(|f| matches!(f, Finding::Uncaptured { .. })),
        panics: count(|f| matches!(f, Finding::Panic { .. })),
    };
    append(SCANS_FILE, &serde_json::to_string(&rec).unwrap_or_default())
}
