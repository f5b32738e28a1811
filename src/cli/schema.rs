//! The CRD's OpenAPI schema applied to a manifest offline, reporting each violation as the API
//! server words it (`spec.type: Unsupported value: ...`), so `vaultconn validate` in a pipeline
//! says what `kubectl apply` would say later.
//!
//! Why hand-rolled: the schema is the structural subset Kubernetes allows (types, nullable,
//! enum, required, minimum/maximum, pattern, properties, additionalProperties, items) and the
//! point is the API server's wording; a general JSON-Schema crate would add a dependency and
//! still need a translation layer. Pure: the schema is passed in (`crd::crd()` in the binary).
//! Unknown fields are reported too: an old API server drops them silently, a new one refuses
//! them under kubectl's strict field validation, and either way a typo'd `tokenURL` is a bug.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

/// One violation: the field path and the whole message (`<path>: <what>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub path: String,
    pub message: String,
}

/// The schema of `spec` in the CRD's (only) version.
pub fn spec_schema(crd: &CustomResourceDefinition) -> Option<JSONSchemaProps> {
    crd.spec
        .versions
        .first()?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()?
        .properties
        .as_ref()?
        .get("spec")
        .cloned()
}

/// Check `value` (the object's `spec`, found at `path`) against `schema`.
pub fn check(value: &Value, schema: &JSONSchemaProps, path: &str) -> Vec<SchemaError> {
    let mut out = Vec::new();
    walk(value, schema, path, &mut out);
    out
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The value as the API server's `Invalid value: ...` shows it (Go's `%#v`-like: strings
/// quoted, numbers bare).
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("{:?}", json_type(other)),
    }
}

fn invalid(out: &mut Vec<SchemaError>, path: &str, value: String, detail: String) {
    out.push(SchemaError {
        path: path.to_string(),
        message: format!("{path}: Invalid value: {value}: {detail}"),
    });
}

fn type_matches(v: &Value, want: &str) -> bool {
    match (want, v) {
        ("integer", Value::Number(n)) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        ("number", Value::Number(_)) => true,
        (want, v) => json_type(v) == want,
    }
}

fn walk(v: &Value, s: &JSONSchemaProps, path: &str, out: &mut Vec<SchemaError>) {
    if v.is_null() {
        if s.nullable != Some(true) && s.type_.is_some() {
            let want = s.type_.as_deref().unwrap_or_default();
            invalid(
                out,
                path,
                "\"null\"".into(),
                format!("{path} in body must be of type {want}: \"null\""),
            );
        }
        return;
    }
    if let Some(want) = s.type_.as_deref() {
        if !type_matches(v, want) {
            let got = json_type(v);
            invalid(
                out,
                path,
                format!("{got:?}"),
                format!("{path} in body must be of type {want}: {got:?}"),
            );
            return;
        }
    }
    if let Some(values) = &s.enum_ {
        if !values.iter().any(|e| &e.0 == v) {
            let supported: Vec<String> = values
                .iter()
                .map(|e| match &e.0 {
                    Value::String(s) => format!("{s:?}"),
                    other => other.to_string(),
                })
                .collect();
            out.push(SchemaError {
                path: path.to_string(),
                message: format!(
                    "{path}: Unsupported value: {}: supported values: {}",
                    shown(v),
                    supported.join(", ")
                ),
            });
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(max) = s.maximum {
            if n > max {
                invalid(
                    out,
                    path,
                    shown(v),
                    format!(
                        "{path} in body should be less than or equal to {}",
                        trim_float(max)
                    ),
                );
            }
        }
        if let Some(min) = s.minimum {
            if n < min {
                invalid(
                    out,
                    path,
                    shown(v),
                    format!(
                        "{path} in body should be greater than or equal to {}",
                        trim_float(min)
                    ),
                );
            }
        }
    }
    if let (Some(text), Some(pattern)) = (v.as_str(), s.pattern.as_deref()) {
        // The schema's own patterns are tested to compile (unit test below); a pattern that
        // does not is not the manifest's fault, so it is skipped rather than reported.
        if let Ok(re) = regex::Regex::new(pattern) {
            if !re.is_match(text) {
                invalid(
                    out,
                    path,
                    shown(v),
                    format!("{path} in body should match '{pattern}'"),
                );
            }
        }
    }
    match v {
        Value::Object(map) => walk_object(map, s, path, out),
        Value::Array(items) => {
            if let Some(JSONSchemaPropsOrArray::Schema(item)) = &s.items {
                for (i, value) in items.iter().enumerate() {
                    walk(value, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn walk_object(
    map: &serde_json::Map<String, Value>,
    s: &JSONSchemaProps,
    path: &str,
    out: &mut Vec<SchemaError>,
) {
    for key in s.required.iter().flatten() {
        if !map.contains_key(key) {
            let p = format!("{path}.{key}");
            out.push(SchemaError {
                message: format!("{p}: Required value"),
                path: p,
            });
        }
    }
    let preserve = s.x_kubernetes_preserve_unknown_fields == Some(true);
    for (key, value) in map {
        // Map keys (labels, extraParams) too: the API server says `spec.target.labels.team`.
        let p = format!("{path}.{key}");
        let child = s.properties.as_ref().and_then(|props| props.get(key));
        match (child, &s.additional_properties) {
            (Some(child), _) => walk(value, child, &p, out),
            (None, Some(JSONSchemaPropsOrBool::Schema(extra))) => walk(value, extra, &p, out),
            (None, Some(JSONSchemaPropsOrBool::Bool(true))) => {}
            _ if preserve => {}
            _ => out.push(SchemaError {
                message: format!(
                    "{p}: unknown field {p:?} (the API server drops it, or refuses the object under strict field validation)"
                ),
                path: p,
            }),
        }
    }
}

/// `99` rather than `99.0`, as the API server prints the bound.
fn trim_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        f.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The spec schema of the real CRD (built from the API types, as the API server has it).
    fn spec_schema() -> JSONSchemaProps {
        super::spec_schema(&crate::crd::crd()).expect("the CRD has a spec schema")
    }

    fn messages(spec: Value) -> Vec<String> {
        check(&spec, &spec_schema(), "spec")
            .into_iter()
            .map(|e| e.message)
            .collect()
    }

    #[test]
    fn a_valid_spec_passes() {
        assert!(messages(json!({
            "type": "oauth2", "credentialsRef": {"name": "c"},
            "oauth2": {"tokenUrl": "https://x/t", "scopes": ["a"], "renewBefore": "5m",
                        "extraParams": {"resource": "r"}, "grantType": null},
            "target": {"labels": {"a": "b"}, "adopt": true}
        }))
        .is_empty());
    }

    #[test]
    fn violations_read_as_the_api_server_words_them() {
        assert_eq!(
            messages(json!({"type": "foo"})),
            ["spec.type: Unsupported value: \"foo\": supported values: \"apiKey\", \"bearerToken\", \"basicAuth\", \"twilio\", \"stripe\", \"oauth2\", \"auth0\""]
        );
        assert_eq!(messages(json!({})), ["spec.type: Required value"]);
        assert_eq!(
            messages(json!({"type": "oauth2", "oauth2": {}})),
            ["spec.oauth2.tokenUrl: Required value"]
        );
        assert_eq!(
            messages(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "renewBeforePercentage": 120}})),
            ["spec.oauth2.renewBeforePercentage: Invalid value: 120: spec.oauth2.renewBeforePercentage in body should be less than or equal to 99"]
        );
        assert_eq!(
            messages(json!({"type": "apiKey", "suspend": "yes please"})),
            ["spec.suspend: Invalid value: \"string\": spec.suspend in body must be of type boolean: \"string\""]
        );
        assert_eq!(
            messages(json!({"type": "apiKey", "suspend": null})),
            ["spec.suspend: Invalid value: \"null\": spec.suspend in body must be of type boolean: \"null\""]
        );
        let e = messages(json!({"type": "auth0", "auth0": {"domain": "d", "renewBefore": "soon"}}));
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("spec.auth0.renewBefore: Invalid value: \"soon\": spec.auth0.renewBefore in body should match '^"),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_fields_and_map_values_are_checked() {
        let e = check(
            &json!({"type": "oauth2", "oauth2": {"tokenURL": "https://x/t", "tokenUrl": "https://x/t"}}),
            &spec_schema(),
            "spec",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "spec.oauth2.tokenURL");
        assert!(e[0].message.contains("unknown field"), "{e:?}");
        assert_eq!(
            messages(json!({"type": "apiKey", "target": {"labels": {"team": 7}}})),
            ["spec.target.labels.team: Invalid value: \"integer\": spec.target.labels.team in body must be of type string: \"integer\""]
        );
        assert_eq!(
            messages(
                json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "scopes": ["a", 1]}})
            )
            .len(),
            1
        );
    }

    #[test]
    fn integral_floats_count_as_integers() {
        assert!(messages(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "renewBeforePercentage": 20.0}})).is_empty());
        assert_eq!(
            messages(json!({"type": "oauth2", "oauth2": {"tokenUrl": "https://x/t", "renewBeforePercentage": 20.5}})).len(),
            1
        );
    }

    #[test]
    fn the_crd_patterns_compile() {
        fn all(s: &JSONSchemaProps, out: &mut Vec<String>) {
            out.extend(s.pattern.clone());
            for p in s.properties.iter().flat_map(|m| m.values()) {
                all(p, out);
            }
        }
        let mut patterns = Vec::new();
        all(&spec_schema(), &mut patterns);
        assert!(!patterns.is_empty());
        for p in patterns {
            regex::Regex::new(&p).expect("pattern compiles");
        }
    }
}
