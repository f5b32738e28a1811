//! `vaultconn validate` on any text.
//! The assertions: `vaultconn::cli::manifest::fuzz::check_manifest`, which the unit tests also run through proptest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultconn::cli::manifest::fuzz::check_manifest(data));
