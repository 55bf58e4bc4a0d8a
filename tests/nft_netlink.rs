//! Privileged tests of the netlink backend: every transaction is applied through netlink in one
//! network namespace and through `nft -f` (its Display text) in another, and the two
//! `nft list table` outputs must be identical. Needs root (CI runs it as root).
//!
//! Set `KPXNL_DUMP_DIR=/some/dir` to also write each transaction's nft text and netlink batch
//! there, for byte-level comparison with what `nft` sends.

#[path = "support/nlns.rs"]
mod nlns;

use std::net::IpAddr;
use std::time::Instant;

use kproxy::backend::nftables::{encode, NftError, NftablesBackend};
use nlns::Netns;
use rules::ir::{DataType, ElemData, Element, Expr, Operand, Rule, Ruleset, Selector, SetDef, SetType, Value, Verdict};
use rules::model::*;
use rules::transaction::Op;
use rules::{build, diff, Transaction};

// ---------------------------------------------------------------------------------------------
// helpers

fn ip(s: &str) -> IpAddr {
    s.parse().expect("fixture IP")
}

fn dump(name: &str, tx: &Transaction) {
    if let Ok(dir) = std::env::var("KPXNL_DUMP_DIR") {
        std::fs::create_dir_all(&dir).expect("dump dir");
        std::fs::write(format!("{dir}/{name}.nft"), tx.to_string()).expect("dump text");
        std::fs::write(format!("{dir}/{name}.bin"), encode(tx).expect("encode")).expect("dump batch");
    }
}

/// Asserts two listings are identical, showing the first differing lines.
fn assert_same_listing(netlink: &str, nft: &str, what: &str) {
    if netlink == nft {
        return;
    }
    let (a, b): (Vec<&str>, Vec<&str>) = (netlink.lines().collect(), nft.lines().collect());
    let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    let lo = first.saturating_sub(3);
    panic!(
        "{what}: netlink listing differs from nft -f listing at line {}\n--- netlink ---\n{}\n--- nft -f ---\n{}\n",
        first + 1,
        a[lo..(first + 8).min(a.len())].join("\n"),
        b[lo..(first + 8).min(b.len())].join("\n"),
    );
}

/// A listing with the elements of every set in sorted order. Concatenated interval (pipapo) sets
/// list elements in insertion order, and nft 1.0.6 reorders consecutive `add element` commands of
/// one set when it collapses them into one message (the first, then the rest last to first), so
/// the same elements list in another order than netlink's one message sends them.
fn sorted_elements(listing: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut elems: Option<(String, Vec<String>)> = None;
    for line in listing.lines() {
        let t = line.trim();
        if let Some((indent, v)) = elems.as_mut() {
            let last = t.ends_with('}');
            v.push(t.trim_end_matches([',', '}']).trim().to_string());
            if last {
                v.sort();
                out.push(format!("{indent}elements = {{ {} }}", v.join(", ")));
                elems = None;
            }
            continue;
        }
        if let Some(rest) = t.strip_prefix("elements = { ") {
            let indent = line[..line.len() - line.trim_start().len()].to_string();
            let mut v = vec![rest.trim_end_matches([',', '}']).trim().to_string()];
            if rest.ends_with('}') {
                v.sort();
                out.push(format!("{indent}elements = {{ {} }}", v.join(", ")));
            } else {
                elems = Some((indent, v));
            }
            continue;
        }
        out.push(line.to_string());
    }
    out.join("\n")
}

/// Applies `tx` via netlink in one fresh namespace and via `nft -f` in another, and compares
/// `nft list table`. Returns the namespaces for further steps.
fn apply_both(name: &str, tx: &Transaction) -> (Netns, NftablesBackend, Netns) {
    dump(name, tx);
    let (x, y) = (Netns::new(), Netns::new());
    let mut be = x.backend().expect("open backend");
    let stats = be.apply(tx).unwrap_or_else(|e| panic!("{name}: netlink apply failed: {e}"));
    assert!(stats.messages >= tx.ops.len() + 2, "{name}: {stats:?}");
    y.nft_script(&tx.to_string()).unwrap_or_else(|e| panic!("{name}: nft -f failed: {e}\n{tx}"));
    let fam = tx.family.nft();
    let (a, b) = (x.list_table(fam), y.list_table(fam));
    assert!(!b.is_empty(), "{name}: nft -f produced no table");
    assert_same_listing(&a, &b, name);
    (x, be, y)
}

fn v4_cfg() -> BuildConfig {
    BuildConfig::new(Family::V4)
}

fn svc(ns: &str, name: &str, port_name: &str, proto: Protocol, ip: &str, port: u16) -> ServicePort {
    ServicePort::cluster_ip(ns, name, port_name, proto, ip, port)
}

fn add_eps(st: &mut ClusterState, sp: &ServicePort, eps: &[&str], port: u16) {
    for e in eps {
        st.add_endpoint(&sp.name, Endpoint::ready(e, port));
    }
}

// ---------------------------------------------------------------------------------------------
// fixtures

/// ClusterIP services over TCP, UDP and SCTP, with 0, 1, 2 and 12 endpoints.
fn cluster_ips() -> ClusterState {
    let mut st = ClusterState::default();
    let a = svc("ns1", "web", "http", Protocol::Tcp, "172.30.0.10", 80);
    st.add_service(a.clone());
    add_eps(&mut st, &a, &["10.180.0.1", "10.180.0.2"], 8080);
    let b = svc("ns1", "dns", "dns", Protocol::Udp, "172.30.0.11", 53);
    st.add_service(b.clone());
    add_eps(&mut st, &b, &["10.180.0.3"], 53);
    let c = svc("ns2", "sctp", "", Protocol::Sctp, "172.30.0.12", 9000);
    st.add_service(c.clone());
    let many: Vec<String> = (1..=12).map(|i| format!("10.181.0.{i}")).collect();
    add_eps(&mut st, &c, &many.iter().map(String::as_str).collect::<Vec<_>>(), 9000);
    st.add_service(svc("ns2", "empty", "p", Protocol::Tcp, "172.30.0.13", 443));
    st
}

/// NodePorts, LoadBalancer and external IPs, with and without endpoints.
fn external() -> ClusterState {
    let mut st = ClusterState::default();
    let a = svc("ns1", "np", "http", Protocol::Tcp, "172.30.1.1", 80)
        .with_node_port(30080)
        .with_load_balancer_ip("1.2.3.4")
        .with_load_balancer_ip("1.2.3.5")
        .with_external_ip("192.0.2.10");
    st.add_service(a.clone());
    add_eps(&mut st, &a, &["10.180.1.1", "10.180.1.2", "10.180.1.3"], 8080);
    let b = svc("ns1", "np-udp", "", Protocol::Udp, "172.30.1.2", 53).with_node_port(30053);
    st.add_service(b.clone());
    add_eps(&mut st, &b, &["10.180.1.4"], 5353);
    // No endpoints: NodePort, LB IP and external IP all go to the no-endpoint sets.
    let c = svc("ns3", "down", "p", Protocol::Tcp, "172.30.1.3", 8443)
        .with_node_port(30443)
        .with_load_balancer_ip("1.2.3.6")
        .with_external_ip("192.0.2.11");
    st.add_service(c);
    let d = svc("ns3", "sctp-np", "s", Protocol::Sctp, "172.30.1.4", 3868).with_node_port(31868);
    st.add_service(d.clone());
    add_eps(&mut st, &d, &["10.180.1.5", "10.180.1.6"], 3868);
    st
}

fn ipv6_state() -> ClusterState {
    let mut st = ClusterState::default();
    let a = svc("ns6", "web", "http", Protocol::Tcp, "fd00:30::10", 80)
        .with_node_port(30081)
        .with_load_balancer_ip("2001:db8::1")
        .with_external_ip("2001:db8::2");
    st.add_service(a.clone());
    add_eps(&mut st, &a, &["fd00:180::1", "fd00:180::2", "fd00:180::3"], 8080);
    let b = svc("ns6", "dns", "", Protocol::Udp, "fd00:30::11", 53).with_node_port(30054);
    st.add_service(b);
    let c = svc("ns6", "sctp", "x", Protocol::Sctp, "fd00:30::12", 9000);
    st.add_service(c.clone());
    add_eps(&mut st, &c, &["fd00:181::1"], 9000);
    st
}

/// Traffic policies (issue 4): eTP Local with local and remote endpoints (a local chain, the
/// external chain's `fib saddr type local` short-circuit), eTP Local with remote endpoints only
/// and iTP Local (the no-local-endpoint sets); known ServiceCIDRs (the service-cidrs set); ClientIP
/// affinity (endpoint chains with a fixed DNAT and a set update, dynamic timeout sets).
fn policies(fam: Family) -> ClusterState {
    let a = |v4: &str, v6: &str| if fam == Family::V4 { v4.to_string() } else { v6.to_string() };
    let mut st = ClusterState::default();
    let e = svc("ns7", "etp", "http", Protocol::Tcp, &a("172.30.7.1", "fd00:30::71"), 80)
        .with_node_port(30780)
        .with_load_balancer_ip(&a("1.2.3.7", "2001:db8::7"))
        .with_external_traffic_policy_local();
    st.add_service(e.clone());
    st.add_endpoint(&e.name, Endpoint::ready(&a("10.180.7.1", "fd00:180::71"), 8080).on_node("node-a"));
    st.add_endpoint(&e.name, Endpoint::ready(&a("10.180.7.2", "fd00:180::72"), 8080).on_node("node-b"));
    let r = svc("ns7", "remote", "", Protocol::Udp, &a("172.30.7.2", "fd00:30::72"), 53)
        .with_node_port(30753)
        .with_external_traffic_policy_local();
    st.add_service(r.clone());
    st.add_endpoint(&r.name, Endpoint::ready(&a("10.180.7.3", "fd00:180::73"), 53).on_node("node-b"));
    let i = svc("ns7", "itp", "p", Protocol::Tcp, &a("172.30.7.3", "fd00:30::73"), 443)
        .with_internal_traffic_policy_local();
    st.add_service(i.clone());
    st.add_endpoint(&i.name, Endpoint::ready(&a("10.180.7.4", "fd00:180::74"), 8443).on_node("node-b"));
    // ClientIP affinity: endpoint chains (numgen == 0 choice, fixed DNAT, set update) and their
    // dynamic timeout sets, in the cluster and the local chain.
    let s = svc("ns7", "sticky", "http", Protocol::Tcp, &a("172.30.7.4", "fd00:30::74"), 80)
        .with_node_port(30781)
        .with_external_traffic_policy_local()
        .with_session_affinity(10800);
    st.add_service(s.clone());
    for (i, node) in [(5, "node-a"), (6, "node-b"), (7, "node-a")] {
        st.add_endpoint(
            &s.name,
            Endpoint::ready(&a(&format!("10.180.7.{i}"), &format!("fd00:180::7{i}")), 8080).on_node(node),
        );
    }
    // ServiceCIDRs: the service-cidrs interval set, a prefix and a single address.
    st.service_cidrs = vec![Cidr::parse(&a("172.30.0.0/16", "fd00:30::/108")).unwrap()];
    st.service_cidrs.push(Cidr::parse(&a("10.96.0.10/32", "fd00:96::a/128")).unwrap());
    st
}

struct Fixture {
    name: &'static str,
    state: ClusterState,
    node_ips: Vec<IpAddr>,
    cfg: BuildConfig,
}

fn fixtures() -> Vec<Fixture> {
    let cidr = cidr8_node(Family::V4, "10.180.0.0/14");
    let cidr8 = cidr8_node(Family::V4, "10.0.0.0/8");
    let mut masq_all = v4_cfg();
    masq_all.masquerade_all = true;
    masq_all.masquerade_bit = 3;
    let mut all = v4_cfg();
    all.nodeport_addresses = NodePortAddresses::All;
    all.cluster_cidr = Some(Cidr::parse("10.180.0.0/16").unwrap());
    let mut v6 = BuildConfig::new(Family::V6);
    v6.cluster_cidr = Some(Cidr::parse("fd00:180::/64").unwrap());
    let mut v6_all = BuildConfig::new(Family::V6);
    v6_all.nodeport_addresses = NodePortAddresses::All;
    v6_all.cluster_cidr = Some(Cidr::parse("fd00:180::/63").unwrap());
    v6_all.masquerade_all = true;
    vec![
        Fixture { name: "clusterip-cidr14", state: cluster_ips(), node_ips: vec![ip("192.168.0.2")], cfg: cidr },
        Fixture { name: "clusterip-noip", state: cluster_ips(), node_ips: vec![], cfg: cidr8 },
        Fixture {
            name: "external-masq-all",
            state: external(),
            node_ips: vec![ip("192.168.0.2"), ip("192.168.1.2"), ip("127.0.0.1")],
            cfg: masq_all,
        },
        Fixture { name: "external-nodeport-all", state: external(), node_ips: vec![], cfg: all },
        Fixture { name: "empty-cluster", state: ClusterState::default(), node_ips: vec![], cfg: v4_cfg() },
        Fixture { name: "ipv6", state: ipv6_state(), node_ips: vec![ip("fd00::2")], cfg: v6 },
        Fixture { name: "ipv6-nodeport-all", state: ipv6_state(), node_ips: vec![], cfg: v6_all },
        Fixture {
            name: "policies",
            state: policies(Family::V4),
            node_ips: vec![ip("192.168.0.2")],
            cfg: {
                let mut c = cidr8_node(Family::V4, "10.0.0.0/8");
                c.node_name = "node-a".into();
                c.node_ip = Some(ip("192.168.0.2"));
                c
            },
        },
        Fixture {
            name: "policies-detect-bridge",
            state: policies(Family::V4),
            node_ips: vec![ip("192.168.0.2")],
            cfg: {
                let mut c = BuildConfig::new(Family::V4);
                c.local_detector = LocalDetector::Bridge("cbr0".into());
                c.node_name = "node-a".into();
                c
            },
        },
        Fixture {
            name: "policies-ipv6-detect-prefix",
            state: policies(Family::V6),
            node_ips: vec![ip("fd00::2")],
            cfg: {
                let mut c = BuildConfig::new(Family::V6);
                c.local_detector = LocalDetector::InterfacePrefix("veth".into());
                c.node_name = "node-a".into();
                c
            },
        },
        Fixture {
            name: "policies-ipv6",
            state: policies(Family::V6),
            node_ips: vec![ip("fd00::2")],
            cfg: {
                let mut c = cidr8_node(Family::V6, "fd00:180::/64");
                c.node_name = "node-a".into();
                c.node_ip = Some(ip("fd00::2"));
                c
            },
        },
    ]
}

fn cidr8_node(fam: Family, cidr: &str) -> BuildConfig {
    let mut c = BuildConfig::new(fam);
    c.cluster_cidr = Some(Cidr::parse(cidr).unwrap());
    c
}

fn build_rs(f: &Fixture) -> Ruleset {
    let b = build(&f.state, &f.node_ips, &f.cfg, None);
    assert!(b.skipped.is_empty(), "{}: {:?}", f.name, b.skipped);
    b.ruleset
}

/// Every IR construct that `build` does not produce (or only in one form), in one table:
/// interval sets with and without concatenation, ranges up to the maximum, prefixes of every
/// shape, negated lookups, `tcp dport` in keys, every verdict, data maps.
fn kitchen_sink(fam: Family) -> Transaction {
    let (a1, a2, a3, net, net_odd, host, zero) = match fam {
        Family::V4 => ("10.0.0.1", "10.0.0.2", "10.0.0.9", "10.1.0.0/16", "10.16.0.0/12", "10.1.2.3/32", "0.0.0.0/0"),
        Family::V6 => ("fd00::1", "fd00::2", "fd00::9", "fd00:1::/64", "fd00:10::/63", "fd00::3/128", "::/0"),
    };
    let addr = DataType::addr(fam);
    let typed = |name: &str, key: Vec<DataType>, data: Option<DataType>, interval: bool| SetDef {
        name: name.into(),
        set_type: SetType::Typed { key, data },
        interval,
    };
    let a = |s: &str| Value::Addr(ip(s));
    let prefix = |s: &str| Operand::Prefix(Cidr::parse(s).unwrap());
    let verdict = |v: Verdict| Some(ElemData::Verdict(v));
    let mut ops = vec![
        Op::AddTable,
        Op::DeleteTable,
        Op::AddTable,
        Op::AddSet(typed("addrs", vec![addr], None, false)),
        Op::AddSet(typed("ranges", vec![addr], None, true)),
        Op::AddSet(typed("ports", vec![DataType::InetService], None, true)),
        Op::AddSet(typed("protos", vec![DataType::InetProto], None, false)),
        Op::AddSet(typed("addr-port-ranges", vec![addr, DataType::InetService], None, true)),
        Op::AddSet(typed("pairs", vec![addr, addr], None, false)),
        Op::AddSet(typed("verdicts", vec![DataType::InetProto, DataType::InetService], Some(DataType::Verdict), false)),
        Op::AddSet(typed("port-to-addr", vec![DataType::InetService], Some(addr), false)),
        Op::AddSet(SetDef {
            name: "slots".into(),
            set_type: SetType::EndpointSlots { family: fam, proto: Protocol::Udp },
            interval: true,
        }),
        Op::AddSet(SetDef {
            name: "slots-plain".into(),
            set_type: SetType::EndpointSlots { family: fam, proto: Protocol::Sctp },
            interval: false,
        }),
        Op::AddChain { name: "target".into(), base: None },
        Op::AddChain { name: "c".into(), base: None },
    ];
    let rule = |exprs: Vec<Expr>| Op::AddRule { chain: "c".into(), rule: Rule::new(exprs) };
    let accept = Expr::Verdict(Verdict::Accept);
    let cmp = |sel, neq, right| Expr::Cmp { sel, neq, right };
    ops.extend([
        rule(vec![cmp(Selector::Saddr, true, prefix(net_odd)), accept.clone()]),
        rule(vec![cmp(Selector::Saddr, true, prefix(zero)), Expr::Verdict(Verdict::Drop)]),
        rule(vec![cmp(Selector::Daddr, false, prefix(net)), Expr::Verdict(Verdict::Return)]),
        rule(vec![cmp(Selector::Saddr, true, prefix(host)), Expr::Verdict(Verdict::Goto("target".into()))]),
        rule(vec![cmp(Selector::Daddr, false, Operand::Value(a(a1))), Expr::Verdict(Verdict::Jump("target".into()))]),
        rule(vec![cmp(Selector::L4Proto, true, Operand::Value(Value::Proto(Protocol::Udp))), accept.clone()]),
        rule(vec![cmp(Selector::ThDport, true, Operand::Value(Value::Port(53))), accept.clone()]),
        rule(vec![
            cmp(Selector::Dport(Protocol::Sctp), false, Operand::Value(Value::Port(3868))),
            Expr::FibDaddrLocal,
            accept.clone(),
        ]),
        rule(vec![
            Expr::InSet {
                key: vec![Selector::Daddr, Selector::Dport(Protocol::Tcp)],
                set: "addr-port-ranges".into(),
                neq: false,
            },
            accept.clone(),
        ]),
        rule(vec![
            Expr::InSet { key: vec![Selector::Saddr, Selector::Daddr], set: "pairs".into(), neq: true },
            Expr::InSet { key: vec![Selector::Daddr], set: "ranges".into(), neq: false },
            Expr::InSet { key: vec![Selector::ThDport], set: "ports".into(), neq: true },
            Expr::InSet { key: vec![Selector::L4Proto], set: "protos".into(), neq: false },
            accept.clone(),
        ]),
        rule(vec![Expr::Vmap { key: vec![Selector::L4Proto, Selector::ThDport], map: "verdicts".into() }]),
        rule(vec![Expr::CtStateNew, Expr::CtStatusDnat, Expr::MarkClear(0x10), Expr::MarkOr(0x4000), Expr::MarkXor(1)]),
        rule(vec![Expr::DnatSlots { proto: Protocol::Udp, modulus: 7, offset: 0, map: "slots".into() }]),
        rule(vec![Expr::DnatSlots { proto: Protocol::Sctp, modulus: 3, offset: 100, map: "slots-plain".into() }]),
        rule(vec![Expr::Masquerade]),
        rule(vec![Expr::Reject]),
        rule(vec![Expr::Iifname { name: "cbr0".into(), prefix: false, neq: false }, accept.clone()]),
        rule(vec![Expr::Iifname { name: "veth".into(), prefix: true, neq: true }, accept.clone()]),
        rule(vec![Expr::Iifname { name: "eth0.100-abcde".into(), prefix: false, neq: true }, accept.clone()]),
        rule(vec![Expr::Iifname { name: "l".into(), prefix: true, neq: false }, accept.clone()]),
    ]);
    let el = |key: Vec<Value>| Element::key(key);
    ops.extend([
        Op::AddElements {
            set: "addrs".into(),
            elements: vec![el(vec![a(a1)]).with_comment("one"), el(vec![a(a2)]).with_comment("a \"quoted\" one")],
        },
        Op::AddElements {
            set: "ranges".into(),
            elements: vec![
                el(vec![a(a1)]),
                Element { key: vec![a(a2)], key_end: Some(vec![a(a3)]), data: None, comment: Some("r".into()) },
            ],
        },
        Op::AddElements {
            set: "ports".into(),
            elements: vec![
                Element { key: vec![Value::Port(80)], key_end: Some(vec![Value::Port(90)]), data: None, comment: None },
                Element {
                    key: vec![Value::Port(91)],
                    key_end: Some(vec![Value::Port(100)]),
                    data: None,
                    comment: None,
                },
                el(vec![Value::Port(65535)]),
            ],
        },
        Op::AddElements { set: "protos".into(), elements: vec![el(vec![Value::Proto(Protocol::Sctp)])] },
        Op::AddElements {
            set: "addr-port-ranges".into(),
            // Single values only: the text form of a concatenated range (`a . b-c . d`) is not
            // nft syntax; `concatenated_ranges_list_like_nft` covers ranges.
            elements: vec![el(vec![a(a1), Value::Port(80)]), el(vec![a(a2), Value::Port(443)])],
        },
        Op::AddElements { set: "pairs".into(), elements: vec![el(vec![a(a1), a(a2)])] },
        Op::AddElements {
            set: "verdicts".into(),
            elements: vec![
                el(vec![Value::Proto(Protocol::Tcp), Value::Port(1)]).with_data(verdict(Verdict::Accept).unwrap()),
                el(vec![Value::Proto(Protocol::Tcp), Value::Port(2)]).with_data(verdict(Verdict::Drop).unwrap()),
                el(vec![Value::Proto(Protocol::Udp), Value::Port(3)]).with_data(verdict(Verdict::Return).unwrap()),
                el(vec![Value::Proto(Protocol::Udp), Value::Port(4)])
                    .with_comment("j")
                    .with_data(verdict(Verdict::Jump("target".into())).unwrap()),
                el(vec![Value::Proto(Protocol::Sctp), Value::Port(5)])
                    .with_data(verdict(Verdict::Goto("target".into())).unwrap()),
            ],
        },
        Op::AddElements {
            set: "port-to-addr".into(),
            elements: vec![el(vec![Value::Port(80)]).with_data(ElemData::Values(vec![a(a1)]))],
        },
        Op::AddElements {
            set: "slots".into(),
            elements: vec![
                Element {
                    key: vec![Value::Int(0)],
                    key_end: Some(vec![Value::Int(3)]),
                    data: Some(ElemData::Values(vec![a(a1), Value::Port(80)])),
                    comment: None,
                },
                Element {
                    key: vec![Value::Int(4)],
                    key_end: Some(vec![Value::Int(6)]),
                    data: Some(ElemData::Values(vec![a(a2), Value::Port(8080)])),
                    comment: None,
                },
                Element {
                    key: vec![Value::Int(1000)],
                    key_end: Some(vec![Value::Int(u32::MAX)]),
                    data: Some(ElemData::Values(vec![a(a3), Value::Port(1)])),
                    comment: None,
                },
            ],
        },
        Op::AddElements {
            set: "slots-plain".into(),
            elements: vec![el(vec![Value::Int(100)]).with_data(ElemData::Values(vec![a(a1), Value::Port(53)]))],
        },
    ]);
    Transaction { family: fam, ops }
}

// ---------------------------------------------------------------------------------------------
// 1. full rulesets: netlink == nft -f

/// loadBalancerSourceRanges (issue 4): the firewall sets, a four-field concatenated interval set
/// (`LB IP . proto . port . source range`) looked up with `!=`, holding prefixes and single
/// addresses (the LB IPs, allowed since the node's IP is in a range). Element order aside (see
/// `sorted_elements`), netlink and `nft -f` must list the same table, then the same after the
/// ranges change.
#[test]
fn firewall_sets_list_like_nft() {
    for fam in [Family::V4, Family::V6] {
        let a = |v4: &str, v6: &str| if fam == Family::V4 { v4.to_string() } else { v6.to_string() };
        let lb = |ranges: &[&str]| {
            let mut sp = svc("ns8", "fw", "http", Protocol::Tcp, &a("172.30.8.1", "fd00:30::81"), 80)
                .with_node_port(30880)
                .with_load_balancer_ip(&a("1.2.3.7", "2001:db8::7"))
                .with_load_balancer_ip(&a("1.2.3.8", "2001:db8::8"));
            for r in ranges {
                sp = sp.with_source_range(r);
            }
            let mut st = ClusterState::default();
            st.add_service(sp.clone());
            st.add_endpoint(&sp.name, Endpoint::ready(&a("10.180.8.1", "fd00:180::81"), 8080));
            st
        };
        let mut cfg = BuildConfig::new(fam);
        cfg.node_ip = Some(ip(&a("192.168.0.2", "fd00::2")));
        let v4 = fam == Family::V4;
        let first = lb(if v4 { &["203.0.113.0/25", "192.168.0.0/24"] } else { &["2001:db8:1::/48", "fd00::/64"] });
        let second = lb(if v4 { &["203.0.113.0/24"] } else { &["2001:db8:1::/48"] });
        let node_ips = vec![ip(&a("192.168.0.2", "fd00::2"))];
        let rs1 = build(&first, &node_ips, &cfg, None).ruleset;
        let rs2 = build(&second, &node_ips, &cfg, Some(&rs1)).ruleset;
        assert_eq!(rs1.elements["firewall-allow"].len(), 8);
        assert_eq!(rs2.elements["firewall-allow"].len(), 2, "node outside: no LB IP sources");
        let name = format!("firewall-{}", fam.nft());
        let full = diff(None, &rs1);
        dump(&name, &full);
        let (x, y) = (Netns::new(), Netns::new());
        let mut be = x.backend().expect("open backend");
        be.apply(&full).unwrap_or_else(|e| panic!("{name}: netlink: {e}"));
        y.nft_script(&full.to_string()).unwrap_or_else(|e| panic!("{name}: nft -f: {e}\n{full}"));
        let f = fam.nft();
        assert_same_listing(&sorted_elements(&x.list_table(f)), &sorted_elements(&y.list_table(f)), &name);
        assert!(x.list_table(f).contains("192.168.0.0/24") || !v4);
        let delta = diff(Some(&rs1), &rs2);
        be.apply(&delta).unwrap_or_else(|e| panic!("{name}: netlink delta: {e}"));
        y.nft_script(&delta.to_string()).unwrap_or_else(|e| panic!("{name}: nft -f delta: {e}\n{delta}"));
        assert_same_listing(&sorted_elements(&x.list_table(f)), &sorted_elements(&y.list_table(f)), &name);
    }
}

#[test]
fn full_rulesets_list_like_nft() {
    for f in fixtures() {
        let rs = build_rs(&f);
        let tx = diff(None, &rs);
        let (x, mut be, _y) = apply_both(f.name, &tx);
        // A restart: the same full transaction replaces the table atomically, same result.
        let before = x.list_table(rs.family.nft());
        be.apply(&tx).unwrap_or_else(|e| panic!("{}: second full apply: {e}", f.name));
        assert_eq!(x.list_table(rs.family.nft()), before, "{}: re-applying the full transaction", f.name);
    }
}

/// Deletions of every kind on top of `kitchen_sink`: elements of plain, interval (also open
/// ranges), concatenated and data sets, a flushed and refilled chain, a deleted set and chain.
fn kitchen_sink_delta(fam: Family) -> Transaction {
    let (a1, a2, a3, a4) = match fam {
        Family::V4 => ("10.0.0.1", "10.0.0.2", "10.0.0.9", "10.0.0.10"),
        Family::V6 => ("fd00::1", "fd00::2", "fd00::9", "fd00::a"),
    };
    let a = |s: &str| Value::Addr(ip(s));
    let range = |k: Value, e: Value| Element { key: vec![k], key_end: Some(vec![e]), data: None, comment: None };
    let del = |set: &str, elements: Vec<Element>| Op::DeleteElements { set: set.into(), elements };
    let proto_port = |p, n| Element::key(vec![Value::Proto(p), Value::Port(n)]);
    Transaction {
        family: fam,
        ops: vec![
            del("addrs", vec![Element::key(vec![a(a1)])]),
            del("ranges", vec![range(a(a2), a(a3))]),
            del("ports", vec![range(Value::Port(80), Value::Port(90)), Element::key(vec![Value::Port(65535)])]),
            del(
                "verdicts",
                vec![proto_port(Protocol::Tcp, 1), proto_port(Protocol::Udp, 4), proto_port(Protocol::Sctp, 5)],
            ),
            del("slots", vec![range(Value::Int(0), Value::Int(3)), range(Value::Int(1000), Value::Int(u32::MAX))]),
            del("slots-plain", vec![Element::key(vec![Value::Int(100)])]),
            del("addr-port-ranges", vec![Element::key(vec![a(a1), Value::Port(80)])]),
            Op::FlushChain("c".into()),
            Op::AddRule {
                chain: "c".into(),
                rule: Rule::new(vec![Expr::InSet { key: vec![Selector::Saddr], set: "ranges".into(), neq: false }]),
            },
            Op::DeleteSet("pairs".into()),
            Op::DeleteChain("target".into()),
            Op::AddElements {
                set: "ranges".into(),
                elements: vec![Element { key: vec![a(a2)], key_end: Some(vec![a(a4)]), data: None, comment: None }],
            },
            Op::AddElements {
                set: "slots".into(),
                elements: vec![Element {
                    key: vec![Value::Int(0)],
                    key_end: Some(vec![Value::Int(3)]),
                    data: Some(ElemData::Values(vec![a(a4), Value::Port(81)])),
                    comment: None,
                }],
            },
        ],
    }
}

#[test]
fn kitchen_sink_lists_like_nft() {
    for fam in [Family::V4, Family::V6] {
        let name = format!("kitchen-sink-{}", fam.nft());
        let (x, mut be, y) = apply_both(&name, &kitchen_sink(fam));
        let delta = kitchen_sink_delta(fam);
        dump(&format!("{name}-delta"), &delta);
        be.apply(&delta).unwrap_or_else(|e| panic!("{name}: netlink delta: {e}"));
        y.nft_script(&delta.to_string()).unwrap_or_else(|e| panic!("{name}: nft -f delta: {e}\n{delta}"));
        assert_same_listing(&x.list_table(fam.nft()), &y.list_table(fam.nft()), &format!("{name} delta"));
    }
}

/// Concatenated ranges (pipapo sets) via netlink, against the nft syntax for them
/// (`a-b . c-d`), which the IR's text form does not produce.
#[test]
fn concatenated_ranges_list_like_nft() {
    for (fam, lo, hi, mid) in
        [(Family::V4, "10.0.0.1", "10.0.0.9", "10.0.0.20"), (Family::V6, "fd00::1", "fd00::9", "fd00::20")]
    {
        let set = SetDef {
            name: "r".into(),
            set_type: SetType::Typed { key: vec![DataType::addr(fam), DataType::InetService], data: None },
            interval: true,
        };
        let mut tx = Transaction::new(fam);
        tx.ops.push(Op::AddTable);
        tx.ops.push(Op::AddSet(set));
        tx.ops.push(Op::AddElements {
            set: "r".into(),
            elements: vec![
                Element {
                    key: vec![Value::Addr(ip(lo)), Value::Port(80)],
                    key_end: Some(vec![Value::Addr(ip(hi)), Value::Port(90)]),
                    data: None,
                    comment: Some("range".into()),
                },
                Element::key(vec![Value::Addr(ip(mid)), Value::Port(443)]),
            ],
        });
        let x = Netns::new();
        x.backend().expect("backend").apply(&tx).expect("netlink");
        let y = Netns::new();
        let f = fam.nft();
        y.nft_script(&format!(
            "add table {f} kube-proxy {{ comment \"rules for kube-proxy\" ; }}\n\
             add set {f} kube-proxy r {{ type {} . inet_service ; flags interval ; }}\n\
             add element {f} kube-proxy r {{ {lo}-{hi} . 80-90 comment \"range\" }}\n\
             add element {f} kube-proxy r {{ {mid} . 443 }}\n",
            DataType::addr(fam).nft()
        ))
        .expect("nft -f");
        assert_same_listing(&x.list_table(f), &y.list_table(f), &format!("concatenated ranges {f}"));
    }
}

/// Both families side by side in one namespace, each in its own table.
#[test]
fn both_families_coexist() {
    let ns = Netns::new();
    let mut be = ns.backend().expect("backend");
    let f = fixtures();
    let v4 = f.iter().find(|f| f.name == "external-masq-all").unwrap();
    let v6 = f.iter().find(|f| f.name == "ipv6").unwrap();
    be.apply(&diff(None, &build_rs(v4))).expect("v4");
    be.apply(&diff(None, &build_rs(v6))).expect("v6");
    assert!(ns.list_table("ip").contains("service-ips"));
    assert!(ns.list_table("ip6").contains("service-ips"));
    // --cleanup removes both; a second cleanup (tables gone) still succeeds.
    for _ in 0..2 {
        for fam in [Family::V4, Family::V6] {
            be.apply(&rules::transaction::cleanup(fam)).expect("cleanup");
        }
    }
    assert_eq!(ns.ruleset().trim(), "");
}

// ---------------------------------------------------------------------------------------------
// 2. incremental transactions

/// The changes both incremental tests walk through, from `external()`: endpoints added, removed
/// and gone, a service added and deleted, a node port changed, endpoints back.
fn change_steps(base: &ClusterState) -> Vec<(&'static str, ClusterState)> {
    let np = ServicePortName::new("ns1", "np", "http", Protocol::Tcp);
    let udp = ServicePortName::new("ns1", "np-udp", "", Protocol::Udp);
    let down = ServicePortName::new("ns3", "down", "p", Protocol::Tcp);
    let mut steps: Vec<(&str, ClusterState)> = Vec::new();
    let mut s = base.clone();
    s.add_endpoint(&np, Endpoint::ready("10.180.1.9", 8080));
    steps.push(("endpoint added", s.clone()));
    s.endpoints.get_mut(&np).unwrap().retain(|e| e.ip != ip("10.180.1.2"));
    steps.push(("endpoint removed", s.clone()));
    s.endpoints.remove(&np);
    steps.push(("all endpoints removed", s.clone()));
    s.add_service(svc("ns4", "new", "p", Protocol::Udp, "172.30.4.1", 1234).with_node_port(31234));
    s.add_endpoint(&ServicePortName::new("ns4", "new", "p", Protocol::Udp), Endpoint::ready("10.180.4.1", 1234));
    steps.push(("service added", s.clone()));
    s.services.remove(&udp);
    s.endpoints.remove(&udp);
    steps.push(("service deleted", s.clone()));
    s.service_mut(&down).unwrap().node_port = 30999;
    steps.push(("nodeport changed", s.clone()));
    s.add_endpoint(&down, Endpoint::ready("10.180.3.1", 8443));
    s.add_endpoint(&np, Endpoint::ready("10.180.1.1", 8080));
    steps.push(("endpoints back", s.clone()));
    steps
}

#[test]
fn incremental_changes_match_full_rulesets() {
    let cfg = cidr8_node(Family::V4, "10.0.0.0/8");
    let node_ips = [ip("192.168.0.2")];
    let base = external();
    let a_rs = build(&base, &node_ips, &cfg, None).ruleset;

    let steps = change_steps(&base);
    let s = steps.last().expect("steps").1.clone();

    let x = Netns::new();
    let mut be = x.backend().expect("backend");
    be.apply(&diff(None, &a_rs)).expect("full A");
    let mut applied = a_rs;
    for (what, state) in steps {
        let b_rs = build(&state, &node_ips, &cfg, Some(&applied)).ruleset;
        let delta = diff(Some(&applied), &b_rs);
        assert!(!delta.is_empty(), "{what}: expected a non-empty diff");
        let slug = what.replace(' ', "-");
        dump(&format!("incremental-{slug}"), &delta);
        be.apply(&delta).unwrap_or_else(|e| panic!("{what}: incremental apply failed: {e}\n{delta}"));
        // The reference: B's full transaction through nft -f in a fresh namespace.
        let y = Netns::new();
        y.nft_script(&diff(None, &b_rs).to_string()).unwrap_or_else(|e| panic!("{what}: nft -f: {e}"));
        assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), what);
        applied = b_rs;
    }

    // A configuration change: NodePorts on every local address drops the nodeport-ips set
    // (flush and refill of the chains using it, then DeleteSet) and adds `fib` matches.
    let mut cfg_all = cfg.clone();
    cfg_all.nodeport_addresses = NodePortAddresses::All;
    let c_rs = build(&s, &[], &cfg_all, Some(&applied)).ruleset;
    let delta = diff(Some(&applied), &c_rs);
    assert!(delta.ops.iter().any(|o| matches!(o, Op::DeleteSet(n) if n == "nodeport-ips")), "{delta}");
    dump("incremental-nodeport-all", &delta);
    be.apply(&delta).unwrap_or_else(|e| panic!("nodeport-addresses change: {e}\n{delta}"));
    let y = Netns::new();
    y.nft_script(&diff(None, &c_rs).to_string()).expect("nft -f C");
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "nodeport-addresses change");
    let applied = c_rs;

    // No change: an empty transaction that sends nothing.
    let same = diff(Some(&applied), &applied.clone());
    assert!(same.is_empty(), "diff of a ruleset with itself: {same}");
    let before = x.ruleset();
    let stats = be.apply(&same).expect("empty apply");
    assert_eq!((stats.messages, stats.bytes), (0, 0));
    assert_eq!(x.ruleset(), before);
}

/// The daemon's path: partial builds applied over netlink to a kept ruleset stripped of its
/// per-endpoint elements, then a full diff from that stripped ruleset (which flushes and refills
/// the endpoint maps): after each step the kernel lists exactly what `nft -f` of the full
/// ruleset gives, and the flush's text form is valid `nft` input too.
#[test]
fn partial_builds_and_stripped_rulesets_match_full_rulesets() {
    let cfg = cidr8_node(Family::V4, "10.0.0.0/8");
    let node_ips = [ip("192.168.0.2")];
    let base = external();
    let steps = change_steps(&base);

    let x = Netns::new();
    let mut be = x.backend().expect("backend");
    let mut applied = build(&base, &node_ips, &cfg, None).ruleset;
    be.apply(&diff(None, &applied)).expect("full");
    applied.strip_bulk();
    assert!(!applied.stripped.is_empty());
    let mut prev = base;
    for (what, state) in steps {
        let keys = ClusterState::changed_services(&prev, &state);
        let p = rules::build::build_partial(&applied, &prev.restrict(&keys), &state.restrict(&keys), &node_ips, &cfg)
            .unwrap_or_else(|| panic!("{what}: a partial build"));
        dump(&format!("partial-{}", what.replace(' ', "-")), &p.tx);
        be.apply(&p.tx).unwrap_or_else(|e| panic!("{what}: partial apply failed: {e}\n{}", p.tx));
        applied.commit_partial(&p);
        let full = build(&state, &node_ips, &cfg, Some(&applied)).ruleset;
        let y = Netns::new();
        y.nft_script(&diff(None, &full).to_string()).unwrap_or_else(|e| panic!("{what}: nft -f: {e}"));
        assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), what);
        prev = state;
    }

    // A full diff from the stripped ruleset: the endpoint maps and the hairpin set are flushed
    // and refilled, in one transaction, through netlink and as nft text alike.
    let mut cfg_all = cfg.clone();
    cfg_all.nodeport_addresses = NodePortAddresses::All;
    let full = build(&prev, &[], &cfg_all, Some(&applied)).ruleset;
    let delta = diff(Some(&applied), &full);
    assert!(delta.ops.iter().any(|o| matches!(o, Op::FlushSet { map: true, .. })), "{delta}");
    assert!(delta.ops.iter().any(|o| matches!(o, Op::FlushSet { map: false, .. })), "{delta}");
    dump("stripped-full-diff", &delta);
    let before = build(&prev, &node_ips, &cfg, Some(&applied)).ruleset;
    let z = Netns::new();
    z.nft_script(&diff(None, &before).to_string()).expect("nft -f before");
    z.nft_script(&delta.to_string()).unwrap_or_else(|e| panic!("nft -f of the flushing diff: {e}\n{delta}"));
    be.apply(&delta).unwrap_or_else(|e| panic!("flushing diff over netlink: {e}\n{delta}"));
    let y = Netns::new();
    y.nft_script(&diff(None, &full).to_string()).expect("nft -f full");
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "full diff from a stripped ruleset");
    assert_same_listing(&z.list_table("ip"), &y.list_table("ip"), "the same diff as nft text");
}

// ---------------------------------------------------------------------------------------------
// 3. atomicity and errors

#[test]
fn failed_batch_changes_nothing_and_names_the_op() {
    let cfg = cidr8_node(Family::V4, "10.0.0.0/8");
    let a_rs = build(&cluster_ips(), &[ip("192.168.0.2")], &cfg, None).ruleset;
    let x = Netns::new();
    let mut be = x.backend().expect("backend");
    be.apply(&diff(None, &a_rs)).expect("full A");
    let before = x.ruleset();

    // Valid changes first, a rule jumping to a missing chain last.
    let mut bad = Transaction::new(Family::V4);
    bad.ops.push(Op::AddChain { name: "extra".into(), base: None });
    bad.ops.push(Op::AddRule { chain: "extra".into(), rule: Rule::new(vec![Expr::Verdict(Verdict::Accept)]) });
    bad.ops.push(Op::AddElements {
        set: "cluster-ips".into(),
        elements: vec![Element::key(vec![Value::Addr(ip("172.30.9.9"))])],
    });
    bad.ops.push(Op::FlushChain("services".into()));
    bad.ops.push(Op::AddRule {
        chain: "services".into(),
        rule: Rule::new(vec![Expr::Verdict(Verdict::Jump("no-such-chain".into()))]),
    });
    let last = bad.ops.len() - 1;
    match be.apply(&bad) {
        Err(NftError::Rejected { errno, failures }) => {
            assert_eq!(errno, libc::ENOENT, "{failures}");
            assert_eq!(failures.0.len(), 1, "{failures}");
            assert_eq!(failures.0[0].index, Some(last));
            assert!(failures.0[0].text.contains("jump no-such-chain"), "{}", failures.0[0].text);
            let msg = NftError::Rejected { errno, failures }.to_string();
            assert!(msg.contains(&format!("op #{last}")) && msg.contains("no-such-chain"), "{msg}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(x.ruleset(), before, "a failed batch must leave the ruleset byte-identical");

    // Two bad messages in the middle: both reported; the bad element is named precisely.
    let mut bad2 = Transaction::new(Family::V4);
    let good = |i: u8| {
        Element::key(vec![Value::Addr(ip(&format!("172.30.8.{i}"))), Value::Proto(Protocol::Tcp), Value::Port(80)])
            .with_data(ElemData::Verdict(Verdict::Goto("services".into())))
    };
    let broken = Element::key(vec![Value::Addr(ip("172.30.8.50")), Value::Proto(Protocol::Tcp), Value::Port(81)])
        .with_data(ElemData::Verdict(Verdict::Goto("missing-target".into())));
    bad2.ops.push(Op::AddElements { set: "service-ips".into(), elements: vec![good(1), broken, good(2)] });
    bad2.ops.push(Op::DeleteChain("services".into())); // still referenced: EBUSY
    bad2.ops.push(Op::AddChain { name: "fine".into(), base: None });
    match be.apply(&bad2) {
        Err(NftError::Rejected { failures, .. }) => {
            let f = &failures.0;
            assert_eq!(f.len(), 2, "{failures}");
            assert_eq!((f[0].index, f[0].errno), (Some(0), libc::ENOENT), "{failures}");
            assert!(
                f[0].text.contains("172.30.8.50") && !f[0].text.contains("172.30.8.1 "),
                "the failing element alone: {}",
                f[0].text
            );
            assert_eq!((f[1].index, f[1].errno), (Some(1), libc::EBUSY), "{failures}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(x.ruleset(), before);

    // Bad IR never reaches the kernel.
    let mut bad3 = Transaction::new(Family::V4);
    bad3.ops.push(Op::AddElements { set: "cluster-ips".into(), elements: vec![Element::key(vec![Value::Port(1)])] });
    assert!(matches!(be.apply(&bad3), Err(NftError::Encode { index: 0, .. })));

    // The backend is still usable, and a real change goes through.
    let mut st = cluster_ips();
    st.add_service(svc("ns9", "after", "", Protocol::Tcp, "172.30.0.99", 80));
    let b_rs = build(&st, &[ip("192.168.0.2")], &cfg, Some(&a_rs)).ruleset;
    be.apply(&diff(Some(&a_rs), &b_rs)).expect("a good transaction after failures");
    let y = Netns::new();
    y.nft_script(&diff(None, &b_rs).to_string()).expect("nft -f B");
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "after failures");
}

/// Kernels before 6.10 never ACK the END message: success and failure must then be told apart
/// by the GETGEN barrier alone.
#[test]
fn outcome_is_known_without_end_ack() {
    let f = &fixtures()[0];
    let rs = build_rs(f);
    let x = Netns::new();
    let mut be = x.backend().expect("backend");
    be.set_end_ack(false);
    be.apply(&diff(None, &rs)).expect("full transaction without END ACK");
    assert!(x.list_table("ip").contains("service-ips"));
    let before = x.ruleset();
    let mut bad = Transaction::new(Family::V4);
    bad.ops.push(Op::AddRule { chain: "no-such-chain".into(), rule: Rule::new(vec![Expr::Verdict(Verdict::Accept)]) });
    match be.apply(&bad) {
        Err(NftError::Rejected { errno, failures }) => {
            assert_eq!((errno, failures.0[0].index), (libc::ENOENT, Some(0)), "{failures}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(x.ruleset(), before);
    be.apply(&rules::transaction::cleanup(Family::V4)).expect("cleanup without END ACK");
    assert_eq!(x.list_table("ip"), "");
}

// ---------------------------------------------------------------------------------------------
// 4. scale

#[test]
fn ten_thousand_services_in_one_batch() {
    const SERVICES: u32 = 10_000;
    const ENDPOINTS: u32 = 10;
    let mut st = ClusterState::default();
    for i in 0..SERVICES {
        let cip = format!("172.{}.{}.{}", 16 + i / 65536, (i / 256) % 256, i % 256);
        let sp = svc("scale", &format!("svc-{i}"), "http", Protocol::Tcp, &cip, 80).with_node_port(0);
        st.add_service(sp.clone());
        for j in 0..ENDPOINTS {
            let n = i * ENDPOINTS + j;
            let ep = format!("10.{}.{}.{}", 64 + n / 65536, (n / 256) % 256, n % 256);
            st.add_endpoint(&sp.name, Endpoint::ready(&ep, 8080));
        }
    }
    let cfg = cidr8_node(Family::V4, "10.0.0.0/8");
    let t0 = Instant::now();
    let rs = build(&st, &[ip("192.168.0.2")], &cfg, None).ruleset;
    let tx = diff(None, &rs);
    let t_build = t0.elapsed();
    let ns = Netns::new();
    let mut be = ns.backend().expect("backend");
    let t_enc = Instant::now();
    let encoded = encode(&tx).expect("encode").len();
    let t_encode = t_enc.elapsed();
    if std::env::var("KPXNL_SCALE_NFT").is_ok() {
        let y = Netns::new();
        let t = Instant::now();
        y.nft_script(&tx.to_string()).expect("nft -f");
        println!("scale: nft -f of the same transaction: {:?}", t.elapsed());
    }
    let t1 = Instant::now();
    let stats = be.apply(&tx).expect("10k x 10 full transaction");
    assert_eq!(stats.bytes, encoded);
    let t_apply = t1.elapsed();
    println!(
        "scale: {SERVICES} services x {ENDPOINTS} endpoints: {} ops, {} elements; build+diff {:?}; \
         encode {:?}; netlink apply {:?} ({} messages, {:.1} MB, one batch)",
        tx.ops.len(),
        tx.stats().elements_added,
        t_build,
        t_encode,
        t_apply,
        stats.messages,
        stats.bytes as f64 / 1e6
    );
    // One-service and one-endpoint changes on top of the big table (timings printed only),
    // ending where we started so the counts below still hold.
    let extra = svc("scale", "extra", "http", Protocol::Tcp, "172.31.255.1", 80);
    let mut with_svc = st.clone();
    with_svc.add_service(extra.clone());
    with_svc.add_endpoint(&extra.name, Endpoint::ready("10.99.0.1", 8080));
    let rs_svc = build(&with_svc, &[ip("192.168.0.2")], &cfg, Some(&rs)).ruleset;
    let mut with_ep = with_svc.clone();
    with_ep.add_endpoint(&extra.name, Endpoint::ready("10.99.0.2", 8080));
    let rs_ep = build(&with_ep, &[ip("192.168.0.2")], &cfg, Some(&rs_svc)).ruleset;
    for (what, from, to) in [
        ("service added", &rs, &rs_svc),
        ("endpoint added", &rs_svc, &rs_ep),
        ("endpoint removed", &rs_ep, &rs_svc),
        ("service removed", &rs_svc, &rs),
    ] {
        let delta = diff(Some(from), to);
        let t = Instant::now();
        be.apply(&delta).unwrap_or_else(|e| panic!("{what}: {e}"));
        println!("scale: {what}: {:?} ({} ops)", t.elapsed(), delta.ops.len());
    }
    // The endpoint map is sharded (service-endpoints-<n>, 64 service ports each): count over all.
    let listing = ns.nft(&["list", "table", "ip", "kube-proxy"]).expect("list table");
    let shards = listing.lines().filter(|l| l.trim_start().starts_with("map service-endpoints-")).count();
    assert_eq!(shards as u32, SERVICES.div_ceil(64), "one endpoint map per 64 service ports");
    let ranges = listing.matches(" : 10.").count();
    assert_eq!(ranges as u32, SERVICES * ENDPOINTS, "endpoint ranges in the service-endpoints-* maps");
    let chains = ns.nft(&["list", "chains", "ip"]).expect("list chains");
    let service_chains = chains.lines().filter(|l| l.contains("chain service-") && l.contains("/tcp/")).count();
    assert_eq!(service_chains as u32, SERVICES);
}

/// For the tests of syncs in parts: node-a's daemon configuration, a cluster of the policy mix
/// plus the ClusterIP Services (several Services, so parts of two make several parts), the node.
fn parts_fixture() -> (kproxy::config::Config, ClusterState, NodeInfo) {
    use clap::Parser;
    let cfg = kproxy::config::Flags::try_parse_from([
        "kproxy",
        "--manifests",
        "/nonexistent",
        "--hostname-override",
        "node-a",
        "--cluster-cidr",
        "10.0.0.0/8",
    ])
    .expect("flags")
    .into_config()
    .expect("config");
    let mut st = policies(Family::V4);
    for sp in cluster_ips().services.into_values() {
        st.add_service(sp);
    }
    for (spn, eps) in cluster_ips().endpoints {
        for e in eps {
            st.add_endpoint(&spn, e);
        }
    }
    let node = NodeInfo { name: "node-a".into(), primary_ips: vec![ip("192.168.0.2")], ..Default::default() };
    (cfg, st, node)
}

/// A cold start into a namespace without kproxy's table goes in parts (the layout with empty base
/// chains, whole Services per transaction, then the base chains' rules) and leaves the kernel listing exactly what one transaction of the
/// full ruleset gives; the backend tells whether the table is there.
#[test]
fn a_cold_start_in_parts_lists_like_one_transaction() {
    use kproxy::sync::{Inputs, Proxier};
    let (cfg, st, node) = parts_fixture();
    let empty = ClusterState::default();
    let state = |f: Family| if f == Family::V4 { &st } else { &empty };
    let inputs = Inputs { state: &state, node: &node, local_ips: &[], changes: None };

    let x = Netns::new();
    let mut be = x.backend().expect("backend");
    assert_eq!(be.table_exists(Family::V4), Some(false));
    let mut p = Proxier::new(cfg, be);
    p.cold_start_part = 2;
    let r = p.sync(&inputs).expect("cold start in parts");
    let services: std::collections::BTreeSet<_> = st.services.keys().map(|s| (s.namespace(), s.name())).collect();
    // The layout (base chains empty), the parts, then the base chains' rules.
    assert_eq!(r.families[0].commits, 1 + services.len().div_ceil(2) + 1, "{:?}", r.families[0]);
    assert_eq!(p.backend.table_exists(Family::V4), Some(true));
    assert_eq!(p.backend.table_exists(Family::V6), Some(false));

    let full = kproxy::sync::desired(&p.cfg, Family::V4, &inputs, None).ruleset;
    let y = Netns::new();
    y.nft_script(&diff(None, &full).to_string()).expect("nft -f of the full ruleset");
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "cold start in parts");
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The netlink backend, failing the apply after `ok` of them succeeded.
struct FailAfter {
    inner: NftablesBackend,
    ok: usize,
}

impl kproxy::sync::Backend for FailAfter {
    fn apply(&mut self, tx: &Transaction) -> Result<kproxy::backend::nftables::ApplyStats, BoxError> {
        self.apply_ready(&kproxy::sync::Ready::Tx(tx.clone()))
    }
    fn table_exists(&mut self, family: Family) -> Option<bool> {
        kproxy::sync::Backend::table_exists(&mut self.inner, family)
    }
    fn preparer(&mut self, family: Family) -> Option<kproxy::backend::nftables::Preparer> {
        kproxy::sync::Backend::preparer(&mut self.inner, family)
    }
    fn set_table(&mut self, table: &str) -> bool {
        kproxy::sync::Backend::set_table(&mut self.inner, table)
    }
    fn apply_ready(&mut self, part: &kproxy::sync::Ready) -> Result<kproxy::backend::nftables::ApplyStats, BoxError> {
        if self.ok == 0 {
            return Err("injected failure".into());
        }
        self.ok -= 1;
        kproxy::sync::Backend::apply_ready(&mut self.inner, part)
    }
}

/// A cold start in parts adds the base chains' rules last: when it fails after the layout and one
/// part, the kernel holds that part's Services but no hook reaches them (the base chains are
/// empty), so traffic meets nothing of the half-built table. The next sync replaces it whole.
#[test]
fn a_cold_start_in_parts_is_not_live_until_its_last_commit() {
    use kproxy::sync::{Inputs, Proxier};
    let (cfg, st, node) = parts_fixture();
    let empty = ClusterState::default();
    let state = |f: Family| if f == Family::V4 { &st } else { &empty };
    let inputs = Inputs { state: &state, node: &node, local_ips: &[], changes: None };

    let x = Netns::new();
    let be = FailAfter { inner: x.backend().expect("backend"), ok: 2 };
    let mut p = Proxier::new(cfg, be);
    p.cold_start_part = 2;
    assert!(p.sync(&inputs).is_err(), "the second part fails");
    let listing = x.list_table("ip");
    assert!(listing.contains("chain service-"), "the first part's Services are in the kernel:\n{listing}");
    for chain in ["nat-prerouting", "nat-output", "nat-postrouting", "filter-input", "filter-forward", "filter-output"]
    {
        let c = x.nft(&["list", "chain", "ip", "kube-proxy", chain]).expect("the base chain is there");
        let rules: Vec<&str> = c
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("type ") && !l.ends_with('{') && *l != "}")
            .collect();
        assert!(rules.is_empty(), "{chain} holds rules before the last commit: {rules:?}");
    }

    p.backend.ok = usize::MAX;
    p.sync(&inputs).expect("the next sync");
    let full = kproxy::sync::desired(&p.cfg, Family::V4, &inputs, None).ruleset;
    let y = Netns::new();
    y.nft_script(&diff(None, &full).to_string()).expect("nft -f of the full ruleset");
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "after a failed cold start in parts");
}

/// A restart over an existing table (stale: it holds a Service since deleted) in parts: the
/// ruleset goes into `kproxy-restart` next to the old table, the old one is deleted, the ruleset
/// goes into `kube-proxy` in parts, `kproxy-restart` is deleted; the kernel then lists exactly
/// what one transaction of the full ruleset gives. A `kproxy-restart` table left by a restart
/// that failed half-way makes the next one replace `kube-proxy` in one transaction (always
/// whole) and delete the leftover.
#[test]
fn a_restart_in_parts_lists_like_one_transaction_and_leaves_one_table() {
    use kproxy::sync::{Inputs, Proxier};
    let (cfg, st, node) = parts_fixture();
    let empty = ClusterState::default();
    let state = |f: Family| if f == Family::V4 { &st } else { &empty };
    let inputs = Inputs { state: &state, node: &node, local_ips: &[], changes: None };
    let full = kproxy::sync::desired(&cfg, Family::V4, &inputs, None).ruleset;
    let y = Netns::new();
    y.nft_script(&diff(None, &full).to_string()).expect("nft -f of the full ruleset");
    let services: std::collections::BTreeSet<_> = st.services.keys().map(|s| (s.namespace(), s.name())).collect();
    let tables = |ns: &Netns| ns.nft(&["list", "tables"]).expect("list tables");

    // The old table: the same cluster plus a Service deleted while kproxy was down.
    let mut old = st.clone();
    old.add_service(svc("gone", "old", "http", Protocol::Tcp, "172.30.77.1", 80));
    let x = Netns::new();
    let mut be = x.backend().expect("backend");
    be.apply(&diff(None, &build(&old, &[ip("192.168.0.2")], &v4_cfg(), None).ruleset)).expect("old table");
    let mut p = Proxier::new(cfg.clone(), be);
    p.cold_start_part = 2;
    let r = p.sync(&inputs).expect("restart in parts");
    let parts = 1 + services.len().div_ceil(2) + 1;
    assert_eq!(r.families[0].commits, 2 * parts + 2, "two tables in parts, two deletes: {:?}", r.families[0]);
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "restart in parts");
    assert!(!tables(&x).contains("kproxy-restart"), "{}", tables(&x));

    // A restart table left behind: one transaction, then it is gone.
    x.nft_script("add table ip kproxy-restart\nadd chain ip kproxy-restart leftover\n").expect("leftover");
    let mut q = Proxier::new(cfg, x.backend().expect("backend"));
    q.cold_start_part = 2;
    let r = q.sync(&inputs).expect("restart after a failed one");
    assert_eq!(r.families[0].commits, 1, "{:?}", r.families[0]);
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "restart in one transaction");
    assert!(!tables(&x).contains("kproxy-restart"), "{}", tables(&x));
}

/// Transactions lowered ahead by a `Preparer` (the cold start lowers each part on its builder
/// thread) apply as `apply` applies them: a run whose later parts use sets the earlier ones
/// create, one applied after something else used the socket (lowered again: the sequence numbers
/// moved on), and a refused one names the op the kernel refused.
#[test]
fn prepared_transactions_apply_like_transactions() {
    let cfg = v4_cfg();
    let node_ips = [ip("192.168.0.2")];
    let layout = build(&ClusterState::default(), &node_ips, &cfg, None).ruleset;
    let full = build(&cluster_ips(), &node_ips, &cfg, None).ruleset;
    let x = Netns::new();
    let mut be = x.backend().expect("backend");
    let mut prep = be.preparer(Family::V4);
    let p1 = prep.prepare(diff(None, &layout)).expect("lowered");
    let p2 = prep.prepare(diff(Some(&layout), &full)).expect("lowered with the sets of the first");
    be.apply_prepared(&p1).expect("first part");
    be.apply_prepared(&p2).expect("second part");
    assert_eq!(be.relowered(), 0, "a run with nothing in between is sent as prepared");
    let y = Netns::new();
    y.nft_script(&diff(None, &full).to_string()).expect("nft -f of the full ruleset");
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "prepared parts");

    let mut prep = be.preparer(Family::V4);
    let back = prep.prepare(diff(Some(&full), &layout)).expect("lowered");
    let again = prep.prepare(diff(Some(&full), &layout)).expect("lowered");
    assert_eq!(be.table_exists(Family::V4), Some(true)); // the socket is used in between
    be.apply_prepared(&back).expect("applied after the socket was used");
    assert_eq!(be.relowered(), 1, "lowered again: the sequence numbers moved on");
    let z = Netns::new();
    z.nft_script(&diff(None, &layout).to_string()).expect("nft -f of the layout");
    assert_same_listing(&x.list_table("ip"), &z.list_table("ip"), "prepared, lowered again");
    match be.apply_prepared(&again) {
        Err(NftError::Rejected { failures, .. }) => {
            let f = &failures.0;
            assert_eq!(f[0].errno, libc::ENOENT, "{failures}");
            let op = f[0].index.expect("an op is named");
            assert!(op < again.tx.ops.len() && f[0].text.starts_with("delete "), "{failures}");
        }
        other => panic!("deleting what is gone must be refused, got {other:?}"),
    }
    assert_same_listing(&x.list_table("ip"), &z.list_table("ip"), "a refused prepared part changes nothing");
}

/// What kproxy prints as a sync's transaction (debug logs, `--dry-run` of a change) is valid
/// `nft -f` input against the live table kproxy made over netlink: a partial sync adding a TCP
/// and a UDP Service, applied as text by `nft` itself, leaves what the full ruleset lists. (With
/// one endpoint map per shard typed `th dport`, nft 1.0.6 refused such text: "conflicting
/// protocols specified: tcp vs. th".)
#[test]
fn printed_partial_transactions_apply_with_nft_over_a_netlink_table() {
    let cfg = v4_cfg();
    let node_ips = [ip("192.168.0.2")];
    let base = external();
    let x = Netns::new();
    let mut be = x.backend().expect("backend");
    let applied = build(&base, &node_ips, &cfg, None).ruleset;
    be.apply(&diff(None, &applied)).expect("full over netlink");

    let mut after = base.clone();
    let tcp = svc("ns9", "web", "http", Protocol::Tcp, "172.30.9.1", 80);
    let udp = svc("ns9", "dns", "dns", Protocol::Udp, "172.30.9.2", 53);
    for (sp, ep) in [(&tcp, "10.180.9.1"), (&udp, "10.180.9.2")] {
        after.add_service(sp.clone());
        add_eps(&mut after, sp, &[ep], sp.port);
    }
    let keys = ClusterState::changed_services(&base, &after);
    let p = rules::build::build_partial(&applied, &base.restrict(&keys), &after.restrict(&keys), &node_ips, &cfg)
        .expect("a partial build");
    let text = p.tx.to_string();
    assert!(text.contains("meta l4proto udp dnat") && text.contains("meta l4proto tcp dnat"), "{text}");
    x.nft_script(&text).unwrap_or_else(|e| panic!("nft -f of the printed transaction: {e}\n{text}"));

    let full = build(&after, &node_ips, &cfg, None).ruleset;
    let y = Netns::new();
    y.nft_script(&diff(None, &full).to_string()).expect("nft -f of the full ruleset");
    assert_same_listing(&x.list_table("ip"), &y.list_table("ip"), "printed partial applied by nft");
}
