//! Synthetic clusters for benchmarks (bench/ and rules/benches/): a realistic mix of ClusterIP
//! services, every 10th a NodePort, every 50th with an LB IP, every 20th with a second port, and
//! with `policies` the traffic policies of issue 4 (eTP/iTP Local, ClientIP affinity, source
//! ranges, zone hints). Deterministic, so runs compare.

use crate::model::*;

/// A synthetic cluster: mostly ClusterIP, every 10th a NodePort, every 50th with an LB IP, every
/// 20th multi-port (a second port).
///
/// With `policies` (bench `--policies`), the traffic policies of issue 4 on top: every 10th service
/// (the NodePorts) eTP=Local with a health check node port, every 15th iTP=Local, every 25th
/// ClientIP affinity (10800 s), every 50th (the LB ones) loadBalancerSourceRanges, and every 7th
/// (from the 3rd) zone hints on all its endpoints, alternating zone-a (the zone of the benches' node,
/// "node-x") and zone-b. Endpoints are on this node ("node-x"), so the local policies have endpoints.
pub fn cluster(services: usize, endpoints: usize, policies: bool) -> ClusterState {
    // The API's default ServiceCIDR (kube.rs serves the same one): both layouts drop traffic to
    // unallocated addresses in it.
    let mut st =
        ClusterState { service_cidrs: vec![Cidr::parse("172.16.0.0/12").expect("constant")], ..Default::default() };
    for i in 0..services {
        let cip = format!("172.{}.{}.{}", 16 + (i >> 16), (i >> 8) & 255, i & 255);
        let mut ports = vec![("http", 80u16)];
        if i % 20 == 0 {
            ports.push(("https", 443));
        }
        for (pn, port) in ports {
            let mut sp = ServicePort::cluster_ip("bench", &format!("svc-{i}"), pn, Protocol::Tcp, &cip, port);
            if i % 10 == 0 {
                sp = sp.with_node_port(30000 + (i / 10) as u16 * 2 + (port == 443) as u16);
            }
            if i % 50 == 0 {
                sp = sp.with_load_balancer_ip(&format!("198.51.{}.{}", (i >> 8) & 255, i & 255));
            }
            if policies {
                if i % 10 == 0 {
                    sp = sp.with_external_traffic_policy_local().with_health_check_node_port(40000 + (i / 10) as u16);
                }
                if i % 15 == 0 {
                    sp = sp.with_internal_traffic_policy_local();
                }
                if i % 25 == 0 {
                    sp = sp.with_session_affinity(10800);
                }
                if i % 50 == 0 {
                    sp = sp.with_source_range("203.0.113.0/24").with_source_range("192.168.0.0/16");
                }
            }
            let name = sp.name.clone();
            st.add_service(sp);
            for e in 0..endpoints {
                let n = i * endpoints + e;
                let ip = format!("10.{}.{}.{}", 64 + (n >> 16), (n >> 8) & 255, n & 255);
                let mut ep = Endpoint::ready(&ip, 8080).on_node("node-x");
                if policies && i % 7 == 3 {
                    ep = ep.with_zone_hints(&[if e % 2 == 0 { "zone-a" } else { "zone-b" }]);
                }
                st.add_endpoint(&name, ep);
            }
        }
    }
    st
}
