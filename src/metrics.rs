//! Owns kproxy's Prometheus registry: every `kubeproxy_*` metric upstream kube-proxy exports (same
//! names, types, labels and buckets, so existing dashboards and alerts work unchanged), kproxy's own
//! `kproxy_*` metrics, the standard `process_*` metrics, and a short history of recent syncs for
//! the built-in page.
//!
//! There is no global registry: the daemon creates one [`Metrics`] and passes it (in an `Arc`) to
//! whatever records or serves metrics. Every recording method takes plain values, so the sync core
//! stays free of metric code and tests can build a `Metrics` of their own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use rules::model::Family;
use serde::Serialize;

use crate::model::{Pending, Rejected};
use crate::sync::{FamilyReport, SyncReport};

/// Upstream's metric subsystem: every compatibility metric is `kubeproxy_<name>`.
pub const SUBSYSTEM: &str = "kubeproxy";
/// Prefix of kproxy's own metrics.
pub const OWN_PREFIX: &str = "kproxy";
/// How many syncs `/debug/syncs` remembers.
pub const HISTORY_LEN: usize = 240;

/// Building or encoding the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Registering a metric failed (a duplicate or malformed name: a programming error).
    #[error("registering metric {name}: {source}")]
    Register {
        name: String,
        #[source]
        source: prometheus::Error,
    },
    /// Encoding the text exposition failed.
    #[error("encoding metrics: {0}")]
    Encode(#[source] prometheus::Error),
}

/// `ExponentialBuckets(0.001, 2, 15)`: upstream's sync-duration buckets, 1 ms to about 16 s.
pub fn sync_duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 15).expect("valid constant buckets")
}

/// Upstream's network-programming buckets, as `pkg/proxy/metrics` builds them:
/// `LinearBuckets(0.25, 0.25, 2)` (0.25 s, 0.5 s), 1..59 s step 1, 60..115 s step 5,
/// 120..300 s step 30. (There is no 0 bucket: the first linear series starts at 0.25.)
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// client-go's `rest_client_request_duration_seconds` buckets (component-base).
const REST_CLIENT_BUCKETS: [f64; 12] = [0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0];

/// Upstream prefixes the help of ALPHA metrics with the stability level; we keep the same text.
fn alpha(help: &str) -> String {
    format!("[ALPHA] {help}")
}

/// One sync as the built-in page charts it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SyncRecord {
    /// When the sync finished, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub full: bool,
    pub ok: bool,
    pub duration_ms: f64,
    pub build_ms: f64,
    pub diff_ms: f64,
    pub commit_ms: f64,
    /// Netlink messages and bytes sent (all families).
    pub messages: usize,
    pub bytes: usize,
    pub elements_added: usize,
    pub elements_removed: usize,
    /// `IPv4`, `IPv6`: the families this sync covered.
    pub families: Vec<&'static str>,
    /// The first failure, when `ok` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the ruleset of one family holds after a successful sync (for `kproxy_ruleset_objects`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RulesetCounts {
    pub service_ports: usize,
    pub endpoints: usize,
    pub chains: usize,
    pub rules: usize,
    pub sets: usize,
    pub elements: usize,
    /// Service ports with `internalTrafficPolicy: Local` that have usable endpoints, none of them
    /// on this node (upstream `no_local_endpoints_total{traffic_policy="internal"}`).
    pub no_local_internal: usize,
    /// The same for `externalTrafficPolicy: Local`.
    pub no_local_external: usize,
}

impl RulesetCounts {
    fn add(&mut self, o: &RulesetCounts) {
        self.service_ports += o.service_ports;
        self.endpoints += o.endpoints;
        self.chains += o.chains;
        self.rules += o.rules;
        self.sets += o.sets;
        self.elements += o.elements;
        self.no_local_internal += o.no_local_internal;
        self.no_local_external += o.no_local_external;
    }
}

/// The upstream-compatible metrics, by upstream's Go variable names.
struct Upstream {
    sync_proxy_rules_latency: HistogramVec,
    sync_full_proxy_rules_latency: HistogramVec,
    sync_partial_proxy_rules_latency: HistogramVec,
    last_timestamp: GaugeVec,
    last_queued_timestamp: GaugeVec,
    network_programming_latency: HistogramVec,
    endpoint_changes_pending: IntGauge,
    endpoint_changes_total: IntCounter,
    service_changes_pending: IntGauge,
    service_changes_total: IntCounter,
    healthz_total: IntCounterVec,
    livez_total: IntCounterVec,
    no_local_endpoints_total: IntGaugeVec,
    /// nftables mode only, as upstream registers them.
    nftables_sync_failures_total: Option<IntCounter>,
    nftables_cleanup_failures_total: Option<IntCounter>,
    /// iptables mode only, as upstream registers them.
    iptables: Option<UpstreamIptables>,
}

/// upstream's iptables-mode metrics (`IPTablesRestoreFailuresTotal`, ...).
struct UpstreamIptables {
    restore_failures_total: IntCounterVec,
    partial_restore_failures_total: IntCounterVec,
    rules_total: IntGaugeVec,
    rules_last: IntGaugeVec,
}

/// kproxy's own metrics.
struct Own {
    sync_phase_duration: HistogramVec,
    syncs_total: IntCounterVec,
    transaction_messages: HistogramVec,
    transaction_bytes: HistogramVec,
    transaction_elements_total: IntCounterVec,
    objects_rejected_total: IntCounterVec,
    ruleset_objects: IntGaugeVec,
    conntrack_udp_deleted_total: IntCounterVec,
    healthy: IntGaugeVec,
    node_eligible: IntGauge,
    runtime_alive_tasks: IntGauge,
    build_info: IntGaugeVec,
}

/// client-go's REST client metrics, which the "Kubernetes / Proxy" dashboard charts. Recorded by
/// the API source through [`Metrics::rest_request`]; absent with `--manifests`.
struct RestClient {
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
}

/// The standard `process_*` metrics (as Prometheus client libraries export them), read from
/// /proc/self at scrape time.
struct Process {
    cpu_seconds_total: prometheus::Counter,
    resident_memory_bytes: IntGauge,
    virtual_memory_bytes: IntGauge,
    start_time_seconds: Gauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
}

/// The registry and typed handles to every metric kproxy exports. Cheap to share in an `Arc`:
/// every metric is atomic inside.
pub struct Metrics {
    registry: Registry,
    mode: &'static str,
    up: Upstream,
    own: Own,
    rest: RestClient,
    process: Process,
    history: Mutex<VecDeque<SyncRecord>>,
    /// Family syncs so far (the sum of `kproxy_syncs_total`, kept apart for `/debug/syncs`).
    family_syncs: AtomicU64,
    /// Failed family syncs so far (in either mode).
    family_failures: AtomicU64,
    /// Ruleset counts of the last successful sync of each family (for `/debug/syncs`).
    counts: Mutex<[Option<RulesetCounts>; 2]>,
    /// The runtime whose tasks `kproxy_runtime_alive_tasks` counts (the sync loop's).
    runtime: Mutex<Option<tokio::runtime::Handle>>,
}

/// Registers a newly made metric and returns it; either failure keeps the name in the error.
fn reg<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    name: &str,
    made: prometheus::Result<M>,
) -> Result<M, MetricsError> {
    let err = |source| MetricsError::Register { name: name.to_string(), source };
    let m = made.map_err(err)?;
    r.register(Box::new(m.clone())).map_err(err)?;
    Ok(m)
}

fn hist(
    r: &Registry,
    name: &str,
    help: String,
    buckets: Vec<f64>,
    labels: &[&str],
) -> Result<HistogramVec, MetricsError> {
    reg(r, name, HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels))
}

fn counter_vec(r: &Registry, name: &str, help: String, labels: &[&str]) -> Result<IntCounterVec, MetricsError> {
    reg(r, name, IntCounterVec::new(Opts::new(name, help), labels))
}

fn counter(r: &Registry, name: &str, help: String) -> Result<IntCounter, MetricsError> {
    reg(r, name, IntCounter::with_opts(Opts::new(name, help)))
}

fn gauge_vec(r: &Registry, name: &str, help: String, labels: &[&str]) -> Result<GaugeVec, MetricsError> {
    reg(r, name, GaugeVec::new(Opts::new(name, help), labels))
}

fn int_gauge_vec(r: &Registry, name: &str, help: String, labels: &[&str]) -> Result<IntGaugeVec, MetricsError> {
    reg(r, name, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn int_gauge(r: &Registry, name: &str, help: String) -> Result<IntGauge, MetricsError> {
    reg(r, name, IntGauge::with_opts(Opts::new(name, help)))
}

fn up(name: &str) -> String {
    format!("{SUBSYSTEM}_{name}")
}

fn own(name: &str) -> String {
    format!("{OWN_PREFIX}_{name}")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn kind_label(full: bool) -> &'static str {
    if full {
        "full"
    } else {
        "partial"
    }
}

/// The iptables-mode metrics, with upstream's names, help texts and labels.
fn upstream_iptables(r: &Registry) -> Result<UpstreamIptables, MetricsError> {
    Ok(UpstreamIptables {
        restore_failures_total: counter_vec(
            r,
            &up("sync_proxy_rules_iptables_restore_failures_total"),
            alpha("Cumulative proxy iptables restore failures"),
            &["ip_family"],
        )?,
        partial_restore_failures_total: counter_vec(
            r,
            &up("sync_proxy_rules_iptables_partial_restore_failures_total"),
            alpha("Cumulative proxy iptables partial restore failures"),
            &["ip_family"],
        )?,
        rules_total: int_gauge_vec(
            r,
            &up("sync_proxy_rules_iptables_total"),
            alpha("Total number of iptables rules owned by kube-proxy"),
            &["table", "ip_family"],
        )?,
        rules_last: int_gauge_vec(
            r,
            &up("sync_proxy_rules_iptables_last"),
            alpha("Number of iptables rules written by kube-proxy in last sync"),
            &["table", "ip_family"],
        )?,
    })
}

/// upstream's nfacct packet counters (iptables mode, when nfacct works): metric name, help,
/// and the nfacct object the packets are read from.
pub const NFACCT_METRICS: [(&str, &str, &str); 2] = [
    (
        "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
        "packets dropped by iptables to work around conntrack problems",
        rules::iptables::NFACCT_CT_STATE_INVALID_DROPPED,
    ),
    (
        "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
        "Number of packets accepted on nodeports of loopback interface",
        rules::iptables::NFACCT_LOCALHOST_NODEPORTS_ACCEPTED,
    ),
];

/// Reads an nfacct object's packet count (the kernel's, or a fake in tests).
type NfacctReader = fn(&str) -> std::io::Result<u64>;

/// One nfacct counter, read at scrape time as upstream's `nfacctMetricCollector` does: an
/// unlabelled counter, left out of the scrape (and logged) when reading fails.
struct NfacctCollector {
    desc: prometheus::core::Desc,
    object: &'static str,
    read: NfacctReader,
}

impl prometheus::core::Collector for NfacctCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let packets = match (self.read)(self.object) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(counter = self.object, "failed to collect nfacct counter: {e}");
                return Vec::new();
            }
        };
        let mut c = prometheus::proto::Counter::default();
        c.set_value(packets as f64);
        let mut m = prometheus::proto::Metric::default();
        m.set_counter(c);
        let mut mf = prometheus::proto::MetricFamily::default();
        mf.set_name(self.desc.fq_name.clone());
        mf.set_help(self.desc.help.clone());
        mf.set_field_type(prometheus::proto::MetricType::COUNTER);
        mf.set_metric(vec![m]);
        vec![mf]
    }
}

impl Metrics {
    /// Every metric of the proxy mode (`nftables` or `iptables`), registered with no observations. The families' children
    /// of the sync and network-programming histograms exist from the start (IPv4 here, IPv6 once
    /// it is synced), so that dashboards keyed on them (the kubernetes-mixin `instance` variable
    /// reads `kubeproxy_network_programming_duration_seconds_bucket`) see the node at once.
    pub fn new(mode: &'static str) -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let fam = &["ip_family"];
        let up = Upstream {
            sync_proxy_rules_latency: hist(
                &r,
                &up("sync_proxy_rules_duration_seconds"),
                alpha("SyncProxyRules latency in seconds"),
                sync_duration_buckets(),
                fam,
            )?,
            sync_full_proxy_rules_latency: hist(
                &r,
                &up("sync_full_proxy_rules_duration_seconds"),
                alpha("SyncProxyRules latency in seconds for full resyncs"),
                sync_duration_buckets(),
                fam,
            )?,
            sync_partial_proxy_rules_latency: hist(
                &r,
                &up("sync_partial_proxy_rules_duration_seconds"),
                alpha("SyncProxyRules latency in seconds for partial resyncs"),
                sync_duration_buckets(),
                fam,
            )?,
            last_timestamp: gauge_vec(
                &r,
                &up("sync_proxy_rules_last_timestamp_seconds"),
                alpha("The last time proxy rules were successfully synced"),
                fam,
            )?,
            last_queued_timestamp: gauge_vec(
                &r,
                &up("sync_proxy_rules_last_queued_timestamp_seconds"),
                alpha("The last time a sync of proxy rules was queued"),
                fam,
            )?,
            network_programming_latency: hist(
                &r,
                &up("network_programming_duration_seconds"),
                alpha("In Cluster Network Programming Latency in seconds"),
                network_programming_buckets(),
                fam,
            )?,
            endpoint_changes_pending: int_gauge(
                &r,
                &up("sync_proxy_rules_endpoint_changes_pending"),
                alpha("Pending proxy rules Endpoint changes"),
            )?,
            endpoint_changes_total: counter(
                &r,
                &up("sync_proxy_rules_endpoint_changes_total"),
                alpha("Cumulative proxy rules Endpoint changes"),
            )?,
            service_changes_pending: int_gauge(
                &r,
                &up("sync_proxy_rules_service_changes_pending"),
                alpha("Pending proxy rules Service changes"),
            )?,
            service_changes_total: counter(
                &r,
                &up("sync_proxy_rules_service_changes_total"),
                alpha("Cumulative proxy rules Service changes"),
            )?,
            healthz_total: counter_vec(
                &r,
                &up("proxy_healthz_total"),
                alpha("Cumulative proxy healthz HTTP status"),
                &["code"],
            )?,
            livez_total: counter_vec(
                &r,
                &up("proxy_livez_total"),
                alpha("Cumulative proxy livez HTTP status"),
                &["code"],
            )?,
            no_local_endpoints_total: int_gauge_vec(
                &r,
                &up("sync_proxy_rules_no_local_endpoints_total"),
                alpha("Number of services with a Local traffic policy and no endpoints"),
                &["traffic_policy", "ip_family"],
            )?,
            nftables_sync_failures_total: (mode != "iptables")
                .then(|| {
                    counter(
                        &r,
                        &up("sync_proxy_rules_nftables_sync_failures_total"),
                        alpha("Cumulative proxy nftables sync failures"),
                    )
                })
                .transpose()?,
            nftables_cleanup_failures_total: (mode != "iptables")
                .then(|| {
                    counter(
                        &r,
                        &up("sync_proxy_rules_nftables_cleanup_failures_total"),
                        alpha("Cumulative proxy nftables cleanup failures"),
                    )
                })
                .transpose()?,
            iptables: (mode == "iptables").then(|| upstream_iptables(&r)).transpose()?,
        };
        let own = Own {
            sync_phase_duration: hist(
                &r,
                &own("sync_phase_duration_seconds"),
                "Time of one family's sync by phase: build (model to ruleset), diff (ruleset to \
                 transaction) and commit (the kernel transaction)"
                    .into(),
                prometheus::exponential_buckets(0.0001, 2.0, 18).expect("valid constant buckets"),
                &["ip_family", "phase"],
            )?,
            syncs_total: counter_vec(
                &r,
                &own("syncs_total"),
                "Syncs of one family by kind (full, partial) and result (success, failure)".into(),
                &["ip_family", "kind", "result"],
            )?,
            transaction_messages: hist(
                &r,
                &own("transaction_messages"),
                "Netlink messages in one applied nftables transaction (batch begin and end included)".into(),
                prometheus::exponential_buckets(1.0, 4.0, 10).expect("valid constant buckets"),
                fam,
            )?,
            transaction_bytes: hist(
                &r,
                &own("transaction_bytes"),
                "Bytes of one applied nftables transaction".into(),
                prometheus::exponential_buckets(256.0, 4.0, 12).expect("valid constant buckets"),
                fam,
            )?,
            transaction_elements_total: counter_vec(
                &r,
                &own("transaction_elements_total"),
                "Set and map elements added or removed by applied transactions".into(),
                &["ip_family", "op"],
            )?,
            objects_rejected_total: counter_vec(
                &r,
                &own("objects_rejected_total"),
                "Objects skipped as invalid, by kind and reason class; each skip is also logged \
                 once with the object and the full reason"
                    .into(),
                &["kind", "reason"],
            )?,
            ruleset_objects: int_gauge_vec(
                &r,
                &own("ruleset_objects"),
                "Objects in the ruleset of the last successful sync: service_ports, endpoints, \
                 chains, rules, sets, elements"
                    .into(),
                &["ip_family", "object"],
            )?,
            conntrack_udp_deleted_total: counter_vec(
                &r,
                &own("conntrack_udp_entries_deleted_total"),
                "Stale UDP conntrack entries deleted".into(),
                fam,
            )?,
            healthy: int_gauge_vec(
                &r,
                &own("healthy"),
                "1 when the family's proxier is healthy as /livez judges it (no queued change older \
                 than the health timeout), else 0"
                    .into(),
                fam,
            )?,
            node_eligible: int_gauge(
                &r,
                &own("node_eligible"),
                "1 when the own Node is known, not being deleted and not tainted \
                 ToBeDeletedByClusterAutoscaler (the /healthz node check), else 0"
                    .into(),
            )?,
            runtime_alive_tasks: int_gauge(
                &r,
                &own("runtime_alive_tasks"),
                "Tasks alive in the sync loop's async runtime".into(),
            )?,
            build_info: int_gauge_vec(
                &r,
                &own("build_info"),
                "Always 1; labels say which kproxy and which proxy mode".into(),
                &["version", "mode"],
            )?,
        };
        let rest = RestClient {
            requests_total: counter_vec(
                &r,
                "rest_client_requests_total",
                alpha("Number of HTTP requests, partitioned by status code, method, and host."),
                &["code", "method", "host"],
            )?,
            request_duration: hist(
                &r,
                "rest_client_request_duration_seconds",
                alpha("Request latency in seconds. Broken down by verb, and host."),
                REST_CLIENT_BUCKETS.to_vec(),
                &["verb", "host"],
            )?,
        };
        let process = Process {
            cpu_seconds_total: reg(
                &r,
                "process_cpu_seconds_total",
                prometheus::Counter::new(
                    "process_cpu_seconds_total",
                    "Total user and system CPU time spent in seconds.",
                ),
            )?,
            resident_memory_bytes: int_gauge(
                &r,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.".into(),
            )?,
            virtual_memory_bytes: int_gauge(
                &r,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.".into(),
            )?,
            start_time_seconds: reg(
                &r,
                "process_start_time_seconds",
                Gauge::new("process_start_time_seconds", "Start time of the process since unix epoch in seconds."),
            )?,
            open_fds: int_gauge(&r, "process_open_fds", "Number of open file descriptors.".into())?,
            max_fds: int_gauge(&r, "process_max_fds", "Maximum number of open file descriptors.".into())?,
        };
        let m = Metrics {
            registry: r,
            mode,
            up,
            own,
            rest,
            process,
            history: Mutex::new(VecDeque::with_capacity(HISTORY_LEN)),
            family_syncs: AtomicU64::new(0),
            family_failures: AtomicU64::new(0),
            counts: Mutex::new([None, None]),
            runtime: Mutex::new(None),
        };
        m.own.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), mode]).set(1);
        m.touch_family(Family::V4);
        Ok(m)
    }

    /// The proxy mode these metrics describe (`/proxyMode`).
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Counts the tasks of `handle`'s runtime in `kproxy_runtime_alive_tasks` (the servers run
    /// on a runtime of their own, so the caller says which one matters).
    pub fn watch_runtime(&self, handle: tokio::runtime::Handle) {
        *self.runtime.lock().expect("metrics runtime lock") = Some(handle);
    }

    /// Creates the per-family children with zero values, so that the family shows up on dashboards
    /// before its first observation.
    fn touch_family(&self, f: Family) {
        let l = f.label();
        self.up.sync_proxy_rules_latency.with_label_values(&[l]);
        self.up.sync_full_proxy_rules_latency.with_label_values(&[l]);
        self.up.sync_partial_proxy_rules_latency.with_label_values(&[l]);
        self.up.network_programming_latency.with_label_values(&[l]);
        for tp in ["internal", "external"] {
            self.up.no_local_endpoints_total.with_label_values(&[tp, l]);
        }
        self.own.conntrack_udp_deleted_total.with_label_values(&[l]);
        if let Some(i) = &self.up.iptables {
            i.restore_failures_total.with_label_values(&[l]);
            i.partial_restore_failures_total.with_label_values(&[l]);
            for t in ["filter", "nat"] {
                i.rules_total.with_label_values(&[t, l]);
                i.rules_last.with_label_values(&[t, l]);
            }
        }
    }

    /// A sync was requested for these families (a change arrived): `last_queued_timestamp`.
    pub fn sync_queued(&self, families: &[Family], at: SystemTime) {
        for f in families {
            self.up.last_queued_timestamp.with_label_values(&[f.label()]).set(unix_secs(at));
        }
    }

    /// The tracker's pending change counts right now (between syncs).
    pub fn pending(&self, p: Pending) {
        self.up.service_changes_pending.set(p.services as i64);
        self.up.endpoint_changes_pending.set(p.endpoints as i64);
    }

    /// A sync takes the pending changes: they move from the pending gauges to the totals.
    pub fn changes_taken(&self, p: Pending) {
        self.up.service_changes_total.inc_by(p.services as u64);
        self.up.endpoint_changes_total.inc_by(p.endpoints as u64);
        self.pending(Pending::default());
    }

    /// Records one sync: durations, results, transaction sizes, ruleset counts, and on success the
    /// network-programming latency of `trigger_times` (each observed once, under the first family
    /// that synced: the tracker does not say which family a trigger belongs to).
    pub fn observe_sync(&self, report: &SyncReport, elapsed: Duration, trigger_times: &[SystemTime], now: SystemTime) {
        let mut rec = SyncRecord {
            at_ms: now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            full: report.full,
            ok: report.families.iter().all(|f| f.error.is_none()),
            duration_ms: elapsed.as_secs_f64() * 1e3,
            build_ms: report.build.as_secs_f64() * 1e3,
            diff_ms: report.diff.as_secs_f64() * 1e3,
            commit_ms: report.apply.as_secs_f64() * 1e3,
            messages: 0,
            bytes: 0,
            elements_added: 0,
            elements_removed: 0,
            families: Vec::new(),
            error: report.families.iter().find_map(|f| f.error.clone()),
        };
        let mut trigger_times = Some(trigger_times);
        for f in &report.families {
            self.observe_family(f, now, &mut trigger_times);
            rec.messages += f.applied.messages;
            rec.bytes += f.applied.bytes;
            rec.elements_added += f.stats.elements_added;
            rec.elements_removed += f.stats.elements_removed;
            rec.families.push(f.family.label());
        }
        let mut h = self.history.lock().expect("metrics history lock");
        if h.len() == HISTORY_LEN {
            h.pop_front();
        }
        h.push_back(rec);
    }

    fn observe_family(&self, f: &FamilyReport, now: SystemTime, trigger_times: &mut Option<&[SystemTime]>) {
        let l = f.family.label();
        self.touch_family(f.family);
        // As upstream, the duration is observed whether or not the sync succeeded.
        let total = secs(f.build + f.diff + f.apply);
        self.up.sync_proxy_rules_latency.with_label_values(&[l]).observe(total);
        if f.full {
            self.up.sync_full_proxy_rules_latency.with_label_values(&[l]).observe(total);
        } else {
            self.up.sync_partial_proxy_rules_latency.with_label_values(&[l]).observe(total);
        }
        for (phase, d) in [("build", f.build), ("diff", f.diff), ("commit", f.apply)] {
            self.own.sync_phase_duration.with_label_values(&[l, phase]).observe(secs(d));
        }
        let result = if f.error.is_none() { "success" } else { "failure" };
        self.own.syncs_total.with_label_values(&[l, kind_label(f.full), result]).inc();
        self.family_syncs.fetch_add(1, Ordering::Relaxed);
        if let (Some(i), Some(r)) = (&self.up.iptables, &f.iptables) {
            // As upstream, the rule counts are set whether or not the restore then succeeds.
            for (t, n) in &r.rules_total {
                i.rules_total.with_label_values(&[t, l]).set(*n as i64);
            }
            for (t, n) in &r.rules_last {
                i.rules_last.with_label_values(&[t, l]).set(*n as i64);
            }
        }
        if f.error.is_some() {
            self.family_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = &self.up.nftables_sync_failures_total {
                c.inc();
            }
            if let Some(i) = &self.up.iptables {
                i.restore_failures_total.with_label_values(&[l]).inc();
                if f.iptables.as_ref().is_some_and(|r| r.partial) {
                    i.partial_restore_failures_total.with_label_values(&[l]).inc();
                }
            }
            return;
        }
        self.up.last_timestamp.with_label_values(&[l]).set(unix_secs(now));
        if f.applied.messages > 0 {
            self.own.transaction_messages.with_label_values(&[l]).observe(f.applied.messages as f64);
            self.own.transaction_bytes.with_label_values(&[l]).observe(f.applied.bytes as f64);
        }
        self.own.transaction_elements_total.with_label_values(&[l, "add"]).inc_by(f.stats.elements_added as u64);
        self.own.transaction_elements_total.with_label_values(&[l, "delete"]).inc_by(f.stats.elements_removed as u64);
        let c = f.counts;
        for (object, n) in [
            ("service_ports", c.service_ports),
            ("endpoints", c.endpoints),
            ("chains", c.chains),
            ("rules", c.rules),
            ("sets", c.sets),
            ("elements", c.elements),
        ] {
            self.own.ruleset_objects.with_label_values(&[l, object]).set(n as i64);
        }
        self.up.no_local_endpoints_total.with_label_values(&["internal", l]).set(c.no_local_internal as i64);
        self.up.no_local_endpoints_total.with_label_values(&["external", l]).set(c.no_local_external as i64);
        self.counts.lock().expect("metrics counts lock")[family_index(f.family)] = Some(c);
        if let Some(times) = trigger_times.take() {
            let h = self.up.network_programming_latency.with_label_values(&[l]);
            for t in times {
                // A trigger time in the future (clock skew with the API server) counts as 0.
                h.observe(now.duration_since(*t).map(|d| d.as_secs_f64()).unwrap_or(0.0));
            }
        }
    }

    /// An object was skipped as invalid (the caller has logged it).
    pub fn object_rejected(&self, r: &Rejected) {
        self.own.objects_rejected_total.with_label_values(&[r.kind, reason_class(r)]).inc();
    }

    /// Deleting stale chains or sets failed (`nftables_cleanup_failures_total`).
    pub fn cleanup_failed(&self) {
        if let Some(c) = &self.up.nftables_cleanup_failures_total {
            c.inc();
        }
    }

    /// Stale UDP conntrack entries were deleted.
    pub fn conntrack_deleted(&self, family: Family, n: u64) {
        self.own.conntrack_udp_deleted_total.with_label_values(&[family.label()]).inc_by(n);
    }

    /// One API request, as client-go's REST client metrics count it (for the API source).
    pub fn rest_request(&self, method: &str, host: &str, code: u16, took: Duration) {
        self.rest.requests_total.with_label_values(&[&code.to_string(), method, host]).inc();
        self.rest.request_duration.with_label_values(&[method, host]).observe(secs(took));
    }

    /// A `/healthz` answer with this status code.
    pub fn healthz_answered(&self, code: u16) {
        self.up.healthz_total.with_label_values(&[&code.to_string()]).inc();
    }

    /// A `/livez` answer with this status code.
    pub fn livez_answered(&self, code: u16) {
        self.up.livez_total.with_label_values(&[&code.to_string()]).inc();
    }

    /// The health the servers computed, for `kproxy_healthy` and `kproxy_node_eligible`.
    pub fn health(&self, families: &[(Family, bool)], node_eligible: bool) {
        for (f, ok) in families {
            self.own.healthy.with_label_values(&[f.label()]).set(i64::from(*ok));
        }
        self.own.node_eligible.set(i64::from(node_eligible));
    }

    /// The recent syncs, oldest first.
    pub fn history(&self) -> Vec<SyncRecord> {
        self.history.lock().expect("metrics history lock").iter().cloned().collect()
    }

    /// Ruleset counts of the last successful sync, summed over the families.
    pub fn ruleset_counts(&self) -> RulesetCounts {
        let mut total = RulesetCounts::default();
        for c in self.counts.lock().expect("metrics counts lock").iter().flatten() {
            total.add(c);
        }
        total
    }

    /// Pending changes as the gauges show them.
    pub fn pending_now(&self) -> Pending {
        Pending {
            services: self.up.service_changes_pending.get().max(0) as usize,
            endpoints: self.up.endpoint_changes_pending.get().max(0) as usize,
        }
    }

    /// Family syncs and failed family syncs so far (beyond the history window).
    pub fn sync_totals(&self) -> (u64, u64) {
        (self.family_syncs.load(Ordering::Relaxed), self.family_failures.load(Ordering::Relaxed))
    }

    /// Resident memory right now, in bytes (0 when /proc cannot be read).
    pub fn rss_bytes(&self) -> u64 {
        read_process().map(|p| p.rss_bytes).unwrap_or(0)
    }

    /// Registers upstream's nfacct packet counters ([`NFACCT_METRICS`]), read from the kernel at
    /// every scrape. iptables mode calls this once its nfacct objects exist (upstream registers
    /// them in iptables mode and they are empty without nfacct; kproxy leaves them out).
    pub fn register_nfacct(&self) -> Result<(), MetricsError> {
        self.register_nfacct_with(crate::backend::nfacct::packets)
    }

    fn register_nfacct_with(&self, read: NfacctReader) -> Result<(), MetricsError> {
        for (name, help, object) in NFACCT_METRICS {
            let desc = prometheus::core::Desc::new(name.to_string(), alpha(help), Vec::new(), Default::default())
                .map_err(|source| MetricsError::Register { name: name.to_string(), source })?;
            self.registry
                .register(Box::new(NfacctCollector { desc, object, read }))
                .map_err(|source| MetricsError::Register { name: name.to_string(), source })?;
        }
        Ok(())
    }

    /// Refreshes the scrape-time metrics and renders the text exposition format.
    pub fn encode(&self) -> Result<String, MetricsError> {
        self.refresh_process();
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).map_err(MetricsError::Encode)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn refresh_process(&self) {
        if let Some(p) = read_process() {
            // A counter only goes up: add what was spent since the last scrape.
            let delta = p.cpu_seconds - self.process.cpu_seconds_total.get();
            if delta > 0.0 {
                self.process.cpu_seconds_total.inc_by(delta);
            }
            self.process.resident_memory_bytes.set(p.rss_bytes as i64);
            self.process.virtual_memory_bytes.set(p.vsize_bytes as i64);
            self.process.start_time_seconds.set(p.start_time_seconds);
            self.process.open_fds.set(p.open_fds as i64);
            self.process.max_fds.set(p.max_fds as i64);
        }
        if let Some(h) = self.runtime.lock().expect("metrics runtime lock").as_ref() {
            self.own.runtime_alive_tasks.set(h.metrics().num_alive_tasks() as i64);
        }
    }
}

fn family_index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// A bounded label for a rejection reason: the reasons themselves name objects and values, which
/// would make one time series per bad object.
pub fn reason_class(r: &Rejected) -> &'static str {
    let s = r.reason.as_str();
    if r.kind == "file" {
        return "unreadable";
    }
    // Order matters: the more specific words first ("addressType" before "address").
    if s.contains("duplicate") || s.contains("repeats") || s.contains("the same name") {
        "duplicate"
    } else if s.contains("exceed") || s.contains("too long") || s.contains("too many") || s.contains("entries;") {
        "too_large"
    } else if s.contains("addressType") {
        "address_type"
    } else if s.contains("protocol") && s.contains("TCP, UDP or SCTP") {
        "protocol"
    } else if s.contains("port") {
        "port"
    } else if s.contains("IP address") || s.contains("clusterIP") || s.contains("addresses") {
        "address"
    } else if s.contains("metadata.name") || s.contains("metadata.namespace") || s.contains("label") {
        "name"
    } else {
        "other"
    }
}

/// What /proc says about this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// Linux reports /proc times in USER_HZ ticks, which the ABI fixes at 100 on every architecture
/// (unlike the kernel's internal HZ), so no sysconf call is needed.
const USER_HZ: f64 = 100.0;

/// Reads /proc/self; `None` when /proc is not mounted or not Linux's.
pub fn read_process() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    parse_process(&stat, &status, &boot, &limits, open_fds)
}

/// The parsing half of [`read_process`], separate so that it can be tested on fixed text.
pub fn parse_process(stat: &str, status: &str, proc_stat: &str, limits: &str, open_fds: u64) -> Option<ProcessStats> {
    // The command name (field 2) is in parentheses and may contain spaces or ')': split after the
    // last ')'. Fields from there on start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<f64> { f.get(n - 3)?.parse::<f64>().ok() };
    let cpu_seconds = (field(14)? + field(15)?) / USER_HZ;
    let start_ticks = field(22)?;
    let vsize_bytes = field(23)? as u64;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let btime: f64 = proc_stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l["Max open files".len()..].split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some(ProcessStats {
        cpu_seconds,
        rss_bytes: rss_kb * 1024,
        vsize_bytes,
        start_time_seconds: btime + start_ticks / USER_HZ,
        open_fds,
        max_fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nftables::ApplyStats;
    use rules::transaction::TxStats;

    fn report(full: bool, error: Option<&str>) -> SyncReport {
        let fr = FamilyReport {
            family: Family::V4,
            full,
            stats: TxStats { ops: 3, elements_added: 2, elements_removed: 1, rules_added: 0 },
            applied: ApplyStats { messages: 5, bytes: 700 },
            build: Duration::from_millis(2),
            diff: Duration::from_millis(1),
            apply: Duration::from_millis(4),
            counts: RulesetCounts {
                service_ports: 1,
                endpoints: 2,
                chains: 9,
                rules: 20,
                sets: 4,
                elements: 7,
                no_local_internal: 1,
                no_local_external: 0,
            },
            error: error.map(String::from),
            iptables: None,
            commits: 0,
            longest_commit: Duration::ZERO,
        };
        SyncReport { full, build: fr.build, diff: fr.diff, apply: fr.apply, families: vec![fr], ..Default::default() }
    }

    /// `name{labels} value` lines of one metric in the exposition text.
    fn samples(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .map(String::from)
            .collect()
    }

    #[test]
    fn buckets_match_upstream() {
        let b = sync_duration_buckets();
        assert_eq!(b.len(), 15);
        assert_eq!(b[0], 0.001);
        assert!((b[14] - 16.384).abs() < 1e-9);
        let n = network_programming_buckets();
        assert_eq!(&n[..3], &[0.25, 0.5, 1.0]);
        assert_eq!(n.len(), 2 + 59 + 12 + 7);
        assert!(n.contains(&59.0) && n.contains(&60.0) && n.contains(&115.0) && n.contains(&120.0));
        assert_eq!(*n.last().unwrap(), 300.0);
        assert!(n.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_fresh_registry_exports_every_upstream_family_with_types() {
        let m = Metrics::new("nftables").unwrap();
        let text = m.encode().unwrap();
        for (name, ty) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
            ("kubeproxy_sync_full_proxy_rules_duration_seconds", "histogram"),
            ("kubeproxy_sync_partial_proxy_rules_duration_seconds", "histogram"),
            ("kubeproxy_network_programming_duration_seconds", "histogram"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", "counter"),
            ("kubeproxy_sync_proxy_rules_service_changes_pending", "gauge"),
            ("kubeproxy_sync_proxy_rules_service_changes_total", "counter"),
            ("kubeproxy_sync_proxy_rules_no_local_endpoints_total", "gauge"),
            ("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "counter"),
            ("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", "counter"),
            ("process_cpu_seconds_total", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("kproxy_build_info", "gauge"),
        ] {
            assert!(text.contains(&format!("# TYPE {name} {ty}\n")), "{name} {ty} missing:\n{text}");
        }
        assert!(text.contains(
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds\n"
        ));
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.25\"} 0\n")
        );
        assert!(text.contains(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 0\n"
        ));
    }

    #[test]
    fn a_sync_is_recorded_per_family_and_in_the_history() {
        let m = Metrics::new("nftables").unwrap();
        let now = SystemTime::now();
        m.pending(Pending { services: 2, endpoints: 3 });
        m.changes_taken(Pending { services: 2, endpoints: 3 });
        let trig = [now - Duration::from_millis(1500)];
        m.observe_sync(&report(true, None), Duration::from_millis(8), &trig, now);
        m.observe_sync(&report(false, Some("boom")), Duration::from_millis(8), &[], now);
        let t = m.encode().unwrap();
        assert_eq!(
            samples(&t, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            ["kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2"]
        );
        assert_eq!(
            samples(&t, "kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
            ["kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1"]
        );
        assert_eq!(
            samples(&t, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"),
            ["kubeproxy_sync_proxy_rules_nftables_sync_failures_total 1"]
        );
        assert_eq!(
            samples(&t, "kubeproxy_sync_proxy_rules_service_changes_total"),
            ["kubeproxy_sync_proxy_rules_service_changes_total 2"]
        );
        assert_eq!(
            samples(&t, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
            ["kubeproxy_sync_proxy_rules_endpoint_changes_pending 0"]
        );
        // 1.5 s lands in the le="2" bucket, not in le="1".
        assert!(t.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"1\"} 0\n"));
        assert!(t.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"2\"} 1\n"));
        assert!(t.contains("kproxy_syncs_total{ip_family=\"IPv4\",kind=\"partial\",result=\"failure\"} 1\n"));
        assert!(t.contains("kproxy_transaction_messages_sum{ip_family=\"IPv4\"} 5\n"));
        assert!(t.contains("kproxy_transaction_elements_total{ip_family=\"IPv4\",op=\"add\"} 2\n"));
        assert!(t.contains("kproxy_ruleset_objects{ip_family=\"IPv4\",object=\"elements\"} 7\n"));
        assert!(t.contains(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 1\n"
        ));
        assert!(t.contains("kproxy_sync_phase_duration_seconds_count{ip_family=\"IPv4\",phase=\"commit\"} 2\n"));
        let last = samples(&t, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
        assert_eq!(last.len(), 1, "{last:?}");
        let h = m.history();
        assert_eq!(h.len(), 2);
        assert!(h[0].ok && h[0].full && !h[1].ok);
        assert_eq!(h[1].error.as_deref(), Some("boom"));
        assert_eq!(h[0].messages, 5);
        assert_eq!(m.sync_totals(), (2, 1));
        assert_eq!(m.ruleset_counts().elements, 7);
    }

    /// upstream registers the iptables restore metrics only in iptables mode and the nftables
    /// ones only in nftables mode; both modes export the full/partial sync histograms.
    #[test]
    fn each_mode_exports_its_own_upstream_metrics() {
        let ipt_names = [
            ("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", "counter"),
            ("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", "counter"),
            ("kubeproxy_sync_proxy_rules_iptables_total", "gauge"),
            ("kubeproxy_sync_proxy_rules_iptables_last", "gauge"),
        ];
        let nft_names = [
            ("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "counter"),
            ("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", "counter"),
        ];
        let both = [
            ("kubeproxy_sync_full_proxy_rules_duration_seconds", "histogram"),
            ("kubeproxy_sync_partial_proxy_rules_duration_seconds", "histogram"),
        ];
        let m = Metrics::new("iptables").unwrap();
        assert_eq!(m.mode(), "iptables");
        let t = m.encode().unwrap();
        for (name, ty) in ipt_names.iter().chain(&both) {
            assert!(t.contains(&format!("# TYPE {name} {ty}\n")), "iptables mode: {name} {ty} missing:\n{t}");
        }
        for (name, _) in nft_names {
            assert!(!t.contains(name), "iptables mode exports {name}");
        }
        assert!(t.contains("kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 0\n"));
        assert!(t.contains("kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 0\n"));
        let t = Metrics::new("nftables").unwrap().encode().unwrap();
        for (name, ty) in nft_names.iter().chain(&both) {
            assert!(t.contains(&format!("# TYPE {name} {ty}\n")), "nftables mode: {name} {ty} missing");
        }
        for (name, _) in ipt_names {
            assert!(!t.contains(name), "nftables mode exports {name}");
        }

        // A partial restore that fails counts in both failure counters; the rule counts are set.
        let mut r = report(false, Some("iptables-restore: line 3 failed"));
        r.families[0].iptables = Some(crate::sync::IptablesReport {
            partial: true,
            rules_total: vec![("filter", 7), ("nat", 40)],
            rules_last: vec![("filter", 7), ("nat", 12)],
        });
        m.observe_sync(&r, Duration::from_millis(3), &[], SystemTime::now());
        let mut r = report(true, Some("iptables-restore: line 9 failed"));
        r.families[0].iptables = Some(crate::sync::IptablesReport { partial: false, ..Default::default() });
        m.observe_sync(&r, Duration::from_millis(3), &[], SystemTime::now());
        let t = m.encode().unwrap();
        assert!(
            t.contains("kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"} 1\n")
        );
        assert!(t.contains("kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 40\n"));
        assert!(t.contains("kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"nat\"} 12\n"));
        assert_eq!(m.sync_totals(), (2, 2));
    }

    /// The nfacct counters are absent until registered, then read at every scrape (a counter
    /// with upstream's name and help, no labels); one that cannot be read is left out.
    #[test]
    fn nfacct_counters_are_read_at_scrape_time() {
        use std::sync::atomic::AtomicU64;
        static SCRAPES: AtomicU64 = AtomicU64::new(0);
        fn fake(object: &str) -> std::io::Result<u64> {
            match object {
                "ct_state_invalid_dropped_pkts" => Ok(40 + SCRAPES.fetch_add(1, Ordering::SeqCst)),
                _ => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
            }
        }
        let ct = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total";
        let lo = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total";
        let m = Metrics::new("iptables").unwrap();
        assert!(!m.encode().unwrap().contains(ct));
        m.register_nfacct_with(fake).unwrap();
        let t = m.encode().unwrap();
        assert!(
            t.contains(&format!(
                "# HELP {ct} [ALPHA] packets dropped by iptables to work around conntrack problems\n# TYPE {ct} counter\n{ct} 40\n"
            )),
            "{t}"
        );
        assert!(!t.contains(lo), "an unreadable counter is left out:\n{t}");
        assert!(m.encode().unwrap().contains(&format!("\n{ct} 41\n")), "read again at the next scrape");
        assert!(m.register_nfacct_with(fake).is_err(), "registering twice is a programming error");
    }

    #[test]
    fn history_is_bounded() {
        let m = Metrics::new("nftables").unwrap();
        for _ in 0..HISTORY_LEN + 10 {
            m.observe_sync(&report(false, None), Duration::from_millis(1), &[], SystemTime::now());
        }
        assert_eq!(m.history().len(), HISTORY_LEN);
    }

    #[test]
    fn rejected_objects_get_a_bounded_reason_class() {
        let r = |kind, reason: &str| Rejected::new(kind, "ns", "n", reason);
        let cases = [
            (r("Service", "spec.ports[0].port 0 is out of range 1-65535"), "port"),
            (r("Service", "spec.clusterIP \"x\" is not an IP address"), "address"),
            (r("Service", "spec.ports[0].protocol \"ICMP\" is not TCP, UDP or SCTP"), "protocol"),
            (r("EndpointSlice", "addressType \"X\" is not IPv4, IPv6 or FQDN"), "address_type"),
            (r("EndpointSlice", "1001 endpoints exceed the API limit of 1000"), "too_large"),
            (r("Service", "metadata.name \"a;b\" is not a valid DNS-1123 label"), "name"),
            (r("Service", "duplicate object with the same namespace and name; the first one is used"), "duplicate"),
            (r("EndpointSlice", "missing label kubernetes.io/service-name"), "name"),
            (Rejected::file("/m/x.yaml", "not UTF-8"), "unreadable"),
            (r("Service", "document 2: something odd"), "other"),
        ];
        for (rej, want) in cases {
            assert_eq!(reason_class(&rej), want, "{rej}");
        }
        let m = Metrics::new("nftables").unwrap();
        m.object_rejected(&cases_first());
        assert!(m.encode().unwrap().contains("kproxy_objects_rejected_total{kind=\"Service\",reason=\"port\"} 1\n"));
    }

    fn cases_first() -> Rejected {
        Rejected::new("Service", "ns", "n", "spec.ports[0].port 0 is out of range 1-65535")
    }

    #[test]
    fn proc_self_is_parsed() {
        let stat = "1234 (kp roxy) (x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 5000 104857600 2560 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let p = parse_process(stat, "Name:\tkproxy\nVmRSS:\t   10240 kB\n", "cpu 1 2 3\nbtime 1700000000\n",
            "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n", 7)
            .unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.rss_bytes, 10 * 1024 * 1024);
        assert_eq!(p.vsize_bytes, 104857600);
        assert_eq!(p.start_time_seconds, 1700000050.0);
        assert_eq!(p.max_fds, 1024);
        assert_eq!(p.open_fds, 7);
        let live = read_process().expect("/proc/self");
        assert!(live.rss_bytes > 0 && live.start_time_seconds > 1e9);
    }
}
