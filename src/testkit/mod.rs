//! Test and local-run support: a real control plane, the operator as a process, a
//! fault-injecting token server, and a real OAuth server (oidc-provider). Used by `tests/`, the
//! benchmark harness and `vaultconn run`'s embedded mode; none of it is on the reconcile path.
pub mod api_proxy;
pub mod control_plane;
pub mod oidc;
pub mod operator;
pub mod process;
pub mod token_server;
