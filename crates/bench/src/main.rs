//! `vaultconn-bench`: the scale benchmark of the operator (see `BENCHMARKS.md`).
//!
//! Starts a local control plane (etcd on tmpfs), runs the release `vaultconn` binary as a
//! separate process against it and prints one Markdown table. Phases (`--only` selects some):
//!
//! 1. `cold`: with the operator stopped, create N credentials Secrets + N apiKey connections;
//!    then a baseline (a plain kube-rs client makes the minimum writes — N Secret creates + N
//!    status merge patches — for N other connections in another namespace, at the operator's
//!    concurrency, *before* the operator starts; its objects are deleted afterwards); then start
//!    the operator and time until a watch has seen all N Ready with their Secrets.
//! 2. `latency`: create new connections one at a time; create → Ready (seen by the watch).
//! 3. `quiet`: idle window, count API writes (apiserver `/metrics`); restart the operator and
//!    count the writes of its re-sync.
//! 4. `memory`: peak RSS (`VmHWM`) at N, with unrelated 10 KiB Secrets after a restart, and at
//!    `--n-small` in a fresh control plane.
//! 5. `refresh`: M oauth2 clientCredentials connections against the in-process `TokenServer`.
//! 6. `scalefault`: in a fresh control plane, `--scale-n` connections created at once with 1 %
//!    broken in each of three ways (bad credentials, unreachable token URL, invalid spec); the
//!    healthy ones must stay Ready and refreshed, the broken ones within their request bounds
//!    (see `scalefault.rs`).
//!
//! Exit status: 0 when every invariant holds (all connections converge, 0 idle writes, 0
//! restart writes, 0 expired tokens seen, at most 1 concurrent refresh per connection, the
//! scale-fault bounds), 1 when one fails (the table is still printed), 2 when the harness
//! itself fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;
use vaultconn::api::{Phase, VaultConnection};
use vaultconn::oauth::schedule::{self, RenewBefore};
use vaultconn::secret::{self as vsecret, SecretData};
use vaultconn::status::{self as vstatus, Outcome};
use vaultconn_testkit::control_plane::{ControlPlane, ControlPlaneOptions};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};
use vaultconn_testkit::token_server::{TokenServer, TokenServerConfig};

const OUTPUT_SELECTOR: &str = "vaultconn.dev/secret-role=output";
const BENCH_MANAGER: &str = "vaultconn-bench";
const WRITE_VERBS: &[&str] = &[
    "POST",
    "PUT",
    "PATCH",
    "DELETE",
    "DELETECOLLECTION",
    "APPLY",
];

/// Resources only kube-apiserver itself writes here (its bootstrap controller reconciles the
/// `default/kubernetes` Service endpoints every 10 s); the operator never touches them, so their
/// writes are listed but not counted as the operator's.
const BACKGROUND_RESOURCES: &[&str] = &["endpoints", "endpointslices", "services", "namespaces"];

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

macro_rules! log {
    ($($arg:tt)*) => {{
        let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
        eprintln!("[{t:8.1}s] {}", format!($($arg)*));
    }};
}

// After `log!`: macros are visible to the modules declared below them.
mod scalefault;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
enum PhaseName {
    Cold,
    Latency,
    Quiet,
    Memory,
    Refresh,
    Scalefault,
}

/// Scale benchmark of the vaultconn operator against a local kube-apiserver.
#[derive(Parser, Debug, Clone)]
#[command(name = "vaultconn-bench")]
struct Args {
    /// Connections for the cold-convergence, latency, quiet and memory phases.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Connections of the second, small memory run (fresh control plane).
    #[arg(long, default_value_t = 1_000)]
    n_small: usize,
    /// New connections created one at a time in the latency phase.
    #[arg(long, default_value_t = 200)]
    latency_count: usize,
    /// Length of the idle window in the quiet phase.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Unrelated Secrets created for the memory phase.
    #[arg(long, default_value_t = 10_000)]
    unrelated: usize,
    /// Size of each unrelated Secret, KiB.
    #[arg(long, default_value_t = 10)]
    unrelated_kib: usize,
    /// oauth2 clientCredentials connections in the refresh phase.
    #[arg(long, default_value_t = 1_000)]
    m: usize,
    /// Length of the measured refresh window.
    #[arg(long, default_value_t = 300)]
    refresh_secs: u64,
    /// Access-token lifetime issued by the token server.
    #[arg(long, default_value_t = 60)]
    token_ttl_secs: u64,
    /// The operator's `--concurrency`, also the baseline's concurrency.
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
    /// Concurrency of the harness's own (untimed) setup writes.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// Scale faults: connections in all (healthy apiKey + healthy oauth2 + the broken ones).
    #[arg(long, default_value_t = 10_000)]
    scale_n: usize,
    /// Scale faults: percentage of `--scale-n` broken in each of the three ways.
    #[arg(long, default_value_t = 1.0)]
    scale_broken_pct: f64,
    /// Scale faults: healthy oauth2 clientCredentials connections (tokens of `--token-ttl-secs`).
    #[arg(long, default_value_t = 500)]
    scale_oauth: usize,
    /// Scale faults: length of the measured window.
    #[arg(long, default_value_t = 240)]
    scale_window_secs: u64,
    /// Scale faults: new apiKey connections created one at a time during the window.
    #[arg(long, default_value_t = 100)]
    scale_latency_count: usize,
    /// Run only these phases (comma-separated). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<PhaseName>,
    /// CI smoke sizes (N=50, n-small=20, 10 latency, idle 10 s, 50 unrelated, M=20, 30 s
    /// refresh with a 15 s token lifetime; scale faults: 500 connections, 20 oauth2, 5 broken
    /// each way, a 45 s window, 10 new connections); flags given explicitly still win.
    #[arg(long)]
    smoke: bool,
    /// The operator binary (default: `vaultconn` next to this binary).
    #[arg(long)]
    operator_binary: Option<PathBuf>,
    /// Operator logs and the report go here.
    #[arg(long, default_value = "target/bench")]
    work_dir: PathBuf,
    /// `RUST_LOG` of the operator.
    #[arg(long, default_value = "info")]
    operator_log: String,
    /// Extra kube-apiserver flags (repeatable; replaces the default pair).
    #[arg(
        long = "apiserver-arg",
        default_values_t = [
            "--max-requests-inflight=800".to_string(),
            "--max-mutating-requests-inflight=400".to_string(),
        ]
    )]
    apiserver_args: Vec<String>,
    /// Also run kube-controller-manager (garbage collector, namespace, service accounts).
    #[arg(long)]
    controller_manager: bool,
    /// Give up on a convergence after this long.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Give up on a convergence when nothing progressed for this long.
    #[arg(long, default_value_t = 120)]
    stall_secs: u64,
    /// A re-sync is over when `vaultconn_reconciles_total` did not move for this long.
    #[arg(long, default_value_t = 5)]
    stable_secs: u64,
}

impl Args {
    fn parse_with_smoke() -> Args {
        let matches = Args::command().get_matches();
        let mut args = match Args::from_arg_matches(&matches) {
            Ok(a) => a,
            Err(e) => e.exit(),
        };
        if args.smoke {
            let default = |id: &str| matches.value_source(id) == Some(ValueSource::DefaultValue);
            if default("n") {
                args.n = 50;
            }
            if default("n_small") {
                args.n_small = 20;
            }
            if default("latency_count") {
                args.latency_count = 10;
            }
            if default("idle_secs") {
                args.idle_secs = 10;
            }
            if default("unrelated") {
                args.unrelated = 50;
            }
            if default("m") {
                args.m = 20;
            }
            if default("refresh_secs") {
                args.refresh_secs = 30;
            }
            if default("token_ttl_secs") {
                args.token_ttl_secs = 15;
            }
            if default("stall_secs") {
                args.stall_secs = 60;
            }
            if default("timeout_secs") {
                args.timeout_secs = 300;
            }
            if default("stable_secs") {
                args.stable_secs = 3;
            }
            if default("scale_n") {
                args.scale_n = 500;
            }
            if default("scale_oauth") {
                args.scale_oauth = 20;
            }
            if default("scale_window_secs") {
                args.scale_window_secs = 45;
            }
            if default("scale_latency_count") {
                args.scale_latency_count = 10;
            }
        }
        args
    }

    fn runs(&self, p: PhaseName) -> bool {
        self.only.is_empty() || self.only.contains(&p)
    }
}

// -------------------------------------------------------------------------------------------------
// Report
// -------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Met {
    Yes,
    No,
    Info,
}

struct Row {
    phase: String,
    measure: String,
    target: String,
    measured: String,
    met: Met,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    details: Vec<String>,
    /// Invariant failures: any makes the exit status 1.
    failures: Vec<String>,
}

impl Report {
    fn row(&mut self, phase: &str, measure: &str, target: &str, measured: String, met: Met) {
        self.rows.push(Row {
            phase: phase.into(),
            measure: measure.into(),
            target: target.into(),
            measured,
            met,
        });
    }

    fn info(&mut self, phase: &str, measure: &str, measured: String) {
        self.row(phase, measure, "—", measured, Met::Info);
    }

    fn check(&mut self, phase: &str, measure: &str, target: &str, measured: String, ok: bool) {
        let met = if ok { Met::Yes } else { Met::No };
        self.row(phase, measure, target, measured, met);
    }

    /// A checked row whose failure also fails the run.
    fn invariant(&mut self, phase: &str, measure: &str, target: &str, measured: String, ok: bool) {
        if !ok {
            self.failures
                .push(format!("{phase}: {measure}: {measured} (target {target})"));
        }
        self.check(phase, measure, target, measured, ok);
    }

    fn detail(&mut self, line: impl Into<String>) {
        let line = line.into();
        log!("{line}");
        self.details.push(line);
    }

    fn markdown(&self, args: &Args, machine: &str, total: Duration) -> String {
        let mut out = String::new();
        out.push_str("| Phase | Measure | Target | Measured | Met? |\n");
        out.push_str("| --- | --- | --- | --- | --- |\n");
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| r.phase.chars().next());
        for r in rows {
            let met = match r.met {
                Met::Yes => "yes",
                Met::No => "**NO**",
                Met::Info => "",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.phase, r.measure, r.target, r.measured, met
            ));
        }
        out.push('\n');
        out.push_str(&format!(
            "Sizes: N={} n-small={} latency-count={} idle={}s unrelated={}×{}KiB M={} refresh={}s \
             token-ttl={}s concurrency={}; scale faults: {} connections, {} oauth2, {} % broken \
             each way, {}s window, {} new; apiserver flags: `{}`; controller-manager: {}; harness \
             run time {:.0} s.\n\n",
            args.n,
            args.n_small,
            args.latency_count,
            args.idle_secs,
            args.unrelated,
            args.unrelated_kib,
            args.m,
            args.refresh_secs,
            args.token_ttl_secs,
            args.concurrency,
            args.scale_n,
            args.scale_oauth,
            args.scale_broken_pct,
            args.scale_window_secs,
            args.scale_latency_count,
            args.apiserver_args.join(" "),
            if args.controller_manager { "on" } else { "off" },
            total.as_secs_f64()
        ));
        out.push_str(&format!("Machine: {machine}\n\n"));
        if !self.details.is_empty() {
            out.push_str("Details:\n\n");
            for d in &self.details {
                out.push_str(&format!("- {d}\n"));
            }
            out.push('\n');
        }
        if self.failures.is_empty() {
            out.push_str("Invariants: all held.\n");
        } else {
            out.push_str("Invariants FAILED:\n\n");
            for f in &self.failures {
                out.push_str(&format!("- {f}\n"));
            }
        }
        out
    }
}

fn machine_info() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {:.1} GiB RAM, Linux {kernel}, {}",
        mem_kb as f64 / 1024.0 / 1024.0,
        Timestamp::now().strftime("%Y-%m-%d %H:%M UTC")
    )
}

// -------------------------------------------------------------------------------------------------
// Small helpers
// -------------------------------------------------------------------------------------------------

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// A field of `/proc/<pid>/status` in kB (`VmHWM`, `VmRSS`).
fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn hwm_kb(op: &OperatorProcess) -> Result<u64> {
    let pid = op.pid().ok_or_else(|| anyhow!("operator not running"))?;
    proc_status_kb(pid, "VmHWM").ok_or_else(|| anyhow!("cannot read VmHWM of pid {pid}"))
}

fn rss_kb(op: &OperatorProcess) -> u64 {
    op.pid()
        .and_then(|p| proc_status_kb(p, "VmRSS"))
        .unwrap_or(0)
}

/// utime + stime of a process, seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) / tck)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        _ => true,
    }
}

/// Run `f` until it succeeds; transient API errors are retried (8 attempts, backoff).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, kube::Error>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 8 && transient(&e) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            Err(e) => return Err(anyhow!("{what}: {e}")),
        }
    }
}

/// Create, treating "already exists" (an earlier attempt that timed out) as success.
async fn create_ok<K>(api: &Api<K>, obj: &K) -> std::result::Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let pp = PostParams {
        field_manager: Some(BENCH_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Run `f(i)` for `0..n` with `conc` in flight.
async fn for_all<F, Fut>(n: usize, conc: usize, f: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(conc.max(1))
        .try_for_each(|()| async { Ok(()) })
        .await
}

fn secret_obj(name: &str, data: &[(&str, Vec<u8>)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.clone())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

fn apikey_creds(i: usize) -> Secret {
    secret_obj(
        &format!("vc-{i}-creds"),
        &[("api_key", format!("ak-bench-{i:08}").into_bytes())],
    )
}

fn apikey_vc(name: &str, creds: &str) -> Result<VaultConnection> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "vaultconn.dev/v1alpha1",
        "kind": "VaultConnection",
        "metadata": {"name": name},
        "spec": {"type": "apiKey", "credentialsRef": {"name": creds}},
    }))?)
}

fn is_ready(vc: &VaultConnection) -> bool {
    vc.status.as_ref().is_some_and(|s| {
        s.phase == Some(Phase::Ready) && s.observed_generation == vc.metadata.generation
    })
}

// -------------------------------------------------------------------------------------------------
// Cluster: control plane + client + apiserver metrics
// -------------------------------------------------------------------------------------------------

struct Cluster {
    cp: ControlPlane,
    client: Client,
    http: reqwest::Client,
}

type ReqKey = (String, String, String, String); // verb, resource, subresource, dry_run
type ReqCounts = HashMap<ReqKey, f64>;

impl Cluster {
    async fn start(args: &Args) -> Result<Cluster> {
        Cluster::start_with(args, &[]).await
    }

    /// With kube-apiserver flags added to `--apiserver-arg`'s.
    async fn start_with(args: &Args, extra: &[String]) -> Result<Cluster> {
        let began = Instant::now();
        let cp = ControlPlane::start(ControlPlaneOptions {
            temp_root: Some("/dev/shm".into()),
            extra_apiserver_args: args.apiserver_args.iter().chain(extra).cloned().collect(),
            controller_manager: args.controller_manager,
            ..Default::default()
        })
        .await
        .context("starting the control plane")?;
        let client = cp.try_client().await?;
        vaultconn::crd::install(&client)
            .await
            .context("installing the CRD")?;
        let http = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()?;
        log!(
            "control plane up at {} in {:.1} s (dir {})",
            cp.server_url(),
            began.elapsed().as_secs_f64(),
            cp.dir().display()
        );
        Ok(Cluster { cp, client, http })
    }

    async fn namespace(&self, name: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        retry("creating a namespace", || create_ok(&api, &ns)).await
    }

    /// `apiserver_request_total` summed by (verb, resource, subresource, dry_run).
    async fn requests(&self) -> Result<ReqCounts> {
        let text = self
            .http
            .get(format!("{}/metrics", self.cp.server_url()))
            .bearer_auth(self.cp.admin_token())
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let mut out = ReqCounts::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some(close) = rest.rfind('}') else {
                continue;
            };
            let labels = parse_labels(&rest[..close]);
            let Ok(value) = rest[close + 1..].trim().parse::<f64>() else {
                continue;
            };
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            let key = (
                get("verb"),
                get("resource"),
                get("subresource"),
                get("dry_run"),
            );
            *out.entry(key).or_default() += value;
        }
        Ok(out)
    }

    fn operator(&self, args: &Args, bin: &Path, log_name: &str) -> OperatorOptions {
        OperatorOptions {
            binary: bin.to_path_buf(),
            kubeconfig: self.cp.kubeconfig_path().to_path_buf(),
            log_path: args.work_dir.join(log_name),
            extra_args: vec![
                "--allow-http-loopback".into(),
                "--concurrency".into(),
                args.concurrency.to_string(),
            ],
            log_filter: args.operator_log.clone(),
        }
    }
}

fn parse_labels(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let body = &rest[eq + 2..];
        let mut value = String::new();
        let mut escaped = false;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            if escaped {
                value.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = i;
                break;
            } else {
                value.push(c);
            }
        }
        out.insert(key, value);
        rest = body.get(end + 1..).unwrap_or("");
    }
    out
}

/// Requests between two snapshots, by "VERB resource[/sub][ dry-run]", reads included unless
/// `writes_only`. WATCH is always left out (counted when a watch ends).
fn diff_requests(
    before: &ReqCounts,
    after: &ReqCounts,
    writes_only: bool,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (k, v) in after {
        let (verb, resource, sub, dry) = k;
        if verb == "WATCH" || verb == "WATCHLIST" {
            continue;
        }
        if writes_only && !WRITE_VERBS.contains(&verb.as_str()) {
            continue;
        }
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d < 0.5 {
            continue;
        }
        let mut name = format!("{verb} {resource}");
        if !sub.is_empty() {
            name.push('/');
            name.push_str(sub);
        }
        if !dry.is_empty() {
            name.push_str(" (dry-run)");
        }
        *out.entry(name).or_default() += d.round() as u64;
    }
    out
}

/// Writes in a breakdown, without the apiserver's own background writes.
fn write_total(m: &BTreeMap<String, u64>) -> u64 {
    m.iter()
        .filter(|(k, _)| {
            let mut parts = k.split(' ');
            let verb = parts.next().unwrap_or("");
            let resource = parts.next().unwrap_or("");
            let resource = resource.split('/').next().unwrap_or("");
            WRITE_VERBS.contains(&verb) && !BACKGROUND_RESOURCES.contains(&resource)
        })
        .map(|(_, v)| *v)
        .sum()
}

fn fmt_breakdown(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// -------------------------------------------------------------------------------------------------
// Trackers: watch connections and output Secrets of one namespace
// -------------------------------------------------------------------------------------------------

#[derive(Default)]
struct TrackState {
    /// First time each connection was seen Ready.
    ready_at: HashMap<String, Instant>,
    ready_now: HashSet<String>,
    /// First time each output Secret was seen.
    secret_at: HashMap<String, Instant>,
    /// Ready → not Ready transitions.
    flaps: u64,
    watch_errors: u64,
}

struct Tracker {
    state: Arc<Mutex<TrackState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Tracker {
    fn start(client: &Client, ns: &str) -> Tracker {
        let state = Arc::new(Mutex::new(TrackState::default()));
        let vcs: Api<VaultConnection> = Api::namespaced(client.clone(), ns);
        let st = state.clone();
        let vc_task = tokio::spawn(async move {
            let stream = watcher(vcs, watcher::Config::default()).default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(vc)) | Ok(watcher::Event::InitApply(vc)) => {
                        let now = Instant::now();
                        let name = vc.name_any();
                        let mut s = lock(&st);
                        if is_ready(&vc) {
                            s.ready_at.entry(name.clone()).or_insert(now);
                            s.ready_now.insert(name);
                        } else if s.ready_now.remove(&name) {
                            s.flaps += 1;
                        }
                    }
                    Ok(watcher::Event::Delete(vc)) => {
                        let name = vc.name_any();
                        let mut s = lock(&st);
                        s.ready_now.remove(&name);
                        s.ready_at.remove(&name);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        lock(&st).watch_errors += 1;
                        log!("connection watch error: {e}");
                    }
                }
            }
        });
        let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(client.clone(), ns);
        let st = state.clone();
        let secret_task = tokio::spawn(async move {
            let cfg = watcher::Config::default().labels(OUTPUT_SELECTOR);
            let stream = watcher(secrets, cfg).default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(s)) | Ok(watcher::Event::InitApply(s)) => {
                        let now = Instant::now();
                        lock(&st).secret_at.entry(s.name_any()).or_insert(now);
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        lock(&st).secret_at.remove(&s.name_any());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        lock(&st).watch_errors += 1;
                        log!("secret watch error: {e}");
                    }
                }
            }
        });
        Tracker {
            state,
            tasks: vec![vc_task, secret_task],
        }
    }

    fn counts(&self) -> (usize, usize) {
        let s = lock(&self.state);
        (s.ready_now.len(), s.secret_at.len())
    }

    fn ready_at(&self, name: &str) -> Option<Instant> {
        lock(&self.state).ready_at.get(name).copied()
    }

    /// When the last of `names` became Ready with its Secret, if all have.
    fn converged_at(&self, names: &[String]) -> Option<Instant> {
        let s = lock(&self.state);
        let mut last: Option<Instant> = None;
        for n in names {
            if !s.ready_now.contains(n) {
                return None;
            }
            let r = s.ready_at.get(n)?;
            let sec = s.secret_at.get(n)?;
            let t = (*r).max(*sec);
            last = Some(last.map_or(t, |l| l.max(t)));
        }
        last
    }

    /// Wait until all `names` are Ready with their Secret. `Ok(None)`: timed out or stalled.
    async fn wait_converged(
        &self,
        names: &[String],
        args: &Args,
        what: &str,
        op: Option<&OperatorProcess>,
    ) -> Option<Instant> {
        let began = Instant::now();
        let timeout = Duration::from_secs(args.timeout_secs);
        let stall = Duration::from_secs(args.stall_secs);
        let mut last_progress = Instant::now();
        let mut last_counts = (usize::MAX, usize::MAX);
        let mut last_log = Instant::now();
        loop {
            if let Some(t) = self.converged_at(names) {
                return Some(t);
            }
            let counts = self.counts();
            if counts != last_counts {
                last_counts = counts;
                last_progress = Instant::now();
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                let rss = op.map(|o| mib(rss_kb(o))).unwrap_or_default();
                log!(
                    "{what}: {}/{} Ready, {} Secrets, {:.0} s{}",
                    counts.0,
                    names.len(),
                    counts.1,
                    began.elapsed().as_secs_f64(),
                    if rss.is_empty() {
                        String::new()
                    } else {
                        format!(", operator RSS {rss}")
                    }
                );
            }
            if began.elapsed() > timeout || last_progress.elapsed() > stall {
                log!(
                    "{what}: gave up with {}/{} Ready and {} Secrets after {:.0} s",
                    counts.0,
                    names.len(),
                    counts.1,
                    began.elapsed().as_secs_f64()
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Wait until `vaultconn_reconciles_total` ≥ `min` and unchanged for `--stable-secs`.
/// Returns the counter and when it last moved.
async fn wait_reconciles_stable(
    op: &OperatorProcess,
    min: f64,
    args: &Args,
) -> Result<(f64, Instant)> {
    let began = Instant::now();
    let stable = Duration::from_secs(args.stable_secs);
    let mut last = -1.0;
    let mut changed = Instant::now();
    loop {
        let v = op.metric("vaultconn_reconciles").await.unwrap_or(-1.0);
        if v != last {
            last = v;
            changed = Instant::now();
        } else if v >= min && changed.elapsed() >= stable {
            return Ok((v, changed));
        }
        if began.elapsed() > Duration::from_secs(args.timeout_secs)
            || changed.elapsed() > Duration::from_secs(args.stall_secs)
        {
            bail!("vaultconn_reconciles_total stuck at {last} (want ≥ {min})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// -------------------------------------------------------------------------------------------------
// Phase 1: cold convergence (+ baseline)
// -------------------------------------------------------------------------------------------------

struct ColdResult {
    ns: String,
    names: Vec<String>,
    tracker: Tracker,
    converged: bool,
    /// Connections Ready with their Secret when convergence ended (or was given up).
    ready_when_done: usize,
    operator_time: Option<Duration>,
    baseline_time: Option<Duration>,
    hwm_kb: u64,
}

/// Create N credentials Secrets and N apiKey connections in `ns`, returning the created connections.
async fn setup_apikey(
    c: &Cluster,
    ns: &str,
    n: usize,
    conc: usize,
    with_creds: bool,
) -> Result<Vec<VaultConnection>> {
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), ns);
    let vcs: Api<VaultConnection> = Api::namespaced(c.client.clone(), ns);
    if with_creds {
        for_all(n, conc, |i| {
            let secrets = secrets.clone();
            async move {
                let s = apikey_creds(i);
                retry("creating a credentials Secret", || create_ok(&secrets, &s)).await
            }
        })
        .await?;
    }
    let created: Arc<Mutex<Vec<VaultConnection>>> = Arc::default();
    for_all(n, conc, |i| {
        let vcs = vcs.clone();
        let created = created.clone();
        async move {
            let name = format!("vc-{i}");
            let vc = apikey_vc(&name, &format!("{name}-creds"))?;
            let pp = PostParams {
                field_manager: Some(BENCH_MANAGER.into()),
                ..Default::default()
            };
            let got = retry("creating a VaultConnection", || async {
                match vcs.create(&pp, &vc).await {
                    Err(kube::Error::Api(s)) if s.code == 409 => vcs.get(&name).await,
                    other => other,
                }
            })
            .await?;
            lock(&created).push(got);
            Ok(())
        }
    })
    .await?;
    let out = std::mem::take(&mut *lock(&created));
    Ok(out)
}

/// The baseline: the minimum writes for n connections (create the output Secret, merge-patch the
/// status Ready), made by a plain kube-rs client at `conc` in flight. Timed until a watch has
/// seen all of them, like the operator. Its objects are deleted afterwards.
async fn baseline(c: &Cluster, args: &Args, prefix: &str, n: usize) -> Result<Option<Duration>> {
    let ns = format!("{prefix}-baseline");
    c.namespace(&ns).await?;
    let vcs_created = setup_apikey(c, &ns, n, args.setup_concurrency, false).await?;
    let names: Vec<String> = vcs_created.iter().map(|v| v.name_any()).collect();
    let tracker = Tracker::start(&c.client, &ns);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &ns);
    let vcs: Api<VaultConnection> = Api::namespaced(c.client.clone(), &ns);
    let vcs_created = Arc::new(vcs_created);
    log!(
        "baseline: {} Secret creates + {} status patches at concurrency {}",
        n,
        n,
        args.concurrency
    );
    let t0 = Instant::now();
    for_all(n, usize::from(args.concurrency), |i| {
        let secrets = secrets.clone();
        let vcs = vcs.clone();
        let all = vcs_created.clone();
        let ns = ns.clone();
        async move {
            let vc = &all[i];
            let idx: usize = vc.name_any().trim_start_matches("vc-").parse().unwrap_or(i);
            let inputs = SecretData::from_secret(&apikey_creds(idx));
            let desired = vsecret::desired_output_secret(vc, vsecret::static_outputs(vc, &inputs));
            let obj = desired.to_new_secret();
            retry("baseline Secret create", || create_ok(&secrets, &obj)).await?;
            let outcome = Outcome::new(
                vaultconn::reason::Reason::Reconciled,
                format!("Secret {ns}/{} is up to date", desired.name),
            )
            .with_secret(Some(desired.name.clone()));
            let status =
                vstatus::desired_status(vc, &outcome, Time(k8s_openapi::jiff::Timestamp::now()));
            let patch = json!({ "status": status });
            let pp = PatchParams::default();
            let name = vc.name_any();
            let (vcs, name, pp, patch) = (&vcs, &name, &pp, &patch);
            retry("baseline status patch", || async move {
                vcs.patch_status(name, pp, &Patch::Merge(patch)).await
            })
            .await?;
            Ok(())
        }
    })
    .await?;
    let writes_done = t0.elapsed();
    let done = tracker.wait_converged(&names, args, "baseline", None).await;
    let result = done.map(|t| t.saturating_duration_since(t0));
    log!(
        "baseline: writes acknowledged after {}, watch saw all after {}",
        secs(writes_done),
        result.map(secs).unwrap_or_else(|| "never".into())
    );
    drop(tracker);
    // Out of the operator's way: it watches all namespaces.
    let dp = DeleteParams::default();
    let lp = ListParams::default();
    retry("deleting baseline connections", || {
        vcs.delete_collection(&dp, &lp)
    })
    .await?;
    retry("deleting baseline Secrets", || {
        secrets.delete_collection(&dp, &lp)
    })
    .await?;
    Ok(result)
}

async fn cold(
    c: &Cluster,
    args: &Args,
    bin: &Path,
    prefix: &str,
    n: usize,
    with_baseline: bool,
    rep: &mut Report,
) -> Result<(OperatorProcess, ColdResult)> {
    let label = prefix;
    let ns = format!("{prefix}-cold");
    c.namespace(&ns).await?;
    let t = Instant::now();
    let created = setup_apikey(c, &ns, n, args.setup_concurrency, true).await?;
    let names: Vec<String> = created.iter().map(|v| v.name_any()).collect();
    drop(created);
    rep.detail(format!(
        "{label}: setup of {n} credentials Secrets + {n} connections took {} (harness, concurrency {})",
        secs(t.elapsed()),
        args.setup_concurrency
    ));
    let baseline_time = if with_baseline {
        baseline(c, args, prefix, n).await?
    } else {
        None
    };
    let tracker = Tracker::start(&c.client, &ns);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = c.requests().await?;
    log!("{label}: starting the operator on {n} connections");
    let t0 = Instant::now();
    let op = OperatorProcess::start(c.operator(args, bin, &format!("operator-{prefix}.log")))
        .await
        .context("starting the operator")?;
    let done = tracker
        .wait_converged(&names, args, &format!("{label} operator"), Some(&op))
        .await;
    let operator_time = done.map(|t| t.saturating_duration_since(t0));
    let (ready, secrets) = tracker.counts();
    // Let the last Events land before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = c.requests().await?;
    let hwm = hwm_kb(&op)?;
    let reqs = diff_requests(&before, &after, false);
    rep.detail(format!(
        "{label}: operator converged {ready}/{n} Ready, {secrets} Secrets in {}; API requests it made \
         meanwhile (no harness writes then): {}; writes per connection {:.2}",
        operator_time.map(secs).unwrap_or_else(|| "— (did not converge)".into()),
        fmt_breakdown(&reqs),
        write_total(&reqs) as f64 / n.max(1) as f64
    ));
    let flaps = lock(&tracker.state).flaps;
    if flaps > 0 {
        rep.detail(format!(
            "{label}: {flaps} Ready → not-Ready transitions seen"
        ));
    }
    Ok((
        op,
        ColdResult {
            ns,
            names,
            tracker,
            converged: operator_time.is_some(),
            ready_when_done: ready.min(secrets),
            operator_time,
            baseline_time,
            hwm_kb: hwm,
        },
    ))
}

fn report_cold(rep: &mut Report, args: &Args, r: &ColdResult, n: usize, phase: &str, main: bool) {
    rep.invariant(
        phase,
        &format!("connections converged (N={n})"),
        &format!("{n}"),
        format!("{}", r.ready_when_done.min(n)),
        r.converged,
    );
    if let Some(t) = r.operator_time {
        rep.info(
            phase,
            &format!(
                "operator: start → all {n} Ready with Secrets (watch), concurrency {}",
                args.concurrency
            ),
            secs(t),
        );
    }
    if let Some(b) = r.baseline_time {
        rep.info(
            phase,
            &format!(
                "baseline: plain kube-rs client, {n} Secret creates + {n} status merge patches, concurrency {}",
                args.concurrency
            ),
            secs(b),
        );
    }
    if let (Some(t), Some(b)) = (r.operator_time, r.baseline_time) {
        let ratio = t.as_secs_f64() / b.as_secs_f64().max(1e-9);
        if main {
            rep.check(
                phase,
                "convergence ratio operator / baseline",
                "≤ 1.5 (aim 1.2)",
                format!("{ratio:.2}"),
                ratio <= 1.5,
            );
        } else {
            rep.info(
                phase,
                "convergence ratio operator / baseline",
                format!("{ratio:.2}"),
            );
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Phase 2: new-connection latency
// -------------------------------------------------------------------------------------------------

async fn latency(c: &Cluster, args: &Args, cold: &ColdResult, rep: &mut Report) -> Result<usize> {
    let phase = "2 New-connection latency";
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &cold.ns);
    let vcs: Api<VaultConnection> = Api::namespaced(c.client.clone(), &cold.ns);
    let mut lat = Vec::new();
    let mut failed = 0usize;
    let per_timeout = Duration::from_secs(30);
    for i in 0..args.latency_count {
        let name = format!("lat-{i}");
        let creds = secret_obj(
            &format!("{name}-creds"),
            &[("api_key", format!("ak-lat-{i}").into_bytes())],
        );
        retry("creating a credentials Secret", || {
            create_ok(&secrets, &creds)
        })
        .await?;
        let vc = apikey_vc(&name, &format!("{name}-creds"))?;
        let t0 = Instant::now();
        retry("creating a VaultConnection", || create_ok(&vcs, &vc)).await?;
        loop {
            if let Some(t) = cold.tracker.ready_at(&name) {
                lat.push(t.saturating_duration_since(t0));
                break;
            }
            if t0.elapsed() > per_timeout {
                failed += 1;
                log!("latency: {name} not Ready after {}", secs(per_timeout));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if (i + 1) % 50 == 0 {
            log!("latency: {}/{}", i + 1, args.latency_count);
        }
    }
    lat.sort();
    let n_existing = cold.names.len();
    rep.invariant(
        phase,
        &format!(
            "new connections Ready within 30 s ({} sequential)",
            args.latency_count
        ),
        &format!("{}", args.latency_count),
        format!("{}", args.latency_count - failed),
        failed == 0,
    );
    let p50 = percentile(&lat, 50.0);
    let p99 = percentile(&lat, 99.0);
    rep.info(phase, "create → Ready p50 (watch)", secs(p50));
    rep.check(
        phase,
        &format!("create → Ready p99 with {n_existing} existing"),
        "≤ 1 s",
        secs(p99),
        failed == 0 && p99 <= Duration::from_secs(1),
    );
    if let (Some(min), Some(max)) = (lat.first(), lat.last()) {
        rep.detail(format!(
            "latency: min {}, p50 {}, p90 {}, p99 {}, max {} over {} creates",
            secs(*min),
            secs(p50),
            secs(percentile(&lat, 90.0)),
            secs(p99),
            secs(*max),
            lat.len()
        ));
    }
    Ok(args.latency_count)
}

// -------------------------------------------------------------------------------------------------
// Phase 3: quiet steady state and restart
// -------------------------------------------------------------------------------------------------

struct RestartResult {
    hwm_kb: u64,
    writes: u64,
}

async fn restart_and_count(
    c: &Cluster,
    args: &Args,
    op: &mut OperatorProcess,
    total: usize,
    label: &str,
    rep: &mut Report,
) -> Result<RestartResult> {
    let before = c.requests().await?;
    let clean = op.stop(Duration::from_secs(30));
    let t0 = Instant::now();
    op.start_again().await?;
    let (reconciles, last_move) = wait_reconciles_stable(op, total as f64, args).await?;
    let resync = last_move.saturating_duration_since(t0);
    let after = c.requests().await?;
    let reqs = diff_requests(&before, &after, false);
    let writes = write_total(&reqs);
    let hwm = hwm_kb(op)?;
    rep.detail(format!(
        "{label}: restart (SIGTERM, clean exit: {clean}) re-synced {total} connections \
         ({reconciles} reconciles) in ~{}; peak RSS {}; API requests: {}",
        secs(resync),
        mib(hwm),
        fmt_breakdown(&reqs)
    ));
    Ok(RestartResult {
        hwm_kb: hwm,
        writes,
    })
}

// -------------------------------------------------------------------------------------------------
// Phase 5: refresh load
// -------------------------------------------------------------------------------------------------

#[derive(Default)]
struct ExpiryStats {
    samples: u64,
    list_samples: u64,
    /// Distinct (secret, access token) pairs seen expired or unknown to the token server.
    expired: HashSet<(String, String)>,
    missing_fields: HashSet<String>,
    min_margin_ms: Option<i64>,
    max_gap: Duration,
}

fn check_secret(
    s: &Secret,
    ts: &TokenServer,
    now: Timestamp,
    stats: &mut ExpiryStats,
    last_seen: &mut HashMap<String, Instant>,
) {
    let name = s.name_any();
    let field = |k: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).to_string())
    };
    let (Some(token), Some(exp)) = (field("access_token"), field("expires_at")) else {
        stats.missing_fields.insert(name);
        return;
    };
    let exp = exp.trim().parse::<Timestamp>();
    let margin = exp
        .as_ref()
        .map(|e| e.duration_since(now).as_millis() as i64)
        .ok();
    let expired = margin.is_none_or(|m| m <= 0) || !ts.is_access_token_valid(&token);
    if let Some(m) = margin {
        stats.min_margin_ms = Some(stats.min_margin_ms.map_or(m, |x| x.min(m)));
    }
    if expired {
        stats.expired.insert((name.clone(), token));
    }
    let now_i = Instant::now();
    if let Some(prev) = last_seen.insert(name, now_i) {
        stats.max_gap = stats.max_gap.max(now_i - prev);
    }
}

async fn refresh(
    c: &Cluster,
    args: &Args,
    bin: &Path,
    op: Option<&mut OperatorProcess>,
    rep: &mut Report,
) -> Result<()> {
    let phase = "5 Refresh load";
    let m = args.m;
    let ttl = Duration::from_secs(args.token_ttl_secs);
    let ns = "bench-oauth".to_string();
    c.namespace(&ns).await?;
    let mut cfg = TokenServerConfig::default().with_ttl(ttl);
    for i in 0..m {
        cfg = cfg.with_client(format!("client-{i}"), format!("secret-{i}"));
    }
    let ts = Arc::new(TokenServer::start(cfg).await?);
    let token_url = ts.token_url();
    let mut own_op = None;
    let op: &mut OperatorProcess = match op {
        Some(op) => op,
        None => own_op
            .insert(OperatorProcess::start(c.operator(args, bin, "operator-refresh.log")).await?),
    };
    let pid = op.pid().ok_or_else(|| anyhow!("operator not running"))?;
    let tracker = Tracker::start(&c.client, &ns);
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &ns);
    let vcs: Api<VaultConnection> = Api::namespaced(c.client.clone(), &ns);
    let t = Instant::now();
    for_all(m, args.setup_concurrency, |i| {
        let secrets = secrets.clone();
        let vcs = vcs.clone();
        let token_url = token_url.clone();
        async move {
            let name = format!("oauth-{i}");
            let creds = secret_obj(
                &format!("{name}-creds"),
                &[
                    ("client_id", format!("client-{i}").into_bytes()),
                    ("client_secret", format!("secret-{i}").into_bytes()),
                ],
            );
            retry("creating oauth credentials", || create_ok(&secrets, &creds)).await?;
            let vc: VaultConnection = serde_json::from_value(json!({
                "apiVersion": "vaultconn.dev/v1alpha1",
                "kind": "VaultConnection",
                "metadata": {"name": name},
                "spec": {
                    "type": "oauth2",
                    "credentialsRef": {"name": format!("{name}-creds")},
                    "oauth2": {"tokenUrl": token_url},
                },
            }))?;
            retry("creating an oauth2 connection", || create_ok(&vcs, &vc)).await
        }
    })
    .await?;
    let names: Vec<String> = (0..m).map(|i| format!("oauth-{i}")).collect();
    let done = tracker
        .wait_converged(&names, args, "oauth2 connections", Some(op))
        .await;
    rep.invariant(
        phase,
        &format!("oauth2 connections Ready (M={m})"),
        &format!("{m}"),
        format!("{}", tracker.counts().0.min(m)),
        done.is_some(),
    );
    let Some(done) = done else {
        return Ok(());
    };
    rep.detail(format!(
        "refresh: {m} oauth2 connections created and Ready with first tokens in {} (incl. creating them)",
        secs(done.saturating_duration_since(t))
    ));
    drop(tracker);

    // The measured window.
    let stats = Arc::new(Mutex::new(ExpiryStats::default()));
    let (reader, writer) = reflector::store::<Secret>();
    let watch_api: Api<Secret> = Api::namespaced(c.client.clone(), &ns);
    let watch_task = tokio::spawn(async move {
        let stream = watcher(
            watch_api,
            watcher::Config::default().labels(OUTPUT_SELECTOR),
        )
        .default_backoff()
        .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                log!("refresh: secret watch error: {e}");
            }
        }
    });
    let sample_task = {
        let stats = stats.clone();
        let ts = ts.clone();
        let reader = reader.clone();
        tokio::spawn(async move {
            let mut last_seen = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = Timestamp::now();
                let all = reader.state();
                let mut st = lock(&stats);
                for s in &all {
                    check_secret(s, &ts, now, &mut st, &mut last_seen);
                }
                st.samples += 1;
            }
        })
    };
    let list_task = {
        let stats = stats.clone();
        let ts = ts.clone();
        let api: Api<Secret> = Api::namespaced(c.client.clone(), &ns);
        tokio::spawn(async move {
            let mut last_seen = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                match api
                    .list(&ListParams::default().labels(OUTPUT_SELECTOR))
                    .await
                {
                    Ok(list) => {
                        let now = Timestamp::now();
                        let mut st = lock(&stats);
                        for s in &list.items {
                            check_secret(s, &ts, now, &mut st, &mut last_seen);
                        }
                        st.list_samples += 1;
                    }
                    Err(e) => log!("refresh: list failed: {e}"),
                }
            }
        })
    };
    // The watch needs a moment for its initial list; the LIST covers that moment anyway.
    let w0 = SystemTime::now();
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let req0 = c.requests().await?;
    let attempts0 = op
        .metric("vaultconn_token_refresh_attempts")
        .await
        .unwrap_or(0.0);
    let reconciles0 = op.metric("vaultconn_reconciles").await.unwrap_or(0.0);
    log!(
        "refresh: measuring {} s with {m} connections (token lifetime {} s)",
        args.refresh_secs,
        args.token_ttl_secs
    );
    let window = Duration::from_secs(args.refresh_secs);
    let began = Instant::now();
    while began.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(10).min(window - began.elapsed())).await;
        let st = lock(&stats);
        log!(
            "refresh: {:.0}/{} s, {} token requests so far, {} expired seen, operator RSS {}",
            began.elapsed().as_secs_f64(),
            args.refresh_secs,
            ts.call_count(),
            st.expired.len(),
            mib(rss_kb(op))
        );
    }
    let w1 = SystemTime::now();
    let cpu1 = cpu_secs(pid).unwrap_or(0.0);
    let req1 = c.requests().await?;
    let attempts1 = op
        .metric("vaultconn_token_refresh_attempts")
        .await
        .unwrap_or(0.0);
    let reconciles1 = op.metric("vaultconn_reconciles").await.unwrap_or(0.0);
    sample_task.abort();
    list_task.abort();
    watch_task.abort();
    let hwm = hwm_kb(op)?;

    // Token requests in the window vs the schedule.
    let calls = ts.calls();
    let mut by_client: HashMap<String, Vec<SystemTime>> = HashMap::new();
    for call in &calls {
        if let Some(id) = &call.client_id {
            by_client.entry(id.clone()).or_default().push(call.at);
        }
    }
    let to_utc = Timestamp::try_from;
    let (w0u, w1u) = (to_utc(w0)?, to_utc(w1)?);
    let renew = RenewBefore::default();
    let mut actual = 0u64;
    let mut ideal = 0u64;
    // Gaps between consecutive requests of one connection (both inside the window), and the
    // busiest second at the token server.
    let mut gaps: Vec<Duration> = Vec::new();
    let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
    let mut per_conn_max = 0u64;
    let mut per_conn_min = u64::MAX;
    for i in 0..m {
        let mut times = by_client.remove(&format!("client-{i}")).unwrap_or_default();
        times.sort();
        let window_times: Vec<SystemTime> = times
            .iter()
            .copied()
            .filter(|t| *t > w0 && *t <= w1)
            .collect();
        for pair in window_times.windows(2) {
            gaps.push(pair[1].duration_since(pair[0]).unwrap_or_default());
        }
        for t in &window_times {
            let sec = t.duration_since(w0).unwrap_or_default().as_secs();
            *per_second.entry(sec).or_default() += 1;
        }
        let in_window = window_times.len() as u64;
        actual += in_window;
        per_conn_max = per_conn_max.max(in_window);
        per_conn_min = per_conn_min.min(in_window);
        // The token current at w0 was issued by the last request before it.
        let Some(start) = times.iter().rev().find(|t| **t <= w0).or(times.first()) else {
            continue;
        };
        let key = format!("{ns}/oauth-{i}");
        let mut issued = to_utc(*start)?;
        loop {
            let next = schedule::next_refresh_at(issued, issued + ttl, &renew, &key);
            if next > w1u {
                break;
            }
            if next > w0u {
                ideal += 1;
            }
            issued = next;
        }
    }
    let dur = w1.duration_since(w0).unwrap_or(window).as_secs_f64();
    // In phase, a connection refreshes once per cycle: 0.67·L − 1 s (see `schedule`).
    let cycle = args.token_ttl_secs as f64 * (1.0 - 0.33) - schedule::PHASE_MARGIN.as_secs_f64();
    let formula = m as f64 * dur / cycle;
    let dev = if ideal > 0 {
        (actual as f64 - ideal as f64) / ideal as f64 * 100.0
    } else if actual == 0 {
        0.0
    } else {
        f64::INFINITY
    };
    rep.check(
        phase,
        &format!(
            "token requests in {dur:.0} s vs ideal (ideal = Σ over connections of refresh points of \
             the schedule in the window, from each token's issue time: the connection's phase in \
             [issue + 0.1·L, issue + 0.67·L], in phase every 0.67·L − 1 s; ≈ M·D / (0.67·L − 1 s) \
             = {m}·{dur:.0}/{cycle:.1} = {formula:.0})"
        ),
        "within ±5 %",
        format!("{actual} vs {ideal} ({dev:+.1} %)"),
        dev.abs() <= 5.0,
    );
    // The provider's view of the spread: connections minted together must not keep arriving
    // together (issue 10, scenario 9). Evenly spread, they are M / cycle per second; phases
    // from hashes are Poisson-like (the busiest of ~40 one-second buckets at a mean of 25.5 is
    // ~40) and the operator's timing adds to that, hence 2.5 times the even rate.
    let busiest = per_second.values().copied().max().unwrap_or(0);
    let even = m as f64 / cycle;
    let busiest_target = (2.5 * even).ceil() as u64;
    rep.check(
        phase,
        "busiest second at the token server (most token requests in one 1 s bucket of the window)",
        &format!("≤ 2.5 × M / (0.67·L − 1 s) = {busiest_target}"),
        format!("{busiest} (even spread: {even:.1})"),
        busiest <= busiest_target,
    );
    let st = lock(&stats);
    rep.invariant(
        phase,
        "expired tokens seen in a Secret (watch sampled every 1 s + LIST every 5 s)",
        "0",
        format!("{}", st.expired.len()),
        st.expired.is_empty(),
    );
    let maxc = ts.max_concurrent_per_client();
    rep.invariant(
        phase,
        "max simultaneous token requests of one connection",
        "1",
        format!("{maxc}"),
        maxc <= 1,
    );
    let cpu = cpu1 - cpu0;
    rep.info(
        phase,
        &format!("operator CPU (utime+stime) over {dur:.0} s"),
        format!(
            "{cpu:.2} s ({:.1} % of one core; {:.2} ms per token request)",
            cpu / dur * 100.0,
            if actual > 0 {
                cpu * 1000.0 / actual as f64
            } else {
                0.0
            }
        ),
    );
    gaps.sort();
    let l = ttl.as_secs_f64();
    let frac = |d: Duration| format!("{:.3}·L", d.as_secs_f64() / l);
    // Consecutive requests one cycle apart (± 1 s of latency) are in phase.
    let in_phase = gaps
        .iter()
        .filter(|g| (g.as_secs_f64() - cycle).abs() <= 1.0)
        .count();
    let early = gaps
        .iter()
        .filter(|g| g.as_secs_f64() < 0.1 * l - 1.0)
        .count();
    let busy_secs = per_second.len();
    rep.detail(format!(
        "refresh: interval between consecutive token requests of one connection: min {}, p1 {}, \
         p50 {}, max {} over {} intervals (the schedule: one cycle of 0.67·L − 1 s = {} in phase, \
         0.1·L–0.67·L for the first refresh after a token issued out of phase); {} intervals \
         within 1 s of the cycle ({:.1} %); {} shorter than 0.1·L − 1 s; token requests arrived \
         in {} distinct seconds of the {:.0} s window, busiest second {} requests",
        frac(gaps.first().copied().unwrap_or_default()),
        frac(percentile(&gaps, 1.0)),
        frac(percentile(&gaps, 50.0)),
        frac(gaps.last().copied().unwrap_or_default()),
        gaps.len(),
        frac(Duration::from_secs_f64(cycle)),
        in_phase,
        if gaps.is_empty() {
            0.0
        } else {
            in_phase as f64 * 100.0 / gaps.len() as f64
        },
        early,
        busy_secs,
        dur,
        busiest
    ));
    let reqs = diff_requests(&req0, &req1, false);
    let writes = write_total(&reqs);
    rep.detail(format!(
        "refresh: per-connection token requests in the window min {} max {}; operator counted {} \
         attempts and {} reconciles; {} watch passes + {} LISTs sampled; longest gap between two samples of one \
         Secret {}; smallest remaining lifetime seen {}; Secrets missing access_token/expires_at: {}; \
         peak RSS {}",
        if per_conn_min == u64::MAX { 0 } else { per_conn_min },
        per_conn_max,
        attempts1 - attempts0,
        reconciles1 - reconciles0,
        st.samples,
        st.list_samples,
        secs(st.max_gap),
        st.min_margin_ms
            .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "—".into()),
        st.missing_fields.len(),
        mib(hwm)
    ));
    rep.detail(format!(
        "refresh: API requests in the window (harness made only LISTs): {}; {:.2} writes per token request",
        fmt_breakdown(&reqs),
        if actual > 0 {
            writes as f64 / actual as f64
        } else {
            0.0
        }
    ));
    if let Some(mut op) = own_op {
        op.stop(Duration::from_secs(30));
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// Orchestration
// -------------------------------------------------------------------------------------------------

async fn run(args: &Args, rep: &mut Report) -> Result<()> {
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let bin = match &args.operator_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no parent dir of the bench binary"))?
            .join("vaultconn"),
    };
    if !bin.is_file() {
        bail!(
            "operator binary {} not found (build it: cargo build --release)",
            bin.display()
        );
    }
    for f in [
        "operator-bench.log",
        "operator-small.log",
        "operator-refresh.log",
        "operator-scalefault.log",
    ] {
        let _ = std::fs::remove_file(args.work_dir.join(f));
    }
    let main_phases = [
        PhaseName::Cold,
        PhaseName::Latency,
        PhaseName::Quiet,
        PhaseName::Memory,
    ]
    .iter()
    .any(|p| args.runs(*p));
    let n = args.n;
    let mut cold_hwm = None;

    if main_phases {
        let c = Cluster::start(args).await?;
        let (mut op, r) = cold(&c, args, &bin, "bench", n, args.runs(PhaseName::Cold), rep).await?;
        report_cold(rep, args, &r, n, "1 Cold convergence", true);
        cold_hwm = Some(r.hwm_kb);
        if !r.converged {
            bail_with_logs(&op);
            return Ok(());
        }
        let mut total = n;
        if args.runs(PhaseName::Latency) {
            total += latency(&c, args, &r, rep).await?;
        }
        let mut restart_hwm = None;
        if args.runs(PhaseName::Quiet) {
            let phase = "3 Quiet steady state";
            let (_, last_move) = wait_reconciles_stable(&op, total as f64, args).await?;
            log!(
                "quiet: operator idle for {:.1} s; counting writes for {} s",
                last_move.elapsed().as_secs_f64(),
                args.idle_secs
            );
            let before = c.requests().await?;
            tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
            let after = c.requests().await?;
            let reqs = diff_requests(&before, &after, false);
            let idle_writes = write_total(&reqs);
            rep.invariant(
                phase,
                &format!(
                    "API writes in {} s idle ({total} connections)",
                    args.idle_secs
                ),
                "0",
                format!("{idle_writes}"),
                idle_writes == 0,
            );
            rep.detail(format!(
                "quiet: API requests while idle: {}",
                fmt_breakdown(&reqs)
            ));
            let rr = restart_and_count(&c, args, &mut op, total, "quiet", rep).await?;
            rep.invariant(
                phase,
                &format!("API writes on restart, {total} connections already correct"),
                "0",
                format!("{}", rr.writes),
                rr.writes == 0,
            );
            restart_hwm = Some(rr.hwm_kb);
        }
        if args.runs(PhaseName::Memory) {
            let phase = "4 Memory";
            rep.check(
                phase,
                &format!("peak RSS (VmHWM), cold start to converged, N={n}"),
                "≤ 100 MiB (aim 64)",
                mib(r.hwm_kb),
                r.hwm_kb <= 100 * 1024,
            );
            let without = match restart_hwm {
                Some(h) => h,
                None => {
                    restart_and_count(&c, args, &mut op, total, "memory", rep)
                        .await?
                        .hwm_kb
                }
            };
            rep.info(
                phase,
                &format!("peak RSS after a restart, {total} connections"),
                mib(without),
            );
            let uns = "bench-unrelated";
            c.namespace(uns).await?;
            let blob = vec![b'x'; args.unrelated_kib * 1024];
            let secrets: Api<Secret> = Api::namespaced(c.client.clone(), uns);
            let t = Instant::now();
            for_all(args.unrelated, args.setup_concurrency, |i| {
                let secrets = secrets.clone();
                let s = secret_obj(&format!("unrelated-{i}"), &[("blob", blob.clone())]);
                async move { retry("creating an unrelated Secret", || create_ok(&secrets, &s)).await }
            })
            .await?;
            rep.detail(format!(
                "memory: created {} unrelated Secrets of {} KiB in {} (operator running: peak RSS then {})",
                args.unrelated,
                args.unrelated_kib,
                secs(t.elapsed()),
                mib(hwm_kb(&op)?)
            ));
            let with = restart_and_count(&c, args, &mut op, total, "memory+unrelated", rep)
                .await?
                .hwm_kb;
            let delta = (with as f64 - without as f64) / without.max(1) as f64 * 100.0;
            rep.check(
                phase,
                &format!(
                    "peak RSS after a restart with {} unrelated {} KiB Secrets",
                    args.unrelated, args.unrelated_kib
                ),
                "within ±10 % of without",
                format!("{} ({delta:+.1} %)", mib(with)),
                delta.abs() <= 10.0,
            );
        }
        if args.runs(PhaseName::Refresh) {
            refresh(&c, args, &bin, Some(&mut op), rep).await?;
        }
        op.stop(Duration::from_secs(30));
        drop(r);
        drop(c);
    } else if args.runs(PhaseName::Refresh) {
        let c = Cluster::start(args).await?;
        refresh(&c, args, &bin, None, rep).await?;
        drop(c);
    }

    if args.runs(PhaseName::Memory) {
        let phase = "4 Memory";
        let small = args.n_small;
        log!("memory: fresh control plane for N={small}");
        let c = Cluster::start(args).await?;
        let (mut op, r) = cold(&c, args, &bin, "small", small, true, rep).await?;
        report_cold(rep, args, &r, small, phase, false);
        rep.info(
            phase,
            &format!("peak RSS (VmHWM), cold start to converged, N={small} (fresh control plane)"),
            mib(r.hwm_kb),
        );
        if let Some(big) = cold_hwm {
            if n > small {
                let per = (big as f64 - r.hwm_kb as f64) / (n - small) as f64;
                rep.info(
                    phase,
                    &format!("peak RSS growth per connection (N={small} → {n})"),
                    format!("{:.2} KiB", per),
                );
            }
        }
        op.stop(Duration::from_secs(30));
        drop(r);
        drop(c);
    }

    if args.runs(PhaseName::Scalefault) {
        scalefault::scalefault(args, &bin, rep).await?;
    }
    Ok(())
}

fn bail_with_logs(op: &OperatorProcess) {
    let logs = op.logs();
    let tail: Vec<&str> = logs.lines().rev().take(30).collect();
    log!(
        "operator did not converge; last log lines ({}):",
        op.log_path().display()
    );
    for l in tail.iter().rev() {
        eprintln!("    {l}");
    }
}

fn main() -> ExitCode {
    STARTED.get_or_init(Instant::now);
    vaultconn_testkit::install_crypto_provider();
    let args = Args::parse_with_smoke();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,kube_client::client::tls=error")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let machine = machine_info();
    log!("vaultconn-bench on {machine}");
    let began = Instant::now();
    let mut rep = Report::default();
    let result = rt.block_on(run(&args, &mut rep));
    drop(rt);
    let md = rep.markdown(&args, &machine, began.elapsed());
    let out = args.work_dir.join("report.md");
    if let Err(e) = std::fs::write(&out, &md) {
        eprintln!("cannot write {}: {e}", out.display());
    }
    println!("{md}");
    match result {
        Err(e) => {
            eprintln!("benchmark harness failed: {e:#}");
            ExitCode::from(2)
        }
        Ok(()) if !rep.failures.is_empty() => {
            eprintln!("benchmark invariants failed: {}", rep.failures.join("; "));
            ExitCode::from(1)
        }
        Ok(()) => ExitCode::SUCCESS,
    }
}
