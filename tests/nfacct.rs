//! nfacct objects over netlink against the kernel: created in a throw-away network namespace,
//! counted by an iptables `-m nfacct` rule, read back. Needs root, `ip`, iptables with xt_nfacct
//! and python3.
#![allow(unsafe_code)] // setns(2) in the helper thread that talks to the namespace's kernel state.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;

use kproxy::backend::nfacct;

/// A network namespace `kpxnf-<pid>-<tag>` with loopback up, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("kpxnf-{}-{tag}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("running ip");
        assert!(out.status.success(), "ip netns add {name} (needs root): {}", String::from_utf8_lossy(&out.stderr));
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]).unwrap();
        ns
    }

    /// Runs a command in the namespace: Ok(stdout) or Err(stderr).
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip").args(["netns", "exec", &self.name]).args(args).output().expect("running ip");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs `f` on a thread that entered the namespace (setns affects only the calling thread).
    fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it changes only this short-lived thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

const SEND_PY: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
for _ in range(int(sys.argv[1])): s.sendto(b'x',('127.0.0.1',9))\n";

#[test]
fn an_ensured_object_counts_the_packets_of_its_iptables_rule() {
    let ns = Netns::new("count");
    let obj = format!("kpxnf-{}-obj", std::process::id());
    // Before it exists, the rule is refused and reading it fails with ENOENT.
    let o = obj.clone();
    let e = ns.inside(move || nfacct::packets(&o)).expect_err("no object yet");
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    let rule = ["iptables", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-m", "nfacct", "--nfacct-name", &obj];
    assert!(ns.run(&rule).is_err(), "xt_nfacct accepted a rule naming a missing object");

    let o = obj.clone();
    ns.inside(move || nfacct::ensure(&o)).expect("creating the object");
    // Ensuring again is fine and keeps the object (and its counters).
    let o = obj.clone();
    ns.inside(move || nfacct::ensure(&o)).expect("ensuring an existing object");
    let o = obj.clone();
    assert_eq!(ns.inside(move || nfacct::packets(&o)).unwrap(), 0);
    ns.run(&rule).expect("the rule, now that the object exists");

    const N: u64 = 7;
    ns.run(&["python3", "-c", SEND_PY, &N.to_string()]).expect("sending");
    let o = obj.clone();
    assert_eq!(ns.inside(move || nfacct::packets(&o)).unwrap(), N, "packets counted by {obj}");
    // ensure() on an object with counts must not reset them (no NLM_F_REPLACE).
    let o = obj.clone();
    ns.inside(move || nfacct::ensure(&o)).unwrap();
    let o = obj.clone();
    assert_eq!(ns.inside(move || nfacct::packets(&o)).unwrap(), N, "ensure reset the counter");
    // Objects belong to the namespace: the host's does not see this one.
    assert_eq!(nfacct::packets(&obj).map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
}

#[test]
fn names_the_kernel_cannot_take_are_refused_before_sending() {
    for bad in ["", "a\0b", &"x".repeat(32)] {
        assert_eq!(nfacct::ensure(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad:?}");
    }
}
