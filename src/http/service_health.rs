//! Per-Service health check node port servers (`spec.healthCheckNodePort`, cases 76-81), as
//! upstream's `service_health.go`: one HTTP listener per Service on its health check port,
//! answering any path with 200 when the Service has ready endpoints on this node and the proxy is
//! healthy, 503 otherwise; body the indented JSON of upstream's `hcPayload`, header
//! `X-Load-Balancing-Endpoint-Weight: <local endpoints>`. Listeners are opened and closed as the
//! sync loop reports Services coming, going and changing port.
//!
//! The listeners run on a runtime thread of their own (started with the first one), so a sync
//! blocked in the kernel does not stop them from answering.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use rules::health::HealthCheck;
use rules::model::{Family, NodePortAddresses};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::{serve_connection, Handler, ProxyHealth, Response, JSON, MAX_CONNECTIONS};
use crate::config::Config;

/// A Service, by namespace and name.
pub type ServiceKey = (String, String);

/// The health check answer for a Service with `local` ready endpoints on this node.
pub fn respond(namespace: &str, name: &str, local: usize, proxy_healthy: bool) -> Response {
    let s = |v: &str| serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
    // Go's json.MarshalIndent(payload, "", "  "), field order as upstream's struct.
    let body = format!(
        "{{\n  \"service\": {{\n    \"namespace\": {},\n    \"name\": {}\n  }},\n  \"localEndpoints\": {local},\n  \"serviceProxyHealthy\": {proxy_healthy}\n}}",
        s(namespace),
        s(name)
    );
    let code = if local > 0 && proxy_healthy { 200 } else { 503 };
    let mut r = Response::new(code, JSON, body);
    r.headers.push(("x-load-balancing-endpoint-weight", local.to_string()));
    r
}

/// Where the health check servers listen (case 80): the node IPs NodePorts answer on in the
/// programmed families (`--nodeport-addresses`, by default the node's primary IPs), or the
/// wildcard when they match every local address: `::` when IPv6 is programmed (on Linux a `::`
/// socket also takes IPv4, as upstream's Go listener on `:port` does), else 0.0.0.0.
pub fn listen_addresses(
    cfg: &Config,
    families: &[Family],
    primary_ips: &[IpAddr],
    local_ips: &[IpAddr],
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for f in families {
        match cfg.nodeport.resolve(*f, primary_ips, local_ips) {
            NodePortAddresses::All if families.contains(&Family::V6) => {
                return vec![IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)];
            }
            NodePortAddresses::All => return vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            NodePortAddresses::Primary => out.extend(primary_ips.iter().filter(|ip| Family::of(ip) == *f)),
            NodePortAddresses::Ips(ips) => out.extend(ips),
        }
    }
    out.sort();
    out.dedup();
    out
}

struct Server {
    port: u16,
    local: Arc<AtomicUsize>,
    /// Listening address → its accept task. An address whose bind failed is absent and tried
    /// again at the next update.
    listeners: BTreeMap<IpAddr, tokio::task::JoinHandle<()>>,
}

impl Server {
    fn close(&mut self) {
        for (_, t) in std::mem::take(&mut self.listeners) {
            t.abort();
        }
    }
}

/// The health check servers of every Service that has a health check node port.
pub struct ServiceHealthServers {
    health: Arc<ProxyHealth>,
    rt: Option<tokio::runtime::Runtime>,
    services: BTreeMap<ServiceKey, Server>,
}

impl ServiceHealthServers {
    pub fn new(health: Arc<ProxyHealth>) -> Self {
        ServiceHealthServers { health, rt: None, services: BTreeMap::new() }
    }

    /// The ports listening now, per Service (for tests and logs).
    pub fn ports(&self) -> BTreeMap<ServiceKey, u16> {
        self.services.iter().map(|(k, s)| (k.clone(), s.port)).collect()
    }

    /// Makes the listeners match `checks` on `addrs` (cases 80, 81) and publishes the local
    /// endpoint counts. Bind failures are logged and retried at the next update.
    pub fn update(&mut self, checks: &BTreeMap<ServiceKey, HealthCheck>, addrs: &[IpAddr]) {
        self.services.retain(|k, s| {
            let keep = checks.get(k).is_some_and(|c| c.node_port == s.port);
            if !keep {
                info!(service = %format!("{}/{}", k.0, k.1), port = s.port, "closing the health check server");
                s.close();
            }
            keep
        });
        if checks.is_empty() {
            return;
        }
        if self.rt.is_none() {
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("kproxy-svc-health")
                .enable_all()
                .build()
            {
                Ok(rt) => self.rt = Some(rt),
                Err(e) => return warn!("starting the service health check runtime: {e}"),
            }
        }
        let rt = self.rt.as_ref().expect("started above");
        for (k, c) in checks {
            let s = self.services.entry(k.clone()).or_insert_with(|| Server {
                port: c.node_port,
                local: Arc::new(AtomicUsize::new(0)),
                listeners: BTreeMap::new(),
            });
            s.local.store(c.local_endpoints, Ordering::Relaxed);
            s.listeners.retain(|a, t| {
                let keep = addrs.contains(a);
                if !keep {
                    t.abort();
                }
                keep
            });
            for a in addrs {
                if s.listeners.contains_key(a) {
                    continue;
                }
                let addr = SocketAddr::new(*a, c.node_port);
                let listener = std::net::TcpListener::bind(addr).and_then(|l| {
                    l.set_nonblocking(true)?;
                    let _g = rt.enter();
                    TcpListener::from_std(l)
                });
                match listener {
                    Ok(l) => {
                        info!(service = %format!("{}/{}", k.0, k.1), %addr, "serving the health check node port");
                        let (ns, name, local, health) =
                            (k.0.clone(), k.1.clone(), s.local.clone(), self.health.clone());
                        let handler: Handler = Arc::new(move |_, _| {
                            let healthy = health.health_at(SystemTime::now()).healthy;
                            respond(&ns, &name, local.load(Ordering::Relaxed), healthy)
                        });
                        s.listeners.insert(*a, rt.spawn(accept_loop(l, handler)));
                    }
                    // Upstream raises the event FailedToStartServiceHealthcheck here.
                    Err(e) => warn!(
                        service = %format!("{}/{}", k.0, k.1),
                        %addr,
                        "FailedToStartServiceHealthcheck: listening on the health check node port: {e}"
                    ),
                }
            }
        }
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // May be dropped inside the daemon's runtime, where a blocking shutdown would panic.
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, handler: Handler) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                let handler = handler.clone();
                tokio::spawn(async move {
                    serve_connection(stream, handler).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("health check node port: accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    fn get(port: u16) -> Option<String> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // A connection the kernel accepted just before the listener closed is reset: closed too.
        c.write_all(b"GET /any/path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        (!s.is_empty()).then_some(s)
    }

    /// Polls until `port` answers (Some) or refuses (None) as wanted: closing is asynchronous.
    fn until(port: u16, open: bool) -> Option<String> {
        for _ in 0..100 {
            let r = get(port);
            if r.is_some() == open {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("port {port} never became {}", if open { "open" } else { "closed" });
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn wildcard_listener_covers_ipv6_when_ipv6_is_programmed() {
        use clap::Parser;
        let cfg = crate::config::Flags::try_parse_from([
            "kproxy",
            "--manifests",
            "/nonexistent",
            "--nodeport-addresses",
            "0.0.0.0/0,::/0",
        ])
        .unwrap()
        .into_config()
        .unwrap();
        let v4: IpAddr = "0.0.0.0".parse().unwrap();
        let v6: IpAddr = "::".parse().unwrap();
        assert_eq!(listen_addresses(&cfg, &[Family::V4], &[], &[]), vec![v4]);
        assert_eq!(listen_addresses(&cfg, &[Family::V4, Family::V6], &[], &[]), vec![v6]);
    }

    #[test]
    fn body_and_codes_are_upstreams() {
        let r = respond("ns1", "svc1", 2, true);
        assert_eq!(r.status, 200);
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            "{\n  \"service\": {\n    \"namespace\": \"ns1\",\n    \"name\": \"svc1\"\n  },\n  \"localEndpoints\": 2,\n  \"serviceProxyHealthy\": true\n}"
        );
        assert_eq!(r.headers, vec![("x-load-balancing-endpoint-weight", "2".to_string())]);
        assert_eq!(respond("ns1", "svc1", 0, true).status, 503); // cases 77
        assert_eq!(respond("ns1", "svc1", 3, false).status, 503); // case 78
    }

    /// Cases 76, 77, 81 on 127.0.0.1: opened, counts followed, closed on removal and port change.
    #[test]
    fn listeners_follow_the_services() {
        let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
        let mut s = ServiceHealthServers::new(health.clone());
        let (p1, p2) = (free_port(), free_port());
        let addrs = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let key = ("ns1".to_string(), "svc1".to_string());
        let check = |port, n| BTreeMap::from([(key.clone(), HealthCheck { node_port: port, local_endpoints: n })]);
        s.update(&check(p1, 1), &addrs);
        let r = until(p1, true).unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.to_ascii_lowercase().contains("x-load-balancing-endpoint-weight: 1"), "{r}");
        assert!(r.contains("\"localEndpoints\": 1") && r.contains("\"name\": \"svc1\""), "{r}");
        // Case 78: an update queued longer than the health timeout makes the proxy unhealthy.
        health.updated_at(Family::V4, SystemTime::now() - Duration::from_secs(200));
        health.queued_at(Family::V4, SystemTime::now() - Duration::from_secs(120));
        let r = get(p1).unwrap();
        assert!(r.starts_with("HTTP/1.1 503") && r.contains("\"serviceProxyHealthy\": false"), "{r}");
        health.updated(Family::V4);
        s.update(&check(p1, 0), &addrs);
        let r = get(p1).unwrap();
        assert!(r.starts_with("HTTP/1.1 503") && r.contains("\"localEndpoints\": 0"), "{r}");
        // A new port: the old one closes, the new one opens.
        s.update(&check(p2, 2), &addrs);
        until(p1, false);
        assert!(until(p2, true).unwrap().starts_with("HTTP/1.1 200"));
        // The Service is gone (or eTP=Cluster): closed.
        s.update(&BTreeMap::new(), &addrs);
        until(p2, false);
        assert!(s.ports().is_empty());
    }
}
