#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| botfleet_protocol_fuzz::status(data));
