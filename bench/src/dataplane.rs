//! Data-plane probe: first-packet latency through DNAT, as upstream's nftables blog measured it
//! (the time to the first reply of a new connection, whose SYN walks the nat chains).
//!
//! `serve` listens in the server namespace and closes every accepted connection at once (the
//! server keeps the TIME_WAIT, so the client's ports free up). `connect` opens `count` sequential
//! TCP connections to a ClusterIP:port from the node namespace and times each `connect()`, which
//! returns when the SYN-ACK arrives: the SYN goes through `nat-output` (kproxy's or upstream's
//! service dispatch and DNAT, or iptables' `KUBE-SERVICES` walk), the SYN-ACK through the reverse
//! NAT. Every connection is new (a new source port), so every SYN is a first packet. The first 100
//! are a warm-up and not counted.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const WARMUP: usize = 100;

pub fn serve(port: u16) {
    let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| panic!("listen on :{port}: {e}"));
    println!("listening on :{port}");
    let _ = std::io::stdout().flush();
    for s in l.incoming() {
        drop(s);
    }
}

pub fn connect(target: SocketAddr, count: usize) {
    let mut lat = Vec::with_capacity(count);
    let mut failures = 0usize;
    let mut first_error = None;
    for i in 0..WARMUP + count {
        let t = Instant::now();
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(s) => {
                let d = t.elapsed();
                drop(s);
                if i >= WARMUP {
                    lat.push(d);
                }
            }
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e.to_string());
                if failures > 20 {
                    break;
                }
            }
        }
    }
    lat.sort();
    let p = |q: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6
        }
    };
    println!(
        "connect target={target} count={} failures={failures} p50_us={:.1} p90_us={:.1} p99_us={:.1} first_error={:?}",
        lat.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        first_error.unwrap_or_default()
    );
}
