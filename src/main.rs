//! The `vaultconn` binary: the operator (`run`, the default) and small helper commands.

use clap::{Parser, Subcommand};
use vaultconn::controller::{self, ControllerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "vaultconn",
    version,
    about = "Keeps service credentials as Kubernetes Secrets"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Allow plain-http token URLs on loopback addresses (tests and local demos only).
    #[arg(long, env = "VAULTCONN_ALLOW_HTTP_LOOPBACK", global = true)]
    allow_http_loopback: bool,
    /// Maximum reconciles in flight.
    #[arg(
        long,
        env = "VAULTCONN_CONCURRENCY",
        default_value_t = 32,
        global = true
    )]
    concurrency: u16,
    /// Total time limit of one token request (e.g. 15s).
    #[arg(long, env = "VAULTCONN_TOKEN_REQUEST_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration, global = true)]
    token_request_timeout: std::time::Duration,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(
        long,
        env = "VAULTCONN_METRICS_ADDR",
        default_value = "0.0.0.0:8080",
        global = true
    )]
    metrics_addr: std::net::SocketAddr,
    /// Hosts and CIDRs allowed as token URLs despite the private-range rule, comma-separated
    /// (e.g. `keycloak.auth.svc.cluster.local,*.corp.internal,10.20.0.0/16`).
    #[arg(
        long,
        env = "VAULTCONN_TOKEN_URL_ALLOW",
        default_value = "",
        hide_default_value = true,
        global = true
    )]
    token_url_allow: vaultconn::oauth::token::TokenUrlPolicy,
    /// Events' reportingInstance (defaults to $POD_NAME).
    #[arg(long, env = "POD_NAME", global = true)]
    instance: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (the default). Without KUBECONFIG and outside a cluster, it starts a
    /// local control plane (etcd + kube-apiserver + kube-controller-manager) first.
    Run,
    /// Print the VaultConnection CustomResourceDefinition.
    Crd,
    /// List the connection types with their input and output keys.
    Types,
    /// Start a local control plane, install the CRD, print the kubeconfig path; Ctrl-C stops it.
    #[cfg(feature = "local-cluster")]
    LocalCluster,
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    vaultconn::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => {
            print!("{}", vaultconn::crd::crd_yaml());
            return std::process::ExitCode::SUCCESS;
        }
        Some(Command::Types) => {
            for t in vaultconn::catalog::CATALOG {
                println!(
                    "{:<12} inputs: {} (optional: {})\n{:<12} outputs: {}\n{:<12} {}\n",
                    t.type_.as_str(),
                    t.required_inputs.join(", "),
                    t.optional_inputs.join(", "),
                    "",
                    t.outputs.join(", "),
                    "",
                    t.description
                );
            }
            return std::process::ExitCode::SUCCESS;
        }
        _ => {}
    }
    init_tracing();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            #[cfg(feature = "local-cluster")]
            Some(Command::LocalCluster) => local::local_cluster().await,
            _ => run(cli.run).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc gives every thread that allocates its own arena (up to 8 per core); with tokio's worker
/// and blocking threads that multiplies idle, fragmented memory. Two arenas are plenty for an
/// I/O-bound operator and keep its resident size close to what it actually uses.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt is called once, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A cluster is "configured" when KUBECONFIG is set or we run inside a Pod.
fn cluster_configured() -> bool {
    std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// The operator's API client. kube-client's built-in retry of 429/503/504 is turned off: one
/// request could otherwise block for minutes inside its backoff, which would break the token
/// write's bounded retry budget (and a graceful shutdown). Retries are the operator's own
/// decision: the refresh path retries writes within its budget, everything else requeues.
fn operator_client(mut config: kube::Config) -> anyhow::Result<kube::Client> {
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    #[cfg(feature = "local-cluster")]
    let (local, client) = if cluster_configured() {
        (None, operator_client(kube::Config::infer().await?)?)
    } else {
        let (cp, config) = local::start().await?;
        (Some(cp), operator_client(config)?)
    };
    #[cfg(not(feature = "local-cluster"))]
    let client = if cluster_configured() {
        operator_client(kube::Config::infer().await?)?
    } else {
        anyhow::bail!(
            "no cluster configured: set KUBECONFIG to a kubeconfig file, or run in a Pod \
             (this build has no local control plane: it was built without the local-cluster feature)"
        );
    };
    let config = ControllerConfig {
        allow_http_loopback: args.allow_http_loopback,
        instance: args.instance,
        concurrency: args.concurrency,
        token_request_timeout: args.token_request_timeout,
        token_url_policy: args.token_url_allow,
    };
    let metrics = std::sync::Arc::new(vaultconn::metrics::Metrics::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = tokio::spawn(vaultconn::http::serve(
        args.metrics_addr,
        metrics.clone(),
        async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|stop| *stop).await;
        },
    ));
    let result = controller::run(client, config, metrics, shutdown_signal()).await;
    let _ = stop_tx.send(true);
    match http.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics endpoint failed"),
        Err(e) => tracing::warn!(error = %e, "metrics endpoint task failed"),
        Ok(Ok(())) => {}
    }
    #[cfg(feature = "local-cluster")]
    if let Some(mut cp) = local {
        tracing::info!("stopping the local control plane");
        cp.stop();
    }
    result.map_err(Into::into)
}

/// `vaultconn run` without a cluster, and `vaultconn local-cluster`: a control plane on
/// loopback (the `vaultconn-local-cluster` crate) with the CRD installed.
#[cfg(feature = "local-cluster")]
mod local {
    use vaultconn_local_cluster::{ControlPlane, ControlPlaneOptions};

    /// Start the control plane, install the CRD and return the operator's kube config for it.
    pub async fn start() -> anyhow::Result<(ControlPlane, kube::Config)> {
        tracing::info!("no cluster configured (KUBECONFIG unset): starting a local control plane");
        let opts = ControlPlaneOptions {
            // `make run` provisions the binaries; a checkout's script builds them otherwise.
            provision_script: std::path::Path::new("scripts/provision-control-plane.sh")
                .is_file()
                .then(|| "scripts/provision-control-plane.sh".into()),
            ..Default::default()
        };
        let cp = ControlPlane::start(opts).await?;
        let client = cp.try_client().await?;
        if let Err(e) = vaultconn::crd::install(&client).await {
            tracing::error!("installing the CRD failed: {e}");
            if std::env::var_os("VAULTCONN_KEEP_CLUSTER_ON_CRD_ERROR").is_none() {
                return Err(e.into());
            }
        }
        let path = cp.kubeconfig_path().display().to_string();
        tracing::info!(kubeconfig = %path, "local control plane ready; use: export KUBECONFIG={path}");
        let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig_path())?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok((cp, config))
    }

    pub async fn local_cluster() -> anyhow::Result<()> {
        let (mut cp, _config) = start().await?;
        println!("{}", cp.kubeconfig_path().display());
        super::shutdown_signal().await;
        cp.stop();
        Ok(())
    }
}
