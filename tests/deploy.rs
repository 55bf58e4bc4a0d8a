//! deploy/ and the image, checked offline: every manifest against the Kubernetes schemas
//! (PyPI `kubernetes-validate`), the kustomizations rendered (`kubectl kustomize`, when kubectl is
//! there) and their patch targets checked by hand (always), the DaemonSet's shape, kproxy started
//! with the ConfigMap's config.conf and the DaemonSet's own flags, the ClusterRole against every
//! request kproxy's API source makes to the fake API server, the monitoring objects against the
//! pods they scrape, and the image's build steps run natively (there is no Docker engine in CI).
//!
//! Needs python3 with kubernetes-validate (`make deps` installs it; this test tries `pip install`
//! once if it is missing). Root is needed for one part only (`kproxy --cleanup` in a throwaway
//! network namespace); `KPROXY_SKIP_PRIVILEGED=1` skips that part with a note, as elsewhere.

#[path = "support/fakeapi.rs"]
mod fakeapi;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fakeapi::FakeApi;
use serde_yaml::Value;

// ---- what the manifests must say ----------------------------------------------------------------

/// The ClusterRole, exactly: (apiGroup, resource) → verbs.
const CLUSTER_ROLE: &[(&str, &str, &[&str])] = &[
    ("", "services", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("networking.k8s.io", "servicecidrs", &["list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
    ("", "events", &["create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];
/// Where the DaemonSets mount the ConfigMap, and the flags kubeadm's DaemonSet passes.
const CONFIG_DIR: &str = "/var/lib/kube-proxy";
const CONFIG_FLAG: &str = "--config=/var/lib/kube-proxy/config.conf";
const HOSTNAME_FLAG: &str = "--hostname-override=$(NODE_NAME)";
const BINARY: &str = "/usr/local/bin/kproxy";
const HEALTHZ_PORT: i64 = 10256;
const METRICS_PORT: i64 = 10249;
/// Files under deploy/ that others own and check (the observability engineer's dashboards and
/// alert rules, validated with promtool by their own test).
const NOT_OURS: &[&str] = &["dashboards", "alerts.yaml"];
/// Warnings kproxy may print for the shipped config.conf: none (every field it sets is implemented).
const ALLOWED_UNIMPLEMENTED: &[&str] = &[];

// ---- helpers ------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deploy-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn docs(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize as _;

fn load(rel: &str) -> Vec<Value> {
    docs(&read(&deploy().join(rel)), rel)
}

fn one(rel: &str) -> Value {
    let mut d = load(rel);
    assert_eq!(d.len(), 1, "{rel}: one object expected");
    d.remove(0)
}

/// `v` at a dotted path (`spec.template.spec`); numbers index sequences, and keys that contain
/// dots themselves (`kubernetes.io/os`, `config.conf`) are found whole.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    fn walk<'a>(v: &'a Value, segs: &[&str]) -> Option<&'a Value> {
        if segs.is_empty() {
            return Some(v);
        }
        match v {
            Value::Sequence(s) => walk(s.get(segs[0].parse::<usize>().ok()?)?, &segs[1..]),
            Value::Mapping(m) => (1..=segs.len())
                .rev()
                .find_map(|n| m.get(segs[..n].join(".").as_str()).and_then(|x| walk(x, &segs[n..]))),
            _ => None,
        }
    }
    walk(v, &path.split('.').collect::<Vec<_>>()).unwrap_or(&NULL)
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or_else(|| panic!("{path}: not a string in {}", show(v)))
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path).as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn strs(v: &Value, path: &str) -> Vec<String> {
    seq(v, path).iter().map(|x| x.as_str().expect("string").to_string()).collect()
}

fn show(v: &Value) -> String {
    let t = serde_yaml::to_string(v).unwrap();
    if t.len() > 2000 {
        format!("{}...", &t[..2000])
    } else {
        t
    }
}

fn kind(v: &Value) -> &str {
    at(v, "kind").as_str().unwrap_or("")
}

fn name(v: &Value) -> &str {
    at(v, "metadata.name").as_str().unwrap_or("")
}

fn find<'a>(objs: &'a [Value], k: &str, n: &str) -> &'a Value {
    objs.iter()
        .find(|o| kind(o) == k && name(o) == n)
        .unwrap_or_else(|| panic!("no {k} {n} in {:?}", objs.iter().map(|o| (kind(o), name(o))).collect::<Vec<_>>()))
}

fn container<'a>(ds: &'a Value, n: &str) -> &'a Value {
    seq(ds, "spec.template.spec.containers")
        .iter()
        .find(|c| s(c, "name") == n)
        .unwrap_or_else(|| panic!("no container {n} in {}", name(ds)))
}

/// Held while kproxy's binary is run or may be rebuilt (the image build step), so that no test
/// executes a binary cargo is writing.
static BIN_LOCK: Mutex<()> = Mutex::new(());

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.starts_with(b"0\n")
}

fn skip_privileged() -> bool {
    std::env::var("KPROXY_SKIP_PRIVILEGED").is_ok_and(|v| v == "1")
}

/// Every YAML file under deploy/ that is ours, relative to deploy/.
fn our_yaml_files() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if NOT_OURS.iter().any(|n| rel == *n || rel.starts_with(&format!("{n}/"))) {
                continue;
            }
            if p.is_dir() {
                walk(&p, base, out);
            } else if rel.ends_with(".yaml") || rel.ends_with(".yml") {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(), &deploy(), &mut out);
    out.sort();
    out
}

/// Directories under deploy/ with a kustomization.yaml, relative ("" for deploy/ itself).
fn kustomizations() -> Vec<String> {
    our_yaml_files()
        .into_iter()
        .filter_map(|f| f.strip_suffix("kustomization.yaml").map(|d| d.trim_end_matches('/').to_string()))
        .collect()
}

/// `kubectl kustomize deploy/<dir>`, or None without kubectl (noted once per call).
fn render(dir: &str) -> Option<Vec<Value>> {
    if !have("kubectl") {
        eprintln!("kubectl not found: kustomize output of deploy/{dir} not rendered (the hand checks still ran)");
        return None;
    }
    let o = run(Command::new("kubectl").arg("kustomize").arg(deploy().join(dir)));
    assert!(o.status.success(), "kubectl kustomize deploy/{dir}:\n{}", text(&o.stderr));
    Some(docs(&text(&o.stdout), &format!("kustomize deploy/{dir}")))
}

/// `kubectl patch --local`: what `kubectl patch daemonset ... --patch-file` does to a live object.
fn patch_local(obj: &Value, patch_rel: &str) -> Option<Value> {
    if !have("kubectl") {
        return None;
    }
    let dir = tmpdir("patch");
    let f = dir.join("obj.yaml");
    fs::write(&f, serde_yaml::to_string(obj).unwrap()).unwrap();
    let o = run(Command::new("kubectl")
        .args(["patch", "--local", "--type", "strategic", "-o", "yaml", "-f"])
        .arg(&f)
        .arg("--patch-file")
        .arg(deploy().join(patch_rel)));
    assert!(o.status.success(), "kubectl patch --local {patch_rel}:\n{}", text(&o.stderr));
    Some(serde_yaml::from_slice(&o.stdout).unwrap())
}

// ---- (a) schemas ----------------------------------------------------------------------------------

/// Makes sure `kubernetes-validate` can be imported, installing it from PyPI once if needed.
fn ensure_kubernetes_validate() {
    let ok = || run(Command::new("python3").args(["-c", "import kubernetes_validate"])).status.success();
    if ok() {
        return;
    }
    eprintln!("kubernetes-validate missing: pip install (make deps does this)");
    let o = run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "kubernetes-validate"]));
    if !o.status.success() {
        let _ = run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--break-system-packages",
            "kubernetes-validate",
        ]));
    }
    assert!(ok(), "kubernetes-validate is not installed and pip could not install it: run `make deps`");
}

/// Runs `kubernetes-validate --strict` (its newest Kubernetes version) on `files`; the only
/// accepted warning is a missing schema for a Prometheus Operator kind (a CRD, checked by hand).
fn validate(files: &[PathBuf]) -> String {
    ensure_kubernetes_validate();
    let o = run(Command::new("python3").args(["-m", "kubernetes_validate", "--strict"]).args(files));
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    let bad: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with("INFO"))
        .filter(|l| !(l.starts_with("WARN") && l.contains("monitoring.coreos.com/v1")))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(o.status.success() && bad.is_empty(), "kubernetes-validate:\n{out}");
    out
}

/// What a YAML file under deploy/ is, and so how it is checked.
#[derive(Debug, PartialEq)]
enum FileKind {
    /// Whole Kubernetes objects with built-in schemas: kubernetes-validate.
    Objects,
    /// Prometheus Operator objects (CRDs): checked by hand in `monitoring_selects_kproxy_pods`.
    OperatorObjects,
    /// kustomization.yaml: rendered, and its references checked by hand.
    Kustomization,
    /// A strategic-merge patch (partial object): applied, then validated as a whole object.
    Patch,
    /// A Prometheus scrape configuration (not a Kubernetes object).
    PrometheusConfig,
}

fn classify(rel: &str, objs: &[Value]) -> FileKind {
    if rel.ends_with("kustomization.yaml") {
        return FileKind::Kustomization;
    }
    if rel.ends_with("-patch.yaml") {
        return FileKind::Patch;
    }
    if objs.iter().all(|o| !at(o, "scrape_configs").is_null()) {
        return FileKind::PrometheusConfig;
    }
    for o in objs {
        assert!(
            !kind(o).is_empty() && at(o, "apiVersion").is_string(),
            "deploy/{rel}: a document without apiVersion/kind that this test does not know how to check"
        );
    }
    if objs.iter().all(|o| s(o, "apiVersion").starts_with("monitoring.coreos.com/")) {
        FileKind::OperatorObjects
    } else {
        FileKind::Objects
    }
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let out = tmpdir("schemas");
    let mut files = Vec::new();
    let mut seen = BTreeMap::new();
    for rel in our_yaml_files() {
        let objs = load(&rel);
        let k = classify(&rel, &objs);
        if k == FileKind::Objects {
            files.push(deploy().join(&rel));
        }
        seen.insert(rel, k);
    }
    // What `kubectl apply -k` would send, for every kustomization.
    for dir in kustomizations() {
        if let Some(objs) = render(&dir) {
            let f =
                out.join(format!("kustomize-{}.yaml", if dir.is_empty() { "deploy" } else { &dir }.replace('/', "-")));
            let t: Vec<String> = objs.iter().map(|o| serde_yaml::to_string(o).unwrap()).collect();
            fs::write(&f, t.join("---\n")).unwrap();
            files.push(f);
        }
    }
    // The patches as `kubectl patch` applies them to the objects they are meant for.
    let kubeadm = one("replace-kube-proxy/kubeadm-kube-proxy.yaml");
    let mut patched = Vec::new();
    if let Some(kproxy) = patch_local(&kubeadm, "replace-kube-proxy/kproxy-patch.yaml") {
        patched.push(("kproxy-patch", kproxy.clone()));
        if let Some(back) = patch_local(&kproxy, "replace-kube-proxy/rollback-nftables-patch.yaml") {
            patched.push(("rollback-nftables-patch", back));
        }
    }
    if let Some(avoid) = patch_local(&kubeadm, "node-pool/kube-proxy-avoid-patch.yaml") {
        patched.push(("kube-proxy-avoid-patch", avoid));
    }
    for (n, obj) in &patched {
        let f = out.join(format!("patched-{n}.yaml"));
        fs::write(&f, serde_yaml::to_string(obj).unwrap()).unwrap();
        files.push(f);
    }
    let report = validate(&files);
    eprintln!("{report}");
    assert!(seen.values().any(|k| *k == FileKind::Objects), "no manifests found: {seen:?}");
    for patch in seen.iter().filter(|(_, k)| **k == FileKind::Patch).map(|(f, _)| f) {
        assert!(
            patched.is_empty() || patched.iter().any(|(n, _)| patch.ends_with(&format!("{n}.yaml"))),
            "deploy/{patch} is never applied and validated here"
        );
    }
}

// ---- kustomizations and patches by hand (no kubectl needed) ---------------------------------------

/// The objects a kustomization directory declares (its resources, recursively), before patches.
fn declared(dir: &str) -> Vec<Value> {
    let k = one(&format!("{}kustomization.yaml", if dir.is_empty() { String::new() } else { format!("{dir}/") }));
    let mut out = Vec::new();
    for r in strs(&k, "resources") {
        let p = deploy().join(dir).join(&r);
        let p = p.canonicalize().unwrap_or_else(|e| panic!("deploy/{dir}: resource {r}: {e}"));
        let rel = p
            .strip_prefix(deploy().canonicalize().unwrap())
            .unwrap_or_else(|_| panic!("deploy/{dir}: resource {r} is outside deploy/"));
        let rel = rel.to_string_lossy().into_owned();
        if p.is_dir() {
            assert!(p.join("kustomization.yaml").exists(), "deploy/{dir}: resource {r} has no kustomization.yaml");
            out.extend(declared(&rel));
        } else {
            out.extend(load(&rel));
        }
    }
    out
}

#[test]
fn kustomizations_reference_what_exists_and_patch_what_they_declare() {
    for dir in kustomizations() {
        let kpath = if dir.is_empty() { "kustomization.yaml".to_string() } else { format!("{dir}/kustomization.yaml") };
        let k = one(&kpath);
        assert_eq!(s(&k, "kind"), "Kustomization", "{kpath}");
        let objs = declared(&dir);
        assert!(!objs.is_empty(), "{kpath}: declares nothing");
        for p in seq(&k, "patches") {
            let (tk, tn, body) = if let Some(path) = at(p, "path").as_str() {
                let patch = one(&Path::new(&dir).join(path).to_string_lossy());
                (kind(&patch).to_string(), name(&patch).to_string(), Some(patch))
            } else {
                (s(p, "target.kind").to_string(), s(p, "target.name").to_string(), None)
            };
            let target = find(&objs, &tk, &tn);
            if let Some(patch) = body {
                check_merge_patch(target, &patch, &kpath);
            }
        }
        for img in seq(&k, "images") {
            let n = s(img, "name");
            let used = objs.iter().any(|o| {
                seq(o, "spec.template.spec.containers")
                    .iter()
                    .chain(seq(o, "spec.template.spec.initContainers"))
                    .any(|c| s(c, "image").split(':').next() == Some(n))
            });
            let patched = seq(&k, "patches")
                .iter()
                .filter_map(|p| at(p, "path").as_str())
                .any(|path| read(&deploy().join(&dir).join(path)).contains(&format!("image: {n}:")));
            assert!(used || patched, "{kpath}: image {n} is used by no container");
        }
        // The rendered output has exactly the declared objects (renames from patches aside).
        if let Some(rendered) = render(&dir) {
            assert_eq!(rendered.len(), objs.len(), "{kpath}: rendered object count");
        }
    }
}

/// A strategic-merge patch of a DaemonSet must merge into the target, never add to it by accident:
/// same name, no selector change, every container and volume mount it names already there (or
/// it would add a second container), and kubeadm's `privileged: true` explicitly turned off.
fn check_merge_patch(target: &Value, patch: &Value, what: &str) {
    assert_eq!(kind(target), kind(patch), "{what}");
    assert_eq!(name(target), name(patch), "{what}");
    if kind(patch) != "DaemonSet" {
        return;
    }
    assert!(at(patch, "spec.selector").is_null(), "{what}: a DaemonSet's selector is immutable");
    for c in seq(patch, "spec.template.spec.containers") {
        let t = container(target, s(c, "name"));
        for m in seq(c, "volumeMounts") {
            assert!(
                seq(t, "volumeMounts").iter().any(|tm| at(tm, "mountPath") == at(m, "mountPath")),
                "{what}: container {} has no mount at {:?} to patch",
                s(c, "name"),
                at(m, "mountPath")
            );
        }
        if at(t, "securityContext.privileged").as_bool() == Some(true) && !at(c, "securityContext").is_null() {
            assert!(
                !at(c, "securityContext.privileged").is_null(),
                "{what}: the target runs privileged; a merge patch keeps that unless it says privileged: false"
            );
        }
    }
}

#[test]
fn the_replacement_patches_kubeadm_daemonset_into_kproxy_daemonset() {
    let kubeadm = one("replace-kube-proxy/kubeadm-kube-proxy.yaml");
    let patch = one("replace-kube-proxy/kproxy-patch.yaml");
    check_merge_patch(&kubeadm, &patch, "kproxy-patch.yaml");
    check_merge_patch(&kubeadm, &one("node-pool/kube-proxy-avoid-patch.yaml"), "kube-proxy-avoid-patch.yaml");
    // kubeadm's names, which the live cluster has.
    assert_eq!((name(&kubeadm), s(&kubeadm, "metadata.namespace")), ("kube-proxy", "kube-system"));
    assert_eq!(s(&kubeadm, "spec.template.spec.serviceAccountName"), "kube-proxy");
    assert_eq!(configmap_of(&kubeadm), "kube-proxy");
    assert_eq!(strs(container(&kubeadm, "kube-proxy"), "command")[1..], [CONFIG_FLAG, HOSTNAME_FLAG]);

    // The patched container carries the same settings as kproxy's own DaemonSet, field for field.
    let base = one("base/daemonset.yaml");
    let ours = container(&base, "kproxy");
    let theirs = container(&patch, "kube-proxy");
    for f in ["image", "command", "ports", "readinessProbe", "livenessProbe", "resources", "securityContext"] {
        assert_eq!(at(ours, f), at(theirs, f), "kproxy-patch.yaml vs base/daemonset.yaml: {f}");
    }
    assert_eq!(at(&base, "spec.updateStrategy"), at(&patch, "spec.updateStrategy"));

    // And so does what `kubectl patch` / `kubectl kustomize` really produce from kubeadm's object.
    let rendered: Vec<Value> = [
        patch_local(&kubeadm, "replace-kube-proxy/kproxy-patch.yaml"),
        render("replace-kube-proxy").map(|objs| find(&objs, "DaemonSet", "kube-proxy").clone()),
    ]
    .into_iter()
    .flatten()
    .collect();
    for ds in &rendered {
        check_daemonset(ds, "kube-proxy", "kube-proxy");
        assert_eq!(seq(ds, "spec.template.spec.containers").len(), 1, "one container after the patch");
        assert_eq!(at(ds, "spec.selector"), at(&kubeadm, "spec.selector"));
    }
    // The rollback patch gives kube-proxy back its securityContext in a form the API accepts.
    if let Some(kproxy) = rendered.first() {
        if let Some(back) = patch_local(kproxy, "replace-kube-proxy/rollback-nftables-patch.yaml") {
            let c = container(&back, "kube-proxy");
            assert_eq!(strs(c, "command")[0], "/usr/local/bin/kube-proxy");
            assert_eq!(at(c, "securityContext"), at(container(&kubeadm, "kube-proxy"), "securityContext"));
            let init = &seq(&back, "spec.template.spec.initContainers")[0];
            assert_eq!(strs(init, "command"), [BINARY, "--cleanup"]);
        }
    }
}

fn configmap_of(ds: &Value) -> String {
    let c = &seq(ds, "spec.template.spec.containers")[0];
    let m = seq(c, "volumeMounts").iter().find(|m| s(m, "mountPath") == CONFIG_DIR).expect("config mount");
    let v =
        seq(ds, "spec.template.spec.volumes").iter().find(|v| at(v, "name") == at(m, "name")).expect("config volume");
    s(v, "configMap.name").to_string()
}

// ---- the DaemonSet's shape --------------------------------------------------------------------------

/// Everything issue 8 asks of the DaemonSet, for kproxy's own and for the in-place replacement.
fn check_daemonset(ds: &Value, container_name: &str, service_account: &str) {
    let n = name(ds);
    let pod = at(ds, "spec.template.spec");
    assert_eq!(at(pod, "hostNetwork").as_bool(), Some(true), "{n}: hostNetwork");
    assert_eq!(s(pod, "priorityClassName"), "system-node-critical", "{n}");
    assert_eq!(s(pod, "serviceAccountName"), service_account, "{n}");
    assert_eq!(s(pod, "nodeSelector.kubernetes.io/os"), "linux", "{n}");
    assert!(
        seq(pod, "tolerations")
            .iter()
            .any(|t| s(t, "operator") == "Exists" && at(t, "key").is_null() && at(t, "effect").is_null()),
        "{n}: no toleration for every taint"
    );
    let c = container(ds, container_name);
    let cmd = strs(c, "command");
    assert_eq!(cmd[0], BINARY, "{n}");
    assert!(cmd.contains(&CONFIG_FLAG.to_string()) && cmd.contains(&HOSTNAME_FLAG.to_string()), "{n}: {cmd:?}");
    let env = seq(c, "env").iter().find(|e| s(e, "name") == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(s(env, "valueFrom.fieldRef.fieldPath"), "spec.nodeName", "{n}");
    // Mounts: config read-only, /lib/modules read-only hostPath, /run/xtables.lock hostPath file.
    let mount = |path: &str| {
        let m = seq(c, "volumeMounts")
            .iter()
            .find(|m| s(m, "mountPath") == path)
            .unwrap_or_else(|| panic!("{n}: nothing mounted at {path}"));
        let v = seq(pod, "volumes").iter().find(|v| at(v, "name") == at(m, "name")).expect("volume");
        (at(m, "readOnly").as_bool().unwrap_or(false), v.clone())
    };
    let (ro, v) = mount(CONFIG_DIR);
    assert!(ro && at(&v, "configMap.name").is_string(), "{n}: config");
    let (ro, v) = mount("/lib/modules");
    assert!(ro && s(&v, "hostPath.path") == "/lib/modules", "{n}: /lib/modules");
    let (ro, v) = mount("/run/xtables.lock");
    assert!(!ro && s(&v, "hostPath.path") == "/run/xtables.lock" && s(&v, "hostPath.type") == "FileOrCreate");
    // Probes on the health port, resources, the rolling update.
    assert_eq!(s(c, "readinessProbe.httpGet.path"), "/healthz", "{n}");
    assert_eq!(s(c, "livenessProbe.httpGet.path"), "/livez", "{n}");
    for p in ["readinessProbe", "livenessProbe"] {
        assert_eq!(at(c, &format!("{p}.httpGet.port")).as_i64(), Some(HEALTHZ_PORT), "{n}: {p}");
    }
    assert!(at(c, "resources.requests.cpu").is_string() && at(c, "resources.requests.memory").is_string());
    assert_eq!(s(ds, "spec.updateStrategy.type"), "RollingUpdate", "{n}");
    assert_eq!(s(ds, "spec.updateStrategy.rollingUpdate.maxUnavailable"), "10%", "{n}");
    assert_eq!(at(ds, "spec.updateStrategy.rollingUpdate.maxSurge").as_i64(), Some(0), "{n}: two proxies per node");
    // Least privilege.
    let sc = at(c, "securityContext");
    assert_eq!(at(sc, "privileged").as_bool(), Some(false), "{n}");
    assert_eq!(at(sc, "allowPrivilegeEscalation").as_bool(), Some(false), "{n}");
    assert_eq!(at(sc, "readOnlyRootFilesystem").as_bool(), Some(true), "{n}");
    assert_eq!(strs(sc, "capabilities.drop"), ["ALL"], "{n}");
    assert_eq!(strs(sc, "capabilities.add"), ["NET_ADMIN", "NET_RAW"], "{n}");
    let ports: BTreeMap<String, i64> =
        seq(c, "ports").iter().map(|p| (s(p, "name").to_string(), at(p, "containerPort").as_i64().unwrap())).collect();
    assert_eq!(ports, BTreeMap::from([("healthz".into(), HEALTHZ_PORT), ("metrics".into(), METRICS_PORT)]), "{n}");
}

#[test]
fn kproxy_daemonset_is_kubeadm_shaped_and_least_privileged() {
    let base = declared("base");
    let ds = find(&base, "DaemonSet", "kproxy");
    check_daemonset(ds, "kproxy", "kproxy");
    find(&base, "ServiceAccount", "kproxy");
    let cm = find(&base, "ConfigMap", &configmap_of(ds));
    // The ports the probes and the Service use are the ones config.conf binds.
    let conf: Value = serde_yaml::from_str(s(cm, "data.config.conf")).unwrap();
    assert_eq!(s(&conf, "healthzBindAddress"), format!("0.0.0.0:{HEALTHZ_PORT}"));
    assert!(s(&conf, "metricsBindAddress").ends_with(&format!(":{METRICS_PORT}")));
    assert_eq!(s(&conf, "clientConnection.kubeconfig"), format!("{CONFIG_DIR}/kubeconfig.conf"));
    // kubeconfig.conf: the pod's service account token and CA, as kubeadm's; the server a
    // placeholder that can never resolve (.invalid), so a forgotten edit fails loudly.
    let kc = kube::config::Kubeconfig::from_yaml(s(cm, "data.kubeconfig.conf")).expect("kubeconfig.conf parses");
    let user = kc.auth_infos[0].auth_info.as_ref().expect("user");
    assert_eq!(user.token_file.as_deref(), Some("/var/run/secrets/kubernetes.io/serviceaccount/token"));
    let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
    assert_eq!(cluster.certificate_authority.as_deref(), Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"));
    assert!(cluster.server.as_deref().is_some_and(|s| s.starts_with("https://") && s.contains(".invalid")));

    // The node-pool variant is the same DaemonSet, restricted to labelled nodes.
    if let Some(objs) = render("node-pool") {
        let ds = find(&objs, "DaemonSet", "kproxy");
        check_daemonset(ds, "kproxy", "kproxy");
        assert_eq!(s(ds, "spec.template.spec.nodeSelector.kproxy/enabled"), "true");
    }
    // ... and kube-proxy is kept off exactly those nodes.
    let avoid = one("node-pool/kube-proxy-avoid-patch.yaml");
    let term = at(
        &avoid,
        "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms.0",
    );
    let expr = &seq(term, "matchExpressions")[0];
    assert_eq!((s(expr, "key"), s(expr, "operator")), ("kproxy/enabled", "NotIn"));
    assert_eq!(strs(expr, "values"), ["true"]);
}

// ---- (b) kproxy accepts the ConfigMap and the DaemonSet's flags --------------------------------------

/// Runs kproxy as the DaemonSet would, but in dry-run on testdata/demo: `config_files` are
/// written where the ConfigMap would be mounted (a temp dir standing for /var/lib/kube-proxy),
/// $(NODE_NAME) is demo-node. Returns stdout; asserts exit 0 and no unexpected warnings.
fn run_as_daemonset(what: &str, command: &[String], config_files: &[(&str, &str)]) -> String {
    let dir = tmpdir(&format!("flags-{}", what.replace(['/', ' '], "-")));
    for (f, t) in config_files {
        fs::write(dir.join(f), t).unwrap();
    }
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| a.replace("$(NODE_NAME)", "demo-node").replace(CONFIG_DIR, &dir.to_string_lossy()))
        .collect();
    assert!(!args.iter().any(|a| a.contains("$(")), "{what}: unsubstituted variable in {args:?}");
    let _bin = BIN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let o = run(Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(&args)
        .args(["--dry-run", "--manifests"])
        .arg(root().join("testdata/demo"))
        .env_remove("RUST_LOG"));
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{what}: kproxy {args:?} exited {:?}\n{err}", o.status);
    for line in err.lines().filter(|l| l.contains("not implemented")) {
        assert!(
            ALLOWED_UNIMPLEMENTED.iter().any(|a| line.contains(a)),
            "{what}: the shipped configuration sets something kproxy ignores:\n{line}"
        );
    }
    assert!(out.contains("add table ip kube-proxy"), "{what}: no ruleset printed:\n{out}");
    out
}

#[test]
fn kproxy_starts_with_the_configmap_and_the_daemonset_flags() {
    let base = declared("base");
    let ds = find(&base, "DaemonSet", "kproxy");
    let cm = find(&base, "ConfigMap", &configmap_of(ds));
    let c = container(ds, "kproxy");
    let mut command = strs(c, "command");
    command.extend(strs(c, "args"));
    let conf = s(cm, "data.config.conf");
    let out = run_as_daemonset(
        "deploy/base",
        &command,
        &[("config.conf", conf), ("kubeconfig.conf", s(cm, "data.kubeconfig.conf"))],
    );
    // The file was read: its clusterCIDR drives the masquerade rules.
    let cidr: Value = serde_yaml::from_str(conf).unwrap();
    let cidr = s(&cidr, "clusterCIDR");
    assert!(out.contains(&format!("ip saddr != {cidr}")), "clusterCIDR {cidr} not in the ruleset:\n{out}");

    // The in-place replacement: kubeadm's own config.conf, with the patched command, as it is and
    // with the one edit the migration guide asks for (mode: nftables).
    let patch = one("replace-kube-proxy/kproxy-patch.yaml");
    let command = strs(container(&patch, "kube-proxy"), "command");
    let kubeadm_conf = read(&root().join("testdata/config/kubeadm-config.conf"));
    assert!(kubeadm_conf.contains("\nmode: \"\"\n"), "kubeadm's config.conf changed shape");
    run_as_daemonset("kubeadm config.conf", &command, &[("config.conf", &kubeadm_conf)]);
    let nft = kubeadm_conf.replace("\nmode: \"\"\n", "\nmode: nftables\n");
    run_as_daemonset("kubeadm config.conf, mode nftables", &command, &[("config.conf", &nft)]);
}

#[test]
fn the_rollback_init_container_command_works() {
    let patch = one("replace-kube-proxy/rollback-nftables-patch.yaml");
    let init = &seq(&patch, "spec.template.spec.initContainers")[0];
    let cmd = strs(init, "command");
    assert_eq!(cmd[0], BINARY);
    if !is_root() || !have("unshare") {
        assert!(
            skip_privileged(),
            "`{}` needs root in a throwaway network namespace; run as root (CI does) or set KPROXY_SKIP_PRIVILEGED=1",
            cmd.join(" ")
        );
        eprintln!("skipped running `{}`: not root; KPROXY_SKIP_PRIVILEGED=1 is set", cmd.join(" "));
        return;
    }
    // Twice: deleting tables that are not there is fine (a node kproxy never ran on).
    let _bin = BIN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..2 {
        let o = run(Command::new("unshare").arg("--net").arg(env!("CARGO_BIN_EXE_kproxy")).args(&cmd[1..]));
        assert!(o.status.success(), "{cmd:?} in a new network namespace:\n{}", text(&o.stderr));
    }
}

// ---- (c) RBAC covers every API call ------------------------------------------------------------------

/// One API request in RBAC terms.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    verb: String,
    group: String,
    resource: String,
}

/// (method, path, query) → RBAC verb, API group, resource, as the API server's request info does.
fn call_of(method: &str, path: &str, watch: bool) -> Call {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, mut rest) = match segs.as_slice() {
        ["api", _v, rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => panic!("not a resource path: {path}"),
    };
    if rest.len() >= 3 && rest[0] == "namespaces" {
        rest = &rest[2..];
    }
    let named = rest.len() >= 2;
    let resource = match rest {
        [r, _, sub, ..] => format!("{r}/{sub}"),
        [r, ..] => r.to_string(),
        [] => panic!("no resource in {path}"),
    };
    let verb = match (method, named, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, false) => "get",
        ("GET", false, false) => "list",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        _ => panic!("unexpected {method} {path}"),
    };
    Call { verb: verb.into(), group: group.into(), resource }
}

fn allowed(role: &Value, c: &Call) -> bool {
    let has = |rule: &Value, field: &str, want: &str| strs(rule, field).iter().any(|x| x == want || x == "*");
    seq(role, "rules")
        .iter()
        .any(|r| has(r, "apiGroups", &c.group) && has(r, "resources", &c.resource) && has(r, "verbs", &c.verb))
}

#[test]
fn the_cluster_role_is_exactly_what_kproxy_needs() {
    let role = one("rbac/clusterrole.yaml");
    let mut got = BTreeSet::new();
    for r in seq(&role, "rules") {
        assert!(at(r, "resourceNames").is_null() && at(r, "nonResourceURLs").is_null());
        for g in strs(r, "apiGroups") {
            for res in strs(r, "resources") {
                for v in strs(r, "verbs") {
                    got.insert((g.clone(), res.clone(), v));
                }
            }
        }
    }
    let want: BTreeSet<(String, String, String)> = CLUSTER_ROLE
        .iter()
        .flat_map(|(g, r, vs)| vs.iter().map(move |v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    assert_eq!(got, want);
    // Bound to the account the DaemonSet runs as, in both variants.
    let b = one("rbac/clusterrolebinding.yaml");
    assert_eq!((s(&b, "roleRef.kind"), s(&b, "roleRef.name")), ("ClusterRole", "kproxy"));
    assert_eq!((s(&b, "subjects.0.name"), s(&b, "subjects.0.namespace")), ("kproxy", "kube-system"));
    if let Some(objs) = render("replace-kube-proxy") {
        let b = objs.iter().find(|o| kind(o) == "ClusterRoleBinding").expect("binding");
        assert_eq!(
            s(b, "subjects.0.name"),
            s(find(&objs, "DaemonSet", "kube-proxy"), "spec.template.spec.serviceAccountName")
        );
        assert_eq!(s(b, "roleRef.name"), "kproxy");
    }
}

/// Every place in src/ that could talk to the API server must be the source the next test runs:
/// a new call site (an event recorder, a Node get in the health server) has to be added there.
#[test]
fn api_calls_are_made_only_by_the_source_the_rbac_test_runs() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("src"), &mut files);
    let needles = [
        "Api::<",
        "Api::all",
        "Api::namespaced",
        "Api::default_namespaced",
        "runtime::events",
        ".request::<",
        ".request_text(",
        ".request_events(",
    ];
    for f in files {
        let rel = f.strip_prefix(root()).unwrap().to_string_lossy().into_owned();
        let t = read(&f);
        for n in needles {
            if rel != "src/source/kube.rs" {
                assert!(
                    !t.contains(n),
                    "{rel} calls the API ({n}): run it in the_rbac_rules_cover_every_request_kproxy_makes"
                );
            }
        }
        if rel == "src/source/kube.rs" {
            for k in t.match_indices("Api::<").map(|(i, _)| t[i + 6..].split('>').next().unwrap_or("")) {
                assert!(
                    ["Service", "EndpointSlice", "ServiceCIDR", "Node"].contains(&k),
                    "kube.rs watches {k}: extend CLUSTER_ROLE"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rbac_rules_cover_every_request_kproxy_makes() {
    let role = one("rbac/clusterrole.yaml");
    // kproxy's API source against the fake API server, with a small cluster, until every watcher
    // has listed and is watching.
    let fake = FakeApi::start().await;
    let svc: k8s_openapi::api::core::v1::Service =
        serde_yaml::from_str("metadata: {namespace: ns, name: a}\nspec: {clusterIP: 172.30.0.10, ports: [{port: 80}]}")
            .unwrap();
    fake.create(&svc);
    let node: k8s_openapi::api::core::v1::Node = serde_yaml::from_str(
        "metadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}",
    )
    .unwrap();
    fake.create(&node);
    let client = kproxy::source::kube::client(None, Some(&fake.url()), 0.0, 0).await.expect("client");
    let tracker = Arc::new(Mutex::new(kproxy::model::ChangeTracker::new("node-a")));
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(kproxy::source::kube::run(client, "node-a".into(), tracker, tx));
    let resources = ["services", "endpointslices", "servicecidrs", "nodes"];
    let start = Instant::now();
    loop {
        let reqs = fake.requests();
        if resources.iter().all(|r| reqs.iter().any(|q| q.resource() == *r && q.is_watch() && q.status == 200)) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the source never watched everything: {reqs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(rx.recv().await, Some(kproxy::sync::Event::Synced)));
    // A change, so that watch events (not only lists) are part of the run.
    fake.delete::<k8s_openapi::api::core::v1::Service>("ns", "a");
    tokio::time::sleep(Duration::from_millis(200)).await;
    task.abort();

    let mut calls: BTreeSet<Call> = fake.requests().iter().map(|q| call_of(&q.method, &q.path, q.is_watch())).collect();
    // The end-to-end tests (tests/e2e_kube.rs, the daemon against the fake) leave their request
    // log here; when a run left one, its requests must be covered too.
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("fakeapi-requests.log");
    if let Ok(t) = fs::read_to_string(&log) {
        let before = calls.len();
        for line in t.lines().filter(|l| !l.trim().is_empty()) {
            let j: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
            let watch = matches!(j["query"]["watch"].as_str(), Some("true" | "1"));
            calls.insert(call_of(j["method"].as_str().unwrap(), j["path"].as_str().unwrap(), watch));
        }
        eprintln!("also checked {} ({} more distinct calls)", log.display(), calls.len() - before);
    } else {
        eprintln!("{} not there (tests/e2e_kube.rs writes it): checked the source's own run only", log.display());
    }
    eprintln!("API calls seen: {calls:#?}");
    let denied: Vec<&Call> = calls.iter().filter(|c| !allowed(&role, c)).collect();
    assert!(denied.is_empty(), "deploy/rbac/clusterrole.yaml does not allow: {denied:#?}");
    for r in resources {
        for v in ["list", "watch"] {
            let group = match r {
                "endpointslices" => "discovery.k8s.io",
                "servicecidrs" => "networking.k8s.io",
                _ => "",
            };
            assert!(
                calls.contains(&Call { verb: v.into(), group: group.into(), resource: r.into() }),
                "the run never did {v} {r}: {calls:#?}"
            );
        }
    }
}

#[test]
fn request_paths_map_to_rbac_terms() {
    let c = |m, p, w| {
        let c = call_of(m, p, w);
        (c.verb, c.group, c.resource)
    };
    let t = |v: &str, g: &str, r: &str| (v.to_string(), g.to_string(), r.to_string());
    assert_eq!(c("GET", "/api/v1/services", false), t("list", "", "services"));
    assert_eq!(
        c("GET", "/apis/discovery.k8s.io/v1/endpointslices", true),
        t("watch", "discovery.k8s.io", "endpointslices")
    );
    assert_eq!(c("GET", "/api/v1/nodes/node-a", false), t("get", "", "nodes"));
    assert_eq!(c("POST", "/api/v1/namespaces/default/events", false), t("create", "", "events"));
    assert_eq!(
        c("PATCH", "/apis/events.k8s.io/v1/namespaces/default/events/e1", false),
        t("patch", "events.k8s.io", "events")
    );
    assert_eq!(c("GET", "/api/v1/namespaces/kube-system/services/x/proxy", false), t("get", "", "services/proxy"));
    let role = one("rbac/clusterrole.yaml");
    assert!(allowed(&role, &call_of("POST", "/apis/events.k8s.io/v1/namespaces/default/events", false)));
    assert!(!allowed(&role, &call_of("GET", "/api/v1/namespaces/ns/services/a", false)), "no get on services");
    assert!(!allowed(&role, &call_of("GET", "/api/v1/secrets", false)));
}

// ---- monitoring -----------------------------------------------------------------------------------------

#[test]
fn monitoring_selects_kproxy_pods_on_the_metrics_port() {
    let svc = one("monitoring/metrics-service.yaml");
    let sm = one("monitoring/servicemonitor.yaml");
    assert_eq!(s(&sm, "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(s(&sm, "kind"), "ServiceMonitor");
    assert_eq!(s(&svc, "spec.clusterIP"), "None", "headless: no rules for it");
    // ServiceMonitor → Service: labels, namespace, port name; job label kube-proxy.
    for (k, v) in at(&sm, "spec.selector.matchLabels").as_mapping().expect("matchLabels") {
        assert_eq!(at(&svc, "metadata.labels").get(k), Some(v), "Service lacks the ServiceMonitor's label {k:?}");
    }
    assert!(strs(&sm, "spec.namespaceSelector.matchNames").contains(&s(&svc, "metadata.namespace").to_string()));
    let port = s(&sm, "spec.endpoints.0.port");
    let sp = seq(&svc, "spec.ports").iter().find(|p| s(p, "name") == port).expect("Service port of the ServiceMonitor");
    assert_eq!(at(sp, "targetPort").as_i64(), Some(METRICS_PORT));
    assert_eq!(s(&svc, &format!("metadata.labels.{}", s(&sm, "spec.jobLabel"))), "kube-proxy");
    // Service → pods, in both DaemonSets (the replacement's after its patch).
    let mut pod_label_sets =
        vec![at(find(&declared("base"), "DaemonSet", "kproxy"), "spec.template.metadata.labels").clone()];
    let kubeadm = one("replace-kube-proxy/kubeadm-kube-proxy.yaml");
    let patch = one("replace-kube-proxy/kproxy-patch.yaml");
    let mut merged = at(&kubeadm, "spec.template.metadata.labels").as_mapping().unwrap().clone();
    merged.extend(at(&patch, "spec.template.metadata.labels").as_mapping().unwrap().clone());
    pod_label_sets.push(Value::Mapping(merged));
    for labels in &pod_label_sets {
        for (k, v) in at(&svc, "spec.selector").as_mapping().unwrap() {
            assert_eq!(labels.get(k), Some(v), "pods labelled {labels:?} are not selected by the metrics Service");
        }
    }

    // The plain Prometheus job: same job name, same pods, the container port named metrics.
    let cfg = one("monitoring/prometheus-scrape-config.yaml");
    let job = &seq(&cfg, "scrape_configs")[0];
    assert_eq!(s(job, "job_name"), "kube-proxy");
    assert_eq!(s(job, "kubernetes_sd_configs.0.role"), "pod");
    let keep = |label: &str| {
        seq(job, "relabel_configs")
            .iter()
            .find(|r| s(r, "action") == "keep" && strs(r, "source_labels") == [label])
            .map(|r| s(r, "regex").to_string())
            .unwrap_or_else(|| panic!("no keep on {label}"))
    };
    assert_eq!(
        keep("__meta_kubernetes_pod_label_app_kubernetes_io_name"),
        s(&svc, "spec.selector.app.kubernetes.io/name")
    );
    assert_eq!(keep("__meta_kubernetes_pod_container_port_name"), "metrics");
    // promtool on the same job with static targets (Debian's Prometheus is built without
    // Kubernetes discovery, so it cannot parse kubernetes_sd_configs; everything else it checks).
    if have("promtool") {
        let mut j = job.clone();
        let m = j.as_mapping_mut().unwrap();
        m.remove("kubernetes_sd_configs");
        m.insert("static_configs".into(), serde_yaml::from_str("[{targets: ['127.0.0.1:10249']}]").unwrap());
        let mut c = serde_yaml::Mapping::new();
        c.insert("scrape_configs".into(), Value::Sequence(vec![j]));
        let f = tmpdir("promtool").join("prometheus.yml");
        fs::write(&f, serde_yaml::to_string(&c).unwrap()).unwrap();
        let o = run(Command::new("promtool").args(["check", "config"]).arg(&f));
        assert!(o.status.success(), "promtool check config:\n{}{}", text(&o.stdout), text(&o.stderr));
    } else {
        eprintln!("promtool not found: the scrape config was checked by hand only");
    }
}

// ---- the image ------------------------------------------------------------------------------------------

fn build_steps() -> Command {
    let mut c = Command::new("bash");
    c.arg(deploy().join("image/build-steps.sh")).current_dir(root());
    c
}

fn packages(which: &str) -> Vec<String> {
    let o = run(build_steps().args(["packages", which]));
    assert!(o.status.success());
    text(&o.stdout).lines().map(str::to_string).collect()
}

#[test]
fn dockerfile_runs_only_the_build_steps_ci_runs() {
    let df = read(&root().join("Dockerfile"));
    let lines: Vec<&str> = df.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    let froms: Vec<&str> = lines.iter().filter(|l| l.starts_with("FROM ")).copied().collect();
    assert_eq!(froms, ["FROM rust:1-bookworm AS build", "FROM debian:bookworm-slim"]);
    // Join continuation lines, then every RUN must be build-steps.sh and nothing else.
    let joined = lines.join("\n").replace("\\\n", " ");
    let runs: Vec<&str> = joined.lines().filter(|l| l.starts_with("RUN ")).collect();
    assert!(!runs.is_empty());
    for r in &runs {
        let cmd = r
            .trim_start_matches("RUN ")
            .split_whitespace()
            .filter(|w| !w.starts_with("--mount="))
            .collect::<Vec<_>>()
            .join(" ");
        for part in cmd.split("&&").map(str::trim) {
            assert!(
                part.starts_with("build-steps.sh ") || part == "rm /usr/local/bin/build-steps.sh",
                "a Dockerfile command CI does not run: {part:?}"
            );
        }
    }
    for step in ["build-deps", "build /out", "runtime-deps", "check /usr/local/bin/kproxy"] {
        assert!(joined.contains(&format!("build-steps.sh {step}")), "Dockerfile does not run `{step}`");
    }
    assert!(joined.contains(&format!("ENTRYPOINT [\"{BINARY}\"]")));
    assert!(joined.contains(&format!("COPY --from=build /out/kproxy {BINARY}")));
    // The entry point is what both DaemonSets run.
    assert_eq!(strs(container(&one("base/daemonset.yaml"), "kproxy"), "command")[0], BINARY);
    // The script itself: shellcheck (make deps installs it), else bash's syntax check.
    let script = deploy().join("image/build-steps.sh");
    let o = if have("shellcheck") {
        run(Command::new("shellcheck").arg(&script))
    } else {
        eprintln!("shellcheck not found: bash -n only");
        run(Command::new("bash").arg("-n").arg(&script))
    };
    assert!(o.status.success(), "{}:\n{}{}", script.display(), text(&o.stdout), text(&o.stderr));
    let ignore = read(&root().join(".dockerignore"));
    assert!(ignore.lines().any(|l| l.trim() == "target/"), ".dockerignore must keep target/ out of the context");
}

#[test]
fn image_build_steps_build_a_binary_whose_libraries_the_runtime_stage_installs() {
    // The Dockerfile's `build` step, natively. Release when a release build is at least as new as
    // the debug one (cargo then has nothing to do), else the dev profile with the flags of
    // `make test`'s own build (`--workspace --all-targets`): cargo then reuses what that build made
    // (a plain `--bin kproxy` build has other dependency features and would rebuild the API client
    // crates, and rewrite target/debug/kproxy under the other tests). The same script and cargo
    // command as the Dockerfile's, without a release build's minutes in CI.
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(root().join("target"));
    let mtime = |p: PathBuf| fs::metadata(p).and_then(|m| m.modified()).ok();
    let profile = match (mtime(target.join("release/kproxy")), mtime(target.join("debug/kproxy"))) {
        (Some(r), Some(d)) if r >= d => "release",
        (Some(_), None) => "release",
        _ => "dev",
    };
    let out = tmpdir("image");
    let flags = if profile == "dev" { "--workspace --all-targets" } else { "" };
    let o = {
        let _bin = BIN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        run(build_steps().arg("build").arg(&out).env("KPROXY_PROFILE", profile).env("KPROXY_CARGO_FLAGS", flags))
    };
    assert!(o.status.success(), "build-steps.sh build ({profile}):\n{}", text(&o.stderr));
    let bin = out.join("kproxy");
    let o = run(build_steps().arg("check").arg(&bin));
    assert!(o.status.success(), "build-steps.sh check:\n{}{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).starts_with("kproxy "), "{}", text(&o.stdout));

    // Every shared library the binary links comes from a runtime package, or from the base
    // image's own (libc6 is essential and pulls in libgcc-s1); and every library package listed
    // is really linked.
    let runtime = packages("runtime");
    let base_image = ["libc6", "libgcc-s1"];
    let ldd = text(&run(Command::new("ldd").arg(&bin)).stdout);
    let mut linked = BTreeSet::new();
    for line in ldd.lines() {
        let Some(path) = line.split("=>").nth(1).and_then(|r| r.split_whitespace().next()) else { continue };
        // dpkg knows /lib/x86_64-linux-gnu/... under /usr/lib on merged-/usr systems, or not.
        let real = fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        let owner = [PathBuf::from(path), real.clone(), PathBuf::from(format!("/usr{path}"))]
            .iter()
            .find_map(|p| {
                let o = run(Command::new("dpkg").arg("-S").arg(p));
                o.status.success().then(|| text(&o.stdout).split(':').next().unwrap().trim().to_string())
            })
            .unwrap_or_else(|| panic!("no Debian package owns {path} ({})", real.display()));
        linked.insert(owner);
    }
    for p in &linked {
        assert!(
            runtime.contains(p) || base_image.contains(&p.as_str()),
            "kproxy links {p}, which the runtime stage does not install"
        );
    }
    for p in runtime.iter().filter(|p| p.starts_with("lib")) {
        assert!(linked.contains(p), "the runtime stage installs {p}, which kproxy does not link ({linked:?})");
    }
    // The build stage's -dev packages are the ones for those libraries.
    let build = packages("build");
    for lib in ["libnftnl", "libmnl"] {
        assert!(build.iter().any(|p| p == &format!("{lib}-dev")));
    }

    // Both package lists resolve on this Debian (the image's base is bookworm).
    let codename = read(Path::new("/etc/os-release"))
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
        .unwrap_or_default();
    for step in ["build-deps", "runtime-deps"] {
        let o = run(build_steps().arg(step).env("APT_SIMULATE", "1"));
        assert!(o.status.success(), "build-steps.sh {step} (simulated) on {codename}:\n{}", text(&o.stderr));
    }
    if codename != "bookworm" {
        eprintln!("note: package names were resolved on {codename}, the image uses bookworm");
    }
}
