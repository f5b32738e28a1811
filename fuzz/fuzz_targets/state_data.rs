//! A state Secret's data as anything may have left it.
//! The assertions: `vaultconn::oauth::state::fuzz::check_state_data`, which the unit tests also run through proptest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultconn::oauth::state::fuzz::check_state_data(data));
