//! Test support for vaultconn, never shipped (`publish = false`, a dev-dependency only).
//!
//! - [`shared`]: one control plane per test binary, a namespace per test, `wait_for`.
//! - [`token_server`]: our fault-injecting OAuth token server (faults a real provider cannot
//!   produce on demand).
//! - [`oidc`]: drives a real OAuth server, panva/oidc-provider, and reads its own record of
//!   what it issued, received and revoked.
//! - [`provider_invariants`]: no replay, no unexplained revocation, a bounded request rate —
//!   checked from a provider's own record (token server or oidc-provider) after every rotation test.
//! - [`api_proxy`]: a fault-injecting proxy in front of the real kube-apiserver (the real one
//!   cannot fail one chosen write on demand).
//! - [`operator`]: the `vaultconn` binary as a child process (kill, restart, logs, metrics).
//! - [`leak_scan`]: every secret value the tests used, searched for in everything the operator
//!   showed or logged, once per test binary at exit.
//! - [`tls_front`]: a TLS listener with a test CA in front of the token server.
//! - `resettable` (internal): the accept loop both fault servers share, whose handlers can
//!   reset their own connection.
//! - [`reliability`]: facts for `docs/RELIABILITY.md`, recorded by the tests that measured them.
pub mod api_proxy;
pub mod leak_scan;
pub mod oidc;
pub mod operator;
pub mod provider_invariants;
pub mod reliability;
mod resettable;
pub mod shared;
pub mod tls_front;
pub mod token_server;

pub use vaultconn_local_cluster::{control_plane, install_crypto_provider, process};

/// The repository root (test support only: a build-machine path is fine here).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
