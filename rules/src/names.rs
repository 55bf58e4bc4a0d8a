//! Upstream kube-proxy's chain and set names (nftables mode), hashed exactly as upstream does so
//! that operators and tools see the names they know.

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use std::net::IpAddr;

use crate::model::{Protocol, ServicePortName};

// Fixed chain and set names of the layout, as constants (upstream vocabulary).
pub const SERVICES: &str = "services";
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
pub const MASQUERADING: &str = "masquerading";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const REJECT_CHAIN: &str = "reject-chain";
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
pub const FIREWALL_CHECK: &str = "firewall-check";

pub const CLUSTER_IPS_SET: &str = "cluster-ips";
pub const NODEPORT_IPS_SET: &str = "nodeport-ips";
pub const SERVICE_IPS_MAP: &str = "service-ips";
pub const SERVICE_NODEPORTS_MAP: &str = "service-nodeports";
/// kproxy's own: `IP . proto . port` of service ports without usable endpoints, rejected in the
/// filter chains. Upstream's `no-endpoint-services` is a verdict map; a set under that name would
/// make upstream kube-proxy's `add map` fail after a rollback, so kproxy's sets have names of
/// their own.
pub const NO_ENDPOINT_SERVICES_SET: &str = "services-without-endpoints";
/// kproxy's own: `proto . port` of node ports without usable endpoints (see above).
pub const NO_ENDPOINT_NODEPORTS_SET: &str = "nodeports-without-endpoints";
/// kproxy's own: service IPs whose Local traffic policy finds no endpoint on this node while other
/// nodes have some (upstream puts these in its `no-endpoint-services` map with a `drop` verdict).
pub const NO_LOCAL_ENDPOINT_SERVICES_SET: &str = "no-local-endpoint-services";
/// kproxy's own: the same for node ports (externalTrafficPolicy: Local).
pub const NO_LOCAL_ENDPOINT_NODEPORTS_SET: &str = "no-local-endpoint-nodeports";
/// kproxy's own: the service CIDRs from ServiceCIDR objects; `cluster-ips-check` drops traffic to
/// addresses inside them that no Service holds (upstream writes them into that rule inline).
pub const SERVICE_CIDRS_SET: &str = "service-cidrs";
/// kproxy's own: `LB IP . proto . port` of every service port with loadBalancerSourceRanges (a
/// plain set, not upstream's `firewall-ips` verdict map, so it has a name of its own).
pub const FIREWALL_IPS_SET: &str = "firewalled-services";
/// kproxy's own: `LB IP . proto . port . source range` that may reach a firewalled LB IP.
pub const FIREWALL_ALLOW_SET: &str = "firewall-allow";
/// kproxy's own: endpoint slots, `slot : addr . port`, looked up by the DNAT rules (name prefix of
/// the per-shard maps).
pub const SERVICE_ENDPOINTS_MAP: &str = "service-endpoints";
/// The endpoint map of one protocol's ports in one shard of slot blocks:
/// `service-endpoints-<proto>-<shard>`.
pub fn service_endpoints_map(proto: Protocol, shard: u32) -> String {
    format!("{SERVICE_ENDPOINTS_MAP}-{}-{shard}", proto.lower())
}
/// kproxy's own: `endpoint . endpoint` pairs, so hairpin traffic is masqueraded in postrouting.
pub const HAIRPIN_SET: &str = "hairpin-endpoints";

/// First 8 characters of base32(sha256(s)), upstream's `hashAndTruncate` prefix, then `-s`,
/// cut to 240 characters as upstream does.
fn hash_and_truncate(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let enc = BASE32.encode(&digest);
    let name = format!("{}-{}", &enc[..8], s);
    if name.len() > 240 {
        // Cut on a char boundary (names are ASCII after validation; be safe anyway).
        let mut cut = 237;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &name[..cut])
    } else {
        name
    }
}

/// `HASH-ns/svc/proto/portName`: the base of a service port's chain names.
pub fn service_port_chain_base(spn: &ServicePortName) -> String {
    hash_and_truncate(&format!("{}/{}/{}/{}", spn.namespace(), spn.name(), spn.protocol().lower(), spn.port_name()))
}

/// `service-HASH-ns/svc/proto/portName`: the chain that picks an endpoint.
pub fn service_chain(spn: &ServicePortName) -> String {
    format!("service-{}", service_port_chain_base(spn))
}

/// `local-HASH-ns/svc/proto/portName`: the chain that picks one of this node's endpoints.
pub fn local_chain(spn: &ServicePortName) -> String {
    format!("local-{}", service_port_chain_base(spn))
}

/// `HASH-ns/svc/proto/portName__IP/port` (`:` in IPv6 addresses becomes `.`): the base of an
/// endpoint's chain and affinity set names, hashed over the whole string, as upstream.
pub fn endpoint_chain_base(spn: &ServicePortName, ip: &IpAddr, port: u16) -> String {
    // Rust prints IPv6 as Go's net.IP.String() does (RFC 5952: no `::` for a single zero field).
    endpoint_base_of(spn, &ip.to_string(), port)
}

fn endpoint_base_of(spn: &ServicePortName, ip: &str, port: u16) -> String {
    let ip = ip.replace(':', ".");
    hash_and_truncate(&format!(
        "{}/{}/{}/{}__{ip}/{port}",
        spn.namespace(),
        spn.name(),
        spn.protocol().lower(),
        spn.port_name()
    ))
}

/// `endpoint-HASH-…__IP/port`: remembers the client (ClientIP affinity) and DNATs to one endpoint.
pub fn endpoint_chain(spn: &ServicePortName, ip: &IpAddr, port: u16) -> String {
    format!("endpoint-{}", endpoint_chain_base(spn, ip, port))
}

/// `affinity-HASH-…__IP/port`: the clients that stick to one endpoint of a ClientIP service port.
pub fn affinity_set(spn: &ServicePortName, ip: &IpAddr, port: u16) -> String {
    format!("affinity-{}", endpoint_chain_base(spn, ip, port))
}

/// `external-HASH-ns/svc/proto/portName`: the chain for NodePort, LB and external IP traffic.
pub fn external_chain(spn: &ServicePortName) -> String {
    format!("external-{}", service_port_chain_base(spn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn upstream_test_vectors() {
        let n = ServicePortName::new("testing", "service", "http", Protocol::Tcp);
        assert!(service_port_chain_base(&n).starts_with("P4ZYZVCF-"), "{}", service_port_chain_base(&n));
        let n = ServicePortName::new("testing", "service", "https", Protocol::Tcp);
        assert!(service_port_chain_base(&n).starts_with("LZBRENCP-"));
        let n = ServicePortName::new("ns1", "svc1", "p80", Protocol::Tcp);
        assert_eq!(service_chain(&n), "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(external_chain(&n), "external-ULMVA6XW-ns1/svc1/tcp/p80");
    }

    #[test]
    fn endpoint_test_vectors() {
        let n = ServicePortName::new("testing", "service", "http", Protocol::Tcp);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(endpoint_chain_base(&n, &ip("10.180.0.1"), 80).starts_with("JO2XBXZR-"));
        // Upstream's vector hashes the address text as written; a real address is printed first
        // (`12:0:a1b2`, as Go prints it).
        assert_eq!(
            endpoint_base_of(&n, "fd80:abcd:12::a1b2:c3d4:e5f6:9999", 80),
            "U7E2ET36-testing/service/tcp/http__fd80.abcd.12..a1b2.c3d4.e5f6.9999/80"
        );
        assert!(endpoint_chain_base(&n, &ip("fd80:abcd:12::a1b2:c3d4:e5f6:9999"), 80)
            .ends_with("12.0.a1b2.c3d4.e5f6.9999/80"));
        let n = ServicePortName::new("ns1", "svc1", "p80", Protocol::Tcp);
        assert_eq!(endpoint_chain(&n, &ip("10.180.0.1"), 80), "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80");
        assert_eq!(affinity_set(&n, &ip("10.180.0.1"), 80), "affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80");
    }

    #[test]
    fn long_names_are_truncated() {
        let long = "x".repeat(300);
        let n = ServicePortName::new("ns", &long, "p", Protocol::Tcp);
        let b = service_port_chain_base(&n);
        assert_eq!(b.len(), 240);
        assert!(b.ends_with("..."));
    }
}
