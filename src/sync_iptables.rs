//! The iptables-mode engine: the same sync loop as nftables mode ([`crate::sync::Engine`]), with
//! `rules::iptables` building upstream's iptables-mode layout and `iptables-restore --noflush`
//! applying it.
//!
//! Per family: a partial restore (the fixed chains and the service chains that changed since the
//! last successful restore) while the kernel is known to hold what we last wrote; a full one
//! (every chain, the jump rules ensured, stale service chains deleted) at start, after a failed
//! restore, when a canary chain went missing (someone flushed the tables), and at least once an
//! hour (upstream's FullSyncPeriod). iptables-restore commits each table atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use rules::iptables::IptRuleset;
use rules::model::{ClusterState, Family, NodePortAddresses};
use tracing::{debug, info, warn};

use crate::backend::iptables::{
    detect_flavour, ensure_route_localnet, is_own_chain, Binaries, Flavour, IptError, IptRunner, SavedTable,
    CANARY_CHAIN, CANARY_TABLES,
};
use crate::backend::nftables::ApplyStats;
use crate::config::{Config, NodePortSpec};
use crate::metrics::RulesetCounts;
use crate::sync::{families, Engine, FamilyReport, Inputs, IptablesReport, SyncError, SyncReport, UdpCleanups};

/// A full restore at least this often, as upstream (`proxyutil.FullSyncPeriod`).
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Opens one family's iptables, or says why it cannot.
type RunnerFactory = Box<dyn FnMut(Family) -> Result<Box<dyn IptRunner>, String> + Send>;

/// What the engine knows about one family.
struct FamilyState {
    bins: Box<dyn IptRunner>,
    /// What the kernel holds from our last successful restore; `None` = unknown (next is full).
    applied: Option<IptRuleset>,
    last_full: Option<Instant>,
    /// When the canaries of all three tables were last checked (see `sync_family`).
    last_canary_sweep: Option<Instant>,
}

/// The iptables-mode [`Engine`].
pub struct IptablesProxier {
    cfg: Config,
    /// Opens a family's iptables (the binaries of the flavour in use).
    runner: RunnerFactory,
    families: BTreeMap<Family, FamilyState>,
    udp: UdpCleanups,
    /// Whether IPv4 NodePorts answer on 127.0.0.1 (upstream `localhostNodePorts` and the
    /// nodeport addresses cover IPv4 loopback); `route_localnet` was set at start.
    localhost_nodeports: bool,
    /// `net.netfilter.nf_conntrack_tcp_be_liberal` is set: no DROP of INVALID packets in
    /// KUBE-FORWARD, as upstream (read once at start, as upstream).
    tcp_be_liberal: bool,
    /// The nfacct objects of upstream's packet counters exist: the rules count packets with
    /// `-m nfacct` and the counters are exported (see [`IptablesProxier::nfacct_counters`]).
    nfacct: bool,
}

/// Whether `--nodeport-addresses` covers 127.0.0.1 (upstream `ContainsIPv4Loopback`): every
/// address (no IPv4 CIDR given, or a /0), or a CIDR that contains it.
pub fn nodeports_cover_ipv4_loopback(spec: &NodePortSpec) -> bool {
    match spec {
        NodePortSpec::Primary => false,
        NodePortSpec::Cidrs(cidrs) => {
            let v4: Vec<_> = cidrs.iter().filter(|c| c.family() == Family::V4).collect();
            let lo: IpAddr = "127.0.0.1".parse().expect("literal");
            v4.is_empty() || v4.iter().any(|c| c.len == 0 || c.contains(&lo))
        }
    }
}

/// Creates the nfacct objects the rules count packets in (`ct_state_invalid_dropped_pkts`,
/// `localhost_nps_accepted_pkts`), as upstream's NewProxier does; false (logged once) when
/// nfacct does not work here, and the rules and metrics then leave them out, as upstream's.
/// The renderer's nfacct option covers both objects, so both must exist.
fn ensure_nfacct_objects() -> bool {
    let objects =
        [rules::iptables::NFACCT_CT_STATE_INVALID_DROPPED, rules::iptables::NFACCT_LOCALHOST_NODEPORTS_ACCEPTED];
    for name in objects {
        if let Err(e) = crate::backend::nfacct::ensure(name) {
            info!("nfacct is not available ({e}); nfacct based metrics won't be available");
            return false;
        }
    }
    true
}

impl IptablesProxier {
    /// Chooses the iptables flavour the node uses (logged), and sets `route_localnet=1` when
    /// localhost NodePorts are on, as upstream's NewProxier does.
    pub fn new(cfg: Config) -> Result<Self, IptError> {
        let (flavour, why) = detect_flavour();
        info!(flavour = flavour.name(), "iptables mode: using the {} iptables binaries ({why})", flavour.name());
        Self::with_flavour(cfg, flavour)
    }

    /// As [`IptablesProxier::new`] with the flavour given.
    pub fn with_flavour(cfg: Config, flavour: Flavour) -> Result<Self, IptError> {
        let mut localhost_nodeports = cfg.localhost_nodeports && nodeports_cover_ipv4_loopback(&cfg.nodeport);
        if localhost_nodeports {
            info!(
                "setting route_localnet=1 to allow node ports on localhost; to change this either disable \
                 iptables.localhostNodePorts (--iptables-localhost-nodeports) or set nodePortAddresses \
                 (--nodeport-addresses) to filter loopback addresses"
            );
            // Upstream exits here; a container without a writable /proc/sys (not privileged)
            // would then crash-loop, so kproxy goes on without localhost node ports instead.
            if let Err(e) = ensure_route_localnet() {
                warn!("{e}; node ports will not answer on localhost");
                localhost_nodeports = false;
            }
        }
        let tcp_be_liberal = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
            .is_ok_and(|v| v.trim().parse::<u32>().is_ok_and(|v| v != 0));
        if tcp_be_liberal {
            info!("nf_conntrack_tcp_be_liberal set, not installing DROP rules for INVALID packets");
        }
        let nfacct = ensure_nfacct_objects();
        Ok(IptablesProxier {
            cfg,
            runner: Box::new(move |family| {
                Binaries::find(flavour, family).map(|b| Box::new(b) as Box<dyn IptRunner>).ok_or_else(|| {
                    format!(
                        "no {} {} binaries (iptables-restore, iptables-save) installed",
                        family.label(),
                        flavour.name()
                    )
                })
            }),
            families: BTreeMap::new(),
            udp: UdpCleanups::default(),
            localhost_nodeports,
            tcp_be_liberal,
            nfacct,
        })
    }

    /// An engine on the given iptables (tests): no flavour detection, no sysctls.
    #[cfg(test)]
    fn with_runner(cfg: Config, runner: RunnerFactory) -> Self {
        IptablesProxier {
            cfg,
            runner,
            families: BTreeMap::new(),
            udp: UdpCleanups::default(),
            localhost_nodeports: false,
            tcp_be_liberal: false,
            nfacct: false,
        }
    }

    fn family(&mut self, family: Family) -> Result<&mut FamilyState, String> {
        if !self.families.contains_key(&family) {
            let bins = (self.runner)(family)?;
            self.families.insert(family, FamilyState { bins, applied: None, last_full: None, last_canary_sweep: None });
        }
        Ok(self.families.get_mut(&family).expect("inserted above"))
    }

    /// The desired ruleset of one family.
    fn build(&self, family: Family, state: &ClusterState, inputs: &Inputs<'_>) -> rules::iptables::BuiltIpt {
        let (mut node_ips, bc) = crate::sync::build_inputs(&self.cfg, family, inputs);
        let localhost = self.localhost_nodeports && family == Family::V4;
        // NodePort CIDRs that cover 127.0.0.1 include it (upstream GetNodeIPs); the resolver
        // leaves loopback out, as nftables mode never serves it.
        if localhost {
            if let (NodePortAddresses::Ips(_), NodePortSpec::Cidrs(cidrs)) =
                (&bc.nodeport_addresses, &self.cfg.nodeport)
            {
                for ip in inputs.local_ips.iter().filter(|ip| ip.is_ipv4() && ip.is_loopback()) {
                    if cidrs.iter().any(|c| c.contains(ip)) && !node_ips.contains(ip) {
                        node_ips.push(*ip);
                    }
                }
            }
        }
        let mut opts = rules::iptables::IptOptions::new(localhost);
        opts.conntrack_tcp_be_liberal = self.tcp_be_liberal;
        opts.nfacct = self.nfacct;
        rules::iptables::build_with(state, &node_ips, &bc, &opts)
    }

    /// Whether the nfacct objects exist, so that upstream's nfacct packet counters are to be
    /// exported ([`crate::metrics::Metrics::register_nfacct`]).
    pub fn nfacct_counters(&self) -> bool {
        self.nfacct
    }

    /// Forces the next sync of every family to be full.
    pub fn force_full(&mut self) {
        for f in self.families.values_mut() {
            f.applied = None;
        }
    }

    fn sync_family(&mut self, family: Family, inputs: &Inputs<'_>) -> (FamilyReport, Result<(), String>) {
        let t0 = Instant::now();
        let state = (inputs.state)(family);
        let built = self.build(family, state, inputs);
        for s in &built.skipped {
            warn!(family = family.label(), "skipping {s}");
        }
        let t1 = Instant::now();
        let mut fr = FamilyReport { build: t1 - t0, counts: counts(state, &built), ..FamilyReport::new(family, true) };
        let sweep_period = self.cfg.sync_period;
        let fs = match self.family(family) {
            Ok(fs) => fs,
            Err(e) => return (fr, Err(e)),
        };
        // The mangle canary before every sync, as upstream's monitor polls it (mangle is small,
        // so that costs ~10 ms however big the ruleset); all three at most every half sync
        // period, so every periodic resync checks them: with the nft-backed binaries, asking
        // about a chain of a big nat table fetches the table (~80 ms at 1k services, seconds at
        // 10k). Upstream never notices a flush of nat alone; we do, within a sync period.
        let sweep = fs.last_canary_sweep.is_none_or(|t| t.elapsed() >= sweep_period / 2);
        let tables = if sweep { &CANARY_TABLES[..] } else { &CANARY_TABLES[..1] };
        let canaries = tables.iter().all(|t| fs.bins.chain_exists(t, CANARY_CHAIN));
        if sweep {
            fs.last_canary_sweep = Some(Instant::now());
        }
        if !canaries && fs.applied.is_some() {
            warn!(family = family.label(), "a {CANARY_CHAIN} chain is gone (the tables were flushed?): full resync");
        }
        let period_due = fs.last_full.is_none_or(|t| t.elapsed() >= FULL_SYNC_PERIOD);
        let full = fs.applied.is_none() || !canaries || period_due;
        fr.full = full;
        let result = (|| -> Result<String, IptError> {
            if !full {
                return Ok(rules::iptables::restore_input(&built.ruleset, fs.applied.as_ref()));
            }
            // Full: the chains the jump rules lead to, the jump rules, the canaries; then every
            // chain, and the stale service chains of earlier runs deleted. What exists already
            // is read from one save per table, which spares most of the 30-odd `iptables -C`
            // and `-N` runs (a rule is checked with -C only when the save does not show it in
            // the form we write, which is also iptables-save's).
            let mut saved: BTreeMap<&str, SavedTable> = BTreeMap::new();
            for t in ["filter", "nat"] {
                saved.insert(t, SavedTable::parse(&fs.bins.save(t)?));
            }
            for (table, chain, rule) in rules::iptables::jump_rules(family) {
                let have = saved.get(table);
                let args = rules::iptables::split_args(&rule);
                if let Some(target) = args.iter().position(|a| a == "-j").and_then(|i| args.get(i + 1)) {
                    if !have.is_some_and(|s| s.chains.iter().any(|c| c == target)) {
                        fs.bins.ensure_chain(table, target)?;
                    }
                }
                let present = have.is_some_and(|s| s.rules.iter().any(|(c, r)| c == chain && *r == rule));
                if !present && fs.bins.ensure_rule(table, chain, &rule)? {
                    debug!(family = family.label(), table, chain, "inserted jump rule {rule}");
                }
            }
            if !canaries {
                for t in CANARY_TABLES {
                    fs.bins.ensure_chain(t, CANARY_CHAIN)?;
                }
            }
            let input = rules::iptables::restore_input(&built.ruleset, None);
            let mut stale: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for table in [&built.ruleset.filter, &built.ruleset.nat] {
                let want: BTreeSet<&str> = table.chains.iter().map(|c| c.name.as_str()).collect();
                let s: Vec<String> = saved[table.name]
                    .chains
                    .iter()
                    .filter(|c| !want.contains(c.as_str()) && is_service_chain(table.name, c))
                    .cloned()
                    .collect();
                stale.insert(table.name, s);
            }
            Ok(with_stale_chains_deleted(&input, &stale))
        })();
        let t2 = Instant::now();
        fr.diff = t2 - t1;
        let input = match result {
            Ok(i) => i,
            Err(e) => {
                fs.applied = None;
                return (fr, Err(e.to_string()));
            }
        };
        debug!(family = family.label(), full, "iptables-restore input:\n{input}");
        let lines = input.lines().count();
        fr.stats.ops = lines;
        fr.stats.rules_added = input.lines().filter(|l| l.starts_with("-A ")).count();
        fr.iptables = Some(IptablesReport {
            partial: !full,
            rules_total: [&built.ruleset.filter, &built.ruleset.nat]
                .iter()
                .map(|t| (t.name, t.chains.iter().map(|c| c.rules.len()).sum()))
                .collect(),
            rules_last: rules_written(&input),
        });
        let r = fs.bins.restore(&input);
        fr.apply = t2.elapsed();
        match r {
            Ok(()) => {
                fr.applied = ApplyStats { messages: lines, bytes: input.len() };
                fs.applied = Some(built.ruleset);
                if full {
                    fs.last_full = Some(t2);
                }
                (fr, Ok(()))
            }
            Err(e) => {
                // Each table is atomic, but an earlier table of the input may have been
                // committed: what the kernel holds is unknown, so the next restore is full.
                fs.applied = None;
                (fr, Err(e.to_string()))
            }
        }
    }
}

/// Per-service chains (the only ones a full sync deletes when no longer wanted).
fn is_service_chain(table: &str, chain: &str) -> bool {
    is_own_chain(table, chain) && rules::iptables::is_service_chain(chain)
}

/// `input` with `:CHAIN` (flush) and `-X CHAIN` lines for the stale chains of each table, before
/// that table's COMMIT: every stale chain is flushed before any is deleted, so a stale chain that
/// jumps to another stale one does not block its deletion.
pub fn with_stale_chains_deleted(input: &str, stale: &BTreeMap<&str, Vec<String>>) -> String {
    let mut out = String::with_capacity(input.len() + 64);
    let mut table: Option<&str> = None;
    for l in input.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = Some(t.trim());
        }
        if l == "COMMIT" {
            if let Some(chains) = table.and_then(|t| stale.get(t)) {
                for c in chains {
                    out.push_str(&format!(":{c} - [0:0]\n"));
                }
                for c in chains {
                    out.push_str(&format!("-X {c}\n"));
                }
            }
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// `-A` lines of the restore input, per table.
fn rules_written(input: &str) -> Vec<(&'static str, usize)> {
    let mut filter = 0;
    let mut nat = 0;
    let mut cur = "";
    for l in input.lines() {
        if let Some(t) = l.strip_prefix('*') {
            cur = if t.trim() == "filter" {
                "filter"
            } else if t.trim() == "nat" {
                "nat"
            } else {
                ""
            };
        } else if l.starts_with("-A ") {
            match cur {
                "filter" => filter += 1,
                "nat" => nat += 1,
                _ => {}
            }
        }
    }
    vec![("filter", filter), ("nat", nat)]
}

fn counts(state: &ClusterState, built: &rules::iptables::BuiltIpt) -> RulesetCounts {
    let rs = &built.ruleset;
    let tables = [&rs.filter, &rs.nat];
    RulesetCounts {
        service_ports: state.services.len(),
        endpoints: state.endpoints.values().map(Vec::len).sum(),
        chains: tables.iter().map(|t| t.chains.len()).sum(),
        rules: tables.iter().flat_map(|t| t.chains.iter()).map(|c| c.rules.len()).sum(),
        sets: 0,
        elements: 0,
        no_local_internal: built.no_local_endpoints.internal,
        no_local_external: built.no_local_endpoints.external,
    }
}

impl Engine for IptablesProxier {
    /// Builds and restores every family; a family whose restore fails keeps its old tables (each
    /// table is atomic) and is restored in full next time; the other families still sync.
    fn sync(&mut self, inputs: &Inputs<'_>) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        let mut first_err: Option<(&'static str, String)> = None;
        let mut fams = families(&self.cfg, inputs);
        for f in self.families.keys() {
            if !fams.contains(f) && self.families[f].applied.is_some() {
                fams.push(*f);
            }
        }
        for family in fams {
            let (mut fr, r) = self.sync_family(family, inputs);
            match r {
                Ok(()) => self.udp.synced(family, (inputs.state)(family)),
                Err(e) => {
                    self.udp.apply_failed(family);
                    fr.error = Some(e.clone());
                    first_err.get_or_insert((family.label(), e));
                }
            }
            report.push(fr);
        }
        report.finish(first_err.map(|(family, e)| (family, e.into())))
    }
    fn force_full(&mut self) {
        IptablesProxier::force_full(self)
    }
    fn udp(&mut self) -> &mut UdpCleanups {
        &mut self.udp
    }
}

/// An engine that, after its first fully successful sync, removes the other proxy mode's rules
/// once. Removing them only after our own rules are in place means a mode switch never leaves a
/// moment with neither mode's rules (upstream cleans up before its first sync instead); while
/// both exist, whichever DNATs first wins and the other no longer matches the rewritten packet.
pub struct CleanupAfterFirstSync<E> {
    inner: E,
    cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl<E: Engine> CleanupAfterFirstSync<E> {
    pub fn new(inner: E, cleanup: impl FnOnce() + Send + 'static) -> Self {
        CleanupAfterFirstSync { inner, cleanup: Some(Box::new(cleanup)) }
    }
}

impl<E: Engine> Engine for CleanupAfterFirstSync<E> {
    fn sync(&mut self, inputs: &Inputs<'_>) -> Result<SyncReport, SyncError> {
        let r = self.inner.sync(inputs);
        if r.is_ok() {
            if let Some(c) = self.cleanup.take() {
                c();
            }
        }
        r
    }
    fn force_full(&mut self) {
        self.inner.force_full()
    }
    fn udp(&mut self) -> &mut UdpCleanups {
        self.inner.udp()
    }
    // Every method forwarded, defaults included: the trait's default would silently skip the
    // inner engine's own.
    fn compact(&mut self) {
        self.inner.compact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::model::{Endpoint, Protocol, ServicePort};
    use std::sync::{Arc, Mutex};

    /// A fake family's iptables: chain names per table, the restores it was fed, an injectable
    /// restore failure. Restores apply `:CHAIN` (create) and `-X CHAIN` (delete) lines.
    #[derive(Default)]
    struct FakeIpt {
        chains: BTreeMap<String, BTreeSet<String>>,
        restores: Vec<String>,
        fail_next: bool,
        rules_inserted: usize,
    }

    struct FakeRunner(Arc<Mutex<FakeIpt>>);

    impl IptRunner for FakeRunner {
        fn chain_exists(&self, table: &str, chain: &str) -> bool {
            self.0.lock().unwrap().chains.get(table).is_some_and(|c| c.contains(chain))
        }
        fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), IptError> {
            self.0.lock().unwrap().chains.entry(table.into()).or_default().insert(chain.into());
            Ok(())
        }
        fn ensure_rule(&self, _table: &str, _chain: &str, _rule: &str) -> Result<bool, IptError> {
            self.0.lock().unwrap().rules_inserted += 1;
            Ok(true)
        }
        fn save(&self, table: &str) -> Result<String, IptError> {
            let f = self.0.lock().unwrap();
            let chains = f.chains.get(table).cloned().unwrap_or_default();
            Ok(format!("*{table}\n{}COMMIT\n", chains.iter().map(|c| format!(":{c} - [0:0]\n")).collect::<String>()))
        }
        fn restore(&self, input: &str) -> Result<(), IptError> {
            let mut f = self.0.lock().unwrap();
            f.restores.push(input.to_string());
            if std::mem::take(&mut f.fail_next) {
                return Err(IptError::Restore {
                    program: "fake".into(),
                    status: "exit status: 1".into(),
                    stderr: "iptables-restore: line 3 failed".into(),
                    line: Some(3),
                    context: format!("\n{}", crate::backend::iptables::line_context(input, 3)),
                });
            }
            let mut table = String::new();
            for l in input.lines() {
                if let Some(t) = l.strip_prefix('*') {
                    table = t.to_string();
                } else if let Some(c) = l.strip_prefix(':') {
                    let name = c.split_whitespace().next().unwrap().to_string();
                    f.chains.entry(table.clone()).or_default().insert(name);
                } else if let Some(c) = l.strip_prefix("-X ") {
                    f.chains.entry(table.clone()).or_default().remove(c.trim());
                }
            }
            Ok(())
        }
    }

    fn engine(fake: &Arc<Mutex<FakeIpt>>) -> IptablesProxier {
        let cfg = crate::sync::test_config(&["--proxy-mode", "iptables"]);
        let f = fake.clone();
        IptablesProxier::with_runner(
            cfg,
            Box::new(move |family| match family {
                Family::V4 => Ok(Box::new(FakeRunner(f.clone())) as Box<dyn IptRunner>),
                Family::V6 => Err("no IPv6 here".into()),
            }),
        )
    }

    fn state(endpoints: &[&str]) -> ClusterState {
        let mut s = ClusterState::default();
        let sp = ServicePort::cluster_ip("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80);
        s.add_service(sp.clone());
        for ip in endpoints {
            s.add_endpoint(&sp.name, Endpoint::ready(ip, 80));
        }
        s
    }

    fn sync(e: &mut IptablesProxier, st: &ClusterState) -> Result<SyncReport, SyncError> {
        crate::sync::sync_v4(e, st)
    }

    #[test]
    fn full_then_partial_then_full_after_a_failure_or_a_lost_canary() {
        let fake = Arc::new(Mutex::new(FakeIpt::default()));
        // A chain of an earlier run, which the first (full) sync deletes.
        fake.lock().unwrap().chains.entry("nat".into()).or_default().insert("KUBE-SEP-OLDOLDOLDOLDOLDO".into());
        let mut e = engine(&fake);
        let r = sync(&mut e, &state(&["10.1.0.1", "10.1.0.2"])).unwrap();
        let f = &r.families[0];
        assert!(f.full && !f.iptables.as_ref().unwrap().partial);
        let first = fake.lock().unwrap().restores.last().unwrap().clone();
        assert!(
            first.contains(":KUBE-SEP-OLDOLDOLDOLDOLDO - [0:0]\n") && first.contains("-X KUBE-SEP-OLDOLDOLDOLDOLDO\n")
        );
        assert!(fake.lock().unwrap().rules_inserted > 0, "the jump rules are ensured on a full sync");
        for t in CANARY_TABLES {
            assert!(fake.lock().unwrap().chains[t].contains(CANARY_CHAIN), "canary in {t}");
        }
        let nat_total = f.iptables.as_ref().unwrap().rules_total.iter().find(|(t, _)| *t == "nat").unwrap().1;
        assert!(nat_total > 0);
        assert_eq!(f.applied.messages, first.lines().count());
        assert_eq!(f.applied.bytes, first.len());

        // One endpoint goes: partial, its chain deleted, fewer lines than the full restore.
        let inserted = fake.lock().unwrap().rules_inserted;
        let r = sync(&mut e, &state(&["10.1.0.1"])).unwrap();
        let f = &r.families[0];
        assert!(!f.full && f.iptables.as_ref().unwrap().partial, "{f:?}");
        let partial = fake.lock().unwrap().restores.last().unwrap().clone();
        assert!(partial.lines().count() < first.lines().count());
        assert!(partial.contains("-X KUBE-SEP-"), "{partial}");
        assert_eq!(fake.lock().unwrap().rules_inserted, inserted, "partial syncs leave the jump rules alone");

        // A failed restore: the error names the line; the next sync is full.
        fake.lock().unwrap().fail_next = true;
        let err = sync(&mut e, &state(&["10.1.0.1", "10.1.0.3"])).unwrap_err();
        let msg = err.report.families[0].error.clone().unwrap();
        assert!(msg.contains("line 3 failed") && msg.contains(">     3: "), "{msg}");
        assert!(!err.report.families[0].full);
        let r = sync(&mut e, &state(&["10.1.0.1", "10.1.0.3"])).unwrap();
        assert!(r.families[0].full, "the sync after a failed restore is full");
        assert!(!sync(&mut e, &state(&["10.1.0.1", "10.1.0.3"])).unwrap().families[0].full);

        // Someone flushes the tables: the mangle canary is gone, the next sync is full and
        // puts the canaries back.
        fake.lock().unwrap().chains.clear();
        let r = sync(&mut e, &state(&["10.1.0.1", "10.1.0.3"])).unwrap();
        assert!(r.families[0].full, "a missing canary makes the sync full");
        assert!(fake.lock().unwrap().chains["mangle"].contains(CANARY_CHAIN));
        assert!(!sync(&mut e, &state(&["10.1.0.1", "10.1.0.3"])).unwrap().families[0].full);

        // force_full (node labels changed) also means full.
        e.force_full();
        assert!(sync(&mut e, &state(&["10.1.0.1", "10.1.0.3"])).unwrap().families[0].full);

        // An hour after the last full sync, the next one is full again (upstream FullSyncPeriod).
        assert!(!sync(&mut e, &state(&["10.1.0.1", "10.1.0.3"])).unwrap().families[0].full);
        if let Some(long_ago) = Instant::now().checked_sub(FULL_SYNC_PERIOD) {
            e.families.get_mut(&Family::V4).unwrap().last_full = Some(long_ago);
            assert!(sync(&mut e, &state(&["10.1.0.1", "10.1.0.3"])).unwrap().families[0].full);
        }
    }

    #[test]
    fn stale_chains_are_flushed_then_deleted_before_their_tables_commit() {
        let input =
            "*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j X\nCOMMIT\n";
        let mut stale = BTreeMap::new();
        stale.insert("nat", vec!["KUBE-SVC-A".to_string(), "KUBE-SEP-B".to_string()]);
        stale.insert("filter", vec![]);
        assert_eq!(
            with_stale_chains_deleted(input, &stale),
            "*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j X\n\
             :KUBE-SVC-A - [0:0]\n:KUBE-SEP-B - [0:0]\n-X KUBE-SVC-A\n-X KUBE-SEP-B\nCOMMIT\n"
        );
        assert_eq!(rules_written(input), vec![("filter", 0), ("nat", 1)]);
    }

    #[test]
    fn the_other_modes_rules_are_removed_once_after_the_first_successful_sync() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let cfg = {
            use clap::Parser;
            crate::config::Flags::try_parse_from(["kproxy", "--manifests", "/nonexistent", "--hostname-override", "n"])
                .unwrap()
                .into_config()
                .unwrap()
        };
        let mut inner = crate::sync::Proxier::new(cfg, crate::sync::FakeBackend::default());
        inner.backend.fail_next = true;
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let mut e = CleanupAfterFirstSync::new(inner, move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        let node = rules::model::NodeInfo { name: "n".into(), ..Default::default() };
        let empty = ClusterState::default();
        let state = |_f: Family| &empty;
        let inputs = Inputs { state: &state, node: &node, local_ips: &[], changes: None };
        assert!(e.sync(&inputs).is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 0, "not after a failed sync");
        e.sync(&inputs).unwrap();
        e.sync(&inputs).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "once, after the first successful sync");
    }

    #[test]
    fn localhost_nodeports_need_loopback_in_the_nodeport_addresses() {
        let c = |s: &str| rules::model::Cidr::parse(s).unwrap();
        assert!(nodeports_cover_ipv4_loopback(&NodePortSpec::Cidrs(vec![])));
        assert!(nodeports_cover_ipv4_loopback(&NodePortSpec::Cidrs(vec![c("fd00::/64")])));
        assert!(nodeports_cover_ipv4_loopback(&NodePortSpec::Cidrs(vec![c("127.0.0.0/8")])));
        assert!(!nodeports_cover_ipv4_loopback(&NodePortSpec::Cidrs(vec![c("192.168.0.0/16")])));
        assert!(!nodeports_cover_ipv4_loopback(&NodePortSpec::Primary));
    }
}
