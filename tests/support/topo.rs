//! Network-namespace topology for the packet-flow tests: two nodes, pods, an external host, echo
//! servers, probes, a manifests directory and the kproxy process; everything is removed on drop.
//!
//! ```text
//!  client 10.0.1.2  ─┐
//!  b1     10.0.1.11 ─┤ br0 10.0.1.1/24                       lan0 192.168.0.3/24
//!  b2     10.0.1.12 ─┤          [node]  lan0 192.168.0.2/24 ─────── [node2]  vr1 10.0.2.1/24 ── r1 10.0.2.11
//!  b3     10.0.1.13 ─┘           ext0 203.0.113.1/24
//!                                  │
//!                               [ext] eth0 203.0.113.2/24, default via the node
//! ```
//!
//! - Pods on the node have /32 addresses and a default route via 10.0.1.1, so even pod-to-pod
//!   traffic on the same bridge is routed by the node. That is what lets DNAT replies be un-NATed
//!   without `br_netfilter`: with /24 pod addresses a backend would answer a client on the same
//!   bridge directly, bypassing the node's conntrack, and the client would reset the connection.
//! - The node's default route points at the external host, so a packet to an address no rule
//!   claims (a deleted service's ClusterIP) leaves the node and is dropped there (ext does not
//!   forward): "not answered", as on a real node whose default route leads out of the cluster.
//! - node2 is only a router for its pod r1, so a Service can have a remote endpoint.
//! - Every name is prefixed with `kpp<pid>-<n>` so several tests and test processes can run at
//!   once; interface names are fixed because each lives in its own namespace.

#![allow(dead_code)] // each test binary uses a different part of this file

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub const NODE: &str = "node1";
pub const NODE2: &str = "node2";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 3);
/// The node's address on the pod bridge: what local pods see when the node masquerades to them.
pub const NODE_BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// The node's address towards the external host: a local address that is *not* the Node
/// object's InternalIP, so NodePorts must not answer on it by default.
pub const NODE_EXT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";

/// Ports every backend's echo server listens on.
pub const ECHO_TCP: u16 = 8080;
pub const ECHO_TCP2: u16 = 9090;
pub const ECHO_UDP: u16 = 8053;

const ECHO_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/echo.py");

/// Which proxy mode kproxy runs in. The packet tests run each scenario in both modes; iptables
/// mode picks the iptables flavour the node already uses, so `IptablesLegacy` leaves kubelet's
/// hint chain (`KUBE-IPTABLES-HINT` in the legacy mangle table) for it to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    Iptables,
    IptablesLegacy,
}

impl Mode {
    pub fn is_iptables(self) -> bool {
        self != Mode::Nftables
    }
    /// `iptables-save`, `iptables`, ... of the flavour this mode uses (nft-backed by default).
    pub fn ipt(self, program: &str) -> String {
        let suffix = if self == Mode::IptablesLegacy { "legacy" } else { "nft" };
        match program.split_once('-') {
            Some((base, rest)) => format!("{base}-{suffix}-{rest}"),
            None => format!("{program}-{suffix}"),
        }
    }
}

/// A pod of the topology. `Client` runs no server; the others are backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pod {
    Client,
    B1,
    B2,
    B3,
    R1,
}

impl Pod {
    pub const ALL: [Pod; 5] = [Pod::Client, Pod::B1, Pod::B2, Pod::B3, Pod::R1];
    pub const BACKENDS: [Pod; 4] = [Pod::B1, Pod::B2, Pod::B3, Pod::R1];
    pub const LOCAL: [Pod; 4] = [Pod::Client, Pod::B1, Pod::B2, Pod::B3];

    pub fn name(self) -> &'static str {
        match self {
            Pod::Client => "client",
            Pod::B1 => "b1",
            Pod::B2 => "b2",
            Pod::B3 => "b3",
            Pod::R1 => "r1",
        }
    }
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Pod::Client => Ipv4Addr::new(10, 0, 1, 2),
            Pod::B1 => Ipv4Addr::new(10, 0, 1, 11),
            Pod::B2 => Ipv4Addr::new(10, 0, 1, 12),
            Pod::B3 => Ipv4Addr::new(10, 0, 1, 13),
            Pod::R1 => Ipv4Addr::new(10, 0, 2, 11),
        }
    }
    pub fn node(self) -> &'static str {
        if self == Pod::R1 {
            NODE2
        } else {
            NODE
        }
    }
    /// The source a backend sees when the node masquerades traffic to it: the address of the
    /// node's interface towards that backend.
    pub fn masqueraded_src(self) -> Ipv4Addr {
        if self == Pod::R1 {
            NODE_IP
        } else {
            NODE_BRIDGE_IP
        }
    }
    pub fn by_name(name: &str) -> Option<Pod> {
        Pod::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Where a probe or command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// The node's host network namespace, where kproxy runs.
    Node,
    Node2,
    Ext,
    Pod(Pod),
}

impl Host {
    fn suffix(self) -> &'static str {
        match self {
            Host::Node => "node",
            Host::Node2 => "node2",
            Host::Ext => "ext",
            Host::Pod(p) => p.name(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn k8s(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
    fn py(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Probe results

/// What one connection attempt (TCP) or one datagram from a fresh socket (UDP) got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An echo server answered: its name and the source address it saw.
    Answer {
        backend: String,
        src: Ipv4Addr,
    },
    /// ECONNREFUSED: a TCP RST or an ICMP port unreachable (nft `reject`).
    Refused,
    Timeout,
    /// EHOSTUNREACH / ENETUNREACH.
    Unreachable,
    Reset,
    Error(String),
}

#[derive(Clone, Debug)]
pub struct Attempt {
    pub outcome: Outcome,
    pub elapsed: Duration,
}

impl Attempt {
    fn parse(line: &str) -> Attempt {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ms =
            |s: Option<&&str>| Duration::from_secs_f64(s.and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0) / 1000.0);
        let (outcome, elapsed) = match f.first().copied() {
            Some("ok") if f.len() == 4 => match f[2].parse() {
                Ok(src) => (Outcome::Answer { backend: f[1].to_string(), src }, ms(f.get(3))),
                Err(_) => (Outcome::Error(format!("bad source in {line:?}")), Duration::ZERO),
            },
            Some("refused") => (Outcome::Refused, ms(f.get(1))),
            Some("timeout") => (Outcome::Timeout, ms(f.get(1))),
            Some("unreach") => (Outcome::Unreachable, ms(f.get(1))),
            Some("reset") => (Outcome::Reset, ms(f.get(1))),
            Some("error") if f.len() == 3 => (Outcome::Error(f[1].to_string()), ms(f.get(2))),
            _ => (Outcome::Error(format!("unparsable probe line {line:?}")), Duration::ZERO),
        };
        Attempt { outcome, elapsed }
    }

    pub fn backend(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Answer { backend, .. } => Some(backend),
            _ => None,
        }
    }
}

/// Counts answers per backend name; non-answers are counted under their outcome's debug name.
pub fn tally(attempts: &[Attempt]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in attempts {
        let k = match &a.outcome {
            Outcome::Answer { backend, .. } => backend.clone(),
            o => format!("<{o:?}>"),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Polls `f` until it returns `Ok`, failing with its last error once `limit` has passed.
/// Returns the value and how long it took.
pub fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> (T, Duration) {
    let start = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match f() {
            Ok(v) => return (v, start.elapsed()),
            Err(e) if start.elapsed() >= limit => {
                panic!("{what}: not reached within {limit:?} ({tries} tries); last: {e}")
            }
            // Each try already takes a few ms (processes, probes); a short pause keeps a
            // broken condition from spinning a core while the other tests run.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Manifests

/// A Service with chained setters; renders to YAML as the API server would store it.
#[derive(Clone, Debug)]
pub struct Service {
    name: String,
    cluster_ip: Ipv4Addr,
    ports: Vec<SvcPort>,
    external_ips: Vec<Ipv4Addr>,
    lb_ips: Vec<Ipv4Addr>,
    /// Extra `spec:` fields, one YAML line each (`externalTrafficPolicy: Local`).
    spec_lines: Vec<String>,
}

#[derive(Clone, Debug)]
struct SvcPort {
    name: String,
    proto: Proto,
    port: u16,
    target: u16,
    node_port: Option<u16>,
}

impl Service {
    pub fn cluster_ip(name: &str, ip: Ipv4Addr) -> Self {
        Service {
            name: name.into(),
            cluster_ip: ip,
            ports: vec![],
            external_ips: vec![],
            lb_ips: vec![],
            spec_lines: vec![],
        }
    }
    pub fn port(mut self, name: &str, proto: Proto, port: u16, target: u16) -> Self {
        self.ports.push(SvcPort { name: name.into(), proto, port, target, node_port: None });
        self
    }
    /// Gives the last added port a node port (and makes the Service type NodePort).
    pub fn node_port(mut self, np: u16) -> Self {
        self.ports.last_mut().expect("node_port after port").node_port = Some(np);
        self
    }
    pub fn load_balancer_ip(mut self, ip: Ipv4Addr) -> Self {
        self.lb_ips.push(ip);
        self
    }
    pub fn external_ip(mut self, ip: Ipv4Addr) -> Self {
        self.external_ips.push(ip);
        self
    }
    /// Adds one field to the Service's spec, as a YAML line: `spec("externalTrafficPolicy: Local")`.
    pub fn spec(mut self, line: &str) -> Self {
        self.spec_lines.push(line.to_string());
        self
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.cluster_ip
    }

    pub fn yaml(&self) -> String {
        let ty = if !self.lb_ips.is_empty() {
            "LoadBalancer"
        } else if self.ports.iter().any(|p| p.node_port.is_some()) {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: default\nspec:\n  type: {ty}\n  \
             clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ipFamilies: [IPv4]\n  ports:\n",
            self.name,
            ip = self.cluster_ip
        );
        for p in &self.ports {
            let _ = write!(
                y,
                "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}\n",
                p.name,
                p.proto.k8s(),
                p.port,
                p.target
            );
            if let Some(np) = p.node_port {
                let _ = writeln!(y, "    nodePort: {np}");
            }
        }
        if !self.external_ips.is_empty() {
            let _ = writeln!(y, "  externalIPs: [{}]", join(&self.external_ips));
        }
        for l in &self.spec_lines {
            let _ = writeln!(y, "  {l}");
        }
        if !self.lb_ips.is_empty() {
            y.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for ip in &self.lb_ips {
                let _ = writeln!(y, "    - ip: {ip}");
            }
        }
        y
    }
}

/// An EndpointSlice for one Service, with chained setters.
#[derive(Clone, Debug)]
pub struct Slice {
    name: String,
    service: String,
    ports: Vec<(String, Proto, u16)>,
    /// Address, node, and the zone of its `hints.forZones` (none: no hints).
    endpoints: Vec<(Ipv4Addr, String, Option<String>)>,
}

impl Slice {
    pub fn of(service: &str) -> Self {
        Slice { name: format!("{service}-abcde"), service: service.into(), ports: vec![], endpoints: vec![] }
    }
    pub fn port(mut self, name: &str, proto: Proto, port: u16) -> Self {
        self.ports.push((name.into(), proto, port));
        self
    }
    /// A ready endpoint on the pod's node.
    pub fn endpoint(self, pod: Pod) -> Self {
        self.endpoint_at(pod.ip(), pod.node())
    }
    pub fn endpoint_at(mut self, ip: Ipv4Addr, node: &str) -> Self {
        self.endpoints.push((ip, node.into(), None));
        self
    }
    /// A ready endpoint on the pod's node with `hints: {forZones: [{name: zone}]}`.
    pub fn endpoint_in_zone(mut self, pod: Pod, zone: &str) -> Self {
        self.endpoints.push((pod.ip(), pod.node().into(), Some(zone.into())));
        self
    }
    pub fn endpoints(self, pods: &[Pod]) -> Self {
        pods.iter().fold(self, |s, p| s.endpoint(*p))
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}\n  namespace: default\n  \
             labels:\n    kubernetes.io/service-name: {}\naddressType: IPv4\nports:\n",
            self.name, self.service
        );
        for (name, proto, port) in &self.ports {
            let _ = write!(y, "- name: {name}\n  protocol: {}\n  port: {port}\n", proto.k8s());
        }
        if self.endpoints.is_empty() {
            y.push_str("endpoints: []\n");
        } else {
            y.push_str("endpoints:\n");
            for (ip, node, zone) in &self.endpoints {
                let _ = write!(
                    y,
                    "- addresses: [{ip}]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
                     nodeName: {node}\n"
                );
                if let Some(z) = zone {
                    let _ = writeln!(y, "  hints: {{forZones: [{{name: {z}}}]}}");
                }
            }
        }
        y
    }
}

fn node_yaml(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n  \
         - {{type: InternalIP, address: {ip}}}\n  - {{type: Hostname, address: {name}}}\n"
    )
}

fn join(ips: &[Ipv4Addr]) -> String {
    ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

// ------------------------------------------------------------------------------------------------
// Commands

/// Runs a command to completion; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs `ip [-n ns] -batch -` with `script` on stdin: one process for many changes.
fn ip_batch(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ip -batch");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} -batch failed: {}\nscript:\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();
const PREFIX: &str = "kpp";

/// Deletes namespaces and temp dirs left by earlier test processes that died without their Drop
/// (kill -9, a hung CI job). Only ours (prefix `kpp<pid>-`) and only when that pid is gone.
fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            return false;
        };
        pid.parse::<u32>().is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists())
    };
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if dead(&n) {
                let _ = Command::new("ip").args(["netns", "del", &n]).status();
            }
        }
    }
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if dead(&n) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Topology

/// The whole topology. Dropping it kills the echo servers and deletes every namespace and the
/// temp directory; probes and kproxy borrow it, so they are always gone first.
pub struct Topo {
    pub id: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    servers: Vec<Child>,
}

impl Topo {
    /// Builds the topology, starts an echo server in every backend pod and checks plain routed
    /// connectivity (no kproxy involved), so a later failure is about kproxy, not the harness.
    pub fn new() -> Topo {
        SWEEP.call_once(sweep_stale);
        let id = format!("{PREFIX}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("manifests")).unwrap();
        // The struct exists before anything is created, so a panic half-way still cleans up.
        let mut t = Topo { id, dir, namespaces: vec![], servers: vec![] };
        t.build();
        t.write_manifest("nodes.yaml", &[node_yaml(NODE, NODE_IP), node_yaml(NODE2, NODE2_IP)]);
        for p in Pod::BACKENDS {
            t.start_server(p);
        }
        t.check_plain_connectivity();
        t
    }

    pub fn ns(&self, h: Host) -> String {
        format!("{}-{}", self.id, h.suffix())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    fn build(&mut self) {
        let hosts: Vec<Host> =
            [Host::Node, Host::Node2, Host::Ext].into_iter().chain(Pod::ALL.map(Host::Pod)).collect();
        for h in &hosts {
            let ns = self.ns(*h);
            // A name left by a dead process with our pid: take it over.
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
            run(Command::new("ip").args(["netns", "add", &ns]));
            self.namespaces.push(ns);
        }
        let (node, node2, ext) = (self.ns(Host::Node), self.ns(Host::Node2), self.ns(Host::Ext));

        // Routers forward. Redirects off: the node routes pod-to-pod traffic back out of the
        // bridge it came in on and must not tell the pod to go direct. rp_filter off: the
        // inherited host setting (Debian sets it) must not make results depend on the machine.
        // br_netfilter, when loaded, would also pass bridged frames through the ip hooks; we
        // turn it off so the tests prove the routed path alone (-e: absent without the module).
        // ICMP errors are rate-limited per destination host (burst of 6, then one per
        // icmp_ratelimit ms): nft `reject` answers TCP and UDP alike with ICMP port unreachable,
        // so without this a test asking a no-endpoint service more than 6 times a second would
        // see timeouts, which is the kernel's policy and not what we test.
        for ns in [&node, &node2] {
            run(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-q", "-e", "-w"]).args([
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.ipv4.icmp_ratelimit=0",
            ]));
        }

        let mut s =
            String::from("link set lo up\nlink add br0 type bridge\naddr add 10.0.1.1/24 dev br0\nlink set br0 up\n");
        for p in Pod::LOCAL {
            let _ = write!(
                s,
                "link add v{n} type veth peer name eth0 netns {pns}\nlink set v{n} master br0 up\n",
                n = p.name(),
                pns = self.ns(Host::Pod(p))
            );
        }
        let _ = write!(
            s,
            "link add lan0 type veth peer name lan0 netns {node2}\naddr add {NODE_IP}/24 dev lan0\nlink set lan0 up\n\
             link add ext0 type veth peer name eth0 netns {ext}\naddr add {NODE_EXT_IP}/24 dev ext0\nlink set ext0 up\n"
        );
        ip_batch(&node, &s);

        ip_batch(
            &node2,
            &format!(
                "link set lo up\naddr add {NODE2_IP}/24 dev lan0\nlink set lan0 up\n\
                 link add vr1 type veth peer name eth0 netns {r1}\naddr add 10.0.2.1/24 dev vr1\nlink set vr1 up\n\
                 route add 10.0.1.0/24 via {NODE_IP}\nroute add default via {NODE_IP}\n",
                r1 = self.ns(Host::Pod(Pod::R1))
            ),
        );
        ip_batch(
            &ext,
            &format!("link set lo up\naddr add {EXT_IP}/24 dev eth0\nlink set eth0 up\nroute add default via {NODE_EXT_IP}\n"),
        );
        for p in Pod::LOCAL {
            ip_batch(
                &self.ns(Host::Pod(p)),
                &format!(
                    "link set lo up\naddr add {}/32 dev eth0\nlink set eth0 up\n\
                     route add {NODE_BRIDGE_IP} dev eth0\nroute add default via {NODE_BRIDGE_IP} dev eth0\n",
                    p.ip()
                ),
            );
        }
        ip_batch(
            &self.ns(Host::Pod(Pod::R1)),
            &format!(
                "link set lo up\naddr add {}/24 dev eth0\nlink set eth0 up\nroute add default via 10.0.2.1\n",
                Pod::R1.ip()
            ),
        );
        // Routes via the peers last: their links are up now.
        ip_batch(&node, &format!("route add 10.0.2.0/24 via {NODE2_IP}\nroute add default via {EXT_IP}\n"));
    }

    fn start_server(&mut self, p: Pod) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(Host::Pod(p)), "python3", ECHO_PY, "serve", p.name()])
            .arg(format!("{ECHO_TCP},{ECHO_TCP2}"))
            .arg(ECHO_UDP.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn echo server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        self.servers.push(child);
        assert_eq!(line.trim(), "ready", "echo server in {} did not start", p.name());
    }

    /// Pod-to-pod across nodes and external-to-pod, by plain routing.
    fn check_plain_connectivity(&self) {
        let mut client = self.prober(Host::Pod(Pod::Client));
        for p in Pod::BACKENDS {
            poll(&format!("client reaches {} directly", p.name()), Duration::from_secs(5), || {
                expect_answer(
                    &client.probe(Proto::Tcp, p.ip(), ECHO_TCP, 1, Duration::from_millis(500)),
                    p,
                    Pod::Client.ip(),
                )
            });
        }
        let mut ext = self.prober(Host::Ext);
        poll("ext reaches b1 directly", Duration::from_secs(5), || {
            expect_answer(
                &ext.probe(Proto::Tcp, Pod::B1.ip(), ECHO_TCP, 1, Duration::from_millis(500)),
                Pod::B1,
                EXT_IP,
            )
        });
    }

    /// Writes a manifest file atomically (write elsewhere, then rename), so kproxy never reads
    /// half a file.
    pub fn write_manifest(&self, file: &str, docs: &[String]) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, docs.join("---\n")).unwrap();
        fs::rename(&tmp, self.manifests_dir().join(file)).unwrap();
    }

    pub fn remove_manifest(&self, file: &str) {
        fs::remove_file(self.manifests_dir().join(file)).unwrap();
    }

    /// Writes a Service and its EndpointSlice into `<service name>.yaml`.
    pub fn apply(&self, svc: &Service, slice: &Slice) {
        self.write_manifest(&format!("{}.yaml", svc.name()), &[svc.yaml(), slice.yaml()]);
    }

    /// A command in a namespace (not run yet).
    pub fn cmd(&self, h: Host, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(h), program]);
        c
    }

    /// `nft <args>` in the node namespace; returns the output whatever the exit status.
    pub fn nft(&self, args: &[&str]) -> Output {
        self.cmd(Host::Node, "nft").args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Loads an nft script into the node namespace (`nft -f -`); panics when nft refuses it.
    pub fn nft_script(&self, script: &str) {
        let mut child = self.cmd(Host::Node, "nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft -f refused:\n{script}");
    }

    /// `iptables-save` of `mode`'s flavour in the node namespace (both families' tables: IPv4).
    pub fn iptables_save(&self, mode: Mode) -> String {
        let out = self.cmd(Host::Node, &mode.ipt("iptables-save")).stdin(Stdio::null()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `iptables <args>` of `mode`'s flavour in the node namespace; panics when it fails.
    pub fn iptables(&self, mode: Mode, args: &[&str]) {
        let out = self.cmd(Host::Node, &mode.ipt("iptables")).args(args).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "iptables {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// KUBE-* chains and jumps to them, in either iptables flavour (lines of `iptables-save`).
    pub fn kube_iptables_lines(&self) -> Vec<String> {
        [Mode::Iptables, Mode::IptablesLegacy]
            .iter()
            .flat_map(|m| {
                let save = self.iptables_save(*m);
                save.lines().filter(|l| l.contains("KUBE-")).map(|l| format!("{m:?}: {l}")).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Whether `table ip kube-proxy` exists in the node namespace.
    pub fn has_kube_proxy_table(&self) -> bool {
        self.nft(&["list", "table", "ip", "kube-proxy"]).status.success()
    }

    pub fn prober(&self, h: Host) -> Prober<'_> {
        let mut child = self
            .cmd(h, "python3")
            .args([ECHO_PY, "client"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn probe client");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Prober { _topo: self, child, stdin: Some(stdin), out, host: h }
    }

    /// Starts a client that opens a new connection every `interval` until stopped.
    pub fn traffic_loop(
        &self,
        h: Host,
        proto: Proto,
        ip: Ipv4Addr,
        port: u16,
        interval: Duration,
        timeout: Duration,
    ) -> TrafficLoop<'_> {
        let mut child = self
            .cmd(h, "python3")
            .args([ECHO_PY, "loop", proto.py(), &ip.to_string(), &port.to_string()])
            .arg(interval.as_millis().to_string())
            .arg(timeout.as_secs_f64().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn traffic loop");
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        let results = Arc::new(Mutex::new(Vec::new()));
        let r = results.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // "<ms since start> <result line>"
                let (t, rest) = line.split_once(' ').unwrap_or(("0", &line));
                let at = Duration::from_millis(t.parse().unwrap_or(0));
                r.lock().unwrap().push((at, Attempt::parse(rest)));
            }
        });
        TrafficLoop { _topo: self, child, stdin, reader: Some(reader), results }
    }

    /// Starts kproxy in `mode` in the node namespace on this topology's manifests.
    pub fn kproxy_in(&self, mode: Mode, extra: &[&str]) -> Kproxy<'_> {
        if mode == Mode::IptablesLegacy {
            // What kubelet leaves on a legacy node; kproxy's flavour detection follows it.
            self.iptables(mode, &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
        }
        let mut args: Vec<&str> = match mode {
            Mode::Nftables => vec!["--proxy-mode", "nftables"],
            _ => vec!["--proxy-mode", "iptables"],
        };
        args.extend_from_slice(extra);
        self.kproxy(&args)
    }

    /// Starts kproxy in the node namespace on this topology's manifests.
    pub fn kproxy(&self, extra: &[&str]) -> Kproxy<'_> {
        self.kproxy_with_args(self.kproxy_args(extra))
    }

    /// The arguments `kproxy` starts kproxy with (this topology's manifests), plus `extra`.
    pub fn kproxy_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--manifests".to_string(),
            self.manifests_dir().to_string_lossy().into_owned(),
            "--hostname-override".into(),
            NODE.into(),
            "--cluster-cidr".into(),
            CLUSTER_CIDR.into(),
            // No rate limit: the edit tests measure how fast changes reach the kernel.
            "--iptables-min-sync-period".into(),
            "0s".into(),
            "-v".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts kproxy in the node namespace with exactly `args`: for tests that feed it from
    /// somewhere other than the manifests directory (a fake API server).
    pub fn kproxy_with_args(&self, args: Vec<String>) -> Kproxy<'_> {
        self.kproxy_with_env(args, &[])
    }

    /// `kproxy_with_args` with extra environment variables (test hooks), kept across restarts.
    pub fn kproxy_with_env(&self, args: Vec<String>, env: &[(&str, &str)]) -> Kproxy<'_> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut k = Kproxy { topo: self, child: None, args, env, generation: 0 };
        k.start();
        k
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        // Processes first: a namespace lives on while a process is inside it.
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // KPP_KEEP=1 keeps the manifests and kproxy logs for a look after the run.
        if std::env::var_os("KPP_KEEP").is_some() {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Checks that every attempt was answered by `pod` and that it saw `src`.
pub fn expect_answer(attempts: &[Attempt], pod: Pod, src: Ipv4Addr) -> Result<(), String> {
    for a in attempts {
        match &a.outcome {
            Outcome::Answer { backend, src: s } if backend == pod.name() && *s == src => {}
            o => return Err(format!("expected {} seeing {src}, got {o:?}", pod.name())),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Probes

/// What a batch of TCP probes to a service must show (see [`Prober::shows`]).
#[derive(Clone, Copy, Debug)]
pub enum Expect<'a> {
    /// All answered, by exactly this set of backends (each seen at least once).
    Backends(&'a [Pod]),
    /// All refused at once (a Service without endpoints).
    Refused,
    /// Nobody answers (refused or timed out): the Service is gone.
    NoAnswer,
}

/// A long-running probe client in one namespace: one python process serves many probe batches.
pub struct Prober<'t> {
    _topo: &'t Topo,
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    host: Host,
}

impl Prober<'_> {
    /// One batch of TCP probes to `dst:port` conforms to `want`: `Ok`, or the tally of what was
    /// seen. `draw` is the per-attempt timeout of the 30 draws that look for `Backends`.
    pub fn shows(&mut self, dst: Ipv4Addr, port: u16, want: Expect, draw: Duration) -> Result<(), String> {
        let (a, ok) = match want {
            Expect::Backends(pods) => {
                // 30 draws: the chance that one of 3 backends is missed is 3*(2/3)^30 = 2e-5.
                let a = self.probe(Proto::Tcp, dst, port, 30, draw);
                let seen: BTreeSet<Option<&str>> = a.iter().map(|a| a.backend()).collect();
                let want: BTreeSet<Option<&str>> = pods.iter().map(|p| Some(p.name())).collect();
                let ok = seen == want;
                (a, ok)
            }
            Expect::Refused => {
                let a = self.probe(Proto::Tcp, dst, port, 5, Duration::from_secs(1));
                let ok = a.iter().all(|a| a.outcome == Outcome::Refused);
                (a, ok)
            }
            Expect::NoAnswer => {
                let a = self.probe(Proto::Tcp, dst, port, 3, Duration::from_millis(200));
                let ok = a.iter().all(|a| a.backend().is_none());
                (a, ok)
            }
        };
        ok.then_some(()).ok_or_else(|| format!("{:?}", tally(&a)))
    }

    /// `count` sequential attempts, each a new connection or a new UDP socket (so each one is a
    /// new conntrack entry and a new endpoint choice).
    pub fn probe(&mut self, proto: Proto, ip: Ipv4Addr, port: u16, count: usize, timeout: Duration) -> Vec<Attempt> {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "probe {} {ip} {port} {count} {}", proto.py(), timeout.as_secs_f64()).unwrap();
        stdin.flush().unwrap();
        let mut v = Vec::with_capacity(count);
        loop {
            let mut line = String::new();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "probe client in {:?} died", self.host);
            if line.trim() == "end" {
                break;
            }
            v.push(Attempt::parse(line.trim()));
        }
        assert_eq!(v.len(), count, "probe client in {:?} answered {} lines", self.host, v.len());
        v
    }

    pub fn one(&mut self, proto: Proto, ip: Ipv4Addr, port: u16, timeout: Duration) -> Attempt {
        self.probe(proto, ip, port, 1, timeout).pop().unwrap()
    }
}

impl Drop for Prober<'_> {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF ends the client's loop
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client making new connections at a fixed interval in the background.
pub struct TrafficLoop<'t> {
    _topo: &'t Topo,
    child: Child,
    stdin: Option<ChildStdin>,
    reader: Option<JoinHandle<()>>,
    results: Arc<Mutex<Vec<(Duration, Attempt)>>>,
}

impl TrafficLoop<'_> {
    /// The results so far: time since the loop started, and the attempt.
    pub fn results(&self) -> Vec<(Duration, Attempt)> {
        self.results.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    /// Waits until `n` more attempts have completed.
    pub fn wait_more(&self, n: usize, limit: Duration) {
        let target = self.len() + n;
        poll(&format!("{n} more loop attempts"), limit, || {
            let l = self.len();
            if l >= target {
                Ok(())
            } else {
                Err(format!("{l} of {target}"))
            }
        });
    }

    /// Stops the loop after its current attempt and returns every result.
    pub fn stop(mut self) -> Vec<(Duration, Attempt)> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        self.results()
    }
}

impl Drop for TrafficLoop<'_> {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------------
// kproxy

/// The kproxy daemon in the node namespace. Each (re)start logs to its own file; when a test
/// fails, Drop prints the current log and the programmed ruleset.
pub struct Kproxy<'t> {
    topo: &'t Topo,
    child: Option<Child>,
    args: Vec<String>,
    /// Extra environment of every start (test hooks).
    env: Vec<(String, String)>,
    generation: u32,
}

impl Kproxy<'_> {
    fn log_path(&self) -> PathBuf {
        self.topo.dir.join(format!("kproxy-{}.log", self.generation))
    }

    /// Starts a new process (the previous one must have exited).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "kproxy already running");
        self.generation += 1;
        let log = File::create(self.log_path()).unwrap();
        // `ip netns exec` execs the program in place, so the child's pid is kproxy's own and
        // signals reach it directly.
        let child = self
            .topo
            .cmd(Host::Node, env!("CARGO_BIN_EXE_kproxy"))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Plain text in the log file (tracing colours its output unless told not to).
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn kproxy");
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("kproxy not running").id()
    }

    /// This process's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Number of log lines mentioning a sync (the contract: one info line per sync has "sync").
    pub fn sync_lines(&self) -> usize {
        self.log().lines().filter(|l| l.to_ascii_lowercase().contains("sync")).count()
    }

    /// Waits until this process has logged at least `n` sync lines; fails early if it exits.
    pub fn wait_syncs(&mut self, n: usize, limit: Duration) {
        poll("kproxy sync log line", limit, || {
            self.assert_running();
            let c = self.sync_lines();
            if c >= n {
                Ok(())
            } else {
                Err(format!("{c} sync lines"))
            }
        });
    }

    fn signal(&self, sig: &str) {
        run(Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]));
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("kproxy not running");
        let (st, _) =
            poll("kproxy exit", limit, || child.try_wait().unwrap().ok_or_else(|| "still running".to_string()));
        self.child = None;
        st
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(5))
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal("KILL");
        self.wait_exit(Duration::from_secs(5))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Panics with the exit status and log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("kproxy exited ({st}); log:\n{}", self.log());
        }
    }
}

impl Drop for Kproxy<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- kproxy log ({}), last lines ---", self.log_path().display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            let rs = self.topo.nft(&["list", "ruleset"]);
            eprintln!(
                "--- nft list ruleset in {} ---\n{}",
                self.topo.ns(Host::Node),
                String::from_utf8_lossy(&rs.stdout)
            );
            if self.args.iter().any(|a| a == "iptables") {
                eprintln!("--- iptables-legacy-save ---\n{}", self.topo.iptables_save(Mode::IptablesLegacy));
            }
        }
    }
}

/// A UDP client that sends from ONE source port every 20 ms and prints who answered ("-" for
/// nothing within 200 ms), so every datagram belongs to the same conntrack flow.
pub const ONE_PORT_PY: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0)); s.connect((sys.argv[1], int(sys.argv[2]))); s.settimeout(0.2)
while True:
    s.send(b"x")
    try: print(s.recv(2048).decode().split()[0], flush=True)
    except OSError: print("-", flush=True)
    time.sleep(0.02)
"#;
