#![no_main]
#[path = "../harness/promtext.rs"] mod harness;
libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
