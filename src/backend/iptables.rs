//! The iptables backend: runs the iptables binaries of the node's flavour (nft-backed or legacy)
//! as upstream kube-proxy does, with `std::process::Command`. It owns: choosing the flavour,
//! `iptables-restore --noflush` fed on stdin (with the failing line and its neighbours in the
//! error), EnsureChain / EnsureRule for the jump rules and the canary chains, listing what the
//! kernel holds, `route_localnet`, and removing iptables-mode leftovers (mode switch, `--cleanup`).
//!
//! iptables-restore commits each table (`*filter ... COMMIT`) atomically: the kernel holds the
//! whole old table or the whole new one. A restore of two tables can fail after the first one
//! was committed; the caller then treats the kernel state as unknown (next sync full).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rules::iptables::split_args;
use rules::model::Family;
use tracing::{debug, info, warn};

/// The chain upstream's monitor watches: it exists in mangle, nat and filter while the tables
/// have not been flushed under us.
pub const CANARY_CHAIN: &str = rules::iptables::KUBE_PROXY_CANARY;
/// The tables the canary lives in (upstream `ipt.Monitor(..., {mangle, nat, filter})`).
pub const CANARY_TABLES: [&str; 3] = ["mangle", "nat", "filter"];
/// How long the binaries wait for the xtables lock (`-w`), as upstream (`--wait=5`).
const WAIT_SECONDS: &str = "5";
/// Lines shown either side of the line iptables-restore says failed.
const CONTEXT_LINES: usize = 2;

const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Whether `chain` in `table` is one an iptables-mode kube-proxy creates and deletes: the fixed
/// chains and the per-service ones. kubelet's chains (`KUBE-IPTABLES-HINT`,
/// `KUBE-KUBELET-CANARY`) are not, nor is `KUBE-FIREWALL`, which upstream never deletes: it
/// guards `route_localnet=1`, which stays set after a switch to nftables mode.
pub fn is_own_chain(table: &str, chain: &str) -> bool {
    (table == "nat" || table == "filter") && rules::iptables::is_service_chain(chain)
        || rules::iptables::FIXED_CHAINS.iter().any(|(t, c)| *t == table && *c == chain)
}

/// Which iptables the node uses: the nf_tables-backed binaries or the legacy (x_tables) ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Nft,
    Legacy,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Nft => "nft",
            Flavour::Legacy => "legacy",
        }
    }
}

/// An iptables binary failed.
#[derive(Debug, thiserror::Error)]
pub enum IptError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Command { program: String, args: String, status: String, stderr: String },
    /// iptables-restore refused its input; `context` is the failing line and its neighbours.
    #[error("{program} failed ({status}): {stderr}{context}")]
    Restore { program: String, status: String, stderr: String, line: Option<usize>, context: String },
    #[error("setting {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Finds `name` in PATH (and the sbin directories, which a non-root PATH may lack).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The program names of one flavour and family: `iptables-nft`, `ip6tables-legacy-restore`, ...
/// When the flavoured name is not installed, the plain one (`iptables`) is used.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub flavour: Flavour,
    pub family: Family,
    pub iptables: PathBuf,
    pub restore: PathBuf,
    pub save: PathBuf,
}

impl Binaries {
    /// The binaries of `flavour` for `family`; `None` when neither the flavoured nor (for nft,
    /// the default) the plain names are installed.
    pub fn find(flavour: Flavour, family: Family) -> Option<Binaries> {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let f = flavour.name();
        let pick = |suffix: &str| {
            which(&format!("{base}-{f}{suffix}"))
                .or_else(|| (flavour == Flavour::Nft).then(|| which(&format!("{base}{suffix}"))).flatten())
        };
        Some(Binaries { flavour, family, iptables: pick("")?, restore: pick("-restore")?, save: pick("-save")? })
    }

    fn run(&self, program: &Path, args: &[&str]) -> Result<std::process::Output, IptError> {
        let mut c = Command::new(program);
        c.args(args).stdin(Stdio::null());
        c.output().map_err(|source| IptError::Spawn { program: program.display().to_string(), source })
    }

    /// `iptables <args>`, failing on a non-zero exit.
    fn iptables(&self, args: &[&str]) -> Result<String, IptError> {
        let mut full = vec!["-w", WAIT_SECONDS];
        full.extend_from_slice(args);
        let out = self.run(&self.iptables, &full)?;
        if !out.status.success() {
            return Err(IptError::Command {
                program: self.iptables.display().to_string(),
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `iptables -t table -S chain` succeeds: the chain exists.
    pub fn chain_exists(&self, table: &str, chain: &str) -> bool {
        let out = self.run(&self.iptables, &["-w", WAIT_SECONDS, "-t", table, "-S", chain]);
        out.map(|o| o.status.success()).unwrap_or(false)
    }

    /// Creates `chain` in `table` unless it exists (upstream EnsureChain).
    pub fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), IptError> {
        if self.chain_exists(table, chain) {
            return Ok(());
        }
        match self.iptables(&["-t", table, "-N", chain]) {
            // Created meanwhile by someone else: fine.
            Err(_) if self.chain_exists(table, chain) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Inserts `rule` at the top of `chain` unless an identical rule exists (upstream
    /// EnsureRule(Prepend)); returns whether it was inserted.
    pub fn ensure_rule(&self, table: &str, chain: &str, rule: &str) -> Result<bool, IptError> {
        let args = split_args(rule);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut check = vec!["-t", table, "-C", chain];
        check.extend_from_slice(&args);
        let exists = self.run(&self.iptables, &[&["-w", WAIT_SECONDS][..], &check].concat())?.status.success();
        if exists {
            return Ok(false);
        }
        let mut insert = vec!["-t", table, "-I", chain];
        insert.extend_from_slice(&args);
        self.iptables(&insert)?;
        Ok(true)
    }

    /// Whether `table` exists. Asking the legacy binaries about a table loads its kernel module
    /// and creates it, so for them /proc says first; the nft-backed ones create nothing.
    pub fn has_table(&self, table: &str) -> bool {
        if self.flavour == Flavour::Nft {
            return true;
        }
        let names = match self.family {
            Family::V4 => "/proc/net/ip_tables_names",
            Family::V6 => "/proc/net/ip6_tables_names",
        };
        std::fs::read_to_string(names).is_ok_and(|s| s.lines().any(|l| l.trim() == table))
    }

    /// `iptables-save -t table`: the table as text (empty when the table does not exist).
    pub fn save(&self, table: &str) -> Result<String, IptError> {
        if !self.has_table(table) {
            return Ok(String::new());
        }
        let out = self.run(&self.save, &["-t", table])?;
        if !out.status.success() {
            return Err(IptError::Command {
                program: self.save.display().to_string(),
                args: format!("-t {table}"),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Feeds `input` to `iptables-restore --noflush --counters -w 5`. On failure the error names
    /// the line iptables-restore reported, with its neighbours.
    pub fn restore(&self, input: &str) -> Result<(), IptError> {
        let program = self.restore.display().to_string();
        let mut child = Command::new(&self.restore)
            .args(["-w", WAIT_SECONDS, "--noflush", "--counters"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| IptError::Spawn { program: program.clone(), source })?;
        // A restore that dies early closes its stdin: the write error is not the interesting one,
        // the exit status and stderr below are.
        let write = child.stdin.take().expect("piped stdin").write_all(input.as_bytes());
        let out = child.wait_with_output().map_err(|source| IptError::Spawn { program: program.clone(), source })?;
        if out.status.success() {
            if let Err(e) = write {
                return Err(IptError::Spawn { program, source: e });
            }
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let line = failed_line(&stderr);
        let context = line.map(|n| format!("\n{}", line_context(input, n))).unwrap_or_default();
        Err(IptError::Restore { program, status: out.status.to_string(), stderr, line, context })
    }
}

/// What the iptables-mode engine needs of one family's iptables: [`Binaries`] in the daemon, a
/// fake in the engine's tests.
pub trait IptRunner: Send {
    fn chain_exists(&self, table: &str, chain: &str) -> bool;
    fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), IptError>;
    fn ensure_rule(&self, table: &str, chain: &str, rule: &str) -> Result<bool, IptError>;
    fn save(&self, table: &str) -> Result<String, IptError>;
    fn restore(&self, input: &str) -> Result<(), IptError>;
}

impl IptRunner for Binaries {
    fn chain_exists(&self, table: &str, chain: &str) -> bool {
        Binaries::chain_exists(self, table, chain)
    }
    fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), IptError> {
        Binaries::ensure_chain(self, table, chain)
    }
    fn ensure_rule(&self, table: &str, chain: &str, rule: &str) -> Result<bool, IptError> {
        Binaries::ensure_rule(self, table, chain, rule)
    }
    fn save(&self, table: &str) -> Result<String, IptError> {
        Binaries::save(self, table)
    }
    fn restore(&self, input: &str) -> Result<(), IptError> {
        Binaries::restore(self, input)
    }
}

/// The line number iptables-restore says failed: `line N failed` (legacy, and nft on a bad
/// rule), `line N: CHAIN_DEL failed (...)` (nft on a commit error) or `Error occurred at line: N`
/// (parse errors).
pub fn failed_line(stderr: &str) -> Option<usize> {
    if let Some(i) = stderr.find("Error occurred at line:") {
        let rest = stderr[i + "Error occurred at line:".len()..].trim_start();
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    let mut rest = stderr;
    while let Some(i) = rest.find("line ") {
        let after = &rest[i + 5..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        let tail = &after[digits.len()..];
        if !digits.is_empty() && (tail.starts_with(':') || tail.starts_with(" failed")) {
            return digits.parse().ok();
        }
        rest = after;
    }
    None
}

/// Lines `n-2 ..= n+2` of `input` (1-based), numbered, the failing one marked.
pub fn line_context(input: &str, n: usize) -> String {
    let lo = n.saturating_sub(CONTEXT_LINES).max(1);
    let mut out = String::new();
    for (i, l) in input.lines().enumerate().map(|(i, l)| (i + 1, l)) {
        if i < lo || i > n + CONTEXT_LINES {
            continue;
        }
        let mark = if i == n { ">" } else { " " };
        out.push_str(&format!("{mark}{i:>6}: {l}\n"));
    }
    out.trim_end().to_string()
}

/// One table of `iptables-save` output: chain names (in order) and each `-A` rule as
/// (chain, text after `-A <chain> `).
#[derive(Debug, Default, Clone)]
pub struct SavedTable {
    pub chains: Vec<String>,
    pub rules: Vec<(String, String)>,
}

impl SavedTable {
    /// Parses one table's `iptables-save` text (other tables' sections are ignored if present,
    /// but callers pass one table).
    pub fn parse(text: &str) -> SavedTable {
        let mut t = SavedTable::default();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix(':') {
                if let Some(name) = rest.split_whitespace().next() {
                    t.chains.push(name.to_string());
                }
            } else if let Some(rest) = l.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                t.rules.push((chain.to_string(), spec.to_string()));
            }
        }
        t
    }

    /// Rules (`-A` lines) per chain.
    pub fn rules_of(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut m: BTreeMap<&str, Vec<&str>> = self.chains.iter().map(|c| (c.as_str(), Vec::new())).collect();
        for (c, r) in &self.rules {
            m.entry(c.as_str()).or_default().push(r.as_str());
        }
        m
    }
}

/// The `iptables-restore --noflush` input that removes kube-proxy's chains from one saved table:
/// the jump rules to them from the built-in chains are deleted, the chains flushed and deleted.
/// A chain of ours that someone else's chain still jumps to is kept (deleting it would fail the
/// whole restore), and so is everything it jumps to. `None` when there is nothing to remove.
pub fn leftover_removal(table: &str, saved: &SavedTable) -> Option<String> {
    let mut doomed: BTreeSet<&str> =
        saved.chains.iter().map(String::as_str).filter(|c| is_own_chain(table, c)).collect();
    let jump_target = |spec: &str| -> Option<String> {
        let a = split_args(spec);
        a.iter().position(|x| x == "-j" || x == "-g").and_then(|i| a.get(i + 1).cloned())
    };
    // Fixpoint: a doomed chain referenced from a kept non-built-in chain is kept.
    loop {
        let mut keep = None;
        for (chain, spec) in &saved.rules {
            if doomed.contains(chain.as_str()) || BUILTIN_CHAINS.contains(&chain.as_str()) {
                continue;
            }
            if let Some(t) = jump_target(spec) {
                if doomed.contains(t.as_str()) {
                    keep = Some(t);
                    break;
                }
            }
        }
        match keep {
            Some(t) => {
                doomed.retain(|c| *c != t);
            }
            None => break,
        }
    }
    let mut deletes = Vec::new();
    for (chain, spec) in &saved.rules {
        if BUILTIN_CHAINS.contains(&chain.as_str()) && jump_target(spec).is_some_and(|t| doomed.contains(t.as_str())) {
            deletes.push(format!("-D {chain} {spec}"));
        }
    }
    if doomed.is_empty() && deletes.is_empty() {
        return None;
    }
    let mut s = format!("*{table}\n");
    for c in &doomed {
        s.push_str(&format!(":{c} - [0:0]\n"));
    }
    for d in &deletes {
        s.push_str(d);
        s.push('\n');
    }
    for c in &doomed {
        s.push_str(&format!("-X {c}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Which flavour the node already uses, as upstream's image decides (the `iptables-wrapper`
/// script): kubelet's `KUBE-IPTABLES-HINT` (or `KUBE-KUBELET-CANARY`) chain in mangle says it;
/// otherwise legacy when it holds 10 or more rules, or more than the nft side; nft by default.
/// Returns the flavour and why, for the start-up log.
pub fn detect_flavour() -> (Flavour, String) {
    let save = |fl: Flavour, fam: Family, table: Option<&str>| -> String {
        let Some(b) = Binaries::find(fl, fam) else { return String::new() };
        let mut c = Command::new(&b.save);
        if let Some(t) = table {
            if !b.has_table(t) {
                return String::new();
            }
            c.args(["-t", t]);
        }
        c.stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let hinted = |fl: Flavour| {
        [Family::V4, Family::V6].into_iter().any(|fam| {
            save(fl, fam, Some("mangle"))
                .lines()
                .any(|l| l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY "))
        })
    };
    if Binaries::find(Flavour::Legacy, Family::V4).is_none() {
        return (Flavour::Nft, "no legacy binaries installed".into());
    }
    if Binaries::find(Flavour::Nft, Family::V4).is_none() {
        return (Flavour::Legacy, "no nft-backed binaries installed".into());
    }
    if hinted(Flavour::Nft) {
        return (Flavour::Nft, "kubelet's KUBE-IPTABLES-HINT chain is in the nft-backed mangle table".into());
    }
    if hinted(Flavour::Legacy) {
        return (Flavour::Legacy, "kubelet's KUBE-IPTABLES-HINT chain is in the legacy mangle table".into());
    }
    let count = |fl: Flavour| -> usize {
        [Family::V4, Family::V6]
            .into_iter()
            .map(|fam| save(fl, fam, None).lines().filter(|l| l.starts_with('-')).count())
            .sum()
    };
    let legacy = count(Flavour::Legacy);
    if legacy >= 10 {
        return (Flavour::Legacy, format!("{legacy} legacy rules"));
    }
    let nft = count(Flavour::Nft);
    if legacy > nft {
        (Flavour::Legacy, format!("{legacy} legacy rules, {nft} nft-backed ones"))
    } else {
        (Flavour::Nft, format!("{legacy} legacy rules, {nft} nft-backed ones (nft is the default)"))
    }
}

/// Removes iptables-mode leftovers (ours and upstream kube-proxy's KUBE-* chains and the jump
/// rules to them) from filter, nat and mangle, for IPv4 and IPv6, in every installed flavour.
/// Each table goes in one restore (atomic per table). Returns how many chains were removed;
/// failures are logged and the rest still cleaned, the first one returned.
pub fn remove_leftovers() -> Result<usize, IptError> {
    let mut removed = 0;
    let mut first_err = None;
    for fl in [Flavour::Nft, Flavour::Legacy] {
        for fam in [Family::V4, Family::V6] {
            let Some(b) = Binaries::find(fl, fam) else { continue };
            for table in ["filter", "nat", "mangle"] {
                let r = b.save(table).and_then(|text| {
                    let saved = SavedTable::parse(&text);
                    match leftover_removal(table, &saved) {
                        None => Ok(0),
                        Some(input) => {
                            let n = input.lines().filter(|l| l.starts_with("-X ")).count();
                            debug!(flavour = fl.name(), family = fam.label(), table, "removing leftovers:\n{input}");
                            b.restore(&input).map(|_| n)
                        }
                    }
                });
                match r {
                    Ok(0) => {}
                    Ok(n) => {
                        info!(
                            flavour = fl.name(),
                            family = fam.label(),
                            table,
                            chains = n,
                            "removed iptables-mode chains"
                        );
                        removed += n;
                    }
                    Err(e) => {
                        warn!(flavour = fl.name(), family = fam.label(), table, "removing iptables-mode chains: {e}");
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Sets `net.ipv4.conf.all.route_localnet=1` unless it is already set, so that IPv4 NodePorts
/// answer on 127.0.0.1 (upstream `localhostNodePorts`). The filter rule `KUBE-FIREWALL -d
/// 127.0.0.0/8 ! -s 127.0.0.0/8 ... -j DROP` from the renderer is the safeguard upstream pairs it
/// with (CVE-2020-8558: no martian packets to 127/8 from outside).
pub fn ensure_route_localnet() -> Result<bool, IptError> {
    let path = "/proc/sys/net/ipv4/conf/all/route_localnet";
    let err = |source| IptError::Sysctl { path: path.into(), source };
    if std::fs::read_to_string(path).map_err(err)?.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, "1").map_err(err)?;
    Ok(true)
}

/// Deletes the nftables-mode tables (`ip kube-proxy`, `ip6 kube-proxy`) when starting in
/// iptables mode (a missing table is not an error).
pub fn remove_nftables_tables() -> Result<(), crate::backend::nftables::NftError> {
    let mut b = crate::backend::nftables::NftablesBackend::new()?;
    for f in [Family::V4, Family::V6] {
        b.delete_tables(f)?;
    }
    info!("deleted the nftables-mode tables {} and {} (if any)", "ip kube-proxy", "ip6 kube-proxy");
    Ok(())
}

/// [`remove_leftovers`] at a mode switch, on a thread of its own: on a node with many iptables
/// rules of others, iptables-save alone can take seconds, which must not hold up the next sync
/// (nftables mode does not touch iptables, so nothing races). Failures are logged, not fatal.
pub fn remove_leftovers_logged() {
    let spawned = std::thread::Builder::new().name("kproxy-ipt-cleanup".into()).spawn(|| {
        let _ = remove_leftovers();
    });
    if spawned.is_err() {
        let _ = remove_leftovers();
    }
}

/// [`remove_nftables_tables`] at a mode switch: a failure is logged, not fatal.
pub fn remove_nftables_tables_logged() {
    if let Err(e) = remove_nftables_tables() {
        warn!("deleting the nftables-mode tables: {e}");
    }
}

impl fmt::Display for Binaries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.restore.display(), self.flavour.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failing_line_is_found_in_both_flavours_messages() {
        assert_eq!(failed_line("iptables-restore: line 4 failed"), Some(4));
        assert_eq!(failed_line("iptables-nft-restore: line 12 failed: No chain/target/match by that name."), Some(12));
        assert_eq!(
            failed_line(
                "iptables-restore v1.8.9 (legacy): Couldn't load match `foo'\n\nError occurred at line: 7\nTry"
            ),
            Some(7)
        );
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): \nline 3: CHAIN_DEL failed (Device or resource busy)"),
            Some(3)
        );
        assert_eq!(failed_line("something else failed on a line"), None);
        let input = "a\nb\nc\nd\ne\nf\ng\n";
        assert_eq!(line_context(input, 4), "      2: b\n      3: c\n>     4: d\n      5: e\n      6: f");
        assert_eq!(line_context(input, 1), ">     1: a\n      2: b\n      3: c");
    }

    #[test]
    fn leftovers_are_ours_and_unreferenced_only() {
        let saved = SavedTable::parse(
            ":PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n\
             :KUBE-SEP-BBBB - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:CALICO-X - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -j ACCEPT\n-A KUBE-SERVICES -j KUBE-SVC-AAAA\n-A KUBE-SVC-AAAA -j KUBE-SEP-BBBB\n\
             -A KUBE-SEP-BBBB -j KUBE-MARK-MASQ\n-A CALICO-X -j KUBE-MARK-MASQ\n",
        );
        let s = leftover_removal("nat", &saved).unwrap();
        assert!(s.contains("-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"));
        for c in ["KUBE-SERVICES", "KUBE-SVC-AAAA", "KUBE-SEP-BBBB"] {
            assert!(s.contains(&format!(":{c} - [0:0]\n")) && s.contains(&format!("-X {c}\n")), "{s}");
        }
        // Someone else's chain jumps to KUBE-MARK-MASQ: kept. kubelet's hint chain: not ours.
        assert!(!s.contains("KUBE-MARK-MASQ") && !s.contains("HINT") && !s.contains("CALICO"), "{s}");
        assert!(!s.contains("-D OUTPUT"));
        assert!(s.starts_with("*nat\n") && s.ends_with("COMMIT\n"));
        assert!(leftover_removal("nat", &SavedTable::parse(":OUTPUT ACCEPT [0:0]\n")).is_none());
    }
}
