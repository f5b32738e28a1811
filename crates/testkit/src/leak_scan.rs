//! The secret-leak scan: every secret value a test binary used must never show up in what the
//! operator showed or logged.
//!
//! - **Values** are registered as they come into being: the credentials Secrets tests write
//!   (`put_secret` in `tests/support`), every token the fault-injecting token server mints or
//!   issues and every client secret it knows ([`crate::token_server`]), the oidc-provider
//!   driver's client secrets and minted refresh tokens ([`crate::oidc`]), and, when the scan runs,
//!   every secret key of every Secret in the cluster ([`SECRET_KEYS`], plus the credential part
//!   of `authorization`) and the admin token.
//! - **Texts** are everything the operator showed or logged: the log file of every operator
//!   process the binary started ([`crate::operator::OperatorProcess`] registers each one), its
//!   `/metrics` text (scraped at exit while it runs, else the last scrape the test kit made,
//!   always at least the start-up one), and from the cluster all Events, the VaultConnections'
//!   status and annotations, and the metadata of the Secrets the operator manages.
//! - **One scan per test binary**: the first operator process arms a process-exit hook that
//!   scans once after the last test, and exits with status 1 (failing `cargo test`) on any
//!   finding. [`assert_no_leaks`] runs the same scan on demand.
//!
//! A finding is a secret value (raw, trimmed, JSON- or Debug-escaped, form-encoded or base64) in
//! any text, a log that cannot be read or is empty (an operator always logs at start-up, so an
//! empty capture means the capture is broken and the scan would prove nothing), an operator
//! whose metrics were never scraped, a cluster that cannot be listed, or a panic in an
//! operator's log. Findings name the value by its fingerprint and show the context with the
//! value redacted: the report itself leaks nothing.
//!
//! Values shorter than [`MIN_SECRET_LEN`] are not scanned for (`"t1"` would match anywhere); the
//! summary counts them.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

use aho_corasick::AhoCorasick;
use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};

use crate::provider_invariants::fingerprint;

/// Shortest value scanned for.
pub const MIN_SECRET_LEN: usize = 8;

/// Keys of a Secret whose values are secret (the inputs and outputs of every connection type
/// that are credentials; `username`, `client_id`, `account_sid`, `publishable_key`, `base_url`
/// and `expires_at` are not). `authorization` is handled apart: its credential part is secret.
pub const SECRET_KEYS: &[&str] = &[
    "api_key",
    "token",
    "password",
    "auth_token",
    "secret_key",
    "client_secret",
    "refresh_token",
    "access_token",
];

/// The label the operator puts on every Secret it manages (`src/names.rs`).
const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=vaultconn";
/// Bound of the exit scan (it lists the whole cluster once).
const EXIT_SCAN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Registry {
    /// value → where it came from (first registration), for messages.
    secrets: BTreeMap<String, String>,
    /// Distinct values too short to scan for.
    short: BTreeSet<String>,
    operators: Vec<Watched>,
    exit_hook: bool,
}

struct Watched {
    log_path: PathBuf,
    metrics_port: u16,
    /// The last `/metrics` text the test kit scraped from this operator.
    metrics: Option<String>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    secrets: BTreeMap::new(),
    short: BTreeSet::new(),
    operators: Vec::new(),
    exit_hook: false,
});
static ARM_EXIT_HOOK: Once = Once::new();

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Register a secret value the tests used; `origin` says where it came from (for messages).
pub fn register_secret(value: &str, origin: impl fmt::Display) {
    let mut r = registry();
    if value.trim().len() < MIN_SECRET_LEN {
        if !value.is_empty() {
            r.short.insert(value.to_owned());
        }
        return;
    }
    if !r.secrets.contains_key(value) {
        r.secrets.insert(value.to_owned(), origin.to_string());
    }
}

/// Register the secret values of a Secret's data: the [`SECRET_KEYS`] and the credential part
/// of `authorization` (`Bearer <token>`, `Basic <base64>`).
pub fn register_secret_data<'a>(origin: &str, data: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
    for (key, value) in data {
        let value = String::from_utf8_lossy(value);
        if SECRET_KEYS.contains(&key) {
            register_secret(&value, format_args!("{origin} key {key}"));
        } else if key == "authorization" {
            let credential = value.split_once(' ').map_or(&*value, |(_, c)| c);
            register_secret(credential, format_args!("{origin} key authorization"));
        }
    }
}

/// How many values are registered (and how many were too short to scan for).
pub fn registered() -> (usize, usize) {
    let r = registry();
    (r.secrets.len(), r.short.len())
}

/// Called by [`crate::operator::OperatorProcess::start`]: scan this operator's log and metrics,
/// and arm the exit scan. Returns the id for [`record_metrics`].
pub fn watch_operator(log_path: &Path, metrics_port: u16) -> usize {
    let id = {
        let mut r = registry();
        r.operators.push(Watched {
            log_path: log_path.to_path_buf(),
            metrics_port,
            metrics: None,
        });
        r.exit_hook = true;
        r.operators.len() - 1
    };
    ARM_EXIT_HOOK.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn()` with the C runtime.
        let armed = unsafe { libc::atexit(exit_scan) } == 0;
        if !armed {
            eprintln!("leak scan: could not register the exit hook; the binary will fail");
            registry().exit_hook = false;
        }
    });
    id
}

/// Keep `text` as the last `/metrics` scrape of operator `id`.
pub fn record_metrics(id: usize, text: &str) {
    if let Some(w) = registry().operators.get_mut(id) {
        w.metrics = Some(text.to_owned());
    }
}

/// `GET /metrics` over a plain blocking socket. For callers that are synchronous but may run
/// inside a tokio runtime (`OperatorProcess::stop`), where reqwest's blocking client panics;
/// the operator's endpoint speaks HTTP/1.0, so a hand-rolled request is enough.
pub fn scrape_blocking(port: u16) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    (status.starts_with("HTTP/1.") && status.split(' ').nth(1) == Some("200"))
        .then(|| body.to_owned())
}

// ---------------------------------------------------------------------------------------------
// The scan (pure)
// ---------------------------------------------------------------------------------------------

/// One text to scan. `text: Err(why)` is a text that could not be captured: a finding.
#[derive(Clone, Debug)]
pub struct Text {
    pub source: String,
    pub text: Result<String, String>,
    /// An empty capture is a finding (logs, metrics); an empty Event list is not.
    pub must_be_non_empty: bool,
}

impl Text {
    pub fn required(source: impl Into<String>, text: Result<String, String>) -> Self {
        Text {
            source: source.into(),
            text,
            must_be_non_empty: true,
        }
    }

    pub fn optional(source: impl Into<String>, text: String) -> Self {
        Text {
            source: source.into(),
            text: Ok(text),
            must_be_non_empty: false,
        }
    }
}

/// What the scan found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// A secret value (by fingerprint) in a text; `context` has the value redacted.
    Leak {
        source: String,
        fingerprint: String,
        origin: String,
        context: String,
    },
    /// A text that could not be captured or was empty: the scan cannot vouch for it.
    Uncaptured { source: String, why: String },
    /// A Rust panic in an operator's log.
    Panic { source: String, context: String },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Leak {
                source,
                fingerprint,
                origin,
                context,
            } => write!(
                f,
                "LEAK: secret {fingerprint} ({origin}) in {source}: …{context}…"
            ),
            Finding::Uncaptured { source, why } => {
                write!(f, "NOT SCANNED: {source}: {why}")
            }
            Finding::Panic { source, context } => write!(f, "PANIC in {source}: {context}"),
        }
    }
}

/// What one scan covered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub values: usize,
    pub short_values: usize,
    pub texts: usize,
    pub bytes: usize,
    /// Distinct operator log files (restarts append to the same one).
    pub operators: usize,
    pub findings: Vec<Finding>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} secret values ({} shorter than {MIN_SECRET_LEN} not scanned for) in {} texts \
             ({} bytes, {} operator logs): {} findings",
            self.values,
            self.short_values,
            self.texts,
            self.bytes,
            self.operators,
            self.findings.len()
        )
    }
}

/// The spellings a value can take in a text: raw, trimmed, JSON- and Debug-escaped,
/// form-encoded, base64. Only those of at least [`MIN_SECRET_LEN`] characters.
pub fn spellings(value: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let json = serde_json::to_string(value).unwrap_or_default();
    let debug = format!("{value:?}");
    for s in [
        value.to_owned(),
        value.trim().to_owned(),
        json.trim_matches('"').to_owned(),
        debug.trim_matches('"').to_owned(),
        url::form_urlencoded::byte_serialize(value.as_bytes()).collect(),
        base64::engine::general_purpose::STANDARD.encode(value),
    ] {
        if s.len() >= MIN_SECRET_LEN {
            out.insert(s);
        }
    }
    out
}

/// Scan `texts` for every value of `secrets` (value → origin). Pure: the unit of the check.
pub fn scan(secrets: &BTreeMap<String, String>, texts: &[Text]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut needles: Vec<String> = Vec::new();
    let mut owner: Vec<&str> = Vec::new();
    for value in secrets.keys() {
        for s in spellings(value) {
            needles.push(s);
            owner.push(value);
        }
    }
    let matcher = match AhoCorasick::new(&needles) {
        Ok(m) => Some(m),
        Err(e) => {
            findings.push(Finding::Uncaptured {
                source: "the secret values".into(),
                why: format!("cannot build the matcher: {e}"),
            });
            None
        }
    };
    for t in texts {
        let text = match &t.text {
            Err(why) => {
                findings.push(Finding::Uncaptured {
                    source: t.source.clone(),
                    why: why.clone(),
                });
                continue;
            }
            Ok(text) if text.is_empty() && t.must_be_non_empty => {
                findings.push(Finding::Uncaptured {
                    source: t.source.clone(),
                    why: "empty: the capture is broken, so it proves nothing".into(),
                });
                continue;
            }
            Ok(text) => text,
        };
        let Some(matcher) = &matcher else { continue };
        let mut seen = BTreeSet::new();
        for m in matcher.find_iter(text) {
            let value = owner[m.pattern().as_usize()];
            if !seen.insert(value) {
                continue;
            }
            findings.push(Finding::Leak {
                source: t.source.clone(),
                fingerprint: fingerprint(value),
                origin: secrets.get(value).cloned().unwrap_or_default(),
                context: redacted_context(matcher, text, m.start(), m.end()),
            });
        }
    }
    findings
}

/// Up to 60 bytes either side of `start..end`, with every secret in it (or cut by its edges)
/// replaced.
fn redacted_context(matcher: &AhoCorasick, text: &str, start: usize, end: usize) -> String {
    let floor = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let ceil = |mut i: usize| {
        i = i.min(text.len());
        while !text.is_char_boundary(i) {
            i += 1;
        }
        i
    };
    let (from, to) = (floor(start.saturating_sub(60)), ceil(end + 60));
    // Matches are searched in a wider span, so a secret cut by the window's edge is found too.
    let (wide_from, wide_to) = (floor(from.saturating_sub(8192)), ceil(to + 8192));
    let mut out = String::new();
    let mut at = from;
    for m in matcher.find_iter(&text[wide_from..wide_to]) {
        let (ms, me) = (wide_from + m.start(), wide_from + m.end());
        if me <= at || ms >= to {
            continue;
        }
        out.push_str(&text[at..ms.max(at)]);
        out.push_str("«REDACTED»");
        at = me.min(to);
    }
    out.push_str(&text[at..to]);
    out.replace('\n', "⏎")
}

/// Panics in an operator log (`thread '…' panicked at …`).
pub fn panics(source: &str, log: &str) -> Vec<Finding> {
    log.lines()
        .filter(|l| l.contains("panicked at"))
        .map(|l| Finding::Panic {
            source: source.to_owned(),
            context: l.chars().take(300).collect(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Capture (I/O)
// ---------------------------------------------------------------------------------------------

/// Read an operator log: unreadable and empty are both findings (see [`Text::required`]).
pub fn read_log(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))
}

/// Everything the cluster shows: Events, VaultConnections' status and annotations, the managed
/// Secrets' metadata. Registers the secret values of every Secret on the way.
async fn cluster_texts(client: kube::Client) -> Vec<Text> {
    let mut texts = Vec::new();
    let lp = ListParams::default();
    match Api::<Secret>::all(client.clone()).list(&lp).await {
        Ok(list) => {
            let mut managed = String::new();
            for s in &list.items {
                let origin = format!(
                    "Secret {}/{}",
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default()
                );
                if let Some(data) = &s.data {
                    register_secret_data(
                        &origin,
                        data.iter().map(|(k, v)| (k.as_str(), v.0.as_slice())),
                    );
                }
            }
            match Api::<Secret>::all(client.clone())
                .list_metadata(&ListParams::default().labels(MANAGED_SELECTOR))
                .await
            {
                Ok(meta) => {
                    for m in meta.items {
                        let _ = writeln!(
                            managed,
                            "{}/{} labels={} annotations={}",
                            m.metadata.namespace.unwrap_or_default(),
                            m.metadata.name.unwrap_or_default(),
                            serde_json::to_string(&m.metadata.labels).unwrap_or_default(),
                            serde_json::to_string(&m.metadata.annotations).unwrap_or_default(),
                        );
                    }
                    texts.push(Text::optional(
                        "the managed Secrets' labels and annotations",
                        managed,
                    ));
                }
                Err(e) => texts.push(Text::required(
                    "the managed Secrets' labels and annotations",
                    Err(format!("cannot list: {e}")),
                )),
            }
        }
        Err(e) => texts.push(Text::required(
            "the cluster's Secrets",
            Err(format!("cannot list: {e}")),
        )),
    }
    match Api::<Event>::all(client.clone()).list(&lp).await {
        Ok(list) => {
            let mut all = String::new();
            for ev in list.items {
                let _ = writeln!(all, "{}", serde_json::to_string(&ev).unwrap_or_default());
            }
            texts.push(Text::optional("the cluster's Events", all));
        }
        Err(e) => texts.push(Text::required(
            "the cluster's Events",
            Err(format!("cannot list: {e}")),
        )),
    }
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("vaultconn.dev", "v1alpha1", "VaultConnection"),
        "vaultconnections",
    );
    match Api::<DynamicObject>::all_with(client, &ar).list(&lp).await {
        Ok(list) => {
            let mut all = String::new();
            for vc in list.items {
                let _ = writeln!(
                    all,
                    "{}/{} status={} annotations={}",
                    vc.metadata.namespace.unwrap_or_default(),
                    vc.metadata.name.unwrap_or_default(),
                    vc.data
                        .get("status")
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    serde_json::to_string(&vc.metadata.annotations).unwrap_or_default(),
                );
            }
            texts.push(Text::optional(
                "the VaultConnections' status and annotations",
                all,
            ));
        }
        // No CRD installed in this cluster: there is no status to scan.
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => texts.push(Text::required(
            "the VaultConnections",
            Err(format!("cannot list: {e}")),
        )),
    }
    texts
}

/// The whole scan: every watched operator's log and metrics, and the shared cluster if this
/// binary started it.
pub async fn run_scan() -> Summary {
    let mut texts = Vec::new();
    if let Some(cp) = crate::shared::cluster_if_started() {
        register_secret(cp.admin_token(), "the control plane's admin token");
        match cp.try_client().await {
            Ok(client) => texts.extend(cluster_texts(client).await),
            Err(e) => texts.push(Text::required(
                "the cluster",
                Err(format!("no client: {e}")),
            )),
        }
    }
    let operators: Vec<(PathBuf, u16, Option<String>)> = registry()
        .operators
        .iter()
        .map(|w| (w.log_path.clone(), w.metrics_port, w.metrics.clone()))
        .collect();
    let mut findings = Vec::new();
    for (log_path, port, last) in &operators {
        let log = read_log(log_path);
        let source = format!("operator log {}", log_path.display());
        if let Ok(l) = &log {
            findings.extend(panics(&source, l));
        }
        let logged = log.as_ref().is_ok_and(|l| !l.is_empty());
        texts.push(Text::required(source, log));
        let metrics = crate::operator::fetch_metrics(&format!("http://127.0.0.1:{port}/metrics"))
            .await
            .or_else(|| last.clone())
            .ok_or_else(|| "never scraped".to_string());
        let source = format!("operator metrics 127.0.0.1:{port}");
        // An operator that exits during start-up (the RBAC tests take rights away on purpose)
        // never serves metrics; its log, which the scan requires, is then the whole record.
        texts.push(match metrics {
            Ok(m) => Text::required(source, Ok(m)),
            Err(_) if logged => Text::optional(source, String::new()),
            Err(e) => Text::required(source, Err(e)),
        });
    }
    let (secrets, short) = {
        let r = registry();
        (r.secrets.clone(), r.short.len())
    };
    findings.extend(scan(&secrets, &texts));
    // Several operators may share a log file (restarts append): count each file once.
    let distinct_logs: BTreeSet<&PathBuf> = operators.iter().map(|(p, _, _)| p).collect();
    Summary {
        values: secrets.len(),
        short_values: short,
        texts: texts.len(),
        bytes: texts
            .iter()
            .map(|t| t.text.as_ref().map_or(0, String::len))
            .sum(),
        operators: distinct_logs.len(),
        findings,
    }
}

/// Run the scan now and panic on any finding (for a test that wants it at a chosen point).
pub async fn assert_no_leaks() -> Summary {
    let summary = run_scan().await;
    assert!(summary.findings.is_empty(), "{}", report(&summary));
    summary
}

fn report(summary: &Summary) -> String {
    let mut out = format!("secret-leak scan FAILED: {summary}\n");
    for f in &summary.findings {
        let _ = writeln!(out, "  {f}");
    }
    out
}

/// The test binary's name without cargo's hash suffix (`oauth_crash-0123abcd` → `oauth_crash`).
pub fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_stem)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => stem,
    }
}

extern "C" fn exit_scan() {
    if !registry().exit_hook {
        return;
    }
    // The main thread's thread-locals (tokio's among them) are gone by the time atexit
    // handlers run: the scan gets a thread and a runtime of its own.
    let outcome = std::thread::spawn(|| {
        let started = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("no runtime: {e}"))?;
        let summary = rt
            .block_on(async { tokio::time::timeout(EXIT_SCAN_TIMEOUT, run_scan()).await })
            .map_err(|_| format!("did not finish in {EXIT_SCAN_TIMEOUT:?}"))?;
        Ok::<_, String>((summary, started.elapsed()))
    })
    .join();
    let name = binary_name();
    match outcome {
        Ok(Ok((summary, took))) => {
            let recorded = crate::reliability::record_scan(&name, &summary);
            if let Err(e) = &recorded {
                eprintln!("secret-leak scan of {name}: cannot record the result: {e}");
            }
            if summary.findings.is_empty() && recorded.is_ok() {
                eprintln!("secret-leak scan of {name}: {summary} ({took:.1?})");
                return;
            }
            eprintln!("{name}: {}", report(&summary));
        }
        Ok(Err(why)) => eprintln!("secret-leak scan of {name} FAILED: {why}"),
        Err(_) => eprintln!("secret-leak scan of {name} FAILED: the scan panicked"),
    }
    // SAFETY: ends the process without running the remaining exit handlers again.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(values: &[&str]) -> BTreeMap<String, String> {
        values
            .iter()
            .map(|v| (v.to_string(), "test".to_string()))
            .collect()
    }

    #[test]
    fn finds_every_spelling_and_redacts_it() {
        let s = secrets(&["s3cr:et+%&\"x", "plain-SECRET-1"]);
        for text in [
            "client_secret=s3cr%3Aet%2B%25%26%22x&grant_type=client_credentials",
            r#"{"msg":"body","secret":"s3cr:et+%&\"x"}"#,
            "refresh failed: Some(\"plain-SECRET-1\")",
            "data: cGxhaW4tU0VDUkVULTE=",
        ] {
            let f = scan(&s, &[Text::required("log", Ok(text.into()))]);
            assert_eq!(f.len(), 1, "{text}: {f:?}");
            let shown = f[0].to_string();
            assert!(shown.contains("«REDACTED»"), "{shown}");
            assert!(
                !shown.contains("s3cr") && !shown.contains("plain-SECRET"),
                "{shown}"
            );
        }
        assert!(scan(&s, &[Text::required("log", Ok("nothing here".into()))]).is_empty());
    }

    #[test]
    fn an_unreadable_or_empty_capture_is_a_finding() {
        let s = secrets(&["plain-SECRET-1"]);
        let f = scan(
            &s,
            &[
                Text::required("log a", Err("cannot read: No such file".into())),
                Text::required("log b", Ok(String::new())),
                Text::optional("events", String::new()),
            ],
        );
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f
            .iter()
            .all(|f| matches!(f, Finding::Uncaptured { source, .. } if source.starts_with("log"))));
    }

    #[test]
    fn short_values_are_counted_not_scanned() {
        register_secret("t1", "unit test");
        register_secret("unit-test-SECRET", "unit test");
        let r = registry();
        assert!(r.short.contains("t1"));
        assert!(!r.secrets.contains_key("t1"));
        assert!(r.secrets.contains_key("unit-test-SECRET"));
    }

    #[test]
    fn authorization_values_register_their_credential() {
        register_secret_data(
            "Secret a/b",
            [
                ("authorization", &b"Bearer bearer-unit-SECRET"[..]),
                ("username", b"not-a-secret-name"),
            ],
        );
        let r = registry();
        assert!(r.secrets.contains_key("bearer-unit-SECRET"));
        assert!(!r.secrets.contains_key("not-a-secret-name"));
    }

    #[test]
    fn panics_are_found() {
        let log = "INFO start\nthread 'tokio-runtime-worker' panicked at src/x.rs:1:2:\nboom\n";
        assert_eq!(panics("log", log).len(), 1);
        assert!(panics("log", "INFO fine").is_empty());
    }
}
