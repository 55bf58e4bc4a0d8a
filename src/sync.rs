//! The sync loop: turns the tracked cluster model into per-family transactions and applies them,
//! rate limited, full after a failure, never giving up.
//!
//! `Proxier` is the synchronous core (build, diff, apply, remember what the kernel holds) and is
//! tested against the fake kernel; `run` is the async loop around it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use rules::ir::Ruleset;
use rules::model::{ClusterState, Family, NodeInfo};
use rules::transaction::TxStats;
use rules::Transaction;
use tracing::{debug, info, warn};

use crate::config::Config;

/// Where transactions go: the netlink backend in the daemon, a fake in tests.
pub trait Backend {
    fn apply(&mut self, tx: &Transaction) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// The fake kernel (one per family) as a backend, for tests of the loop.
#[derive(Default)]
pub struct FakeBackend {
    pub kernels: BTreeMap<Family, rules::fake::FakeKernel>,
    /// When set, the next apply fails (once).
    pub fail_next: bool,
    pub transactions: Vec<Transaction>,
}

impl Backend for FakeBackend {
    fn apply(&mut self, tx: &Transaction) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if std::mem::take(&mut self.fail_next) {
            return Err("injected failure".into());
        }
        self.kernels
            .entry(tx.family)
            .or_default()
            .apply(tx)
            .map_err(|e| format!("fake kernel refused op {}: {}", e.op_index, e.reason))?;
        self.transactions.push(tx.clone());
        Ok(())
    }
}

/// A family's sync failed; the kernel still holds its previous ruleset.
#[derive(Debug, thiserror::Error)]
#[error("applying the {family} ruleset: {source}")]
pub struct SyncError {
    pub family: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub full: bool,
    pub families: Vec<(Family, TxStats)>,
    pub build: Duration,
    pub diff: Duration,
    pub apply: Duration,
}

/// Everything one sync needs from the outside world, gathered by the caller.
pub struct Inputs<'a> {
    pub state: &'a dyn Fn(Family) -> ClusterState,
    pub node: &'a NodeInfo,
    pub local_ips: &'a [IpAddr],
}

/// The desired ruleset of one family, and the build warnings.
pub fn desired(cfg: &Config, family: Family, inputs: &Inputs<'_>, previous: Option<&Ruleset>) -> rules::Built {
    let np = cfg.nodeport.resolve(family, &inputs.node.primary_ips, inputs.local_ips);
    let node_ips: Vec<IpAddr> = match &np {
        rules::model::NodePortAddresses::Ips(ips) => ips.clone(),
        _ => Vec::new(),
    };
    let bc = cfg.build_config(family, np).with_node(inputs.node);
    rules::build(&(inputs.state)(family), &node_ips, &bc, previous)
}

/// The families kproxy programs: IPv4 always; IPv6 once anything IPv6 is configured or present.
pub fn families(cfg: &Config, inputs: &Inputs<'_>) -> Vec<Family> {
    let v6 = cfg.cluster_cidrs.iter().any(|c| c.family() == Family::V6)
        || inputs.node.primary_ips.iter().any(|ip| ip.is_ipv6())
        || !(inputs.state)(Family::V6).services.is_empty();
    if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// The synchronous core of the sync loop.
pub struct Proxier<B: Backend> {
    pub cfg: Config,
    pub backend: B,
    /// What the kernel holds per family; absent = unknown, so the next sync is full.
    applied: BTreeMap<Family, Ruleset>,
}

impl<B: Backend> Proxier<B> {
    pub fn new(cfg: Config, backend: B) -> Self {
        Proxier { cfg, backend, applied: BTreeMap::new() }
    }

    /// Forgets what the kernel holds, so the next sync is a full one.
    pub fn force_full(&mut self) {
        self.applied.clear();
    }

    /// Builds, diffs and applies every family. A family whose apply fails keeps its old ruleset
    /// in the kernel and is synced in full next time; the other families still sync.
    pub fn sync(&mut self, inputs: &Inputs<'_>) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        let mut first_err = None;
        let mut fams = families(&self.cfg, inputs);
        for f in self.applied.keys() {
            if !fams.contains(f) {
                fams.push(*f);
            }
        }
        for family in fams {
            let t0 = Instant::now();
            let previous = self.applied.get(&family);
            let built = desired(&self.cfg, family, inputs, previous);
            for s in &built.skipped {
                warn!(family = family.label(), "skipping {s}");
            }
            let t1 = Instant::now();
            let tx = rules::diff(previous, &built.ruleset);
            let t2 = Instant::now();
            report.full |= previous.is_none();
            report.build += t1 - t0;
            report.diff += t2 - t1;
            if tx.is_empty() {
                debug!(family = family.label(), "no changes");
                report.families.push((family, TxStats::default()));
                continue;
            }
            debug!(family = family.label(), "transaction:\n{tx}");
            let stats = tx.stats();
            match self.backend.apply(&tx) {
                Ok(()) => {
                    self.applied.insert(family, built.ruleset);
                    report.families.push((family, stats));
                }
                Err(e) => {
                    self.applied.remove(&family);
                    if first_err.is_none() {
                        first_err = Some(SyncError { family: family.label(), source: e });
                    }
                }
            }
            report.apply += t2.elapsed();
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

/// A message to the sync loop.
pub enum Event {
    /// The model changed (the source already updated the shared tracker).
    Changed,
    /// The source has listed everything once (no sync happens before this).
    Synced,
}

/// Rate limiting as upstream's BoundedFrequencyRunner: at most one sync per `min_sync_period`
/// (after a burst of 2), a resync every `sync_period`, and a retry `sync_period` after a failure.
pub struct Pacer {
    min: Duration,
    period: Duration,
    /// Times of the last syncs (for the burst of 2).
    recent: Vec<Instant>,
    pub next_periodic: Instant,
}

impl Pacer {
    pub fn new(min: Duration, period: Duration, now: Instant) -> Self {
        Pacer { min, period, recent: Vec::new(), next_periodic: now + period }
    }
    /// The earliest time a sync requested now may run.
    pub fn earliest(&self, now: Instant) -> Instant {
        if self.recent.len() < 2 {
            return now;
        }
        // A token bucket of 2 refilled every min_sync_period: a third sync waits until the older
        // of the last two is min_sync_period old.
        let oldest = self.recent[0];
        now.max(oldest + self.min)
    }
    pub fn record(&mut self, now: Instant, ok: bool) {
        self.recent.push(now);
        if self.recent.len() > 2 {
            self.recent.remove(0);
        }
        self.next_periodic = now + self.period;
        let _ = ok; // upstream retries after syncPeriod either way
    }
}

/// Logs one line per sync at info level, as operators expect.
pub fn log_report(r: &SyncReport, elapsed: Duration) {
    let ops: usize = r.families.iter().map(|(_, s)| s.ops).sum();
    let added: usize = r.families.iter().map(|(_, s)| s.elements_added).sum();
    let removed: usize = r.families.iter().map(|(_, s)| s.elements_removed).sum();
    info!(
        mode = "nftables",
        full = r.full,
        ops,
        elements_added = added,
        elements_removed = removed,
        build_ms = r.build.as_secs_f64() * 1e3,
        apply_ms = r.apply.as_secs_f64() * 1e3,
        elapsed_ms = elapsed.as_secs_f64() * 1e3,
        "sync done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::model::*;

    fn cfg() -> Config {
        use clap::Parser;
        crate::config::Flags::try_parse_from([
            "kproxy",
            "--manifests",
            "/nonexistent",
            "--hostname-override",
            "test-node",
            "--cluster-cidr",
            "10.0.0.0/8",
        ])
        .unwrap()
        .into_config()
        .unwrap()
    }

    fn state(n_eps: usize) -> ClusterState {
        let mut s = ClusterState::default();
        let sp = ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80);
        s.add_service(sp.clone());
        for i in 0..n_eps {
            s.add_endpoint(&sp.name, Endpoint::ready(&format!("10.1.0.{}", i + 1), 80));
        }
        s
    }

    fn sync_with(p: &mut Proxier<FakeBackend>, st: &ClusterState) -> Result<SyncReport, SyncError> {
        let node = NodeInfo {
            name: "test-node".into(),
            primary_ips: vec!["192.168.0.2".parse().unwrap()],
            ..Default::default()
        };
        let f = |fam: Family| {
            if fam == Family::V4 {
                st.clone()
            } else {
                ClusterState::default()
            }
        };
        p.sync(&Inputs { state: &f, node: &node, local_ips: &[] })
    }

    #[test]
    fn unchanged_sync_sends_nothing_and_failure_makes_next_full() {
        let mut p = Proxier::new(cfg(), FakeBackend::default());
        let r = sync_with(&mut p, &state(1)).unwrap();
        assert!(r.full);
        assert_eq!(p.backend.transactions.len(), 1);
        let r = sync_with(&mut p, &state(1)).unwrap();
        assert!(!r.full);
        assert_eq!(p.backend.transactions.len(), 1, "a no-op sync must send nothing");

        p.backend.fail_next = true;
        assert!(sync_with(&mut p, &state(2)).is_err());
        let r = sync_with(&mut p, &state(2)).unwrap();
        assert!(r.full, "the sync after a failure is full");
        let last = p.backend.transactions.last().unwrap();
        assert!(matches!(last.ops[0], rules::Op::AddTable));
        assert!(matches!(last.ops[1], rules::Op::DeleteTable));
        let r = sync_with(&mut p, &state(3)).unwrap();
        assert!(!r.full);
        let last = p.backend.transactions.last().unwrap();
        assert!(last.ops.iter().all(|o| matches!(o, rules::Op::AddElements { .. } | rules::Op::DeleteElements { .. })));
    }

    #[test]
    fn pacer_allows_a_burst_of_two_then_waits() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(1), Duration::from_secs(30), t0);
        assert_eq!(p.earliest(t0), t0);
        p.record(t0, true);
        assert_eq!(p.earliest(t0), t0);
        p.record(t0, true);
        assert_eq!(p.earliest(t0), t0 + Duration::from_secs(1));
        assert_eq!(p.next_periodic, t0 + Duration::from_secs(30));
    }
}
