//! The `vaultconn` command line, run as a process the way a person, a pipeline or kubectl runs
//! it: `validate` on the corpus in `tests/cli-corpus` (and against what the controller and the
//! API server really say), `new` round trips, `status` and `refresh --wait` against the test
//! cluster and its token server, `kubectl vaultconn` through kubectl's plugin mechanism, and
//! the one-line errors with their exit codes.
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;
use kube::ResourceExt;
use serde_json::Value;
use support::corpus::{expectations, problems_of, Problem};
use support::objects::*;
use support::operator::ensure_operator;
use support::{cluster, test_namespace, wait_for_some, TestNs};
use vaultconn::api::VaultConnection;
use vaultconn_testkit::token_server::{TokenServer, TokenServerConfig};

const CLIENT: &str = "cli-app";
const CLIENT_SECRET: &str = "cli-client-SECRET-value";

/// What a run printed and returned.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli-corpus")
}

/// The binary, without any cluster: no KUBECONFIG, a HOME without ~/.kube, not in a Pod.
fn offline(program: &str, home: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn finish(mut cmd: std::process::Command, args: &[&str], stdin: Option<&str>) -> Out {
    let mut child = cmd.args(args).spawn().expect("the program starts");
    {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes())
                .expect("stdin accepts the input");
        }
    }
    let out = child.wait_with_output().expect("the program ends");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `vaultconn ARGS` with no cluster configured.
fn vaultconn(args: &[&str], stdin: Option<&str>) -> Out {
    let home = tempfile::tempdir().unwrap();
    finish(
        offline(env!("CARGO_BIN_EXE_vaultconn"), home.path()),
        args,
        stdin,
    )
}

/// `program ARGS` against the test cluster (KUBECONFIG set), off the async runtime.
async fn against_cluster(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Out {
    let kubeconfig = cluster().await.kubeconfig_path().to_path_buf();
    let program = program.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.map(str::to_string);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let home = tempfile::tempdir().unwrap();
        let mut cmd = offline(&program, home.path());
        cmd.env("KUBECONFIG", &kubeconfig);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        finish(cmd, &args, stdin.as_deref())
    })
    .await
    .unwrap()
}

async fn vaultconn_k(args: &[&str]) -> Out {
    against_cluster(env!("CARGO_BIN_EXE_vaultconn"), args, None, &[]).await
}

fn kubectl_path() -> &'static str {
    let path = "/usr/bin/kubectl";
    assert!(
        Path::new(path).exists(),
        "these tests drive the real kubectl at {path}; install it"
    );
    path
}

async fn kubectl(args: &[&str], stdin: Option<&str>) -> Out {
    against_cluster(kubectl_path(), args, stdin, &[]).await
}

/// The problems of a `validate -o json` report, without their check (as `# expect:` lines
/// state them).
fn reported(stdout: &str) -> Vec<Problem> {
    let report: Value = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    problems_of(&report).iter().map(Problem::stated).collect()
}

/// `text` with runs of spaces collapsed, so assertions do not depend on column widths.
fn squash(text: &str) -> String {
    text.lines()
        .map(|l| {
            l.split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn corpus_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn the_good_corpus_passes() {
    let dir = corpus().join("good");
    let out = vaultconn(&["validate", dir.to_str().unwrap(), "-o", "json"], None);
    assert_eq!(out.code, 0, "{out:?}");
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["problems"], serde_json::json!([]));
    assert_eq!(report["files"], 3);
    // Seven of connections.yaml, one of the Helm output (HashiCorp's kind is not ours), one
    // in the List.
    assert_eq!(report["connections"], 9);
    // Human output: nothing but the summary on stderr.
    let out = vaultconn(&["validate", dir.to_str().unwrap()], None);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{out:?}");
    assert!(
        out.stderr.contains("0 errors, 0 warnings"),
        "{}",
        out.stderr
    );
}

#[test]
fn every_bad_manifest_is_reported_at_its_field_with_the_expected_message() {
    let files = corpus_files("bad");
    assert!(files.len() >= 20, "the corpus lost files");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let want = expectations(&text);
        assert!(!want.is_empty(), "{} states no expectation", file.display());
        let out = vaultconn(
            &[
                "validate",
                "-n",
                "default",
                "-o",
                "json",
                file.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(reported(&out.stdout), want, "{}", file.display());
        let code = if want.iter().any(|e| e.error) { 1 } else { 0 };
        assert_eq!(out.code, code, "{}: {}", file.display(), out.stderr);
    }
}

#[test]
fn human_output_names_file_line_document_and_object() {
    let file = corpus().join("bad/schema-unknown-type.yaml");
    let out = vaultconn(&["validate", file.to_str().unwrap()], None);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stdout,
        format!("{}:3: error: document 1, VaultConnection default/billing: spec.type: Unsupported value: \"oAuth2\": supported values: \"apiKey\", \"bearerToken\", \"basicAuth\", \"twilio\", \"stripe\", \"oauth2\", \"auth0\"\n", file.display())
    );
    assert_eq!(
        out.stderr,
        "1 file, 1 document, 1 VaultConnection: 1 error, 0 warnings\n"
    );
}

#[test]
fn stdin_is_read_for_a_dash() {
    let good = std::fs::read_to_string(corpus().join("good/helm-output.yaml")).unwrap();
    let out = vaultconn(&["validate", "-"], Some(&good));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("1 file, 5 documents, 1 VaultConnection"),
        "{}",
        out.stderr
    );
    let bad = std::fs::read_to_string(corpus().join("bad/shared-target.yaml")).unwrap();
    let out = vaultconn(&["validate", "-", "-o", "json"], Some(&bad));
    assert_eq!(out.code, 1);
    assert_eq!(reported(&out.stdout), expectations(&bad));
    assert!(
        out.stdout.contains("\"file\": \"<stdin>\""),
        "{}",
        out.stdout
    );
}

#[test]
fn the_token_url_allow_list_is_the_operators() {
    let file = corpus().join("bad/private-token-url.yaml");
    let f = file.to_str().unwrap();
    assert_eq!(vaultconn(&["validate", f], None).code, 1);
    let out = vaultconn(
        &[
            "validate",
            "--token-url-allow",
            "idp.corp.internal,10.20.0.0/16",
            f,
        ],
        None,
    );
    assert_eq!(out.code, 0, "{out:?}");
    let out = vaultconn(&["validate", "--token-url-allow", "10.20.0.0/99", f], None);
    assert_eq!(
        out.code, 2,
        "a bad entry is refused as the operator refuses it: {out:?}"
    );
}

#[test]
fn warnings_pass_unless_strict_and_unreadable_input_is_a_usage_error() {
    let file = corpus().join("bad/empty-credential-values.yaml");
    let f = file.to_str().unwrap();
    assert_eq!(vaultconn(&["validate", f], None).code, 0);
    assert_eq!(vaultconn(&["validate", "--strict", f], None).code, 1);
    let out = vaultconn(&["validate", "/nonexistent/manifests"], None);
    assert_eq!(out.code, 2);
    assert_eq!(
        out.stderr,
        "error: cannot read /nonexistent/manifests: No such file or directory (os error 2)\n"
    );
}

#[test]
fn no_command_prints_help_and_every_command_has_examples() {
    let out = vaultconn(&[], None);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("Usage: vaultconn <COMMAND>"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("Exit codes:"), "{}", out.stderr);
    for cmd in [
        "types",
        "new",
        "validate",
        "status",
        "refresh",
        "completions",
    ] {
        let out = vaultconn(&[cmd, "--help"], None);
        assert_eq!(out.code, 0, "{cmd}");
        assert!(
            out.stdout.contains(&format!("  vaultconn {cmd}")),
            "{cmd}: {}",
            out.stdout
        );
    }
    // The operator's flags are run's, not everyone's.
    let out = vaultconn(&["status", "--help"], None);
    assert!(!out.stdout.contains("--leader-elect"));
    assert!(vaultconn(&["run", "--help"], None)
        .stdout
        .contains("--leader-elect"));
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = vaultconn(&["completions", shell], None);
        assert_eq!(out.code, 0, "{shell}");
        for word in ["validate", "refresh", "all-namespaces", "oauth2"] {
            assert!(out.stdout.contains(word), "{shell} completions lack {word}");
        }
    }
}

#[test]
fn types_lists_the_catalog_for_people_and_machines() {
    let out = vaultconn(&["types", "-o", "json"], None);
    assert_eq!(out.code, 0);
    let all: Value = serde_json::from_str(&out.stdout).unwrap();
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = vaultconn::catalog::CATALOG
        .iter()
        .map(|t| t.type_.as_str())
        .collect();
    assert_eq!(names, want);
    let out = vaultconn(&["types", "AUTH0", "-o", "yaml"], None);
    assert_eq!(out.code, 0);
    let one: Value = serde_saphyr::from_str(&out.stdout).unwrap();
    assert_eq!(
        one["requiredKeys"],
        serde_json::json!(["client_id", "client_secret"])
    );
    // The example is a valid manifest.
    let out2 = vaultconn(&["validate", "-"], Some(one["example"].as_str().unwrap()));
    assert_eq!(out2.code, 0, "{out2:?}");
    let text = vaultconn(&["types", "stripe"], None).stdout;
    assert!(text.contains("optional: publishable_key"), "{text}");
}

/// `new` arguments that make a complete connection of every type.
fn new_args(t: &str) -> Vec<&'static str> {
    match t {
        "apiKey" => vec![
            "--base-url",
            "https://api.vaultconn.invalid",
            "--from-literal",
            "api_key=k",
        ],
        "bearerToken" => vec!["--from-literal", "token=t"],
        "basicAuth" => vec![
            "--from-literal",
            "username=u",
            "--from-literal",
            "password=p",
        ],
        "twilio" => vec![
            "--from-literal",
            "account_sid=AC1",
            "--from-literal",
            "auth_token=t",
        ],
        "stripe" => vec!["--from-literal", "secret_key=sk"],
        "oauth2" => vec![
            "--token-url",
            "https://idp.vaultconn.invalid/token",
            "--from-literal",
            "client_id=c",
            "--from-literal",
            "client_secret=s",
        ],
        "auth0" => vec![
            "--domain",
            "t.eu.auth0.invalid",
            "--audience",
            "https://api",
            "--from-literal",
            "client_id=c",
            "--from-literal",
            "client_secret=s",
        ],
        other => panic!("no arguments for {other}"),
    }
}

#[test]
fn new_output_round_trips_through_validate() {
    for t in vaultconn::catalog::CATALOG.iter().map(|t| t.type_.as_str()) {
        let mut args = vec!["new", t, "conn", "-n", "team"];
        args.extend(new_args(t));
        let made = vaultconn(&args, None);
        assert_eq!(made.code, 0, "{t}: {}", made.stderr);
        let checked = vaultconn(&["validate", "-", "-o", "json"], Some(&made.stdout));
        assert_eq!(checked.code, 0, "{t}");
        assert_eq!(reported(&checked.stdout), [], "{t}");
        // Placeholders instead of values: valid, with a warning per empty key.
        let template = vaultconn(
            &args[..5]
                .iter()
                .chain(new_args(t).iter().take_while(|a| **a != "--from-literal"))
                .copied()
                .collect::<Vec<_>>(),
            None,
        );
        assert_eq!(template.code, 0, "{t}: {}", template.stderr);
        let checked = vaultconn(&["validate", "-", "-o", "json"], Some(&template.stdout));
        assert_eq!(checked.code, 0, "{t}");
        assert!(
            reported(&checked.stdout)
                .iter()
                .all(|p| !p.error && p.message.contains("has no key")),
            "{t}"
        );
        let empty = vaultconn(
            &args[..5]
                .iter()
                .chain(["--empty"].iter())
                .chain(new_args(t).iter().take_while(|a| **a != "--from-literal"))
                .copied()
                .collect::<Vec<_>>(),
            None,
        );
        assert_eq!(empty.code, 0, "{t}: {}", empty.stderr);
        let checked = vaultconn(&["validate", "-", "-o", "json"], Some(&empty.stdout));
        assert_eq!(reported(&checked.stdout), [], "{t}");
    }
    let out = vaultconn(&["new", "oauth2", "conn"], None);
    assert_eq!(out.code, 2);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("needs --token-url"), "{}", out.stderr);
}

/// Create every object of a manifest file in `ns` as kubectl would (VaultConnections through
/// the dynamic API, so schema-invalid ones reach the API server). Returns each result.
async fn create_all(ns: &TestNs, text: &str) -> Vec<Result<(), kube::Error>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
    let mut out = Vec::new();
    for doc in docs {
        let ar = match doc["kind"].as_str() {
            Some("VaultConnection") => ApiResource::erase::<VaultConnection>(&()),
            Some("Secret") => ApiResource::erase::<Secret>(&()),
            other => panic!("unexpected kind {other:?}"),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
        let obj: DynamicObject = serde_json::from_value(doc).unwrap();
        out.push(api.create(&PostParams::default(), &obj).await.map(|_| ()));
    }
    out
}

fn messages_of(stdout: &str, document: usize) -> Vec<String> {
    reported(stdout)
        .into_iter()
        .filter(|p| p.document == document)
        .map(|p| p.message)
        .collect()
}

#[tokio::test]
async fn validate_reports_what_the_controller_puts_in_status() {
    ensure_operator().await;
    // (file, the connection, its document, the reason the controller gives)
    let cases = [
        ("http-token-url.yaml", "billing", 1, "InvalidSpec"),
        ("metadata-token-url.yaml", "billing", 1, "InvalidSpec"),
        ("userinfo-token-url.yaml", "billing", 1, "InvalidSpec"),
        ("auth0-missing-audience.yaml", "payments", 1, "InvalidSpec"),
        ("auth0-domain-url.yaml", "payments", 1, "InvalidSpec"),
        ("settings-of-another-type.yaml", "github", 1, "InvalidSpec"),
        ("renew-both.yaml", "billing", 1, "InvalidSpec"),
        ("oauth2-params-and-scopes.yaml", "billing", 1, "InvalidSpec"),
        ("target-labels.yaml", "maps", 1, "InvalidSpec"),
        ("target-is-credentials.yaml", "maps", 1, "InvalidSpec"),
        (
            "missing-credential-key.yaml",
            "legacy",
            1,
            "CredentialsMissing",
        ),
        ("target-foreign-secret.yaml", "maps", 2, "SecretConflict"),
        // The test operator has no --token-url-allow list.
        ("private-token-url.yaml", "billing", 1, "TokenURLNotAllowed"),
    ];
    let checks = cases
        .iter()
        .map(|(file, name, doc, want_reason)| async move {
            let ns = test_namespace("cli-agree").await;
            let path = corpus().join("bad").join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            // The test operator runs with --allow-http-loopback: validate the same way.
            let out = vaultconn(
                &[
                    "validate",
                    "--allow-http-loopback",
                    "-n",
                    &ns.name,
                    "-o",
                    "json",
                    path.to_str().unwrap(),
                ],
                None,
            );
            let want = messages_of(&out.stdout, *doc);
            assert!(!want.is_empty(), "{file}: validate found nothing");
            for r in create_all(&ns, &text).await {
                r.unwrap_or_else(|e| panic!("{file}: {e}"));
            }
            // Objects are created one by one, so the controller may pass through other states
            // first (a connection before its Secret): wait for the final word, which must be ours.
            let want = want.join("; ");
            vc_where(
                &ns,
                name,
                &format!("{file}: {want_reason} saying {want:?}"),
                |v| reason(v) == *want_reason && message(v) == want,
            )
            .await;
        });
    futures::future::join_all(checks).await;
}

#[tokio::test]
async fn validate_reports_the_conflict_the_controller_finds_for_the_second_connection() {
    ensure_operator().await;
    let ns = test_namespace("cli-shared").await;
    let path = corpus().join("bad/shared-target.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let out = vaultconn(
        &[
            "validate",
            "-n",
            &ns.name,
            "-o",
            "json",
            path.to_str().unwrap(),
        ],
        None,
    );
    let want = messages_of(&out.stdout, 3);
    assert_eq!(want.len(), 1);
    // In the cluster the first connection gets there first, as in the file.
    let docs: Vec<&str> = text.split("\n---\n").collect();
    for r in create_all(&ns, &format!("{}\n---\n{}", docs[0], docs[1])).await {
        r.unwrap();
    }
    ready(&ns, "github").await;
    for r in create_all(&ns, docs[2]).await {
        r.unwrap();
    }
    let vc = with_reason(&ns, "gitlab", "SecretConflict").await;
    assert_eq!(message(&vc), want[0]);
}

#[tokio::test]
async fn schema_errors_are_what_the_api_server_says() {
    let ns = test_namespace("cli-schema").await;
    for file in [
        "schema-unknown-type.yaml",
        "schema-missing-token-url.yaml",
        "schema-percentage.yaml",
        "schema-suspend-string.yaml",
        "schema-bad-name.yaml",
    ] {
        let path = corpus().join("bad").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let out = vaultconn(&["validate", "-o", "json", path.to_str().unwrap()], None);
        let ours = messages_of(&out.stdout, 1);
        assert!(!ours.is_empty(), "{file}");
        let refused = create_all(&ns, &text).await.remove(0);
        let Err(kube::Error::Api(status)) = refused else {
            panic!("{file}: the API server accepted it: {refused:?}");
        };
        for m in ours {
            assert!(
                status.message.contains(&m),
                "{file}: API server said {:?}, validate said {m:?}",
                status.message
            );
        }
    }
}

#[tokio::test]
async fn new_then_fill_in_then_kubectl_wait_turns_ready() {
    ensure_operator().await;
    let ns = test_namespace("cli-new").await;
    let made = vaultconn(&["new", "basicAuth", "legacy", "-n", &ns.name], None);
    assert_eq!(made.code, 0, "{}", made.stderr);
    let applied = kubectl(&["apply", "-f", "-"], Some(&made.stdout)).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    // `kubectl apply` creates the connection and its empty Secret one after the other: the
    // first reconcile may still see no Secret, so wait for the message about the empty one.
    let want = format!(
        "Secret {}/legacy-credentials has no keys username, password (or it is empty)",
        ns.name
    );
    let vc = vc_where(
        &ns,
        "legacy",
        "the empty credentials Secret is reported",
        |v| reason(v) == "CredentialsMissing" && message(v) == want,
    )
    .await;
    assert_eq!(message(&vc), want);
    // The dashboard's "fill in" step.
    put_secret(
        &ns,
        "legacy-credentials",
        &[("username", "svc"), ("password", "pw")],
    )
    .await;
    let waited = kubectl(
        &[
            "wait",
            "-n",
            &ns.name,
            "--for=condition=Ready",
            "vaultconnections.vaultconn.dev/legacy",
            "--timeout=30s",
        ],
        None,
    )
    .await;
    assert_eq!(waited.code, 0, "{waited:?}");
    secret_data_eq(
        &ns,
        "legacy",
        map(&[
            ("username", "svc"),
            ("password", "pw"),
            ("authorization", "Basic c3ZjOnB3"),
        ]),
    )
    .await;
}

#[tokio::test]
async fn new_empty_is_pending_until_its_credentials_exist() {
    ensure_operator().await;
    let ns = test_namespace("cli-empty").await;
    let made = vaultconn(&["new", "twilio", "sms", "-n", &ns.name, "--empty"], None);
    assert!(!made.stdout.contains("kind: Secret"));
    let applied = kubectl(&["apply", "-f", "-"], Some(&made.stdout)).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    let vc = with_reason(&ns, "sms", "CredentialsMissing").await;
    assert_eq!(phase(&vc), Some(vaultconn::api::Phase::Pending));
    assert_eq!(
        message(&vc),
        format!(
            "Secret {}/sms-credentials not found (needs keys account_sid, auth_token)",
            ns.name
        )
    );
    put_secret(
        &ns,
        "sms-credentials",
        &[("account_sid", "AC1"), ("auth_token", "t")],
    )
    .await;
    ready(&ns, "sms").await;
}

async fn oauth_connection(ns: &TestNs, ts: &TokenServer, name: &str) -> VaultConnection {
    let made = vaultconn(
        &[
            "new",
            "oauth2",
            name,
            "-n",
            &ns.name,
            "--token-url",
            &ts.token_url(),
            "--allow-http-loopback",
            "--from-literal",
            &format!("client_id={CLIENT}"),
            "--from-literal",
            &format!("client_secret={CLIENT_SECRET}"),
        ],
        None,
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    let applied = kubectl(&["apply", "-f", "-"], Some(&made.stdout)).await;
    assert_eq!(applied.code, 0, "{applied:?}");
    vc_where(ns, name, "a token", |v| {
        phase(v) == Some(vaultconn::api::Phase::Ready)
            && v.status
                .as_ref()
                .and_then(|s| s.expires_at.as_ref())
                .is_some()
    })
    .await
}

#[tokio::test]
async fn refresh_wait_makes_exactly_one_token_request_and_reports_the_new_expiry() {
    ensure_operator().await;
    let ns = test_namespace("cli-refresh").await;
    let ts = TokenServer::start(TokenServerConfig::default().with_client(CLIENT, CLIENT_SECRET))
        .await
        .unwrap();
    let before = oauth_connection(&ns, &ts, "billing").await;
    assert_eq!(ts.call_count(), 1, "the first token");
    ts.reset_calls();
    let out = vaultconn_k(&[
        "refresh",
        "billing",
        "-n",
        &ns.name,
        "--wait",
        "--timeout",
        "30s",
    ])
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(ts.call_count(), 1, "one refresh is one token request");
    let after: VaultConnection = ns.api().get("billing").await.unwrap();
    let status = after.status.clone().unwrap();
    assert_ne!(
        status.last_refresh_time,
        before.status.unwrap().last_refresh_time
    );
    let expires = status.expires_at.unwrap();
    assert!(
        out.stdout.starts_with(&format!(
            "Refreshed: the new token expires at {expires} (in "
        )),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.stderr,
        format!(
            "Refresh requested for VaultConnection {}/billing.\n",
            ns.name
        )
    );
    // Nothing more comes of it: a later reconcile makes no request.
    force_reconcile(&ns, "billing-credentials", "billing").await;
    assert_eq!(ts.call_count(), 1);
    // Without --wait it only asks.
    let out = vaultconn_k(&["refresh", "billing", "-n", &ns.name]).await;
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{out:?}");
    wait_for_some(WAIT, "the second refresh", || async {
        (ts.call_count() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn refresh_wait_reports_why_it_failed() {
    ensure_operator().await;
    let ns = test_namespace("cli-refresh-fail").await;
    let ts = TokenServer::start(TokenServerConfig::default().with_client(CLIENT, CLIENT_SECRET))
        .await
        .unwrap();
    oauth_connection(&ns, &ts, "billing").await;
    ts.remove_client(CLIENT);
    let out = vaultconn_k(&[
        "refresh",
        "billing",
        "-n",
        &ns.name,
        "--wait",
        "--timeout",
        "30s",
    ])
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "error: refresh of {}/billing failed: InvalidClient: ",
            ns.name
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(CLIENT_SECRET));
    // A static connection has nothing to refresh: refused before anything is written.
    put_secret(&ns, "t", &[("token", "x")]).await;
    apply_vc(
        &ns,
        "static",
        serde_json::json!({"type": "bearerToken", "credentialsRef": {"name": "t"}}),
    )
    .await;
    let out = vaultconn_k(&["refresh", "static", "-n", &ns.name, "--wait"]).await;
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        format!("error: VaultConnection {}/static is of type bearerToken: only oauth2 and auth0 connections have tokens to refresh\n", ns.name)
    );
    let vc: VaultConnection = ns.api().get("static").await.unwrap();
    assert!(!vc
        .annotations()
        .contains_key(vaultconn::names::REFRESH_REQUESTED_ANNOTATION));
}

#[tokio::test]
async fn status_shows_one_connection_a_namespace_and_all_namespaces() {
    ensure_operator().await;
    let ns = test_namespace("cli-status").await;
    let token = "TOKEN-value-that-must-not-show";
    let made = vaultconn(
        &[
            "new",
            "bearerToken",
            "api",
            "-n",
            &ns.name,
            "--from-literal",
            &format!("token={token}"),
        ],
        None,
    );
    assert_eq!(
        kubectl(&["apply", "-f", "-"], Some(&made.stdout))
            .await
            .code,
        0
    );
    let made = vaultconn(&["new", "stripe", "shop", "-n", &ns.name, "--empty"], None);
    assert_eq!(
        kubectl(&["apply", "-f", "-"], Some(&made.stdout))
            .await
            .code,
        0
    );
    let api_vc = ready(&ns, "api").await;
    with_reason(&ns, "shop", "CredentialsMissing").await;
    // Events are published in the background: wait until the Secret's creation is recorded.
    let one: Value = wait_for_some(WAIT, "status with the SecretCreated Event", || async {
        let out = vaultconn_k(&["status", "api", "-n", &ns.name, "-o", "json"]).await;
        assert_eq!(out.code, 0, "{out:?}");
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "SecretCreated")
            .then_some(v)
    })
    .await;
    let status = api_vc.status.unwrap();
    assert_eq!(one["phase"], "Ready");
    assert_eq!(one["ready"], true);
    assert_eq!(one["reason"], "Reconciled");
    assert_eq!(one["message"], status.conditions[0].message.as_str());
    assert_eq!(one["targetSecret"], "api");
    assert_eq!(one["secretName"], "api");
    assert_eq!(one["credentialsSecret"], "api-credentials");
    assert_eq!(one["stateSecret"], Value::Null);
    let text = vaultconn_k(&["status", "api", "-n", &ns.name]).await.stdout;
    let squashed = squash(&text);
    for want in [
        format!("Name: {}/api\n", ns.name),
        "Phase: Ready\n".into(),
        "Ready: True, Reconciled, since ".into(),
        "Secret: api\n".into(),
        "Credentials: api-credentials\n".into(),
        "Events:\n".into(),
        "SecretCreated".into(),
    ] {
        assert!(squashed.contains(&want), "{want:?} missing from\n{text}");
    }
    let table = vaultconn_k(&["status", "-n", &ns.name]).await.stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME "), "{table}");
    assert!(
        lines[1].starts_with("api ") && lines[1].contains("Reconciled"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("shop ")
            && lines[2].contains("Pending")
            && lines[2].contains("CredentialsMissing"),
        "{table}"
    );
    let all = vaultconn_k(&["status", "-A"]).await.stdout;
    assert!(all.starts_with("NAMESPACE "), "{all}");
    assert!(
        all.lines()
            .any(|l| l.starts_with(&format!("{} ", ns.name)) && l.contains(" shop ")),
        "{all}"
    );
    for out in [&text, &table, &all, &one.to_string()] {
        assert!(!out.contains(token), "a credential value was shown");
    }
    let missing = vaultconn_k(&["status", "nope", "-n", &ns.name]).await;
    assert_eq!(missing.code, 4);
    assert_eq!(
        missing.stderr,
        format!("error: VaultConnection {0}/nope not found (list them with `vaultconn status -n {0}`)\n", ns.name)
    );
}

/// A kubeconfig for the test cluster with an extra context `team` (namespace `ns`) and a user
/// that impersonates someone without any RBAC.
async fn extra_kubeconfig(dir: &Path, ns: &str) -> PathBuf {
    let cp = cluster().await;
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: {server}, insecure-skip-tls-verify: true}}
users:
- name: admin
  user: {{token: {token}}}
- name: nobody
  user: {{token: {token}, as: jane}}
contexts:
- name: admin
  context: {{cluster: test, user: admin}}
- name: team
  context: {{cluster: test, user: admin, namespace: {ns}}}
- name: jane
  context: {{cluster: test, user: nobody, namespace: {ns}}}
- name: nowhere
  context: {{cluster: nowhere, user: admin}}
current-context: admin
",
        server = cp.server_url(),
        token = cp.admin_token(),
    );
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn kubectl_vaultconn_works_as_a_plugin_with_kubectls_flags() {
    ensure_operator().await;
    let ns = test_namespace("cli-plugin").await;
    put_secret(&ns, "c", &[("token", "x")]).await;
    apply_vc(
        &ns,
        "api",
        serde_json::json!({"type": "bearerToken", "credentialsRef": {"name": "c"}}),
    )
    .await;
    ready(&ns, "api").await;
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_vaultconn"),
        dir.path().join("kubectl-vaultconn"),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [("PATH", path.as_str())];
    let kc = extra_kubeconfig(dir.path(), &ns.name).await;
    let kc = kc.to_str().unwrap();

    let listed = against_cluster(kubectl_path(), &["plugin", "list"], None, &env).await;
    assert!(listed.stdout.contains("kubectl-vaultconn"), "{listed:?}");

    let out = against_cluster(
        kubectl_path(),
        &["vaultconn", "status", "api", "-n", &ns.name],
        None,
        &env,
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        squash(&out.stdout).contains(&format!("Name: {}/api\n", ns.name)),
        "{}",
        out.stdout
    );

    // --kubeconfig and --context as kubectl takes them: the context's namespace applies, and
    // the flags may come before the command.
    for args in [
        vec![
            "vaultconn",
            "status",
            "api",
            "--kubeconfig",
            kc,
            "--context",
            "team",
        ],
        vec![
            "vaultconn",
            "--kubeconfig",
            kc,
            "--context=team",
            "status",
            "api",
            "-o",
            "json",
        ],
    ] {
        let out = against_cluster(kubectl_path(), &args, None, &env).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        assert!(out.stdout.contains("Ready"), "{args:?}: {}", out.stdout);
    }

    let help = against_cluster(
        kubectl_path(),
        &["vaultconn", "refresh", "--help"],
        None,
        &env,
    )
    .await;
    assert!(
        help.stdout.contains("Usage: kubectl vaultconn refresh"),
        "{}",
        help.stdout
    );
    assert!(
        help.stdout
            .contains("  kubectl vaultconn refresh billing -n payments --wait"),
        "{}",
        help.stdout
    );
}

#[tokio::test]
async fn cluster_problems_are_one_line_with_exit_code_3() {
    let ns = test_namespace("cli-errors").await;
    let dir = tempfile::tempdir().unwrap();
    let kc = extra_kubeconfig(dir.path(), &ns.name).await;
    let kc = kc.to_str().unwrap();
    // (arguments, environment, the error line)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, String);
    let cases: Vec<Case> = vec![
        (vec!["status"], vec![("KUBECONFIG", "")], "error: no cluster configured: set KUBECONFIG or pass --kubeconfig FILE (the file kubectl uses), or run in a Pod".into()),
        (vec!["status"], vec![("KUBECONFIG", "/nonexistent/kubeconfig")], "error: kubeconfig /nonexistent/kubeconfig: file not found".into()),
        (vec!["status", "--kubeconfig", kc, "--context", "prod"], vec![], format!("error: kubeconfig {kc}: no context \"prod\" (contexts: admin, team, jane, nowhere)")),
        (vec!["status", "x", "--kubeconfig", kc, "--context", "jane"], vec![], format!("error: permission denied: cannot get vaultconnections x in namespace {} (vaultconnections.vaultconn.dev \"x\" is forbidden: User \"jane\" cannot get resource \"vaultconnections\" in API group \"vaultconn.dev\" in the namespace \"{}\"); ask for RBAC that allows it", ns.name, ns.name)),
        (vec!["refresh", "x", "--kubeconfig", kc, "--context", "jane"], vec![], format!("error: permission denied: cannot get vaultconnections x in namespace {}", ns.name)),
    ];
    for (args, env, want) in cases {
        let out = against_cluster(env!("CARGO_BIN_EXE_vaultconn"), &args, None, &env).await;
        assert_eq!(out.code, 3, "{args:?}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with(&want),
            "{args:?}:\n got {}\nwant {want}",
            out.stderr
        );
    }
    // Nothing listening: unreachable.
    let path = dir.path().join("closed");
    std::fs::write(&path, "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n").unwrap();
    let out = against_cluster(
        env!("CARGO_BIN_EXE_vaultconn"),
        &["status", "--kubeconfig", path.to_str().unwrap()],
        None,
        &[],
    )
    .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr
            .starts_with("error: cannot reach the API server at https://127.0.0.1:1/"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

#[tokio::test]
async fn a_cluster_without_the_crd_says_how_to_install_it() {
    // A real API server that has never seen the CRD (no controller manager: not needed).
    let opts = vaultconn_testkit::control_plane::ControlPlaneOptions {
        controller_manager: false,
        provision_script: Some(
            vaultconn_testkit::repo_root().join("scripts/provision-control-plane.sh"),
        ),
        ..Default::default()
    };
    let mut bare = vaultconn_testkit::control_plane::ControlPlane::start(opts)
        .await
        .unwrap();
    let kc = bare.kubeconfig_path().to_str().unwrap().to_string();
    for args in [
        vec!["status", "--kubeconfig", &kc],
        vec!["status", "x", "--kubeconfig", &kc],
        vec!["refresh", "x", "--kubeconfig", &kc],
    ] {
        let out = against_cluster(env!("CARGO_BIN_EXE_vaultconn"), &args, None, &[]).await;
        assert_eq!(out.code, 3, "{args:?}: {out:?}");
        assert_eq!(
            out.stderr,
            "error: the VaultConnection CRD is not installed in this cluster: install it with `vaultconn crd | kubectl apply -f -`\n",
            "{args:?}"
        );
    }
    bare.stop();
}

#[test]
fn the_krew_manifest_installs_this_binary_as_kubectl_vaultconn() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root.join("plugins/vaultconn.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["apiVersion"],
        "krew.googlecontainertools.github.com/v1alpha2"
    );
    assert_eq!(manifest["kind"], "Plugin");
    // kubectl finds plugins by file name: kubectl-<metadata.name>.
    assert_eq!(manifest["metadata"]["name"], "vaultconn");
    let version = format!("v{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(manifest["spec"]["version"], version.as_str());
    let platforms = manifest["spec"]["platforms"].as_array().unwrap();
    assert!(platforms.len() >= 2);
    for p in platforms {
        let labels = &p["selector"]["matchLabels"];
        let archive = format!(
            "{version}/kubectl-vaultconn_{}_{}.tar.gz",
            labels["os"].as_str().unwrap(),
            labels["arch"].as_str().unwrap()
        );
        assert!(p["uri"].as_str().unwrap().ends_with(&archive), "{p}");
        assert_eq!(p["bin"], "kubectl-vaultconn");
        assert_eq!(p["files"][0]["from"], "kubectl-vaultconn");
    }
    // The packaging script's archive matches the manifest it writes, and what it holds runs
    // as the plugin.
    let out = tempfile::tempdir().unwrap();
    let packed = std::process::Command::new("bash")
        .arg(root.join("plugins/package.sh"))
        .args([
            env!("CARGO_BIN_EXE_vaultconn"),
            out.path().to_str().unwrap(),
            "linux",
            "amd64",
        ])
        .output()
        .unwrap();
    assert!(packed.status.success(), "{packed:?}");
    let written: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(out.path().join("vaultconn.yaml")).unwrap(),
    )
    .unwrap();
    let archive = out.path().join("kubectl-vaultconn_linux_amd64.tar.gz");
    let sum = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&archive).unwrap()))
    };
    assert_eq!(written["spec"]["platforms"][0]["sha256"], sum.as_str());
    let unpacked = out.path().join("x");
    std::fs::create_dir(&unpacked).unwrap();
    let tar = std::process::Command::new("tar")
        .args([
            "xzf",
            archive.to_str().unwrap(),
            "-C",
            unpacked.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(tar.success());
    let help = finish(
        offline(
            unpacked.join("kubectl-vaultconn").to_str().unwrap(),
            out.path(),
        ),
        &["--help"],
        None,
    );
    assert!(
        help.stdout.contains("Usage: kubectl vaultconn <COMMAND>"),
        "{help:?}"
    );
}

/// A CONNECT proxy on loopback that tunnels to the loopback address it is asked for (anything
/// else is refused) and counts the tunnels it opened.
async fn connect_proxy() -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let tunnels = Arc::new(AtomicUsize::new(0));
    let counted = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if head.len() > 8192 || client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head
                    .strip_prefix("CONNECT ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|t| t.parse::<std::net::SocketAddr>().ok())
                    .filter(|a| a.ip().is_loopback());
                let Some(target) = target else { return };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (url, tunnels)
}

/// A user behind a proxy (HTTPS_PROXY in the shell) reaches the cluster through it, as kubectl
/// does, and NO_PROXY bypasses it. (kube refused to build a client at all while HTTPS_PROXY was
/// set, unless its proxy features were on.)
#[tokio::test]
async fn the_cli_goes_through_https_proxy_and_honours_no_proxy() {
    let ns = test_namespace("cliproxy").await;
    let (proxy, tunnels) = connect_proxy().await;
    let bin = env!("CARGO_BIN_EXE_vaultconn");
    let args = ["status", "-n", ns.name.as_str()];
    let out = against_cluster(bin, &args, None, &[("HTTPS_PROXY", &proxy)]).await;
    assert_eq!(out.code, 0, "through the proxy: {}", out.stderr);
    let through = tunnels.load(Ordering::SeqCst);
    assert!(through >= 1, "the API requests went through the proxy");
    let env = [("HTTPS_PROXY", proxy.as_str()), ("NO_PROXY", "127.0.0.1")];
    let out = against_cluster(bin, &args, None, &env).await;
    assert_eq!(out.code, 0, "with NO_PROXY: {}", out.stderr);
    assert_eq!(
        tunnels.load(Ordering::SeqCst),
        through,
        "NO_PROXY bypassed the proxy"
    );
}
