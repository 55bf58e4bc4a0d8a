//! End-to-end observability tests: the real kproxy binary runs in a throw-away network namespace
//! (`kpxob-<pid>-<n>`, deleted even when a test fails) on a manifests directory, and the tests talk
//! HTTP to its health and metrics servers inside that namespace. They check the metric names,
//! types, labels and buckets against upstream's list, the health answers through a proxy's life
//! (starting, synced, stuck, recovered, node tainted for deletion), `/proxyMode`, `/debug/syncs`,
//! that the dashboard and the alerts only use exported metrics, `promtool check rules`, and that
//! the built-in page renders its chart in headless Chromium.
//!
//! They need root (network namespaces, nftables). The stuck states use the documented test hook
//! `KPROXY_TEST_FAIL_APPLY=FILE` (applies fail while FILE exists, or block while it says `block`).
#![allow(unsafe_code)] // setns(2) in the HTTP client thread that talks into the namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

const HEALTH_PORT: u16 = 20256;
const METRICS_PORT: u16 = 20249;

/// A network namespace with loopback up, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("kpxob-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("running ip");
        assert!(
            out.status.success(),
            "ip netns add {name} failed (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        let out =
            Command::new("ip").args(["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]).output().unwrap();
        assert!(out.status.success(), "lo up: {}", String::from_utf8_lossy(&out.stderr));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "kpxob-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// `GET path` on 127.0.0.1:`port` inside the namespace: a helper thread enters the namespace
/// (setns affects only the calling thread) and speaks HTTP/1.1 with `Connection: close`.
fn get(ns: &str, port: u16, path: &str) -> Result<Reply, String> {
    let nspath = format!("/run/netns/{ns}");
    let path = path.to_string();
    std::thread::spawn(move || -> Result<Reply, String> {
        let f = File::open(&nspath).map_err(|e| format!("open {nspath}: {e}"))?;
        // SAFETY: setns on a valid namespace fd; it changes only this short-lived thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(format!("setns {nspath}: {}", std::io::Error::last_os_error()));
        }
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect :{port}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| format!("reading {path}: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no header end in {text:?}"))?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Reply { status, headers, body: body.to_string() })
    })
    .join()
    .expect("HTTP client thread")
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit` saying what it waited
/// for and what it saw last.
fn wait_for<T>(what: &str, limit: Duration, d: &Daemon, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}; last: {last}\n--- kproxy log ---\n{}", d.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const NODE: &str = "apiVersion: v1
kind: Node
metadata:
  name: test-node
spec:
  podCIDR: 10.0.0.0/24
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.2}
";

const NODE_TAINTED: &str = "apiVersion: v1
kind: Node
metadata:
  name: test-node
spec:
  podCIDR: 10.0.0.0/24
  taints:
  - {key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}
status:
  addresses:
  - {type: InternalIP, address: 192.168.0.2}
";

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns1}
spec:
  clusterIP: 172.30.0.10
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: ns1}
spec:
  clusterIP: 172.30.0.11
  ports: [{name: http, port: 0, protocol: TCP}]
";

fn slices(n: usize) -> String {
    let eps: Vec<String> = (1..=n)
        .map(|i| format!("- addresses: [10.1.0.{i}]\n  conditions: {{ready: true}}\n  nodeName: test-node\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: ns1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{}",
        eps.concat()
    )
}

/// Writes a file atomically (rename), so the directory poller never reads half a file.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// kproxy running in its own namespace on its own manifests directory.
struct Daemon {
    child: Child,
    log: PathBuf,
    manifests: TempDir,
    /// The `KPROXY_TEST_FAIL_APPLY` flag file (absent unless a test creates it).
    flag: PathBuf,
    _work: TempDir,
    ns: Netns,
}

impl Daemon {
    /// Starts kproxy; `fail_from_start` creates the fail flag first, so no apply succeeds.
    fn start(sync_period: &str, fail_from_start: bool) -> Daemon {
        Daemon::start_with(sync_period, fail_from_start, &[])
    }

    /// [`Daemon::start`] with more flags.
    fn start_with(sync_period: &str, fail_from_start: bool, extra: &[&str]) -> Daemon {
        let ns = Netns::new();
        let manifests = TempDir::new("manifests");
        let work = TempDir::new("work");
        write(&manifests.0.join("node.yaml"), NODE);
        write(&manifests.0.join("services.yaml"), SERVICES);
        write(&manifests.0.join("slices.yaml"), &slices(2));
        let flag = work.0.join("fail-apply");
        if fail_from_start {
            std::fs::write(&flag, "fail").unwrap();
        }
        let log = work.0.join("kproxy.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_kproxy")])
            .arg("--manifests")
            .arg(&manifests.0)
            .args(["--hostname-override", "test-node", "--cluster-cidr", "10.0.0.0/8"])
            .args(["--healthz-bind-address", &format!("127.0.0.1:{HEALTH_PORT}")])
            .args(["--metrics-bind-address", &format!("127.0.0.1:{METRICS_PORT}")])
            .args(["--iptables-sync-period", sync_period, "--iptables-min-sync-period", "0s"])
            .args(extra)
            .env("KPROXY_TEST_FAIL_APPLY", &flag)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("starting kproxy");
        Daemon { child, log, manifests, flag, _work: work, ns }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn health(&self, path: &str) -> Result<Reply, String> {
        get(&self.ns.name, HEALTH_PORT, path)
    }

    fn metrics_port(&self, path: &str) -> Result<Reply, String> {
        get(&self.ns.name, METRICS_PORT, path)
    }

    /// `/debug/syncs` once it lists at least `n` syncs, `ok` of them successful.
    fn wait_syncs(&self, n: usize, ok: usize) -> serde_json::Value {
        wait_for(&format!("{n} syncs, {ok} ok"), Duration::from_secs(30), self, || {
            let r = self.metrics_port("/debug/syncs")?;
            let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
            let syncs = v["syncs"].as_array().cloned().unwrap_or_default();
            let good = syncs.iter().filter(|s| s["ok"] == true).count();
            if syncs.len() >= n && good >= ok {
                Ok(v)
            } else {
                Err(format!("{} syncs, {good} ok", syncs.len()))
            }
        })
    }

    /// Polls a health path until it answers `code`; returns the body as JSON.
    fn wait_health(&self, path: &str, code: u16, what: &str) -> serde_json::Value {
        wait_for(&format!("{path} {code} ({what})"), Duration::from_secs(30), self, || {
            let r = self.health(path)?;
            if r.status == code {
                serde_json::from_str(&r.body).map_err(|e| format!("{e}: {}", r.body))
            } else {
                Err(format!("{} {}", r.status, r.body))
            }
        })
    }

    fn scrape(&self) -> Exposition {
        let r = self.metrics_port("/metrics").unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
        assert_eq!(r.status, 200);
        assert_eq!(r.headers.get("content-type").map(String::as_str), Some("text/plain; version=0.0.4; charset=utf-8"));
        Exposition::parse(&r.body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample: its labels (sorted) and value.
type Sample = (BTreeMap<String, String>, f64);

/// A parsed text exposition: metric families by name.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    help: BTreeMap<String, String>,
    /// Sample name → label sets and values.
    samples: BTreeMap<String, Vec<Sample>>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (n, t) = rest.split_once(' ').unwrap();
                e.types.insert(n.into(), t.into());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (n, h) = rest.split_once(' ').unwrap();
                e.help.insert(n.into(), h.into());
            } else if !line.is_empty() && !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => (n, l.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                e.samples.entry(name.into()).or_default().push((labels, value.parse().unwrap()));
            }
        }
        e
    }

    /// The label names of a family's samples (without `le`), or None when it has no samples.
    fn label_names(&self, family: &str) -> Option<BTreeSet<String>> {
        let s = self.samples.get(family).or_else(|| self.samples.get(&format!("{family}_count")))?;
        Some(s.iter().flat_map(|(l, _)| l.keys().cloned()).filter(|k| k != "le").collect())
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(name)?.iter().find_map(|(l, v)| {
            labels.iter().all(|(k, want)| l.get(*k).map(String::as_str) == Some(*want)).then_some(*v)
        })
    }

    /// The `le` values of a histogram's buckets for one label set (without +Inf).
    fn buckets(&self, family: &str, labels: &[(&str, &str)]) -> Vec<String> {
        self.samples
            .get(&format!("{family}_bucket"))
            .map(|v| {
                v.iter()
                    .filter(|(l, _)| labels.iter().all(|(k, want)| l.get(*k).map(String::as_str) == Some(*want)))
                    .map(|(l, _)| l["le"].clone())
                    .filter(|le| le != "+Inf")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Names a dashboard may query: every sample name, and each family name.
    fn exported_names(&self) -> BTreeSet<String> {
        self.samples.keys().cloned().chain(self.types.keys().cloned()).collect()
    }
}

/// Upstream's metrics (pkg/proxy/metrics, nftables mode) with type and label names.
const UPSTREAM: &[(&str, &str, &[&str])] = &[
    ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram", &["ip_family"]),
    ("kubeproxy_sync_full_proxy_rules_duration_seconds", "histogram", &["ip_family"]),
    ("kubeproxy_sync_partial_proxy_rules_duration_seconds", "histogram", &["ip_family"]),
    ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge", &["ip_family"]),
    ("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "gauge", &["ip_family"]),
    ("kubeproxy_network_programming_duration_seconds", "histogram", &["ip_family"]),
    ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge", &[]),
    ("kubeproxy_sync_proxy_rules_endpoint_changes_total", "counter", &[]),
    ("kubeproxy_sync_proxy_rules_service_changes_pending", "gauge", &[]),
    ("kubeproxy_sync_proxy_rules_service_changes_total", "counter", &[]),
    ("kubeproxy_proxy_healthz_total", "counter", &["code"]),
    ("kubeproxy_proxy_livez_total", "counter", &["code"]),
    ("kubeproxy_sync_proxy_rules_no_local_endpoints_total", "gauge", &["ip_family", "traffic_policy"]),
    ("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "counter", &[]),
    ("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", "counter", &[]),
];

/// kproxy's own metrics and the process metrics.
const OWN: &[(&str, &str, &[&str])] = &[
    ("kproxy_sync_phase_duration_seconds", "histogram", &["ip_family", "phase"]),
    ("kproxy_syncs_total", "counter", &["ip_family", "kind", "result"]),
    ("kproxy_transaction_messages", "histogram", &["ip_family"]),
    ("kproxy_transaction_bytes", "histogram", &["ip_family"]),
    ("kproxy_transaction_elements_total", "counter", &["ip_family", "op"]),
    ("kproxy_objects_rejected_total", "counter", &["kind", "reason"]),
    ("kproxy_ruleset_objects", "gauge", &["ip_family", "object"]),
    ("kproxy_conntrack_udp_entries_deleted_total", "counter", &["ip_family"]),
    ("kproxy_healthy", "gauge", &["ip_family"]),
    ("kproxy_node_eligible", "gauge", &[]),
    ("kproxy_runtime_alive_tasks", "gauge", &[]),
    ("kproxy_build_info", "gauge", &["mode", "version"]),
    ("process_cpu_seconds_total", "counter", &[]),
    ("process_resident_memory_bytes", "gauge", &[]),
    ("process_virtual_memory_bytes", "gauge", &[]),
    ("process_start_time_seconds", "gauge", &[]),
    ("process_open_fds", "gauge", &[]),
    ("process_max_fds", "gauge", &[]),
];

fn fmt_le(v: f64) -> String {
    // Prometheus' text format as the prometheus crate writes it (Rust's shortest float form).
    format!("{v}")
}

#[test]
fn metrics_match_upstream_names_types_labels_and_buckets() {
    let d = Daemon::start("30s", false);
    let dbg = d.wait_syncs(1, 1);
    // One probe of each health path, so that the code-labelled counters have a child.
    d.wait_health("/healthz", 200, "synced");
    d.wait_health("/livez", 200, "synced");
    let m = d.scrape();

    for (name, ty, labels) in UPSTREAM.iter().chain(OWN) {
        assert_eq!(m.types.get(*name).map(String::as_str), Some(*ty), "type of {name}");
        let want: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
        if name.starts_with("kubeproxy_") {
            assert!(m.help[*name].starts_with("[ALPHA] "), "{name}: upstream marks ALPHA metrics in the help");
        }
        // Families with labels but no observation yet have no samples; the rest must match.
        match m.label_names(name) {
            Some(got) => assert_eq!(got, want, "labels of {name}"),
            None => assert!(!want.is_empty(), "{name} has no samples"),
        }
    }

    let sync_buckets: Vec<String> = (0..15).map(|i| fmt_le(0.001 * f64::powi(2.0, i))).collect();
    for h in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    ] {
        let got = m.buckets(h, &[("ip_family", "IPv4")]);
        assert_eq!(got.len(), 15, "{h}: {got:?}");
        for (g, w) in got.iter().zip(&sync_buckets) {
            let (g, w): (f64, f64) = (g.parse().unwrap(), w.parse().unwrap());
            assert!((g - w).abs() < 1e-9, "{h}: bucket {g} != {w}");
        }
    }
    let mut np: Vec<f64> = vec![0.25, 0.5];
    np.extend((1..=59).map(f64::from));
    np.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    np.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    let got: Vec<f64> = m
        .buckets("kubeproxy_network_programming_duration_seconds", &[("ip_family", "IPv4")])
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(got, np, "network programming buckets");

    // What happened is visible: a full sync, the changes, the rejected Service, the ruleset.
    assert_eq!(m.value("kubeproxy_sync_full_proxy_rules_duration_seconds_count", &[("ip_family", "IPv4")]), Some(1.0));
    assert_eq!(m.value("kubeproxy_sync_proxy_rules_service_changes_total", &[]), Some(1.0));
    assert_eq!(m.value("kubeproxy_sync_proxy_rules_endpoint_changes_total", &[]), Some(1.0));
    assert_eq!(m.value("kubeproxy_sync_proxy_rules_service_changes_pending", &[]), Some(0.0));
    assert!(m.value("kproxy_objects_rejected_total", &[("kind", "Service"), ("reason", "port")]).unwrap() >= 1.0);
    assert_eq!(m.value("kproxy_ruleset_objects", &[("ip_family", "IPv4"), ("object", "service_ports")]), Some(1.0));
    assert_eq!(m.value("kproxy_ruleset_objects", &[("ip_family", "IPv4"), ("object", "endpoints")]), Some(2.0));
    assert!(m.value("kproxy_transaction_messages_sum", &[("ip_family", "IPv4")]).unwrap() > 2.0);
    assert!(m.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[("ip_family", "IPv4")]).unwrap() > 1e9);
    assert!(m.value("kubeproxy_proxy_healthz_total", &[("code", "200")]).unwrap() >= 1.0);
    assert!(m.value("process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert_eq!(m.value("kproxy_node_eligible", &[]), Some(1.0));
    assert_eq!(m.value("kproxy_healthy", &[("ip_family", "IPv4")]), Some(1.0));
    // The invalid Service is logged once naming the object and the reason.
    let log = d.log();
    let line = log.lines().find(|l| l.contains("skipping") && l.contains("Service ns1/broken")).expect(&log);
    assert!(line.contains("spec.ports[0].port 0 is out of range 1-65535"), "{line}");

    // The other paths of the metrics port.
    let r = d.metrics_port("/proxyMode").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "nftables"));
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
    let r = d.metrics_port("/healthz").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    assert_eq!(d.metrics_port("/nonexistent").unwrap().status, 404);
    let r = d.metrics_port("/").unwrap();
    assert!(r.headers["content-type"].starts_with("text/html"));
    assert!(r.body.contains("<svg id=\"chart\""));

    // The JSON feed: the first sync was full and sent a batch; counts match the manifests.
    let first = &dbg["syncs"][0];
    assert_eq!(first["full"], true);
    assert_eq!(first["ok"], true);
    assert!(first["messages"].as_u64().unwrap() > 2);
    assert!(first["bytes"].as_u64().unwrap() > 100);
    assert_eq!(first["families"], serde_json::json!(["IPv4"]));
    let v: serde_json::Value = serde_json::from_str(&d.metrics_port("/debug/syncs").unwrap().body).unwrap();
    assert_eq!(v["mode"], "nftables");
    assert_eq!(v["ruleset"]["service_ports"], 1);
    assert_eq!(v["ruleset"]["endpoints"], 2);
    assert_eq!(v["healthy"], true);
    assert_eq!(v["node_eligible"], true);
}

/// Upstream's iptables-mode metrics (registered only in iptables mode, as upstream).
const UPSTREAM_IPTABLES: &[(&str, &str, &[&str])] = &[
    ("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", "counter", &["ip_family"]),
    ("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", "counter", &["ip_family"]),
    ("kubeproxy_sync_proxy_rules_iptables_total", "gauge", &["ip_family", "table"]),
    ("kubeproxy_sync_proxy_rules_iptables_last", "gauge", &["ip_family", "table"]),
];

/// iptables mode exports upstream's iptables metrics (and not the nftables-only ones), with the
/// rule counts of the restores, full then partial syncs, and says `iptables` on `/proxyMode`.
#[test]
fn iptables_mode_exports_upstreams_iptables_metrics() {
    let d = Daemon::start_with("1s", false, &["--proxy-mode", "iptables"]);
    d.wait_syncs(2, 2);
    // One probe of each health path, so that the code-labelled counters have a child.
    d.wait_health("/healthz", 200, "synced");
    d.wait_health("/livez", 200, "synced");
    let m = d.scrape();
    for (name, ty, labels) in UPSTREAM.iter().filter(|(n, _, _)| !n.contains("_nftables_")).chain(UPSTREAM_IPTABLES) {
        assert_eq!(m.types.get(*name).map(String::as_str), Some(*ty), "iptables mode: type of {name}");
        assert!(m.help[*name].starts_with("[ALPHA] "), "{name}: upstream marks ALPHA metrics in the help");
        let want: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
        match m.label_names(name) {
            Some(got) => assert_eq!(got, want, "labels of {name}"),
            None => assert!(!want.is_empty(), "{name} has no samples"),
        }
    }
    for (name, _, _) in UPSTREAM.iter().filter(|(n, _, _)| n.contains("_nftables_")) {
        assert!(!m.types.contains_key(*name), "iptables mode exports the nftables-only {name}");
    }
    let v = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or(-1.0);
    let v4 = ("ip_family", "IPv4");
    assert_eq!(v("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", &[v4]), 0.0);
    assert_eq!(v("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", &[v4]), 0.0);
    // The Service's chains: its KUBE-SERVICES rule, KUBE-SVC- (masquerade + 2 endpoints), 2 SEPs.
    let nat_total = v("kubeproxy_sync_proxy_rules_iptables_total", &[v4, ("table", "nat")]);
    assert!(nat_total >= 10.0, "nat rules {nat_total}");
    assert!(v("kubeproxy_sync_proxy_rules_iptables_total", &[v4, ("table", "filter")]) >= 1.0);
    // The last sync was partial: only the fixed chains were written, fewer nat rules than exist.
    let nat_last = v("kubeproxy_sync_proxy_rules_iptables_last", &[v4, ("table", "nat")]);
    assert!(nat_last > 0.0 && nat_last < nat_total, "nat rules written last {nat_last} of {nat_total}");
    assert_eq!(v("kubeproxy_sync_full_proxy_rules_duration_seconds_count", &[v4]), 1.0);
    assert!(v("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", &[v4]) >= 1.0);
    assert_eq!(v("kproxy_build_info", &[("mode", "iptables")]), 1.0);
    // nfacct works in the namespace: upstream's nfacct counters are exported (read from the
    // kernel's objects, unlabelled counters), and the INVALID drop rule counts into its object.
    for name in [
        "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
        "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some("counter"), "type of {name}\n{}", d.log());
        assert!(m.help[name].starts_with("[ALPHA] "), "{name}: upstream marks ALPHA metrics in the help");
        assert_eq!(m.label_names(name), Some(BTreeSet::new()), "{name} is one unlabelled sample");
        assert!(v(name, &[]) >= 0.0, "{name}");
    }
    // Both flavours' tables (kproxy picked one of them; the other is empty).
    let mut saved = String::new();
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        if let Ok(o) = Command::new("ip").args(["netns", "exec", &d.ns.name, save, "-t", "filter"]).output() {
            saved.push_str(&String::from_utf8_lossy(&o.stdout));
        }
    }
    let rule =
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP";
    // (xt_nfacct's save prints two spaces after --nfacct-name.)
    let norm = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(saved.lines().any(|l| norm(l) == rule), "no {rule:?} in\n{saved}");
    let r = d.metrics_port("/proxyMode").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "iptables"));
    let dbg: serde_json::Value = serde_json::from_str(&d.metrics_port("/debug/syncs").unwrap().body).unwrap();
    assert_eq!(dbg["mode"], "iptables");
}

#[test]
fn health_through_the_life_cycle() {
    // syncPeriod 3s: the health timeout is 6s. Every apply fails from the start.
    let d = Daemon::start("3s", true);

    // Starting: a change is queued but not late yet; both answer 200, lastUpdated = now.
    let v = d.wait_health("/livez", 200, "starting");
    assert_eq!(v["healthy"], true);
    assert_eq!(v["lastUpdated"], v["currentTime"], "on 200 lastUpdated is now, as upstream");
    assert_eq!(v["status"]["IPv4"]["healthy"], true);
    assert!(v.get("nodeEligible").is_none(), "/livez has no nodeEligible");
    let r = d.health("/healthz").unwrap();
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    let keys: Vec<&str> = {
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let mut k: Vec<&str> = ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
            .into_iter()
            .filter(|k| v.get(*k).is_some())
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys, ["currentTime", "healthy", "lastUpdated", "nodeEligible", "status"], "{}", r.body);

    // Stuck: the queued change is older than 2 x syncPeriod.
    let v = d.wait_health("/livez", 503, "the first sync never succeeds");
    assert_eq!(v["healthy"], false);
    assert_eq!(v["status"]["IPv4"]["healthy"], false);
    assert_ne!(v["lastUpdated"], v["currentTime"], "on 503 lastUpdated is the last update");
    let v = d.wait_health("/healthz", 503, "stuck");
    assert_eq!(v["nodeEligible"], true);
    assert_eq!(v["healthy"], false);
    // The error names the family and the reason.
    let log = d.log();
    let line = log.lines().find(|l| l.contains("sync failed")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("applying the IPv4 ruleset: injected failure"), "{line}");

    // Recovered: the retry after syncPeriod succeeds.
    std::fs::remove_file(&d.flag).unwrap();
    let v = d.wait_health("/healthz", 200, "recovered");
    assert_eq!(v["healthy"], true);
    assert_eq!(v["status"]["IPv4"]["healthy"], true);
    d.wait_health("/livez", 200, "recovered");

    // A sync blocked in the kernel: the health server still answers, and says so in time.
    std::fs::write(&d.flag, "block").unwrap();
    write(&d.manifests.0.join("slices.yaml"), &slices(3));
    d.wait_health("/livez", 503, "a sync blocked in apply");
    std::fs::remove_file(&d.flag).unwrap();
    d.wait_health("/livez", 200, "the blocked sync went through");
    d.wait_health("/healthz", 200, "the blocked sync went through");

    // The node gets the cluster autoscaler's taint: /healthz fails (drain), /livez does not.
    write(&d.manifests.0.join("node.yaml"), NODE_TAINTED);
    let v = d.wait_health("/healthz", 503, "node tainted ToBeDeletedByClusterAutoscaler");
    assert_eq!(v["nodeEligible"], false);
    assert_eq!(v["healthy"], true, "the proxier itself is fine");
    let r = d.health("/livez").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // Node without the taint again.
    write(&d.manifests.0.join("node.yaml"), NODE);
    d.wait_health("/healthz", 200, "taint removed");
    // Node gone from the manifests: unknown, not eligible.
    std::fs::remove_file(d.manifests.0.join("node.yaml")).unwrap();
    let v = d.wait_health("/healthz", 503, "node unknown");
    assert_eq!(v["nodeEligible"], false);

    let m = d.scrape();
    assert!(m.value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", &[]).unwrap() >= 1.0);
    assert!(m.value("kubeproxy_proxy_healthz_total", &[("code", "503")]).unwrap() >= 1.0);
    assert!(m.value("kubeproxy_proxy_healthz_total", &[("code", "200")]).unwrap() >= 1.0);
    assert!(m.value("kubeproxy_proxy_livez_total", &[("code", "503")]).unwrap() >= 1.0);
    assert!(m.value("kproxy_syncs_total", &[("kind", "full"), ("result", "failure")]).unwrap() >= 1.0);
    let v: serde_json::Value = serde_json::from_str(&d.metrics_port("/debug/syncs").unwrap().body).unwrap();
    let failed = v["syncs"].as_array().unwrap().iter().find(|s| s["ok"] == false).expect("a failed sync");
    assert!(failed["error"].as_str().unwrap().contains("injected failure"), "{failed}");
}

#[test]
fn json_logs_name_the_object_and_the_reason() {
    let d = Daemon::start_with("30s", false, &["--logging-format", "json"]);
    d.wait_syncs(1, 1);
    let log = d.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}")))
        .collect();
    let skip = lines
        .iter()
        .find(|v| v["fields"]["object"] == "ns1/broken")
        .unwrap_or_else(|| panic!("no log line for the invalid Service:\n{log}"));
    assert_eq!(skip["level"], "WARN");
    assert_eq!(skip["fields"]["kind"], "Service");
    let msg = skip["fields"]["message"].as_str().unwrap();
    assert!(msg.contains("spec.ports[0].port 0 is out of range 1-65535"), "{msg}");
    let sync = lines.iter().find(|v| v["fields"]["message"] == "sync done").expect("a sync line");
    assert_eq!(sync["level"], "INFO");
    assert_eq!(sync["fields"]["full"], true);
    assert!(sync["fields"]["ops"].as_u64().unwrap() > 0);
    assert!(sync["fields"]["bytes"].as_u64().unwrap() > 0);
    assert!(sync["fields"]["elapsed_ms"].as_f64().is_some());
}

/// Metric names a PromQL expression selects (identifiers followed by a `{` selector), with quoted
/// strings removed first so label values cannot look like names.
fn metric_names(expr: &str) -> Vec<String> {
    let mut unquoted = String::new();
    let mut in_str = false;
    let mut prev = ' ';
    for c in expr.chars() {
        if c == '"' && prev != '\\' {
            in_str = !in_str;
        } else if !in_str {
            unquoted.push(c);
        }
        prev = c;
    }
    let mut out = Vec::new();
    let chars: Vec<char> = unquoted.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j] == ' ' {
                j += 1;
            }
            if j < chars.len() && chars[j] == '{' && (start == 0 || chars[start - 1] != '$') {
                out.push(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every PromQL expression of the dashboard (panel targets and template queries).
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

/// `expr:` values of the alert rules (block scalars included).
fn alert_exprs(yaml: &str) -> Vec<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).expect("alerts.yaml is YAML");
    let mut out = Vec::new();
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            out.push(r["expr"].as_str().expect("expr").to_string());
        }
    }
    out
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn metric_name_extraction() {
    assert_eq!(
        metric_names(r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job", x="b{c}"}[5m]))) / b {}"#),
        ["a_bucket", "b"]
    );
    assert!(metric_names(r#"label_values(kproxy_build_info{job=~"$job"}, instance)"#) == ["kproxy_build_info"]);
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics_and_promtool_accepts_the_rules() {
    let dash_text = std::fs::read_to_string(repo().join("deploy/dashboards/kproxy.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dash_text).expect("the dashboard is JSON");
    let alerts_text = std::fs::read_to_string(repo().join("deploy/alerts.yaml")).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dash, &mut exprs);
    let n_dash = exprs.len();
    exprs.extend(alert_exprs(&alerts_text));
    assert!(
        n_dash > 30 && exprs.len() > n_dash + 5,
        "{n_dash} dashboard and {} alert expressions",
        exprs.len() - n_dash
    );

    // The generator and the JSON agree.
    if let Ok(out) = Command::new("python3").arg(repo().join("deploy/dashboards/generate.py")).output() {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim_end(),
            dash_text.trim_end(),
            "deploy/dashboards/kproxy.json is stale: run python3 deploy/dashboards/generate.py > deploy/dashboards/kproxy.json"
        );
    }

    let d = Daemon::start("30s", false);
    d.wait_syncs(1, 1);
    d.wait_health("/healthz", 200, "synced");
    d.wait_health("/livez", 200, "synced");
    let exported = d.scrape().exported_names();
    // Series kproxy cannot export here: `up` is made by Prometheus; the REST client metrics exist
    // only with the API source (this test uses --manifests).
    let not_here = ["up", "rest_client_requests_total", "rest_client_request_duration_seconds_bucket"];
    let mut missing = BTreeSet::new();
    let mut used = BTreeSet::new();
    for e in &exprs {
        for name in metric_names(e) {
            used.insert(name.clone());
            if !exported.contains(&name) && !not_here.contains(&name.as_str()) {
                missing.insert(name);
            }
        }
    }
    assert!(missing.is_empty(), "used by the dashboard or alerts but not exported: {missing:?}");
    for must in [
        "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket",
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kproxy_sync_phase_duration_seconds_sum",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(used.contains(must), "the dashboard should chart {must}");
    }

    let promtool = Command::new("promtool").args(["check", "rules"]).arg(repo().join("deploy/alerts.yaml")).output();
    match promtool {
        Err(e) => panic!(
            "promtool not found ({e}): install the Debian package `prometheus` (listed in the Makefile's \
             APT_PACKAGES; `make deps` installs it)"
        ),
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules deploy/alerts.yaml failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn the_built_in_page_charts_syncs_in_headless_chromium() {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .unwrap_or_else(|| {
            panic!("no headless browser found: install the Debian package `chromium` (Makefile APT_PACKAGES)")
        });
    let d = Daemon::start("1s", false);
    d.wait_syncs(2, 2);
    // Some history worth charting: a failed sync, then changes of growing size.
    std::fs::write(&d.flag, "fail").unwrap();
    write(&d.manifests.0.join("slices.yaml"), &slices(5));
    wait_for("a failed sync", Duration::from_secs(30), &d, || {
        let v: serde_json::Value =
            serde_json::from_str(&d.metrics_port("/debug/syncs")?.body).map_err(|e| e.to_string())?;
        v["syncs"].as_array().unwrap().iter().any(|s| s["ok"] == false).then_some(()).ok_or_else(|| v.to_string())
    });
    std::fs::remove_file(&d.flag).unwrap();
    for n in [20, 60, 120] {
        write(&d.manifests.0.join("slices.yaml"), &slices(n));
        let want = n;
        wait_for(&format!("{n} endpoints programmed"), Duration::from_secs(30), &d, || {
            let v: serde_json::Value =
                serde_json::from_str(&d.metrics_port("/debug/syncs")?.body).map_err(|e| e.to_string())?;
            (v["ruleset"]["endpoints"] == want).then_some(()).ok_or_else(|| v["ruleset"].to_string())
        });
    }
    d.wait_syncs(8, 7);
    let url = format!("http://127.0.0.1:{METRICS_PORT}/");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kproxy-page.png");
    // Chromium refuses to run as root without --no-sandbox; the profile goes to a temp dir so
    // that parallel runs do not share one. The virtual time budget lets the page's fetch and
    // rendering finish before the DOM is dumped.
    let profile = TempDir::new("chromium");
    let run = |extra: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &d.ns.name, chromium])
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .args(["--window-size=1000,900", "--virtual-time-budget=5000"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("running chromium")
    };
    let out = run(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    let points: usize = dom
        .split("data-points=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the chart did not render (no data-points):\n{dom}"));
    assert!(points >= 3, "the chart shows {points} syncs:\n{dom}");
    assert!(dom.matches("class=\"pt\"").count() >= 3, "no sync markers drawn:\n{dom}");
    assert!(dom.contains("id=\"line\""), "no latency line drawn");
    assert!(dom.contains("fill=\"#c62828\""), "the failed sync is not marked red");
    assert!(dom.contains("service ports"), "no counts shown");
    assert!(dom.contains("<div id=\"err\"></div>"), "the page could not load its data:\n{dom}");

    let out = run(&[&format!("--screenshot={}", shot.display())]);
    assert!(out.status.success(), "chromium screenshot failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot at {}", shot.display());
    // KPROXY_UPDATE_SCREENSHOT=1 refreshes the screenshot kept in the docs.
    if std::env::var_os("KPROXY_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, repo().join("docs/observability-page.png")).unwrap();
    }
}
