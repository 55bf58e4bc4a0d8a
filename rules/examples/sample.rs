use rules::model::*;
fn main() {
    let mut st = ClusterState::default();
    let a = ServicePort::cluster_ip("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80)
        .with_node_port(3001)
        .with_load_balancer_ip("1.2.3.4");
    st.add_service(a.clone());
    st.add_endpoint(&a.name, Endpoint::ready("10.180.0.1", 80));
    st.add_endpoint(&a.name, Endpoint::ready("10.180.0.2", 80));
    let b = ServicePort::cluster_ip("ns1", "svc2", "", Protocol::Udp, "172.30.0.42", 53);
    st.add_service(b);
    let mut cfg = BuildConfig::new(Family::V4);
    cfg.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").unwrap());
    let built = rules::build(&st, &["192.168.0.2".parse().unwrap()], &cfg, None);
    print!("{}", rules::diff(None, &built.ruleset));
}
