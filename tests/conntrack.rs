//! Privileged tests of UDP conntrack cleanup over ctnetlink (cases 102, 103, 106): real flows in
//! network namespaces (tests/support/topo.rs), a hand-written DNAT standing in for kproxy's rules,
//! and `ConntrackCleaner` deleting exactly the stale flows. Needs root.
#![allow(unsafe_code)] // setns(2) for the thread that opens the cleaner's socket.

#[path = "support/topo.rs"]
mod topo;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kproxy::backend::conntrack::ConntrackCleaner;
use rules::conntrack::StaleUdpFlows;
use rules::model::{ClusterState, Endpoint, Family, Protocol, ServicePort};
use topo::*;

struct OnePort {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl OnePort {
    fn start(t: &Topo, ip: &str, port: u16) -> OnePort {
        let mut child = t
            .cmd(Host::Pod(Pod::Client), "python3")
            .args(["-c", ONE_PORT_PY, ip, &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        OnePort { child, lines }
    }

    /// Waits until `n` answers in a row came from `who` ("-" = no answer); returns how long.
    fn until(&self, who: &str, n: usize, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut run = 0;
        let mut last = Vec::new();
        while start.elapsed() < limit {
            let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) else { continue };
            run = if l == who { run + 1 } else { 0 };
            last.push(l);
            if run >= n {
                return start.elapsed();
            }
        }
        panic!(
            "no {n} answers in a row from {who} within {limit:?}; last: {:?}",
            &last[last.len().saturating_sub(20)..]
        );
    }
}

impl Drop for OnePort {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a cleaner whose socket lives in the topology's node namespace.
fn cleaner(t: &Topo) -> ConntrackCleaner {
    let path = format!("/run/netns/{}", t.ns(Host::Node));
    std::thread::spawn(move || {
        let f = File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd; it changes only this short-lived thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        ConntrackCleaner::new().expect("ctnetlink socket")
    })
    .join()
    .unwrap()
}

fn dnat_table(udp: &[(&str, Pod)], tcp: &[(&str, Pod)]) -> String {
    let mut s =
        String::from("table ip ct-test {\n chain pre {\n  type nat hook prerouting priority dstnat; policy accept;\n");
    for (ip, p) in udp {
        s += &format!("  ip daddr {ip} udp dport 53 dnat to {}:{ECHO_UDP}\n", p.ip());
    }
    for (ip, p) in tcp {
        s += &format!("  ip daddr {ip} tcp dport 80 dnat to {}:{ECHO_TCP}\n", p.ip());
    }
    s + " }\n}\n"
}

fn load(t: &Topo, script: &str) {
    let mut c = t.cmd(Host::Node, "nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(format!("flush ruleset\n{script}").as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "nft refused:\n{script}");
}

fn state(cip: &str, eps: &[Pod]) -> ClusterState {
    let mut st = ClusterState::default();
    let sp = ServicePort::cluster_ip("default", "dns", "dns", Protocol::Udp, cip, 53);
    st.add_service(sp.clone());
    for p in eps {
        st.add_endpoint(&sp.name, Endpoint::ready(&p.ip().to_string(), ECHO_UDP));
    }
    st
}

fn conntrack_count(t: &Topo, args: &[&str]) -> usize {
    // The conntrack tool only checks the outcome here; the code under test never runs it.
    let out = t.cmd(Host::Node, "conntrack").arg("-L").args(args).stderr(Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Case 102: a UDP client keeps one flow to a ClusterIP; its endpoint b1 is replaced by b2.
/// The flow stays pinned to b1 (still running, so answering) until the cleaner deletes it, then
/// the next datagram is DNATed to b2, within 2 s. Case 106: a TCP flow to the same ClusterIP
/// is left alone. Case 103: a flow from before the service had endpoints (not DNATed) goes too.
#[test]
fn stale_udp_flows_are_deleted_and_traffic_moves_on() {
    let t = Topo::new();
    let (cip, cip2) = ("172.30.98.1", "172.30.98.2");
    load(&t, &dnat_table(&[(cip, Pod::B1)], &[(cip, Pod::B1)]));
    let mut ct = cleaner(&t);

    let udp = OnePort::start(&t, cip, 53);
    udp.until("b1", 5, Duration::from_secs(5));
    let tcp = t.prober(Host::Pod(Pod::Client)).one(Proto::Tcp, cip.parse().unwrap(), 80, Duration::from_secs(1));
    assert_eq!(tcp.backend(), Some("b1"), "{tcp:?}");
    let tcp_before = conntrack_count(&t, &["-p", "tcp", "-d", cip]);
    assert!(tcp_before >= 1, "the TCP flow must be in the table");

    // The "sync": b1 is no longer an endpoint. Without cleanup the flow stays on b1.
    load(&t, &dnat_table(&[(cip, Pod::B2)], &[(cip, Pod::B2)]));
    udp.until("b1", 10, Duration::from_secs(2));
    let since = Instant::now();
    let deleted =
        ct.clean_stale_udp(Family::V4, &StaleUdpFlows::from_state(&state(cip, &[Pod::B2]), Family::V4)).unwrap();
    assert_eq!(deleted, 1, "exactly the client's flow");
    udp.until("b2", 5, Duration::from_secs(2));
    eprintln!("UDP flow moved to b2 {:?} after the cleanup", since.elapsed());
    assert!(since.elapsed() < Duration::from_secs(2));
    assert_eq!(conntrack_count(&t, &["-p", "tcp", "-d", cip]), tcp_before, "TCP flows are never touched");
    // Nothing stale left: a second pass deletes nothing.
    assert_eq!(
        ct.clean_stale_udp(Family::V4, &StaleUdpFlows::from_state(&state(cip, &[Pod::B2]), Family::V4)).unwrap(),
        0
    );
    drop(udp);

    // Case 103: no endpoint yet, the datagrams go un-DNATed (and unanswered) ...
    let early = OnePort::start(&t, cip2, 53);
    early.until("-", 3, Duration::from_secs(5));
    // ... the service gets b1; the old un-NATed flow keeps bypassing the new DNAT ...
    load(&t, &dnat_table(&[(cip, Pod::B2), (cip2, Pod::B1)], &[]));
    early.until("-", 5, Duration::from_secs(2));
    // ... until the cleanup deletes it.
    let deleted =
        ct.clean_stale_udp(Family::V4, &StaleUdpFlows::from_state(&state(cip2, &[Pod::B1]), Family::V4)).unwrap();
    assert_eq!(deleted, 1);
    early.until("b1", 5, Duration::from_secs(2));
}
