//! Golden scenarios: `testdata/<scenario>/` holds real Service / EndpointSlice / Node YAML, an
//! `args` file (one line of extra kproxy flags) and `expected.nft`, the exact stdout of
//! `kproxy --dry-run --manifests <dir> --hostname-override test-node <args>`.
//!
//! For every scenario this checks, in order:
//! 1. kproxy exits 0 and prints exactly `expected.nft` (twice in a row: the output must be
//!    deterministic). With `UPDATE_GOLDEN=1` the file is rewritten instead.
//! 2. `expected.nft` is accepted by the kernel: `nft -c -f` inside a throwaway network namespace,
//!    then loaded for real twice (the second load replaces the first table in one transaction, as
//!    a restarted kproxy does). This needs root (CI runs as root); without it the test fails,
//!    unless `KPROXY_SKIP_PRIVILEGED=1`, which skips this part with a note.
//!
//! Each scenario is its own test (`cargo test --test golden -- clusterip`), and
//! `every_scenario_has_a_test` makes sure no folder is forgotten.

use std::path::Path;
use std::process::Output;

#[path = "support/golden_run.rs"]
mod golden_run;
use golden_run::{is_root, run_with_timeout, skip_privileged, Netns, RUN_TIMEOUT};

/// Flags the runner always passes; `args` adds to them.
const FIXED_ARGS: [&str; 3] = ["--dry-run", "--hostname-override", "test-node"];
/// Name prefix of the network namespaces this test creates; `<pid>-<n>` is appended.
const NETNS_PREFIX: &str = "kpxgd-";

/// A line diff of `expected` and `actual` (see [`golden_run::diff_labeled`]).
fn diff(expected: &str, actual: &str) -> String {
    golden_run::diff_labeled(expected, actual, "expected.nft")
}

impl Netns {
    /// Runs `nft <args>` inside the namespace.
    fn nft(&self, args: &[&str]) -> Result<Output, String> {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "nft"]).args(args);
        run_with_timeout(cmd, RUN_TIMEOUT)
    }
}

/// Step 2: the kernel accepts `expected.nft`: checked, then loaded twice, in a fresh namespace.
fn check_kernel(name: &str, dir: &Path) -> Result<(), String> {
    if !is_root() {
        let why = "loading expected.nft with `nft -c -f` needs root (a network namespace and CAP_NET_ADMIN)";
        if skip_privileged() {
            eprintln!("scenario {name}: skipped the nft part: {why}; KPROXY_SKIP_PRIVILEGED=1 is set");
            return Ok(());
        }
        return Err(format!(
            "scenario {name}: {why}. Run the tests as root (CI does), or set KPROXY_SKIP_PRIVILEGED=1 to skip this part"
        ));
    }
    let path = dir.join("expected.nft");
    let file = path.to_str().ok_or("testdata path is not UTF-8")?;
    let ns = Netns::create(NETNS_PREFIX).map_err(|e| format!("scenario {name}: {e}"))?;
    for (what, args) in [
        ("nft -c -f (check)", vec!["-c", "-f", file]),
        ("nft -f (first load)", vec!["-f", file]),
        ("nft -f (reload over the existing table)", vec!["-f", file]),
    ] {
        let out = ns.nft(&args).map_err(|e| format!("scenario {name}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scenario {name}: {what} of {} in namespace {} failed ({}):\n{}",
                path.display(),
                ns.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// Runs both steps of one scenario and panics with every problem found.
fn run_scenario(name: &str) {
    golden_run::run_scenario(name, &FIXED_ARGS, "expected.nft", check_kernel);
}

golden_scenarios!(run_scenario, "tests/golden.rs");

#[test]
fn diff_shows_changed_lines_with_context() {
    let d = diff("a\nb\nc\nd\n", "a\nB\nc\nd\ne\n");
    assert!(d.contains("-b\n+B\n"), "{d}");
    assert!(d.contains("+e\n"), "{d}");
    assert!(d.contains(" a\n"), "{d}");
    assert_eq!(diff("same\n", "same\n"), "");
    assert!(diff("x\n", "x").contains("final newline"));
}
