//! A real, throwaway Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager as child processes that die with their owner.
//!
//! `vaultconn run` starts one when no cluster is configured (behind the binary's default-on
//! `local-cluster` feature); the cluster tests and the benchmark start one per test binary.
//! There, unless told otherwise, [`demo`] also applies one connection of every type, with a
//! small [`demo_token_server`] for the OAuth ones.
pub mod control_plane;
pub mod demo;
pub mod demo_token_server;
pub mod process;

pub use control_plane::{ControlPlane, ControlPlaneError, ControlPlaneOptions};

/// Install the one rustls crypto provider (ring) that kube and reqwest share.
/// Idempotent: a second call is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
