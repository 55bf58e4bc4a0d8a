//! Criterion micro-benchmarks of the pure pipeline: `rules::build` (model → ruleset),
//! `rules::diff` (cold start and one endpoint change) and the nft text render (`Display` of a
//! `Transaction`, the dry-run form). CI only compiles them (`cargo bench -p rules --no-run` in
//! `make test`); run them with `cargo bench -p rules` (bench/README.md).
//!
//! The cluster is `rules::synthetic::cluster` without policies, as bench/ uses it.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rules::model::*;

fn cluster(services: usize, endpoints: usize) -> ClusterState {
    rules::synthetic::cluster(services, endpoints, false)
}

fn cfg() -> BuildConfig {
    let mut c = BuildConfig::new(Family::V4);
    c.cluster_cidr = Some(Cidr::parse("10.0.0.0/8").expect("constant"));
    c.node_name = "node-x".into();
    c
}

fn node_ips() -> Vec<IpAddr> {
    vec!["192.168.0.2".parse().expect("constant")]
}

/// The cluster with one more endpoint on its first service port.
fn plus_one(st: &ClusterState) -> ClusterState {
    let mut s = st.clone();
    let name = s.services.keys().next().expect("a service").clone();
    s.add_endpoint(&name, Endpoint::ready("10.250.0.1", 8080).on_node("node-x"));
    s
}

fn benches(c: &mut Criterion) {
    let ips = node_ips();
    let cfg = cfg();
    // 1k keeps a CI-sized run short; 10k is the size the targets are stated at.
    for services in [1_000usize, 10_000] {
        let st = cluster(services, 10);
        let built = rules::build(&st, &ips, &cfg, None).ruleset;
        let st2 = plus_one(&st);
        let built2 = rules::build(&st2, &ips, &cfg, Some(&built)).ruleset;
        let cold = rules::diff(None, &built);

        let mut g = c.benchmark_group(format!("{services}x10"));
        g.sample_size(10);
        g.bench_function(BenchmarkId::new("build", "cold"), |b| {
            b.iter(|| rules::build(black_box(&st), &ips, &cfg, None))
        });
        g.bench_function(BenchmarkId::new("build", "one endpoint more"), |b| {
            b.iter(|| rules::build(black_box(&st2), &ips, &cfg, Some(&built)))
        });
        g.bench_function(BenchmarkId::new("diff", "cold start"), |b| b.iter(|| rules::diff(None, black_box(&built))));
        g.bench_function(BenchmarkId::new("diff", "one endpoint"), |b| {
            b.iter(|| rules::diff(Some(black_box(&built)), black_box(&built2)))
        });
        g.bench_function(BenchmarkId::new("render", "cold start text"), |b| b.iter(|| black_box(&cold).to_string()));
        g.finish();
    }
}

criterion_group!(rules_benches, benches);
criterion_main!(rules_benches);
