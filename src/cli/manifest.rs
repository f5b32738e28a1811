//! `vaultconn validate` without the file system: multi-document YAML in, problems out.
//!
//! Every VaultConnection (group `vaultconn.dev`; HashiCorp's kind of the same name in another
//! group is ignored, as is every other kind) is checked the way the cluster would check it:
//! first the CRD's schema (the API server refuses the object), then [`validation::validate`]
//! (the controller's `InvalidSpec`, same options, same messages). Then the mistakes visible
//! only across objects of the same input, each worded by the controller's own functions:
//! a credentials Secret lacking required keys (`secret::extract_inputs`, `CredentialsMissing`),
//! two connections writing one Secret, a target on another connection's state Secret or on a
//! Secret of the input (`secret::write_conflict`, `SecretConflict`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use k8s_openapi::ByteString;
use serde::Serialize;
use serde_json::Value;

use crate::api::{VaultConnection, API_GROUP};
use crate::cli::schema;
use crate::oauth::token::url_policy::TokenUrlPolicy;
use crate::secret::{self, Inputs};
use crate::validation::{self, ValidationOptions};

const VERSION: &str = "v1alpha1";

/// One YAML document of one input.
#[derive(Debug, Clone)]
pub struct Document {
    pub file: String,
    /// 1-based among the non-empty documents of the file (the order `kubectl apply` uses).
    pub index: usize,
    /// 1-based line of the document's first content line.
    pub line: usize,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// Which check found a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Check {
    /// Not YAML.
    Yaml,
    /// The CRD schema: the API server would refuse the object.
    Schema,
    /// The controller's validation: the connection would be Failed with `InvalidSpec`.
    Validation,
    /// A credentials Secret of the input lacks keys: `CredentialsMissing`.
    Credentials,
    /// Two objects would claim one Secret: `SecretConflict`, or a duplicate object.
    Conflict,
}

/// One problem, located by file, document and field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    pub severity: Severity,
    pub check: Check,
    pub file: String,
    /// 1-based document index within the file (see [`Document::index`]).
    pub document: usize,
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The field at fault, e.g. `spec.oauth2.tokenUrl` (empty: the whole document).
    pub path: String,
    /// What the API server or the controller would say (validation: the exact text of the
    /// status message; the controller joins several with "; ").
    pub message: String,
    /// What else is worth knowing (where the other object is, what to do).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// The result of checking a set of documents.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub files: usize,
    pub documents: usize,
    pub connections: usize,
    pub errors: usize,
    pub warnings: usize,
    pub problems: Vec<Problem>,
}

/// How to check.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// As the operator's `--allow-http-loopback`.
    pub allow_http_loopback: bool,
    /// As the operator's `--token-url-allow`.
    pub token_url_allow: TokenUrlPolicy,
    /// The namespace of objects that name none (what `kubectl apply -n` would use).
    pub default_namespace: String,
}

impl CheckOptions {
    /// The controller's validation settings for these options.
    pub fn validation(&self) -> ValidationOptions {
        ValidationOptions {
            allow_http_loopback: self.allow_http_loopback,
            token_url_policy: self.token_url_allow.clone(),
        }
    }
}

/// Split `text` into YAML documents. Splitting at `---`/`...` lines first (a document marker at
/// column 0 ends a document whatever came before, so this matches YAML) lets a broken document
/// be reported on its own while the others are still checked.
pub fn parse_documents(file: &str, text: &str) -> (Vec<Document>, Vec<Problem>) {
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    let mut index = 0;
    for (start_line, chunk) in chunks(text) {
        match serde_saphyr::from_multiple::<Value>(&chunk) {
            Ok(values) => {
                for value in values {
                    if value.is_null() {
                        continue;
                    }
                    index += 1;
                    docs.push(Document {
                        file: file.to_string(),
                        index,
                        line: start_line + first_content_line(&chunk),
                        value,
                    });
                }
            }
            Err(e) => {
                index += 1;
                let line = e
                    .location()
                    .map_or(start_line + first_content_line(&chunk), |l| {
                        start_line + l.line() as usize - 1
                    });
                let text = e.without_snippet().to_string();
                let what = text
                    .rsplit_once(" at line ")
                    .map_or(text.as_str(), |(w, _)| w);
                let helm = chunk.contains("{{");
                problems.push(Problem {
                    severity: Severity::Error,
                    check: Check::Yaml,
                    file: file.to_string(),
                    document: index,
                    line,
                    kind: None,
                    namespace: None,
                    name: None,
                    path: String::new(),
                    message: format!("not valid YAML: {what}"),
                    hint: helm.then(|| {
                        "this looks like a Helm template: validate the rendered output (helm template ... | vaultconn validate -)".to_string()
                    }),
                });
            }
        }
    }
    (docs, problems)
}

/// The documents of `text` as (first line number, text), split at `---` and `...` lines.
fn chunks(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let marker = |m: &str| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if marker("---") {
            out.push((start, std::mem::take(&mut current)));
            start = i + 1;
        } else if marker("...") {
            current.push_str(line);
            current.push('\n');
            out.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    out.push((start, current));
    out
}

/// Offset (0-based) of the first line that is not blank, a comment or a document marker.
fn first_content_line(chunk: &str) -> usize {
    chunk
        .lines()
        .position(|l| {
            let t = l.trim();
            !(t.is_empty() || t.starts_with('#') || t == "---" || t == "...")
        })
        .unwrap_or(0)
}

/// The field path a validation message starts with (`spec.oauth2.tokenUrl: must use https`,
/// `spec.target.labels["a"] value ...`).
pub fn message_path(message: &str) -> String {
    let mut end = 0;
    let bytes = message.as_bytes();
    let starts = ["spec", "metadata"];
    let Some(root) = starts.iter().find(|s| message.starts_with(*s)) else {
        return String::new();
    };
    end += root.len();
    loop {
        match bytes.get(end) {
            Some(b'.') => {
                let len = message[end + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(message.len() - end - 1);
                if len == 0 {
                    break;
                }
                end += 1 + len;
            }
            Some(b'[') => match message[end..].find(']') {
                Some(close) => end += close + 1,
                None => break,
            },
            _ => break,
        }
    }
    message[..end].to_string()
}

/// A VaultConnection of the input that reached the controller's checks.
struct Connection {
    doc: usize,
    vc: VaultConnection,
}

/// A Secret of the input.
struct InputSecret {
    doc: usize,
    secret: Secret,
}

/// Where an object came from, for problems and hints.
#[derive(Clone)]
struct Origin {
    file: String,
    document: usize,
    line: usize,
    kind: String,
    namespace: String,
    name: String,
}

impl Origin {
    fn problem(&self, severity: Severity, check: Check, path: &str, message: String) -> Problem {
        Problem {
            severity,
            check,
            file: self.file.clone(),
            document: self.document,
            line: self.line,
            kind: Some(self.kind.clone()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            path: path.to_string(),
            message,
            hint: None,
        }
    }

    fn place(&self) -> String {
        format!(
            "{} {}/{} ({} document {})",
            self.kind, self.namespace, self.name, self.file, self.document
        )
    }
}

/// Check every document. `spec_schema` is the CRD's `spec` schema (see `schema::spec_schema`).
pub fn check_documents(
    docs: &[Document],
    spec_schema: &JSONSchemaProps,
    opts: &CheckOptions,
) -> Report {
    let mut problems = Vec::new();
    let mut origins: Vec<Origin> = Vec::new();
    let mut connections: Vec<Connection> = Vec::new();
    let mut secrets: Vec<InputSecret> = Vec::new();
    let mut checked = 0;
    for doc in docs {
        for object in objects(&doc.value) {
            let api_version = object.get("apiVersion").and_then(Value::as_str);
            let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
            let origin = Origin {
                file: doc.file.clone(),
                document: doc.index,
                line: doc.line,
                kind: kind.to_string(),
                namespace: object
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty())
                    .unwrap_or(&opts.default_namespace)
                    .to_string(),
                name: object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            };
            match (kind, api_version) {
                ("VaultConnection", Some(v)) if group_of(v) == API_GROUP => {
                    checked += 1;
                    let at = origins.len();
                    origins.push(origin.clone());
                    if let Some(vc) =
                        check_connection(object, v, &origin, spec_schema, opts, &mut problems)
                    {
                        connections.push(Connection { doc: at, vc });
                    }
                }
                ("Secret", Some("v1")) => {
                    let at = origins.len();
                    origins.push(origin.clone());
                    match serde_json::from_value::<Secret>(object.clone()) {
                        Ok(mut s) => {
                            s.metadata.namespace = Some(origin.namespace.clone());
                            merge_string_data(&mut s);
                            let refused = secret_key_problems(&s);
                            if refused.is_empty() {
                                secrets.push(InputSecret { doc: at, secret: s });
                            }
                            // Refused by the API server: it will not exist for any connection.
                            for (path, message) in refused {
                                problems.push(origin.problem(
                                    Severity::Error,
                                    Check::Schema,
                                    &path,
                                    message,
                                ));
                            }
                        }
                        Err(e) => problems.push(origin.problem(
                            Severity::Error,
                            Check::Schema,
                            "",
                            format!("Secret cannot be read: {e}"),
                        )),
                    }
                }
                _ => {}
            }
        }
    }
    cross_checks(&connections, &secrets, &origins, &mut problems);
    let mut report = Report {
        files: 0,
        documents: docs.len(),
        connections: checked,
        ..Default::default()
    };
    report.add(problems);
    report
}

impl Report {
    /// Add problems (e.g. YAML errors found before checking) and recount.
    pub fn add(&mut self, problems: Vec<Problem>) {
        self.problems.extend(problems);
        // Stable: problems of one document keep the order they were found in.
        self.problems
            .sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
        self.errors = self
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count();
        self.warnings = self.problems.len() - self.errors;
    }

    /// One line per problem, as compilers print them: `file:line: [document N] kind ns/name: message`.
    pub fn human(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            let level = match p.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            out.push_str(&format!(
                "{}:{}: {level}: document {}",
                p.file, p.line, p.document
            ));
            if let (Some(kind), Some(ns), Some(name)) = (&p.kind, &p.namespace, &p.name) {
                out.push_str(&format!(", {kind} {ns}/{name}"));
            }
            out.push_str(&format!(": {}", p.message));
            if let Some(hint) = &p.hint {
                out.push_str(&format!(" ({hint})"));
            }
            out.push('\n');
        }
        out
    }

    /// The closing line: what was read and what was found.
    pub fn summary(&self) -> String {
        let plural = |n: usize, word: &str| {
            if n == 1 {
                format!("{n} {word}")
            } else {
                format!("{n} {word}s")
            }
        };
        format!(
            "{}, {}, {}: {}, {}",
            plural(self.files, "file"),
            plural(self.documents, "document"),
            plural(self.connections, "VaultConnection"),
            plural(self.errors, "error"),
            plural(self.warnings, "warning"),
        )
    }
}

/// The objects of a document: itself, or the items of a `List` (as `kubectl get -o yaml` prints).
fn objects(v: &Value) -> Vec<&Value> {
    if !v.is_object() {
        return Vec::new();
    }
    let is_list = v
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k.ends_with("List"));
    match v.get("items").and_then(Value::as_array) {
        Some(items) if is_list => items.iter().filter(|i| i.is_object()).collect(),
        _ => vec![v],
    }
}

fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').map_or("", |(g, _)| g)
}

/// The checks of one VaultConnection; the typed object when it would reach the controller.
fn check_connection(
    object: &Value,
    api_version: &str,
    origin: &Origin,
    spec_schema: &JSONSchemaProps,
    opts: &CheckOptions,
    problems: &mut Vec<Problem>,
) -> Option<VaultConnection> {
    let schema_error =
        |path: &str, message: String| origin.problem(Severity::Error, Check::Schema, path, message);
    let before = problems.len();
    if api_version != format!("{API_GROUP}/{VERSION}") {
        problems.push(schema_error(
            "apiVersion",
            format!("apiVersion: Unsupported value: {api_version:?}: supported values: \"{API_GROUP}/{VERSION}\""),
        ));
    }
    for key in object.as_object().into_iter().flat_map(|m| m.keys()) {
        if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()) {
            problems.push(schema_error(
                key,
                format!("{key}: unknown field {key:?} (the API server drops it, or refuses the object under strict field validation)"),
            ));
        }
    }
    let name = object.pointer("/metadata/name").and_then(Value::as_str);
    let generate_name = object
        .pointer("/metadata/generateName")
        .and_then(Value::as_str);
    match (name, generate_name) {
        (None | Some(""), None) => problems.push(schema_error(
            "metadata.name",
            "metadata.name: Required value: name or generateName is required".into(),
        )),
        (Some(n), _) if !n.is_empty() && !validation::is_dns_subdomain(n) => {
            // As the API server: one error for the length, one for the pattern.
            if n.len() > 253 {
                problems.push(schema_error(
                    "metadata.name",
                    format!(
                        "metadata.name: Invalid value: {n:?}: must be no more than 253 characters"
                    ),
                ));
            }
            let pattern = n.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
            if !pattern {
                problems.push(schema_error(
                    "metadata.name",
                    format!("metadata.name: Invalid value: {n:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
                ))
            }
        }
        _ => {}
    }
    match object.get("spec") {
        None => problems.push(schema_error("spec", "spec: Required value".into())),
        Some(spec) => problems.extend(
            schema::check(spec, spec_schema, "spec")
                .into_iter()
                .map(|e| schema_error(&e.path, e.message)),
        ),
    }
    if problems.len() > before {
        // The API server refuses the object: the controller never sees it.
        return None;
    }
    let mut typed = object.clone();
    if let Some(m) = typed.as_object_mut() {
        m.remove("status");
    }
    let mut vc: VaultConnection = match serde_json::from_value(typed) {
        Ok(vc) => vc,
        Err(e) => {
            problems.push(schema_error("", format!("cannot be read: {e}")));
            return None;
        }
    };
    if vc.metadata.name.as_deref().is_none_or(str::is_empty) {
        // generateName: the server appends five characters; check as if it had.
        vc.metadata.name = Some(format!("{}xxxxx", generate_name.unwrap_or_default()));
    }
    vc.metadata.namespace = Some(origin.namespace.clone());
    // A distinct uid per object, so ownership checks tell the input's connections apart.
    vc.metadata.uid = Some(format!(
        "offline:{}:{}:{}",
        origin.file, origin.document, origin.name
    ));
    let invalid = validation::validate(&vc, opts.validation());
    if invalid.is_empty() {
        // As in the controller: checked only on a valid spec, since it depends on the
        // operator's allow-list rather than on the spec alone (reason TokenURLNotAllowed).
        if let Some(message) = validation::token_url_not_allowed(&vc, &opts.validation()) {
            let path = message_path(&message);
            problems.push(origin.problem(Severity::Error, Check::Validation, &path, message));
        }
    }
    for message in invalid {
        let path = message_path(&message);
        problems.push(origin.problem(Severity::Error, Check::Validation, &path, message));
    }
    Some(vc)
}

/// The data keys the API server refuses, worded as it words them (`IsConfigMapKey`): at most
/// 253 characters of `[-._a-zA-Z0-9]`, and not `.`, `..` or starting with `..`.
fn secret_key_problems(s: &Secret) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for key in s.data.iter().flatten().map(|(k, _)| k) {
        let mut errs = Vec::new();
        if key.len() > 253 {
            errs.push("must be no more than 253 characters".to_string());
        }
        let charset = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        if key.is_empty() || !key.bytes().all(charset) {
            errs.push("a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')".to_string());
        }
        if key == "." {
            errs.push("must not be '.'".to_string());
        } else if key == ".." {
            errs.push("must not be '..'".to_string());
        } else if key.starts_with("..") {
            errs.push("must not start with '..'".to_string());
        }
        if !errs.is_empty() {
            let path = format!("data[{key}]");
            out.push((
                path.clone(),
                format!("{path}: Invalid value: {key:?}: {}", errs.join("; ")),
            ));
        }
    }
    out
}

/// `stringData` is merged into `data` by the API server; do the same so keys given either way
/// count.
fn merge_string_data(s: &mut Secret) {
    if let Some(string_data) = s.string_data.take() {
        let data = s.data.get_or_insert_with(BTreeMap::new);
        for (k, v) in string_data {
            data.insert(k, ByteString(v.into_bytes()));
        }
    }
}

fn cross_checks(
    connections: &[Connection],
    secrets: &[InputSecret],
    origins: &[Origin],
    problems: &mut Vec<Problem>,
) {
    let key = |ns: &str, name: &str| (ns.to_string(), name.to_string());
    let mut input_secrets: BTreeMap<(String, String), &InputSecret> = BTreeMap::new();
    for s in secrets {
        let o = &origins[s.doc];
        if let Some(first) = input_secrets.insert(key(&o.namespace, &o.name), s) {
            problems.push(duplicate(o, &origins[first.doc]));
        }
    }
    // Duplicate connections: the later one replaces the earlier on apply.
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut unique: Vec<&Connection> = Vec::new();
    for c in connections {
        let o = &origins[c.doc];
        match seen.get(&key(&o.namespace, &o.name)) {
            Some(first) => problems.push(duplicate(o, &origins[*first])),
            None => {
                seen.insert(key(&o.namespace, &o.name), c.doc);
                unique.push(c);
            }
        }
    }
    let connections = unique;
    // State Secrets first: a target on another connection's state Secret is the target's fault,
    // whichever document comes first.
    let mut claims: BTreeMap<(String, String), (usize, Secret)> = BTreeMap::new();
    for c in connections.iter().filter(|c| c.vc.spec.type_.is_oauth()) {
        let desired = secret::desired_state_secret(&c.vc, Default::default());
        let o = &origins[c.doc];
        if let Some(s) = input_secrets.get(&key(&desired.namespace, &desired.name)) {
            if let Some(msg) = secret::write_conflict(&c.vc, &desired, &s.secret) {
                let mut p = o.problem(Severity::Error, Check::Conflict, "metadata.name", msg);
                p.hint = Some(format!("defined as {}", origins[s.doc].place()));
                problems.push(p);
            }
        }
        claims.insert(
            key(&desired.namespace, &desired.name),
            (c.doc, desired.to_new_secret()),
        );
    }
    for c in &connections {
        let o = &origins[c.doc];
        credentials_check(c, o, &input_secrets, origins, problems);
        let desired = secret::desired_output_secret(&c.vc, Default::default());
        let k = key(&desired.namespace, &desired.name);
        if let Some((other, live)) = claims.get(&k) {
            if let Some(msg) = secret::write_conflict(&c.vc, &desired, live) {
                let mut p = o.problem(Severity::Error, Check::Conflict, "spec.target.name", msg);
                p.hint = Some(format!("also written by {}", origins[*other].place()));
                problems.push(p);
                continue;
            }
        }
        let is_own_credentials =
            c.vc.spec
                .credentials_ref
                .as_ref()
                .is_some_and(|r| r.name == desired.name);
        if let Some(s) = input_secrets.get(&k).filter(|_| !is_own_credentials) {
            if let Some(msg) = secret::write_conflict(&c.vc, &desired, &s.secret) {
                let mut p = o.problem(Severity::Error, Check::Conflict, "spec.target.name", msg);
                p.hint = Some(format!("defined as {}", origins[s.doc].place()));
                problems.push(p);
            }
        }
        claims
            .entry(k)
            .or_insert_with(|| (c.doc, desired.to_new_secret()));
    }
}

fn duplicate(o: &Origin, first: &Origin) -> Problem {
    let mut p = o.problem(
        Severity::Error,
        Check::Conflict,
        "metadata.name",
        format!(
            "{} {}/{} is defined twice; applying replaces the first with this one",
            o.kind, o.namespace, o.name
        ),
    );
    p.hint = Some(format!("first defined as {}", first.place()));
    p
}

/// A credentials Secret in the input that lacks required keys: absent keys are an error (the
/// connection can never turn Ready from this input: a typo'd key name), empty values a warning
/// (a template still to be filled in: the connection is Pending until then).
fn credentials_check(
    c: &Connection,
    o: &Origin,
    input_secrets: &BTreeMap<(String, String), &InputSecret>,
    origins: &[Origin],
    problems: &mut Vec<Problem>,
) {
    let Some(cref) = &c.vc.spec.credentials_ref else {
        return;
    };
    let Some(s) = input_secrets.get(&(o.namespace.clone(), cref.name.clone())) else {
        return;
    };
    let Inputs::Missing {
        missing_keys,
        message,
    } = secret::extract_inputs(&c.vc, Some(&s.secret))
    else {
        return;
    };
    let keys: Vec<&String> = s.secret.data.iter().flatten().map(|(k, _)| k).collect();
    let absent: Vec<&String> = missing_keys.iter().filter(|k| !keys.contains(k)).collect();
    let severity = if absent.is_empty() {
        Severity::Warning
    } else {
        Severity::Error
    };
    let known = crate::catalog::info(c.vc.spec.type_);
    let unused: Vec<&str> = keys
        .iter()
        .map(|k| k.as_str())
        .filter(|k| !known.required_inputs.contains(k) && !known.optional_inputs.contains(k))
        .collect();
    let mut hint = origins[s.doc].place();
    if absent.is_empty() {
        hint.push_str("; the connection is Pending until the values are filled in");
    } else if !unused.is_empty() {
        hint.push_str(&format!(
            "; it has keys type {} does not read: {}",
            c.vc.spec.type_.as_str(),
            unused.join(", ")
        ));
    }
    let mut p = o.problem(
        severity,
        Check::Credentials,
        "spec.credentialsRef.name",
        message,
    );
    p.hint = Some(hint);
    problems.push(p);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> JSONSchemaProps {
        schema::spec_schema(&crate::crd::crd()).expect("spec schema")
    }

    fn check(text: &str) -> Report {
        let (docs, yaml) = parse_documents("in.yaml", text);
        let mut r = check_documents(
            &docs,
            &schema(),
            &CheckOptions {
                default_namespace: "default".into(),
                ..Default::default()
            },
        );
        r.add(yaml);
        r
    }

    fn messages(r: &Report) -> Vec<(usize, String, String)> {
        r.problems
            .iter()
            .map(|p| (p.document, p.path.clone(), p.message.clone()))
            .collect()
    }

    #[test]
    fn documents_are_split_counted_and_located() {
        let text = "---\n# Source: chart/templates/a.yaml\n---\napiVersion: v1\nkind: ConfigMap\n---\n\n---\nkind: X\nb: [1,\n---\n--- \napiVersion: v1\n...\n";
        let (docs, problems) = parse_documents("f", text);
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].index, docs[0].line), (1, 4));
        assert_eq!((docs[1].index, docs[1].line), (3, 13));
        assert_eq!(problems.len(), 1);
        assert_eq!((problems[0].document, problems[0].line), (2, 10));
        assert!(problems[0]
            .message
            .starts_with("not valid YAML: unclosed bracket"));
    }

    #[test]
    fn message_paths() {
        for (m, p) in [
            (
                "spec.oauth2.tokenUrl: must use https",
                "spec.oauth2.tokenUrl",
            ),
            ("spec.oauth2 is required for type oauth2", "spec.oauth2"),
            (
                "spec.target.labels[\"team\"] value \"a b\" is not valid",
                "spec.target.labels[\"team\"]",
            ),
            (
                "spec.target.labels key \"x\" is reserved",
                "spec.target.labels",
            ),
            ("metadata.name: Required value", "metadata.name"),
            ("something else", ""),
        ] {
            assert_eq!(message_path(m), p, "{m}");
        }
    }

    #[test]
    fn validation_messages_are_the_controllers() {
        let r = check(
            "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata: {name: a}\nspec:\n  type: oauth2\n  oauth2: {tokenUrl: 'http://idp.example/token', renewBefore: 5m, renewBeforePercentage: 20}\n",
        );
        let vc: VaultConnection = serde_json::from_value(serde_json::json!({
            "apiVersion": "vaultconn.dev/v1alpha1", "kind": "VaultConnection",
            "metadata": {"name": "a", "namespace": "default"},
            "spec": {"type": "oauth2", "oauth2": {"tokenUrl": "http://idp.example/token", "renewBefore": "5m", "renewBeforePercentage": 20}}
        }))
        .unwrap();
        let want = validation::validate(&vc, ValidationOptions::default());
        assert_eq!(want.len(), 2);
        let got: Vec<String> = r.problems.iter().map(|p| p.message.clone()).collect();
        assert_eq!(got, want);
        assert_eq!(r.problems[0].path, "spec.oauth2.tokenUrl");
        assert_eq!(r.errors, 2);
    }

    #[test]
    fn other_kinds_and_groups_are_ignored() {
        let r = check(
            "apiVersion: secrets.hashicorp.com/v1beta1\nkind: VaultConnection\nmetadata: {name: vault}\nspec: {address: 'http://vault:8200'}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 1}\n",
        );
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!((r.documents, r.connections), (2, 0));
    }

    #[test]
    fn schema_errors_stop_before_the_controller_checks() {
        let r = check("apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata: {name: Bad_Name}\nspec: {type: oauth2, oauth2: {tokenUrl: 'ftp://x'}, suspend: maybe}\n");
        let paths: Vec<&str> = r.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["metadata.name", "spec.suspend"]);
        assert!(r.problems.iter().all(|p| p.check == Check::Schema));
        let r = check("apiVersion: vaultconn.dev/v1beta1\nkind: VaultConnection\nmetadata: {name: a}\nspec: {type: apiKey}\n");
        assert_eq!(messages(&r)[0].1, "apiVersion");
    }

    #[test]
    fn credentials_in_the_input_are_checked_with_the_controllers_words() {
        let text = "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata: {name: a, namespace: ns}\nspec: {type: basicAuth, credentialsRef: {name: creds}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: creds, namespace: ns}\nstringData: {user: u, password: p}\n";
        let r = check(text);
        assert_eq!(
            messages(&r),
            [(
                1,
                "spec.credentialsRef.name".to_string(),
                "Secret ns/creds has no key username (or it is empty)".to_string()
            )]
        );
        assert_eq!(r.problems[0].severity, Severity::Error);
        assert!(r.problems[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("does not read: user"));
        // Present but empty: a template to fill in, a warning.
        let r = check(&text.replace("user: u", "username: ''"));
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.problems[0].severity, Severity::Warning);
        assert_eq!((r.errors, r.warnings), (0, 1));
        // Base64 data counts too; a complete Secret passes.
        let r = check(&text.replace(
            "stringData: {user: u, password: p}",
            "data: {username: dQ==, password: cA==}",
        ));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        // Another namespace is another Secret.
        let r = check(&text.replace(
            "name: creds, namespace: ns",
            "name: creds, namespace: other",
        ));
        assert!(r.problems.is_empty());
    }

    #[test]
    fn two_connections_on_one_secret_and_a_target_on_a_state_secret() {
        let vc = |name: &str, spec: &str| {
            format!("---\napiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata: {{name: {name}}}\nspec: {spec}\n")
        };
        let text = vc("a", "{type: bearerToken, target: {name: shared}}")
            + &vc("b", "{type: apiKey, target: {name: shared}}")
            + &vc("c", "{type: apiKey, target: {name: o-vaultconn-state}}")
            + &vc(
                "o",
                "{type: oauth2, oauth2: {tokenUrl: 'https://idp.example/t'}}",
            );
        let r = check(&text);
        assert_eq!(
            messages(&r),
            [
                (2, "spec.target.name".into(), "Secret default/shared is already managed by VaultConnection default/a; two connections cannot share one Secret".into()),
                (3, "spec.target.name".into(), "Secret default/o-vaultconn-state is already managed by VaultConnection default/o; two connections cannot share one Secret".into()),
            ]
        );
        assert!(r.problems[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("in.yaml document 1"));
    }

    #[test]
    fn a_target_on_a_secret_of_the_input_needs_adopt() {
        let text = "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata: {name: a}\nspec: {type: bearerToken, target: {name: mine}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: mine}\nstringData: {token: t}\n";
        let r = check(text);
        assert_eq!(r.problems.len(), 1);
        assert!(
            r.problems[0]
                .message
                .contains("set spec.target.adopt: true"),
            "{:?}",
            r.problems
        );
        let r = check(&text.replace("name: mine}}", "name: mine, adopt: true}}"));
        assert!(r.problems.is_empty());
    }

    #[test]
    fn duplicates_and_lists() {
        let one = "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata: {name: a}\nspec: {type: twilio}\n";
        let r = check(&format!("{one}---\n{one}"));
        assert_eq!(r.problems.len(), 1);
        assert!(r.problems[0].message.contains("defined twice"));
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: vaultconn.dev/v1alpha1\n  kind: VaultConnection\n  metadata: {name: a}\n  spec: {type: nope}\n";
        let r = check(list);
        assert_eq!(r.connections, 1);
        assert_eq!(messages(&r)[0].1, "spec.type");
    }

    #[test]
    fn human_output_names_file_line_document_and_object() {
        let r = check("apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata: {name: a, namespace: team}\nspec: {type: apiKey, apiKey: {headerName: 'X Key'}}\n");
        assert_eq!(
            r.human(),
            "in.yaml:1: error: document 1, VaultConnection team/a: spec.apiKey.headerName \"X Key\" is not a valid HTTP header name\n"
        );
        assert_eq!(
            r.summary(),
            "0 files, 1 document, 1 VaultConnection: 1 error, 0 warnings"
        );
    }

    #[test]
    fn secret_keys_the_api_server_refuses_are_reported_and_the_secret_counts_as_absent() {
        let r = check(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\nstringData:\n  \"api token\": x\n  \"..\": z\n  token: t\n---\napiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata:\n  name: github\nspec:\n  type: bearerToken\n  credentialsRef:\n    name: creds\n",
        );
        assert_eq!(
            messages(&r),
            vec![
                (1, "data[..]".to_string(), "data[..]: Invalid value: \"..\": must not be '..'".to_string()),
                (1, "data[api token]".to_string(), "data[api token]: Invalid value: \"api token\": a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')".to_string()),
            ]
        );
    }

    #[test]
    fn a_name_too_long_is_reported_as_the_api_server_reports_it() {
        let long = "a".repeat(254);
        let r = check(&format!(
            "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata:\n  name: {long}\nspec:\n  type: bearerToken\n"
        ));
        assert_eq!(
            messages(&r),
            vec![(
                1,
                "metadata.name".to_string(),
                format!(
                    "metadata.name: Invalid value: {long:?}: must be no more than 253 characters"
                )
            )]
        );
        let r = check(&format!(
            "apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\nmetadata:\n  name: {long}-\nspec:\n  type: bearerToken\n"
        ));
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
    }
}

/// The check behind the fuzz target `manifest`: `vaultconn validate` on any text.
#[cfg(any(test, fuzzing))]
pub mod fuzz {
    use std::sync::OnceLock;

    use super::*;

    fn spec_schema() -> &'static JSONSchemaProps {
        static SCHEMA: OnceLock<JSONSchemaProps> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            schema::spec_schema(&crate::crd::crd()).expect("the CRD has a spec schema")
        })
    }

    /// No panic on any input; the counts add up; every problem is located (document ≥ 1,
    /// line ≥ 1) and every validation problem names its field, as the CLI promises.
    pub fn check_manifest(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let (docs, yaml) = parse_documents("fuzz.yaml", &text);
        let opts = CheckOptions {
            default_namespace: "default".into(),
            ..Default::default()
        };
        let mut report = check_documents(&docs, spec_schema(), &opts);
        report.add(yaml);
        assert_eq!(report.errors + report.warnings, report.problems.len());
        for p in &report.problems {
            assert!(p.document >= 1 && p.line >= 1, "{p:?}");
            if p.check == Check::Validation {
                assert!(p.path.starts_with("spec"), "{p:?}");
            }
        }
        let _ = (report.human(), report.summary());
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::fuzz::check_manifest;
    use crate::oauth::token::response::fuzz::{proptest_config, seeds};

    /// Manifest-like YAML: VaultConnections and Secrets with fields from the schema's
    /// vocabulary and values of the wrong kind, split into documents, maybe cut short.
    fn manifest() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            Just("x".to_string()),
            Just("\"\"".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("null".to_string()),
            Just("-1".to_string()),
            Just("99999999999999999999".to_string()),
            Just("https://idp.example.invalid/token".to_string()),
            Just("http://127.0.0.1/t".to_string()),
            Just("5m".to_string()),
            Just("{{ .Values.x }}".to_string()),
            "[a-zA-Z0-9 ./:_-]{0,20}",
        ];
        let field = prop_oneof![
            Just("type"),
            Just("oauth2"),
            Just("tokenUrl"),
            Just("auth0"),
            Just("domain"),
            Just("audience"),
            Just("renewBefore"),
            Just("renewBeforePercentage"),
            Just("scopes"),
            Just("target"),
            Just("name"),
            Just("adopt"),
            Just("credentialsRef"),
            Just("apiKey"),
            Just("extraParams"),
            Just("labels"),
        ];
        let spec =
            proptest::collection::vec((field, value.clone(), 0usize..3), 0..8).prop_map(|fields| {
                fields
                    .into_iter()
                    .map(|(f, v, depth)| format!("{}{f}: {v}\n", "  ".repeat(depth + 1)))
                    .collect::<String>()
            });
        let doc = (
            prop_oneof![
                Just("apiVersion: vaultconn.dev/v1alpha1\nkind: VaultConnection\n"),
                Just("apiVersion: v1\nkind: Secret\n"),
                Just("apiVersion: vaultconn.dev/v2\nkind: VaultConnection\n"),
                Just("apiVersion: v1\nkind: List\nitems:\n- kind: Secret\n  apiVersion: v1\n"),
                Just(""),
            ],
            proptest::option::of("[a-z0-9.-]{0,12}"),
            spec,
            proptest::option::of(
                proptest::collection::btree_map("[a-z_]{1,12}", value, 0..3).prop_map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("  {k}: {v}\n"))
                        .collect::<String>()
                }),
            ),
        )
            .prop_map(|(head, name, spec, data)| {
                let mut d = head.to_string();
                if let Some(n) = name {
                    d.push_str(&format!("metadata:\n  name: {n}\n"));
                }
                d.push_str("spec:\n");
                d.push_str(&spec);
                if let Some(data) = data {
                    d.push_str("stringData:\n");
                    d.push_str(&data);
                }
                d
            });
        (
            proptest::collection::vec(doc, 1..4),
            any::<prop::sample::Index>(),
            any::<bool>(),
        )
            .prop_map(|(docs, cut, do_cut)| {
                let text = docs.join("---\n");
                if do_cut {
                    let mut at = cut.index(text.len() + 1);
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    text[..at].to_string()
                } else {
                    text
                }
            })
    }

    proptest! {
        #![proptest_config(proptest_config(256))]

        #[test]
        fn fuzz_manifest(text in prop_oneof![manifest(), "\\PC{0,80}"]) {
            check_manifest(text.as_bytes());
        }
    }

    #[test]
    fn fuzz_seeds_pass_the_checks() {
        for seed in seeds("manifest") {
            check_manifest(&seed);
        }
    }
}
