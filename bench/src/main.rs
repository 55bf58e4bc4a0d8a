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
//! - `svc-add` / `svc-del`: kproxy's transaction adding / deleting one more service (`svc-new`)
//!   against `text`'s table;
//! - `upstream-text`, `upstream-delta`, `upstream-undelta`, `upstream-svc-add`, `upstream-svc-del`:
//!   the same five scripts in upstream kube-proxy's nftables layout (see upstream_nft.rs);
//! - `ipt-text`, `ipt-delta`, `ipt-undelta`: upstream's iptables-mode `iptables-restore` input
//!   (rules::iptables) for the cluster and the one-endpoint change; `ipt-jumps`: its jump rules;
//! - `load`: kproxy's cold start alone; `daemon-cold`: the daemon from `--manifests` (kube.rs);
//! - `memory`: the daemon's kept memory after a first sync, by component, in allocated bytes;
//! - `manifests --dir D`: the cluster as Service and EndpointSlice YAML for `kproxy --manifests`;
//! - `serve --port P` / `connect --target IP:PORT --count N`: the data-plane listener and the
//!   first-packet (TCP connect) latency client (see dataplane.rs).

/// The daemon's allocator (src/main.rs), so in-process timings match the daemon's.
/// Wrapped so that `memory` can count live bytes (free while it does not).
#[global_allocator]
static GLOBAL: memory::Counting = memory::Counting;

use std::time::{Duration, Instant};

use rules::model::*;

mod dataplane;
mod kube;
mod memory;
mod upstream_nft;

struct Args {
    cmd: String,
    services: usize,
    endpoints: usize,
    repeats: usize,
    changes: usize,
    kproxy: Option<std::path::PathBuf>,
    policies: bool,
    dir: Option<std::path::PathBuf>,
    port: u16,
    target: Option<String>,
    count: usize,
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
        dir: None,
        port: 8080,
        target: None,
        count: 2000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            // Everything after `--` is for the program the bench starts (`daemon-cold`).
            "--" => break,
            "--services" => a.services = it.next().and_then(|v| v.parse().ok()).expect("--services N"),
            "--endpoints" => a.endpoints = it.next().and_then(|v| v.parse().ok()).expect("--endpoints M"),
            "--repeats" => a.repeats = it.next().and_then(|v| v.parse().ok()).expect("--repeats R"),
            "--changes" => a.changes = it.next().and_then(|v| v.parse().ok()).expect("--changes N"),
            "--policies" => a.policies = true,
            "--kproxy" => a.kproxy = Some(it.next().expect("--kproxy PATH").into()),
            "--dir" => a.dir = Some(it.next().expect("--dir PATH").into()),
            "--port" => a.port = it.next().and_then(|v| v.parse().ok()).expect("--port P"),
            "--target" => a.target = Some(it.next().expect("--target IP:PORT")),
            "--count" => a.count = it.next().and_then(|v| v.parse().ok()).expect("--count N"),
            c if a.cmd.is_empty() => a.cmd = c.to_string(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn cfg() -> BuildConfig {
    let mut c = BuildConfig::new(Family::V4);
    c.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").expect("constant"));
    c.node_name = "node-x".into();
    c.node_zone = Some("zone-a".into());
    c
}

/// kproxy's iptables mode per sync, in the current (throwaway) namespace: what
/// `IptablesProxier` does for a family, without the canary and leftover checks. Cold start: build
/// the whole ruleset and `iptables-restore --noflush` the full text. One-endpoint change (and back,
/// alternately): rebuild, render the partial restore (only the changed service chains) and
/// restore it. Both timed whole and restore-only.
fn ipt_apply(a: &Args, st: &ClusterState, ips: &[std::net::IpAddr], c: &BuildConfig) {
    let restore = |text: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new("iptables-restore")
            .args(["-w", "5", "--noflush", "--counters"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-restore");
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write the restore input");
        assert!(child.wait().expect("iptables-restore").success(), "iptables-restore failed");
    };
    let t0 = Instant::now();
    let mut cur = rules::iptables::build(st, ips, c, false).ruleset;
    let text = rules::iptables::restore_input(&cur, None);
    let t1 = Instant::now();
    restore(&text);
    let t2 = Instant::now();
    let other = plus_one(st, a.policies);
    let (mut kernel, mut total) = (Vec::new(), Vec::new());
    for i in 0..a.repeats {
        let to = if i % 2 == 0 { &other } else { st };
        let s = Instant::now();
        let next = rules::iptables::build(to, ips, c, false).ruleset;
        let text = rules::iptables::restore_input(&next, Some(&cur));
        let k = Instant::now();
        restore(&text);
        kernel.push(k.elapsed());
        total.push(s.elapsed());
        cur = next;
    }
    println!(
        "ipt_apply services={} endpoints={} policies={} cold_build_ms={:.1} cold_restore_ms={:.1} \
         change_restore_p50_ms={:.1} change_restore_p99_ms={:.1} change_total_p50_ms={:.1} change_total_p99_ms={:.1}",
        a.services,
        a.endpoints,
        a.policies,
        ms(t1 - t0),
        ms(t2 - t1),
        pct(&mut kernel, 0.5),
        pct(&mut kernel, 0.99),
        pct(&mut total, 0.5),
        pct(&mut total, 0.99),
    );
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
        ep.placement = first.placement.clone();
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

/// The service `svc-add` / `svc-del` add and remove: one ClusterIP port with `endpoints` endpoints,
/// outside every range `rules::synthetic::cluster` uses.
fn plus_service(st: &ClusterState, endpoints: usize) -> (ClusterState, ServicePortName) {
    let mut s = st.clone();
    let sp = ServicePort::cluster_ip("bench", "svc-new", "http", Protocol::Tcp, "172.31.255.254", 80);
    let name = sp.name.clone();
    s.add_service(sp);
    for e in 0..endpoints.max(1) {
        s.add_endpoint(&name, Endpoint::ready(&format!("10.251.0.{}", e + 1), 8080).on_node("node-x"));
    }
    (s, name)
}

fn upstream_cfg<'a>(
    st: &'a ClusterState,
    c: &'a BuildConfig,
    ips: &'a [std::net::IpAddr],
) -> upstream_nft::Upstream<'a> {
    upstream_nft::Upstream {
        cluster_cidr: c.cluster_cidr,
        node_name: &c.node_name,
        node_zone: c.node_zone.as_deref(),
        nodeport_ips: ips,
        service_cidrs: &st.service_cidrs,
        masquerade_all: c.masquerade_all,
    }
}

/// Peak RSS (VmHWM, MiB) and CPU seconds (user + system) of this process so far.
fn self_usage() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |k| k / 1024.0);
    // Fields 14 and 15 of /proc/self/stat (after the parenthesised command name), in clock ticks;
    // USER_HZ is 100 on every Linux ABI.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (hwm, (ticks(11) + ticks(12)) / 100.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let a = args();
    match a.cmd.as_str() {
        "kube" => {
            // The daemon next to this binary unless told otherwise (both in target/release).
            let kproxy =
                a.kproxy.unwrap_or_else(|| std::env::current_exe().expect("own path").with_file_name("kproxy"));
            kube::run(&kube::Opts { services: a.services, endpoints: a.endpoints, changes: a.changes, kproxy });
            return;
        }
        "serve" => return dataplane::serve(a.port),
        "connect" => {
            let target = a.target.expect("--target IP:PORT").parse().expect("--target IP:PORT");
            return dataplane::connect(target, a.count);
        }
        "daemon-cold" => {
            // `--kproxy PATH --dir MANIFESTS [--count LIMIT_S] [-- extra kproxy args]`.
            let kproxy =
                a.kproxy.unwrap_or_else(|| std::env::current_exe().expect("own path").with_file_name("kproxy"));
            let extra: Vec<String> = std::env::args().skip_while(|x| x != "--").skip(1).collect();
            let limit = Duration::from_secs(if a.count == 2000 { 300 } else { a.count as u64 });
            return kube::daemon_cold(&kproxy, &a.dir.expect("--dir DIR"), &extra, limit);
        }
        "memory" => return memory::run(a.services, a.endpoints),
        "manifests" => {
            let dir = a.dir.expect("--dir DIR");
            return kube::write_manifests(&dir, a.services, a.endpoints, a.policies);
        }
        _ => {}
    }
    let st = rules::synthetic::cluster(a.services, a.endpoints, a.policies);
    let ips = node_ips();
    let c = cfg();
    let u = upstream_cfg(&st, &c, &ips);
    match a.cmd.as_str() {
        "pure" => {
            let t0 = Instant::now();
            let built = rules::build(&st, &ips, &c, None).ruleset;
            let t1 = Instant::now();
            let tx = rules::diff(None, &built);
            let t2 = Instant::now();
            let text = tx.to_string();
            let t3 = Instant::now();
            let st2 = plus_one(&st, a.policies);
            let mut change = Vec::new();
            for _ in 0..a.repeats {
                let s = Instant::now();
                let b2 = rules::build(&st2, &ips, &c, Some(&built)).ruleset;
                let d = rules::diff(Some(&built), &b2);
                assert!(!d.is_empty());
                change.push(s.elapsed());
            }
            let t4 = Instant::now();
            let up = upstream_nft::script(&u, &st);
            let t5 = Instant::now();
            println!(
                "pure services={} endpoints={} policies={} build_ms={:.1} diff_full_ms={:.1} render_ms={:.1} text_mb={:.1} ops={} change_build_diff_p50_ms={:.1} upstream_text_mb={:.1} upstream_render_ms={:.1} upstream_lines={}",
                a.services,
                a.endpoints,
                a.policies,
                ms(t1 - t0),
                ms(t2 - t1),
                ms(t3 - t2),
                text.len() as f64 / 1e6,
                tx.ops.len(),
                pct(&mut change, 0.5),
                up.len() as f64 / 1e6,
                ms(t5 - t4),
                up.lines().count(),
            );
        }
        "text" => {
            let built = rules::build(&st, &ips, &c, None).ruleset;
            print!("{}", rules::diff(None, &built));
        }
        "delta" | "undelta" => {
            let built = rules::build(&st, &ips, &c, None).ruleset;
            let b2 = rules::build(&plus_one(&st, a.policies), &ips, &c, Some(&built)).ruleset;
            if a.cmd == "delta" {
                print!("{}", rules::diff(Some(&built), &b2));
            } else {
                print!("{}", rules::diff(Some(&b2), &built));
            }
        }
        "svc-add" | "svc-del" => {
            let built = rules::build(&st, &ips, &c, None).ruleset;
            let (st2, _) = plus_service(&st, a.endpoints);
            let b2 = rules::build(&st2, &ips, &c, Some(&built)).ruleset;
            if a.cmd == "svc-add" {
                print!("{}", rules::diff(Some(&built), &b2));
            } else {
                print!("{}", rules::diff(Some(&b2), &built));
            }
        }
        "upstream-text" => print!("{}", upstream_nft::script(&u, &st)),
        "upstream-delta" => {
            let st2 = plus_one(&st, a.policies);
            print!("{}", upstream_nft::endpoint_change_script(&u, &st, &st2, &changed_port(&st, &st2)));
        }
        "upstream-undelta" => {
            let st2 = plus_one(&st, a.policies);
            print!("{}", upstream_nft::endpoint_change_script(&u, &st2, &st, &changed_port(&st, &st2)));
        }
        "upstream-svc-add" => {
            let (st2, name) = plus_service(&st, a.endpoints);
            print!("{}", upstream_nft::service_port_script(&u, &st2, &name));
        }
        "upstream-svc-del" => {
            let (st2, name) = plus_service(&st, a.endpoints);
            print!("{}", upstream_nft::delete_service_port_script(&u, &st2, &name));
        }
        "ipt-text" => {
            let r = rules::iptables::build(&st, &ips, &c, false).ruleset;
            print!("{}", rules::iptables::restore_input(&r, None));
        }
        "ipt-delta" | "ipt-undelta" => {
            // Upstream's partial restore for the one-endpoint change (and back).
            let r = rules::iptables::build(&st, &ips, &c, false).ruleset;
            let r2 = rules::iptables::build(&plus_one(&st, a.policies), &ips, &c, false).ruleset;
            let (from, to) = if a.cmd == "ipt-delta" { (&r, &r2) } else { (&r2, &r) };
            print!("{}", rules::iptables::restore_input(to, Some(from)));
        }
        "ipt-apply" => ipt_apply(&a, &st, &ips, &c),
        "ipt-jumps" => {
            // The jump rules upstream ensures in the built-in chains, as iptables-restore input
            // (appended; the data-plane bench needs them, the control-plane timing does not).
            // Only jumps to chains the ruleset has (KUBE-FIREWALL exists with localhost node
            // ports only).
            let r = rules::iptables::build(&st, &ips, &c, false).ruleset;
            for (table, t) in [("filter", &r.filter), ("nat", &r.nat)] {
                println!("*{table}");
                for (tn, chain, rule) in rules::iptables::jump_rules(Family::V4) {
                    let target = rule.rsplit("-j ").next().unwrap_or("").trim();
                    if tn == table && t.chain(target).is_some() {
                        println!("-A {chain} {rule}");
                    }
                }
                println!("COMMIT");
            }
        }
        "apply" => apply(&a, &st, &ips, &c),
        "load" => {
            // Cold start only (the data-plane bench's kproxy table).
            let mut be = kproxy::backend::nftables::NftablesBackend::new().expect("netlink socket");
            let t0 = Instant::now();
            let built = rules::build(&st, &ips, &c, None).ruleset;
            be.apply(&rules::diff(None, &built)).expect("cold start apply");
            println!("load services={} endpoints={} cold_total_ms={:.1}", a.services, a.endpoints, ms(t0.elapsed()));
        }
        other => {
            eprintln!(
                "unknown command {other:?}: use pure | text | delta | undelta | svc-add | svc-del | upstream-text | \
                 upstream-delta | upstream-undelta | upstream-svc-add | upstream-svc-del | ipt-text | ipt-delta | ipt-undelta | ipt-jumps | ipt-apply | apply | load | kube | manifests | \
                 daemon-cold | serve | connect"
            );
            std::process::exit(2);
        }
    }
}

/// The service port whose endpoints differ between two states (`plus_one`'s target).
fn changed_port(a: &ClusterState, b: &ClusterState) -> ServicePortName {
    b.endpoints.iter().find(|(k, v)| a.endpoints.get(*k) != Some(*v)).map(|(k, _)| k.clone()).expect("a changed port")
}

/// kproxy's control plane through its netlink backend, in the current (throwaway) namespace:
/// cold start, one-endpoint changes, one-service add and delete, no-op resyncs. Each repeated
/// operation is timed whole (partial build + diff + apply, what a sync does) and kernel-only
/// (apply).
fn apply(a: &Args, st: &ClusterState, ips: &[std::net::IpAddr], c: &BuildConfig) {
    let mut be = kproxy::backend::nftables::NftablesBackend::new().expect("netlink socket");
    let (_, cpu0) = self_usage();
    let t0 = Instant::now();
    let built = rules::build(st, ips, c, None).ruleset;
    let tx = rules::diff(None, &built);
    let t1 = Instant::now();
    be.apply(&tx).expect("cold start apply");
    let t2 = Instant::now();
    drop(tx);
    let (hwm_cold, cpu1) = self_usage();

    // Alternately add and remove one endpoint (or service), as the daemon syncs a change: the
    // tracker hands over the changed Services before and after (computed here outside the timed
    // part, since the tracker has them at hand), `build_partial` builds and diffs just those
    // against the kept (stripped) ruleset, the backend applies, the ruleset records it.
    let mut kept = built.clone();
    kept.strip_bulk();
    let sync = |be: &mut kproxy::backend::nftables::NftablesBackend,
                kept: &mut rules::ir::Ruleset,
                from: &ClusterState,
                to: &ClusterState,
                what: &str|
     -> (Duration, Duration, usize) {
        let keys = ClusterState::changed_services(from, to);
        let (before, after) = (from.restrict(&keys), to.restrict(&keys));
        let s = Instant::now();
        let p = rules::build::build_partial(kept, &before, &after, ips, c)
            .unwrap_or_else(|| panic!("{what}: no partial build"));
        let k = Instant::now();
        if !p.tx.is_empty() {
            be.apply(&p.tx).unwrap_or_else(|e| panic!("{what} apply: {e}"));
        }
        let kernel = k.elapsed();
        kept.commit_partial(&p);
        (kernel, s.elapsed(), p.tx.ops.len())
    };
    let mut cycle = |be: &mut kproxy::backend::nftables::NftablesBackend, other: &ClusterState, what: &str| {
        let mut kernel = Vec::new();
        let mut total = Vec::new();
        for i in 0..a.repeats {
            let (from, to) = if i % 2 == 0 { (st, other) } else { (other, st) };
            let (k, t, ops) = sync(be, &mut kept, from, to, what);
            assert!(ops > 0, "{what}: an empty transaction");
            kernel.push(k);
            total.push(t);
        }
        if a.repeats % 2 == 1 {
            // Back to `st`, so the next cycle starts from the cold-start table.
            sync(be, &mut kept, other, st, "restore");
        }
        (kernel, total)
    };
    let (mut ep_k, mut ep_t) = cycle(&mut be, &plus_one(st, a.policies), "endpoint change");
    let (mut sv_k, mut sv_t) = cycle(&mut be, &plus_service(st, a.endpoints).0, "service add/delete");
    let mut noop = Vec::new();
    for _ in 0..a.repeats {
        let (_, t, ops) = sync(&mut be, &mut kept, st, st, "no-op");
        assert_eq!(ops, 0, "a no-op resync changed {ops} things");
        noop.push(t);
    }
    let (hwm_end, cpu2) = self_usage();
    println!(
        "apply services={} endpoints={} policies={} cold_build_diff_ms={:.1} cold_kernel_ms={:.1} cold_total_ms={:.1} \
         cold_cpu_s={:.2} cold_hwm_mib={:.1} \
         change_kernel_p50_ms={:.2} change_kernel_p99_ms={:.2} change_total_p50_ms={:.2} change_total_p99_ms={:.2} \
         svc_kernel_p50_ms={:.2} svc_kernel_p99_ms={:.2} svc_total_p50_ms={:.2} svc_total_p99_ms={:.2} \
         noop_p50_ms={:.2} noop_p99_ms={:.2} hwm_mib={:.1} cpu_s={:.2}",
        a.services,
        a.endpoints,
        a.policies,
        ms(t1 - t0),
        ms(t2 - t1),
        ms(t2 - t0),
        cpu1 - cpu0,
        hwm_cold,
        pct(&mut ep_k, 0.5),
        pct(&mut ep_k, 0.99),
        pct(&mut ep_t, 0.5),
        pct(&mut ep_t, 0.99),
        pct(&mut sv_k, 0.5),
        pct(&mut sv_k, 0.99),
        pct(&mut sv_t, 0.5),
        pct(&mut sv_t, 0.99),
        pct(&mut noop.clone(), 0.5),
        pct(&mut noop, 0.99),
        hwm_end,
        cpu2 - cpu0,
    );
}
