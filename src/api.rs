//! The `VaultConnection` API (`vaultconn.dev/v1alpha1`). These types are the source of truth:
//! `crds/` and the chart's copy are generated from them (`vaultconn crd`) and a test fails on drift.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const API_GROUP: &str = "vaultconn.dev";

// kube-derive takes one printcolumn(..) per column; clippy reads the repeated keys as duplicates.
#[allow(clippy::duplicated_attributes)]
/// A connection to an external service: its type, where its secret inputs live, and the Secret
/// the operator generates for workloads to mount.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "vaultconn.dev",
    version = "v1alpha1",
    kind = "VaultConnection",
    plural = "vaultconnections",
    singular = "vaultconnection",
    shortname = "vconn",
    category = "vaultconn",
    namespaced,
    status = "VaultConnectionStatus",
    derive = "PartialEq",
    doc = "A VaultConnection holds one external service's credentials (API key, bearer token, basic auth, Twilio, Stripe, OAuth2 or Auth0): the operator copies them from a Secret in the same namespace into a generated Secret for workloads to mount, and keeps OAuth2/Auth0 access tokens fresh.",
    // The columns cert-manager and External Secrets users read: the Ready condition's status and
    // reason; `-o wide` adds the next token refresh and the condition's message.
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName"),
    // Future times as text: kubectl renders a `date` column as an age and shows `<invalid>` for
    // a time that has not come yet.
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Next Refresh",
        type_ = "string",
        json_path = ".status.nextRefreshTime",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VaultConnectionSpec {
    /// The kind of credential this connection holds; decides the input and output keys.
    #[serde(rename = "type")]
    pub type_: ConnectionType,

    /// Human-readable connection name (the dashboard's "connection name").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,

    /// A Secret in the same namespace holding the credential inputs. Absent, missing, or missing a
    /// required key: the connection is Pending until the credentials are filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_ref: Option<LocalSecretRef>,

    /// Settings for `type: apiKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeySettings>,

    /// Settings for `type: oauth2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Settings>,

    /// Settings for `type: auth0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth0: Option<Auth0Settings>,

    /// While true the operator writes and refreshes nothing for this connection.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspend: bool,

    /// The generated Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetSpec>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ConnectionType {
    ApiKey,
    BearerToken,
    BasicAuth,
    Twilio,
    Stripe,
    #[serde(rename = "oauth2")]
    OAuth2,
    Auth0,
}

impl ConnectionType {
    pub const ALL: [ConnectionType; 7] = [
        ConnectionType::ApiKey,
        ConnectionType::BearerToken,
        ConnectionType::BasicAuth,
        ConnectionType::Twilio,
        ConnectionType::Stripe,
        ConnectionType::OAuth2,
        ConnectionType::Auth0,
    ];

    /// The name used in manifests (`spec.type`).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionType::ApiKey => "apiKey",
            ConnectionType::BearerToken => "bearerToken",
            ConnectionType::BasicAuth => "basicAuth",
            ConnectionType::Twilio => "twilio",
            ConnectionType::Stripe => "stripe",
            ConnectionType::OAuth2 => "oauth2",
            ConnectionType::Auth0 => "auth0",
        }
    }

    pub fn is_oauth(self) -> bool {
        matches!(self, ConnectionType::OAuth2 | ConnectionType::Auth0)
    }
}

/// A reference to a Secret in the VaultConnection's own namespace (there is deliberately no
/// namespace field: cross-namespace references are not possible).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalSecretRef {
    pub name: String,
}

/// A key of a Secret in the VaultConnection's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalSecretKeyRef {
    pub name: String,
    /// Defaults to `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySettings {
    /// Copied to the output key `base_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Copied to the output key `header_name` (e.g. `X-API-Key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_name: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GrantType {
    #[default]
    ClientCredentials,
    RefreshToken,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ClientAuthMethod {
    /// HTTP Basic with the id and secret form-urlencoded first (RFC 6749 §2.3.1).
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the request body.
    Post,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Settings {
    /// The token endpoint. https only (plain http only to loopback with `--allow-http-loopback`).
    pub token_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_type: Option<GrantType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth_method: Option<ClientAuthMethod>,
    /// Extra form parameters sent with every token request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_params: BTreeMap<String, String>,
    /// Refresh this long before expiry, e.g. `5m`. Exclusive with `renewBeforePercentage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = renew_before_pattern()))]
    pub renew_before: Option<String>,
    /// Refresh when this percentage of the lifetime is left (1–99, default 33).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub renew_before_percentage: Option<u8>,
    /// CA bundle (PEM) for the token endpoint, from a Secret in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_ref: Option<LocalSecretKeyRef>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Auth0Settings {
    /// The tenant domain, e.g. `example.eu.auth0.com`; the token URL is `https://{domain}/oauth/token`.
    pub domain: String,
    /// The API identifier (required for the clientCredentials grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_type: Option<GrantType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Refresh this long before expiry, e.g. `5m`. Exclusive with `renewBeforePercentage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = renew_before_pattern()))]
    pub renew_before: Option<String>,
    /// Refresh when this percentage of the lifetime is left (1–99, default 33).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub renew_before_percentage: Option<u8>,
}

/// The schema pattern of `renewBefore`: the grammar `humantime::parse_duration` (which validation
/// uses) accepts, e.g. `5m`, `1h30m`, `90s`, `2h 37min`, `1.5h`. The server rejects what can
/// never parse; validation still decides the rest (at least 1s, overflow), so this must accept
/// every string that parses.
pub fn renew_before_pattern() -> String {
    // Exactly the chars `char::is_whitespace` holds for (humantime skips them between and
    // inside numbers): the Unicode separators `\pZ` plus \t..\r and U+0085. Go's `\s` is
    // ASCII-only and lacks \v.
    const WS: &str = r"\pZ\x{9}-\x{D}\x{85}";
    // humantime's unit names (`\x{B5}` is the micro sign of `µs`).
    const UNITS: [&str; 40] = [
        "nanos", "nsec", "ns", "usec", "us", r"\x{B5}s", "millis", "msec", "ms", "seconds",
        "second", "secs", "sec", "s", "minutes", "minute", "mins", "min", "m", "hours", "hour",
        "hrs", "hr", "h", "days", "day", "d", "weeks", "week", "wks", "wk", "w", "months", "month",
        "M", "years", "year", "yrs", "yr", "y",
    ];
    let number = format!(r"[0-9][0-9{WS}]*(\.[0-9{WS}]*[0-9][0-9{WS}]*)?");
    let units = UNITS.join("|");
    format!("^[{WS}]*({number}({units})[{WS}]*)+$")
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// The Secret is owned by the VaultConnection and garbage-collected with it.
    #[default]
    Delete,
    /// The Secret is left behind when the VaultConnection is deleted.
    Retain,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// Name of the generated Secret (default: the VaultConnection's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels copied onto the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations copied onto the Secret (e.g. for Reloader).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
    /// Take over an existing Secret of that name that the operator does not own.
    #[serde(default, skip_serializing_if = "is_false")]
    pub adopt: bool,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Ready,
    Failed,
    Suspended,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultConnectionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready` with a reason and message; at most one condition of each `type`.
    // A list-map keyed by type: clients find the Ready one by key, and server-side apply merges
    // per type instead of replacing the whole list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The generated Secret (set once it exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Input keys that are missing while Pending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_keys: Vec<String>,
    /// oauth2/auth0: the Secret holding the current refresh token (operator state, not for mounting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<String>,
    /// Consecutive failed token requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_refresh_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_reason: Option<String>,
    /// refreshToken grant, once the provider has rotated the seed away: a short fingerprint
    /// (SHA-256 prefix, never the token) of the `refresh_token` the chain grew from. If the
    /// state Secret is lost, the operator recognises that seed as spent and does not replay it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_seed_fingerprint: Option<String>,
}

impl VaultConnection {
    pub fn target_name(&self) -> String {
        self.spec
            .target
            .as_ref()
            .and_then(|t| t.name.clone())
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }

    pub fn deletion_policy(&self) -> DeletionPolicy {
        self.spec
            .target
            .as_ref()
            .and_then(|t| t.deletion_policy)
            .unwrap_or_default()
    }

    pub fn adopt(&self) -> bool {
        self.spec.target.as_ref().is_some_and(|t| t.adopt)
    }
}
