//! OAuth 2.0 token endpoint client (RFC 6749 §4.4 client credentials, §6 refresh).
//!
//! [`TokenClient::request_token`] sends at most one request and never retries; the caller
//! decides, guided by [`TokenError::class`]. The parts, each depending only on those before it:
//!
//! * `error` — [`TokenError`] and [`ErrorClass`]: why a request failed and how to react.
//! * `url_policy` — which endpoints may be contacted ([`validate_token_url`], forbidden,
//!   loopback and private addresses, the operator's [`TokenUrlPolicy`] allow-list, the
//!   resolver's name and address rules).
//! * `request` — what is sent ([`TokenRequest`], [`Grant`], [`ClientAuthMethod`], form body).
//! * `response` — what came back means ([`TokenResponse`], refresh-token salvage, OAuth errors,
//!   `Retry-After`).
//! * `transport` — the only part that does I/O: [`TokenClient`] over reqwest.
//!
//! The first four are pure.
//!
//! # Secrets
//!
//! Client secret, refresh token and access token live in [`SecretString`](secrecy::SecretString);
//! `Debug` of every type here redacts them; no error message contains a token, a secret, a URL
//! query or a response body. The OAuth `error` code and a sanitized, length-capped
//! `error_description` (server text, with any of the request's secrets blanked out) are the only
//! server text surfaced.
pub mod error;
pub mod request;
pub mod response;
#[cfg(test)]
mod test_support;
pub mod transport;
pub mod url_policy;

pub use error::{ConnectFailure, ErrorClass, LostResponse, TokenError};
pub use request::{ClientAuthMethod, Grant, TokenRequest};
pub use response::{parse_retry_after, TokenResponse, MAX_EXPIRES_IN, MAX_RETRY_AFTER};
pub use transport::{TokenClient, TokenClientConfig};
pub use url_policy::{validate_token_url, AllowEntryError, TokenUrlPolicy, UrlError};
