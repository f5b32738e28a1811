//! `vaultconn new`: the dashboard's "add connection" flow as manifests. A VaultConnection and,
//! unless `--empty`, a credentials Secret with exactly the type's required keys (empty
//! placeholders, or the given literals), ready for `kubectl apply -f -`.
//!
//! Pure: the manifests are built as the API types, checked with the controller's validation
//! (a `new` that prints something the controller would refuse is a bug), then serialized.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;

use crate::api::{
    ApiKeySettings, Auth0Settings, ConnectionType, GrantType, LocalSecretRef, OAuth2Settings,
    VaultConnection, VaultConnectionSpec,
};
use crate::catalog;
use crate::validation::{self, ValidationOptions};

/// The type's settings, as given on the command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub display_name: Option<String>,
    /// oauth2: `spec.oauth2.tokenUrl`.
    pub token_url: Option<String>,
    /// auth0: `spec.auth0.domain`.
    pub domain: Option<String>,
    /// oauth2/auth0.
    pub audience: Option<String>,
    pub grant_type: Option<GrantType>,
    pub scopes: Vec<String>,
    /// apiKey.
    pub base_url: Option<String>,
    pub header_name: Option<String>,
    /// Name of the credentials Secret (default `<name>-credentials`).
    pub credentials_secret: Option<String>,
}

/// What to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    pub type_: ConnectionType,
    pub name: String,
    /// `None`: no `metadata.namespace`, so `kubectl apply` uses its context's namespace.
    pub namespace: Option<String>,
    /// No credentials Secret: the connection is Pending until one is created.
    pub empty: bool,
    /// `--from-literal KEY=VALUE`, in order.
    pub literals: Vec<(String, String)>,
    pub settings: Settings,
}

/// The manifests of a request, or a one-line message saying which argument is wrong.
pub fn build(
    req: &NewRequest,
    opts: ValidationOptions,
) -> Result<(VaultConnection, Option<Secret>), String> {
    if !validation::is_dns_subdomain(&req.name) {
        return Err(format!(
            "{:?} is not a valid name: use lowercase letters, digits, '-' and '.' (e.g. billing-api)",
            req.name
        ));
    }
    if req.empty && !req.literals.is_empty() {
        return Err(
            "--empty creates no credentials Secret: drop --from-literal, or drop --empty".into(),
        );
    }
    let spec = spec(req)?;
    let vc = VaultConnection {
        metadata: ObjectMeta {
            name: Some(req.name.clone()),
            namespace: req.namespace.clone(),
            ..Default::default()
        },
        spec,
        status: None,
    };
    let mut check = vc.clone();
    if check.metadata.namespace.is_none() {
        check.metadata.namespace = Some("default".into());
    }
    let problems = validation::validate(&check, opts.clone());
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if let Some(refused) = validation::token_url_not_allowed(&check, &opts) {
        return Err(format!(
            "{refused} (if the operator allows it with --token-url-allow, pass the same list here)"
        ));
    }
    if req.empty {
        return Ok((vc, None));
    }
    let required = catalog::required_inputs(&vc.spec);
    let optional = catalog::optional_inputs(&vc.spec);
    let mut data: BTreeMap<String, String> = required
        .iter()
        .map(|k| (k.to_string(), String::new()))
        .collect();
    for (key, value) in &req.literals {
        if !required.contains(&key.as_str()) && !optional.contains(&key.as_str()) {
            return Err(format!(
                "--from-literal {key}: type {} has no credential key {key:?} (keys: {})",
                req.type_.as_str(),
                required
                    .iter()
                    .chain(optional.iter())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        data.insert(key.clone(), value.clone());
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(credentials_name(req)),
            namespace: req.namespace.clone(),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(data),
        ..Default::default()
    };
    Ok((vc, Some(secret)))
}

fn credentials_name(req: &NewRequest) -> String {
    req.settings
        .credentials_secret
        .clone()
        .unwrap_or_else(|| format!("{}-credentials", req.name))
}

fn spec(req: &NewRequest) -> Result<VaultConnectionSpec, String> {
    let s = &req.settings;
    let t = req.type_;
    let flags: [(&str, bool, &[ConnectionType]); 7] = [
        (
            "--token-url",
            s.token_url.is_some(),
            &[ConnectionType::OAuth2],
        ),
        ("--domain", s.domain.is_some(), &[ConnectionType::Auth0]),
        (
            "--audience",
            s.audience.is_some(),
            &[ConnectionType::OAuth2, ConnectionType::Auth0],
        ),
        (
            "--grant-type",
            s.grant_type.is_some(),
            &[ConnectionType::OAuth2, ConnectionType::Auth0],
        ),
        (
            "--scope",
            !s.scopes.is_empty(),
            &[ConnectionType::OAuth2, ConnectionType::Auth0],
        ),
        (
            "--base-url",
            s.base_url.is_some(),
            &[ConnectionType::ApiKey],
        ),
        (
            "--header-name",
            s.header_name.is_some(),
            &[ConnectionType::ApiKey],
        ),
    ];
    for (flag, given, types) in flags {
        if given && !types.contains(&t) {
            let names: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
            return Err(format!(
                "{flag} applies to type {} only, not {}",
                names.join(" and "),
                t.as_str()
            ));
        }
    }
    let mut spec = VaultConnectionSpec {
        type_: t,
        display_name: s.display_name.clone(),
        credentials_ref: Some(LocalSecretRef {
            name: credentials_name(req),
        }),
        api_key: None,
        oauth2: None,
        auth0: None,
        suspend: false,
        target: None,
    };
    match t {
        ConnectionType::ApiKey if s.base_url.is_some() || s.header_name.is_some() => {
            spec.api_key = Some(ApiKeySettings {
                base_url: s.base_url.clone(),
                header_name: s.header_name.clone(),
            });
        }
        ConnectionType::OAuth2 => {
            let token_url = s.token_url.clone().ok_or(
                "type oauth2 needs --token-url URL (the provider's token endpoint, e.g. https://login.example.com/oauth2/token)",
            )?;
            spec.oauth2 = Some(OAuth2Settings {
                token_url,
                grant_type: s.grant_type,
                scopes: s.scopes.clone(),
                audience: s.audience.clone(),
                ..Default::default()
            });
        }
        ConnectionType::Auth0 => {
            let domain = s
                .domain
                .clone()
                .ok_or("type auth0 needs --domain TENANT.auth0.com (the tenant's domain)")?;
            if s.grant_type.unwrap_or_default() == GrantType::ClientCredentials
                && s.audience.is_none()
            {
                return Err("type auth0 needs --audience API-IDENTIFIER for the clientCredentials grant (the API's identifier in Auth0)".into());
            }
            spec.auth0 = Some(Auth0Settings {
                domain,
                audience: s.audience.clone(),
                grant_type: s.grant_type,
                scopes: s.scopes.clone(),
                ..Default::default()
            });
        }
        _ => {}
    }
    Ok(spec)
}

/// The manifests as YAML, with comments saying what to fill in and how to apply and wait.
pub fn render(req: &NewRequest, opts: ValidationOptions) -> Result<String, String> {
    let (vc, secret) = build(req, opts)?;
    let name = &req.name;
    let ns_flag = req
        .namespace
        .as_ref()
        .map(|n| format!(" -n {n}"))
        .unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!(
        "# {} connection {name}, made by `vaultconn new`.\n",
        req.type_.as_str()
    ));
    let unfilled: Vec<String> = secret
        .iter()
        .flat_map(|s| s.string_data.iter().flatten())
        .filter(|(_, v)| v.is_empty())
        .map(|(k, _)| k.clone())
        .collect();
    match &secret {
        Some(_) if !unfilled.is_empty() => out.push_str(&format!(
            "# Fill in {} in the credentials Secret below (the connection is Pending until then), then:\n",
            unfilled.join(", ")
        )),
        Some(_) => out.push_str("# Apply it, then wait until it is Ready:\n"),
        None => out.push_str(&format!(
            "# Empty connection: it stays Pending until Secret {} exists with its keys. Apply, then:\n",
            credentials_name(req)
        )),
    }
    out.push_str(&format!(
        "#   kubectl apply{ns_flag} -f {name}.yaml\n#   kubectl wait{ns_flag} --for=condition=Ready vaultconnections.vaultconn.dev/{name} --timeout=2m\n"
    ));
    out.push_str(&to_yaml(&vc)?);
    if let Some(secret) = secret {
        let required = catalog::required_inputs(&vc.spec);
        let optional = catalog::optional_inputs(&vc.spec);
        out.push_str("---\n");
        out.push_str(&format!("# Credentials: {}", required.join(", ")));
        if !optional.is_empty() {
            out.push_str(&format!(" (optional: {})", optional.join(", ")));
        }
        out.push_str(". Never commit real values to git.\n");
        out.push_str(&to_yaml(&secret)?);
    }
    Ok(out)
}

fn to_yaml<T: serde::Serialize>(v: &T) -> Result<String, String> {
    // The typed objects serialize only the fields that are set, in the API's field order.
    let mut yaml = serde_saphyr::to_string(v).map_err(|e| e.to_string())?;
    if !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    Ok(yaml)
}

/// Example settings for `type_`, as `vaultconn types` shows them.
pub fn example_request(type_: ConnectionType) -> NewRequest {
    let mut settings = Settings::default();
    match type_ {
        ConnectionType::ApiKey => {
            settings.base_url = Some("https://api.example.com".into());
            settings.header_name = Some("X-API-Key".into());
        }
        ConnectionType::OAuth2 => {
            settings.token_url = Some("https://login.example.com/oauth2/token".into());
            settings.scopes = vec!["invoices.read".into()];
        }
        ConnectionType::Auth0 => {
            settings.domain = Some("example.eu.auth0.com".into());
            settings.audience = Some("https://api.example.com".into());
        }
        _ => {}
    }
    NewRequest {
        type_,
        name: format!("{}-example", type_.as_str().to_ascii_lowercase()),
        namespace: None,
        empty: false,
        literals: Vec::new(),
        settings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(type_: ConnectionType) -> NewRequest {
        NewRequest {
            type_,
            name: "billing".into(),
            namespace: Some("payments".into()),
            empty: false,
            literals: vec![],
            settings: Settings::default(),
        }
    }

    #[test]
    fn every_example_is_valid_and_has_exactly_the_required_keys() {
        for t in ConnectionType::ALL {
            let (vc, secret) = build(&example_request(t), ValidationOptions::default())
                .unwrap_or_else(|e| panic!("{t:?}: {e}"));
            let keys: Vec<String> = secret.unwrap().string_data.unwrap().into_keys().collect();
            let mut want: Vec<String> = catalog::required_inputs(&vc.spec)
                .iter()
                .map(|k| k.to_string())
                .collect();
            want.sort();
            assert_eq!(keys, want, "{t:?}");
        }
    }

    #[test]
    fn rendered_yaml_parses_back_to_the_same_objects() {
        let mut r = req(ConnectionType::BasicAuth);
        r.literals = vec![
            ("username".into(), "svc: \"quoted\" #not-a-comment".into()),
            ("password".into(), "p'w\n".into()),
        ];
        let text = render(&r, ValidationOptions::default()).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        assert_eq!(docs.len(), 2);
        let (vc, secret) = build(&r, ValidationOptions::default()).unwrap();
        assert_eq!(docs[0], serde_json::to_value(&vc).unwrap());
        assert_eq!(docs[1], serde_json::to_value(secret.unwrap()).unwrap());
        assert_eq!(
            docs[1]["stringData"]["username"],
            "svc: \"quoted\" #not-a-comment"
        );
        assert_eq!(docs[0]["metadata"]["namespace"], "payments");
        assert!(docs[0].get("status").is_none());
    }

    #[test]
    fn empty_yields_no_secret_but_still_references_one() {
        let mut r = req(ConnectionType::Twilio);
        r.empty = true;
        let (vc, secret) = build(&r, ValidationOptions::default()).unwrap();
        assert!(secret.is_none());
        assert_eq!(vc.spec.credentials_ref.unwrap().name, "billing-credentials");
        r.literals = vec![("account_sid".into(), "x".into())];
        assert!(build(&r, ValidationOptions::default()).is_err());
    }

    #[test]
    fn arguments_are_checked_with_one_line_messages() {
        assert!(
            build(&req(ConnectionType::OAuth2), ValidationOptions::default())
                .unwrap_err()
                .contains("needs --token-url")
        );
        let mut r = req(ConnectionType::OAuth2);
        r.settings.token_url = Some("http://idp.example/token".into());
        assert!(build(&r, ValidationOptions::default())
            .unwrap_err()
            .starts_with("spec.oauth2.tokenUrl:"));
        let mut r = req(ConnectionType::Auth0);
        r.settings.domain = Some("t.auth0.com".into());
        assert!(build(&r, ValidationOptions::default())
            .unwrap_err()
            .contains("--audience"));
        r.settings.grant_type = Some(GrantType::RefreshToken);
        let (_, s) = build(&r, ValidationOptions::default()).unwrap();
        assert!(s
            .unwrap()
            .string_data
            .unwrap()
            .contains_key("refresh_token"));
        let mut r = req(ConnectionType::BearerToken);
        r.settings.token_url = Some("https://x/t".into());
        assert_eq!(
            build(&r, ValidationOptions::default()).unwrap_err(),
            "--token-url applies to type oauth2 only, not bearerToken"
        );
        let mut r = req(ConnectionType::BearerToken);
        r.literals = vec![("tokne".into(), "x".into())];
        assert!(build(&r, ValidationOptions::default())
            .unwrap_err()
            .contains("no credential key \"tokne\""));
        let mut r = req(ConnectionType::BearerToken);
        r.name = "Billing".into();
        assert!(build(&r, ValidationOptions::default())
            .unwrap_err()
            .contains("not a valid name"));
    }
}
