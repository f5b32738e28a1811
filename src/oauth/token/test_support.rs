//! Fixtures shared by the unit tests of the token modules: recognisable secrets and a check
//! that none of them leaks into an error.
use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};

use super::request::basic_authorization;
use super::{ClientAuthMethod, Grant, TokenError, TokenRequest};

// Values that must never appear in any error Display/Debug.
pub(super) const CLIENT_ID: &str = "m2m special/1";
pub(super) const CLIENT_SECRET: &str = "s3cr:et+%&";
pub(super) const RT: &str = "rt-SENSITIVE-old-4711";
pub(super) const NEW_RT: &str = "rt-SENSITIVE-new-0815";
pub(super) const AT: &str = "at-SENSITIVE-9f8e7d";
const SECRETS: &[&str] = &[CLIENT_SECRET, RT, NEW_RT, AT];

pub(super) fn assert_clean(err: &TokenError) {
    let shown = format!("{err} || {err:?}");
    for s in SECRETS {
        assert!(!shown.contains(s), "secret {s:?} leaked in {shown}");
    }
    let b64 = basic_authorization(CLIENT_ID, CLIENT_SECRET);
    let b64 = b64.expose_secret().trim_start_matches("Basic ");
    assert!(!shown.contains(b64), "basic credentials leaked in {shown}");
    assert!(!err.to_string().contains('<'), "markup in {err}");
    for tag in ["<html", "<body", "<h1", "<pre", "<b>"] {
        assert!(!shown.contains(tag), "markup in {shown}");
    }
}

pub(super) fn req(url: &str, grant: Grant, method: ClientAuthMethod) -> TokenRequest {
    TokenRequest {
        token_url: url.to_string(),
        grant,
        client_id: SecretString::from(CLIENT_ID),
        client_secret: SecretString::from(CLIENT_SECRET),
        auth_method: method,
        scopes: vec![],
        audience: None,
        extra_params: BTreeMap::new(),
    }
}

pub(super) fn cc(url: &str) -> TokenRequest {
    req(url, Grant::ClientCredentials, ClientAuthMethod::Basic)
}

pub(super) fn refresh(url: &str) -> TokenRequest {
    req(
        url,
        Grant::RefreshToken(SecretString::from(RT)),
        ClientAuthMethod::Basic,
    )
}

pub(super) fn form_pairs(body: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub(super) fn get<'a>(pairs: &'a [(String, String)], k: &str) -> Vec<&'a str> {
    pairs
        .iter()
        .filter(|(kk, _)| kk == k)
        .map(|(_, v)| v.as_str())
        .collect()
}
