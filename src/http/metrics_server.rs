//! Owns the metrics server's routes: `/metrics` (Prometheus text), `/proxyMode`, `/healthz`
//! (a plain "ok", as upstream's generic healthz on this port), and for clusters without Grafana
//! `GET /`, a self-contained page charting recent syncs, fed by `GET /debug/syncs` (JSON).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::Method;
use serde::Serialize;

use super::health::ProxyHealth;
use super::{Handler, Response, JSON, TEXT};
use crate::metrics::{Metrics, RulesetCounts, SyncRecord};

/// Prometheus text exposition format 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The built-in page: HTML, CSS and JS inline, no external assets.
pub const PAGE: &str = include_str!("page.html");

/// `/debug/syncs`: the recent syncs and the current counts.
#[derive(Serialize)]
pub struct Debug {
    pub mode: &'static str,
    pub now_ms: u64,
    /// As `/livez` judges it.
    pub healthy: bool,
    pub node_eligible: bool,
    pub pending_services: usize,
    pub pending_endpoints: usize,
    /// What the kernel holds after the last successful sync of each family, summed.
    pub ruleset: RulesetCounts,
    pub syncs_total: u64,
    pub sync_failures_total: u64,
    pub rss_bytes: u64,
    /// Oldest first.
    pub syncs: Vec<SyncRecord>,
}

/// Refreshes the health gauges from the health state (at scrape time, so they are never stale).
fn publish_health(metrics: &Metrics, health: &ProxyHealth) -> (bool, bool) {
    let h = health.health_at(SystemTime::now());
    let fams: Vec<_> = h.status.iter().map(|(f, s)| (*f, s.healthy)).collect();
    let eligible = health.node_eligible();
    metrics.health(&fams, eligible);
    (h.healthy, eligible)
}

/// The JSON behind the page.
pub fn debug(metrics: &Metrics, health: &ProxyHealth) -> Debug {
    let (healthy, node_eligible) = publish_health(metrics, health);
    let pending = metrics.pending_now();
    let (syncs_total, sync_failures_total) = metrics.sync_totals();
    Debug {
        mode: metrics.mode(),
        now_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        healthy,
        node_eligible,
        pending_services: pending.services,
        pending_endpoints: pending.endpoints,
        ruleset: metrics.ruleset_counts(),
        syncs_total,
        sync_failures_total,
        rss_bytes: metrics.rss_bytes(),
        syncs: metrics.history(),
    }
}

/// The metrics server's routes (exact paths; GET and HEAD only).
pub fn handler(metrics: Arc<Metrics>, health: Arc<ProxyHealth>) -> Handler {
    Arc::new(move |method, path| {
        if method != Method::GET && method != Method::HEAD {
            return Response::method_not_allowed();
        }
        match path {
            "/metrics" => {
                publish_health(&metrics, &health);
                match metrics.encode() {
                    Ok(text) => Response::new(200, PROMETHEUS_TEXT, text),
                    Err(e) => Response::new(500, TEXT, format!("{e}\n")),
                }
            }
            "/proxyMode" => Response::new(200, TEXT, metrics.mode()),
            "/healthz" => Response::new(200, TEXT, "ok"),
            "/" => Response::new(200, "text/html; charset=utf-8", PAGE),
            "/debug/syncs" => match serde_json::to_vec(&debug(&metrics, &health)) {
                Ok(body) => Response::new(200, JSON, body),
                Err(e) => Response::new(500, TEXT, format!("{e}\n")),
            },
            _ => Response::not_found(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn h() -> (Handler, Arc<Metrics>) {
        let m = Arc::new(Metrics::new("nftables").unwrap());
        (handler(m.clone(), Arc::new(ProxyHealth::new(Duration::from_secs(60)))), m)
    }

    #[test]
    fn routes() {
        let (h, _) = h();
        let r = h(&Method::GET, "/proxyMode");
        assert_eq!((r.status, r.content_type, r.body.as_slice()), (200, TEXT, b"nftables".as_slice()));
        let r = h(&Method::GET, "/healthz");
        assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
        let r = h(&Method::GET, "/metrics");
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, PROMETHEUS_TEXT);
        let text = String::from_utf8(r.body).unwrap();
        assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram"));
        assert!(text.contains("kproxy_node_eligible 0"));
        assert_eq!(h(&Method::GET, "/nope").status, 404);
        assert_eq!(h(&Method::POST, "/metrics").status, 405);
        let r = h(&Method::GET, "/");
        assert!(r.content_type.starts_with("text/html"));
        let page = String::from_utf8(r.body).unwrap();
        assert!(page.contains("/debug/syncs"));
        for external in ["src=\"http", "href=\"http", "url(http", "@import", "<link", "<script src"] {
            assert!(!page.contains(external), "the page must not load external assets: {external}");
        }
        let r = h(&Method::GET, "/debug/syncs");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["mode"], "nftables");
        assert!(v["syncs"].as_array().unwrap().is_empty());
    }
}
