//! OAuth 2.0 token lifecycle: the token endpoint client and the refresh schedule.
pub mod client;
pub mod schedule;
