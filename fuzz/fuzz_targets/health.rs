#![no_main]
#[path = "../harness/health.rs"] mod harness;
libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
