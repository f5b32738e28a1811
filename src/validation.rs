//! Spec validation without I/O. The controller and the CLI's offline `validate` both call
//! [`validate`]; the CRD schema on old API servers (no CEL) cannot express these rules, so
//! everything a user can get wrong in `spec` is checked here and reported as `InvalidSpec`.

use crate::api::{ConnectionType, GrantType, VaultConnection, VaultConnectionSpec};
use crate::oauth::token::url_policy::{validate_token_url, TokenUrlPolicy, UrlError};

/// Settings that change what is valid.
#[derive(Debug, Clone, Default)]
pub struct ValidationOptions {
    /// Allow `http://` token URLs that point at loopback (tests and the local demo only).
    pub allow_http_loopback: bool,
    /// Private-network token hosts the operator may contact (`--token-url-allow`).
    pub token_url_policy: TokenUrlPolicy,
}

/// Label/annotation prefix the operator reserves for its own bookkeeping.
pub const RESERVED_PREFIX: &str = "vaultconn.dev/";

/// Form parameters an `extraParams` entry may not override.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "refresh_token",
    "scope",
    "audience",
];

/// Every problem in the spec, as human-readable messages naming the field. Empty means valid.
pub fn validate(vc: &VaultConnection, opts: ValidationOptions) -> Vec<String> {
    let mut errors = Vec::new();
    let spec = &vc.spec;
    let own_name = vc.metadata.name.as_deref().unwrap_or_default();
    validate_settings_blocks(spec, &opts, &mut errors);

    if let Some(display) = &spec.display_name {
        if display.chars().count() > 256 {
            errors.push("spec.displayName must be at most 256 characters".into());
        }
    }
    if let Some(cref) = &spec.credentials_ref {
        if !is_dns_subdomain(&cref.name) {
            errors.push(format!(
                "spec.credentialsRef.name {:?} is not a valid Secret name",
                cref.name
            ));
        }
    }
    let target_name = vc.target_name();
    if !is_dns_subdomain(&target_name) {
        errors.push(format!(
            "spec.target.name {target_name:?} is not a valid Secret name"
        ));
    }
    if spec
        .credentials_ref
        .as_ref()
        .is_some_and(|c| c.name == target_name)
    {
        errors.push(format!(
            "spec.target.name {target_name:?} is the credentials Secret itself; the generated Secret needs its own name"
        ));
    }
    if spec.type_.is_oauth() && target_name == crate::names::state_secret_name(own_name) {
        errors.push(format!(
            "spec.target.name {target_name:?} is reserved for the connection's token state Secret"
        ));
    }
    if let Some(target) = &spec.target {
        for (kind, map) in [
            ("labels", &target.labels),
            ("annotations", &target.annotations),
        ] {
            for key in map.keys() {
                if !is_qualified_key(key) {
                    errors.push(format!("spec.target.{kind} key {key:?} is not a valid key"));
                } else if key.starts_with(RESERVED_PREFIX) || key == crate::names::MANAGED_BY_LABEL
                {
                    errors.push(format!(
                        "spec.target.{kind} key {key:?} is reserved for the operator"
                    ));
                }
            }
        }
        for (key, value) in &target.labels {
            if !is_label_value(value) {
                errors.push(format!(
                    "spec.target.labels[{key:?}] value {value:?} is not a valid label value"
                ));
            }
        }
    }
    errors
}

fn validate_settings_blocks(
    spec: &VaultConnectionSpec,
    opts: &ValidationOptions,
    errors: &mut Vec<String>,
) {
    let t = spec.type_;
    let present = [
        ("apiKey", spec.api_key.is_some(), ConnectionType::ApiKey),
        ("oauth2", spec.oauth2.is_some(), ConnectionType::OAuth2),
        ("auth0", spec.auth0.is_some(), ConnectionType::Auth0),
    ];
    for (field, is_set, owner) in present {
        if is_set && owner != t {
            errors.push(format!(
                "spec.{field} is only valid with type {}, not {}",
                owner.as_str(),
                t.as_str()
            ));
        }
    }
    match t {
        ConnectionType::ApiKey => validate_api_key(spec, errors),
        ConnectionType::OAuth2 => validate_oauth2(spec, opts, errors),
        ConnectionType::Auth0 => validate_auth0(spec, opts, errors),
        _ => {}
    }
}

fn validate_api_key(spec: &VaultConnectionSpec, errors: &mut Vec<String>) {
    if let Some(base) = spec.api_key.as_ref().and_then(|a| a.base_url.as_deref()) {
        match url::Url::parse(base) {
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {
                if !u.username().is_empty() || u.password().is_some() {
                    errors.push("spec.apiKey.baseUrl must not contain user info; put credentials in the credentials Secret".into());
                }
            }
            _ => errors.push(format!(
                "spec.apiKey.baseUrl {base:?} is not an http(s) URL"
            )),
        }
    }
    if let Some(h) = spec.api_key.as_ref().and_then(|a| a.header_name.as_deref()) {
        if h.is_empty() || !h.bytes().all(is_http_token_char) {
            errors.push(format!(
                "spec.apiKey.headerName {h:?} is not a valid HTTP header name"
            ));
        }
    }
}

fn validate_oauth2(spec: &VaultConnectionSpec, opts: &ValidationOptions, errors: &mut Vec<String>) {
    match &spec.oauth2 {
        None => errors.push("spec.oauth2 is required for type oauth2 (at least tokenUrl)".into()),
        Some(o) => {
            if o.token_url.is_empty() {
                errors.push("spec.oauth2.tokenUrl is required".into());
            } else if let Err(UrlError::Invalid(msg)) = check_token_url(&o.token_url, opts) {
                errors.push(format!("spec.oauth2.tokenUrl: {msg}"));
            }
            validate_renewal(
                "oauth2",
                o.renew_before.as_deref(),
                o.renew_before_percentage,
                errors,
            );
            validate_scopes("oauth2", &o.scopes, errors);
            for key in o.extra_params.keys() {
                if RESERVED_PARAMS.contains(&key.as_str()) {
                    errors.push(format!(
                        "spec.oauth2.extraParams must not set {key:?}; use the dedicated field"
                    ));
                }
            }
            if let Some(ca) = &o.ca_bundle_ref {
                if !is_dns_subdomain(&ca.name) {
                    errors.push(format!(
                        "spec.oauth2.caBundleRef.name {:?} is not a valid Secret name",
                        ca.name
                    ));
                }
            }
        }
    }
}

fn validate_auth0(spec: &VaultConnectionSpec, opts: &ValidationOptions, errors: &mut Vec<String>) {
    match &spec.auth0 {
        None => errors.push("spec.auth0 is required for type auth0 (at least domain)".into()),
        Some(a) => {
            if a.domain.is_empty() {
                errors.push("spec.auth0.domain is required".into());
            } else if !is_hostname(&a.domain) {
                errors.push(format!(
                    "spec.auth0.domain {:?} must be a bare host name like example.eu.auth0.com (no scheme or path)",
                    a.domain
                ));
            } else if let Err(UrlError::Invalid(msg)) =
                check_token_url(&crate::names::auth0_token_url(&a.domain), opts)
            {
                errors.push(format!("spec.auth0.domain: {msg}"));
            }
            if a.grant_type.unwrap_or_default() == GrantType::ClientCredentials
                && a.audience.as_deref().is_none_or(str::is_empty)
            {
                errors.push(
                    "spec.auth0.audience is required for the clientCredentials grant (the API identifier)".into(),
                );
            }
            validate_renewal(
                "auth0",
                a.renew_before.as_deref(),
                a.renew_before_percentage,
                errors,
            );
            validate_scopes("auth0", &a.scopes, errors);
        }
    }
}

fn check_token_url(url: &str, opts: &ValidationOptions) -> Result<(), UrlError> {
    validate_token_url(url, opts.allow_http_loopback, &opts.token_url_policy).map(|_| ())
}

/// The token URL's host is a private-network address literal the operator's allow-list does
/// not include: the message for the `TokenURLNotAllowed` status (checked after [`validate`],
/// because it is not the spec's fault alone: the operator's configuration decides). Names
/// are checked on their resolved addresses at request time.
pub fn token_url_not_allowed(vc: &VaultConnection, opts: &ValidationOptions) -> Option<String> {
    let spec = &vc.spec;
    let (field, url) = match spec.type_ {
        ConnectionType::OAuth2 => (
            "spec.oauth2.tokenUrl",
            spec.oauth2.as_ref()?.token_url.clone(),
        ),
        ConnectionType::Auth0 => (
            "spec.auth0.domain",
            crate::names::auth0_token_url(&spec.auth0.as_ref()?.domain),
        ),
        _ => return None,
    };
    match check_token_url(&url, opts) {
        Err(UrlError::NotAllowed(msg)) => Some(format!("{field}: {msg}")),
        _ => None,
    }
}

fn validate_renewal(block: &str, before: Option<&str>, pct: Option<u8>, errors: &mut Vec<String>) {
    if before.is_some() && pct.is_some() {
        errors.push(format!(
            "spec.{block}.renewBefore and spec.{block}.renewBeforePercentage are mutually exclusive"
        ));
    }
    if let Some(b) = before {
        match humantime::parse_duration(b) {
            Ok(d) if d.as_secs() >= 1 => {}
            Ok(_) => errors.push(format!("spec.{block}.renewBefore must be at least 1s")),
            Err(_) => errors.push(format!(
                "spec.{block}.renewBefore {b:?} is not a duration like 5m or 1h30m"
            )),
        }
    }
    if let Some(p) = pct {
        if !(1..=99).contains(&p) {
            errors.push(format!(
                "spec.{block}.renewBeforePercentage must be between 1 and 99, got {p}"
            ));
        }
    }
}

fn validate_scopes(block: &str, scopes: &[String], errors: &mut Vec<String>) {
    for s in scopes {
        // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
        {
            errors.push(format!(
                "spec.{block}.scopes entry {s:?} is not a valid scope token"
            ));
        }
    }
}

fn is_http_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 1123 subdomain, as Kubernetes requires for Secret names.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_hostname(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A label or annotation key: optional DNS-subdomain prefix + `/` + a name of ≤ 63 characters.
fn is_qualified_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(is_dns_subdomain) && is_label_name(name) && !name.is_empty()
}

fn is_label_name(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vc(spec: serde_json::Value) -> VaultConnection {
        serde_json::from_value(json!({
            "apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection",
            "metadata": {"name": "conn", "namespace": "ns"},
            "spec": spec
        }))
        .expect("test manifest parses")
    }

    fn errs(spec: serde_json::Value) -> Vec<String> {
        validate(&vc(spec), ValidationOptions::default())
    }

    #[test]
    fn minimal_specs_of_every_static_type_are_valid() {
        for t in ["apiKey", "bearerToken", "basicAuth", "twilio", "stripe"] {
            assert!(errs(json!({"type": t})).is_empty(), "{t}");
        }
        assert!(errs(
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://idp.example/oauth/token"}})
        )
        .is_empty());
        assert!(errs(json!({"type": "auth0", "auth0": {"domain": "t.eu.auth0.com", "audience": "https://api"}})).is_empty());
    }

    #[test]
    fn settings_block_must_match_type() {
        let e = errs(json!({"type": "bearerToken", "oauth2": {"tokenUrl": "https://x/t"}}));
        assert_eq!(
            e,
            vec!["spec.oauth2 is only valid with type oauth2, not bearerToken"]
        );
    }

    #[test]
    fn oauth2_requires_https_token_url() {
        assert_eq!(errs(json!({"type": "oauth2"})).len(), 1);
        assert!(
            errs(json!({"type": "oauth2", "oauth2": {"tokenUrl": ""}}))[0]
                .contains("tokenUrl is required")
        );
        assert!(errs(
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "http://idp.example/token"}})
        )[0]
        .starts_with("spec.oauth2.tokenUrl:"));
        let loopback =
            vc(json!({"type": "oauth2", "oauth2": {"tokenUrl": "http://127.0.0.1:8080/token"}}));
        assert!(!validate(&loopback, ValidationOptions::default()).is_empty());
        assert!(validate(
            &loopback,
            ValidationOptions {
                allow_http_loopback: true,
                ..Default::default()
            }
        )
        .is_empty());
    }

    /// A private literal is not a spec error but its own finding, decided by the operator's
    /// allow-list; other URL problems stay spec errors.
    #[test]
    fn private_token_hosts_need_the_allow_list() {
        let private = [
            vc(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://10.1.2.3/token"}})),
            vc(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://0x0a010203/token"}})),
            vc(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://[fd00::1]/token"}})),
            vc(
                json!({"type": "auth0", "auth0": {"domain": "192.168.0.10", "audience": "https://api"}}),
            ),
        ];
        let strict = ValidationOptions::default();
        let allowing = ValidationOptions {
            token_url_policy: "10.0.0.0/8,fd00::/8,192.168.0.10".parse().unwrap(),
            ..Default::default()
        };
        for v in &private {
            assert!(validate(v, strict.clone()).is_empty());
            let msg = token_url_not_allowed(v, &strict).expect("refused");
            assert!(
                msg.starts_with("spec.oauth2.tokenUrl: host ")
                    || msg.starts_with("spec.auth0.domain: host "),
                "{msg}"
            );
            assert!(
                msg.contains("--token-url-allow") && msg.contains("tokenUrlAllow"),
                "{msg}"
            );
            assert!(!msg.contains("/token"), "{msg}");
            assert_eq!(token_url_not_allowed(v, &allowing), None);
        }
        for fine in [
            vc(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://idp.example/token"}})),
            vc(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://169.254.169.254/token"}})),
            vc(json!({"type": "oauth2", "oauth2": {"tokenUrl": "not a url"}})),
            vc(json!({"type": "bearerToken"})),
        ] {
            assert_eq!(token_url_not_allowed(&fine, &strict), None);
        }
    }

    #[test]
    fn renewal_settings() {
        let e = errs(
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "renewBefore": "5m", "renewBeforePercentage": 20}}),
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("mutually exclusive"));
        assert!(errs(
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "renewBefore": "soon"}})
        )[0]
        .contains("not a duration"));
        assert!(errs(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "renewBeforePercentage": 100}}))[0].contains("between 1 and 99"));
        assert!(errs(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "renewBeforePercentage": 0}}))[0].contains("between 1 and 99"));
        assert!(errs(
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "renewBefore": "90s"}})
        )
        .is_empty());
    }

    #[test]
    fn auth0_rules() {
        assert!(
            errs(json!({"type": "auth0", "auth0": {"domain": "t.auth0.com"}}))[0]
                .contains("audience is required")
        );
        assert!(errs(json!({"type": "auth0", "auth0": {"domain": "t.auth0.com", "grantType": "refreshToken"}})).is_empty());
        assert!(errs(
            json!({"type": "auth0", "auth0": {"domain": "https://t.auth0.com/", "audience": "a"}})
        )[0]
        .contains("bare host name"));
    }

    #[test]
    fn extra_params_cannot_override_protocol_fields() {
        let e = errs(
            json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "extraParams": {"grant_type": "password", "organization": "o"}}}),
        );
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("\"grant_type\""));
    }

    #[test]
    fn target_rules() {
        assert!(
            errs(json!({"type": "apiKey", "target": {"name": "Bad_Name"}}))[0]
                .contains("not a valid Secret name")
        );
        assert!(errs(json!({"type": "apiKey", "credentialsRef": {"name": "same"}, "target": {"name": "same"}}))[0].contains("credentials Secret itself"));
        assert!(
            errs(json!({"type": "apiKey", "credentialsRef": {"name": "conn"}}))[0]
                .contains("credentials Secret itself")
        );
        assert!(errs(
            json!({"type": "apiKey", "target": {"labels": {"vaultconn.dev/connection": "x"}}})
        )[0]
        .contains("reserved"));
        assert!(
            errs(json!({"type": "apiKey", "target": {"labels": {"team": "a b"}}}))[0]
                .contains("not a valid label value")
        );
        assert!(errs(json!({"type": "apiKey", "target": {"annotations": {"reloader.stakater.com/match": "true"}}})).is_empty());
        assert!(errs(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t"}, "target": {"name": crate::names::state_secret_name("conn")}}))[0].contains("reserved"));
    }

    #[test]
    fn api_key_settings() {
        assert!(
            errs(json!({"type": "apiKey", "apiKey": {"baseUrl": "ftp://x"}}))[0]
                .contains("not an http(s) URL")
        );
        assert!(
            errs(json!({"type": "apiKey", "apiKey": {"baseUrl": "https://u:p@x"}}))[0]
                .contains("user info")
        );
        assert!(
            errs(json!({"type": "apiKey", "apiKey": {"headerName": "X Key"}}))[0]
                .contains("header name")
        );
        assert!(errs(json!({"type": "apiKey", "apiKey": {"baseUrl": "https://api.example", "headerName": "X-API-Key"}})).is_empty());
    }

    #[test]
    fn bad_scope_tokens() {
        assert!(errs(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "scopes": ["read write"]}}))[0].contains("scope token"));
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::cli::manifest::message_path;
    use crate::oauth::token::response::fuzz::proptest_config;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("a".repeat(300)),
            Just("vaultconn.dev/connection".to_string()),
            Just("app.kubernetes.io/managed-by".to_string()),
            Just("grant_type".to_string()),
            Just("conn-oauth-state".to_string()),
            Just("https://idp.example.invalid/token".to_string()),
            Just("http://127.0.0.1:8080/token".to_string()),
            Just("https://u:p@10.0.0.1/t#f".to_string()),
            Just("https://[fd00::1]/t".to_string()),
            Just("5m".to_string()),
            Just("0s".to_string()),
            Just("18446744073709551615s".to_string()),
            "[a-z0-9.-]{1,20}",
            "\\PC{0,20}",
        ]
    }

    fn map() -> impl Strategy<Value = Value> {
        proptest::collection::btree_map(text(), text(), 0..3).prop_map(|m| json!(m))
    }

    fn maybe(v: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
        proptest::option::of(v)
    }

    fn oauth_block(auth0: bool) -> impl Strategy<Value = Value> {
        (
            text(),
            maybe(text().prop_map(Value::String)),
            maybe(any::<u8>().prop_map(Value::from)),
            maybe(proptest::collection::vec(text(), 0..3).prop_map(|v| json!(v))),
            maybe(text().prop_map(Value::String)),
            maybe(prop_oneof![
                Just(json!("clientCredentials")),
                Just(json!("refreshToken"))
            ]),
            maybe(map()),
            maybe(text().prop_map(|n| json!({"name": n}))),
        )
            .prop_map(
                move |(url, before, pct, scopes, audience, grant, extra, ca)| {
                    let mut o = serde_json::Map::new();
                    o.insert(if auth0 { "domain" } else { "tokenUrl" }.into(), json!(url));
                    for (k, v) in [
                        ("renewBefore", before),
                        ("renewBeforePercentage", pct),
                        ("scopes", scopes),
                        ("audience", audience),
                        ("grantType", grant),
                    ] {
                        if let Some(v) = v {
                            o.insert(k.into(), v);
                        }
                    }
                    if !auth0 {
                        if let Some(e) = extra {
                            o.insert("extraParams".into(), e);
                        }
                        if let Some(c) = ca {
                            o.insert("caBundleRef".into(), c);
                        }
                    }
                    Value::Object(o)
                },
            )
    }

    /// Any spec the API server could hold: every type with any block (matching or not) and
    /// field values from the rules' edge cases.
    fn connection() -> impl Strategy<Value = VaultConnection> {
        (
            proptest::sample::select(vec![
                "apiKey",
                "bearerToken",
                "basicAuth",
                "twilio",
                "stripe",
                "oauth2",
                "auth0",
            ]),
            maybe(oauth_block(false)),
            maybe(oauth_block(true)),
            maybe(
                (
                    maybe(text().prop_map(Value::String)),
                    maybe(text().prop_map(Value::String)),
                )
                    .prop_map(|(b, h)| json!({"baseUrl": b, "headerName": h})),
            ),
            maybe(text().prop_map(|n| json!({"name": n}))),
            maybe(
                (maybe(text().prop_map(Value::String)), map(), map())
                    .prop_map(|(n, l, a)| json!({"name": n, "labels": l, "annotations": a})),
            ),
            maybe(text().prop_map(Value::String)),
            "[a-z0-9-]{1,30}",
        )
            .prop_map(|(t, oauth2, auth0, api_key, cref, target, display, name)| {
                let mut spec = json!({"type": t});
                for (k, v) in [
                    ("oauth2", oauth2),
                    ("auth0", auth0),
                    ("apiKey", api_key),
                    ("credentialsRef", cref),
                    ("target", target),
                    ("displayName", display),
                ] {
                    if let Some(v) = v {
                        spec[k] = v;
                    }
                }
                serde_json::from_value(json!({
                    "apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection",
                    "metadata": {"name": name, "namespace": "ns"},
                    "spec": spec
                }))
                .expect("the generated spec has the schema's types")
            })
    }

    proptest! {
        #![proptest_config(proptest_config(512))]

        /// Any spec: validation never panics, and every problem names its field (the CLI
        /// reports each under the path the message starts with).
        #[test]
        fn every_problem_names_a_field(vc in connection(), loopback in any::<bool>()) {
            let opts = ValidationOptions {
                allow_http_loopback: loopback,
                ..Default::default()
            };
            for m in validate(&vc, opts.clone()) {
                let path = message_path(&m);
                prop_assert!(path.starts_with("spec."), "{:?} names no field", m);
            }
            if let Some(m) = token_url_not_allowed(&vc, &opts) {
                prop_assert!(message_path(&m).starts_with("spec."), "{:?}", m);
            }
        }
    }
}
