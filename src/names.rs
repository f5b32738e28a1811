//! Fixed names: labels, annotations, the field manager, derived object names.

/// Field manager for every write the operator makes.
pub const FIELD_MANAGER: &str = "vaultconn";
/// `reportingController` of Events.
pub const CONTROLLER_NAME: &str = "vaultconn.dev/controller";

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "vaultconn";
/// Selector for every Secret the operator writes.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=vaultconn";
/// `output` for the Secret workloads mount, `state` for the refresh-token state Secret.
pub const ROLE_LABEL: &str = "vaultconn.dev/secret-role";
pub const ROLE_OUTPUT: &str = "output";
pub const ROLE_STATE: &str = "state";

/// Name of the VaultConnection a managed Secret belongs to (annotation: names can exceed 63 chars).
pub const CONNECTION_ANNOTATION: &str = "vaultconn.dev/connection";
/// UID of that VaultConnection; the ownership check compares it.
pub const CONNECTION_UID_ANNOTATION: &str = "vaultconn.dev/connection-uid";
/// SHA-256 of the desired content; lets a reconcile see "unchanged" from Secret metadata alone.
pub const CONTENT_HASH_ANNOTATION: &str = "vaultconn.dev/content-hash";
/// `kubectl annotate vconn X vaultconn.dev/refresh-requested-at=$(date +%s)` forces one refresh.
pub const REFRESH_REQUESTED_ANNOTATION: &str = "vaultconn.dev/refresh-requested-at";

/// The Secret holding an OAuth connection's current refresh token (operator state).
pub fn state_secret_name(connection: &str) -> String {
    let mut name = format!("{connection}-vaultconn-state");
    if name.len() > 253 {
        // Keep it a valid name for very long connection names: truncate and add a hash suffix.
        let digest = sha256_hex(connection.as_bytes());
        // A cut right after a dot would start the next label with "-" (an invalid name the
        // API server refuses); a valid name has no "..", so one dot is all there can be.
        let cut = connection[..200].trim_end_matches('.');
        name = format!("{cut}-{}-vaultconn-state", &digest[..16]);
    }
    name
}

pub fn auth0_token_url(domain: &str) -> String {
    format!("https://{domain}/oauth/token")
}

/// Hex SHA-256: content hashes, fingerprints of tokens (never the tokens themselves) and
/// hash suffixes of long names.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1123 subdomain, as the API server checks Secret names.
    fn valid_secret_name(s: &str) -> bool {
        s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    }

    #[test]
    fn state_secret_names_are_valid_secret_names_for_every_valid_connection_name() {
        assert_eq!(state_secret_name("crm"), "crm-vaultconn-state");
        // Every place a dot can take around the cut, and the longest names.
        for dot in 190..210 {
            for len in [238, 240, 253] {
                let mut name: Vec<u8> = vec![b'a'; len];
                name[dot] = b'.';
                let name = String::from_utf8(name).unwrap();
                let state = state_secret_name(&name);
                assert!(valid_secret_name(&state), "{name} -> {state}");
            }
        }
        // Names that were already valid keep their state Secret.
        let long = "a".repeat(240);
        assert_eq!(
            state_secret_name(&long),
            format!(
                "{}-{}-vaultconn-state",
                &long[..200],
                &sha256_hex(long.as_bytes())[..16]
            )
        );
    }
}
