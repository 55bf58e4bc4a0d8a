//! iptables mode: upstream kube-proxy's iptables ruleset (`pkg/proxy/iptables/proxier.go`), built
//! from the same model as the nftables ruleset, and its `iptables-restore` text.
//!
//! # Layout (as upstream)
//!
//! - filter: `KUBE-SERVICES` (REJECT / DROP of cluster IPs without (local) endpoints),
//!   `KUBE-EXTERNAL-SERVICES` (the same for external IPs, LB IPs and node ports),
//!   `KUBE-NODEPORTS` (ACCEPT of health check node ports), `KUBE-FORWARD`,
//!   `KUBE-PROXY-FIREWALL` (drop what a `KUBE-FW-…` chain did not DNAT) and, for IPv4 with
//!   localhost node ports, kubelet's `KUBE-FIREWALL` (drop martian localnet traffic).
//! - nat: `KUBE-SERVICES` (cluster, external and LB IPs, then the node-port tail rule),
//!   `KUBE-NODEPORTS`, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`, and per service port
//!   `KUBE-SVC-` (Cluster policy endpoints), `KUBE-SVL-` (Local policy endpoints), `KUBE-EXT-`
//!   (external destinations), `KUBE-FW-` (loadBalancerSourceRanges) and per endpoint `KUBE-SEP-`,
//!   named by the first 16 characters of base32(sha256(…)).
//!
//! Endpoints are picked with `-m statistic --mode random --probability 1/(n-i)`; ClientIP
//! affinity uses `-m recent` lists named after the endpoint chain.
//!
//! # Order
//!
//! Upstream walks a Go map, so its output order is random; its tests sort it
//! (`sortIPTablesRules`): chains `KUBE-NODEPORTS`, `KUBE-SERVICES`, then by name; the rules of
//! `KUBE-SERVICES` and `KUBE-NODEPORTS` by `namespace/name` (the nat node-port rule last), the
//! rules of one service in the order upstream writes them. That sorted form is the output here.
//!
//! # Partial restores
//!
//! [`restore_input`] with the applied ruleset writes only the fixed chains and the per-service
//! chains whose rules changed, and deletes (`-X`) the per-service chains that are gone: the
//! shape of upstream's partial sync, decided by comparing rules instead of tracking changes.
//!
//! # Differences from upstream
//!
//! - The mark is printed as real kube-proxy prints it (`%#08x`: `0x00004000`); upstream's tests
//!   use a fake that prints `0x4000`. The kernel stores the same value.
//! - What upstream probes on the host is an [`IptOptions`] field: `--random-fully` (on by
//!   default), nfacct counters (off), `nf_conntrack_tcp_be_liberal` (off).
//! - Two service ports with the same frontend (which the API server never allows) are resolved
//!   as the nftables build does and reported in [`BuiltIpt::skipped`]; upstream writes both
//!   rules and the first one wins.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::build::{categorize_endpoints, NoLocalEndpoints, Skipped};
use crate::model::*;

// Fixed chains (upstream's names).
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// The canary chain (mangle, nat and filter) whose disappearance means someone flushed the
/// tables; the backend creates and watches it, the rules never use it.
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// kubelet's anti-martian chain, which kube-proxy duplicates (filter; created, never deleted).
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// Name prefixes of the per-service and per-endpoint chains (upstream `isServiceChainName`).
pub const SERVICE_CHAIN_PREFIXES: [&str; 5] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"];

/// The fixed chains kube-proxy (and so kproxy) creates, as `(table, chain)`: what a cleanup
/// flushes and deletes, with every chain whose name [`is_service_chain`]. kubelet's
/// `KUBE-FIREWALL` is left out on purpose: upstream creates it but never deletes it.
pub const FIXED_CHAINS: &[(&str, &str)] = &[
    ("nat", KUBE_SERVICES),
    ("nat", KUBE_NODEPORTS),
    ("nat", KUBE_POSTROUTING),
    ("nat", KUBE_MARK_MASQ),
    ("nat", KUBE_PROXY_CANARY),
    ("filter", KUBE_SERVICES),
    ("filter", KUBE_EXTERNAL_SERVICES),
    ("filter", KUBE_FORWARD),
    ("filter", KUBE_NODEPORTS),
    ("filter", KUBE_PROXY_FIREWALL),
    ("filter", KUBE_PROXY_CANARY),
    ("mangle", KUBE_PROXY_CANARY),
];

/// Whether a chain is a per-service or per-endpoint chain of kube-proxy's (deleted when stale).
pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// One chain: its name and its rules, each the text after `-A <name> `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptChain {
    pub name: String,
    pub rules: Vec<String>,
}

/// One table (`filter` or `nat`): its chains in creation (and output) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptTable {
    pub name: &'static str,
    pub chains: Vec<IptChain>,
}

impl IptTable {
    pub fn chain(&self, name: &str) -> Option<&IptChain> {
        self.chains.iter().find(|c| c.name == name)
    }
    /// How many rules the table's chains hold.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }
}

/// One family's iptables ruleset: what kproxy writes with `iptables-restore --noflush`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptRuleset {
    pub family: Family,
    pub filter: IptTable,
    pub nat: IptTable,
}

impl IptRuleset {
    /// An empty ruleset (no chains), e.g. the state before the first sync.
    pub fn empty(family: Family) -> Self {
        IptRuleset {
            family,
            filter: IptTable { name: "filter", chains: Vec::new() },
            nat: IptTable { name: "nat", chains: Vec::new() },
        }
    }

    /// The chains (no rules) that an `iptables-save` dump declares, in the filter and nat tables,
    /// as a ruleset to pass as `previous` to [`restore_input`]: every desired chain then differs
    /// (so it is written) and every per-service chain the dump has and the desired ruleset lacks
    /// is deleted, which is upstream's full sync after a restart. Other tables are ignored.
    pub fn chains_from_save(family: Family, save: &str) -> Self {
        let mut rs = IptRuleset::empty(family);
        let mut table: Option<&str> = None;
        for line in save.lines() {
            let line = line.trim();
            if let Some(t) = line.strip_prefix('*') {
                table = Some(t.trim());
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or("").to_string();
                let chain = IptChain { name, rules: Vec::new() };
                match table {
                    Some("filter") => rs.filter.chains.push(chain),
                    Some("nat") => rs.nat.chains.push(chain),
                    _ => {}
                }
            }
        }
        rs
    }
}

/// Result of a build: the ruleset, what had to be left out, and the Local-policy ports without
/// a local endpoint (for `sync_proxy_rules_no_local_endpoints_total`).
#[derive(Debug, Clone)]
pub struct BuiltIpt {
    pub ruleset: IptRuleset,
    pub skipped: Vec<Skipped>,
    pub no_local_endpoints: NoLocalEndpoints,
}

/// What the host decides and the rules depend on (upstream probes these at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IptOptions {
    /// `iptables.localhostNodePorts` (default true): node ports answer on 127.0.0.0/8 (IPv4
    /// only, and only when the node port addresses include loopback; needs `route_localnet=1`,
    /// which the backend sets), guarded by the `KUBE-FIREWALL` rule.
    pub localhost_nodeports: bool,
    /// `MASQUERADE --random-fully`: upstream adds it when iptables supports it (1.6.2+, every
    /// supported distribution); default true.
    pub random_fully: bool,
    /// The nfacct counters `ct_state_invalid_dropped_pkts` and `localhost_nps_accepted_pkts`
    /// exist (upstream creates them over netlink and counts packets with `-m nfacct`); default
    /// false, which is upstream's layout when nfacct is unavailable.
    pub nfacct: bool,
    /// `net.netfilter.nf_conntrack_tcp_be_liberal` is non-zero: upstream then leaves out the
    /// `--ctstate INVALID -j DROP` rule of `KUBE-FORWARD`; default false.
    pub conntrack_tcp_be_liberal: bool,
}

impl IptOptions {
    pub fn new(localhost_nodeports: bool) -> Self {
        IptOptions { localhost_nodeports, random_fully: true, nfacct: false, conntrack_tcp_be_liberal: false }
    }
}

/// More endpoints than this (all service ports of the family together) switch to upstream's
/// "large cluster mode": the per-endpoint comments are left out to keep the ruleset small.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// nfacct counter names (upstream `metrics.*NFAcctCounter`).
pub const NFACCT_CT_STATE_INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
pub const NFACCT_LOCALHOST_NODEPORTS_ACCEPTED: &str = "localhost_nps_accepted_pkts";

/// First 16 characters of base32(sha256(s)) (upstream `portProtoHash`).
fn hash16(s: &str) -> String {
    let enc = BASE32.encode(&Sha256::digest(s.as_bytes()));
    enc[..16].to_string()
}

fn port_proto_hash(spn: &ServicePortName) -> String {
    hash16(&format!("{spn}{}", spn.protocol().lower()))
}

/// `KUBE-SVC-…`: endpoints under the Cluster traffic policy.
pub fn svc_chain(spn: &ServicePortName) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(spn))
}
/// `KUBE-SVL-…`: this node's endpoints, for a Local traffic policy.
pub fn svl_chain(spn: &ServicePortName) -> String {
    format!("KUBE-SVL-{}", port_proto_hash(spn))
}
/// `KUBE-EXT-…`: traffic to external IPs, LB IPs and the node port.
pub fn ext_chain(spn: &ServicePortName) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(spn))
}
/// `KUBE-FW-…`: loadBalancerSourceRanges of the LB IPs.
pub fn fw_chain(spn: &ServicePortName) -> String {
    format!("KUBE-FW-{}", port_proto_hash(spn))
}
/// `KUBE-SEP-…`: one endpoint (`IP:port`, `[IP]:port` for IPv6) of a service port.
pub fn sep_chain(spn: &ServicePortName, ep: &Endpoint) -> String {
    format!("KUBE-SEP-{}", hash16(&format!("{spn}{}{}", spn.protocol().lower(), ep.addr_string())))
}

/// `1/n` as upstream prints it (`%0.10f`).
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The jump rules the backend ensures (prepends) in the built-in chains, as upstream's
/// `iptablesJumpChains` then `iptablesKubeletJumpChains`: `(table, built-in chain, rule)`,
/// the rule being the text after `-A <chain> ` in iptables-restore quoting (split it with
/// [`split_args`] to run `iptables -C` / `-I`). The target chains must exist first.
pub fn jump_rules(family: Family) -> Vec<(&'static str, &'static str, String)> {
    // Both families get the same jumps (upstream runs the same list per family).
    let _ = family;
    let new = "-m conntrack --ctstate NEW ";
    let j = |extra: &str, comment: &str, target: &str| {
        if comment.is_empty() {
            format!("{extra}-j {target}")
        } else {
            format!("{extra}-m comment --comment \"{comment}\" -j {target}")
        }
    };
    let ext = "kubernetes externally-visible service portals";
    let portals = "kubernetes service portals";
    let fw = "kubernetes load balancer firewall";
    vec![
        ("filter", "INPUT", j(new, ext, KUBE_EXTERNAL_SERVICES)),
        ("filter", "FORWARD", j(new, ext, KUBE_EXTERNAL_SERVICES)),
        ("filter", "INPUT", j("", "kubernetes health check service ports", KUBE_NODEPORTS)),
        ("filter", "FORWARD", j(new, portals, KUBE_SERVICES)),
        ("filter", "OUTPUT", j(new, portals, KUBE_SERVICES)),
        ("filter", "FORWARD", j("", "kubernetes forwarding rules", KUBE_FORWARD)),
        ("filter", "INPUT", j(new, fw, KUBE_PROXY_FIREWALL)),
        ("filter", "OUTPUT", j(new, fw, KUBE_PROXY_FIREWALL)),
        ("filter", "FORWARD", j(new, fw, KUBE_PROXY_FIREWALL)),
        ("nat", "OUTPUT", j("", portals, KUBE_SERVICES)),
        ("nat", "PREROUTING", j("", portals, KUBE_SERVICES)),
        ("nat", "POSTROUTING", j("", "kubernetes postrouting rules", KUBE_POSTROUTING)),
        ("filter", "INPUT", j("", "", KUBE_FIREWALL)),
        ("filter", "OUTPUT", j("", "", KUBE_FIREWALL)),
    ]
}

/// Splits a rule in iptables-restore quoting into arguments (double quotes group words).
pub fn split_args(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in rule.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// `(filter rules, nat rules)` of a ruleset, for `sync_proxy_rules_iptables_total{table}`.
pub fn chain_counts(rs: &IptRuleset) -> (usize, usize) {
    (rs.filter.rule_count(), rs.nat.rule_count())
}

/// Chains and rules of one table while building.
#[derive(Default)]
struct TableBuf {
    chains: BTreeMap<String, Vec<String>>,
}

impl TableBuf {
    fn chain(&mut self, name: &str) {
        self.chains.entry(name.to_string()).or_default();
    }
    fn rule(&mut self, chain: &str, rule: String) {
        match self.chains.get_mut(chain) {
            Some(rules) => rules.push(rule),
            None => {
                debug_assert!(false, "rule for undeclared chain {chain}");
                self.chains.insert(chain.to_string(), vec![rule]);
            }
        }
    }
    /// Upstream's test order: `KUBE-NODEPORTS`, `KUBE-SERVICES`, then by name.
    fn finish(self, name: &'static str) -> IptTable {
        let rank = |n: &str| match n {
            KUBE_NODEPORTS => 0,
            KUBE_SERVICES => 1,
            _ => 2,
        };
        let mut chains: Vec<IptChain> = self.chains.into_iter().map(|(name, rules)| IptChain { name, rules }).collect();
        chains.sort_by(|a, b| (rank(&a.name), &a.name).cmp(&(rank(&b.name), &b.name)));
        IptTable { name, chains }
    }
}

/// Builds one family's iptables ruleset with the default [`IptOptions`] and the given
/// `localhost_nodeports` (upstream's `iptables.localhostNodePorts`, IPv4 only). `node_ips` and
/// `cfg` are what [`crate::build::build`] takes.
pub fn build(state: &ClusterState, node_ips: &[IpAddr], cfg: &BuildConfig, localhost_nodeports: bool) -> BuiltIpt {
    build_with(state, node_ips, cfg, &IptOptions::new(localhost_nodeports))
}

/// [`build`] with every host-dependent option.
pub fn build_with(state: &ClusterState, node_ips: &[IpAddr], cfg: &BuildConfig, opts: &IptOptions) -> BuiltIpt {
    let fam = cfg.family;
    let v6 = fam == Family::V6;
    let mark = format!("{:#010x}", cfg.masquerade_mark());
    let match_all = cfg.nodeport_addresses == NodePortAddresses::All;
    let np_ips: Vec<IpAddr> = node_ips.iter().filter(|ip| Family::of(ip) == fam).copied().collect();
    // Upstream turns localhostNodePorts off when the node port addresses exclude loopback.
    let localhost = opts.localhost_nodeports && !v6 && (match_all || np_ips.iter().any(|ip| ip.is_loopback()));

    let mut filter = TableBuf::default();
    let mut nat = TableBuf::default();
    for c in [KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL] {
        filter.chain(c);
    }
    for c in [KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ] {
        nat.chain(c);
    }
    nat.rule(KUBE_POSTROUTING, format!("-m mark ! --mark {mark}/{mark} -j RETURN"));
    // Clear the mark so that a packet traversing the stack again is not masqueraded twice.
    nat.rule(KUBE_POSTROUTING, format!("-j MARK --xor-mark {mark}"));
    let random_fully = if opts.random_fully { " --random-fully" } else { "" };
    nat.rule(
        KUBE_POSTROUTING,
        format!("-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{random_fully}"),
    );
    nat.rule(KUBE_MARK_MASQ, format!("-j MARK --or-mark {mark}"));
    if localhost {
        // route_localnet=1 makes 127.0.0.0/8 routable; this drops martian traffic to it that
        // was not DNATed to a node port (https://issue.k8s.io/90259), like kubelet's copy.
        filter.chain(KUBE_FIREWALL);
        filter.rule(
            KUBE_FIREWALL,
            "-m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 \
             -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
                .to_string(),
        );
    }

    let detector = cfg.detector();
    // The detector's match: traffic from local pods, or (`not`) traffic that is not.
    let detect = |not: bool| -> Option<String> {
        let bang = if not { "! " } else { "" };
        match &detector {
            LocalDetector::None => None,
            LocalDetector::Cidr(c) => Some(format!("{bang}-s {c}")),
            LocalDetector::Bridge(i) => Some(format!("{bang}-i {i}")),
            LocalDetector::InterfacePrefix(p) => Some(format!("{bang}-i {p}+")),
        }
    };

    // Conflicting frontends (possible in manifests only) are resolved as in nftables mode.
    let (services, skipped, _, _) = crate::build::resolve_conflicts(state, fam);
    let total_endpoints: usize = services
        .keys()
        .map(|spn| {
            state
                .endpoints_of(spn)
                .iter()
                .filter(|e| Family::of(&e.ip) == fam && e.port != 0)
                .map(|e| (e.ip, e.port))
                .collect::<BTreeSet<_>>()
                .len()
        })
        .sum();
    let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    // appendServiceCommentLocked: per-endpoint comments, left out in large cluster mode.
    let ep_comment = |c: &str| if large { String::new() } else { format!("-m comment --comment {c} ") };

    // Upstream's test order: by `namespace/name`, stable (ports of one service keep our order).
    let mut order: Vec<(&ServicePortName, &ServicePort)> = services.iter().collect();
    order.sort_by_cached_key(|(spn, _)| format!("{}/{}", spn.namespace(), spn.name()));

    let mut no_local = NoLocalEndpoints::default();
    for (spn, sp) in order {
        let name = spn.to_string();
        let proto = spn.protocol().lower();
        let pm = format!("-m {proto} -p {proto}");
        let cat = categorize_endpoints(state.endpoints_of(spn), sp, &cfg.node_name, cfg.node_zone.as_deref());
        let hash = port_proto_hash(spn);
        let [svc, svl, ext, fw] = ["SVC", "SVL", "EXT", "FW"].map(|kind| format!("KUBE-{kind}-{hash}"));
        let has_endpoints = cat.has_any;
        let uses_cluster = !cat.cluster.is_empty() && sp.uses_cluster_endpoints();
        let uses_local = !cat.local.is_empty() && sp.uses_local_endpoints();
        let internal_chain = if sp.internal_traffic_policy_local { &svl } else { &svc };
        let has_internal = has_endpoints && !(sp.internal_traffic_policy_local && cat.local.is_empty());
        let external_local = sp.external_traffic_policy_local;
        let external_policy_chain = if external_local { &svl } else { &svc };
        let has_external = has_endpoints && !(external_local && cat.local.is_empty());
        let uses_ext = has_endpoints && sp.externally_accessible();
        let ext_ips: Vec<IpAddr> = sp.external_ips.iter().filter(|ip| Family::of(ip) == fam).copied().collect();
        let lb_ips: Vec<IpAddr> = sp.load_balancer_ips.iter().filter(|ip| Family::of(ip) == fam).copied().collect();
        let ranges: Vec<Cidr> = sp.load_balancer_source_ranges.iter().filter(|c| c.family() == fam).copied().collect();
        let uses_fw = has_endpoints && !lb_ips.is_empty() && !ranges.is_empty();
        let lb_target = if uses_fw { &fw } else { &ext };

        let (internal_filter, external_filter) = if !has_endpoints {
            let c = format!("\"{name} has no endpoints\"");
            (("REJECT", c.clone()), ("REJECT", c))
        } else {
            let c = format!("\"{name} has no local endpoints\"");
            no_local.internal += !has_internal as usize;
            no_local.external += !has_external as usize;
            (("DROP", c.clone()), ("DROP", c))
        };

        // Cluster IP.
        let dst = |ip: &IpAddr| format!("{pm} -d {ip} --dport {}", sp.port);
        let cip = dst(&sp.cluster_ip);
        if has_internal {
            nat.rule(KUBE_SERVICES, format!("-m comment --comment \"{name} cluster IP\" {cip} -j {internal_chain}"));
        } else {
            let (target, comment) = &internal_filter;
            filter.rule(KUBE_SERVICES, format!("-m comment --comment {comment} {cip} -j {target}"));
        }
        // External IPs.
        for ip in &ext_ips {
            if has_endpoints {
                nat.rule(KUBE_SERVICES, format!("-m comment --comment \"{name} external IP\" {} -j {ext}", dst(ip)));
            }
            if !has_external {
                let (target, comment) = &external_filter;
                filter.rule(KUBE_EXTERNAL_SERVICES, format!("-m comment --comment {comment} {} -j {target}", dst(ip)));
            }
        }
        // LoadBalancer IPs.
        for ip in &lb_ips {
            if has_endpoints {
                nat.rule(
                    KUBE_SERVICES,
                    format!("-m comment --comment \"{name} loadbalancer IP\" {} -j {lb_target}", dst(ip)),
                );
            }
            if uses_fw {
                filter.rule(
                    KUBE_PROXY_FIREWALL,
                    format!("-m comment --comment \"{name} traffic not accepted by {fw}\" {} -j DROP", dst(ip)),
                );
            }
        }
        if !has_external {
            for ip in &lb_ips {
                let (target, comment) = &external_filter;
                filter.rule(KUBE_EXTERNAL_SERVICES, format!("-m comment --comment {comment} {} -j {target}", dst(ip)));
            }
        }
        // Node port (never subject to loadBalancerSourceRanges, as upstream).
        if sp.node_port != 0 {
            if has_endpoints {
                if localhost && opts.nfacct {
                    nat.rule(
                        KUBE_NODEPORTS,
                        format!(
                            "-m comment --comment {name} {pm} -d 127.0.0.0/8 --dport {} -m nfacct --nfacct-name \
                             {NFACCT_LOCALHOST_NODEPORTS_ACCEPTED} -j {ext}",
                            sp.node_port
                        ),
                    );
                }
                nat.rule(KUBE_NODEPORTS, format!("-m comment --comment {name} {pm} --dport {} -j {ext}", sp.node_port));
            }
            if !has_external {
                let (target, comment) = &external_filter;
                filter.rule(
                    KUBE_EXTERNAL_SERVICES,
                    format!(
                        "-m comment --comment {comment} -m addrtype --dst-type LOCAL {pm} --dport {} -j {target}",
                        sp.node_port
                    ),
                );
            }
        }
        // Health check node port: accepted whether or not there are local endpoints.
        if sp.health_check_node_port != 0 {
            filter.rule(
                KUBE_NODEPORTS,
                format!(
                    "-m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {} -j ACCEPT",
                    sp.health_check_node_port
                ),
            );
        }

        // The per-service chains.
        if uses_cluster {
            nat.chain(&svc);
        }
        if uses_local {
            nat.chain(&svl);
        }
        if has_internal {
            // Masquerade off-cluster traffic to the cluster IP (it may leave the node again).
            let masq = if cfg.masquerade_all { Some(String::new()) } else { detect(true).map(|d| format!(" {d}")) };
            if let Some(m) = masq {
                nat.rule(
                    internal_chain,
                    format!("-m comment --comment \"{name} cluster IP\" {cip}{m} -j {KUBE_MARK_MASQ}"),
                );
            }
        }
        if uses_ext {
            nat.chain(&ext);
            if !external_local {
                nat.rule(
                    &ext,
                    format!(
                        "-m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
                    ),
                );
            } else {
                // Pods and the node itself short-circuit to every endpoint, as if they had gone
                // out to the load balancer and come back; only traffic from elsewhere keeps its
                // source and goes to this node's endpoints.
                if let Some(d) = detect(false) {
                    nat.rule(
                        &ext,
                        format!("-m comment --comment \"pod traffic for {name} external destinations\" {d} -j {svc}"),
                    );
                }
                nat.rule(
                    &ext,
                    format!(
                        "-m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" \
                         -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
                    ),
                );
                nat.rule(
                    &ext,
                    format!(
                        "-m comment --comment \"route LOCAL traffic for {name} external destinations\" \
                         -m addrtype --src-type LOCAL -j {svc}"
                    ),
                );
            }
            if has_external {
                nat.rule(&ext, format!("-j {external_policy_chain}"));
            }
        }
        if uses_fw {
            nat.chain(&fw);
            let head = format!("-m comment --comment \"{name} loadbalancer IP\"");
            for c in &ranges {
                nat.rule(&fw, format!("{head} -s {c} -j {ext}"));
            }
            // A node reaching a VIP it holds locally comes from that VIP (case 56).
            if cfg.node_ip.is_some_and(|ip| ranges.iter().any(|c| c.contains(&ip))) {
                for ip in &lb_ips {
                    nat.rule(&fw, format!("{head} -s {ip} -j {ext}"));
                }
            }
            nat.rule(
                &fw,
                format!("-m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""),
            );
        }
        // Every endpoint some traffic can reach from this node, with its chain (hashed once).
        let reachable: BTreeMap<String, (&Endpoint, String)> = cat
            .cluster
            .iter()
            .filter(|_| uses_cluster)
            .chain(cat.local.iter().filter(|_| uses_local))
            .map(|e| (e.addr_string(), e))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .map(|(addr, e)| (addr, (e, sep_chain(spn, e))))
            .collect();
        let sep_of = |ep: &Endpoint| reachable[&ep.addr_string()].1.as_str();
        for (used, chain, eps) in [(uses_cluster, &svc, &cat.cluster), (uses_local, &svl, &cat.local)] {
            if !used {
                continue;
            }
            let arrow = |ep: &Endpoint| ep_comment(&format!("\"{name} -> {}\"", ep.addr_string()));
            if let Some(timeout) = sp.session_affinity_timeout {
                for ep in eps.iter() {
                    let sep = sep_of(ep);
                    nat.rule(
                        chain,
                        format!("{}-m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}", arrow(ep)),
                    );
                }
            }
            let n = eps.len();
            for (i, ep) in eps.iter().enumerate() {
                let stat = if i + 1 < n {
                    format!("-m statistic --mode random --probability {} ", probability(n - i))
                } else {
                    String::new()
                };
                nat.rule(chain, format!("{}{stat}-j {}", arrow(ep), sep_of(ep)));
            }
        }
        // One chain per reachable endpoint.
        let c = ep_comment(&name);
        for (addr, (ep, sep)) in &reachable {
            nat.chain(sep);
            nat.rule(sep, format!("{c}-s {} -j {KUBE_MARK_MASQ}", ep.ip));
            let recent = if sp.session_affinity_timeout.is_some() {
                format!("-m recent --name {sep} --set ")
            } else {
                String::new()
            };
            nat.rule(sep, format!("{c}{recent}{pm} -j DNAT --to-destination {addr}"));
        }
    }

    // The node-port tail rule: after every service rule.
    let tail = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    if match_all {
        let lo = if v6 {
            " ! -d ::1/128"
        } else if !localhost {
            " ! -d 127.0.0.0/8"
        } else {
            ""
        };
        nat.rule(KUBE_SERVICES, format!("{tail} -m addrtype --dst-type LOCAL{lo} -j {KUBE_NODEPORTS}"));
    } else {
        // Loopback works for IPv4 with localhost node ports only (upstream logs and skips it).
        for ip in np_ips.iter().filter(|ip| !ip.is_loopback() || localhost) {
            nat.rule(KUBE_SERVICES, format!("{tail} -d {ip} -j {KUBE_NODEPORTS}"));
        }
    }

    if !opts.conntrack_tcp_be_liberal {
        // INVALID packets would reset connections unless nf_conntrack_tcp_be_liberal is set
        // (https://issues.k8s.io/74839, https://issues.k8s.io/117924).
        let acct = if opts.nfacct {
            format!("-m nfacct --nfacct-name {NFACCT_CT_STATE_INVALID_DROPPED} ")
        } else {
            String::new()
        };
        filter.rule(KUBE_FORWARD, format!("-m conntrack --ctstate INVALID {acct}-j DROP"));
    }
    filter.rule(
        KUBE_FORWARD,
        format!("-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"),
    );
    filter.rule(
        KUBE_FORWARD,
        "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
            .to_string(),
    );

    BuiltIpt {
        ruleset: IptRuleset { family: fam, filter: filter.finish("filter"), nat: nat.finish("nat") },
        skipped,
        no_local_endpoints: no_local,
    }
}

/// The nat chains upstream rewrites on every sync, partial or not.
const FIXED_NAT: [&str; 4] = [KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ];

/// `iptables-restore --noflush` input: `*filter … COMMIT`, `*nat … COMMIT`.
///
/// Without `previous` every chain is declared (which flushes it) and every rule written. With the
/// applied ruleset, as upstream's partial sync: the filter table and the fixed nat chains are
/// always rewritten; a per-service chain only when its rules differ from `previous` (or it is
/// new); per-service chains that `previous` has and `desired` lacks are flushed and deleted
/// (`-X`). Chains that are not kube-proxy's are never deleted.
pub fn restore_input(desired: &IptRuleset, previous: Option<&IptRuleset>) -> String {
    let mut out = String::new();
    for (table, prev) in [(&desired.filter, previous.map(|p| &p.filter)), (&desired.nat, previous.map(|p| &p.nat))] {
        let prev_rules: BTreeMap<&str, &Vec<String>> =
            prev.map(|t| t.chains.iter().map(|c| (c.name.as_str(), &c.rules)).collect()).unwrap_or_default();
        let write = |c: &IptChain| {
            previous.is_none()
                || table.name == "filter"
                || FIXED_NAT.contains(&c.name.as_str())
                || prev_rules.get(c.name.as_str()) != Some(&&c.rules)
        };
        let wanted: BTreeSet<&str> = table.chains.iter().map(|c| c.name.as_str()).collect();
        let stale: Vec<&str> = prev
            .map(|t| {
                t.chains
                    .iter()
                    .map(|c| c.name.as_str())
                    .filter(|n| is_service_chain(n) && !wanted.contains(n))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
            .unwrap_or_default();
        let written: Vec<&IptChain> = table.chains.iter().filter(|c| write(c)).collect();
        out.reserve(written.iter().flat_map(|c| &c.rules).map(|r| r.len() + 40).sum());
        let _ = writeln!(out, "*{}", table.name);
        for c in &written {
            let _ = writeln!(out, ":{} - [0:0]", c.name);
        }
        for s in &stale {
            let _ = writeln!(out, ":{s} - [0:0]");
        }
        for c in &written {
            for r in &c.rules {
                let _ = writeln!(out, "-A {} {r}", c.name);
            }
        }
        for s in &stale {
            let _ = writeln!(out, "-X {s}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName::new(ns, name, port, Protocol::Tcp)
    }

    #[test]
    fn chain_names_match_upstream_vectors() {
        let n = spn("ns1", "svc1", "p80");
        assert_eq!(svc_chain(&n), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(sep_chain(&n, &Endpoint::ready("10.180.0.1", 80)), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        // More names from upstream's TestOverallIPTablesRules.
        assert_eq!(svc_chain(&spn("ns2", "svc2", "p80")), "KUBE-SVC-GNZBNJ2PO5MGZ6GT");
        assert_eq!(svl_chain(&spn("ns2", "svc2", "p80")), "KUBE-SVL-GNZBNJ2PO5MGZ6GT");
        assert_eq!(ext_chain(&spn("ns4", "svc4", "p80")), "KUBE-EXT-4SW47YFZTEDKD3PK");
        assert_eq!(fw_chain(&spn("ns5", "svc5", "p80")), "KUBE-FW-NUKIZ6OKUXPJNT4C");
        assert_eq!(
            sep_chain(&spn("ns4", "svc4", "p80"), &Endpoint::ready("10.180.0.5", 80)),
            "KUBE-SEP-C6EBXVWJJZMIWKLZ"
        );
        assert!(is_service_chain("KUBE-SEP-C6EBXVWJJZMIWKLZ") && !is_service_chain(KUBE_SERVICES));
    }

    /// A packet-flow tracer over the ruleset, in the spirit of upstream's `iptablesTracer`: one
    /// new connection through nat (PREROUTING, or OUTPUT from a local source) → KUBE-SERVICES,
    /// then the filter hooks (INPUT or FORWARD, or OUTPUT) in the order the jump rules give, then
    /// POSTROUTING. `-m statistic` forks (both the match and the fall-through are followed), so a
    /// flow ends in the set of every endpoint it can reach; `-m recent --rcheck` never matches (a
    /// first connection).
    mod trace {
        use super::*;

        pub struct Node<'a> {
            pub rs: &'a IptRuleset,
            /// The node's local addresses (`addrtype LOCAL`), loopback included.
            pub local: Vec<IpAddr>,
        }

        #[derive(Clone, Debug)]
        struct Pkt {
            src: IpAddr,
            dst: IpAddr,
            proto: String,
            dport: u16,
            iif: String,
            mark: u32,
            dnat: Option<String>,
        }

        #[derive(Debug)]
        enum End {
            /// Fell off the end of the chain, or RETURN.
            Continue(Pkt),
            Dnat(Pkt),
            Accept(Pkt),
            Drop,
            Reject,
        }

        fn parse_ip(s: &str) -> Cidr {
            Cidr::parse(s).unwrap_or_else(|_| {
                let ip: IpAddr = s.parse().unwrap_or_else(|_| panic!("bad address {s}"));
                Cidr { addr: ip, len: if ip.is_ipv4() { 32 } else { 128 } }
            })
        }

        fn mark_of(s: &str) -> u32 {
            let v = s.split('/').next().unwrap().trim_start_matches("0x");
            u32::from_str_radix(v, 16).unwrap()
        }

        impl Node<'_> {
            fn table(&self, t: &str) -> &IptTable {
                if t == "nat" {
                    &self.rs.nat
                } else {
                    &self.rs.filter
                }
            }
            fn is_local(&self, ip: &IpAddr) -> bool {
                self.local.contains(ip) || ip.is_loopback()
            }

            /// Runs `chain` of `table` on `p`; every way through it.
            fn run(&self, table: &str, chain: &str, p: Pkt) -> Vec<End> {
                let rules = &self.table(table).chain(chain).unwrap_or_else(|| panic!("no {table} {chain}")).rules;
                self.run_from(table, rules, 0, p)
            }

            fn run_from(&self, table: &str, rules: &[String], i: usize, mut p: Pkt) -> Vec<End> {
                let Some(rule) = rules.get(i) else { return vec![End::Continue(p)] };
                let args = split_args(rule);
                let mut k = 0;
                let mut fork = false;
                let mut target: Option<&str> = None;
                while k < args.len() {
                    let not = args[k] == "!";
                    if not {
                        k += 1;
                    }
                    let a = args[k].as_str();
                    let v = args.get(k + 1).map(|s| s.as_str()).unwrap_or("");
                    let hit = match a {
                        "-m" => match v {
                            "statistic" => {
                                fork = true;
                                k += 6; // -m statistic --mode random --probability P
                                continue;
                            }
                            "recent" if rule.contains("--rcheck") => return self.run_from(table, rules, i + 1, p),
                            "recent" => {
                                // --set: remember nothing; skip `-m recent --name N --set`.
                                k += 5;
                                continue;
                            }
                            "nfacct" => {
                                k += 4;
                                continue;
                            }
                            _ => {
                                k += 2;
                                continue;
                            }
                        },
                        "--comment" => true,
                        "-p" => p.proto == v,
                        "-d" => parse_ip(v).contains(&p.dst),
                        "-s" => parse_ip(v).contains(&p.src),
                        "--dport" => p.dport.to_string() == v,
                        "-i" => match v.strip_suffix('+') {
                            Some(prefix) => p.iif.starts_with(prefix),
                            None => p.iif == v,
                        },
                        "--src-type" => self.is_local(&p.src) == (v == "LOCAL"),
                        "--dst-type" => self.is_local(&p.dst) == (v == "LOCAL"),
                        // A new connection, DNATed or not.
                        "--ctstate" => v.split(',').any(|st| st == "NEW" || (st == "DNAT" && p.dnat.is_some())),
                        "--mark" => {
                            let m = mark_of(v);
                            p.mark & m == m
                        }
                        "-j" => {
                            target = Some(v);
                            k = args.len();
                            continue;
                        }
                        other => panic!("tracer: unknown match {other} in {rule}"),
                    };
                    if hit == not {
                        return self.run_from(table, rules, i + 1, p);
                    }
                    k += 2;
                }
                let mut out = Vec::new();
                if fork {
                    out.extend(self.run_from(table, rules, i + 1, p.clone()));
                }
                let Some(target) = target else {
                    // A rule without a target (KUBE-FW's last comment rule) only counts.
                    out.extend(self.run_from(table, rules, i + 1, p));
                    return out;
                };
                let after = |v: &str| args.iter().position(|a| a == v).map(|n| args[n + 1].clone());
                match target {
                    "RETURN" => out.push(End::Continue(p)),
                    "ACCEPT" => out.push(End::Accept(p)),
                    "DROP" => out.push(End::Drop),
                    "REJECT" => out.push(End::Reject),
                    "MASQUERADE" => out.push(End::Accept(p)),
                    "MARK" => {
                        if let Some(m) = after("--or-mark") {
                            p.mark |= mark_of(&m);
                        } else if let Some(m) = after("--xor-mark") {
                            p.mark ^= mark_of(&m);
                        }
                        out.extend(self.run_from(table, rules, i + 1, p));
                    }
                    "DNAT" => {
                        p.dnat = after("--to-destination");
                        out.push(End::Dnat(p));
                    }
                    chain => {
                        for end in self.run(table, chain, p) {
                            match end {
                                End::Continue(p) => out.extend(self.run_from(table, rules, i + 1, p)),
                                end => out.push(end),
                            }
                        }
                    }
                }
                out
            }

            /// Traces a new connection; returns every outcome: `DNAT <ip:port> +M|-M`,
            /// `UNTOUCHED +M|-M`, `DROP` or `REJECT`.
            pub fn trace(&self, src: &str, dst: &str, proto: &str, dport: u16, iif: &str) -> BTreeSet<String> {
                let p = Pkt {
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    proto: proto.into(),
                    dport,
                    iif: iif.into(),
                    mark: 0,
                    dnat: None,
                };
                let from_node = self.is_local(&p.src);
                let mut outcomes = BTreeSet::new();
                for end in self.run("nat", KUBE_SERVICES, p) {
                    let mut p = match end {
                        End::Continue(p) | End::Dnat(p) | End::Accept(p) => p,
                        End::Drop => {
                            outcomes.insert("DROP".to_string());
                            continue;
                        }
                        End::Reject => {
                            outcomes.insert("REJECT".to_string());
                            continue;
                        }
                    };
                    if let Some(d) = &p.dnat {
                        let ip = d.rsplit_once(':').unwrap().0.trim_matches(|c| c == '[' || c == ']');
                        p.dst = ip.parse().unwrap();
                    }
                    // Filter hooks, each in the order the prepended jump rules end up in.
                    let to_node = self.is_local(&p.dst);
                    let hook = if from_node {
                        "OUTPUT"
                    } else if to_node {
                        "INPUT"
                    } else {
                        "FORWARD"
                    };
                    // The jump rules' own matches (ct state NEW) hold for a new connection.
                    let mut targets: Vec<String> = Vec::new();
                    for (table, chain, rule) in jump_rules(self.rs.family) {
                        if table == "filter" && chain == hook {
                            targets.insert(0, split_args(&rule).last().unwrap().clone());
                        }
                    }
                    let mut verdict: Option<&str> = None;
                    for target in targets.iter().filter(|t| self.table("filter").chain(t).is_some()) {
                        for end in self.run("filter", target, p.clone()) {
                            match end {
                                End::Drop => verdict = verdict.or(Some("DROP")),
                                End::Reject => verdict = verdict.or(Some("REJECT")),
                                End::Accept(_) => verdict = verdict.or(Some("ACCEPT")),
                                _ => {}
                            }
                        }
                        if verdict.is_some() {
                            break;
                        }
                    }
                    match verdict {
                        Some("DROP") => {
                            outcomes.insert("DROP".to_string());
                            continue;
                        }
                        Some("REJECT") => {
                            outcomes.insert("REJECT".to_string());
                            continue;
                        }
                        _ => {}
                    }
                    // POSTROUTING: KUBE-POSTROUTING masquerades marked packets.
                    let mut masq = false;
                    for end in self.run("nat", KUBE_POSTROUTING, p.clone()) {
                        masq |= matches!(end, End::Accept(_));
                    }
                    let m = if masq { "+M" } else { "-M" };
                    outcomes.insert(match &p.dnat {
                        Some(d) => format!("DNAT {d} {m}"),
                        None => format!("UNTOUCHED {m}"),
                    });
                }
                outcomes
            }
        }
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// Upstream's packet-flow cases (section 2 of the behaviour catalogue) through the tracer,
    /// on the fixture of its TestOverallIPTablesRules plus the ranges of TestLoadBalancer.
    #[test]
    #[allow(clippy::type_complexity)] // the case table
    fn packet_flows_follow_upstream_cases() {
        let mut st = ClusterState::default();
        // Two endpoints, one here, one elsewhere, for every service below.
        let eps = |st: &mut ClusterState, sp: &ServicePort| {
            st.add_endpoint(&sp.name, Endpoint::ready("10.180.0.1", 80));
            st.add_endpoint(&sp.name, Endpoint::ready("10.180.2.1", 80).on_node("test-node"));
        };
        let cluster = ServicePort::cluster_ip("ns", "c", "p80", Protocol::Tcp, "172.30.0.41", 80)
            .with_node_port(3001)
            .with_load_balancer_ip("1.2.3.4")
            .with_external_ip("192.168.99.11")
            .with_source_range("203.0.113.0/25")
            .with_source_range("192.168.0.0/24");
        let local = ServicePort::cluster_ip("ns", "l", "p80", Protocol::Tcp, "172.30.0.42", 80)
            .with_node_port(3002)
            .with_load_balancer_ip("5.6.7.8")
            .with_external_traffic_policy_local()
            .with_health_check_node_port(30000);
        let itp = ServicePort::cluster_ip("ns", "i", "p80", Protocol::Tcp, "172.30.0.43", 80)
            .with_node_port(3003)
            .with_internal_traffic_policy_local();
        let remote_only = ServicePort::cluster_ip("ns", "r", "p80", Protocol::Tcp, "172.30.0.44", 80)
            .with_node_port(3004)
            .with_load_balancer_ip("9.10.11.12")
            .with_external_traffic_policy_local();
        let empty = ServicePort::cluster_ip("ns", "e", "p80", Protocol::Tcp, "172.30.0.45", 80).with_node_port(3005);
        for sp in [&cluster, &local, &itp] {
            st.add_service(sp.clone());
            eps(&mut st, sp);
        }
        st.add_service(remote_only.clone());
        st.add_endpoint(&remote_only.name, Endpoint::ready("10.180.0.1", 80));
        st.add_service(empty);
        let rs = build(&st, &[], &ipt_cfg(Family::V4), true).ruleset;
        check_jumps(&rs);
        let node =
            trace::Node { rs: &rs, local: ["192.168.0.2", "192.168.1.2"].iter().map(|s| s.parse().unwrap()).collect() };
        let both_m = set(&["DNAT 10.180.0.1:80 +M", "DNAT 10.180.2.1:80 +M"]);
        let both = set(&["DNAT 10.180.0.1:80 -M", "DNAT 10.180.2.1:80 -M"]);
        let here = set(&["DNAT 10.180.2.1:80 -M"]);
        let (pod, remote_pod, host, ext, ext_blocked) =
            ("10.0.0.2", "10.0.5.7", "192.168.0.2", "203.0.113.2", "203.0.113.130");
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, &str, &str, u16, BTreeSet<String>)> = vec![
            ("1/3 pod to cluster IP", pod, "172.30.0.41", "tcp", 80, both.clone()),
            ("2 hairpin", "10.180.0.1", "172.30.0.41", "tcp", 80,
                set(&["DNAT 10.180.0.1:80 +M", "DNAT 10.180.2.1:80 -M"])),
            ("6 protocol mismatch: no rule", pod, "172.30.0.41", "udp", 80, set(&["UNTOUCHED -M"])),
            ("9 node to cluster IP", host, "172.30.0.41", "tcp", 80, both_m.clone()),
            ("10 external to cluster IP", ext, "172.30.0.41", "tcp", 80, both_m.clone()),
            ("36 no endpoints: cluster IP", pod, "172.30.0.45", "tcp", 80, set(&["REJECT"])),
            ("38 no endpoints: node port", ext, "192.168.0.2", "tcp", 3005, set(&["REJECT"])),
            ("44 external to node port", ext, "192.168.0.2", "tcp", 3001, both_m.clone()),
            ("45 node to node port", host, "192.168.0.2", "tcp", 3001, both_m.clone()),
            ("46 pod to node port", pod, "192.168.1.2", "tcp", 3001, both_m.clone()),
            ("51 localhost node port", host, "127.0.0.1", "tcp", 3001, both_m.clone()),
            ("52 node port ignores source ranges", ext_blocked, "192.168.0.2", "tcp", 3001, both_m.clone()),
            ("53 LB, source in range", ext, "1.2.3.4", "tcp", 80, both_m.clone()),
            ("54 LB, source outside the ranges", ext_blocked, "1.2.3.4", "tcp", 80, set(&["DROP"])),
            ("55 pod outside the ranges", pod, "1.2.3.4", "tcp", 80, set(&["DROP"])),
            ("56 node inside a range", host, "1.2.3.4", "tcp", 80, both_m.clone()),
            ("56 VIP held locally, sourced from the VIP", "1.2.3.4", "1.2.3.4", "tcp", 80, both_m.clone()),
            ("60 external IP", pod, "192.168.99.11", "tcp", 80, both_m.clone()),
            ("63 eTP Local: external to node port", ext, "192.168.0.2", "tcp", 3002, here.clone()),
            ("64 eTP Local: external to LB", ext, "5.6.7.8", "tcp", 80, here.clone()),
            ("65 eTP Local: pod to LB", pod, "5.6.7.8", "tcp", 80, both.clone()),
            ("66 eTP Local: node to node port", host, "192.168.0.2", "tcp", 3002, both_m.clone()),
            ("67 eTP Local: remote pod", remote_pod, "5.6.7.8", "tcp", 80, both.clone()),
            ("69 eTP Local: external to cluster IP", ext, "172.30.0.42", "tcp", 80, both_m.clone()),
            ("70 eTP Local, no local endpoint: external", ext, "9.10.11.12", "tcp", 80, set(&["DROP"])),
            ("70 eTP Local, no local endpoint: node port", ext, "192.168.0.2", "tcp", 3004, set(&["DROP"])),
            ("71 eTP Local, no local endpoint: pod", pod, "9.10.11.12", "tcp", 80, set(&["DNAT 10.180.0.1:80 -M"])),
            ("71 eTP Local, no local endpoint: node", host, "9.10.11.12", "tcp", 80, set(&["DNAT 10.180.0.1:80 +M"])),
            ("82 iTP Local: pod to cluster IP", pod, "172.30.0.43", "tcp", 80, here.clone()),
            ("86 iTP Local: node to cluster IP", host, "172.30.0.43", "tcp", 80, set(&["DNAT 10.180.2.1:80 +M"])),
            ("87 iTP Local does not affect node ports", ext, "192.168.0.2", "tcp", 3003, both_m.clone()),
        ];
        let mut failures = Vec::new();
        for (what, src, dst, proto, port, want) in &cases {
            let got = node.trace(src, dst, proto, *port, "eth0");
            if got != *want {
                failures.push(format!("case {what}: {src} -> {dst}:{port}/{proto}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));

        // Case 11: no local traffic detector: no masquerade for internal traffic from off-node.
        let mut cfg = ipt_cfg(Family::V4);
        cfg.cluster_cidr = None;
        let rs = build(&st, &[], &cfg, true).ruleset;
        let node = trace::Node { rs: &rs, local: node.local.clone() };
        assert_eq!(node.trace(ext, "172.30.0.41", "tcp", 80, "eth0"), both);
        // Case 68: no pod short-circuit for eTP Local.
        assert_eq!(node.trace(pod, "5.6.7.8", "tcp", 80, "eth0"), here);
        // Case 12: --masquerade-all masquerades pods too.
        cfg.masquerade_all = true;
        let rs = build(&st, &[], &cfg, true).ruleset;
        let node = trace::Node { rs: &rs, local: node.local.clone() };
        assert_eq!(node.trace(pod, "172.30.0.41", "tcp", 80, "eth0"), both_m);
        // Interface detectors: a pod is what comes in on the bridge or a prefixed interface.
        cfg.masquerade_all = false;
        cfg.local_detector = LocalDetector::InterfacePrefix("veth".into());
        let rs = build(&st, &[], &cfg, true).ruleset;
        let node = trace::Node { rs: &rs, local: node.local.clone() };
        assert_eq!(node.trace(pod, "5.6.7.8", "tcp", 80, "veth12ab"), both);
        assert_eq!(node.trace(pod, "5.6.7.8", "tcp", 80, "eth0"), here);
        assert_eq!(node.trace(pod, "172.30.0.41", "tcp", 80, "eth0"), both_m);
        // Localhost node ports off: 127.0.0.1 is not a node port address.
        let rs = build(&st, &[], &ipt_cfg(Family::V4), false).ruleset;
        let node = trace::Node { rs: &rs, local: node.local.clone() };
        assert_eq!(node.trace(host, "127.0.0.1", "tcp", 3001, "lo"), set(&["UNTOUCHED -M"]));
    }

    #[test]
    fn probabilities_are_one_over_remaining() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(7), "0.1428571429");
        // An exact tie at the 10th decimal rounds half to even, as Go's %0.10f does.
        assert_eq!(probability(2048), "0.0004882812");
        assert_eq!(probability(1000), "0.0010000000");
    }

    /// Upstream's `checkIPTablesRuleJumps`: every chain jumped to exists and has rules; every
    /// per-service chain is jumped to.
    fn check_jumps(rs: &IptRuleset) {
        for t in [&rs.filter, &rs.nat] {
            let declared: BTreeMap<&str, usize> = t.chains.iter().map(|c| (c.name.as_str(), c.rules.len())).collect();
            let mut jumped = BTreeSet::new();
            for c in &t.chains {
                for r in &c.rules {
                    let args = split_args(r);
                    for w in args.windows(2).filter(|w| w[0] == "-j" || w[0] == "--name") {
                        if w[0] == "-j" && w[1].starts_with("KUBE-") {
                            jumped.insert(w[1].clone());
                            assert!(
                                declared.get(w[1].as_str()).is_some_and(|n| *n > 0 || !is_service_chain(&w[1])),
                                "{}: {} -> {}",
                                t.name,
                                c.name,
                                w[1]
                            );
                        }
                    }
                }
            }
            for c in t.chains.iter().filter(|c| is_service_chain(&c.name)) {
                assert!(jumped.contains(&c.name), "{}: {} is created but not used", t.name, c.name);
            }
        }
    }

    fn ipt_cfg(fam: Family) -> BuildConfig {
        let mut cfg = BuildConfig::new(fam);
        cfg.node_name = "test-node".into();
        cfg.nodeport_addresses = NodePortAddresses::All;
        match fam {
            Family::V4 => {
                cfg.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").unwrap());
                cfg.node_ip = Some("192.168.0.2".parse().unwrap());
            }
            Family::V6 => {
                cfg.cluster_cidr = Some(Cidr::parse("fd00:10::/64").unwrap());
                cfg.node_ip = Some("2001:db8::1".parse().unwrap());
            }
        }
        cfg
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
    }

    /// Upstream's TestOverallIPTablesRules fixture and expected text (its fake iptables has no
    /// `--random-fully` and nfacct counters; it prints the mark as 0x4000 where kube-proxy's
    /// `%#08x` prints 0x00004000).
    #[test]
    fn upstream_overall_iptables_rules() {
        let mut st = ClusterState::default();
        let svc1 = ServicePort::cluster_ip("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
        let svc2 = ServicePort::cluster_ip("ns2", "svc2", "p80", Protocol::Tcp, "172.30.0.42", 80)
            .with_node_port(3001)
            .with_load_balancer_ip("1.2.3.4")
            .with_external_ip("192.168.99.22")
            .with_external_traffic_policy_local()
            .with_health_check_node_port(30000);
        let svc3 = ServicePort::cluster_ip("ns3", "svc3", "p80", Protocol::Tcp, "172.30.0.43", 80).with_node_port(3003);
        let svc4 = ServicePort::cluster_ip("ns4", "svc4", "p80", Protocol::Tcp, "172.30.0.44", 80)
            .with_external_ip("192.168.99.33");
        let svc5 = ServicePort::cluster_ip("ns5", "svc5", "p80", Protocol::Tcp, "172.30.0.45", 80)
            .with_node_port(3002)
            .with_load_balancer_ip("5.6.7.8")
            .with_source_range("203.0.113.0/25")
            .with_session_affinity(10800);
        let svc6 = ServicePort::cluster_ip("ns6", "svc6", "p80", Protocol::Tcp, "172.30.0.46", 80);
        for sp in [&svc1, &svc2, &svc3, &svc4, &svc5, &svc6] {
            st.add_service(sp.clone());
        }
        st.add_endpoint(&svc1.name, Endpoint::ready("10.180.0.1", 80));
        st.add_endpoint(&svc2.name, Endpoint::ready("10.180.0.2", 80));
        st.add_endpoint(&svc3.name, Endpoint::ready("10.180.0.3", 80));
        st.add_endpoint(&svc4.name, Endpoint::ready("10.180.0.4", 80));
        st.add_endpoint(&svc4.name, Endpoint::ready("10.180.0.5", 80).on_node("test-node"));
        st.add_endpoint(&svc5.name, Endpoint::ready("10.180.0.3", 80));
        let opts = IptOptions {
            localhost_nodeports: true,
            random_fully: false,
            nfacct: true,
            conntrack_tcp_be_liberal: false,
        };
        let b = build_with(&st, &[], &ipt_cfg(Family::V4), &opts);
        check_jumps(&b.ruleset);
        assert_eq!(b.no_local_endpoints, NoLocalEndpoints { internal: 0, external: 1 });
        let expected = r#"
		*filter
		:KUBE-NODEPORTS - [0:0]
		:KUBE-SERVICES - [0:0]
		:KUBE-EXTERNAL-SERVICES - [0:0]
		:KUBE-FIREWALL - [0:0]
		:KUBE-FORWARD - [0:0]
		:KUBE-PROXY-FIREWALL - [0:0]
		-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
		-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
		-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
		-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
		-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
		-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
		-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
		-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
		-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
		-A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
		COMMIT
		*nat
		:KUBE-NODEPORTS - [0:0]
		:KUBE-SERVICES - [0:0]
		:KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
		:KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
		:KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
		:KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
		:KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
		:KUBE-MARK-MASQ - [0:0]
		:KUBE-POSTROUTING - [0:0]
		:KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
		:KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
		:KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
		:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
		:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
		:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
		:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
		:KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
		:KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
		:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
		:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
		-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
		-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
		-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3003 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X27LE4BHSL4DOUIK
		-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
		-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3002 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-NUKIZ6OKUXPJNT4C
		-A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
		-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
		-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
		-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
		-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
		-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
		-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
		-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
		-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
		-A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
		-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
		-A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
		-A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
		-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
		-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
		-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
		-A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
		-A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
		-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
		-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
		-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
		-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
		-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
		-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
		-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
		-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
		-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
		-A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
		-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
		-A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
		-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
		-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
		-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
		-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
		-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
		-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
		-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
		-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
		-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
		-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
		-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
		-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
		-A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
		-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
		-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
		-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
		-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
		-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
		-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
		-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
		COMMIT
		"#;
        let actual = restore_input(&b.ruleset, None).replace("0x00004000", "0x4000");
        assert_eq!(lines(&actual), lines(expected));
        let (filter_part, nat_part) = expected.split_once("*nat").unwrap();
        let count = |t: &str| t.lines().filter(|l| l.trim().starts_with("-A ")).count();
        assert_eq!(chain_counts(&b.ruleset), (count(filter_part), count(nat_part)));
        // Real kube-proxy's defaults here: --random-fully, and no nfacct counters.
        let b = build(&st, &[], &ipt_cfg(Family::V4), true);
        let nat = &b.ruleset.nat;
        assert!(nat.chain(KUBE_POSTROUTING).unwrap().rules[2].ends_with("-j MASQUERADE --random-fully"));
        assert_eq!(nat.chain(KUBE_NODEPORTS).unwrap().rules.len(), 3, "no nfacct localhost rules");
        assert_eq!(nat.chain(KUBE_MARK_MASQ).unwrap().rules, vec!["-j MARK --or-mark 0x00004000"]);
    }

    fn nat_rules(rs: &IptRuleset, chain: &str) -> Vec<String> {
        rs.nat.chain(chain).unwrap_or_else(|| panic!("no nat chain {chain}")).rules.clone()
    }

    #[test]
    fn etp_local_with_local_endpoints_goes_to_the_svl_chain() {
        let sp = ServicePort::cluster_ip("ns", "lb", "", Protocol::Tcp, "172.30.0.1", 80)
            .with_node_port(3001)
            .with_load_balancer_ip("1.2.3.4")
            .with_external_traffic_policy_local()
            .with_health_check_node_port(30000);
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        st.add_endpoint(&sp.name, Endpoint::ready("10.180.0.1", 80));
        st.add_endpoint(&sp.name, Endpoint::ready("10.180.2.1", 80).on_node("test-node"));
        let b = build(&st, &[], &ipt_cfg(Family::V4), true);
        let rs = &b.ruleset;
        check_jumps(rs);
        assert_eq!(b.no_local_endpoints, NoLocalEndpoints::default());
        let (svc, svl, ext) = (svc_chain(&sp.name), svl_chain(&sp.name), ext_chain(&sp.name));
        assert_eq!(nat_rules(rs, &ext).last().unwrap(), &format!("-j {svl}"));
        assert_eq!(
            nat_rules(rs, &ext)[0],
            format!("-m comment --comment \"pod traffic for ns/lb external destinations\" -s 10.0.0.0/8 -j {svc}")
        );
        let local_sep = sep_chain(&sp.name, &Endpoint::ready("10.180.2.1", 80));
        assert_eq!(
            nat_rules(rs, &svl),
            vec![format!("-m comment --comment \"ns/lb -> 10.180.2.1:80\" -j {local_sep}")]
        );
        assert_eq!(nat_rules(rs, &svc).len(), 3, "masquerade rule and both endpoints");
        assert!(rs.filter.chain(KUBE_EXTERNAL_SERVICES).unwrap().rules.is_empty());
        // Case 68: without a local traffic detector, no pod short-circuit (and no masquerade rule).
        let mut cfg = ipt_cfg(Family::V4);
        cfg.cluster_cidr = None;
        let rs = build(&st, &[], &cfg, true).ruleset;
        assert_eq!(nat_rules(&rs, &ext).len(), 3);
        assert_eq!(nat_rules(&rs, &svc).len(), 2);
        // Interface detectors.
        cfg.local_detector = LocalDetector::Bridge("cbr0".into());
        assert!(nat_rules(&build(&st, &[], &cfg, true).ruleset, &ext)[0].contains(" -i cbr0 -j "));
        assert!(nat_rules(&build(&st, &[], &cfg, true).ruleset, &svc)[0].contains(" ! -i cbr0 -j KUBE-MARK-MASQ"));
        cfg.local_detector = LocalDetector::InterfacePrefix("veth".into());
        assert!(nat_rules(&build(&st, &[], &cfg, true).ruleset, &ext)[0].contains(" -i veth+ -j "));
        // --masquerade-all: the cluster IP rule masquerades everything.
        cfg.masquerade_all = true;
        assert!(nat_rules(&build(&st, &[], &cfg, true).ruleset, &svc)[0].ends_with("--dport 80 -j KUBE-MARK-MASQ"));
    }

    #[test]
    fn itp_local_without_local_endpoints_drops_cluster_ip_traffic() {
        let sp = ServicePort::cluster_ip("ns", "i", "p", Protocol::Udp, "172.30.0.2", 53)
            .with_internal_traffic_policy_local();
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        st.add_endpoint(&sp.name, Endpoint::ready("10.180.0.9", 53).on_node("other"));
        let b = build(&st, &[], &ipt_cfg(Family::V4), true);
        check_jumps(&b.ruleset);
        assert_eq!(b.no_local_endpoints, NoLocalEndpoints { internal: 1, external: 0 });
        assert_eq!(
            b.ruleset.filter.chain(KUBE_SERVICES).unwrap().rules,
            vec![
                "-m comment --comment \"ns/i:p has no local endpoints\" -m udp -p udp -d 172.30.0.2 --dport 53 -j DROP"
            ]
        );
        assert!(
            !b.ruleset.nat.chains.iter().any(|c| is_service_chain(&c.name)),
            "no SVC chain without cluster traffic"
        );
        // With a local endpoint: KUBE-SVL holds the masquerade rule.
        st.add_endpoint(&sp.name, Endpoint::ready("10.180.0.8", 53).on_node("test-node"));
        let rs = build(&st, &[], &ipt_cfg(Family::V4), true).ruleset;
        check_jumps(&rs);
        let svl = nat_rules(&rs, &svl_chain(&sp.name));
        assert!(svl[0].ends_with("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"), "{svl:?}");
        assert_eq!(svl.len(), 2);
    }

    #[test]
    fn source_ranges_allow_lb_ips_when_the_node_is_inside() {
        let sp = ServicePort::cluster_ip("ns", "lb", "p", Protocol::Tcp, "172.30.0.1", 80)
            .with_node_port(3001)
            .with_load_balancer_ip("1.2.3.4")
            .with_load_balancer_ip("5.6.7.8")
            .with_source_range("192.168.0.0/24")
            .with_source_range("2001:db8::/32");
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        st.add_endpoint(&sp.name, Endpoint::ready("10.180.0.1", 80));
        let rs = build(&st, &[], &ipt_cfg(Family::V4), true).ruleset;
        check_jumps(&rs);
        let (fw, ext) = (fw_chain(&sp.name), ext_chain(&sp.name));
        let head = "-m comment --comment \"ns/lb:p loadbalancer IP\"";
        assert_eq!(
            nat_rules(&rs, &fw),
            vec![
                format!("{head} -s 192.168.0.0/24 -j {ext}"),
                format!("{head} -s 1.2.3.4 -j {ext}"),
                format!("{head} -s 5.6.7.8 -j {ext}"),
                "-m comment --comment \"other traffic to ns/lb:p will be dropped by KUBE-PROXY-FIREWALL\"".to_string(),
            ]
        );
        assert_eq!(rs.filter.chain(KUBE_PROXY_FIREWALL).unwrap().rules.len(), 2);
        let services = nat_rules(&rs, KUBE_SERVICES);
        assert!(services[1].ends_with(&format!("-d 1.2.3.4 --dport 80 -j {fw}")), "{services:?}");
        // The node port never goes through the firewall chain (case 52).
        assert!(nat_rules(&rs, KUBE_NODEPORTS)[0].ends_with(&format!("-j {ext}")));
        // The node outside every range: the ranges only.
        let mut cfg = ipt_cfg(Family::V4);
        cfg.node_ip = Some("192.168.1.2".parse().unwrap());
        assert_eq!(nat_rules(&build(&st, &[], &cfg, true).ruleset, &fw).len(), 2);
        // No endpoints: no nat chains at all, the LB IP is rejected.
        st.endpoints.clear();
        let rs = build(&st, &[], &ipt_cfg(Family::V4), true).ruleset;
        assert!(rs.filter.chain(KUBE_PROXY_FIREWALL).unwrap().rules.is_empty());
        assert_eq!(rs.filter.chain(KUBE_EXTERNAL_SERVICES).unwrap().rules.len(), 3, "two LB IPs and the node port");
    }

    #[test]
    fn affinity_checks_recent_lists_before_picking() {
        let sp =
            ServicePort::cluster_ip("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80).with_session_affinity(300);
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        for ip in ["10.180.0.3", "10.180.0.1", "10.180.0.2"] {
            st.add_endpoint(&sp.name, Endpoint::ready(ip, 80));
        }
        let rs = build(&st, &[], &ipt_cfg(Family::V4), true).ruleset;
        check_jumps(&rs);
        let svc = nat_rules(&rs, &svc_chain(&sp.name));
        assert_eq!(svc.len(), 7);
        let sep1 = sep_chain(&sp.name, &Endpoint::ready("10.180.0.1", 80));
        assert_eq!(svc[0], format!("-m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"));
        assert_eq!(
            svc[1],
            format!("-m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m recent --name {sep1} --rcheck --seconds 300 --reap -j {sep1}")
        );
        assert!(svc[4].contains("-m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-"));
        assert!(svc[5].contains("--probability 0.5000000000"));
        assert!(svc[6].starts_with("-m comment --comment \"ns1/svc1:p80 -> 10.180.0.3:80\" -j KUBE-SEP-"));
        assert!(nat_rules(&rs, &sep1)[1].contains(&format!("-m recent --name {sep1} --set -m tcp -p tcp -j DNAT")));
    }

    #[test]
    fn ipv6_and_per_ip_node_ports() {
        let sp = ServicePort::cluster_ip("ns", "s", "", Protocol::Sctp, "fd00:172:30::41", 80).with_node_port(3001);
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        st.add_endpoint(&sp.name, Endpoint::ready("fd00:10:180::1", 8080));
        let rs = build(&st, &[], &ipt_cfg(Family::V6), true).ruleset;
        check_jumps(&rs);
        assert!(rs.filter.chain(KUBE_FIREWALL).is_none(), "no localhost node ports for IPv6");
        let services = nat_rules(&rs, KUBE_SERVICES);
        assert_eq!(
            services[0],
            format!(
                "-m comment --comment \"ns/s cluster IP\" -m sctp -p sctp -d fd00:172:30::41 --dport 80 -j {}",
                svc_chain(&sp.name)
            )
        );
        assert!(services[1].ends_with("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"));
        let ep = Endpoint::ready("fd00:10:180::1", 8080);
        assert_eq!(
            nat_rules(&rs, &sep_chain(&sp.name, &ep)),
            vec![
                "-m comment --comment ns/s -s fd00:10:180::1 -j KUBE-MARK-MASQ".to_string(),
                "-m comment --comment ns/s -m sctp -p sctp -j DNAT --to-destination [fd00:10:180::1]:8080".to_string(),
            ]
        );
        // Per-IP node ports: one tail rule per node IP of the family; loopback only for IPv4
        // with localhost node ports.
        let mut cfg = ipt_cfg(Family::V4);
        let ips: Vec<IpAddr> = ["192.168.0.2", "127.0.0.1", "2001:db8::1"].iter().map(|s| s.parse().unwrap()).collect();
        cfg.nodeport_addresses = NodePortAddresses::Ips(ips.clone());
        let st4 = ClusterState::default();
        let tails = |rs: &IptRuleset| -> Vec<String> {
            nat_rules(rs, KUBE_SERVICES).iter().map(|r| r.rsplit_once(" -d ").unwrap().1.to_string()).collect()
        };
        let rs = build(&st4, &ips, &cfg, true).ruleset;
        assert_eq!(tails(&rs), vec!["192.168.0.2 -j KUBE-NODEPORTS", "127.0.0.1 -j KUBE-NODEPORTS"]);
        assert!(rs.filter.chain(KUBE_FIREWALL).is_some());
        let rs = build(&st4, &ips, &cfg, false).ruleset;
        assert_eq!(tails(&rs), vec!["192.168.0.2 -j KUBE-NODEPORTS"]);
        assert!(rs.filter.chain(KUBE_FIREWALL).is_none());
        // Localhost node ports off with match-all: loopback excluded from the tail rule.
        cfg.nodeport_addresses = NodePortAddresses::All;
        let rs = build(&st4, &[], &cfg, false).ruleset;
        assert!(nat_rules(&rs, KUBE_SERVICES)[0].ends_with("--dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"));
    }

    #[test]
    fn partial_restore_writes_changed_chains_and_deletes_stale_ones() {
        let a = ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80);
        let b = ServicePort::cluster_ip("ns", "b", "", Protocol::Tcp, "172.30.0.2", 80);
        let mut st = ClusterState::default();
        st.add_service(a.clone()).add_service(b.clone());
        st.add_endpoint(&a.name, Endpoint::ready("10.180.0.1", 80));
        st.add_endpoint(&b.name, Endpoint::ready("10.180.0.2", 80));
        let cfg = ipt_cfg(Family::V4);
        let rs1 = build(&st, &[], &cfg, true).ruleset;
        let full = restore_input(&rs1, None);
        assert!(full.starts_with("*filter\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n"), "{full}");
        assert!(full.ends_with("COMMIT\n") && full.contains("COMMIT\n*nat\n"));
        assert_eq!(full.lines().filter(|l| l.starts_with("-A ")).count(), {
            let (f, n) = chain_counts(&rs1);
            f + n
        });

        // Nothing changed: only the fixed chains.
        let same = restore_input(&rs1, Some(&rs1));
        let declared = |t: &str| -> Vec<String> {
            t.lines().filter_map(|l| l.strip_prefix(':')).map(|l| l.split(' ').next().unwrap().to_string()).collect()
        };
        assert!(!declared(&same).iter().any(|c| is_service_chain(c)), "{same}");
        assert!(!same.contains("-X "));
        let fixed: Vec<String> = [
            KUBE_NODEPORTS,
            KUBE_SERVICES,
            KUBE_EXTERNAL_SERVICES,
            KUBE_FIREWALL,
            KUBE_FORWARD,
            KUBE_PROXY_FIREWALL,
            KUBE_NODEPORTS,
            KUBE_SERVICES,
            KUBE_MARK_MASQ,
            KUBE_POSTROUTING,
        ]
        .iter()
        .map(|c| c.to_string())
        .collect();
        assert_eq!(declared(&same), fixed, "the fixed chains (filter, then nat), nothing else:\n{same}");

        // b's endpoint moves: b's SVC chain is rewritten, its new SEP chain declared, the old
        // one flushed and deleted; a's chains are left alone.
        let mut st2 = st.clone();
        st2.endpoints.insert(b.name.clone(), vec![Endpoint::ready("10.180.0.3", 80)]);
        let rs2 = build(&st2, &[], &cfg, true).ruleset;
        let partial = restore_input(&rs2, Some(&rs1));
        let old_sep = sep_chain(&b.name, &Endpoint::ready("10.180.0.2", 80));
        let new_sep = sep_chain(&b.name, &Endpoint::ready("10.180.0.3", 80));
        let mut svc_chains: Vec<String> = declared(&partial).into_iter().filter(|c| is_service_chain(c)).collect();
        svc_chains.sort();
        let mut want = vec![svc_chain(&b.name), new_sep.clone(), old_sep.clone()];
        want.sort();
        assert_eq!(svc_chains, want, "{partial}");
        assert!(partial.ends_with(&format!("-X {old_sep}\nCOMMIT\n")), "{partial}");
        assert!(!partial.contains(&format!(":{}", svc_chain(&a.name))));

        // Service a deleted: its chains go, its KUBE-SERVICES rule with the rewritten chain.
        st2.services.remove(&a.name);
        let rs3 = build(&st2, &[], &cfg, true).ruleset;
        let partial = restore_input(&rs3, Some(&rs2));
        assert!(partial.contains(&format!("-X {}\n", svc_chain(&a.name))));
        assert!(partial.contains(&format!("-X {}\n", sep_chain(&a.name, &Endpoint::ready("10.180.0.1", 80)))));
        assert!(!partial.contains(&format!("-j {}", svc_chain(&a.name))));

        // After a restart, the chains iptables-save lists stand in for `previous`: every desired
        // chain is written and leftovers of ours are deleted, other chains are not.
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:CNI-X - [0:0]\n\
                    -A KUBE-SVC-AAAAAAAAAAAAAAAA -j ACCEPT\nCOMMIT\n*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n";
        let prev = IptRuleset::chains_from_save(Family::V4, save);
        let text = restore_input(&rs3, Some(&prev));
        assert!(
            text.contains("-X KUBE-SVC-AAAAAAAAAAAAAAAA\n")
                && !text.contains("-X CNI-X")
                && !text.contains("-X PREROUTING")
        );
        for c in rs3.nat.chains.iter().chain(&rs3.filter.chains) {
            assert!(text.contains(&format!(":{} - [0:0]\n", c.name)), "{}", c.name);
        }
    }

    #[test]
    fn large_clusters_drop_endpoint_comments() {
        let sp = ServicePort::cluster_ip("ns", "big", "", Protocol::Tcp, "172.30.0.1", 80);
        let mut st = ClusterState::default();
        st.add_service(sp.clone());
        for i in 0..=LARGE_CLUSTER_ENDPOINTS {
            st.add_endpoint(&sp.name, Endpoint::ready(&format!("10.{}.{}.1", i / 256, i % 256), 80));
        }
        let rs = build(&st, &[], &ipt_cfg(Family::V4), true).ruleset;
        let svc = nat_rules(&rs, &svc_chain(&sp.name));
        assert_eq!(svc.len(), LARGE_CLUSTER_ENDPOINTS + 2);
        assert!(svc[0].starts_with("-m comment --comment \"ns/big cluster IP\""), "the service comments stay");
        assert!(svc[1].starts_with("-m statistic --mode random --probability 0.0009990010 -j KUBE-SEP-"), "{}", svc[1]);
        assert!(!nat_rules(&rs, &sep_chain(&sp.name, &Endpoint::ready("10.0.0.1", 80)))[0].contains("comment"));
        st.endpoints.get_mut(&sp.name).unwrap().pop();
        let rs = build(&st, &[], &ipt_cfg(Family::V4), true).ruleset;
        assert!(nat_rules(&rs, &svc_chain(&sp.name))[1].starts_with("-m comment --comment \"ns/big -> "));
    }

    #[test]
    fn conflicting_frontends_are_skipped() {
        let mut st = ClusterState::default();
        st.add_service(ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80).with_node_port(3001));
        st.add_service(ServicePort::cluster_ip("ns", "b", "", Protocol::Tcp, "172.30.0.1", 80));
        st.add_service(ServicePort::cluster_ip("ns", "c", "", Protocol::Tcp, "172.30.0.3", 80).with_node_port(3001));
        let b = build(&st, &[], &ipt_cfg(Family::V4), true);
        let names: Vec<String> = b.skipped.iter().map(|s| s.service.to_string()).collect();
        assert_eq!(names, vec!["ns/b", "ns/c"]);
        assert_eq!(b.ruleset.filter.chain(KUBE_EXTERNAL_SERVICES).unwrap().rules.len(), 1, "one node port rule");
    }

    #[test]
    fn split_args_keeps_quoted_words_together() {
        assert_eq!(
            split_args("-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
            vec!["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]
        );
        assert_eq!(jump_rules(Family::V4).len(), 14);
    }
}
