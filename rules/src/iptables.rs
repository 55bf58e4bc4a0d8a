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

use std::collections::{BTreeMap, BTreeSet};
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
    hash16(&format!("{spn}{}", spn.protocol.lower()))
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
    format!("KUBE-SEP-{}", hash16(&format!("{spn}{}{}", spn.protocol.lower(), ep.addr_string())))
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
        debug_assert!(self.chains.contains_key(chain), "rule for undeclared chain {chain}");
        self.chains.entry(chain.to_string()).or_default().push(rule);
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

    let (services, skipped) = resolve_conflicts(state, fam);
    let eps_of = |spn: &ServicePortName| state.endpoints.get(spn).map(|v| v.as_slice()).unwrap_or(&[]);
    let total_endpoints: usize = services
        .keys()
        .map(|spn| {
            eps_of(spn)
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
    order.sort_by_cached_key(|(spn, _)| format!("{}/{}", spn.namespace, spn.name));

    let mut no_local = NoLocalEndpoints::default();
    for (spn, sp) in order {
        let name = spn.to_string();
        let proto = spn.protocol.lower();
        let pm = format!("-m {proto} -p {proto}");
        let cat = categorize_endpoints(eps_of(spn), sp, &cfg.node_name, cfg.node_zone.as_deref());
        let (svc, svl, ext, fw) = (svc_chain(spn), svl_chain(spn), ext_chain(spn), fw_chain(spn));
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
        for (used, chain, eps) in [(uses_cluster, &svc, &cat.cluster), (uses_local, &svl, &cat.local)] {
            if !used {
                continue;
            }
            let arrow = |ep: &Endpoint| ep_comment(&format!("\"{name} -> {}\"", ep.addr_string()));
            if let Some(timeout) = sp.session_affinity_timeout {
                for ep in eps.iter() {
                    let sep = sep_chain(spn, ep);
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
                nat.rule(chain, format!("{}{stat}-j {}", arrow(ep), sep_chain(spn, ep)));
            }
        }
        // One chain per endpoint that some traffic can reach from this node.
        let reachable: BTreeMap<String, &Endpoint> = cat
            .cluster
            .iter()
            .filter(|_| uses_cluster)
            .chain(cat.local.iter().filter(|_| uses_local))
            .map(|e| (e.addr_string(), e))
            .collect();
        for ep in reachable.values() {
            let sep = sep_chain(spn, ep);
            nat.chain(&sep);
            let c = ep_comment(&name);
            nat.rule(&sep, format!("{c}-s {} -j {KUBE_MARK_MASQ}", ep.ip));
            let recent = if sp.session_affinity_timeout.is_some() {
                format!("-m recent --name {sep} --set ")
            } else {
                String::new()
            };
            nat.rule(&sep, format!("{c}{recent}{pm} -j DNAT --to-destination {}", ep.addr_string()));
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

/// Drops what two service ports of one family cannot both have, as the nftables build does (its
/// helper in `build.rs` is private and changing): the same cluster IP, protocol and port (the
/// later port by name is skipped), the same external or LB IP and port (left out of the later
/// port), the same node port (the later port loses it). The API server never allows these;
/// manifests can hold them, and iptables would silently let the first rule win.
fn resolve_conflicts(state: &ClusterState, fam: Family) -> (BTreeMap<ServicePortName, ServicePort>, Vec<Skipped>) {
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut frontends: BTreeMap<(IpAddr, Protocol, u16), ServicePortName> = BTreeMap::new();
    let mut node_ports: BTreeMap<(Protocol, u16), ServicePortName> = BTreeMap::new();
    for sp in state.services.values().filter(|sp| sp.family() == fam) {
        let proto = sp.name.protocol;
        if let Some(owner) = frontends.get(&(sp.cluster_ip, proto, sp.port)) {
            let reason = format!("{} {proto}/{} is already used by {owner}", sp.cluster_ip, sp.port);
            skipped.push(Skipped { service: sp.name.clone(), reason });
            continue;
        }
        let mut sp = sp.clone();
        frontends.insert((sp.cluster_ip, proto, sp.port), sp.name.clone());
        let mut keep = |ip: &IpAddr, skipped: &mut Vec<Skipped>| match frontends.get(&(*ip, proto, sp.port)) {
            Some(owner) if *owner != sp.name => {
                let reason = format!("{ip} {proto}/{} is already used by {owner}; left out", sp.port);
                skipped.push(Skipped { service: sp.name.clone(), reason });
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
                let reason = format!("node port {proto}/{} is already used by {owner}; left out", sp.node_port);
                skipped.push(Skipped { service: sp.name.clone(), reason });
                sp.node_port = 0;
            } else {
                node_ports.insert((proto, sp.node_port), sp.name.clone());
            }
        }
        out.insert(sp.name.clone(), sp);
    }
    (out, skipped)
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
        out.push('*');
        out.push_str(table.name);
        out.push('\n');
        for c in table.chains.iter().filter(|c| write(c)) {
            out.push_str(&format!(":{} - [0:0]\n", c.name));
        }
        for s in &stale {
            out.push_str(&format!(":{s} - [0:0]\n"));
        }
        for c in table.chains.iter().filter(|c| write(c)) {
            for r in &c.rules {
                out.push_str(&format!("-A {} {r}\n", c.name));
            }
        }
        for s in &stale {
            out.push_str(&format!("-X {s}\n"));
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

    #[test]
    fn probabilities_are_one_over_remaining() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(7), "0.1428571429");
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
