//! A fake Kubernetes API server for tests: real HTTP/1.1 on 127.0.0.1:<random port>, serving list
//! (resourceVersion, limit/continue) and watch (chunked JSON lines, bookmarks, 410 Gone) for the
//! resources kproxy reads, with knobs to misbehave (dropped connections, 500/429 answers, slow
//! answers, a compacted history) and a log of every request for assertions (RBAC coverage).
//!
//! Why plain tokio sockets rather than hyper: the server only answers GETs, and owning the socket
//! makes "drop every connection now" and "close the connection without an answer" exact. The
//! client side is the real kube client, which is what the tests are about.
//!
//! Semantics follow the API server where kproxy depends on them: one global resourceVersion
//! counter; list pages are a consistent snapshot; a watch from resourceVersion N replays every
//! change after N, then streams live; an object that starts or stops matching a watch's
//! selectors arrives as ADDED or DELETED; a resourceVersion older than the last compaction gives
//! 410 Gone (an ERROR event on a watch, a 410 response on a list).

#![allow(dead_code)] // each test file uses a different part

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// One request as the server saw it, with the status it answered (200 for a watch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Decoded query parameters in order.
    pub query: Vec<(String, String)>,
    pub status: u16,
}

impl Request {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }
    /// The resource's plural name, the last path segment of a collection URL.
    pub fn resource(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

/// A handle on a running fake API server; dropping it stops the server and its connections.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

struct Shared {
    state: Mutex<State>,
}

/// A served resource collection, keyed by `(apiVersion, plural)`.
type ResourceKey = (String, String);

#[derive(Default)]
struct State {
    rv: u64,
    /// Resource versions below this are too old (the history before it is compacted away).
    min_rv: u64,
    resources: BTreeMap<ResourceKey, Store>,
    /// Every change since the last compaction, for watches that resume from a resourceVersion.
    history: Vec<Change>,
    watches: Vec<WatchSub>,
    /// Consistent list snapshots behind continue tokens: id → (resourceVersion, items).
    snapshots: HashMap<u64, (u64, Vec<Value>)>,
    next_id: u64,
    /// Status codes to answer the next requests with, one each.
    fail: VecDeque<u16>,
    slow: Duration,
    down: bool,
    log: Vec<Request>,
    conns: Vec<AbortHandle>,
}

struct Store {
    kind: String,
    /// 404 for every request: the API is not served (an older cluster).
    missing: bool,
    objects: BTreeMap<(String, String), Value>,
}

/// One change of one object: `old` absent for a create, `new` absent for a delete.
#[derive(Clone)]
struct Change {
    rv: u64,
    resource: ResourceKey,
    old: Option<Value>,
    new: Option<Value>,
}

struct WatchSub {
    resource: ResourceKey,
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

enum WatchMsg {
    Line(String),
    /// A last line (an ERROR event), then the stream ends.
    End(Option<String>),
}

/// What a list or watch selects: namespace from the URL, label and field selectors.
#[derive(Clone, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Clone)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
}

/// The resources kproxy reads, which `FakeApi::start` serves.
pub trait Served: k8s_openapi::Resource + serde::Serialize {}
impl<K: k8s_openapi::Resource + serde::Serialize> Served for K {}

fn key_of<K: k8s_openapi::Resource>() -> ResourceKey {
    (K::API_VERSION.to_string(), K::URL_PATH_SEGMENT.to_string())
}

impl FakeApi {
    /// Starts a server for Services, EndpointSlices, ServiceCIDRs and Nodes, all empty.
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared { state: Mutex::new(State { rv: 1, min_rv: 1, ..Default::default() }) });
        {
            let mut st = shared.lock();
            for (key, kind) in [
                (key_of::<Service>(), "Service"),
                (key_of::<EndpointSlice>(), "EndpointSlice"),
                (key_of::<ServiceCIDR>(), "ServiceCIDR"),
                (key_of::<Node>(), "Node"),
            ] {
                st.resources.insert(key, Store { kind: kind.to_string(), missing: false, objects: BTreeMap::new() });
            }
        }
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let mut st = sh.lock();
                if st.down {
                    drop(sock); // closed without an answer, as a crashed server
                    continue;
                }
                st.conns.retain(|c| !c.is_finished());
                let task = tokio::spawn(serve_conn(sock, sh.clone()));
                st.conns.push(task.abort_handle());
            }
        })
        .abort_handle();
        FakeApi { addr, shared, accept }
    }

    /// `http://127.0.0.1:<port>`, for `--master`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current (last issued) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Creates an object; panics if it exists (a test bug). Returns its resourceVersion.
    pub fn create<K: Served>(&self, obj: &K) -> u64 {
        self.write::<K>(obj, Some(false))
    }

    /// Replaces an existing object; panics if it does not exist.
    pub fn update<K: Served>(&self, obj: &K) -> u64 {
        self.write::<K>(obj, Some(true))
    }

    /// Creates or replaces an object.
    pub fn apply<K: Served>(&self, obj: &K) -> u64 {
        self.write::<K>(obj, None)
    }

    /// Deletes an object (`namespace` empty for cluster-scoped ones); panics if absent.
    pub fn delete<K: Served>(&self, namespace: &str, name: &str) -> u64 {
        let mut st = self.shared.lock();
        let res = key_of::<K>();
        let store = st.resources.get_mut(&res).expect("resource not served");
        let mut old = store
            .objects
            .remove(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("delete: {} {namespace}/{name} does not exist", K::KIND));
        st.rv += 1;
        let rv = st.rv;
        // The DELETED event carries the object at the deletion's resourceVersion.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.publish(Change { rv, resource: res, old: Some(old), new: None });
        rv
    }

    fn write<K: Served>(&self, obj: &K, must_exist: Option<bool>) -> u64 {
        let mut v = serde_json::to_value(obj).expect("serializable object");
        v["apiVersion"] = json!(K::API_VERSION);
        v["kind"] = json!(K::KIND);
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let name = v["metadata"]["name"].as_str().expect("object has metadata.name").to_string();
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        let res = key_of::<K>();
        let store = st.resources.get_mut(&res).expect("resource not served");
        let old = store.objects.insert((ns.clone(), name.clone()), v.clone());
        match (must_exist, &old) {
            (Some(true), None) => panic!("update: {} {ns}/{name} does not exist", K::KIND),
            (Some(false), Some(_)) => panic!("create: {} {ns}/{name} already exists", K::KIND),
            _ => {}
        }
        st.publish(Change { rv, resource: res, old, new: Some(v) });
        rv
    }

    /// Stops serving a resource: every request for it gets 404, as from an API server that does
    /// not have that API (ServiceCIDRs before Kubernetes 1.33).
    pub fn remove_api<K: Served>(&self) {
        self.shared.lock().resources.get_mut(&key_of::<K>()).expect("resource").missing = true;
    }

    /// Compacts the history: every resourceVersion issued so far becomes too old. Open watches
    /// get an ERROR event with a 410 Status and end; a continue token or a watch from an older
    /// resourceVersion gets 410. Clients must relist.
    pub fn force_410(&self) {
        let mut st = self.shared.lock();
        st.rv += 1;
        st.min_rv = st.rv;
        st.history.clear();
        st.snapshots.clear();
        let line = gone_event(st.rv - 1, st.rv);
        for w in st.watches.drain(..) {
            let _ = w.tx.send(WatchMsg::End(Some(line.clone())));
        }
    }

    /// Closes every open connection at once (watches included), as a restarting API server.
    pub fn drop_connections(&self) {
        let mut st = self.shared.lock();
        for c in st.conns.drain(..) {
            c.abort();
        }
        st.watches.clear();
    }

    /// While down, new connections are accepted and closed at once, unanswered.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
    }

    /// The next `n` requests, whatever they are, are answered with `code` (429 with
    /// `Retry-After: 1`).
    pub fn fail_next(&self, n: usize, code: u16) {
        self.shared.lock().fail.extend(std::iter::repeat_n(code, n));
    }

    /// Every answer is delayed by `d` (computed first, then held back).
    pub fn set_slow(&self, d: Duration) {
        self.shared.lock().slow = d;
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allows bookmarks.
    pub fn bookmark(&self) {
        let mut st = self.shared.lock();
        let rv = st.rv;
        st.watches.retain(|w| !w.tx.is_closed());
        for w in st.watches.iter().filter(|w| w.bookmarks) {
            let kind = st.resources[&w.resource].kind.clone();
            let ev = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": w.resource.0, "metadata": {"resourceVersion": rv.to_string()}}});
            let _ = w.tx.send(WatchMsg::Line(ev.to_string()));
        }
    }

    /// Watches currently streaming (of one resource plural, or all with `None`).
    pub fn open_watches(&self, resource: Option<&str>) -> usize {
        let mut st = self.shared.lock();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.iter().filter(|w| resource.is_none_or(|r| w.resource.1 == r)).count()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().log.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Records a change and sends it to the watches it concerns.
    fn publish(&mut self, change: Change) {
        self.watches.retain(|w| !w.tx.is_closed());
        for w in self.watches.iter().filter(|w| w.resource == change.resource) {
            if let Some(line) = event_for(&change, &w.filter) {
                let _ = w.tx.send(WatchMsg::Line(line));
            }
        }
        self.history.push(change);
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The watch event a watcher with `filter` sees for `change`, if any: an object that starts
/// matching is ADDED, one that stops matching is DELETED (as the API server's watch cache does).
fn event_for(change: &Change, filter: &Filter) -> Option<String> {
    let old = change.old.as_ref().filter(|o| filter.matches(o));
    let new = change.new.as_ref().filter(|o| filter.matches(o));
    let (ty, obj) = match (old, new, &change.new) {
        (None, Some(n), _) => ("ADDED", n.clone()),
        (Some(_), Some(n), _) => ("MODIFIED", n.clone()),
        (Some(o), None, None) => ("DELETED", o.clone()),
        (Some(o), None, Some(_)) => {
            let mut o = o.clone();
            o["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", o)
        }
        (None, None, _) => return None,
    };
    Some(json!({"type": ty, "object": obj}).to_string())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn gone_event(asked: u64, oldest: u64) -> String {
    let st = status(410, "Expired", &format!("too old resource version: {asked} ({oldest})"));
    json!({"type": "ERROR", "object": st}).to_string()
}

fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "Unknown",
    }
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if let Some(ns) = &self.namespace {
            if meta["namespace"].as_str().unwrap_or("") != ns {
                return false;
            }
        }
        let label = |k: &str| meta["labels"].get(k).and_then(|v| v.as_str());
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
        });
        let fields_ok = self.fields.iter().all(|(f, eq, v)| {
            let actual = match f.as_str() {
                "metadata.name" => meta["name"].as_str().unwrap_or(""),
                "metadata.namespace" => meta["namespace"].as_str().unwrap_or(""),
                _ => "",
            };
            (actual == v) == *eq
        });
        labels_ok && fields_ok
    }
}

/// Parses the equality-based label selector syntax (`k`, `!k`, `k=v`, `k==v`, `k!=v`).
fn parse_labels(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let req = if let Some(k) = part.strip_prefix('!') {
            LabelReq::NotExists(k.trim().to_string())
        } else if let Some((k, v)) = part.split_once("!=") {
            LabelReq::NotEq(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else if part.contains([' ', '(', ')']) {
            return Err(format!("unsupported label selector term {part:?}"));
        } else {
            LabelReq::Exists(part.to_string())
        };
        out.push(req);
    }
    Ok(out)
}

/// Parses a field selector; only `metadata.name` and `metadata.namespace` are supported (the API
/// server also refuses unknown field labels).
fn parse_fields(s: &str) -> Result<Vec<(String, bool, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (f, eq, v) = if let Some((f, v)) = part.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (f, true, v)
        } else {
            return Err(format!("invalid field selector term {part:?}"));
        };
        if !matches!(f, "metadata.name" | "metadata.namespace") {
            return Err(format!("field label not supported: {f}"));
        }
        out.push((f.to_string(), eq, v.to_string()));
    }
    Ok(out)
}

/// `%XX` and `+` decoding of one query component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What to send back for one request.
enum Answer {
    Full { code: u16, body: String, retry_after: bool },
    Watch { first: Vec<String>, rx: Option<mpsc::UnboundedReceiver<WatchMsg>>, timeout: Duration },
}

impl Answer {
    fn error(code: u16, message: &str) -> Answer {
        Answer::Full { code, body: status(code, reason_of(code), message).to_string(), retry_after: code == 429 }
    }
    fn ok(body: Value) -> Answer {
        Answer::Full { code: 200, body: body.to_string(), retry_after: false }
    }
}

/// Reads requests off one connection and answers them, keep-alive, until the peer closes.
async fn serve_conn(sock: TcpStream, shared: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut content_length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            match r.read_line(&mut h).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    content_length = v.parse().unwrap_or(0);
                } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        if content_length > 0 {
            let mut body = vec![0u8; content_length.min(1 << 20)];
            if r.read_exact(&mut body).await.is_err() {
                return;
            }
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q),
            None => (target.clone(), ""),
        };
        let query: Vec<(String, String)> = query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (decode(k), decode(v)),
                None => (decode(kv), String::new()),
            })
            .collect();

        let (answer, slow) = {
            let mut st = shared.lock();
            let answer = answer(&mut st, &method, &path, &query);
            let code = match &answer {
                Answer::Full { code, .. } => *code,
                Answer::Watch { .. } => 200,
            };
            st.log.push(Request { method: method.clone(), path: path.clone(), query: query.clone(), status: code });
            (answer, st.slow)
        };
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
        let ok = match answer {
            Answer::Full { code, body, retry_after } => {
                let mut head = format!(
                    "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                    reason_of(code),
                    body.len()
                );
                if retry_after {
                    head.push_str("Retry-After: 1\r\n");
                }
                head.push_str("\r\n");
                w.write_all(head.as_bytes()).await.is_ok() && w.write_all(body.as_bytes()).await.is_ok()
            }
            Answer::Watch { first, rx, timeout } => stream_watch(&mut r, &mut w, first, rx, timeout).await,
        };
        if !ok || close {
            return;
        }
    }
}

/// Writes a chunked watch response: the `first` lines, then live events until the watch ends,
/// times out (`timeoutSeconds`), or the client goes away. Returns whether the connection is
/// still usable.
async fn stream_watch(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    first: Vec<String>,
    rx: Option<mpsc::UnboundedReceiver<WatchMsg>>,
    timeout: Duration,
) -> bool {
    async fn chunk(w: &mut tokio::net::tcp::OwnedWriteHalf, line: &str) -> bool {
        let data = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
        w.write_all(data.as_bytes()).await.is_ok()
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if w.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    for line in &first {
        if !chunk(w, line).await {
            return false;
        }
    }
    if let Some(mut rx) = rx {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(WatchMsg::Line(l)) => if !chunk(w, &l).await { return false },
                    Some(WatchMsg::End(last)) => {
                        if let Some(l) = last {
                            if !chunk(w, &l).await { return false }
                        }
                        break;
                    }
                    None => break,
                },
                _ = &mut deadline => break,
                // A watch client never sends; a read returning means it closed the connection.
                _ = r.read(&mut buf) => return false,
            }
        }
    }
    w.write_all(b"0\r\n\r\n").await.is_ok()
}

/// Decides the answer to one request, under the state lock.
fn answer(st: &mut State, method: &str, path: &str, query: &[(String, String)]) -> Answer {
    if let Some(code) = st.fail.pop_front() {
        return Answer::error(code, "injected failure");
    }
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return Answer::error(404, "the server could not find the requested resource"),
    };
    let (namespace, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural),
        _ => return Answer::error(404, "the server could not find the requested resource"),
    };
    let res = (api_version, plural.to_string());
    match st.resources.get(&res) {
        Some(s) if !s.missing => {}
        _ => return Answer::error(404, "the server could not find the requested resource"),
    }
    if method != "GET" {
        return Answer::error(405, "this fake API server only serves GET");
    }
    let labels = match parse_labels(param("labelSelector").unwrap_or("")) {
        Ok(l) => l,
        Err(e) => return Answer::error(400, &e),
    };
    let fields = match parse_fields(param("fieldSelector").unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return Answer::error(400, &e),
    };
    let filter = Filter { namespace, labels, fields };
    let rv_param = param("resourceVersion").filter(|v| !v.is_empty());
    let parse_rv =
        |v: &str| v.parse::<u64>().map_err(|_| Answer::error(400, &format!("invalid resourceVersion {v:?}")));

    if matches!(param("watch"), Some("true" | "1")) {
        let timeout = Duration::from_secs(param("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800));
        let bookmarks = param("allowWatchBookmarks") == Some("true");
        let mut first = Vec::new();
        match rv_param {
            // Unset or "0": synthetic ADDED events for the current state, then live.
            None | Some("0") => {
                for obj in st.resources[&res].objects.values().filter(|o| filter.matches(o)) {
                    first.push(json!({"type": "ADDED", "object": obj}).to_string());
                }
            }
            Some(v) => {
                let rv = match parse_rv(v) {
                    Ok(rv) => rv,
                    Err(a) => return a,
                };
                if rv < st.min_rv {
                    // As the API server: 200, then one ERROR event with a 410 Status.
                    return Answer::Watch { first: vec![gone_event(rv, st.min_rv)], rx: None, timeout };
                }
                for c in st.history.iter().filter(|c| c.rv > rv && c.resource == res) {
                    first.extend(event_for(c, &filter));
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        st.watches.push(WatchSub { resource: res, filter, bookmarks, tx });
        return Answer::Watch { first, rx: Some(rx), timeout };
    }

    // A list.
    let limit = param("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let (snap_rv, items, offset) = if let Some(token) = param("continue").filter(|c| !c.is_empty()) {
        let parsed =
            token.split_once(':').and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
        let Some((id, offset)) = parsed else {
            return Answer::error(400, &format!("invalid continue token {token:?}"));
        };
        match st.snapshots.get(&id) {
            Some((rv, items)) if *rv >= st.min_rv => (*rv, items.clone(), offset),
            _ => {
                return Answer::error(
                    410,
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                )
            }
        }
    } else {
        if let Some(v) = rv_param {
            let rv = match parse_rv(v) {
                Ok(rv) => rv,
                Err(a) => return a,
            };
            if param("resourceVersionMatch") == Some("Exact") && rv < st.min_rv {
                return Answer::error(410, &format!("too old resource version: {rv} ({})", st.min_rv));
            }
        }
        let items: Vec<Value> = st.resources[&res].objects.values().filter(|o| filter.matches(o)).cloned().collect();
        (st.rv, items, 0)
    };
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let page: Vec<Value> = items.get(offset..end).unwrap_or(&[]).to_vec();
    let mut meta = json!({"resourceVersion": snap_rv.to_string()});
    if end < items.len() {
        let id = match param("continue") {
            Some(token) if !token.is_empty() => token.split_once(':').and_then(|(id, _)| id.parse().ok()).unwrap_or(0),
            _ => {
                let id = st.next_id();
                st.snapshots.insert(id, (snap_rv, items.clone()));
                id
            }
        };
        meta["continue"] = json!(format!("{id}:{end}"));
        meta["remainingItemCount"] = json!(items.len() - end);
    }
    let kind = format!("{}List", st.resources[&res].kind);
    Answer::ok(json!({"kind": kind, "apiVersion": res.0, "metadata": meta, "items": page}))
}
