//! Throw-away network namespaces for the netlink backend tests: create, run `nft` inside, open
//! an `NftablesBackend` bound to one, and delete them again even when a test fails.
#![allow(unsafe_code)] // setns(2) for the thread that opens the backend socket.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use kproxy::backend::nftables::{NftError, NftablesBackend};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `kpxnl-<pid>-<n>`; panics with the `ip` error if that fails (tests need root).
    pub fn new() -> Netns {
        let name = format!("kpxnl-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("running ip");
        assert!(
            out.status.success(),
            "ip netns add {name} failed (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    /// Opens a backend whose socket lives in this namespace: a helper thread enters the
    /// namespace (setns only affects the calling thread) and opens the socket there; the socket
    /// stays bound to the namespace wherever it is used afterwards.
    pub fn backend(&self) -> Result<NftablesBackend, NftError> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it changes only this short-lived thread.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            NftablesBackend::new()
        })
        .join()
        .expect("backend thread")
    }

    /// Runs `nft ARGS` in the namespace; Ok(stdout) or Err(stderr).
    pub fn nft(&self, args: &[&str]) -> Result<String, String> {
        let out =
            Command::new("ip").args(["netns", "exec", &self.name, "nft"]).args(args).output().expect("running nft");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Loads an nft script (`nft -f -`).
    pub fn nft_script(&self, script: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running nft -f -");
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("writing the script");
        let out = child.wait_with_output().expect("nft -f");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `nft list table FAMILY kube-proxy`, or "" when the table does not exist.
    pub fn list_table(&self, family: &str) -> String {
        self.nft(&["list", "table", family, "kube-proxy"]).unwrap_or_default()
    }

    /// `nft list ruleset` (everything in the namespace).
    pub fn ruleset(&self) -> String {
        self.nft(&["list", "ruleset"]).expect("nft list ruleset")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
