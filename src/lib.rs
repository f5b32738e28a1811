//! vaultconn: turns `VaultConnection` resources into credential Secrets and keeps OAuth tokens fresh.
pub mod oauth;
pub mod testkit;

/// Install the one rustls crypto provider (ring) used by both kube and reqwest.
/// Idempotent: a second call is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
