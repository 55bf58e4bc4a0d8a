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
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const KPROXY: &str = env!("CARGO_BIN_EXE_kproxy");
/// Flags the runner always passes; `args` adds to them.
const FIXED_ARGS: [&str; 3] = ["--dry-run", "--hostname-override", "test-node"];
/// A dry run that takes longer than this is hung (it must print and exit).
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// Name prefix of the network namespaces this test creates; `<pid>-<n>` is appended.
const NETNS_PREFIX: &str = "kpxgd-";

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// Every `testdata/*/` folder that has an `args` file, by folder name.
fn scenario_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(testdata())
        .expect("read testdata/")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("args").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs a command with a deadline; kills it when the deadline passes.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not exit within {timeout:?}; killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    };
    Ok(Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() })
}

/// The extra flags of a scenario: the `args` file split on whitespace (`#` starts a comment).
fn scenario_args(dir: &Path) -> Vec<String> {
    let text = fs::read_to_string(dir.join("args")).expect("read args");
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split_whitespace())
        .map(str::to_string)
        .collect()
}

/// Runs kproxy's dry run on a scenario and returns its stdout, or why it failed.
fn dry_run(dir: &Path) -> Result<String, String> {
    let extra = scenario_args(dir);
    let mut cmd = Command::new(KPROXY);
    cmd.args(FIXED_ARGS).arg("--manifests").arg(dir).args(&extra);
    // Keep logs on stderr readable and out of the way; stdout is the golden text.
    cmd.env("RUST_LOG", "info").env_remove("UPDATE_GOLDEN");
    let out = run_with_timeout(cmd, RUN_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "kproxy {} --manifests {} {} exited with {}\n--- stderr ---\n{stderr}--- stdout ---\n{stdout}",
            FIXED_ARGS.join(" "),
            dir.display(),
            extra.join(" "),
            out.status
        ));
    }
    if stdout.trim().is_empty() {
        return Err(format!("kproxy printed nothing on stdout\n--- stderr ---\n{stderr}"));
    }
    Ok(stdout)
}

/// A line diff (longest common subsequence) of `expected` and `actual`, printed unified-style
/// with 3 lines of context: `-` lines are expected only, `+` lines actual only.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let (n, m) = (a.len(), b.len());
    // lcs[i][j] = LCS length of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    // Edit script: (tag, expected line number, text).
    let mut ops: Vec<(char, usize, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', i, a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', i, a[i]));
            i += 1;
        } else {
            ops.push(('+', i, b[j]));
            j += 1;
        }
    }
    const CONTEXT: usize = 3;
    let changed: Vec<usize> = ops.iter().enumerate().filter(|(_, o)| o.0 != ' ').map(|(k, _)| k).collect();
    let mut out = String::new();
    let mut k = 0;
    while k < changed.len() {
        // Group changes closer than 2*CONTEXT into one hunk.
        let start = changed[k].saturating_sub(CONTEXT);
        let mut end = changed[k];
        while k + 1 < changed.len() && changed[k + 1] <= end + 2 * CONTEXT + 1 {
            k += 1;
            end = changed[k];
        }
        let end = (end + CONTEXT).min(ops.len() - 1);
        out.push_str(&format!("@@ expected.nft line {} @@\n", ops[start].1 + 1));
        for (tag, _, text) in &ops[start..=end] {
            out.push_str(&format!("{tag}{text}\n"));
        }
        k += 1;
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the files differ in their final newline)\n");
    }
    out
}

fn update_mode() -> bool {
    std::env::var("UPDATE_GOLDEN").is_ok_and(|v| !v.is_empty() && v != "0")
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

fn is_root() -> bool {
    // The effective UID is the second field of "Uid:" in /proc/self/status.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn skip_privileged() -> bool {
    std::env::var("KPROXY_SKIP_PRIVILEGED").is_ok_and(|v| v == "1")
}

/// A named network namespace that is deleted when dropped, also when the test panics.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{NETNS_PREFIX}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run `ip netns add {name}` (is iproute2 installed?): {e}"))?;
        if !out.status.success() {
            return Err(format!("`ip netns add {name}` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Netns { name })
    }

    /// Runs `nft <args>` inside the namespace.
    fn nft(&self, args: &[&str]) -> Result<Output, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "nft"]).args(args);
        run_with_timeout(cmd, RUN_TIMEOUT)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new("ip").args(["netns", "del", &self.name]).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
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
    let ns = Netns::create().map_err(|e| format!("scenario {name}: {e}"))?;
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

macro_rules! scenarios {
    ($($test:ident => $dir:literal,)*) => {
        $(
            #[test]
            fn $test() {
                run_scenario($dir);
            }
        )*
        const LISTED: &[&str] = &[$($dir),*];
    };
}

scenarios! {
    clusterip => "clusterip",
    multi_endpoint => "multi-endpoint",
    multi_port_named_ports => "multi-port-named-ports",
    udp_sctp => "udp-sctp",
    nodeport => "nodeport",
    nodeport_addresses => "nodeport-addresses",
    nodeport_addresses_all => "nodeport-addresses-all",
    loadbalancer => "loadbalancer",
    externalips => "externalips",
    no_endpoints => "no-endpoints",
    not_ready => "not-ready",
    masquerade_all => "masquerade-all",
    no_local_detector => "no-local-detector",
    cluster_cidr_hairpin => "cluster-cidr-hairpin",
    ignored_services => "ignored-services",
    sloppy_ips => "sloppy-ips",
    dual_stack => "dual-stack",
    etp_local_63_71 => "etp-local-63-71",
    detect_local_nodecidr => "detect-local-nodecidr",
    detect_local_bridge => "detect-local-bridge",
    detect_local_prefix => "detect-local-prefix",
    etp_local_no_detector_68 => "etp-local-no-detector-68",
    terminating_local_72_75 => "terminating-local-72-75",
    itp_local_82_87 => "itp-local-82-87",
    source_ranges_52_57_62 => "source-ranges-52-57-62",
    affinity_88_90 => "affinity-88-90",
    topology_91_98 => "topology-91-98",
    dual_stack_policies_99_101 => "dual-stack-policies-99-101",
    service_cidr_8_32 => "service-cidr-8-32",
}

#[test]
fn every_scenario_has_a_test() {
    let found = scenario_names();
    let missing: Vec<&String> = found.iter().filter(|n| !LISTED.contains(&n.as_str())).collect();
    let stale: Vec<&&str> = LISTED.iter().filter(|n| !found.iter().any(|f| f == *n)).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "tests/golden.rs `scenarios!` is out of date: add {missing:?}, remove {stale:?}"
    );
}

#[test]
fn diff_shows_changed_lines_with_context() {
    let d = diff("a\nb\nc\nd\n", "a\nB\nc\nd\ne\n");
    assert!(d.contains("-b\n+B\n"), "{d}");
    assert!(d.contains("+e\n"), "{d}");
    assert!(d.contains(" a\n"), "{d}");
    assert_eq!(diff("same\n", "same\n"), "");
    assert!(diff("x\n", "x").contains("final newline"));
}
