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
    s4.service_mut(&b.name).unwrap().node_port = 30054;
    s4.service_mut(&b.name).unwrap().load_balancer_ips.push("1.2.3.4".parse().unwrap());
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

/// A small deterministic generator (no dependency needed for this).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A random cluster drawn from a fixed pool of Services: any subset of them, each with random
/// endpoints (shared pod IPs across Services, so hairpin elements are shared), policies,
/// affinity, node ports, LB IPs and source ranges, and two-port Services sharing a ClusterIP.
fn random_state(rng: &mut Lcg) -> ClusterState {
    let mut s = ClusterState::default();
    for i in 0..8u16 {
        if rng.next(4) == 0 {
            continue;
        }
        let name = format!("s{i}");
        let ports: &[(&str, u16)] = if i % 3 == 0 { &[("http", 80), ("https", 443)] } else { &[("p", 80)] };
        for (pi, (pname, port)) in ports.iter().enumerate() {
            let mut sp =
                ServicePort::cluster_ip("ns", &name, pname, Protocol::Tcp, &format!("172.30.0.{}", i + 1), *port);
            match rng.next(6) {
                0 => sp = sp.with_node_port(30000 + i * 10 + pi as u16),
                1 => {
                    sp = sp
                        .with_node_port(30000 + i * 10 + pi as u16)
                        .with_load_balancer_ip(&format!("5.5.5.{}", i + 1))
                        .with_external_traffic_policy_local()
                        .with_health_check_node_port(31000 + i)
                }
                2 => sp = sp.with_session_affinity(10 + rng.next(2) as u32),
                3 => sp = sp.with_internal_traffic_policy_local(),
                4 => {
                    sp = sp
                        .with_load_balancer_ip(&format!("5.5.6.{}", i + 1))
                        .with_source_range(["1.2.3.0/24", "10.0.0.0/8"][rng.next(2) as usize])
                }
                _ => {}
            }
            s.add_service(sp.clone());
            for _ in 0..rng.next(4) {
                let ip = format!("10.0.0.{}", 1 + rng.next(5));
                let mut ep = Endpoint::ready(&ip, 8080).on_node(["test-node", "other"][rng.next(2) as usize]);
                if rng.next(5) == 0 {
                    ep = ep.serving_terminating();
                }
                s.add_endpoint(&sp.name, ep);
            }
        }
    }
    s
}

/// A ruleset without its creation order, for comparing a partially updated one with a fresh build.
fn unordered(r: &rules::ir::Ruleset) -> rules::ir::Ruleset {
    rules::ir::Ruleset { set_order: Vec::new(), chain_order: Vec::new(), ..r.clone() }
}

#[test]
fn partial_builds_reach_the_same_table_as_full_builds() {
    walk_partial_builds(false);
}

/// The same walk with the applied ruleset's bulk elements stripped, as the daemon keeps it.
#[test]
fn partial_builds_on_a_stripped_ruleset_reach_the_same_table() {
    walk_partial_builds(true);
}

fn walk_partial_builds(strip: bool) {
    let mut cfg = BuildConfig::new(Family::V4);
    cfg.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").unwrap());
    cfg.node_name = "test-node".into();
    let node_ips = ["192.168.0.2".parse().unwrap()];
    let mut rng = Lcg(7);
    let mut prev = random_state(&mut rng);
    let mut applied = build(&prev, &node_ips, &cfg, None).ruleset;
    let mut kernel = FakeKernel::new();
    kernel.apply(&diff(None, &applied)).unwrap();
    if strip {
        applied.strip_bulk();
    }
    let mut nonempty = 0;
    for step in 0..400 {
        // Mostly small changes (one or two Services), sometimes a big jump.
        let next = if step % 10 == 9 {
            random_state(&mut rng)
        } else {
            let mut n = prev.clone();
            let other = random_state(&mut rng);
            let pick = format!("s{}", rng.next(8));
            n.services.retain(|k, _| k.name() != pick);
            n.endpoints.retain(|k, _| k.name() != pick);
            for (k, sp) in other.services.iter().filter(|(k, _)| k.name() == pick) {
                n.add_service(ServicePort::clone(sp));
                if let Some(eps) = other.endpoints.get(k) {
                    n.endpoints.insert(k.clone(), eps.clone());
                }
            }
            n
        };
        let keys = ClusterState::changed_services(&prev, &next);
        let (old, new) = (prev.restrict(&keys), next.restrict(&keys));
        let p = rules::build::build_partial(&applied, &old, &new, &node_ips, &cfg).expect("no conflicts here");
        nonempty += usize::from(!p.tx.is_empty());
        kernel.apply(&p.tx).unwrap_or_else(|e| panic!("step {step}: kernel refused {e:?}\n{}", p.tx));
        applied.commit_partial(&p);

        let full = build(&next, &node_ips, &cfg, Some(&applied)).ruleset;
        let mut expect = full.clone();
        if strip {
            expect.strip_bulk();
            assert_eq!(applied.element_count(), full.element_count(), "step {step}: counts of stripped sets");
        } else {
            assert!(diff(Some(&applied), &full).is_empty(), "step {step}");
        }
        assert_eq!(unordered(&applied), unordered(&expect), "step {step}: partial != full\n{}", p.tx);
        if step % 50 == 0 {
            // A full diff from what the daemon keeps converges too (stripped sets are flushed).
            let mut k = kernel.clone();
            k.apply(&diff(Some(&applied), &full)).unwrap_or_else(|e| panic!("step {step}: full diff: {e:?}"));
            let mut fresh = FakeKernel::new();
            fresh.apply(&diff(None, &full)).unwrap();
            assert_eq!(k.dump(Family::V4), fresh.dump(Family::V4), "step {step}: full diff");
        }
        let mut fresh = FakeKernel::new();
        fresh.apply(&diff(None, &full)).unwrap();
        assert_eq!(kernel.dump(Family::V4), fresh.dump(Family::V4), "step {step}\n{}", p.tx);
        if keys.is_empty() {
            assert!(p.tx.is_empty(), "step {step}: no change must give no transaction");
        }
        prev = next;
    }
    assert!(nonempty > 300, "the generator must change something most of the time: {nonempty}");
}

#[test]
fn partial_build_refuses_what_only_a_full_build_can_decide() {
    let cfg = BuildConfig::new(Family::V4);
    let a = svc("a", "172.30.0.1", 80);
    let mut st = ClusterState::default();
    st.add_service(a.clone());
    let applied = build(&st, &[], &cfg, None).ruleset;
    // Another Service taking a's ClusterIP and port: who wins depends on both.
    let mut new = ClusterState::default();
    new.add_service(svc("b", "172.30.0.1", 80));
    assert!(rules::build::build_partial(&applied, &ClusterState::default(), &new, &[], &cfg).is_none());
    // The same change of a alone is fine, and other node IPs are not.
    let mut a2 = ClusterState::default();
    a2.add_service(a.clone()).add_endpoint(&a.name, Endpoint::ready("10.0.0.1", 80));
    assert!(rules::build::build_partial(&applied, &st, &a2, &[], &cfg).is_some());
    let ip = ["192.168.0.9".parse().unwrap()];
    assert!(rules::build::build_partial(&applied, &st, &a2, &ip, &cfg).is_none());
}
