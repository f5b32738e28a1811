//! Phase 6 `scalefault` (issue 13, "Scale faults"): N connections in one namespace of a fresh
//! control plane, created at once while the operator runs, with a share of them broken in each
//! of three ways — bad client credentials (the token server answers `invalid_client`), an
//! unreachable token URL (a loopback port with a socket bound but not listening, so connects
//! are refused) and a spec the schema accepts but the operator refuses (`InvalidSpec`). The
//! rest are healthy `apiKey` connections plus healthy `oauth2` clientCredentials connections with
//! short tokens. Over a window of a few token lifetimes it checks that the healthy ones stay
//! Ready and refreshed, that new connections still turn Ready quickly (the work queue is not
//! starved), and that the broken ones cost the provider and the API server only what their
//! bounds allow.
//!
//! API requests are attributed to connections through kube-apiserver's audit log (this phase
//! starts its control plane with an audit policy for its namespace): `/metrics` has no object
//! names, and the healthy OAuth connections keep writing during the window.

use super::*;

const NS: &str = "bench-scale";
const PHASE: &str = "6 Scale faults";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    ApiKey,
    OAuth,
    BadCreds,
    Unreachable,
    InvalidSpec,
    /// New healthy apiKey connections created during the window (latency probes).
    Probe,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::ApiKey,
        Kind::OAuth,
        Kind::BadCreds,
        Kind::Unreachable,
        Kind::InvalidSpec,
        Kind::Probe,
    ];
    const BROKEN: [Kind; 3] = [Kind::BadCreds, Kind::Unreachable, Kind::InvalidSpec];

    fn prefix(self) -> &'static str {
        match self {
            Kind::ApiKey => "ok-",
            Kind::OAuth => "oauth-",
            Kind::BadCreds => "badcreds-",
            Kind::Unreachable => "unreach-",
            Kind::InvalidSpec => "invalid-",
            Kind::Probe => "lat-",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::ApiKey => "healthy apiKey",
            Kind::OAuth => "healthy oauth2",
            Kind::BadCreds => "bad credentials",
            Kind::Unreachable => "unreachable token URL",
            Kind::InvalidSpec => "invalid spec",
            Kind::Probe => "new (latency probes)",
        }
    }

    /// The Ready condition's reason a broken connection must settle on.
    fn expected_reason(self) -> Option<&'static str> {
        match self {
            Kind::BadCreds => Some(vaultconn::reason::Reason::InvalidClient.as_str()),
            Kind::Unreachable => Some(vaultconn::reason::Reason::TokenEndpointUnreachable.as_str()),
            Kind::InvalidSpec => Some(vaultconn::reason::Reason::InvalidSpec.as_str()),
            _ => None,
        }
    }

    fn of(connection: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| connection.starts_with(k.prefix()))
    }

    fn broken(self) -> bool {
        Kind::BROKEN.contains(&self)
    }

    /// The token server client id of connection `i` of this kind (oauth2 kinds only).
    fn client_id(self, i: usize) -> String {
        format!("{}client-{i}", self.prefix())
    }
}

/// The connection an audited object belongs to: its own name, its credentials or state Secret,
/// or an Event about it (`<connection>.<suffix>`).
fn owner_of(resource: &str, name: &str) -> String {
    if resource == "events" {
        return name.split('.').next().unwrap_or(name).to_string();
    }
    for suffix in ["-vaultconn-state", "-creds"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base.to_string();
        }
    }
    name.to_string()
}

// -------------------------------------------------------------------------------------------------
// Status watch: per connection phase, reason and failed attempts over time
// -------------------------------------------------------------------------------------------------

#[derive(Default)]
struct ConnState {
    ready: bool,
    was_ready: bool,
    reason: Option<String>,
    phase: Option<Phase>,
    attempts: u32,
    /// (when the watch saw it, new failed attempts) for each increase of `failedRefreshAttempts`.
    attempt_log: Vec<(Instant, u32)>,
    /// Ready → not Ready transitions.
    flaps: u64,
}

struct StatusWatch {
    state: Arc<Mutex<HashMap<String, ConnState>>>,
    task: JoinHandle<()>,
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StatusWatch {
    fn start(client: &Client) -> StatusWatch {
        let state: Arc<Mutex<HashMap<String, ConnState>>> = Arc::default();
        let api: Api<VaultConnection> = Api::namespaced(client.clone(), NS);
        let st = state.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default()).default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(vc)) | Ok(watcher::Event::InitApply(vc)) => {
                        let now = Instant::now();
                        let ready = is_ready(&vc);
                        let status = vc.status.as_ref();
                        let reason = status.and_then(|s| {
                            s.conditions
                                .iter()
                                .find(|c| c.type_ == "Ready")
                                .map(|c| c.reason.clone())
                        });
                        let attempts = status.and_then(|s| s.failed_refresh_attempts);
                        let mut all = lock(&st);
                        let c = all.entry(vc.name_any()).or_default();
                        if c.ready && !ready {
                            c.flaps += 1;
                        }
                        c.ready = ready;
                        c.was_ready |= ready;
                        c.phase = status.and_then(|s| s.phase);
                        c.reason = reason;
                        let a = attempts.unwrap_or(0);
                        if a > c.attempts {
                            c.attempt_log.push((now, a - c.attempts));
                        }
                        // A reset (success) counts from 0 again.
                        c.attempts = a;
                    }
                    Ok(_) => {}
                    Err(e) => log!("scalefault: connection watch error: {e}"),
                }
            }
        });
        StatusWatch { state, task }
    }
}

// -------------------------------------------------------------------------------------------------
// Audit log
// -------------------------------------------------------------------------------------------------

const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [\"RequestReceived\"]
rules:
  - level: Metadata
    namespaces: [\"bench-scale\"]
    verbs: [\"get\", \"create\", \"update\", \"patch\", \"delete\"]
  - level: None
";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    /// create/update/patch/delete that persists.
    Write,
    /// A dry-run write (`dryRun=All`): checked by the API server, not persisted.
    DryRun,
    Read,
}

#[derive(Default, Clone, Copy)]
struct AccessCount {
    writes: u64,
    dry_runs: u64,
    reads: u64,
}

impl AccessCount {
    fn add(&mut self, a: Access) {
        match a {
            Access::Write => self.writes += 1,
            Access::DryRun => self.dry_runs += 1,
            Access::Read => self.reads += 1,
        }
    }

    fn all(&self) -> u64 {
        self.writes + self.dry_runs + self.reads
    }

    fn show(&self) -> String {
        format!(
            "{} writes, {} dry-run writes, {} reads",
            self.writes, self.dry_runs, self.reads
        )
    }
}

/// One audited request about a connection's objects.
struct Audited {
    at: Timestamp,
    kind: Kind,
    /// The connection (kept for broken ones only; empty otherwise).
    owner: String,
    access: Access,
    /// "VERB resource[/sub][ (dry-run)]".
    what: String,
}

/// Reads kube-apiserver's audit log as it grows (the full-size log is large: read once).
struct AuditReader {
    path: PathBuf,
    offset: u64,
    events: Vec<Audited>,
    lines: u64,
    unattributed: u64,
}

impl AuditReader {
    fn new(path: PathBuf) -> AuditReader {
        AuditReader {
            path,
            offset: 0,
            events: Vec::new(),
            lines: 0,
            unattributed: 0,
        }
    }

    /// Parse the complete lines added since the last call.
    fn poll(&mut self) -> Result<()> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).context("opening the audit log"),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        // Only whole lines; a line being written is read next time.
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return Ok(());
        };
        self.offset += end as u64 + 1;
        for line in buf[..end].split(|b| *b == b'\n') {
            let Ok(ev) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            self.lines += 1;
            let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
            let verb = s(&ev["verb"]);
            let resource = s(&ev["objectRef"]["resource"]);
            let sub = s(&ev["objectRef"]["subresource"]);
            let owner = owner_of(&resource, &s(&ev["objectRef"]["name"]));
            let Some(kind) = Kind::of(&owner) else {
                self.unattributed += 1;
                continue;
            };
            let dry = s(&ev["requestURI"]).contains("dryRun=");
            let access = match verb.as_str() {
                "create" | "update" | "patch" | "delete" if dry => Access::DryRun,
                "create" | "update" | "patch" | "delete" => Access::Write,
                _ => Access::Read,
            };
            let mut what = format!("{} {resource}", verb.to_uppercase());
            if !sub.is_empty() {
                what.push('/');
                what.push_str(&sub);
            }
            if dry {
                what.push_str(" (dry-run)");
            }
            self.events.push(Audited {
                at: s(&ev["requestReceivedTimestamp"])
                    .parse()
                    .unwrap_or(Timestamp::UNIX_EPOCH),
                kind,
                owner: if kind.broken() { owner } else { String::new() },
                access,
                what,
            });
        }
        Ok(())
    }

    /// The latest persisted write about a connection of one of `kinds`.
    fn last_write(&self, kinds: &[Kind]) -> Option<Timestamp> {
        self.events
            .iter()
            .filter(|e| e.access == Access::Write && kinds.contains(&e.kind))
            .map(|e| e.at)
            .max()
    }

    fn count(&self, kind: Kind, range: Option<(Timestamp, Timestamp)>) -> AccessCount {
        let mut c = AccessCount::default();
        for e in self.events.iter().filter(|e| e.kind == kind) {
            if range.is_none_or(|(a, b)| e.at >= a && e.at <= b) {
                c.add(e.access);
            }
        }
        c
    }

    /// Requests about broken connections in the range: by "VERB resource", and the most of
    /// any one connection.
    fn broken_breakdown(&self, a: Timestamp, b: Timestamp) -> (BTreeMap<String, u64>, u64) {
        let mut by_what = BTreeMap::new();
        let mut by_conn: HashMap<&str, u64> = HashMap::new();
        for e in &self.events {
            if e.kind.broken() && e.at >= a && e.at <= b {
                *by_what.entry(e.what.clone()).or_default() += 1;
                *by_conn.entry(&e.owner).or_default() += 1;
            }
        }
        (by_what, by_conn.values().copied().max().unwrap_or(0))
    }
}

// -------------------------------------------------------------------------------------------------
// Bounds from the operator's own schedule
// -------------------------------------------------------------------------------------------------

/// Attempt times (seconds after the first) of a connection whose every request fails
/// transiently, from `schedule::backoff`, up to `horizon` seconds.
fn backoff_series(key: &str, horizon: f64) -> Vec<f64> {
    let mut out = vec![0.0];
    let mut t = 0.0;
    for failures in 1u32.. {
        t += schedule::backoff(failures, None, key).as_secs_f64();
        if t > horizon {
            break;
        }
        out.push(t);
    }
    out
}

/// Most items of `times` (sorted, seconds) inside any `span`-second window.
fn max_in_span(times: &[f64], span: f64) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= span {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Refresh points of the schedule in (w0, w1] for a connection whose token current at w0 was
/// issued at `issued` (the refresh phase's ideal, for one connection).
fn ideal_refreshes(
    mut issued: Timestamp,
    ttl: Duration,
    key: &str,
    w0: Timestamp,
    w1: Timestamp,
) -> u64 {
    let renew = RenewBefore::default();
    let mut n = 0;
    loop {
        let next = schedule::next_refresh_at(issued, issued + ttl, &renew, key);
        if next > w1 {
            return n;
        }
        if next > w0 {
            n += 1;
        }
        issued = next;
    }
}

// -------------------------------------------------------------------------------------------------
// The phase
// -------------------------------------------------------------------------------------------------

struct Plan {
    /// (kind, index within the kind), in creation order.
    conns: Vec<(Kind, usize)>,
    counts: BTreeMap<Kind, usize>,
}

fn plan(args: &Args) -> Result<Plan> {
    let n = args.scale_n;
    let broken = ((n as f64) * args.scale_broken_pct / 100.0).round() as usize;
    let oauth = args.scale_oauth;
    let healthy_apikey = n.checked_sub(oauth + 3 * broken).ok_or_else(|| {
        anyhow!("--scale-n {n} is smaller than --scale-oauth + 3 × the broken share")
    })?;
    let mut counts = BTreeMap::new();
    counts.insert(Kind::ApiKey, healthy_apikey);
    counts.insert(Kind::OAuth, oauth);
    for k in Kind::BROKEN {
        counts.insert(k, broken);
    }
    let mut conns: Vec<(Kind, usize)> = counts
        .iter()
        .flat_map(|(k, c)| (0..*c).map(move |i| (*k, i)))
        .collect();
    // Interleave the kinds (a fixed pseudo-random order) so the broken ones are spread through
    // the work queue instead of arriving as one block.
    conns.sort_by_key(|(k, i)| (*i as u64 * 8 + *k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    Ok(Plan { conns, counts })
}

fn connection(
    kind: Kind,
    i: usize,
    token_url: &str,
    closed_url: &str,
) -> Result<(Secret, VaultConnection)> {
    let name = format!("{}{i}", kind.prefix());
    let creds_name = format!("{name}-creds");
    let oauth_creds = |secret: String| {
        secret_obj(
            &creds_name,
            &[
                ("client_id", kind.client_id(i).into_bytes()),
                ("client_secret", secret.into_bytes()),
            ],
        )
    };
    let oauth_vc = |url: &str, target: Option<&str>| -> Result<VaultConnection> {
        let mut spec = json!({
            "type": "oauth2",
            "credentialsRef": {"name": creds_name},
            "oauth2": {"tokenUrl": url},
        });
        if let Some(t) = target {
            spec["target"] = json!({"name": t});
        }
        Ok(serde_json::from_value(json!({
            "apiVersion": "vaultconn.dev/v1alpha1",
            "kind": "VaultConnection",
            "metadata": {"name": name},
            "spec": spec,
        }))?)
    };
    Ok(match kind {
        Kind::ApiKey | Kind::Probe => (
            secret_obj(
                &creds_name,
                &[("api_key", format!("ak-scale-{name}").into_bytes())],
            ),
            apikey_vc(&name, &creds_name)?,
        ),
        Kind::OAuth => (
            oauth_creds(format!("ok-secret-{i}")),
            oauth_vc(token_url, None)?,
        ),
        // The token server knows the client, with another secret: invalid_client.
        Kind::BadCreds => (
            oauth_creds(format!("wrong-secret-{i}")),
            oauth_vc(token_url, None)?,
        ),
        Kind::Unreachable => (
            oauth_creds(format!("unreach-secret-{i}")),
            oauth_vc(closed_url, None)?,
        ),
        // Schema-valid, refused by the operator: the target is the credentials Secret itself.
        // Its client is valid at the token server, so a request it should never send would show.
        Kind::InvalidSpec => (
            oauth_creds(format!("inv-secret-{i}")),
            oauth_vc(token_url, Some(&creds_name))?,
        ),
    })
}

async fn create_connection(
    secrets: &Api<Secret>,
    vcs: &Api<VaultConnection>,
    creds: &Secret,
    vc: &VaultConnection,
) -> Result<()> {
    retry("creating a credentials Secret", || {
        create_ok(secrets, creds)
    })
    .await?;
    retry("creating a VaultConnection", || create_ok(vcs, vc)).await
}

/// The operator's labelled counter `name{...label="value"...}`, summed.
fn labelled_metric(text: &str, name: &str, needle: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(needle))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        })
        .sum()
}

pub(crate) async fn scalefault(args: &Args, bin: &Path, rep: &mut Report) -> Result<()> {
    let plan = plan(args)?;
    let n = plan.conns.len();
    let broken_each = plan.counts[&Kind::BadCreds];
    let m = plan.counts[&Kind::OAuth];
    let ttl = Duration::from_secs(args.token_ttl_secs);
    let phase_began = Instant::now();

    // A fresh control plane with an audit log of this namespace's object requests.
    let work = std::fs::canonicalize(&args.work_dir)?;
    let policy = work.join("scalefault-audit-policy.yaml");
    let audit_log = work.join("scalefault-audit.log");
    std::fs::write(&policy, AUDIT_POLICY)?;
    let _ = std::fs::remove_file(&audit_log);
    let extra = vec![
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", audit_log.display()),
        "--audit-log-format=json".to_string(),
        "--audit-log-maxsize=0".to_string(),
    ];
    let c = Cluster::start_with(args, &extra).await?;
    let mut audit = AuditReader::new(audit_log.clone());
    c.namespace(NS).await?;

    let mut cfg = TokenServerConfig::default().with_ttl(ttl);
    for i in 0..m {
        cfg = cfg.with_client(Kind::OAuth.client_id(i), format!("ok-secret-{i}"));
    }
    for i in 0..broken_each {
        cfg = cfg
            .with_client(Kind::BadCreds.client_id(i), format!("right-secret-{i}"))
            .with_client(Kind::InvalidSpec.client_id(i), format!("inv-secret-{i}"));
    }
    let ts = Arc::new(TokenServer::start(cfg).await?);
    let token_url = ts.token_url();
    // Bound but never listening: the kernel refuses every connect, and no other process can
    // take the port while the phase runs. Loopback only.
    let closed = tokio::net::TcpSocket::new_v4()?;
    closed.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let closed_url = format!("http://{}/oauth/token", closed.local_addr()?);

    let mut op = OperatorProcess::start(c.operator(args, bin, "operator-scalefault.log"))
        .await
        .context("starting the operator")?;
    let pid = op.pid().ok_or_else(|| anyhow!("operator not running"))?;
    let tracker = Tracker::start(&c.client, NS);
    let statuses = StatusWatch::start(&c.client);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // All connections at once, with the operator running.
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), NS);
    let vcs: Api<VaultConnection> = Api::namespaced(c.client.clone(), NS);
    log!(
        "scalefault: creating {n} connections ({} apiKey, {m} oauth2, {broken_each} broken each way)",
        plan.counts[&Kind::ApiKey]
    );
    let t_create = Instant::now();
    let conns = Arc::new(plan.conns.clone());
    for_all(n, args.setup_concurrency, |j| {
        let (secrets, vcs, conns) = (secrets.clone(), vcs.clone(), conns.clone());
        let (token_url, closed_url) = (token_url.clone(), closed_url.clone());
        async move {
            let (kind, i) = conns[j];
            let (creds, vc) = connection(kind, i, &token_url, &closed_url)?;
            create_connection(&secrets, &vcs, &creds, &vc).await
        }
    })
    .await?;
    let created_in = t_create.elapsed();
    let name_of = |(k, i): &(Kind, usize)| format!("{}{i}", k.prefix());
    let healthy: Vec<String> = plan
        .conns
        .iter()
        .filter(|(k, _)| !k.broken())
        .map(name_of)
        .collect();
    let broken: Vec<(Kind, String)> = plan
        .conns
        .iter()
        .filter(|(k, _)| k.broken())
        .map(|c| (c.0, name_of(c)))
        .collect();
    let converged = tracker
        .wait_converged(&healthy, args, "scalefault healthy", Some(&op))
        .await;
    rep.invariant(
        PHASE,
        &format!(
            "healthy connections Ready with Secrets after all {n} were created at once ({} apiKey + {m} oauth2)",
            healthy.len() - m
        ),
        &format!("{}", healthy.len()),
        format!("{}", tracker.counts().0.min(healthy.len())),
        converged.is_some(),
    );
    let Some(converged) = converged else {
        bail_with_logs(&op);
        op.stop(Duration::from_secs(30));
        return Ok(());
    };
    rep.detail(format!(
        "scalefault: {n} connections created in {} (harness, concurrency {}); all {} healthy Ready \
         with their Secrets {} after the first create",
        secs(created_in),
        args.setup_concurrency,
        healthy.len(),
        secs(converged.saturating_duration_since(t_create))
    ));

    // Every broken connection settles on its specific reason.
    let settle_began = Instant::now();
    let unsettled = |st: &HashMap<String, ConnState>| -> Vec<String> {
        broken
            .iter()
            .filter(|(k, name)| {
                st.get(name).and_then(|c| c.reason.as_deref()) != k.expected_reason()
            })
            .map(|(_, name)| name.clone())
            .collect()
    };
    let settled = loop {
        let left = unsettled(&lock(&statuses.state));
        if left.is_empty() {
            break true;
        }
        if settle_began.elapsed() > Duration::from_secs(args.stall_secs) {
            let st = lock(&statuses.state);
            for name in left.iter().take(5) {
                let c = st.get(name);
                log!(
                    "scalefault: {name} not settled: phase {:?} reason {:?}",
                    c.and_then(|c| c.phase),
                    c.and_then(|c| c.reason.clone())
                );
            }
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    {
        let st = lock(&statuses.state);
        let settled_count = broken.len() - unsettled(&st).len();
        rep.invariant(
            PHASE,
            &format!(
                "broken connections Failed with their specific reason ({} InvalidClient, {} TokenEndpointUnreachable, {} InvalidSpec)",
                broken_each, broken_each, broken_each
            ),
            &format!("{}", broken.len()),
            format!("{settled_count}"),
            settled,
        );
        let ever_ready = broken
            .iter()
            .filter(|(_, n)| st.get(n).is_some_and(|c| c.was_ready))
            .count();
        rep.invariant(
            PHASE,
            "broken connections ever seen Ready",
            "0",
            format!("{ever_ready}"),
            ever_ready == 0,
        );
    }

    // Settled: no write about a terminally broken connection (bad credentials, invalid spec)
    // for `--stable-secs` (their Events land a moment after their status).
    let quiet_began = Instant::now();
    let stable = jiff::SignedDuration::from_secs(args.stable_secs as i64);
    let quiet = loop {
        audit.poll()?;
        let last = audit.last_write(&[Kind::BadCreds, Kind::InvalidSpec]);
        if last.is_some_and(|t| Timestamp::now().duration_since(t) >= stable) {
            break true;
        }
        if quiet_began.elapsed() > Duration::from_secs(args.stall_secs) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    rep.invariant(
        PHASE,
        &format!(
            "writes about the bad-credentials and invalid-spec connections stop ({} s without one, audit log)",
            args.stable_secs
        ),
        "yes",
        format!(
            "{} after {}",
            if quiet { "yes" } else { "no" },
            secs(quiet_began.elapsed())
        ),
        quiet,
    );

    // The measured window.
    let window = Duration::from_secs(args.scale_window_secs);
    let stats = Arc::new(Mutex::new(ExpiryStats::default()));
    let (reader, writer) = reflector::store::<Secret>();
    let watch_api: Api<Secret> = Api::namespaced(c.client.clone(), NS);
    let watch_task = tokio::spawn(async move {
        let cfg = watcher::Config::default().labels(OUTPUT_SELECTOR);
        let stream = watcher(watch_api, cfg).default_backoff().reflect(writer);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                log!("scalefault: secret watch error: {e}");
            }
        }
    });
    let is_oauth = |s: &Secret| s.name_any().starts_with(Kind::OAuth.prefix());
    let sample_task = {
        let (stats, ts, reader) = (stats.clone(), ts.clone(), reader.clone());
        tokio::spawn(async move {
            let mut last_seen = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = Timestamp::now();
                let mut st = lock(&stats);
                for s in reader.state().iter().filter(|s| is_oauth(s)) {
                    check_secret(s, &ts, now, &mut st, &mut last_seen);
                }
                st.samples += 1;
            }
        })
    };
    let list_task = {
        let (stats, ts) = (stats.clone(), ts.clone());
        let api: Api<Secret> = Api::namespaced(c.client.clone(), NS);
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
                        for s in list.items.iter().filter(|s| is_oauth(s)) {
                            check_secret(s, &ts, now, &mut st, &mut last_seen);
                        }
                        st.list_samples += 1;
                    }
                    Err(e) => log!("scalefault: list failed: {e}"),
                }
            }
        })
    };
    let flaps_before: u64 = {
        let st = lock(&statuses.state);
        healthy
            .iter()
            .filter_map(|n| st.get(n))
            .map(|c| c.flaps)
            .sum()
    };
    let w0 = SystemTime::now();
    let iw0 = Instant::now();
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let req0 = c.requests().await?;
    let metrics0 = op.metrics().await.unwrap_or_default();
    log!(
        "scalefault: measuring {} s (token lifetime {} s), {} new connections during it",
        window.as_secs(),
        ttl.as_secs(),
        args.scale_latency_count
    );
    // New healthy connections during the fault, spread over the window, one at a time.
    let mut lat = Vec::new();
    let mut lat_failed = 0usize;
    let per_timeout = Duration::from_secs(30);
    let step = window / (args.scale_latency_count as u32 + 1);
    for i in 0..args.scale_latency_count {
        let due = iw0 + step * (i as u32 + 1);
        tokio::time::sleep_until(due.into()).await;
        let (creds, vc) = connection(Kind::Probe, i, &token_url, &closed_url)?;
        retry("creating a credentials Secret", || {
            create_ok(&secrets, &creds)
        })
        .await?;
        let name = vc.name_any();
        let t0 = Instant::now();
        retry("creating a VaultConnection", || create_ok(&vcs, &vc)).await?;
        loop {
            if let Some(t) = tracker.ready_at(&name) {
                lat.push(t.saturating_duration_since(t0));
                break;
            }
            if t0.elapsed() > per_timeout {
                lat_failed += 1;
                log!("scalefault: {name} not Ready after {}", secs(per_timeout));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    while iw0.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(10).min(window - iw0.elapsed())).await;
        log!(
            "scalefault: {:.0}/{} s, {} token server calls so far, {} expired seen, operator RSS {}",
            iw0.elapsed().as_secs_f64(),
            window.as_secs(),
            ts.call_count(),
            lock(&stats).expired.len(),
            mib(rss_kb(&op))
        );
    }
    let w1 = SystemTime::now();
    let cpu1 = cpu_secs(pid).unwrap_or(0.0);
    let req1 = c.requests().await?;
    let metrics1 = op.metrics().await.unwrap_or_default();
    sample_task.abort();
    list_task.abort();
    watch_task.abort();
    let hwm = hwm_kb(&op)?;
    let dur = w1.duration_since(w0).unwrap_or(window).as_secs_f64();
    let (w0u, w1u) = (Timestamp::try_from(w0)?, Timestamp::try_from(w1)?);

    // Healthy connections: Ready throughout, never expired, refreshed on schedule.
    let probes: Vec<String> = (0..args.scale_latency_count)
        .map(|i| format!("{}{i}", Kind::Probe.prefix()))
        .collect();
    let (not_ready_now, flaps) = {
        let st = lock(&statuses.state);
        let not_ready = healthy
            .iter()
            .chain(probes.iter().take(lat.len()))
            .filter(|n| !st.get(*n).is_some_and(|c| c.ready))
            .count();
        let flaps: u64 = healthy
            .iter()
            .filter_map(|n| st.get(n))
            .map(|c| c.flaps)
            .sum();
        (not_ready, flaps - flaps_before)
    };
    rep.invariant(
        PHASE,
        &format!("healthy connections that left Ready during the {dur:.0} s window"),
        "0",
        format!("{flaps}"),
        flaps == 0,
    );
    rep.invariant(
        PHASE,
        "healthy connections not Ready at the end of the window",
        "0",
        format!("{not_ready_now}"),
        not_ready_now == 0,
    );
    let expired = lock(&stats).expired.len();
    rep.invariant(
        PHASE,
        &format!("expired tokens seen in a healthy oauth2 Secret (M={m}; watch sampled every 1 s + LIST every 5 s)"),
        "0",
        format!("{expired}"),
        expired == 0,
    );
    let calls = ts.calls();
    let mut by_client: HashMap<String, Vec<SystemTime>> = HashMap::new();
    for call in &calls {
        if let Some(id) = &call.client_id {
            by_client.entry(id.clone()).or_default().push(call.at);
        }
    }
    let (mut actual, mut ideal) = (0u64, 0u64);
    for i in 0..m {
        let mut times = by_client
            .remove(&Kind::OAuth.client_id(i))
            .unwrap_or_default();
        times.sort();
        actual += times.iter().filter(|t| **t > w0 && **t <= w1).count() as u64;
        let Some(start) = times.iter().rev().find(|t| **t <= w0).or(times.first()) else {
            continue;
        };
        let key = format!("{NS}/{}{i}", Kind::OAuth.prefix());
        ideal += ideal_refreshes(Timestamp::try_from(*start)?, ttl, &key, w0u, w1u);
    }
    let dev = if ideal > 0 {
        (actual as f64 - ideal as f64) / ideal as f64 * 100.0
    } else {
        0.0
    };
    rep.check(
        PHASE,
        &format!(
            "healthy oauth2 token requests in {dur:.0} s vs the schedule's ideal (as in phase 5)"
        ),
        "within ±5 %",
        format!("{actual} vs {ideal} ({dev:+.1} %)"),
        dev.abs() <= 5.0,
    );
    let maxc = ts.max_concurrent_per_client();
    rep.invariant(
        PHASE,
        "max simultaneous token requests of one connection",
        "1",
        format!("{maxc}"),
        maxc <= 1,
    );

    // The work queue: new connections during the fault.
    lat.sort();
    rep.invariant(
        PHASE,
        &format!(
            "new apiKey connections Ready within 30 s while the broken ones fail ({} sequential, spread over the window)",
            args.scale_latency_count
        ),
        &format!("{}", args.scale_latency_count),
        format!("{}", args.scale_latency_count - lat_failed),
        lat_failed == 0,
    );
    let p50 = percentile(&lat, 50.0);
    let p99 = percentile(&lat, 99.0);
    rep.info(
        PHASE,
        "new connection create → Ready p50 (watch)",
        secs(p50),
    );
    rep.check(
        PHASE,
        &format!(
            "new connection create → Ready p99 with {n} existing, {} broken",
            broken.len()
        ),
        "≤ 1 s",
        secs(p99),
        lat_failed == 0 && p99 <= Duration::from_secs(1),
    );

    // The provider budget.
    let run_secs = phase_began.elapsed().as_secs_f64();
    let per_conn = |kind: Kind, by_client: &HashMap<String, Vec<SystemTime>>| -> Vec<usize> {
        (0..broken_each)
            .map(|i| by_client.get(&kind.client_id(i)).map_or(0, |v| v.len()))
            .collect()
    };
    let bad = per_conn(Kind::BadCreds, &by_client);
    let bad_max = bad.iter().copied().max().unwrap_or(0);
    let bad_total: usize = bad.iter().sum();
    // Terminal: one request, then none until the inputs change or the hour is up.
    let bad_bound = 1 + (run_secs / schedule::terminal_retry_interval().as_secs_f64()) as usize;
    rep.invariant(
        PHASE,
        &format!(
            "token requests per bad-credentials connection over the phase ({:.0} s; token server's log)",
            run_secs
        ),
        &format!("≤ {bad_bound} (terminal: retried after 1 h or a change)"),
        format!("max {bad_max}, total {bad_total} for {broken_each}"),
        bad_max <= bad_bound,
    );
    let inv_total: usize = per_conn(Kind::InvalidSpec, &by_client).iter().sum();
    rep.invariant(
        PHASE,
        "token requests of invalid-spec connections (token server's log)",
        "0",
        format!("{inv_total}"),
        inv_total == 0,
    );
    // Unreachable: attempts seen through `failedRefreshAttempts`, against the backoff schedule.
    let (unreach_max_min, unreach_bound, unreach_total, unreach_ideal, worst) = {
        let st = lock(&statuses.state);
        let mut max_per_min = 0usize;
        let mut bound = 0usize;
        let mut total = 0u64;
        let mut ideal_total = 0usize;
        let mut worst = String::new();
        for (_, name) in broken.iter().filter(|(k, _)| *k == Kind::Unreachable) {
            let Some(cs) = st.get(name) else { continue };
            let Some(first) = cs.attempt_log.first().map(|a| a.0) else {
                continue;
            };
            let mut times = Vec::new();
            for (at, k) in &cs.attempt_log {
                for _ in 0..*k {
                    times.push(at.saturating_duration_since(first).as_secs_f64());
                }
            }
            total += times.len() as u64;
            let mine = max_in_span(&times, 60.0);
            let series = backoff_series(&format!("{NS}/{name}"), first.elapsed().as_secs_f64());
            ideal_total += series.len();
            // One attempt of slack: the watch can see two status writes close together.
            let allowed = max_in_span(&series, 60.0) + 1;
            bound = bound.max(allowed);
            if mine > max_per_min {
                max_per_min = mine;
                worst = format!(
                    "{name}: {} attempts, schedule {}",
                    times.len(),
                    series.len()
                );
            }
            if mine > allowed {
                worst = format!("{name} exceeds: {mine} in 60 s vs {allowed}");
            }
        }
        (max_per_min, bound, total, ideal_total, worst)
    };
    let unreach_failures = labelled_metric(
        &metrics1,
        "vaultconn_token_refresh_failures_total",
        "reason=\"TokenEndpointUnreachable\"",
    );
    rep.invariant(
        PHASE,
        "token requests per unreachable connection in any 60 s (status failedRefreshAttempts, seen by watch)",
        &format!("≤ the backoff schedule's most in 60 s + 1 = {unreach_bound}"),
        format!("max {unreach_max_min}"),
        unreach_max_min <= unreach_bound && unreach_bound > 0,
    );
    rep.info(
        PHASE,
        &format!("token requests of the {broken_each} unreachable connections over the phase"),
        format!(
            "{unreach_total} (schedule: {unreach_ideal}; operator's failure counter: {unreach_failures:.0})"
        ),
    );

    // API requests of the broken connections while idle (audit log, by object name).
    tokio::time::sleep(Duration::from_secs(1)).await;
    audit.poll()?;
    let range = Some((w0u, w1u));
    let win = |k: Kind| audit.count(k, range);
    let tot = |k: Kind| audit.count(k, None);
    let unreach_attempts_in_window = {
        let st = lock(&statuses.state);
        let iw1 = iw0 + Duration::from_secs_f64(dur);
        broken
            .iter()
            .filter(|(k, _)| *k == Kind::Unreachable)
            .filter_map(|(_, n)| st.get(n))
            .flat_map(|c| c.attempt_log.iter())
            .filter(|(at, _)| *at >= iw0 && *at <= iw1)
            .map(|(_, k)| u64::from(*k))
            .sum::<u64>()
    };
    for kind in [Kind::BadCreds, Kind::InvalidSpec] {
        let w = win(kind);
        rep.invariant(
            PHASE,
            &format!(
                "API requests for the {broken_each} {} connections in the {dur:.0} s window, \
                 reads and dry runs included (audit log)",
                kind.label()
            ),
            "0",
            format!("{}", w.all()),
            w.all() == 0,
        );
    }
    // Each failed attempt writes its status (attempt count, next retry) and may post an Event;
    // before a request it dry-runs its two Secret writes and reads its Secrets.
    let w = win(Kind::Unreachable);
    let per_attempt = |x: u64| x as f64 / unreach_attempts_in_window.max(1) as f64;
    rep.invariant(
        PHASE,
        &format!(
            "API writes for the {broken_each} unreachable connections in the window (audit log)"
        ),
        &format!(
            "≤ 2 per failed attempt in it ({unreach_attempts_in_window} attempts → {})",
            2 * unreach_attempts_in_window
        ),
        format!("{} ({:.2} per attempt)", w.writes, per_attempt(w.writes)),
        w.writes <= 2 * unreach_attempts_in_window,
    );
    rep.invariant(
        PHASE,
        "API requests of any kind for the unreachable connections in the window (audit log)",
        &format!(
            "≤ 10 per failed attempt ({})",
            10 * unreach_attempts_in_window
        ),
        format!(
            "{} ({:.2} per attempt: {})",
            w.all(),
            per_attempt(w.all()),
            w.show()
        ),
        w.all() <= 10 * unreach_attempts_in_window,
    );
    // Crashes: the process exited by itself, or a panic in its log.
    let exited = op.exit_status();
    let panics = op.logs().matches("panicked").count();
    rep.invariant(
        PHASE,
        "operator crashes during the phase (exits, panics in its log)",
        "0",
        format!(
            "{} (exited: {}, panics logged: {panics})",
            usize::from(exited.is_some()) + panics,
            exited.map_or("no".to_string(), |s| s.to_string())
        ),
        exited.is_none() && panics == 0,
    );
    let (breakdown, max_conn) = audit.broken_breakdown(w0u, w1u);
    rep.detail(format!(
        "scalefault: API requests by connection kind (audit log, object requests in {NS}): \
         window: {}; whole phase: {}; broken connections' requests in the window: {}; most by one \
         broken connection {max_conn}; {} audit events, {} not attributable to a connection",
        Kind::ALL
            .iter()
            .map(|k| format!("{} {}", k.label(), win(*k).show()))
            .collect::<Vec<_>>()
            .join("; "),
        Kind::ALL
            .iter()
            .map(|k| format!("{} {}", k.label(), tot(*k).show()))
            .collect::<Vec<_>>()
            .join("; "),
        fmt_breakdown(&breakdown),
        audit.lines,
        audit.unattributed
    ));
    let reqs = diff_requests(&req0, &req1, false);
    let attempts = |t: &str| parse_metric_total(t, "vaultconn_token_refresh_attempts");
    let reconciles = |t: &str| parse_metric_total(t, "vaultconn_reconciles");
    let cpu = cpu1 - cpu0;
    rep.info(
        PHASE,
        &format!("operator CPU (utime+stime) over the {dur:.0} s window"),
        format!("{cpu:.2} s ({:.1} % of one core)", cpu / dur * 100.0),
    );
    rep.detail(format!(
        "scalefault: in the window the operator sent {:.0} token requests and ran {:.0} reconciles; \
         kube-apiserver /metrics (all clients): {}; {} writes in all; peak RSS {}",
        attempts(&metrics1) - attempts(&metrics0),
        reconciles(&metrics1) - reconciles(&metrics0),
        fmt_breakdown(&reqs),
        write_total(&reqs),
        mib(hwm)
    ));
    if let (Some(min), Some(max)) = (lat.first(), lat.last()) {
        rep.detail(format!(
            "scalefault: new connections during the fault: min {}, p50 {}, p99 {}, max {} over {}; \
             unreachable worst: {worst}; smallest remaining lifetime of a healthy token {}",
            secs(*min),
            secs(p50),
            secs(p99),
            secs(*max),
            lat.len(),
            lock(&stats)
                .min_margin_ms
                .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "—".into())
        ));
    }
    op.stop(Duration::from_secs(30));
    drop(closed);
    // Watches first: kube-apiserver waits for open watches when it is stopped.
    drop(tracker);
    drop(statuses);
    // The audit log is large at full size and holds nothing the report does not.
    if rep.failures.is_empty() {
        let _ = std::fs::remove_file(&audit_log);
    }
    drop(c);
    Ok(())
}

/// An unlabelled counter from the operator's metrics text (`name` or `name_total`).
fn parse_metric_total(text: &str, name: &str) -> f64 {
    vaultconn_testkit::operator::parse_metric(text, name).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_of_audited_objects() {
        assert_eq!(
            owner_of("secrets", "unreach-3-vaultconn-state"),
            "unreach-3"
        );
        assert_eq!(owner_of("secrets", "badcreds-1-creds"), "badcreds-1");
        assert_eq!(owner_of("secrets", "oauth-7"), "oauth-7");
        assert_eq!(owner_of("events", "invalid-2.17f3a9c0d1e2"), "invalid-2");
        assert_eq!(Kind::of("oauth-7"), Some(Kind::OAuth));
        assert_eq!(Kind::of("ok-7"), Some(Kind::ApiKey));
        assert_eq!(Kind::of("kubernetes"), None);
    }

    #[test]
    fn backoff_bound_counts_the_first_minute() {
        let s = backoff_series("bench-scale/unreach-0", 600.0);
        // 1 s, 2 s, 4 s, … (less up to 20 % jitter): 6 or 7 attempts in the first minute.
        let first = max_in_span(&s, 60.0);
        assert!((6..=7).contains(&first), "{s:?}");
        assert_eq!(max_in_span(&[0.0, 10.0, 59.9, 60.0, 61.0], 60.0), 4);
        assert_eq!(max_in_span(&[0.0, 60.0, 120.0], 60.0), 1);
    }
}
