#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| beemesh::fuzz_targets::raft_frames(data));
