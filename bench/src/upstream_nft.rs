//! The peer: the `nft -f` text upstream kube-proxy's nftables mode writes for a cluster, so the
//! bench can time the kernel loading upstream's layout next to kproxy's.
//!
//! Written from upstream's documented layout (shared/reference/upstream-behaviour.md §1.1, and
//! `baseRules` / `TestOverallNFTablesRules` in kubernetes/kubernetes
//! pkg/proxy/nftables/proxier_test.go): table `ip kube-proxy`, its sets and verdict maps, per
//! service port `service-HASH-ns/svc/proto/port` (and `local-`, `external-`, `firewall-`) chains,
//! `numgen random mod N vmap { 0 : goto endpoint-… , … }`, one `endpoint-HASH-…__IP/port` chain per
//! endpoint with its hairpin mark and DNAT, affinity sets, and the element maps. Chain names use
//! upstream's hashing (`rules::names`, checked against upstream's test vectors there).
//!
//! What a first (full) sync sends: `setupNFTables` (table, base chains, sets and maps, fixed rules),
//! then per service port `add chain` + `flush chain` (upstream's `ensureChain`) for every chain it
//! uses, their rules, and the map elements. One difference that does not matter to the kernel's
//! work: upstream deletes and re-adds the base chains once per process (`add`+`delete` first) and
//! flushes the six containers; into an empty namespace both are no-ops, so they are left out.
//! IPv4 only (the bench's clusters are IPv4).

use std::fmt::Write;
use std::net::IpAddr;

use rules::build::categorize_endpoints;
use rules::model::*;
use rules::names::{affinity_set, endpoint_chain, external_chain, local_chain, service_chain, service_port_chain_base};

const T: &str = "ip kube-proxy";

/// What upstream needs to know besides the cluster (bench/src/main.rs's `cfg()` and `node_ips()`).
pub struct Upstream<'a> {
    pub cluster_cidr: Option<Cidr>,
    pub node_name: &'a str,
    pub node_zone: Option<&'a str>,
    /// `--nodeport-addresses` primary: the node's IPs that accept node ports.
    pub nodeport_ips: &'a [IpAddr],
    /// The service CIDRs upstream puts in its "Drop traffic to unallocated ClusterIPs" rule.
    pub service_cidrs: &'a [Cidr],
    pub masquerade_all: bool,
}

/// The fixed part (`setupNFTables`), as `baseRules` shows it for the default mark 0x4000 and
/// node ports on the primary IPs.
fn base(u: &Upstream, out: &mut String) {
    let w = |out: &mut String, s: &str| {
        out.push_str(s);
        out.push('\n');
    };
    w(out, &format!("add table {T} {{ comment \"rules for kube-proxy\" ; }}"));
    for (name, spec) in [
        ("filter-prerouting-pre-dnat", " { type filter hook prerouting priority -110 ; }"),
        ("filter-output-pre-dnat", " { type filter hook output priority -110 ; }"),
        ("filter-input", " { type filter hook input priority 0 ; }"),
        ("filter-forward", " { type filter hook forward priority 0 ; }"),
        ("filter-output", " { type filter hook output priority 0 ; }"),
        ("nat-prerouting", " { type nat hook prerouting priority -100 ; }"),
        ("nat-output", " { type nat hook output priority -100 ; }"),
        ("nat-postrouting", " { type nat hook postrouting priority 100 ; }"),
        ("cluster-ips-check", ""),
        ("firewall-check", ""),
        ("mark-for-masquerade", ""),
        ("masquerading", ""),
        ("nodeport-endpoints-check", ""),
        ("reject-chain", " { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }"),
        ("services", ""),
        ("service-endpoints-check", ""),
    ] {
        w(out, &format!("add chain {T} {name}{spec}"));
        w(out, &format!("flush chain {T} {name}"));
    }
    w(out, &format!("add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"));
    w(out, &format!("add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"));
    let key3 = "ipv4_addr . inet_proto . inet_service";
    for (name, key, comment) in [
        ("firewall-ips", key3, "destinations that are subject to LoadBalancerSourceRanges"),
        (
            "no-endpoint-nodeports",
            "inet_proto . inet_service",
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        ("no-endpoint-services", key3, "vmap to drop or reject packets to services with no endpoints"),
        ("service-ips", key3, "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
        ("service-nodeports", "inet_proto . inet_service", "NodePort traffic"),
    ] {
        w(out, &format!("add map {T} {name} {{ type {key} : verdict ; comment \"{comment}\" ; }}"));
    }
    w(out, &format!("add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""));
    if !u.service_cidrs.is_empty() {
        let cidrs: Vec<String> = u.service_cidrs.iter().map(|c| c.to_string()).collect();
        w(out, &format!("add rule {T} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"", cidrs.join(", ")));
    }
    for r in [
        "filter-prerouting-pre-dnat ct state new jump firewall-check",
        "filter-forward ct state new jump service-endpoints-check",
        "filter-forward ct state new jump cluster-ips-check",
        "filter-input ct state new jump nodeport-endpoints-check",
        "filter-input ct state new jump service-endpoints-check",
        "filter-output ct state new jump service-endpoints-check",
        "filter-output-pre-dnat ct state new jump firewall-check",
        "filter-output ct state new jump cluster-ips-check",
        "firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        "mark-for-masquerade mark set mark or 0x4000",
        "masquerading mark and 0x4000 == 0 return",
        "masquerading mark set mark xor 0x4000",
        "masquerading masquerade fully-random",
        "nat-output jump services",
        "nat-postrouting jump masquerading",
        "nat-prerouting jump services",
        "nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
        "reject-chain reject",
        "services ip daddr . meta l4proto . th dport vmap @service-ips",
        "services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        "service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    ] {
        w(out, &format!("add rule {T} {r}"));
    }
    for ip in u.nodeport_ips.iter().filter(|ip| ip.is_ipv4()) {
        w(out, &format!("add element {T} nodeport-ips {{ {ip} }}"));
    }
}

/// One service port's part of a sync: `add`+`flush` of its chains (and `add` of its affinity
/// sets), their rules, and its map elements, in the order upstream's sync loop writes them
/// (chains before any rule that jumps to them).
#[derive(Default)]
struct Part {
    chains: Vec<String>,
    rules: Vec<String>,
    elems: Vec<String>,
    /// The names of its chains, for deletion.
    chain_names: Vec<String>,
}

fn service_port(u: &Upstream, sp: &ServicePort, eps: &[Endpoint]) -> Part {
    let spn = &sp.name;
    let proto = spn.protocol().lower();
    let cat = categorize_endpoints(eps, sp, u.node_name, u.node_zone);
    let mut chains: Vec<String> = Vec::new();
    let mut rules: Vec<String> = Vec::new();
    let mut elems: Vec<String> = Vec::new();

    // Every endpoint some chain can reach (cluster ∪ local), each once, with its chain.
    let mut reachable: Vec<&Endpoint> = cat.cluster.iter().chain(cat.local.iter()).collect();
    reachable.sort_by_key(|e| (e.ip, e.port));
    reachable.dedup_by_key(|e| (e.ip, e.port));
    for ep in &reachable {
        let c = endpoint_chain(spn, &ep.ip, ep.port);
        if let Some(t) = sp.session_affinity_timeout {
            let s = affinity_set(spn, &ep.ip, ep.port);
            chains.push(format!("add set {T} {s} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {t}s ; }}"));
        }
        chains.push(format!("add chain {T} {c}"));
        chains.push(format!("flush chain {T} {c}"));
        rules.push(format!("add rule {T} {c} ip saddr {} jump mark-for-masquerade", ep.ip));
        if sp.session_affinity_timeout.is_some() {
            rules.push(format!("add rule {T} {c} update @{} {{ ip saddr }}", affinity_set(spn, &ep.ip, ep.port)));
        }
        rules.push(format!("add rule {T} {c} meta l4proto {proto} dnat to {}:{}", ep.ip, ep.port));
    }

    let cluster_chain = service_chain(spn);
    let local = local_chain(spn);
    let uses_cluster = !cat.cluster.is_empty() && sp.uses_cluster_endpoints();
    let uses_local = !cat.local.is_empty() && sp.uses_local_endpoints();
    let internal_chain = if sp.internal_traffic_policy_local { &local } else { &cluster_chain };
    // The selection chain(s): masquerade rule (internal chain only), affinity, numgen vmap.
    for (chain, list, used) in [(&cluster_chain, &cat.cluster, uses_cluster), (&local, &cat.local, uses_local)] {
        if !used {
            continue;
        }
        chains.push(format!("add chain {T} {chain}"));
        chains.push(format!("flush chain {T} {chain}"));
        if chain == internal_chain {
            if u.masquerade_all {
                rules.push(format!("add rule {T} {chain} ip daddr {} jump mark-for-masquerade", sp.cluster_ip));
            } else if let Some(cidr) = u.cluster_cidr {
                rules.push(format!(
                    "add rule {T} {chain} ip daddr {} ip saddr != {cidr} jump mark-for-masquerade",
                    sp.cluster_ip
                ));
            }
        }
        if sp.session_affinity_timeout.is_some() {
            for ep in list.iter() {
                rules.push(format!(
                    "add rule {T} {chain} ip saddr @{} goto {}",
                    affinity_set(spn, &ep.ip, ep.port),
                    endpoint_chain(spn, &ep.ip, ep.port)
                ));
            }
        }
        let arms: Vec<String> = list
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto {}", endpoint_chain(spn, &ep.ip, ep.port)))
            .collect();
        rules.push(format!("add rule {T} {chain} numgen random mod {} vmap {{ {} }}", list.len(), arms.join(" , ")));
    }

    let has_any = cat.has_any;
    let has_internal = has_any && (!sp.internal_traffic_policy_local || !cat.local.is_empty());
    let has_external = has_any && (!sp.external_traffic_policy_local || !cat.local.is_empty());
    let ext = external_chain(spn);
    if has_any && sp.externally_accessible() {
        chains.push(format!("add chain {T} {ext}"));
        chains.push(format!("flush chain {T} {ext}"));
        if sp.external_traffic_policy_local {
            if let Some(cidr) = u.cluster_cidr {
                rules.push(format!(
                    "add rule {T} {ext} ip saddr {cidr} goto {cluster_chain} comment \"short-circuit pod traffic\""
                ));
            }
            rules.push(format!(
                "add rule {T} {ext} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
            ));
            rules.push(format!(
                "add rule {T} {ext} fib saddr type local goto {cluster_chain} comment \"short-circuit local traffic\""
            ));
            if uses_local {
                rules.push(format!("add rule {T} {ext} goto {local}"));
            }
        } else {
            rules.push(format!("add rule {T} {ext} jump mark-for-masquerade"));
            rules.push(format!("add rule {T} {ext} goto {cluster_chain}"));
        }
    }
    let fw = format!("firewall-{}", service_port_chain_base(spn));
    let uses_fw = !sp.load_balancer_ips.is_empty() && !sp.load_balancer_source_ranges.is_empty();
    if uses_fw {
        chains.push(format!("add chain {T} {fw}"));
        chains.push(format!("flush chain {T} {fw}"));
        let ranges: Vec<String> = sp.load_balancer_source_ranges.iter().map(|c| c.to_string()).collect();
        rules.push(format!("add rule {T} {fw} ip saddr != {{ {} }} drop", ranges.join(", ")));
    }

    // Elements.
    let reject = "goto reject-chain";
    let int_verdict = if has_any { "drop" } else { reject };
    let ext_verdict = int_verdict;
    let comment = format!("comment \"{spn}\"");
    let (cip, port) = (sp.cluster_ip, sp.port);
    elems.push(format!("add element {T} cluster-ips {{ {cip} }}"));
    if has_internal {
        elems.push(format!("add element {T} service-ips {{ {cip} . {proto} . {port} : goto {internal_chain} }}"));
    } else {
        elems.push(format!(
            "add element {T} no-endpoint-services {{ {cip} . {proto} . {port} {comment} : {int_verdict} }}"
        ));
    }
    for ip in sp.external_ips.iter().chain(sp.load_balancer_ips.iter()) {
        if has_any {
            elems.push(format!("add element {T} service-ips {{ {ip} . {proto} . {port} : goto {ext} }}"));
        }
        if !has_external {
            elems.push(format!(
                "add element {T} no-endpoint-services {{ {ip} . {proto} . {port} {comment} : {ext_verdict} }}"
            ));
        }
    }
    if uses_fw {
        for ip in &sp.load_balancer_ips {
            elems.push(format!("add element {T} firewall-ips {{ {ip} . {proto} . {port} : goto {fw} }}"));
        }
    }
    if sp.node_port != 0 {
        let np = sp.node_port;
        if has_any {
            elems.push(format!("add element {T} service-nodeports {{ {proto} . {np} : goto {ext} }}"));
        }
        if !has_external {
            elems.push(format!("add element {T} no-endpoint-nodeports {{ {proto} . {np} {comment} : {ext_verdict} }}"));
        }
    }
    let chain_names =
        chains.iter().filter_map(|l| l.strip_prefix(&format!("add chain {T} "))).map(str::to_string).collect();
    Part { chains, rules, elems, chain_names }
}

fn push(out: &mut String, lines: &[String]) {
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
}

/// The whole first-sync script for `st`.
pub fn script(u: &Upstream, st: &ClusterState) -> String {
    let mut out = String::with_capacity(st.services.len() * 2048);
    base(u, &mut out);
    for (name, sp) in &st.services {
        assert!(sp.cluster_ip.is_ipv4(), "upstream_nft: IPv4 only");
        let eps = st.endpoints.get(name).map(Vec::as_slice).unwrap_or(&[]);
        let p = service_port(u, sp, eps);
        push(&mut out, &p.chains);
        push(&mut out, &p.rules);
        push(&mut out, &p.elems);
    }
    out
}

fn part(u: &Upstream, st: &ClusterState, name: &ServicePortName) -> Part {
    let eps = st.endpoints.get(name).map(Vec::as_slice).unwrap_or(&[]);
    service_port(u, &st.services[name], eps)
}

/// The script of one service port alone (its chains, rules and elements): what upstream's partial
/// sync sends when that service port is added to a table that already holds the rest.
pub fn service_port_script(u: &Upstream, st: &ClusterState, name: &ServicePortName) -> String {
    let p = part(u, st, name);
    let mut out = String::new();
    push(&mut out, &p.chains);
    push(&mut out, &p.rules);
    push(&mut out, &p.elems);
    out
}

/// Deleting one service port from a table that holds `st`: its elements go, its chains are
/// flushed (upstream deletes the flushed chains in a later transaction, at least 1 s on, because
/// kernels before 6.2 notice late that a chain is unused; here they are deleted in the same
/// script, after their last reference is gone, so one `nft -f` measures the whole removal).
pub fn delete_service_port_script(u: &Upstream, st: &ClusterState, name: &ServicePortName) -> String {
    let p = part(u, st, name);
    let mut out = String::new();
    for e in &p.elems {
        // `add element T m { key : verdict }` → `delete element T m { key }`.
        let body = e.strip_prefix("add ").expect("add element");
        let body = match body.split_once(" : ") {
            Some((k, _)) => format!("{k} }}"),
            None => body.to_string(),
        };
        let body = match body.split_once(" comment ") {
            Some((k, _)) => format!("{k} }}"),
            None => body,
        };
        let _ = writeln!(out, "delete {body}");
    }
    for c in &p.chain_names {
        let _ = writeln!(out, "flush chain {T} {c}");
    }
    for c in &p.chain_names {
        let _ = writeln!(out, "delete chain {T} {c}");
    }
    for l in p.chains.iter().filter(|l| l.starts_with("add set")) {
        let name = l.split_whitespace().nth(4).expect("set name");
        let _ = writeln!(out, "delete set {T} {name}");
    }
    out
}

/// An endpoint change of one service port, from a table holding `from` to `to`: upstream's partial
/// sync re-creates (`add`+`flush`) and refills every chain of the changed service (its elements
/// are unchanged: `ensureElem` sends nothing), and flushes the endpoint chains no longer used. Those
/// are deleted here in the same script (upstream: a later transaction; see above).
pub fn endpoint_change_script(u: &Upstream, from: &ClusterState, to: &ClusterState, name: &ServicePortName) -> String {
    let old = part(u, from, name);
    let new = part(u, to, name);
    let mut out = String::new();
    push(&mut out, &new.chains);
    push(&mut out, &new.rules);
    let gone: Vec<&String> = old.chain_names.iter().filter(|c| !new.chain_names.contains(c)).collect();
    for c in &gone {
        let _ = writeln!(out, "flush chain {T} {c}");
    }
    for c in &gone {
        let _ = writeln!(out, "delete chain {T} {c}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn upstream_for<'a>(st: &'a ClusterState, ips: &'a [IpAddr]) -> Upstream<'a> {
        Upstream {
            cluster_cidr: Some(Cidr::parse("10.0.0.0/8").expect("constant")),
            node_name: "test-node",
            node_zone: None,
            nodeport_ips: ips,
            service_cidrs: &st.service_cidrs,
            masquerade_all: false,
        }
    }

    /// Lines of upstream's `TestOverallNFTablesRules` (svc1: ClusterIP, svc3: NodePort, svc6: no
    /// endpoints), which this generator must reproduce for the same Services.
    #[test]
    fn matches_upstream_overall_rules_test() {
        let mut st =
            ClusterState { service_cidrs: vec![Cidr::parse("172.30.0.0/16").expect("constant")], ..Default::default() };
        let svc1 = ServicePort::cluster_ip("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
        let svc3 = ServicePort::cluster_ip("ns3", "svc3", "p80", Protocol::Tcp, "172.30.0.43", 80).with_node_port(3003);
        let svc6 = ServicePort::cluster_ip("ns6", "svc6", "p80", Protocol::Tcp, "172.30.0.46", 80);
        let (n1, n3) = (svc1.name.clone(), svc3.name.clone());
        st.add_service(svc1).add_service(svc3).add_service(svc6);
        st.add_endpoint(&n1, Endpoint::ready("10.180.0.1", 80));
        st.add_endpoint(&n3, Endpoint::ready("10.180.0.3", 80));
        let ips: Vec<IpAddr> = vec!["192.168.0.2".parse().expect("constant")];
        let text = script(&upstream_for(&st, &ips), &st);
        for want in [
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }",
            "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
            "add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            "add element ip kube-proxy nodeport-ips { 192.168.0.2 }",
            "add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80",
            "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
            "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade",
            "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80",
            "add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80",
            "add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }",
            "add element ip kube-proxy cluster-ips { 172.30.0.46 }",
            "add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment \"ns6/svc6:p80\" : goto reject-chain }",
        ] {
            assert!(text.lines().any(|l| l == want), "missing: {want}\n--- got:\n{text}");
        }
        assert!(!text.contains("svc6/tcp/p80 "), "svc6 has no endpoints, so no chains");
    }

    /// `nft -c -f` of the bench cluster with the policy mix, and of the delta scripts against it,
    /// in a throwaway network namespace. Needs root and nft; skipped (with a note) otherwise.
    #[test]
    fn nft_accepts_the_scripts() {
        let root = std::fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
            .unwrap_or(false);
        let have = |c: &str, v: &str| Command::new(c).arg(v).output().is_ok_and(|o| o.status.success());
        if !root || !have("nft", "--version") || !have("ip", "-V") {
            eprintln!("skipped: needs root, nft and ip");
            return;
        }
        let st = rules::synthetic::cluster(60, 3, true);
        let c = crate::cfg();
        let ips = crate::node_ips();
        let u = crate::upstream_cfg(&st, &c, &ips);
        let ns = format!("kpxb-{}-t", std::process::id());
        assert!(Command::new("ip").args(["netns", "add", &ns]).status().expect("ip").success());
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let _del = Del(ns.clone());
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let nft = |args: &[&str], text: &str, what: &str| {
            let f = dir.join(format!("{what}.nft"));
            std::fs::write(&f, text).expect("write");
            let out = Command::new("ip").args(["netns", "exec", &ns, "nft"]).args(args).arg(&f).output().expect("nft");
            assert!(out.status.success(), "nft {args:?} {what}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let full = script(&u, &st);
        nft(&["-c", "-f"], &full, "full");
        nft(&["-f"], &full, "full");
        let st2 = crate::plus_one(&st, true);
        let port = crate::changed_port(&st, &st2);
        nft(&["-f"], &endpoint_change_script(&u, &st, &st2, &port), "delta");
        nft(&["-f"], &endpoint_change_script(&u, &st2, &st, &port), "undelta");
        let (st3, name) = crate::plus_service(&st, 3);
        nft(&["-f"], &service_port_script(&u, &st3, &name), "svc-add");
        nft(&["-f"], &delete_service_port_script(&u, &st3, &name), "svc-del");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
