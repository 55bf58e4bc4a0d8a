//! Diff correctness against the fake kernel: for every pair of cluster states (A, B), applying
//! the full transaction of A and then diff(A, B) leaves exactly the table that the full
//! transaction of B creates; an unchanged state gives an empty transaction.

use rules::fake::FakeKernel;
use rules::model::*;
use rules::transaction::Op;
use rules::{build, diff};

fn svc(name: &str, ip: &str, port: u16) -> ServicePort {
    ServicePort::cluster_ip("ns", name, "p", Protocol::Tcp, ip, port)
}

/// A handful of states that differ in every way the diff must handle.
fn states() -> Vec<(&'static str, ClusterState)> {
    let a = svc("a", "172.30.0.1", 80);
    let b = svc("b", "172.30.0.2", 53).with_node_port(30053);
    let mut out = Vec::new();

    out.push(("empty", ClusterState::default()));

    let mut s = ClusterState::default();
    s.add_service(a.clone()).add_endpoint(&a.name, Endpoint::ready("10.0.0.1", 8080));
    out.push(("a-1ep", s.clone()));

    s.add_endpoint(&a.name, Endpoint::ready("10.0.0.2", 8080)).add_endpoint(&a.name, Endpoint::ready("10.0.0.3", 8080));
    out.push(("a-3ep", s.clone()));

    let mut s2 = s.clone();
    s2.add_service(b.clone()).add_endpoint(&b.name, Endpoint::ready("10.0.0.1", 53));
    out.push(("a-3ep-b-1ep", s2.clone()));

    let mut s3 = s2.clone();
    s3.endpoints.remove(&a.name);
    out.push(("a-0ep-b-1ep", s3));

    let mut s4 = s2.clone();
    s4.services.get_mut(&b.name).unwrap().node_port = 30054;
    s4.services.get_mut(&b.name).unwrap().load_balancer_ips.push("1.2.3.4".parse().unwrap());
    out.push(("b-nodeport-changed", s4));

    let mut s5 = ClusterState::default();
    s5.add_service(b.clone()).add_endpoint(&b.name, Endpoint::ready("10.0.0.9", 53));
    out.push(("only-b", s5));
    out
}

#[test]
fn diff_reaches_the_desired_table_from_any_state() {
    let mut cfg = BuildConfig::new(Family::V4);
    cfg.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").unwrap());
    let node_ips = ["192.168.0.2".parse().unwrap()];
    for (an, a) in states() {
        for (bn, b) in states() {
            let ra = build(&a, &node_ips, &cfg, None).ruleset;
            let rb = build(&b, &node_ips, &cfg, Some(&ra)).ruleset;

            let mut expect = FakeKernel::new();
            expect.apply(&diff(None, &rb)).unwrap_or_else(|e| panic!("full {bn}: {e:?}"));

            let mut k = FakeKernel::new();
            k.apply(&diff(None, &ra)).unwrap_or_else(|e| panic!("full {an}: {e:?}"));
            let tx = diff(Some(&ra), &rb);
            k.apply(&tx).unwrap_or_else(|e| panic!("{an} -> {bn}: {e:?}\n{tx}"));
            assert_eq!(k.dump(Family::V4), expect.dump(Family::V4), "{an} -> {bn}\n{tx}");
            if an == bn {
                assert!(tx.is_empty(), "{an} -> {an} must be empty, got\n{tx}");
            }
        }
    }
}

#[test]
fn endpoint_change_touches_only_data() {
    // The point of the layout: endpoint churn never adds rules, chains or verdict-map elements,
    // so the kernel does not re-validate the table.
    let cfg = BuildConfig::new(Family::V4);
    let st = states();
    let a = &st.iter().find(|(n, _)| *n == "a-1ep").unwrap().1;
    let b = &st.iter().find(|(n, _)| *n == "a-3ep").unwrap().1;
    let mut c = b.clone();
    c.endpoints.clear();
    let ra = build(a, &[], &cfg, None).ruleset;
    let rb = build(b, &[], &cfg, Some(&ra)).ruleset;
    let rc = build(&c, &[], &cfg, Some(&rb)).ruleset;
    for (x, y) in [(&ra, &rb), (&rb, &ra), (&rb, &rc), (&rc, &ra)] {
        let tx = diff(Some(x), y);
        assert!(!tx.is_empty());
        for op in &tx.ops {
            match op {
                Op::AddElements { set, .. } | Op::DeleteElements { set, .. } => {
                    assert!(
                        !["service-ips", "service-nodeports"].contains(&set.as_str()),
                        "verdict-map elements force re-validation: {op:?}"
                    );
                }
                other => panic!("endpoint change produced {other:?}"),
            }
        }
    }
}

#[test]
fn fake_refuses_dangling_references_atomically() {
    let cfg = BuildConfig::new(Family::V4);
    let (_, s) = &states()[1];
    let r = build(s, &[], &cfg, None).ruleset;
    let mut k = FakeKernel::new();
    k.apply(&diff(None, &r)).unwrap();
    let before = k.dump(Family::V4);
    let mut bad = rules::Transaction::new(Family::V4);
    bad.ops.push(Op::FlushChain("services".into()));
    bad.ops.push(Op::DeleteChain("reject-chain".into()));
    assert!(k.apply(&bad).is_err());
    assert_eq!(k.dump(Family::V4), before);
}
