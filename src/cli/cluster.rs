//! Which cluster and namespace a CLI command talks to, chosen as kubectl chooses them:
//! `--kubeconfig` (else `$KUBECONFIG`, a list of files merged, else `~/.kube/config`, else the
//! Pod's service account), `--context` (else the current context), `-n` (else the context's
//! namespace, else `default`).

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Client, Config};

use crate::cli::error::CliError;

/// What the user asked for on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// A client for the chosen cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// `-n`, else the context's namespace.
    pub namespace: String,
    /// The API server's URL, for error messages.
    pub server: String,
}

pub async fn connect(t: &Target) -> Result<Cluster, CliError> {
    let config = config(t).await?;
    let server = config.cluster_url.to_string();
    let namespace = t
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| CliError::Kubeconfig {
        source_name: "client".into(),
        reason: crate::cli::error::one_line(&crate::cli::error::error_chain(&e)),
    })?;
    Ok(Cluster {
        client,
        namespace,
        server,
    })
}

async fn config(t: &Target) -> Result<Config, CliError> {
    let (kubeconfig, source_name) = match &t.kubeconfig {
        Some(path) => (
            Some(Kubeconfig::read_from(path).map_err(|e| kubeconfig_error(path.display(), e))?),
            path.display().to_string(),
        ),
        None => match Kubeconfig::read() {
            Ok(k) => (Some(k), "$KUBECONFIG or ~/.kube/config".to_string()),
            // No file at all: kubectl's next choice is the Pod's service account.
            Err(KubeconfigError::FindPath) => (None, String::new()),
            Err(KubeconfigError::ReadConfig(e, _))
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) =>
            {
                (None, String::new())
            }
            Err(e) => {
                let name = std::env::var("KUBECONFIG").unwrap_or_else(|_| "~/.kube/config".into());
                return Err(kubeconfig_error(name, e));
            }
        },
    };
    match kubeconfig {
        Some(k) => {
            if let Some(ctx) = &t.context {
                if !k.contexts.iter().any(|c| &c.name == ctx) {
                    let known: Vec<&str> = k.contexts.iter().map(|c| c.name.as_str()).collect();
                    return Err(CliError::Kubeconfig {
                        source_name,
                        reason: format!(
                            "no context {ctx:?} (contexts: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    });
                }
            }
            let opts = KubeConfigOptions {
                context: t.context.clone(),
                ..Default::default()
            };
            Config::from_custom_kubeconfig(k, &opts)
                .await
                .map_err(|e| kubeconfig_error(&source_name, e))
        }
        None => {
            if t.context.is_some() {
                return Err(CliError::NoKubeconfig);
            }
            Config::incluster().map_err(|_| CliError::NoKubeconfig)
        }
    }
}

fn kubeconfig_error(source: impl std::fmt::Display, e: KubeconfigError) -> CliError {
    let reason = match &e {
        KubeconfigError::ReadConfig(io, _) if io.kind() == std::io::ErrorKind::NotFound => {
            "file not found".to_string()
        }
        KubeconfigError::CurrentContextNotSet => {
            "no current context: pass --context NAME or run `kubectl config use-context NAME`"
                .to_string()
        }
        _ => crate::cli::error::error_chain(&e),
    };
    CliError::Kubeconfig {
        source_name: source.to_string(),
        reason: crate::cli::error::one_line(&reason),
    }
}
