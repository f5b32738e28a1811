//! The CLI's one error type: every failure a person at a terminal can meet, as one line that
//! says what is wrong and what to do, and the exit code scripts can branch on.
//!
//! Pure: classifying a `kube::Error` needs no I/O.

use std::fmt;

/// Exit codes (documented in `vaultconn --help` and the README).
pub mod exit {
    /// Success: no problems found, refresh done.
    pub const OK: u8 = 0;
    /// The answer is "no": `validate` found errors, a refresh failed or is not possible.
    pub const FAILED: u8 = 1;
    /// Usage: bad flags or arguments, an unreadable input file (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// The cluster could not be used: no kubeconfig, API server unreachable or refusing the
    /// credentials, CRD not installed, permission denied.
    pub const CLUSTER: u8 = 3;
    /// The named connection does not exist.
    pub const NOT_FOUND: u8 = 4;
    /// `refresh --wait` gave up after `--timeout`.
    pub const TIMEOUT: u8 = 5;
}

/// What the command tried when the API server said no; names the verb and resource in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// `get`, `list`, `patch`, `watch`.
    pub verb: &'static str,
    /// `vaultconnections`, `events`.
    pub resource: &'static str,
    /// `None`: all namespaces.
    pub namespace: Option<String>,
    /// The object, for `get`/`patch`.
    pub name: Option<String>,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if let Some(n) = &self.name {
            write!(f, " {n}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => write!(f, " in all namespaces"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "no cluster configured: set KUBECONFIG or pass --kubeconfig FILE (the file kubectl uses), or run in a Pod"
    )]
    NoKubeconfig,
    #[error("kubeconfig {source_name}: {reason}")]
    Kubeconfig { source_name: String, reason: String },
    #[error("cannot reach the API server at {server}: {reason} (is the cluster running? check the kubeconfig's current context or pass --context)")]
    Unreachable { server: String, reason: String },
    #[error("the API server at {server} rejected the credentials (401 Unauthorized): log in again or check the kubeconfig's user")]
    Unauthorized { server: String },
    #[error("the VaultConnection CRD is not installed in this cluster: install it with `vaultconn crd | kubectl apply -f -`")]
    CrdMissing,
    #[error("permission denied: cannot {access} ({message}); ask for RBAC that allows it")]
    Forbidden { access: Access, message: String },
    #[error("VaultConnection {namespace}/{name} not found (list them with `vaultconn status -n {namespace}`)")]
    NotFound { namespace: String, name: String },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Timeout(String),
    #[error("API server error while trying to {access}: {message}")]
    Api { access: Access, message: String },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NoKubeconfig
            | CliError::Kubeconfig { .. }
            | CliError::Unreachable { .. }
            | CliError::Unauthorized { .. }
            | CliError::CrdMissing
            | CliError::Forbidden { .. }
            | CliError::Api { .. } => exit::CLUSTER,
            CliError::NotFound { .. } => exit::NOT_FOUND,
            CliError::Usage(_) => exit::USAGE,
            CliError::Failed(_) => exit::FAILED,
            CliError::Timeout(_) => exit::TIMEOUT,
        }
    }

    /// Classify an API error. `server` is the API server's URL (for unreachable/401),
    /// `access` what was attempted. A 404 names the object only when the server's Status
    /// carries its name; otherwise the resource type itself is not served: the CRD is missing.
    pub fn from_kube(e: kube::Error, server: &str, access: Access) -> CliError {
        match e {
            kube::Error::Api(status) => match status.code {
                401 => CliError::Unauthorized {
                    server: server.to_string(),
                },
                403 => CliError::Forbidden {
                    access,
                    message: one_line(&status.message),
                },
                404 => {
                    let named = status.details.as_ref().is_some_and(|d| !d.name.is_empty());
                    match (named, access.name.clone(), access.namespace.clone()) {
                        (true, Some(name), Some(namespace)) => {
                            CliError::NotFound { namespace, name }
                        }
                        _ => CliError::CrdMissing,
                    }
                }
                _ => CliError::Api {
                    access,
                    message: one_line(&status.message),
                },
            },
            kube::Error::HyperError(e) => CliError::Unreachable {
                server: server.to_string(),
                reason: one_line(&error_chain(&e)),
            },
            kube::Error::Service(e) => CliError::Unreachable {
                server: server.to_string(),
                reason: one_line(&error_chain(e.as_ref())),
            },
            other => CliError::Api {
                access,
                message: one_line(&error_chain(&other)),
            },
        }
    }
}

/// An error with its sources, `a: b: c` (the innermost cause is usually the useful part:
/// "connection refused").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Messages are printed on one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::response::StatusDetails;
    use kube::core::Status;

    fn access(name: Option<&str>) -> Access {
        Access {
            verb: "get",
            resource: "vaultconnections",
            namespace: Some("team".into()),
            name: name.map(str::to_string),
        }
    }

    fn api(code: u16, message: &str, details_name: Option<&str>) -> kube::Error {
        kube::Error::Api(Box::new(Status {
            code,
            message: message.into(),
            details: details_name.map(|n| StatusDetails {
                name: n.into(),
                group: "vaultconn.dev".into(),
                kind: "vaultconnections".into(),
                uid: String::new(),
                causes: Vec::new(),
                retry_after_seconds: 0,
            }),
            ..Default::default()
        }))
    }

    #[test]
    fn a_404_naming_the_object_is_not_found_otherwise_the_crd_is_missing() {
        // The API server's answers: a missing object carries its name in `details`; a
        // resource type it does not serve is a bare 404.
        let e = CliError::from_kube(
            api(
                404,
                "vaultconnections.vaultconn.dev \"x\" not found",
                Some("x"),
            ),
            "https://k",
            access(Some("x")),
        );
        assert_eq!(e.exit_code(), exit::NOT_FOUND);
        assert_eq!(
            e.to_string(),
            "VaultConnection team/x not found (list them with `vaultconn status -n team`)"
        );
        let e = CliError::from_kube(
            api(
                404,
                "the server could not find the requested resource",
                None,
            ),
            "https://k",
            access(Some("x")),
        );
        assert!(matches!(e, CliError::CrdMissing), "{e}");
        assert_eq!(e.exit_code(), exit::CLUSTER);
    }

    #[test]
    fn denials_name_what_was_attempted() {
        let e = CliError::from_kube(
            api(
                403,
                "vaultconnections.vaultconn.dev \"x\" is forbidden: User \"u\" cannot get resource",
                None,
            ),
            "https://k",
            access(Some("x")),
        );
        let text = e.to_string();
        assert!(
            text.starts_with("permission denied: cannot get vaultconnections x in namespace team"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        assert_eq!(e.exit_code(), exit::CLUSTER);
        let e = CliError::from_kube(api(401, "Unauthorized", None), "https://k", access(None));
        assert!(e.to_string().contains("rejected the credentials"), "{e}");
    }

    #[test]
    fn every_message_is_one_line() {
        assert_eq!(one_line("a\n  b\tc "), "a b c");
    }
}
