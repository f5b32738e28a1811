//! An RFC 3339 time of the state Secret, and a `renewBefore` duration.
//! The assertions: `vaultconn::oauth::state::fuzz::check_time`, which the unit tests also run through proptest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultconn::oauth::state::fuzz::check_time(data));
