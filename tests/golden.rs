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

use std::fs;
use std::path::Path;
use std::process::Output;

#[path = "support/golden_run.rs"]
mod golden_run;
use golden_run::{is_root, run_with_timeout, skip_privileged, testdata, update_mode, Netns, RUN_TIMEOUT};

/// Flags the runner always passes; `args` adds to them.
const FIXED_ARGS: [&str; 3] = ["--dry-run", "--hostname-override", "test-node"];
/// Name prefix of the network namespaces this test creates; `<pid>-<n>` is appended.
const NETNS_PREFIX: &str = "kpxgd-";

/// Runs kproxy's dry run on a scenario and returns its stdout, or why it failed.
fn dry_run(dir: &Path) -> Result<String, String> {
    golden_run::dry_run(&FIXED_ARGS, dir)
}

/// A line diff of `expected` and `actual` (see [`golden_run::diff_labeled`]).
fn diff(expected: &str, actual: &str) -> String {
    golden_run::diff_labeled(expected, actual, "expected.nft")
}

/// Step 1: the dry run prints exactly `expected.nft` (or rewrites it in update mode).
fn check_text(name: &str, dir: &Path) -> Result<(), String> {
    let actual = dry_run(dir)?;
    let again = dry_run(dir)?;
    if again != actual {
        return Err(format!(
            "scenario {name}: two dry runs printed different text (the output must be deterministic):\n{}",
            diff(&actual, &again)
        ));
    }
    let path = dir.join("expected.nft");
    if update_mode() {
        fs::write(&path, &actual).map_err(|e| format!("write {}: {e}", path.display()))?;
        eprintln!("scenario {name}: wrote {}", path.display());
        return Ok(());
    }
    let expected = fs::read_to_string(&path).map_err(|e| {
        format!("scenario {name}: cannot read {}: {e} (run with UPDATE_GOLDEN=1 to create it)", path.display())
    })?;
    if expected != actual {
        return Err(format!(
            "scenario {name}: kproxy's dry run differs from {} (- expected, + actual; \
             UPDATE_GOLDEN=1 rewrites it after you have checked the change):\n{}",
            path.display(),
            diff(&expected, &actual)
        ));
    }
    Ok(())
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
    let dir = testdata().join(name);
    assert!(dir.join("args").is_file(), "testdata/{name}/args is missing");
    let mut errors = Vec::new();
    if let Err(e) = check_text(name, &dir) {
        errors.push(e);
    }
    // The kernel check runs on expected.nft even when the text differs, so one run shows both.
    if dir.join("expected.nft").is_file() {
        if let Err(e) = check_kernel(name, &dir) {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        panic!("{}", errors.join("\n\n"));
    }
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
