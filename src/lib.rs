//! vaultconn: turns `VaultConnection` resources into credential Secrets and keeps OAuth tokens fresh.
//!
//! Where things are: `api` (the CRD types), `catalog` (connection types), `validation`,
//! `secret` (desired Secrets), `status`, `controller` (the reconcile loop), `oauth` (token
//! client, schedule, refresh protocol), `cli` (the command line around the operator).
#![forbid(unsafe_code)]
pub mod api;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod controller;
pub mod crd;
pub mod error;
pub mod events;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod oauth;
pub mod operator;
pub mod reason;
pub mod repair;
pub mod secret;
pub mod secret_index;
pub mod status;
pub mod sync;
pub mod validation;
pub mod writer;

/// Install the one rustls crypto provider (ring) used by both kube and reqwest.
/// Idempotent: a second call is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
