//! The `vaultconn` command line: the operator (`run`) and the tools around it (`types`, `new`,
//! `validate`, `status`, `refresh`, `completions`, `crd`). Installed as `kubectl-vaultconn`
//! it is a kubectl plugin (`kubectl vaultconn status ...`). `main.rs` runs `run` and
//! `local-cluster` itself and hands everything else to [`execute`].
//!
//! Modules: `types`, `new`, `schema`, `manifest`, `view`, `error` are pure; `validate` (files)
//! and `cluster` (kubeconfig) do I/O; `status` and `refresh` talk to the cluster.

pub mod cluster;
pub mod error;
pub mod manifest;
pub mod new;
pub mod refresh;
pub mod schema;
pub mod status;
pub mod types;
pub mod validate;
pub mod view;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::api::{ConnectionType, GrantType};
use crate::config::RunConfig;
use crate::oauth::token::url_policy::TokenUrlPolicy;
use error::{exit, CliError};

const TOP_HELP: &str = "\
Exit codes:
  0  success (validate: no errors)
  1  validate found errors; a refresh failed or is not possible for that connection
  2  usage: bad flags or arguments, an input file that cannot be read
  3  the cluster could not be used: no kubeconfig, API server unreachable or refusing the
     credentials, CRD not installed, permission denied
  4  the named VaultConnection does not exist
  5  refresh --wait timed out

Installed as kubectl-vaultconn (a symlink or copy on PATH) it runs as `kubectl vaultconn ...`.";

const TYPES_HELP: &str = "\
Examples:
  vaultconn types              # every type: credential keys, settings, output keys
  vaultconn types oauth2       # one type: its settings explained, and an example
  vaultconn types -o json      # the catalog for scripts";

const NEW_HELP: &str = "\
Examples:
  # A template to fill in (the connection is Pending until the Secret has values):
  vaultconn new apiKey maps -n web > maps.yaml
  kubectl apply -f maps.yaml
  kubectl wait -n web --for=condition=Ready vaultconnections.vaultconn.dev/maps --timeout=2m
  # Straight to the cluster, values included:
  vaultconn new bearerToken github -n ci --from-literal token=\"$GITHUB_TOKEN\" | kubectl apply -f -
  # OAuth 2.0 client credentials, Auth0 machine-to-machine:
  vaultconn new oauth2 billing --token-url https://login.example.com/oauth2/token --scope invoices.read
  vaultconn new auth0 payments --domain payments.eu.auth0.com --audience https://payments.example.com/api
  # An empty connection, Pending until its credentials Secret exists:
  vaultconn new stripe shop --empty | kubectl apply -f -";

const VALIDATE_HELP: &str = "\
Checks exactly what the cluster would: the CRD schema (what the API server refuses) and every
rule the controller enforces (what it reports as InvalidSpec, with the same message), plus
mistakes across the objects of the input: a credentials Secret lacking required keys, two
connections writing one Secret, a target on another connection's token state Secret. Other
kinds (and other groups' VaultConnection kind) are ignored. No cluster needed.

Examples:
  vaultconn validate manifests/                # every *.yaml, *.yml, *.json below, recursively
  helm template charts/app | vaultconn validate -
  kustomize build overlays/prod | vaultconn validate - -o json";

const STATUS_HELP: &str = "\
Examples:
  vaultconn status billing -n payments    # one connection: reason, Secrets, token times, Events
  vaultconn status -n payments            # a table of the namespace's connections
  vaultconn status -A -o json             # every connection, for scripts";

const REFRESH_HELP: &str = "\
Sets the vaultconn.dev/refresh-requested-at annotation, which makes the operator refresh the
token once, now.

Examples:
  vaultconn refresh billing -n payments                # ask for one refresh
  vaultconn refresh billing -n payments --wait         # and wait for the new expiry (or the failure)
  vaultconn refresh billing --wait --timeout 2m";

const COMPLETIONS_HELP: &str = "\
Examples:
  vaultconn completions bash > /etc/bash_completion.d/vaultconn
  vaultconn completions zsh > \"${fpath[1]}/_vaultconn\"
  vaultconn completions fish > ~/.config/fish/completions/vaultconn.fish";

#[derive(Parser, Debug)]
#[command(
    name = "vaultconn",
    version,
    about = "Keeps service credentials as Kubernetes Secrets: the operator, and tools to create, check and inspect connections",
    arg_required_else_help = true,
    after_help = TOP_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator (the Deployment's command).
    ///
    /// The cluster is chosen as kubectl does: $KUBECONFIG, else
    /// ~/.kube/config, else the in-cluster service account; with none of them it starts a
    /// local control plane (etcd + kube-apiserver + kube-controller-manager) first.
    Run(Box<RunConfig>),
    /// Print the connection types: credential keys, settings, output keys, an example.
    #[command(after_help = TYPES_HELP)]
    Types(TypesArgs),
    /// Print a new connection (and its credentials Secret) as manifests for kubectl apply.
    #[command(after_help = NEW_HELP)]
    New(Box<NewArgs>),
    /// Check manifests offline (CI, GitOps): schema, the controller's rules, cross-object mistakes.
    #[command(after_help = VALIDATE_HELP)]
    Validate(Box<ValidateArgs>),
    /// Show connections: phase, reason, Secret names, token expiry and next refresh, Events.
    #[command(after_help = STATUS_HELP)]
    Status(StatusArgs),
    /// Ask the operator to refresh an OAuth connection's token now.
    #[command(after_help = REFRESH_HELP)]
    Refresh(RefreshArgs),
    /// Print a shell completion script.
    #[command(after_help = COMPLETIONS_HELP)]
    Completions(CompletionsArgs),
    /// Print the VaultConnection CustomResourceDefinition.
    Crd,
    /// Start a local control plane, install the CRD, print the kubeconfig path; Ctrl-C stops it.
    #[cfg(feature = "local-cluster")]
    LocalCluster,
}

/// Connection types as typed on the command line (case does not matter).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeArg {
    #[value(name = "apiKey")]
    ApiKey,
    #[value(name = "bearerToken")]
    BearerToken,
    #[value(name = "basicAuth")]
    BasicAuth,
    #[value(name = "twilio")]
    Twilio,
    #[value(name = "stripe")]
    Stripe,
    #[value(name = "oauth2")]
    OAuth2,
    #[value(name = "auth0")]
    Auth0,
}

impl From<TypeArg> for ConnectionType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::ApiKey => ConnectionType::ApiKey,
            TypeArg::BearerToken => ConnectionType::BearerToken,
            TypeArg::BasicAuth => ConnectionType::BasicAuth,
            TypeArg::Twilio => ConnectionType::Twilio,
            TypeArg::Stripe => ConnectionType::Stripe,
            TypeArg::OAuth2 => ConnectionType::OAuth2,
            TypeArg::Auth0 => ConnectionType::Auth0,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantArg {
    #[value(name = "clientCredentials")]
    ClientCredentials,
    #[value(name = "refreshToken")]
    RefreshToken,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TypesOutput {
    #[default]
    Text,
    Json,
    Yaml,
}

#[derive(Args, Debug)]
pub struct TypesArgs {
    /// Show one type in full.
    #[arg(value_enum, ignore_case = true)]
    pub type_: Option<TypeArg>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: TypesOutput,
}

#[derive(Args, Debug)]
pub struct NewArgs {
    /// Connection type.
    #[arg(value_enum, ignore_case = true)]
    pub type_: TypeArg,
    /// Name of the VaultConnection (and of the Secret it generates).
    pub name: String,
    /// Namespace to put in the manifests (default: none, so kubectl apply uses its own).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// No credentials Secret: the connection stays Pending until one is created.
    #[arg(long)]
    pub empty: bool,
    /// A credential value, KEY=VALUE (repeatable); keys not given are left empty to fill in.
    #[arg(long = "from-literal", value_name = "KEY=VALUE", value_parser = key_value)]
    pub from_literal: Vec<(String, String)>,
    /// oauth2: the token endpoint URL.
    #[arg(long, value_name = "URL")]
    pub token_url: Option<String>,
    /// auth0: the tenant domain, e.g. example.eu.auth0.com.
    #[arg(long, value_name = "HOST")]
    pub domain: Option<String>,
    /// oauth2/auth0: the audience (for auth0 with clientCredentials: the API identifier, required).
    #[arg(long)]
    pub audience: Option<String>,
    /// oauth2/auth0: the grant (default clientCredentials).
    #[arg(long, value_enum)]
    pub grant_type: Option<GrantArg>,
    /// oauth2/auth0: a scope to request (repeatable).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// apiKey: the base URL copied to the output key base_url.
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// apiKey: the header name copied to the output key header_name.
    #[arg(long, value_name = "HEADER")]
    pub header_name: Option<String>,
    /// Human-readable name (spec.displayName).
    #[arg(long)]
    pub display_name: Option<String>,
    /// Name of the credentials Secret (default NAME-credentials).
    #[arg(long, value_name = "NAME")]
    pub credentials_secret: Option<String>,
    /// Accept http:// token URLs on loopback, as the operator's flag of that name.
    #[arg(long)]
    pub allow_http_loopback: bool,
    /// Accept a private-network token host the operator allows with this --token-url-allow list.
    #[arg(
        long,
        default_value = "",
        hide_default_value = true,
        value_name = "LIST"
    )]
    pub token_url_allow: TokenUrlPolicy,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Files, directories (recursively) or - for stdin.
    #[arg(required = true, value_name = "FILE|DIR|-")]
    pub paths: Vec<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
    /// Namespace of objects that name none (as kubectl apply -n).
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// Check as an operator started with --allow-http-loopback would.
    #[arg(long)]
    pub allow_http_loopback: bool,
    /// Check as an operator started with this --token-url-allow list would (private-network
    /// hosts and CIDRs, comma-separated).
    #[arg(
        long,
        env = "VAULTCONN_TOKEN_URL_ALLOW",
        default_value = "",
        hide_default_value = true,
        value_name = "LIST"
    )]
    pub token_url_allow: TokenUrlPolicy,
    /// Warnings (e.g. credential values still empty) fail too.
    #[arg(long)]
    pub strict: bool,
}

/// Which cluster, as kubectl's flags of the same names.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// Path of the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace).
    #[arg(short, long)]
    pub namespace: Option<String>,
}

impl ClusterArgs {
    fn target(&self) -> cluster::Target {
        cluster::Target {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One connection (default: every connection of the namespace).
    pub name: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with_all = ["name", "namespace"])]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct RefreshArgs {
    /// The connection.
    pub name: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Wait for the new token (or the reason it failed).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 30s, 2m.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, requires = "wait")]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Started as `kubectl-vaultconn` (kubectl runs plugins by that file name).
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("kubectl-vaultconn"))
}

/// The clap command; as a plugin, usage and examples say `kubectl vaultconn`.
pub fn command(plugin: bool) -> clap::Command {
    let mut cmd = Cli::command();
    if !plugin {
        return cmd;
    }
    cmd = cmd
        .bin_name("kubectl vaultconn")
        .display_name("kubectl vaultconn");
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(&name, |sc| {
            let help = sc.get_after_help().map(|h| plugin_text(&h.to_string()));
            match help {
                Some(h) => sc.after_help(h),
                None => sc,
            }
        });
    }
    cmd
}

/// Examples as a plugin user types them.
fn plugin_text(help: &str) -> String {
    help.replace("  vaultconn ", "  kubectl vaultconn ")
        .replace("| vaultconn ", "| kubectl vaultconn ")
        .replace("`vaultconn ", "`kubectl vaultconn ")
}

/// kubectl takes `--context`, `--kubeconfig` and `-n` before the command too
/// (`kubectl vaultconn -n team status`): move them after it, where the commands declare them.
pub fn hoist_cluster_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut iter = args.into_iter();
    let mut out: Vec<OsString> = iter.next().into_iter().collect();
    let mut moved = Vec::new();
    let rest: Vec<OsString> = iter.collect();
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].to_string_lossy();
        let takes_value = matches!(
            a.as_ref(),
            "--kubeconfig" | "--context" | "-n" | "--namespace"
        );
        let inline = ["--kubeconfig=", "--context=", "--namespace=", "-n="]
            .iter()
            .any(|p| a.starts_with(p))
            || (a.starts_with("-n") && a.len() > 2 && !a.starts_with("--"));
        if takes_value && i + 1 < rest.len() {
            moved.push(rest[i].clone());
            moved.push(rest[i + 1].clone());
            i += 2;
        } else if inline {
            moved.push(rest[i].clone());
            i += 1;
        } else {
            break;
        }
    }
    if moved.is_empty() || i >= rest.len() {
        out.extend(rest);
        return out;
    }
    out.push(rest[i].clone());
    out.extend(moved);
    out.extend(rest[i + 1..].iter().cloned());
    out
}

/// Parse the process's arguments (help and usage errors exit here, as clap does).
pub fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    let plugin = args.first().is_some_and(|a| invoked_as_plugin(a));
    let matches = command(plugin).get_matches_from(hoist_cluster_flags(args));
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Run a command other than `run` and `local-cluster`; prints errors as one line.
pub fn execute(cmd: Command) -> ExitCode {
    let result = match cmd {
        Command::Types(a) => run_types(&a),
        Command::New(a) => run_new(*a),
        Command::Validate(a) => run_validate(&a),
        Command::Status(a) => block_on(run_status(a)),
        Command::Refresh(a) => block_on(run_refresh(a)),
        Command::Completions(a) => {
            let plugin = std::env::args_os()
                .next()
                .is_some_and(|a| invoked_as_plugin(&a));
            let name = if plugin {
                "kubectl-vaultconn"
            } else {
                "vaultconn"
            };
            clap_complete::generate(a.shell, &mut command(false), name, &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Crd => {
            print!("{}", crate::crd::crd_yaml());
            Ok(exit::OK)
        }
        Command::Run(_) => Err(CliError::Usage("`run` is started by main".into())),
        #[cfg(feature = "local-cluster")]
        Command::LocalCluster => Err(CliError::Usage("`local-cluster` is started by main".into())),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn block_on<F: std::future::Future<Output = Result<u8, CliError>>>(f: F) -> Result<u8, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}")))?
        .block_on(f)
}

fn spec_schema() -> Result<
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
    CliError,
> {
    schema::spec_schema(&crate::crd::crd())
        .ok_or_else(|| CliError::Failed("the built-in CRD has no spec schema".into()))
}

fn run_types(a: &TypesArgs) -> Result<u8, CliError> {
    let schema = spec_schema()?;
    let docs = match a.type_ {
        Some(t) => vec![types::describe(t.into(), &schema)],
        None => types::describe_all(&schema),
    };
    let one = a.type_.is_some();
    let text = match a.output {
        TypesOutput::Text if one => types::human_one(&docs[0]),
        TypesOutput::Text => types::human_all(&docs),
        TypesOutput::Json if one => json(&docs[0])?,
        TypesOutput::Json => json(&docs)?,
        TypesOutput::Yaml if one => yaml(&docs[0])?,
        TypesOutput::Yaml => yaml(&docs)?,
    };
    print!("{text}");
    Ok(exit::OK)
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| CliError::Failed(e.to_string()))
}

fn yaml<T: serde::Serialize>(v: &T) -> Result<String, CliError> {
    serde_saphyr::to_string(v).map_err(|e| CliError::Failed(e.to_string()))
}

fn run_new(a: NewArgs) -> Result<u8, CliError> {
    let req = new::NewRequest {
        type_: a.type_.into(),
        name: a.name,
        namespace: a.namespace,
        empty: a.empty,
        literals: a.from_literal,
        settings: new::Settings {
            display_name: a.display_name,
            token_url: a.token_url,
            domain: a.domain,
            audience: a.audience,
            grant_type: a.grant_type.map(|g| match g {
                GrantArg::ClientCredentials => GrantType::ClientCredentials,
                GrantArg::RefreshToken => GrantType::RefreshToken,
            }),
            scopes: a.scopes,
            base_url: a.base_url,
            header_name: a.header_name,
            credentials_secret: a.credentials_secret,
        },
    };
    let opts = manifest::CheckOptions {
        allow_http_loopback: a.allow_http_loopback,
        token_url_allow: a.token_url_allow,
        default_namespace: String::new(),
    };
    let text = new::render(&req, opts.validation()).map_err(CliError::Usage)?;
    print!("{text}");
    Ok(exit::OK)
}

fn run_validate(a: &ValidateArgs) -> Result<u8, CliError> {
    let inputs = validate::read_inputs(&a.paths)?;
    let opts = manifest::CheckOptions {
        allow_http_loopback: a.allow_http_loopback,
        token_url_allow: a.token_url_allow.clone(),
        default_namespace: a.namespace.clone(),
    };
    let report = validate::check_inputs(&inputs, &spec_schema()?, &opts);
    match a.output {
        Output::Json => print!("{}", json(&report)?),
        Output::Text => {
            print!("{}", report.human());
            eprintln!("{}", report.summary());
        }
    }
    let failed = report.errors > 0 || (a.strict && report.warnings > 0);
    Ok(if failed { exit::FAILED } else { exit::OK })
}

async fn run_status(a: StatusArgs) -> Result<u8, CliError> {
    let cluster = cluster::connect(&a.cluster.target()).await?;
    let selection = match (a.name, a.all_namespaces) {
        (Some(n), _) => status::Selection::One(n),
        (None, true) => status::Selection::AllNamespaces,
        (None, false) => status::Selection::Namespace,
    };
    let views = status::collect(&cluster, &selection).await?;
    status::print(
        &views,
        &selection,
        a.output == Output::Json,
        &cluster.namespace,
    )?;
    Ok(exit::OK)
}

async fn run_refresh(a: RefreshArgs) -> Result<u8, CliError> {
    let cluster = cluster::connect(&a.cluster.target()).await?;
    let req = refresh::RefreshRequest {
        name: a.name,
        wait: a.wait,
        timeout: a.timeout,
    };
    refresh::refresh(&cluster, &req).await?;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
        command(true).debug_assert();
    }

    #[test]
    fn cluster_flags_before_the_command_move_after_it() {
        assert_eq!(
            hoist_cluster_flags(os(&["k", "-n", "team", "--context=c", "status", "x"])),
            os(&["k", "status", "-n", "team", "--context=c", "x"])
        );
        assert_eq!(
            hoist_cluster_flags(os(&["k", "status", "-n", "team"])),
            os(&["k", "status", "-n", "team"])
        );
        assert_eq!(
            hoist_cluster_flags(os(&["k", "-nteam", "refresh"])),
            os(&["k", "refresh", "-nteam"])
        );
        assert_eq!(hoist_cluster_flags(os(&["k", "-n"])), os(&["k", "-n"]));
        let cli = Cli::try_parse_from(hoist_cluster_flags(os(&[
            "vaultconn",
            "--kubeconfig",
            "/k",
            "-n",
            "t",
            "status",
            "x",
        ])))
        .unwrap();
        let Command::Status(s) = cli.command else {
            panic!("status")
        };
        assert_eq!(s.cluster.namespace.as_deref(), Some("t"));
        assert_eq!(s.cluster.kubeconfig.as_deref(), Some(Path::new("/k")));
    }

    #[test]
    fn plugin_mode_is_detected_by_file_name_and_speaks_kubectl() {
        assert!(invoked_as_plugin("/tmp/x/kubectl-vaultconn".as_ref()));
        assert!(!invoked_as_plugin("/usr/bin/vaultconn".as_ref()));
        let mut cmd = command(true);
        let help = cmd.render_help().to_string();
        assert!(help.contains("Usage: kubectl vaultconn"), "{help}");
        let status = cmd.find_subcommand_mut("status").unwrap();
        let text = status.render_long_help().to_string();
        assert!(
            text.contains("  kubectl vaultconn status billing -n payments"),
            "{text}"
        );
    }

    #[test]
    fn types_are_case_insensitive_and_literals_need_an_equals_sign() {
        let cli = Cli::try_parse_from([
            "vaultconn",
            "new",
            "APIKEY",
            "x",
            "--from-literal",
            "api_key=a=b",
        ])
        .unwrap();
        let Command::New(n) = cli.command else {
            panic!("new")
        };
        assert_eq!(n.type_, TypeArg::ApiKey);
        assert_eq!(n.from_literal, [("api_key".to_string(), "a=b".to_string())]);
        assert!(Cli::try_parse_from([
            "vaultconn",
            "new",
            "apiKey",
            "x",
            "--from-literal",
            "novalue"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["vaultconn", "status", "-A", "x"]).is_err());
        assert!(Cli::try_parse_from(["vaultconn", "refresh", "x", "--timeout", "5s"]).is_err());
    }

    #[test]
    fn every_command_has_examples() {
        for sc in Cli::command().get_subcommands() {
            if matches!(sc.get_name(), "run" | "crd" | "local-cluster" | "help") {
                continue;
            }
            let help = sc
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.contains("Examples:"),
                "{} has no examples",
                sc.get_name()
            );
        }
    }
}
