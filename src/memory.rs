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

/// Drops `value` on a thread of its own (`kproxy-free`), so that freeing a large structure does
/// not hold up the caller; here, if no thread can be started, which is only slower.
pub fn drop_elsewhere<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new().name("kproxy-free".into()).spawn(move || drop(value));
}

/// Runs `f` on a new thread and returns what it made. The thread's allocator heap starts empty,
/// so a copy made there fills fresh pages one after another, instead of the holes left in the
/// calling thread's pages by everything a cold start allocated and freed; when the original is
/// then dropped, whole pages fall empty and can be returned. (Which holes a copy made in place
/// lands in depends on the whole history of the heap: reading the manifests differently moved
/// the resident set after start-up at 50k Services by 5 MiB.)
pub fn on_fresh_heap<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let mut f = Some(f);
    let made = std::thread::scope(|s| {
        let run = || (f.take().expect("runs once"))();
        std::thread::Builder::new().name("kproxy-compact".into()).spawn_scoped(s, run).map(|h| h.join())
    });
    match made {
        Ok(Ok(t)) => t,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        // No thread to be had (a pids limit): the copy is made here, laid out less well.
        Err(_) => (f.take().expect("not run"))(),
    }
}

/// `mi_option_arena_eager_commit`'s place in mimalloc's `mi_option_t` (libmimalloc-sys 0.1.49
/// builds mimalloc v3: show_errors, show_stats, verbose, deprecated_eager_commit,
/// arena_eager_commit). libmimalloc-sys does not export it; a test below checks in a child
/// process that this number is the option mimalloc reads from `MIMALLOC_ARENA_EAGER_COMMIT`.
const MI_OPTION_ARENA_EAGER_COMMIT: i32 = 4;

/// Sets mimalloc up for a long-running daemon, before its first allocation (it runs as an ELF
/// constructor, below): arenas are committed on demand instead of eagerly (the default on Linux),
/// so memory freed after a cold start is decommitted when purged, not kept resident. At 10k
/// services x 10 endpoints: resident after start-up 64 → 55 MiB, idle 18 → 9 MiB. Setting it in
/// `main` is too late: Rust's runtime allocates first, and the first allocation makes the arena.
/// `MIMALLOC_ARENA_EAGER_COMMIT` in the environment, when set, wins.
pub fn configure_allocator() {
    // SAFETY: getenv reads the environment with a NUL-terminated name and allocates nothing (this
    // runs before the allocator is set up); mi_option_set takes an option number and a value.
    unsafe {
        if libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

/// [`configure_allocator`] as an ELF constructor, in every program linking this crate (the daemon,
/// the benches, the tests): it must run before the first allocation, which makes mimalloc's first
/// arena.
#[used]
#[link_section = ".init_array"]
static CONFIGURE_ALLOCATOR: extern "C" fn() = {
    extern "C" fn run() {
        configure_allocator();
    }
    run
};

// mimalloc's C API (linked through the `mimalloc` crate's libmimalloc-sys; named here so that
// binaries without mimalloc as their allocator, such as the unit tests, link it too).
use mimalloc as _;
extern "C" {
    fn mi_collect(force: bool);
    fn mi_option_set(option: i32, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: i32) -> std::ffi::c_long;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_heap_is_another_thread_and_its_result_comes_back() {
        let here = std::thread::current().id();
        let (id, name, v) = on_fresh_heap(|| {
            let t = std::thread::current();
            (t.id(), t.name().map(str::to_string), vec![1u8; 4096])
        });
        assert_ne!(id, here);
        assert_eq!(name.as_deref(), Some("kproxy-compact"));
        assert_eq!(v.len(), 4096);
        let caught = std::panic::catch_unwind(|| on_fresh_heap(|| -> u8 { panic!("the copy failed") }));
        let payload = caught.expect_err("the panic comes back");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"the copy failed"), "with its own message");
    }

    fn option() -> std::ffi::c_long {
        // SAFETY: reads an option by number.
        unsafe { mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT) }
    }

    #[test]
    fn the_constructor_turned_eager_arena_commit_off() {
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            assert_eq!(option(), 0);
        }
    }

    /// Option number 4 is the one mimalloc names `arena_eager_commit`: in a child process with
    /// `MIMALLOC_ARENA_EAGER_COMMIT=7` (which the constructor leaves alone), it reads 7.
    #[test]
    fn option_four_is_arena_eager_commit() {
        if std::env::var_os("KPROXY_TEST_MI_CHILD").is_some() {
            println!("option={}", option());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "memory::tests::option_four_is_arena_eager_commit", "--nocapture", "--test-threads=1"])
            .env("KPROXY_TEST_MI_CHILD", "1")
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "7")
            .output()
            .expect("child test process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("option=7"), "child printed: {stdout}");
    }
}
