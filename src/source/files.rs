//! Owns the `--manifests DIR` source: reading Service, EndpointSlice and Node objects from YAML
//! and JSON files, refusing bad files and documents one at a time, and cheap change detection
//! (`DirWatcher`) so edits show up within a second without an inotify dependency.
//!
//! The directory stands in for the API server, so two things the API server would do happen here:
//! its defaulting (namespace `default`; EndpointSlice port name `""` and protocol `TCP`) and the
//! uniqueness of (kind, namespace, name). Objects are also converted here, on the parser
//! threads, with the conversion the API source's objects get in the tracker: every rejection can
//! name the file and document it came from, and the tracker takes the model objects as they are.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::hash::{DefaultHasher, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rules::model::NodeInfo;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::model::{convert, Converted, Rejected, ServiceInfo, SliceInfo};

/// Files larger than this are refused unread: no real manifest is this big, and reading it on
/// every change would stall the source.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// How deep subdirectories are followed (symlinked directories included, so loops must end).
const MAX_DEPTH: usize = 8;
/// `DirWatcher` re-hashes every file at least this often, even when its size and mtime say it is
/// unchanged, in case a tool wrote new content and then restored the old mtime.
const FULL_HASH_EVERY: u64 = 40;
/// Files whose mtime is this recent are re-hashed on every poll: on file systems with coarse
/// timestamps (1-2 s), two same-sized writes within one tick leave size and mtime unchanged.
const RECENT: Duration = Duration::from_secs(3);

/// Everything one read of the directory found, converted for the tracker. Objects here are valid;
/// valid ones that are not proxied (such as headless Services) are only counted in `skipped`;
/// everything else is in `rejected`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub services: Vec<ServiceInfo>,
    pub slices: Vec<SliceInfo>,
    pub nodes: Vec<NodeInfo>,
    /// Valid Services and EndpointSlices that are deliberately not proxied.
    pub skipped: usize,
    /// The CIDRs of every ServiceCIDR (networking.k8s.io/v1) object.
    pub service_cidrs: Vec<rules::model::Cidr>,
    pub rejected: Vec<Rejected>,
    /// What each file read was (size, mtime, content hash), for a `DirWatcher` to start from.
    pub stamps: Stamps,
}

impl Snapshot {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.slices.is_empty()
            && self.nodes.is_empty()
            && self.skipped == 0
            && self.rejected.is_empty()
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file under `dir` (recursively, in path order).
/// Never fails: an unreadable directory or file becomes a `Rejected` of kind `"file"`.
///
/// Files are parsed on up to `MAX_PARSERS` threads (parsing is most of a large directory's
/// start-up); what they found is then taken in path order, so the result, duplicates and the order
/// of rejections included, is the same as reading the files one after the other.
pub fn load_dir(dir: &Path) -> Snapshot {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_PARSERS);
    load_dir_on(dir, threads)
}

/// `load_dir` on at most `threads` parser threads.
fn load_dir_on(dir: &Path, threads: usize) -> Snapshot {
    let mut loader = Loader::default();
    let (files, errors) = list_files(dir);
    loader.snap.rejected.extend(errors);
    // Each file is stamped from the bytes parsed, as `DirWatcher` would stamp it, so a watcher
    // can start from what was read without reading everything again.
    let parse = |path: &PathBuf| {
        let mut file = FileLoader::default();
        let meta = fs::metadata(path).ok();
        let read = read_limited(path, meta.as_ref().map(|m| m.len()));
        let stamp = meta.map(|m| Stamp::of(&m, read.as_deref().ok()));
        match read {
            Ok(bytes) => file.add_file(path, &bytes),
            Err(reason) => file.reject(Rejected::file(path, reason)),
        }
        (file.found, stamp)
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut parsed: Vec<(usize, Parsed)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.clamp(1, files.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = files.get(i) else { return out };
                        out.push((i, parse(path)));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a manifest parser panicked")).collect()
    });
    parsed.sort_unstable_by_key(|(i, _)| *i);
    let mut stamps = BTreeMap::new();
    for (i, (found, stamp)) in parsed {
        loader.take(&files[i], found);
        if let Some(stamp) = stamp {
            stamps.insert(relative(dir, &files[i]), stamp);
        }
    }
    loader.snap.stamps = Stamps(stamps);
    // At 50k Services the record of what was seen took ~60 ms to free, on the way to the first
    // sync: it is freed on a thread of its own (here if none can be started).
    crate::memory::drop_elsewhere(std::mem::take(&mut loader.seen));
    let mut snap = loader.snap;
    // Service ports outlive the compaction after a large sync (the merged state and the kept
    // ruleset share them, and the compaction copies only what holds them), so they are copied
    // once more here, on the calling thread, one after another: left where the parsers made them,
    // among the freed objects they came from, they held mostly empty pages (at 50k Services the
    // resident set after start-up was 4 MiB larger).
    for svc in &mut snap.services {
        for p in &mut svc.ports {
            *p = std::sync::Arc::new(p.fresh_copy());
        }
    }
    snap
}

/// What parsing one file found, and its stamp (`None` if its metadata could not be read).
type Parsed = (Vec<Found>, Option<Stamp>);

/// Threads `load_dir` parses files on, at most.
const MAX_PARSERS: usize = 4;

/// Parses one file's content as `load_dir` would (`path` names it in rejections and selects
/// JSON for a `.json` extension). Useful for tests and fuzzing without touching the disk.
pub fn parse_file(path: &Path, bytes: &[u8]) -> Snapshot {
    let mut file = FileLoader::default();
    file.add_file(path, bytes);
    let mut loader = Loader::default();
    loader.take(path, file.found);
    loader.snap
}

/// Takes what the files hold, in order, remembering where each object came from for duplicate
/// reports.
#[derive(Default)]
struct Loader {
    snap: Snapshot,
    /// Where each kept object was found (an index into `files`, and where in the file), for
    /// naming it in a duplicate's rejection.
    seen: HashMap<(&'static str, String, String), (usize, String)>,
    /// The files taken, in order.
    files: Vec<PathBuf>,
}

impl Loader {
    /// Keeps the objects of file `path` that passed validation and are not duplicates; records
    /// the rest.
    fn take(&mut self, path: &Path, found: Vec<Found>) {
        self.files.push(path.to_path_buf());
        let file = self.files.len() - 1;
        for f in found {
            match f {
                Found::Rejected(r) => self.snap.rejected.push(r),
                Found::Object { id: (ns, name), at, obj } => {
                    let kind = obj.kind();
                    match self.seen.entry((kind, ns, name)) {
                        std::collections::hash_map::Entry::Occupied(e) => {
                            let ((first_file, first_at), (_, ns, name)) = (e.get(), e.key());
                            let reason = format!(
                                "{at}: duplicate of the object in {} {first_at}; the first one is used",
                                self.files[*first_file].display(),
                            );
                            self.snap.rejected.push(Rejected::new(kind, ns, name, reason).in_file(path));
                        }
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert((file, at));
                            obj.keep(&mut self.snap);
                        }
                    }
                }
            }
        }
    }
}

/// What parsing a file found, in the file's order.
enum Found {
    Rejected(Rejected),
    /// A valid object, kept unless an earlier one (in this or an earlier file) has its name.
    Object {
        id: (String, String),
        /// Where in the file.
        at: String,
        obj: Kept,
    },
}

/// A valid object, converted (the parser threads do the conversion, not the tracker).
enum Kept {
    Service(ServiceInfo),
    Slice(SliceInfo),
    Node(NodeInfo),
    /// A ServiceCIDR object's CIDRs.
    ServiceCidrs(Vec<rules::model::Cidr>),
    /// A valid object of this kind that is deliberately not proxied (headless, FQDN, ...).
    Skipped(&'static str),
}

impl Kept {
    fn kind(&self) -> &'static str {
        match self {
            Kept::Service(_) => "Service",
            Kept::Slice(_) => "EndpointSlice",
            Kept::Node(_) => "Node",
            Kept::ServiceCidrs(_) => "ServiceCIDR",
            Kept::Skipped(kind) => kind,
        }
    }

    fn keep(self, s: &mut Snapshot) {
        match self {
            // (Their ports are copied again at the end of `load_dir_on`.)
            Kept::Service(o) => s.services.push(o),
            Kept::Slice(o) => s.slices.push(o),
            Kept::Node(o) => s.nodes.push(o),
            Kept::ServiceCidrs(c) => s.service_cidrs.extend(c),
            Kept::Skipped(_) => s.skipped += 1,
        }
    }
}

/// A converted object of `kind` as kept: `wrap`ped when proxied, else only counted.
fn kept<T>(c: Converted<T>, kind: &'static str, wrap: fn(T) -> Kept) -> Kept {
    match c {
        Converted::Proxied(info) => wrap(info),
        Converted::Skipped(_) => Kept::Skipped(kind),
    }
}

/// Parses one file: no state shared with other files, so files can be parsed in parallel.
#[derive(Default)]
struct FileLoader {
    found: Vec<Found>,
}

impl FileLoader {
    fn reject(&mut self, r: Rejected) {
        self.found.push(Found::Rejected(r));
    }

    fn add_file(&mut self, path: &Path, bytes: &[u8]) {
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let reason = format!("not UTF-8 text (invalid byte at offset {})", e.valid_up_to());
                return self.reject(Rejected::file(path, reason));
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            self.add_json(path, text);
        } else {
            for doc in split_documents(text) {
                let at = format!("document {} (line {})", doc.index, doc.first_line);
                let value = match serde_yaml::from_str::<serde_yaml::Value>(doc.text) {
                    Ok(v) => v,
                    Err(e) => {
                        let reason = format!("{at}: not valid YAML: {}", relocate(&e, doc.first_line));
                        self.reject(Rejected::file(path, reason));
                        continue;
                    }
                };
                let text = Some((doc.text, doc.first_line));
                self.add_doc(path, &at, &YamlDoc { value: &value, text }, true);
            }
        }
    }

    fn add_json(&mut self, path: &Path, text: &str) {
        // Each value is kept as its text and typed straight from it: building a value tree first
        // (and dropping it) took about six times as long as typing the objects themselves. The
        // dispatch fields are read in the same pass that finds where each value ends.
        let mut values = serde_json::Deserializer::from_str(text).into_iter::<Head>();
        for i in 1.. {
            let start = values.byte_offset();
            match values.next() {
                None => break,
                Some(Ok(head)) => {
                    let raw = text[start..values.byte_offset()].trim_start();
                    let doc = JsonDoc { file: text, raw, head, invalid: None };
                    self.add_doc(path, &format!("value {i}"), &doc, true);
                }
                Some(Err(e)) => {
                    // A JSON syntax error cannot be resumed after; keep what came before it.
                    let reason = format!("value {i}: not valid JSON: {e}");
                    self.reject(Rejected::file(path, reason));
                    break;
                }
            }
        }
    }

    /// One document (or `List` item): dispatch on `kind`, deserialize, default, validate, convert.
    fn add_doc<D: Untyped>(&mut self, path: &Path, at: &str, doc: &D, top: bool) {
        if let Some(e) = doc.invalid() {
            return self.reject(Rejected::file(path, format!("{at}: not valid JSON: {e}")));
        }
        let what = match doc.shape() {
            Shape::Mapping => None,
            Shape::Null => {
                tracing::debug!(file = %path.display(), at, "skipping empty document");
                return;
            }
            Shape::Sequence => Some("a sequence"),
            Shape::Tagged => Some("a tagged value"),
            Shape::Scalar => Some("a scalar"),
        };
        if let Some(what) = what {
            let reason = format!("{at}: not a Kubernetes object (the document is {what}, not a mapping)");
            return self.reject(Rejected::file(path, reason));
        }
        let (mut ns, name) = (doc.meta("namespace"), doc.meta("name"));
        if ns.is_empty() {
            ns = "default".to_string(); // what the namespaced kinds get defaulted to below
        }
        match doc.kind().as_deref() {
            Some("Service") => {
                let Some(mut svc) = self.typed_or_reject::<Service>(doc, path, at, "Service", &ns, &name) else {
                    return;
                };
                default_namespace(&mut svc.metadata);
                let kept = convert::service(&svc).map(|c| kept(c, "Service", Kept::Service));
                self.accept(path, at, ident(&svc.metadata), kept);
            }
            Some("EndpointSlice") => {
                let kind = "EndpointSlice";
                let Some(mut slice) = self.typed_or_reject::<EndpointSlice>(doc, path, at, kind, &ns, &name) else {
                    return;
                };
                default_namespace(&mut slice.metadata);
                for p in slice.ports.iter_mut().flatten() {
                    p.name.get_or_insert_with(String::new);
                    p.protocol.get_or_insert_with(|| "TCP".to_string());
                }
                let kept = convert::endpoint_slice(&slice).map(|c| kept(c, kind, Kept::Slice));
                self.accept(path, at, ident(&slice.metadata), kept);
            }
            Some("Node") => {
                let Some(mut node) = self.typed_or_reject::<Node>(doc, path, at, "Node", "", &name) else { return };
                node.metadata.namespace = None; // cluster-scoped
                self.accept(path, at, ident(&node.metadata), convert::node(&node).map(Kept::Node));
            }
            Some("ServiceCIDR") => {
                let Some(o) = self.typed_or_reject::<ServiceCIDR>(doc, path, at, "ServiceCIDR", "", &name) else {
                    return;
                };
                let mut cidrs = Vec::new();
                let mut bad = None;
                for c in o.spec.as_ref().and_then(|s| s.cidrs.as_ref()).into_iter().flatten() {
                    match rules::model::Cidr::parse(c) {
                        Ok(c) => cidrs.push(c),
                        Err(e) => bad = Some(format!("spec.cidrs: {e}")),
                    }
                }
                let kept = match bad {
                    None => Ok(Kept::ServiceCidrs(cidrs)),
                    Some(reason) => Err(Rejected::new("ServiceCIDR", "", &name, reason)),
                };
                self.accept(path, at, ident(&o.metadata), kept);
            }
            // `kind: List` (kubectl) and typed lists such as `ServiceList` (API responses).
            Some(k) if k == "List" || (k.ends_with("List") && doc.has_items()) => {
                if !top {
                    let reason = format!("{at}: a {k} nested inside a List is not supported");
                    return self.reject(Rejected::file(path, reason));
                }
                match doc.items() {
                    Items::None => {}
                    Items::Sequence(items) => {
                        for (i, item) in items.iter().enumerate() {
                            self.add_doc(path, &format!("{at} items[{i}]"), item, false);
                        }
                    }
                    Items::Other => {
                        let reason = format!("{at}: {k}.items is not a sequence");
                        self.reject(Rejected::file(path, reason));
                    }
                }
            }
            Some(other) => {
                tracing::debug!(file = %path.display(), at, kind = other, "skipping document of another kind");
            }
            None => {
                let reason = format!("{at}: not a Kubernetes object (no string `kind` field)");
                self.reject(Rejected::file(path, reason));
            }
        }
    }

    /// `doc` typed as `T`, or `None` after rejecting it with a reason naming the object as far as
    /// known (`ns` empty for cluster-scoped kinds).
    fn typed_or_reject<T: DeserializeOwned>(
        &mut self,
        doc: &impl Untyped,
        path: &Path,
        at: &str,
        kind: &'static str,
        ns: &str,
        name: &str,
    ) -> Option<T> {
        doc.typed().map_err(|e| self.reject(Rejected::new(kind, ns, name, format!("{at}: {e}")).in_file(path))).ok()
    }

    /// Records a converted object: rejected if it failed validation, else for `Loader::take` to
    /// keep unless it is a duplicate.
    fn accept(&mut self, path: &Path, at: &str, id: (String, String), kept: Result<Kept, Rejected>) {
        match kept {
            Ok(obj) => self.found.push(Found::Object { id, at: at.to_string(), obj }),
            Err(mut r) => {
                r.reason = format!("{at}: {}", r.reason);
                self.reject(r.in_file(path));
            }
        }
    }
}

/// What a document is, before its kind is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Shape {
    #[default]
    Null,
    Mapping,
    Sequence,
    Tagged,
    Scalar,
}

/// A `List`'s `items`.
enum Items<T> {
    /// Absent or null.
    None,
    Sequence(Vec<T>),
    /// Anything else.
    Other,
}

/// A document or `List` item whose kind is not known yet: a YAML value or a JSON text. Dispatch
/// reads a few fields; the object is then typed from whichever form is fastest and says best
/// where an error is.
trait Untyped: Sized {
    /// Why the document cannot be read at all, if so.
    fn invalid(&self) -> Option<&str> {
        None
    }
    fn shape(&self) -> Shape;
    /// `kind`, if it is a string.
    fn kind(&self) -> Option<String>;
    /// `metadata.<field>`, if it is a string; else empty.
    fn meta(&self, field: &str) -> String;
    fn has_items(&self) -> bool;
    fn items(&self) -> Items<Self>;
    fn typed<T: DeserializeOwned>(&self) -> Result<T, String>;
}

/// A YAML document, or an item of a YAML `List`.
struct YamlDoc<'a> {
    value: &'a serde_yaml::Value,
    /// The document's text, to type a whole document from (better error positions); `None` for
    /// a `List` item, typed from the value.
    text: Option<(&'a str, usize)>,
}

impl Untyped for YamlDoc<'_> {
    fn shape(&self) -> Shape {
        match self.value {
            serde_yaml::Value::Null => Shape::Null,
            serde_yaml::Value::Mapping(_) => Shape::Mapping,
            serde_yaml::Value::Sequence(_) => Shape::Sequence,
            serde_yaml::Value::Tagged(_) => Shape::Tagged,
            _ => Shape::Scalar,
        }
    }
    fn kind(&self) -> Option<String> {
        self.value.get("kind").and_then(|k| k.as_str()).map(str::to_string)
    }
    fn meta(&self, field: &str) -> String {
        self.value.get("metadata").and_then(|m| m.get(field)).and_then(|v| v.as_str()).unwrap_or("").to_string()
    }
    fn has_items(&self) -> bool {
        self.value.get("items").is_some()
    }
    fn items(&self) -> Items<Self> {
        match self.value.get("items") {
            None | Some(serde_yaml::Value::Null) => Items::None,
            Some(serde_yaml::Value::Sequence(items)) => {
                Items::Sequence(items.iter().map(|value| YamlDoc { value, text: None }).collect())
            }
            Some(_) => Items::Other,
        }
    }
    fn typed<T: DeserializeOwned>(&self) -> Result<T, String> {
        match self.text {
            Some((text, first_line)) => serde_yaml::from_str::<T>(text).map_err(|e| relocate(&e, first_line)),
            None => T::deserialize(self.value).map_err(|e| e.to_string()),
        }
    }
}

/// A JSON value (a file may hold several) or an item of a JSON `List`, as its text.
struct JsonDoc<'a> {
    /// The whole file, to give error positions in it.
    file: &'a str,
    /// The value's text: a slice of `file`.
    raw: &'a str,
    head: Head<'a>,
    /// Why the value cannot be read, for a `List` item.
    invalid: Option<String>,
}

impl Untyped for JsonDoc<'_> {
    fn invalid(&self) -> Option<&str> {
        self.invalid.as_deref()
    }
    fn shape(&self) -> Shape {
        self.head.shape
    }
    fn kind(&self) -> Option<String> {
        self.head.kind.clone()
    }
    fn meta(&self, field: &str) -> String {
        let m = &self.head.meta;
        match field {
            "namespace" => m.namespace.clone(),
            "name" => m.name.clone(),
            _ => None,
        }
        .unwrap_or_default()
    }
    fn has_items(&self) -> bool {
        self.head.items.is_some()
    }
    fn items(&self) -> Items<Self> {
        match &self.head.items {
            None | Some(Items::None) => Items::None,
            Some(Items::Other) => Items::Other,
            Some(Items::Sequence(v)) => Items::Sequence(
                v.iter()
                    .map(|raw| {
                        // The item's syntax was checked; what the check of its values finds (a
                        // repeated key, a number out of range) rejects the item alone.
                        let (head, invalid) = match serde_json::from_str(raw.get()) {
                            Ok(head) => (head, None),
                            Err(e) => (Head::default(), Some(json_error_in_file(&e, self.file, raw.get()))),
                        };
                        JsonDoc { file: self.file, raw: raw.get(), head, invalid }
                    })
                    .collect(),
            ),
        }
    }
    fn typed<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str::<T>(self.raw).map_err(|e| json_error_in_file(&e, self.file, self.raw))
    }
}

/// A serde_json error in `part` (a slice of `file`) with its position moved into `file`.
fn json_error_in_file(e: &serde_json::Error, file: &str, part: &str) -> String {
    let msg = e.to_string();
    if e.line() == 0 {
        return msg;
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let Some(text) = msg.strip_suffix(&suffix) else { return msg };
    let offset = (part.as_ptr() as usize).saturating_sub(file.as_ptr() as usize).min(file.len());
    let before = &file[..offset];
    let line = before.matches('\n').count() + e.line();
    let column = match e.line() {
        1 => offset - before.rfind('\n').map_or(0, |i| i + 1) + e.column(),
        _ => e.column(),
    };
    format!("{text} at line {line} column {column}")
}

/// The fields of a JSON object that dispatch reads, and what kind of value it is.
#[derive(Default)]
struct Head<'a> {
    shape: Shape,
    kind: Option<String>,
    meta: MetaHead,
    /// `items`, when the key is there (null or not).
    items: Option<Items<&'a RawValue>>,
}

/// `metadata.name` and `metadata.namespace` when they are strings.
#[derive(Default)]
struct MetaHead {
    name: Option<String>,
    namespace: Option<String>,
}

/// Any JSON value, read the way a value tree would have read it and then dropped: numbers in
/// range, strings valid, serde_json's nesting limit, and no object with one key twice. Objects are
/// typed from their text by deserializers that skip what they do not know and take the last of a
/// repeated key; without this, such input would be accepted where reading into a tree refused it.
/// `Checked<true>` also keeps a string (the dispatch fields); `Checked` allocates nothing.
struct Checked<const KEEP: bool = false> {
    string: Option<String>,
}

impl<'de, const KEEP: bool> serde::Deserialize<'de> for Checked<KEEP> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct V<const KEEP: bool>;
        impl<'de, const KEEP: bool> Visitor<'de> for V<KEEP> {
            type Value = Checked<KEEP>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Checked<KEEP>, E> {
                Ok(Checked { string: None })
            }
            fn visit_bool<E>(self, _: bool) -> Result<Checked<KEEP>, E> {
                Ok(Checked { string: None })
            }
            fn visit_i64<E>(self, _: i64) -> Result<Checked<KEEP>, E> {
                Ok(Checked { string: None })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Checked<KEEP>, E> {
                Ok(Checked { string: None })
            }
            fn visit_f64<E>(self, _: f64) -> Result<Checked<KEEP>, E> {
                Ok(Checked { string: None })
            }
            fn visit_str<E>(self, v: &str) -> Result<Checked<KEEP>, E> {
                Ok(Checked { string: KEEP.then(|| v.to_string()) })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked<KEEP>, A::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Checked { string: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked<KEEP>, A::Error> {
                let mut keys = Keys::default();
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    keys.first_time::<A::Error>(k.0)?;
                    map.next_value::<Checked>()?;
                }
                Ok(Checked { string: None })
            }
        }
        d.deserialize_any(V::<KEEP>)
    }
}

/// An object's key, borrowed from the text unless it has escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The keys of one object so far: the first 16 in place as borrowed text (no allocation, and
/// nothing to drop, for the small objects that make up most of a manifest), a hash set once there
/// are more or once a key had escapes and had to be copied (a file may hold an object with a
/// million keys).
#[derive(Default)]
struct Keys<'de> {
    few: [&'de str; 16],
    n: usize,
    many: Option<std::collections::HashSet<std::borrow::Cow<'de, str>>>,
}

impl<'de> Keys<'de> {
    /// An error naming the key when the object had it already.
    fn first_time<E: serde::de::Error>(&mut self, k: std::borrow::Cow<'de, str>) -> Result<(), E> {
        let repeated = match (&mut self.many, k) {
            (Some(m), k) => match m.contains(&k) {
                true => Some(k),
                false => {
                    m.insert(k);
                    None
                }
            },
            (None, std::borrow::Cow::Borrowed(k)) if self.n < self.few.len() => match self.few[..self.n].contains(&k) {
                true => Some(std::borrow::Cow::Borrowed(k)),
                false => {
                    self.few[self.n] = k;
                    self.n += 1;
                    None
                }
            },
            (None, k) => {
                let mut m: std::collections::HashSet<_> =
                    self.few[..self.n].iter().map(|s| std::borrow::Cow::Borrowed(*s)).collect();
                let repeated = m.contains(&k).then(|| k.clone());
                m.insert(k);
                self.many = Some(m);
                repeated
            }
        };
        match repeated {
            Some(k) => Err(E::custom(format_args!("duplicate key {:?}", &*k))),
            None => Ok(()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for MetaHead {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        // Anything but an object is checked and gives no names.
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MetaHead;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<MetaHead, E> {
                Ok(MetaHead::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<MetaHead, E> {
                Ok(MetaHead::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<MetaHead, E> {
                Ok(MetaHead::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<MetaHead, E> {
                Ok(MetaHead::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<MetaHead, E> {
                Ok(MetaHead::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<MetaHead, E> {
                Ok(MetaHead::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MetaHead, A::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(MetaHead::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MetaHead, A::Error> {
                let (mut meta, mut keys) = (MetaHead::default(), Keys::default());
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    keys.first_time::<A::Error>(k.0.clone())?;
                    match &*k.0 {
                        "name" => meta.name = map.next_value::<Checked<true>>()?.string,
                        "namespace" => meta.namespace = map.next_value::<Checked<true>>()?.string,
                        _ => {
                            map.next_value::<Checked>()?;
                        }
                    }
                }
                Ok(meta)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for Head<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Head<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Head::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Head { shape: Shape::Scalar, ..Default::default() })
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Head { shape: Shape::Scalar, ..Default::default() })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Head { shape: Shape::Scalar, ..Default::default() })
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Head { shape: Shape::Scalar, ..Default::default() })
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Head { shape: Shape::Scalar, ..Default::default() })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Head { shape: Shape::Sequence, ..Default::default() })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut head, mut keys) = (Head { shape: Shape::Mapping, ..Default::default() }, Keys::default());
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    keys.first_time::<A::Error>(k.0.clone())?;
                    match &*k.0 {
                        "kind" => head.kind = map.next_value::<Checked<true>>()?.string,
                        "metadata" => head.meta = map.next_value()?,
                        // Each item is checked when it is read on its own.
                        "items" => head.items = Some(map.next_value::<Items<&'de RawValue>>()?),
                        _ => {
                            map.next_value::<Checked>()?;
                        }
                    }
                }
                Ok(head)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for Items<&'de RawValue> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Items<&'de RawValue>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Items::None)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Items::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Items::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Items::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Items::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Items::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Items::Sequence(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                <Checked as serde::Deserialize>::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Items::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// `(namespace, name)` of an object, empty when unset.
fn ident(meta: &ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// API-server defaulting for namespaced objects read from files.
fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().unwrap_or("").is_empty() {
        meta.namespace = Some("default".to_string());
    }
}

/// A serde_yaml error with its line moved from document-relative to file-relative.
fn relocate(e: &serde_yaml::Error, first_line: usize) -> String {
    let msg = e.to_string();
    match e.location() {
        Some(loc) => {
            let old = format!(" at line {} column {}", loc.line(), loc.column());
            let new = format!(" at line {} column {}", loc.line() + first_line - 1, loc.column());
            msg.replacen(&old, &new, 1)
        }
        None => msg,
    }
}

struct Doc<'a> {
    /// 1-based.
    index: usize,
    /// 1-based line of the file where the document's text starts.
    first_line: usize,
    text: &'a str,
}

/// Splits a multi-document YAML file at `---` (and after `...`) lines.
///
/// Why not serde_yaml's multi-document iterator: after a syntax error in one document it cannot
/// go on to the next, and one bad document must not hide the good ones after it. A line starting
/// with `---` or `...` at column 0 always ends a document in YAML (even inside a block scalar),
/// so splitting on those lines is exact for every file the parser would accept.
fn split_documents(text: &str) -> Vec<Doc<'_>> {
    let is_marker = |line: &str, m: &str| {
        line.strip_prefix(m).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let mut start = 0; // byte offset where the current document starts
    let mut start_line = 1;
    let mut offset = 0;
    let mut bounds: Vec<(usize, usize, usize)> = Vec::new(); // (start, end, first_line)
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let line_no = n + 1;
        let trimmed = line.trim_end_matches(['\n', '\r']);
        if is_marker(trimmed, "---") {
            // The marker begins a new document; what came before is the previous one.
            bounds.push((start, offset, start_line));
            start = offset;
            start_line = line_no;
        } else if is_marker(trimmed, "...") {
            // `...` ends the current document (the marker stays with it).
            bounds.push((start, offset + line.len(), start_line));
            start = offset + line.len();
            start_line = line_no + 1;
        }
        offset += line.len();
    }
    bounds.push((start, text.len(), start_line));
    let mut docs = Vec::new();
    for (s, e, first_line) in bounds {
        // A document that is empty text (e.g. before a leading `---`) is not counted.
        if s == e {
            continue;
        }
        docs.push(Doc { index: docs.len() + 1, first_line, text: &text[s..e] });
    }
    docs
}

/// Reads a file, refusing one over `MAX_FILE_BYTES` without reading it all. `len`, the size its
/// metadata gave, sizes the buffer: growing it from nothing read each file of a large directory
/// in several calls, copying what was read at each growth.
fn read_limited(path: &Path, len: Option<u64>) -> Result<Vec<u8>, String> {
    let f = fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    // One more byte than the size, so that reading to the end needs no growth; a file that grew
    // since its metadata was read still grows the buffer.
    let mut buf = Vec::with_capacity(len.filter(|n| *n <= MAX_FILE_BYTES).map_or(0, |n| n as usize + 1));
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut buf).map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than the {} MiB limit for a manifest file", MAX_FILE_BYTES >> 20));
    }
    Ok(buf)
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["yaml", "yml", "json"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Every manifest file under `dir`, sorted by path, and the entries that could not be read.
///
/// Names starting with `.` are skipped: a ConfigMap volume holds every file twice (`foo.yaml`
/// and `..2024_01_01_00_00_00.123/foo.yaml` behind `..data`), and editors leave `.foo.yaml.swp`.
fn list_files(dir: &Path) -> (Vec<PathBuf>, Vec<Rejected>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut visited = BTreeSet::new();
    walk(dir, 0, &mut visited, &mut files, &mut errors);
    files.sort();
    (files, errors)
}

fn walk(
    dir: &Path,
    depth: usize,
    visited: &mut BTreeSet<PathBuf>,
    files: &mut Vec<PathBuf>,
    errors: &mut Vec<Rejected>,
) {
    // Symlinked directories are followed; the canonical-path set stops loops.
    if let Ok(canon) = fs::canonicalize(dir) {
        if !visited.insert(canon) {
            return;
        }
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return errors.push(Rejected::file(dir, format!("cannot read directory: {e}"))),
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                errors.push(Rejected::file(dir, format!("cannot read directory: {e}")));
                continue;
            }
        };
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                if depth + 1 > MAX_DEPTH {
                    errors.push(Rejected::file(&path, format!("deeper than {MAX_DEPTH} directories; not read")));
                } else {
                    walk(&path, depth + 1, visited, files, errors);
                }
            }
            Ok(m) if m.is_file() && is_manifest(&path) => files.push(path),
            Ok(_) => {}
            // A dangling symlink named like a manifest is worth a warning; anything else is not ours.
            Err(e) if is_manifest(&path) => errors.push(Rejected::file(&path, format!("cannot read: {e}"))),
            Err(_) => {}
        }
    }
}

/// Detects changes to the manifest files under a directory by polling (call every ~250 ms).
///
/// Start it from the stamps of a `load_dir` (`from_stamps`): they say what was read. One made with
/// `new` stamps the files itself: make it *before* the load, so that a write between the two
/// shows up as a change (one extra reload) instead of being missed.
#[derive(Debug)]
pub struct DirWatcher {
    dir: PathBuf,
    stamps: BTreeMap<PathBuf, Stamp>,
    polls: u64,
}

/// What identifies one version of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    hash: u64,
}

impl Stamp {
    /// The stamp of a file with metadata `meta` (taken before its content was read, so that a
    /// write after it moves the mtime) and content `bytes` (`None` if it could not be read). The
    /// content of a file over `MAX_FILE_BYTES` is not hashed (the loader refuses it unread; its
    /// size and mtime still track it).
    fn of(meta: &fs::Metadata, bytes: Option<&[u8]>) -> Stamp {
        let len = meta.len();
        let hash = if len > MAX_FILE_BYTES { 0 } else { hash_bytes(bytes) };
        Stamp { len, mtime_ns: mtime_ns(meta), hash }
    }
}

/// The stamps of the files a `load_dir` read, keyed by path relative to the directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamps(BTreeMap<PathBuf, Stamp>);

fn relative(dir: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(dir).unwrap_or(path).to_path_buf()
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .map(|t| match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        })
        .unwrap_or(0)
}

impl DirWatcher {
    pub fn new(dir: &Path) -> Self {
        let mut w = DirWatcher { dir: dir.to_path_buf(), stamps: BTreeMap::new(), polls: 0 };
        w.stamps = w.scan(true);
        w
    }

    /// A watcher that reports changes made since the `load_dir(dir)` that gave `stamps`.
    pub fn from_stamps(dir: &Path, stamps: Stamps) -> Self {
        DirWatcher { dir: dir.to_path_buf(), stamps: stamps.0, polls: 0 }
    }

    /// `true` when any manifest file was added, removed or changed since the last call (or
    /// since `new`).
    pub fn changed(&mut self) -> bool {
        self.polls += 1;
        let stamps = self.scan(self.polls.is_multiple_of(FULL_HASH_EVERY));
        let changed = stamps != self.stamps;
        self.stamps = stamps;
        changed
    }

    /// Fingerprints every file, keyed by path relative to the directory. A file's content is
    /// hashed only when its size or mtime moved, when its mtime is recent, or when `full`:
    /// hashing everything every 250 ms would cost real CPU on a large directory.
    fn scan(&self, full: bool) -> BTreeMap<PathBuf, Stamp> {
        let now = SystemTime::now();
        let (files, _) = list_files(&self.dir);
        let mut out = BTreeMap::new();
        for path in files {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let rel = relative(&self.dir, &path);
            let recent = meta.modified().ok().is_none_or(|t| now.duration_since(t).map_or(true, |age| age < RECENT));
            let (len, mtime_ns) = (meta.len(), mtime_ns(&meta));
            let stamp = match self.stamps.get(&rel) {
                Some(s) if !full && !recent && s.len == len && s.mtime_ns == mtime_ns => s.clone(),
                _ => {
                    let bytes = if meta.len() > MAX_FILE_BYTES { None } else { fs::read(&path).ok() };
                    Stamp::of(&meta, bytes.as_deref())
                }
            };
            out.insert(rel, stamp);
        }
        out
    }
}

fn hash_bytes(bytes: Option<&[u8]>) -> u64 {
    let mut h = DefaultHasher::new();
    match bytes {
        Some(bytes) => h.write(bytes),
        None => h.write_u8(0xff),
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "kproxy-files-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn write(&self, rel: &str, content: &str) -> PathBuf {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, content).unwrap();
            p
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn parse(name: &str, text: &str) -> Snapshot {
        parse_file(Path::new(name), text.as_bytes())
    }
    fn lines(s: &Snapshot) -> Vec<String> {
        s.rejected.iter().map(|r| r.to_string()).collect()
    }
    trait Named {
        fn id(&self) -> String;
    }
    impl Named for ServiceInfo {
        fn id(&self) -> String {
            format!("{}/{}", self.namespace, self.name)
        }
    }
    impl Named for SliceInfo {
        fn id(&self) -> String {
            format!("{}/{}", self.namespace, self.name)
        }
    }
    impl Named for NodeInfo {
        fn id(&self) -> String {
            format!("/{}", self.name)
        }
    }
    fn names<T: Named>(v: &[T]) -> Vec<String> {
        v.iter().map(Named::id).collect()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns1}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n";
    /// `SVC` as JSON.
    const SVC_JSON: &str = "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"web\", \"namespace\": \"ns1\"}, \"spec\": {\"clusterIP\": \"10.0.0.1\", \"ports\": [{\"port\": 80}]}}";

    #[test]
    fn service_cidrs_are_read_and_bad_ones_rejected() {
        let s = parse(
            "m.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [172.30.0.0/16, 'fd00:10:96::/112']}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: bad}\nspec: {cidrs: [172.30.0.0/99]}\n",
        );
        let got: Vec<String> = s.service_cidrs.iter().map(|c| c.to_string()).collect();
        assert_eq!(got, vec!["172.30.0.0/16", "fd00:10:96::/112"]);
        assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
        let line = s.rejected[0].to_string();
        assert!(line.contains("ServiceCIDR") && line.contains("bad") && line.contains("spec.cidrs"), "{line}");
    }

    #[test]
    fn multi_document_yaml_with_empty_and_other_kinds() {
        let text = format!(
            "# leading comment\n---\n{SVC}---\n---\n# only a comment\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: ns1, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [10.1.0.1]}}]\nports: [{{port: 8080}}]\n...\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {{name: node-a, namespace: ignored}}\n"
        );
        let s = parse("m.yaml", &text);
        assert!(s.rejected.is_empty(), "{:?}", lines(&s));
        assert_eq!(names(&s.services), vec!["ns1/web"]);
        assert_eq!(names(&s.slices), vec!["ns1/web-1"]);
        assert_eq!(names(&s.nodes), vec!["/node-a"]);
        // API defaulting: an omitted slice port name is "" and the protocol TCP.
        let p = &s.slices[0].ports[0];
        assert_eq!((p.name.as_str(), p.protocol), ("", rules::model::Protocol::Tcp));
    }

    #[test]
    fn namespace_defaults_to_default() {
        let s = parse("m.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.0.0.1}\n");
        assert_eq!(names(&s.services), vec!["default/web"]);
    }

    #[test]
    fn lists_are_unpacked() {
        let text = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {{name: c}}\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: bad}}\n  spec: {{ports: [{{port: x}}]}}\n",
            serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(SVC).unwrap()).unwrap()
        );
        let s = parse("l.yaml", &text);
        assert_eq!(names(&s.services), vec!["ns1/web"]);
        assert_eq!(lines(&s).len(), 1, "{:?}", lines(&s));
        assert!(
            lines(&s)[0].starts_with(
                "l.yaml: Service default/bad: document 1 (line 1) items[2]: invalid type: string \"x\", expected i32"
            ),
            "{:?}",
            lines(&s)
        );
        let typed = "apiVersion: v1\nkind: ServiceList\nitems: []\n";
        assert!(parse("t.yaml", typed).is_empty());
        let nested = "kind: List\nitems: [{kind: List, items: []}]\n";
        assert!(lines(&parse("n.yaml", nested))[0].contains("nested inside a List"));
    }

    #[test]
    fn json_files() {
        let json = serde_json::to_string_pretty(&serde_yaml::from_str::<serde_json::Value>(SVC).unwrap()).unwrap();
        let s = parse("s.json", &json);
        assert_eq!(names(&s.services), vec!["ns1/web"]);
        let bad = json.replace("80", "\"eighty\"");
        let l = lines(&parse("s.json", &bad));
        assert!(l[0].starts_with("s.json: Service ns1/web: value 1: invalid type: string \"eighty\""), "{l:?}");
        assert!(l[0].contains("at line"), "{l:?}");
        let two = format!("{json}\n{json}");
        let l = lines(&parse("two.json", &two));
        assert!(l[0].contains("duplicate of the object in two.json value 1"), "{l:?}");
        let l = lines(&parse("t.json", "{\"kind\": \"Service\", "));
        assert!(l[0].starts_with("t.json: value 1: not valid JSON"), "{l:?}");
    }

    /// A JSON `List` (what `kubectl get -o json` and the API give): every item is dispatched on
    /// its `kind` wherever that field is, typed from its own text, and an error names the item
    /// and its line and column in the file.
    #[test]
    fn json_lists_name_the_item_and_its_place_in_the_file() {
        let svc = |name: &str, port: &str| {
            format!("  {{\"spec\": {{\"clusterIP\": \"10.0.0.1\", \"ports\": [{{\"port\": {port}}}]}},\n   \"metadata\": {{\"name\": \"{name}\", \"namespace\": \"ns1\"}}, \"kind\": \"Service\"}}")
        };
        let text = format!(
            "{{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\n{},\n{},\n  null, 7, [1], {{\"kind\": 5}},\n  {{\"kind\": \"List\", \"items\": []}}, {{\"kind\": \"ConfigMap\"}}\n]}}",
            svc("a", "80"),
            svc("b", "\"x\"")
        );
        let s = parse("l.json", &text);
        assert_eq!(names(&s.services), vec!["ns1/a"]);
        let l = lines(&s);
        assert_eq!(
            l,
            vec![
                "l.json: Service ns1/b: value 1 items[1]: invalid type: string \"x\", expected i32 at line 4 column 59",
                "l.json: value 1 items[3]: not a Kubernetes object (the document is a scalar, not a mapping)",
                "l.json: value 1 items[4]: not a Kubernetes object (the document is a sequence, not a mapping)",
                "l.json: value 1 items[5]: not a Kubernetes object (no string `kind` field)",
                "l.json: value 1 items[6]: a List nested inside a List is not supported",
            ]
        );
        let line4 = text.lines().nth(3).unwrap();
        assert_eq!(&line4[56..59], "\"x\"", "column 59 is the end of the bad value");
        let l = lines(&parse("i.json", "{\"kind\": \"ServiceList\", \"items\": {\"a\": 1}}"));
        assert_eq!(l, vec!["i.json: value 1: ServiceList.items is not a sequence"]);
        assert!(parse("n.json", "{\"kind\": \"List\", \"items\": null}\nnull").is_empty());
    }

    /// JSON is refused where reading it into a value tree refused it (a repeated key, a number
    /// out of range, an invalid string), in the fields kproxy reads and in those it skips; in a
    /// `List` only the item is refused. Rejections come in file order.
    #[test]
    fn json_is_as_strict_as_a_value_tree() {
        let first = |name: &str, text: &str| lines(&parse(name, text)).first().cloned().unwrap_or_default();
        let l = first("k.json", "{\"kind\": \"Service\", \"kind\": \"ConfigMap\"}\n{\"kind\": \"Service\"}");
        assert_eq!(l, "k.json: value 1: not valid JSON: duplicate key \"kind\" at line 1 column 26");
        assert_eq!(
            lines(&parse("k.json", "{\"kind\": \"Service\", \"kind\": \"ConfigMap\"}\n{}")).len(),
            1,
            "no resuming"
        );
        let svc = "{\"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}, \"spec\": {\"clusterIP\": \"10.0.0.1\", \"clusterIP\": \"10.0.0.2\"}}";
        assert!(first("d.json", svc).contains("not valid JSON: duplicate key \"clusterIP\""));
        let meta = "{\"kind\": \"Service\", \"metadata\": {\"name\": \"a\", \"name\": \"b\"}}";
        assert!(first("m.json", meta).contains("duplicate key \"name\""));
        assert!(first("n.json", "{\"kind\": \"ConfigMap\", \"data\": {\"a\": 1e999}}").contains("number out of range"));
        assert!(first("u.json", "{\"kind\": \"ConfigMap\", \"data\": {\"a\": \"\\ud800\"}}").contains("not valid JSON"));
        let many: Vec<String> = (0..40).map(|i| format!("\"k{}\": 1", i % 39)).collect();
        let many = format!("{{\"kind\": \"ConfigMap\", \"data\": {{{}}}}}", many.join(", "));
        assert!(first("h.json", &many).contains("duplicate key \"k0\""), "found past the short list too");
        // A key with an escape is the same key as its plain spelling, in either order.
        for (a, b) in [("a", "\\u0061"), ("\\u0062", "b"), ("\\u0063", "c\\u0063")] {
            let data = format!("{{\"kind\": \"ConfigMap\", \"data\": {{\"{a}\": 1, \"x\": 2, \"{b}\": 3}}}}");
            let found = first("e.json", &data);
            assert_eq!(a == "\\u0063", !found.contains("duplicate key"), "{data}: {found}");
        }
        let deep = |n: usize| format!("{{\"kind\": \"ConfigMap\", \"data\": {}{}}}", "[".repeat(n), "]".repeat(n));
        assert!(parse("p.json", &deep(100)).is_empty(), "deep but within serde_json's limit");
        assert!(first("p.json", &deep(200)).contains("recursion limit exceeded"));

        // In a List: the item alone, in order with the others.
        let list = format!(
            "{{\"kind\": \"List\", \"items\": [\n  {},\n  1e999,\n  {{\"kind\": \"Service\",\n   \"metadata\": {{\"name\": \"c\"}}, \"spec\": {{\"ports\": [{{\"port\": true}}]}}}},\n  {}\n]}}",
            svc,
            SVC_JSON
        );
        let s = parse("l.json", &list);
        assert_eq!(names(&s.services), vec!["ns1/web"]);
        let l = lines(&s);
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(
            l[0].starts_with("l.json: value 1 items[0]: not valid JSON: duplicate key \"clusterIP\" at line 2"),
            "{l:?}"
        );
        assert!(
            l[1].starts_with("l.json: value 1 items[1]: not valid JSON: number out of range at line 3 column"),
            "{l:?}"
        );
        // An error on an item's second line: the item's own column on that line.
        assert_eq!(l[2], "l.json: Service default/c: value 1 items[2]: invalid type: boolean `true`, expected i32 at line 5 column 62");
        assert_eq!(&list.lines().nth(4).unwrap()[58..62], "true", "column 62 ends the bad value");

        // A value, then a syntax error: the value's rejection first.
        let bad =
            "{\"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}, \"spec\": {\"ports\": [{\"port\": \"x\"}]}}";
        let l = lines(&parse("o.json", &format!("{bad}\n{{\"kind\": ")));
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(l[0].contains("value 1") && l[1].starts_with("o.json: value 2: not valid JSON"), "{l:?}");
    }

    /// Valid objects that are not proxied are counted, and still claim their name.
    #[test]
    fn objects_not_proxied_are_counted_and_claim_their_name() {
        let headless = SVC.replace("clusterIP: 10.0.0.1", "clusterIP: None");
        let fqdn = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: f, namespace: ns1, labels: {kubernetes.io/service-name: web}}\naddressType: FQDN\nendpoints: [{addresses: [a.example]}]\n";
        let s = parse("s.yaml", &format!("{headless}---\n{fqdn}---\n{SVC}"));
        assert_eq!(s.skipped, 2);
        assert!(s.services.is_empty(), "the headless one came first");
        assert!(lines(&s)[0].contains("duplicate of the object in s.yaml document 1"), "{:?}", lines(&s));
    }

    #[test]
    fn a_broken_document_does_not_hide_the_others() {
        let text = format!("{SVC}---\nkind: Service\nmetadata: {{name: [\n---\n{}", SVC.replace("web", "web2"));
        let s = parse("b.yaml", &text);
        assert_eq!(names(&s.services), vec!["ns1/web", "ns1/web2"]);
        let l = lines(&s);
        assert_eq!(l.len(), 1);
        assert!(l[0].starts_with("b.yaml: document 2 (line 5): not valid YAML:"), "{l:?}");
        assert!(l[0].contains("at line 8"), "file-relative line: {l:?}");
    }

    #[test]
    fn typed_errors_name_the_object_field_and_file_line() {
        let text = format!("{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc2, namespace: ns1}}\nspec:\n  ports:\n  - port: abc\n");
        let l = lines(&parse("e.yaml", &text));
        assert_eq!(
            l,
            vec!["e.yaml: Service ns1/svc2: document 2 (line 5): spec.ports[0].port: invalid type: string \"abc\", expected i32 at line 11 column 11"]
        );
        let l =
            lines(&parse("v.yaml", "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n"));
        assert!(l[0].contains("expected discovery.k8s.io/v1"), "{l:?}");
    }

    #[test]
    fn invalid_objects_are_rejected_with_file_and_document() {
        let text = SVC.replace("port: 80", "port: 0");
        let l = lines(&parse("z.yaml", &text));
        assert_eq!(
            l,
            vec!["z.yaml: Service ns1/web: document 1 (line 1): spec.ports[0].port 0 is out of range 1-65535"]
        );
    }

    #[test]
    fn non_objects_and_non_text() {
        let l = lines(&parse("x.yaml", "just some words\n"));
        assert_eq!(
            l,
            vec!["x.yaml: document 1 (line 1): not a Kubernetes object (the document is a scalar, not a mapping)"]
        );
        let l = lines(&parse("x.yaml", "- a\n- b\n"));
        assert!(l[0].contains("a sequence"), "{l:?}");
        let l = lines(&parse("x.yaml", "metadata: {name: a}\n"));
        assert!(l[0].contains("no string `kind` field"), "{l:?}");
        let s = parse_file(Path::new("x.yaml"), &[0xff, 0xfe, 0x00, 0x41]);
        assert_eq!(lines(&s), vec!["x.yaml: not UTF-8 text (invalid byte at offset 0)"]);
        let l = lines(&parse("x.yaml", "a: \u{1}\n"));
        assert!(l[0].contains("not valid YAML"), "{l:?}");
        assert!(parse("e.yaml", "").is_empty());
        assert!(parse("e.yaml", "\u{feff}---\n").is_empty());
    }

    #[test]
    fn split_documents_counts_lines() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- # c\nc: 3\n...\nd: 4\n");
        let got: Vec<(usize, usize, &str)> = docs.iter().map(|d| (d.index, d.first_line, d.text)).collect();
        assert_eq!(
            got,
            vec![(1, 1, "a: 1\n"), (2, 2, "---\nb: 2\n"), (3, 4, "--- # c\nc: 3\n...\n"), (4, 7, "d: 4\n")]
        );
        assert_eq!(split_documents("---\n").len(), 1);
        assert_eq!(split_documents("a: '---'\nb: ---x\n").len(), 1);
    }

    #[test]
    fn load_dir_reads_recursively_sorted_and_skips_hidden_and_other_files() {
        let d = TempDir::new();
        d.write("b.yaml", &SVC.replace("web", "b"));
        d.write("a/z.yml", &SVC.replace("web", "az"));
        d.write("A.YAML", &SVC.replace("web", "upper"));
        d.write(
            "c.json",
            &serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(&SVC.replace("web", "c")).unwrap())
                .unwrap(),
        );
        d.write("notes.txt", "not read");
        d.write(".hidden.yaml", &SVC.replace("web", "hidden"));
        d.write("..2024_01_01/b.yaml", &SVC.replace("web", "b"));
        d.write("garbage.yaml", "{{{");
        let s = load_dir(&d.0);
        assert_eq!(names(&s.services), vec!["ns1/upper", "ns1/az", "ns1/b", "ns1/c"]);
        let l = lines(&s);
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(
            l[0].starts_with(&format!("{}: document 1 (line 1): not valid YAML", d.0.join("garbage.yaml").display())),
            "{l:?}"
        );
    }

    /// Files parsed on several threads are taken in path order: the same objects, the same
    /// duplicates (the first in path order wins) and the same rejections in the same order as
    /// reading them one after the other.
    #[test]
    fn parallel_parsing_gives_what_reading_in_order_gives() {
        let d = TempDir::new();
        for k in 0..40 {
            // Services s0..s6 again and again (each later one a duplicate), a bad document in
            // every fifth file, and an unreadable (non-UTF-8) file among them.
            let mut text = SVC.replace("web", &format!("s{}", k % 7)).replace("10.0.0.1", &format!("10.0.0.{k}"));
            if k % 5 == 0 {
                text.push_str(
                    "---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: x}]}\n",
                );
            }
            d.write(&format!("f{k:02}.yaml"), &text);
        }
        std::fs::write(d.0.join("f17b.yaml"), [0xff, 0xfe]).unwrap();
        // Three threads whatever the machine has (one would not test the merging).
        let s = load_dir_on(&d.0, 3);
        let mut seq = Loader::default();
        let (files, errors) = list_files(&d.0);
        assert!(errors.is_empty());
        for path in &files {
            let mut f = FileLoader::default();
            match read_limited(path, None) {
                Ok(bytes) => f.add_file(path, &bytes),
                Err(reason) => f.reject(Rejected::file(path, reason)),
            }
            seq.take(path, f.found);
        }
        assert_eq!(format!("{:?}", s.services), format!("{:?}", seq.snap.services));
        assert_eq!(lines(&s), lines(&seq.snap));
        // And that is what the files say: s0..s6 from the first seven files, 33 duplicates,
        // 8 bad documents, one unreadable file.
        let ips: Vec<_> = s.services.iter().map(|x| x.ports[0].cluster_ip.to_string()).collect();
        assert_eq!(ips, (0..7).map(|k| format!("10.0.0.{k}")).collect::<Vec<_>>());
        let l = lines(&s);
        assert_eq!(l.iter().filter(|l| l.contains("duplicate of the object in")).count(), 33, "{l:?}");
        assert_eq!(l.iter().filter(|l| l.contains("Service default/bad")).count(), 8, "{l:?}");
        assert_eq!(l.iter().filter(|l| l.contains("not UTF-8")).count(), 1, "{l:?}");
        assert_eq!(l.len(), 42);
    }

    #[test]
    fn duplicates_across_files_keep_the_first() {
        let d = TempDir::new();
        d.write("1.yaml", SVC);
        d.write("2.yaml", &SVC.replace("10.0.0.1", "10.0.0.2"));
        let s = load_dir(&d.0);
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.services[0].ports[0].cluster_ip.to_string(), "10.0.0.1");
        let l = lines(&s);
        assert!(l[0].contains("2.yaml: Service ns1/web: document 1 (line 1): duplicate of the object in"), "{l:?}");
        assert!(l[0].contains("1.yaml document 1"), "{l:?}");
    }

    #[test]
    fn missing_dir_and_oversized_file() {
        let s = load_dir(Path::new("/nonexistent/kproxy-manifests"));
        assert!(lines(&s)[0].starts_with("/nonexistent/kproxy-manifests: cannot read directory"), "{:?}", lines(&s));
        let d = TempDir::new();
        let f = fs::File::create(d.0.join("big.yaml")).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let l = lines(&load_dir(&d.0));
        assert!(l[0].ends_with("big.yaml: larger than the 16 MiB limit for a manifest file"), "{l:?}");
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_end() {
        let d = TempDir::new();
        d.write("sub/s.yaml", SVC);
        std::os::unix::fs::symlink(&d.0, d.0.join("sub/loop")).unwrap();
        let s = load_dir(&d.0);
        assert_eq!(s.services.len(), 1, "{:?}", lines(&s));
    }

    #[test]
    fn dir_watcher_sees_add_modify_same_size_and_delete() {
        let d = TempDir::new();
        d.write("a.yaml", "a: 1\n");
        let mut w = DirWatcher::new(&d.0);
        assert!(!w.changed());
        d.write("a.yaml", "a: 2\n"); // same size, likely the same mtime tick
        assert!(w.changed());
        assert!(!w.changed());
        d.write("sub/b.yml", "b: 1\n");
        assert!(w.changed());
        d.write("ignored.txt", "x");
        assert!(!w.changed(), "non-manifest files are not watched");
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        assert!(w.changed());
        assert!(!w.changed());
    }

    #[test]
    fn a_watcher_started_from_a_loads_stamps_sees_only_what_changed_after_it() {
        let d = TempDir::new();
        d.write("a.yaml", SVC);
        d.write("sub/b.json", "{\"kind\": \"ConfigMap\"}");
        d.write("c.yml", "not: [valid");
        let snap = load_dir(&d.0);
        assert_eq!(snap.stamps.0.len(), 3);
        // The load stamps each file as a watcher reading it would.
        assert_eq!(snap.stamps, Stamps(DirWatcher::new(&d.0).stamps));
        let mut w = DirWatcher::from_stamps(&d.0, snap.stamps);
        assert!(!w.changed());
        d.write("a.yaml", &SVC.replace("web", "api")); // same size
        assert!(w.changed());
        assert!(!w.changed());
        // A load's stamps are of what it read: a write after the load is a change.
        let snap = load_dir(&d.0);
        d.write("sub/b.json", "{\"kind\": \"Secret\"}");
        assert!(DirWatcher::from_stamps(&d.0, snap.stamps).changed());
    }

    #[test]
    fn dir_watcher_rehashes_old_files_periodically() {
        let d = TempDir::new();
        let p = d.write("a.yaml", "a: 1\n");
        let old = SystemTime::now() - Duration::from_secs(3600);
        fs::File::options().write(true).open(&p).unwrap().set_modified(old).unwrap();
        let mut w = DirWatcher::new(&d.0);
        // Rewrite the content and restore the old mtime: only a content hash can tell.
        fs::write(&p, "a: 2\n").unwrap();
        fs::File::options().write(true).open(&p).unwrap().set_modified(old).unwrap();
        let seen = (0..FULL_HASH_EVERY).any(|_| w.changed());
        assert!(seen, "a full re-hash within FULL_HASH_EVERY polls");
    }
}
