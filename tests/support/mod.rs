//! Shared test support, included by each test file with `mod support;`: the per-binary control
//! plane and namespaces come from `vaultconn_testkit::shared`; object builders and the operator
//! process (the shared one, and a test's own) are specific to the product's tests.
#[allow(unused_imports)]
pub use vaultconn_testkit::shared::*;

pub mod corpus;
pub mod objects;
pub mod operator;
pub mod own_operator;
