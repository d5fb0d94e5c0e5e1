#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| beemesh::fuzz_targets::spdy_header_block(data));
