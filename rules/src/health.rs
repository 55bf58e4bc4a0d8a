//! What the per-service health check servers (`spec.healthCheckNodePort`) report: which
//! Services need one, on which port, and how many ready endpoints they have on this node.
//!
//! Pure, for the HTTP side (`src/http/`), which opens and closes the listeners (cases 76-81).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::ClusterState;

/// One Service's health check: its node port and its local ready endpoint count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    /// Ready endpoints on this node, counted once per IP over all ports of the Service
    /// (upstream `LocalReadyEndpoints`, case 79). Serving-but-terminating ones do not count
    /// (case 77), although traffic still goes to them.
    pub local_endpoints: usize,
}

/// Every Service (namespace, name) of `states` with a health check node port; `states` are the
/// per-family states (a dual-stack Service counts its endpoints of both families, as upstream's
/// proxiers share one health server).
pub fn health_checks(states: &[&ClusterState], node_name: &str) -> BTreeMap<(String, String), HealthCheck> {
    let mut ports: BTreeMap<(String, String), u16> = BTreeMap::new();
    let mut local: BTreeMap<(String, String), BTreeSet<IpAddr>> = BTreeMap::new();
    for st in states {
        // Only the ports of Services with a health check node port are looked at (every port of
        // such a Service has it): a state's endpoints belong to its own ports, and walking every
        // endpoint of the cluster after each sync took 23 ms at 50k Services x 5 endpoints.
        for (name, sp) in st.services.iter().filter(|(_, sp)| sp.health_check_node_port != 0) {
            let key = (name.namespace().to_string(), name.name().to_string());
            let eps = st.endpoints.get(name).map_or(&[][..], Vec::as_slice);
            let ips = local.entry(key.clone()).or_default();
            ips.extend(eps.iter().filter(|e| e.ready && e.is_local_to(node_name)).map(|e| e.ip));
            ports.insert(key, sp.health_check_node_port);
        }
    }
    ports
        .into_iter()
        .map(|(k, node_port)| {
            let local_endpoints = local.get(&k).map_or(0, BTreeSet::len);
            (k, HealthCheck { node_port, local_endpoints })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol, ServicePort};

    #[test]
    fn local_ready_endpoints_are_counted_once_per_ip() {
        let http = ServicePort::cluster_ip("ns", "lb", "http", Protocol::Tcp, "172.30.0.1", 80)
            .with_node_port(30080)
            .with_external_traffic_policy_local()
            .with_health_check_node_port(30000);
        let https = ServicePort::cluster_ip("ns", "lb", "https", Protocol::Tcp, "172.30.0.1", 443)
            .with_node_port(30443)
            .with_external_traffic_policy_local()
            .with_health_check_node_port(30000);
        let plain = ServicePort::cluster_ip("ns", "plain", "", Protocol::Tcp, "172.30.0.2", 80);
        let mut st = ClusterState::default();
        st.add_service(http.clone()).add_service(https.clone()).add_service(plain.clone());
        // Case 79: 10.0.0.5 serves both ports: one endpoint.
        for sp in [&http, &https] {
            st.add_endpoint(&sp.name, Endpoint::ready("10.0.0.5", 8080).on_node("n"));
        }
        st.add_endpoint(&http.name, Endpoint::ready("10.0.0.6", 8080).on_node("other"));
        // Case 77: serving but terminating does not count.
        st.add_endpoint(&http.name, Endpoint::ready("10.0.0.7", 8080).on_node("n").serving_terminating());
        st.add_endpoint(&plain.name, Endpoint::ready("10.0.0.8", 80).on_node("n"));
        let hc = health_checks(&[&st], "n");
        assert_eq!(hc.len(), 1, "only Services with a health check node port");
        assert_eq!(hc[&("ns".to_string(), "lb".to_string())], HealthCheck { node_port: 30000, local_endpoints: 1 });
        let mut none = st.clone();
        none.endpoints.clear();
        assert_eq!(health_checks(&[&none], "n")[&("ns".to_string(), "lb".to_string())].local_endpoints, 0);
        // A dual-stack Service counts its local endpoints of both families.
        let http6 = ServicePort::cluster_ip("ns", "lb", "http", Protocol::Tcp, "fd00::1", 80)
            .with_node_port(30080)
            .with_external_traffic_policy_local()
            .with_health_check_node_port(30000);
        let mut v6 = ClusterState::default();
        v6.add_service(http6.clone());
        v6.add_endpoint(&http6.name, Endpoint::ready("fd00::5", 8080).on_node("n"));
        v6.add_endpoint(&http6.name, Endpoint::ready("fd00::6", 8080).on_node("other"));
        let both = health_checks(&[&st, &v6], "n");
        assert_eq!(both[&("ns".to_string(), "lb".to_string())], HealthCheck { node_port: 30000, local_endpoints: 2 });
    }
}
