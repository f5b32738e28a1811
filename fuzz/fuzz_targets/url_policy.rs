//! A `--token-url-allow` list and a token URL.
//! The assertions: `vaultconn::oauth::token::url_policy::fuzz::check_url_policy`, which the unit tests also run through proptest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultconn::oauth::token::url_policy::fuzz::check_url_policy(data));
