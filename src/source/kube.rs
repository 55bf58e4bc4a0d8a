//! Owns the Kubernetes API source: kube-runtime watchers for Services, EndpointSlices,
//! ServiceCIDRs and this node's Node, converting each object into the shared `ChangeTracker` as
//! it arrives, and building the API client from `--kubeconfig` / `--master` / in-cluster config.
//!
//! Why one loop over four merged watcher streams rather than four tasks: "synced" means every
//! watcher has listed once, and that is easiest to decide where all events pass one place. The
//! tracker lock is only held while one event is converted, never across an await.
//!
//! No object cache is kept here: the tracker's compact model is the only copy. A relist
//! (start-up, 410 Gone, a continue token that expired) is applied object by object as it arrives
//! (an unchanged object is a no-op in the tracker) and, at its end, whatever the tracker still
//! holds of that kind but the relist did not contain is deleted: that is how a deletion missed
//! while disconnected is noticed. A relist that finds nothing new changes nothing and sends no
//! `Event::Changed`, so the sync loop programs nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use rules::model::Cidr;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::model::{ChangeTracker, Rejected};
use crate::sync::Event;

/// Upstream's informer label selector (cmd/kube-proxy/app/server.go): objects of other proxies
/// and headless Services' slices never reach kube-proxy. Upstream sets it on the shared informer
/// factory, so it applies to Services, EndpointSlices and ServiceCIDRs alike; so do we.
pub const LABEL_SELECTOR: &str = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller to when the change it reflects was triggered (RFC 3339);
/// upstream's `network_programming_duration_seconds` is measured from it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Items per list page: big lists come in bounded responses (upstream's informers list everything
/// at once from the watch cache with resourceVersion=0). client-go's pager default, 500, made 40
/// pages at 10k Services x 10k slices, which the default QPS limit (5/s, burst 10) paced into ~8 s
/// of start-up; with 5000 it is 4 pages within the burst (10k x 10 through the fake API server:
/// start-up 11.0 -> 5.0 s, RSS and peak unchanged, the peak being the first sync's).
pub const PAGE_SIZE: u32 = 5000;

/// Why no API client could be built.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("loading kubeconfig {path}: {source}")]
    LoadKubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("--master {url:?} is not a valid URL: {reason}")]
    BadMaster { url: String, reason: String },
    #[error(
        "no API server configured: --kubeconfig and --master are unset, this is not a pod \
         ({in_cluster}), and the default kubeconfig cannot be loaded ({kubeconfig})"
    )]
    NoConfig {
        in_cluster: InClusterError,
        #[source]
        kubeconfig: KubeconfigError,
    },
    #[error("building the API client: {0}")]
    BuildClient(#[source] kube::Error),
}

/// Builds the API client as kube-proxy does: `kubeconfig` if given (with `master` overriding its
/// server URL), else `master` alone (no credentials, as client-go's BuildConfigFromFlags), else the
/// in-cluster service account, else the default kubeconfig (`$KUBECONFIG`, `~/.kube/config`).
///
/// `qps`/`burst` (`clientConnection.qps`/`burst`) bound the request rate: kube has no limiter of
/// its own, so a fixed-window limiter of `burst` requests per `burst / qps` seconds is put in the
/// client's stack (the same average rate and the same burst). `qps <= 0` or `burst == 0` disables
/// it (client-go: a negative QPS means no limit). Watches are long-lived, so in practice this only
/// paces list pages and reconnects.
pub async fn client(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
    qps: f32,
    burst: u32,
) -> Result<Client, KubeSourceError> {
    client_with_metrics(kubeconfig, master, qps, burst, None).await
}

/// [`client`], counting every request in `rest_client_requests_total` and
/// `rest_client_request_duration_seconds` (as client-go does, so the kubernetes-mixin "Kubernetes /
/// Proxy" API panels work) when `metrics` is given.
pub async fn client_with_metrics(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
    qps: f32,
    burst: u32,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> Result<Client, KubeSourceError> {
    let master = master.filter(|m| !m.is_empty()).map(parse_master).transpose()?;
    let mut config = match (kubeconfig, &master) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|source| KubeSourceError::ReadKubeconfig { path: path.to_path_buf(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeSourceError::LoadKubeconfig { path: path.to_path_buf(), source })?
        }
        (None, Some(m)) => m.clone(),
        (None, None) => match kube::Config::incluster() {
            Ok(c) => c,
            Err(in_cluster) => kube::Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .map_err(|kubeconfig| KubeSourceError::NoConfig { in_cluster, kubeconfig })?,
        },
    };
    if let Some(m) = master {
        config.cluster_url = m.cluster_url;
    }
    info!(server = %config.cluster_url, "using the Kubernetes API");
    let host = config.cluster_url.authority().map(|a| a.to_string()).unwrap_or_default();
    let builder = kube::client::ClientBuilder::try_from(config).map_err(KubeSourceError::BuildClient)?;
    // The metrics layer sits inside the limiter: like client-go, request latency excludes the
    // time spent waiting for the rate limiter.
    let builder = builder.with_layer(&RestMetricsLayer { metrics, host });
    Ok(match rate_window(qps, burst) {
        Some((n, per)) => builder.with_layer(&tower::limit::RateLimitLayer::new(n, per)).build(),
        None => builder.build(),
    })
}

/// Counts API requests (method, host, status code, latency to the response headers; a watch
/// counts once, when its stream opens). Status 0 stands for a transport error.
#[derive(Clone)]
struct RestMetricsLayer {
    metrics: Option<Arc<crate::metrics::Metrics>>,
    host: String,
}

impl<S> tower::Layer<S> for RestMetricsLayer {
    type Service = RestMetrics<S>;
    fn layer(&self, inner: S) -> RestMetrics<S> {
        RestMetrics { inner, metrics: self.metrics.clone(), host: self.host.clone() }
    }
}

#[derive(Clone)]
struct RestMetrics<S> {
    inner: S,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    host: String,
}

impl<S, ReqB, ResB> tower::Service<hyper::Request<ReqB>> for RestMetrics<S>
where
    S: tower::Service<hyper::Request<ReqB>, Response = hyper::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<ReqB>) -> Self::Future {
        let method = req.method().to_string();
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let host = self.host.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            if let Some(m) = metrics {
                let code = res.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
                m.rest_request(&method, &host, code, started.elapsed());
            }
            res
        })
    }
}

/// A `kube::Config` for `--master` alone: the URL, no credentials. (Going through `Config::new`
/// names the URL type without a direct dependency on the `http` crate.)
fn parse_master(m: &str) -> Result<kube::Config, KubeSourceError> {
    let bad = |reason: String| KubeSourceError::BadMaster { url: m.to_string(), reason };
    let config = match m.parse() {
        Ok(uri) => kube::Config::new(uri),
        Err(e) => return Err(bad(format!("{e}"))),
    };
    match config.cluster_url.scheme_str() {
        Some("http" | "https") if config.cluster_url.host().is_some() => Ok(config),
        _ => Err(bad("expected http(s)://host[:port]".to_string())),
    }
}

/// `(requests, per window)` for the limiter, or `None` for no limit.
fn rate_window(qps: f32, burst: u32) -> Option<(u64, Duration)> {
    // NaN compares false, so it lands here too.
    if qps.is_nan() || qps <= 0.0 || burst == 0 || !qps.is_finite() {
        return None;
    }
    Some((u64::from(burst), Duration::from_secs_f64(f64::from(burst) / f64::from(qps))))
}

/// Watches the API until `tx` is closed: converts objects into `tracker`, sends `Event::Synced`
/// once every watcher has listed once, then `Event::Changed` whenever the tracker changed.
///
/// Watch errors never end it: each watcher backs off (kube-runtime's default: 0.8 s doubling to
/// 30 s, with jitter, reset after 2 min of health) and retries forever, logging at warn. While
/// the API server is unreachable nothing changes in the tracker, so the kernel keeps its rules.
pub async fn run(client: Client, hostname: String, tracker: Arc<Mutex<ChangeTracker>>, tx: mpsc::Sender<Event>) {
    let labels = watcher::Config { page_size: Some(PAGE_SIZE), ..Default::default() }.labels(LABEL_SELECTOR);
    // A field selector on the name, as upstream: only this node's object is ever sent, so the
    // other nodes' frequent status updates cost nothing.
    let own_node = watcher::Config { page_size: Some(PAGE_SIZE), ..Default::default() }
        .fields(&format!("metadata.name={hostname}"));

    fn watch<K>(api: Api<K>, cfg: watcher::Config, wrap: fn(watcher::Event<K>) -> Update) -> BoxStream<'static, Update>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let kind = wrap(watcher::Event::Init).kind();
        watcher::watcher(api, cfg)
            .default_backoff()
            .map(move |r| match r {
                Ok(ev) => wrap(ev),
                Err(e) => Update::Error(kind, e),
            })
            .boxed()
    }
    let mut updates = stream::select_all([
        watch(Api::<Service>::all(client.clone()), labels.clone(), Update::Service),
        watch(Api::<EndpointSlice>::all(client.clone()), labels.clone(), Update::Slice),
        watch(Api::<ServiceCIDR>::all(client.clone()), labels, Update::ServiceCidr),
        watch(Api::<Node>::all(client), own_node, Update::Node),
    ]);

    let mut source = Source::new(SystemTime::now());
    while let Some(update) = updates.next().await {
        let out = {
            let mut t = tracker.lock().unwrap_or_else(PoisonError::into_inner);
            source.apply(&mut t, update)
        };
        if out.synced {
            info!("all watchers have listed once");
            if tx.send(Event::Synced).await.is_err() {
                return;
            }
        } else if out.changed {
            // A full queue already holds a notification, and the loop reads the tracker when it
            // syncs, so this change is not lost; waiting here would only stall the watchers.
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Event::Changed) {
                return;
            }
        }
    }
}

/// One item of the merged watcher streams. (Variants differ in size; each lives only until it is
/// applied, so boxing would buy nothing.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Update {
    Service(watcher::Event<Service>),
    Slice(watcher::Event<EndpointSlice>),
    ServiceCidr(watcher::Event<ServiceCIDR>),
    Node(watcher::Event<Node>),
    /// A watcher failed; it retries by itself after its backoff.
    Error(Kind, watcher::Error),
}

/// The watched resource kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Services,
    EndpointSlices,
    ServiceCidrs,
    Nodes,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Services, Kind::EndpointSlices, Kind::ServiceCidrs, Kind::Nodes];

    /// The resource's plural name, as in RBAC rules and URLs.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::ServiceCidrs => "servicecidrs",
            Kind::Nodes => "nodes",
        }
    }
}

impl Update {
    fn kind(&self) -> Kind {
        match self {
            Update::Service(_) => Kind::Services,
            Update::Slice(_) => Kind::EndpointSlices,
            Update::ServiceCidr(_) => Kind::ServiceCidrs,
            Update::Node(_) => Kind::Nodes,
            Update::Error(k, _) => *k,
        }
    }
}

/// What applying one update means for the sync loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The tracker changed (only reported once synced: before, the first sync reads it all).
    pub changed: bool,
    /// This update completed the first listing of every kind: send `Event::Synced` now.
    pub synced: bool,
}

/// The watchers' bookkeeping between events: which kinds have listed, the relist in progress per
/// kind, and the small name → CIDRs map of ServiceCIDRs (the tracker only keeps their union).
/// Pure: no I/O, so every relist rule is unit tested with synthetic events.
#[derive(Debug)]
pub struct Source {
    started: SystemTime,
    listed: BTreeSet<Kind>,
    synced: bool,
    /// Per kind, the keys seen since `Init` while a relist is in progress.
    relisting: BTreeMap<Kind, BTreeSet<(String, String)>>,
    /// Whether the relist in progress has changed the tracker so far.
    relist_changed: BTreeMap<Kind, bool>,
    cidrs: BTreeMap<String, Vec<Cidr>>,
    relist_cidrs: BTreeMap<String, Vec<Cidr>>,
    cidr_api_missing_logged: bool,
}

impl Source {
    /// `started`: trigger times before this are not recorded, as upstream (they would measure
    /// how long kproxy was down, not how fast it programs).
    pub fn new(started: SystemTime) -> Self {
        Source {
            started,
            listed: BTreeSet::new(),
            synced: false,
            relisting: BTreeMap::new(),
            relist_changed: BTreeMap::new(),
            cidrs: BTreeMap::new(),
            relist_cidrs: BTreeMap::new(),
            cidr_api_missing_logged: false,
        }
    }

    /// Whether every kind has listed once.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Applies one watcher update to the tracker.
    pub fn apply(&mut self, t: &mut ChangeTracker, update: Update) -> Outcome {
        let kind = update.kind();
        let changed = match update {
            Update::Service(ev) => self.on_event(t, kind, ev, upsert_service, |t, ns, n| t.delete_service(ns, n)),
            Update::Slice(ev) => {
                let started = self.started;
                self.on_event(
                    t,
                    kind,
                    ev,
                    |t, s| {
                        let changed = upsert_slice(t, s);
                        if changed {
                            record_trigger_time(t, &s.metadata, started);
                        }
                        changed
                    },
                    |t, ns, n| t.delete_slice(ns, n),
                )
            }
            Update::ServiceCidr(ev) => self.on_cidr_event(t, ev),
            Update::Node(ev) => self.on_node_event(t, ev),
            Update::Error(kind, e) => {
                self.on_error(kind, &e);
                false
            }
        };
        let was_synced = self.synced;
        self.synced = Kind::ALL.iter().all(|k| self.listed.contains(k));
        Outcome { changed: changed && was_synced, synced: self.synced && !was_synced }
    }

    /// Services and EndpointSlices: upsert as they come, prune at the end of a relist.
    fn on_event<K: kube::Resource>(
        &mut self,
        t: &mut ChangeTracker,
        kind: Kind,
        ev: watcher::Event<K>,
        upsert: impl Fn(&mut ChangeTracker, &K) -> bool,
        delete: impl Fn(&mut ChangeTracker, &str, &str) -> bool,
    ) -> bool {
        match ev {
            watcher::Event::Apply(obj) => upsert(t, &obj),
            watcher::Event::Delete(obj) => {
                let (ns, name) = key(obj.meta());
                delete(t, &ns, &name)
            }
            watcher::Event::Init => {
                self.relisting.insert(kind, BTreeSet::new());
                // A relist that restarts (its continue token expired) keeps what the failed
                // attempt already changed: those upserts are in the tracker and not yet reported.
                self.relist_changed.entry(kind).or_insert(false);
                false
            }
            watcher::Event::InitApply(obj) => {
                let changed = upsert(t, &obj);
                self.relisting.entry(kind).or_default().insert(key(obj.meta()));
                *self.relist_changed.entry(kind).or_default() |= changed;
                false
            }
            watcher::Event::InitDone => {
                let seen = self.relisting.remove(&kind).unwrap_or_default();
                let mut changed = self.relist_changed.remove(&kind).unwrap_or(false);
                let held: Vec<(String, String)> = match kind {
                    Kind::Services => t.service_keys().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
                    _ => t.slice_keys().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
                };
                let gone: Vec<_> = held.into_iter().filter(|k| !seen.contains(k)).collect();
                if !gone.is_empty() {
                    debug!(kind = kind.resource(), count = gone.len(), "objects deleted while not watching");
                }
                for (ns, name) in gone {
                    changed |= delete(t, &ns, &name);
                }
                self.listed.insert(kind);
                changed
            }
        }
    }

    fn on_node_event(&mut self, t: &mut ChangeTracker, ev: watcher::Event<Node>) -> bool {
        let kind = Kind::Nodes;
        match ev {
            watcher::Event::Apply(node) => set_node(t, &node),
            watcher::Event::Delete(node) => t.delete_node(node.metadata.name.as_deref().unwrap_or("")),
            watcher::Event::Init => {
                self.relisting.insert(kind, BTreeSet::new());
                // A relist that restarts (its continue token expired) keeps what the failed
                // attempt already changed: those upserts are in the tracker and not yet reported.
                self.relist_changed.entry(kind).or_insert(false);
                false
            }
            watcher::Event::InitApply(node) => {
                let changed = set_node(t, &node);
                self.relisting.entry(kind).or_default().insert(key(&node.metadata));
                *self.relist_changed.entry(kind).or_default() |= changed;
                false
            }
            watcher::Event::InitDone => {
                let seen = self.relisting.remove(&kind).unwrap_or_default();
                let mut changed = self.relist_changed.remove(&kind).unwrap_or(false);
                let own = t.node().name;
                if !seen.iter().any(|(_, name)| *name == own) {
                    // The own Node is not (or no longer) there; the rules fall back to no node IPs.
                    changed |= t.delete_node(&own);
                }
                self.listed.insert(kind);
                changed
            }
        }
    }

    fn on_cidr_event(&mut self, t: &mut ChangeTracker, ev: watcher::Event<ServiceCIDR>) -> bool {
        match ev {
            watcher::Event::Apply(o) => {
                self.cidrs.insert(o.metadata.name.clone().unwrap_or_default(), cidrs_of(&o));
                t.set_service_cidrs(self.cidrs.values().flatten().copied())
            }
            watcher::Event::Delete(o) => {
                self.cidrs.remove(o.metadata.name.as_deref().unwrap_or(""));
                t.set_service_cidrs(self.cidrs.values().flatten().copied())
            }
            watcher::Event::Init => {
                self.relist_cidrs.clear();
                false
            }
            watcher::Event::InitApply(o) => {
                self.relist_cidrs.insert(o.metadata.name.clone().unwrap_or_default(), cidrs_of(&o));
                false
            }
            watcher::Event::InitDone => {
                self.cidrs = std::mem::take(&mut self.relist_cidrs);
                self.listed.insert(Kind::ServiceCidrs);
                t.set_service_cidrs(self.cidrs.values().flatten().copied())
            }
        }
    }

    fn on_error(&mut self, kind: Kind, e: &watcher::Error) {
        // A cluster older than 1.33 (or with networking.k8s.io/v1 disabled) has no ServiceCIDR
        // API: do not wait for it. Keep retrying, so an upgraded API server is picked up.
        // 403 is treated alike: a ClusterRole written before ServiceCIDRs existed must not stop
        // kproxy from programming anything at all.
        if kind == Kind::ServiceCidrs && matches!(api_code(e), Some(404 | 403)) {
            if !self.cidr_api_missing_logged {
                self.cidr_api_missing_logged = true;
                warn!(
                    "ServiceCIDRs (networking.k8s.io/v1) cannot be listed ({e}); going on without them: \
                     traffic to unallocated cluster IPs is not dropped"
                );
            } else {
                debug!("ServiceCIDRs still cannot be listed: {e}");
            }
            self.listed.insert(kind);
            return;
        }
        warn!(kind = kind.resource(), "watch failed, retrying after backoff: {e}");
    }
}

fn api_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

fn key(meta: &ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// Upserts a Service; a rejected one is logged and counts as a change only if an earlier valid
/// version was dropped because of it (so a relist meeting the same bad object changes nothing).
fn upsert_service(t: &mut ChangeTracker, svc: &Service) -> bool {
    let (ns, name) = key(&svc.metadata);
    let had = t.has_service(&ns, &name);
    t.upsert_service(svc).unwrap_or_else(|r| {
        warn!("skipping {r}");
        t.record_rejected(r);
        had
    })
}

fn upsert_slice(t: &mut ChangeTracker, slice: &EndpointSlice) -> bool {
    let (ns, name) = key(&slice.metadata);
    let had = t.has_slice(&ns, &name);
    t.upsert_slice(slice).unwrap_or_else(|r| {
        warn!("skipping {r}");
        t.record_rejected(r);
        had
    })
}

fn set_node(t: &mut ChangeTracker, node: &Node) -> bool {
    let had = t.node_known();
    t.set_node(node).unwrap_or_else(|r| {
        warn!("skipping {r}");
        t.record_rejected(r);
        had
    })
}

/// Records the slice's trigger time if it has one, after `started` (upstream ignores older
/// ones, and deletions: callers only call this for applied changes).
fn record_trigger_time(t: &mut ChangeTracker, meta: &ObjectMeta, started: SystemTime) {
    let Some(v) = meta.annotations.as_ref().and_then(|a| a.get(TRIGGER_TIME_ANNOTATION)) else {
        return;
    };
    match v.parse::<k8s_openapi::jiff::Timestamp>() {
        Ok(ts) => {
            let at = SystemTime::from(ts);
            if at > started {
                t.record_trigger_time(at);
            }
        }
        Err(e) => debug!(
            namespace = meta.namespace.as_deref().unwrap_or(""),
            name = meta.name.as_deref().unwrap_or(""),
            "ignoring unparsable {TRIGGER_TIME_ANNOTATION} {v:?}: {e}"
        ),
    }
}

/// The valid CIDRs of one ServiceCIDR; a bad one is logged and left out.
fn cidrs_of(o: &ServiceCIDR) -> Vec<Cidr> {
    let name = o.metadata.name.as_deref().unwrap_or("");
    let mut out = Vec::new();
    for s in o.spec.as_ref().and_then(|s| s.cidrs.as_ref()).into_iter().flatten() {
        match Cidr::parse(s) {
            Ok(c) => out.push(c),
            Err(e) => warn!("skipping {}", Rejected::new("ServiceCIDR", "", name, format!("spec.cidrs: {e}"))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::convert::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};
    use rules::model::Family;
    use watcher::Event as W;

    fn svc(name: &str, ip: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{namespace: ns, name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
        ))
        .unwrap()
    }
    fn slice(name: &str, ip: &str, trigger: Option<&str>) -> EndpointSlice {
        let ann = trigger.map(|t| format!(", annotations: {{{TRIGGER_TIME_ANNOTATION}: '{t}'}}")).unwrap_or_default();
        serde_yaml::from_str(&format!(
            "metadata: {{namespace: ns, name: {name}, labels: {{kubernetes.io/service-name: a}}{ann}}}
addressType: IPv4
ports: [{{name: '', port: 80, protocol: TCP}}]
endpoints: [{{addresses: [{ip}]}}]"
        ))
        .unwrap()
    }
    fn node(name: &str, ip: &str) -> Node {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}"
        ))
        .unwrap()
    }
    fn cidr(name: &str, cidrs: &str) -> ServiceCIDR {
        serde_yaml::from_str(&format!("metadata: {{name: {name}}}\nspec: {{cidrs: {cidrs}}}")).unwrap()
    }
    fn status(code: u16) -> watcher::Error {
        let s =
            kube::core::Status::failure("the server could not find the requested resource", "NotFound").with_code(code);
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(s)))
    }

    /// A tracker and source that have listed once: Service `a` with slice `a-1`, node-a, and a
    /// ServiceCIDR.
    fn synced() -> (Source, ChangeTracker) {
        let mut src = Source::new(SystemTime::UNIX_EPOCH);
        let mut t = ChangeTracker::new("node-a");
        let mut outs = Vec::new();
        for u in [
            Update::Service(W::Init),
            Update::Service(W::InitApply(svc("a", "172.30.0.1"))),
            Update::Slice(W::Init),
            Update::Slice(W::InitApply(slice("a-1", "10.0.0.1", None))),
            Update::Service(W::InitDone),
            Update::Slice(W::InitDone),
            Update::Node(W::Init),
            Update::Node(W::InitApply(node("node-a", "192.168.0.2"))),
            Update::Node(W::InitDone),
            Update::ServiceCidr(W::Init),
            Update::ServiceCidr(W::InitApply(cidr("kubernetes", "[172.30.0.0/16]"))),
        ] {
            outs.push(src.apply(&mut t, u));
            assert!(!src.is_synced());
        }
        assert!(outs.iter().all(|o| *o == Outcome::default()), "nothing is reported before synced: {outs:?}");
        let o = src.apply(&mut t, Update::ServiceCidr(W::InitDone));
        assert_eq!(o, Outcome { changed: false, synced: true });
        t.take_pending();
        (src, t)
    }

    fn relist<K>(wrap: fn(W<K>) -> Update, objs: Vec<K>) -> Vec<Update> {
        let mut v = vec![wrap(W::Init)];
        v.extend(objs.into_iter().map(|o| wrap(W::InitApply(o))));
        v.push(wrap(W::InitDone));
        v
    }

    fn apply_all(src: &mut Source, t: &mut ChangeTracker, us: Vec<Update>) -> Vec<Outcome> {
        us.into_iter().map(|u| src.apply(t, u)).collect()
    }

    #[test]
    fn selector_names_the_converter_labels() {
        assert_eq!(LABEL_SELECTOR, format!("!{LABEL_HEADLESS},!{LABEL_SERVICE_PROXY_NAME}"));
    }

    #[test]
    fn first_listing_syncs_once_with_everything_in_the_tracker() {
        let (src, t) = synced();
        assert!(src.is_synced());
        assert_eq!(t.service_count(), 1);
        assert_eq!(t.cluster_state(Family::V4).endpoints.len(), 1);
        assert_eq!(t.node().primary_ips.len(), 1);
        assert_eq!(t.service_cidrs(), &[Cidr::parse("172.30.0.0/16").unwrap()]);
    }

    #[test]
    fn relist_without_change_reports_nothing() {
        let (mut src, mut t) = synced();
        let mut us = relist(Update::Service, vec![svc("a", "172.30.0.1")]);
        us.extend(relist(Update::Slice, vec![slice("a-1", "10.0.0.1", None)]));
        us.extend(relist(Update::Node, vec![node("node-a", "192.168.0.2")]));
        us.extend(relist(Update::ServiceCidr, vec![cidr("kubernetes", "[172.30.0.0/16]")]));
        let outs = apply_all(&mut src, &mut t, us);
        assert!(outs.iter().all(|o| *o == Outcome::default()), "{outs:?}");
        assert_eq!(t.take_pending(), Default::default());
    }

    #[test]
    fn relist_deletes_what_it_no_longer_finds_and_reports_at_its_end() {
        let (mut src, mut t) = synced();
        let outs = apply_all(&mut src, &mut t, relist(Update::Service, vec![svc("b", "172.30.0.2")]));
        assert_eq!(outs.iter().map(|o| o.changed).collect::<Vec<_>>(), vec![false, false, true]);
        assert!(!t.has_service("ns", "a") && t.has_service("ns", "b"));
        let outs = apply_all(&mut src, &mut t, relist(Update::Slice, vec![]));
        assert!(outs.last().unwrap().changed);
        assert_eq!(t.slice_count(), 0);
        let outs = apply_all(&mut src, &mut t, relist(Update::Node, vec![]));
        assert!(outs.last().unwrap().changed);
        assert!(!t.node_known());
        let outs = apply_all(&mut src, &mut t, relist(Update::ServiceCidr, vec![]));
        assert!(outs.last().unwrap().changed);
        assert!(t.service_cidrs().is_empty());
        assert!(outs.iter().all(|o| !o.synced), "Synced is sent once");
    }

    #[test]
    fn a_relist_restarted_midway_still_reports_what_the_first_attempt_changed() {
        let (mut src, mut t) = synced();
        // The first attempt applies the new version, then a continue token expires (410).
        let mut us = vec![Update::Service(W::Init), Update::Service(W::InitApply(svc("a", "172.30.0.9")))];
        us.push(Update::Error(Kind::Services, status(410)));
        us.extend(relist(Update::Service, vec![svc("a", "172.30.0.9")]));
        let outs = apply_all(&mut src, &mut t, us);
        assert!(outs.last().unwrap().changed, "{outs:?}");
        assert!(outs[..outs.len() - 1].iter().all(|o| !o.changed));
    }

    #[test]
    fn watch_events_report_changes_and_no_ops_do_not() {
        let (mut src, mut t) = synced();
        assert!(!src.apply(&mut t, Update::Service(W::Apply(svc("a", "172.30.0.1")))).changed);
        assert!(src.apply(&mut t, Update::Service(W::Apply(svc("b", "172.30.0.2")))).changed);
        assert!(src.apply(&mut t, Update::Service(W::Delete(svc("b", "172.30.0.2")))).changed);
        assert!(!src.apply(&mut t, Update::Service(W::Delete(svc("b", "172.30.0.2")))).changed);
        assert!(src.apply(&mut t, Update::Slice(W::Apply(slice("a-1", "10.0.0.2", None)))).changed);
        assert!(src.apply(&mut t, Update::Node(W::Apply(node("node-a", "192.168.0.3")))).changed);
        assert!(!src.apply(&mut t, Update::Node(W::Apply(node("node-b", "192.168.0.4")))).changed, "other node");
        assert!(src.apply(&mut t, Update::ServiceCidr(W::Apply(cidr("extra", "[fd00::/112]")))).changed);
        assert_eq!(t.service_cidrs().len(), 2);
        assert!(src.apply(&mut t, Update::ServiceCidr(W::Delete(cidr("extra", "[]")))).changed);
        assert!(src.apply(&mut t, Update::Node(W::Delete(node("node-a", "192.168.0.3")))).changed);
    }

    #[test]
    fn a_bad_object_is_a_change_once_and_then_not_again() {
        let (mut src, mut t) = synced();
        let bad = svc("a", "not-an-ip");
        assert!(src.apply(&mut t, Update::Service(W::Apply(bad.clone()))).changed, "the good version is gone");
        assert!(!t.has_service("ns", "a"));
        assert!(!src.apply(&mut t, Update::Service(W::Apply(bad.clone()))).changed);
        let outs = apply_all(&mut src, &mut t, relist(Update::Service, vec![bad]));
        assert!(outs.iter().all(|o| !o.changed), "{outs:?}");
        // A bad CIDR is left out, the good one kept.
        src.apply(&mut t, Update::ServiceCidr(W::Apply(cidr("kubernetes", "[bad, 10.96.0.0/12]"))));
        assert_eq!(t.service_cidrs(), &[Cidr::parse("10.96.0.0/12").unwrap()]);
    }

    #[test]
    fn missing_service_cidr_api_counts_as_listed_empty() {
        let mut src = Source::new(SystemTime::UNIX_EPOCH);
        let mut t = ChangeTracker::new("node-a");
        let mut us = relist(Update::Service, vec![]);
        us.extend(relist(Update::Slice, vec![]));
        us.extend(relist(Update::Node, vec![]));
        us.push(Update::Error(Kind::ServiceCidrs, status(500)));
        let outs = apply_all(&mut src, &mut t, us);
        assert!(outs.iter().all(|o| !o.synced), "a 500 is retried, not taken as an answer");
        assert_eq!(
            src.apply(&mut t, Update::Error(Kind::ServiceCidrs, status(404))),
            Outcome { changed: false, synced: true }
        );
        assert_eq!(src.apply(&mut t, Update::Error(Kind::ServiceCidrs, status(404))), Outcome::default());
        // Other kinds' 404s do not count as listed.
        let mut src = Source::new(SystemTime::UNIX_EPOCH);
        src.apply(&mut t, Update::Error(Kind::Services, status(404)));
        assert!(!src.listed.contains(&Kind::Services));
    }

    #[test]
    fn trigger_times_are_recorded_for_changes_after_start_only() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut src = Source::new(start);
        let mut t = ChangeTracker::new("node-a");
        let before = "2023-11-14T22:13:19Z"; // start - 1 s
        let after = "2023-11-14T22:13:21Z"; // start + 1 s
        src.apply(&mut t, Update::Slice(W::Apply(slice("s", "10.0.0.1", Some(before)))));
        assert!(t.take_trigger_times().is_empty(), "before the tracker started");
        src.apply(&mut t, Update::Slice(W::Apply(slice("s", "10.0.0.2", Some(after)))));
        assert_eq!(t.take_trigger_times(), vec![start + Duration::from_secs(1)]);
        src.apply(&mut t, Update::Slice(W::Apply(slice("s", "10.0.0.2", Some(after)))));
        assert!(t.take_trigger_times().is_empty(), "no change, no measurement");
        src.apply(&mut t, Update::Slice(W::Delete(slice("s", "10.0.0.2", Some(after)))));
        assert!(t.take_trigger_times().is_empty(), "deletions are not measured");
        src.apply(&mut t, Update::Slice(W::Apply(slice("s", "10.0.0.3", Some("yesterday")))));
        assert!(t.take_trigger_times().is_empty());
    }

    #[test]
    fn rate_window_matches_qps_and_burst() {
        assert_eq!(rate_window(5.0, 10), Some((10, Duration::from_secs(2))));
        assert_eq!(rate_window(50.0, 100), Some((100, Duration::from_secs(2))));
        assert_eq!(rate_window(0.0, 10), None);
        assert_eq!(rate_window(-1.0, 10), None);
        assert_eq!(rate_window(5.0, 0), None);
        assert_eq!(rate_window(f32::NAN, 10), None);
    }

    #[tokio::test]
    async fn master_alone_builds_a_client_and_bad_masters_are_named() {
        assert!(client(None, Some("http://127.0.0.1:1"), 5.0, 10).await.is_ok());
        for bad in ["127.0.0.1:6443", "ftp://x", "http://"] {
            let Err(e) = client(None, Some(bad), 5.0, 10).await else { panic!("{bad} accepted") };
            assert!(e.to_string().contains(bad), "{e}");
        }
        let Err(e) = client(Some(Path::new("/nonexistent/kubeconfig")), None, 5.0, 10).await else {
            panic!("a missing kubeconfig accepted")
        };
        assert!(e.to_string().contains("/nonexistent/kubeconfig"), "{e}");
    }
}
