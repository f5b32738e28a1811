//! "Every RBAC rule is needed" (issue 11, "RBAC proven"): for each verb of each resource the
//! chart grants the operator (its namespaced Role, whose rules equal its ClusterRole's, and the
//! Lease Role), the operator runs as the chart's ServiceAccount with that one verb taken away,
//! and one named step of a scenario must fail while the API server refuses exactly that verb.
//! With the full Role the same scenario passes every step and nothing is refused.
//!
//! All variants run at once, each in its own namespace (release and watched namespace in one)
//! with its own ServiceAccount, Lease, operator process and API proxy; the proxy records what
//! the API server answered, so "refused" is what the other side said, not what the operator
//! logged. This binary has its own control plane and no shared operator.
mod chart_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use serde_json::{json, Value};
use support::objects::{apply_vc, data_of, phase, put_secret};
use support::{cluster, test_namespace, TestNs};
use vaultconn::api::{Phase, VaultConnection};
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};

use chart_support::{
    apply_namespaced_rbac, chart_dir, render_namespaced, render_release, rendered,
    rendered_operator_args, rendered_service_account, service_account_via_proxy,
};

const RELEASE: &str = "rr";
/// The operator's Role and the Lease Role as the chart names them for release `rr`.
const OPERATOR_ROLE: &str = "rr-vaultconn";
const LEASE_ROLE: &str = "rr-vaultconn-leader-election";
const LEASE: &str = "rr-vaultconn";
/// Short, so that the scenario can wait out one lease period (see `scenario`).
const LEASE_DURATION: Duration = Duration::from_secs(6);
/// How long each step may take, in every variant alike: the full Role must pass each step
/// within it, a variant without a rule must not.
const WINDOW: Duration = Duration::from_secs(30);

/// The steps of the scenario, in order. A variant stops at the first step that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Lease,
    Served,
    Status,
    Readyz,
    Propagates,
    Announced,
    Series,
}

impl Step {
    fn says(self) -> &'static str {
        match self {
            Step::Lease => "the operator acquires its Lease",
            Step::Served => {
                "a connection created a lease period after that gets its generated Secret"
            }
            Step::Status => "the connection's status says Ready",
            Step::Readyz => "/readyz answers 200 (connection and Secret caches synced)",
            Step::Propagates => "a change of the credentials reaches the generated Secret",
            Step::Announced => "that update is announced by a SecretUpdated Event",
            Step::Series => "a second update makes that Event a series of 2",
        }
    }
}

/// Why each rule is needed: the step that fails without it, and what breaks. Every rule the
/// chart renders must be listed here, and nothing else (checked against the render).
const NEEDED: &[(&str, &str, Step, &str)] = &[
    (
        "vaultconnections",
        "list",
        Step::Served,
        "the controller cannot list connections, so it stops at start-up",
    ),
    (
        "vaultconnections",
        "watch",
        Step::Served,
        "a connection created after start-up is never seen",
    ),
    (
        "vaultconnections/status",
        "patch",
        Step::Status,
        "the Secret is written, but the status never says so",
    ),
    (
        "secrets",
        "get",
        Step::Served,
        "the credentials cannot be read",
    ),
    (
        "secrets",
        "list",
        Step::Readyz,
        "the Secret cache never syncs, so the operator never reports ready",
    ),
    (
        "secrets",
        "watch",
        Step::Readyz,
        "the Secret watch is refused, so the operator never reports ready (and a change of the credentials is never noticed)",
    ),
    (
        "secrets",
        "create",
        Step::Served,
        "the generated Secret cannot be created",
    ),
    (
        "secrets",
        "update",
        Step::Propagates,
        "a change of the credentials cannot be written to the generated Secret",
    ),
    (
        "events",
        "create",
        Step::Announced,
        "no Event can be recorded",
    ),
    (
        "events",
        "patch",
        Step::Series,
        "a repeated Event cannot be counted (kube's recorder patches the series)",
    ),
    (
        "leases",
        "create",
        Step::Lease,
        "the Lease cannot be created",
    ),
    (
        "leases",
        "get",
        Step::Lease,
        "the election cannot read the Lease",
    ),
    (
        "leases",
        "patch",
        Step::Lease,
        "the Lease cannot be acquired or renewed",
    ),
    (
        "leases",
        "list",
        Step::Served,
        "the leader's watch of its Lease cannot start, so its write gate never opens",
    ),
    (
        "leases",
        "watch",
        Step::Served,
        "the leader sees no renewal after its first read of the Lease, so its write gate \
         closes within a lease period",
    ),
];

/// One rule: a verb on a resource.
type Rule = (String, String);

fn label(rule: Option<&Rule>) -> String {
    rule.map_or_else(|| "full Role".into(), |(r, v)| format!("{r} {v}"))
}

/// Every (resource, verb) the rendered Roles `roles` grant.
fn granted(objs: &[Value], roles: &[&str]) -> BTreeSet<Rule> {
    let mut out = BTreeSet::new();
    for role in roles {
        let role = objs
            .iter()
            .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == *role)
            .unwrap_or_else(|| panic!("the chart renders no Role {role}"));
        for rule in role["rules"].as_array().into_iter().flatten() {
            for resource in rule["resources"].as_array().into_iter().flatten() {
                for verb in rule["verbs"].as_array().into_iter().flatten() {
                    let (r, v) = (resource.as_str(), verb.as_str());
                    out.insert((r.unwrap_or("?").into(), v.unwrap_or("?").into()));
                }
            }
        }
    }
    out
}

/// Take `verb` on `resource` out of every Role in `objs`; how many rules lost it. A rule that
/// also covers other resources is split, so that they keep the verb.
fn revoke(objs: &mut [Value], (resource, verb): &Rule) -> usize {
    let mut removed = 0;
    for role in objs.iter_mut().filter(|o| o["kind"] == "Role") {
        let Some(rules) = role["rules"].as_array() else {
            continue;
        };
        let mut kept = Vec::new();
        for rule in rules {
            let has = |field: &str, v: &str| {
                rule[field]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == v))
            };
            if !(has("resources", resource) && has("verbs", verb)) {
                kept.push(rule.clone());
                continue;
            }
            removed += 1;
            let others: Vec<&Value> = rule["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| *r != resource.as_str())
                .collect();
            if !others.is_empty() {
                let mut rest = rule.clone();
                rest["resources"] = json!(others);
                kept.push(rest);
            }
            let verbs: Vec<&Value> = rule["verbs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| *v != verb.as_str())
                .collect();
            if !verbs.is_empty() {
                let mut this = rule.clone();
                this["resources"] = json!([resource]);
                this["verbs"] = json!(verbs);
                kept.push(this);
            }
        }
        role["rules"] = json!(kept);
    }
    removed
}

/// The RBAC (resource, verb) an API request needs, from its method, path and query.
fn rbac_of(method: &Method, path: &str, query: Option<&str>) -> Option<Rule> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", _, rest @ ..] | ["apis", _, _, rest @ ..] => rest,
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, r @ ..] if !r.is_empty() => r,
        r => r,
    };
    let (resource, named) = match rest {
        [r] => (r.to_string(), false),
        [r, _name] => (r.to_string(), true),
        [r, _name, sub] => (format!("{r}/{sub}"), true),
        _ => return None,
    };
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if !named => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if !named => "deletecollection",
        Method::DELETE => "delete",
        _ => return None,
    };
    Some((resource, verb.into()))
}

/// Poll `f` until it holds (`Some(time taken)`) or `window` has passed (`None`).
async fn within<F, Fut>(window: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= window {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn generated_key(ns: &TestNs) -> Option<String> {
    let s = ns.api::<Secret>().get_opt("conn").await.ok()??;
    data_of(&s).get("api_key").cloned()
}

async fn secret_updated_series(ns: &TestNs) -> Option<i32> {
    let events = ns.api::<Event>().list(&Default::default()).await.ok()?;
    events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SecretUpdated"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .max()
}

/// The scenario, step by step: the steps passed (with the time each took) and the first one
/// that failed, if any.
async fn scenario(
    ns: &TestNs,
    op: Option<&OperatorProcess>,
    instance: &str,
) -> (Vec<(Step, Duration)>, Option<Step>) {
    let mut passed = Vec::new();
    macro_rules! step {
        ($step:expr, $cond:expr) => {
            match within(WINDOW, || $cond).await {
                Some(took) => passed.push(($step, took)),
                None => return (passed, Some($step)),
            }
        };
    }
    let holder = format!("{instance}_");
    // When this operator acquired the Lease (`None`: not yet). An operator that stops right
    // after acquiring it releases it again, which clears the holder but keeps the count of
    // acquisitions; only this operator uses this namespace's Lease.
    let acquired = || async {
        let spec = ns.api::<Lease>().get_opt(LEASE).await.ok()??.spec?;
        let current = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let ours = current.is_some_and(|h| h.starts_with(&holder));
        let released = current.is_none() && spec.lease_transitions.unwrap_or(0) >= 1;
        (ours || released).then(|| {
            spec.acquire_time
                .map_or_else(SystemTime::now, |t| SystemTime::from(t.0))
        })
    };
    step!(Step::Lease, async { acquired().await.is_some() });
    // The connection comes only after a full lease period: by then a leader that saw the Lease
    // once but no renewal since (no `watch` on leases) has closed its write gate, whichever way
    // its first read raced the acquisition. This is a wait for a point in time, not for luck.
    let acquired = acquired().await.unwrap_or_else(SystemTime::now);
    let until = acquired + LEASE_DURATION + Duration::from_secs(1);
    if let Ok(left) = until.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    put_secret(ns, "creds", &[("api_key", "k-one")]).await;
    apply_vc(
        ns,
        "conn",
        json!({"type": "apiKey", "credentialsRef": {"name": "creds"}}),
    )
    .await;
    step!(Step::Served, async {
        generated_key(ns).await.as_deref() == Some("k-one")
    });
    step!(Step::Status, async {
        let vc = ns
            .api::<VaultConnection>()
            .get_opt("conn")
            .await
            .ok()
            .flatten();
        vc.is_some_and(|v| phase(&v) == Some(Phase::Ready))
    });
    step!(Step::Readyz, async {
        match op {
            Some(op) => op.probe("/readyz").await == Some(200),
            None => false,
        }
    });
    put_secret(ns, "creds", &[("api_key", "k-two")]).await;
    step!(Step::Propagates, async {
        generated_key(ns).await.as_deref() == Some("k-two")
    });
    step!(Step::Announced, async {
        secret_updated_series(ns).await.is_some()
    });
    put_secret(ns, "creds", &[("api_key", "k-three")]).await;
    step!(Step::Series, async {
        generated_key(ns).await.as_deref() == Some("k-three")
            && secret_updated_series(ns).await.is_some_and(|n| n >= 2)
    });
    (passed, None)
}

/// What one variant did.
struct Outcome {
    rule: Option<Rule>,
    passed: Vec<(Step, Duration)>,
    failed: Option<Step>,
    /// What the API server refused (403), as the proxy recorded it.
    refused: BTreeSet<Rule>,
    start_error: Option<String>,
    exited: Option<String>,
    log: std::path::PathBuf,
}

/// Run the scenario as the chart's ServiceAccount, with `rule` taken out of its Roles.
async fn run_variant(rule: Option<Rule>) -> Outcome {
    let tag = rule.as_ref().map_or_else(
        || "full".into(),
        |(r, v)| format!("{r}-{v}").replace('/', "-"),
    );
    let ns = test_namespace(&format!("rr-{tag}")).await;
    let mut objs = render_namespaced(RELEASE, &ns.name).await;
    if let Some(rule) = &rule {
        assert!(
            revoke(&mut objs, rule) > 0,
            "no rendered rule grants {rule:?}"
        );
    }
    apply_namespaced_rbac(&ns, &objs).await;
    let sa = rendered_service_account(&objs);
    let (proxy, kubeconfig) = service_account_via_proxy(&ns, &sa, "operator").await;
    let instance = format!("rr-{tag}");
    let mut extra_args = rendered_operator_args(&objs);
    extra_args.extend([
        "--lease-duration".to_string(),
        format!("{}s", LEASE_DURATION.as_secs()),
        "--instance".to_string(),
        instance.clone(),
    ]);
    let log = cluster()
        .await
        .dir()
        .join(format!("operator-{}.log", ns.name));
    let started = OperatorProcess::start(OperatorOptions {
        binary: env!("CARGO_BIN_EXE_vaultconn").into(),
        kubeconfig,
        log_path: log.clone(),
        extra_args,
        log_filter: "info,vaultconn=debug".into(),
    })
    .await;
    // Without some rules the operator exits at start-up, before or after its metrics endpoint
    // answered: the scenario runs either way (and fails at its first step).
    let (mut op, start_error) = match started {
        Ok(op) => (Some(op), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (passed, failed) = scenario(&ns, op.as_ref(), &instance).await;
    let refused = proxy
        .requests()
        .iter()
        .filter(|r| r.status == 403)
        .map(|r| {
            rbac_of(&r.method, &r.path, r.query.as_deref())
                .unwrap_or_else(|| (format!("{} {}", r.method, r.path), "?".into()))
        })
        .collect();
    let exited = op
        .as_mut()
        .and_then(OperatorProcess::exit_status)
        .map(|s| s.to_string());
    Outcome {
        rule,
        passed,
        failed,
        refused,
        start_error,
        exited,
        log,
    }
}

fn report(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    for o in outcomes {
        let steps: Vec<String> = o
            .passed
            .iter()
            .map(|(s, d)| format!("{s:?} {:.1}s", d.as_secs_f64()))
            .collect();
        out.push_str(&format!(
            "{:<28} passed [{}], failed at {:?}; refused {:?}{}{}\n",
            label(o.rule.as_ref()),
            steps.join(", "),
            o.failed,
            o.refused,
            o.start_error
                .as_ref()
                .map_or_else(String::new, |e| format!("; start: {e}")),
            o.exited
                .as_ref()
                .map_or_else(String::new, |e| format!("; exited: {e}")),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rule_the_chart_grants_is_needed_by_a_named_scenario() {
    // The rules under test: the namespaced render (any namespace: the rules do not depend on
    // it), whose operator rules are also the cluster-wide ClusterRole's.
    let objs = render_namespaced(RELEASE, "rbac-rules").await;
    let cluster_wide = tokio::task::spawn_blocking(|| {
        render_release(&chart_dir(), RELEASE, "rbac-rules", &[]).expect("helm template")
    })
    .await
    .expect("the render task");
    assert_eq!(
        rendered(&cluster_wide, "ClusterRole", OPERATOR_ROLE)["rules"],
        rendered(&objs, "Role", OPERATOR_ROLE)["rules"],
        "the cluster-wide ClusterRole grants what the namespaced Role does, so removing a \
         rule from the Role stands for removing it from either"
    );
    let rules = granted(&objs, &[OPERATOR_ROLE, LEASE_ROLE]);
    let named: BTreeMap<Rule, (Step, &str)> = NEEDED
        .iter()
        .map(|(r, v, step, why)| ((r.to_string(), v.to_string()), (*step, *why)))
        .collect();
    let named_rules: BTreeSet<Rule> = named.keys().cloned().collect();
    assert_eq!(
        rules, named_rules,
        "every rendered rule needs a named scenario here (and every named rule must be rendered)"
    );

    let variants = std::iter::once(None).chain(rules.iter().cloned().map(Some));
    let outcomes = futures::future::join_all(variants.map(run_variant)).await;
    let table = report(&outcomes);
    eprintln!("{table}");

    let mut problems = Vec::new();
    for o in &outcomes {
        match &o.rule {
            None => {
                if let Some(step) = o.failed {
                    problems.push(format!(
                        "with the full Role the scenario failed at {step:?} ({}); log {}",
                        step.says(),
                        o.log.display()
                    ));
                }
                if !o.refused.is_empty() {
                    problems.push(format!(
                        "with the full Role the API server refused {:?}",
                        o.refused
                    ));
                }
            }
            Some(rule) => {
                let (step, why) = named[rule];
                if o.failed != Some(step) {
                    let what = o.failed.map_or_else(
                        || "passed every step".to_string(),
                        |f| format!("failed at {f:?} instead ({})", f.says()),
                    );
                    problems.push(format!(
                        "without {} ({why}) the step {step:?} ({}) should fail, but the \
                         scenario {what}; log {}",
                        label(Some(rule)),
                        step.says(),
                        o.log.display()
                    ));
                }
                if o.refused != BTreeSet::from([rule.clone()]) {
                    problems.push(format!(
                        "without {} the API server should refuse exactly that, but it refused \
                         {:?}; log {}",
                        label(Some(rule)),
                        o.refused,
                        o.log.display()
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nall variants:\n{table}",
        problems.join("\n")
    );
}

#[test]
fn requests_map_to_the_rbac_verbs_they_need() {
    let q = Some("watch=true&resourceVersion=1");
    for (method, path, query, want) in [
        (
            Method::GET,
            "/api/v1/namespaces/a/secrets",
            None,
            ("secrets", "list"),
        ),
        (
            Method::GET,
            "/api/v1/namespaces/a/secrets",
            q,
            ("secrets", "watch"),
        ),
        (
            Method::GET,
            "/api/v1/namespaces/a/secrets/s",
            None,
            ("secrets", "get"),
        ),
        (
            Method::POST,
            "/api/v1/namespaces/a/secrets",
            None,
            ("secrets", "create"),
        ),
        (
            Method::PUT,
            "/api/v1/namespaces/a/secrets/s",
            None,
            ("secrets", "update"),
        ),
        (
            Method::PATCH,
            "/apis/vaultconn.dev/v1alpha1/namespaces/a/vaultconnections/c/status",
            None,
            ("vaultconnections/status", "patch"),
        ),
        (
            Method::GET,
            "/apis/vaultconn.dev/v1alpha1/vaultconnections",
            None,
            ("vaultconnections", "list"),
        ),
        (
            Method::PATCH,
            "/apis/events.k8s.io/v1/namespaces/a/events/e",
            None,
            ("events", "patch"),
        ),
        (
            Method::GET,
            "/apis/coordination.k8s.io/v1/namespaces/a/leases",
            Some("fieldSelector=metadata.name%3Dl&watch=1"),
            ("leases", "watch"),
        ),
    ] {
        assert_eq!(
            rbac_of(&method, path, query),
            Some((want.0.to_string(), want.1.to_string())),
            "{method} {path}?{query:?}"
        );
    }
    assert_eq!(rbac_of(&Method::GET, "/version", None), None);
}

#[test]
fn revoking_one_verb_keeps_the_others() {
    let mut objs = vec![json!({"kind": "Role", "rules": [
        {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    ]})];
    assert_eq!(revoke(&mut objs, &("secrets".into(), "get".into())), 1);
    assert_eq!(
        objs[0]["rules"],
        json!([
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
        ])
    );
    assert_eq!(revoke(&mut objs, &("pods".into(), "get".into())), 1);
    assert_eq!(objs[0]["rules"].as_array().map(Vec::len), Some(2));
}
