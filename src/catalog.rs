//! The connection-type catalog: one table that says, for every `spec.type`, which input keys the
//! credentials Secret needs, which settings block applies, and which keys the generated Secret gets.
//! Validation, the desired Secret, the README's tables and the CLI's `types` listing all read it.

use crate::api::{ConnectionType, GrantType, VaultConnectionSpec};

/// Everything the operator knows about one connection type.
#[derive(Debug, Clone, Copy)]
pub struct TypeInfo {
    pub type_: ConnectionType,
    pub description: &'static str,
    /// Input keys that must be present and non-empty (for OAuth types: the clientCredentials grant).
    pub required_inputs: &'static [&'static str],
    pub optional_inputs: &'static [&'static str],
    /// The `spec` settings block for this type, if any (e.g. `apiKey`).
    pub settings_field: Option<&'static str>,
    pub outputs: &'static [&'static str],
}

pub const CATALOG: &[TypeInfo] = &[
    TypeInfo {
        type_: ConnectionType::ApiKey,
        description: "A static API key, optionally with the base URL and header name to use it with",
        required_inputs: &["api_key"],
        optional_inputs: &[],
        settings_field: Some("apiKey"),
        outputs: &["api_key", "base_url", "header_name"],
    },
    TypeInfo {
        type_: ConnectionType::BearerToken,
        description: "A static bearer token",
        required_inputs: &["token"],
        optional_inputs: &[],
        settings_field: None,
        outputs: &["token", "authorization"],
    },
    TypeInfo {
        type_: ConnectionType::BasicAuth,
        description: "HTTP basic authentication",
        required_inputs: &["username", "password"],
        optional_inputs: &[],
        settings_field: None,
        outputs: &["username", "password", "authorization"],
    },
    TypeInfo {
        type_: ConnectionType::Twilio,
        description: "Twilio account SID and auth token",
        required_inputs: &["account_sid", "auth_token"],
        optional_inputs: &[],
        settings_field: None,
        outputs: &["account_sid", "auth_token"],
    },
    TypeInfo {
        type_: ConnectionType::Stripe,
        description: "Stripe secret key (and optional publishable key)",
        required_inputs: &["secret_key"],
        optional_inputs: &["publishable_key"],
        settings_field: None,
        outputs: &["secret_key", "publishable_key"],
    },
    TypeInfo {
        type_: ConnectionType::OAuth2,
        description: "OAuth 2.0 client (clientCredentials or refreshToken grant); access tokens refreshed before expiry",
        required_inputs: &["client_id", "client_secret"],
        optional_inputs: &["refresh_token", "access_token", "expires_at"],
        settings_field: Some("oauth2"),
        outputs: &["access_token", "token_type", "expires_at", "authorization", "scope"],
    },
    TypeInfo {
        type_: ConnectionType::Auth0,
        description: "Auth0 application (e.g. machine-to-machine) over the OAuth 2.0 token machinery",
        required_inputs: &["client_id", "client_secret"],
        optional_inputs: &["refresh_token", "access_token", "expires_at"],
        settings_field: Some("auth0"),
        outputs: &["access_token", "token_type", "expires_at", "authorization", "scope"],
    },
];

pub fn info(type_: ConnectionType) -> &'static TypeInfo {
    CATALOG
        .iter()
        .find(|t| t.type_ == type_)
        .unwrap_or(&CATALOG[0])
}

/// The grant an OAuth-type spec uses (clientCredentials when unset).
pub fn grant_type(spec: &VaultConnectionSpec) -> GrantType {
    match spec.type_ {
        ConnectionType::OAuth2 => spec.oauth2.as_ref().and_then(|o| o.grant_type),
        ConnectionType::Auth0 => spec.auth0.as_ref().and_then(|a| a.grant_type),
        _ => None,
    }
    .unwrap_or_default()
}

/// Input keys this spec needs in its credentials Secret, in catalog order.
pub fn required_inputs(spec: &VaultConnectionSpec) -> Vec<&'static str> {
    let mut keys = info(spec.type_).required_inputs.to_vec();
    if spec.type_.is_oauth() && grant_type(spec) == GrantType::RefreshToken {
        keys.push("refresh_token");
    }
    keys
}

/// Input keys read when present.
pub fn optional_inputs(spec: &VaultConnectionSpec) -> Vec<&'static str> {
    let required = required_inputs(spec);
    info(spec.type_)
        .optional_inputs
        .iter()
        .copied()
        .filter(|k| !required.contains(k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_exactly_one_entry() {
        for t in ConnectionType::ALL {
            assert_eq!(CATALOG.iter().filter(|i| i.type_ == t).count(), 1, "{t:?}");
            assert_eq!(info(t).type_, t);
        }
    }

    #[test]
    fn refresh_token_grant_requires_refresh_token() {
        let mut spec: VaultConnectionSpec = serde_json::from_value(serde_json::json!({
            "type": "oauth2", "oauth2": {"tokenUrl": "https://idp.example/token", "grantType": "refreshToken"}
        }))
        .unwrap();
        assert_eq!(
            required_inputs(&spec),
            vec!["client_id", "client_secret", "refresh_token"]
        );
        assert_eq!(optional_inputs(&spec), vec!["access_token", "expires_at"]);
        spec.oauth2.as_mut().unwrap().grant_type = None;
        assert_eq!(required_inputs(&spec), vec!["client_id", "client_secret"]);
    }
}
