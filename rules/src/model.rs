//! The compact cluster model the rules are built from: service ports, endpoints, the node.
//!
//! Only what the rules need is kept; k8s-openapi objects are converted into these types at the
//! edge (`src/model/`) and dropped. Everything here is plain data with a total order so that a
//! build is deterministic.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// IP family of a table, a service IP or an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    /// nft family keyword: `ip` or `ip6`.
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    /// Metric label value, as upstream: `IPv4` / `IPv6`.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// L4 protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn from_k8s(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
    /// Lower-case name, as nft prints it and as upstream hashes it.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    /// IANA protocol number (the value of `meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.lower())
    }
}

/// Upstream's ServicePortName: namespace/name, the port's name and its protocol.
///
/// One shared allocation per service port: the name is a key in the tracker, the merged state,
/// the kept ruleset's slots and frontends, so a clone is a reference count, not three strings
/// (at 50k services some 2.5 MiB per copy). Ordered, compared and hashed by value.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName(Arc<PortNameParts>);

#[derive(PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PortNameParts {
    namespace: String,
    name: String,
    port_name: String,
    protocol: Protocol,
}

impl ServicePortName {
    pub fn new(namespace: &str, name: &str, port_name: &str, protocol: Protocol) -> Self {
        ServicePortName(Arc::new(PortNameParts {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port_name: port_name.to_string(),
            protocol,
        }))
    }
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }
    /// The Service's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }
    /// The port's name (empty for an unnamed port).
    pub fn port_name(&self) -> &str {
        &self.0.port_name
    }
    pub fn protocol(&self) -> Protocol {
        self.0.protocol
    }
    /// An equal name in a new allocation of the calling thread (a clone shares the old one).
    pub fn fresh_copy(&self) -> Self {
        Self::new(self.namespace(), self.name(), self.port_name(), self.protocol())
    }
}

impl fmt::Debug for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServicePortName")
            .field("namespace", &self.0.namespace)
            .field("name", &self.0.name)
            .field("port_name", &self.0.port_name)
            .field("protocol", &self.0.protocol)
            .finish()
    }
}

impl fmt::Display for ServicePortName {
    /// `ns/svc:port` (or `ns/svc` for an unnamed port), as upstream logs and comments it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name().is_empty() {
            write!(f, "{}/{}", self.namespace(), self.name())
        } else {
            write!(f, "{}/{}:{}", self.namespace(), self.name(), self.port_name())
        }
    }
}

/// One port of one Service, for one IP family (a dual-stack Service gives one of these per family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// 0 when the port has no node port.
    pub node_port: u16,
    pub external_ips: Vec<IpAddr>,
    /// Status ingress IPs (ipMode Proxy ones are already left out).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `externalTrafficPolicy: Local` on a Service that is externally accessible by type
    /// (upstream `ExternalPolicyLocal`): external traffic goes to this node's endpoints only.
    pub external_traffic_policy_local: bool,
    /// `internalTrafficPolicy: Local`: ClusterIP traffic goes to this node's endpoints only.
    pub internal_traffic_policy_local: bool,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with `externalTrafficPolicy: Local`;
    /// 0 when the Service needs none.
    pub health_check_node_port: u16,
    /// `sessionAffinity: ClientIP`: how long (seconds) a client sticks to its endpoint after its
    /// last new connection. `None` without affinity.
    pub session_affinity_timeout: Option<u32>,
    /// `spec.loadBalancerSourceRanges` of this port's family (other families' ranges are left
    /// out, as upstream does): traffic to the LoadBalancer IPs from elsewhere is dropped.
    pub load_balancer_source_ranges: Vec<Cidr>,
}

impl ServicePort {
    /// An equal port whose name is a new allocation too (see [`ServicePortName::fresh_copy`]).
    pub fn fresh_copy(&self) -> Self {
        ServicePort { name: self.name.fresh_copy(), ..self.clone() }
    }
    /// Fixture builder: a ClusterIP service port.
    pub fn cluster_ip(ns: &str, name: &str, port_name: &str, proto: Protocol, ip: &str, port: u16) -> Self {
        ServicePort {
            name: ServicePortName::new(ns, name, port_name, proto),
            cluster_ip: ip.parse().expect("fixture IP"),
            port,
            node_port: 0,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            external_traffic_policy_local: false,
            internal_traffic_policy_local: false,
            health_check_node_port: 0,
            session_affinity_timeout: None,
            load_balancer_source_ranges: Vec::new(),
        }
    }
    pub fn with_node_port(mut self, node_port: u16) -> Self {
        self.node_port = node_port;
        self
    }
    pub fn with_external_ip(mut self, ip: &str) -> Self {
        self.external_ips.push(ip.parse().expect("fixture IP"));
        self
    }
    pub fn with_load_balancer_ip(mut self, ip: &str) -> Self {
        self.load_balancer_ips.push(ip.parse().expect("fixture IP"));
        self
    }
    /// `externalTrafficPolicy: Local` (the caller makes sure the Service is externally accessible).
    pub fn with_external_traffic_policy_local(mut self) -> Self {
        self.external_traffic_policy_local = true;
        self
    }
    pub fn with_internal_traffic_policy_local(mut self) -> Self {
        self.internal_traffic_policy_local = true;
        self
    }
    pub fn with_health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = port;
        self
    }
    /// `sessionAffinity: ClientIP` with this timeout in seconds.
    pub fn with_session_affinity(mut self, timeout_seconds: u32) -> Self {
        self.session_affinity_timeout = Some(timeout_seconds);
        self
    }
    pub fn with_source_range(mut self, cidr: &str) -> Self {
        self.load_balancer_source_ranges.push(Cidr::parse(cidr).expect("fixture CIDR"));
        self
    }
    /// True when the port is reachable from outside the cluster (upstream `ExternallyAccessible`).
    pub fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }
    /// Whether traffic to this port can go to endpoints on any node (upstream
    /// `UsesClusterEndpoints`): internal traffic with the Cluster policy, or any external access,
    /// since even with `externalTrafficPolicy: Local` pod and node traffic short-circuits to all
    /// endpoints.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_traffic_policy_local || self.externally_accessible()
    }
    /// Whether some traffic to this port goes to this node's endpoints only (upstream
    /// `UsesLocalEndpoints`).
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_traffic_policy_local || (self.external_traffic_policy_local && self.externally_accessible())
    }
    pub fn family(&self) -> Family {
        Family::of(&self.cluster_ip)
    }
}

/// Where an endpoint runs and which topology hints it carries. Most of a cluster's endpoints share
/// one of a few placements (one per node, without hints), so endpoints hold a shared, interned
/// copy ([`Placement::shared`]): 8 bytes per endpoint instead of three owned fields and a string.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Placement {
    /// The node the endpoint runs on, when the slice says.
    pub node_name: Option<String>,
    /// `hints.forZones` names, sorted and deduplicated; empty when the slice gives none.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes` names, sorted and deduplicated; empty when the slice gives none.
    pub node_hints: Vec<String>,
}

impl Placement {
    /// The one shared copy of this placement. Copies nobody holds any more are forgotten as the
    /// interner grows (amortised), so node churn does not make it grow for ever.
    pub fn shared(self) -> Arc<Placement> {
        let mut g = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
        let int = &mut *g;
        let set = int.set.get_or_insert_with(HashSet::new);
        if let Some(p) = set.get(&self) {
            return p.clone();
        }
        if set.len() >= int.prune_at {
            set.retain(|p| Arc::strong_count(p) > 1);
            int.prune_at = (set.len() * 2).max(64);
        }
        let p = Arc::new(self);
        set.insert(p.clone());
        p
    }
}

struct Interner {
    set: Option<HashSet<Arc<Placement>>>,
    prune_at: usize,
}

static INTERNED: Mutex<Interner> = Mutex::new(Interner { set: None, prune_at: 64 });

/// How many placements the interner holds (tests).
#[cfg(test)]
fn interned() -> usize {
    INTERNED.lock().unwrap_or_else(|p| p.into_inner()).set.as_ref().map_or(0, HashSet::len)
}

/// One endpoint of one service port (already resolved to a port number).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Node and topology hints (shared, see [`Placement`]).
    pub placement: Arc<Placement>,
}

impl Endpoint {
    /// Fixture builder: a ready endpoint.
    pub fn ready(ip: &str, port: u16) -> Self {
        Endpoint {
            ip: ip.parse().expect("fixture IP"),
            port,
            ready: true,
            serving: true,
            terminating: false,
            placement: Placement::default().shared(),
        }
    }
    /// The node the endpoint runs on, when the slice says.
    pub fn node_name(&self) -> Option<&str> {
        self.placement.node_name.as_deref()
    }
    /// `hints.forZones` names, sorted and deduplicated.
    pub fn zone_hints(&self) -> &[String] {
        &self.placement.zone_hints
    }
    /// `hints.forNodes` names, sorted and deduplicated.
    pub fn node_hints(&self) -> &[String] {
        &self.placement.node_hints
    }
    fn place(mut self, f: impl FnOnce(&mut Placement)) -> Self {
        let mut p = Placement::clone(&self.placement);
        f(&mut p);
        self.placement = p.shared();
        self
    }
    pub fn on_node(self, node: &str) -> Self {
        self.place(|p| p.node_name = Some(node.to_string()))
    }
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }
    /// Not ready, still serving, terminating: the fallback kind (cases 21-24).
    pub fn serving_terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }
    /// Not ready, not serving, terminating: never used.
    pub fn terminating_not_serving(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self.terminating = true;
        self
    }
    pub fn with_zone_hints(self, zones: &[&str]) -> Self {
        self.place(|p| p.zone_hints = sorted_names(zones))
    }
    pub fn with_node_hints(self, nodes: &[&str]) -> Self {
        self.place(|p| p.node_hints = sorted_names(nodes))
    }
    /// Whether the endpoint runs on the node called `node` (upstream `IsLocal`).
    pub fn is_local_to(&self, node: &str) -> bool {
        self.node_name() == Some(node)
    }
    /// `IP:port` (`[IP]:port` for IPv6), the string upstream sorts and hashes endpoints by.
    pub fn addr_string(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }

    /// [`Self::addr_string`] as a key that orders the same, without a heap allocation (sorting a
    /// cold start's endpoints by their strings was 100k allocations at 10k Services).
    pub fn addr_key(&self) -> AddrKey {
        let mut k = AddrKey([0; 48]);
        let mut at = 0;
        match self.ip {
            IpAddr::V4(ip) => {
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        k.0[at] = b'.';
                        at += 1;
                    }
                    at = k.put_decimal(at, octet.into());
                }
            }
            IpAddr::V6(ip) => {
                use std::io::Write;
                let mut w = &mut k.0[..];
                // "[" + at most 39 characters + "]": always fits.
                let _ = write!(w, "[{ip}]");
                at = 48 - w.len();
            }
        }
        k.0[at] = b':';
        k.put_decimal(at + 1, self.port.into());
        k
    }
}

/// The bytes of an endpoint's `IP:port` string, zero-padded: no string byte is zero, so the
/// padded arrays order exactly as the strings do.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AddrKey([u8; 48]);

impl AddrKey {
    /// Writes `n` in decimal at `at`; returns the position after it.
    fn put_decimal(&mut self, at: usize, n: u32) -> usize {
        let mut digits = [0u8; 10];
        let mut len = 0;
        let mut n = n;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for (i, d) in digits[..len].iter().rev().enumerate() {
            self.0[at + i] = *d;
        }
        at + len
    }
}

/// Orders endpoints as upstream does (by their `IP:port` string) and keeps one per address: the
/// first, unless a later copy that is not terminating replaces a terminating one (case 25).
pub fn order_unique<E: std::borrow::Borrow<Endpoint>>(eps: &mut Vec<E>) {
    // Stable: among copies of one address, the earlier stays first.
    eps.sort_by_cached_key(|e| e.borrow().addr_key());
    eps.dedup_by(|later, kept| {
        let (l, k) = (later.borrow(), kept.borrow());
        if (l.ip, l.port) != (k.ip, k.port) {
            return false;
        }
        if k.terminating && !l.terminating {
            std::mem::swap(later, kept);
        }
        true
    });
}

fn sorted_names(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v.dedup();
    v
}

/// The Node label holding the node's zone (upstream `v1.LabelTopologyZone`).
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// What the rules need to know about this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The node's primary IPs (InternalIP, else ExternalIP, per family) from its Node object.
    pub primary_ips: Vec<IpAddr>,
    /// Every InternalIP and ExternalIP of the Node object, in order.
    pub addresses: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// The Node's `spec.podCIDRs` (else `spec.podCIDR`) that parse, for `--detect-local-mode NodeCIDR`.
    pub pod_cidrs: Vec<Cidr>,
    /// The Node has a deletionTimestamp or the cluster autoscaler's `ToBeDeletedByClusterAutoscaler`
    /// taint. The rules ignore it; `/healthz` fails for such a node (as upstream) so that load
    /// balancers drain it before it goes away.
    pub being_deleted: bool,
}

/// The whole cluster as one family's rules see it: every service port and its endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Shared with the tracker's Services (a port is 120 bytes, held once).
    pub services: BTreeMap<ServicePortName, Arc<ServicePort>>,
    pub endpoints: BTreeMap<ServicePortName, Vec<Endpoint>>,
    /// The service CIDRs of this family from ServiceCIDR objects (networking.k8s.io/v1); empty
    /// when none are known. Traffic to an unallocated address inside them is dropped.
    pub service_cidrs: Vec<Cidr>,
}

/// A copy of `m` in full B-tree nodes. A map filled by inserts in order is left with half-empty
/// nodes and `clone` keeps its shape; collecting from its (sorted) iterator packs every node, which
/// for maps of large values saves up to half their memory (see `crate::memory` in the daemon).
pub fn dense<K: Ord + Clone, V: Clone>(m: &BTreeMap<K, V>) -> BTreeMap<K, V> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// [`dense`] for a set.
pub fn dense_set<T: Ord + Clone>(s: &BTreeSet<T>) -> BTreeSet<T> {
    s.iter().cloned().collect()
}

impl ClusterState {
    /// A copy laid out densely ([`dense`]), for keeping after a large sync.
    pub fn dense_copy(&self) -> ClusterState {
        ClusterState {
            services: dense(&self.services),
            endpoints: dense(&self.endpoints),
            service_cidrs: self.service_cidrs.clone(),
        }
    }
    pub fn add_service(&mut self, sp: impl Into<Arc<ServicePort>>) -> &mut Self {
        let sp = sp.into();
        self.services.insert(sp.name.clone(), sp);
        self
    }
    /// A service port to change (its own copy when it is shared).
    pub fn service_mut(&mut self, name: &ServicePortName) -> Option<&mut ServicePort> {
        self.services.get_mut(name).map(Arc::make_mut)
    }
    pub fn add_endpoint(&mut self, name: &ServicePortName, ep: Endpoint) -> &mut Self {
        self.endpoints.entry(name.clone()).or_default().push(ep);
        self
    }

    /// The endpoints of a service port (none when it has no entry).
    pub fn endpoints_of(&self, spn: &ServicePortName) -> &[Endpoint] {
        self.endpoints.get(spn).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The Services (namespace, name) whose ports or endpoints differ between two states.
    pub fn changed_services(a: &ClusterState, b: &ClusterState) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for n in a.services.keys().chain(b.services.keys()) {
            if a.services.get(n) != b.services.get(n) || a.endpoints.get(n) != b.endpoints.get(n) {
                out.insert((n.namespace().to_string(), n.name().to_string()));
            }
        }
        out
    }

    /// The service ports of the Service `namespace/name`, in order.
    pub fn ports_of<'a>(&'a self, namespace: &'a str, name: &'a str) -> impl Iterator<Item = &'a ServicePortName> + 'a {
        let start = ServicePortName::new(namespace, name, "", Protocol::Tcp);
        self.services.range(start..).map(|(n, _)| n).take_while(move |n| n.namespace() == namespace && n.name() == name)
    }

    /// Copies the ports and endpoints of the Service `namespace/name` into `out`.
    pub fn copy_service_into(&self, namespace: &str, name: &str, out: &mut ClusterState) {
        for n in self.ports_of(namespace, name) {
            out.services.insert(n.clone(), self.services[n].clone());
            if let Some(eps) = self.endpoints.get(n) {
                out.endpoints.insert(n.clone(), eps.clone());
            }
        }
    }

    /// The ports and endpoints of the Services in `keys` (namespace, name), without the CIDRs.
    pub fn restrict(&self, keys: &BTreeSet<(String, String)>) -> ClusterState {
        let mut out = ClusterState::default();
        for (ns, name) in keys {
            self.copy_service_into(ns, name, &mut out);
        }
        out
    }
}

/// Which node IPs NodePorts answer on (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's primary IPs of the family (the nftables-mode default, keyword `primary`).
    Primary,
    /// Every local IP except loopback (`0.0.0.0/0`, `::/0` or the keyword `all`).
    All,
    /// The given node IPs (resolved by the caller from the CIDR list and the node's local addresses).
    Ips(Vec<IpAddr>),
}

/// How traffic from local pods is told apart from other traffic (`--detect-local-mode`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalDetector {
    /// No detector: nothing counts as pod traffic.
    #[default]
    None,
    /// Source address inside the CIDR (modes ClusterCIDR and NodeCIDR): `ip saddr [!=] CIDR`.
    Cidr(Cidr),
    /// Arrives on the pod bridge (mode BridgeInterface): `iifname [!=] "IF"`.
    Bridge(String),
    /// Arrives on an interface whose name starts with the prefix (mode InterfaceNamePrefix):
    /// `iifname [!=] "PREFIX*"`.
    InterfacePrefix(String),
}

/// Build-time configuration for one family's ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    pub family: Family,
    /// The cluster (pod) CIDR of this family, as `addr/len`; traffic from outside it is masqueraded.
    /// Shorthand for `local_detector: LocalDetector::Cidr(..)`, used when `local_detector` is
    /// `LocalDetector::None`.
    pub cluster_cidr: Option<Cidr>,
    /// The local-traffic detector; see [`BuildConfig::detector`].
    pub local_detector: LocalDetector,
    pub masquerade_all: bool,
    /// `1 << masquerade_bit` is the mark that requests masquerade (default bit 14).
    pub masquerade_bit: u8,
    pub nodeport_addresses: NodePortAddresses,
    /// This node's name: endpoints whose `nodeName` is this are local (Local traffic policies).
    pub node_name: String,
    /// This node's zone (label `topology.kubernetes.io/zone`), for topology hints.
    pub node_zone: Option<String>,
    /// This node's primary IP of the family (upstream's `nodeIP`): when a LoadBalancer source
    /// range contains it, the LoadBalancer IPs themselves are allowed sources too.
    pub node_ip: Option<IpAddr>,
}

impl BuildConfig {
    /// The effective detector for this config's family: `local_detector`, else `cluster_cidr`;
    /// a CIDR of the other family detects nothing.
    pub fn detector(&self) -> LocalDetector {
        let d = match (&self.local_detector, self.cluster_cidr) {
            (LocalDetector::None, Some(c)) => LocalDetector::Cidr(c),
            (d, _) => d.clone(),
        };
        match d {
            LocalDetector::Cidr(c) if c.family() != self.family => LocalDetector::None,
            d => d,
        }
    }

    pub fn new(family: Family) -> Self {
        BuildConfig {
            family,
            cluster_cidr: None,
            local_detector: LocalDetector::None,
            masquerade_all: false,
            masquerade_bit: 14,
            nodeport_addresses: NodePortAddresses::Primary,
            node_name: String::new(),
            node_zone: None,
            node_ip: None,
        }
    }
    /// Takes this node's name, zone and primary IP of the family from its Node object.
    pub fn with_node(mut self, node: &NodeInfo) -> Self {
        self.node_name = node.name.clone();
        self.node_zone = node.labels.get(LABEL_TOPOLOGY_ZONE).cloned();
        self.node_ip = node.primary_ips.iter().copied().find(|ip| Family::of(ip) == self.family);
        self
    }
    pub fn masquerade_mark(&self) -> u32 {
        1u32 << self.masquerade_bit
    }
}

/// An address prefix `addr/len`, normalised so that host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8` or `fd00::/64` (whitespace trimmed, host bits cleared).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (a, l) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (addr/len)"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: bad address {a:?}"))?;
        let len: u8 = l.parse().map_err(|_| format!("{s:?}: bad prefix length {l:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s:?}: prefix length {len} exceeds {max}"));
        }
        Ok(Cidr { addr: mask_addr(addr, len), len })
    }
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
    pub fn contains(&self, ip: &IpAddr) -> bool {
        Family::of(ip) == self.family() && mask_addr(*ip, self.len) == self.addr
    }
    /// The prefix as bytes of a mask (for `bitwise` + `cmp` lowering).
    pub fn mask_bytes(&self) -> Vec<u8> {
        let n = if self.addr.is_ipv4() { 4 } else { 16 };
        (0..n)
            .map(|i| {
                let bits = (self.len as i32 - 8 * i).clamp(0, 8);
                if bits == 0 {
                    0
                } else {
                    0xffu8 << (8 - bits)
                }
            })
            .collect()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask_addr(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            IpAddr::V4((u32::from(v) & m).into())
        }
        IpAddr::V6(v) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
            IpAddr::V6((u128::from(v) & m).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_normalises_and_contains() {
        let c = Cidr::parse(" 10.1.2.3/8").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(&"10.200.0.1".parse().unwrap()));
        assert!(!c.contains(&"11.0.0.1".parse().unwrap()));
        assert!(!c.contains(&"::1".parse().unwrap()));
        assert_eq!(c.mask_bytes(), vec![0xff, 0, 0, 0]);
        assert_eq!(Cidr::parse("10.0.0.0/12").unwrap().mask_bytes(), vec![0xff, 0xf0, 0, 0]);
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0.0").is_err());
        assert_eq!(Cidr::parse("fd00:10::5/64").unwrap().to_string(), "fd00:10::/64");
    }

    #[test]
    fn placements_are_shared_and_forgotten_once_unused() {
        let p = |n: &str| Placement { node_name: Some(n.to_string()), ..Default::default() };
        let a = p("interner-test-node").shared();
        let b = p("interner-test-node").shared();
        assert!(Arc::ptr_eq(&a, &b), "one copy per distinct placement");
        assert!(!Arc::ptr_eq(&a, &p("interner-test-other").shared()));
        let e = Endpoint::ready("10.0.0.1", 80).on_node("interner-test-node");
        assert!(Arc::ptr_eq(&e.placement, &a));
        assert_eq!(e.node_name(), Some("interner-test-node"));
        // Placements nobody holds any more go as the interner grows (node churn).
        for i in 0..10_000 {
            drop(p(&format!("interner-test-churn-{i}")).shared());
        }
        assert!(interned() < 1_000, "the interner holds {} placements", interned());
        assert!(Arc::ptr_eq(&a, &p("interner-test-node").shared()), "held ones stay");
    }

    /// The allocation-free key orders and compares exactly as the `IP:port` strings do.
    #[test]
    fn addr_keys_order_as_addr_strings() {
        let ips = [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.0.1",
            "10.0.0.10",
            "10.0.0.100",
            "10.0.1.0",
            "9.255.255.255",
            "255.255.255.255",
            "::",
            "::1",
            "fd00::1",
            "fd00::10",
            "fd00:10:180::3:1",
            "2001:db8::ffff:1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:1.2.3.4",
        ];
        let ports = [0u16, 1, 8, 9, 10, 80, 443, 8080, 9999, 10000, 65535];
        let mut eps = Vec::new();
        for ip in ips {
            for port in ports {
                eps.push(Endpoint::ready(ip, port));
            }
        }
        for a in &eps {
            assert_eq!(a.addr_key().0.iter().take_while(|b| **b != 0).count(), a.addr_string().len());
            for b in &eps {
                assert_eq!(a.addr_key().cmp(&b.addr_key()), a.addr_string().cmp(&b.addr_string()), "{a:?} {b:?}");
            }
        }
    }

    /// One endpoint per address, in string order; the first copy wins unless a later one that is
    /// not terminating replaces a terminating one.
    #[test]
    fn order_unique_keeps_one_per_address() {
        let term = |ip: &str, port: u16| Endpoint { terminating: true, ready: false, ..Endpoint::ready(ip, port) };
        let mut eps = vec![
            term("10.0.0.2", 80),
            Endpoint::ready("10.0.0.10", 80),
            Endpoint::ready("10.0.0.2", 80).on_node("a"),
            Endpoint::ready("10.0.0.2", 80).on_node("b"),
            Endpoint::ready("10.0.0.1", 80).on_node("c"),
            term("10.0.0.1", 80),
            Endpoint::ready("10.0.0.1", 81),
        ];
        order_unique(&mut eps);
        let got: Vec<(String, Option<&str>, bool)> =
            eps.iter().map(|e| (e.addr_string(), e.node_name(), e.terminating)).collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.10:80".to_string(), None, false),
                ("10.0.0.1:80".to_string(), Some("c"), false),
                ("10.0.0.1:81".to_string(), None, false),
                ("10.0.0.2:80".to_string(), Some("a"), false),
            ]
        );
    }

    #[test]
    fn a_dense_copy_is_equal() {
        let st = crate::synthetic::cluster(300, 3, true);
        assert_eq!(st.dense_copy(), st);
        let mut rs = crate::build(&st, &[], &BuildConfig::new(Family::V4), None).ruleset;
        assert_eq!(rs.dense_copy(), rs);
        rs.strip_bulk();
        assert_eq!(rs.dense_copy(), rs);
    }

    #[test]
    fn service_port_name_display() {
        let n = ServicePortName::new("ns1", "svc1", "p80", Protocol::Tcp);
        assert_eq!(n.to_string(), "ns1/svc1:p80");
        let n = ServicePortName::new("ns1", "svc1", "", Protocol::Udp);
        assert_eq!(n.to_string(), "ns1/svc1");
    }
}

#[cfg(test)]
mod order_unique_against_the_old_way {
    use super::*;
    use std::collections::BTreeMap;
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }
    /// The merge before `order_unique`: a B-tree by address, then a sort by the strings.
    fn old(eps: &[Endpoint]) -> Vec<Endpoint> {
        let mut m: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
        for e in eps {
            match m.entry((e.ip, e.port)) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(e.clone());
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    if o.get().terminating && !e.terminating {
                        o.insert(e.clone());
                    }
                }
            }
        }
        let mut v: Vec<Endpoint> = m.into_values().collect();
        v.sort_by_cached_key(Endpoint::addr_string);
        v
    }
    fn ip(rng: &mut Rng) -> IpAddr {
        match rng.below(6) {
            0 => IpAddr::V4(std::net::Ipv4Addr::from(rng.next() as u32)),
            1 => IpAddr::V4(std::net::Ipv4Addr::new(10, 0, rng.below(3) as u8, rng.below(12) as u8)),
            2 => IpAddr::V6(std::net::Ipv6Addr::from(((rng.next() as u128) << 64) | rng.next() as u128)),
            3 => IpAddr::V6(std::net::Ipv6Addr::from(0xffff_0000_0000u128 | rng.below(1 << 32) as u128)),
            4 => IpAddr::V6(std::net::Ipv6Addr::from(rng.below(1 << 32) as u128)),
            _ => {
                let mut seg = [0u16; 8];
                for s in &mut seg {
                    *s = match rng.below(3) {
                        0 => 0,
                        1 => rng.below(16) as u16,
                        _ => 0xffff,
                    }
                }
                IpAddr::V6(std::net::Ipv6Addr::from(seg))
            }
        }
    }
    #[test]
    fn order_unique_equals_old_randomized() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20000 {
            let pool: Vec<IpAddr> = (0..1 + rng.below(6)).map(|_| ip(&mut rng)).collect();
            let ports = [0u16, 1, 8, 80, 800, 8080, 65535];
            let mut eps = Vec::new();
            for _ in 0..rng.below(10) {
                let e = Endpoint {
                    ip: pool[rng.below(pool.len() as u64) as usize],
                    port: ports[rng.below(7) as usize],
                    ready: rng.below(2) == 0,
                    serving: rng.below(2) == 0,
                    terminating: rng.below(2) == 0,
                    ..Endpoint::ready("1.1.1.1", 1)
                }
                .on_node(&format!("n{}", rng.below(100)));
                let k = e.addr_key();
                assert_eq!(
                    k.0.iter().take_while(|b| **b != 0).copied().collect::<Vec<u8>>(),
                    e.addr_string().into_bytes()
                );
                eps.push(e);
            }
            let want = old(&eps);
            let mut got = eps.clone();
            order_unique(&mut got);
            assert_eq!(got, want);
            let mut refs: Vec<&Endpoint> = eps.iter().collect();
            order_unique(&mut refs);
            assert_eq!(refs.into_iter().cloned().collect::<Vec<_>>(), want);
        }
    }
    /// The longest strings fit the key's 48 bytes.
    #[test]
    fn the_longest_addresses_fit() {
        for ip in ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:255.255.255.255", "255.255.255.255"] {
            let e = Endpoint { ip: ip.parse().unwrap(), port: 65535, ..Endpoint::ready("1.1.1.1", 1) };
            assert!(e.addr_string().len() <= 47);
            assert_eq!(e.addr_key().0.iter().take_while(|b| **b != 0).count(), e.addr_string().len());
        }
    }
}
