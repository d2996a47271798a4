#![no_main]
#[path = "../harness/http1_chunked.rs"] mod harness;
libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
