//! `memory`: where the daemon's long-lived memory goes, in bytes the allocator was asked for (not
//! resident pages), so the numbers are exact and repeatable on a noisy machine. The same steps as
//! the daemon's first sync from manifests: API objects → the tracker (`replace_all`) → one full
//! sync (nftables mode, into a backend that discards the transaction) → the compaction the daemon
//! does after a big sync. Each component is the growth of the live heap while it is made, with
//! the transient inputs dropped first. `load_peak` is the most held while all API objects and the
//! tracker were alive (the files source's way; the API source converts objects as they arrive);
//! `sync_peak` what the first sync held on top of the model at most.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

use kproxy::model::ChangeTracker;
use kproxy::sync::{Backend, Engine, Inputs, Proxier};
use rules::model::{Family, NodeInfo};
use rules::transaction::Transaction;

/// mimalloc (the daemon's allocator) that counts live bytes while [`COUNTING`] is on. Off, it
/// costs one relaxed load per call, so the timing benches are unaffected.
pub struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to mimalloc unchanged; the counter does not touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size() as isize);
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size() as isize);
        unsafe { mimalloc::MiMalloc.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(-(l.size() as isize));
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new as isize - l.size() as isize);
        unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
    }
}

fn count(n: isize) {
    if COUNTING.load(Relaxed) {
        let now = LIVE.fetch_add(n, Relaxed) + n;
        PEAK.fetch_max(now, Relaxed);
    }
}

fn live() -> isize {
    LIVE.load(Relaxed)
}

fn mib(n: isize) -> f64 {
    n as f64 / (1024.0 * 1024.0)
}

/// A kernel that takes every transaction and keeps nothing. It says it has no kproxy table, as
/// on a fresh node, so a large cold start goes in parts, as the daemon's would.
struct Discard;

impl Backend for Discard {
    fn table_exists(&mut self, _family: Family) -> Option<bool> {
        Some(false)
    }
    fn apply(
        &mut self,
        tx: &Transaction,
    ) -> Result<kproxy::backend::nftables::ApplyStats, Box<dyn std::error::Error + Send + Sync>> {
        Ok(kproxy::backend::nftables::ApplyStats { messages: tx.ops.len() + 2, bytes: 0 })
    }
}

pub fn run(services: usize, endpoints: usize) {
    COUNTING.store(true, Relaxed);
    let base = live();
    let (svcs, slices) = crate::kube::objects(services, endpoints);
    let objects = live() - base;
    let mut tracker = ChangeTracker::new(crate::kube::NODE);
    tracker.replace_all(&svcs, &slices, Vec::<k8s_openapi::api::core::v1::Node>::new(), crate::kube::NODE);
    // A cold start is a full sync whatever changed: the tracker's record of changes goes.
    drop((tracker.take_changes(), svcs, slices));
    let peak = PEAK.load(Relaxed) - base;
    // The daemon's compaction (src/daemon.rs), done here before the sync rather than after it,
    // so that the tracker's size can be told apart from what the proxier keeps.
    tracker = tracker.dense_copy();
    let tracker_size = live() - base;
    let merged = {
        let before = live();
        let copy = tracker.state(Family::V4).dense_copy();
        let n = live() - before;
        drop(copy);
        n
    };
    let mut proxier = Proxier::new(crate::kube::daemon_config(), Discard);
    // The peak of the sync itself, from here (the API objects are gone, as in the daemon, which
    // converts them as they arrive).
    let before_sync = live();
    PEAK.store(before_sync, Relaxed);
    let ip: std::net::IpAddr = "192.168.0.2".parse().expect("constant");
    let node =
        NodeInfo { name: crate::kube::NODE.into(), primary_ips: vec![ip], addresses: vec![ip], ..Default::default() };
    {
        let tr = &tracker;
        let state = |f: Family| tr.state(f);
        let inputs = Inputs { state: &state, node: &node, local_ips: &[], changes: None };
        proxier.sync(&inputs).expect("sync");
    }
    let sync_peak = PEAK.load(Relaxed) - before_sync;
    Engine::compact(&mut proxier);
    let proxier_kept = live() - base - tracker_size;
    println!(
        "memory services={services} endpoints={endpoints} api_objects_mib={:.1} tracker_mib={:.1} \
         merged_state_mib={:.1} proxier_kept_mib={:.1} total_kept_mib={:.1} bytes_per_endpoint={:.0} \
         load_peak_mib={:.1} sync_peak_mib={:.1}",
        mib(objects),
        mib(tracker_size),
        mib(merged),
        mib(proxier_kept),
        mib(tracker_size + proxier_kept),
        (tracker_size + proxier_kept) as f64 / (services * endpoints).max(1) as f64,
        mib(peak),
        mib(sync_peak),
    );
    drop((tracker, proxier));
}
