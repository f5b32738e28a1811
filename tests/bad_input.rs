//! Bad input, end to end against the real control plane: targets that name Secrets other
//! controllers own (a ServiceAccount token, a TLS Secret, an owned Secret), the corpus of
//! invalid VaultConnections and credentials Secrets in `tests/bad-input-corpus` (plus the bad
//! half of `tests/cli-corpus`), and broken token responses from the fault server.
//!
//! Each case must end in a schema rejection by the API server or a specific status reason,
//! and never in a panic, a crash loop or a hot loop. "What the other side saw" is the proof:
//! this binary runs its own operator process whose kubeconfig points at an [`ApiFaultProxy`]
//! (no faults armed, it only records), so every request the operator made to the API server
//! is counted, and the token server counts every token request. A crash shows as a new
//! process id or an exit status; every test checks the operator still runs as the same
//! process.
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::ApiResource;
use kube::ResourceExt;
use serde_json::{json, Value};
use support::corpus::{expectations, problems_of, Problem};
use support::objects::*;
use support::own_operator::{own_operator_options, proxied_kubeconfig, start_own_operator};
use support::{test_namespace, wait_for_some, TestNs};
use tokio::sync::OnceCell;
use vaultconn::api::VaultConnection;
use vaultconn_testkit::api_proxy::{ApiFaultProxy, MethodMatch};
use vaultconn_testkit::operator::OperatorProcess;
use vaultconn_testkit::token_server::{Fault, TokenServer, TokenServerConfig};

/// The recording proxy and the operator behind it, shared by the tests of this binary.
struct Harness {
    proxy: ApiFaultProxy,
    operator: std::sync::Mutex<OperatorProcess>,
    /// The operator's process id when it started: a crash loop would change it.
    pid: u32,
    log_path: PathBuf,
}

static HARNESS: OnceCell<Harness> = OnceCell::const_new();

async fn harness() -> &'static Harness {
    HARNESS
        .get_or_init(|| async {
            support::ensure_crds().await;
            let (proxy, kubeconfig) = proxied_kubeconfig("bad-input").await;
            let log_path = support::cluster()
                .await
                .dir()
                .join("operator-bad-input.log");
            // A short token timeout lets the slow-loris reply run past it quickly.
            let args = ["--token-request-timeout", "3s"];
            let operator =
                start_own_operator(own_operator_options(kubeconfig, log_path.clone(), &args)).await;
            let pid = operator.pid().expect("the operator runs");
            Harness {
                proxy,
                operator: std::sync::Mutex::new(operator),
                pid,
                log_path,
            }
        })
        .await
}

impl Harness {
    /// The operator is still the process that started: no panic, no crash, no restart.
    fn assert_same_process(&self) {
        let mut op = self.operator.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            op.exit_status(),
            None,
            "the operator exited; see {}",
            self.log_path.display()
        );
        assert_eq!(op.pid(), Some(self.pid), "the operator was restarted");
        assert_eq!(op.starts(), 1, "the operator was restarted");
        let logs = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        assert!(
            !logs.contains("panicked"),
            "the operator panicked; see {}",
            self.log_path.display()
        );
    }

    /// Writes (POST/PUT/PATCH/DELETE, dry runs included) the operator made to paths containing
    /// `path`.
    fn writes(&self, path: &str) -> usize {
        self.proxy.count(MethodMatch::AnyWrite, path)
    }

    /// Every request (reads and watches included) the operator made to paths containing `path`.
    fn requests(&self, path: &str) -> usize {
        self.proxy.count(MethodMatch::Any, path)
    }
}

fn secret_path(ns: &TestNs, name: &str) -> String {
    format!("/api/v1/namespaces/{}/secrets/{name}", ns.name)
}

/// How long the operator is watched for a loop after it has settled.
const QUIET_WINDOW: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Adoption of Secrets other controllers own
// ---------------------------------------------------------------------------------------------

/// The ServiceAccount token Secret the token controller (kube-controller-manager) creates in
/// every namespace for the `default` ServiceAccount.
async fn service_account_token_secret(ns: &TestNs) -> Secret {
    let api: Api<Secret> = ns.api();
    wait_for_some(
        Duration::from_secs(30),
        "the default ServiceAccount's token Secret",
        || {
            let api = api.clone();
            async move {
                api.list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|s| {
                        s.type_.as_deref() == Some("kubernetes.io/service-account-token")
                            && s.data.as_ref().is_some_and(|d| d.contains_key("token"))
                    })
            }
        },
    )
    .await
}

/// The live object's data, as the test sees it (no decoding: token bytes may be anything).
fn raw_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

#[tokio::test]
async fn adopt_refuses_a_service_account_token_secret_and_never_fights_its_controller() {
    let h = harness().await;
    let ns = test_namespace("adopt-sa").await;
    let token_secret = service_account_token_secret(&ns).await;
    let name = token_secret.name_any();
    put_secret(&ns, "creds", &[("token", "bad-input-token-value")]).await;
    apply_vc(
        &ns,
        "grab",
        json!({"type": "bearerToken", "credentialsRef": {"name": "creds"},
               "target": {"name": name, "adopt": true}}),
    )
    .await;
    let vc = vc_where(&ns, "grab", "a final reason for grab", |v| {
        !reason(v).is_empty()
            && v.status.as_ref().and_then(|s| s.observed_generation) == v.metadata.generation
    })
    .await;
    // Whatever the outcome, watch the Secret for a while: a fight with the token controller
    // shows as a stream of writes.
    let started = h.writes(&secret_path(&ns, &name));
    tokio::time::sleep(QUIET_WINDOW).await;
    let in_window = h.writes(&secret_path(&ns, &name)) - started;
    let total = h.writes(&secret_path(&ns, &name));
    assert_eq!(
        (reason(&vc).as_str(), total, in_window),
        ("SecretConflict", 0, 0),
        "reason, writes to {name} in all, writes in the {QUIET_WINDOW:?} after the status settled; message: {}",
        message(&vc)
    );
    assert_eq!(
        message(&vc),
        format!(
            "Secret {}/{name} is of type kubernetes.io/service-account-token, which vaultconn never adopts: only Opaque Secrets can be taken over; choose another spec.target.name",
            ns.name
        )
    );
    let live = ns.api::<Secret>().get(&name).await.unwrap();
    assert_eq!(
        raw_data(&live),
        raw_data(&token_secret),
        "the token is intact"
    );
    assert!(live.owner_references().is_empty());
    assert!(!live.labels().contains_key("app.kubernetes.io/managed-by"));
    h.assert_same_process();
    eprintln!("adopt {name}: {total} writes to it, {in_window} in the {QUIET_WINDOW:?} window");
}

#[tokio::test]
async fn adopt_refuses_typed_secrets_and_secrets_another_controller_owns() {
    let h = harness().await;
    let ns = test_namespace("adopt-typed").await;
    put_secret(&ns, "creds", &[("token", "bad-input-token-value")]).await;
    let api: Api<Secret> = ns.api();
    let typed = |name: &str, type_: &str, data: Value| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": name}, "type": type_, "stringData": data
        }))
        .unwrap()
    };
    let cases = [
        typed(
            "tls",
            "kubernetes.io/tls",
            json!({"tls.crt": "not-a-cert", "tls.key": "not-a-key"}),
        ),
        typed(
            "registry",
            "kubernetes.io/dockerconfigjson",
            json!({".dockerconfigjson": "{\"auths\":{}}"}),
        ),
        typed(
            "login",
            "kubernetes.io/basic-auth",
            json!({"username": "u", "password": "p"}),
        ),
        typed(
            "bootstrap-token-abcdef",
            "bootstrap.kubernetes.io/token",
            json!({"token-id": "abcdef", "token-secret": "0123456789abcdef"}),
        ),
        typed("custom", "example.com/custom", json!({"k": "v"})),
    ];
    for s in &cases {
        api.create(&PostParams::default(), s).await.unwrap();
    }
    // An Opaque Secret another controller owns: a ConfigMap stands in for its owner (the
    // owner must exist, or the garbage collector removes the Secret).
    let owner = ns
        .api::<ConfigMap>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let owned: Secret = serde_json::from_value(json!({
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.uid().unwrap(), "controller": true}]},
        "stringData": {"k": "v"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &owned).await.unwrap();
    let mut before = BTreeMap::new();
    for n in cases
        .iter()
        .map(|s| s.name_any())
        .chain(["owned".to_string()])
    {
        before.insert(n.clone(), api.get(&n).await.unwrap());
    }
    for n in before.keys() {
        apply_vc(
            &ns,
            &format!("grab-{n}"),
            json!({"type": "bearerToken", "credentialsRef": {"name": "creds"},
                   "target": {"name": n, "adopt": true}}),
        )
        .await;
    }
    let want_messages = [
        ("tls", "kubernetes.io/tls"),
        ("registry", "kubernetes.io/dockerconfigjson"),
        ("login", "kubernetes.io/basic-auth"),
        ("bootstrap-token-abcdef", "bootstrap.kubernetes.io/token"),
        ("custom", "example.com/custom"),
    ];
    for (n, type_) in want_messages {
        let vc = with_reason(&ns, &format!("grab-{n}"), "SecretConflict").await;
        assert_eq!(
            message(&vc),
            format!("Secret {}/{n} is of type {type_}, which vaultconn never adopts: only Opaque Secrets can be taken over; choose another spec.target.name", ns.name)
        );
    }
    let vc = with_reason(&ns, "grab-owned", "SecretConflict").await;
    assert_eq!(
        message(&vc),
        format!("Secret {}/owned is controlled by ConfigMap {}/owner, which vaultconn never adopts; choose another spec.target.name", ns.name, ns.name)
    );
    tokio::time::sleep(QUIET_WINDOW).await;
    for (n, was) in &before {
        assert_eq!(h.writes(&secret_path(&ns, n)), 0, "writes to Secret {n}");
        let live = api.get(n).await.unwrap();
        assert_eq!(
            (raw_data(&live), live.owner_references()),
            (raw_data(was), was.owner_references()),
            "Secret {n} is untouched"
        );
    }
    h.assert_same_process();
    eprintln!(
        "adopt typed/owned: {} Secrets, 0 writes to any of them",
        before.len()
    );
}

// ---------------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------------

/// Token URL the corpus files name for connections that get as far as a token request; the
/// cluster test points it at its token server (plain http on loopback, as the test operator
/// allows), so every request they make is counted.
const CORPUS_TOKEN_URL: &str = "http://127.0.0.1:9/token";
/// The client the token server knows; corpus files use other ids or secrets on purpose.
const CORPUS_CLIENT: &str = "corpus-client";
const CORPUS_CLIENT_SECRET: &str = "corpus-client-SECRET";
/// Every secret value the corpus files hold: none may appear in a status, Event or log.
const CORPUS_SECRETS: &[&str] = &[
    CORPUS_CLIENT_SECRET,
    "corpus-token-value",
    "corpus-refresh-token",
    "corpus-key",
    "corpus-password",
    "sneaky",
];

/// Files of `tests/cli-corpus/bad` that cannot be applied as they are: not YAML, or an
/// object defined twice (`kubectl apply` would replace the first; a create refuses it).
const CLI_CORPUS_NOT_APPLICABLE: &[&str] = &[
    "broken-yaml.yaml",
    "helm-template-source.yaml",
    "duplicate-connection.yaml",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn corpus_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// `# cluster: NAME REASON` lines: what the controller says where `validate` cannot know
/// (the token endpoint's answer, a rejected Secret the connection then misses).
fn cluster_lines(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (name, reason) = l.strip_prefix("# cluster: ")?.split_once(' ')?;
            Some((name.to_string(), reason.to_string()))
        })
        .collect()
}

/// `vaultconn validate -o json` on `text` (stdin) as the test operator is configured.
fn validate(text: &str, namespace: &str) -> Vec<Problem> {
    use std::io::Write as _;
    let home = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vaultconn"))
        .args([
            "validate",
            "--allow-http-loopback",
            "-o",
            "json",
            "-n",
            namespace,
            "-",
        ])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vaultconn starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    problems_of(&report)
}

#[test]
fn validate_reports_every_corpus_file_as_it_states() {
    let files = corpus_files("tests/bad-input-corpus");
    assert!(files.len() >= 40, "the corpus lost files: {}", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let want = expectations(&text);
        let clustered = cluster_lines(&text);
        assert!(
            !want.is_empty() || !clustered.is_empty(),
            "{} states no outcome",
            file.display()
        );
        let got: Vec<Problem> = validate(&text, "default")
            .iter()
            .map(Problem::stated)
            .collect();
        assert_eq!(got, want, "{}", file.display());
    }
}

/// What the cluster must say about one document of a corpus file.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// The API server refuses the object; its message contains each of these.
    Rejected(Vec<String>),
    /// A VaultConnection ends with this reason and, when `validate` saw the problem, this
    /// message (validate's messages joined as the controller joins them).
    Reason {
        reason: String,
        message: Option<String>,
    },
    /// Created; a VaultConnection ends with some reason.
    Accepted,
}

/// What the controller's status says for the problems `validate` found in one document: the
/// first check the controller would stop at wins (spec, then credentials, then ownership).
fn expected_status(problems: &[&Problem]) -> Option<(String, String)> {
    for (check, reason) in [
        ("validation", "InvalidSpec"),
        ("credentials", "CredentialsMissing"),
        ("conflict", "SecretConflict"),
    ] {
        let messages: Vec<&str> = problems
            .iter()
            .filter(|p| p.check == check)
            .map(|p| p.message.as_str())
            .collect();
        if messages.is_empty() {
            continue;
        }
        let message = messages.join("; ");
        let reason = if message.contains("--token-url-allow") {
            "TokenURLNotAllowed"
        } else {
            reason
        };
        return Some((reason.to_string(), message));
    }
    None
}

/// One corpus file, applied to its own namespace.
struct CorpusCase {
    file: String,
    ns: TestNs,
    docs: Vec<(Value, Outcome)>,
    /// `validate` has an opinion on each VaultConnection (our corpus); the CLI corpus is
    /// compared with the controller by `tests/cli.rs`, here it only has to end somewhere.
    strict: bool,
}

async fn prepare(file: &Path, strict: bool, token_url: &str) -> CorpusCase {
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let text = std::fs::read_to_string(file)
        .unwrap()
        .replace(CORPUS_TOKEN_URL, token_url);
    let ns = test_namespace("bic").await;
    let problems = tokio::task::spawn_blocking({
        let (text, ns) = (text.clone(), ns.name.clone());
        move || validate(&text, &ns)
    })
    .await
    .unwrap();
    let clustered = cluster_lines(&text);
    let values: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let docs = values
        .into_iter()
        .filter(|v| !v.is_null())
        .enumerate()
        .map(|(i, v)| {
            let mine: Vec<&Problem> = problems.iter().filter(|p| p.document == i + 1).collect();
            let schema: Vec<String> = mine
                .iter()
                .filter(|p| p.check == "schema" && !p.message.contains("unknown field"))
                .map(|p| p.message.clone())
                .collect();
            let vc_name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
            let outcome = if !schema.is_empty() {
                Outcome::Rejected(schema)
            } else if let Some(reason) = clustered.get(&vc_name) {
                Outcome::Reason {
                    reason: reason.clone(),
                    message: None,
                }
            } else if let Some((reason, message)) = expected_status(&mine).filter(|_| strict) {
                Outcome::Reason {
                    reason,
                    message: Some(message),
                }
            } else {
                Outcome::Accepted
            };
            (v, outcome)
        })
        .collect();
    CorpusCase {
        file: name,
        ns,
        docs,
        strict,
    }
}

fn resource_of(kind: &str) -> ApiResource {
    match kind {
        "VaultConnection" => ApiResource::erase::<VaultConnection>(&()),
        "Secret" => ApiResource::erase::<Secret>(&()),
        "ServiceAccount" => ApiResource::erase::<k8s_openapi::api::core::v1::ServiceAccount>(&()),
        other => panic!("the corpus has a {other}"),
    }
}

/// Whether `vc` shows `outcome` for the generation it was last given.
fn shows(vc: &VaultConnection, outcome: &Outcome) -> bool {
    let observed = vc.status.as_ref().and_then(|s| s.observed_generation) == vc.metadata.generation;
    observed
        && match outcome {
            Outcome::Reason { reason: r, message } => {
                reason(vc) == *r && message.as_ref().is_none_or(|m| *m == self::message(vc))
            }
            _ => !reason(vc).is_empty(),
        }
}

/// Create the file's objects: Secrets and ServiceAccounts first, in file order, then each
/// VaultConnection, waiting until it shows its outcome before creating the next one (so a
/// connection that must find another's Secret finds it, as `validate` assumes).
async fn apply(case: &CorpusCase) {
    let ordered = case
        .docs
        .iter()
        .filter(|(v, _)| v["kind"] != "VaultConnection")
        .chain(
            case.docs
                .iter()
                .filter(|(v, _)| v["kind"] == "VaultConnection"),
        );
    for (doc, outcome) in ordered {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(case.ns.client.clone(), &case.ns.name, &resource_of(kind));
        let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        let created = api.create(&PostParams::default(), &obj).await;
        match (outcome, created) {
            (Outcome::Rejected(messages), Err(kube::Error::Api(status))) => {
                for m in messages {
                    assert!(
                        status.message.contains(m.as_str()),
                        "{}: the API server said {:?}, validate said {m:?}",
                        case.file,
                        status.message
                    );
                }
            }
            (Outcome::Rejected(_), Ok(_)) => {
                panic!("{}: the API server accepted a {kind}", case.file)
            }
            (_, Err(e)) => panic!("{}: creating a {kind}: {e}", case.file),
            (_, Ok(_)) if kind == "VaultConnection" => {
                let name = doc["metadata"]["name"].as_str().unwrap();
                vc_where(
                    &case.ns,
                    name,
                    &format!("{}: {outcome:?}", case.file),
                    |v| shows(v, outcome),
                )
                .await;
            }
            (_, Ok(_)) => {}
        }
    }
}

/// Wait until no request to any of `namespaces` arrived for `quiet`; how long that took.
/// Panics after `timeout` with the requests that kept coming.
async fn wait_quiet(
    h: &Harness,
    namespaces: &[&TestNs],
    quiet: Duration,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    let total = || -> usize { namespaces.iter().map(|ns| namespace_requests(h, ns)).sum() };
    let mut last = total();
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = total();
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() >= quiet {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "the operator kept sending requests to the corpus namespaces for {timeout:?}: {} so far",
            now
        );
    }
}

/// The operator's requests to one namespace (watches are cluster-wide, so these are its
/// reads and writes of the namespace's objects and Events).
fn namespace_requests(h: &Harness, ns: &TestNs) -> usize {
    h.requests(&format!("/namespaces/{}/", ns.name))
}

#[tokio::test]
async fn the_corpus_ends_in_rejections_or_specific_reasons_without_loops() {
    let h = harness().await;
    let ts = TokenServer::start(
        TokenServerConfig::default()
            .with_client(CORPUS_CLIENT, CORPUS_CLIENT_SECRET)
            .with_client("corpus-utf8", "corpus-utf8-SECRET"),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let files: Vec<(PathBuf, bool)> = corpus_files("tests/bad-input-corpus")
        .into_iter()
        .map(|f| (f, true))
        .chain(
            corpus_files("tests/cli-corpus/bad")
                .into_iter()
                .filter(|f| {
                    !CLI_CORPUS_NOT_APPLICABLE.contains(&f.file_name().unwrap().to_str().unwrap())
                })
                .map(|f| (f, false)),
        )
        .collect();
    let token_url = ts.token_url();
    let cases = futures::future::join_all(
        files
            .iter()
            .map(|(f, strict)| prepare(f, *strict, &token_url)),
    )
    .await;
    // The whole corpus at once.
    futures::future::join_all(cases.iter().map(apply)).await;
    let settled = started.elapsed();
    // Every connection still says what it said (nothing flapped back), and the counts from
    // here on are the steady state.
    let mut connections = 0;
    let mut rejected = 0;
    for case in &cases {
        for (doc, outcome) in &case.docs {
            match (doc["kind"].as_str(), outcome) {
                (_, Outcome::Rejected(_)) => rejected += 1,
                (Some("VaultConnection"), _) => {
                    connections += 1;
                    let name = doc["metadata"]["name"].as_str().unwrap();
                    let vc = case.ns.api::<VaultConnection>().get(name).await.unwrap();
                    assert!(
                        shows(&vc, outcome),
                        "{}: {outcome:?}, got {:?}",
                        case.file,
                        vc.status
                    );
                    if case.strict {
                        assert!(
                            !matches!(outcome, Outcome::Accepted),
                            "{}: {name} has no stated outcome",
                            case.file
                        );
                    }
                }
                _ => {}
            }
        }
    }
    // Events are published from a background queue and may still be on their way: wait
    // until the corpus namespaces see no request for a while (a loop never gets there).
    let namespaces: Vec<&TestNs> = cases.iter().map(|c| &c.ns).collect();
    let drained = wait_quiet(
        h,
        &namespaces,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    let before: Vec<usize> = cases.iter().map(|c| namespace_requests(h, &c.ns)).collect();
    let calls_before = ts.call_count();
    tokio::time::sleep(QUIET_WINDOW).await;
    let busy: Vec<(String, Vec<String>)> = cases
        .iter()
        .zip(&before)
        .filter(|(c, b)| namespace_requests(h, &c.ns) > **b)
        .map(|(c, b)| {
            let reqs = h
                .proxy
                .requests_matching(MethodMatch::Any, &format!("/namespaces/{}/", c.ns.name));
            (
                c.file.clone(),
                reqs[*b..]
                    .iter()
                    .map(|r| format!("{} {} {}", r.method, r.path, r.status))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        busy,
        vec![],
        "API requests per corpus file in the {QUIET_WINDOW:?} after every status settled"
    );
    assert_eq!(
        ts.call_count() - calls_before,
        0,
        "token requests in the quiet window"
    );
    // Each connection that reached the provider asked once (plus at most the one retry of
    // an unknown outcome): a rejection is not retried until something changes.
    let mut per_client: BTreeMap<String, usize> = BTreeMap::new();
    for c in ts.calls() {
        *per_client
            .entry(c.client_id.unwrap_or_default())
            .or_default() += 1;
    }
    for (client, n) in &per_client {
        assert!(*n <= 2, "{n} token requests of client {client:?}");
    }
    // No secret value in any status, Event or the operator's log.
    let logs = std::fs::read_to_string(&h.log_path).unwrap();
    assert!(!logs.is_empty(), "the operator's log is readable");
    let mut seen = logs;
    for case in &cases {
        seen.push_str(&status_and_event_text(&case.ns).await);
    }
    for s in CORPUS_SECRETS {
        assert!(
            !seen.contains(s),
            "{s:?} leaked into a status, Event or log"
        );
    }
    h.assert_same_process();
    eprintln!(
        "corpus: {} files, {connections} connections, {rejected} objects rejected by the API server; statuses settled in {settled:?}, requests drained {drained:?} later; token requests {}, by client {per_client:?}",
        cases.len(),
        ts.call_count()
    );
}

// ---------------------------------------------------------------------------------------------
// Bad token responses
// ---------------------------------------------------------------------------------------------

const RESP_CLIENT: &str = "bad-resp";
const RESP_SECRET: &str = "bad-resp-client-SECRET";
/// How long the token calls of a failing connection are counted, from its first call.
const CALL_WINDOW: Duration = Duration::from_secs(20);

/// Most token calls a connection may make in `window` from its first call while every
/// answer is a transient failure: attempts back off from 1 s doubling, less at most 20 %
/// jitter (`oauth::schedule::backoff`), and each attempt may repeat its call once after an
/// unknown outcome. A hot loop makes hundreds.
fn backoff_bound(window: Duration) -> usize {
    let (mut attempts, mut at, mut delay) = (1, 0.0, 0.8);
    while at + delay <= window.as_secs_f64() {
        at += delay;
        delay *= 2.0;
        attempts += 1;
    }
    2 * attempts
}

/// What a connection must end with after a bad response.
enum Then {
    /// This reason while the fault lasts (sticky faults).
    Fails(&'static str),
    /// Reconciled with a token the provider issued, expiring within this range from now.
    Ready { expires_in: (Duration, Duration) },
    /// Reconciled after the one broken answer, with the rotated refresh token kept.
    RecoversKeepingTheRotatedToken,
}

struct BadResponse {
    name: &'static str,
    fault: Fault,
    /// The refresh-token grant with rotation and a one-shot fault (else client credentials
    /// and a sticky fault).
    rotating: bool,
    then: Then,
}

fn raw_expires_in(raw: &str) -> Fault {
    Fault::RawField {
        field: "expires_in".into(),
        raw: raw.into(),
    }
}

const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn bad_responses() -> Vec<BadResponse> {
    let ready = |lo: Duration, hi: Duration| Then::Ready {
        expires_in: (lo, hi),
    };
    let five_min = (Duration::from_secs(240), Duration::from_secs(300));
    let ten_years = (TEN_YEARS - Duration::from_secs(600), TEN_YEARS);
    vec![
        BadResponse {
            name: "huge-body",
            fault: Fault::HugeBody {
                bytes: 10 * 1024 * 1024,
            },
            rotating: false,
            then: Then::Fails("UnparseableTokenResponse"),
        },
        BadResponse {
            name: "slow-loris",
            fault: Fault::SlowLoris {
                interval: Duration::from_millis(500),
            },
            rotating: false,
            then: Then::Fails("TokenResponseLost"),
        },
        BadResponse {
            name: "invalid-utf8",
            fault: Fault::InvalidUtf8,
            rotating: false,
            then: Then::Fails("UnparseableTokenResponse"),
        },
        BadResponse {
            name: "invalid-utf8-rotating",
            fault: Fault::InvalidUtf8,
            rotating: true,
            then: Then::RecoversKeepingTheRotatedToken,
        },
        BadResponse {
            name: "duplicate-access-token",
            fault: Fault::DuplicateField {
                field: "access_token".into(),
                decoy: "\"decoy-access-token\"".into(),
            },
            rotating: false,
            then: ready(Duration::from_secs(3500), Duration::from_secs(3600)),
        },
        BadResponse {
            name: "duplicate-refresh-token",
            fault: Fault::DuplicateField {
                field: "refresh_token".into(),
                decoy: "\"decoy-refresh-token\"".into(),
            },
            rotating: true,
            then: Then::RecoversKeepingTheRotatedToken,
        },
        BadResponse {
            name: "expires-in-negative",
            fault: raw_expires_in("-1"),
            rotating: false,
            then: ready(five_min.0, five_min.1),
        },
        BadResponse {
            name: "expires-in-1e308",
            fault: raw_expires_in("1e308"),
            rotating: false,
            then: ready(ten_years.0, ten_years.1),
        },
        BadResponse {
            name: "expires-in-beyond-u64",
            fault: raw_expires_in("99999999999999999999"),
            rotating: false,
            then: ready(ten_years.0, ten_years.1),
        },
        BadResponse {
            name: "expires-in-beyond-i64",
            fault: raw_expires_in("9223372036854775808"),
            rotating: false,
            then: ready(ten_years.0, ten_years.1),
        },
        BadResponse {
            name: "expires-in-1e400",
            fault: raw_expires_in("1e400"),
            rotating: false,
            then: Then::Fails("UnparseableTokenResponse"),
        },
    ]
}

/// Every token value the server handed out (or meant to), and the client secret.
fn secrets_of(ts: &TokenServer, seed: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = ts
        .calls()
        .into_iter()
        .filter_map(|c| c.outcome)
        .flat_map(|o| [o.access_token, o.refresh_token])
        .flatten()
        .collect();
    out.push(RESP_SECRET.into());
    out.extend(seed.map(str::to_string));
    out.extend(["decoy-access-token".into(), "decoy-refresh-token".into()]);
    out
}

/// Wait up to a minute for the connection `conn` to show `want`; the panic shows the last
/// status.
async fn until_reason(ns: &TestNs, case: &str, want: &str) -> VaultConnection {
    let api: Api<VaultConnection> = ns.api();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vc = api.get("conn").await.unwrap();
        if reason(&vc) == want {
            return vc;
        }
        assert!(
            Instant::now() < deadline,
            "{case}: no {want} within a minute; status {:?}",
            vc.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One bad-response case: its own namespace and token server.
async fn run_bad_response(case: BadResponse) -> String {
    let h = harness().await;
    let ns = test_namespace("bad-resp").await;
    let ts = TokenServer::start(
        TokenServerConfig::default()
            .with_client(RESP_CLIENT, RESP_SECRET)
            .with_rotation(true)
            .with_ttl(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let seed = case.rotating.then(|| ts.mint_refresh_token(RESP_CLIENT));
    let mut creds = vec![("client_id", RESP_CLIENT), ("client_secret", RESP_SECRET)];
    if let Some(rt) = &seed {
        creds.push(("refresh_token", rt.as_str()));
        ts.push_fault(case.fault.clone());
    } else {
        ts.set_sticky_fault(Some(case.fault.clone()));
    }
    put_secret(&ns, "creds", &creds).await;
    let grant = if case.rotating {
        "refreshToken"
    } else {
        "clientCredentials"
    };
    apply_vc(
        &ns,
        "conn",
        json!({"type": "oauth2", "credentialsRef": {"name": "creds"},
               "oauth2": {"tokenUrl": ts.token_url(), "grantType": grant}}),
    )
    .await;
    let name = case.name;
    let api: Api<VaultConnection> = ns.api();
    let get = || async { api.get("conn").await.unwrap() };
    let vc = match &case.then {
        Then::Fails(want) => {
            let vc = until_reason(&ns, name, want).await;
            // Count the calls of the window after the first one: the backoff's bound.
            let first = ts.calls()[0].at;
            let end = first + CALL_WINDOW;
            let now = std::time::SystemTime::now();
            if now < end {
                tokio::time::sleep(end.duration_since(now).unwrap()).await;
            }
            let calls = ts.calls().iter().filter(|c| c.at <= end).count();
            let bound = backoff_bound(CALL_WINDOW);
            assert!(
                calls <= bound,
                "{name}: {calls} token calls in {CALL_WINDOW:?} (bound {bound})"
            );
            assert_eq!(reason(&get().await), *want, "{name}: still {want}");
            vc
        }
        Then::Ready { expires_in } => {
            let vc = until_reason(&ns, name, "Reconciled").await;
            let out = ns.api::<Secret>().get("conn").await.unwrap();
            let token = data_of(&out)["access_token"].clone();
            assert!(ts.is_access_token_valid(&token), "{name}: the issued token");
            let expires: jiff::Timestamp = data_of(&out)["expires_at"].parse().unwrap();
            let left = expires.duration_since(jiff::Timestamp::now());
            let left = Duration::try_from(left).unwrap_or_default();
            assert!(
                left >= expires_in.0 && left <= expires_in.1,
                "{name}: expires in {left:?}, want {expires_in:?}"
            );
            tokio::time::sleep(QUIET_WINDOW).await;
            assert_eq!(ts.call_count(), 1, "{name}: token calls");
            vc
        }
        Then::RecoversKeepingTheRotatedToken => {
            let vc = until_reason(&ns, name, "Reconciled").await;
            let stored = stored_refresh_token(&ns, "conn").await.unwrap();
            assert!(
                ts.is_refresh_token_live(&stored),
                "{name}: the stored refresh token is live ({:?})",
                ts.refresh_token_state(&stored)
            );
            assert_eq!(ts.revocations(), 0, "{name}: no family revoked");
            let out = ns.api::<Secret>().get("conn").await.unwrap();
            assert!(ts.is_access_token_valid(&data_of(&out)["access_token"]));
            assert!(
                ts.call_count() <= 3,
                "{name}: {} token calls",
                ts.call_count()
            );
            vc
        }
    };
    let mut seen = serde_json::to_string(&vc.status).unwrap();
    seen.push_str(&status_and_event_text(&ns).await);
    seen.push_str(&std::fs::read_to_string(&h.log_path).unwrap());
    for s in secrets_of(&ts, seed.as_deref()) {
        assert!(
            !seen.contains(&s),
            "{name}: a token or secret in a status, Event or the log"
        );
    }
    h.assert_same_process();
    format!("{name}: {} ({} calls)", reason(&vc), ts.call_count())
}

#[tokio::test]
async fn bad_token_responses_end_in_a_specific_reason_without_a_hot_loop() {
    let results =
        futures::future::join_all(bad_responses().into_iter().map(run_bad_response)).await;
    let logs = std::fs::read_to_string(&harness().await.log_path).unwrap();
    assert!(!logs.is_empty(), "the operator's log is readable");
    assert!(!logs.contains(RESP_SECRET), "the client secret in the log");
    eprintln!("{}", results.join("\n"));
}
