//! Owns the proxy health state and the `/healthz` and `/livez` answers of the health server,
//! exactly as upstream's `ProxyHealthServer` (pkg/proxy/healthcheck/proxy_health.go) gives them.
//!
//! Each IP family records `lastUpdated` (after a successful sync, and once when the sync loop
//! starts) and `oldestPendingQueued` (the first queued change not yet applied). A family is
//! unhealthy when a queued change has waited `timeout` (2 x syncPeriod) or longer; a family with
//! nothing queued is healthy, also during start-up. `/healthz` also needs the own Node to be known,
//! not being deleted and not tainted `ToBeDeletedByClusterAutoscaler`; `/livez` ignores the Node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rules::model::Family;
use serde::Serialize;

use super::{Handler, Response, JSON};
use crate::metrics::Metrics;

/// What the health state knows about the own Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// No Node object seen yet (or it was deleted): not eligible, as upstream's nil node.
    Unknown,
    /// Known; `being_deleted` when it has a deletionTimestamp or the autoscaler's taint.
    Known { being_deleted: bool },
}

#[derive(Debug)]
struct Inner {
    last_updated: BTreeMap<Family, SystemTime>,
    oldest_pending: BTreeMap<Family, SystemTime>,
    node: NodeState,
}

/// The health state the sync loop feeds and the servers read. Shared in an `Arc`.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    inner: Mutex<Inner>,
}

/// One family's health, as in upstream's `ProxierHealth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyHealth {
    pub last_updated: SystemTime,
    pub healthy: bool,
}

/// The proxy's health at one instant, as in upstream's `ProxyHealth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The newest per-family update; `None` before the sync loop started.
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
    /// All families healthy (node eligibility not included).
    pub healthy: bool,
    pub status: BTreeMap<Family, FamilyHealth>,
}

/// The wire form: field names, order and omissions as Go's `json.Marshal` of upstream's struct.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyBody>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyBody {
    last_updated: String,
    healthy: bool,
}

/// One answer of the health server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 200 or 503.
    pub code: u16,
    /// JSON.
    pub body: String,
}

/// Go's zero `time.Time` marshalled, which upstream sends when no family has updated yet.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `t` as Go's `time.Time` marshals to JSON (RFC 3339 with as many fractional digits as needed),
/// in UTC as kube-proxy pods run.
pub fn rfc3339(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.to_string(),
        Err(_) => GO_ZERO_TIME.to_string(),
    }
}

impl ProxyHealth {
    /// `timeout` is upstream's healthTimeout, 2 x syncPeriod.
    pub fn new(timeout: Duration) -> Self {
        ProxyHealth {
            timeout,
            inner: Mutex::new(Inner {
                last_updated: BTreeMap::new(),
                oldest_pending: BTreeMap::new(),
                node: NodeState::Unknown,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps inconsistent (each update is one
        // insert or remove), so a poisoned lock is still good to read.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The family synced successfully at `now` (also called once when the sync loop starts).
    pub fn updated_at(&self, family: Family, now: SystemTime) {
        let mut i = self.lock();
        i.oldest_pending.remove(&family);
        i.last_updated.insert(family, now);
    }

    /// A change for the family was queued at `now`; only the oldest unapplied one counts.
    pub fn queued_at(&self, family: Family, now: SystemTime) {
        self.lock().oldest_pending.entry(family).or_insert(now);
    }

    pub fn updated(&self, family: Family) {
        self.updated_at(family, SystemTime::now())
    }

    pub fn queued(&self, family: Family) {
        self.queued_at(family, SystemTime::now())
    }

    /// Records what is known about the own Node.
    pub fn set_node(&self, node: NodeState) {
        self.lock().node = node;
    }

    /// Known, not being deleted, not tainted for deletion.
    pub fn node_eligible(&self) -> bool {
        matches!(self.lock().node, NodeState::Known { being_deleted: false })
    }

    /// Upstream's `Health()` at `now`.
    pub fn health_at(&self, now: SystemTime) -> Health {
        let i = self.lock();
        let mut h = Health { last_updated: None, current_time: now, healthy: true, status: BTreeMap::new() };
        for (&family, &last) in &i.last_updated {
            if h.last_updated.is_none_or(|l| last > l) {
                h.last_updated = Some(last);
            }
            let healthy = match i.oldest_pending.get(&family) {
                // Nothing queued: starting up, or fully synced.
                None => true,
                // Queued but not late yet. A clock step backwards counts as no wait.
                Some(&queued) => now.duration_since(queued).unwrap_or(Duration::ZERO) < self.timeout,
            };
            h.healthy &= healthy;
            h.status.insert(family, FamilyHealth { last_updated: last, healthy });
        }
        h
    }

    /// The `/healthz` answer at `now`: 200 iff every family is healthy and the node is eligible.
    pub fn healthz_at(&self, now: SystemTime) -> Answer {
        let eligible = self.node_eligible();
        let h = self.health_at(now);
        render(h.healthy && eligible, h, Some(eligible))
    }

    /// The `/livez` answer at `now`: the node does not matter.
    pub fn livez_at(&self, now: SystemTime) -> Answer {
        let h = self.health_at(now);
        render(h.healthy, h, None)
    }
}

/// The health server's routes: `/healthz` and `/livez`, exact paths, any method (as Go's mux).
pub fn handler(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Handler {
    Arc::new(move |_method, path| match path {
        "/healthz" => {
            let a = health.healthz_at(SystemTime::now());
            metrics.healthz_answered(a.code);
            Response::new(a.code, JSON, a.body)
        }
        "/livez" => {
            let a = health.livez_at(SystemTime::now());
            metrics.livez_answered(a.code);
            Response::new(a.code, JSON, a.body)
        }
        _ => Response::not_found(),
    })
}

fn render(healthy: bool, h: Health, node_eligible: Option<bool>) -> Answer {
    // On success upstream reports lastUpdated = now, for compatibility with releases that
    // reported the last sync loop run even when nothing changed.
    let last_updated = if healthy { Some(h.current_time) } else { h.last_updated };
    let body = Body {
        last_updated: last_updated.map(rfc3339).unwrap_or_else(|| GO_ZERO_TIME.to_string()),
        current_time: rfc3339(h.current_time),
        node_eligible,
        healthy: h.healthy,
        status: h
            .status
            .iter()
            .map(|(f, s)| (f.label(), FamilyBody { last_updated: rfc3339(s.last_updated), healthy: s.healthy }))
            .collect(),
    };
    Answer {
        code: if healthy { 200 } else { 503 },
        body: serde_json::to_string(&body).expect("health body serializes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn json(a: &Answer) -> serde_json::Value {
        serde_json::from_str(&a.body).unwrap()
    }

    #[test]
    fn timestamps_marshal_like_go() {
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000)), "2023-11-14T22:13:20.12Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::new(1_700_000_000, 1)), "2023-11-14T22:13:20.000000001Z");
    }

    #[test]
    fn before_the_loop_starts_livez_is_ok_with_go_zero_time_and_no_status() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let a = h.livez_at(at(0));
        assert_eq!(a.code, 200);
        // Healthy: lastUpdated is overwritten with now; no status when no family updated.
        assert_eq!(
            a.body,
            r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z","healthy":true}"#
        );
        // No Node yet: /healthz fails, with the same shape plus nodeEligible.
        let a = h.healthz_at(at(0));
        assert_eq!(a.code, 503);
        assert_eq!(
            a.body,
            r#"{"lastUpdated":"0001-01-01T00:00:00Z","currentTime":"2023-11-14T22:13:20Z","nodeEligible":false,"healthy":true}"#
        );
    }

    #[test]
    fn life_cycle_synced_stuck_recovered() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        h.set_node(NodeState::Known { being_deleted: false });
        h.updated_at(Family::V4, at(0));
        h.updated_at(Family::V6, at(0));
        let a = h.healthz_at(at(1));
        assert_eq!(a.code, 200);
        assert_eq!(
            a.body,
            concat!(
                r#"{"lastUpdated":"2023-11-14T22:13:21Z","currentTime":"2023-11-14T22:13:21Z","nodeEligible":true,"healthy":true,"#,
                r#""status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20Z","healthy":true},"IPv6":{"lastUpdated":"2023-11-14T22:13:20Z","healthy":true}}}"#
            )
        );
        // A change is queued at 10 s and not applied: still fine at 69 s, late at 70 s.
        h.queued_at(Family::V4, at(10));
        h.queued_at(Family::V4, at(30)); // a later queue does not reset the oldest
        assert_eq!(h.healthz_at(at(69)).code, 200);
        let a = h.healthz_at(at(70));
        assert_eq!(a.code, 503);
        let v = json(&a);
        assert_eq!(v["healthy"], false);
        assert_eq!(v["status"]["IPv4"]["healthy"], false);
        assert_eq!(v["status"]["IPv6"]["healthy"], true);
        // On 503 lastUpdated is the newest family update, not now.
        assert_eq!(v["lastUpdated"], "2023-11-14T22:13:20Z");
        assert_eq!(h.livez_at(at(70)).code, 503);
        // IPv6 synced later: lastUpdated follows the newest family.
        h.updated_at(Family::V6, at(50));
        assert_eq!(json(&h.livez_at(at(70)))["lastUpdated"], "2023-11-14T22:14:10Z");
        // The sync finally succeeds.
        h.updated_at(Family::V4, at(71));
        assert_eq!(h.healthz_at(at(72)).code, 200);
        assert_eq!(h.livez_at(at(72)).code, 200);
    }

    #[test]
    fn node_being_deleted_fails_healthz_but_not_livez() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        h.updated_at(Family::V4, at(0));
        h.set_node(NodeState::Known { being_deleted: true });
        let a = h.healthz_at(at(1));
        assert_eq!(a.code, 503);
        let v = json(&a);
        assert_eq!(v["nodeEligible"], false);
        assert_eq!(v["healthy"], true, "the proxier itself is healthy");
        assert_eq!(h.livez_at(at(1)).code, 200);
        assert!(json(&h.livez_at(at(1))).get("nodeEligible").is_none());
        h.set_node(NodeState::Unknown);
        assert_eq!(h.healthz_at(at(1)).code, 503);
        h.set_node(NodeState::Known { being_deleted: false });
        assert_eq!(h.healthz_at(at(1)).code, 200);
    }

    #[test]
    fn a_queued_change_in_the_future_does_not_count_as_late() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        h.updated_at(Family::V4, at(0));
        h.queued_at(Family::V4, at(100));
        assert_eq!(h.livez_at(at(50)).code, 200);
    }
}
