//! Bad input never takes down good input: a manifests directory full of broken files and invalid
//! objects (testdata/bad-input) still yields exactly the good objects' service ports and
//! endpoints, with one log line per refusal naming the file, the object and the reason. A
//! deterministic fuzz loop then feeds mutated manifests through loader and tracker.

use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy::model::ChangeTracker;
use kproxy::source::{load_dir, parse_file, Snapshot};
use rules::model::{ClusterState, Endpoint, Family, Protocol, ServicePort};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/bad-input")
}

/// Rejection lines with the fixture directory prefix removed, so they read `file: ...`.
fn rejection_lines(snap: &Snapshot, dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    snap.rejected.iter().map(|r| r.to_string().replace(&prefix, "")).collect()
}

/// Every line the fixture directory must produce, in load order (files sorted by path).
const EXPECTED_REJECTIONS: &[&str] = &[
    r#"bad-ip.yaml: Service default/bad-cluster-ip: document 1 (line 1): spec.clusterIP "172.30.0.300" is not an IP address"#,
    r#"bad-ip.yaml: Service default/bad-external-ip: document 2 (line 5): spec.externalIPs[0] "192.168.99.11; drop" is not an IP address"#,
    r#"bad-ip.yaml: EndpointSlice default/web-bad-ip: document 3 (line 10): endpoints[1].addresses[0] "10.180.0.999" is not an IP address"#,
    r#"bad-names.yaml: Service default/web"quote: document 1 (line 1): metadata.name "web\"quote" is not a valid DNS-1123 label"#,
    r#"bad-names.yaml: Service default/web{brace}: document 2 (line 6): metadata.name "web{brace}" is not a valid DNS-1123 label"#,
    r#"bad-names.yaml: Service default/web;semi: document 3 (line 11): metadata.name "web;semi" is not a valid DNS-1123 label"#,
    r#"bad-names.yaml: Service x"; flush ruleset; "/web: document 4 (line 16): metadata.namespace "x\"; flush ruleset; \"" is not a valid DNS-1123 label"#,
    r#"bad-names.yaml: Service default/port-name-bad: document 5 (line 21): spec.ports[0].name "http\" }; drop" is not a valid port name (DNS-1123 label)"#,
    r#"bad-names.yaml: EndpointSlice default/web;x: document 6 (line 26): metadata.name "web;x" is not a valid DNS-1123 subdomain"#,
    r#"bad-names.yaml: EndpointSlice default/web-label-bad: document 7 (line 33): label kubernetes.io/service-name "web\" }" is not a valid Service name"#,
    r#"bad-names.yaml: Node node"b: document 8 (line 40): metadata.name "node\"b" is not a valid DNS-1123 subdomain"#,
    r#"bad-ports.yaml: Service default/port-zero: document 1 (line 1): spec.ports[0].port 0 is out of range 1-65535"#,
    r#"bad-ports.yaml: Service default/port-big: document 2 (line 5): spec.ports[1].port 70000 is out of range 1-65535"#,
    r#"bad-ports.yaml: Service default/nodeport-big: document 3 (line 10): spec.ports[0].nodePort 99999 is out of range 1-65535"#,
    r#"bad-ports.yaml: EndpointSlice default/web-port-big: document 4 (line 15): ports[0].port 70000 is out of range 0-65535"#,
    r#"bad-protocol.yaml: Service default/proto-http: document 1 (line 1): spec.ports[0].protocol "HTTP" is not TCP, UDP or SCTP"#,
    r#"bad-protocol.yaml: EndpointSlice default/web-icmp: document 2 (line 5): ports[0].protocol "ICMP" is not TCP, UDP or SCTP"#,
    r#"binary.yml: not UTF-8 text (invalid byte at offset 0)"#,
    r#"broken-doc.yaml: document 2 (line 5): not valid YAML: did not find expected node content at line 8 column 1, while parsing a flow node"#,
    r#"broken-doc.yaml: Service default/wrong-type: document 4 (line 16): spec.ports[0].port: invalid type: string "eighty", expected i32 at line 23 column 11"#,
    r#"broken-doc.yaml: EndpointSlice default/no-label: document 5 (line 24): missing label kubernetes.io/service-name"#,
    r#"not-yaml.yaml: document 1 (line 1): not valid YAML: mapping values are not allowed in this context at line 1 column 9"#,
    r#"wrong-family.yaml: EndpointSlice default/web-v6-in-v4: document 1 (line 1): endpoints[0].addresses[0] "fd00:10:180::1" is IPv6 in an addressType IPv4 slice"#,
    r#"wrong-family.yaml: EndpointSlice default/dual-v4-in-v6: document 2 (line 7): endpoints[0].addresses[0] "10.180.3.2" is IPv4 in an addressType IPv6 slice"#,
];

/// What the good objects in the fixture directory must give, per family.
fn expected_state(family: Family) -> ClusterState {
    let mut st = ClusterState::default();
    match family {
        Family::V4 => {
            let web = ServicePort::cluster_ip("default", "web", "http", Protocol::Tcp, "172.30.0.10", 80)
                .with_node_port(30080)
                .with_external_ip("192.168.99.11");
            let dns_udp = ServicePort::cluster_ip("kube-system", "dns", "dns-udp", Protocol::Udp, "172.30.0.53", 53);
            let dns_tcp = ServicePort::cluster_ip("kube-system", "dns", "dns-tcp", Protocol::Tcp, "172.30.0.53", 53);
            let dual = ServicePort::cluster_ip("default", "dual", "", Protocol::Tcp, "172.30.0.20", 443)
                .with_load_balancer_ip("1.2.3.4");
            // Sloppy 172.30.0.030 in the fixture; no slice, so no endpoints.
            let same_file =
                ServicePort::cluster_ip("default", "same-file-good", "", Protocol::Tcp, "172.30.0.30", 8080);
            let before_break = ServicePort::cluster_ip("default", "before-break", "", Protocol::Tcp, "172.30.0.40", 80);
            st.add_service(web.clone())
                .add_service(dns_udp.clone())
                .add_service(dns_tcp.clone())
                .add_service(dual.clone())
                .add_service(same_file)
                .add_service(before_break.clone());
            // web: two slices, one named port mapped to 8080 and 9090; the bad slices added nothing.
            st.add_endpoint(&web.name, Endpoint::ready("10.180.0.1", 8080).on_node("node-a"))
                .add_endpoint(&web.name, Endpoint::ready("10.180.0.2", 8080).not_ready().on_node("node-b"))
                .add_endpoint(&web.name, Endpoint::ready("10.180.1.1", 9090))
                .add_endpoint(&dns_udp.name, Endpoint::ready("10.180.2.1", 5353))
                .add_endpoint(&dns_tcp.name, Endpoint::ready("10.180.2.1", 53))
                .add_endpoint(&dual.name, Endpoint::ready("10.180.3.1", 8443))
                .add_endpoint(&before_break.name, Endpoint::ready("10.180.4.1", 80));
        }
        Family::V6 => {
            let dual = ServicePort::cluster_ip("default", "dual", "", Protocol::Tcp, "fd00:172:30::20", 443)
                .with_load_balancer_ip("2600::4");
            st.add_service(dual.clone());
            st.add_endpoint(&dual.name, Endpoint::ready("fd00:10:180::3:1", 8443));
        }
    }
    st
}

#[test]
fn bad_objects_are_rejected_one_line_each_and_good_ones_are_programmed() {
    let dir = fixture_dir();
    let snap = load_dir(&dir);

    let lines = rejection_lines(&snap, &dir);
    assert_eq!(lines, EXPECTED_REJECTIONS, "\nactual:\n{}", lines.join("\n"));
    for r in &snap.rejected {
        assert!(!r.to_string().contains('\n'), "one line: {r:?}");
        assert!(r.file.as_ref().is_some_and(|f| f.starts_with(&dir)), "names its file: {r:?}");
    }

    let mut tracker = ChangeTracker::new("node-a");
    let (changed, rejected) = tracker.replace_converted(snap.services, snap.slices, snap.nodes, "node-a");
    assert!(changed);
    assert!(rejected.is_empty(), "the loader already refused every bad object: {rejected:?}");

    for family in [Family::V4, Family::V6] {
        assert_eq!(tracker.cluster_state(family), expected_state(family), "{family:?}");
    }
    let node = tracker.node();
    assert_eq!(node.name, "node-a");
    assert_eq!(
        node.primary_ips,
        vec!["192.168.0.2".parse::<std::net::IpAddr>().unwrap(), "2001:db8::1".parse().unwrap()]
    );
    assert_eq!(node.labels.get("topology.kubernetes.io/zone").map(String::as_str), Some("zone-a"));
}

/// The same fixtures, object by object through `upsert_*` as an API watch would deliver them:
/// the bad ones return `Err` with a line naming the object, the good state is the same.
#[test]
fn upserting_each_object_gives_the_same_state() {
    let dir = fixture_dir();
    let mut tracker = ChangeTracker::new("node-a");
    let mut refused = Vec::new();
    for doc in raw_documents(&dir) {
        if let Some(Err(r)) = upsert_doc(&mut tracker, doc) {
            refused.push(r.to_string());
        }
    }
    // 22 object-level refusals in the fixtures, minus the one that fails deserialization
    // (wrong-type), and the bad Node is not this node's, so it is ignored rather than refused.
    assert_eq!(refused.len(), 19, "{refused:#?}");
    assert!(refused
        .iter()
        .all(|l| !l.contains('\n') && (l.starts_with("Service ") || l.starts_with("EndpointSlice "))));
    assert!(refused.contains(&r#"EndpointSlice default/web-v6-in-v4: endpoints[0].addresses[0] "fd00:10:180::1" is IPv6 in an addressType IPv4 slice"#.to_string()));
    for family in [Family::V4, Family::V6] {
        assert_eq!(tracker.cluster_state(family), expected_state(family), "{family:?}");
    }
}

/// Types one YAML document by its kind and hands it to the tracker as a watch event would; `None`
/// for other kinds and for documents that do not deserialize (the loader's business).
fn upsert_doc(tracker: &mut ChangeTracker, doc: serde_yaml::Value) -> Option<Result<bool, kproxy::model::Rejected>> {
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    Some(match kind.as_str() {
        "Service" => tracker.upsert_service(&serde_yaml::from_value::<Service>(doc).ok()?),
        "EndpointSlice" => {
            let mut s = serde_yaml::from_value::<EndpointSlice>(doc).ok()?;
            // What the API server's defaulting would have done (the loader does it too).
            for p in s.ports.iter_mut().flatten() {
                p.name.get_or_insert_with(String::new);
            }
            tracker.upsert_slice(&s)
        }
        "Node" => tracker.set_node(&serde_yaml::from_value::<Node>(doc).ok()?),
        _ => return None,
    })
}

/// Every YAML document in the fixture files that parses (List items unpacked).
fn raw_documents(dir: &Path) -> Vec<serde_yaml::Value> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        for chunk in text.split("\n---\n") {
            let Ok(v) = serde_yaml::from_str::<serde_yaml::Value>(chunk) else {
                continue;
            };
            match v.get("items").and_then(|i| i.as_sequence()) {
                Some(items) => out.extend(items.iter().cloned()),
                None => out.push(v),
            }
        }
    }
    out
}

#[test]
fn absurd_sizes_are_refused_with_a_bounded_line() {
    let mut eps = String::new();
    for i in 0..1001 {
        eps.push_str(&format!("- addresses: [10.200.{}.{}]\n", i / 250, i % 250 + 1));
    }
    let long = "a".repeat(100_000);
    let text = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: huge, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints:\n{eps}---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: {long}, namespace: default}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: 80}}]}}\n"
    );
    let snap = parse_file(Path::new("huge.yaml"), text.as_bytes());
    let lines: Vec<String> = snap.rejected.iter().map(|r| r.to_string()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[0],
        "huge.yaml: EndpointSlice default/huge: document 1 (line 1): 1001 endpoints exceed the API limit of 1000"
    );
    assert!(lines[1].starts_with("huge.yaml: Service default/aaaa"), "{}", &lines[1][..80]);
    assert!(lines[1].len() < 1000, "a 100 kB name is cut in the log line: {} bytes", lines[1].len());
    assert!(snap.services.is_empty() && snap.slices.is_empty());
}

/// The directory is read again after a fix: the previously refused object is now programmed.
#[test]
fn fixing_a_file_brings_its_object_in() {
    let dir = std::env::temp_dir().join(format!("kproxy-bad-input-fix-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 0}]}\n";
    fs::write(dir.join("s.yaml"), bad).unwrap();
    let mut watcher = kproxy::source::DirWatcher::new(&dir);
    let mut tracker = ChangeTracker::new("n");
    let snap = load_dir(&dir);
    assert_eq!(snap.rejected.len(), 1);
    let (changed, _) = tracker.replace_converted(snap.services, snap.slices, snap.nodes, "n");
    assert!(!changed, "nothing valid, nothing changed");

    fs::write(dir.join("s.yaml"), bad.replace("port: 0", "port: 8")).unwrap();
    assert!(watcher.changed());
    let snap = load_dir(&dir);
    assert!(snap.rejected.is_empty());
    let (changed, _) = tracker.replace_converted(snap.services, snap.slices, snap.nodes, "n");
    assert!(changed);
    assert_eq!(tracker.cluster_state(Family::V4).services.len(), 1);
    let _ = fs::remove_dir_all(&dir);
}

/// A small deterministic PRNG (xorshift64*), so the fuzz loop needs no dependency and a failure
/// reproduces from the printed seed and iteration.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A valid manifest touching every field conversion reads.
const SEED_DOC: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  labels: {app: web}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.10
  clusterIPs: [172.30.0.10, "fd00::10"]
  externalIPs: [192.168.99.11, "2001:db8::11"]
  ports:
  - {name: http, port: 80, protocol: TCP, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.4}, {ip: 5.6.7.8, ipMode: Proxy}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.180.0.1, 10.180.0.9]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a
- addresses: [10.180.0.2]
  conditions: {ready: false}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node-a, labels: {zone: a}}
  status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
"#;

/// Fragments that are meaningful to YAML or to our validation, to splice in.
const TOKENS: &[&str] = &[
    ":",
    "-",
    "- ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "#",
    "&a",
    "*a",
    "!!str",
    "|",
    ">",
    "\n",
    "  ",
    "\t",
    ",",
    "---\n",
    "...\n",
    "0",
    "-1",
    "65535",
    "65536",
    "70000",
    "99999999999",
    "None",
    "",
    "::",
    "fd00::1",
    "10.0.0.1",
    "1.2.3.004",
    "256.1.1.1",
    "TCP",
    "UDP",
    "SCTP",
    "HTTP",
    "FQDN",
    "IPv6",
    "Proxy",
    "null",
    "~",
    "true",
    "\u{0}",
    "\u{feff}",
    "é",
    "kind: List\nitems:\n",
    "kind: Service\n",
    "kind: EndpointSlice\n",
    "metadata: {name: x}\n",
];

fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1).min(b.len());
        match rng.below(9) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let n = 1 + rng.below(8);
                b.drain(at.min(b.len() - 1)..(at + n).min(b.len()));
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                b.splice(at..at, t.bytes());
            }
            3 => b.insert(at, rng.next() as u8),
            _ => {
                // Line-level edits: delete, duplicate, swap or re-indent a line.
                let text = String::from_utf8_lossy(&b).into_owned();
                let mut lines: Vec<String> = text.lines().map(String::from).collect();
                if lines.is_empty() {
                    continue;
                }
                let i = rng.below(lines.len());
                let j = rng.below(lines.len());
                match rng.below(4) {
                    0 => {
                        lines.remove(i);
                    }
                    1 => {
                        let l = lines[i].clone();
                        lines.insert(j, l);
                    }
                    2 => lines.swap(i, j),
                    _ => {
                        let l = &mut lines[i];
                        if rng.below(2) == 0 {
                            l.insert_str(0, "  ");
                        } else {
                            *l = l.trim_start().to_string();
                        }
                    }
                }
                b = lines.join("\n").into_bytes();
            }
        }
    }
    b
}

fn check_invariants(snap: &Snapshot, tracker: &ChangeTracker) {
    for r in &snap.rejected {
        let line = r.to_string();
        assert!(!line.contains('\n'), "rejection spans lines: {line:?}");
        assert!(line.len() < 2000, "rejection line too long: {}", line.len());
    }
    for family in [Family::V4, Family::V6] {
        let st = tracker.cluster_state(family);
        for (name, sp) in &st.services {
            assert_eq!(name, &sp.name);
            assert_eq!(sp.family(), family);
            assert_ne!(sp.port, 0);
            assert!(sp.external_ips.iter().chain(&sp.load_balancer_ips).all(|ip| Family::of(ip) == family));
            for s in [&sp.name.namespace(), &sp.name.name(), &sp.name.port_name()] {
                assert!(s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'), "{s:?}");
            }
        }
        for (name, eps) in &st.endpoints {
            assert!(st.services.contains_key(name), "endpoints only for known service ports");
            assert!(eps.iter().all(|e| Family::of(&e.ip) == family && e.port != 0));
        }
    }
}

#[test]
fn mutated_manifests_never_panic() {
    let seed_snap = parse_file(Path::new("seed.yaml"), SEED_DOC.as_bytes());
    assert!(seed_snap.rejected.is_empty(), "{:?}", seed_snap.rejected);
    assert_eq!((seed_snap.services.len(), seed_snap.slices.len(), seed_snap.nodes.len()), (1, 1, 1));

    // The same objects as JSON values, one after another, for the JSON reader.
    let seed_json: String = SEED_DOC
        .split("\n---\n")
        .map(|d| serde_json::to_string_pretty(&serde_yaml::from_str::<serde_json::Value>(d).unwrap()).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let json_snap = parse_file(Path::new("seed.json"), seed_json.as_bytes());
    assert!(json_snap.rejected.is_empty(), "{:?}", json_snap.rejected);
    assert_eq!((json_snap.services.len(), json_snap.slices.len(), json_snap.nodes.len()), (1, 1, 1));

    let mut rng = Rng(0x6b70_726f_7879_2024);
    let mut tracker = ChangeTracker::new("node-a");
    let mut watch_tracker = ChangeTracker::new("node-a");
    let (mut accepted, mut refused, mut json_accepted, mut json_refused) = (0, 0, 0, 0);
    for iteration in 0..700 {
        let json = iteration % 4 == 0;
        let (name, seed) = if json { ("m.json", seed_json.as_str()) } else { ("m.yaml", SEED_DOC) };
        let mutated = mutate(&mut rng, seed.as_bytes());
        let snap = parse_file(Path::new(name), &mutated);
        accepted += snap.services.len() + snap.slices.len();
        refused += snap.rejected.len();
        if json {
            json_accepted += snap.services.len() + snap.slices.len();
            json_refused += snap.rejected.len();
        }

        // As the files source does: replace everything.
        let (_, rejected) =
            tracker.replace_converted(snap.services.clone(), snap.slices.clone(), snap.nodes.clone(), "node-a");
        assert!(rejected.is_empty(), "iteration {iteration}: the loader let a duplicate through: {rejected:?}");
        check_invariants(&snap, &tracker);

        // As a watch would: each document as an incremental upsert on a long-lived tracker.
        for chunk in String::from_utf8_lossy(&mutated).split("\n---\n") {
            if let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(chunk) {
                let _ = upsert_doc(&mut watch_tracker, doc);
            }
        }
        check_invariants(&Snapshot::default(), &watch_tracker);
        let _ = watch_tracker.take_pending();
        let _ = tracker.node();
    }
    // The mutations must exercise both paths, or the test proves nothing.
    assert!(accepted > 100, "accepted {accepted}");
    assert!(refused > 100, "refused {refused}");
    assert!(json_accepted > 20 && json_refused > 20, "JSON: accepted {json_accepted}, refused {json_refused}");
}

/// A few mutated files through the real directory reader, next to an untouched good file.
#[test]
fn mutated_files_on_disk_never_hide_the_good_file() {
    let dir = std::env::temp_dir().join(format!("kproxy-bad-input-fuzz-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("good.yaml"), fs::read(fixture_dir().join("good.yaml")).unwrap()).unwrap();
    let mut rng = Rng(42);
    for round in 0..40 {
        for i in 0..3 {
            fs::write(dir.join(format!("m{i}.yaml")), mutate(&mut rng, SEED_DOC.replace("web", "fz").as_bytes()))
                .unwrap();
        }
        let snap = load_dir(&dir);
        let mut tracker = ChangeTracker::new("node-a");
        tracker.replace_converted(snap.services.clone(), snap.slices.clone(), snap.nodes.clone(), "node-a");
        check_invariants(&snap, &tracker);
        let st = tracker.cluster_state(Family::V4);
        let web = rules::model::ServicePortName::new("default", "web", "http", Protocol::Tcp);
        assert_eq!(st.endpoints.get(&web).map(Vec::len), Some(3), "round {round}: good.yaml's web endpoints");
    }
    let _ = fs::remove_dir_all(&dir);
}
