//! `vaultconn types [TYPE]`: the connection-type catalog the controller validates against, with
//! each type's settings (from the CRD schema) and an example made by `vaultconn new`.
//! Pure: the schema is passed in.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use serde::Serialize;

use crate::api::{ConnectionType, GrantType, VaultConnectionSpec};
use crate::catalog;
use crate::cli::new;
use crate::validation::ValidationOptions;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TypeDoc {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub description: &'static str,
    /// Keys of the credentials Secret (for OAuth types: with the default clientCredentials grant).
    pub required_keys: Vec<&'static str>,
    pub optional_keys: Vec<&'static str>,
    /// OAuth types: the keys per grant type.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantKeys>,
    /// The `spec` block holding this type's settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings_field: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<SettingDoc>,
    /// Keys of the generated Secret.
    pub output_keys: Vec<&'static str>,
    /// A complete example (`vaultconn new` output).
    pub example: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrantKeys {
    pub grant_type: &'static str,
    pub required_keys: Vec<&'static str>,
    pub optional_keys: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SettingDoc {
    pub name: String,
    pub required: bool,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    pub description: String,
}

fn spec_with_grant(type_: ConnectionType, grant: GrantType) -> VaultConnectionSpec {
    let mut spec: VaultConnectionSpec = VaultConnectionSpec {
        type_,
        display_name: None,
        credentials_ref: None,
        api_key: None,
        oauth2: None,
        auth0: None,
        suspend: false,
        target: None,
    };
    match type_ {
        ConnectionType::OAuth2 => {
            spec.oauth2 = Some(crate::api::OAuth2Settings {
                grant_type: Some(grant),
                ..Default::default()
            })
        }
        ConnectionType::Auth0 => {
            spec.auth0 = Some(crate::api::Auth0Settings {
                grant_type: Some(grant),
                ..Default::default()
            })
        }
        _ => {}
    }
    spec
}

/// Everything about one type. `spec_schema`: the CRD's `spec` schema.
pub fn describe(type_: ConnectionType, spec_schema: &JSONSchemaProps) -> TypeDoc {
    let info = catalog::info(type_);
    let default_spec = spec_with_grant(type_, GrantType::ClientCredentials);
    let grants = if type_.is_oauth() {
        [
            (GrantType::ClientCredentials, "clientCredentials"),
            (GrantType::RefreshToken, "refreshToken"),
        ]
        .into_iter()
        .map(|(g, name)| {
            let spec = spec_with_grant(type_, g);
            GrantKeys {
                grant_type: name,
                required_keys: catalog::required_inputs(&spec),
                optional_keys: catalog::optional_inputs(&spec),
            }
        })
        .collect()
    } else {
        Vec::new()
    };
    let settings = info
        .settings_field
        .and_then(|f| spec_schema.properties.as_ref()?.get(f))
        .map(settings_of)
        .unwrap_or_default();
    TypeDoc {
        type_: type_.as_str(),
        description: info.description,
        required_keys: catalog::required_inputs(&default_spec),
        optional_keys: catalog::optional_inputs(&default_spec),
        grants,
        settings_field: info.settings_field,
        settings,
        output_keys: info.outputs.to_vec(),
        // The example requests are unit-tested to build; an empty string would show a bug.
        example: new::render(&new::example_request(type_), ValidationOptions::default())
            .unwrap_or_default(),
    }
}

fn settings_of(block: &JSONSchemaProps) -> Vec<SettingDoc> {
    let required = block.required.clone().unwrap_or_default();
    block
        .properties
        .iter()
        .flatten()
        .map(|(name, s)| SettingDoc {
            name: name.clone(),
            required: required.contains(name),
            type_: s.type_.clone().unwrap_or_default(),
            values: s
                .enum_
                .iter()
                .flatten()
                .filter_map(|v| v.0.as_str().map(str::to_string))
                .collect(),
            description: s
                .description
                .as_deref()
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect()
}

/// Every type, in catalog order.
pub fn describe_all(spec_schema: &JSONSchemaProps) -> Vec<TypeDoc> {
    catalog::CATALOG
        .iter()
        .map(|t| describe(t.type_, spec_schema))
        .collect()
}

fn keys(list: &[&str]) -> String {
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

/// The overview: one short block per type.
pub fn human_all(docs: &[TypeDoc]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str(&format!("{}: {}\n", d.type_, d.description));
        out.push_str(&format!("  credential keys: {}", keys(&d.required_keys)));
        if !d.optional_keys.is_empty() {
            out.push_str(&format!(" (optional: {})", d.optional_keys.join(", ")));
        }
        out.push('\n');
        for g in d
            .grants
            .iter()
            .filter(|g| g.grant_type != "clientCredentials")
        {
            out.push_str(&format!(
                "    with grantType {}: {}\n",
                g.grant_type,
                keys(&g.required_keys)
            ));
        }
        if let Some(field) = d.settings_field {
            let names: Vec<String> = d
                .settings
                .iter()
                .map(|s| {
                    if s.required {
                        format!("{} (required)", s.name)
                    } else {
                        s.name.clone()
                    }
                })
                .collect();
            out.push_str(&format!(
                "  settings:        spec.{field}: {}\n",
                names.join(", ")
            ));
        }
        out.push_str(&format!("  output keys:     {}\n\n", keys(&d.output_keys)));
    }
    out.push_str("Settings and an example of one type: vaultconn types TYPE\n");
    out
}

/// One type in full.
pub fn human_one(d: &TypeDoc) -> String {
    let mut out = format!("{}: {}\n\n", d.type_, d.description);
    out.push_str("Credentials Secret keys (spec.credentialsRef):\n");
    if d.grants.is_empty() {
        out.push_str(&format!("  required: {}\n", keys(&d.required_keys)));
        if !d.optional_keys.is_empty() {
            out.push_str(&format!("  optional: {}\n", d.optional_keys.join(", ")));
        }
    } else {
        for g in &d.grants {
            out.push_str(&format!(
                "  grantType {}: required {}; optional {}\n",
                g.grant_type,
                keys(&g.required_keys),
                keys(&g.optional_keys)
            ));
        }
    }
    if let Some(field) = d.settings_field {
        out.push_str(&format!("\nSettings (spec.{field}):\n"));
        let width = d.settings.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in &d.settings {
            let mut line = format!("  {:width$}  ", s.name);
            if s.required {
                line.push_str("required. ");
            }
            if !s.values.is_empty() {
                line.push_str(&format!("One of {}. ", s.values.join(", ")));
            }
            line.push_str(&s.description);
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "\nGenerated Secret keys: {}\n\nExample (vaultconn new {} NAME ...):\n\n{}",
        keys(&d.output_keys),
        d.type_,
        d.example
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> JSONSchemaProps {
        crate::cli::schema::spec_schema(&crate::crd::crd()).expect("spec schema")
    }

    #[test]
    fn the_catalog_and_schema_drive_the_listing() {
        let docs = describe_all(&schema());
        assert_eq!(docs.len(), ConnectionType::ALL.len());
        let oauth2 = docs.iter().find(|d| d.type_ == "oauth2").unwrap();
        assert_eq!(oauth2.required_keys, ["client_id", "client_secret"]);
        assert_eq!(
            oauth2.grants[1].required_keys,
            ["client_id", "client_secret", "refresh_token"]
        );
        let token_url = oauth2
            .settings
            .iter()
            .find(|s| s.name == "tokenUrl")
            .unwrap();
        assert!(token_url.required);
        let grant = oauth2
            .settings
            .iter()
            .find(|s| s.name == "grantType")
            .unwrap();
        assert_eq!(grant.values, ["clientCredentials", "refreshToken"]);
        for d in &docs {
            assert!(
                d.example.contains(&format!("type: {}", d.type_)),
                "{}",
                d.type_
            );
        }
        let text = human_all(&docs);
        assert!(text.contains("stripe: "), "{text}");
        assert!(
            text.contains("with grantType refreshToken: client_id, client_secret, refresh_token")
        );
        let one = human_one(oauth2);
        assert!(one.contains("tokenUrl"), "{one}");
        assert!(one.contains("kind: VaultConnection"), "{one}");
    }
}
