//! The running daemon: wires a source to the change tracker and the sync loop, and the one-shot
//! modes (`--dry-run`, `--cleanup`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rules::model::Family;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::backend::conntrack::ConntrackCleaner;
use crate::backend::nftables::NftablesBackend;
use crate::config::{Config, ProxyMode};
use crate::http::service_health::{listen_addresses, ServiceKey};
use crate::http::Observer;
use crate::localaddrs::local_addresses;
use crate::metrics::Metrics;
use crate::model::ChangeTracker;
use crate::source::files::{load_dir, DirWatcher, Stamps};
use crate::sync::{build_inputs, families, log_report, Engine, Event, FaultHook, Inputs, Pacer, Proxier, UdpCleanups};
use crate::sync_iptables::{CleanupAfterFirstSync, IptablesProxier};

impl crate::sync::Backend for NftablesBackend {
    fn apply(
        &mut self,
        tx: &rules::Transaction,
    ) -> Result<crate::backend::nftables::ApplyStats, Box<dyn std::error::Error + Send + Sync>> {
        NftablesBackend::apply(self, tx).map_err(|e| e.into())
    }
    fn table_exists(&mut self, family: rules::model::Family) -> Option<bool> {
        NftablesBackend::table_exists(self, family)
    }
    fn set_table(&mut self, table: &str) -> bool {
        NftablesBackend::set_table(self, table);
        true
    }
    fn preparer(&mut self, family: rules::model::Family) -> Option<crate::backend::nftables::Preparer> {
        Some(NftablesBackend::preparer(self, family))
    }
    fn apply_ready(
        &mut self,
        part: &crate::sync::Ready,
    ) -> Result<crate::backend::nftables::ApplyStats, Box<dyn std::error::Error + Send + Sync>> {
        match part {
            crate::sync::Ready::Tx(tx) => NftablesBackend::apply(self, tx).map_err(|e| e.into()),
            crate::sync::Ready::Lowered(p) => NftablesBackend::apply_prepared(self, p).map_err(|e| e.into()),
        }
    }
}

/// How often the manifests directory is checked for changes (changes show within 1 s).
const MANIFEST_POLL: Duration = Duration::from_millis(250);

/// Loads the manifests directory into a tracker, logging (and counting, given metrics) every
/// rejected object once per load.
fn load_into(cfg: &Config, tracker: &mut ChangeTracker, metrics: Option<&Metrics>) -> (bool, Stamps) {
    let dir = cfg.manifests.as_ref().expect("manifests source");
    let started = Instant::now();
    let mut snap = load_dir(dir);
    let read = started.elapsed();
    let stamps = std::mem::take(&mut snap.stamps);
    let counts = (snap.services.len(), snap.slices.len(), snap.nodes.len(), snap.skipped);
    // ServiceCIDR objects in the directory play the part the API's ServiceCIDRs play.
    let cidrs_changed = tracker.set_service_cidrs(snap.service_cidrs.iter().copied());
    let (changed, rejected) = tracker.replace_converted(snap.services, snap.slices, snap.nodes, &cfg.hostname);
    let changed = changed || cidrs_changed;
    info!(
        dir = %dir.display(),
        services = counts.0,
        endpoint_slices = counts.1,
        nodes = counts.2,
        not_proxied = counts.3,
        rejected = snap.rejected.len() + rejected.len(),
        changed,
        read_ms = read.as_secs_f64() * 1e3,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "read the manifests"
    );
    for r in snap.rejected.iter().chain(&rejected) {
        warn!(kind = r.kind, object = %r.object(), "skipping {r}");
        if let Some(m) = metrics {
            m.object_rejected(r);
        }
    }
    (changed, stamps)
}

/// `--dry-run`: the full transaction of every family as an nft script.
pub fn dry_run(cfg: &Config) -> String {
    let mut tracker = ChangeTracker::new(&cfg.hostname);
    load_into(cfg, &mut tracker, None);
    let node = tracker.node();
    // Touch nothing: NodePort CIDRs are matched against the Node object's addresses, not this
    // machine's interfaces, so the output is the same wherever it is printed.
    let local_ips = node.addresses.clone();
    let state = |f: Family| tracker.state(f);
    let inputs = Inputs { state: &state, node: &node, local_ips: &local_ips, changes: None };
    let mut out = String::new();
    for family in families(cfg, &inputs) {
        if cfg.mode == ProxyMode::Iptables {
            out.push_str(&dry_run_iptables(cfg, family, &inputs));
            continue;
        }
        let built = crate::sync::desired(cfg, family, &inputs, None);
        for s in &built.skipped {
            warn!("skipping {s}");
        }
        out.push_str(&rules::diff(None, &built.ruleset).to_string());
    }
    out
}

/// `--dry-run --proxy-mode iptables`, one family: a comment line naming the tool that takes the
/// text (`# iptables-restore` for IPv4, `# ip6tables-restore` for IPv6), then the full input of
/// `iptables-restore --noflush` (`*filter` … `COMMIT`, `*nat` … `COMMIT`). Each family's part is
/// valid restore input on its own; the jump rules from the built-in chains are not part of it.
fn dry_run_iptables(cfg: &Config, family: Family, inputs: &Inputs<'_>) -> String {
    let (node_ips, bc) = build_inputs(cfg, family, inputs);
    let built = rules::iptables::build((inputs.state)(family), &node_ips, &bc, cfg.localhost_nodeports);
    for s in &built.skipped {
        warn!("skipping {s}");
    }
    let tool = match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    };
    format!("# {tool}\n{}", rules::iptables::restore_input(&built.ruleset, None))
}

/// `--cleanup`: delete the `kube-proxy` table of both families, and iptables mode's chains and
/// jump rules (ours and upstream's).
pub fn cleanup() -> Result<(), CleanupError> {
    // Both halves run even when the first fails (a kernel without nf_tables still has iptables
    // leftovers to remove); the first error is returned.
    let nft = (|| {
        let mut b = NftablesBackend::new()?;
        for f in [Family::V4, Family::V6] {
            b.delete_tables(f)?;
            info!(
                family = f.label(),
                "deleted table {} {} (and {}, if any)",
                f.nft(),
                rules::ir::TABLE,
                rules::ir::RESTART_TABLE
            );
        }
        Ok::<(), crate::backend::nftables::NftError>(())
    })();
    let ipt = crate::backend::iptables::remove_leftovers();
    nft?;
    ipt?;
    Ok(())
}

/// `--cleanup` failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("deleting the nftables tables: {0}")]
    Nftables(#[from] crate::backend::nftables::NftError),
    #[error("deleting the iptables-mode chains: {0}")]
    Iptables(#[from] crate::backend::iptables::IptError),
}

/// The files source: poll the directory, reload everything on change.
fn spawn_files_source(
    cfg: &Config,
    tracker: Arc<Mutex<ChangeTracker>>,
    tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
) {
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let dir = cfg.manifests.clone().expect("manifests source");
        // Started from what the first load read (not by reading every file once more before it).
        let mut watcher: Option<DirWatcher> = None;
        let mut tick = tokio::time::interval(MANIFEST_POLL);
        loop {
            tick.tick().await;
            if watcher.as_mut().is_some_and(|w| !w.changed()) {
                continue;
            }
            let (changed, stamps) = load_into(&cfg, &mut tracker.lock().expect("tracker lock"), Some(&metrics));
            if watcher.is_none() {
                watcher = Some(DirWatcher::from_stamps(&dir, stamps));
                if tx.send(Event::Synced).await.is_err() {
                    return;
                }
            } else if changed && tx.send(Event::Changed).await.is_err() {
                return;
            }
        }
    });
}

/// Deletes the stale UDP conntrack flows of the families the last sync asked for (cases
/// 102-106). The ctnetlink socket is opened on first use and again after a failure; a failure is
/// logged, retried after the next sync, and never fails the sync.
fn clean_conntrack(cleaner: &mut Option<ConntrackCleaner>, udp: &mut UdpCleanups, metrics: &Metrics) {
    for (family, stale) in udp.take() {
        if cleaner.is_none() {
            match ConntrackCleaner::new() {
                Ok(c) => *cleaner = Some(c),
                Err(e) => {
                    warn!(family = family.label(), "cannot clean stale UDP conntrack entries: {e}");
                    udp.failed(family);
                    continue;
                }
            }
        }
        let c = cleaner.as_mut().expect("opened above");
        let started = Instant::now();
        match c.clean_stale_udp(family, &stale) {
            Ok(n) => {
                metrics.conntrack_deleted(family, n as u64);
                if n > 0 {
                    info!(
                        family = family.label(),
                        deleted = n,
                        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                        "deleted stale UDP conntrack entries"
                    );
                }
            }
            Err(e) => {
                warn!(family = family.label(), "cleaning stale UDP conntrack entries failed (tried again later): {e}");
                udp.failed(family);
                // The socket may be out of step with the kernel: open a fresh one next time.
                *cleaner = None;
            }
        }
    }
}

/// One health check per Service over the programmed families: a dual-stack Service counts its
/// local ready endpoints of both (IPv4 and IPv6 addresses never coincide, so the sum is the
/// per-IP count upstream's shared health server reports).
fn merge_health_checks(
    per_family: BTreeMap<Family, BTreeMap<ServiceKey, rules::health::HealthCheck>>,
    families: &[Family],
) -> BTreeMap<ServiceKey, rules::health::HealthCheck> {
    let mut out: BTreeMap<ServiceKey, rules::health::HealthCheck> = BTreeMap::new();
    for (_, checks) in per_family.into_iter().filter(|(f, _)| families.contains(f)) {
        for (k, c) in checks {
            match out.get_mut(&k) {
                Some(have) => have.local_endpoints += c.local_endpoints,
                None => {
                    out.insert(k, c);
                }
            }
        }
    }
    out
}

/// Runs until SIGTERM/SIGINT: watch the source, sync on change, resync periodically.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let mut nfacct_counters = false;
    let mut proxier: Box<dyn Engine> = match cfg.mode {
        // The other mode's rules (ours or upstream's) go once this mode's are in place.
        ProxyMode::Nftables => {
            let mut p = Proxier::new(cfg.clone(), FaultHook::from_env(NftablesBackend::new()?));
            if let Some(n) = crate::sync::cold_start_part_from_env() {
                p.cold_start_part = n;
            }
            Box::new(CleanupAfterFirstSync::new(p, crate::backend::iptables::remove_leftovers_logged))
        }
        ProxyMode::Iptables => {
            let ipt = IptablesProxier::new(cfg.clone())?;
            nfacct_counters = ipt.nfacct_counters();
            Box::new(CleanupAfterFirstSync::new(ipt, crate::backend::iptables::remove_nftables_tables_logged))
        }
    };
    // Stale UDP flows are deleted over ctnetlink after each sync; opened lazily (see
    // `clean_conntrack`), so a kernel without conntrack netlink does not stop the proxy.
    let mut conntrack: Option<ConntrackCleaner> = None;
    let tracker = Arc::new(Mutex::new(ChangeTracker::new(&cfg.hostname)));
    let (tx, mut rx) = mpsc::channel::<Event>(16);
    let mut obs = Observer::new(&cfg)?;
    if nfacct_counters {
        obs.metrics.register_nfacct()?;
    }
    obs.start_servers(&cfg)?;

    match &cfg.manifests {
        Some(_) => spawn_files_source(&cfg, tracker.clone(), tx, obs.metrics.clone()),
        None => {
            let client = crate::source::kube::client_with_metrics(
                cfg.kubeconfig.as_deref(),
                cfg.master.as_deref(),
                cfg.kube_api_qps,
                cfg.kube_api_burst,
                Some(obs.metrics.clone()),
            )
            .await?;
            info!("watching the Kubernetes API for Services, EndpointSlices, ServiceCIDRs and node {}", cfg.hostname);
            tokio::spawn(crate::source::kube::run(client, cfg.hostname.clone(), tracker.clone(), tx));
        }
    }

    let mut pacer = Pacer::new(cfg.min_sync_period, cfg.sync_period, Instant::now());
    let mut initialized = false;
    let mut pending = false;
    let mut last_node_labels = None;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    obs.loop_started();
    loop {
        let now = Instant::now();
        let deadline = if pending { pacer.earliest(now) } else { pacer.next_periodic };
        tokio::select! {
            ev = rx.recv() => {
                match ev {
                    Some(Event::Synced) => { initialized = true; pending = true; }
                    Some(Event::Changed) => { pending = true; }
                    None => anyhow::bail!("the object source stopped"),
                }
                obs.changed(&tracker.lock().expect("tracker lock"));
            },
            _ = tokio::time::sleep_until(deadline.into()), if initialized => {
                let started = Instant::now();
                let (result, taken) = {
                    let mut t = tracker.lock().expect("tracker lock");
                    let taken = obs.sync_starting(&mut t);
                    let node = t.node();
                    // A change of the node's labels (topology) calls for a full resync, as upstream.
                    if last_node_labels.as_ref().is_some_and(|l| *l != node.labels) {
                        proxier.force_full();
                    }
                    last_node_labels = Some(node.labels.clone());
                    let local_ips = local_addresses();
                    let changes = t.take_changes();
                    let tr: &ChangeTracker = &t;
                    let state = |f: Family| tr.state(f);
                    let result = proxier.sync(&Inputs {
                        state: &state,
                        node: &node,
                        local_ips: &local_ips,
                        changes: Some(&changes),
                    });
                    let report = match &result { Ok(r) => r, Err(e) => &e.report };
                    let fams: Vec<Family> = report.families.iter().map(|f| f.family).collect();
                    let addrs = listen_addresses(&cfg, &fams, &node.primary_ips, &local_ips);
                    // Each family's health checks, from the state the sync built from.
                    let checks = fams.iter().map(|f| (*f, rules::health::health_checks(&[tr.state(*f)], &cfg.hostname)));
                    let checks = merge_health_checks(checks.collect(), &fams);
                    obs.service_health.update(&checks, &addrs);
                    (result, taken)
                };
                pending = false;
                obs.sync_done(&result, started, taken);
                let big_full = result.as_ref().is_ok_and(|r| r.big_full);
                // Logged as the sync ends: the kernel holds the rules now, whatever follows.
                match result {
                    Ok(report) => {
                        log_report(&report, started.elapsed());
                        pacer.record(started, true);
                    }
                    Err(e) => {
                        error!("sync failed, the kernel keeps the previous rules; retrying in full in {:?}: {e}", cfg.sync_period);
                        pacer.record(started, false);
                    }
                }
                if big_full {
                    // Lay out what is kept densely and give the rest back (see crate::memory).
                    let t0 = Instant::now();
                    crate::memory::release_free_memory();
                    let mut t = tracker.lock().expect("tracker lock");
                    let fresh = crate::memory::on_fresh_heap(|| t.dense_copy());
                    *t = fresh;
                    drop(t);
                    proxier.compact();
                    crate::memory::release_free_memory();
                    info!(elapsed_ms = t0.elapsed().as_secs_f64() * 1e3, "compacted the state kept after a large sync");
                }
                // After the apply, so the next datagram of a deleted flow meets the new rules.
                clean_conntrack(&mut conntrack, proxier.udp(), &obs.metrics);
            },
            _ = tokio::signal::ctrl_c() => { info!("interrupted; leaving the rules in place"); return Ok(()); }
            _ = sigterm.recv() => { info!("terminated; leaving the rules in place"); return Ok(()); }
        }
    }
}
