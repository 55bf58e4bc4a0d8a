//! Owns kproxy's HTTP surface: the health server (`/healthz`, `/livez` on healthzBindAddress) and
//! the metrics server (`/metrics`, `/proxyMode`, `/healthz`, the built-in page and its JSON feed on
//! metricsBindAddress), plus [`Observer`], the sync loop's one handle on the state they publish.
//!
//! Both servers run on a thread and runtime of their own: a sync blocked in the kernel must not
//! stop `/healthz` from saying so.

pub mod health;
pub mod metrics_server;
pub mod service_health;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rules::model::Family;
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::metrics::{Metrics, MetricsError};
use crate::model::{ChangeTracker, Rejected};
use crate::sync::{SyncError, SyncReport};
pub use health::{NodeState, ProxyHealth};

/// Starting the servers failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("building the metrics registry: {0}")]
    Metrics(#[from] MetricsError),
    #[error("{flag} {value:?} is not IP:port")]
    Address { flag: &'static str, value: String },
    #[error("starting the HTTP server thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// After a failed bind, try again this often (upstream retries every 5 s as well).
const BIND_RETRY: Duration = Duration::from_secs(5);
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this, so idle keep-alive clients cannot pile up.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// Connections served at once per server; more are closed at once (scrapers and probes need few).
const MAX_CONNECTIONS: usize = 64;

/// One response, before hyper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Further headers (lower-case names).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status, content_type, body: body.into(), headers: Vec::new() }
    }
    /// Go's `http.NotFound` answer.
    pub fn not_found() -> Self {
        Response::new(404, TEXT, "404 page not found\n")
    }
    pub fn method_not_allowed() -> Self {
        Response::new(405, TEXT, "405 method not allowed\n")
    }
}

pub const TEXT: &str = "text/plain; charset=utf-8";
pub const JSON: &str = "application/json";

/// Routes a request (method and path, without the query) to a response.
pub type Handler = Arc<dyn Fn(&Method, &str) -> Response + Send + Sync>;

fn to_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(r.content_type));
    // As upstream's handlers: never let a browser sniff these bodies into something else.
    h.insert("x-content-type-options", hyper::header::HeaderValue::from_static("nosniff"));
    h.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    for (name, value) in r.headers {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    resp
}

async fn serve_connection(stream: tokio::net::TcpStream, handler: Handler) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let r = handler(req.method(), req.uri().path());
        async move { Ok::<_, Infallible>(to_hyper(r)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    // A timeout just drops the connection; errors are clients going away, worth a debug line.
    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        debug!("HTTP connection ended: {e}");
    }
}

/// Serves `handler` on `addr` forever; a failed bind is logged and retried.
async fn serve_forever(name: &'static str, addr: SocketAddr, handler: Handler) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                error!(%addr, "starting the {name} server: {e}; retrying in {BIND_RETRY:?}");
                tokio::time::sleep(BIND_RETRY).await;
                continue;
            }
        };
        info!(%addr, "serving {name}");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        warn!(%addr, "{name}: {MAX_CONNECTIONS} connections open; closing a new one");
                        continue;
                    };
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        serve_connection(stream, handler).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    warn!(%addr, "{name}: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The sync loop's handle on metrics and health: it reports events and syncs here, and the
/// servers publish what it reported.
pub struct Observer {
    pub metrics: Arc<Metrics>,
    pub health: Arc<ProxyHealth>,
    /// The families the sync loop programs (IPv4 until a sync says otherwise); a change queues an
    /// update for each.
    families: Vec<Family>,
    /// The health check node port servers (cases 76-81).
    pub service_health: service_health::ServiceHealthServers,
}

/// What a sync took from the tracker when it started.
#[derive(Debug, Default)]
pub struct SyncStart {
    trigger_times: Vec<SystemTime>,
}

impl Observer {
    /// Metrics for `cfg`'s mode, health with upstream's timeout of 2 x syncPeriod.
    pub fn new(cfg: &Config) -> Result<Observer, HttpError> {
        let health = Arc::new(ProxyHealth::new(2 * cfg.sync_period));
        Ok(Observer {
            metrics: Arc::new(Metrics::new(cfg.mode.name())?),
            service_health: service_health::ServiceHealthServers::new(health.clone()),
            health,
            families: vec![Family::V4],
        })
    }

    /// Starts both servers on a thread of their own; returns once the thread runs. Bind failures
    /// are logged and retried there, as upstream does, rather than stopping the proxy.
    pub fn start_servers(&self, cfg: &Config) -> Result<(), HttpError> {
        let addr = |flag: &'static str, v: &str| {
            crate::config::parse_bind_address(v).map_err(|_| HttpError::Address { flag, value: v.to_string() })
        };
        let healthz = addr("--healthz-bind-address", &cfg.healthz_bind_address)?;
        let metrics = addr("--metrics-bind-address", &cfg.metrics_bind_address)?;
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            self.metrics.watch_runtime(h);
        }
        let health_handler = health::handler(self.health.clone(), self.metrics.clone());
        let metrics_handler = metrics_server::handler(self.metrics.clone(), self.health.clone());
        std::thread::Builder::new()
            .name("kproxy-http".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return error!("starting the HTTP runtime: {e}; no health or metrics servers"),
                };
                rt.block_on(async move {
                    tokio::spawn(serve_forever("health checks", healthz, health_handler));
                    serve_forever("metrics", metrics, metrics_handler).await;
                });
            })
            .map_err(HttpError::Thread)?;
        Ok(())
    }

    /// The sync loop starts: every family counts as updated now (upstream's SyncLoop does the
    /// same, so that a proxy whose first sync never succeeds still goes unhealthy in time).
    pub fn loop_started(&self) {
        for f in &self.families {
            self.health.updated(*f);
        }
    }

    /// The source changed the tracker (or finished its first listing): queue an update, publish
    /// the pending counts and the Node's eligibility.
    pub fn changed(&self, tracker: &ChangeTracker) {
        for f in &self.families {
            self.health.queued(*f);
        }
        self.metrics.sync_queued(&self.families, SystemTime::now());
        self.metrics.pending(crate::model::Pending {
            services: tracker.pending_service_changes(),
            endpoints: tracker.pending_endpoint_changes(),
        });
        self.node(tracker);
    }

    /// Publishes the Node's eligibility for `/healthz`.
    pub fn node(&self, tracker: &ChangeTracker) {
        let node = if tracker.node_known() {
            NodeState::Known { being_deleted: tracker.node().being_deleted }
        } else {
            NodeState::Unknown
        };
        self.health.set_node(node);
    }

    /// A sync starts from the tracker's current state: take the pending changes and trigger times.
    pub fn sync_starting(&self, tracker: &mut ChangeTracker) -> SyncStart {
        self.metrics.changes_taken(tracker.take_pending());
        for r in tracker.take_rejected() {
            self.metrics.object_rejected(&r);
        }
        SyncStart { trigger_times: tracker.take_trigger_times() }
    }

    /// A sync ended: record it, and mark the families that applied as updated.
    pub fn sync_done(&mut self, result: &Result<SyncReport, SyncError>, started: Instant, start: SyncStart) {
        let report = match result {
            Ok(r) => r,
            Err(e) => &e.report,
        };
        for f in &report.families {
            if !self.families.contains(&f.family) {
                self.families.push(f.family);
            }
            if f.error.is_none() {
                self.health.updated(f.family);
            }
        }
        self.metrics.observe_sync(report, started.elapsed(), &start.trigger_times, SystemTime::now());
    }

    /// An object was skipped as invalid (and logged by the caller).
    pub fn rejected(&self, r: &Rejected) {
        self.metrics.object_rejected(r);
    }
}
