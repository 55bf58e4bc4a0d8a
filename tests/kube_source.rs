//! The Kubernetes API source against a fake API server: the real kube client, real HTTP on
//! loopback, no privileges. Each test starts its own fake and its own `source::kube::run`, then
//! drives the fake (objects, disconnects, 410s, errors) and checks the tracker and the events
//! the sync loop would get. Waits are polls with deadlines, never fixed sleeps.

#[path = "support/fakeapi.rs"]
mod fakeapi;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fakeapi::{FakeApi, Request};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kproxy::model::ChangeTracker;
use kproxy::source::kube::{client, run, LABEL_SELECTOR, PAGE_SIZE, TRIGGER_TIME_ANNOTATION};
use kproxy::sync::Event;
use rules::model::{Cidr, Endpoint, Family, Protocol, ServicePortName};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

const NODE: &str = "node-a";
/// How long any one expected thing may take. Generous: retries back off 0.8 s, 1.6 s, ... and
/// CI machines are small.
const DEADLINE: Duration = Duration::from_secs(30);
/// The four collections the source watches.
const RESOURCES: [&str; 4] = ["services", "endpointslices", "servicecidrs", "nodes"];

// ---- fixtures -------------------------------------------------------------------------------

/// A ClusterIP Service `ns/<name>` with one TCP port 80 named "http".
fn service(name: &str, ip: &str) -> Service {
    yaml(&format!(
        "metadata: {{namespace: ns, name: {name}}}
spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, protocol: TCP}}]}}"
    ))
}

/// An IPv4 EndpointSlice `ns/<name>` of Service `service`, port "http" 8080, ready endpoints.
fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    let eps: Vec<String> = ips.iter().map(|ip| format!("{{addresses: [{ip}], conditions: {{ready: true}}}}")).collect();
    yaml(&format!(
        "metadata: {{namespace: ns, name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{}]",
        eps.join(", ")
    ))
}

fn node(name: &str, ip: &str, zone: &str) -> Node {
    yaml(&format!(
        "metadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}
status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}"
    ))
}

fn service_cidr(name: &str, cidrs: &[&str]) -> ServiceCIDR {
    yaml(&format!("metadata: {{name: {name}}}\nspec: {{cidrs: [{}]}}", cidrs.join(", ")))
}

fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_yaml::from_str(s).unwrap_or_else(|e| panic!("fixture: {e}\n{s}"))
}

fn with_label<T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
    mut obj: T,
    key: &str,
    value: &str,
) -> T {
    obj.metadata_mut().labels.get_or_insert_with(Default::default).insert(key.into(), value.into());
    obj
}

fn spn(name: &str) -> ServicePortName {
    ServicePortName::new("ns", name, "http", Protocol::Tcp)
}

/// A cluster with Service `a` (one endpoint), this node, another node and a ServiceCIDR.
fn basic_cluster(fake: &FakeApi) {
    fake.create(&service("a", "172.30.0.10"));
    fake.create(&slice("a-1", "a", &["10.1.0.1"]));
    fake.create(&node(NODE, "192.168.0.2", "z1"));
    fake.create(&node("node-b", "192.168.0.3", "z1"));
    fake.create(&service_cidr("kubernetes", &["172.30.0.0/16"]));
}

// ---- harness ----------------------------------------------------------------------------------

/// `source::kube::run` against a fake, with the tracker and event channel the daemon would hold.
struct Running {
    fake: FakeApi,
    tracker: Arc<Mutex<ChangeTracker>>,
    rx: mpsc::Receiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(fake: FakeApi) -> Running {
        init_logging();
        let client = client(None, Some(&fake.url()), 0.0, 0).await.expect("client for the fake");
        let tracker = Arc::new(Mutex::new(ChangeTracker::new(NODE)));
        // The daemon's channel size.
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(run(client, NODE.to_string(), tracker.clone(), tx));
        Running { fake, tracker, rx, task }
    }

    /// Starts and waits for `Event::Synced`, which must be the first event; then clears the
    /// tracker's pending counts so later checks see only what came after.
    async fn start_synced(fake: FakeApi) -> Running {
        let mut r = Running::start(fake).await;
        assert_eq!(r.next_event().await, "Synced");
        r.tracker().take_pending();
        r
    }

    fn tracker(&self) -> MutexGuard<'_, ChangeTracker> {
        self.tracker.lock().unwrap()
    }

    async fn next_event(&mut self) -> &'static str {
        match tokio::time::timeout(DEADLINE, self.rx.recv()).await {
            Ok(Some(ev)) => name(&ev),
            Ok(None) => panic!("the source stopped"),
            Err(_) => panic!("no event within {DEADLINE:?}"),
        }
    }

    /// Asserts that no event is queued right now.
    fn assert_no_event(&mut self) {
        match self.rx.try_recv() {
            Err(TryRecvError::Empty) => {}
            Ok(ev) => panic!("unexpected event {}", name(&ev)),
            Err(TryRecvError::Disconnected) => panic!("the source stopped"),
        }
    }

    /// Polls the tracker until `cond` holds.
    async fn until_tracker(&self, what: &str, cond: impl Fn(&ChangeTracker) -> bool) {
        until(what, || cond(&self.tracker())).await;
    }

    /// Requests logged since index `from`.
    fn requests_since(&self, from: usize) -> Vec<Request> {
        self.fake.requests().split_off(from)
    }

    /// Waits until every resource has an open watch that was requested after log index `from`:
    /// by then each watcher has handled everything before that watch request (a watcher only
    /// asks for the next thing once its previous event has been consumed).
    async fn until_watching_again(&self, from: usize) {
        until("every resource watched again", || {
            let reqs = self.requests_since(from);
            RESOURCES.iter().all(|r| reqs.iter().any(|q| q.resource() == *r && q.is_watch() && q.status == 200))
                && self.fake.open_watches(None) == RESOURCES.len()
        })
        .await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn name(ev: &Event) -> &'static str {
    match ev {
        Event::Changed => "Changed",
        Event::Synced => "Synced",
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn init_logging() {
    // RUST_LOG=kproxy=debug,kube=debug shows what the source and the client did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn endpoints(t: &ChangeTracker, svc: &str) -> Vec<Endpoint> {
    t.cluster_state(Family::V4).endpoints.get(&spn(svc)).cloned().unwrap_or_default()
}

fn ips(eps: &[Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.ip.to_string()).collect()
}

// ---- tests -------------------------------------------------------------------------------------

// The daemon runs a current-thread runtime; so does this test, with the fake on the same thread.
#[tokio::test]
async fn initial_list_syncs_with_the_right_state_and_the_upstream_selectors() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    // Filtered out by the label selector on the server side, as upstream.
    fake.create(&with_label(service("other-proxy", "172.30.0.20"), "service.kubernetes.io/service-proxy-name", "x"));
    fake.create(&with_label(slice("headless-1", "h", &["10.1.9.9"]), "service.kubernetes.io/headless", ""));
    let r = Running::start_synced(fake).await;
    {
        let t = r.tracker();
        let st = t.cluster_state(Family::V4);
        assert_eq!(st.services.keys().cloned().collect::<Vec<_>>(), vec![spn("a")]);
        assert_eq!(st.services[&spn("a")].cluster_ip.to_string(), "172.30.0.10");
        assert_eq!(endpoints(&t, "a"), vec![Endpoint::ready("10.1.0.1", 8080)]);
        assert_eq!(t.slice_count(), 1, "the headless slice never arrived");
        assert_eq!(t.node().primary_ips, vec!["192.168.0.2".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(t.node().labels.get("topology.kubernetes.io/zone").map(String::as_str), Some("z1"));
        assert_eq!(t.service_cidrs(), &[Cidr::parse("172.30.0.0/16").unwrap()]);
    }

    r.until_watching_again(0).await;
    // What was asked, and how: the label selector on Services, EndpointSlices and ServiceCIDRs,
    // the field selector on Nodes, bounded pages, bookmarks on watches.
    let reqs = r.fake.requests();
    for res in RESOURCES {
        let mine: Vec<&Request> = reqs.iter().filter(|q| q.resource() == res).collect();
        assert!(mine.iter().any(|q| !q.is_watch()), "{res}: no list in {mine:?}");
        assert!(mine.iter().any(|q| q.is_watch()), "{res}: no watch in {mine:?}");
        for q in &mine {
            assert_eq!(q.method, "GET");
            if res == "nodes" {
                assert_eq!(q.param("fieldSelector"), Some("metadata.name=node-a"), "{q:?}");
                assert_eq!(q.param("labelSelector"), None, "{q:?}");
            } else {
                assert_eq!(q.param("labelSelector"), Some(LABEL_SELECTOR), "{q:?}");
            }
            if q.is_watch() {
                assert_eq!(q.param("allowWatchBookmarks"), Some("true"), "{q:?}");
            } else {
                assert_eq!(q.param("limit"), Some(PAGE_SIZE.to_string().as_str()), "{q:?}");
            }
        }
    }
    let paths: std::collections::BTreeSet<&str> = reqs.iter().map(|q| q.path.as_str()).collect();
    assert_eq!(
        paths.into_iter().collect::<Vec<_>>(),
        vec![
            "/api/v1/nodes",
            "/api/v1/services",
            "/apis/discovery.k8s.io/v1/endpointslices",
            "/apis/networking.k8s.io/v1/servicecidrs"
        ],
        "cluster-wide collections only (what the RBAC ClusterRole must allow: list, watch)"
    );
}

#[tokio::test]
async fn creates_updates_and_deletes_stream_into_the_tracker() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    let mut r = Running::start_synced(fake).await;

    r.fake.create(&service("b", "172.30.0.11"));
    let mut s = slice("b-1", "b", &["10.1.1.1"]);
    let trigger = k8s_openapi::jiff::Timestamp::now();
    s.metadata.annotations = Some([(TRIGGER_TIME_ANNOTATION.to_string(), trigger.to_string())].into());
    r.fake.create(&s);
    assert_eq!(r.next_event().await, "Changed");
    r.until_tracker("service b with its endpoint", |t| ips(&endpoints(t, "b")) == ["10.1.1.1"]).await;
    let times = r.tracker().take_trigger_times();
    assert_eq!(times, vec![std::time::SystemTime::from(trigger)], "the slice's trigger time is recorded");

    // Scale up: a second endpoint.
    r.fake.update(&slice("b-1", "b", &["10.1.1.1", "10.1.1.2"]));
    r.until_tracker("b scaled to 2", |t| endpoints(t, "b").len() == 2).await;
    // A second slice of the same Service adds to it.
    r.fake.create(&slice("b-2", "b", &["10.1.1.3"]));
    r.until_tracker("b has 3 endpoints over 2 slices", |t| endpoints(t, "b").len() == 3).await;
    // Cluster IP change.
    r.fake.update(&service("b", "172.30.0.12"));
    r.until_tracker("b moved", |t| {
        t.cluster_state(Family::V4).services.get(&spn("b")).is_some_and(|p| p.cluster_ip.to_string() == "172.30.0.12")
    })
    .await;
    // Delete one slice, then the Service.
    r.fake.delete::<EndpointSlice>("ns", "b-1");
    r.until_tracker("b back to 1 endpoint", |t| ips(&endpoints(t, "b")) == ["10.1.1.3"]).await;
    r.fake.delete::<Service>("ns", "b");
    r.until_tracker("b gone", |t| !t.has_service("ns", "b")).await;
    // ServiceCIDRs: a second one, then the first removed.
    r.fake.create(&service_cidr("v6", &["fd00:10:96::/112"]));
    r.until_tracker("two service CIDRs", |t| t.service_cidrs().len() == 2).await;
    r.fake.delete::<ServiceCIDR>("", "kubernetes");
    r.until_tracker("one service CIDR", |t| t.service_cidrs() == [Cidr::parse("fd00:10:96::/112").unwrap()]).await;

    let p = r.tracker().take_pending();
    assert_eq!((p.services, p.endpoints), (1, 1), "every change above concerned Service b only");
    // Every change was announced: at least one Changed is queued or was received.
    while let Ok(ev) = r.rx.try_recv() {
        assert_eq!(name(&ev), "Changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_the_watch_and_reports_nothing() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    let mut r = Running::start_synced(fake).await;
    // Bookmarks are accepted on the way (and move the resume point forward).
    r.fake.bookmark();

    let from = r.fake.requests().len();
    r.fake.drop_connections();
    r.until_watching_again(from).await;
    let reqs = r.requests_since(from);
    assert!(reqs.iter().all(|q| q.is_watch()), "resumed without a relist: {reqs:?}");
    let now = r.fake.resource_version();
    for q in &reqs {
        let rv: u64 = q.param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(rv > 1 && rv <= now, "resumed from where it was, not from scratch: {q:?}");
    }
    r.assert_no_event();
    assert_eq!(r.tracker().take_pending(), Default::default());

    // And the resumed watches work.
    r.fake.create(&service("c", "172.30.0.13"));
    assert_eq!(r.next_event().await, "Changed");
    r.until_tracker("c", |t| t.has_service("ns", "c")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_relist_that_finds_no_change_reports_nothing() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    let mut r = Running::start_synced(fake).await;

    let from = r.fake.requests().len();
    r.fake.force_410();
    r.until_watching_again(from).await;
    let reqs = r.requests_since(from);
    for res in RESOURCES {
        assert!(reqs.iter().any(|q| q.resource() == res && !q.is_watch()), "{res} relisted: {reqs:?}");
    }
    r.assert_no_event();
    assert_eq!(r.tracker().take_pending(), Default::default());
    assert_eq!(r.tracker().service_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_missed_while_disconnected_is_found_by_the_410_relist() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    fake.create(&service("b", "172.30.0.11"));
    fake.create(&slice("b-1", "b", &["10.1.1.1"]));
    let mut r = Running::start_synced(fake).await;
    assert!(r.tracker().has_service("ns", "b"));

    let from = r.fake.requests().len();
    // The API server goes away; while it is away b is deleted and its history compacted, so
    // the watchers cannot resume and must relist.
    r.fake.set_down(true);
    r.fake.drop_connections();
    r.fake.delete::<EndpointSlice>("ns", "b-1");
    r.fake.delete::<Service>("ns", "b");
    r.fake.update(&slice("a-1", "a", &["10.1.0.1", "10.1.0.2"]));
    r.fake.force_410();
    r.fake.set_down(false);

    assert_eq!(r.next_event().await, "Changed");
    r.until_tracker("b deleted, a scaled", |t| {
        !t.has_service("ns", "b") && !t.has_slice("ns", "b-1") && endpoints(t, "a").len() == 2
    })
    .await;
    let relists = r.requests_since(from).into_iter().filter(|q| !q.is_watch() && q.status == 200).count();
    assert!(relists >= 2, "services and endpointslices were relisted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_throttling_are_retried_until_they_converge() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    // The first requests fail: every watcher's first list gets a 500.
    fake.fail_next(6, 500);
    let mut r = Running::start_synced(fake).await;
    let n500 = r.fake.requests().iter().filter(|q| q.status == 500).count();
    assert_eq!(n500, 6);
    assert_eq!(r.tracker().service_count(), 1);

    // Throttled while reconnecting: 429s (with Retry-After) are retried too.
    let from = r.fake.requests().len();
    r.fake.fail_next(3, 429);
    r.fake.drop_connections();
    r.fake.create(&service("c", "172.30.0.13"));
    assert_eq!(r.next_event().await, "Changed");
    r.until_tracker("c after the 429s", |t| t.has_service("ns", "c")).await;
    let n429 = r.requests_since(from).iter().filter(|q| q.status == 429).count();
    assert_eq!(n429, 3);

    // 500 on a watch start, then a slow server: still converges.
    r.fake.fail_next(2, 500);
    r.fake.set_slow(Duration::from_millis(300));
    r.fake.drop_connections();
    r.fake.update(&slice("a-1", "a", &["10.1.0.1", "10.1.0.5"]));
    r.until_tracker("a scaled through a slow, failing server", |t| endpoints(t, "a").len() == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_service_cidr_api_does_not_block_start_up() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    fake.remove_api::<ServiceCIDR>();
    let r = Running::start_synced(fake).await;
    assert!(r.tracker().service_cidrs().is_empty());
    assert_eq!(r.tracker().service_count(), 1);
    let reqs = r.fake.requests();
    assert!(reqs.iter().any(|q| q.resource() == "servicecidrs" && q.status == 404), "{reqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_lists_come_in_pages() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    // Two full pages and one more object.
    let n = 2 * PAGE_SIZE as usize;
    for i in 0..n {
        fake.create(&service(&format!("s{i:05}"), &format!("172.30.{}.{}", 1 + i / 250, 1 + i % 250)));
    }
    let r = Running::start_synced(fake).await;
    assert_eq!(r.tracker().service_count(), n + 1);
    let lists: Vec<Request> =
        r.fake.requests().into_iter().filter(|q| q.resource() == "services" && !q.is_watch()).collect();
    assert_eq!(lists.len(), 3, "{} services in pages of {PAGE_SIZE}: {lists:?}", n + 1);
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some() && lists[2].param("continue").is_some());
    let limit = PAGE_SIZE.to_string();
    assert!(lists.iter().all(|q| q.param("limit") == Some(limit.as_str()) && q.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_continue_token_restarts_the_list() {
    let fake = FakeApi::start().await;
    // More than one page.
    let n = PAGE_SIZE as usize + 100;
    for i in 0..n {
        fake.create(&service(&format!("s{i:05}"), &format!("172.30.{}.{}", 1 + i / 250, 1 + i % 250)));
    }
    // Slow answers leave time to compact the history between the first and the second page.
    fake.set_slow(Duration::from_millis(500));
    let mut r = Running::start(fake).await;
    until("the first page is asked for", || {
        r.fake.requests().iter().any(|q| q.resource() == "services" && !q.is_watch())
    })
    .await;
    r.fake.force_410();
    r.fake.delete::<Service>("ns", "s00000"); // on the first page, already delivered
    r.fake.set_slow(Duration::ZERO);
    assert_eq!(r.next_event().await, "Synced");
    assert_eq!(r.tracker().service_count(), n - 1);
    assert!(!r.tracker().has_service("ns", "s00000"));
    let lists: Vec<Request> =
        r.fake.requests().into_iter().filter(|q| q.resource() == "services" && !q.is_watch()).collect();
    assert_eq!(lists[1].status, 410, "the continue token expired: {lists:?}");
    assert!(lists[2..].iter().all(|q| q.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_own_node_is_watched() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    let mut r = Running::start_synced(fake).await;

    // Another node's change is filtered by the server; then the own node's change arrives on
    // the same watch, so had the other one come through it would have been handled first.
    r.fake.update(&node("node-b", "192.168.0.3", "z2"));
    r.fake.update(&node(NODE, "192.168.0.2", "z9"));
    assert_eq!(r.next_event().await, "Changed");
    r.until_tracker("own zone label", |t| {
        t.node().labels.get("topology.kubernetes.io/zone").map(String::as_str) == Some("z9")
    })
    .await;
    r.assert_no_event();

    // The own Node deleted and re-created.
    r.fake.delete::<Node>("", NODE);
    assert_eq!(r.next_event().await, "Changed");
    r.until_tracker("own node forgotten", |t| !t.node_known()).await;
    r.fake.create(&node(NODE, "192.168.0.7", "z1"));
    r.until_tracker("own node back", |t| t.node().primary_ips.iter().any(|ip| ip.to_string() == "192.168.0.7")).await;
    let nodes: Vec<Request> = r.fake.requests().into_iter().filter(|q| q.resource() == "nodes").collect();
    assert!(nodes.iter().all(|q| q.param("fieldSelector") == Some("metadata.name=node-a")), "{nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_change_moves_an_object_out_of_and_back_into_view() {
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    let r = Running::start_synced(fake).await;
    // Labelled for another proxy: the watch sees it leave (DELETED), as upstream's informer.
    r.fake.update(&with_label(service("a", "172.30.0.10"), "service.kubernetes.io/service-proxy-name", "other"));
    r.until_tracker("a handed to another proxy", |t| !t.has_service("ns", "a")).await;
    r.fake.update(&service("a", "172.30.0.10"));
    r.until_tracker("a back", |t| t.has_service("ns", "a")).await;
}

#[tokio::test]
async fn api_requests_are_counted_as_client_go_counts_them() {
    // The kubernetes-mixin "Kubernetes / Proxy" API panels read rest_client_requests_total and
    // rest_client_request_duration_seconds: every list and watch must show up there.
    init_logging();
    let fake = FakeApi::start().await;
    basic_cluster(&fake);
    let metrics = Arc::new(kproxy::metrics::Metrics::new("nftables").expect("metrics"));
    let client = kproxy::source::kube::client_with_metrics(None, Some(&fake.url()), 0.0, 0, Some(metrics.clone()))
        .await
        .expect("client for the fake");
    let tracker = Arc::new(Mutex::new(ChangeTracker::new(NODE)));
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(run(client, NODE.to_string(), tracker.clone(), tx));
    match tokio::time::timeout(DEADLINE, rx.recv()).await {
        Ok(Some(ev)) => assert_eq!(name(&ev), "Synced"),
        Ok(None) | Err(_) => panic!("no Synced event within {DEADLINE:?}"),
    }
    let text = metrics.encode().expect("encode");
    let host = fake.url().trim_start_matches("http://").trim_end_matches('/').to_string();
    let ok_gets: f64 = text
        .lines()
        .filter(|l| l.starts_with("rest_client_requests_total{"))
        .filter(|l| l.contains("code=\"200\"") && l.contains("method=\"GET\"") && l.contains(&host))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // Four lists (Services, EndpointSlices, ServiceCIDRs, own Node), then their watches.
    assert!(ok_gets >= 4.0, "expected at least 4 counted GETs to {host}, got {ok_gets}:\n{text}");
    assert!(text.contains("rest_client_request_duration_seconds_count{"), "{text}");
    task.abort();
}
