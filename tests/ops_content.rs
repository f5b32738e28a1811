//! The operations content the chart ships — alert rules, Grafana dashboard, Argo CD health
//! check — checked against the operator itself: the rules pass `promtool test rules`, every
//! `vaultconn_*` name a query uses is one the operator exposes, the dashboard's queries parse,
//! and the Lua health check gives the expected health for its fixtures and for a status of every
//! reason the operator can set. Needs `promtool` (Debian package `prometheus`) and `lua5.1`;
//! without them the tests fail and say so (`.ci/run` installs both).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{json, Value};
use vaultconn::api::{Phase, VaultConnection, VaultConnectionStatus};
use vaultconn::metrics::Metrics;
use vaultconn::reason::Reason;
use vaultconn::status::{self, OAuthStatus, Outcome};

fn files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/vaultconn/files")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `name` on PATH, or a failure that says how to get it: a missing tool must never turn into a
/// silently skipped test.
fn tool(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed, so the ops content cannot be tested. Install it with \
             `apt-get install -y {package}` (.ci/run does this)."
        )
    })
}

fn promtool() -> PathBuf {
    tool("promtool", "prometheus")
}

fn lua() -> PathBuf {
    tool("lua5.1", "lua5.1")
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

fn alerts() -> Vec<Value> {
    let rules = yaml(&files().join("prometheus-rules.yaml"));
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

// ---- alert rules ----------------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = promtool();
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "prometheus-rules.yaml"])
            .current_dir(files()),
        "promtool check rules",
    );
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "prometheus-rules.test.yaml"])
            .current_dir(files()),
        "promtool test rules",
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// What the brief of every alert promises: it is tested firing and not firing, it explains
/// itself, and its runbook link leads to a section of the operations docs.
#[test]
fn every_alert_is_tested_both_ways_and_points_at_its_runbook() {
    let tests = yaml(&files().join("prometheus-rules.test.yaml"));
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    let docs = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"));
    let names: Vec<String> = alerts()
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    assert!(names.len() >= 4, "alerts: {names:?}");
    for name in &names {
        let of_alert: Vec<&&Value> = cases.iter().filter(|c| c["alertname"] == **name).collect();
        let firing = |c: &&&Value| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
        assert!(
            of_alert.iter().any(firing),
            "{name}: no test where it fires"
        );
        assert!(
            of_alert.iter().any(|c| !firing(c)),
            "{name}: no test where it stays quiet"
        );
        let rule = alerts()
            .into_iter()
            .find(|r| r["alert"] == **name)
            .expect("listed above");
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: annotation {key}"
            );
        }
        let anchor = name.to_lowercase();
        assert_eq!(
            rule["annotations"]["runbook_url"].as_str(),
            Some(format!("README.md#{anchor}").as_str()),
            "{name}: runbook_url"
        );
        assert!(
            docs.lines()
                .any(|l| l.starts_with('#') && l.trim_start_matches('#').trim() == name),
            "README.md has no heading `{name}` (the runbook anchor #{anchor})"
        );
    }
}

// ---- metric names -----------------------------------------------------------------------------

/// Every series name the operator exposes, from a fresh `Metrics` with one connection of each
/// kind of series and every labelled family populated.
fn exposed_series_names() -> BTreeSet<String> {
    let m = Metrics::default();
    m.connection_seen("ns", "api", "uid-1");
    let mut o = Outcome::new(Reason::Reconciled, "ok");
    o.oauth = Some(OAuthStatus {
        expires_at: Some("2030-01-01T00:00:00Z".into()),
        next_refresh_time: Some("2029-12-31T23:40:00Z".into()),
        ..Default::default()
    });
    m.report("ns", "api", "uid-1", &o);
    m.failure(Reason::RateLimited.metric_label());
    m.reconcile_errors
        .get_or_create(&vaultconn::metrics::ReasonLabel {
            reason: "Conflict".into(),
        })
        .inc();
    m.refresh_duration.observe(0.1);
    m.reconcile_duration.observe(0.1);
    let text = m.encode();
    let families: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next().map(str::to_string))
        .collect();
    let names: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect();
    // The sample is complete: every family has at least one series.
    for f in &families {
        assert!(
            names.iter().any(|n| n.starts_with(f.as_str())),
            "family {f} has no series in the sample:\n{text}"
        );
    }
    names
}

/// `vaultconn_*` names in `text` (metric names: letters, digits, `_`, `:`).
fn vaultconn_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("vaultconn_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn dashboard_and_alerts_use_only_metrics_the_operator_exposes() {
    let exposed = exposed_series_names();
    for file in ["grafana-dashboard.json", "prometheus-rules.yaml"] {
        let used = vaultconn_names(&read(&files().join(file)));
        assert!(used.len() >= 5, "{file}: found only {used:?}");
        let unknown: Vec<&String> = used.difference(&exposed).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the operator does not expose: {unknown:?}\nexposed: {exposed:?}"
        );
    }
}

#[test]
fn the_name_check_sees_a_misspelt_or_suffixless_name() {
    let exposed = exposed_series_names();
    let used = vaultconn_names(
        "rate(vaultconn_token_refresh_failures[5m]) + vaultconn_connection_redy + vaultconn_reconcile_duration_seconds_bucket",
    );
    let unknown: Vec<&String> = used.difference(&exposed).collect();
    assert_eq!(
        unknown,
        [
            "vaultconn_connection_redy",
            "vaultconn_token_refresh_failures"
        ]
    );
}

/// Every query of the dashboard, as PromQL `promtool` accepts (template variables filled in).
#[test]
fn dashboard_queries_are_valid_promql() {
    let dash: Value = serde_json::from_str(&read(&files().join("grafana-dashboard.json")))
        .expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 10, "queries found: {exprs:?}");
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e
                .replace("$__rate_interval", "5m")
                .replace("$job", ".*")
                .replace("$namespace", ".*");
            json!({"record": format!("dashboard:query:{i}"), "expr": e})
        })
        .collect();
    let file = std::env::temp_dir().join(format!(
        "vaultconn-dashboard-queries-{}.json",
        std::process::id()
    ));
    // promtool reads YAML; JSON is YAML.
    std::fs::write(
        &file,
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let result = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&file)
        .output();
    let _ = std::fs::remove_file(&file);
    let out = result.expect("running promtool");
    assert!(
        out.status.success(),
        "dashboard queries do not parse:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The operations docs list every metric the operator exposes.
#[test]
fn docs_list_every_metric() {
    let docs = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"));
    let text = Metrics::default().encode();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (family, kind) = line.split_once(' ').expect("name and type");
        let shown = if kind == "counter" {
            format!("`{family}_total`")
        } else {
            format!("`{family}`")
        };
        let row = docs
            .lines()
            .find(|l| l.starts_with('|') && l.contains(&shown))
            .unwrap_or_else(|| panic!("README.md: no table row for {shown}"));
        assert!(
            row.contains(kind),
            "{shown}: the row does not say {kind}: {row}"
        );
    }
}

// ---- Argo CD health check -------------------------------------------------------------------

/// A Lua 5.1 table constructor for a JSON value (how Argo CD hands `obj` to the script).
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(lua_literal).collect();
            format!("{{{}}}", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            // Decimal escapes are byte-exact in Lua 5.1 (newlines, control and UTF-8 bytes).
            _ => out.push_str(&format!("\\{b}")),
        }
    }
    out.push('"');
    out
}

/// `(status, message)` the health script returns for `obj`, run by the real `lua5.1`.
fn health_of(obj: &Value) -> (String, String) {
    let script = files().join("argocd-health.lua");
    let program = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(tostring(hs.status), \"\\n\", tostring(hs.message))\n",
        lua_literal(obj),
        lua_string(&script.to_string_lossy())
    );
    let mut child = Command::new(lua())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lua5.1");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(program.as_bytes()).expect("writing to lua");
    }
    let out = child.wait_with_output().expect("lua5.1 output");
    assert!(
        out.status.success(),
        "lua5.1 failed for {obj}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

#[test]
fn argocd_health_check_gives_the_expected_health_for_each_fixture() {
    let dir = files().join("argocd-health-tests");
    let cases = yaml(&dir.join("health_test.yaml"));
    let cases = cases["tests"].as_array().expect("tests");
    assert!(cases.len() >= 8);
    let mut failures = Vec::new();
    for case in cases {
        let input = case["inputPath"].as_str().expect("inputPath");
        let obj = yaml(&dir.join(input));
        let want = (
            case["healthStatus"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            case["healthStatus"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        let got = health_of(&obj);
        if got != want {
            failures.push(format!("{input}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The fixtures are objects the operator could have written: they parse as `VaultConnection`,
/// and their status survives a round trip through the real status type (no misspelt field),
/// with a reason whose phase is the fixture's phase.
#[test]
fn argocd_fixtures_are_real_vaultconnection_objects() {
    let dir = files().join("argocd-health-tests/testdata");
    let mut phases = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("testdata") {
        let path = entry.expect("entry").path();
        let obj = yaml(&path);
        let vc: VaultConnection = serde_json::from_value(obj.clone())
            .unwrap_or_else(|e| panic!("{}: not a VaultConnection: {e}", path.display()));
        let Some(status) = obj.get("status") else {
            continue;
        };
        let typed: VaultConnectionStatus = serde_json::from_value(status.clone()).unwrap();
        assert_eq!(
            &serde_json::to_value(&typed).unwrap(),
            status,
            "{}: status fields the operator does not write",
            path.display()
        );
        let st = vc.status.expect("status");
        if let Some(phase) = st.phase {
            phases.insert(format!("{phase:?}"));
        }
        if let Some(c) = st.conditions.iter().find(|c| c.type_ == "Ready") {
            let reason = Reason::parse(&c.reason)
                .unwrap_or_else(|| panic!("{}: unknown reason {}", path.display(), c.reason));
            assert_eq!(Some(reason.phase()), st.phase, "{}", path.display());
            assert_eq!(c.status == "True", reason.is_ready(), "{}", path.display());
        }
    }
    let all: BTreeSet<String> = ["Failed", "Pending", "Ready", "Suspended"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(phases, all, "a fixture for every phase");
}

/// For every reason the operator can set, the status `desired_status` writes gets the health
/// its phase calls for, with the reason in the message (and, for Pending, the message naming
/// what is missing).
#[test]
fn argocd_health_check_covers_every_reason_the_operator_sets() {
    let base: VaultConnection = serde_json::from_value(json!({
        "apiVersion": "vaultconn.dev/v1alpha1",
        "kind": "VaultConnection",
        "metadata": {"name": "api", "namespace": "ns", "generation": 2},
        "spec": {"type": "oauth2", "credentialsRef": {"name": "creds"}, "oauth2": {"tokenUrl": "https://id.example/token"}}
    }))
    .unwrap();
    let now = Time("2026-03-01T10:00:00Z".parse().unwrap());
    let mut failures = Vec::new();
    for reason in Reason::ALL {
        let message = format!("what {} means for ns/api", reason.as_str());
        let mut outcome = Outcome::new(*reason, message.clone());
        if *reason == Reason::CredentialsMissing {
            outcome.missing_keys = vec!["client_secret".into()];
        }
        let mut vc = base.clone();
        vc.status = Some(status::desired_status(&base, &outcome, now.clone()));
        let want = match reason.phase() {
            Phase::Ready => "Healthy",
            Phase::Pending => "Progressing",
            Phase::Failed => "Degraded",
            Phase::Suspended => "Suspended",
        };
        let (got, got_message) = health_of(&serde_json::to_value(&vc).unwrap());
        let want_message = format!("{}: {message}", reason.as_str());
        if got != want || got_message != want_message {
            failures.push(format!(
                "{reason}: got ({got}, {got_message:?}), want ({want}, {want_message:?})"
            ));
        }
        // The same status for an older generation: not settled yet.
        let mut behind = vc.clone();
        behind.metadata.generation = Some(3);
        let (got, _) = health_of(&serde_json::to_value(&behind).unwrap());
        if got != "Progressing" {
            failures.push(format!("{reason} for generation 2 of 3: got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn lua_literals_carry_any_string_exactly() {
    let tricky = "quote \" backslash \\ newline \n tab \t é ✓ ]]";
    let obj = json!({"metadata": {"generation": 1}, "status": {"phase": "Failed", "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": tricky}]}});
    assert_eq!(
        health_of(&obj),
        ("Degraded".to_string(), format!("InvalidSpec: {tricky}"))
    );
}
