//! The local demo of `vaultconn run` with no cluster configured: once the control plane is up,
//! put one connection of every type into the namespace [`NAMESPACE`], so that `kubectl get
//! vaultconnections.vaultconn.dev -A -w` shows the product at work — Pending, Ready, and OAuth
//! tokens whose expiry moves forward as the operator refreshes them.
//!
//! - Every example manifest is applied (the binary passes `examples/*.yaml` in). Credentials
//!   Secrets the examples only name are created with demo values.
//! - `oauth2` examples get the [`DemoTokenServer`]'s URL as `tokenUrl` (plain http on loopback,
//!   which the demo mode allows), a registered client and, for the `refreshToken` grant, a seed
//!   refresh token; nothing leaves the machine.
//! - `auth0` examples get no credentials and stay Pending: their token URL is always
//!   `https://{domain}/oauth/token`, which only a real Auth0 tenant serves.
//! - One connection, [`EMPTY_CONNECTION`], has no credentials yet: Pending until its Secret is
//!   created.
//!
//! Only the local mode does this; a configured cluster never gets any of it.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::{json, Value};

use crate::demo_token_server::{DemoTokenServer, DEFAULT_TOKEN_LIFETIME};

/// The namespace every demo object goes to.
pub const NAMESPACE: &str = "vaultconn-demo";
/// Field manager of the demo's server-side applies.
pub const FIELD_MANAGER: &str = "vaultconn-demo";
/// The connection created without credentials (Pending until they exist).
pub const EMPTY_CONNECTION: &str = "empty";
/// The Secret [`EMPTY_CONNECTION`] waits for (key `token`).
pub const EMPTY_CREDENTIALS: &str = "empty-creds";
/// `renewBefore` for demo OAuth connections that set one: an example's minutes would exceed
/// the demo tokens' 30 s lifetime, and the schedule would then refresh at its 10 % floor.
const DEMO_RENEW_BEFORE: &str = "10s";
/// Label on everything the demo creates, so it can be found (and deleted) in one go.
const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "vaultconn-demo");

/// One manifest file: its name (for messages) and its YAML (several documents allowed).
#[derive(Debug, Clone, Copy)]
pub struct Example<'a> {
    pub file: &'a str,
    pub yaml: &'a str,
}

/// Why the demo could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("starting the demo token server: {0}")]
    TokenServer(#[source] std::io::Error),
    #[error("example {file}: {reason}")]
    Example { file: String, reason: String },
    #[error("applying {what}: {source}")]
    Apply {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// One demo connection, for the banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoConnection {
    pub name: String,
    pub type_: String,
    /// What the watcher should expect to see, in a few words.
    pub note: String,
}

/// Credentials the demo token server hands out for one OAuth connection.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuthCredentials {
    pub client_id: String,
    pub client_secret: String,
    /// For the `refreshToken` grant: the seed.
    pub refresh_token: Option<String>,
}

/// Everything to apply, in order (Secrets before the connections that use them). No `Debug`:
/// it holds credentials.
#[derive(Default)]
pub struct Plan {
    pub objects: Vec<Value>,
    pub connections: Vec<DemoConnection>,
}

/// Decide the demo objects from the examples. `input_keys(type)` names the credentials keys of
/// a static type (the product's catalog); `issue(connection, with_refresh_token)` registers an
/// OAuth client with the demo token server. No I/O.
pub fn plan(
    examples: &[Example<'_>],
    token_url: &str,
    input_keys: &dyn Fn(&str) -> Vec<&'static str>,
    issue: &mut dyn FnMut(&str, bool) -> OAuthCredentials,
) -> Result<Plan, DemoError> {
    let mut docs = Vec::new();
    for ex in examples {
        let err = |reason: String| DemoError::Example {
            file: ex.file.to_string(),
            reason,
        };
        let parsed: Vec<Value> =
            serde_saphyr::from_multiple(ex.yaml).map_err(|e| err(e.to_string()))?;
        for doc in parsed.into_iter().filter(|d| !d.is_null()) {
            if doc
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .is_none()
            {
                return Err(err("a document has no metadata.name".into()));
            }
            docs.push((ex.file, doc));
        }
    }
    let given_secrets: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Secret")
        .filter_map(|(_, d)| d.pointer("/metadata/name").and_then(Value::as_str))
        .map(str::to_string)
        .collect();

    let mut plan = Plan::default();
    let mut connections = Vec::new();
    for (file, mut doc) in docs {
        set_namespace_and_label(&mut doc);
        match doc["kind"].as_str() {
            Some("Secret") => plan.objects.push(doc),
            Some("VaultConnection") => connections.push((file, doc)),
            other => {
                return Err(DemoError::Example {
                    file: file.to_string(),
                    reason: format!("unexpected kind {other:?}"),
                })
            }
        }
    }
    let mut connection_objects = Vec::new();
    for (file, mut vc) in connections {
        let name = vc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let type_ = vc["spec"]["type"].as_str().unwrap_or_default().to_string();
        let creds_name = vc
            .pointer("/spec/credentialsRef/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut data: BTreeMap<&str, String> = BTreeMap::new();
        let note = match type_.as_str() {
            "oauth2" => {
                let oauth2 = vc["spec"]
                    .get_mut("oauth2")
                    .and_then(Value::as_object_mut)
                    .ok_or_else(|| DemoError::Example {
                        file: file.to_string(),
                        reason: format!("{name}: type oauth2 without spec.oauth2"),
                    })?;
                oauth2.insert("tokenUrl".into(), json!(token_url));
                if oauth2.contains_key("renewBefore") {
                    oauth2.insert("renewBefore".into(), json!(DEMO_RENEW_BEFORE));
                }
                let refresh =
                    oauth2.get("grantType").and_then(Value::as_str) == Some("refreshToken");
                let creds = issue(&name, refresh);
                data.insert("client_id", creds.client_id);
                data.insert("client_secret", creds.client_secret);
                if let Some(rt) = creds.refresh_token {
                    data.insert("refresh_token", rt);
                }
                let lifetime = DEFAULT_TOKEN_LIFETIME.as_secs();
                if refresh {
                    format!("Ready; {lifetime} s tokens from the demo token server, refresh token rotated on every refresh")
                } else {
                    format!("Ready; {lifetime} s tokens from the demo token server (client credentials)")
                }
            }
            "auth0" => {
                "Pending: needs a real Auth0 tenant (token URL https://{domain}/oauth/token)"
                    .to_string()
            }
            _ => {
                for key in input_keys(&type_) {
                    data.insert(key, format!("demo-{}", key.replace('_', "-")));
                }
                "Ready with demo credentials".to_string()
            }
        };
        if let Some(creds_name) = creds_name.filter(|n| !given_secrets.contains(n)) {
            if !data.is_empty() {
                plan.objects.push(secret(&creds_name, &data));
            }
        }
        plan.connections.push(DemoConnection { name, type_, note });
        connection_objects.push(vc);
    }
    // The empty one: its credentials Secret does not exist until someone creates it.
    let mut empty = json!({
        "apiVersion": "vaultconn.dev/v1alpha1",
        "kind": "VaultConnection",
        "metadata": {"name": EMPTY_CONNECTION},
        "spec": {
            "type": "bearerToken",
            "displayName": "Created empty: Pending until its credentials Secret exists",
            "credentialsRef": {"name": EMPTY_CREDENTIALS},
        },
    });
    set_namespace_and_label(&mut empty);
    connection_objects.push(empty);
    plan.connections.push(DemoConnection {
        name: EMPTY_CONNECTION.into(),
        type_: "bearerToken".into(),
        note: format!("Pending until its Secret {EMPTY_CREDENTIALS} exists (see below)"),
    });
    plan.objects.extend(connection_objects);
    Ok(plan)
}

fn set_namespace_and_label(doc: &mut Value) {
    let meta = &mut doc["metadata"];
    meta["namespace"] = json!(NAMESPACE);
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"][PART_OF.0] = json!(PART_OF.1);
}

fn secret(name: &str, data: &BTreeMap<&str, String>) -> Value {
    let mut s = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "stringData": data,
    });
    set_namespace_and_label(&mut s);
    s
}

/// The running demo: its token server, and what it applied.
#[derive(Debug)]
pub struct Demo {
    server: DemoTokenServer,
    connections: Vec<DemoConnection>,
}

impl Demo {
    /// Start the demo token server and apply the demo objects (server-side apply, so a second
    /// run against the same cluster converges instead of failing).
    pub async fn start(
        client: kube::Client,
        examples: &[Example<'_>],
        input_keys: &dyn Fn(&str) -> Vec<&'static str>,
    ) -> Result<Demo, DemoError> {
        let server = DemoTokenServer::start(DEFAULT_TOKEN_LIFETIME)
            .await
            .map_err(DemoError::TokenServer)?;
        let plan = plan(
            examples,
            &server.token_url(),
            input_keys,
            &mut |name, refresh| {
                let c = server.register_client(name);
                let refresh_token = refresh.then(|| server.issue_refresh_token(&c.client_id));
                OAuthCredentials {
                    client_id: c.client_id,
                    client_secret: c.client_secret,
                    refresh_token,
                }
            },
        )?;
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {PART_OF.0: PART_OF.1}}});
        Api::<Namespace>::all(client.clone())
            .patch(NAMESPACE, &pp, &Patch::Apply(&ns))
            .await
            .map_err(|source| DemoError::Apply {
                what: format!("namespace {NAMESPACE}"),
                source,
            })?;
        for obj in plan.objects {
            let kind = obj["kind"].as_str().unwrap_or_default().to_string();
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let what = format!("{kind} {NAMESPACE}/{name}");
            let ar = match kind.as_str() {
                "Secret" => ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()),
                _ => vault_connection_resource(),
            };
            let obj: DynamicObject =
                serde_json::from_value(obj).map_err(|e| DemoError::Example {
                    file: what.clone(),
                    reason: e.to_string(),
                })?;
            Api::<DynamicObject>::namespaced_with(client.clone(), NAMESPACE, &ar)
                .patch(&name, &pp, &Patch::Apply(&obj))
                .await
                .map_err(|source| DemoError::Apply { what, source })?;
        }
        tracing::info!(
            namespace = NAMESPACE,
            connections = plan.connections.len(),
            token_url = %server.token_url(),
            "demo connections applied"
        );
        Ok(Demo {
            server,
            connections: plan.connections,
        })
    }

    /// The demo token server's token URL.
    pub fn token_url(&self) -> String {
        self.server.token_url()
    }

    /// The connections the demo applied.
    pub fn connections(&self) -> &[DemoConnection] {
        &self.connections
    }

    /// What to do next, for a human at the terminal.
    pub fn banner(&self, kubeconfig: &Path) -> String {
        let width = self
            .connections
            .iter()
            .map(|c| c.name.len() + c.type_.len() + 3)
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        out.push_str(&format!(
            "\nvaultconn demo: one connection of every type in namespace {NAMESPACE} \
             (demo token server: {})\n",
            self.token_url()
        ));
        for c in &self.connections {
            let label = format!("{} ({})", c.name, c.type_);
            out.push_str(&format!("  {label:<width$}  {}\n", c.note));
        }
        out.push_str(&format!(
            "\nIn another terminal:\n  export KUBECONFIG={}\n  kubectl get vaultconnections.vaultconn.dev -A -w\n",
            kubeconfig.display()
        ));
        out.push_str(&format!(
            "Turn {EMPTY_CONNECTION} Ready:\n  kubectl -n {NAMESPACE} create secret generic {EMPTY_CREDENTIALS} --from-literal=token=hello\n"
        ));
        out.push_str(
            "Ctrl-C stops the operator, the demo token server and the control plane \
             (`vaultconn run --no-demo` starts without the demo).\n",
        );
        out
    }

    /// Stop the demo token server.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

/// The VaultConnection resource, spelled out: this crate cannot use the product's types (the
/// product depends on it).
fn vault_connection_resource() -> ApiResource {
    ApiResource {
        group: "vaultconn.dev".into(),
        version: "v1alpha1".into(),
        api_version: "vaultconn.dev/v1alpha1".into(),
        kind: "VaultConnection".into(),
        plural: "vaultconnections".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLES: &[Example<'static>] = &[
        Example {
            file: "apikey.yaml",
            yaml: "apiVersion: v1\nkind: Secret\nmetadata:\n  name: weather-creds\nstringData:\n  api_key: replace-me\n---\napiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata:\n  name: weather\nspec:\n  type: apiKey\n  credentialsRef:\n    name: weather-creds\n",
        },
        Example {
            file: "basic.yaml",
            yaml: "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata:\n  name: registry\nspec:\n  type: basicAuth\n  credentialsRef:\n    name: registry-creds\n",
        },
        Example {
            file: "crm.yaml",
            yaml: "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata:\n  name: crm\nspec:\n  type: oauth2\n  credentialsRef:\n    name: crm-oauth\n  oauth2:\n    tokenUrl: https://crm.example.com/oauth/token\n    grantType: refreshToken\n    renewBefore: 5m\n",
        },
        Example {
            file: "auth0.yaml",
            yaml: "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata:\n  name: m2m\nspec:\n  type: auth0\n  credentialsRef:\n    name: m2m-auth0\n  auth0:\n    domain: t.eu.auth0.com\n    audience: https://api\n",
        },
    ];

    fn keys(t: &str) -> Vec<&'static str> {
        match t {
            "apiKey" => vec!["api_key"],
            "basicAuth" => vec!["username", "password"],
            _ => vec![],
        }
    }

    fn find<'a>(plan: &'a Plan, kind: &str, name: &str) -> Option<&'a Value> {
        plan.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    #[test]
    fn plan_fills_credentials_points_oauth_at_the_demo_server_and_adds_the_empty_one() {
        let mut issued = Vec::new();
        let plan = plan(
            EXAMPLES,
            "http://127.0.0.1:1234/oauth/token",
            &keys,
            &mut |name, refresh| {
                issued.push((name.to_string(), refresh));
                OAuthCredentials {
                    client_id: format!("{name}-id"),
                    client_secret: "secret".into(),
                    refresh_token: refresh.then(|| "seed".into()),
                }
            },
        )
        .unwrap();
        assert_eq!(issued, vec![("crm".to_string(), true)]);
        // Everything in the demo namespace.
        assert!(plan
            .objects
            .iter()
            .all(|o| o["metadata"]["namespace"] == NAMESPACE));
        // The example's own Secret is applied as given, and no second one is made up.
        assert_eq!(
            find(&plan, "Secret", "weather-creds").unwrap()["stringData"]["api_key"],
            "replace-me"
        );
        // A Secret the example only names gets demo values for the catalog's keys.
        let registry = find(&plan, "Secret", "registry-creds").unwrap();
        assert_eq!(registry["stringData"]["username"], "demo-username");
        assert_eq!(registry["stringData"]["password"], "demo-password");
        // OAuth: the demo server's URL, its client and seed; renewBefore fits a 30 s token.
        let crm = find(&plan, "VaultConnection", "crm").unwrap();
        assert_eq!(
            crm["spec"]["oauth2"]["tokenUrl"],
            "http://127.0.0.1:1234/oauth/token"
        );
        assert_eq!(crm["spec"]["oauth2"]["renewBefore"], DEMO_RENEW_BEFORE);
        let crm_creds = find(&plan, "Secret", "crm-oauth").unwrap();
        assert_eq!(crm_creds["stringData"]["client_id"], "crm-id");
        assert_eq!(crm_creds["stringData"]["refresh_token"], "seed");
        // auth0 can only talk to a real tenant: no credentials, so nothing is ever sent.
        assert!(find(&plan, "VaultConnection", "m2m").is_some());
        assert!(find(&plan, "Secret", "m2m-auth0").is_none());
        // The empty one, without its Secret.
        let empty = find(&plan, "VaultConnection", EMPTY_CONNECTION).unwrap();
        assert_eq!(empty["spec"]["credentialsRef"]["name"], EMPTY_CREDENTIALS);
        assert!(find(&plan, "Secret", EMPTY_CREDENTIALS).is_none());
        // Secrets come before the connections that use them.
        let first_vc = plan
            .objects
            .iter()
            .position(|o| o["kind"] == "VaultConnection")
            .unwrap();
        assert!(plan.objects[first_vc..]
            .iter()
            .all(|o| o["kind"] == "VaultConnection"));
        assert_eq!(plan.connections.len(), 5);
    }

    #[test]
    fn a_broken_example_is_named() {
        let bad = [Example {
            file: "bad.yaml",
            yaml: "kind: VaultConnection\nspec: {type: apiKey}\n",
        }];
        let Err(err) = plan(&bad, "http://x", &keys, &mut |_, _| unreachable!()) else {
            panic!("a document without a name is refused");
        };
        assert!(err.to_string().starts_with("example bad.yaml:"), "{err}");
    }
}
