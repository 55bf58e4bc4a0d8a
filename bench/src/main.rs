//! kproxy benchmark driver: synthetic clusters, pure build/diff/render timings, and kernel apply
//! timings through kproxy's netlink backend (run inside a throwaway namespace by `bench/run.sh`).
//!
//! Subcommands (all take `--services N --endpoints M`):
//! - `pure`:   build + full diff + render, and one-endpoint-change build + diff, in memory;
//! - `text`:   print the full transaction (the dry-run script) for `nft -f`;
//! - `delta`:  print the one-endpoint-change transaction script (against `text`'s table);
//! - `undelta`: the reverse of `delta`;
//! - `apply`:  cold start through netlink into the current netns, then repeated one-endpoint
//!   changes; prints timings.
//! - `kube`:   the kproxy daemon against the fake API server in the current netns: event → kernel
//!   latency over `--changes N` endpoint changes, and RSS (`bench/run-kube.sh`; see kube.rs).

use std::time::{Duration, Instant};

use rules::model::*;

mod kube;

struct Args {
    cmd: String,
    services: usize,
    endpoints: usize,
    repeats: usize,
    changes: usize,
    kproxy: Option<std::path::PathBuf>,
    policies: bool,
}

fn args() -> Args {
    let mut a = Args {
        cmd: String::new(),
        services: 1000,
        endpoints: 10,
        repeats: 20,
        changes: 100,
        kproxy: None,
        policies: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--services" => a.services = it.next().and_then(|v| v.parse().ok()).expect("--services N"),
            "--endpoints" => a.endpoints = it.next().and_then(|v| v.parse().ok()).expect("--endpoints M"),
            "--repeats" => a.repeats = it.next().and_then(|v| v.parse().ok()).expect("--repeats R"),
            "--changes" => a.changes = it.next().and_then(|v| v.parse().ok()).expect("--changes N"),
            "--policies" => a.policies = true,
            "--kproxy" => a.kproxy = Some(it.next().expect("--kproxy PATH").into()),
            c if a.cmd.is_empty() => a.cmd = c.to_string(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// A synthetic cluster: mostly ClusterIP, every 10th a NodePort, every 50th with an LB IP, every
/// 20th multi-port (a second port).
///
/// With `policies` (`--policies`), the traffic policies of issue 4 on top: every 10th service
/// (the NodePorts) eTP=Local with a health check node port, every 15th iTP=Local, every 25th
/// ClientIP affinity (10800 s), every 50th (the LB ones) loadBalancerSourceRanges, and every 7th
/// (from the 3rd) zone hints on all its endpoints, alternating zone-a (this node's zone, see
/// `cfg`) and zone-b. Endpoints are on this node ("node-x"), so the local policies have endpoints.
fn cluster(services: usize, endpoints: usize, policies: bool) -> ClusterState {
    let mut st = ClusterState::default();
    for i in 0..services {
        let cip = format!("172.{}.{}.{}", 16 + (i >> 16), (i >> 8) & 255, i & 255);
        let mut ports = vec![("http", 80u16)];
        if i % 20 == 0 {
            ports.push(("https", 443));
        }
        for (pn, port) in ports {
            let mut sp = ServicePort::cluster_ip("bench", &format!("svc-{i}"), pn, Protocol::Tcp, &cip, port);
            if i % 10 == 0 {
                sp = sp.with_node_port(30000 + (i / 10) as u16 * 2 + (port == 443) as u16);
            }
            if i % 50 == 0 {
                sp = sp.with_load_balancer_ip(&format!("198.51.{}.{}", (i >> 8) & 255, i & 255));
            }
            if policies {
                if i % 10 == 0 {
                    sp = sp.with_external_traffic_policy_local().with_health_check_node_port(40000 + (i / 10) as u16);
                }
                if i % 15 == 0 {
                    sp = sp.with_internal_traffic_policy_local();
                }
                if i % 25 == 0 {
                    sp = sp.with_session_affinity(10800);
                }
                if i % 50 == 0 {
                    sp = sp.with_source_range("203.0.113.0/24").with_source_range("192.168.0.0/16");
                }
            }
            let name = sp.name.clone();
            st.add_service(sp);
            for e in 0..endpoints {
                let n = i * endpoints + e;
                let ip = format!("10.{}.{}.{}", 64 + (n >> 16), (n >> 8) & 255, n & 255);
                let mut ep = Endpoint::ready(&ip, 8080).on_node("node-x");
                if policies && i % 7 == 3 {
                    ep = ep.with_zone_hints(&[if e % 2 == 0 { "zone-a" } else { "zone-b" }]);
                }
                st.add_endpoint(&name, ep);
            }
        }
    }
    st
}

fn cfg() -> BuildConfig {
    let mut c = BuildConfig::new(Family::V4);
    c.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").expect("constant"));
    c.node_name = "node-x".into();
    c.node_zone = Some("zone-a".into());
    c
}

/// The same cluster with one more endpoint on service 0, or with `policies` on svc-10 (eTP=Local,
/// a health check node port and zone hints, but no affinity: an affinity service has a chain per
/// endpoint, so adding one is not a data-only change). The new endpoint copies the node and hints
/// of the service's first endpoint.
fn plus_one(st: &ClusterState, policies: bool) -> ClusterState {
    let mut s = st.clone();
    let name = if policies {
        ServicePortName::new("bench", "svc-10", "http", Protocol::Tcp)
    } else {
        s.services.keys().next().expect("a service").clone()
    };
    assert!(s.services[&name].session_affinity_timeout.is_none(), "the change must hit a non-affinity service");
    let mut ep = Endpoint::ready("10.250.0.1", 8080);
    if let Some(first) = s.endpoints.get(&name).and_then(|v| v.first()) {
        ep.node_name = first.node_name.clone();
        ep.zone_hints = first.zone_hints.clone();
    }
    s.add_endpoint(&name, ep);
    s
}

fn node_ips() -> Vec<std::net::IpAddr> {
    vec!["192.168.0.2".parse().expect("constant")]
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

fn main() {
    let a = args();
    if a.cmd == "kube" {
        // The daemon next to this binary unless told otherwise (both in target/release).
        let kproxy = a.kproxy.unwrap_or_else(|| std::env::current_exe().expect("own path").with_file_name("kproxy"));
        kube::run(&kube::Opts { services: a.services, endpoints: a.endpoints, changes: a.changes, kproxy });
        return;
    }
    let st = cluster(a.services, a.endpoints, a.policies);
    let ips = node_ips();
    match a.cmd.as_str() {
        "pure" => {
            let t0 = Instant::now();
            let built = rules::build(&st, &ips, &cfg(), None).ruleset;
            let t1 = Instant::now();
            let tx = rules::diff(None, &built);
            let t2 = Instant::now();
            let text = tx.to_string();
            let t3 = Instant::now();
            let st2 = plus_one(&st, a.policies);
            let mut change = Vec::new();
            for _ in 0..a.repeats {
                let s = Instant::now();
                let b2 = rules::build(&st2, &ips, &cfg(), Some(&built)).ruleset;
                let d = rules::diff(Some(&built), &b2);
                assert!(!d.is_empty());
                change.push(s.elapsed());
            }
            println!(
                "pure services={} endpoints={} policies={} build_ms={:.1} diff_full_ms={:.1} render_ms={:.1} text_mb={:.1} ops={} change_build_diff_p50_ms={:.1}",
                a.services,
                a.endpoints,
                a.policies,
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3,
                (t3 - t2).as_secs_f64() * 1e3,
                text.len() as f64 / 1e6,
                tx.ops.len(),
                pct(&mut change, 0.5)
            );
        }
        "text" => {
            let built = rules::build(&st, &ips, &cfg(), None).ruleset;
            print!("{}", rules::diff(None, &built));
        }
        "delta" => {
            let built = rules::build(&st, &ips, &cfg(), None).ruleset;
            let b2 = rules::build(&plus_one(&st, a.policies), &ips, &cfg(), Some(&built)).ruleset;
            print!("{}", rules::diff(Some(&built), &b2));
        }
        "undelta" => {
            let built = rules::build(&st, &ips, &cfg(), None).ruleset;
            let b2 = rules::build(&plus_one(&st, a.policies), &ips, &cfg(), Some(&built)).ruleset;
            print!("{}", rules::diff(Some(&b2), &built));
        }
        "apply" => {
            let mut be = kproxy::backend::nftables::NftablesBackend::new().expect("netlink socket");
            let t0 = Instant::now();
            let built = rules::build(&st, &ips, &cfg(), None).ruleset;
            let tx = rules::diff(None, &built);
            let t1 = Instant::now();
            be.apply(&tx).expect("cold start apply");
            let t2 = Instant::now();
            let st2 = plus_one(&st, a.policies);
            let b2 = rules::build(&st2, &ips, &cfg(), Some(&built)).ruleset;
            let fwd = rules::diff(Some(&built), &b2);
            let back = rules::diff(Some(&b2), &built);
            let mut kernel = Vec::new();
            let mut total = Vec::new();
            for i in 0..a.repeats {
                let s = Instant::now();
                // Alternate adding and removing the extra endpoint; time build+diff+apply.
                let (from, to_state) = if i % 2 == 0 { (&built, &st2) } else { (&b2, &st) };
                let desired = rules::build(to_state, &ips, &cfg(), Some(from)).ruleset;
                let d = rules::diff(Some(from), &desired);
                let k = Instant::now();
                be.apply(&d).expect("endpoint change apply");
                kernel.push(k.elapsed());
                total.push(s.elapsed());
            }
            let _ = (fwd, back);
            println!(
                "apply services={} endpoints={} policies={} cold_build_diff_ms={:.1} cold_kernel_ms={:.1} cold_total_ms={:.1} change_kernel_p50_ms={:.2} change_kernel_p99_ms={:.2} change_total_p50_ms={:.2} change_total_p99_ms={:.2}",
                a.services,
                a.endpoints,
                a.policies,
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3,
                (t2 - t0).as_secs_f64() * 1e3,
                pct(&mut kernel.clone(), 0.5),
                pct(&mut kernel, 0.99),
                pct(&mut total.clone(), 0.5),
                pct(&mut total, 0.99),
            );
        }
        other => {
            eprintln!("unknown command {other:?}: use pure | text | delta | undelta | apply | kube");
            std::process::exit(2);
        }
    }
}
