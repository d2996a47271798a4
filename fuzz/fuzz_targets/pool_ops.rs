#![no_main]
#[path = "../harness/pool_ops.rs"] mod harness;
libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
