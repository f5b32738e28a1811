//! A token endpoint response (status, headers, body, how it ended).
//! The assertions: `vaultconn::oauth::token::response::fuzz::check_token_response`, which the unit tests also run through proptest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultconn::oauth::token::response::fuzz::check_token_response(data));
