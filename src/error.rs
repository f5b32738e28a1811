//! The controller's error type. Each variant has a fixed category used for logs and metrics.

use crate::oauth::token::TokenError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("VaultConnection CRD is not served by the API server (install crds/): {0}")]
    CrdNotInstalled(String),
    #[error("will retry: {0}")]
    Retry(String),
    #[error("token client setup failed: {0}")]
    TokenClient(#[from] TokenError),
}

impl Error {
    /// Bounded label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::CrdNotInstalled(_) => "CrdNotInstalled",
            Error::Retry(_) => "Retry",
            Error::TokenClient(_) => "TokenClient",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
