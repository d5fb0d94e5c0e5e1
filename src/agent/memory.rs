//! Gives the memory an agent has freed back to its host.
//!
//! glibc's allocator keeps what a process frees for its next allocation, and gives the
//! system back only the free memory at the top of a heap. An agent's start opens a
//! connection to every peer discovery finds and closes them once they are idle; what
//! they held stays in the agent's heaps, between blocks still in use, for as long as the
//! agent runs: a quarter of an idle agent's own memory among 20 agents. An agent runs on
//! a host that may be someone else's, so it hands that back: `malloc_trim` releases the
//! free pages of every heap.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the agent returns what it freed: often enough that a host sees it soon
/// after the mesh's idle connections close (60 s after the start's discovery).
const RETURN_INTERVAL: Duration = Duration::from_secs(30);

/// Returns freed memory every [`RETURN_INTERVAL`] until `cancel`.
pub async fn keep_returning_freed(cancel: CancellationToken) {
    let mut every = tokio::time::interval(RETURN_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: nothing has been freed yet.
    every.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {
                let returned = return_freed();
                tracing::trace!(returned, "freed memory returned to the host");
            }
        }
    }
}

/// Hands the free pages of the process's heaps back to the system; says whether there
/// were any. Other allocators and C libraries give back on their own: nothing to do.
pub fn return_freed() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the allocator's own locks and only releases pages
        // that no allocation holds; it has no other precondition.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
