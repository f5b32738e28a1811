//! A `Retry-After` / `x-ratelimit-reset` value.
//! The assertions: `vaultconn::oauth::token::response::fuzz::check_retry_after`, which the unit tests also run through proptest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultconn::oauth::token::response::fuzz::check_retry_after(data));
