//! Prints the full transaction of a synthetic cluster: `scale SERVICES ENDPOINTS` (for quick
//! `nft -f` experiments; the real benchmark is bench/).
use rules::model::*;
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("number")).collect();
    let (n, m) = (a.first().copied().unwrap_or(1000), a.get(1).copied().unwrap_or(10));
    let mut st = ClusterState::default();
    for i in 0..n {
        let cip = format!("172.{}.{}.{}", 16 + (i >> 16), (i >> 8) & 255, i & 255);
        let sp = ServicePort::cluster_ip("bench", &format!("svc-{i}"), "http", Protocol::Tcp, &cip, 80);
        let name = sp.name.clone();
        st.add_service(sp);
        for e in 0..m {
            let k = i * m + e;
            st.add_endpoint(
                &name,
                Endpoint::ready(&format!("10.{}.{}.{}", 64 + (k >> 16), (k >> 8) & 255, k & 255), 8080),
            );
        }
    }
    let mut cfg = BuildConfig::new(Family::V4);
    cfg.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").unwrap());
    print!("{}", rules::diff(None, &rules::build(&st, &[], &cfg, None).ruleset));
}
