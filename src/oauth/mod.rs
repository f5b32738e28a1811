//! OAuth 2.0 token lifecycle: the token endpoint client, the refresh schedule, the token state
//! kept in the state Secret, and the refresh-and-persist protocol.
pub mod decide;
pub mod refresh;
pub mod schedule;
pub mod state;
pub mod token;
