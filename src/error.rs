//! The controller's error type. Each variant has a fixed category used for logs and metrics.

use std::time::Duration;

use crate::oauth::token::TokenError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("VaultConnection CRD is not served by the API server (install crds/): {0}")]
    CrdNotInstalled(String),
    #[error("will retry: {0}")]
    Retry(String),
    /// The state Secret holds a refresh token other than the one a write was guarded by:
    /// someone else wrote it. Never overwritten blindly.
    #[error("the stored refresh token changed concurrently")]
    StateChanged,
    #[error("token client setup failed: {0}")]
    TokenClient(#[from] TokenError),
    /// This process does not hold the leader lease (any more): it writes nothing.
    #[error("not the leader: writes are fenced")]
    NotLeader,
    #[error(transparent)]
    Leader(#[from] crate::leader::LeaderError),
}

/// How quickly a failed reconcile is retried: exponential with jitter from `min` to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based).
    pub fn delay(self, attempt: u32) -> Duration {
        use backon::BackoffBuilder as _;
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.max)
    }
}

impl Error {
    /// The retry range for this error's category. Denials (401/403) and a broken token client
    /// need a human: back off to minutes. Conflicts and server trouble clear up by themselves.
    pub fn backoff(&self) -> Backoff {
        let secs = |min, max| Backoff {
            min: Duration::from_secs(min),
            max: Duration::from_secs(max),
        };
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => secs(30, 600),
            Error::TokenClient(_) | Error::CrdNotInstalled(_) => secs(30, 600),
            Error::Retry(_) | Error::StateChanged => secs(1, 60),
            Error::Kube(_) | Error::NotLeader | Error::Leader(_) => secs(2, 300),
        }
    }

    /// Bounded label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => "KubeForbidden",
            Error::Kube(_) => "KubeApi",
            Error::CrdNotInstalled(_) => "CrdNotInstalled",
            Error::Retry(_) => "Retry",
            Error::StateChanged => "StateChanged",
            Error::TokenClient(_) => "TokenClient",
            Error::NotLeader => "NotLeader",
            Error::Leader(_) => "LeaderElection",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> Error {
        Error::Kube(kube::Error::Api(Box::new(
            kube::core::Status::failure("x", "y").with_code(code),
        )))
    }

    #[test]
    fn backoff_grows_per_attempt_and_is_capped() {
        let b = Backoff {
            min: Duration::from_secs(2),
            max: Duration::from_secs(300),
        };
        // Jitter adds up to one more base delay: attempt n lies in [min·2^(n-1), 2·that].
        let first = b.delay(1);
        assert!(
            first >= Duration::from_secs(2) && first <= Duration::from_secs(4),
            "{first:?}"
        );
        let fifth = b.delay(5);
        assert!(
            fifth >= Duration::from_secs(32) && fifth <= Duration::from_secs(64),
            "{fifth:?}"
        );
        assert!(b.delay(40) <= Duration::from_secs(600));
        assert!(b.delay(40) >= Duration::from_secs(300));
    }

    #[test]
    fn rbac_denials_back_off_to_minutes_and_blips_to_seconds() {
        let denied = api_error(403);
        assert_eq!(denied.category(), "KubeForbidden");
        assert_eq!(denied.backoff().min, Duration::from_secs(30));
        assert!(denied.backoff().delay(10) >= Duration::from_secs(600));
        let conflict = api_error(409);
        assert_eq!(conflict.category(), "KubeApi");
        assert!(conflict.backoff().delay(1) <= Duration::from_secs(4));
    }
}
