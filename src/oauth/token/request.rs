//! What is sent: the token request, its form body and client authentication (RFC 6749 §2.3.1,
//! §4.4, §6, Appendix B). Pure: no I/O.
//!
//! `Debug` of [`TokenRequest`] redacts the client id and secret, the refresh token, the URL
//! query and the values of extra parameters.
use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuthMethod {
    /// `client_secret_basic`: HTTP Basic with form-urlencoded id and secret (the default).
    #[default]
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post,
}

/// The grant to run.
#[derive(Debug, Clone)]
pub enum Grant {
    /// `grant_type=client_credentials` (RFC 6749 §4.4).
    ClientCredentials,
    /// `grant_type=refresh_token` with this refresh token (RFC 6749 §6).
    RefreshToken(SecretString),
}

impl Grant {
    pub(super) fn is_refresh(&self) -> bool {
        matches!(self, Grant::RefreshToken(_))
    }
}

/// One token request.
#[derive(Clone)]
pub struct TokenRequest {
    pub token_url: String,
    pub grant: Grant,
    pub client_id: SecretString,
    pub client_secret: SecretString,
    pub auth_method: ClientAuthMethod,
    /// Space-joined into `scope`; omitted when empty.
    pub scopes: Vec<String>,
    /// `audience` (Auth0 and others); client-credentials grant only.
    pub audience: Option<String>,
    /// Additional form parameters. `grant_type`, `refresh_token`, `client_id` and
    /// `client_secret` are ignored, as are `scope`/`audience` when the dedicated fields are set
    /// (RFC 6749 §3.2: parameters must not be repeated).
    pub extra_params: BTreeMap<String, String>,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let grant = match self.grant {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken(_) => "refresh_token",
        };
        f.debug_struct("TokenRequest")
            .field("token_url", &redacted_url(&self.token_url))
            .field("grant", &grant)
            .field("client_id", &"[REDACTED]")
            .field("client_secret", &"[REDACTED]")
            .field("auth_method", &self.auth_method)
            .field("scopes", &self.scopes)
            .field("audience", &self.audience)
            // Values may be secrets (e.g. a client assertion): keys only.
            .field(
                "extra_params",
                &self.extra_params.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A URL for display: scheme, host, port and path only (a query may carry secrets).
fn redacted_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            let q = if u.query().is_some() { "?…" } else { "" };
            format!("{}://{}{}{}{}", u.scheme(), host, port, u.path(), q)
        }
        Err(_) => "<invalid URL>".to_string(),
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 Appendix B).
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The HTTP Basic credentials for `client_secret_basic` (RFC 6749 §2.3.1): id and secret are
/// each form-urlencoded, joined with `:`, then base64-encoded.
pub(super) fn basic_authorization(client_id: &str, client_secret: &str) -> SecretString {
    let joined = format!("{}:{}", form_encode(client_id), form_encode(client_secret));
    let b64 = base64::engine::general_purpose::STANDARD.encode(joined.as_bytes());
    SecretString::from(format!("Basic {b64}"))
}

/// Encoded request: the form body and, for Basic, the `Authorization` value.
pub(super) struct EncodedRequest {
    pub(super) body: SecretString,
    pub(super) authorization: Option<SecretString>,
}

const RESERVED_PARAMS: &[&str] = &["grant_type", "refresh_token", "client_id", "client_secret"];

pub(super) fn encode_request(req: &TokenRequest) -> EncodedRequest {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    match &req.grant {
        Grant::ClientCredentials => {
            form.append_pair("grant_type", "client_credentials");
        }
        Grant::RefreshToken(rt) => {
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", rt.expose_secret());
        }
    }
    let has_scope = !req.scopes.is_empty();
    if has_scope {
        form.append_pair("scope", &req.scopes.join(" "));
    }
    let has_audience = matches!(req.grant, Grant::ClientCredentials) && req.audience.is_some();
    if let (Grant::ClientCredentials, Some(aud)) = (&req.grant, &req.audience) {
        form.append_pair("audience", aud);
    }
    for (k, v) in &req.extra_params {
        let k = k.as_str();
        if RESERVED_PARAMS.contains(&k)
            || (has_scope && k == "scope")
            || (has_audience && k == "audience")
        {
            continue;
        }
        form.append_pair(k, v);
    }
    let authorization = match req.auth_method {
        ClientAuthMethod::Basic => Some(basic_authorization(
            req.client_id.expose_secret(),
            req.client_secret.expose_secret(),
        )),
        ClientAuthMethod::Post => {
            form.append_pair("client_id", req.client_id.expose_secret());
            form.append_pair("client_secret", req.client_secret.expose_secret());
            None
        }
    };
    EncodedRequest {
        body: SecretString::from(form.finish()),
        authorization,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::token::test_support::*;

    #[test]
    fn basic_credentials_are_form_encoded_per_appendix_b() {
        let h = basic_authorization(CLIENT_ID, CLIENT_SECRET);
        let expected =
            base64::engine::general_purpose::STANDARD.encode("m2m+special%2F1:s3cr%3Aet%2B%25%26");
        assert_eq!(h.expose_secret(), format!("Basic {expected}"));
        // Round trip the way a server decodes it.
        let raw = base64::engine::general_purpose::STANDARD
            .decode(h.expose_secret().trim_start_matches("Basic "))
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (id, secret) = raw.split_once(':').unwrap();
        let dec = |s: &str| -> String {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .unwrap()
                .1
                .into_owned()
        };
        assert_eq!(dec(id), CLIENT_ID);
        assert_eq!(dec(secret), CLIENT_SECRET);
        // Non-ASCII is percent-encoded UTF-8.
        let h = basic_authorization("ü", "p w");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(h.expose_secret().trim_start_matches("Basic "))
            .unwrap();
        assert_eq!(raw, b"%C3%BC:p+w");
    }

    #[test]
    fn client_credentials_basic_body() {
        let mut r = cc("https://idp.example/token");
        r.scopes = vec!["read:a".into(), "write b".into()];
        r.audience = Some("https://api.example/".into());
        r.extra_params.insert("organization".into(), "org_1".into());
        let e = encode_request(&r);
        let pairs = form_pairs(e.body.expose_secret());
        assert_eq!(get(&pairs, "grant_type"), ["client_credentials"]);
        assert_eq!(get(&pairs, "scope"), ["read:a write b"]);
        assert_eq!(get(&pairs, "audience"), ["https://api.example/"]);
        assert_eq!(get(&pairs, "organization"), ["org_1"]);
        assert!(get(&pairs, "client_id").is_empty());
        assert!(get(&pairs, "client_secret").is_empty());
        assert!(get(&pairs, "refresh_token").is_empty());
        assert!(e.authorization.is_some());
        assert_eq!(
            e.body.expose_secret(),
            "grant_type=client_credentials&scope=read%3Aa+write+b&audience=https%3A%2F%2Fapi.example%2F&organization=org_1"
        );
    }

    #[test]
    fn client_credentials_post_body() {
        let r = req(
            "https://idp.example/token",
            Grant::ClientCredentials,
            ClientAuthMethod::Post,
        );
        let e = encode_request(&r);
        assert!(e.authorization.is_none(), "never both auth methods");
        let pairs = form_pairs(e.body.expose_secret());
        assert_eq!(get(&pairs, "client_id"), [CLIENT_ID]);
        assert_eq!(get(&pairs, "client_secret"), [CLIENT_SECRET]);
        assert!(get(&pairs, "scope").is_empty(), "empty scope omitted");
        assert!(get(&pairs, "audience").is_empty());
    }

    #[test]
    fn refresh_bodies_for_both_methods() {
        for method in [ClientAuthMethod::Basic, ClientAuthMethod::Post] {
            let mut r = req(
                "https://idp.example/token",
                Grant::RefreshToken(SecretString::from(RT)),
                method,
            );
            r.scopes = vec!["offline_access".into()];
            r.audience = Some("ignored-for-refresh".into());
            let e = encode_request(&r);
            let pairs = form_pairs(e.body.expose_secret());
            assert_eq!(get(&pairs, "grant_type"), ["refresh_token"]);
            assert_eq!(get(&pairs, "refresh_token"), [RT]);
            assert_eq!(get(&pairs, "scope"), ["offline_access"]);
            assert!(get(&pairs, "audience").is_empty());
            match method {
                ClientAuthMethod::Basic => {
                    assert!(e.authorization.is_some());
                    assert!(get(&pairs, "client_secret").is_empty());
                    assert!(get(&pairs, "client_id").is_empty());
                }
                ClientAuthMethod::Post => {
                    assert!(e.authorization.is_none());
                    assert_eq!(get(&pairs, "client_secret"), [CLIENT_SECRET]);
                }
            }
        }
    }

    #[test]
    fn extra_params_cannot_override_reserved() {
        let mut r = req(
            "https://idp.example/token",
            Grant::RefreshToken(SecretString::from(RT)),
            ClientAuthMethod::Basic,
        );
        for k in [
            "grant_type",
            "refresh_token",
            "client_id",
            "client_secret",
            "scope",
        ] {
            r.extra_params.insert(k.into(), "evil".into());
        }
        r.extra_params.insert("resource".into(), "urn:x".into());
        r.scopes = vec!["a".into()];
        let pairs = form_pairs(encode_request(&r).body.expose_secret());
        assert_eq!(get(&pairs, "grant_type"), ["refresh_token"]);
        assert_eq!(get(&pairs, "refresh_token"), [RT]);
        assert_eq!(get(&pairs, "scope"), ["a"]);
        assert!(get(&pairs, "client_id").is_empty());
        assert!(get(&pairs, "client_secret").is_empty());
        assert_eq!(get(&pairs, "resource"), ["urn:x"]);

        // scope/audience from extra params are used when the dedicated fields are empty.
        let mut r = cc("https://idp.example/token");
        r.extra_params.insert("scope".into(), "s".into());
        r.extra_params.insert("audience".into(), "aud".into());
        let pairs = form_pairs(encode_request(&r).body.expose_secret());
        assert_eq!(get(&pairs, "scope"), ["s"]);
        assert_eq!(get(&pairs, "audience"), ["aud"]);
        r.audience = Some("field".into());
        let pairs = form_pairs(encode_request(&r).body.expose_secret());
        assert_eq!(get(&pairs, "audience"), ["field"]);
    }

    #[test]
    fn debug_output_is_redacted() {
        let mut r = refresh("https://idp.example/token?key=QUERYSECRET");
        r.extra_params
            .insert("client_assertion".into(), "ASSERTIONSECRET".into());
        let d = format!("{r:?}");
        for s in [
            CLIENT_SECRET,
            RT,
            CLIENT_ID,
            "QUERYSECRET",
            "ASSERTIONSECRET",
        ] {
            assert!(!d.contains(s), "{s} in {d}");
        }
        assert!(d.contains("idp.example/token"));
        let g = format!("{:?}", Grant::RefreshToken(SecretString::from(RT)));
        assert!(!g.contains(RT));
    }
}
