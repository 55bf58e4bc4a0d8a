//! Which UDP conntrack flows are stale, as upstream's `conntrack.CleanStaleEntries` decides it.
//!
//! UDP has no connection to end: a client that keeps sending from one source port keeps its
//! conntrack entry, and with it the DNAT to an endpoint that may be gone, or the missing DNAT of
//! a time the service had no endpoint. After each sync the daemon lists the UDP flows of a family
//! and deletes those this says are stale; the next datagram is then NATed afresh. TCP and SCTP
//! flows are never touched (case 106): their endpoints reset them.
//!
//! Pure: the flows come in as values; listing and deleting them is `src/backend/conntrack.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{ClusterState, Family, Protocol};

/// The parts of a UDP conntrack entry the decision reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFlow {
    /// Original direction destination: a service IP, or a node IP for a node port.
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    /// Reply direction source: the endpoint the flow was DNATed to, or `orig_dst` when it was
    /// not DNATed.
    pub reply_src: IpAddr,
}

/// The serving endpoint IPs behind every UDP frontend of one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaleUdpFlows {
    /// `service IP . port` (ClusterIP, LoadBalancer and external IPs) → serving endpoint IPs.
    frontends: BTreeMap<(IpAddr, u16), BTreeSet<IpAddr>>,
    /// Node port → serving endpoint IPs (any destination address: upstream matches `*:NodePort`).
    node_ports: BTreeMap<u16, BTreeSet<IpAddr>>,
}

impl StaleUdpFlows {
    /// The UDP frontends of `state` in `family` that have at least one serving endpoint. Serving
    /// is all that counts (ready or terminating alike, case 105); traffic policies and topology
    /// do not, so that a policy change never breaks a UDP flow a TCP one would keep. A service
    /// without serving endpoints has nothing to clean: its flows can go nowhere better.
    pub fn from_state(state: &ClusterState, family: Family) -> Self {
        let mut out = StaleUdpFlows::default();
        for (name, sp) in &state.services {
            if name.protocol() != Protocol::Udp || sp.family() != family {
                continue;
            }
            let serving: BTreeSet<IpAddr> = state
                .endpoints
                .get(name)
                .into_iter()
                .flatten()
                .filter(|e| e.serving && e.port != 0 && Family::of(&e.ip) == family)
                .map(|e| e.ip)
                .collect();
            if serving.is_empty() {
                continue;
            }
            let ips = std::iter::once(&sp.cluster_ip).chain(&sp.load_balancer_ips).chain(&sp.external_ips);
            for ip in ips.filter(|ip| Family::of(ip) == family) {
                out.frontends.entry((*ip, sp.port)).or_default().extend(serving.iter().copied());
            }
            if sp.node_port != 0 {
                out.node_ports.entry(sp.node_port).or_default().extend(serving.iter().copied());
            }
        }
        out
    }

    /// Whether nothing can be stale (no UDP frontend with endpoints): the caller may skip
    /// listing the flows at all.
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.node_ports.is_empty()
    }

    /// A flow to a UDP frontend (or node port) whose reply does not come from one of its serving
    /// endpoints: DNATed to an endpoint that is gone or no longer serving (cases 102, 104, 105),
    /// or not DNATed at all, from before the service had endpoints (case 103).
    pub fn is_stale(&self, f: &UdpFlow) -> bool {
        let stale_for = |eps: Option<&BTreeSet<IpAddr>>| eps.is_some_and(|eps| !eps.contains(&f.reply_src));
        stale_for(self.frontends.get(&(f.orig_dst, f.orig_dport))) || stale_for(self.node_ports.get(&f.orig_dport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServicePort};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn flow(dst: &str, port: u16, reply: &str) -> UdpFlow {
        UdpFlow { orig_dst: ip(dst), orig_dport: port, reply_src: ip(reply) }
    }

    /// After upstream's cleanup_test: a UDP service with ClusterIP, LB IP, external IP and node
    /// port; endpoint 10.0.0.1 serving, 10.0.0.2 terminating but serving, 10.0.0.3 not serving.
    #[test]
    fn stale_flows_follow_upstream_clean_stale_entries() {
        let udp = ServicePort::cluster_ip("ns", "dns", "", Protocol::Udp, "172.30.0.10", 53)
            .with_node_port(30053)
            .with_load_balancer_ip("1.2.3.4")
            .with_external_ip("192.168.99.10");
        let tcp = ServicePort::cluster_ip("ns", "web", "", Protocol::Tcp, "172.30.0.11", 80).with_node_port(30080);
        let empty = ServicePort::cluster_ip("ns", "none", "", Protocol::Udp, "172.30.0.12", 53);
        let mut st = ClusterState::default();
        st.add_service(udp.clone()).add_service(tcp.clone()).add_service(empty);
        st.add_endpoint(&udp.name, Endpoint::ready("10.0.0.1", 5353));
        st.add_endpoint(&udp.name, Endpoint::ready("10.0.0.2", 5353).serving_terminating());
        st.add_endpoint(&udp.name, Endpoint::ready("10.0.0.3", 5353).not_ready());
        st.add_endpoint(&tcp.name, Endpoint::ready("10.0.0.9", 80));
        let s = StaleUdpFlows::from_state(&st, Family::V4);
        let cases = [
            // To a serving endpoint (ready or terminating): kept.
            (flow("172.30.0.10", 53, "10.0.0.1"), false),
            (flow("1.2.3.4", 53, "10.0.0.2"), false),
            (flow("192.168.0.2", 30053, "10.0.0.1"), false),
            // To a removed or non-serving endpoint, by any frontend: deleted (102, 104, 105).
            (flow("172.30.0.10", 53, "10.0.0.3"), true),
            (flow("172.30.0.10", 53, "10.0.0.7"), true),
            (flow("192.168.99.10", 53, "10.0.0.7"), true),
            (flow("1.2.3.4", 53, "10.0.0.7"), true),
            (flow("192.168.0.2", 30053, "10.0.0.7"), true),
            (flow("10.1.1.1", 30053, "10.0.0.7"), true),
            // Not DNATed (from when the service had no endpoint): deleted (103).
            (flow("172.30.0.10", 53, "172.30.0.10"), true),
            // Another port of the same IP, another service, a TCP-only or endpoint-less one: kept.
            (flow("172.30.0.10", 54, "10.0.0.7"), false),
            (flow("172.30.0.11", 80, "10.0.0.7"), false),
            (flow("192.168.0.2", 30080, "10.0.0.7"), false),
            (flow("172.30.0.12", 53, "172.30.0.12"), false),
        ];
        for (f, want) in cases {
            assert_eq!(s.is_stale(&f), want, "{f:?}");
        }
        assert!(StaleUdpFlows::from_state(&st, Family::V6).is_empty());
    }
}
