#![no_main]

#[path = "../session_check.rs"]
mod session_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| session_check::session(data));
