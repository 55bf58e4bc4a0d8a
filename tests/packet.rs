//! Packet-flow tests: real TCP and UDP packets through the real kernel, in network namespaces,
//! with kproxy programming the node. They need root (CAP_NET_ADMIN) plus iproute2, nft and python3.
//!
//! Every test builds its own topology (tests/support/topo.rs), writes Service / EndpointSlice /
//! Node YAML into its own manifests directory, runs `kproxy --manifests` in the node namespace and
//! asserts, per connection, which backend answered and which source address it saw. Tests run
//! concurrently; `KPP_KEEP=1` keeps each test's manifests and kproxy logs in /tmp/kpp<pid>-<n>.

#[path = "support/topo.rs"]
mod topo;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use topo::Proto::{Tcp, Udp};
use topo::*;

const T1: Duration = Duration::from_secs(1);

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// Documentation-range addresses (RFC 5737) for LoadBalancer and external IPs: they exist only
/// as routes inside the test namespaces (ext's default route leads to the node).
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

/// kproxy's first sync includes start-up; later changes must be faster (see the edit test).
const FIRST_SYNC: Duration = Duration::from_secs(10);

/// One scenario list for both proxy modes: `in_modes!(scenario: [Nftables, Iptables])` turns
/// `fn scenario(mode: Mode)` into the tests `scenario::nftables` and `scenario::iptables` (and
/// `scenario::iptables_legacy` for `IptablesLegacy`), so both modes prove the same behaviour.
/// Where upstream's iptables mode behaves differently, the scenario says so with `mode`.
macro_rules! in_modes {
    ($($name:ident: [$($mode:ident),+]),+ $(,)?) => {$(
        mod $name {
            $(in_modes!(@one $name $mode);)+
        }
    )+};
    (@one $name:ident Nftables) => { #[test] fn nftables() { super::$name(super::Mode::Nftables) } };
    (@one $name:ident Iptables) => { #[test] fn iptables() { super::$name(super::Mode::Iptables) } };
    (@one $name:ident IptablesLegacy) => {
        #[test] fn iptables_legacy() { super::$name(super::Mode::IptablesLegacy) }
    };
}

in_modes!(
    cluster_ip_spreads_evenly_and_keeps_the_pod_source: [Nftables, Iptables],
    external_and_host_traffic_is_masqueraded: [Nftables, Iptables, IptablesLegacy],
    hairpin_is_masqueraded_and_missing_endpoints_or_ports_are_refused: [Nftables, Iptables],
    edits_are_followed_within_two_seconds: [Nftables, Iptables],
    masquerade_all_and_nodeport_addresses_flags: [Nftables, Iptables],
    external_traffic_policy_local_keeps_the_client_source_and_stays_on_the_node: [Nftables, Iptables],
    internal_traffic_policy_local_uses_only_local_endpoints: [Nftables, Iptables],
    load_balancer_source_ranges_allow_and_deny: [Nftables, Iptables],
    client_ip_affinity_sticks_across_connections_and_service_ips: [Nftables, Iptables],
    ipv6_cluster_ip_and_node_port: [Nftables, Iptables],
    udp_flow_moves_to_a_remaining_endpoint_when_its_endpoint_is_removed: [Nftables, Iptables],
    zone_hints_keep_traffic_in_the_zone_until_an_endpoint_lacks_hints: [Nftables, Iptables],
);

/// The harness alone, with a hand-written nft table instead of kproxy: DNAT from a pod keeps the
/// source, DNAT from outside and from the host network is masqueraded to the address the tests
/// expect. If this fails, the kproxy tests below cannot be trusted either way.
#[test]
fn harness_self_check_with_handwritten_nft() {
    let t = Topo::new();
    let script = format!(
        "table ip kpp-selfcheck {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr 172.30.99.1 tcp dport 80 dnat to {b1}:{ECHO_TCP}
    ip daddr {NODE_IP} tcp dport 30099 meta mark set 0x4000 dnat to {r1}:{ECHO_TCP}
  }}
  chain out {{ type nat hook output priority -100; policy accept;
    ip daddr 172.30.99.1 tcp dport 80 meta mark set 0x4000 dnat to {b2}:{ECHO_TCP}
  }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    meta mark 0x4000 masquerade
  }}
}}
",
        b1 = Pod::B1.ip(),
        b2 = Pod::B2.ip(),
        r1 = Pod::R1.ip()
    );
    t.nft_script(&script);

    let cip = ip(172, 30, 99, 1);
    let a = t.prober(Host::Pod(Pod::Client)).probe(Tcp, cip, 80, 5, T1);
    expect_answer(&a, Pod::B1, Pod::Client.ip()).unwrap();
    let a = t.prober(Host::Ext).probe(Tcp, NODE_IP, 30099, 5, T1);
    expect_answer(&a, Pod::R1, Pod::R1.masqueraded_src()).unwrap();
    let a = t.prober(Host::Node).probe(Tcp, cip, 80, 5, T1);
    expect_answer(&a, Pod::B2, Pod::B2.masqueraded_src()).unwrap();
    // Without a rule, a ClusterIP is routed out of the default route and never answered.
    let a = t.prober(Host::Pod(Pod::Client)).one(Tcp, cip, 81, Duration::from_millis(300));
    assert_eq!(a.outcome, Outcome::Timeout);
}

// ------------------------------------------------------------------------------------------------
// kproxy

/// Waits until kproxy has programmed the service: one attempt answered. Fails at once if kproxy
/// exits meanwhile.
fn await_answer(k: &mut Kproxy, p: &mut Prober, proto: Proto, dst: Ipv4Addr, port: u16) {
    poll(&format!("first answer from {dst}:{port}"), FIRST_SYNC, || {
        k.assert_running();
        let a = p.one(proto, dst, port, Duration::from_millis(300));
        a.backend().map(|_| ()).ok_or_else(|| format!("{:?}", a.outcome))
    });
}

/// Every attempt answered by one of `allowed`, each seeing the source `src(backend)`; each
/// backend got between `min` and `max` of the answers.
fn assert_spread(what: &str, attempts: &[Attempt], allowed: &[Pod], src: impl Fn(Pod) -> Ipv4Addr, min: f64, max: f64) {
    for a in attempts {
        match &a.outcome {
            Outcome::Answer { backend, src: seen } => {
                let pod = Pod::by_name(backend).filter(|p| allowed.contains(p));
                let pod = pod.unwrap_or_else(|| panic!("{what}: answer from {backend}, expected one of {allowed:?}"));
                assert_eq!(*seen, src(pod), "{what}: source address seen by {backend}");
            }
            o => panic!("{what}: not answered: {o:?} after {:?}; tally {:?}", a.elapsed, tally(attempts)),
        }
    }
    let counts = tally(attempts);
    for p in allowed {
        let share = counts.get(p.name()).copied().unwrap_or(0) as f64 / attempts.len() as f64;
        assert!(
            (min..=max).contains(&share),
            "{what}: {} got {:.0}% of {} answers, expected {:.0}%..{:.0}%: {counts:?}",
            p.name(),
            share * 100.0,
            attempts.len(),
            min * 100.0,
            max * 100.0
        );
    }
    eprintln!("{what}: {counts:?}");
}

/// Every attempt refused (ICMP reject or RST), and quickly: a refusal, not a timeout.
fn assert_refused(what: &str, attempts: &[Attempt]) {
    for a in attempts {
        assert_eq!(a.outcome, Outcome::Refused, "{what}");
        assert!(a.elapsed < Duration::from_millis(500), "{what}: refused only after {:?}", a.elapsed);
    }
}

/// Test 1 (cases 1, 14-ish): ClusterIP from a pod, TCP and UDP of one multi-port service, two
/// local endpoints and one on node2. Uniform choice, pod source kept (not masqueraded).
fn cluster_ip_spreads_evenly_and_keeps_the_pod_source(mode: Mode) {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 10);
    let backends = [Pod::B1, Pod::B2, Pod::R1];
    t.apply(
        &Service::cluster_ip("web", cip).port("http", Tcp, 80, ECHO_TCP).port("dns", Udp, 53, ECHO_UDP),
        &Slice::of("web").port("http", Tcp, ECHO_TCP).port("dns", Udp, ECHO_UDP).endpoints(&backends),
    );
    let mut k = t.kproxy_in(mode, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    // The CLI contract: one info line per sync that says "sync".
    k.wait_syncs(1, T1);
    // 300 draws of 1/3: the mean is 100, sd 8.2; 20%..47% is more than 4.9 sd either side.
    for (proto, port) in [(Tcp, 80), (Udp, 53)] {
        let a = client.probe(proto, cip, port, 300, T1);
        assert_spread(&format!("{proto:?} {cip}:{port} from client"), &a, &backends, |_| Pod::Client.ip(), 0.20, 0.47);
    }
}

/// Test 2 (cases 44-46, 50, 53, 60, 69): NodePort, LoadBalancer IP and externalIP from an
/// off-cluster host, NodePort from a pod and ClusterIP from the host network are all
/// masqueraded, to the node's address on the way to the chosen backend. NodePorts answer only
/// on the Node object's InternalIP.
fn external_and_host_traffic_is_masqueraded(mode: Mode) {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 20);
    let backends = [Pod::B1, Pod::R1];
    t.apply(
        &Service::cluster_ip("edge", cip)
            .port("http", Tcp, 80, ECHO_TCP)
            .node_port(30080)
            .port("dns", Udp, 53, ECHO_UDP)
            .node_port(30053)
            .load_balancer_ip(LB_IP)
            .external_ip(EXTERNAL_IP),
        &Slice::of("edge").port("http", Tcp, ECHO_TCP).port("dns", Udp, ECHO_UDP).endpoints(&backends),
    );
    let mut k = t.kproxy_in(mode, &[]);
    let mut ext = t.prober(Host::Ext);
    await_answer(&mut k, &mut ext, Tcp, NODE_IP, 30080);
    // 60 draws of 1/2: both backends must show up; the share bound only rules out "always one".
    let masq = |p: Pod| p.masqueraded_src();
    for (proto, dst, port) in
        [(Tcp, NODE_IP, 30080), (Udp, NODE_IP, 30053), (Tcp, LB_IP, 80), (Udp, LB_IP, 53), (Tcp, EXTERNAL_IP, 80)]
    {
        let a = ext.probe(proto, dst, port, 60, T1);
        assert_spread(&format!("{proto:?} {dst}:{port} from ext"), &a, &backends, masq, 0.1, 0.9);
    }
    // The node's other address (towards ext) is local but not the Node's InternalIP. nftables
    // mode's default --nodeport-addresses is `primary`: the host stack gets the packet, nothing
    // listens, RST. iptables mode's default is every local address, as upstream (case 50).
    if mode.is_iptables() {
        let a = ext.probe(Tcp, NODE_EXT_IP, 30080, 20, T1);
        assert_spread("iptables mode: NodePort on every node address", &a, &backends, masq, 0.05, 0.95);
    } else {
        let a = ext.one(Tcp, NODE_EXT_IP, 30080, T1);
        assert_eq!(a.outcome, Outcome::Refused, "NodePort must not answer on a non-primary node address");
    }
    // Case 51: localhost NodePorts exist only in iptables mode (IPv4, localhostNodePorts, node
    // port addresses covering 127.0.0.1; route_localnet=1 with the KUBE-FIREWALL safeguard).
    // nftables mode never serves 127.0.0.0/8: nothing listens there, RST.
    let mut node = t.prober(Host::Node);
    if mode.is_iptables() {
        let a = node.probe(Tcp, Ipv4Addr::LOCALHOST, 30080, 20, T1);
        assert_spread("iptables mode: node -> 127.0.0.1:NodePort", &a, &backends, masq, 0.05, 0.95);
        let rl = t.cmd(Host::Node, "sysctl").args(["-n", "net.ipv4.conf.all.route_localnet"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&rl.stdout).trim(), "1", "route_localnet");
        assert!(t.iptables_save(mode).contains("-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8"), "safeguard");
    } else {
        assert_eq!(node.one(Tcp, Ipv4Addr::LOCALHOST, 30080, T1).outcome, Outcome::Refused, "localhost NodePort");
    }

    let a = t.prober(Host::Node).probe(Tcp, cip, 80, 60, T1);
    assert_spread("ClusterIP from the host network", &a, &backends, masq, 0.1, 0.9);
    let a = t.prober(Host::Pod(Pod::Client)).probe(Tcp, NODE_IP, 30080, 60, T1);
    assert_spread("NodePort from a pod", &a, &backends, masq, 0.1, 0.9);
}

/// Test 3 (cases 2, 36, 38, and "a port the ClusterIP does not serve"): hairpin is
/// masqueraded, a neighbour pod is not; no endpoints and wrong ports are refused at once.
fn hairpin_is_masqueraded_and_missing_endpoints_or_ports_are_refused(mode: Mode) {
    let t = Topo::new();
    let (hp, none) = (ip(172, 30, 0, 30), ip(172, 30, 0, 31));
    t.apply(
        &Service::cluster_ip("hairpin", hp).port("http", Tcp, 80, ECHO_TCP).port("dns", Udp, 53, ECHO_UDP),
        &Slice::of("hairpin").port("http", Tcp, ECHO_TCP).port("dns", Udp, ECHO_UDP).endpoint(Pod::B1),
    );
    t.apply(
        &Service::cluster_ip("empty", none)
            .port("http", Tcp, 80, ECHO_TCP)
            .node_port(30031)
            .port("dns", Udp, 53, ECHO_UDP),
        &Slice::of("empty").port("http", Tcp, ECHO_TCP).port("dns", Udp, ECHO_UDP),
    );
    let mut k = t.kproxy_in(mode, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, hp, 80);
    // Everything above came from one sync of the whole directory, so "empty" is programmed too.
    let mut b1 = t.prober(Host::Pod(Pod::B1));
    for (proto, port) in [(Tcp, 80), (Udp, 53)] {
        let a = b1.probe(proto, hp, port, 10, T1);
        expect_answer(&a, Pod::B1, NODE_BRIDGE_IP).unwrap_or_else(|e| panic!("hairpin {proto:?}: {e}"));
        let a = t.prober(Host::Pod(Pod::B2)).probe(proto, hp, port, 10, T1);
        expect_answer(&a, Pod::B1, Pod::B2.ip()).unwrap_or_else(|e| panic!("neighbour {proto:?}: {e}"));
    }

    // A long timeout, so a drop would show as a slow timeout rather than pass as a refusal.
    let slow = Duration::from_secs(3);
    assert_refused("no endpoints, TCP", &client.probe(Tcp, none, 80, 5, slow));
    assert_refused("no endpoints, UDP", &client.probe(Udp, none, 53, 5, slow));
    assert_refused("no endpoints, NodePort from ext", &t.prober(Host::Ext).probe(Tcp, NODE_IP, 30031, 5, slow));
    if mode.is_iptables() {
        // Upstream's iptables mode has no rule for the ports a ClusterIP does not serve (only
        // nftables mode rejects them): the packet is routed like any other, here out of the
        // default route, and never answered.
        let quick = Duration::from_millis(400);
        assert_dropped("iptables mode: ClusterIP, unserved TCP port", &client.probe(Tcp, hp, 81, 2, quick));
        assert_dropped("iptables mode: ClusterIP, unserved UDP port", &client.probe(Udp, hp, 54, 2, quick));
    } else {
        assert_refused("ClusterIP, unserved TCP port", &client.probe(Tcp, hp, 81, 5, slow));
        assert_refused("ClusterIP, unserved UDP port", &client.probe(Udp, hp, 54, 5, slow));
    }
}

/// Waits until traffic to `dst:port` shows `want`; returns how long after `since` the first
/// fully conforming batch *started* (so the change was in effect by then).
fn follows(client: &mut Prober, dst: Ipv4Addr, port: u16, want: Expect, since: Instant) -> Duration {
    let (started, _) = poll(&format!("traffic to {dst}:{port} shows {want:?}"), Duration::from_secs(4), || {
        let start = Instant::now();
        let ok = client.shows(dst, port, want, T1);
        ok.map(|()| start.duration_since(since))
    });
    started
}

/// Test 4 (cases 33-35, 32): manifest edits reach the kernel within 2 s each: scale 1 -> 3 -> 0,
/// restore, replace an endpoint's address, delete the service.
fn edits_are_followed_within_two_seconds(mode: Mode) {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 40);
    let svc = Service::cluster_ip("edit", cip).port("http", Tcp, 80, ECHO_TCP);
    let slice = || Slice::of("edit").port("http", Tcp, ECHO_TCP);
    t.apply(&svc, &slice().endpoint(Pod::B1));
    let mut k = t.kproxy_in(mode, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    follows(&mut client, cip, 80, Expect::Backends(&[Pod::B1]), Instant::now());

    let steps: [(&str, Option<Slice>, Expect); 5] = [
        (
            "scale 1 -> 3",
            Some(slice().endpoints(&[Pod::B1, Pod::B2, Pod::B3])),
            Expect::Backends(&[Pod::B1, Pod::B2, Pod::B3]),
        ),
        ("scale 3 -> 0", Some(slice()), Expect::Refused),
        ("scale 0 -> 2", Some(slice().endpoints(&[Pod::B1, Pod::B2])), Expect::Backends(&[Pod::B1, Pod::B2])),
        // Same slice, same endpoint count: b2's address becomes b3's.
        ("replace b2 by b3", Some(slice().endpoints(&[Pod::B1, Pod::B3])), Expect::Backends(&[Pod::B1, Pod::B3])),
        ("delete the service", None, Expect::NoAnswer),
    ];
    for (what, new, want) in steps {
        let since = Instant::now();
        match new {
            Some(s) => t.apply(&svc, &s),
            None => t.remove_manifest("edit.yaml"),
        }
        let took = follows(&mut client, cip, 80, want, since);
        eprintln!("{what}: in effect after {took:?}");
        assert!(took <= Duration::from_secs(2), "{what}: took {took:?}");
    }
}

/// Test 5 (case 107, issue 2 "start-up never breaks traffic"): a client opens a new connection
/// every 20 ms while kproxy is stopped with SIGTERM and restarted, then killed with SIGKILL and
/// restarted. The kernel keeps the old table meanwhile and each new process replaces it in one
/// transaction: not one connection may fail. Edits made while kproxy is down show that the new
/// process really reprogrammed the table under traffic.
#[test]
fn restarts_under_continuous_traffic_lose_no_connection() {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 50);
    let svc = Service::cluster_ip("restart", cip).port("http", Tcp, 80, ECHO_TCP);
    let slice = |pods: &[Pod]| Slice::of("restart").port("http", Tcp, ECHO_TCP).endpoints(pods);
    t.apply(&svc, &slice(&[Pod::B1, Pod::B2]));
    let mut k = t.kproxy(&[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    drop(client);

    let lp = t.traffic_loop(Host::Pod(Pod::Client), Tcp, cip, 80, Duration::from_millis(20), T1);
    lp.wait_more(10, Duration::from_secs(5));
    // Backends answering since attempt `from`.
    let seen_since = |from: usize| -> BTreeSet<String> {
        lp.results()[from..].iter().filter_map(|(_, a)| a.backend().map(str::to_string)).collect()
    };

    for (how, next) in [("SIGTERM", vec![Pod::B1, Pod::B2, Pod::B3]), ("SIGKILL", vec![Pod::B2, Pod::B3])] {
        let status = if how == "SIGTERM" { k.terminate() } else { k.kill9() };
        eprintln!("kproxy after {how}: {status}");
        assert!(t.has_kube_proxy_table(), "the table must outlive the process ({how})");
        // Edit while nobody programs the kernel: traffic goes on with the old table.
        t.apply(&svc, &slice(&next));
        let down = lp.len();
        lp.wait_more(15, Duration::from_secs(5));
        let old: Vec<String> = seen_since(down).into_iter().collect();
        eprintln!("while down after {how}: {old:?}");
        k.start();
        let up = lp.len();
        // The new process has synced once the loop shows exactly the new endpoint set.
        await_backends(&format!("restarted kproxy ({how})"), &mut k, &lp, up, &next, |_| true);
    }
    lp.wait_more(10, Duration::from_secs(5));
    assert_unbroken("pod -> ClusterIP", &lp.stop(), Pod::Client.ip(), "");
}

/// Issue 6: a restart over an existing table with more Services than a cold-start part rebuilds
/// the ruleset in parts next to the old table (`kproxy-restart`), then replaces `kube-proxy` in
/// parts, so no commit holds the whole ruleset. Traffic to a ClusterIP from a pod (source kept)
/// and to a NodePort from outside (masqueraded) loses no connection through it, the change made
/// while kproxy was down takes effect, and the second table is gone afterwards. Parts of one
/// Service (a test hook) make a few hundred Services take this path, for long enough that many
/// connections are made during it.
#[test]
fn restart_in_parts_under_traffic_loses_no_connection() {
    const FILLERS: u16 = 300;
    let t = Topo::new();
    let cip = ip(172, 30, 0, 60);
    let svc = Service::cluster_ip("restart", cip).port("http", Tcp, 80, ECHO_TCP).node_port(30060);
    let slice = |pods: &[Pod]| Slice::of("restart").port("http", Tcp, ECHO_TCP).endpoints(pods);
    t.apply(&svc, &slice(&[Pod::B1, Pod::B2]));
    // Enough Services in parts of one that the restart takes a while: traffic meets each of its
    // stages (old table alone, old + second table, second alone, second + part of the new).
    for i in 1..=FILLERS {
        let name = format!("filler{i}");
        let other = Service::cluster_ip(&name, ip(172, 30, 1 + (i / 250) as u8, (i % 250) as u8))
            .port("http", Tcp, 80, ECHO_TCP);
        t.apply(&other, &Slice::of(&name).port("http", Tcp, ECHO_TCP).endpoints(&[Pod::B3]));
    }
    let mut k = t.kproxy_with_env(t.kproxy_args(&[]), &[("KPROXY_TEST_COLD_START_PART", "1")]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    drop(client);
    assert!(k.log().contains("cold start sent in parts"), "a fresh node goes in parts:\n{}", k.log());

    // 3 s per connection: a SYN lost once on this shared machine is resent after 1 s, and that is
    // not a lost connection; missing rules still fail every attempt.
    let (every, limit) = (Duration::from_millis(20), Duration::from_secs(3));
    let pods = t.traffic_loop(Host::Pod(Pod::Client), Tcp, cip, 80, every, limit);
    let ext = t.traffic_loop(Host::Ext, Tcp, NODE_IP, 30060, every, limit);
    pods.wait_more(10, Duration::from_secs(5));
    ext.wait_more(10, Duration::from_secs(5));
    k.terminate();
    t.apply(&svc, &slice(&[Pod::B2, Pod::B3]));
    pods.wait_more(10, Duration::from_secs(5));
    k.start();
    let up = pods.len();
    // The new endpoints answer as soon as the second table holds them; the restart is done at
    // its sync line.
    await_backends("the restarted kproxy", &mut k, &pods, up, &[Pod::B2, Pod::B3], |k| k.log().contains("sync done"));
    let log = k.log();
    assert!(log.contains("restart sent in parts"), "the restart goes in parts:\n{log}");
    let sync = log.lines().find(|l| l.contains("sync done")).expect("a sync line");
    eprintln!("{sync}");
    let tables = String::from_utf8_lossy(&t.nft(&["list", "tables"]).stdout).into_owned();
    assert!(!tables.contains("kproxy-restart") && tables.contains("kube-proxy"), "{tables}");
    pods.wait_more(10, Duration::from_secs(5));
    ext.wait_more(10, Duration::from_secs(5));
    for (what, lp, src) in [("pod -> ClusterIP", pods, Pod::Client.ip()), ("ext -> NodePort", ext, NODE_BRIDGE_IP)] {
        assert_unbroken(what, &lp.stop(), src, &log);
    }
}

/// Every attempt of a traffic loop was answered (`context` is added to the failure message).
fn assert_all_answered(what: &str, results: &[(Duration, Attempt)], context: &str) {
    let failed: Vec<_> = results.iter().filter(|(_, a)| a.backend().is_none()).collect();
    let counts = tally(&results.iter().map(|(_, a)| a.clone()).collect::<Vec<_>>());
    eprintln!("{what}: {} connections: {counts:?}", results.len());
    assert!(
        failed.is_empty(),
        "{what}: {} of {} connections failed: {failed:?}\n{context}",
        failed.len(),
        results.len()
    );
}

/// `assert_all_answered`, every backend saw `src` as the source, and the loop really ran
/// throughout: no gap between attempts much longer than its interval.
fn assert_unbroken(what: &str, results: &[(Duration, Attempt)], src: Ipv4Addr, context: &str) {
    assert_all_answered(what, results, context);
    for (_, a) in results {
        if let Outcome::Answer { src: seen, .. } = &a.outcome {
            assert_eq!(*seen, src, "{what}: source seen by the backend");
        }
    }
    let gap = results.windows(2).map(|w| w[1].0.saturating_sub(w[0].0)).max().unwrap();
    assert!(gap < Duration::from_millis(500), "{what}: largest gap between attempts {gap:?}");
}

/// Waits (up to `FIRST_SYNC`, kproxy running) until the last 20 attempts of `lp` since attempt
/// `since` were answered by exactly `want`, and `done` holds of kproxy.
fn await_backends(
    what: &str,
    k: &mut Kproxy,
    lp: &TrafficLoop,
    since: usize,
    want: &[Pod],
    done: impl Fn(&Kproxy) -> bool,
) {
    let want: BTreeSet<String> = want.iter().map(|p| p.name().to_string()).collect();
    poll(&format!("{what} programs {want:?}"), FIRST_SYNC, || {
        k.assert_running();
        let r = lp.results();
        let recent: BTreeSet<String> = r[since.max(r.len().saturating_sub(20))..]
            .iter()
            .filter_map(|(_, a)| a.backend().map(str::to_string))
            .collect();
        (r.len() >= since + 20 && recent == want && done(k)).then_some(()).ok_or_else(|| format!("last 20: {recent:?}"))
    });
}

/// Test 6: `--cleanup` deletes kproxy's table (and nothing else), is idempotent, and afterwards
/// the ClusterIP is just an unrouted address again. Also: SIGTERM leaves the table in place.
#[test]
fn cleanup_removes_the_table() {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 60);
    t.apply(
        &Service::cluster_ip("gone", cip).port("http", Tcp, 80, ECHO_TCP),
        &Slice::of("gone").port("http", Tcp, ECHO_TCP).endpoint(Pod::B1),
    );
    // Someone else's table in the same namespace must survive the cleanup.
    let out = t.nft(&["add", "table", "ip", "not-ours"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut k = t.kproxy(&[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    k.terminate();
    assert!(t.has_kube_proxy_table(), "SIGTERM must leave the table serving");
    expect_answer(&client.probe(Tcp, cip, 80, 3, T1), Pod::B1, Pod::Client.ip()).unwrap();

    for round in 1..=2 {
        let out = t.cmd(Host::Node, env!("CARGO_BIN_EXE_kproxy")).arg("--cleanup").output().unwrap();
        assert!(
            out.status.success(),
            "kproxy --cleanup (round {round}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!t.has_kube_proxy_table(), "table still there after --cleanup (round {round})");
        assert!(t.nft(&["list", "table", "ip", "not-ours"]).status.success(), "--cleanup deleted a foreign table");
    }
    let a = client.one(Tcp, cip, 80, Duration::from_millis(300));
    assert_eq!(a.outcome, Outcome::Timeout, "ClusterIP still handled after --cleanup");
}

/// Flags end to end (cases 48, 50 and masquerade-all): `--masquerade-all` masquerades even a
/// pod's ClusterIP traffic; `--nodeport-addresses` moves NodePorts from the Node's InternalIP to
/// the local addresses inside the given CIDR.
fn masquerade_all_and_nodeport_addresses_flags(mode: Mode) {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 70);
    t.apply(
        &Service::cluster_ip("flags", cip).port("http", Tcp, 80, ECHO_TCP).node_port(30070),
        &Slice::of("flags").port("http", Tcp, ECHO_TCP).endpoint(Pod::B1),
    );
    let mut k = t.kproxy_in(mode, &["--masquerade-all", "--nodeport-addresses", "203.0.113.0/24"]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    let a = client.probe(Tcp, cip, 80, 5, T1);
    expect_answer(&a, Pod::B1, NODE_BRIDGE_IP).unwrap_or_else(|e| panic!("--masquerade-all, pod to ClusterIP: {e}"));

    let mut ext = t.prober(Host::Ext);
    let a = ext.probe(Tcp, NODE_EXT_IP, 30070, 5, T1);
    expect_answer(&a, Pod::B1, NODE_BRIDGE_IP).unwrap_or_else(|e| panic!("NodePort on {NODE_EXT_IP}: {e}"));
    // The InternalIP is outside the list now: the host stack answers with a RST.
    let a = ext.one(Tcp, NODE_IP, 30070, T1);
    assert_eq!(a.outcome, Outcome::Refused, "NodePort must not answer on {NODE_IP} outside --nodeport-addresses");
}

// ------------------------------------------------------------------------------------------------
// Traffic policies (issue 4)

/// Every attempt unanswered (a silent drop), not refused: `timeout` each.
fn assert_dropped(what: &str, attempts: &[Attempt]) {
    for a in attempts {
        assert_eq!(a.outcome, Outcome::Timeout, "{what}: expected a silent drop; tally {:?}", tally(attempts));
    }
}

/// Cases 63-66, 70, 71: externalTrafficPolicy Local with a local (b1) and a remote (r1) endpoint.
/// From outside, the NodePort and the LoadBalancer IP reach only b1, which sees the client's own
/// address; a pod short-circuits to both endpoints with its source kept; the node itself reaches
/// both, masqueraded. A second service with only the remote endpoint drops external traffic
/// (no refusal) while pods still reach r1.
fn external_traffic_policy_local_keeps_the_client_source_and_stays_on_the_node(mode: Mode) {
    let t = Topo::new();
    let (cip, cip2) = (ip(172, 30, 0, 80), ip(172, 30, 0, 81));
    let lb2 = Ipv4Addr::new(198, 51, 100, 11);
    t.apply(
        &Service::cluster_ip("local", cip)
            .port("http", Tcp, 80, ECHO_TCP)
            .node_port(30080)
            .port("dns", Udp, 53, ECHO_UDP)
            .node_port(30053)
            .load_balancer_ip(LB_IP)
            .spec("externalTrafficPolicy: Local"),
        &Slice::of("local").port("http", Tcp, ECHO_TCP).port("dns", Udp, ECHO_UDP).endpoints(&[Pod::B1, Pod::R1]),
    );
    t.apply(
        &Service::cluster_ip("remote", cip2)
            .port("http", Tcp, 80, ECHO_TCP)
            .node_port(30081)
            .load_balancer_ip(lb2)
            .spec("externalTrafficPolicy: Local"),
        &Slice::of("remote").port("http", Tcp, ECHO_TCP).endpoint(Pod::R1),
    );
    let mut k = t.kproxy_in(mode, &[]);
    let mut ext = t.prober(Host::Ext);
    await_answer(&mut k, &mut ext, Tcp, NODE_IP, 30080);
    for (proto, dst, port) in [(Tcp, NODE_IP, 30080), (Udp, NODE_IP, 30053), (Tcp, LB_IP, 80), (Udp, LB_IP, 53)] {
        let a = ext.probe(proto, dst, port, 30, T1);
        expect_answer(&a, Pod::B1, EXT_IP).unwrap_or_else(|e| panic!("ext -> {dst}:{port} {proto:?}: {e}"));
    }
    // Pods and the node are not subject to the policy (they short-circuit to every endpoint).
    let mut client = t.prober(Host::Pod(Pod::Client));
    for (dst, port) in [(LB_IP, 80), (NODE_IP, 30080)] {
        let a = client.probe(Tcp, dst, port, 40, T1);
        assert_spread(&format!("pod -> {dst}:{port}"), &a, &[Pod::B1, Pod::R1], |_| Pod::Client.ip(), 0.1, 0.9);
    }
    let a = t.prober(Host::Node).probe(Tcp, NODE_IP, 30080, 40, T1);
    assert_spread("node -> its node port", &a, &[Pod::B1, Pod::R1], |p| p.masqueraded_src(), 0.1, 0.9);
    // The ClusterIP ignores the external policy (case 69).
    let a = client.probe(Tcp, cip, 80, 40, T1);
    assert_spread("pod -> ClusterIP", &a, &[Pod::B1, Pod::R1], |_| Pod::Client.ip(), 0.1, 0.9);

    // Cases 70, 71: no local endpoint. Dropped from outside (not refused: the client retries and
    // the load balancer's health check takes the node out), still served to pods.
    let quick = Duration::from_millis(400);
    assert_dropped("ext -> node port without local endpoints", &ext.probe(Tcp, NODE_IP, 30081, 3, quick));
    assert_dropped("ext -> LB IP without local endpoints", &ext.probe(Tcp, lb2, 80, 3, quick));
    let a = client.probe(Tcp, lb2, 80, 5, T1);
    expect_answer(&a, Pod::R1, Pod::Client.ip()).unwrap_or_else(|e| panic!("pod -> LB IP of remote-only service: {e}"));
}

/// Cases 82-84: internalTrafficPolicy Local. ClusterIP traffic goes to this node's endpoint only;
/// when the node has none left, it is dropped (not refused) although r1 still serves; NodePort
/// traffic of the same Service is not affected (case 87).
fn internal_traffic_policy_local_uses_only_local_endpoints(mode: Mode) {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 90);
    let svc = Service::cluster_ip("itp", cip)
        .port("http", Tcp, 80, ECHO_TCP)
        .node_port(30090)
        .spec("internalTrafficPolicy: Local");
    let slice = || Slice::of("itp").port("http", Tcp, ECHO_TCP);
    t.apply(&svc, &slice().endpoints(&[Pod::B1, Pod::B2, Pod::R1]));
    let mut k = t.kproxy_in(mode, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    let a = client.probe(Tcp, cip, 80, 60, T1);
    assert_spread("pod -> ClusterIP, iTP Local", &a, &[Pod::B1, Pod::B2], |_| Pod::Client.ip(), 0.2, 0.8);
    let a = t.prober(Host::Node).probe(Tcp, cip, 80, 20, T1);
    assert_spread("node -> ClusterIP, iTP Local", &a, &[Pod::B1, Pod::B2], |_| NODE_BRIDGE_IP, 0.05, 0.95);
    let a = t.prober(Host::Ext).probe(Tcp, NODE_IP, 30090, 40, T1);
    assert_spread(
        "ext -> node port (cluster policy)",
        &a,
        &[Pod::B1, Pod::B2, Pod::R1],
        |p| p.masqueraded_src(),
        0.05,
        0.9,
    );

    t.apply(&svc, &slice().endpoint(Pod::R1));
    let (_, took) = poll("ClusterIP dropped once the local endpoints are gone", Duration::from_secs(4), || {
        let a = client.probe(Tcp, cip, 80, 2, Duration::from_millis(300));
        a.iter().all(|a| a.outcome == Outcome::Timeout).then_some(()).ok_or_else(|| format!("{:?}", tally(&a)))
    });
    eprintln!("drop in effect after {took:?}");
    let a = t.prober(Host::Ext).probe(Tcp, NODE_IP, 30090, 5, T1);
    expect_answer(&a, Pod::R1, Pod::R1.masqueraded_src()).unwrap_or_else(|e| panic!("node port, remote only: {e}"));
}

/// Cases 52-57: loadBalancerSourceRanges. ext (203.0.113.2) is inside the first Service's range
/// and reaches its LB IP; a pod is not (dropped before DNAT, case 55) but reaches the node port,
/// which is never filtered (case 52); the node's own address is inside a range, so the node gets
/// through too (case 56). The second Service's range leaves ext and the node out: dropped (54,
/// 57), while its node port still answers.
fn load_balancer_source_ranges_allow_and_deny(mode: Mode) {
    let t = Topo::new();
    let lb2 = Ipv4Addr::new(198, 51, 100, 12);
    t.apply(
        &Service::cluster_ip("fw-allow", ip(172, 30, 0, 100))
            .port("http", Tcp, 80, ECHO_TCP)
            .node_port(30100)
            .load_balancer_ip(LB_IP)
            .spec("loadBalancerSourceRanges: [' 203.0.113.0/25', 192.168.0.0/24]"),
        &Slice::of("fw-allow").port("http", Tcp, ECHO_TCP).endpoint(Pod::B1),
    );
    t.apply(
        &Service::cluster_ip("fw-deny", ip(172, 30, 0, 101))
            .port("http", Tcp, 80, ECHO_TCP)
            .node_port(30101)
            .load_balancer_ip(lb2)
            .spec("loadBalancerSourceRanges: [203.0.113.128/25]"),
        &Slice::of("fw-deny").port("http", Tcp, ECHO_TCP).endpoint(Pod::B1),
    );
    let mut k = t.kproxy_in(mode, &[]);
    let mut ext = t.prober(Host::Ext);
    await_answer(&mut k, &mut ext, Tcp, LB_IP, 80);
    let quick = Duration::from_millis(400);
    expect_answer(&ext.probe(Tcp, LB_IP, 80, 10, T1), Pod::B1, NODE_BRIDGE_IP).expect("ext inside the range");
    assert_dropped("ext outside the range -> LB IP", &ext.probe(Tcp, lb2, 80, 3, quick));
    expect_answer(&ext.probe(Tcp, NODE_IP, 30101, 5, T1), Pod::B1, NODE_BRIDGE_IP).expect("node port unfiltered");

    let mut client = t.prober(Host::Pod(Pod::Client));
    assert_dropped("pod outside the range -> LB IP", &client.probe(Tcp, LB_IP, 80, 3, quick));
    expect_answer(&client.probe(Tcp, NODE_IP, 30100, 5, T1), Pod::B1, NODE_BRIDGE_IP).expect("pod -> node port");

    let mut node = t.prober(Host::Node);
    expect_answer(&node.probe(Tcp, LB_IP, 80, 5, T1), Pod::B1, NODE_BRIDGE_IP).expect("node inside a range");
    assert_dropped("node outside the range -> LB IP", &node.probe(Tcp, lb2, 80, 3, quick));
}

/// Cases 88-90: sessionAffinity ClientIP. 50 new connections from one pod to the ClusterIP all
/// land on one backend of three; the same client through the node port lands there too (the
/// affinity is per service port, across its IPs); once the timeout passed without a new
/// connection, the kernel has dropped the client's entry (case 89).
fn client_ip_affinity_sticks_across_connections_and_service_ips(mode: Mode) {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 110);
    t.apply(
        &Service::cluster_ip("sticky", cip)
            .port("http", Tcp, 80, ECHO_TCP)
            .node_port(30110)
            .spec("sessionAffinity: ClientIP")
            .spec("sessionAffinityConfig: {clientIP: {timeoutSeconds: 3}}"),
        &Slice::of("sticky").port("http", Tcp, ECHO_TCP).endpoints(&[Pod::B1, Pod::B2, Pod::R1]),
    );
    let mut k = t.kproxy_in(mode, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    let a = client.probe(Tcp, cip, 80, 50, T1);
    let counts = tally(&a);
    assert_eq!(counts.len(), 1, "50 connections from one client must reach one backend: {counts:?}");
    let backend = Pod::by_name(a[0].backend().expect("answered")).unwrap();
    expect_answer(&a, backend, Pod::Client.ip()).unwrap();
    let a = client.probe(Tcp, NODE_IP, 30110, 10, T1);
    expect_answer(&a, backend, backend.masqueraded_src())
        .unwrap_or_else(|e| panic!("same client via the node port: {e}"));

    if mode.is_iptables() {
        // iptables mode keeps affinity in `-m recent` lists, one per endpoint chain: exactly one
        // list (the chosen endpoint's) holds the client. xt_recent entries are not reaped by a
        // timer, only by `--reap` when a packet is checked, so unlike nftables mode's set
        // timeouts the entry stays listed after the timeout (upstream behaviour); it just no
        // longer matches, which case 89 is about and which a single client cannot prove apart
        // from chance.
        let lists = t.cmd(Host::Node, "sh").args(["-c", "grep -l . /proc/net/xt_recent/KUBE-SEP-*"]).output().unwrap();
        let lists = String::from_utf8_lossy(&lists.stdout).into_owned();
        let holding: Vec<&str> = lists.lines().collect();
        let content = t.cmd(Host::Node, "sh").args(["-c", "cat /proc/net/xt_recent/KUBE-SEP-*"]).output().unwrap();
        let content = String::from_utf8_lossy(&content.stdout).into_owned();
        assert_eq!(holding.len(), 1, "one recent list holds the client: {lists}\n{content}");
        assert_eq!(content.matches(&format!("src={} ", Pod::Client.ip())).count(), 1, "{content}");
        return;
    }
    // The kernel holds exactly one entry for the client, in the chosen endpoint's set.
    let sets = || String::from_utf8_lossy(&t.nft(&["list", "sets", "ip"]).stdout).into_owned();
    let listing = sets();
    assert_eq!(listing.matches(&Pod::Client.ip().to_string()).count(), 1, "{listing}");
    let (_, took) = poll("the client's affinity entry expires", Duration::from_secs(6), || {
        let l = sets();
        (!l.contains(&Pod::Client.ip().to_string())).then_some(()).ok_or(l)
    });
    eprintln!("affinity entry gone {took:?} after the last connection (timeout 3 s)");
    assert!(took >= Duration::from_secs(1), "the entry went away too early: {took:?}");
}

// ------------------------------------------------------------------------------------------------
// IPv6 (cases 99, 100): a small topology of its own, since tests/support/topo.rs is IPv4-only.

/// An IPv6 echo server: answers TCP 8080 and UDP 8053 with "<name> <source address>".
const SERVE6_PY: &str = r#"
import socket, sys, threading
name = sys.argv[1]
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("::", 8080)); t.listen(256)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::", 8053))
def tcp():
    while True:
        c, a = t.accept()
        try: c.sendall(f"{name} {a[0]}\n".encode())
        finally: c.close()
def udp():
    while True:
        _, a = u.recvfrom(2048); u.sendto(f"{name} {a[0]}\n".encode(), a)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"#;

/// `probe6.py PROTO IP PORT COUNT TIMEOUT`: one line per new connection, `ok NAME SRC` or the error.
const PROBE6_PY: &str = r#"
import socket, sys
proto, ip, port, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
for _ in range(count):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        if proto == "udp": s.send(b"x")
        d = s.recv(2048).decode().split()
        print(f"ok {d[0]} {d[1]}")
    except ConnectionRefusedError: print("refused")
    except socket.timeout: print("timeout")
    except OSError as e: print(f"error {e.errno}")
    finally: s.close()
"#;

/// Namespaces, servers and kproxy of the IPv6 test; all removed on drop.
struct V6Topo {
    id: String,
    dir: std::path::PathBuf,
    children: Vec<std::process::Child>,
}

impl V6Topo {
    fn ns(&self, h: &str) -> String {
        format!("{}-{h}", self.id)
    }
    fn run(&self, h: &str, args: &[&str]) {
        let out = std::process::Command::new("ip").args(["netns", "exec", &self.ns(h)]).args(args).output().unwrap();
        assert!(out.status.success(), "{h}: {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    /// `count` new connections, each given `timeout_s` seconds: 3 where an answer is expected (a
    /// SYN lost once on this shared machine is resent after 1 s, which a 1 s timeout reported as a
    /// failure), 1 where none is.
    fn probe(&self, h: &str, proto: &str, ip: &str, port: u16, count: usize, timeout_s: u32) -> Vec<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns(h), "python3", "-c", PROBE6_PY, proto, ip, &port.to_string()])
            .args([count.to_string(), timeout_s.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }
}

impl Drop for V6Topo {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in ["node", "client", "b1", "b2", "ext"] {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns(h)]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Cases 99, 100: an IPv6 ClusterIP from a pod (source kept, both backends) and an IPv6 NodePort
/// from an off-cluster host (masqueraded), programmed by kproxy in `table ip6 kube-proxy`
/// (nftables mode) or with ip6tables-restore (iptables mode).
///
/// ```text
///  client fd00:10:1::2 ── fd00:10:1::1 [node] fd00:10:2::1 ── b1 fd00:10:2::11
///                          2001:db8::1 │      fd00:10:3::1 ── b2 fd00:10:3::11
///                         ext 2001:db8::2
/// ```
fn ipv6_cluster_ip_and_node_port(mode: Mode) {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // `kpp<pid>-`, as topo.rs names its own: its sweep of dead test processes' namespaces parses
    // the pid there (with `kpp6<pid>` it read 6<pid>, found no such process and deleted this
    // test's namespaces under it when another test started first).
    let id = format!("kpp{}-v6-{}", std::process::id(), SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let mut t = V6Topo { id, dir, children: vec![] };
    for h in ["node", "client", "b1", "b2", "ext"] {
        let out = std::process::Command::new("ip").args(["netns", "add", &t.ns(h)]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        t.run(h, &["ip", "link", "set", "lo", "up"]);
        // No duplicate address detection on any address, the link-local ones included (`nodad`
        // below covers only the addresses added by hand): nothing here is tentative.
        for scope in ["all", "default"] {
            t.run(h, &["sysctl", "-q", "-w", &format!("net.ipv6.conf.{scope}.accept_dad=0")]);
        }
    }
    t.run("node", &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
    // (link on the node, peer namespace, node address, peer address)
    let links = [
        ("vc", "client", "fd00:10:1::1", "fd00:10:1::2"),
        ("vb1", "b1", "fd00:10:2::1", "fd00:10:2::11"),
        ("vb2", "b2", "fd00:10:3::1", "fd00:10:3::11"),
        ("ext0", "ext", "2001:db8::1", "2001:db8::2"),
    ];
    for (link, peer, node_ip, peer_ip) in links {
        t.run("node", &["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", &t.ns(peer)]);
        // nodad: addresses are usable at once, not after duplicate address detection.
        t.run("node", &["ip", "-6", "addr", "add", &format!("{node_ip}/64"), "dev", link, "nodad"]);
        t.run("node", &["ip", "link", "set", link, "up"]);
        t.run(peer, &["ip", "-6", "addr", "add", &format!("{peer_ip}/64"), "dev", "eth0", "nodad"]);
        t.run(peer, &["ip", "link", "set", "eth0", "up"]);
        t.run(peer, &["ip", "-6", "route", "add", "default", "via", node_ip]);
    }
    // As in topo.rs, the node's default route leads out (to ext), so an address no rule claims
    // is routed, and filtered, instead of failing the route lookup.
    t.run("node", &["ip", "-6", "route", "add", "default", "via", "2001:db8::2"]);
    for b in ["b1", "b2"] {
        let mut c = std::process::Command::new("ip")
            .args(["netns", "exec", &t.ns(b), "python3", "-c", SERVE6_PY, b])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.as_mut().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        t.children.push(c);
    }
    let manifests = "apiVersion: v1
kind: Node
metadata: {name: node6}
status: {addresses: [{type: InternalIP, address: '2001:db8::1'}]}
---
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: 'fd00:172:30::10'
  clusterIPs: ['fd00:172:30::10']
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 8053, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web6-abc, namespace: default, labels: {kubernetes.io/service-name: web6}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 8053, protocol: UDP}]
endpoints:
- {addresses: ['fd00:10:2::11'], nodeName: node6}
- {addresses: ['fd00:10:3::11'], nodeName: node6}
";
    std::fs::write(t.dir.join("manifests/web6.yaml"), manifests).unwrap();
    let log = std::fs::File::create(t.dir.join("kproxy.log")).unwrap();
    let k = std::process::Command::new("ip")
        .args(["netns", "exec", &t.ns("node"), env!("CARGO_BIN_EXE_kproxy")])
        .args(["--manifests", &t.dir.join("manifests").to_string_lossy(), "--hostname-override", "node6"])
        .args(["--cluster-cidr", "10.0.0.0/8,fd00:10::/32", "--iptables-min-sync-period", "0s"])
        .args(["--proxy-mode", if mode.is_iptables() { "iptables" } else { "nftables" }])
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    t.children.push(k);
    let log = || std::fs::read_to_string(t.dir.join("kproxy.log")).unwrap_or_default();

    let cip = "fd00:172:30::10";
    // Wait until both backends have answered once, so the counts below start with every
    // neighbour entry on the way resolved.
    let mut answered = BTreeSet::new();
    poll("an IPv6 answer from both backends", FIRST_SYNC, || {
        let r = t.probe("client", "tcp", cip, 80, 1, 1);
        if let Some(b) = r.first().filter(|l| l.starts_with("ok ")).and_then(|l| l.split_whitespace().nth(1)) {
            answered.insert(b.to_string());
        }
        (answered.len() == 2).then_some(()).ok_or_else(|| format!("{r:?} {answered:?}\n{}", log()))
    });
    let seen = |lines: &[String], srcs: &[(&str, &str)], what: &str| {
        let mut backends = BTreeSet::new();
        for l in lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() == 3 && f[0] == "ok", "{what}: {l:?} in {lines:?}\n{}", log());
            let want = srcs.iter().find(|(b, _)| *b == f[1]).unwrap_or_else(|| panic!("{what}: backend {}", f[1])).1;
            assert_eq!(f[2], want, "{what}: source seen by {}", f[1]);
            backends.insert(f[1].to_string());
        }
        assert_eq!(backends.len(), 2, "{what}: both backends must answer: {lines:?}");
    };
    // Case 99: from a pod, the source is kept.
    let pod = [("b1", "fd00:10:1::2"), ("b2", "fd00:10:1::2")];
    seen(&t.probe("client", "tcp", cip, 80, 40, 3), &pod, "pod -> [ClusterIP]:80");
    seen(&t.probe("client", "udp", cip, 53, 40, 3), &pod, "pod -> [ClusterIP]:53/udp");
    // Case 100: from outside to the node port on the Node's InternalIP, masqueraded to the node's
    // address on the backend's link.
    let masq = [("b1", "fd00:10:2::1"), ("b2", "fd00:10:3::1")];
    seen(&t.probe("ext", "tcp", "2001:db8::1", 30080, 40, 3), &masq, "ext -> [2001:db8::1]:30080");
    seen(&t.probe("ext", "udp", "2001:db8::1", 30053, 40, 3), &masq, "ext -> [2001:db8::1]:30053/udp");
    // A ClusterIP port the Service does not have is rejected with ICMPv6 port unreachable (as
    // upstream): a UDP client sees the refusal. A TCP client in SYN-SENT does not act on it on this
    // kernel (6.18: the ICMPv6 error arrives, connect() still times out), so TCP only shows "never
    // answered".
    if mode.is_iptables() {
        // Upstream's iptables mode has no rule for unserved ClusterIP ports: routed out of the
        // default route and never answered.
        assert_eq!(t.probe("client", "udp", cip, 54, 1, 1), vec!["timeout"], "{}", log());
    } else {
        assert_eq!(t.probe("client", "udp", cip, 54, 1, 1), vec!["refused"], "{}", log());
    }
    assert!(!t.probe("client", "tcp", cip, 81, 1, 1)[0].starts_with("ok"), "{}", log());
}

// ------------------------------------------------------------------------------------------------
// UDP conntrack cleanup (cases 102, 105)

/// Issue 4 "a UDP client sending continuously from one source port to a ClusterIP keeps being
/// answered within 2 s after its endpoint is removed" (case 102): the removed backend keeps
/// running, so without kproxy's conntrack cleanup the flow would stay pinned to it for good.
fn udp_flow_moves_to_a_remaining_endpoint_when_its_endpoint_is_removed(mode: Mode) {
    use std::io::BufRead as _;
    let t = Topo::new();
    let cip = ip(172, 30, 0, 120);
    let svc = Service::cluster_ip("udpflow", cip).port("dns", Udp, 53, ECHO_UDP);
    let slice = || Slice::of("udpflow").port("dns", Udp, ECHO_UDP);
    t.apply(&svc, &slice().endpoints(&[Pod::B1, Pod::B2]));
    let mut k = t.kproxy_in(mode, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Udp, cip, 53);

    let mut child = t
        .cmd(Host::Pod(Pod::Client), "python3")
        .args(["-c", ONE_PORT_PY, &cip.to_string(), "53"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = KillOnDrop(child);
    // The flow settles on one backend: 5 answers in a row from it.
    let next = |limit: Duration| lines.recv_timeout(limit).expect("the UDP client stopped printing").1;
    let (mut first, mut run) = (String::new(), 0);
    while run < 5 {
        let l = next(Duration::from_secs(5));
        run = if l == first { run + 1 } else { 1 };
        first = l;
    }
    let gone = Pod::by_name(&first).unwrap_or_else(|| panic!("answer {first:?}"));
    let stays = if gone == Pod::B1 { Pod::B2 } else { Pod::B1 };

    let removed = Instant::now();
    t.apply(&svc, &slice().endpoint(stays));
    // Every datagram is answered, by the old backend until the flow is deleted, then by the
    // remaining one for good; the switch comes within 2 s.
    let mut switched = None;
    let mut since_switch = 0;
    while since_switch < 10 {
        assert!(removed.elapsed() < Duration::from_secs(5), "the flow never moved to {}:\n{}", stays.name(), k.log());
        let (at, l) = lines.recv_timeout(Duration::from_secs(2)).expect("the UDP client stopped printing");
        if l == stays.name() {
            switched.get_or_insert(at);
            since_switch += 1;
        } else if l == gone.name() {
            assert!(switched.is_none(), "back to the removed backend {l} after the switch");
        } else {
            // One lost datagram at the switch is allowed (the one in flight when the flow went).
            assert!(l == "-" && switched.is_none(), "unexpected answer {l:?}");
        }
    }
    let took = switched.unwrap().duration_since(removed);
    eprintln!("UDP flow answered by {} {took:?} after {} was removed", stays.name(), gone.name());
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    assert!(k.log().contains("deleted stale UDP conntrack entries"), "{}", k.log());
}

// ------------------------------------------------------------------------------------------------
// Health check node port (cases 76, 77, 80, 81)

/// `GET http://IP:PORT/any` from a namespace: `(status, weight header, body)`, or `None` when
/// the connection is refused or fails.
fn hc_get(t: &Topo, h: Host, addr: Ipv4Addr, port: u16) -> Option<(u16, String, String)> {
    const GET_PY: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
    s.sendall(b"GET /whatever HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    d = b""
    while True:
        c = s.recv(4096)
        if not c: break
        d += c
    print(d.decode())
except OSError as e:
    print("ERR", e)
"#;
    let out = t.cmd(h, "python3").args(["-c", GET_PY, &addr.to_string(), &port.to_string()]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = s.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let weight = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("x-load-balancing-endpoint-weight:").map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    Some((code, weight, body.trim().to_string()))
}

/// Cases 76, 77, 80, 81: an eTP=Local Service's health check node port answers on the node's
/// primary IP (not on another node address) with 200 and the local endpoint count, 503 once the
/// only local endpoint is gone, and is closed when the Service goes.
#[test]
fn health_check_node_port_follows_the_local_endpoints() {
    let t = Topo::new();
    let hc = 30210;
    let svc = Service::cluster_ip("hc", ip(172, 30, 0, 130))
        .port("http", Tcp, 80, ECHO_TCP)
        .node_port(30130)
        .load_balancer_ip(LB_IP)
        .spec("externalTrafficPolicy: Local")
        .spec(&format!("healthCheckNodePort: {hc}"));
    let slice = || Slice::of("hc").port("http", Tcp, ECHO_TCP);
    t.apply(&svc, &slice().endpoints(&[Pod::B1, Pod::R1]));
    let mut k = t.kproxy(&[]);
    let get = || hc_get(&t, Host::Ext, NODE_IP, hc);
    let (r, _) = poll("the health check node port answers 200", FIRST_SYNC, || {
        k.assert_running();
        match get() {
            Some(r) if r.0 == 200 => Ok(r),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(r.1, "1", "weight header: {r:?}");
    assert_eq!(
        r.2,
        "{\n  \"service\": {\n    \"namespace\": \"default\",\n    \"name\": \"hc\"\n  },\n  \"localEndpoints\": 1,\n  \"serviceProxyHealthy\": true\n}"
    );
    // Case 80: only the Node's primary IP (the nftables default `primary`), not the node's other
    // addresses.
    assert_eq!(hc_get(&t, Host::Ext, NODE_EXT_IP, hc), None);
    // Case 77: no local ready endpoint left.
    t.apply(&svc, &slice().endpoint(Pod::R1));
    let (r, took) = poll("503 without a local endpoint", Duration::from_secs(4), || match get() {
        Some(r) if r.0 == 503 => Ok(r),
        other => Err(format!("{other:?}")),
    });
    assert!(r.2.contains("\"localEndpoints\": 0") && r.1 == "0", "{r:?}");
    eprintln!("health check said 503 {took:?} after the local endpoint went");
    // Case 81: the Service is deleted: the listener closes.
    t.remove_manifest("hc.yaml");
    poll("the health check node port closes", Duration::from_secs(4), || match get() {
        None => Ok(()),
        Some(r) => Err(format!("{r:?}")),
    });
}

/// Cases 91-92: zone hints. The node is labelled zone-a; of three ready local endpoints, b1 and b2
/// are hinted for zone-a and b3 for zone-b, so every connection from the client lands on b1 or b2.
/// Then b3 loses its hints: not every endpoint has hints, so upstream ignores them all and b3
/// must get traffic again within 2 s.
fn zone_hints_keep_traffic_in_the_zone_until_an_endpoint_lacks_hints(mode: Mode) {
    let t = Topo::new();
    t.write_manifest(
        "nodes.yaml",
        &[
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n  labels:\n    \
                 topology.kubernetes.io/zone: zone-a\nstatus:\n  addresses:\n  \
                 - {{type: InternalIP, address: {NODE_IP}}}\n  - {{type: Hostname, address: {NODE}}}\n"
            ),
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE2}\n  labels:\n    \
                 topology.kubernetes.io/zone: zone-b\nstatus:\n  addresses:\n  \
                 - {{type: InternalIP, address: {NODE2_IP}}}\n  - {{type: Hostname, address: {NODE2}}}\n"
            ),
        ],
    );
    let cip = ip(172, 30, 0, 91);
    let svc = Service::cluster_ip("zoned", cip).port("http", Tcp, 80, ECHO_TCP);
    let slice = || Slice::of("zoned").port("http", Tcp, ECHO_TCP);
    t.apply(
        &svc,
        &slice()
            .endpoint_in_zone(Pod::B1, "zone-a")
            .endpoint_in_zone(Pod::B2, "zone-a")
            .endpoint_in_zone(Pod::B3, "zone-b"),
    );
    let mut k = t.kproxy_in(mode, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    let a = client.probe(Tcp, cip, 80, 200, T1);
    assert_spread("zone hints for zone-a", &a, &[Pod::B1, Pod::B2], |_| Pod::Client.ip(), 0.3, 0.7);

    // Case 92: one endpoint without hints disables topology for the whole service.
    t.apply(&svc, &slice().endpoint_in_zone(Pod::B1, "zone-a").endpoint_in_zone(Pod::B2, "zone-a").endpoint(Pod::B3));
    let (_, took) = poll("b3 answers once it lacks hints", Duration::from_secs(2), || {
        k.assert_running();
        let a = client.probe(Tcp, cip, 80, 10, Duration::from_millis(300));
        tally(&a).contains_key(Pod::B3.name()).then_some(()).ok_or_else(|| format!("{:?}", tally(&a)))
    });
    eprintln!("hints ignored after {took:?}");
    let a = client.probe(Tcp, cip, 80, 90, T1);
    assert_spread("one endpoint without hints", &a, &[Pod::B1, Pod::B2, Pod::B3], |_| Pod::Client.ip(), 0.15, 0.55);
}

// ------------------------------------------------------------------------------------------------
// iptables mode only: mode switches, restore failures, canaries, --cleanup of both modes

/// What `mode`'s rules leave behind that the other mode must remove: nftables mode's
/// `table ip kube-proxy`, iptables mode's KUBE-* chains and jumps. `KUBE-FIREWALL` is allowed to
/// stay: upstream never deletes it, since it guards `route_localnet=1`, which stays set.
fn leftovers_of(t: &Topo, mode: Mode) -> Vec<String> {
    if mode.is_iptables() {
        t.kube_iptables_lines().into_iter().filter(|l| !l.contains("KUBE-FIREWALL")).collect()
    } else if t.has_kube_proxy_table() {
        vec!["table ip kube-proxy".to_string()]
    } else {
        vec![]
    }
}

/// Issue 7: nftables → iptables → nftables under a client opening a connection every 20 ms. Each
/// new process programs its own mode first and then removes the other mode's rules, so there is
/// no moment without rules: not one connection may fail, and after each switch nothing of the
/// other mode is left (`nft list tables`, `iptables-save | grep KUBE-`, both flavours).
#[test]
fn mode_switch_under_traffic_loses_no_connection_and_leaves_nothing_behind() {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 140);
    t.apply(
        &Service::cluster_ip("switch", cip).port("http", Tcp, 80, ECHO_TCP),
        &Slice::of("switch").port("http", Tcp, ECHO_TCP).endpoints(&[Pod::B1, Pod::B2]),
    );
    let mut k = t.kproxy_in(Mode::Nftables, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    drop(client);
    let lp = t.traffic_loop(Host::Pod(Pod::Client), Tcp, cip, 80, Duration::from_millis(20), T1);
    lp.wait_more(10, Duration::from_secs(5));
    for (to, from) in [(Mode::Iptables, Mode::Nftables), (Mode::Nftables, Mode::Iptables)] {
        k.terminate();
        k = t.kproxy_in(to, &[]);
        let (_, took) = poll(&format!("{from:?} rules gone after the switch to {to:?}"), FIRST_SYNC, || {
            k.assert_running();
            let ours =
                if to.is_iptables() { t.iptables_save(to).contains(":KUBE-SVC-") } else { t.has_kube_proxy_table() };
            let left = leftovers_of(&t, from);
            (ours && left.is_empty()).then_some(()).ok_or_else(|| format!("ours programmed: {ours}; left: {left:?}"))
        });
        eprintln!("switched to {to:?}, {from:?} rules removed after {took:?}");
        lp.wait_more(20, Duration::from_secs(5));
    }
    assert_all_answered("pod -> ClusterIP", &lp.stop(), "");
    assert!(!t.kube_iptables_lines().iter().any(|l| l.contains("KUBE-SVC-")), "{:?}", t.kube_iptables_lines());
}

/// The node's metrics (`/metrics` on 127.0.0.1:10249 in the node namespace).
fn node_metrics(t: &Topo) -> String {
    const GET_PY: &str =
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:10249/metrics', timeout=2).read().decode())";
    let out = t.cmd(Host::Node, "python3").args(["-c", GET_PY]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of one sample (`name{labels}` exactly as exported), 0 when absent.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A restore that fails: someone else's chain jumps to the endpoint chain of b2, so deleting
/// that chain when b2 leaves the Service fails the nat table's restore. The error names the
/// failing line (`-X KUBE-SEP-…`, marked, with its neighbours); the nat table is atomic, so the
/// kernel keeps the old rules and b2 still gets traffic; the failure is counted (partial, then
/// full), the retries are full; once the foreign reference goes, a full restore deletes the
/// stale chain and only b1 answers.
#[test]
fn a_failed_restore_names_the_line_keeps_the_old_rules_and_the_next_sync_is_full() {
    let t = Topo::new();
    let mode = Mode::Iptables;
    let cip = ip(172, 30, 0, 150);
    let svc = Service::cluster_ip("fail", cip).port("http", Tcp, 80, ECHO_TCP);
    let slice = || Slice::of("fail").port("http", Tcp, ECHO_TCP);
    t.apply(&svc, &slice().endpoints(&[Pod::B1, Pod::B2]));
    let mut k = t.kproxy_in(mode, &["--iptables-sync-period", "1s"]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    let save = t.iptables_save(mode);
    let b2_dnat = format!("--to-destination {}:{ECHO_TCP}", Pod::B2.ip());
    let sep = save
        .lines()
        .find(|l| l.starts_with("-A KUBE-SEP-") && l.contains(&b2_dnat))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no endpoint chain for b2:\n{save}"))
        .to_string();
    t.iptables(mode, &["-t", "nat", "-N", "FOREIGN-REF"]);
    t.iptables(mode, &["-t", "nat", "-A", "FOREIGN-REF", "-j", &sep]);

    t.apply(&svc, &slice().endpoint(Pod::B1));
    let marked = format!(": -X {sep}");
    let (_, took) = poll("the restore failure is logged with the failing line", Duration::from_secs(5), || {
        k.assert_running();
        let log = k.log();
        log.lines().any(|l| l.starts_with('>') && l.ends_with(&marked)).then_some(()).ok_or_else(|| "not yet".into())
    });
    eprintln!("restore failure logged after {took:?}");
    let log = k.log();
    assert!(log.contains("line") && log.contains("failed"), "{log}");
    // The kernel kept the old nat table: both endpoints still answer.
    let a = client.probe(Tcp, cip, 80, 30, T1);
    assert_spread("old rules kept after the failed restore", &a, &[Pod::B1, Pod::B2], |_| Pod::Client.ip(), 0.1, 0.9);
    // Counted as upstream does; the retry after the failure is a full sync (and fails too).
    poll("the failures are counted, the retry full", Duration::from_secs(5), || {
        let m = node_metrics(&t);
        let total = metric(&m, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"}");
        let partial =
            metric(&m, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"}");
        let full = metric(&m, "kproxy_syncs_total{ip_family=\"IPv4\",kind=\"full\",result=\"failure\"}");
        (partial == 1.0 && total >= 2.0 && full >= 1.0)
            .then_some(())
            .ok_or_else(|| format!("failures {total}, partial {partial}, full failures {full}"))
    });

    t.iptables(mode, &["-t", "nat", "-F", "FOREIGN-REF"]);
    t.iptables(mode, &["-t", "nat", "-X", "FOREIGN-REF"]);
    follows(&mut client, cip, 80, Expect::Backends(&[Pod::B1]), Instant::now());
    poll("the stale endpoint chain is deleted", Duration::from_secs(3), || {
        let save = t.iptables_save(mode);
        (!save.contains(&sep)).then_some(()).ok_or(save)
    });
    assert!(k.log().lines().rev().any(|l| l.contains("sync done") && l.contains("full=true")), "{}", k.log());
}

/// Upstream's canary: when something flushes the tables (here every nat chain, the canary
/// included), the next sync notices the missing KUBE-PROXY-CANARY and restores everything in
/// full: jump rules and chains. Legacy iptables, so that flavour is proven too.
#[test]
fn a_flushed_table_is_noticed_by_the_canary_and_restored_in_full() {
    let t = Topo::new();
    let mode = Mode::IptablesLegacy;
    let cip = ip(172, 30, 0, 160);
    t.apply(
        &Service::cluster_ip("canary", cip).port("http", Tcp, 80, ECHO_TCP),
        &Slice::of("canary").port("http", Tcp, ECHO_TCP).endpoint(Pod::B1),
    );
    let mut k = t.kproxy_in(mode, &["--iptables-sync-period", "1s"]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    assert!(k.log().contains("using the legacy iptables binaries"), "{}", k.log());
    assert!(!t.iptables_save(Mode::Iptables).contains("KUBE-SVC-"), "rules went to the nft-backed tables");
    for table in ["mangle", "nat", "filter"] {
        let save = t.cmd(Host::Node, &mode.ipt("iptables-save")).args(["-t", table]).output().unwrap();
        assert!(String::from_utf8_lossy(&save.stdout).contains(":KUBE-PROXY-CANARY "), "no canary in {table}");
    }
    t.iptables(mode, &["-t", "nat", "-F"]);
    t.iptables(mode, &["-t", "nat", "-X"]);
    let flushed = Instant::now();
    let (_, took) = poll("traffic restored after the flush", Duration::from_secs(5), || {
        k.assert_running();
        let a = client.one(Tcp, cip, 80, Duration::from_millis(300));
        a.backend().map(|_| ()).ok_or_else(|| format!("{:?}", a.outcome))
    });
    eprintln!("restored {took:?} after the flush ({:?} since)", flushed.elapsed());
    let save = t.iptables_save(mode);
    assert!(save.contains(":KUBE-PROXY-CANARY - [0:0]") && save.contains("-A PREROUTING"), "{save}");
    assert!(k.log().contains("KUBE-PROXY-CANARY chain is gone"), "{}", k.log());
}

/// `--cleanup` removes both modes' leftovers: nftables mode's tables, and iptables mode's chains
/// and jumps in both flavours (here kproxy's own in the nft-backed tables, and an upstream
/// kube-proxy's `KUBE-SERVICES` in the legacy ones), and nothing else: someone else's chain,
/// kubelet's hint chain and KUBE-FIREWALL stay. Idempotent.
#[test]
fn cleanup_removes_both_modes_leftovers_and_nothing_else() {
    let t = Topo::new();
    let cip = ip(172, 30, 0, 170);
    t.apply(
        &Service::cluster_ip("gone", cip).port("http", Tcp, 80, ECHO_TCP),
        &Slice::of("gone").port("http", Tcp, ECHO_TCP).endpoint(Pod::B1),
    );
    let mut k = t.kproxy_in(Mode::Iptables, &[]);
    let mut client = t.prober(Host::Pod(Pod::Client));
    await_answer(&mut k, &mut client, Tcp, cip, 80);
    k.terminate();
    expect_answer(&client.probe(Tcp, cip, 80, 3, T1), Pod::B1, Pod::Client.ip()).unwrap();
    t.nft_script("table ip kube-proxy {\n}\ntable ip6 kube-proxy {\n}\n");
    let legacy = Mode::IptablesLegacy;
    t.iptables(legacy, &["-t", "nat", "-N", "KUBE-SERVICES"]);
    t.iptables(
        legacy,
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
    );
    t.iptables(legacy, &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    t.iptables(Mode::Iptables, &["-t", "nat", "-N", "NOT-OURS"]);
    t.iptables(Mode::Iptables, &["-t", "nat", "-A", "NOT-OURS", "-j", "RETURN"]);
    for round in 1..=2 {
        let out = t.cmd(Host::Node, env!("CARGO_BIN_EXE_kproxy")).arg("--cleanup").output().unwrap();
        assert!(out.status.success(), "kproxy --cleanup (round {round}): {}", String::from_utf8_lossy(&out.stderr));
        let left: Vec<String> = leftovers_of(&t, Mode::Iptables)
            .into_iter()
            .filter(|l| !l.contains("KUBE-IPTABLES-HINT"))
            .chain(leftovers_of(&t, Mode::Nftables))
            .collect();
        assert!(left.is_empty(), "round {round}: left {left:?}");
        assert!(!t.nft(&["list", "table", "ip6", "kube-proxy"]).status.success(), "round {round}: ip6 table");
        let lines = t.kube_iptables_lines();
        assert!(lines.iter().any(|l| l.contains(":KUBE-IPTABLES-HINT")), "kubelet's hint chain deleted: {lines:?}");
        assert!(t.iptables_save(Mode::Iptables).contains("-A NOT-OURS -j RETURN"), "a foreign chain was touched");
    }
    let a = client.one(Tcp, cip, 80, Duration::from_millis(300));
    assert_eq!(a.outcome, Outcome::Timeout, "ClusterIP still handled after --cleanup");
}
