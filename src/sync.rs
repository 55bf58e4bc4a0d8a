//! The sync loop: turns the tracked cluster model into per-family transactions and applies them,
//! rate limited, full after a failure, never giving up.
//!
//! `Proxier` is the synchronous core (build, diff, apply, remember what the kernel holds) and is
//! tested against the fake kernel; `run` is the async loop around it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rules::conntrack::StaleUdpFlows;
use rules::ir::{Ruleset, RESTART_TABLE};
use rules::model::{BuildConfig, ClusterState, Family, NodeInfo};
use rules::transaction::TxStats;
use rules::Transaction;
use tracing::{debug, info, warn};

use crate::backend::nftables::{ApplyStats, Prepared, Preparer};
use crate::config::Config;
use crate::metrics::RulesetCounts;
use crate::model::tracker::Changes;

/// Frees a replaced ruleset off the sync path: at 10k services x 10 endpoints dropping it takes
/// ~90 ms, which would delay the next event for nothing. Small ones are dropped in place.
fn drop_later(old: Ruleset) {
    if old.element_count() < 10_000 {
        return;
    }
    crate::memory::drop_elsewhere(old);
}

/// Where transactions go: the netlink backend in the daemon, a fake in tests. `Ok` says how big
/// the batch was (for the transaction-size metrics).
pub trait Backend {
    fn apply(&mut self, tx: &Transaction) -> Result<ApplyStats, Box<dyn std::error::Error + Send + Sync>>;
    /// Whether the kernel holds kproxy's table of `family`; `None` when that cannot be told, so
    /// it may (a cold start then replaces it in one transaction, never in parts).
    fn table_exists(&mut self, _family: Family) -> Option<bool> {
        None
    }
    /// Lowers the parts of a cold start of `family` ahead of their apply, on the thread that
    /// builds them (see `Preparer`); `None`, the default: parts are applied as transactions.
    fn preparer(&mut self, _family: Family) -> Option<Preparer> {
        None
    }
    /// Points later applies (and `table_exists`) at the table named `table`; `false` when the
    /// backend has only `kube-proxy` (a restart then replaces it in one transaction).
    fn set_table(&mut self, _table: &str) -> bool {
        false
    }
    /// Applies one part of a cold start (after the parts before it, with nothing in between).
    fn apply_ready(&mut self, part: &Ready) -> Result<ApplyStats, Box<dyn std::error::Error + Send + Sync>> {
        self.apply(part.tx())
    }
}

/// The cold start's parts: `part_size` Services each, except that they start at a 25th of that
/// (at parts of 10 or more) and grow by half up to it. While the first part is built the kernel
/// has only the layout to commit, so it is small. Building a part takes about two thirds as long
/// as the kernel takes to commit one of the same size: a part 1.5 times the one committing is
/// ready about when the kernel is, and with one built part allowed to wait (see `send_in_parts`)
/// the builder gets ahead. Parts that doubled were not ready in time: a third of the kernel's
/// commit time idle at each step of the ramp.
fn parts(services: &[(String, String)], part_size: usize) -> impl Iterator<Item = &[(String, String)]> {
    let mut size = if part_size >= 10 { part_size / 25 } else { part_size }.max(1);
    let mut rest = services;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (part, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        size = (size.saturating_mul(3) / 2).max(size + 1).min(part_size.max(1));
        Some(part)
    })
}

/// The chain an operation adds a rule to, flushes or deletes.
fn op_chain(op: &rules::transaction::Op) -> Option<&str> {
    use rules::transaction::Op;
    match op {
        Op::AddRule { chain, .. } | Op::FlushChain(chain) | Op::DeleteChain(chain) => Some(chain),
        _ => None,
    }
}

/// What a failed apply says.
type ApplyError = Box<dyn std::error::Error + Send + Sync>;

/// A ruleset sent in parts: what the kernel holds, or on a failure the error and what was built
/// so far (more than the kernel took; only counted, since a failure makes the next sync full).
type PartsSent = Result<Ruleset, (Box<Ruleset>, ApplyError)>;

/// `tx` as a cold-start part: lowered now when there is a preparer.
fn ready(preparer: &mut Option<Preparer>, tx: Transaction) -> Result<Ready, ApplyError> {
    match preparer {
        Some(p) => Ok(Ready::Lowered(p.prepare(tx)?)),
        None => Ok(Ready::Tx(tx)),
    }
}

/// A part of a cold start, as its transaction or lowered ahead by the backend's `Preparer`.
pub enum Ready {
    Tx(Transaction),
    Lowered(Prepared),
}

impl Ready {
    pub fn tx(&self) -> &Transaction {
        match self {
            Ready::Tx(tx) => tx,
            Ready::Lowered(p) => &p.tx,
        }
    }
}

/// The fake kernel (one per family) as a backend, for tests of the loop.
#[derive(Default)]
pub struct FakeBackend {
    pub kernels: BTreeMap<Family, rules::fake::FakeKernel>,
    /// When set, the next apply fails (once).
    pub fail_next: bool,
    /// When set to n, the apply after n committed transactions fails (once).
    pub fail_after_commits: Option<usize>,
    pub transactions: Vec<Transaction>,
    /// Transactions committed.
    pub commits: usize,
    /// When set, the backend has other tables than `kube-proxy` (`set_table` works): `kernels`
    /// holds the current table's, `other_tables` the others', and `table` names the current one
    /// (empty: `kube-proxy`).
    pub tables: bool,
    pub table: String,
    pub other_tables: BTreeMap<(Family, String), rules::fake::FakeKernel>,
}

impl FakeBackend {
    /// The table `kernels` holds.
    fn current_table(&self) -> &str {
        if self.table.is_empty() {
            rules::ir::TABLE
        } else {
            &self.table
        }
    }

    /// The kernel of `family`'s table `table`, whichever is current.
    pub fn kernel_of(&self, family: Family, table: &str) -> Option<&rules::fake::FakeKernel> {
        if table == self.current_table() {
            self.kernels.get(&family)
        } else {
            self.other_tables.get(&(family, table.to_string()))
        }
    }
}

impl Backend for FakeBackend {
    fn apply(&mut self, tx: &Transaction) -> Result<ApplyStats, Box<dyn std::error::Error + Send + Sync>> {
        if std::mem::take(&mut self.fail_next) || self.fail_after_commits == Some(self.commits) {
            self.fail_after_commits = None;
            return Err("injected failure".into());
        }
        self.kernels
            .entry(tx.family)
            .or_default()
            .apply(tx)
            .map_err(|e| format!("fake kernel refused op {}: {}", e.op_index, e.reason))?;
        self.transactions.push(tx.clone());
        self.commits += 1;
        // One message per op plus the batch framing, as the netlink backend counts; the bytes are
        // the script's, a stand-in of the right order of magnitude.
        Ok(ApplyStats { messages: tx.ops.len() + 2, bytes: tx.to_string().len() })
    }
    fn table_exists(&mut self, family: Family) -> Option<bool> {
        Some(self.kernels.get(&family).is_some_and(|k| k.has_table()))
    }
    fn set_table(&mut self, table: &str) -> bool {
        if !self.tables {
            return false;
        }
        let current = self.current_table().to_string();
        if table != current {
            for (f, k) in std::mem::take(&mut self.kernels) {
                self.other_tables.insert((f, current.clone()), k);
            }
            let mine: Vec<(Family, String)> = self.other_tables.keys().filter(|(_, t)| t == table).cloned().collect();
            for key in mine {
                let k = self.other_tables.remove(&key).expect("listed");
                self.kernels.insert(key.0, k);
            }
            self.table = table.to_string();
        }
        true
    }
}

/// Test hook: with `KPROXY_TEST_FAIL_APPLY=FILE` in the environment, every apply fails without
/// touching the kernel while FILE exists, or blocks until FILE goes away when FILE contains
/// `block`. End-to-end tests use it to drive the health checks into "stuck" and back; without the
/// variable it costs one environment lookup at start-up.
pub struct FaultHook<B> {
    inner: B,
    flag: Option<PathBuf>,
}

/// The environment variable of [`FaultHook`].
pub const FAIL_APPLY_ENV: &str = "KPROXY_TEST_FAIL_APPLY";

/// Test hook: Services per part of a cold start (or restart) in parts, instead of
/// [`COLD_START_PART_SERVICES`], so that tests with a handful of Services take that path.
pub const COLD_START_PART_ENV: &str = "KPROXY_TEST_COLD_START_PART";

/// [`COLD_START_PART_ENV`]'s value, when set to a number of at least 1 (logged, as it is a test hook).
pub fn cold_start_part_from_env() -> Option<usize> {
    let n = std::env::var(COLD_START_PART_ENV).ok()?.parse::<usize>().ok().filter(|n| *n >= 1)?;
    warn!("{COLD_START_PART_ENV} is set: cold starts go in parts of {n} Services (a test hook)");
    Some(n)
}

impl<B> FaultHook<B> {
    pub fn from_env(inner: B) -> Self {
        let flag = std::env::var_os(FAIL_APPLY_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(f) = &flag {
            warn!("{FAIL_APPLY_ENV} is set: applies fail while {} exists (a test hook)", f.display());
        }
        FaultHook { inner, flag }
    }
}

impl<B> FaultHook<B> {
    /// Fails while the flag file exists (waits while it says `block`).
    fn check(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(flag) = &self.flag {
            while let Ok(content) = std::fs::read_to_string(flag) {
                if content.trim() != "block" {
                    return Err(format!("injected failure: {} exists", flag.display()).into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

impl<B: Backend> Backend for FaultHook<B> {
    fn apply(&mut self, tx: &Transaction) -> Result<ApplyStats, Box<dyn std::error::Error + Send + Sync>> {
        self.check()?;
        self.inner.apply(tx)
    }
    fn table_exists(&mut self, family: Family) -> Option<bool> {
        self.inner.table_exists(family)
    }
    fn preparer(&mut self, family: Family) -> Option<Preparer> {
        self.inner.preparer(family)
    }
    fn set_table(&mut self, table: &str) -> bool {
        self.inner.set_table(table)
    }
    fn apply_ready(&mut self, part: &Ready) -> Result<ApplyStats, Box<dyn std::error::Error + Send + Sync>> {
        self.check()?;
        self.inner.apply_ready(part)
    }
}

/// A family's sync failed; the kernel still holds its previous ruleset. `report` says what the
/// whole sync did, the failed family and any others.
#[derive(Debug, thiserror::Error)]
#[error("applying the {family} ruleset: {source}")]
pub struct SyncError {
    pub family: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
    pub report: SyncReport,
}

/// What one family's sync did.
#[derive(Debug, Clone)]
pub struct FamilyReport {
    pub family: Family,
    /// Synced from scratch (the kernel state was unknown).
    pub full: bool,
    pub stats: TxStats,
    /// What was sent; zero when the transaction was empty (nothing is sent then).
    pub applied: ApplyStats,
    pub build: Duration,
    pub diff: Duration,
    pub apply: Duration,
    /// What the desired ruleset holds.
    pub counts: RulesetCounts,
    /// Why the apply failed; `None` on success.
    pub error: Option<String>,
    /// Transactions sent (more than one only for a cold start in parts, see
    /// [`COLD_START_PART_SERVICES`]) and the longest of them, which is how long the kernel's
    /// nftables lock was held at most.
    pub commits: usize,
    pub longest_commit: Duration,
    /// In iptables mode, what the restore did (for the `kubeproxy_sync_proxy_rules_iptables_*`
    /// metrics); `None` in nftables mode.
    pub iptables: Option<IptablesReport>,
}

impl FamilyReport {
    /// A report with nothing sent, built or timed yet.
    pub fn new(family: Family, full: bool) -> Self {
        FamilyReport {
            family,
            full,
            stats: TxStats::default(),
            applied: ApplyStats::default(),
            build: Duration::ZERO,
            diff: Duration::ZERO,
            apply: Duration::ZERO,
            counts: RulesetCounts::default(),
            error: None,
            iptables: None,
            commits: 0,
            longest_commit: Duration::ZERO,
        }
    }
}

/// What one family's iptables-restore did.
#[derive(Debug, Clone, Default)]
pub struct IptablesReport {
    /// A partial restore (only changed service chains), as opposed to a full one.
    pub partial: bool,
    /// Rules per table ("filter", "nat") in the desired ruleset.
    pub rules_total: Vec<(&'static str, usize)>,
    /// Rules per table written by this restore.
    pub rules_last: Vec<(&'static str, usize)>,
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub full: bool,
    /// A large ruleset was built in full: the caller may compact what it keeps (see
    /// [`crate::memory`]).
    pub big_full: bool,
    pub families: Vec<FamilyReport>,
    pub build: Duration,
    pub diff: Duration,
    pub apply: Duration,
}

impl SyncReport {
    /// Adds one family's report to the totals.
    pub fn push(&mut self, fr: FamilyReport) {
        self.full |= fr.full;
        self.build += fr.build;
        self.diff += fr.diff;
        self.apply += fr.apply;
        self.families.push(fr);
    }

    /// The sync's result: `Err` with this report when a family failed (the first failure).
    pub fn finish(
        self,
        first_err: Option<(&'static str, Box<dyn std::error::Error + Send + Sync>)>,
    ) -> Result<SyncReport, SyncError> {
        match first_err {
            Some((family, source)) => Err(SyncError { family, source, report: self }),
            None => Ok(self),
        }
    }
}

/// Everything one sync needs from the outside world, gathered by the caller.
pub struct Inputs<'a> {
    /// Each family's whole cluster state (kept up to date by the tracker, not copied).
    pub state: &'a dyn Fn(Family) -> &'a ClusterState,
    pub node: &'a NodeInfo,
    pub local_ips: &'a [IpAddr],
    /// What changed since the previous sync, for partial syncs; `None` = unknown, sync in full.
    pub changes: Option<&'a Changes>,
}

/// The desired ruleset of one family, and the build warnings.
pub fn desired(cfg: &Config, family: Family, inputs: &Inputs<'_>, previous: Option<&Ruleset>) -> rules::Built {
    desired_from(cfg, family, (inputs.state)(family), inputs, previous)
}

/// [`desired`] from an already computed cluster state.
fn desired_from(
    cfg: &Config,
    family: Family,
    state: &ClusterState,
    inputs: &Inputs<'_>,
    previous: Option<&Ruleset>,
) -> rules::Built {
    let (node_ips, bc) = build_inputs(cfg, family, inputs);
    rules::build(state, &node_ips, &bc, previous)
}

/// The node IPs NodePorts answer on and the build configuration of one family.
pub fn build_inputs(cfg: &Config, family: Family, inputs: &Inputs<'_>) -> (Vec<IpAddr>, BuildConfig) {
    let np = cfg.nodeport.resolve(family, &inputs.node.primary_ips, inputs.local_ips);
    let node_ips: Vec<IpAddr> = match &np {
        rules::model::NodePortAddresses::Ips(ips) => ips.clone(),
        _ => Vec::new(),
    };
    (node_ips, cfg.build_config(family, np, inputs.node))
}

/// How big a family's desired rules are, and the Local-policy ports without a local endpoint
/// that the build counted (for `no_local_endpoints_total`).
fn counts(state: &ClusterState, rs: &Ruleset) -> RulesetCounts {
    let no_local = rs.book.no_local_endpoints();
    RulesetCounts {
        service_ports: state.services.len(),
        endpoints: state.endpoints.values().map(Vec::len).sum(),
        chains: rs.chains.len(),
        rules: rs.chains.values().map(|c| c.rules.len()).sum(),
        sets: rs.sets.len(),
        elements: rs.element_count(),
        no_local_internal: no_local.internal,
        no_local_external: no_local.external,
    }
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
    /// When each family was last built in full.
    last_full: BTreeMap<Family, Instant>,
    /// Family syncs built from the changed Services alone (for tests and logs).
    pub partial_syncs: u64,
    /// Whether kept rulesets forget their per-endpoint elements ([`Ruleset::strip_bulk`]): on,
    /// except in tests of the unstripped diff.
    pub strip: bool,
    pub udp: UdpCleanups,
    /// Services per part of a cold start in parts ([`COLD_START_PART_SERVICES`]; tests use less).
    pub cold_start_part: usize,
}

/// What the daemon loop needs of a proxy mode: nftables ([`Proxier`]) or iptables.
pub trait Engine {
    /// Builds and applies every family (see [`Proxier::sync`]).
    fn sync(&mut self, inputs: &Inputs<'_>) -> Result<SyncReport, SyncError>;
    /// Forgets what the kernel holds, so the next sync is a full one.
    fn force_full(&mut self);
    /// The UDP conntrack cleanups the syncs asked for.
    fn udp(&mut self) -> &mut UdpCleanups;
    /// Re-allocates what the engine keeps, densely (see [`crate::memory`]); the default keeps it.
    fn compact(&mut self) {}
}

impl<B: Backend> Engine for Proxier<B> {
    fn sync(&mut self, inputs: &Inputs<'_>) -> Result<SyncReport, SyncError> {
        Proxier::sync(self, inputs)
    }
    fn force_full(&mut self) {
        Proxier::force_full(self)
    }
    fn udp(&mut self) -> &mut UdpCleanups {
        &mut self.udp
    }
    fn compact(&mut self) {
        for rs in self.applied.values_mut() {
            *rs = crate::memory::on_fresh_heap(|| rs.dense_copy());
        }
    }
}

/// Which stale UDP conntrack flows are due for deletion (cases 102-105), per family: a cleanup is
/// due after a successful apply whose UDP frontends or their serving endpoints changed since the
/// last cleanup (every family with UDP endpoints after the first sync, as upstream cleans after
/// each sync). Flows are deleted one by one, never flushed; the daemon does the deleting.
#[derive(Debug, Default)]
pub struct UdpCleanups {
    /// Per family, the UDP frontends and serving endpoints the conntrack flows were last cleaned
    /// against; absent = never, or the cleanup failed.
    cleaned: BTreeMap<Family, StaleUdpFlows>,
    /// Cleanups the last syncs asked for and the caller has not taken yet.
    pending: BTreeMap<Family, StaleUdpFlows>,
}

impl UdpCleanups {
    /// The cleanups due after the syncs so far; the caller deletes them and reports a failure
    /// with [`UdpCleanups::failed`].
    pub fn take(&mut self) -> Vec<(Family, StaleUdpFlows)> {
        std::mem::take(&mut self.pending).into_iter().collect()
    }

    /// The cleanup of `family` failed: the next successful sync hands it out again.
    pub fn failed(&mut self, family: Family) {
        self.cleaned.remove(&family);
    }

    /// After `family` was applied (or had nothing to apply) from `state`: queue a cleanup when
    /// its UDP frontends or their serving endpoints changed.
    pub fn synced(&mut self, family: Family, state: &ClusterState) {
        let now = StaleUdpFlows::from_state(state, family);
        if self.cleaned.get(&family) == Some(&now) {
            return;
        }
        self.cleaned.insert(family, now.clone());
        if now.is_empty() {
            // Nothing can be stale: no UDP frontend has a serving endpoint.
            self.pending.remove(&family);
        } else {
            self.pending.insert(family, now);
        }
    }

    /// `family`'s apply failed: the kernel keeps the old rules, so the old endpoints still get
    /// traffic; nothing to clean until an apply succeeds, and then in any case.
    pub fn apply_failed(&mut self, family: Family) {
        self.cleaned.remove(&family);
        self.pending.remove(&family);
    }
}

impl<B: Backend> Proxier<B> {
    pub fn new(cfg: Config, backend: B) -> Self {
        Proxier {
            cfg,
            backend,
            applied: BTreeMap::new(),
            last_full: BTreeMap::new(),
            partial_syncs: 0,
            strip: true,
            udp: UdpCleanups::default(),
            cold_start_part: COLD_START_PART_SERVICES,
        }
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
            let state = (inputs.state)(family);
            let full_due = self.last_full.get(&family).is_none_or(|t| t.elapsed() >= FULL_SYNC_PERIOD);
            if !self.applied.contains_key(&family) {
                if let Some((fr, err)) = self.cold_start_in_parts(family, state, inputs) {
                    if let (Some(e), None) = (err, &first_err) {
                        first_err = Some((family.label(), e));
                    }
                    report.big_full = true;
                    report.push(fr);
                    continue;
                }
            }
            let previous = self.applied.get(&family);
            // A partial sync builds and diffs just the changed Services; anything it cannot
            // decide alone (and the first sync, a failure, a node change, an hourly one) is full.
            let partial = match (previous, inputs.changes) {
                (Some(prev), Some(ch)) if !ch.full && !full_due => {
                    let (node_ips, bc) = build_inputs(&self.cfg, family, inputs);
                    rules::build::build_partial(prev, ch.before(family), &ch.after(state), &node_ips, &bc)
                }
                _ => None,
            };
            let (plan, t1) = match partial {
                Some(p) => (Plan::Partial(p), Instant::now()),
                None => {
                    let built = desired_from(&self.cfg, family, state, inputs, previous);
                    for s in &built.skipped {
                        warn!(family = family.label(), "skipping {s}");
                    }
                    let t1 = Instant::now();
                    let tx = rules::diff(previous, &built.ruleset);
                    (Plan::Full { ruleset: Box::new(built.ruleset), tx }, t1)
                }
            };
            let t2 = Instant::now();
            let tx = match &plan {
                Plan::Partial(p) => &p.tx,
                Plan::Full { tx, .. } => tx,
            };
            let previous_unknown = previous.is_none();
            let mut fr = FamilyReport { build: t1 - t0, diff: t2 - t1, ..FamilyReport::new(family, previous_unknown) };
            let mut result = Ok(ApplyStats::default());
            if tx.is_empty() {
                debug!(family = family.label(), "no changes");
            } else {
                debug!(family = family.label(), "transaction:\n{tx}");
                fr.stats = tx.stats();
                result = self.backend.apply(tx);
                fr.apply = t2.elapsed();
                fr.commits = 1;
                fr.longest_commit = fr.apply;
            }
            match result {
                Ok(applied) => {
                    fr.applied = applied;
                    match plan {
                        Plan::Partial(p) => {
                            self.partial_syncs += 1;
                            if let Some(rs) = self.applied.get_mut(&family) {
                                rs.commit_partial(&p);
                            }
                        }
                        Plan::Full { ruleset, .. } => {
                            report.big_full |= ruleset.element_count() >= COMPACT_THRESHOLD;
                            self.kernel_holds_full(family, *ruleset);
                        }
                    }
                    self.synced(family, state, &mut fr);
                    if previous_unknown {
                        if let Err(e) = self.remove_restart_table(family) {
                            self.failed(family, &mut fr, &*e);
                            if first_err.is_none() {
                                first_err = Some((family.label(), e));
                            }
                        }
                    }
                }
                Err(e) => {
                    if let Plan::Full { ruleset, .. } = &plan {
                        fr.counts = counts(state, ruleset);
                    }
                    self.failed(family, &mut fr, &*e);
                    if first_err.is_none() {
                        first_err = Some((family.label(), e));
                    }
                }
            }
            report.push(fr);
        }
        report.finish(first_err)
    }
}

/// A cold start into a kernel without kproxy's table is sent in parts of this many Services when
/// there are more (issue 6: no single commit holding the nftables lock for seconds at 50k
/// services). Each part holds whole Services, built as if they had just been added, and the
/// table's base chains stay empty until the last part is in, so traffic never meets a half-built
/// Service or a part of the ruleset: the Services appear together, as from one transaction. Over an existing table (a restart) the parts go through a second table first
/// (see `Proxier::restart_in_parts`): deleting the old rules first would break the Services of
/// later parts meanwhile. 2,500 rather than 5,000 (measured from manifests, 2026-11-25): at 10k
/// services x 10 endpoints the longest commit 0.47 -> 0.24 s, the cold start's peak memory 172 -> 137 MiB and the first
/// sync no slower (1.10-1.15 vs 1.20-1.22 s); at 50k x 5 the longest commit 0.52 -> 0.31 s for a
/// first sync ~0.3 s longer (5.0 vs 4.6-4.9 s). Parts of 1,000 cost 1.6-2.6 s more at 50k (cause
/// not measured by experiment; a profile at 50k shows the kernel validating the whole table on
/// every commit, which grows with what is already there; since the base chains stay empty until
/// the end, that check has nothing to walk but in the last commit).
pub const COLD_START_PART_SERVICES: usize = 2_500;

impl<B: Backend> Proxier<B> {
    /// A cold start in parts (see [`COLD_START_PART_SERVICES`]), or `None` when the family is
    /// small enough for one transaction or whether its table exists cannot be told. On a new node
    /// (no table): first the layout without Services (base chains, still empty, shared sets, the
    /// ServiceCIDRs), then each part as a partial build against what is applied; a part the
    /// partial build cannot decide alone (a frontend conflict) ends the parts with one full diff
    /// from what is applied; last, the base chains' rules, which make the whole ruleset live in
    /// one step. Over an existing table (a restart), see `restart_in_parts`. On a
    /// failure the family's kernel state counts as unknown (the next sync is full), as for any
    /// failed sync.
    fn cold_start_in_parts(
        &mut self,
        family: Family,
        state: &ClusterState,
        inputs: &Inputs<'_>,
    ) -> Option<(FamilyReport, Option<Box<dyn std::error::Error + Send + Sync>>)> {
        let part_size = self.cold_start_part.max(1);
        if state.services.len() <= part_size {
            return None; // no more Services than ports: one part at most
        }
        let mut services: Vec<(String, String)> = state
            .services
            .iter()
            .filter(|(_, sp)| sp.family() == family)
            .map(|(spn, _)| (spn.namespace().to_string(), spn.name().to_string()))
            .collect();
        services.dedup();
        if services.len() <= part_size {
            return None;
        }
        let restart = match self.backend.table_exists(family) {
            Some(false) => false,
            Some(true) if self.restart_table_absent(family) => true,
            _ => return None,
        };
        let mut fr = FamilyReport::new(family, true);
        let sent = if restart {
            self.restart_in_parts(family, state, inputs, &services, &mut fr)
        } else {
            self.send_in_parts(family, state, inputs, &services, &mut fr).and_then(|applied| {
                // `kube-proxy` was not there, but a restart killed half-way may have left the
                // second table.
                match self.remove_restart_table(family) {
                    Ok(()) => Ok(applied),
                    Err(e) => Err((Box::new(applied), e)),
                }
            })
        };
        let applied = match sent {
            Ok(applied) => applied,
            Err((applied, e)) => {
                fr.counts = counts(state, &applied);
                self.failed(family, &mut fr, &*e);
                return Some((fr, Some(e)));
            }
        };
        info!(
            family = family.label(),
            services = services.len(),
            commits = fr.commits,
            longest_commit_ms = fr.longest_commit.as_secs_f64() * 1e3,
            "{}",
            if restart {
                format!("restart sent in parts (the {} table was there: rebuilt next to it)", family.label())
            } else {
                format!("cold start sent in parts (no {} table was there)", family.label())
            }
        );
        self.kernel_holds_full(family, applied);
        self.synced(family, state, &mut fr);
        Some((fr, None))
    }

    /// Runs `f` on the backend pointed at kproxy's restart table, then points it back at
    /// `kube-proxy`; `None` when the backend has no second table.
    fn on_restart_table<R>(&mut self, f: impl FnOnce(&mut B) -> R) -> Option<R> {
        if !self.backend.set_table(RESTART_TABLE) {
            return None;
        }
        let r = f(&mut self.backend);
        self.backend.set_table(rules::ir::TABLE);
        Some(r)
    }

    /// Deletes kproxy's restart table of `family` if a restart that failed half-way (or was
    /// killed) left it, once `kube-proxy` holds a whole ruleset again: hooked, a stale second
    /// table would still act on what `kube-proxy` does not match. A failure fails the sync, so the
    /// next one is full and tries again.
    fn remove_restart_table(&mut self, family: Family) -> Result<(), ApplyError> {
        self.on_restart_table(|b| match b.table_exists(family) {
            Some(false) => Ok(()),
            _ => b.apply(&rules::transaction::cleanup(family)).map(|_| {
                info!(family = family.label(), "deleted the table {RESTART_TABLE} a restart left");
            }),
        })
        .unwrap_or(Ok(()))
    }

    /// Whether the backend can build into kproxy's restart table and it is not there (a restart
    /// that failed half-way leaves it; the retry then replaces `kube-proxy` in one transaction,
    /// which is always whole, and removes it after).
    fn restart_table_absent(&mut self, family: Family) -> bool {
        self.on_restart_table(|b| b.table_exists(family) == Some(false)).unwrap_or(false)
    }

    /// A cold start over an existing `kube-proxy` table (a restart) in parts, so that no commit
    /// holds the kernel's nftables lock for the whole ruleset: (1) the new ruleset in parts into
    /// a second table, `kproxy-restart`, next to the old one; (2) the old table deleted (one
    /// transaction; deleting costs the kernel a fraction of building); (3) the new ruleset in
    /// parts into `kube-proxy`, the second table serving meanwhile; (4) the second table deleted.
    /// At every moment one whole ruleset is hooked (the old one, then the second table); the one
    /// being built has empty base chains until it is whole (see `send_in_parts`). While both are
    /// whole, both hook the same points at the same priorities; the newer table's chains run
    /// first (the kernel inserts a hook before those of equal priority), NAT takes the first
    /// chain that sets a mapping, and the two tables hold the same Services. Costs about twice
    /// a fresh node's cold start. Any failure counts as a failed sync: the next one replaces
    /// `kube-proxy` whole in one transaction and then deletes the second table.
    fn restart_in_parts(
        &mut self,
        family: Family,
        state: &ClusterState,
        inputs: &Inputs<'_>,
        services: &[(String, String)],
        fr: &mut FamilyReport,
    ) -> PartsSent {
        let delete = |p: &mut Self, fr: &mut FamilyReport, table: &str| {
            p.backend.set_table(table);
            p.commit_part(family, Ok(Ready::Tx(rules::transaction::cleanup(family))), fr)
        };
        let result = (|| {
            // Until (3) starts, `kube-proxy` holds the old ruleset, or nothing.
            let unknown = |e| (Box::new(Ruleset::new(family)), e);
            self.backend.set_table(RESTART_TABLE);
            self.send_in_parts(family, state, inputs, services, fr).map_err(|(_, e)| unknown(e))?;
            // The backend stays on `kube-proxy` after deleting it, for (3).
            delete(self, fr, rules::ir::TABLE).map_err(unknown)?;
            let applied = self.send_in_parts(family, state, inputs, services, fr)?;
            delete(self, fr, RESTART_TABLE).map_err(|e| (Box::new(applied.clone()), e))?;
            Ok(applied)
        })();
        self.backend.set_table(rules::ir::TABLE);
        result
    }

    /// Sends the whole ruleset of `family` in parts into a table that is not there: the layout
    /// with empty base chains, the Services part by part, then the base chains' rules (see
    /// `cold_start_in_parts`). Returns what the kernel holds.
    fn send_in_parts(
        &mut self,
        family: Family,
        state: &ClusterState,
        inputs: &Inputs<'_>,
        services: &[(String, String)],
        fr: &mut FamilyReport,
    ) -> PartsSent {
        let part_size = self.cold_start_part.max(1);
        let t0 = Instant::now();
        let base_state = ClusterState { service_cidrs: state.service_cidrs.clone(), ..ClusterState::default() };
        let mut base = desired_from(&self.cfg, family, &base_state, inputs, None).ruleset;
        let (node_ips, bc) = build_inputs(&self.cfg, family, inputs);
        // Each part is lowered for the kernel on the builder thread too, when the backend can.
        let mut preparer = self.backend.preparer(family);
        // The base chains go in empty and get their rules last, in a commit of their own: until
        // then nothing of the table is reachable from a hook, so traffic meets the whole ruleset
        // at once, and the kernel's check of the table on each commit (which walks from the base
        // chains through every Service) has nothing to walk. At 50k Services that check, repeated
        // on every part, took a quarter of the kernel's time.
        let mut base_tx = rules::diff(None, &base);
        let hooks = base_tx.split_off_hook_rules();
        // The base chains' rules are fixed: nothing after the layout may touch these chains, or
        // the ruleset would go live early and `hooks` would add the rules twice.
        let hooked: BTreeSet<&str> = hooks.ops.iter().filter_map(op_chain).collect();
        let untouched = |tx: &Transaction| tx.ops.iter().filter_map(op_chain).all(|c| !hooked.contains(c));
        let base_tx = ready(&mut preparer, base_tx);
        if self.strip {
            // Parts then keep only what later builds need (not the per-endpoint elements).
            base.strip_bulk();
        }
        fr.build += t0.elapsed();

        // The parts are built on a second thread while the kernel commits the one before (the
        // build of a part needs only the previous parts' bookkeeping, not their commit). One
        // built part may wait, so the builder can get ahead once the parts stop growing (see
        // `parts`): at most three parts' transactions are alive, one committing, one waiting, one
        // being built.
        let (to_kernel, from_builder) = std::sync::mpsc::sync_channel::<Result<Ready, ApplyError>>(1);
        let (node_ips, bc) = (&node_ips, &bc);
        let (mut applied, build, needs_full, mut err) = std::thread::scope(|s| {
            let builder = s.spawn(move || {
                let (mut applied, mut build, none) = (base, Duration::ZERO, ClusterState::default());
                for part in parts(services, part_size) {
                    let t = Instant::now();
                    let keys: BTreeSet<(String, String)> = part.iter().cloned().collect();
                    let after = state.restrict(&keys);
                    let Some(p) = rules::build::build_partial(&applied, &none, &after, node_ips, bc) else {
                        return (applied, build, true);
                    };
                    applied.commit_partial(&p);
                    debug_assert!(untouched(&p.tx), "a part touches a base chain:\n{}", p.tx);
                    let part = ready(&mut preparer, p.tx);
                    build += t.elapsed();
                    if to_kernel.send(part).is_err() {
                        break; // a commit failed: nothing more is sent
                    }
                }
                (applied, build, false)
            });
            let mut err = self.commit_part(family, base_tx, fr).err();
            if err.is_none() {
                for part in from_builder.iter() {
                    if let Err(e) = self.commit_part(family, part, fr) {
                        err = Some(e);
                        break;
                    }
                }
            }
            drop(from_builder);
            let (applied, build, needs_full) = builder.join().expect("the cold start's builder panicked");
            (applied, build, needs_full, err)
        });
        fr.build += build;
        if err.is_none() && needs_full {
            // Only a full build can decide the next part (a frontend conflict): finish with one
            // diff from what the kernel holds now.
            let t = Instant::now();
            let built = desired_from(&self.cfg, family, state, inputs, Some(&applied));
            for s in &built.skipped {
                warn!(family = family.label(), "skipping {s}");
            }
            let tx = rules::diff(Some(&applied), &built.ruleset);
            debug_assert!(untouched(&tx), "the last diff touches a base chain:\n{tx}");
            applied = built.ruleset;
            fr.build += t.elapsed();
            err = self.commit_part(family, Ok(Ready::Tx(tx)), fr).err();
        }
        if err.is_none() {
            err = self.commit_part(family, Ok(Ready::Tx(hooks)), fr).err();
        }
        match err {
            Some(e) => Err((Box::new(applied), e)),
            None => Ok(applied),
        }
    }

    /// The kernel holds `ruleset`, built in full, for `family`: keep it (stripped of what later
    /// builds do not need) as what the kernel holds.
    fn kernel_holds_full(&mut self, family: Family, mut ruleset: Ruleset) {
        self.last_full.insert(family, Instant::now());
        if self.strip {
            ruleset.strip_bulk();
        }
        if let Some(old) = self.applied.insert(family, ruleset) {
            drop_later(old);
        }
    }

    /// `family`'s sync succeeded: report the counts of what the kernel holds (a stripped ruleset
    /// still counts the elements it no longer keeps) and queue the UDP conntrack cleanup.
    fn synced(&mut self, family: Family, state: &ClusterState, fr: &mut FamilyReport) {
        if let Some(rs) = self.applied.get(&family) {
            fr.counts = counts(state, rs);
        }
        self.udp.synced(family, state);
    }

    /// `family`'s apply failed: what the kernel holds is unknown until a full sync.
    fn failed(&mut self, family: Family, fr: &mut FamilyReport, e: &(dyn std::error::Error + Send + Sync)) {
        self.applied.remove(&family);
        self.udp.apply_failed(family);
        fr.error = Some(e.to_string());
    }

    /// Sends one transaction of a cold start in parts, adding it to the report.
    fn commit_part(
        &mut self,
        family: Family,
        part: Result<Ready, ApplyError>,
        fr: &mut FamilyReport,
    ) -> Result<(), ApplyError> {
        let part = part?; // it could not be lowered: nothing was sent
        let tx = part.tx();
        debug!(family = family.label(), commit = fr.commits + 1, "cold start part:\n{tx}");
        fr.stats.add(&tx.stats());
        let t = Instant::now();
        let result = self.backend.apply_ready(&part);
        let took = t.elapsed();
        fr.apply += took;
        fr.longest_commit = fr.longest_commit.max(took);
        fr.commits += 1;
        let a = result?;
        fr.applied.messages += a.messages;
        fr.applied.bytes += a.bytes;
        Ok(())
    }
}

/// A full sync of a ruleset with this many elements asks the caller to compact its memory
/// ([`SyncReport::big_full`]).
pub const COMPACT_THRESHOLD: usize = 10_000;

/// How often a sync is full at the latest (rebuilds and diffs everything), as upstream's
/// `FullSyncPeriod`; syncs in between build only what changed.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// What one family's sync sends: a change built from the changed Services only, or a full
/// rebuild's diff.
enum Plan {
    Partial(rules::build::Partial),
    Full { ruleset: Box<Ruleset>, tx: Transaction },
}

/// Test helper: the configuration of node `test-node` with cluster CIDR 10.0.0.0/8 reading a
/// (nonexistent) manifests directory, plus `extra` flags.
#[cfg(test)]
pub(crate) fn test_config(extra: &[&str]) -> Config {
    use clap::Parser;
    let base =
        ["kproxy", "--manifests", "/nonexistent", "--hostname-override", "test-node", "--cluster-cidr", "10.0.0.0/8"];
    crate::config::Flags::try_parse_from(base.iter().chain(extra))
        .expect("test flags")
        .into_config()
        .expect("test config")
}

/// Test helper: one sync of `engine` with `st` as the IPv4 state (no IPv6, no tracker changes) on
/// node `test-node` (primary IP 192.168.0.2).
#[cfg(test)]
pub(crate) fn sync_v4(engine: &mut dyn Engine, st: &ClusterState) -> Result<SyncReport, SyncError> {
    let node = NodeInfo {
        name: "test-node".into(),
        primary_ips: vec!["192.168.0.2".parse().expect("constant")],
        ..Default::default()
    };
    let empty = ClusterState::default();
    let f = |fam: Family| if fam == Family::V4 { st } else { &empty };
    engine.sync(&Inputs { state: &f, node: &node, local_ips: &[], changes: None })
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
    let ops: usize = r.families.iter().map(|f| f.stats.ops).sum();
    let added: usize = r.families.iter().map(|f| f.stats.elements_added).sum();
    let removed: usize = r.families.iter().map(|f| f.stats.elements_removed).sum();
    let bytes: usize = r.families.iter().map(|f| f.applied.bytes).sum();
    let mode = if r.families.iter().any(|f| f.iptables.is_some()) { "iptables" } else { "nftables" };
    let commits: usize = r.families.iter().map(|f| f.commits).sum();
    let longest = r.families.iter().map(|f| f.longest_commit).max().unwrap_or_default();
    info!(
        mode,
        full = r.full,
        ops,
        commits,
        longest_commit_ms = longest.as_secs_f64() * 1e3,
        bytes,
        elements_added = added,
        elements_removed = removed,
        build_ms = r.build.as_secs_f64() * 1e3,
        diff_ms = r.diff.as_secs_f64() * 1e3,
        apply_ms = r.apply.as_secs_f64() * 1e3,
        elapsed_ms = elapsed.as_secs_f64() * 1e3,
        compacting = r.big_full,
        "sync done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::model::*;

    fn cfg() -> Config {
        test_config(&[])
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
        sync_v4(p, st)
    }

    #[test]
    fn unchanged_sync_sends_nothing_and_failure_makes_next_full() {
        let mut p = Proxier::new(cfg(), FakeBackend::default());
        // Without changes from a tracker every sync is a full diff; unstripped, it is minimal.
        p.strip = false;
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
    fn the_report_says_per_family_what_was_built_sent_and_why_it_failed() {
        let mut p = Proxier::new(cfg(), FakeBackend::default());
        // Without changes from a tracker every sync is a full diff; unstripped, it is minimal.
        p.strip = false;
        let r = sync_with(&mut p, &state(2)).unwrap();
        let f = &r.families[0];
        assert_eq!((f.family, f.full, f.error.as_deref()), (Family::V4, true, None));
        assert_eq!(f.applied.messages, f.stats.ops + 2);
        assert!(f.applied.bytes > 0);
        assert_eq!((f.counts.service_ports, f.counts.endpoints), (1, 2));
        assert!(f.counts.elements > 0 && f.counts.rules > 0 && f.counts.chains > 0);
        // A no-op sync sends nothing but still reports what the ruleset holds.
        let r = sync_with(&mut p, &state(2)).unwrap();
        assert_eq!(r.families[0].applied, ApplyStats::default());
        assert_eq!(r.families[0].counts.endpoints, 2);

        p.backend.fail_next = true;
        let e = sync_with(&mut p, &state(3)).unwrap_err();
        assert_eq!(e.family, "IPv4");
        let f = &e.report.families[0];
        assert_eq!(f.error.as_deref(), Some("injected failure"));
        assert!(f.stats.ops > 0, "the failed transaction's size is still reported");
    }

    #[test]
    fn local_policy_ports_without_local_endpoints_are_counted() {
        let mut s = ClusterState::default();
        let local = |name: &str, ip: &str| {
            ServicePort::cluster_ip("ns", name, "", Protocol::Tcp, ip, 80).with_internal_traffic_policy_local()
        };
        // Endpoints elsewhere only: counted.
        let a = local("a", "172.30.0.1");
        s.add_service(a.clone());
        s.add_endpoint(&a.name, Endpoint::ready("10.1.0.1", 80).on_node("other"));
        // A local endpoint: not counted.
        let b = local("b", "172.30.0.2");
        s.add_service(b.clone());
        s.add_endpoint(&b.name, Endpoint::ready("10.1.0.2", 80).on_node("test-node"));
        // No endpoints at all: not counted (upstream TestNoEndpointsMetric).
        s.add_service(local("c", "172.30.0.3"));
        // External Local policy, endpoints elsewhere: counted as external.
        let d = ServicePort::cluster_ip("ns", "d", "", Protocol::Tcp, "172.30.0.4", 80)
            .with_node_port(30004)
            .with_external_traffic_policy_local();
        s.add_service(d.clone());
        s.add_endpoint(&d.name, Endpoint::ready("10.1.0.4", 80).on_node("other"));
        let mut p = Proxier::new(cfg(), FakeBackend::default());
        let r = sync_with(&mut p, &s).unwrap();
        let c = r.families[0].counts;
        assert_eq!((c.no_local_internal, c.no_local_external), (1, 1));
    }

    #[test]
    fn udp_conntrack_cleanups_follow_serving_endpoint_changes() {
        let udp = |eps: &[&str]| {
            let mut s = state(1);
            let sp = ServicePort::cluster_ip("ns", "dns", "", Protocol::Udp, "172.30.0.10", 53);
            s.add_service(sp.clone());
            for ip in eps {
                s.add_endpoint(&sp.name, Endpoint::ready(ip, 53));
            }
            s
        };
        let fams =
            |v: Vec<(Family, rules::conntrack::StaleUdpFlows)>| v.into_iter().map(|(f, _)| f).collect::<Vec<_>>();
        let mut p = Proxier::new(cfg(), FakeBackend::default());
        // Without a UDP endpoint there is nothing to clean.
        sync_with(&mut p, &udp(&[])).unwrap();
        assert!(p.udp.take().is_empty());
        // The first endpoint (case 103), then any change of the serving set (102): one cleanup.
        sync_with(&mut p, &udp(&["10.1.0.7"])).unwrap();
        let c = p.udp.take();
        assert_eq!(fams(c.clone()), vec![Family::V4]);
        let stale = |c: &[(Family, rules::conntrack::StaleUdpFlows)], reply: &str| {
            c[0].1.is_stale(&rules::conntrack::UdpFlow {
                orig_dst: "172.30.0.10".parse().unwrap(),
                orig_dport: 53,
                reply_src: reply.parse().unwrap(),
            })
        };
        assert!(stale(&c, "172.30.0.10") && !stale(&c, "10.1.0.7"));
        // Nothing changed, or only TCP changed: no cleanup.
        sync_with(&mut p, &udp(&["10.1.0.7"])).unwrap();
        assert!(p.udp.take().is_empty());
        let mut tcp_changed = udp(&["10.1.0.7"]);
        let a = ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80);
        tcp_changed.add_endpoint(&a.name, Endpoint::ready("10.1.0.99", 80));
        sync_with(&mut p, &tcp_changed).unwrap();
        assert!(p.udp.take().is_empty());
        sync_with(&mut p, &udp(&["10.1.0.8"])).unwrap();
        let c = p.udp.take();
        assert!(stale(&c, "10.1.0.7") && !stale(&c, "10.1.0.8"));
        // A failed cleanup is handed out again by the next sync, even without a change.
        p.udp.failed(Family::V4);
        sync_with(&mut p, &udp(&["10.1.0.8"])).unwrap();
        assert_eq!(fams(p.udp.take()), vec![Family::V4]);
        // A failed apply cleans nothing (the old rules still serve); the next success does.
        p.backend.fail_next = true;
        assert!(sync_with(&mut p, &udp(&["10.1.0.9"])).is_err());
        assert!(p.udp.take().is_empty());
        sync_with(&mut p, &udp(&["10.1.0.9"])).unwrap();
        assert_eq!(fams(p.udp.take()), vec![Family::V4]);
    }

    #[test]
    fn fault_hook_fails_while_the_flag_file_exists() {
        let dir = std::env::temp_dir().join(format!("kproxy-faulthook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flag = dir.join("fail");
        let mut hook = FaultHook { inner: FakeBackend::default(), flag: Some(flag.clone()) };
        let tx = rules::diff(None, &rules::ir::Ruleset::new(Family::V4));
        assert!(hook.apply(&tx).is_ok());
        std::fs::write(&flag, "").unwrap();
        let e = hook.apply(&tx).unwrap_err().to_string();
        assert!(e.starts_with("injected failure"), "{e}");
        std::fs::remove_file(&flag).unwrap();
        assert!(hook.apply(&tx).is_ok());
        std::fs::remove_dir_all(&dir).ok();
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

    #[test]
    fn the_parts_start_small_and_grow_so_the_kernel_starts_sooner() {
        let services: Vec<(String, String)> = (0..40).map(|i| ("ns".to_string(), format!("s{i:02}"))).collect();
        let sizes = |n: usize, part: usize| parts(&services[..n], part).map(<[_]>::len).collect::<Vec<_>>();
        assert_eq!(sizes(23, 10), vec![1, 2, 3, 4, 6, 7]);
        assert_eq!(sizes(40, 10), vec![1, 2, 3, 4, 6, 9, 10, 5]);
        assert_eq!(sizes(23, 3), vec![3, 3, 3, 3, 3, 3, 3, 2]);
        assert_eq!(sizes(1, 10), vec![1]);
        assert!(sizes(0, 10).is_empty());
        let many: Vec<(String, String)> = (0..10_000).map(|i| ("ns".to_string(), format!("s{i}"))).collect();
        let sizes: Vec<usize> = parts(&many, COLD_START_PART_SERVICES).map(<[_]>::len).collect();
        assert_eq!(sizes, vec![100, 150, 225, 337, 505, 757, 1135, 1702, 2500, 2500, 89]);
        // Every Service once, in order.
        let all: Vec<_> = parts(&services, 10).flatten().cloned().collect();
        assert_eq!(all, services);
    }

    #[test]
    fn a_cold_start_without_a_table_goes_in_parts_of_whole_services() {
        let mut st = ClusterState::default();
        for i in 0..10u8 {
            let name = format!("s{i}");
            let mut ports =
                vec![ServicePort::cluster_ip("ns", &name, "http", Protocol::Tcp, &format!("172.30.0.{i}"), 80)];
            if i % 3 == 0 {
                ports.push(ServicePort::cluster_ip("ns", &name, "https", Protocol::Tcp, &format!("172.30.0.{i}"), 443));
            }
            for sp in ports {
                st.add_service(sp.clone());
                st.add_endpoint(&sp.name, Endpoint::ready(&format!("10.1.0.{i}"), 8080));
            }
        }
        st.service_cidrs = vec![rules::model::Cidr::parse("172.30.0.0/16").unwrap()];
        let one_go = |st: &ClusterState| {
            let mut p = Proxier::new(cfg(), FakeBackend::default());
            p.cold_start_part = usize::MAX;
            let r = sync_v4(&mut p, st).unwrap();
            assert_eq!(r.families[0].commits, 1);
            p.backend.kernels[&Family::V4].dump(Family::V4)
        };

        let mut p = Proxier::new(cfg(), FakeBackend::default());
        p.cold_start_part = 3;
        // A failed first part leaves no table: the next sync starts in parts again.
        p.backend.fail_next = true;
        assert!(sync_v4(&mut p, &st).is_err());
        let r = sync_v4(&mut p, &st).unwrap();
        let fr = &r.families[0];
        assert!(r.full && fr.full);
        assert_eq!(
            (fr.commits, p.backend.commits),
            (6, 6),
            "the layout, 4 parts of at most 3 Services, then the base chains' rules"
        );
        assert_eq!(fr.stats.ops, p.backend.transactions.iter().map(|t| t.ops.len()).sum::<usize>());
        assert_eq!(p.backend.kernels[&Family::V4].dump(Family::V4), one_go(&st));
        // Each part adds whole Services (every port), none of another part.
        let names =
            |t: &Transaction| (0..10).filter(|i| t.to_string().contains(&format!("ns/s{i}/"))).collect::<Vec<_>>();
        assert_eq!(names(&p.backend.transactions[0]), Vec::<i32>::new(), "the layout holds no Service");
        assert!(p.backend.transactions[0].to_string().contains("172.30.0.0/16"), "ServiceCIDRs come with the layout");
        let parts: Vec<Vec<i32>> = p.backend.transactions[1..5].iter().map(names).collect();
        assert_eq!(parts, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]);
        // Until the last commit the base chains are empty, so no part is reachable from a hook;
        // the last commit adds their rules and nothing else.
        let base_chains: BTreeSet<&String> = (p.backend.transactions[0].ops.iter())
            .filter_map(|op| match op {
                rules::transaction::Op::AddChain { name, base: Some(_) } => Some(name),
                _ => None,
            })
            .collect();
        assert_eq!(base_chains.len(), 8);
        let base_rules = |t: &Transaction| {
            t.ops
                .iter()
                .filter(|op| matches!(op, rules::transaction::Op::AddRule { chain, .. } if base_chains.contains(chain)))
                .count()
        };
        for t in &p.backend.transactions[..5] {
            assert_eq!(base_rules(t), 0, "{t}");
        }
        let last = &p.backend.transactions[5];
        assert!(base_rules(last) > 0 && base_rules(last) == last.ops.len(), "{last}");
        for (t, part) in p.backend.transactions[1..5].iter().zip(parts) {
            let text = t.to_string();
            for i in part.iter().filter(|i| *i % 3 == 0) {
                assert!(text.contains(&format!("ns/s{i}/tcp/http")) && text.contains(&format!("ns/s{i}/tcp/https")));
            }
        }

        // A part that fails leaves the table half-built and the kernel state unknown: the next
        // sync replaces the table in one transaction.
        let mut q = Proxier::new(cfg(), FakeBackend::default());
        q.cold_start_part = 3;
        q.backend.fail_after_commits = Some(2);
        let e = sync_v4(&mut q, &st).unwrap_err();
        assert_eq!((e.report.families[0].commits, q.backend.commits), (3, 2), "layout, part 1, failed part 2");
        assert_eq!(sync_v4(&mut q, &st).unwrap().families[0].commits, 1);
        assert_eq!(q.backend.kernels[&Family::V4].dump(Family::V4), one_go(&st));

        // A restart finds the table; with a backend that has no second table, the replacement
        // is one transaction (see the next test for restarts in parts).
        let mut again = Proxier::new(cfg(), std::mem::take(&mut p.backend));
        again.cold_start_part = 3;
        let r = sync_v4(&mut again, &st).unwrap();
        assert_eq!(r.families[0].commits, 1);

        // A Service taking another's ClusterIP:port in a later part: the parts end with one full
        // diff, and the kernel is what one transaction gives.
        let clash = ServicePort::cluster_ip("ns", "s9", "http", Protocol::Tcp, "172.30.0.1", 80);
        st.services.remove(&clash.name);
        st.add_service(clash);
        let mut p = Proxier::new(cfg(), FakeBackend::default());
        p.cold_start_part = 3;
        sync_v4(&mut p, &st).unwrap();
        assert_eq!(p.backend.kernels[&Family::V4].dump(Family::V4), one_go(&st));
    }

    /// A restart over an existing table goes in parts through the second table (layout + parts
    /// into `kproxy-restart`, the old `kube-proxy` deleted, layout + parts into `kube-proxy`,
    /// `kproxy-restart` deleted) and ends with what one transaction gives and no second table.
    /// A failure at any of its commits fails the sync; the next sync replaces `kube-proxy` whole
    /// (in one transaction, or in parts when it is gone) and removes the second table.
    #[test]
    fn a_restart_goes_in_parts_through_a_second_table_and_recovers_from_a_failure_at_any_step() {
        let mut st = ClusterState::default();
        for i in 0..7u8 {
            let sp =
                ServicePort::cluster_ip("ns", &format!("s{i}"), "http", Protocol::Tcp, &format!("172.30.0.{i}"), 80);
            st.add_service(sp.clone());
            st.add_endpoint(&sp.name, Endpoint::ready(&format!("10.1.0.{i}"), 8080));
        }
        let mut old = st.clone();
        let gone = ServicePort::cluster_ip("ns", "gone", "http", Protocol::Tcp, "172.30.0.99", 80);
        old.add_service(gone);
        let one_go = |st: &ClusterState| {
            let mut p = Proxier::new(cfg(), FakeBackend::default());
            p.cold_start_part = usize::MAX;
            sync_v4(&mut p, st).unwrap();
            p.backend.kernels[&Family::V4].dump(Family::V4)
        };
        let want = one_go(&st);
        // A node whose kube-proxy table holds `old`, and a fresh kproxy with parts of 3.
        let restarted = |fail_after: Option<usize>| {
            let mut first = Proxier::new(cfg(), FakeBackend { tables: true, ..Default::default() });
            sync_v4(&mut first, &old).unwrap();
            let mut backend = std::mem::take(&mut first.backend);
            backend.commits = 0;
            backend.fail_after_commits = fail_after;
            let mut p = Proxier::new(cfg(), backend);
            p.cold_start_part = 3;
            p
        };
        let no_second_table =
            |p: &Proxier<FakeBackend>| p.backend.kernel_of(Family::V4, RESTART_TABLE).is_none_or(|k| !k.has_table());

        let mut p = restarted(None);
        let r = sync_v4(&mut p, &st).unwrap();
        // Parts of 3 with a first part of 3 (parts under 10 are not shortened): 7 Services = 3,
        // between the layout and the base chains' rules, into each table; and the two deletes.
        assert_eq!(r.families[0].commits, 2 * (1 + 3 + 1) + 2, "{:?}", r.families[0]);
        assert_eq!(p.backend.kernel_of(Family::V4, rules::ir::TABLE).unwrap().dump(Family::V4), want);
        assert!(no_second_table(&p));
        assert_eq!(p.backend.table, rules::ir::TABLE, "the backend is left on kube-proxy");

        for step in 0..12 {
            let mut p = restarted(Some(step));
            assert!(sync_v4(&mut p, &st).is_err(), "failure at commit {step}");
            assert_eq!(p.backend.table, rules::ir::TABLE, "failure at commit {step}: back on kube-proxy");
            sync_v4(&mut p, &st).unwrap_or_else(|e| panic!("after a failure at commit {step}: {e}"));
            assert_eq!(
                p.backend.kernel_of(Family::V4, rules::ir::TABLE).unwrap().dump(Family::V4),
                want,
                "after a failure at commit {step}"
            );
            assert!(no_second_table(&p), "after a failure at commit {step}");
        }
    }

    /// Syncs from a tracker's changes are partial, and leave the kernel exactly as a full build of
    /// the same state would; a node change makes the next one full.
    #[test]
    fn tracker_changes_sync_partially_to_the_full_result() {
        use crate::model::ChangeTracker;
        let yaml = |y: &str| serde_yaml::from_str::<serde_yaml::Value>(y).unwrap();
        let svc = |name: &str, ip: &str| {
            serde_yaml::from_value(yaml(&format!(
                "metadata: {{namespace: ns, name: {name}}}\nspec: {{clusterIP: {ip}, type: NodePort, ports: [{{name: http, port: 80, nodePort: 3{}}}]}}",
                &ip[ip.len() - 4..].replace('.', "")
            )))
            .unwrap()
        };
        let slice = |name: &str, svc: &str, ips: &[&str]| {
            serde_yaml::from_value(yaml(&format!(
                "metadata: {{namespace: ns, name: {name}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]",
                ips.iter().map(|ip| format!("{{addresses: [{ip}]}}")).collect::<Vec<_>>().join(",")
            )))
            .unwrap()
        };
        let node = NodeInfo { name: "test-node".into(), ..Default::default() };
        let sync = |t: &mut ChangeTracker, p: &mut Proxier<FakeBackend>| {
            let changes = t.take_changes();
            let st = |f: Family| t.state(f);
            p.sync(&Inputs { state: &st, node: &node, local_ips: &[], changes: Some(&changes) }).unwrap();
            // The kernel equals a fresh full build of the same state.
            let full =
                desired(&p.cfg, Family::V4, &Inputs { state: &st, node: &node, local_ips: &[], changes: None }, None);
            let mut fresh = rules::fake::FakeKernel::new();
            fresh.apply(&rules::diff(None, &full.ruleset)).unwrap();
            assert_eq!(p.backend.kernels[&Family::V4].dump(Family::V4), fresh.dump(Family::V4));
        };
        // Kept whole, and stripped of its per-endpoint elements as large rulesets are.
        for strip in [false, true] {
            let mut t = ChangeTracker::new("test-node");
            let mut p = Proxier::new(cfg(), FakeBackend::default());
            p.strip = strip;
            t.upsert_service(&svc("a", "172.30.0.11")).unwrap();
            t.upsert_service(&svc("b", "172.30.0.12")).unwrap();
            t.upsert_slice(&slice("a-1", "a", &["10.1.0.1", "10.1.0.2"])).unwrap();
            t.upsert_slice(&slice("b-1", "b", &["10.1.0.2"])).unwrap();
            sync(&mut t, &mut p);
            assert_eq!(p.partial_syncs, 0, "the first sync is full");
            t.upsert_slice(&slice("a-1", "a", &["10.1.0.1", "10.1.0.3"])).unwrap();
            sync(&mut t, &mut p);
            assert_eq!(p.partial_syncs, 1);
            let sent = p.backend.transactions.last().unwrap().to_string();
            assert!(sent.contains("10.1.0.3") && !sent.contains("172.30.0.12"), "only a's change is sent:\n{sent}");
            t.upsert_service(&svc("c", "172.30.0.13")).unwrap();
            t.delete_service("ns", "b");
            sync(&mut t, &mut p);
            assert_eq!(p.partial_syncs, 2);
            let n = p.backend.transactions.len();
            sync(&mut t, &mut p);
            assert_eq!(p.backend.transactions.len(), n, "nothing changed, nothing sent");
            t.delete_slice("ns", "a-1");
            sync(&mut t, &mut p);
            assert_eq!(p.partial_syncs, 4);
            // The node changed: everything is rebuilt (and diffed).
            t.set_node(
                &serde_yaml::from_value(yaml("metadata: {name: test-node, labels: {topology.kubernetes.io/zone: z}}"))
                    .unwrap(),
            )
            .unwrap();
            sync(&mut t, &mut p);
            assert_eq!(p.partial_syncs, 4);
        }
    }
}
