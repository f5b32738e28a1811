//! The Helm chart (charts/vaultconn) and the image (Dockerfile), with the real helm v4
//! (`scripts/install-helm.sh`): lint, renders for each mode, and install/upgrade into the shared
//! test control plane. There is no kubelet there: objects are stored, no Pod runs.
mod chart_support;
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::{json, Value};
use support::objects::{apply_vc, map, put_secret, ready, secret_data_eq, secret_obj, WAIT};
use support::{cluster, test_namespace, wait_for};
use vaultconn::api::VaultConnection;
use vaultconn_testkit::operator::{OperatorOptions, OperatorProcess};

use chart_support::{chart_dir, helm_ok, render_release, repo, service_account_login, set_args};

const RELEASE: &str = "rel";
const RELEASE_NS: &str = "ops";

/// The objects `helm template` renders with `sets` (`key=value`), in release namespace `ops`.
fn render_chart(chart: &Path, sets: &[&str]) -> Result<Vec<Value>, String> {
    render_release(chart, RELEASE, RELEASE_NS, sets)
}

fn render(sets: &[&str]) -> Vec<Value> {
    render_chart(&chart_dir(), sets).unwrap_or_else(|e| panic!("helm template {sets:?}: {e}"))
}

fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<_> = of_kind(objs, kind)
        .into_iter()
        .filter(|o| o["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one {kind} {name} in {:#?}",
        kinds(objs)
    );
    found[0]
}

fn kinds(objs: &[Value]) -> Vec<String> {
    objs.iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn container(objs: &[Value]) -> &Value {
    &one(objs, "Deployment", "rel-vaultconn")["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(objs: &[Value]) -> Vec<String> {
    container(objs)["args"]
        .as_array()
        .expect("the container has args")
        .iter()
        .map(|a| a.as_str().expect("string args").to_string())
        .collect()
}

/// `--flag=value` → `Some(value)`.
fn arg_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_string))
}

fn chart_yaml() -> Value {
    let text = std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml");
    serde_saphyr::from_str(&text).expect("Chart.yaml is YAML")
}

/// Every option of the values: the optional templates on, namespaced, two replicas.
const ALL_ON: &[&str] = &[
    "crds.enabled=true",
    "watchNamespaces={team-a,team-b}",
    "replicaCount=2",
    "metrics.serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "grafanaDashboard.enabled=true",
    "networkPolicy.enabled=true",
    "networkPolicy.egress[0].ports[0].port=443",
    "tokenUrlAllow={idp.internal.example,10.20.0.0/16}",
];

#[test]
fn helm_lint_is_clean() {
    let chart = chart_dir().display().to_string();
    for sets in [&[][..], ALL_ON] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        let sets = set_args(sets);
        args.extend(sets.iter().map(String::as_str));
        let out = helm_ok(&args, None);
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{out}"
        );
    }
}

#[test]
fn chart_versions_follow_the_crate() {
    let chart = chart_yaml();
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(
        chart["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion"
    );
    assert_eq!(
        chart["version"],
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml version"
    );
    // The image tag defaults to it.
    let objs = render(&[]);
    assert_eq!(
        container(&objs)["image"],
        format!("vaultconn:{}", env!("CARGO_PKG_VERSION"))
    );
    let pinned = render(&[
        "image.repository=registry.example/vaultconn",
        "image.digest=sha256:abc",
    ]);
    assert_eq!(
        container(&pinned)["image"],
        "registry.example/vaultconn@sha256:abc"
    );
}

#[test]
fn default_values_render_a_cluster_wide_elected_operator() {
    let objs = render(&[]);
    let deploy = one(&objs, "Deployment", "rel-vaultconn");
    assert_eq!(deploy["metadata"]["namespace"], RELEASE_NS);
    assert_eq!(deploy["spec"]["replicas"], 1);
    // Election makes an overlap safe; never a moment with zero operators.
    assert_eq!(
        deploy["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    let pod = &deploy["spec"]["template"]["spec"];
    let args = args_of(&objs);
    assert_eq!(args[0], "run", "{args:?}");
    assert!(args.contains(&"--leader-elect".to_string()), "{args:?}");
    assert_eq!(
        arg_value(&args, "--lease-namespace").as_deref(),
        Some(RELEASE_NS)
    );
    assert_eq!(
        arg_value(&args, "--lease-name").as_deref(),
        Some("rel-vaultconn")
    );
    assert_eq!(
        arg_value(&args, "--namespaces"),
        None,
        "all namespaces by default"
    );
    assert_eq!(arg_value(&args, "--token-url-allow"), None);
    // The grace period covers the SIGTERM flush with a margin.
    let shutdown = arg_value(&args, "--shutdown-timeout").expect("--shutdown-timeout");
    let shutdown = humantime::parse_duration(&shutdown).expect("a duration");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace >= shutdown.as_secs() + 5 && grace >= 30,
        "grace {grace}s, flush {shutdown:?}"
    );
    // Downward API.
    let env = container(&objs)["env"].as_array().expect("env");
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = env
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name}"));
        assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], path);
    }
    // Probes and metrics on one named port, which the flag binds.
    let c = container(&objs);
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        arg_value(&args, "--metrics-bind-address").as_deref(),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    // Pod Security Standard "restricted", plus a read-only root filesystem.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(c["resources"]["requests"]["memory"].is_string());
    // The ServiceAccount the Pod runs as is the one bound to the operator's ClusterRole.
    let sa = one(&objs, "ServiceAccount", "rel-vaultconn");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    let binding = one(&objs, "ClusterRoleBinding", "rel-vaultconn");
    assert_eq!(binding["roleRef"]["name"], "rel-vaultconn");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "rel-vaultconn", "namespace": RELEASE_NS}])
    );
    one(&objs, "ClusterRole", "rel-vaultconn");
    let svc = one(&objs, "Service", "rel-vaultconn-metrics");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(
        svc["spec"]["selector"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    // Nothing optional by default; no Role outside the release namespace.
    for kind in [
        "CustomResourceDefinition",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
        "NetworkPolicy",
    ] {
        assert!(
            of_kind(&objs, kind).is_empty(),
            "{kind} in {:?}",
            kinds(&objs)
        );
    }
    for role in of_kind(&objs, "Role") {
        assert_eq!(role["metadata"]["namespace"], RELEASE_NS);
    }
}

#[test]
fn namespaced_mode_grants_roles_in_the_watched_namespaces_only() {
    let objs = render(&["watchNamespaces={team-a,team-b,team-a}"]);
    let args = args_of(&objs);
    assert_eq!(
        arg_value(&args, "--namespaces").as_deref(),
        Some("team-a,team-b")
    );
    // No cluster-wide rights for the operator: only the aggregated user roles remain.
    assert!(
        of_kind(&objs, "ClusterRoleBinding").is_empty(),
        "{:?}",
        kinds(&objs)
    );
    let cluster_roles: BTreeSet<_> = of_kind(&objs, "ClusterRole")
        .iter()
        .map(|r| {
            r["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        cluster_roles,
        BTreeSet::from([
            "rel-vaultconn-edit".to_string(),
            "rel-vaultconn-view".to_string()
        ])
    );
    let operator_roles: BTreeSet<_> = of_kind(&objs, "Role")
        .into_iter()
        .filter(|r| r["metadata"]["name"] == "rel-vaultconn")
        .map(|r| {
            r["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        operator_roles,
        BTreeSet::from(["team-a".into(), "team-b".into()])
    );
    for ns in ["team-a", "team-b"] {
        let b = of_kind(&objs, "RoleBinding")
            .into_iter()
            .find(|b| b["metadata"]["namespace"] == ns && b["metadata"]["name"] == "rel-vaultconn")
            .unwrap_or_else(|| panic!("RoleBinding in {ns}"));
        assert_eq!(
            b["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "rel-vaultconn"})
        );
        assert_eq!(
            b["subjects"],
            json!([{"kind": "ServiceAccount", "name": "rel-vaultconn", "namespace": RELEASE_NS}])
        );
    }
    // The lease stays in the release namespace.
    let lease_role = one(&objs, "Role", "rel-vaultconn-leader-election");
    assert_eq!(lease_role["metadata"]["namespace"], RELEASE_NS);
    // A values file may give the list as one comma-separated string.
    let from_string = render(&["watchNamespaces=team-b"]);
    assert_eq!(
        arg_value(&args_of(&from_string), "--namespaces").as_deref(),
        Some("team-b")
    );
    let bad = render_chart(&chart_dir(), &["watchNamespaces={Team_A}"]).expect_err("refused");
    assert!(bad.contains("\"Team_A\" is not a namespace name"), "{bad}");
}

#[test]
fn replicas_above_one_get_a_pdb_and_need_leader_election() {
    let one_replica = render(&[]);
    assert!(of_kind(&one_replica, "PodDisruptionBudget").is_empty());
    let objs = render(&["replicaCount=3"]);
    let pdb = one(&objs, "PodDisruptionBudget", "rel-vaultconn");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        one(&objs, "Deployment", "rel-vaultconn")["spec"]["selector"]["matchLabels"]
    );
    let err = render_chart(
        &chart_dir(),
        &["replicaCount=2", "leaderElection.enabled=false"],
    )
    .expect_err("two replicas without a lease are refused");
    assert!(
        err.contains("replicaCount > 1 needs leaderElection.enabled=true"),
        "{err}"
    );
    // Without election a rollout must never overlap two operators.
    let single = render(&["leaderElection.enabled=false"]);
    let deploy = one(&single, "Deployment", "rel-vaultconn");
    assert_eq!(deploy["spec"]["strategy"], json!({"type": "Recreate"}));
    assert!(!args_of(&single)
        .iter()
        .any(|a| a.starts_with("--lease") || a == "--leader-elect"));
    assert!(
        of_kind(&single, "Role").is_empty(),
        "no Lease rights without election"
    );
}

#[test]
fn all_optional_parts_render_from_their_files() {
    let objs = render(ALL_ON);
    let args = args_of(&objs);
    assert_eq!(
        arg_value(&args, "--token-url-allow").as_deref(),
        Some("idp.internal.example,10.20.0.0/16")
    );
    let sm = one(&objs, "ServiceMonitor", "rel-vaultconn");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    // The alerts group by the connections' namespace label, which only survives with this.
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        one(&objs, "Deployment", "rel-vaultconn")["spec"]["selector"]["matchLabels"]
    );
    // The PrometheusRule carries files/prometheus-rules.yaml's groups unchanged.
    let rules_file = std::fs::read_to_string(chart_dir().join("files/prometheus-rules.yaml"))
        .expect("files/prometheus-rules.yaml");
    let rules: Value = serde_saphyr::from_str(&rules_file).expect("rules file is YAML");
    assert_eq!(
        one(&objs, "PrometheusRule", "rel-vaultconn")["spec"]["groups"],
        rules["groups"]
    );
    // The dashboard ConfigMap is labelled for the Grafana sidecar and holds the file verbatim.
    let dashboard = one(&objs, "ConfigMap", "rel-vaultconn-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json_file = std::fs::read_to_string(chart_dir().join("files/grafana-dashboard.json"))
        .expect("files/grafana-dashboard.json");
    let shipped: Value = serde_json::from_str(
        dashboard["data"]["vaultconn.json"]
            .as_str()
            .expect("dashboard data"),
    )
    .expect("the dashboard is JSON");
    assert_eq!(
        shipped,
        serde_json::from_str::<Value>(&json_file).expect("file is JSON")
    );
    let np = one(&objs, "NetworkPolicy", "rel-vaultconn");
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], "metrics");
    one(&objs, "PodDisruptionBudget", "rel-vaultconn");
    // The templated CRD is the generated one (the drift test's third copy), kept on uninstall.
    let crd = one(
        &objs,
        "CustomResourceDefinition",
        "vaultconnections.vaultconn.dev",
    );
    let templated: CustomResourceDefinition =
        serde_json::from_value(crd.clone()).expect("the templated CRD is a CRD");
    assert!(
        templated.spec == vaultconn::crd::crd().spec,
        "templated CRD is stale: run `make crd`"
    );
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let not_kept = render(&["crds.enabled=true", "crds.keep=false"]);
    let crd = one(
        &not_kept,
        "CustomResourceDefinition",
        "vaultconnections.vaultconn.dev",
    );
    assert!(
        crd["metadata"]["annotations"]
            .get("helm.sh/resource-policy")
            .is_none(),
        "{crd:#}"
    );
}

/// Every rule of every Role and ClusterRole the chart can render.
fn all_rules() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for sets in [
        &[][..],
        ALL_ON,
        &["watchNamespaces={a}"],
        &["leaderElection.enabled=false"],
    ] {
        for o in render(sets) {
            if o["kind"] == "Role" || o["kind"] == "ClusterRole" {
                for rule in o["rules"].as_array().into_iter().flatten() {
                    out.push((
                        format!("{}/{}", o["kind"], o["metadata"]["name"]),
                        rule.clone(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn rendered_rbac_is_least_privilege() {
    let rules = all_rules();
    assert!(rules.len() > 10, "{rules:?}");
    for (role, rule) in &rules {
        for field in [
            "apiGroups",
            "resources",
            "verbs",
            "resourceNames",
            "nonResourceURLs",
        ] {
            for v in rule[field].as_array().into_iter().flatten() {
                let v = v.as_str().unwrap_or_default();
                assert!(!v.contains('*'), "{role}: wildcard {field} {v:?} in {rule}");
            }
        }
    }
    // The operator's own rules: exactly what the code calls (see templates/_helpers.tpl). The
    // "RBAC proven" cluster test shows they are enough.
    let expected = json!([
        {"apiGroups": ["vaultconn.dev"], "resources": ["vaultconnections"], "verbs": ["list", "watch"]},
        {"apiGroups": ["vaultconn.dev"], "resources": ["vaultconnections/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "update"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]);
    let cluster_wide = render(&[]);
    assert_eq!(
        one(&cluster_wide, "ClusterRole", "rel-vaultconn")["rules"],
        expected
    );
    let namespaced = render(&["watchNamespaces={a}"]);
    let role = of_kind(&namespaced, "Role")
        .into_iter()
        .find(|r| r["metadata"]["namespace"] == "a")
        .expect("a Role in namespace a");
    assert_eq!(role["rules"], expected);
    // Lease rights: create, and the rest on the one Lease only.
    assert_eq!(
        one(&cluster_wide, "Role", "rel-vaultconn-leader-election")["rules"],
        json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["rel-vaultconn"], "verbs": ["get", "list", "watch", "patch"]},
        ])
    );
    // Users' roles: admin/edit manage, view reads.
    let edit = one(&cluster_wide, "ClusterRole", "rel-vaultconn-edit");
    assert_eq!(
        edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert_eq!(
        edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"],
        "true"
    );
    let view = one(&cluster_wide, "ClusterRole", "rel-vaultconn-view");
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    assert_eq!(view["rules"][0]["verbs"], json!(["get", "list", "watch"]));
}

/// The flags of every `cargo build` in the Dockerfile.
fn dockerfile_builds(dockerfile: &str) -> Vec<Vec<String>> {
    // Join continuation lines first: a RUN may span several.
    let joined = dockerfile.replace("\\\n", " ");
    joined
        .lines()
        .flat_map(|l| l.split("&&"))
        .filter_map(|cmd| {
            let words: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
            let at = words
                .windows(2)
                .position(|w| w[0] == "cargo" && w[1] == "build")?;
            Some(words[at + 2..].to_vec())
        })
        .collect()
}

#[test]
fn dockerfile_builds_what_ci_compiles() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let builds = dockerfile_builds(&dockerfile);
    assert_eq!(
        builds.len(),
        2,
        "a dependency layer and the product: {builds:?}"
    );
    let want: BTreeSet<&str> = [
        "--release",
        "--locked",
        "--no-default-features",
        "-p",
        "vaultconn",
        "--bin",
        "vaultconn",
    ]
    .into();
    for flags in &builds {
        let got: BTreeSet<&str> = flags.iter().map(String::as_str).collect();
        assert_eq!(got, want, "Dockerfile: cargo build {flags:?}");
    }
    // CI compiles (clippy) exactly this feature set of this package, so the image build is one
    // that CI has proven to compile.
    let ci = std::fs::read_to_string(repo().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.starts_with(&["cargo", "clippy"])
                && w.windows(2).any(|p| p == ["-p", "vaultconn"])
                && w.contains(&"--no-default-features")
                && !w
                    .iter()
                    .any(|x| x.starts_with("--features") || *x == "--all-features")
        }),
        ".ci/run no longer compiles `-p vaultconn --no-default-features`"
    );
    // The final stage: distroless (no shell), numeric non-root user, exec-form entrypoint.
    let last_stage = dockerfile.rsplit("\nFROM ").next().expect("a final stage");
    assert!(last_stage.starts_with("gcr.io/distroless/"), "{last_stage}");
    assert!(
        !last_stage.contains("\nRUN "),
        "no RUN in a shell-less image"
    );
    assert!(last_stage.contains("\nUSER 65532:65532\n"), "{last_stage}");
    assert!(
        last_stage.contains("\nENTRYPOINT [\"/usr/local/bin/vaultconn\"]\n"),
        "{last_stage}"
    );
    // The chart passes the subcommand itself (args replace CMD), on the port the image exposes.
    let objs = render(&[]);
    assert_eq!(args_of(&objs)[0], "run");
    let port = container(&objs)["ports"][0]["containerPort"]
        .as_u64()
        .expect("port");
    assert!(
        last_stage.contains(&format!("\nEXPOSE {port}\n")),
        "{last_stage}"
    );
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "target/ stays out of the context"
    );
}

#[test]
fn the_binary_accepts_every_flag_the_chart_passes() {
    // clap parses (and validates the values of) everything before `--help`: an unknown flag or
    // a bad value fails here instead of in a crash-looping Pod.
    for sets in [
        &[][..],
        ALL_ON,
        &["logFormat=text", "leaderElection.enabled=false"],
    ] {
        let objs = render(sets);
        let args = args_of(&objs);
        let out = Command::new(env!("CARGO_BIN_EXE_vaultconn"))
            .args(&args)
            .arg("--help")
            .env_remove("KUBECONFIG")
            .output()
            .expect("running vaultconn");
        assert!(
            out.status.success(),
            "`vaultconn {}` is refused: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---- against the shared control plane --------------------------------------------------------

/// A namespace to install into, and the control plane's admin kubeconfig.
async fn install_target(prefix: &str) -> (support::TestNs, PathBuf) {
    let ns = test_namespace(prefix).await;
    (ns, cluster().await.kubeconfig_path().to_path_buf())
}

#[tokio::test]
async fn helm_install_stores_the_operator_objects() {
    let (ns, kubeconfig) = install_target("chart-install").await;
    let release = ns.name.clone();
    let chart = chart_dir().display().to_string();
    helm_ok(
        &[
            "install",
            &release,
            &chart,
            "--namespace",
            &ns.name,
            "--set",
            "replicaCount=2",
        ],
        Some(&kubeconfig),
    );
    let full = format!("{release}-vaultconn");
    let deploy = ns
        .api::<Deployment>()
        .get(&full)
        .await
        .expect("the Deployment is stored");
    let spec = deploy.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(full.as_str()));
    ns.api::<ServiceAccount>()
        .get(&full)
        .await
        .expect("the ServiceAccount is stored");
    ns.api::<Service>()
        .get(&format!("{full}-metrics"))
        .await
        .expect("the Service is stored");
    ns.api::<Role>()
        .get(&format!("{full}-leader-election"))
        .await
        .expect("the Lease Role");
    ns.api::<RoleBinding>()
        .get(&format!("{full}-leader-election"))
        .await
        .expect("its binding");
    let cr = Api::<ClusterRole>::all(ns.client.clone())
        .get(&full)
        .await
        .expect("the ClusterRole");
    assert!(cr
        .rules
        .unwrap_or_default()
        .iter()
        .all(|r| !r.verbs.contains(&"*".to_string())));
    let crb = Api::<ClusterRoleBinding>::all(ns.client.clone())
        .get(&full)
        .await
        .expect("the ClusterRoleBinding");
    let subject = &crb.subjects.unwrap_or_default()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (full.as_str(), Some(ns.name.as_str()))
    );
    // policy/v1beta1 on this 1.20 API server, policy/v1 on current ones: helm picks one served.
    let mut pdb_found = false;
    for version in ["v1", "v1beta1"] {
        let gvk = GroupVersionKind::gvk("policy", version, "PodDisruptionBudget");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "poddisruptionbudgets");
        let api = Api::<DynamicObject>::namespaced_with(ns.client.clone(), &ns.name, &ar);
        pdb_found |= api.get_opt(&full).await.is_ok_and(|p| p.is_some());
    }
    assert!(pdb_found, "the PodDisruptionBudget is stored");
    helm_ok(
        &["uninstall", &release, "--namespace", &ns.name],
        Some(&kubeconfig),
    );
    wait_for(
        Duration::from_secs(20),
        "the ClusterRole to go with the release",
        || {
            let api = Api::<ClusterRole>::all(ns.client.clone());
            let full = full.clone();
            async move { api.get_opt(&full).await.is_ok_and(|r| r.is_none()) }
        },
    )
    .await;
}

/// A copy of the chart whose CRD has one more printer column, `column`.
fn chart_with_changed_crd(dir: &Path, column: &str) -> PathBuf {
    let copy = dir.join("vaultconn");
    let status = Command::new("cp")
        .args([
            "-r",
            &chart_dir().display().to_string(),
            &copy.display().to_string(),
        ])
        .status()
        .expect("cp");
    assert!(status.success());
    let path = copy.join("crds/vaultconnections.vaultconn.dev.yaml");
    let mut crd: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&path).expect("CRD file")).expect("YAML");
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array_mut()
        .expect("printer columns")
        .push(json!({"name": column, "type": "string", "jsonPath": ".spec.displayName", "priority": 1}));
    // JSON is YAML.
    std::fs::write(&path, serde_json::to_string_pretty(&crd).expect("JSON")).expect("write CRD");
    copy
}

async fn printer_columns(client: &kube::Client) -> Vec<String> {
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get("vaultconnections.vaultconn.dev")
        .await
        .expect("the CRD exists");
    crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

#[tokio::test]
async fn helm_upgrade_with_crds_enabled_updates_the_crd() {
    let (ns, kubeconfig) = install_target("chart-upgrade").await;
    let release = ns.name.clone();
    let chart = chart_dir().display().to_string();
    // Version 1, as most users install it: the CRD from crds/.
    helm_ok(
        &["install", &release, &chart, "--namespace", &ns.name],
        Some(&kubeconfig),
    );
    // Version 2 changes the CRD. crds/ alone would never apply that; the template does.
    let column = format!("Col{}", &ns.name[ns.name.len() - 8..]);
    let work = cluster().await.dir().join(format!("chart-{}", ns.name));
    std::fs::create_dir_all(&work).expect("work dir");
    let v2 = chart_with_changed_crd(&work, &column).display().to_string();
    assert!(!printer_columns(&ns.client).await.contains(&column));
    // The first upgrade takes the CRD over from crds/. `--force-conflicts` because the test
    // control plane applied it server-side under another field manager (as `kubectl apply
    // --server-side` would); the README says so.
    helm_ok(
        &[
            "upgrade",
            &release,
            &v2,
            "--namespace",
            &ns.name,
            "--set",
            "crds.enabled=true",
            "--take-ownership",
            "--force-conflicts",
        ],
        Some(&kubeconfig),
    );
    assert!(
        printer_columns(&ns.client).await.contains(&column),
        "the upgrade updated the CRD"
    );
    // From then on a plain upgrade updates it.
    let column3 = format!("{column}v3");
    let work3 = work.join("v3");
    std::fs::create_dir_all(&work3).expect("work dir");
    let v3 = chart_with_changed_crd(&work3, &column3)
        .display()
        .to_string();
    helm_ok(
        &[
            "upgrade",
            &release,
            &v3,
            "--namespace",
            &ns.name,
            "--set",
            "crds.enabled=true",
        ],
        Some(&kubeconfig),
    );
    let columns = printer_columns(&ns.client).await;
    assert!(
        columns.contains(&column3) && !columns.contains(&column),
        "{columns:?}"
    );
    let crd = Api::<CustomResourceDefinition>::all(ns.client.clone())
        .get("vaultconnections.vaultconn.dev")
        .await
        .expect("the CRD");
    let annotations = crd.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations
            .get("helm.sh/resource-policy")
            .map(String::as_str),
        Some("keep")
    );
    assert_eq!(annotations.get("meta.helm.sh/release-name"), Some(&release));
    // Uninstalling keeps the CRD (and with it every VaultConnection and their Secrets).
    helm_ok(
        &["uninstall", &release, "--namespace", &ns.name],
        Some(&kubeconfig),
    );
    assert!(
        printer_columns(&ns.client).await.contains(&column3),
        "the CRD was kept"
    );
}

// ---- "RBAC proven": the operator runs as the chart's ServiceAccount ---------------------------

/// The RBAC tests run one at a time: a cluster-wide operator would also serve the namespaces of
/// the namespaced test.
static AS_CHART: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Install the chart into `release_ns` with `sets` and run the operator binary out of cluster
/// with the installed Deployment's arguments, as its ServiceAccount.
async fn operator_as_chart(
    release_ns: &support::TestNs,
    sets: &[&str],
) -> (OperatorProcess, kube::Client) {
    let kubeconfig = cluster().await.kubeconfig_path().to_path_buf();
    let release = release_ns.name.clone();
    let chart = chart_dir().display().to_string();
    let mut args = vec![
        "install",
        release.as_str(),
        chart.as_str(),
        "--namespace",
        release_ns.name.as_str(),
    ];
    let sets = set_args(sets);
    args.extend(sets.iter().map(String::as_str));
    helm_ok(&args, Some(&kubeconfig));
    let full = format!("{release}-vaultconn");
    let deploy = release_ns
        .api::<Deployment>()
        .get(&full)
        .await
        .expect("the Deployment");
    let container = deploy
        .spec
        .and_then(|s| s.template.spec)
        .expect("a pod spec")
        .containers[0]
        .clone();
    let chart_args = container.args.unwrap_or_default();
    assert_eq!(chart_args.first().map(String::as_str), Some("run"));
    // The harness binds metrics to a free loopback port itself.
    let extra: Vec<String> = chart_args[1..]
        .iter()
        .filter(|a| !a.starts_with("--metrics-bind-address"))
        .cloned()
        .collect();
    let sa = deploy_service_account(release_ns, &full).await;
    let (sa_client, sa_kubeconfig) = service_account_login(release_ns, &sa).await;
    let op = OperatorProcess::start(OperatorOptions {
        binary: env!("CARGO_BIN_EXE_vaultconn").into(),
        kubeconfig: sa_kubeconfig,
        log_path: cluster()
            .await
            .dir()
            .join(format!("operator-{release}.log")),
        extra_args: extra,
        log_filter: "info,vaultconn=debug".into(),
    })
    .await
    .expect("the operator starts as the chart's ServiceAccount");
    (op, sa_client)
}

async fn deploy_service_account(ns: &support::TestNs, deployment: &str) -> String {
    ns.api::<Deployment>()
        .get(deployment)
        .await
        .expect("the Deployment")
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.service_account_name)
        .expect("the Deployment names its ServiceAccount")
}

/// What the operator logged about refused requests (nothing, if the chart's RBAC is enough).
fn forbidden_lines(op: &OperatorProcess) -> Vec<String> {
    op.logs()
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("forbidden") || l.contains(" 403"))
        .map(str::to_string)
        .collect()
}

/// A connection whose Secret exists, whose credentials then change twice to the same kind of
/// update (the second "SecretUpdated" Event is a PATCH of the first's series).
async fn exercise_every_verb(ns: &support::TestNs) {
    put_secret(ns, "creds", &[("api_key", "k-one")]).await;
    apply_vc(
        ns,
        "conn",
        json!({"type": "apiKey", "credentialsRef": {"name": "creds"}}),
    )
    .await;
    ready(ns, "conn").await;
    secret_data_eq(ns, "conn", map(&[("api_key", "k-one")])).await;
    for value in ["k-two", "k-three"] {
        put_secret(ns, "creds", &[("api_key", value)]).await;
        secret_data_eq(ns, "conn", map(&[("api_key", value)])).await;
    }
    wait_for(
        WAIT,
        "a SecretUpdated Event with a series of 2 (create, then patch)",
        || async {
            ns.api::<Event>()
                .list(&Default::default())
                .await
                .is_ok_and(|evs| {
                    evs.items.iter().any(|e| {
                        e.reason.as_deref() == Some("SecretUpdated")
                            && e.series.as_ref().is_some_and(|s| s.count >= 2)
                    })
                })
        },
    )
    .await;
}

/// The status code of a refused request, or 0 if it went through.
fn refused<T>(r: Result<T, kube::Error>) -> u16 {
    match r {
        Ok(_) => 0,
        Err(kube::Error::Api(e)) => e.code,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The lease is held by the operator, and released (patched) when it stops.
async fn lease_held_then_released(release_ns: &support::TestNs, op: &mut OperatorProcess) {
    let lease = format!("{}-vaultconn", release_ns.name);
    let api = release_ns.api::<Lease>();
    let holder = || async {
        api.get_opt(&lease)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty())
    };
    assert!(holder().await.is_some(), "the operator holds Lease {lease}");
    assert!(
        op.stop(Duration::from_secs(25)),
        "a clean exit on SIGTERM:\n{}",
        op.logs()
    );
    assert_eq!(holder().await, None, "the Lease was released on exit");
}

#[tokio::test]
async fn cluster_wide_chart_rbac_is_enough_and_no_more() {
    let _one_at_a_time = AS_CHART.lock().await;
    let release_ns = test_namespace("chart-rbac").await;
    let app = test_namespace("chart-app").await;
    let (mut op, sa) = operator_as_chart(&release_ns, &[]).await;
    exercise_every_verb(&app).await;
    assert_eq!(
        forbidden_lines(&op),
        Vec::<String>::new(),
        "refused requests"
    );
    // No more than that: no deleting or patching Secrets, no CRDs, no Leases outside the
    // release namespace, nothing else.
    let secrets: Api<Secret> = Api::namespaced(sa.clone(), &app.name);
    assert_eq!(
        refused(secrets.delete("creds", &Default::default()).await),
        403
    );
    let patch = json!({"metadata": {"labels": {"x": "y"}}});
    assert_eq!(
        refused(
            secrets
                .patch("creds", &PatchParams::default(), &Patch::Merge(&patch))
                .await
        ),
        403
    );
    let crds: Api<CustomResourceDefinition> = Api::all(sa.clone());
    assert_eq!(
        refused(crds.get("vaultconnections.vaultconn.dev").await),
        403
    );
    let leases: Api<Lease> = Api::namespaced(sa.clone(), &app.name);
    assert_eq!(refused(leases.list(&Default::default()).await), 403);
    let vcs: Api<VaultConnection> = Api::namespaced(sa.clone(), &app.name);
    assert_eq!(refused(vcs.delete("conn", &Default::default()).await), 403);
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::all(sa.clone());
    assert_eq!(refused(config_maps.list(&Default::default()).await), 403);
    lease_held_then_released(&release_ns, &mut op).await;
    assert_eq!(
        forbidden_lines(&op),
        Vec::<String>::new(),
        "refused requests on shutdown"
    );
}

#[tokio::test]
async fn namespaced_chart_rbac_keeps_the_operator_in_its_namespaces() {
    let _one_at_a_time = AS_CHART.lock().await;
    let release_ns = test_namespace("chart-rbac-ns").await;
    let app = test_namespace("chart-app-ns").await;
    let other = test_namespace("chart-other").await;
    // A connection the operator must not serve, in place before it starts.
    put_secret(&other, "creds", &[("api_key", "k-other")]).await;
    apply_vc(
        &other,
        "conn",
        json!({"type": "apiKey", "credentialsRef": {"name": "creds"}}),
    )
    .await;
    let watch = format!("watchNamespaces={{{}}}", app.name);
    let (mut op, sa) = operator_as_chart(&release_ns, &[&watch]).await;
    exercise_every_verb(&app).await;
    assert_eq!(
        forbidden_lines(&op),
        Vec::<String>::new(),
        "refused requests"
    );
    // Outside its namespaces it can neither read nor write Secrets, nor list them cluster-wide.
    let elsewhere: Api<Secret> = Api::namespaced(sa.clone(), &other.name);
    assert_eq!(refused(elsewhere.get("creds").await), 403);
    assert_eq!(refused(elsewhere.list(&Default::default()).await), 403);
    let stolen = secret_obj("stolen", &[("k", "v")]);
    assert_eq!(
        refused(elsewhere.create(&PostParams::default(), &stolen).await),
        403
    );
    let everywhere: Api<Secret> = Api::all(sa.clone());
    assert_eq!(refused(everywhere.list(&Default::default()).await), 403);
    let all_vcs: Api<VaultConnection> = Api::all(sa.clone());
    assert_eq!(refused(all_vcs.list(&Default::default()).await), 403);
    // The connection elsewhere was never served (the one in `app` was, long since).
    let untouched = other
        .api::<VaultConnection>()
        .get("conn")
        .await
        .expect("the connection");
    assert!(untouched.status.is_none(), "{:?}", untouched.status);
    assert!(other
        .api::<Secret>()
        .get_opt("conn")
        .await
        .expect("a read")
        .is_none());
    lease_held_then_released(&release_ns, &mut op).await;
    assert_eq!(
        forbidden_lines(&op),
        Vec::<String>::new(),
        "refused requests on shutdown"
    );
}
