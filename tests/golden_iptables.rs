//! Golden scenarios of iptables mode: for every `testdata/<scenario>/` with an `args` file,
//! `expected.iptables` is the exact stdout of
//! `kproxy --dry-run --proxy-mode iptables --hostname-override test-node --manifests <dir> <args>`:
//! per IP family a line `# iptables-restore` (IPv4) or `# ip6tables-restore` (IPv6), then the
//! full `iptables-restore --noflush` input of that family.
//!
//! For every scenario this checks, in order:
//! 1. kproxy exits 0 and prints exactly `expected.iptables`, twice in a row (deterministic).
//!    With `UPDATE_GOLDEN=1` the file is rewritten instead.
//! 2. Each family's part of `expected.iptables` is accepted by the real tools in a throwaway
//!    network namespace, with each installed flavour (`iptables-nft-*`, `iptables-legacy-*`):
//!    `iptables-restore --test --noflush` (`ip6tables-restore` for IPv6), then loaded for real
//!    twice (the second load over the first, as a restarted proxy does), and `iptables-save`
//!    shows every chain with as many rules as the file gives it. Needs root;
//!    `KPROXY_SKIP_PRIVILEGED=1` skips this part with a note.
//!
//! Each scenario is its own test (`cargo test --test golden_iptables -- clusterip`), and
//! `every_scenario_has_a_test` makes sure no folder is forgotten.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

#[path = "support/golden_run.rs"]
mod golden_run;
use golden_run::{is_root, skip_privileged, Netns};

/// Flags the runner always passes; `args` adds to them.
const FIXED_ARGS: [&str; 5] = ["--dry-run", "--proxy-mode", "iptables", "--hostname-override", "test-node"];
/// Name prefix of the network namespaces this test creates; `<pid>-<n>` is appended.
const NETNS_PREFIX: &str = "kpxgi-";
const EXPECTED: &str = "expected.iptables";

/// One family's part of the file: which tools take it (`iptables` or `ip6tables`), and its text.
struct Part {
    tool: &'static str,
    text: String,
}

/// Splits the dry-run text at its `# iptables-restore` / `# ip6tables-restore` lines.
fn split_parts(text: &str) -> Result<Vec<Part>, String> {
    let mut parts: Vec<Part> = Vec::new();
    for line in text.lines() {
        let tool = match line {
            "# iptables-restore" => Some("iptables"),
            "# ip6tables-restore" => Some("ip6tables"),
            _ => None,
        };
        match (tool, parts.last_mut()) {
            (Some(tool), _) => parts.push(Part { tool, text: String::new() }),
            (None, Some(p)) => {
                p.text.push_str(line);
                p.text.push('\n');
            }
            (None, None) => return Err(format!("text before the first `# iptables-restore` line: {line:?}")),
        }
    }
    if parts.is_empty() {
        return Err("no `# iptables-restore` or `# ip6tables-restore` part".into());
    }
    Ok(parts)
}

/// `(table, chain) -> rule count` of restore input or `iptables-save` output: every declared
/// chain (also empty ones) and its `-A` lines.
fn rule_counts(text: &str) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or("").to_string();
            counts.entry((table.clone(), chain)).or_insert(0);
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("").to_string();
            *counts.entry((table.clone(), chain)).or_insert(0) += 1;
        }
    }
    counts
}

/// Step 2: the tools accept each part: checked, loaded twice, and read back, in a fresh namespace.
fn check_kernel(name: &str, dir: &Path) -> Result<(), String> {
    if !is_root() {
        let why = "loading expected.iptables with iptables-restore needs root (a network namespace)";
        if skip_privileged() {
            eprintln!("scenario {name}: skipped the iptables-restore part: {why}; KPROXY_SKIP_PRIVILEGED=1 is set");
            return Ok(());
        }
        return Err(format!(
            "scenario {name}: {why}. Run the tests as root (CI does), or set KPROXY_SKIP_PRIVILEGED=1 to skip this part"
        ));
    }
    let path = dir.join(EXPECTED);
    let text = fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let parts = split_parts(&text).map_err(|e| format!("scenario {name}: {}: {e}", path.display()))?;
    for flavour in flavours() {
        // One namespace per flavour: legacy and nft rules should not share one.
        let ns = Netns::create(NETNS_PREFIX).map_err(|e| format!("scenario {name}: {e}"))?;
        for part in &parts {
            check_part(&ns, part, flavour).map_err(|e| format!("scenario {name}: {e}"))?;
        }
    }
    Ok(())
}

/// The iptables flavours installed (`-nft`, `-legacy`); the plain tools when neither is.
fn flavours() -> Vec<&'static str> {
    let installed = |bin: &str| {
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(bin).is_file()))
    };
    let found: Vec<&str> =
        ["-nft", "-legacy"].into_iter().filter(|f| installed(&format!("iptables{f}-restore"))).collect();
    if found.is_empty() {
        vec![""]
    } else {
        found
    }
}

/// Checks, loads twice and reads back one family's part with one flavour of the tools.
fn check_part(ns: &Netns, part: &Part, flavour: &str) -> Result<(), String> {
    let restore = format!("{}{flavour}-restore", part.tool);
    let save = format!("{}{flavour}-save", part.tool);
    // The tools read a file argument; the namespace shares the file system.
    let file = std::env::temp_dir().join(format!("{}-{restore}.rules", ns.name));
    fs::write(&file, &part.text).map_err(|e| format!("write {}: {e}", file.display()))?;
    let file_arg = file.to_str().ok_or("temp path is not UTF-8")?.to_string();
    let result = (|| {
        for (what, args) in [
            ("--test --noflush (check)", vec!["--test", "--noflush", file_arg.as_str()]),
            ("--noflush (first load)", vec!["--noflush", file_arg.as_str()]),
            ("--noflush (reload over the loaded rules)", vec!["--noflush", file_arg.as_str()]),
        ] {
            let out = ns.exec(&restore, &args)?;
            if !out.status.success() {
                return Err(format!(
                    "{restore} {what} in namespace {} failed ({}):\n{}",
                    ns.name,
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        // Read back: every chain of the file exists with exactly its rules (the reload flushed
        // each chain before refilling it, so nothing is doubled).
        let out = ns.exec(&save, &[])?;
        if !out.status.success() {
            return Err(format!("{save} failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let saved = rule_counts(&String::from_utf8_lossy(&out.stdout));
        let want = rule_counts(&part.text);
        if !want.contains_key(&("nat".to_string(), "KUBE-SERVICES".to_string())) {
            return Err(format!("the {} part has no nat KUBE-SERVICES chain", part.tool));
        }
        for (key, n) in &want {
            if saved.get(key) != Some(n) {
                return Err(format!(
                    "{save} after two loads: {} {} has {:?} rules, the file gives it {n}",
                    key.0,
                    key.1,
                    saved.get(key)
                ));
            }
        }
        Ok(())
    })();
    let _ = fs::remove_file(&file);
    result
}

/// Runs both steps of one scenario and panics with every problem found.
fn run_scenario(name: &str) {
    golden_run::run_scenario(name, &FIXED_ARGS, EXPECTED, check_kernel);
}

golden_scenarios!(run_scenario, "tests/golden_iptables.rs");

#[test]
fn parts_split_at_the_tool_lines_and_rules_are_counted_per_chain() {
    let text =
        "# iptables-restore\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-X - [0:0]\n-A KUBE-SERVICES -j KUBE-X\nCOMMIT\n\
                # ip6tables-restore\n*filter\nCOMMIT\n";
    let parts = split_parts(text).unwrap();
    assert_eq!(parts.iter().map(|p| p.tool).collect::<Vec<_>>(), vec!["iptables", "ip6tables"]);
    assert_eq!(parts[1].text, "*filter\nCOMMIT\n");
    let counts = rule_counts(&parts[0].text);
    assert_eq!(counts[&("nat".to_string(), "KUBE-SERVICES".to_string())], 1);
    assert_eq!(counts[&("nat".to_string(), "KUBE-X".to_string())], 0);
    assert!(split_parts("*nat\nCOMMIT\n").is_err(), "a part without its tool line");
    assert!(split_parts("").is_err());
}
