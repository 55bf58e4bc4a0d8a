//! Returning freed heap to the system. glibc keeps freed memory in its arenas; after a cold start
//! at 10k services (a transient ruleset, transaction and netlink batch of some 150 MiB) the
//! process would keep that as resident memory for good. `malloc_trim` hands it back.
#![allow(unsafe_code)]

/// Releases free heap memory to the system (glibc `malloc_trim(0)`); a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
