//! Giving memory back after a large full sync.
//!
//! A cold start at 10k services x 10 endpoints allocates some 200 MiB that is transient (API
//! pages or manifests, the whole ruleset, its transaction and netlink batch), interleaved with the
//! ~60 MiB the process keeps (the model and the stripped ruleset). glibc keeps freed memory in its
//! arenas, and pages holding a single live object cannot be returned, so the process would stay
//! at ~155 MiB resident for good. After such a sync the daemon re-allocates what it keeps
//! (a deep copy made once the transient memory is free is laid out densely, then the scattered
//! original is dropped) and calls `malloc_trim`, which returns every free page. The daemon's own
//! heap is mimalloc's (src/main.rs), which gives freed pages back by itself shortly after; what
//! `malloc_trim` still returns is glibc's heap, which the C libraries (libnftnl, libmnl) use.
#![allow(unsafe_code)]

/// Releases free heap memory to the system (glibc `malloc_trim(0)`); a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
