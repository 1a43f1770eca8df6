//! The integration tests' harness is memrelay-testkit (crates/memrelay-testkit),
//! shared with memrelay-chaos; every test file reaches it through
//! `mod support;`.
pub use memrelay_testkit::*;
