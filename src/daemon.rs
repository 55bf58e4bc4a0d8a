//! The running daemon: wires a source to the change tracker and the sync loop, and the one-shot
//! modes (`--dry-run`, `--cleanup`).

use std::time::Duration;

use rules::model::Family;
use tracing::warn;

use crate::config::Config;
use crate::model::ChangeTracker;
use crate::source::files::load_dir;
use crate::sync::{families, Inputs};

/// How often the manifests directory is checked for changes (changes show within 1 s).
const MANIFEST_POLL: Duration = Duration::from_millis(250);

/// Loads the manifests directory into a tracker, logging every rejected object once.
fn load_into(cfg: &Config, tracker: &mut ChangeTracker) -> bool {
    let dir = cfg.manifests.as_ref().expect("manifests source");
    let snap = load_dir(dir);
    for r in &snap.rejected {
        warn!("skipping {r}");
    }
    let (changed, rejected) = tracker.replace_all(snap.services, snap.slices, snap.nodes, &cfg.hostname);
    for r in &rejected {
        warn!("skipping {r}");
    }
    changed
}

/// `--dry-run`: the full transaction of every family as an nft script.
pub fn dry_run(cfg: &Config) -> String {
    let mut tracker = ChangeTracker::new(&cfg.hostname);
    load_into(cfg, &mut tracker);
    let node = tracker.node();
    // Touch nothing: NodePort CIDRs are matched against the Node object's addresses, not this
    // machine's interfaces, so the output is the same wherever it is printed.
    let local_ips = node.addresses.clone();
    let state = |f: Family| tracker.cluster_state(f);
    let inputs = Inputs { state: &state, node: &node, local_ips: &local_ips };
    let mut out = String::new();
    for family in families(cfg, &inputs) {
        let built = crate::sync::desired(cfg, family, &inputs, None);
        for s in &built.skipped {
            warn!("skipping {s}");
        }
        out.push_str(&rules::diff(None, &built.ruleset).to_string());
    }
    out
}

