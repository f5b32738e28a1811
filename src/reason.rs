//! The one vocabulary of status reasons: each reason's phase, its name in the `Ready`
//! condition (and in `status.lastFailureReason`), and its metric label. The README's reason
//! table is checked against [`Reason::ALL`] by a unit test below.

use std::fmt;

use crate::api::Phase;

/// Why a connection is in its phase. The names are part of the API: alerts, `kubectl wait`
/// and GitOps health checks match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The Secret is up to date (OAuth: holds a valid access token).
    Reconciled,
    /// Credentials Secret or keys missing.
    CredentialsMissing,
    /// The spec is invalid.
    InvalidSpec,
    /// The target or state Secret belongs to something else.
    SecretConflict,
    /// Another writer keeps changing the generated Secret: the repair budget is spent and
    /// repairs wait for a backoff (see `repair`).
    SecretContested,
    /// `spec.suspend` is true.
    Suspended,
    /// A token request failed transiently while the current token is still valid.
    RefreshRetrying,
    /// 5xx / 408 from the token endpoint, and the token has expired.
    TokenEndpointUnavailable,
    /// 429 from the token endpoint, and the token has expired.
    RateLimited,
    /// DNS / connect failure, and the token has expired.
    TokenEndpointUnreachable,
    /// The request was sent but no response arrived, and the token has expired.
    TokenResponseLost,
    /// TLS handshake failure, and the token has expired.
    TlsError,
    /// `invalid_client` or 401.
    InvalidClient,
    /// `invalid_grant` for a refresh token.
    RefreshTokenRejected,
    /// A rotated refresh token's response was lost and the retry was refused.
    RefreshResponseLost,
    /// Any other OAuth rejection (`invalid_scope`, `unauthorized_client`, other 4xx).
    TokenRequestRejected,
    /// A 200 with an unusable body (a refresh token found in it was kept).
    UnparseableTokenResponse,
    /// New tokens were issued; the state Secret write is being retried.
    TokenPersistPending,
    /// A dry run showed the Secret writes would be refused: nothing was requested.
    SecretNotWritable,
    /// The stored access token expired and no new one could be obtained yet.
    TokenExpired,
    /// `caBundleRef` names a missing Secret or key.
    CaBundleMissing,
    /// The CA bundle holds no usable certificate.
    InvalidCaBundle,
    /// No access token has been issued yet (the first request is on its way).
    TokenPending,
    /// This replica does not hold the leader lease.
    NotLeader,
    /// Another writer rotated the stored refresh token meanwhile; it is used next.
    RefreshTokenAdopted,
    /// The token URL breaks the URL rules (checked again at request time).
    InvalidTokenUrl,
    /// The token host is, or resolves only to, a forbidden address.
    ForbiddenTokenEndpoint,
    /// The token host is, or resolves only to, a private network address the operator's
    /// allow-list (`--token-url-allow`) does not include.
    TokenUrlNotAllowed,
    /// The token endpoint answered with a redirect (never followed).
    TokenEndpointRedirected,
    /// The HTTP client for the token endpoint could not be built.
    TokenClientSetupFailed,
    /// The state Secret is gone and the credentials Secret only holds the seed the chain has
    /// already spent: sending it again would be a replay.
    StateLost,
}

impl Reason {
    /// Every reason, in the README table's order.
    pub const ALL: &'static [Reason] = &[
        Reason::Reconciled,
        Reason::CredentialsMissing,
        Reason::InvalidSpec,
        Reason::SecretConflict,
        Reason::SecretContested,
        Reason::Suspended,
        Reason::RefreshRetrying,
        Reason::TokenEndpointUnavailable,
        Reason::RateLimited,
        Reason::TokenEndpointUnreachable,
        Reason::TokenResponseLost,
        Reason::TlsError,
        Reason::InvalidClient,
        Reason::RefreshTokenRejected,
        Reason::RefreshResponseLost,
        Reason::TokenRequestRejected,
        Reason::UnparseableTokenResponse,
        Reason::TokenPersistPending,
        Reason::SecretNotWritable,
        Reason::TokenExpired,
        Reason::CaBundleMissing,
        Reason::InvalidCaBundle,
        Reason::TokenPending,
        Reason::NotLeader,
        Reason::RefreshTokenAdopted,
        Reason::InvalidTokenUrl,
        Reason::ForbiddenTokenEndpoint,
        Reason::TokenUrlNotAllowed,
        Reason::TokenEndpointRedirected,
        Reason::TokenClientSetupFailed,
        Reason::StateLost,
    ];

    /// The name in the `Ready` condition's `reason` and in `status.lastFailureReason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Reconciled => "Reconciled",
            Reason::CredentialsMissing => "CredentialsMissing",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::SecretConflict => "SecretConflict",
            Reason::SecretContested => "SecretContested",
            Reason::Suspended => "Suspended",
            Reason::RefreshRetrying => "RefreshRetrying",
            Reason::TokenEndpointUnavailable => "TokenEndpointUnavailable",
            Reason::RateLimited => "RateLimited",
            Reason::TokenEndpointUnreachable => "TokenEndpointUnreachable",
            Reason::TokenResponseLost => "TokenResponseLost",
            Reason::TlsError => "TLSError",
            Reason::InvalidClient => "InvalidClient",
            Reason::RefreshTokenRejected => "RefreshTokenRejected",
            Reason::RefreshResponseLost => "RefreshResponseLost",
            Reason::TokenRequestRejected => "TokenRequestRejected",
            Reason::UnparseableTokenResponse => "UnparseableTokenResponse",
            Reason::TokenPersistPending => "TokenPersistPending",
            Reason::SecretNotWritable => "SecretNotWritable",
            Reason::TokenExpired => "TokenExpired",
            Reason::CaBundleMissing => "CABundleMissing",
            Reason::InvalidCaBundle => "InvalidCABundle",
            Reason::TokenPending => "TokenPending",
            Reason::NotLeader => "NotLeader",
            Reason::RefreshTokenAdopted => "RefreshTokenAdopted",
            Reason::InvalidTokenUrl => "InvalidTokenUrl",
            Reason::ForbiddenTokenEndpoint => "ForbiddenTokenEndpoint",
            Reason::TokenUrlNotAllowed => "TokenURLNotAllowed",
            Reason::TokenEndpointRedirected => "TokenEndpointRedirected",
            Reason::TokenClientSetupFailed => "TokenClientSetupFailed",
            Reason::StateLost => "StateLost",
        }
    }

    /// The phase a connection shows with this reason.
    pub fn phase(self) -> Phase {
        match self {
            Reason::Reconciled | Reason::RefreshRetrying => Phase::Ready,
            Reason::Suspended => Phase::Suspended,
            Reason::CredentialsMissing
            | Reason::UnparseableTokenResponse
            | Reason::TokenPersistPending
            | Reason::TokenPending
            | Reason::NotLeader
            | Reason::RefreshTokenAdopted => Phase::Pending,
            Reason::InvalidSpec
            | Reason::SecretConflict
            | Reason::SecretContested
            | Reason::TokenEndpointUnavailable
            | Reason::RateLimited
            | Reason::TokenEndpointUnreachable
            | Reason::TokenResponseLost
            | Reason::TlsError
            | Reason::InvalidClient
            | Reason::RefreshTokenRejected
            | Reason::RefreshResponseLost
            | Reason::TokenRequestRejected
            | Reason::SecretNotWritable
            | Reason::TokenExpired
            | Reason::CaBundleMissing
            | Reason::InvalidCaBundle
            | Reason::InvalidTokenUrl
            | Reason::ForbiddenTokenEndpoint
            | Reason::TokenUrlNotAllowed
            | Reason::TokenEndpointRedirected
            | Reason::TokenClientSetupFailed
            | Reason::StateLost => Phase::Failed,
        }
    }

    /// Whether the `Ready` condition is True with this reason.
    pub fn is_ready(self) -> bool {
        self.phase() == Phase::Ready
    }

    /// The `reason` label of the failure metrics: the same fixed set of names, so a dashboard
    /// and `kubectl get` speak one language and the label's cardinality is bounded.
    pub fn metric_label(self) -> &'static str {
        self.as_str()
    }

    /// The reason a status names, if it is one of ours.
    pub fn parse(name: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(reason, phase)` rows of the README's status table. A row may name several reasons,
    /// each in backticks, in its first cell.
    fn readme_rows() -> Vec<(String, String)> {
        let readme = include_str!("../README.md");
        let table = readme
            .split("| reason | phase | meaning | what to do |")
            .nth(1)
            .expect("README has the reason table");
        let mut rows = Vec::new();
        for line in table.lines().skip(2) {
            if !line.starts_with('|') {
                break;
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            for name in cells[1].split('`').skip(1).step_by(2) {
                rows.push((name.to_string(), cells[2].to_string()));
            }
        }
        rows
    }

    #[test]
    fn readme_reason_table_matches_the_type() {
        let rows = readme_rows();
        let documented: Vec<&str> = rows.iter().map(|(r, _)| r.as_str()).collect();
        let defined: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            documented, defined,
            "README reason table and Reason::ALL differ"
        );
        for (name, phase) in &rows {
            let reason = Reason::parse(name).expect("parsed above");
            assert_eq!(
                format!("{:?}", reason.phase()),
                *phase,
                "README phase of {name}"
            );
        }
    }

    #[test]
    fn names_are_unique_and_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
            assert_eq!(r.metric_label(), r.as_str());
        }
        let mut names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    #[test]
    fn only_reconciled_and_retrying_are_ready() {
        let ready: Vec<_> = Reason::ALL.iter().filter(|r| r.is_ready()).collect();
        assert_eq!(ready, [&Reason::Reconciled, &Reason::RefreshRetrying]);
    }
}
