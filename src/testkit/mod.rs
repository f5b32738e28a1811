//! Test and local-run support: a real control plane, a fault-injecting token server, and a real
//! OAuth server (oidc-provider). Used by `tests/`, the benchmark harness and `vaultconn run`'s
//! embedded mode; none of it is on the operator's reconcile path.
pub mod control_plane;
pub mod oidc;
pub mod token_server;
