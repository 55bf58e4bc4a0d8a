//! Giving memory back after a large full sync.
//!
//! A cold start at 10k services x 10 endpoints allocates some 200 MiB that is transient (API
//! pages or manifests, the whole ruleset, its transaction and netlink batch), interleaved with the
//! ~60 MiB the process keeps (the model and the stripped ruleset). glibc keeps freed memory in its
//! arenas, and pages holding a single live object cannot be returned, so the process would stay
//! at ~155 MiB resident for good. After such a sync the daemon re-allocates what it keeps
//! (a deep copy made once the transient memory is free is laid out densely, then the scattered
//! original is dropped) and asks both allocators to return every free page: `mi_collect(true)`
//! for the daemon's own heap, which is mimalloc's (src/main.rs; without the forced collection
//! mimalloc kept 118-171 MiB resident at 10k services x 10 endpoints, with it 102-108 MiB), and
//! `malloc_trim` for glibc's, which the C libraries (libnftnl, libmnl) use.
#![allow(unsafe_code)]

/// Releases free heap memory to the system: mimalloc's `mi_collect(true)` and glibc's
/// `malloc_trim(0)` (the latter only where glibc is the C library).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
    // SAFETY: mi_collect takes no pointers; it frees mimalloc's own empty pages and segments.
    unsafe {
        mi_collect(true);
    }
}

// mimalloc's C API (linked through the `mimalloc` crate's libmimalloc-sys).
extern "C" {
    fn mi_collect(force: bool);
}
