//! The `vaultconn` binary: the operator (`run`) and, through `vaultconn::cli`, the tools
//! around it. This file runs the operator and the local control plane; every other command
//! is `cli::execute`.

use vaultconn::cli::Command;
use vaultconn::config::{LogFormat, RunConfig};

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    vaultconn::install_crypto_provider();
    let cli = vaultconn::cli::parse();
    let run_config = match cli.command {
        Command::Run(config) => Some(config),
        #[cfg(feature = "local-cluster")]
        Command::LocalCluster => None,
        other => return vaultconn::cli::execute(other),
    };
    init_tracing(
        run_config
            .as_ref()
            .map_or(LogFormat::Text, |c| c.log_format),
    );
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match run_config {
            Some(config) => run(*config).await,
            #[cfg(feature = "local-cluster")]
            None => local::local_cluster().await,
            #[cfg(not(feature = "local-cluster"))]
            None => Ok(()),
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        // Colour only for a terminal: log files and collectors get plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
    }
}

/// Listens for SIGTERM and SIGINT from now on and resolves on the first. Called before the
/// operator serves anything: a signal during start-up must stop it cleanly, and until a
/// handler is registered the default action kills the process (a pod deleted right after it
/// started would exit by signal).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// A cluster is "configured" as kubectl sees it: KUBECONFIG is set, ~/.kube/config exists,
/// or we run inside a Pod. `kube::Config::infer` then picks it in that order.
fn cluster_configured() -> bool {
    let home_config = std::env::var_os("HOME")
        .map(|h| std::path::Path::new(&h).join(".kube").join("config"))
        .is_some_and(|p| p.is_file());
    std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || home_config
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// The operator's API client. kube-client's built-in retry of 429/503/504 is turned off: one
/// request could otherwise block for minutes inside its backoff, which would break the token
/// write's bounded retry budget (and a graceful shutdown). Retries are the operator's own
/// decision: the refresh path retries writes within its budget, everything else requeues.
/// `rate`: tower's rate limit, `(requests, per window)`: the client's request queue waits for
/// the window instead of sending (`--kube-api-qps`/`--kube-api-burst`).
fn operator_client(
    mut config: kube::Config,
    rate: Option<(u64, std::time::Duration)>,
) -> anyhow::Result<kube::Client> {
    config.default_retry = false;
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(match rate {
        Some((requests, per)) => builder
            .with_layer(&tower::limit::RateLimitLayer::new(requests, per))
            .build(),
        None => builder.build(),
    })
}

async fn run(config: RunConfig) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    // The local demo may turn on --allow-http-loopback for its token server.
    #[cfg(feature = "local-cluster")]
    let mut config = config;
    #[cfg(feature = "local-cluster")]
    let (local, client) = if cluster_configured() {
        (
            None,
            operator_client(kube::Config::infer().await?, config.kube_api_rate())?,
        )
    } else {
        let (local, kube_config) = local::start_run(&mut config).await?;
        (
            Some(local),
            operator_client(kube_config, config.kube_api_rate())?,
        )
    };
    #[cfg(not(feature = "local-cluster"))]
    let client = if cluster_configured() {
        operator_client(kube::Config::infer().await?, config.kube_api_rate())?
    } else {
        anyhow::bail!(
            "no cluster configured: set KUBECONFIG to a kubeconfig file, or run in a Pod \
             (this build has no local control plane: it was built without the local-cluster feature)"
        );
    };
    let metrics = std::sync::Arc::new(vaultconn::metrics::Metrics::default());
    let health = std::sync::Arc::new(vaultconn::http::Health::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let mut servers = Vec::new();
    let probes_apart = config.health_probe_bind_address;
    let main_router = vaultconn::http::router(
        metrics.clone(),
        probes_apart.is_none().then(|| health.clone()),
    );
    servers.push(tokio::spawn(vaultconn::http::serve(
        config.metrics_bind_address,
        main_router,
        stopped(),
    )));
    if let Some(addr) = probes_apart {
        let router = vaultconn::http::probe_router(health.clone());
        servers.push(tokio::spawn(vaultconn::http::serve(
            addr,
            router,
            stopped(),
        )));
    }
    let result = vaultconn::operator::run(client, &config, metrics, health, shutdown).await;
    let _ = stop_tx.send(true);
    for server in servers {
        match server.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP endpoint failed"),
            Err(e) => tracing::warn!(error = %e, "HTTP endpoint task failed"),
            Ok(Ok(())) => {}
        }
    }
    #[cfg(feature = "local-cluster")]
    if let Some(local) = local {
        local.stop().await;
    }
    result.map_err(Into::into)
}

/// `vaultconn run` without a cluster, and `vaultconn local-cluster`: a control plane on
/// loopback (the `vaultconn-local-cluster` crate) with the CRD installed; for `run`, unless
/// `--no-demo`, also the demo (every example, an empty connection, the demo token server).
#[cfg(feature = "local-cluster")]
mod local {
    use vaultconn::config::RunConfig;
    use vaultconn_local_cluster::demo::{Demo, Example};
    use vaultconn_local_cluster::{ControlPlane, ControlPlaneOptions};

    /// The examples, built in so that the binary shows them from any directory. The
    /// embedded_run test checks that every file in `examples/` turns up in the demo.
    const EXAMPLES: &[Example<'static>] = &[
        example("apikey.yaml", include_str!("../examples/apikey.yaml")),
        example("auth0-m2m.yaml", include_str!("../examples/auth0-m2m.yaml")),
        example("basicauth.yaml", include_str!("../examples/basicauth.yaml")),
        example(
            "bearertoken.yaml",
            include_str!("../examples/bearertoken.yaml"),
        ),
        example(
            "oauth2-client-credentials.yaml",
            include_str!("../examples/oauth2-client-credentials.yaml"),
        ),
        example(
            "oauth2-refresh-token.yaml",
            include_str!("../examples/oauth2-refresh-token.yaml"),
        ),
        example("stripe.yaml", include_str!("../examples/stripe.yaml")),
        example("twilio.yaml", include_str!("../examples/twilio.yaml")),
    ];

    const fn example(file: &'static str, yaml: &'static str) -> Example<'static> {
        Example { file, yaml }
    }

    /// The credentials keys of a type, from the product's catalog: the demo fills them all.
    fn input_keys(type_: &str) -> Vec<&'static str> {
        vaultconn::catalog::CATALOG
            .iter()
            .find(|t| t.type_.as_str() == type_)
            .map(|t| {
                t.required_inputs
                    .iter()
                    .chain(t.optional_inputs)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What `run` started locally; [`LocalRun::stop`] takes it down after the operator.
    pub struct LocalRun {
        cp: ControlPlane,
        demo: Option<Demo>,
    }

    /// The control plane and, unless `--no-demo`, the demo. The demo token server speaks
    /// plain http on loopback, so the demo turns `--allow-http-loopback` on.
    pub async fn start_run(config: &mut RunConfig) -> anyhow::Result<(LocalRun, kube::Config)> {
        let (cp, kube_config) = start().await?;
        let demo = if config.no_demo {
            None
        } else {
            if !config.allow_http_loopback {
                tracing::info!(
                    "demo: allowing plain-http token URLs on loopback for the demo token server"
                );
                config.allow_http_loopback = true;
            }
            let demo = Demo::start(cp.try_client().await?, EXAMPLES, &input_keys)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the demo could not be set up: {e} (`vaultconn run --no-demo` starts without it)"
                    )
                })?;
            // On stderr: stdout carries the log, which may be JSON for a collector.
            eprintln!("{}", demo.banner(cp.kubeconfig_path()));
            Some(demo)
        };
        Ok((LocalRun { cp, demo }, kube_config))
    }

    impl LocalRun {
        /// After the operator has stopped: the demo token server, then the control plane.
        pub async fn stop(mut self) {
            if let Some(demo) = self.demo.take() {
                tracing::info!("stopping the demo token server");
                demo.stop().await;
            }
            tracing::info!("stopping the local control plane");
            self.cp.stop();
        }
    }

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
        let shutdown = super::shutdown_signal()?;
        let (mut cp, _config) = start().await?;
        println!("{}", cp.kubeconfig_path().display());
        shutdown.await;
        cp.stop();
        Ok(())
    }
}
