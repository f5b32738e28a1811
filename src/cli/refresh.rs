//! `vaultconn refresh NAME [--wait]`: asks the operator for one token refresh by setting the
//! refresh annotation (the documented `kubectl annotate` way), and with `--wait` watches the
//! connection until `cli::view::refresh_progress` says the new token is out, or why not.

use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;

use crate::api::VaultConnection;
use crate::cli::cluster::Cluster;
use crate::cli::error::{Access, CliError};
use crate::cli::view::{self, Baseline, Progress};
use crate::names::REFRESH_REQUESTED_ANNOTATION;
use crate::reason::Reason;

/// Field manager of the CLI's writes.
pub const FIELD_MANAGER: &str = "vaultconn-cli";

pub struct RefreshRequest {
    pub name: String,
    pub wait: bool,
    pub timeout: Duration,
}

pub async fn refresh(cluster: &Cluster, req: &RefreshRequest) -> Result<(), CliError> {
    let ns = cluster.namespace.clone();
    let name = req.name.clone();
    let api: Api<VaultConnection> = Api::namespaced(cluster.client.clone(), &ns);
    let access = |verb| Access {
        verb,
        resource: "vaultconnections",
        namespace: Some(ns.clone()),
        name: Some(name.clone()),
    };
    let map = |verb| {
        let access = access(verb);
        move |e| CliError::from_kube(e, &cluster.server, access)
    };
    let vc = api.get(&name).await.map_err(map("get"))?;
    refusal(&vc).map_or(Ok(()), Err)?;
    let before = Baseline::of(&vc);
    // `lastRefreshTime` has whole seconds: a refresh in the same second as the previous one
    // would look like no refresh at all. Requesting after that second has passed avoids it
    // (at most one second, and only right after a refresh).
    if let Some(wait) = before
        .last_refresh_time
        .as_deref()
        .and_then(|t| view::until_next_second(t, jiff::Timestamp::now()))
    {
        tokio::time::sleep(wait).await;
    }
    let requested = jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({
        "metadata": {"annotations": {REFRESH_REQUESTED_ANNOTATION: requested}}
    });
    api.patch(
        &name,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(&patch),
    )
    .await
    .map_err(map("patch"))?;
    eprintln!("Refresh requested for VaultConnection {ns}/{name}.");
    if !req.wait {
        return Ok(());
    }
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api.clone(), config).boxed();
    let mut last = vc;
    let mut retries_seen = 0;
    let outcome = tokio::time::timeout(req.timeout, async {
        while let Some(event) = stream.next().await {
            let vc = match event {
                Ok(watcher::Event::Apply(vc) | watcher::Event::InitApply(vc)) => vc,
                Ok(watcher::Event::Delete(_)) => {
                    return Err(CliError::NotFound {
                        namespace: ns.clone(),
                        name: name.clone(),
                    })
                }
                Ok(_) => continue,
                Err(e) => return Err(watch_error(e, &cluster.server, access("watch"))),
            };
            match view::refresh_progress(&before, &vc) {
                Progress::Waiting => {}
                Progress::Refreshed {
                    expires_at,
                    next_refresh,
                } => {
                    report_refreshed(expires_at, next_refresh);
                    return Ok(());
                }
                Progress::Retrying {
                    reason,
                    message,
                    attempts,
                } => {
                    if attempts > retries_seen {
                        retries_seen = attempts;
                        eprintln!("Attempt {attempts} failed ({reason}): {message}; the operator retries, still waiting.");
                    }
                }
                Progress::Failed { reason, message } => {
                    return Err(CliError::Failed(format!(
                        "refresh of {ns}/{name} failed: {reason}: {message}"
                    )))
                }
            }
            last = vc;
        }
        Err(CliError::Failed("the watch ended unexpectedly".into()))
    })
    .await;
    match outcome {
        Ok(result) => result,
        Err(_) => {
            let v = view::StatusView::new(&last, None);
            Err(CliError::Timeout(format!(
                "no new token for {ns}/{name} within {}; it reports {}: {} (is the operator running?)",
                humantime::format_duration(req.timeout),
                v.reason.unwrap_or_else(|| "no status".into()),
                v.message.unwrap_or_default()
            )))
        }
    }
}

/// Why a refresh cannot help this connection, if it cannot.
fn refusal(vc: &VaultConnection) -> Option<CliError> {
    let v = view::StatusView::new(vc, None);
    let id = format!("{}/{}", v.namespace, v.name);
    if !vc.spec.type_.is_oauth() {
        return Some(CliError::Failed(format!(
            "VaultConnection {id} is of type {}: only oauth2 and auth0 connections have tokens to refresh",
            v.type_
        )));
    }
    if vc.spec.suspend {
        return Some(CliError::Failed(format!(
            "VaultConnection {id} is suspended (spec.suspend: true): set it to false to refresh"
        )));
    }
    let reason = v.reason.as_deref().and_then(Reason::parse);
    match reason {
        Some(r @ (Reason::InvalidSpec | Reason::CredentialsMissing | Reason::SecretConflict))
            if !v.stale() =>
        {
            Some(CliError::Failed(format!(
                "VaultConnection {id} cannot refresh until this is fixed: {r}: {}",
                v.message.unwrap_or_default()
            )))
        }
        _ => None,
    }
}

fn report_refreshed(expires_at: Option<String>, next_refresh: Option<String>) {
    let now = jiff::Timestamp::now();
    let rel = |t: &str| {
        view::relative(t, now)
            .map(|r| format!("{t} ({r})"))
            .unwrap_or_else(|| t.to_string())
    };
    match expires_at {
        Some(e) => println!("Refreshed: the new token expires at {}.", rel(&e)),
        None => println!("Refreshed."),
    }
    if let Some(n) = next_refresh {
        println!("Next refresh: {}.", rel(&n));
    }
}

fn watch_error(e: watcher::Error, server: &str, access: Access) -> CliError {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => CliError::from_kube(e, server, access),
        watcher::Error::WatchError(status) => {
            CliError::from_kube(kube::Error::Api(status), server, access)
        }
        other => CliError::Api {
            access,
            message: other.to_string(),
        },
    }
}
