//! The desired generated Secret, computed without I/O: credential inputs in, output keys out.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::Resource;
use sha2::{Digest, Sha256};

use crate::api::{ConnectionType, DeletionPolicy, VaultConnection};
use crate::catalog;
use crate::names::*;

/// Secret bytes (a Secret's value may be any bytes), kept in `secrecy`'s box like every other
/// secret value here: zeroed on drop, and `Debug` never shows the value.
#[derive(Clone)]
pub struct SecretBytes(secrecy::SecretSlice<u8>);

impl SecretBytes {
    pub fn new(v: Vec<u8>) -> Self {
        SecretBytes(v.into())
    }
    pub fn expose(&self) -> &[u8] {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }
    /// The value as UTF-8 text (credentials are text; invalid UTF-8 is replaced, never logged).
    pub fn expose_str(&self) -> String {
        String::from_utf8_lossy(self.expose()).into_owned()
    }
}

// Equality of tokens is how a rotated refresh token is told from the one sent.
impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for SecretBytes {}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.expose().len())
    }
}

/// Secret key → value map with a redacting `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData(pub BTreeMap<String, SecretBytes>);

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl SecretData {
    pub fn from_secret(secret: &Secret) -> Self {
        SecretData(
            secret
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), SecretBytes::new(v.0.clone())))
                .collect(),
        )
    }
    pub fn get(&self, key: &str) -> Option<&SecretBytes> {
        self.0.get(key)
    }
    fn insert(&mut self, key: &str, value: impl Into<Vec<u8>>) {
        self.0
            .insert(key.to_string(), SecretBytes::new(value.into()));
    }
    fn to_k8s(&self) -> BTreeMap<String, ByteString> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), ByteString(v.expose().to_vec())))
            .collect()
    }
}

/// The credentials read from the user's Secret, or why they are incomplete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inputs {
    Complete(SecretData),
    Missing {
        missing_keys: Vec<String>,
        /// Human-readable, names the Secret and keys, never values.
        message: String,
    },
}

/// Secret types that hold credentials for the cluster itself. Copying one into a Secret for
/// workloads would hand out a cluster identity to whoever can read that Secret (and the copy
/// would outlive the ServiceAccount it belongs to): such a Secret is never read as credentials.
const KUBERNETES_CREDENTIAL_TYPES: &[&str] = &[
    "kubernetes.io/service-account-token",
    "bootstrap.kubernetes.io/token",
];

/// Pick the required and optional input keys out of the credentials Secret.
/// `secret` is `None` when there is no `credentialsRef` or the Secret does not exist.
pub fn extract_inputs(vc: &VaultConnection, secret: Option<&Secret>) -> Inputs {
    let ns = vc.metadata.namespace.as_deref().unwrap_or_default();
    let required = catalog::required_inputs(&vc.spec);
    let Some(cref) = &vc.spec.credentials_ref else {
        return Inputs::Missing {
            missing_keys: required.iter().map(|k| k.to_string()).collect(),
            message: format!(
                "No credentials yet: spec.credentialsRef is not set (needs keys {})",
                required.join(", ")
            ),
        };
    };
    let Some(secret) = secret else {
        return Inputs::Missing {
            missing_keys: required.iter().map(|k| k.to_string()).collect(),
            message: format!(
                "Secret {ns}/{} not found (needs keys {})",
                cref.name,
                required.join(", ")
            ),
        };
    };
    if let Some(t) = secret
        .type_
        .as_deref()
        .filter(|t| KUBERNETES_CREDENTIAL_TYPES.contains(t))
    {
        return Inputs::Missing {
            missing_keys: required.iter().map(|k| k.to_string()).collect(),
            message: format!(
                "Secret {ns}/{} is of type {t}: vaultconn does not copy Kubernetes credentials into another Secret; put the credentials in an Opaque Secret (needs keys {})",
                cref.name,
                required.join(", ")
            ),
        };
    }
    let data = SecretData::from_secret(secret);
    let missing: Vec<String> = required
        .iter()
        .filter(|k| {
            data.get(k)
                .is_none_or(|v| v.expose().iter().all(u8::is_ascii_whitespace))
        })
        .map(|k| k.to_string())
        .collect();
    if !missing.is_empty() {
        let noun = if missing.len() == 1 { "key" } else { "keys" };
        return Inputs::Missing {
            message: format!(
                "Secret {ns}/{} has no {noun} {} (or it is empty)",
                cref.name,
                missing.join(", ")
            ),
            missing_keys: missing,
        };
    }
    let mut picked = SecretData::default();
    for k in required
        .iter()
        .chain(catalog::optional_inputs(&vc.spec).iter())
    {
        if let Some(v) = data.get(k) {
            if !v.expose().is_empty() {
                picked.insert(k, trim_newline(v.expose()));
            }
        }
    }
    Inputs::Complete(picked)
}

/// Credentials pasted into files often end in a newline that was never part of the value.
fn trim_newline(v: &[u8]) -> Vec<u8> {
    let mut end = v.len();
    while end > 0 && (v[end - 1] == b'\n' || v[end - 1] == b'\r') {
        end -= 1;
    }
    v[..end].to_vec()
}

/// Output keys of a static (non-OAuth) connection type.
pub fn static_outputs(vc: &VaultConnection, inputs: &SecretData) -> SecretData {
    let mut out = SecretData::default();
    let copy = |out: &mut SecretData, k: &str| {
        if let Some(v) = inputs.get(k) {
            out.insert(k, v.expose().to_vec());
        }
    };
    match vc.spec.type_ {
        ConnectionType::ApiKey => {
            copy(&mut out, "api_key");
            if let Some(s) = &vc.spec.api_key {
                if let Some(b) = &s.base_url {
                    out.insert("base_url", b.as_bytes());
                }
                if let Some(h) = &s.header_name {
                    out.insert("header_name", h.as_bytes());
                }
            }
        }
        ConnectionType::BearerToken => {
            copy(&mut out, "token");
            if let Some(t) = inputs.get("token") {
                let mut v = b"Bearer ".to_vec();
                v.extend_from_slice(t.expose());
                out.insert("authorization", v);
            }
        }
        ConnectionType::BasicAuth => {
            copy(&mut out, "username");
            copy(&mut out, "password");
            if let (Some(u), Some(p)) = (inputs.get("username"), inputs.get("password")) {
                let mut raw = u.expose().to_vec();
                raw.push(b':');
                raw.extend_from_slice(p.expose());
                let enc = base64::engine::general_purpose::STANDARD.encode(raw);
                out.insert("authorization", format!("Basic {enc}"));
            }
        }
        ConnectionType::Twilio => {
            copy(&mut out, "account_sid");
            copy(&mut out, "auth_token");
        }
        ConnectionType::Stripe => {
            copy(&mut out, "secret_key");
            copy(&mut out, "publishable_key");
        }
        ConnectionType::OAuth2 | ConnectionType::Auth0 => {}
    }
    out
}

/// Output keys of an OAuth connection: never the refresh token or the client secret.
pub fn oauth_outputs(
    access_token: &str,
    token_type: &str,
    expires_at: &str,
    scope: Option<&str>,
) -> SecretData {
    let mut out = SecretData::default();
    out.insert("access_token", access_token.as_bytes());
    out.insert("token_type", token_type.as_bytes());
    out.insert("expires_at", expires_at.as_bytes());
    // RFC 6750: the scheme is "Bearer" whatever case the server used for token_type.
    let scheme = if token_type.eq_ignore_ascii_case("bearer") {
        "Bearer"
    } else {
        token_type
    };
    out.insert("authorization", format!("{scheme} {access_token}"));
    if let Some(s) = scope.filter(|s| !s.is_empty()) {
        out.insert("scope", s.as_bytes());
    }
    out
}

/// A Secret the operator wants to exist, exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSecret {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub owner: Option<OwnerReference>,
    pub data: SecretData,
}

/// Hash of everything the operator puts on a Secret (data, labels, annotations, owner), so a
/// spec change to labels or the deletion policy is not mistaken for "already correct".
fn content_hash(
    data: &SecretData,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    owner: Option<&OwnerReference>,
) -> String {
    let mut h = Sha256::new();
    let meta = serde_json::json!({"l": labels, "a": annotations, "o": owner.map(|o| &o.uid)});
    h.update(meta.to_string().as_bytes());
    for (k, v) in &data.0 {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.expose().len() as u64).to_be_bytes());
        h.update(v.expose());
    }
    hex::encode(h.finalize())
}

fn controller_owner(vc: &VaultConnection) -> Option<OwnerReference> {
    vc.controller_owner_ref(&()).map(|mut o| {
        // The generated Secret must not block deletion of the VaultConnection.
        o.block_owner_deletion = Some(false);
        o
    })
}

/// The generated Secret for `vc` holding `data`.
pub fn desired_output_secret(vc: &VaultConnection, data: SecretData) -> DesiredSecret {
    let target = vc.spec.target.clone().unwrap_or_default();
    let mut labels = target.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    labels.insert(ROLE_LABEL.into(), ROLE_OUTPUT.into());
    let mut annotations = target.annotations.clone();
    annotations.insert(
        CONNECTION_ANNOTATION.into(),
        vc.metadata.name.clone().unwrap_or_default(),
    );
    annotations.insert(
        CONNECTION_UID_ANNOTATION.into(),
        vc.metadata.uid.clone().unwrap_or_default(),
    );
    let owner = match vc.deletion_policy() {
        DeletionPolicy::Delete => controller_owner(vc),
        DeletionPolicy::Retain => None,
    };
    let hash = content_hash(&data, &labels, &annotations, owner.as_ref());
    annotations.insert(CONTENT_HASH_ANNOTATION.into(), hash);
    DesiredSecret {
        name: vc.target_name(),
        namespace: vc.metadata.namespace.clone().unwrap_or_default(),
        labels,
        annotations,
        owner,
        data,
    }
}

/// The state Secret holding an OAuth connection's refresh token: always owned (it is useless
/// without its connection), never meant to be mounted.
pub fn desired_state_secret(vc: &VaultConnection, data: SecretData) -> DesiredSecret {
    let name = vc.metadata.name.clone().unwrap_or_default();
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (ROLE_LABEL.to_string(), ROLE_STATE.to_string()),
    ]);
    let mut annotations = BTreeMap::from([
        (CONNECTION_ANNOTATION.to_string(), name.clone()),
        (
            CONNECTION_UID_ANNOTATION.to_string(),
            vc.metadata.uid.clone().unwrap_or_default(),
        ),
    ]);
    let owner = controller_owner(vc);
    let hash = content_hash(&data, &labels, &annotations, owner.as_ref());
    annotations.insert(CONTENT_HASH_ANNOTATION.to_string(), hash);
    DesiredSecret {
        name: state_secret_name(&name),
        namespace: vc.metadata.namespace.clone().unwrap_or_default(),
        labels,
        annotations,
        owner,
        data,
    }
}

impl DesiredSecret {
    pub fn content_hash(&self) -> &str {
        self.annotations
            .get(CONTENT_HASH_ANNOTATION)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// A brand-new Secret object.
    pub fn to_new_secret(&self) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(self.labels.clone()),
                annotations: Some(self.annotations.clone()),
                owner_references: self.owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            data: Some(self.data.to_k8s()),
            type_: Some("Opaque".into()),
            ..Default::default()
        }
    }

    /// True when `live` already holds exactly this content and metadata (foreign labels,
    /// annotations and owner references are left alone and do not count).
    pub fn matches(&self, live: &Secret) -> bool {
        let meta = &live.metadata;
        let live_data = SecretData::from_secret(live);
        live_data == self.data
            && self
                .labels
                .iter()
                .all(|(k, v)| meta.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
            && self
                .annotations
                .iter()
                .all(|(k, v)| meta.annotations.as_ref().and_then(|a| a.get(k)) == Some(v))
            && self.owner_matches(meta.owner_references.as_deref().unwrap_or_default())
    }

    fn owner_matches(&self, live: &[OwnerReference]) -> bool {
        let controllers: Vec<_> = live.iter().filter(|o| o.controller == Some(true)).collect();
        match &self.owner {
            Some(want) => controllers.len() == 1 && controllers[0].uid == want.uid,
            None => controllers.is_empty(),
        }
    }

    /// `live` updated to this content, keeping what others put on it (their labels, annotations,
    /// non-controller owner references). Data keys are replaced exactly; a label or annotation
    /// removed from `spec.target` is not removed from the Secret (we cannot tell it from one
    /// another tool added).
    pub fn merged_into(&self, live: &Secret) -> Secret {
        let mut s = live.clone();
        let meta = &mut s.metadata;
        let labels = meta.labels.get_or_insert_with(Default::default);
        labels.extend(self.labels.clone());
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        annotations.extend(self.annotations.clone());
        let mut owners: Vec<OwnerReference> = meta
            .owner_references
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|o| o.controller != Some(true))
            .collect();
        owners.extend(self.owner.clone());
        meta.owner_references = (!owners.is_empty()).then_some(owners);
        meta.managed_fields = None;
        s.data = Some(self.data.to_k8s());
        s.string_data = None;
        s
    }
}

/// Who a live Secret with the target name belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// Ours (same connection UID), or left behind by a deleted connection of the same name.
    Ours,
    /// Managed by vaultconn for another VaultConnection.
    OtherConnection(String),
    /// Not created by vaultconn.
    Foreign,
}

pub fn ownership(vc: &VaultConnection, meta: &ObjectMeta) -> Ownership {
    let annotations = meta.annotations.clone().unwrap_or_default();
    let managed = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY_VALUE);
    let uid = vc.metadata.uid.as_deref().unwrap_or_default();
    let controller_uid = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str());
    if !managed {
        return Ownership::Foreign;
    }
    let conn = annotations
        .get(CONNECTION_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    if annotations
        .get(CONNECTION_UID_ANNOTATION)
        .map(String::as_str)
        == Some(uid)
    {
        return Ownership::Ours;
    }
    if Some(conn.as_str()) == vc.metadata.name.as_deref() && controller_uid.is_none() {
        // A Retain'ed Secret of an earlier connection of the same name: continuing it is what
        // a GitOps delete-and-recreate expects.
        return Ownership::Ours;
    }
    if conn.is_empty() {
        Ownership::Foreign
    } else {
        Ownership::OtherConnection(conn)
    }
}

/// The only Secret type vaultconn writes. Every other type belongs to something that fills it
/// in (the token controller, cert-manager, a registry tool…) and would write it back.
const OPAQUE: &str = "Opaque";

/// The controller owner reference of `meta` that is not `vc`, if any.
fn other_controller<'a>(vc: &VaultConnection, meta: &'a ObjectMeta) -> Option<&'a OwnerReference> {
    let uid = vc.metadata.uid.as_deref().unwrap_or_default();
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.uid != uid)
}

/// The single ownership check of every write: `None` when `vc` may write `desired` over the
/// live Secret `live`, else the message saying who controls it. A foreign Secret is taken
/// over only as an output Secret with `spec.target.adopt`, and only if nothing else claims it:
/// its type is `Opaque` and no other object is its controller. Anything else has a writer of
/// its own (a ServiceAccount token is rewritten by the token controller at once), and taking
/// it over would start a write loop with that writer. The same holds for a Secret that is
/// already ours (adopted before this rule existed, or given a controller since): it is left
/// alone, which ends such a loop.
pub fn write_conflict(
    vc: &VaultConnection,
    desired: &DesiredSecret,
    live: &Secret,
) -> Option<String> {
    let ns = &desired.namespace;
    let name = &desired.name;
    let is_output = desired.labels.get(ROLE_LABEL).map(String::as_str) == Some(ROLE_OUTPUT);
    let owner = ownership(vc, &live.metadata);
    match &owner {
        // The name is ours, the controller is not: a connection deleted and created again under
        // the same name (GitOps replace) while the garbage collector has not yet removed the
        // old one's Secrets. Their deletion wakes this connection, which then goes on.
        Ownership::OtherConnection(other) if Some(other.as_str()) == vc.metadata.name.as_deref() => {
            return Some(format!(
                "Secret {ns}/{name} still belongs to an earlier VaultConnection {ns}/{other} that was deleted; it is waiting for the garbage collector, and this connection continues once the Secret is gone"
            ))
        }
        Ownership::OtherConnection(other) => {
            return Some(format!(
                "Secret {ns}/{name} is already managed by VaultConnection {ns}/{other}; two connections cannot share one Secret"
            ))
        }
        Ownership::Foreign if !is_output => {
            return Some(format!(
                "Secret {ns}/{name} (the token state Secret) exists and is not this connection's; delete or rename it"
            ))
        }
        _ => {}
    }
    let what_to_do = if is_output {
        "choose another spec.target.name"
    } else {
        "delete or rename it"
    };
    // The API server stores an omitted type as Opaque; offline input may still omit it.
    let type_ = live
        .type_
        .as_deref()
        .filter(|t| !t.is_empty())
        .unwrap_or(OPAQUE);
    if type_ != OPAQUE {
        return Some(format!(
            "Secret {ns}/{name} is of type {type_}, which vaultconn never adopts: only Opaque Secrets can be taken over; {what_to_do}"
        ));
    }
    if let Some(o) = other_controller(vc, &live.metadata) {
        return Some(format!(
            "Secret {ns}/{name} is controlled by {} {ns}/{}, which vaultconn never adopts; {what_to_do}",
            o.kind, o.name
        ));
    }
    match owner {
        Ownership::Foreign if !vc.adopt() => Some(format!(
            "Secret {ns}/{name} already exists and is not managed by vaultconn; set spec.target.adopt: true to take it over, or choose another spec.target.name"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vc(spec: serde_json::Value) -> VaultConnection {
        serde_json::from_value(json!({
            "apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection",
            "metadata": {"name": "conn", "namespace": "ns", "uid": "uid-1"},
            "spec": spec
        }))
        .unwrap()
    }

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn outputs(spec: serde_json::Value, data: &[(&str, &str)]) -> BTreeMap<String, String> {
        let vc = vc(spec);
        let Inputs::Complete(inputs) = extract_inputs(&vc, Some(&secret(data))) else {
            panic!("inputs incomplete")
        };
        static_outputs(&vc, &inputs)
            .0
            .into_iter()
            .map(|(k, v)| (k, v.expose_str()))
            .collect()
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn outputs_per_static_type() {
        let c = json!({"name": "creds"});
        assert_eq!(
            outputs(
                json!({"type": "apiKey", "credentialsRef": c, "apiKey": {"baseUrl": "https://api.x", "headerName": "X-Key"}}),
                &[("api_key", "k1\n"), ("other", "x")]
            ),
            map(&[
                ("api_key", "k1"),
                ("base_url", "https://api.x"),
                ("header_name", "X-Key")
            ])
        );
        assert_eq!(
            outputs(
                json!({"type": "apiKey", "credentialsRef": c}),
                &[("api_key", "k1")]
            ),
            map(&[("api_key", "k1")])
        );
        assert_eq!(
            outputs(
                json!({"type": "bearerToken", "credentialsRef": c}),
                &[("token", "t0k")]
            ),
            map(&[("token", "t0k"), ("authorization", "Bearer t0k")])
        );
        assert_eq!(
            outputs(
                json!({"type": "basicAuth", "credentialsRef": c}),
                &[("username", "al:ice"), ("password", "p@ss")]
            ),
            map(&[
                ("username", "al:ice"),
                ("password", "p@ss"),
                ("authorization", "Basic YWw6aWNlOnBAc3M=")
            ])
        );
        assert_eq!(
            outputs(
                json!({"type": "twilio", "credentialsRef": c}),
                &[("account_sid", "AC1"), ("auth_token", "tw")]
            ),
            map(&[("account_sid", "AC1"), ("auth_token", "tw")])
        );
        assert_eq!(
            outputs(
                json!({"type": "stripe", "credentialsRef": c}),
                &[("secret_key", "sk_1")]
            ),
            map(&[("secret_key", "sk_1")])
        );
        assert_eq!(
            outputs(
                json!({"type": "stripe", "credentialsRef": c}),
                &[("secret_key", "sk_1"), ("publishable_key", "pk_1")]
            ),
            map(&[("secret_key", "sk_1"), ("publishable_key", "pk_1")])
        );
    }

    #[test]
    fn missing_inputs_name_secret_and_keys() {
        let v = vc(json!({"type": "basicAuth", "credentialsRef": {"name": "creds"}}));
        let Inputs::Missing {
            missing_keys,
            message,
        } = extract_inputs(&v, Some(&secret(&[("username", "u"), ("password", " \n")])))
        else {
            panic!()
        };
        assert_eq!(missing_keys, vec!["password"]);
        assert_eq!(
            message,
            "Secret ns/creds has no key password (or it is empty)"
        );
        let Inputs::Missing {
            missing_keys,
            message,
        } = extract_inputs(&v, None)
        else {
            panic!()
        };
        assert_eq!(missing_keys, vec!["username", "password"]);
        assert_eq!(
            message,
            "Secret ns/creds not found (needs keys username, password)"
        );
        let v = vc(json!({"type": "twilio"}));
        let Inputs::Missing { message, .. } = extract_inputs(&v, None) else {
            panic!()
        };
        assert!(message.contains("spec.credentialsRef is not set"));
    }

    #[test]
    fn oauth_outputs_never_include_refresh_token_or_client_secret() {
        let out = oauth_outputs("at", "bearer", "2026-01-01T00:00:00Z", Some("read"));
        let keys: Vec<_> = out.0.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                "access_token",
                "authorization",
                "expires_at",
                "scope",
                "token_type"
            ]
        );
        assert_eq!(out.get("authorization").unwrap().expose_str(), "Bearer at");
    }

    #[test]
    fn debug_output_redacts_values() {
        let v = vc(json!({"type": "bearerToken", "credentialsRef": {"name": "creds"}}));
        let Inputs::Complete(inputs) =
            extract_inputs(&v, Some(&secret(&[("token", "supersecretvalue")])))
        else {
            panic!()
        };
        let d = desired_output_secret(&v, static_outputs(&v, &inputs));
        let dbg = format!("{d:?} {inputs:?}");
        assert!(!dbg.contains("supersecretvalue"), "{dbg}");
    }

    #[test]
    fn desired_secret_metadata_and_matching() {
        let v = vc(
            json!({"type": "bearerToken", "credentialsRef": {"name": "creds"}, "target": {"name": "out", "labels": {"team": "a"}, "annotations": {"reloader.stakater.com/match": "true"}}}),
        );
        let Inputs::Complete(inputs) = extract_inputs(&v, Some(&secret(&[("token", "t")]))) else {
            panic!()
        };
        let d = desired_output_secret(&v, static_outputs(&v, &inputs));
        assert_eq!(d.name, "out");
        assert_eq!(d.labels.get("team").unwrap(), "a");
        assert_eq!(d.labels.get(MANAGED_BY_LABEL).unwrap(), "vaultconn");
        assert_eq!(d.owner.as_ref().unwrap().uid, "uid-1");
        assert_eq!(d.owner.as_ref().unwrap().controller, Some(true));
        let mut live = d.to_new_secret();
        assert!(d.matches(&live));
        live.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("foreign".into(), "x".into());
        assert!(d.matches(&live), "foreign annotations do not count");
        live.data
            .as_mut()
            .unwrap()
            .insert("token".into(), ByteString(b"edited".to_vec()));
        assert!(!d.matches(&live));
        let merged = d.merged_into(&live);
        assert!(d.matches(&merged));
        assert_eq!(
            merged
                .metadata
                .annotations
                .as_ref()
                .unwrap()
                .get("foreign")
                .unwrap(),
            "x"
        );
        live.data
            .as_mut()
            .unwrap()
            .insert("extra".into(), ByteString(b"x".to_vec()));
        assert!(!d.matches(&live), "extra keys are drift");

        let retain = vc(json!({"type": "bearerToken", "target": {"deletionPolicy": "Retain"}}));
        assert!(desired_output_secret(&retain, SecretData::default())
            .owner
            .is_none());
    }

    #[test]
    fn ownership_rules() {
        let v = vc(json!({"type": "bearerToken"}));
        let d = desired_output_secret(&v, SecretData::default());
        assert_eq!(ownership(&v, &d.to_new_secret().metadata), Ownership::Ours);
        assert_eq!(ownership(&v, &ObjectMeta::default()), Ownership::Foreign);
        let mut other = d.to_new_secret().metadata;
        other
            .annotations
            .as_mut()
            .unwrap()
            .insert(CONNECTION_ANNOTATION.into(), "other".into());
        other
            .annotations
            .as_mut()
            .unwrap()
            .insert(CONNECTION_UID_ANNOTATION.into(), "uid-2".into());
        assert_eq!(
            ownership(&v, &other),
            Ownership::OtherConnection("other".into())
        );
        let mut leftover = d.to_new_secret().metadata;
        leftover.owner_references = None;
        leftover
            .annotations
            .as_mut()
            .unwrap()
            .insert(CONNECTION_UID_ANNOTATION.into(), "old-uid".into());
        assert_eq!(ownership(&v, &leftover), Ownership::Ours);
    }

    /// A live Secret as the API server returns it: `type_` set, `meta` as given.
    fn live(type_: &str, meta: ObjectMeta) -> Secret {
        Secret {
            metadata: meta,
            type_: Some(type_.into()),
            ..Default::default()
        }
    }

    fn named(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            ..Default::default()
        }
    }

    fn adopting(target: &str) -> VaultConnection {
        vc(json!({"type": "bearerToken", "target": {"name": target, "adopt": true}}))
    }

    fn controller_ref(kind: &str, name: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn adopt_takes_over_a_plain_opaque_secret_only() {
        let v = adopting("theirs");
        let d = desired_output_secret(&v, SecretData::default());
        assert_eq!(
            write_conflict(&v, &d, &live("Opaque", named("theirs"))),
            None
        );
        // Offline input (vaultconn validate) may leave the type out: the API server's default.
        assert_eq!(write_conflict(&v, &d, &Secret::default()), None);
        let mut s = live("Opaque", named("theirs"));
        s.type_ = Some(String::new());
        assert_eq!(write_conflict(&v, &d, &s), None);
        // A non-controller owner reference does not make it someone else's.
        let mut meta = named("theirs");
        let mut plain = controller_ref("ConfigMap", "cm", "uid-cm");
        plain.controller = None;
        meta.owner_references = Some(vec![plain]);
        assert_eq!(write_conflict(&v, &d, &live("Opaque", meta)), None);
        let no_adopt = vc(json!({"type": "bearerToken", "target": {"name": "theirs"}}));
        assert_eq!(
            write_conflict(&no_adopt, &d, &live("Opaque", named("theirs"))).unwrap(),
            "Secret ns/theirs already exists and is not managed by vaultconn; set spec.target.adopt: true to take it over, or choose another spec.target.name"
        );
    }

    #[test]
    fn adopt_refuses_every_secret_type_but_opaque() {
        let v = adopting("theirs");
        let d = desired_output_secret(&v, SecretData::default());
        for t in [
            "kubernetes.io/service-account-token",
            "kubernetes.io/tls",
            "kubernetes.io/dockerconfigjson",
            "kubernetes.io/dockercfg",
            "kubernetes.io/basic-auth",
            "kubernetes.io/ssh-auth",
            "bootstrap.kubernetes.io/token",
            "helm.sh/release.v1",
            "opaque",
        ] {
            assert_eq!(
                write_conflict(&v, &d, &live(t, named("theirs"))).unwrap(),
                format!("Secret ns/theirs is of type {t}, which vaultconn never adopts: only Opaque Secrets can be taken over; choose another spec.target.name"),
            );
            // Without adopt the type is still the reason: adopt would not help.
            let no_adopt = vc(json!({"type": "bearerToken", "target": {"name": "theirs"}}));
            assert!(write_conflict(&no_adopt, &d, &live(t, named("theirs")))
                .unwrap()
                .contains("never adopts"));
        }
    }

    #[test]
    fn adopt_refuses_a_secret_another_controller_owns() {
        let v = adopting("theirs");
        let d = desired_output_secret(&v, SecretData::default());
        let mut meta = named("theirs");
        meta.owner_references = Some(vec![controller_ref("Certificate", "web", "uid-cert")]);
        assert_eq!(
            write_conflict(&v, &d, &live("Opaque", meta)).unwrap(),
            "Secret ns/theirs is controlled by Certificate ns/web, which vaultconn never adopts; choose another spec.target.name"
        );
    }

    #[test]
    fn a_secret_of_ours_that_something_else_claims_is_left_alone() {
        let v = vc(json!({"type": "bearerToken", "target": {"name": "out", "adopt": true}}));
        let d = desired_output_secret(&v, SecretData::default());
        let ours = d.to_new_secret();
        assert_eq!(write_conflict(&v, &d, &ours), None);
        // Adopted before the type rule existed: the write loop with the token controller ends.
        let mut typed = ours.clone();
        typed.type_ = Some("kubernetes.io/service-account-token".into());
        assert!(write_conflict(&v, &d, &typed)
            .unwrap()
            .contains("is of type kubernetes.io/service-account-token"));
        // Retained (no owner of ours), then claimed by another controller.
        let retain = vc(
            json!({"type": "bearerToken", "target": {"name": "out", "deletionPolicy": "Retain"}}),
        );
        let d = desired_output_secret(&retain, SecretData::default());
        let mut claimed = d.to_new_secret();
        claimed.metadata.owner_references =
            Some(vec![controller_ref("ExternalSecret", "es", "uid-es")]);
        assert_eq!(
            write_conflict(&retain, &d, &claimed).unwrap(),
            "Secret ns/out is controlled by ExternalSecret ns/es, which vaultconn never adopts; choose another spec.target.name"
        );
    }

    #[test]
    fn state_secrets_are_never_taken_over() {
        let v = vc(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://idp.invalid/t"}}));
        let d = desired_state_secret(&v, SecretData::default());
        assert_eq!(write_conflict(&v, &d, &d.to_new_secret()), None);
        let foreign = live("Opaque", named("conn-vaultconn-state"));
        assert_eq!(
            write_conflict(&v, &d, &foreign).unwrap(),
            "Secret ns/conn-vaultconn-state (the token state Secret) exists and is not this connection's; delete or rename it"
        );
        let mut claimed = d.to_new_secret();
        claimed.metadata.owner_references = Some(vec![controller_ref("Job", "j", "uid-j")]);
        assert_eq!(
            write_conflict(&v, &d, &claimed).unwrap(),
            "Secret ns/conn-vaultconn-state is controlled by Job ns/j, which vaultconn never adopts; delete or rename it"
        );
    }

    #[test]
    fn another_connections_secret_names_that_connection() {
        let v = adopting("shared");
        let d = desired_output_secret(&v, SecretData::default());
        let other = vc(json!({"type": "bearerToken", "target": {"name": "shared"}}));
        let mut theirs = desired_output_secret(&other, SecretData::default()).to_new_secret();
        let a = theirs.metadata.annotations.as_mut().unwrap();
        a.insert(CONNECTION_ANNOTATION.into(), "first".into());
        a.insert(CONNECTION_UID_ANNOTATION.into(), "uid-first".into());
        theirs.metadata.owner_references = Some(vec![controller_ref(
            "VaultConnection",
            "first",
            "uid-first",
        )]);
        assert_eq!(
            write_conflict(&v, &d, &theirs).unwrap(),
            "Secret ns/shared is already managed by VaultConnection ns/first; two connections cannot share one Secret"
        );
    }

    /// Deleted and created again under the same name: the old connection's Secrets wait for
    /// the garbage collector, and the message says so instead of "two connections".
    #[test]
    fn a_same_name_predecessors_secret_says_it_waits_for_the_garbage_collector() {
        let v = vc(json!({"type": "bearerToken"}));
        let d = desired_output_secret(&v, SecretData::default());
        let mut old = d.to_new_secret();
        let a = old.metadata.annotations.as_mut().unwrap();
        a.insert(CONNECTION_UID_ANNOTATION.into(), "uid-0".into());
        old.metadata.owner_references =
            Some(vec![controller_ref("VaultConnection", "conn", "uid-0")]);
        assert_eq!(
            write_conflict(&v, &d, &old).unwrap(),
            "Secret ns/conn still belongs to an earlier VaultConnection ns/conn that was deleted; it is waiting for the garbage collector, and this connection continues once the Secret is gone"
        );
    }

    #[test]
    fn kubernetes_credentials_are_never_read_as_credentials() {
        let v = vc(json!({"type": "bearerToken", "credentialsRef": {"name": "sa-token"}}));
        for t in [
            "kubernetes.io/service-account-token",
            "bootstrap.kubernetes.io/token",
        ] {
            let mut s = secret(&[("token", "a-cluster-token")]);
            s.type_ = Some(t.into());
            assert_eq!(
                extract_inputs(&v, Some(&s)),
                Inputs::Missing {
                    missing_keys: vec!["token".into()],
                    message: format!("Secret ns/sa-token is of type {t}: vaultconn does not copy Kubernetes credentials into another Secret; put the credentials in an Opaque Secret (needs keys token)"),
                }
            );
        }
        // Other types are read by their keys (basic-auth Secrets hold username and password).
        let v = vc(json!({"type": "basicAuth", "credentialsRef": {"name": "login"}}));
        let mut s = secret(&[("username", "u"), ("password", "p")]);
        s.type_ = Some("kubernetes.io/basic-auth".into());
        assert!(matches!(extract_inputs(&v, Some(&s)), Inputs::Complete(_)));
    }
}
