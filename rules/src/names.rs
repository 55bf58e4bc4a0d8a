//! Upstream kube-proxy's chain and set names (nftables mode), hashed exactly as upstream does so
//! that operators and tools see the names they know.

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::model::ServicePortName;

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
pub const NO_ENDPOINT_SERVICES_SET: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS_SET: &str = "no-endpoint-nodeports";
/// kproxy's own: service IPs whose Local traffic policy finds no endpoint on this node while other
/// nodes have some (upstream puts these in `no-endpoint-services` with a `drop` verdict).
pub const NO_LOCAL_ENDPOINT_SERVICES_SET: &str = "no-local-endpoint-services";
/// kproxy's own: the same for node ports (externalTrafficPolicy: Local).
pub const NO_LOCAL_ENDPOINT_NODEPORTS_SET: &str = "no-local-endpoint-nodeports";
/// kproxy's own: the service CIDRs from ServiceCIDR objects; `cluster-ips-check` drops traffic to
/// addresses inside them that no Service holds (upstream writes them into that rule inline).
pub const SERVICE_CIDRS_SET: &str = "service-cidrs";
/// `LB IP . proto . port` of every service port with loadBalancerSourceRanges (upstream's name; a
/// plain set here, since the allowed sources are data too).
pub const FIREWALL_IPS_SET: &str = "firewall-ips";
/// kproxy's own: `LB IP . proto . port . source range` that may reach a firewalled LB IP.
pub const FIREWALL_ALLOW_SET: &str = "firewall-allow";
/// kproxy's own: endpoint slots, `slot : addr . port`, looked up by the DNAT rules (name prefix of
/// the per-shard maps).
pub const SERVICE_ENDPOINTS_MAP: &str = "service-endpoints";
/// The endpoint map of one shard of service ports: `service-endpoints-<shard>`.
pub fn service_endpoints_map(shard: u32) -> String {
    format!("{SERVICE_ENDPOINTS_MAP}-{shard}")
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
    hash_and_truncate(&format!("{}/{}/{}/{}", spn.namespace, spn.name, spn.protocol.lower(), spn.port_name))
}

/// `service-HASH-ns/svc/proto/portName`: the chain that picks an endpoint.
pub fn service_chain(spn: &ServicePortName) -> String {
    format!("service-{}", service_port_chain_base(spn))
}

/// `local-HASH-ns/svc/proto/portName`: the chain that picks one of this node's endpoints.
pub fn local_chain(spn: &ServicePortName) -> String {
    format!("local-{}", service_port_chain_base(spn))
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
    fn long_names_are_truncated() {
        let long = "x".repeat(300);
        let n = ServicePortName::new("ns", &long, "p", Protocol::Tcp);
        let b = service_port_chain_base(&n);
        assert_eq!(b.len(), 240);
        assert!(b.ends_with("..."));
    }
}
