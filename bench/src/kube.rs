//! `kproxy-bench kube`: event → kernel latency and RSS of the real kproxy daemon fed by the fake
//! API server (tests/support/fakeapi.rs, included by path so the bench and the tests serve the
//! same protocol). Run it inside a throwaway network namespace (`bench/run-kube.sh` does): it
//! starts kproxy there and reads the kernel with `nft monitor`.
//!
//! One measurement: a watch event for an EndpointSlice whose first endpoint gets a new, unique
//! address is queued on kproxy's watch stream (the fake's `update` returns) at t0; the first line
//! of `nft monitor` naming the new address arrives at t1 (the kernel has committed the
//! transaction and notified it). t1 - t0 is the event → kernel latency; it includes the
//! monitor's own delivery (a netlink multicast, one `nft` process, a pipe), well under 1 ms.
//! Changes are sequential: the next starts once kproxy has logged the previous sync, so each
//! measures one event on an idle daemon.

#[path = "../../tests/support/fakeapi.rs"]
mod fakeapi;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use fakeapi::FakeApi;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde_json::json;

pub struct Opts {
    pub services: usize,
    pub endpoints: usize,
    pub changes: usize,
    pub kproxy: PathBuf,
}

pub const NODE: &str = "node-x";
/// The flags every bench gives the daemon (besides its source), in process or not.
const DAEMON_FLAGS: [&str; 4] = ["--hostname-override", NODE, "--cluster-cidr", "10.0.0.0/8"];
const WARMUP: usize = 3;
/// How long any one thing may take before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(180);

/// The fake API server on its own thread with a current-thread runtime (the bench's main thread
/// drives it through the synchronous handle).
struct Api {
    fake: Option<FakeApi>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Api {
    fn start() -> Api {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let _ = tx.send(FakeApi::start().await);
                let _ = stopped.await;
            });
        });
        let fake = rx.recv().expect("fake API server thread");
        Api { fake: Some(fake), stop: Some(stop), thread: Some(thread) }
    }
    fn fake(&self) -> &FakeApi {
        self.fake.as_ref().expect("running")
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        drop(self.fake.take());
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process killed on drop (kproxy, nft monitor), so a panic leaves nothing behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's stdout with their arrival times, collected by a thread.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn collect(out: impl std::io::Read + Send + 'static) -> Lines {
    let lines: Lines = Arc::default();
    let l = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            l.lock().expect("lines").push((Instant::now(), line));
        }
    });
    lines
}

fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(1));
    }
}

// ---- the synthetic cluster (the shape of `rules::synthetic::cluster`, as API objects) -----------------

fn cluster_ip(i: usize) -> String {
    format!("172.{}.{}.{}", 16 + (i >> 16), (i >> 8) & 255, i & 255)
}

fn endpoint_ip(n: usize) -> String {
    format!("10.{}.{}.{}", 64 + (n >> 16), (n >> 8) & 255, n & 255)
}

/// Service i: ClusterIP port http 80; every 20th also https 443; every 10th a NodePort (unique
/// node ports); every 50th a LoadBalancer ingress IP.
fn service(i: usize) -> Service {
    let mut ports = vec![json!({"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080})];
    if i.is_multiple_of(20) {
        ports.push(json!({"name": "https", "protocol": "TCP", "port": 443, "targetPort": 8443}));
    }
    let mut ty = "ClusterIP";
    if i.is_multiple_of(10) {
        ty = "NodePort";
        for (k, p) in ports.iter_mut().enumerate() {
            p["nodePort"] = json!(30000 + 2 * (i / 10) + k);
        }
    }
    let mut status = json!({});
    if i.is_multiple_of(50) {
        ty = "LoadBalancer";
        status = json!({"loadBalancer": {"ingress": [{"ip": format!("198.51.{}.{}", (i >> 8) & 255, i & 255)}]}});
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}")},
        "spec": {"type": ty, "clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)], "ipFamilies": ["IPv4"],
                 "ports": ports},
        "status": status,
    }))
    .expect("service")
}

fn slice(i: usize, ips: &[String]) -> EndpointSlice {
    let mut ports = vec![json!({"name": "http", "protocol": "TCP", "port": 8080})];
    if i.is_multiple_of(20) {
        ports.push(json!({"name": "https", "protocol": "TCP", "port": 8443}));
    }
    let eps: Vec<_> = ips
        .iter()
        .map(|ip| {
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                         "nodeName": "node-y"})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}-abcde"),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": ports, "endpoints": eps,
    }))
    .expect("slice")
}

/// kproxy's `kubeproxy_network_programming_duration_seconds` (count, mean in ms) from its metrics
/// port (the default 127.0.0.1:10249, in this namespace): from the slices' trigger-time annotation
/// to the kernel, as upstream computes it. The buckets are too coarse for percentiles at this scale.
fn network_programming() -> (u64, f64) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect("127.0.0.1:10249") else { return (0, f64::NAN) };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let sum_of = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let count = sum_of("kubeproxy_network_programming_duration_seconds_count");
    let sum = sum_of("kubeproxy_network_programming_duration_seconds_sum");
    (count as u64, if count > 0.0 { sum / count * 1e3 } else { f64::NAN })
}

// ---- kproxy's log -------------------------------------------------------------------------------

/// The `key=value` fields of kproxy's "sync done" lines that changed something (ops > 0).
fn syncs(log: &Path) -> Vec<BTreeMap<String, String>> {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("sync done"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|f| f.get("ops").is_none_or(|o| o != "0"))
        .collect()
}

/// After a sync line saying `compacting=true`: waits (up to `limit`) for the daemon's line saying
/// it compacted what it keeps, so that memory is read after the compaction, as it stays.
fn wait_compacted(log: &Path, sync: &BTreeMap<String, String>, limit: Duration) {
    if sync.get("compacting").is_none_or(|c| c != "true") {
        return;
    }
    let started = Instant::now();
    while started.elapsed() < limit {
        if fs::read_to_string(log).unwrap_or_default().contains("compacted the state kept") {
            return;
        }
        thread::sleep(Duration::from_millis(2));
    }
    panic!("no compaction logged within {limit:?} after the sync");
}

fn field(f: &BTreeMap<String, String>, k: &str) -> Option<f64> {
    f.get(k).and_then(|v| v.parse().ok())
}

/// VmRSS and VmHWM of a process, in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |k: &str| -> f64 {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Whether `line` names `ip` as a whole address (10.250.0.1 must not match 10.250.0.10).
fn names_ip(line: &str, ip: &str) -> bool {
    line.match_indices(ip).any(|(i, _)| !line[i + ip.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

pub fn run(o: &Opts) {
    let dir = std::env::temp_dir().join(format!("kpxk{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");

    // The cluster, before kproxy starts: its initial list sees all of it.
    let api = Api::start();
    let fake = api.fake();
    let t = Instant::now();
    let node: Node = serde_json::from_value(json!({"metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}}))
    .expect("node");
    fake.create(&node);
    let cidr: ServiceCIDR =
        serde_json::from_value(json!({"metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["172.16.0.0/12"]}}))
            .expect("cidr");
    fake.create(&cidr);
    let mut eps: Vec<Vec<String>> = Vec::with_capacity(o.services);
    for i in 0..o.services {
        fake.create(&service(i));
        let ips: Vec<String> = (0..o.endpoints).map(|e| endpoint_ip(i * o.endpoints + e)).collect();
        fake.create(&slice(i, &ips));
        eps.push(ips);
    }
    eprintln!("fake API server at {} holds {} services; populated in {:?}", fake.url(), o.services, t.elapsed());

    let kubeconfig = dir.join("kubeconfig");
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\n\
             contexts:\n- name: fake\n  context: {{cluster: fake, user: kproxy}}\ncurrent-context: fake\n\
             users:\n- name: kproxy\n  user: {{}}\n",
            fake.url()
        ),
    )
    .expect("kubeconfig");
    let log = dir.join("kproxy.log");
    let log_file = fs::File::create(&log).expect("log");
    let started = Instant::now();
    let kproxy = Proc(
        Command::new(&o.kproxy)
            .args(["--kubeconfig", kubeconfig.to_str().expect("utf-8 path")])
            .args(DAEMON_FLAGS)
            .args(["--iptables-min-sync-period", "0s", "-v", "2"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", o.kproxy.display())),
    );
    let pid = kproxy.0.id();
    let first = wait("kproxy's first sync", DEADLINE, || syncs(&log).into_iter().next());
    let startup = started.elapsed();
    wait_compacted(&log, &first, DEADLINE);
    let (rss_synced, hwm_synced) = rss(pid);
    eprintln!("first sync after {startup:?}: {first:?}; VmRSS {rss_synced:.1} MiB, VmHWM {hwm_synced:.1} MiB");

    let mut mon_child = Command::new("nft")
        .arg("monitor")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("nft monitor");
    let mon = collect(mon_child.stdout.take().expect("stdout"));
    let _mon = Proc(mon_child);
    // nft subscribes only after it has read the ruleset into its cache, and that read starts
    // over whenever the ruleset changes meanwhile: commit a probe of our own at growing
    // intervals (committing in a tight loop would keep it from ever finishing) until one shows.
    let t = Instant::now();
    let mut gap = Duration::from_millis(50);
    wait("nft monitor sees commits", DEADLINE, || {
        let nft = |args: &[&str]| Command::new("nft").args(args).status().expect("nft");
        nft(&["add", "table", "ip", "kpxk-ready"]);
        nft(&["delete", "table", "ip", "kpxk-ready"]);
        let probe = Instant::now();
        while probe.elapsed() < gap {
            if mon.lock().expect("lines").iter().any(|(_, l)| l.contains("kpxk-ready")) {
                return Some(());
            }
            thread::sleep(Duration::from_millis(1));
        }
        gap = (gap * 2).min(Duration::from_secs(5));
        None
    });
    eprintln!("nft monitor ready after {:?}", t.elapsed());

    let mut lat = Vec::new();
    for j in 0..WARMUP + o.changes {
        // Spread over the cluster (a stride coprime with the size), one new unique address each.
        let i = (j * 7919 + 1) % o.services;
        let new_ip = format!("10.250.{}.{}", j / 250, j % 250 + 1);
        eps[i][0] = new_ip.clone();
        let mut obj = slice(i, &eps[i]);
        // As the EndpointSlice controller does: when the change was triggered, so that kproxy's
        // network-programming latency histogram sees it.
        obj.metadata.annotations = Some(BTreeMap::from([(
            kproxy::source::kube::TRIGGER_TIME_ANNOTATION.to_string(),
            k8s_openapi::jiff::Timestamp::now().to_string(),
        )]));
        let from = mon.lock().expect("lines").len();
        let syncs_before = syncs(&log).len();
        let t0 = Instant::now();
        fake.update(&obj);
        let t1 = wait(&format!("change {j}: {new_ip} in the kernel"), DEADLINE, || {
            mon.lock().expect("lines")[from..].iter().find(|(_, l)| names_ip(l, &new_ip)).map(|(t, _)| *t)
        });
        // Idle again before the next change: kproxy logged this sync.
        wait(&format!("change {j}: kproxy's sync line"), DEADLINE, || (syncs(&log).len() > syncs_before).then_some(()));
        if j >= WARMUP {
            lat.push((t1 - t0).as_secs_f64() * 1e3);
        }
    }
    let (rss_end, hwm_end) = rss(pid);
    let (np_count, np_mean_ms) = network_programming();
    let all = syncs(&log);
    let measured: Vec<_> = all.iter().skip(1 + WARMUP).collect();
    let of = |k: &str| -> Vec<f64> { measured.iter().filter_map(|f| field(f, k)).collect() };
    let (build, diff, apply, elapsed) = (of("build_ms"), of("diff_ms"), of("apply_ms"), of("elapsed_ms"));
    let fmt = |v: f64| if v.is_nan() { "n/a".to_string() } else { format!("{v:.1}") };
    println!(
        "kube services={} endpoints={} changes={} startup_s={:.1} first_sync_ms={} \
         event_kernel_p50_ms={:.1} event_kernel_p99_ms={:.1} event_kernel_max_ms={:.1} \
         sync_build_p50_ms={} sync_diff_p50_ms={} sync_apply_p50_ms={} sync_elapsed_p50_ms={} sync_elapsed_p99_ms={} \
         rss_synced_mib={:.1} hwm_synced_mib={:.1} rss_end_mib={:.1} hwm_end_mib={:.1} \
         netprog_count={} netprog_mean_ms={:.1}",
        o.services,
        o.endpoints,
        lat.len(),
        startup.as_secs_f64(),
        fmt(field(&first, "elapsed_ms").unwrap_or(f64::NAN)),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        fmt(pct(&build, 0.5)),
        fmt(pct(&diff, 0.5)),
        fmt(pct(&apply, 0.5)),
        fmt(pct(&elapsed, 0.5)),
        fmt(pct(&elapsed, 0.99)),
        rss_synced,
        hwm_synced,
        rss_end,
        hwm_end,
        np_count,
        np_mean_ms,
    );
    drop(kproxy);
    if std::env::var_os("KPXK_KEEP").is_some() {
        eprintln!("kept {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
}

// ---- the daemon from manifests: cold start, RSS, CPU ---------------------------------------------

/// The plain synthetic cluster as API objects: every Service and its one EndpointSlice.
pub fn objects(services: usize, endpoints: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let svcs = (0..services).map(service).collect();
    let slices = (0..services)
        .map(|i| slice(i, &(0..endpoints).map(|e| endpoint_ip(i * endpoints + e)).collect::<Vec<_>>()))
        .collect();
    (svcs, slices)
}

/// The configuration the benches run the daemon with ([`DAEMON_FLAGS`]), for in-process runs.
pub fn daemon_config() -> kproxy::config::Config {
    use clap::Parser;
    let flags = ["kproxy", "--manifests", "/nonexistent"].into_iter().chain(DAEMON_FLAGS);
    kproxy::config::Flags::try_parse_from(flags).expect("bench flags").into_config().expect("bench config")
}

/// The plain synthetic cluster (`service`, `slice` above) as `kproxy --manifests` input: JSON
/// `kind: List` files of 500 services each (kproxy refuses files over 16 MiB), plus this node and
/// the ServiceCIDR. The policy mix is not written (the API objects above carry none).
pub fn write_manifests(dir: &Path, services: usize, endpoints: usize, policies: bool) {
    assert!(!policies, "manifests: only the plain mix is written as API objects");
    fs::create_dir_all(dir).expect("manifest dir");
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}});
    let cidr = json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["172.16.0.0/12"]}});
    fs::write(dir.join("node.json"), json!({"apiVersion": "v1", "kind": "List", "items": [node, cidr]}).to_string())
        .expect("node.json");
    for chunk in 0..services.div_ceil(500) {
        let mut items = Vec::new();
        for i in chunk * 500..((chunk + 1) * 500).min(services) {
            let mut s = serde_json::to_value(service(i)).expect("service");
            s["apiVersion"] = json!("v1");
            s["kind"] = json!("Service");
            items.push(s);
            let ips: Vec<String> = (0..endpoints).map(|e| endpoint_ip(i * endpoints + e)).collect();
            let mut e = serde_json::to_value(slice(i, &ips)).expect("slice");
            e["apiVersion"] = json!("discovery.k8s.io/v1");
            e["kind"] = json!("EndpointSlice");
            items.push(e);
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        fs::write(dir.join(format!("services-{chunk:04}.json")), list.to_string()).expect("manifest");
    }
}

/// CPU seconds (user + system) of a process so far, from /proc/PID/stat (USER_HZ = 100).
fn cpu_s(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (t(11) + t(12)) / 100.0
}

/// Starts `kproxy --manifests dir [extra args]` in the current namespace and waits for its first
/// sync that changed something (the whole ruleset committed): process start → that log line,
/// the sync's own time; then VmRSS, VmHWM and CPU seconds once the daemon has compacted what it keeps
/// (after a large sync). Prints one `daemon ...` line.
pub fn daemon_cold(kproxy: &Path, dir: &Path, extra: &[String], limit: Duration) {
    let log = std::env::temp_dir().join(format!("kpxb-daemon-{}.log", std::process::id()));
    let log_file = fs::File::create(&log).expect("log");
    let started = Instant::now();
    let mut child = Proc(
        Command::new(kproxy)
            .args(["--manifests", dir.to_str().expect("utf-8 path")])
            .args(DAEMON_FLAGS)
            .args(["-v", "2"])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", kproxy.display())),
    );
    let pid = child.0.id();
    let mut first = None;
    let mut exited = None;
    while started.elapsed() < limit {
        if let Some(f) = syncs(&log).into_iter().next() {
            first = Some(f);
            break;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            exited = Some(status);
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed();
    if let Some(f) = &first {
        wait_compacted(&log, f, limit);
    }
    let (rss_now, hwm) = rss(pid);
    let cpu = cpu_s(pid);
    drop(child);
    match first {
        Some(f) => println!(
            "daemon cold_s={:.3} first_sync_ms={} commits={} longest_commit_ms={} rss_mib={rss_now:.1} hwm_mib={hwm:.1} \
             cpu_s={cpu:.2}",
            elapsed.as_secs_f64(),
            f.get("elapsed_ms").map_or("n/a", String::as_str),
            f.get("commits").map_or("n/a", String::as_str),
            f.get("longest_commit_ms").map_or("n/a", String::as_str),
        ),
        None => {
            let tail: String =
                fs::read_to_string(&log).unwrap_or_default().lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            match exited {
                Some(status) => println!("daemon exited={status:?} log_tail={tail:?}"),
                None => {
                    println!("daemon timed_out_s={} hwm_mib={hwm:.1} cpu_s={cpu:.2} log_tail={tail:?}", limit.as_secs())
                }
            }
        }
    }
    let _ = fs::remove_file(&log);
}
