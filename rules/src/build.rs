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
//! meta l4proto tcp dnat ip to numgen random mod 27720 offset <block start> map @service-endpoints-tcp-<shard>
//! ```
//!
//! and the interval map `service-endpoints-<proto>-<shard>` (one per protocol and shard of 64
//! slot blocks, see `ENDPOINT_MAP_SHARD`; typed per protocol, see `SetType::EndpointSlots`)
//! splits the block evenly among the endpoints (`slot range : addr . port`). So:
//!
//! - an endpoint change only replaces elements of `service-endpoints-*`, `hairpin-endpoints`,
//!   `*-without-endpoints` and `no-local-endpoint-*`: plain data, which the kernel commits
//!   without re-validating the table;
//! - a service chain depends only on the Service, never on its endpoints;
//! - cold start is linear: no per-service sets (upstream's anonymous vmaps are quadratic).
//!
//! 27720 = lcm(1..12): the split is exactly uniform for up to 12 endpoints and for every count
//! dividing it; for other counts an endpoint's share is off by at most N/27720 of itself.
//!
//! # Traffic policies
//!
//! A port with a Local policy (`internalTrafficPolicy`, or `externalTrafficPolicy` on an
//! externally accessible port) owns a second slot block for this node's endpoints, reached from a
//! `local-HASH-…` chain that ends in the same DNAT through the endpoint map. The chains of a port
//! depend only on its Service: `service-…` exists when some traffic uses the Cluster policy,
//! `local-…` when some uses a Local one, whether endpoints exist or not. An empty block makes the
//! DNAT lookup fail, the packet leaves the nat chain untouched, and the filter chains decide:
//! `services-without-endpoints` / `nodeports-without-endpoints` reject (no endpoint anywhere),
//! `no-local-endpoint-services` / `-nodeports` drop (endpoints elsewhere, none here). Upstream writes these as `drop` verdicts
//! in its no-endpoint maps; two plain sets keep the state set data and the filter rules fixed. So
//! an endpoint change stays data-only under every policy.
//!
//! With `externalTrafficPolicy: Local`, `external-…` short-circuits pods (`ip saddr <cluster
//! CIDR>`, with a local traffic detector only) and the node itself (`fib saddr type local`,
//! masqueraded) to `service-…`, and sends the rest to `local-…`, keeping the client's address.
//!
//! # Topology
//!
//! Topology hints (`hints.forNodes`, then `hints.forZones`, with every upstream fallback, see
//! `topology_mode`) narrow the cluster endpoints only; the local list ignores them, as upstream.
//! They only change which endpoints fill a block, so they are data too.
//!
//! # Source ranges
//!
//! `loadBalancerSourceRanges` are checked before DNAT (base chains `filter-prerouting-pre-dnat`
//! and `filter-output-pre-dnat` at priority -110, as upstream) by one fixed rule in
//! `firewall-check`:
//!
//! ```text
//! ip daddr . meta l4proto . th dport @firewalled-services ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow drop
//! ```
//!
//! Upstream jumps through a `firewall-ips` verdict map to a per-service `firewall-HASH-…` chain
//! holding `ip saddr != { ranges } drop` (an anonymous set per service). Here the ranges are
//! elements of one concatenated interval set (`LB IP . proto . port . range`, a pipapo set,
//! kernel 5.6+), so the firewall stays constant rules plus data: a range change is an element
//! change, cold start stays linear (no per-service set or chain), and no anonymous-set lowering is
//! needed. Nested ranges are merged first (interval sets refuse overlaps). When the node's primary
//! IP of the family is inside a range, the LB IPs are allowed sources too (upstream's rule for a
//! VIP held locally, whose traffic is sourced from the VIP).
//!
//! # Session affinity
//!
//! A `sessionAffinity: ClientIP` port needs its choice remembered before the DNAT, which the slot
//! map cannot do (a DNAT statement ends the chain). Such a port uses upstream's layout instead of
//! a slot block: per endpoint, an `affinity-HASH-…__IP/port` set (`flags dynamic,timeout`,
//! `timeout Ns`) and an `endpoint-HASH-…` chain that runs `update @affinity-… { ip saddr }` (adding
//! the client, or restarting its timeout) and DNATs to the endpoint. The service (and local) chain
//! first sends a known client back (`ip saddr @affinity-… goto endpoint-…`), then picks endpoint i
//! of n with `numgen random mod n-i == 0` (1/n each; upstream's anonymous vmap would need
//! anonymous-set lowering). The sets are per endpoint and shared by every chain and IP of the
//! port, so a client keeps its endpoint across ClusterIP, node port and LB IPs; a removed endpoint
//! takes its set along, so no stale entry can point at it. Only these ports give up the
//! data-only property: their endpoint changes rewrite their own chains.
//!
//! # Service CIDRs
//!
//! `cluster-ips-check` ends with `ip daddr @service-cidrs drop`: addresses of the ServiceCIDRs
//! (`ClusterState::service_cidrs`) that no Service holds are dropped (cases 8, 32). Upstream writes
//! the CIDRs into that rule and leaves the rule out while none are known; an always-present rule
//! over a set keeps the layout fixed and a ServiceCIDR change an element change.
//!
//! Hairpin masquerade (a pod reaching itself through its service) is decided in postrouting from
//! the `hairpin-endpoints` set of `addr . addr` pairs (`ct status dnat` and source == destination),
//! which replaces upstream's per-endpoint chains.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

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

/// Service ports with a Local traffic policy whose traffic is dropped because this node has no
/// endpoint for them while other nodes do (upstream's `sync_proxy_rules_no_local_endpoints_total`,
/// label `traffic_policy="internal"` / `"external"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    pub internal: usize,
    pub external: usize,
}

/// Result of a build: the ruleset and what had to be left out.
#[derive(Debug, Clone)]
pub struct Built {
    pub ruleset: Ruleset,
    pub skipped: Vec<Skipped>,
    pub no_local_endpoints: NoLocalEndpoints,
}

/// Base chains: (name, type, hook, priority).
const BASE_CHAINS: [(&str, ChainType, Hook, i32); 8] = [
    // Before DNAT (dstnat - 10), so source ranges are checked against the LB IP itself.
    ("filter-prerouting-pre-dnat", ChainType::Filter, Hook::Prerouting, -110),
    ("filter-output-pre-dnat", ChainType::Filter, Hook::Output, -110),
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
    Expr::Verdict(Verdict::Jump(Arc::from(c)))
}
fn goto(c: &str) -> Expr {
    Expr::Verdict(Verdict::Goto(Arc::from(c)))
}

/// The endpoint sets of one service port, as upstream's `CategorizeEndpoints` makes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Where traffic under the Cluster policy goes: the ready endpoints; when none is ready
    /// anywhere, the serving-and-terminating ones. Empty when the port uses no cluster endpoints.
    pub cluster: Vec<Endpoint>,
    /// Where traffic under a Local policy goes: this node's ready endpoints; when it has none, its
    /// serving-and-terminating ones (cases 72-74). Empty when the port uses no Local policy.
    pub local: Vec<Endpoint>,
    /// Whether any endpoint on any node is usable (ready, or serving and terminating). Without one
    /// the port's traffic is rejected; with one but no local endpoint, Local traffic is dropped.
    pub has_any: bool,
}

/// Categorizes a service port's endpoints for this node (upstream `CategorizeEndpoints`).
///
/// Endpoints of another family or without a port are ignored; the same `IP:port` counts once (a
/// non-terminating copy wins); each list is sorted by the `IP:port` string, as upstream orders
/// endpoints, which fixes their slot ranges.
pub fn categorize_endpoints(
    eps: &[Endpoint],
    sp: &ServicePort,
    node_name: &str,
    node_zone: Option<&str>,
) -> Categorized {
    let fam = sp.family();
    let mut all: Vec<&Endpoint> = eps.iter().filter(|e| Family::of(&e.ip) == fam && e.port != 0).collect();
    crate::model::order_unique(&mut all);
    let pick = |f: &dyn Fn(&Endpoint) -> bool| all.iter().filter(|e| f(e)).map(|e| (*e).clone()).collect::<Vec<_>>();
    let fallback = |e: &Endpoint| e.serving && e.terminating;

    let mut out = Categorized { has_any: all.iter().any(|e| e.ready || fallback(e)), ..Default::default() };
    if sp.uses_cluster_endpoints() {
        // Topology applies to cluster endpoints only (case 97); when it leaves nothing ready, the
        // topology was ignored already (topology_mode), so the fallback below is "none ready".
        let mode = topology_mode(&all, node_name, node_zone);
        out.cluster = pick(&|e| e.ready && mode.admits(e, node_name, node_zone));
        if out.cluster.is_empty() {
            out.cluster = pick(&fallback);
        }
    }
    if sp.uses_local_endpoints() {
        out.local = pick(&|e| e.is_local_to(node_name) && e.ready);
        if out.local.is_empty() {
            out.local = pick(&|e| e.is_local_to(node_name) && fallback(e));
        }
    }
    out
}

/// The prefixes not contained in another one of the list, sorted: interval sets refuse
/// overlapping elements, and two prefixes either nest or are disjoint.
fn minimal_cover(cidrs: &[Cidr]) -> Vec<Cidr> {
    let mut v: Vec<Cidr> = cidrs.to_vec();
    v.sort();
    v.dedup();
    let keep: Vec<Cidr> =
        v.iter().filter(|c| !v.iter().any(|o| o != *c && o.len < c.len && o.contains(&c.addr))).copied().collect();
    keep
}

/// Which endpoints topology hints keep for this node (upstream `topologyModeFromHints`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    /// No filtering: hints missing somewhere, or none for this node or zone.
    All,
    /// `PreferSameNode`: endpoints whose `hints.forNodes` name this node.
    SameNode,
    /// `PreferSameZone`: endpoints whose `hints.forZones` name this node's zone.
    SameZone,
}

impl TopologyMode {
    fn admits(self, e: &Endpoint, node_name: &str, zone: Option<&str>) -> bool {
        match self {
            TopologyMode::All => true,
            TopologyMode::SameNode => e.node_hints().iter().any(|n| n == node_name),
            TopologyMode::SameZone => zone.is_some_and(|z| e.zone_hints().iter().any(|h| h == z)),
        }
    }
}

/// Decides the topology mode from the ready endpoints' hints, with every upstream fallback: node
/// hints win when every ready endpoint has some and one names this node (the
/// PreferSameTrafficDistribution gate, on by default since Kubernetes 1.34); else zone hints when
/// every ready endpoint has some and one names this node's zone; else no filtering (a node
/// without a zone label included, cases 91-96).
pub fn topology_mode(eps: &[&Endpoint], node_name: &str, zone: Option<&str>) -> TopologyMode {
    let ready: Vec<&&Endpoint> = eps.iter().filter(|e| e.ready).collect();
    let all_node = ready.iter().all(|e| !e.node_hints().is_empty());
    let for_node = ready.iter().any(|e| e.node_hints().iter().any(|n| n == node_name));
    let all_zone = ready.iter().all(|e| !e.zone_hints().is_empty());
    let for_zone = zone.is_some_and(|z| ready.iter().any(|e| e.zone_hints().iter().any(|h| h == z)));
    if all_node && for_node {
        TopologyMode::SameNode
    } else if all_zone && for_zone {
        TopologyMode::SameZone
    } else {
        TopologyMode::All
    }
}

/// Splits a service's slot block among `n` endpoints: inclusive ranges, in endpoint order.
pub fn slot_ranges(block: u32, n: usize) -> Vec<(u32, u32)> {
    let base = block as u64 * SLOTS_PER_SERVICE as u64;
    let m = SLOTS_PER_SERVICE as u64;
    let n = n as u64;
    (0..n).map(|i| ((base + i * m / n) as u32, (base + (i + 1) * m / n - 1) as u32)).collect()
}

/// Which endpoint list a slot block serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Pool {
    Cluster,
    Local,
}

/// Slot blocks of every service port, per pool.
#[derive(Debug, Default)]
struct Blocks {
    cluster: BTreeMap<ServicePortName, u32>,
    local: BTreeMap<ServicePortName, u32>,
}

impl Blocks {
    fn pool(&mut self, p: Pool) -> &mut BTreeMap<ServicePortName, u32> {
        match p {
            Pool::Cluster => &mut self.cluster,
            Pool::Local => &mut self.local,
        }
    }
}

/// Assigns slot blocks: a service port keeps its blocks from `previous`; new ones take the lowest
/// free block. A port with the Cluster policy needs a cluster block, one with a Local policy a
/// local block, some ports both. Returns the assignment and the service ports that did not fit
/// (they get no block at all).
fn assign_slots(wants: &[(&ServicePortName, Pool)], previous: Option<&Ruleset>) -> (Blocks, Vec<Skipped>) {
    let mut blocks = Blocks::default();
    let mut used = BTreeSet::new();
    if let Some(prev) = previous {
        for (n, pool) in wants {
            let old = match pool {
                Pool::Cluster => prev.slots.get(*n),
                Pool::Local => prev.local_slots.get(*n),
            };
            if let Some(&b) = old {
                blocks.pool(*pool).insert((*n).clone(), b);
                used.insert(b);
            }
        }
    }
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut next = 0u32;
    for (n, pool) in wants {
        if blocks.pool(*pool).contains_key(*n) || skipped.iter().any(|s| s.service == **n) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        if next >= MAX_SERVICE_PORTS {
            skipped.push(Skipped {
                service: (*n).clone(),
                reason: format!("more than {MAX_SERVICE_PORTS} endpoint slot blocks in one IP family"),
            });
            continue;
        }
        blocks.pool(*pool).insert((*n).clone(), next);
        used.insert(next);
    }
    // A port that got only one of the two blocks it needs is not programmed at all.
    for s in &skipped {
        blocks.cluster.remove(&s.service);
        blocks.local.remove(&s.service);
    }
    (blocks, skipped)
}

/// Drops what two service ports of one family cannot both have: the same ClusterIP, protocol and
/// port (the later port, by name, is skipped), the same external or LoadBalancer IP and port (that
/// IP is left out of the later port), or the same node port (the later port loses its node port).
/// The API server never allows these, but manifests can contain them, and one such object must not
/// make the whole transaction fail with EEXIST.
#[allow(clippy::type_complexity)]
pub(crate) fn resolve_conflicts(
    state: &ClusterState,
    fam: Family,
) -> (BTreeMap<ServicePortName, ServicePort>, Vec<Skipped>, Frontends, NodePorts) {
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut frontends: BTreeMap<(IpAddr, Protocol, u16), ServicePortName> = BTreeMap::new();
    let mut node_ports: BTreeMap<(Protocol, u16), ServicePortName> = BTreeMap::new();
    for sp in state.services.values().filter(|sp| sp.family() == fam) {
        let proto = sp.name.protocol();
        if let Some(owner) = frontends.get(&(sp.cluster_ip, proto, sp.port)) {
            skipped.push(Skipped {
                service: sp.name.clone(),
                reason: format!("{} {proto}/{} is already used by {owner}", sp.cluster_ip, sp.port),
            });
            continue;
        }
        let mut sp = ServicePort::clone(sp);
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
    (out, skipped, frontends, node_ports)
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
    rs.add_set(SetDef {
        name: NO_ENDPOINT_SERVICES_SET.into(),
        set_type: typed(svc_key.clone(), None),
        interval: false,
    });
    rs.add_set(SetDef {
        name: NO_ENDPOINT_NODEPORTS_SET.into(),
        set_type: typed(np_key.clone(), None),
        interval: false,
    });
    rs.add_set(SetDef {
        name: NO_LOCAL_ENDPOINT_SERVICES_SET.into(),
        set_type: typed(svc_key.clone(), None),
        interval: false,
    });
    rs.add_set(SetDef { name: NO_LOCAL_ENDPOINT_NODEPORTS_SET.into(), set_type: typed(np_key, None), interval: false });
    rs.add_set(SetDef { name: SERVICE_CIDRS_SET.into(), set_type: typed(vec![addr_t], None), interval: true });
    rs.add_set(SetDef { name: FIREWALL_IPS_SET.into(), set_type: typed(svc_key.clone(), None), interval: false });
    rs.add_set(SetDef {
        name: FIREWALL_ALLOW_SET.into(),
        set_type: typed(vec![addr_t, DataType::InetProto, DataType::InetService, addr_t], None),
        interval: true,
    });
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
        FIREWALL_CHECK,
    ] {
        rs.add_chain(name, None);
    }
    rs.add_rule("filter-prerouting-pre-dnat", vec![Expr::CtStateNew, jump(FIREWALL_CHECK)]);
    rs.add_rule("filter-output-pre-dnat", vec![Expr::CtStateNew, jump(FIREWALL_CHECK)]);
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
    // ClusterIP traffic from outside the pod network (or all of it with masqueradeAll) is marked
    // for masquerade before it is dispatched. Upstream writes this as the first rule of every
    // service port's chain (`ip daddr CIP tcp dport P ip saddr != PODCIDR jump
    // mark-for-masquerade`); one rule over the `cluster-ips` set marks the same packets, since
    // only ClusterIP traffic matches it and the ones that are not DNATed (an unserved port, no
    // endpoints) are rejected or dropped in the filter chains. It spares the kernel one rule per
    // service port: ~20 % of a cold start's kernel time at 10k services x 10 endpoints.
    let to_cluster_ip = Expr::InSet { key: vec![Selector::Daddr], set: CLUSTER_IPS_SET.into(), neq: false };
    let ctx = PortCtx { cfg, detector: cfg.detector() };
    match (cfg.masquerade_all, ctx.local_detector(true)) {
        (true, _) => rs.add_rule(SERVICES, vec![to_cluster_ip, jump(MARK_FOR_MASQUERADE)]),
        (false, Some(not_from_pods)) => {
            rs.add_rule(SERVICES, vec![to_cluster_ip, not_from_pods, jump(MARK_FOR_MASQUERADE)])
        }
        (false, None) => {}
    }
    rs.add_rule(SERVICES, vec![Expr::Vmap { key: tuple.clone(), map: SERVICE_IPS_MAP.into() }]);
    // loadBalancerSourceRanges: a firewalled LB IP and port drops every source not allowed for it.
    let mut with_source = tuple.clone();
    with_source.push(Selector::Saddr);
    rs.add_rule(
        FIREWALL_CHECK,
        vec![
            Expr::InSet { key: tuple.clone(), set: FIREWALL_IPS_SET.into(), neq: false },
            Expr::InSet { key: with_source, set: FIREWALL_ALLOW_SET.into(), neq: true },
            Expr::Verdict(Verdict::Drop),
        ],
    );
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

    // No endpoint anywhere: reject. Endpoints elsewhere but none here for a Local policy: drop
    // (upstream's `drop` verdict in its no-endpoint-services map; two plain sets here, so that the
    // no-endpoint state stays set data).
    let drop = Expr::Verdict(Verdict::Drop);
    rs.add_rule(
        SERVICE_ENDPOINTS_CHECK,
        vec![Expr::InSet { key: tuple.clone(), set: NO_ENDPOINT_SERVICES_SET.into(), neq: false }, goto(REJECT_CHAIN)],
    );
    rs.add_rule(
        SERVICE_ENDPOINTS_CHECK,
        vec![Expr::InSet { key: tuple, set: NO_LOCAL_ENDPOINT_SERVICES_SET.into(), neq: false }, drop.clone()],
    );
    let nodeport_check_dst = if match_all_nodeports {
        vec![Expr::Cmp { sel: Selector::Daddr, neq: true, right: Operand::Prefix(loopback) }]
    } else {
        vec![Expr::InSet { key: vec![Selector::Daddr], set: NODEPORT_IPS_SET.into(), neq: false }]
    };
    for (set, verdict) in [(NO_ENDPOINT_NODEPORTS_SET, goto(REJECT_CHAIN)), (NO_LOCAL_ENDPOINT_NODEPORTS_SET, drop)] {
        let mut r = nodeport_check_dst.clone();
        r.push(Expr::InSet { key: proto_port.clone(), set: set.into(), neq: false });
        r.push(verdict);
        rs.add_rule(NODEPORT_ENDPOINTS_CHECK, r);
    }
    rs.add_rule(REJECT_CHAIN, vec![Expr::Reject]);
    rs.add_rule(
        CLUSTER_IPS_CHECK,
        vec![Expr::InSet { key: vec![Selector::Daddr], set: CLUSTER_IPS_SET.into(), neq: false }, Expr::Reject],
    );
    // Cases 8, 32: an address of the service CIDRs that no Service holds (yet, or any more) is
    // dropped rather than routed out of the node. The set is empty while no ServiceCIDR is known.
    rs.add_rule(
        CLUSTER_IPS_CHECK,
        vec![
            Expr::InSet { key: vec![Selector::Daddr], set: SERVICE_CIDRS_SET.into(), neq: false },
            Expr::Verdict(Verdict::Drop),
        ],
    );
    for c in minimal_cover(&state.service_cidrs.iter().filter(|c| c.family() == fam).copied().collect::<Vec<_>>()) {
        let (lo, hi) = prefix_range(&c);
        let key_end = (lo != hi).then(|| vec![Value::Addr(hi)]);
        rs.add_element(SERVICE_CIDRS_SET, Element { key: vec![Value::Addr(lo)], key_end, data: None, comment: None });
    }

    if !match_all_nodeports {
        for ip in node_ips.iter().filter(|ip| Family::of(ip) == fam && !ip.is_loopback()) {
            rs.add_element(NODEPORT_IPS_SET, Element::key(vec![Value::Addr(*ip)]));
        }
    }

    // Per service port.
    let (services, mut conflicts, frontends, node_ports) = resolve_conflicts(state, fam);
    let conflicts_count = conflicts.len();
    let mut wants: Vec<(&ServicePortName, Pool)> = Vec::new();
    // ClientIP affinity ports pick endpoints with rules (see the module doc): no slot blocks.
    for (spn, sp) in services.iter().filter(|(_, sp)| sp.session_affinity_timeout.is_none()) {
        if sp.uses_cluster_endpoints() {
            wants.push((spn, Pool::Cluster));
        }
        if sp.uses_local_endpoints() {
            wants.push((spn, Pool::Local));
        }
    }
    let (blocks, mut skipped) = assign_slots(&wants, previous);
    let no_block: BTreeSet<ServicePortName> = skipped.iter().map(|s| s.service.clone()).collect();
    skipped.append(&mut conflicts);
    // One endpoint map per protocol and shard of ENDPOINT_MAP_SHARD slot blocks (module doc).
    let shards: BTreeSet<(Protocol, u32)> = blocks
        .cluster
        .iter()
        .chain(blocks.local.iter())
        .map(|(spn, b)| (spn.protocol(), b / ENDPOINT_MAP_SHARD))
        .collect();
    for (proto, shard) in shards {
        rs.add_set(endpoint_map_def(fam, proto, shard));
    }
    let mut book = Book {
        frontends,
        node_ports,
        conflicts: conflicts_count,
        fingerprint: fingerprint(node_ips, cfg),
        ..Default::default()
    };
    for (spn, sp) in &services {
        if no_block.contains(spn) {
            continue;
        }
        let eps = state.endpoints_of(spn);
        let out =
            ctx.emit_port(&mut rs, spn, sp, eps, blocks.cluster.get(spn).copied(), blocks.local.get(spn).copied());
        book.add_port(spn, &out);
    }
    book.write_shared_elements(&mut rs);
    let no_local = book.no_local_endpoints();
    rs.slots = blocks.cluster;
    rs.local_slots = blocks.local;
    rs.book = book;
    Built { ruleset: rs, skipped, no_local_endpoints: no_local }
}

impl PortCtx<'_> {
    /// Writes one service port's chains, sets and elements into `rs` (which must declare the
    /// shared sets and the endpoint map of its blocks). Elements of the two sets that several
    /// ports share (`cluster-ips`, `hairpin-endpoints`) are returned instead, for reference counting.
    fn emit_port(
        &self,
        rs: &mut Ruleset,
        spn: &ServicePortName,
        sp: &ServicePort,
        eps: &[Endpoint],
        cluster_block: Option<u32>,
        local_block: Option<u32>,
    ) -> PortOut {
        let cfg = self.cfg;
        let fam = cfg.family;
        let node_name = cfg.node_name.as_str();
        let local_detector = |neq: bool| self.local_detector(neq);
        let mut out = PortOut { cluster_ip: sp.cluster_ip, hairpin: BTreeSet::new(), no_local: (false, false) };
        let comment = spn.to_string();
        let proto = spn.protocol();
        let cat = categorize_endpoints(eps, sp, node_name, cfg.node_zone.as_deref());
        let svc_chain = service_chain(spn);
        let loc_chain = local_chain(spn);
        let ext_chain = external_chain(spn);
        let internal_chain = if sp.internal_traffic_policy_local { &loc_chain } else { &svc_chain };
        // externalTrafficPolicy: Local matters only where external traffic exists at all.
        let external_local = sp.external_traffic_policy_local && sp.externally_accessible();

        let dnat = |block: u32| Expr::DnatSlots {
            proto,
            modulus: SLOTS_PER_SERVICE,
            offset: block * SLOTS_PER_SERVICE,
            map: service_endpoints_map(proto, block / ENDPOINT_MAP_SHARD),
        };
        let chains = [
            (&svc_chain, sp.uses_cluster_endpoints(), cluster_block, &cat.cluster),
            (&loc_chain, sp.uses_local_endpoints(), local_block, &cat.local),
        ];
        for (chain, used, block, eps) in chains {
            if !used {
                continue;
            }
            rs.add_chain(chain, None);
            match (sp.session_affinity_timeout, block) {
                (None, Some(block)) => rs.add_rule(chain, vec![dnat(block)]),
                (None, None) => unreachable!("a port without affinity has its blocks or was skipped"),
                (Some(_), _) => {
                    // A client with an affinity entry goes back to its endpoint; anyone else picks
                    // endpoint i of n with probability 1/(n-i) once the ones before were passed,
                    // which is 1/n each, and the endpoint chain records the client.
                    for ep in eps.iter() {
                        rs.add_rule(
                            chain,
                            vec![
                                Expr::InSet {
                                    key: vec![Selector::Saddr],
                                    set: affinity_set(spn, &ep.ip, ep.port),
                                    neq: false,
                                },
                                goto(&endpoint_chain(spn, &ep.ip, ep.port)),
                            ],
                        );
                    }
                    for (i, ep) in eps.iter().enumerate() {
                        let to = goto(&endpoint_chain(spn, &ep.ip, ep.port));
                        let left = (eps.len() - i) as u32;
                        if left > 1 {
                            rs.add_rule(chain, vec![Expr::NumgenEq { modulus: left, value: 0 }, to]);
                        } else {
                            rs.add_rule(chain, vec![to]);
                        }
                    }
                }
            }
        }
        if let Some(timeout) = sp.session_affinity_timeout {
            // One chain and one dynamic set per endpoint, shared by the cluster and local chains
            // and so by every IP of the port (case 90). A removed endpoint takes its set along,
            // so a stale entry can never send a client to it.
            let union: BTreeSet<(IpAddr, u16)> = cat.cluster.iter().chain(&cat.local).map(|e| (e.ip, e.port)).collect();
            for (ip, port) in union {
                let set = affinity_set(spn, &ip, port);
                let chain = endpoint_chain(spn, &ip, port);
                rs.add_set(SetDef {
                    name: set.clone(),
                    set_type: SetType::Affinity { family: fam, timeout },
                    interval: false,
                });
                rs.add_chain(&chain, None);
                rs.add_rule(&chain, vec![Expr::SetUpdate { key: vec![Selector::Saddr], set }]);
                rs.add_rule(&chain, vec![Expr::Dnat { proto, addr: ip, port }]);
            }
        }

        if sp.externally_accessible() {
            rs.add_chain(&ext_chain, None);
            if external_local {
                // Pods and the node itself short-circuit to every endpoint, as if they had gone out
                // to the load balancer and come back; the node's own traffic is masqueraded since
                // its source (often the LB IP itself) cannot be answered directly. Only traffic
                // from elsewhere keeps its source and goes to local endpoints.
                if let Some(from_pod) = local_detector(false) {
                    rs.add_rule(&ext_chain, vec![from_pod, goto(&svc_chain)]);
                }
                rs.add_rule(&ext_chain, vec![Expr::FibSaddrLocal, jump(MARK_FOR_MASQUERADE)]);
                rs.add_rule(&ext_chain, vec![Expr::FibSaddrLocal, goto(&svc_chain)]);
                rs.add_rule(&ext_chain, vec![goto(&loc_chain)]);
            } else {
                rs.add_rule(&ext_chain, vec![jump(MARK_FOR_MASQUERADE)]);
                rs.add_rule(&ext_chain, vec![goto(&svc_chain)]);
            }
        }

        let to_internal = ElemData::Verdict(Verdict::Goto(rs.chain_name(internal_chain)));
        let to_ext = ElemData::Verdict(Verdict::Goto(rs.chain_name(&ext_chain)));
        rs.add_element(
            SERVICE_IPS_MAP,
            Element::key(key3(sp.cluster_ip, proto, sp.port)).with_comment(&comment).with_data(to_internal),
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

        // loadBalancerSourceRanges guard the LB IPs (never the node port, case 52). When the node's
        // own IP is in a range, the LB IPs are allowed sources too: a node reaching a VIP it holds
        // locally comes from that VIP (case 56).
        let lb_ips: BTreeSet<IpAddr> =
            sp.load_balancer_ips.iter().filter(|ip| Family::of(ip) == fam).copied().collect();
        let ranges: Vec<Cidr> = sp.load_balancer_source_ranges.iter().filter(|c| c.family() == fam).copied().collect();
        if !lb_ips.is_empty() && !ranges.is_empty() {
            let node_allowed = cfg.node_ip.is_some_and(|ip| ranges.iter().any(|c| c.contains(&ip)));
            let mut allowed = ranges.clone();
            if node_allowed {
                allowed.extend(lb_ips.iter().map(|ip| Cidr { addr: *ip, len: if ip.is_ipv4() { 32 } else { 128 } }));
            }
            for lb in &lb_ips {
                rs.add_element(FIREWALL_IPS_SET, Element::key(key3(*lb, proto, sp.port)).with_comment(&comment));
                for c in minimal_cover(&allowed) {
                    let (lo, hi) = prefix_range(&c);
                    let mut key = key3(*lb, proto, sp.port);
                    let mut end = key.clone();
                    key.push(Value::Addr(lo));
                    end.push(Value::Addr(hi));
                    let key_end = (lo != hi).then_some(end);
                    rs.add_element(FIREWALL_ALLOW_SET, Element { key, key_end, data: None, comment: None });
                }
            }
        }

        // Where the no-endpoint verdicts apply: the ClusterIP is internal traffic; external and
        // LoadBalancer IPs and the node port are external traffic (whatever the client).
        let internal_keys = [key3(sp.cluster_ip, proto, sp.port)];
        let external_keys: Vec<Vec<Value>> = ext_ips.iter().map(|ip| key3(*ip, proto, sp.port)).collect();
        let np_key = (sp.node_port != 0).then(|| vec![Value::Proto(proto), Value::Port(sp.node_port)]);
        let mut mark = |services_set: &str, nodeports_set: &str, internal: bool, external: bool| {
            let keys = internal_keys.iter().filter(|_| internal).chain(external_keys.iter().filter(|_| external));
            for k in keys {
                rs.add_element(services_set, Element::key(k.clone()).with_comment(&comment));
            }
            if let (Some(k), true) = (&np_key, external) {
                rs.add_element(nodeports_set, Element::key(k.clone()).with_comment(&comment));
            }
        };
        if !cat.has_any {
            mark(NO_ENDPOINT_SERVICES_SET, NO_ENDPOINT_NODEPORTS_SET, true, true);
        } else {
            let internal_none = sp.internal_traffic_policy_local && cat.local.is_empty();
            // Counted by the Service's policy, as upstream, even for a port without external access.
            let external_none = sp.external_traffic_policy_local && cat.local.is_empty();
            out.no_local = (internal_none, external_none);
            mark(NO_LOCAL_ENDPOINT_SERVICES_SET, NO_LOCAL_ENDPOINT_NODEPORTS_SET, internal_none, external_none);
        }

        for (pool, block) in [(&cat.cluster, cluster_block), (&cat.local, local_block)] {
            let Some(block) = block else { continue };
            for (ep, (lo, hi)) in pool.iter().zip(slot_ranges(block, pool.len())) {
                rs.add_element(
                    &service_endpoints_map(proto, block / ENDPOINT_MAP_SHARD),
                    Element {
                        key: vec![Value::Int(lo)],
                        key_end: Some(vec![Value::Int(hi)]),
                        data: Some(ElemData::Values(vec![Value::Addr(ep.ip), Value::Port(ep.port)])),
                        comment: None,
                    },
                );
                out.hairpin.insert(ep.ip);
            }
        }
        out
    }
}

/// Frontends (IP, protocol, port) and the service port that owns each.
pub type Frontends = BTreeMap<(IpAddr, Protocol, u16), ServicePortName>;
/// Node ports (protocol, port) and the service port that owns each.
pub type NodePorts = BTreeMap<(Protocol, u16), ServicePortName>;

/// What writing one service port needs besides the port.
struct PortCtx<'a> {
    cfg: &'a BuildConfig,
    detector: LocalDetector,
}

impl PortCtx<'_> {
    /// The local-traffic detector as a match: `neq` matches traffic that is not from local pods.
    fn local_detector(&self, neq: bool) -> Option<Expr> {
        match &self.detector {
            LocalDetector::None => None,
            LocalDetector::Cidr(c) => Some(Expr::Cmp { sel: Selector::Saddr, neq, right: Operand::Prefix(*c) }),
            LocalDetector::Bridge(name) => Some(Expr::Iifname { name: name.clone(), prefix: false, neq }),
            LocalDetector::InterfacePrefix(p) => Some(Expr::Iifname { name: p.clone(), prefix: true, neq }),
        }
    }
}

/// What one service port contributes to the shared sets and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortOut {
    cluster_ip: IpAddr,
    /// Endpoint addresses in its slot blocks (hairpin masquerade).
    hairpin: BTreeSet<IpAddr>,
    /// Local policy with endpoints elsewhere but none here: (internal, external).
    no_local: (bool, bool),
}

/// What a build knows beyond the ruleset itself, so that a later change of a few Services can be
/// built and diffed alone ([`build_partial`]) instead of rebuilding and diffing everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Book {
    pub frontends: Frontends,
    pub node_ports: NodePorts,
    /// Service ports the last full build skipped for a conflict; partial builds refuse while any
    /// exist (who wins a conflict depends on every port).
    pub conflicts: usize,
    /// The node IPs and configuration the ruleset was built for; a partial build needs the same.
    pub fingerprint: String,
    /// How many service ports use each element of the two shared sets.
    pub hairpin: BTreeMap<IpAddr, u32>,
    pub cluster_ips: BTreeMap<IpAddr, u32>,
    /// Ports counted by `no_local_endpoints`: (internal, external).
    pub no_local: BTreeMap<ServicePortName, (bool, bool)>,
}

impl Book {
    /// A copy laid out densely ([`crate::model::dense`]).
    pub fn dense_copy(&self) -> Book {
        use crate::model::dense;
        Book {
            frontends: dense(&self.frontends),
            node_ports: dense(&self.node_ports),
            conflicts: self.conflicts,
            fingerprint: self.fingerprint.clone(),
            hairpin: dense(&self.hairpin),
            cluster_ips: dense(&self.cluster_ips),
            no_local: dense(&self.no_local),
        }
    }
}

fn count_up(m: &mut BTreeMap<IpAddr, u32>, ip: IpAddr) {
    *m.entry(ip).or_default() += 1;
}

fn count_down(m: &mut BTreeMap<IpAddr, u32>, ip: IpAddr) {
    if let Some(n) = m.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            m.remove(&ip);
        }
    }
}

/// The endpoint map of `proto`'s ports in slot-block shard `shard`.
fn endpoint_map_def(family: Family, proto: Protocol, shard: u32) -> SetDef {
    SetDef {
        name: service_endpoints_map(proto, shard),
        set_type: SetType::EndpointSlots { family, proto },
        interval: true,
    }
}

fn hairpin_element(ip: IpAddr) -> Element {
    Element::key(vec![Value::Addr(ip), Value::Addr(ip)])
}

fn cluster_ip_element(ip: IpAddr) -> Element {
    Element::key(vec![Value::Addr(ip)])
}

impl Book {
    fn add_port(&mut self, spn: &ServicePortName, out: &PortOut) {
        count_up(&mut self.cluster_ips, out.cluster_ip);
        for ip in &out.hairpin {
            count_up(&mut self.hairpin, *ip);
        }
        if out.no_local != (false, false) {
            self.no_local.insert(spn.clone(), out.no_local);
        }
    }

    fn remove_port(&mut self, spn: &ServicePortName, out: &PortOut) {
        count_down(&mut self.cluster_ips, out.cluster_ip);
        for ip in &out.hairpin {
            count_down(&mut self.hairpin, *ip);
        }
        self.no_local.remove(spn);
    }

    fn write_shared_elements(&self, rs: &mut Ruleset) {
        for ip in self.hairpin.keys() {
            rs.add_element(HAIRPIN_SET, hairpin_element(*ip));
        }
        for ip in self.cluster_ips.keys() {
            rs.add_element(CLUSTER_IPS_SET, cluster_ip_element(*ip));
        }
    }

    /// Local-policy ports with endpoints elsewhere but none on this node.
    pub fn no_local_endpoints(&self) -> NoLocalEndpoints {
        let mut n = NoLocalEndpoints::default();
        for (internal, external) in self.no_local.values() {
            n.internal += *internal as usize;
            n.external += *external as usize;
        }
        n
    }
}

/// What a ruleset depends on besides the Services: a partial build needs it unchanged.
fn fingerprint(node_ips: &[IpAddr], cfg: &BuildConfig) -> String {
    format!("{node_ips:?} {cfg:?}")
}

/// The frontends a service port claims, as `resolve_conflicts` records them.
fn frontends_of(sp: &ServicePort) -> impl Iterator<Item = (IpAddr, Protocol, u16)> + '_ {
    std::iter::once(sp.cluster_ip)
        .chain(sp.external_ips.iter().copied())
        .chain(sp.load_balancer_ips.iter().copied())
        .map(|ip| (ip, sp.name.protocol(), sp.port))
}

/// One service port of a partial build, before or after the change.
#[derive(Debug, Clone)]
struct PortRecord {
    spn: ServicePortName,
    sp: ServicePort,
    out: PortOut,
    cluster_block: Option<u32>,
    local_block: Option<u32>,
}

/// A change of some Services, built and diffed alone: apply `tx` to the kernel, then
/// [`Ruleset::commit_partial`] it to the ruleset it was built against.
#[derive(Debug, Clone)]
pub struct Partial {
    pub tx: crate::transaction::Transaction,
    old: Vec<PortRecord>,
    new: Vec<PortRecord>,
}

/// Builds the change from `old` to `new` against `applied`, the ruleset the kernel holds (built by
/// [`build`], maybe updated by partial builds since). `old` and `new` hold every port (and its
/// endpoints) of the changed Services, before and after the change; everything else is as when
/// `applied` was built. The transaction touches only those ports' chains, sets and elements, so
/// its cost follows the change, not the cluster.
///
/// `None` when only a full build can decide: a frontend or node port another Service holds,
/// conflicts from the last full build, other node IPs or configuration, or no free slot block.
pub fn build_partial(
    applied: &Ruleset,
    old: &ClusterState,
    new: &ClusterState,
    node_ips: &[IpAddr],
    cfg: &BuildConfig,
) -> Option<Partial> {
    let fam = cfg.family;
    let book = &applied.book;
    if book.conflicts > 0 || applied.family != fam || book.fingerprint != fingerprint(node_ips, cfg) {
        return None;
    }
    let old_ports: Vec<&ServicePort> = old.services.values().map(|sp| &**sp).filter(|sp| sp.family() == fam).collect();
    let new_ports: Vec<&ServicePort> = new.services.values().map(|sp| &**sp).filter(|sp| sp.family() == fam).collect();
    let leaving: BTreeSet<&ServicePortName> = old_ports.iter().map(|sp| &sp.name).collect();

    // Frontends: a new port may only take what is free or held by a port that is changing.
    let mut claimed = BTreeSet::new();
    let mut claimed_np = BTreeSet::new();
    for sp in &new_ports {
        for k in frontends_of(sp) {
            if book.frontends.get(&k).is_some_and(|o| !leaving.contains(o)) || !claimed.insert(k) {
                return None;
            }
        }
        if sp.node_port != 0 {
            let k = (sp.name.protocol(), sp.node_port);
            if book.node_ports.get(&k).is_some_and(|o| !leaving.contains(o)) || !claimed_np.insert(k) {
                return None;
            }
        }
    }

    // Slot blocks: changing ports keep theirs, new ones take the lowest free blocks.
    let mut used: BTreeMap<u32, Protocol> =
        applied.slots.iter().chain(applied.local_slots.iter()).map(|(spn, b)| (*b, spn.protocol())).collect();
    for sp in &old_ports {
        for b in [applied.slots.get(&sp.name), applied.local_slots.get(&sp.name)].into_iter().flatten() {
            used.remove(b);
        }
    }
    let mut next = 0u32;
    let mut take = |kept: Option<u32>, proto: Protocol, used: &mut BTreeMap<u32, Protocol>| -> Option<u32> {
        let b = match kept {
            Some(b) if !used.contains_key(&b) => b,
            _ => {
                while used.contains_key(&next) {
                    next += 1;
                }
                next
            }
        };
        if b >= MAX_SERVICE_PORTS {
            return None;
        }
        used.insert(b, proto);
        Some(b)
    };
    let mut new_blocks = Vec::with_capacity(new_ports.len());
    for sp in &new_ports {
        let (mut c, mut l) = (None, None);
        if sp.session_affinity_timeout.is_none() {
            if sp.uses_cluster_endpoints() {
                c = Some(take(applied.slots.get(&sp.name).copied(), sp.name.protocol(), &mut used)?);
            }
            if sp.uses_local_endpoints() {
                l = Some(take(applied.local_slots.get(&sp.name).copied(), sp.name.protocol(), &mut used)?);
            }
        }
        new_blocks.push((c, l));
    }

    // Both fragments declare the shared sets, so the diff neither creates nor deletes them, except
    // an endpoint map that gains its first block or loses its last one.
    let shards: BTreeMap<String, (Protocol, u32)> = used
        .iter()
        .map(|(b, proto)| (*proto, b / ENDPOINT_MAP_SHARD))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|(proto, shard)| (service_endpoints_map(proto, shard), (proto, shard)))
        .collect();
    let mut old_frag = Ruleset::new(fam);
    let mut new_frag = Ruleset::new(fam);
    // (Every set but the per-endpoint affinity sets is shared.)
    for name in &applied.set_order {
        let def = &applied.sets[name];
        if matches!(def.set_type, SetType::Affinity { .. }) {
            continue;
        }
        old_frag.add_set(def.clone());
        let empty_shard = matches!(def.set_type, SetType::EndpointSlots { .. }) && !shards.contains_key(name);
        if !empty_shard {
            new_frag.add_set(def.clone());
        }
    }
    for (name, (proto, shard)) in &shards {
        if !applied.sets.contains_key(name) {
            new_frag.add_set(endpoint_map_def(fam, *proto, *shard));
        }
    }

    let ctx = PortCtx { cfg, detector: cfg.detector() };
    let mut old_recs = Vec::with_capacity(old_ports.len());
    for sp in &old_ports {
        let (c, l) = (applied.slots.get(&sp.name).copied(), applied.local_slots.get(&sp.name).copied());
        let out = ctx.emit_port(&mut old_frag, &sp.name, sp, old.endpoints_of(&sp.name), c, l);
        old_recs.push(PortRecord { spn: sp.name.clone(), sp: (*sp).clone(), out, cluster_block: c, local_block: l });
    }
    let mut new_recs = Vec::with_capacity(new_ports.len());
    for (sp, (c, l)) in new_ports.iter().zip(new_blocks) {
        let out = ctx.emit_port(&mut new_frag, &sp.name, sp, new.endpoints_of(&sp.name), c, l);
        new_recs.push(PortRecord { spn: sp.name.clone(), sp: (*sp).clone(), out, cluster_block: c, local_block: l });
    }

    // Shared elements appear or go with their first or last user.
    let mut delta: BTreeMap<(bool, IpAddr), i64> = BTreeMap::new();
    for (recs, d) in [(&old_recs, -1i64), (&new_recs, 1)] {
        for r in recs.iter() {
            *delta.entry((false, r.out.cluster_ip)).or_default() += d;
            for ip in &r.out.hairpin {
                *delta.entry((true, *ip)).or_default() += d;
            }
        }
    }
    for ((is_hairpin, ip), d) in delta {
        let (counts, set, elem) = if is_hairpin {
            (&book.hairpin, HAIRPIN_SET, hairpin_element(ip))
        } else {
            (&book.cluster_ips, CLUSTER_IPS_SET, cluster_ip_element(ip))
        };
        let before = i64::from(counts.get(&ip).copied().unwrap_or(0));
        match (before > 0, before + d > 0) {
            (true, false) => old_frag.add_element(set, elem),
            (false, true) => new_frag.add_element(set, elem),
            _ => {}
        }
    }
    let tx = crate::transaction::diff(Some(&old_frag), &new_frag);
    Some(Partial { tx, old: old_recs, new: new_recs })
}

impl Ruleset {
    /// Records a partial build whose transaction the kernel accepted: the ruleset then equals
    /// what a full build of the new state gives (up to creation order).
    pub fn commit_partial(&mut self, p: &Partial) {
        self.apply_ops(&p.tx);
        let book = &mut self.book;
        for r in &p.old {
            for k in frontends_of(&r.sp) {
                if book.frontends.get(&k) == Some(&r.spn) {
                    book.frontends.remove(&k);
                }
            }
            let np = (r.spn.protocol(), r.sp.node_port);
            if r.sp.node_port != 0 && book.node_ports.get(&np) == Some(&r.spn) {
                book.node_ports.remove(&np);
            }
            self.slots.remove(&r.spn);
            self.local_slots.remove(&r.spn);
            book.remove_port(&r.spn, &r.out);
        }
        for r in &p.new {
            for k in frontends_of(&r.sp) {
                book.frontends.insert(k, r.spn.clone());
            }
            if r.sp.node_port != 0 {
                book.node_ports.insert((r.spn.protocol(), r.sp.node_port), r.spn.clone());
            }
            if let Some(b) = r.cluster_block {
                self.slots.insert(r.spn.clone(), b);
            }
            if let Some(b) = r.local_block {
                self.local_slots.insert(r.spn.clone(), b);
            }
            book.add_port(&r.spn, &r.out);
        }
    }
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

    fn addrs(eps: &[Endpoint]) -> Vec<String> {
        eps.iter().map(|e| e.addr_string()).collect()
    }

    #[test]
    fn cluster_endpoints_prefer_ready_then_serving_terminating() {
        let sp = ServicePort::cluster_ip("ns", "s", "", Protocol::Tcp, "172.30.0.1", 80);
        let term = Endpoint::ready("10.0.0.3", 80).serving_terminating();
        let eps = vec![Endpoint::ready("10.0.0.2", 80), term.clone(), Endpoint::ready("10.0.0.1", 80).not_ready()];
        let c = categorize_endpoints(&eps, &sp, "n", None);
        assert_eq!(addrs(&c.cluster), vec!["10.0.0.2:80"]);
        assert!(c.has_any && c.local.is_empty(), "no Local policy, no local list");
        let c = categorize_endpoints(std::slice::from_ref(&term), &sp, "n", None);
        assert_eq!(c.cluster.len(), 1, "serving+terminating is the fallback");
        let c = categorize_endpoints(&[Endpoint::ready("10.0.0.4", 80).terminating_not_serving()], &sp, "n", None);
        assert!(c.cluster.is_empty() && !c.has_any);
        // Another family, port 0 and duplicates are left out; order is the IP:port string's.
        let eps = vec![
            Endpoint::ready("10.0.0.10", 80),
            Endpoint::ready("fd00::1", 80),
            Endpoint::ready("10.0.0.9", 0),
            Endpoint::ready("10.0.0.2", 80).serving_terminating(),
            Endpoint::ready("10.0.0.2", 80),
        ];
        assert_eq!(addrs(&categorize_endpoints(&eps, &sp, "n", None).cluster), vec!["10.0.0.10:80", "10.0.0.2:80"]);
    }

    /// Upstream's TestTerminatingEndpointsTrafficPolicyLocal / ...Cluster, cases 21-24 and 72-75:
    /// eps .1, .2 local ready; .3 local serving-terminating; .4 local terminating not serving; .5
    /// remote, in the state each case gives it.
    #[test]
    #[allow(clippy::type_complexity)] // a table of cases
    fn terminating_fallback_per_policy() {
        let lb = ServicePort::cluster_ip("ns", "s", "", Protocol::Tcp, "172.30.1.1", 80)
            .with_node_port(30001)
            .with_load_balancer_ip("1.2.3.4");
        let local = lb.clone().with_external_traffic_policy_local();
        let ep = |i: u8| Endpoint::ready(&format!("10.0.1.{i}"), 80).on_node(if i == 5 { "other" } else { "n" });
        let cases: [(&str, Vec<Endpoint>, &[&str], &[&str]); 4] = [
            (
                "ready endpoints exist (21, 72)",
                vec![ep(1), ep(2), ep(3).serving_terminating(), ep(4).terminating_not_serving(), ep(5)],
                &["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"],
                &["10.0.1.1:80", "10.0.1.2:80"],
            ),
            (
                "only terminating endpoints exist (22, 73)",
                vec![ep(2).serving_terminating(), ep(3).serving_terminating(), ep(4).terminating_not_serving(), ep(5)],
                &["10.0.1.5:80"],
                &["10.0.1.2:80", "10.0.1.3:80"],
            ),
            ("terminating endpoints on the remote node (74)", vec![ep(5).serving_terminating()], &["10.0.1.5:80"], &[]),
            (
                "no usable endpoints on any node (23, 75)",
                vec![ep(1).terminating_not_serving(), ep(5).terminating_not_serving()],
                &[],
                &[],
            ),
        ];
        for (what, eps, cluster, local_eps) in cases {
            let c = categorize_endpoints(&eps, &local, "n", None);
            assert_eq!(addrs(&c.cluster), cluster, "{what}: cluster");
            assert_eq!(addrs(&c.local), local_eps, "{what}: local");
            assert_eq!(c.has_any, !cluster.is_empty(), "{what}");
            let c = categorize_endpoints(&eps, &lb, "n", None);
            assert_eq!(addrs(&c.cluster), cluster, "{what}: eTP Cluster");
            assert!(c.local.is_empty(), "{what}: eTP Cluster has no local list");
        }
        // Case 22 with eTP Cluster: ready .5 is remote and wins over local serving-terminating.
        let c = categorize_endpoints(&[ep(2).serving_terminating(), ep(5).serving_terminating()], &lb, "n", None);
        assert_eq!(addrs(&c.cluster), vec!["10.0.1.2:80", "10.0.1.5:80"]);
    }

    /// Upstream's TestCategorizeEndpoints topology cases (pkg/proxy/topology_test.go, without the
    /// removed hints annotation: hints are always honoured), node `n`: cases 91-97.
    #[test]
    #[allow(clippy::type_complexity)] // a table of cases
    fn topology_hints_follow_upstream_categorize_endpoints() {
        struct Ep {
            addr: &'static str,
            zones: &'static [&'static str],
            nodes: &'static [&'static str],
            ready: bool,
            local: bool,
        }
        const fn ep(addr: &'static str, zones: &'static [&'static str]) -> Ep {
            Ep { addr, zones, nodes: &[], ready: true, local: false }
        }
        let sp = |etp: bool, itp: bool| {
            let mut p = ServicePort::cluster_ip("ns", "s", "", Protocol::Tcp, "172.30.0.1", 80);
            if etp {
                p = p.with_node_port(8080).with_external_traffic_policy_local();
            }
            if itp {
                p = p.with_node_port(8080).with_internal_traffic_policy_local();
            }
            p
        };
        let a = ["zone-a"].as_slice();
        let std4 = || {
            vec![
                ep("10.1.2.3", &["zone-a"]),
                ep("10.1.2.4", &["zone-b"]),
                ep("10.1.2.5", &["zone-c"]),
                ep("10.1.2.6", &["zone-a"]),
            ]
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Option<&str>, ServicePort, Vec<Ep>, &[&str], &[&str])> = vec![
            ("normal endpoint filtering (91)", Some("zone-a"), sp(false, false), std4(), &["10.1.2.3", "10.1.2.6"], &[]),
            ("empty node labels (93)", None, sp(false, false), vec![ep("10.1.2.3", a)], &["10.1.2.3"], &[]),
            ("empty zone label (93)", Some(""), sp(false, false), vec![ep("10.1.2.3", a)], &["10.1.2.3"], &[]),
            ("node in different zone, no filtering (93)", Some("zone-b"), sp(false, false), vec![ep("10.1.2.3", a)], &["10.1.2.3"], &[]),
            (
                "unready endpoint",
                Some("zone-a"),
                sp(false, false),
                vec![ep("10.1.2.3", a), ep("10.1.2.4", &["zone-b"]), ep("10.1.2.5", &["zone-c"]), Ep { ready: false, ..ep("10.1.2.6", a) }],
                &["10.1.2.3"],
                &[],
            ),
            (
                "only unready endpoints in same zone, no filtering (94)",
                Some("zone-a"),
                sp(false, false),
                vec![Ep { ready: false, ..ep("10.1.2.3", a) }, ep("10.1.2.4", &["zone-b"]), ep("10.1.2.5", &["zone-c"]), Ep { ready: false, ..ep("10.1.2.6", a) }],
                &["10.1.2.4", "10.1.2.5"],
                &[],
            ),
            (
                "missing hints, no filtering (92)",
                Some("zone-a"),
                sp(false, false),
                vec![ep("10.1.2.3", a), ep("10.1.2.4", &["zone-b"]), ep("10.1.2.5", &[]), ep("10.1.2.6", a)],
                &["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"],
                &[],
            ),
            (
                "multiple hints per endpoint (95)",
                Some("zone-c"),
                sp(false, false),
                vec![ep("10.1.2.3", &["zone-a", "zone-b", "zone-c"]), ep("10.1.2.4", &["zone-b", "zone-c"]), ep("10.1.2.5", &["zone-b", "zone-d"]), ep("10.1.2.6", &["zone-c"])],
                &["10.1.2.3", "10.1.2.4", "10.1.2.6"],
                &[],
            ),
            (
                "externalTrafficPolicy: Local, topology ignored for Local endpoints (97)",
                Some("zone-a"),
                sp(true, false),
                vec![Ep { local: true, ..ep("10.1.2.3", a) }, Ep { local: true, ..ep("10.1.2.4", &["zone-b"]) }, ep("10.1.2.5", &["zone-c"]), ep("10.1.2.6", a)],
                &["10.1.2.3", "10.1.2.6"],
                &["10.1.2.3", "10.1.2.4"],
            ),
            (
                "internalTrafficPolicy: Local, topology ignored for Local endpoints (97)",
                Some("zone-a"),
                sp(false, true),
                vec![Ep { local: true, ..ep("10.1.2.3", a) }, Ep { local: true, ..ep("10.1.2.4", &["zone-b"]) }, ep("10.1.2.5", &["zone-c"]), ep("10.1.2.6", a)],
                &["10.1.2.3", "10.1.2.6"],
                &["10.1.2.3", "10.1.2.4"],
            ),
            (
                "conflicting topology and localness",
                Some("zone-a"),
                sp(true, false),
                vec![Ep { local: true, ..ep("10.0.0.0", a) }, Ep { local: true, ..ep("10.0.0.1", &["zone-b"]) }, ep("10.0.0.2", a), ep("10.0.0.3", &["zone-b"])],
                &["10.0.0.0", "10.0.0.2"],
                &["10.0.0.0", "10.0.0.1"],
            ),
            (
                "node hints: every endpoint has some, one names this node (96)",
                Some("zone-a"),
                sp(false, false),
                vec![Ep { nodes: &["n"], ..ep("10.1.2.3", a) }, Ep { nodes: &["m"], ..ep("10.1.2.4", a) }, Ep { nodes: &["n", "m"], ..ep("10.1.2.5", &["zone-b"]) }],
                &["10.1.2.3", "10.1.2.5"],
                &[],
            ),
            (
                "node hints for other nodes only: zone hints instead (96)",
                Some("zone-a"),
                sp(false, false),
                vec![Ep { nodes: &["m"], ..ep("10.1.2.3", a) }, Ep { nodes: &["m"], ..ep("10.1.2.4", &["zone-b"]) }],
                &["10.1.2.3"],
                &[],
            ),
            (
                "node hints missing on one endpoint: zone hints instead (96)",
                Some("zone-b"),
                sp(false, false),
                vec![Ep { nodes: &["n"], ..ep("10.1.2.3", a) }, ep("10.1.2.4", &["zone-b"])],
                &["10.1.2.4"],
                &[],
            ),
        ];
        for (what, zone, sp, eps, cluster, local) in cases {
            let eps: Vec<Endpoint> = eps
                .iter()
                .map(|e| {
                    let mut x = Endpoint::ready(e.addr, 80).with_zone_hints(e.zones).with_node_hints(e.nodes);
                    x.ready = e.ready;
                    x.serving = e.ready;
                    if e.local {
                        x = x.on_node("n");
                    }
                    x
                })
                .collect();
            let c = categorize_endpoints(&eps, &sp, "n", zone);
            let want = |v: &[&str]| v.iter().map(|a| format!("{a}:80")).collect::<Vec<_>>();
            assert_eq!(addrs(&c.cluster), want(cluster), "{what}: cluster");
            assert_eq!(addrs(&c.local), want(local), "{what}: local");
        }
    }

    /// Case 98: the node's zone label changes; the daemon then syncs in full, and the new ruleset
    /// differs from the old one in endpoint elements only.
    #[test]
    fn a_zone_change_moves_endpoints_only() {
        let sp = ServicePort::cluster_ip("ns", "s", "", Protocol::Tcp, "172.30.0.1", 80);
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        st.add_endpoint(&sp.name, Endpoint::ready("10.0.0.1", 80).with_zone_hints(&["zone-a"]));
        st.add_endpoint(&sp.name, Endpoint::ready("10.0.0.2", 80).with_zone_hints(&["zone-b"]));
        let mut cfg = node_cfg();
        cfg.node_zone = Some("zone-a".into());
        let a = build(&st, &[], &cfg, None).ruleset;
        cfg.node_zone = Some("zone-b".into());
        let b = build(&st, &[], &cfg, Some(&a)).ruleset;
        assert_eq!(elements(&a, &service_endpoints_map(Protocol::Tcp, 0)), vec!["0-27719 : 10.0.0.1 . 80"]);
        assert_eq!(elements(&b, &service_endpoints_map(Protocol::Tcp, 0)), vec!["0-27719 : 10.0.0.2 . 80"]);
        let tx = crate::diff(Some(&a), &b);
        assert!(tx.ops.iter().all(|o| matches!(o, crate::Op::AddElements { .. } | crate::Op::DeleteElements { .. })));
    }

    #[test]
    fn internal_policy_local_uses_only_local_endpoints() {
        let sp = ServicePort::cluster_ip("ns", "s", "", Protocol::Tcp, "172.30.0.1", 80)
            .with_internal_traffic_policy_local();
        let eps = vec![
            Endpoint::ready("10.0.0.1", 80).on_node("n"),
            Endpoint::ready("10.0.0.2", 80).on_node("m"),
            Endpoint::ready("10.0.0.3", 80),
        ];
        let c = categorize_endpoints(&eps, &sp, "n", None);
        assert!(c.cluster.is_empty(), "a ClusterIP-only iTP Local port uses no cluster endpoints");
        assert_eq!(addrs(&c.local), vec!["10.0.0.1:80"]);
        let c = categorize_endpoints(&eps[1..], &sp, "n", None);
        assert!(c.local.is_empty() && c.has_any, "case 84: endpoints elsewhere only");
        // An endpoint without nodeName is never local.
        let c = categorize_endpoints(&eps[2..], &sp, "", None);
        assert!(c.local.is_empty());
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

    /// Every verdict names its chain with the ruleset's own copy of the name, in a full build and
    /// in a ruleset kept by applying a transaction built elsewhere (a cold start's parts).
    #[test]
    fn verdicts_share_the_chain_names() {
        let mut st = ClusterState::default();
        let sp = ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.2", 80)
            .with_node_port(30000)
            .with_external_ip("192.168.99.1");
        st.add_service(sp.clone());
        st.add_endpoint(&sp.name, Endpoint::ready("10.0.0.2", 80));
        let built = build(&st, &[], &BuildConfig::new(Family::V4), None).ruleset;
        let mut kept = Ruleset::new(Family::V4);
        kept.apply_ops(&crate::diff(None, &built));
        for rs in [&built, &kept] {
            let shared = |c: &Arc<str>| Arc::ptr_eq(c, rs.chains.get_key_value(&**c).expect("declared").0);
            let mut seen = 0;
            for e in rs.elements.values().flatten() {
                if let Some(ElemData::Verdict(Verdict::Jump(c) | Verdict::Goto(c))) = &e.data {
                    assert!(shared(c), "element {e}");
                    seen += 1;
                }
            }
            for rule in rs.chains.values().flat_map(|c| &c.rules) {
                for x in &rule.exprs {
                    if let Expr::Verdict(Verdict::Jump(c) | Verdict::Goto(c)) = x {
                        assert!(shared(c), "rule {rule:?}");
                        seen += 1;
                    }
                }
            }
            assert!(seen >= 5, "service-ips, service-nodeports and the external chain's gotos: {seen}");
        }
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

    fn node_cfg() -> BuildConfig {
        let mut cfg = BuildConfig::new(Family::V4);
        cfg.node_name = "n".into();
        cfg.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").unwrap());
        cfg
    }

    fn elements(rs: &Ruleset, set: &str) -> Vec<String> {
        rs.elements[set].iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn local_policies_get_their_own_block_and_drop_without_local_endpoints() {
        let etp = ServicePort::cluster_ip("ns", "e", "", Protocol::Tcp, "172.30.0.1", 80)
            .with_node_port(30001)
            .with_load_balancer_ip("1.2.3.4")
            .with_external_traffic_policy_local();
        let itp = ServicePort::cluster_ip("ns", "i", "", Protocol::Tcp, "172.30.0.2", 80)
            .with_internal_traffic_policy_local();
        let mut st = ClusterState::default();
        st.add_service(etp.clone()).add_service(itp.clone());
        st.add_endpoint(&etp.name, Endpoint::ready("10.0.1.1", 80).on_node("n"));
        st.add_endpoint(&etp.name, Endpoint::ready("10.0.2.1", 80).on_node("m"));
        st.add_endpoint(&itp.name, Endpoint::ready("10.0.2.2", 80).on_node("m"));
        let cfg = node_cfg();
        let b = build(&st, &[], &cfg, None);
        let rs = &b.ruleset;
        assert_eq!((rs.slots.get(&etp.name), rs.local_slots.get(&etp.name)), (Some(&0), Some(&1)));
        assert_eq!((rs.slots.get(&itp.name), rs.local_slots.get(&itp.name)), (None, Some(&2)));
        assert!(!rs.chains.contains_key(service_chain(&itp.name).as_str()), "no cluster traffic, no cluster chain");
        assert_eq!(
            elements(rs, &service_endpoints_map(Protocol::Tcp, 0)),
            vec!["0-13859 : 10.0.1.1 . 80", "13860-27719 : 10.0.2.1 . 80", "27720-55439 : 10.0.1.1 . 80"]
        );
        assert_eq!(elements(rs, NO_LOCAL_ENDPOINT_SERVICES_SET), vec!["172.30.0.2 . tcp . 80 comment \"ns/i\""]);
        assert_eq!(b.no_local_endpoints, NoLocalEndpoints { internal: 1, external: 0 });

        // The eTP Local port loses its local endpoint: element changes only, no chain touched.
        let mut st2 = st.clone();
        st2.endpoints.get_mut(&etp.name).unwrap().remove(0);
        let b2 = build(&st2, &[], &cfg, Some(rs));
        assert_eq!(b2.no_local_endpoints, NoLocalEndpoints { internal: 1, external: 1 });
        assert_eq!(
            elements(&b2.ruleset, NO_LOCAL_ENDPOINT_SERVICES_SET),
            vec!["1.2.3.4 . tcp . 80 comment \"ns/e\"", "172.30.0.2 . tcp . 80 comment \"ns/i\""]
        );
        assert_eq!(elements(&b2.ruleset, NO_LOCAL_ENDPOINT_NODEPORTS_SET), vec!["tcp . 30001 comment \"ns/e\""]);
        let tx = crate::diff(Some(rs), &b2.ruleset);
        assert!(
            tx.ops.iter().all(|o| matches!(o, crate::Op::AddElements { .. } | crate::Op::DeleteElements { .. })),
            "an endpoint change must be data only:\n{tx}"
        );
        let mut k = crate::fake::FakeKernel::new();
        k.apply(&crate::diff(None, rs)).unwrap();
        k.apply(&tx).unwrap();

        // No endpoints anywhere: rejected, not dropped, and not counted (upstream TestNoEndpointsMetric).
        let mut st3 = st.clone();
        st3.endpoints.clear();
        let b3 = build(&st3, &[], &cfg, Some(rs));
        assert_eq!(b3.no_local_endpoints, NoLocalEndpoints::default());
        assert!(b3.ruleset.elements[NO_LOCAL_ENDPOINT_SERVICES_SET].is_empty());
        assert_eq!(b3.ruleset.elements[NO_ENDPOINT_SERVICES_SET].len(), 3);
    }

    #[test]
    fn external_chain_short_circuits_pods_and_the_node_under_etp_local() {
        let sp = ServicePort::cluster_ip("ns", "e", "", Protocol::Tcp, "172.30.0.1", 80)
            .with_node_port(30001)
            .with_external_traffic_policy_local();
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        let text = |cfg: &BuildConfig| -> Vec<String> {
            let rs = build(&st, &[], cfg, None).ruleset;
            rs.chains[external_chain(&sp.name).as_str()]
                .rules
                .iter()
                .map(|r| r.display(Family::V4).to_string())
                .collect()
        };
        let (svc, loc) = (service_chain(&sp.name), local_chain(&sp.name));
        assert_eq!(
            text(&node_cfg()),
            vec![
                format!("ip saddr 10.0.0.0/8 goto {svc}"),
                "fib saddr type local jump mark-for-masquerade".to_string(),
                format!("fib saddr type local goto {svc}"),
                format!("goto {loc}"),
            ]
        );
        // Case 68: no local traffic detector, no pod short-circuit.
        let mut cfg = node_cfg();
        cfg.cluster_cidr = None;
        assert_eq!(text(&cfg).len(), 3);
        // The interface detectors short-circuit on the input interface instead.
        cfg.local_detector = LocalDetector::Bridge("cbr0".into());
        assert_eq!(text(&cfg)[0], format!("iifname \"cbr0\" goto {svc}"));
        cfg.local_detector = LocalDetector::InterfacePrefix("veth".into());
        assert_eq!(text(&cfg)[0], format!("iifname \"veth*\" goto {svc}"));
        // A CIDR of the other family detects nothing.
        cfg.local_detector = LocalDetector::Cidr(Cidr::parse("fd00::/64").unwrap());
        assert_eq!(text(&cfg).len(), 3);
        // Case 12: --masquerade-all does not change the external chain (only the ClusterIP rule).
        cfg.local_detector = LocalDetector::None;
        cfg.masquerade_all = true;
        assert_eq!(text(&cfg)[0], "fib saddr type local jump mark-for-masquerade");
    }

    #[test]
    fn one_rule_over_cluster_ips_marks_clusterip_traffic_for_masquerade() {
        let sp = ServicePort::cluster_ip("ns", "c", "", Protocol::Tcp, "172.30.0.1", 80);
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        st.add_endpoint(&sp.name, Endpoint::ready("10.180.0.1", 80));
        let services = |cfg: &BuildConfig| -> Vec<String> {
            let rs = build(&st, &[], cfg, None).ruleset;
            let svc = &rs.chains[service_chain(&sp.name).as_str()].rules;
            assert_eq!(svc.len(), 1, "the service chain only DNATs");
            rs.chains[SERVICES].rules.iter().map(|r| r.display(Family::V4).to_string()).collect()
        };
        let vmap = "ip daddr . meta l4proto . th dport vmap @service-ips";
        let mut cfg = node_cfg();
        assert_eq!(
            services(&cfg)[..2],
            ["ip daddr @cluster-ips ip saddr != 10.0.0.0/8 jump mark-for-masquerade", vmap]
        );
        cfg.local_detector = LocalDetector::Bridge("cbr0".into());
        assert_eq!(services(&cfg)[0], "ip daddr @cluster-ips iifname != \"cbr0\" jump mark-for-masquerade");
        // Case 68: no detector, no masquerade of ClusterIP traffic; case 12: masqueradeAll, all of it.
        cfg.local_detector = LocalDetector::None;
        cfg.cluster_cidr = None;
        assert_eq!(services(&cfg)[0], vmap);
        cfg.masquerade_all = true;
        assert_eq!(services(&cfg)[0], "ip daddr @cluster-ips jump mark-for-masquerade");
    }

    #[test]
    fn source_ranges_fill_the_firewall_sets_and_allow_lb_ips_when_the_node_is_inside() {
        let sp = ServicePort::cluster_ip("ns", "lb", "p", Protocol::Tcp, "172.30.0.1", 80)
            .with_node_port(30001)
            .with_load_balancer_ip("1.2.3.4")
            .with_load_balancer_ip("5.6.7.8")
            .with_source_range("192.168.0.0/24")
            .with_source_range("203.0.113.0/25")
            .with_source_range("192.168.0.128/25")
            .with_source_range("2001:db8::/32");
        let no_lb = ServicePort::cluster_ip("ns", "np", "", Protocol::Tcp, "172.30.0.2", 80)
            .with_node_port(30002)
            .with_source_range("10.0.0.0/8");
        let mut st = ClusterState::default();
        st.add_service(sp).add_service(no_lb);
        let mut cfg = node_cfg();
        cfg.node_ip = Some("192.168.0.2".parse().unwrap());
        let rs = build(&st, &[], &cfg, None).ruleset;
        assert_eq!(
            elements(&rs, FIREWALL_IPS_SET),
            vec!["1.2.3.4 . tcp . 80 comment \"ns/lb:p\"", "5.6.7.8 . tcp . 80 comment \"ns/lb:p\""],
            "LB IPs only: node ports are never filtered (case 52), a port without LB IPs has nothing"
        );
        // Case 56: the node (192.168.0.2) is inside a range, so both LB IPs are allowed sources; the
        // nested 192.168.0.128/25 and the IPv6 range are left out.
        assert_eq!(
            elements(&rs, FIREWALL_ALLOW_SET),
            vec![
                "1.2.3.4 . tcp . 80 . 1.2.3.4",
                "1.2.3.4 . tcp . 80 . 5.6.7.8",
                "1.2.3.4 . tcp . 80 . 192.168.0.0/24",
                "1.2.3.4 . tcp . 80 . 203.0.113.0/25",
                "5.6.7.8 . tcp . 80 . 1.2.3.4",
                "5.6.7.8 . tcp . 80 . 5.6.7.8",
                "5.6.7.8 . tcp . 80 . 192.168.0.0/24",
                "5.6.7.8 . tcp . 80 . 203.0.113.0/25",
            ]
        );
        // Case 57: the node outside every range: only the ranges.
        cfg.node_ip = Some("192.168.1.2".parse().unwrap());
        let rs = build(&st, &[], &cfg, None).ruleset;
        assert_eq!(rs.elements[FIREWALL_ALLOW_SET].len(), 4);
        let mut k = crate::fake::FakeKernel::new();
        k.apply(&crate::diff(None, &rs)).unwrap();
    }

    #[test]
    fn service_cidrs_drop_unallocated_cluster_ips() {
        let mut st = ClusterState::default();
        st.add_service(ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.41", 80));
        let rs = build(&st, &[], &node_cfg(), None).ruleset;
        let rules: Vec<String> =
            rs.chains[CLUSTER_IPS_CHECK].rules.iter().map(|r| r.display(Family::V4).to_string()).collect();
        assert_eq!(rules, vec!["ip daddr @cluster-ips reject", "ip daddr @service-cidrs drop"]);
        assert!(rs.elements[SERVICE_CIDRS_SET].is_empty(), "no ServiceCIDR known: nothing dropped");
        let c = |s: &str| Cidr::parse(s).unwrap();
        st.service_cidrs = vec![c("172.30.0.0/16"), c("172.30.5.0/24"), c("10.96.0.1/32"), c("fd00:10:96::/112")];
        let rs2 = build(&st, &[], &node_cfg(), Some(&rs)).ruleset;
        assert_eq!(elements(&rs2, SERVICE_CIDRS_SET), vec!["10.96.0.1", "172.30.0.0/16"]);
        let tx = crate::diff(Some(&rs), &rs2);
        assert!(tx.ops.iter().all(|o| matches!(o, crate::Op::AddElements { .. })), "data only:\n{tx}");
        let mut k = crate::fake::FakeKernel::new();
        k.apply(&crate::diff(None, &rs)).unwrap();
        k.apply(&tx).unwrap();
    }

    #[test]
    fn client_ip_affinity_uses_endpoint_chains_and_per_endpoint_sets() {
        let sp = ServicePort::cluster_ip("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80)
            .with_node_port(30001)
            .with_session_affinity(10800);
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        for ip in ["10.180.0.1", "10.180.0.2", "10.180.0.3"] {
            st.add_endpoint(&sp.name, Endpoint::ready(ip, 80));
        }
        let rs = build(&st, &[], &node_cfg(), None).ruleset;
        assert!(rs.slots.is_empty(), "affinity ports use no slot block");
        let rules = |rs: &Ruleset, c: &str| -> Vec<String> {
            rs.chains[c].rules.iter().map(|r| r.display(Family::V4).to_string()).collect()
        };
        let ep = |i: u8| format!("ULMVA6XW-ns1/svc1/tcp/p80__10.180.0.{i}/80");
        let e1 = endpoint_chain(&sp.name, &"10.180.0.1".parse().unwrap(), 80);
        assert!(e1.starts_with("endpoint-5OJB2KTY-"), "{e1}");
        let svc = rules(&rs, &service_chain(&sp.name));
        assert_eq!(svc.len(), 6, "{svc:#?}");
        assert!(svc[0].starts_with("ip saddr @affinity-") && svc[0].contains("goto endpoint-"), "{}", svc[0]);
        assert_eq!(svc[3], format!("numgen random mod 3 == 0 goto {e1}"));
        assert!(svc[4].starts_with("numgen random mod 2 == 0 goto endpoint-"));
        assert!(svc[5].starts_with("goto endpoint-") && svc[5].ends_with("10.180.0.3/80"));
        assert_eq!(
            rules(&rs, &e1),
            vec![
                format!("update @{} {{ ip saddr }}", affinity_set(&sp.name, &"10.180.0.1".parse().unwrap(), 80)),
                "meta l4proto tcp dnat ip to 10.180.0.1:80".to_string()
            ]
        );
        let set = &rs.sets[&affinity_set(&sp.name, &"10.180.0.2".parse().unwrap(), 80)];
        assert_eq!(set.to_string(), "type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ;");
        assert!(ep(1).len() > 10);

        // An endpoint goes away: its chain and set go with it (never a stale entry to it); a
        // timeout change re-creates the sets, refilling the chains that use them.
        let mut k = crate::fake::FakeKernel::new();
        k.apply(&crate::diff(None, &rs)).unwrap();
        let mut st2 = st.clone();
        st2.endpoints.get_mut(&sp.name).unwrap().remove(1);
        let rs2 = build(&st2, &[], &node_cfg(), Some(&rs)).ruleset;
        let gone = affinity_set(&sp.name, &"10.180.0.2".parse().unwrap(), 80);
        assert!(!rs2.sets.contains_key(&gone));
        let tx = crate::diff(Some(&rs), &rs2);
        assert!(tx.ops.contains(&crate::Op::DeleteSet(gone)), "{tx}");
        k.apply(&tx).unwrap();
        let mut st3 = st2.clone();
        st3.service_mut(&sp.name).unwrap().session_affinity_timeout = Some(60);
        let rs3 = build(&st3, &[], &node_cfg(), Some(&rs2)).ruleset;
        k.apply(&crate::diff(Some(&rs2), &rs3)).unwrap();
        // Back to no affinity: the port takes a slot block again.
        let rs4 = build(&st, &[], &node_cfg(), Some(&rs3)).ruleset;
        k.apply(&crate::diff(Some(&rs3), &rs4)).unwrap();
        let mut st5 = st.clone();
        st5.service_mut(&sp.name).unwrap().session_affinity_timeout = None;
        let rs5 = build(&st5, &[], &node_cfg(), Some(&rs4)).ruleset;
        assert_eq!(rs5.slots.len(), 1);
        assert!(!rs5.sets.keys().any(|s| s.starts_with("affinity-")));
        k.apply(&crate::diff(Some(&rs4), &rs5)).unwrap();
    }

    #[test]
    fn interval_elements_print_as_nft_reads_them() {
        let a = |s: &str| Value::Addr(s.parse().unwrap());
        let e = Element {
            key: vec![a("1.2.3.4"), Value::Proto(Protocol::Tcp), Value::Port(80), a("10.0.0.0")],
            key_end: Some(vec![a("1.2.3.4"), Value::Proto(Protocol::Tcp), Value::Port(80), a("10.255.255.255")]),
            data: None,
            comment: None,
        };
        assert_eq!(e.to_string(), "1.2.3.4 . tcp . 80 . 10.0.0.0/8");
        let e = Element { key: vec![a("10.0.0.1")], key_end: Some(vec![a("10.0.0.9")]), data: None, comment: None };
        assert_eq!(e.to_string(), "10.0.0.1-10.0.0.9");
        let e = Element { key: vec![Value::Int(0)], key_end: Some(vec![Value::Int(9)]), data: None, comment: None };
        assert_eq!(e.to_string(), "0-9");
        for c in ["0.0.0.0/0", "10.0.0.0/8", "192.168.0.128/25", "10.1.2.3/32", "::/0", "fd00::/64", "fd00::1/128"] {
            let c = Cidr::parse(c).unwrap();
            let (lo, hi) = prefix_range(&c);
            assert_eq!(prefix_of(lo, hi), Some(c), "{c}");
        }
        assert_eq!(prefix_of("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()), None);
        assert_eq!(prefix_of("10.0.0.0".parse().unwrap(), "10.0.0.2".parse().unwrap()), None);
    }

    #[test]
    fn build_config_takes_name_zone_and_primary_ip_of_its_family_from_the_node() {
        let node = NodeInfo {
            name: "n1".into(),
            primary_ips: vec!["fd00::2".parse().unwrap(), "192.168.0.2".parse().unwrap()],
            labels: [(LABEL_TOPOLOGY_ZONE.to_string(), "zone-a".to_string())].into(),
            ..Default::default()
        };
        let cfg = BuildConfig::new(Family::V4).with_node(&node);
        assert_eq!(cfg.node_name, "n1");
        assert_eq!(cfg.node_zone.as_deref(), Some("zone-a"));
        assert_eq!(cfg.node_ip, Some("192.168.0.2".parse().unwrap()));
        assert_eq!(BuildConfig::new(Family::V6).with_node(&node).node_ip, Some("fd00::2".parse().unwrap()));
    }
}
