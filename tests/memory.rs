//! An agent hands back to its host the memory it freed (`agent::memory`). In a process of
//! its own: the figures are this process's resident memory.

mod common;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn memory_freed_between_blocks_in_use_goes_back_to_the_host() {
    const BLOCKS: usize = 4096;
    const BLOCK: usize = 16 * 1024;
    // 64 MiB in blocks below the allocator's mmap threshold, each followed by a small
    // block that stays, as a closed connection's buffers sit between what lives on:
    // freeing the large ones leaves holes that free() alone never gives back.
    let mut large = Vec::with_capacity(BLOCKS);
    let mut kept = Vec::with_capacity(BLOCKS);
    for i in 0..BLOCKS {
        large.push(vec![1u8; BLOCK]);
        kept.push(Box::new(i));
    }
    drop(large);
    let before = common::memory_kib(std::process::id(), "RssAnon");
    assert!(
        beemesh::agent::memory::return_freed(),
        "nothing was returned"
    );
    let after = common::memory_kib(std::process::id(), "RssAnon");
    assert!(
        before.saturating_sub(after) >= 32 * 1024,
        "64 MiB freed, only {} KiB returned ({before} KiB resident before, {after} after)",
        before.saturating_sub(after)
    );
    // In use until here.
    drop(kept);
}
