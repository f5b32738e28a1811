//! `vaultconn status [NAME] [-n NS | -A]`: reads connections (and, for one, its recent
//! Events) and prints `cli::view`'s block or table, or JSON. Never reads a Secret.

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use kube::ResourceExt;

use crate::api::VaultConnection;
use crate::cli::cluster::Cluster;
use crate::cli::error::{Access, CliError};
use crate::cli::view::{self, StatusView};

/// Which connections.
pub enum Selection {
    One(String),
    Namespace,
    AllNamespaces,
}

/// The views to print (one with Events, or all of a namespace or the cluster).
pub async fn collect(
    cluster: &Cluster,
    selection: &Selection,
) -> Result<Vec<StatusView>, CliError> {
    let ns = cluster.namespace.clone();
    match selection {
        Selection::One(name) => {
            let api: Api<VaultConnection> = Api::namespaced(cluster.client.clone(), &ns);
            let access = Access {
                verb: "get",
                resource: "vaultconnections",
                namespace: Some(ns.clone()),
                name: Some(name.clone()),
            };
            let vc = api
                .get(name)
                .await
                .map_err(|e| CliError::from_kube(e, &cluster.server, access))?;
            let events = events_of(cluster, &vc).await;
            Ok(vec![StatusView::new(&vc, Some(&events))])
        }
        Selection::Namespace | Selection::AllNamespaces => {
            let all = matches!(selection, Selection::AllNamespaces);
            let api: Api<VaultConnection> = if all {
                Api::all(cluster.client.clone())
            } else {
                Api::namespaced(cluster.client.clone(), &ns)
            };
            let access = Access {
                verb: "list",
                resource: "vaultconnections",
                namespace: (!all).then(|| ns.clone()),
                name: None,
            };
            let mut list = api
                .list(&ListParams::default())
                .await
                .map_err(|e| CliError::from_kube(e, &cluster.server, access))?
                .items;
            list.sort_by_key(|v| (v.namespace().unwrap_or_default(), v.name_any()));
            Ok(list.iter().map(|vc| StatusView::new(vc, None)).collect())
        }
    }
}

/// The connection's Events (core/v1 view of the events.k8s.io Events the operator publishes).
/// Best effort: without permission to list Events the status is still shown.
async fn events_of(cluster: &Cluster, vc: &VaultConnection) -> Vec<Event> {
    let ns = vc.namespace().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(cluster.client.clone(), &ns);
    let selector = format!(
        "involvedObject.kind=VaultConnection,involvedObject.name={}",
        vc.name_any()
    );
    match api.list(&ListParams::default().fields(&selector)).await {
        Ok(list) => list
            .items
            .into_iter()
            // A deleted-and-recreated connection of the same name has other Events.
            .filter(|e| e.involved_object.uid.is_none() || e.involved_object.uid == vc.uid())
            .collect(),
        Err(e) => {
            eprintln!(
                "note: Events not shown: {}",
                CliError::from_kube(
                    e,
                    &cluster.server,
                    Access {
                        verb: "list",
                        resource: "events",
                        namespace: Some(ns),
                        name: None,
                    }
                )
            );
            Vec::new()
        }
    }
}

/// Print `views` as the user asked.
pub fn print(
    views: &[StatusView],
    selection: &Selection,
    json: bool,
    namespace: &str,
) -> Result<(), CliError> {
    let now = jiff::Timestamp::now();
    if json {
        let text = match selection {
            Selection::One(_) => views.first().map(serde_json::to_string_pretty),
            _ => Some(serde_json::to_string_pretty(views)),
        }
        .transpose()
        .map_err(|e| CliError::Failed(e.to_string()))?
        .unwrap_or_default();
        println!("{text}");
        return Ok(());
    }
    match selection {
        Selection::One(_) => {
            for v in views {
                print!("{}", v.block(now));
            }
        }
        _ if views.is_empty() => match selection {
            Selection::AllNamespaces => eprintln!("No VaultConnections found."),
            _ => eprintln!("No VaultConnections found in namespace {namespace}."),
        },
        _ => print!(
            "{}",
            view::table(views, matches!(selection, Selection::AllNamespaces), now)
        ),
    }
    Ok(())
}
