//! `build`: the pure function from the cluster model to one family's desired ruleset.
//!
//! # Layout
//!
//! Upstream's dispatch is kept (`services` chain, `service-ips` / `service-nodeports` verdict
//! maps, `service-HASH-…` and `external-HASH-…` chains, the filter-side checks), but endpoint
//! selection is data, not rules. Every service port owns a block of `SLOTS_PER_SERVICE`
//! consecutive integers; its chain ends in
//!
//! ```text
//! meta l4proto tcp dnat ip to numgen random mod 27720 offset <block start> map @service-endpoints-<shard>
//! ```
//!
//! and the interval map `service-endpoints-<shard>` (one per 64 service ports, see
//! `ENDPOINT_MAP_SHARD`) splits the block evenly among the endpoints
//! (`slot range : addr . port`). So:
//!
//! - an endpoint change only replaces elements of `service-endpoints-*`, `hairpin-endpoints` and
//!   `no-endpoint-*`: plain data, which the kernel commits without re-validating the table;
//! - a service chain depends only on the Service, never on its endpoints;
//! - cold start is linear: no per-service sets (upstream's anonymous vmaps are quadratic).
//!
//! 27720 = lcm(1..12): the split is exactly uniform for up to 12 endpoints and for every count
//! dividing it; for other counts an endpoint's share is off by at most N/27720 of itself.
//!
//! Hairpin masquerade (a pod reaching itself through its service) is decided in postrouting from
//! the `hairpin-endpoints` set of `addr . addr` pairs (`ct status dnat` and source == destination),
//! which replaces upstream's per-endpoint chains.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use crate::ir::*;
use crate::model::*;
use crate::names::*;

/// Slots per service port in the endpoint map: lcm(1..12).
pub const SLOTS_PER_SERVICE: u32 = 27720;
/// Service ports (slot blocks) per endpoint map. The kernel checks the data of every element of a
/// map against every rule that references the map, both when elements are added and when rules
/// are: with one map for all services a 10k x 10 cold start took 16-20 s in the kernel (10k rules x
/// 100k elements), and one endpoint change 20-30 ms. Shards of 64 keep each map's references and
/// elements small, so both costs stay linear.
pub const ENDPOINT_MAP_SHARD: u32 = 64;
/// How many service ports fit into the 32-bit slot space.
pub const MAX_SERVICE_PORTS: u32 = u32::MAX / SLOTS_PER_SERVICE;

/// A service port that could not be programmed, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub service: ServicePortName,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service port {}: {}", self.service, self.reason)
    }
}

/// Result of a build: the ruleset and what had to be left out.
#[derive(Debug, Clone)]
pub struct Built {
    pub ruleset: Ruleset,
    pub skipped: Vec<Skipped>,
}

/// Base chains: (name, type, hook, priority).
const BASE_CHAINS: [(&str, ChainType, Hook, i32); 6] = [
    ("filter-input", ChainType::Filter, Hook::Input, 0),
    ("filter-forward", ChainType::Filter, Hook::Forward, 0),
    ("filter-output", ChainType::Filter, Hook::Output, 0),
    ("nat-prerouting", ChainType::Nat, Hook::Prerouting, -100),
    ("nat-output", ChainType::Nat, Hook::Output, -100),
    ("nat-postrouting", ChainType::Nat, Hook::Postrouting, 100),
];

fn key3(ip: IpAddr, proto: Protocol, port: u16) -> Vec<Value> {
    vec![Value::Addr(ip), Value::Proto(proto), Value::Port(port)]
}

fn jump(c: &str) -> Expr {
    Expr::Verdict(Verdict::Jump(c.to_string()))
}
fn goto(c: &str) -> Expr {
    Expr::Verdict(Verdict::Goto(c.to_string()))
}

/// The endpoints a service port's cluster traffic goes to: ready ones; when none is ready, the
/// serving-and-terminating ones (upstream `CategorizeEndpoints`). Deduplicated by `IP:port`
/// (a non-terminating copy wins) and sorted by `IP:port` string, as upstream orders them.
pub fn usable_endpoints(eps: &[Endpoint], family: Family) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<(IpAddr, u16), &Endpoint> = BTreeMap::new();
    for ep in eps.iter().filter(|e| Family::of(&e.ip) == family && e.port != 0) {
        by_addr
            .entry((ep.ip, ep.port))
            .and_modify(|cur| {
                if cur.terminating && !ep.terminating {
                    *cur = ep;
                }
            })
            .or_insert(ep);
    }
    let all: Vec<&Endpoint> = by_addr.into_values().collect();
    let mut chosen: Vec<Endpoint> = all.iter().filter(|e| e.ready).map(|e| (*e).clone()).collect();
    if chosen.is_empty() {
        chosen = all.iter().filter(|e| e.serving && e.terminating).map(|e| (*e).clone()).collect();
    }
    chosen.sort_by_cached_key(|e| e.addr_string());
    chosen
}

/// Splits a service's slot block among `n` endpoints: inclusive ranges, in endpoint order.
pub fn slot_ranges(block: u32, n: usize) -> Vec<(u32, u32)> {
    let base = block as u64 * SLOTS_PER_SERVICE as u64;
    let m = SLOTS_PER_SERVICE as u64;
    let n = n as u64;
    (0..n).map(|i| ((base + i * m / n) as u32, (base + (i + 1) * m / n - 1) as u32)).collect()
}

/// Assigns slot blocks: a service port keeps its block from `previous`; new ones take the lowest
/// free block. Returns the assignment and the service ports that did not fit.
fn assign_slots(
    names: &[&ServicePortName],
    previous: Option<&Ruleset>,
) -> (BTreeMap<ServicePortName, u32>, Vec<Skipped>) {
    let mut slots = BTreeMap::new();
    let mut used = BTreeSet::new();
    if let Some(prev) = previous {
        for n in names {
            if let Some(&b) = prev.slots.get(*n) {
                slots.insert((*n).clone(), b);
                used.insert(b);
            }
        }
    }
    let mut skipped = Vec::new();
    let mut next = 0u32;
    for n in names {
        if slots.contains_key(*n) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        if next >= MAX_SERVICE_PORTS {
            skipped.push(Skipped {
                service: (*n).clone(),
                reason: format!("more than {MAX_SERVICE_PORTS} service ports in one IP family"),
            });
            continue;
        }
        slots.insert((*n).clone(), next);
        used.insert(next);
    }
    (slots, skipped)
}

/// Drops what two service ports of one family cannot both have: the same ClusterIP, protocol and
/// port (the later port, by name, is skipped), the same external or LoadBalancer IP and port (that
/// IP is left out of the later port), or the same node port (the later port loses its node port).
/// The API server never allows these, but manifests can contain them, and one such object must not
/// make the whole transaction fail with EEXIST.
fn resolve_conflicts(state: &ClusterState, fam: Family) -> (BTreeMap<ServicePortName, ServicePort>, Vec<Skipped>) {
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut frontends: BTreeMap<(IpAddr, Protocol, u16), ServicePortName> = BTreeMap::new();
    let mut node_ports: BTreeMap<(Protocol, u16), ServicePortName> = BTreeMap::new();
    for sp in state.services.values().filter(|sp| sp.family() == fam) {
        let proto = sp.name.protocol;
        if let Some(owner) = frontends.get(&(sp.cluster_ip, proto, sp.port)) {
            skipped.push(Skipped {
                service: sp.name.clone(),
                reason: format!("{} {proto}/{} is already used by {owner}", sp.cluster_ip, sp.port),
            });
            continue;
        }
        let mut sp = sp.clone();
        frontends.insert((sp.cluster_ip, proto, sp.port), sp.name.clone());
        let mut keep = |ip: &IpAddr, skipped: &mut Vec<Skipped>| match frontends.get(&(*ip, proto, sp.port)) {
            Some(owner) if *owner != sp.name => {
                skipped.push(Skipped {
                    service: sp.name.clone(),
                    reason: format!("{ip} {proto}/{} is already used by {owner}; left out", sp.port),
                });
                false
            }
            _ => {
                frontends.insert((*ip, proto, sp.port), sp.name.clone());
                true
            }
        };
        sp.external_ips.retain(|ip| keep(ip, &mut skipped));
        sp.load_balancer_ips.retain(|ip| keep(ip, &mut skipped));
        if sp.node_port != 0 {
            if let Some(owner) = node_ports.get(&(proto, sp.node_port)) {
                skipped.push(Skipped {
                    service: sp.name.clone(),
                    reason: format!("node port {proto}/{} is already used by {owner}; left out", sp.node_port),
                });
                sp.node_port = 0;
            } else {
                node_ports.insert((proto, sp.node_port), sp.name.clone());
            }
        }
        out.insert(sp.name.clone(), sp);
    }
    (out, skipped)
}

/// Builds one family's desired ruleset. `node_ips` are the node's local addresses of this family
/// that NodePorts answer on when `nodeport_addresses` is not `All` (the caller resolves keywords
/// and CIDRs against the node); `previous` is the last applied ruleset, whose slot blocks are kept.
pub fn build(state: &ClusterState, node_ips: &[IpAddr], cfg: &BuildConfig, previous: Option<&Ruleset>) -> Built {
    let fam = cfg.family;
    let mut rs = Ruleset::new(fam);
    let addr_t = DataType::addr(fam);
    let mark = cfg.masquerade_mark();
    let match_all_nodeports = cfg.nodeport_addresses == NodePortAddresses::All;

    // Sets and maps, in creation order.
    let typed = |key: Vec<DataType>, data: Option<DataType>| SetType::Typed { key, data };
    let svc_key = vec![addr_t, DataType::InetProto, DataType::InetService];
    let np_key = vec![DataType::InetProto, DataType::InetService];
    rs.add_set(SetDef { name: CLUSTER_IPS_SET.into(), set_type: typed(vec![addr_t], None), interval: false });
    if !match_all_nodeports {
        rs.add_set(SetDef { name: NODEPORT_IPS_SET.into(), set_type: typed(vec![addr_t], None), interval: false });
    }
    rs.add_set(SetDef {
        name: SERVICE_IPS_MAP.into(),
        set_type: typed(svc_key.clone(), Some(DataType::Verdict)),
        interval: false,
    });
    rs.add_set(SetDef {
        name: SERVICE_NODEPORTS_MAP.into(),
        set_type: typed(np_key.clone(), Some(DataType::Verdict)),
        interval: false,
    });
    rs.add_set(SetDef { name: NO_ENDPOINT_SERVICES_SET.into(), set_type: typed(svc_key, None), interval: false });
    rs.add_set(SetDef { name: NO_ENDPOINT_NODEPORTS_SET.into(), set_type: typed(np_key, None), interval: false });
    rs.add_set(SetDef { name: HAIRPIN_SET.into(), set_type: typed(vec![addr_t, addr_t], None), interval: false });

    // Base chains and their fixed rules.
    for (name, t, h, p) in BASE_CHAINS {
        rs.add_chain(name, Some(BaseChain { chain_type: t, hook: h, priority: p }));
    }
    for name in [
        SERVICES,
        MARK_FOR_MASQUERADE,
        MASQUERADING,
        SERVICE_ENDPOINTS_CHECK,
        NODEPORT_ENDPOINTS_CHECK,
        REJECT_CHAIN,
        CLUSTER_IPS_CHECK,
    ] {
        rs.add_chain(name, None);
    }
    rs.add_rule("filter-input", vec![Expr::CtStateNew, jump(NODEPORT_ENDPOINTS_CHECK)]);
    rs.add_rule("filter-input", vec![Expr::CtStateNew, jump(SERVICE_ENDPOINTS_CHECK)]);
    for c in ["filter-forward", "filter-output"] {
        rs.add_rule(c, vec![Expr::CtStateNew, jump(SERVICE_ENDPOINTS_CHECK)]);
        rs.add_rule(c, vec![Expr::CtStateNew, jump(CLUSTER_IPS_CHECK)]);
    }
    rs.add_rule("nat-prerouting", vec![jump(SERVICES)]);
    rs.add_rule("nat-output", vec![jump(SERVICES)]);
    rs.add_rule("nat-postrouting", vec![jump(MASQUERADING)]);

    let tuple = vec![Selector::Daddr, Selector::L4Proto, Selector::ThDport];
    let proto_port = vec![Selector::L4Proto, Selector::ThDport];
    let loopback = match fam {
        Family::V4 => Cidr::parse("127.0.0.0/8").expect("constant"),
        Family::V6 => Cidr::parse("::1/128").expect("constant"),
    };
    rs.add_rule(SERVICES, vec![Expr::Vmap { key: tuple.clone(), map: SERVICE_IPS_MAP.into() }]);
    let nodeport_dst = if match_all_nodeports {
        vec![Expr::FibDaddrLocal, Expr::Cmp { sel: Selector::Daddr, neq: true, right: Operand::Prefix(loopback) }]
    } else {
        vec![Expr::InSet { key: vec![Selector::Daddr], set: NODEPORT_IPS_SET.into(), neq: false }]
    };
    let mut r = nodeport_dst.clone();
    r.push(Expr::Vmap { key: proto_port.clone(), map: SERVICE_NODEPORTS_MAP.into() });
    rs.add_rule(SERVICES, r);

    rs.add_rule(MARK_FOR_MASQUERADE, vec![Expr::MarkOr(mark)]);
    rs.add_rule(
        MASQUERADING,
        vec![
            Expr::CtStatusDnat,
            Expr::InSet { key: vec![Selector::Saddr, Selector::Daddr], set: HAIRPIN_SET.into(), neq: false },
            jump(MARK_FOR_MASQUERADE),
        ],
    );
    rs.add_rule(MASQUERADING, vec![Expr::MarkClear(mark), Expr::Verdict(Verdict::Return)]);
    rs.add_rule(MASQUERADING, vec![Expr::MarkXor(mark)]);
    rs.add_rule(MASQUERADING, vec![Expr::Masquerade]);

    rs.add_rule(
        SERVICE_ENDPOINTS_CHECK,
        vec![Expr::InSet { key: tuple, set: NO_ENDPOINT_SERVICES_SET.into(), neq: false }, goto(REJECT_CHAIN)],
    );
    let nodeport_check_dst = if match_all_nodeports {
        vec![Expr::Cmp { sel: Selector::Daddr, neq: true, right: Operand::Prefix(loopback) }]
    } else {
        vec![Expr::InSet { key: vec![Selector::Daddr], set: NODEPORT_IPS_SET.into(), neq: false }]
    };
    let mut r = nodeport_check_dst;
    r.push(Expr::InSet { key: proto_port, set: NO_ENDPOINT_NODEPORTS_SET.into(), neq: false });
    r.push(goto(REJECT_CHAIN));
    rs.add_rule(NODEPORT_ENDPOINTS_CHECK, r);
    rs.add_rule(REJECT_CHAIN, vec![Expr::Reject]);
    rs.add_rule(
        CLUSTER_IPS_CHECK,
        vec![Expr::InSet { key: vec![Selector::Daddr], set: CLUSTER_IPS_SET.into(), neq: false }, Expr::Reject],
    );

    if !match_all_nodeports {
        for ip in node_ips.iter().filter(|ip| Family::of(ip) == fam && !ip.is_loopback()) {
            rs.add_element(NODEPORT_IPS_SET, Element::key(vec![Value::Addr(*ip)]));
        }
    }

    // Per service port.
    let (services, mut conflicts) = resolve_conflicts(state, fam);
    let names: Vec<&ServicePortName> = services.keys().collect();
    let (slots, mut skipped) = assign_slots(&names, previous);
    skipped.append(&mut conflicts);
    // One endpoint map per shard of ENDPOINT_MAP_SHARD slot blocks (see the module doc).
    let shards: BTreeSet<u32> = slots.values().map(|b| b / ENDPOINT_MAP_SHARD).collect();
    for shard in &shards {
        rs.add_set(SetDef {
            name: service_endpoints_map(*shard),
            set_type: SetType::EndpointSlots { family: fam },
            interval: true,
        });
    }
    let mut hairpin = BTreeSet::new();
    for (spn, &block) in &slots {
        let sp = &services[spn];
        let comment = spn.to_string();
        let svc_chain = service_chain(spn);
        let ext_chain = external_chain(spn);
        let proto = spn.protocol;
        let eps = usable_endpoints(state.endpoints.get(spn).map(|v| v.as_slice()).unwrap_or(&[]), fam);

        rs.add_chain(&svc_chain, None);
        let masq_match = |extra: Option<Expr>| {
            let mut r = vec![
                Expr::Cmp { sel: Selector::Daddr, neq: false, right: Operand::Value(Value::Addr(sp.cluster_ip)) },
                Expr::Cmp { sel: Selector::Dport(proto), neq: false, right: Operand::Value(Value::Port(sp.port)) },
            ];
            r.extend(extra);
            r.push(jump(MARK_FOR_MASQUERADE));
            r
        };
        if cfg.masquerade_all {
            rs.add_rule(&svc_chain, masq_match(None));
        } else if let Some(cidr) = cfg.cluster_cidr.filter(|c| c.family() == fam) {
            rs.add_rule(
                &svc_chain,
                masq_match(Some(Expr::Cmp { sel: Selector::Saddr, neq: true, right: Operand::Prefix(cidr) })),
            );
        }
        rs.add_rule(
            &svc_chain,
            vec![Expr::DnatSlots {
                proto,
                modulus: SLOTS_PER_SERVICE,
                offset: block * SLOTS_PER_SERVICE,
                map: service_endpoints_map(block / ENDPOINT_MAP_SHARD),
            }],
        );

        let external = sp.externally_accessible();
        if external {
            rs.add_chain(&ext_chain, None);
            rs.add_rule(&ext_chain, vec![jump(MARK_FOR_MASQUERADE)]);
            rs.add_rule(&ext_chain, vec![goto(&svc_chain)]);
        }

        rs.add_element(CLUSTER_IPS_SET, Element::key(vec![Value::Addr(sp.cluster_ip)]));
        let to_svc = ElemData::Verdict(Verdict::Goto(svc_chain.clone()));
        let to_ext = ElemData::Verdict(Verdict::Goto(ext_chain.clone()));
        rs.add_element(
            SERVICE_IPS_MAP,
            Element::key(key3(sp.cluster_ip, proto, sp.port)).with_comment(&comment).with_data(to_svc),
        );
        let ext_ips: BTreeSet<IpAddr> = sp
            .external_ips
            .iter()
            .chain(sp.load_balancer_ips.iter())
            .filter(|ip| Family::of(ip) == fam)
            .copied()
            .collect();
        for ip in &ext_ips {
            rs.add_element(
                SERVICE_IPS_MAP,
                Element::key(key3(*ip, proto, sp.port)).with_comment(&comment).with_data(to_ext.clone()),
            );
        }
        if sp.node_port != 0 {
            rs.add_element(
                SERVICE_NODEPORTS_MAP,
                Element::key(vec![Value::Proto(proto), Value::Port(sp.node_port)])
                    .with_comment(&comment)
                    .with_data(to_ext.clone()),
            );
        }

        if eps.is_empty() {
            rs.add_element(
                NO_ENDPOINT_SERVICES_SET,
                Element::key(key3(sp.cluster_ip, proto, sp.port)).with_comment(&comment),
            );
            for ip in &ext_ips {
                rs.add_element(
                    NO_ENDPOINT_SERVICES_SET,
                    Element::key(key3(*ip, proto, sp.port)).with_comment(&comment),
                );
            }
            if sp.node_port != 0 {
                rs.add_element(
                    NO_ENDPOINT_NODEPORTS_SET,
                    Element::key(vec![Value::Proto(proto), Value::Port(sp.node_port)]).with_comment(&comment),
                );
            }
            continue;
        }
        for (ep, (lo, hi)) in eps.iter().zip(slot_ranges(block, eps.len())) {
            rs.add_element(
                &service_endpoints_map(block / ENDPOINT_MAP_SHARD),
                Element {
                    key: vec![Value::Int(lo)],
                    key_end: Some(vec![Value::Int(hi)]),
                    data: Some(ElemData::Values(vec![Value::Addr(ep.ip), Value::Port(ep.port)])),
                    comment: None,
                },
            );
            hairpin.insert(ep.ip);
        }
    }
    for ip in hairpin {
        rs.add_element(HAIRPIN_SET, Element::key(vec![Value::Addr(ip), Value::Addr(ip)]));
    }
    rs.slots = slots;
    Built { ruleset: rs, skipped }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ranges_cover_block_exactly() {
        for n in 1..=40 {
            let r = slot_ranges(3, n);
            assert_eq!(r.len(), n);
            assert_eq!(r[0].0, 3 * SLOTS_PER_SERVICE);
            assert_eq!(r[n - 1].1, 4 * SLOTS_PER_SERVICE - 1);
            for w in r.windows(2) {
                assert_eq!(w[0].1 + 1, w[1].0, "ranges must be adjacent");
            }
            let sizes: Vec<u32> = r.iter().map(|(a, b)| b - a + 1).collect();
            let (mn, mx) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(mx - mn <= 1, "n={n}: sizes differ by more than one slot");
            if n <= 12 {
                assert_eq!(mn, mx, "n={n} must be exactly uniform");
            }
        }
    }

    #[test]
    fn last_block_fits_in_u32() {
        let r = slot_ranges(MAX_SERVICE_PORTS - 1, 7);
        assert!(r.last().unwrap().1 >= r.last().unwrap().0);
    }

    #[test]
    fn usable_endpoints_prefers_ready_then_terminating() {
        let mut term = Endpoint::ready("10.0.0.3", 80);
        term.ready = false;
        term.terminating = true;
        let eps = vec![Endpoint::ready("10.0.0.2", 80), term.clone(), Endpoint::ready("10.0.0.1", 80).not_ready()];
        let u = usable_endpoints(&eps, Family::V4);
        assert_eq!(u.iter().map(|e| e.addr_string()).collect::<Vec<_>>(), vec!["10.0.0.2:80"]);
        let u = usable_endpoints(&[term.clone()], Family::V4);
        assert_eq!(u.len(), 1, "serving+terminating is the fallback");
        let mut not_serving = term;
        not_serving.serving = false;
        assert!(usable_endpoints(&[not_serving], Family::V4).is_empty());
    }

    #[test]
    fn conflicting_frontends_are_skipped_not_fatal() {
        let mut st = ClusterState::default();
        let a = ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80)
            .with_node_port(30000)
            .with_external_ip("192.168.99.1");
        let b = ServicePort::cluster_ip("ns", "b", "", Protocol::Tcp, "172.30.0.1", 80);
        let c = ServicePort::cluster_ip("ns", "c", "", Protocol::Tcp, "172.30.0.3", 80)
            .with_node_port(30000)
            .with_load_balancer_ip("192.168.99.1");
        st.add_service(a).add_service(b).add_service(c);
        let built = build(&st, &[], &BuildConfig::new(Family::V4), None);
        let reasons: Vec<String> = built.skipped.iter().map(|s| s.to_string()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].contains("ns/b") && reasons[0].contains("already used by ns/a"), "{reasons:?}");
        assert!(!built.ruleset.slots.contains_key(&ServicePortName::new("ns", "b", "", Protocol::Tcp)));
        assert_eq!(built.ruleset.elements[SERVICE_NODEPORTS_MAP].len(), 1);
        assert_eq!(built.ruleset.elements[SERVICE_IPS_MAP].len(), 3, "a's CIP + external IP, c's CIP");
        let mut k = crate::fake::FakeKernel::new();
        k.apply(&crate::diff(None, &built.ruleset)).expect("no duplicate elements");
    }

    #[test]
    fn slots_are_kept_across_builds() {
        let mut st = ClusterState::default();
        st.add_service(ServicePort::cluster_ip("ns", "b", "", Protocol::Tcp, "172.30.0.2", 80));
        let cfg = BuildConfig::new(Family::V4);
        let first = build(&st, &[], &cfg, None).ruleset;
        let b = ServicePortName::new("ns", "b", "", Protocol::Tcp);
        assert_eq!(first.slots[&b], 0);
        st.add_service(ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80));
        let second = build(&st, &[], &cfg, Some(&first)).ruleset;
        assert_eq!(second.slots[&b], 0, "existing service keeps its block");
        assert_eq!(second.slots[&ServicePortName::new("ns", "a", "", Protocol::Tcp)], 1);
    }
}
