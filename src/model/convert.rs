//! Owns the pure conversion of k8s-openapi Service, EndpointSlice and Node objects into compact,
//! validated model values, following upstream kube-proxy's reading of each field.
//!
//! Upstream trusts the API server's validation; we cannot (objects also come from hand-written
//! manifests), so each check the rules depend on is repeated here and a failing object is
//! refused as a whole with a reason. Objects upstream deliberately ignores (headless, ExternalName,
//! other proxies' objects, FQDN slices) are `Skipped`, which is not an error.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use rules::model::{Cidr, Family, NodeInfo, Placement, Protocol, ServicePort, ServicePortName};

use super::validate::{is_dns1123_label, is_dns1123_subdomain, is_port_name, parse_ip_sloppy};
use super::Rejected;

/// Objects carrying this label belong to another proxy implementation (upstream's informers filter
/// them out with a label selector, so they never reach the proxier).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on headless Services' slices; filtered out like the above.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// The taint the cluster autoscaler puts on a node before deleting it (upstream `ToBeDeletedTaint`).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// The label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// API-server limits on an EndpointSlice (pkg/apis/discovery/validation: maxEndpoints,
/// maxAddresses, maxPorts). Anything larger cannot have come from a real API server; refusing it
/// bounds the memory and rule count one object can cost.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;
pub const MAX_ENDPOINT_ADDRESSES: usize = 100;
pub const MAX_SLICE_PORTS: usize = 20000;
/// API-server limit on `hints.forZones` and `hints.forNodes` entries of one endpoint.
pub const MAX_ENDPOINT_HINTS: usize = 8;
/// The API server's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// The API server's maximum affinity timeout (one day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86400;

/// The result of converting an object that is not invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converted<T> {
    /// The object is ours to program.
    Proxied(T),
    /// The object is valid but deliberately not proxied (the reason goes to the debug log).
    Skipped(Skip),
}

impl<T> Converted<T> {
    pub fn proxied(self) -> Option<T> {
        match self {
            Converted::Proxied(t) => Some(t),
            Converted::Skipped(_) => None,
        }
    }
}

/// Why a valid object is not proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `clusterIP: None` or no cluster IP (upstream `ShouldSkipService`).
    Headless,
    /// `type: ExternalName`: DNS only, no rules.
    ExternalName,
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy's object.
    OtherProxy,
    /// Labelled `service.kubernetes.io/headless`.
    HeadlessLabel,
    /// An EndpointSlice with `addressType: FQDN`, which kube-proxy never reads.
    FqdnSlice,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skip::Headless => "headless (no cluster IP)",
            Skip::ExternalName => "type ExternalName",
            Skip::OtherProxy => "labelled service.kubernetes.io/service-proxy-name",
            Skip::HeadlessLabel => "labelled service.kubernetes.io/headless",
            Skip::FqdnSlice => "addressType FQDN",
        })
    }
}

/// A proxied Service: its service ports for every IP family it has a cluster IP of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// One entry per (spec.ports entry × cluster IP family), ordered by family, then spec order.
    pub ports: Vec<Arc<ServicePort>>,
}

/// A proxied EndpointSlice, reduced to what endpoint merging needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: String,
    pub name: String,
    /// From the `kubernetes.io/service-name` label.
    pub service_name: String,
    pub family: Family,
    /// Usable ports only (nil name or nil/0 port already dropped, as upstream does).
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// One port of an EndpointSlice; matched to a service port by (name, protocol).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint of an EndpointSlice, before it is paired with a port number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Node name and topology hints, shared with every endpoint placed alike.
    pub placement: Arc<Placement>,
}

fn has_label(labels: &Option<BTreeMap<String, String>>, key: &str) -> bool {
    labels.as_ref().is_some_and(|l| l.contains_key(key))
}

fn family_name(f: Family) -> &'static str {
    f.label()
}

/// Checks namespace and name; both end up in nft chain names and comments.
fn check_namespaced_name(kind: &'static str, ns: &str, name: &str, name_is_label: bool) -> Result<(), Rejected> {
    if !is_dns1123_label(ns) {
        return Err(Rejected::new(kind, ns, name, format!("metadata.namespace {ns:?} is not a valid DNS-1123 label")));
    }
    let ok = if name_is_label { is_dns1123_label(name) } else { is_dns1123_subdomain(name) };
    if !ok {
        let what = if name_is_label { "DNS-1123 label" } else { "DNS-1123 subdomain" };
        return Err(Rejected::new(kind, ns, name, format!("metadata.name {name:?} is not a valid {what}")));
    }
    Ok(())
}

fn protocol(kind: &'static str, ns: &str, name: &str, field: &str, p: Option<&str>) -> Result<Protocol, Rejected> {
    // Both Service and EndpointSlice ports default to TCP in the API.
    let p = p.unwrap_or("TCP");
    Protocol::from_k8s(p).ok_or_else(|| Rejected::new(kind, ns, name, format!("{field} {p:?} is not TCP, UDP or SCTP")))
}

/// Converts a Service into its service ports (upstream `newBaseServiceInfo` per family).
pub fn service(svc: &Service) -> Result<Converted<ServiceInfo>, Rejected> {
    const K: &str = "Service";
    let ns = svc.metadata.namespace.as_deref().unwrap_or("");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let rej = |reason: String| Rejected::new(K, ns, name, reason);

    // Upstream's informer label selector drops these before anything else is looked at.
    if has_label(&svc.metadata.labels, LABEL_SERVICE_PROXY_NAME) {
        return Ok(Converted::Skipped(Skip::OtherProxy));
    }
    if has_label(&svc.metadata.labels, LABEL_HEADLESS) {
        return Ok(Converted::Skipped(Skip::HeadlessLabel));
    }
    check_namespaced_name(K, ns, name, true)?;

    let Some(spec) = &svc.spec else {
        return Ok(Converted::Skipped(Skip::Headless));
    };
    // `ShouldSkipService`: no cluster IP ("" or "None") or ExternalName means no rules at all.
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    let cluster_ips: Vec<&str> = spec.cluster_ips.iter().flatten().map(String::as_str).collect();
    let primary = if cluster_ip.is_empty() { cluster_ips.first().copied().unwrap_or("") } else { cluster_ip };
    if primary.is_empty() || primary == "None" {
        return Ok(Converted::Skipped(Skip::Headless));
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Converted::Skipped(Skip::ExternalName));
    }

    // Cluster IPs: spec.clusterIPs when set (dual-stack), else spec.clusterIP.
    let ip_texts: Vec<(&str, &str)> = if cluster_ips.is_empty() {
        vec![("spec.clusterIP", cluster_ip)]
    } else {
        cluster_ips.iter().map(|s| ("spec.clusterIPs", *s)).collect()
    };
    if ip_texts.len() > 2 {
        return Err(rej(format!("spec.clusterIPs has {} entries; at most one per IP family", ip_texts.len())));
    }
    let mut cips: Vec<IpAddr> = Vec::new();
    for (field, text) in ip_texts {
        let ip = parse_ip_sloppy(text).ok_or_else(|| rej(format!("{field} {text:?} is not an IP address")))?;
        if cips.iter().any(|c| Family::of(c) == Family::of(&ip)) {
            return Err(rej(format!("spec.clusterIPs has two {} addresses", family_name(Family::of(&ip)))));
        }
        cips.push(ip);
    }
    if !cluster_ip.is_empty() && !cluster_ips.is_empty() {
        let ip = parse_ip_sloppy(cluster_ip)
            .ok_or_else(|| rej(format!("spec.clusterIP {cluster_ip:?} is not an IP address")))?;
        if ip != cips[0] {
            return Err(rej(format!(
                "spec.clusterIP {cluster_ip:?} differs from spec.clusterIPs[0] {:?}",
                cluster_ips[0]
            )));
        }
    }

    let mut external_ips: Vec<IpAddr> = Vec::new();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        let ip =
            parse_ip_sloppy(text).ok_or_else(|| rej(format!("spec.externalIPs[{i}] {text:?} is not an IP address")))?;
        if !external_ips.contains(&ip) {
            external_ips.push(ip);
        }
    }
    let mut lb_ips: Vec<IpAddr> = Vec::new();
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        // Hostname-only ingress entries have no IP to program.
        let Some(text) = ing.ip.as_deref().filter(|t| !t.is_empty()) else {
            continue;
        };
        let ip = parse_ip_sloppy(text)
            .ok_or_else(|| rej(format!("status.loadBalancer.ingress[{i}].ip {text:?} is not an IP address")))?;
        // ipMode Proxy: the load balancer delivers to the node itself, so the VIP must not be
        // short-circuited to endpoints (case 58). nil and VIP are programmed.
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if !lb_ips.contains(&ip) {
            lb_ips.push(ip);
        }
    }

    let policies = policies(spec, !external_ips.is_empty()).map_err(rej)?;

    let mut source_ranges: Vec<Cidr> = Vec::new();
    for (i, text) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        // Upstream trims whitespace (case 62) and parses sloppily (case 61).
        let cidr = parse_cidr_sloppy(text)
            .ok_or_else(|| rej(format!("spec.loadBalancerSourceRanges[{i}] {text:?} is not a CIDR")))?;
        if !source_ranges.contains(&cidr) {
            source_ranges.push(cidr);
        }
    }

    let mut specs: Vec<(String, Protocol, u16, u16)> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let pname = p.name.as_deref().unwrap_or("");
        if !is_port_name(pname) {
            return Err(rej(format!("spec.ports[{i}].name {pname:?} is not a valid port name (DNS-1123 label)")));
        }
        let proto = protocol(K, ns, name, &format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?;
        let port = u16::try_from(p.port)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| rej(format!("spec.ports[{i}].port {} is out of range 1-65535", p.port)))?;
        let node_port = match p.node_port.unwrap_or(0) {
            0 => 0,
            n => u16::try_from(n).map_err(|_| rej(format!("spec.ports[{i}].nodePort {n} is out of range 1-65535")))?,
        };
        if let Some(j) = specs.iter().position(|s| s.2 == port && s.1 == proto) {
            return Err(rej(format!(
                "spec.ports[{i}] duplicates spec.ports[{j}] ({port}/{})",
                proto.lower().to_uppercase()
            )));
        }
        // Two entries with one (name, protocol) would be one ServicePortName: one would vanish.
        if let Some(j) = specs.iter().position(|s| s.0 == pname && s.1 == proto) {
            return Err(rej(format!("spec.ports[{i}] has the same name {pname:?} and protocol as spec.ports[{j}]")));
        }
        specs.push((pname.to_string(), proto, port, node_port));
    }

    let mut ports = Vec::with_capacity(specs.len() * cips.len());
    let mut families: Vec<IpAddr> = cips.clone();
    families.sort_by_key(Family::of);
    for cip in families {
        let fam = Family::of(&cip);
        let of_family = |ips: &[IpAddr]| ips.iter().copied().filter(|ip| Family::of(ip) == fam).collect::<Vec<_>>();
        for (pname, proto, port, node_port) in &specs {
            ports.push(Arc::new(ServicePort {
                name: ServicePortName::new(ns, name, pname, *proto),
                cluster_ip: cip,
                port: *port,
                node_port: *node_port,
                external_ips: of_family(&external_ips),
                load_balancer_ips: of_family(&lb_ips),
                external_traffic_policy_local: policies.external_local,
                internal_traffic_policy_local: policies.internal_local,
                health_check_node_port: policies.health_check_node_port,
                session_affinity_timeout: policies.affinity_timeout,
                load_balancer_source_ranges: source_ranges.iter().copied().filter(|c| c.family() == fam).collect(),
            }));
        }
    }
    Ok(Converted::Proxied(ServiceInfo { namespace: ns.to_string(), name: name.to_string(), ports }))
}

/// The traffic policies of a Service, as upstream's `newBaseServiceInfo` reads them.
struct Policies {
    external_local: bool,
    internal_local: bool,
    health_check_node_port: u16,
    affinity_timeout: Option<u32>,
}

fn policies(spec: &k8s_openapi::api::core::v1::ServiceSpec, has_external_ips: bool) -> Result<Policies, String> {
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    // apiservice.ExternallyAccessible: the Service's type (not its ports) decides whether the
    // external policy applies at all.
    let accessible = ty == "LoadBalancer" || ty == "NodePort" || (ty == "ClusterIP" && has_external_ips);
    let local = |field: &str, v: Option<&str>| match v {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(format!("{field} {other:?} is not Cluster or Local")),
    };
    let external_local = local("spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref())? && accessible;
    let internal_local = local("spec.internalTrafficPolicy", spec.internal_traffic_policy.as_deref())?;
    // apiservice.NeedsHealthCheck: only LoadBalancers with the Local external policy have one.
    let health_check_node_port = match spec.health_check_node_port.unwrap_or(0) {
        _ if !(ty == "LoadBalancer" && external_local) => 0,
        0 => 0,
        n => u16::try_from(n).map_err(|_| format!("spec.healthCheckNodePort {n} is out of range 1-65535"))?,
    };
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map_or(Ok(DEFAULT_AFFINITY_TIMEOUT), |t| {
                    u32::try_from(t).ok().filter(|t| (1..=MAX_AFFINITY_TIMEOUT).contains(t)).ok_or_else(|| {
                        format!(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of range 1-{MAX_AFFINITY_TIMEOUT}"
                        )
                    })
                })?;
            Some(t)
        }
        Some(other) => return Err(format!("spec.sessionAffinity {other:?} is not None or ClientIP")),
    };
    Ok(Policies { external_local, internal_local, health_check_node_port, affinity_timeout })
}

/// `addr/len` as upstream's `netutils.ParseCIDRSloppy` reads it after `strings.TrimSpace`: the
/// address may have zero-padded IPv4 octets, the length leading zeros (`203.0.113.000/025`).
/// Host bits are cleared, as Go's `ParseCIDR` returns the network.
fn parse_cidr_sloppy(text: &str) -> Option<Cidr> {
    let (addr, len) = text.trim().split_once('/')?;
    let ip = parse_ip_sloppy(addr)?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // A mapped IPv6 address (`::ffff:1.2.3.4/120`) is parsed as IPv4 by parse_ip_sloppy; its
    // prefix length would then mean something else, so refuse it rather than guess.
    if ip.is_ipv4() && addr.contains(':') {
        return None;
    }
    Cidr::parse(&format!("{ip}/{}", len.parse::<u8>().ok()?)).ok()
}

/// Converts an EndpointSlice (upstream endpointslicecache `updatePending` + `addEndpoints`).
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<Converted<SliceInfo>, Rejected> {
    const K: &str = "EndpointSlice";
    let ns = slice.metadata.namespace.as_deref().unwrap_or("");
    let name = slice.metadata.name.as_deref().unwrap_or("");
    let rej = |reason: String| Rejected::new(K, ns, name, reason);

    if has_label(&slice.metadata.labels, LABEL_SERVICE_PROXY_NAME) {
        return Ok(Converted::Skipped(Skip::OtherProxy));
    }
    if has_label(&slice.metadata.labels, LABEL_HEADLESS) {
        return Ok(Converted::Skipped(Skip::HeadlessLabel));
    }
    check_namespaced_name(K, ns, name, false)?;
    // Upstream logs an error and ignores a slice without its service (case 28).
    let service_name = match slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) {
        None => return Err(rej(format!("missing label {LABEL_SERVICE_NAME}"))),
        Some(s) if !is_dns1123_label(s) => {
            return Err(rej(format!("label {LABEL_SERVICE_NAME} {s:?} is not a valid Service name")))
        }
        Some(s) => s.clone(),
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        "FQDN" => return Ok(Converted::Skipped(Skip::FqdnSlice)),
        other => return Err(rej(format!("addressType {other:?} is not IPv4, IPv6 or FQDN"))),
    };

    let raw_ports = slice.ports.as_deref().unwrap_or(&[]);
    if raw_ports.len() > MAX_SLICE_PORTS {
        return Err(rej(format!("{} ports exceed the API limit of {MAX_SLICE_PORTS}", raw_ports.len())));
    }
    let mut ports: Vec<SlicePort> = Vec::new();
    let mut seen: BTreeSet<(&str, Protocol)> = BTreeSet::new();
    for (i, p) in raw_ports.iter().enumerate() {
        // Validate what is there before deciding to ignore the entry: a bad value is still bad.
        if let Some(pn) = p.name.as_deref() {
            if !is_port_name(pn) {
                return Err(rej(format!("ports[{i}].name {pn:?} is not a valid port name (DNS-1123 label)")));
            }
        }
        let proto = protocol(K, ns, name, &format!("ports[{i}].protocol"), p.protocol.as_deref())?;
        let num = p.port.unwrap_or(0);
        if !(0..=65535).contains(&num) {
            return Err(rej(format!("ports[{i}].port {num} is out of range 0-65535")));
        }
        // Case 18: upstream ignores a port with a nil name ("Ignoring port with nil name") and
        // one with a nil or zero port ("Ignoring invalid endpoint port"). The API server defaults
        // a nil name to "", so a nil name only arrives from unvalidated input.
        let Some(pn) = p.name.as_deref() else {
            tracing::debug!(namespace = ns, slice = name, index = i, "ignoring EndpointSlice port with nil name");
            continue;
        };
        if num == 0 {
            tracing::debug!(
                namespace = ns,
                slice = name,
                index = i,
                "ignoring EndpointSlice port with nil or zero port"
            );
            continue;
        }
        if !seen.insert((pn, proto)) {
            return Err(rej(format!("ports[{i}] repeats name {pn:?} with protocol {}", proto.lower().to_uppercase())));
        }
        ports.push(SlicePort { name: pn.to_string(), protocol: proto, port: num as u16 });
    }

    if slice.endpoints.len() > MAX_SLICE_ENDPOINTS {
        return Err(rej(format!("{} endpoints exceed the API limit of {MAX_SLICE_ENDPOINTS}", slice.endpoints.len())));
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.len() > MAX_ENDPOINT_ADDRESSES {
            return Err(rej(format!(
                "endpoints[{i}] has {} addresses, over the API limit of {MAX_ENDPOINT_ADDRESSES}",
                ep.addresses.len()
            )));
        }
        // Only addresses[0] is used (case 26); an endpoint without any is ignored, as upstream.
        let Some(text) = ep.addresses.first() else {
            tracing::debug!(namespace = ns, slice = name, index = i, "ignoring endpoint without addresses");
            continue;
        };
        let ip = parse_ip_sloppy(text)
            .ok_or_else(|| rej(format!("endpoints[{i}].addresses[0] {text:?} is not an IP address")))?;
        if Family::of(&ip) != family {
            return Err(rej(format!(
                "endpoints[{i}].addresses[0] {text:?} is {} in an addressType {} slice",
                family_name(Family::of(&ip)),
                slice.address_type
            )));
        }
        let c = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        let zone_hints =
            hint_names(hints.and_then(|h| h.for_zones.as_deref()).unwrap_or(&[]), |z| &z.name).map_err(|n| {
                rej(format!(
                    "endpoints[{i}].hints.forZones has {n} entries, over the API limit of {MAX_ENDPOINT_HINTS}"
                ))
            })?;
        let node_hints =
            hint_names(hints.and_then(|h| h.for_nodes.as_deref()).unwrap_or(&[]), |z| &z.name).map_err(|n| {
                rej(format!(
                    "endpoints[{i}].hints.forNodes has {n} entries, over the API limit of {MAX_ENDPOINT_HINTS}"
                ))
            })?;
        // Case 19/24: ready and serving default to true, terminating to false.
        endpoints.push(SliceEndpoint {
            ip,
            ready: c.and_then(|c| c.ready).unwrap_or(true),
            serving: c.and_then(|c| c.serving).unwrap_or(true),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            placement: Placement { node_name: ep.node_name.clone(), zone_hints, node_hints }.shared(),
        });
    }

    Ok(Converted::Proxied(SliceInfo {
        namespace: ns.to_string(),
        name: name.to_string(),
        service_name,
        family,
        ports,
        endpoints,
    }))
}

/// Topology hint names, sorted and deduplicated. They are only compared with the node's name and
/// zone, never written into a rule, so any text is harmless; only their number is bounded.
fn hint_names<T>(hints: &[T], name: impl Fn(&T) -> &String) -> Result<Vec<String>, usize> {
    if hints.len() > MAX_ENDPOINT_HINTS {
        return Err(hints.len());
    }
    let mut v: Vec<String> = hints.iter().map(|h| name(h).clone()).filter(|n| !n.is_empty()).collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// Converts a Node: name, labels and primary IPs as upstream `GetNodeHostIPs` picks them: all
/// InternalIPs then all ExternalIPs, in order; the first of those, plus the first of the other
/// family. Unparseable addresses are skipped, as upstream does.
pub fn node(node: &Node) -> Result<NodeInfo, Rejected> {
    let name = node.metadata.name.as_deref().unwrap_or("");
    if !is_dns1123_subdomain(name) {
        return Err(Rejected::new(
            "Node",
            "",
            name,
            format!("metadata.name {name:?} is not a valid DNS-1123 subdomain"),
        ));
    }
    let addrs = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or(&[]);
    let of_type =
        |t: &'static str| addrs.iter().filter(move |a| a.type_ == t).filter_map(|a| parse_ip_sloppy(&a.address));
    let all: Vec<IpAddr> = of_type("InternalIP").chain(of_type("ExternalIP")).collect();
    let mut primary_ips = Vec::new();
    if let Some(first) = all.first() {
        primary_ips.push(*first);
        if let Some(other) = all.iter().find(|ip| Family::of(ip) != Family::of(first)) {
            primary_ips.push(*other);
        }
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or(&[])
        .iter()
        .any(|t| t.key == TO_BE_DELETED_TAINT);
    let spec = node.spec.as_ref();
    let pod_cidrs = match spec.and_then(|s| s.pod_cidrs.as_deref()).filter(|v| !v.is_empty()) {
        Some(v) => v.iter().filter_map(|c| Cidr::parse(c.trim()).ok()).collect(),
        None => spec.and_then(|s| s.pod_cidr.as_deref()).and_then(|c| Cidr::parse(c.trim()).ok()).into_iter().collect(),
    };
    Ok(NodeInfo {
        name: name.to_string(),
        primary_ips,
        addresses: all,
        pod_cidrs,
        labels: node.metadata.labels.clone().unwrap_or_default(),
        being_deleted: node.metadata.deletion_timestamp.is_some() || tainted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("fixture Service")
    }
    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("fixture EndpointSlice")
    }
    fn proxied_svc(yaml: &str) -> ServiceInfo {
        match service(&svc(yaml)) {
            Ok(Converted::Proxied(s)) => s,
            other => panic!("expected proxied, got {other:?}"),
        }
    }
    /// The ports of a converted Service, unshared, for comparing with fixtures.
    fn ports(s: &ServiceInfo) -> Vec<ServicePort> {
        s.ports.iter().map(|p| ServicePort::clone(p)).collect()
    }
    fn rejected_svc(yaml: &str) -> String {
        match service(&svc(yaml)) {
            Err(r) => r.to_string(),
            other => panic!("expected rejection, got {other:?}"),
        }
    }
    fn proxied_slice(yaml: &str) -> SliceInfo {
        match endpoint_slice(&slice(yaml)) {
            Ok(Converted::Proxied(s)) => s,
            other => panic!("expected proxied, got {other:?}"),
        }
    }
    fn rejected_slice(yaml: &str) -> String {
        match endpoint_slice(&slice(yaml)) {
            Err(r) => r.to_string(),
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    const SVC1: &str = "
metadata: {namespace: ns1, name: svc1}
spec:
  clusterIP: 172.30.0.41
  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]
";

    #[test]
    fn clusterip_service_gives_one_port_per_spec_port() {
        let s = proxied_svc(SVC1);
        assert_eq!(
            ports(&s),
            vec![ServicePort::cluster_ip("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80).with_node_port(3001)]
        );
    }

    #[test]
    fn protocol_defaults_to_tcp_and_unnamed_port_is_empty_name() {
        let s = proxied_svc("metadata: {namespace: a, name: b}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 53}]}");
        assert_eq!(s.ports[0].name, ServicePortName::new("a", "b", "", Protocol::Tcp));
    }

    #[test]
    fn same_port_number_on_three_protocols_is_three_service_ports() {
        let s = proxied_svc(
            "metadata: {namespace: a, name: b}
spec:
  clusterIP: 172.30.0.42
  ports:
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: dns-udp, port: 53, protocol: UDP}
  - {name: dns-sctp, port: 53, protocol: SCTP}",
        );
        let protos: Vec<_> = s.ports.iter().map(|p| p.name.protocol()).collect();
        assert_eq!(protos, vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]);
    }

    #[test]
    fn dual_stack_gives_ports_per_family_with_ips_of_that_family() {
        let s = proxied_svc(
            "metadata: {namespace: a, name: b}
spec:
  clusterIP: fd00:172:30::41
  clusterIPs: [fd00:172:30::41, 172.30.0.41]
  externalIPs: [192.168.99.11, 2001:db8::11]
  ports: [{name: http, port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 1.2.3.4}, {ip: '2600::1'}, {hostname: lb.example.com}]",
        );
        assert_eq!(
            ports(&s),
            vec![
                ServicePort::cluster_ip("a", "b", "http", Protocol::Tcp, "172.30.0.41", 80)
                    .with_external_ip("192.168.99.11")
                    .with_load_balancer_ip("1.2.3.4"),
                ServicePort::cluster_ip("a", "b", "http", Protocol::Tcp, "fd00:172:30::41", 80)
                    .with_external_ip("2001:db8::11")
                    .with_load_balancer_ip("2600::1"),
            ]
        );
    }

    #[test]
    fn ipv6_only_service_has_no_ipv4_ports() {
        let s = proxied_svc("metadata: {namespace: a, name: b}\nspec: {clusterIPs: ['fd00::1'], ports: [{port: 80}]}");
        assert!(s.ports.iter().all(|p| p.family() == Family::V6));
        assert_eq!(s.ports.len(), 1);
    }

    #[test]
    fn lb_ingress_ipmode_proxy_is_left_out() {
        let s = proxied_svc(
            "metadata: {namespace: a, name: b}
spec: {clusterIP: 10.0.0.1, type: LoadBalancer, ports: [{port: 80, nodePort: 30001}]}
status: {loadBalancer: {ingress: [{ip: 1.2.3.4, ipMode: Proxy}, {ip: 5.6.7.8, ipMode: VIP}, {ip: 9.10.11.12}]}}",
        );
        let lbs: Vec<String> = s.ports[0].load_balancer_ips.iter().map(|i| i.to_string()).collect();
        assert_eq!(lbs, vec!["5.6.7.8", "9.10.11.12"]);
    }

    #[test]
    fn sloppy_ips_are_normalised() {
        let s = proxied_svc(
            "metadata: {namespace: a, name: b}
spec: {clusterIP: 172.30.0.041, externalIPs: ['192.168.099.022'], ports: [{port: 80}]}
status: {loadBalancer: {ingress: [{ip: ' 1.2.3.004'}]}}",
        );
        assert_eq!(
            *s.ports[0],
            ServicePort::cluster_ip("a", "b", "", Protocol::Tcp, "172.30.0.41", 80)
                .with_external_ip("192.168.99.22")
                .with_load_balancer_ip("1.2.3.4")
        );
    }

    #[test]
    fn skipped_services() {
        let cases = [
            ("spec: {clusterIP: None, ports: [{port: 80}]}", Skip::Headless),
            ("spec: {clusterIP: '', ports: [{port: 80}]}", Skip::Headless),
            ("spec: {ports: [{port: 80}]}", Skip::Headless),
            ("spec: {clusterIPs: [None]}", Skip::Headless),
            ("spec: {type: ExternalName, clusterIP: 10.0.0.1, externalName: x.example.com}", Skip::ExternalName),
        ];
        for (spec, want) in cases {
            let got = service(&svc(&format!("metadata: {{namespace: a, name: b}}\n{spec}")));
            assert_eq!(got, Ok(Converted::Skipped(want)), "{spec}");
        }
        for label in [LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS] {
            // Skipped before validation: other proxies' objects are none of our business.
            let y = format!(
                "metadata: {{namespace: a, name: 'B;', labels: {{{label}: x}}}}\nspec: {{clusterIP: 10.0.0.1}}"
            );
            assert!(matches!(service(&svc(&y)), Ok(Converted::Skipped(_))), "{label}");
        }
    }

    #[test]
    fn invalid_services_are_rejected_with_reason() {
        let base = |spec: &str| format!("metadata: {{namespace: ns1, name: svc1}}\nspec: {spec}");
        let cases = [
            ("{clusterIP: 10.0.0.300, ports: [{port: 80}]}", "spec.clusterIP \"10.0.0.300\" is not an IP address"),
            ("{clusterIP: bogus, ports: [{port: 80}]}", "spec.clusterIP \"bogus\" is not an IP address"),
            ("{clusterIP: 10.0.0.1, ports: [{port: 0}]}", "spec.ports[0].port 0 is out of range 1-65535"),
            ("{clusterIP: 10.0.0.1, ports: [{port: 70000}]}", "spec.ports[0].port 70000 is out of range 1-65535"),
            ("{clusterIP: 10.0.0.1, ports: [{port: -1}]}", "spec.ports[0].port -1 is out of range"),
            ("{clusterIP: 10.0.0.1, ports: [{port: 80, nodePort: 65536}]}", "nodePort 65536 is out of range"),
            ("{clusterIP: 10.0.0.1, ports: [{port: 80, nodePort: -5}]}", "nodePort -5 is out of range"),
            (
                "{clusterIP: 10.0.0.1, ports: [{port: 80, protocol: HTTP}]}",
                "spec.ports[0].protocol \"HTTP\" is not TCP, UDP or SCTP",
            ),
            ("{clusterIP: 10.0.0.1, ports: [{port: 80, protocol: tcp}]}", "\"tcp\" is not TCP"),
            (
                "{clusterIP: 10.0.0.1, externalIPs: [1.2.3.4, nope], ports: [{port: 80}]}",
                "spec.externalIPs[1] \"nope\"",
            ),
            (
                "{clusterIP: 10.0.0.1, ports: [{name: 'a\"b', port: 80}]}",
                "spec.ports[0].name \"a\\\"b\" is not a valid port name",
            ),
            ("{clusterIP: 10.0.0.1, ports: [{name: HTTP, port: 80}]}", "spec.ports[0].name \"HTTP\""),
            (
                "{clusterIP: 10.0.0.1, ports: [{name: a, port: 80}, {name: b, port: 80}]}",
                "spec.ports[1] duplicates spec.ports[0] (80/TCP)",
            ),
            ("{clusterIP: 10.0.0.1, ports: [{name: a, port: 80}, {name: a, port: 81}]}", "same name \"a\""),
            ("{clusterIPs: [10.0.0.1, 10.0.0.2], ports: [{port: 80}]}", "two IPv4 addresses"),
            ("{clusterIPs: [10.0.0.1, 'fd00::1', 10.0.0.2], ports: [{port: 80}]}", "3 entries"),
            ("{clusterIP: 10.0.0.1, clusterIPs: [10.0.0.2], ports: [{port: 80}]}", "differs from spec.clusterIPs[0]"),
            (
                "{clusterIP: x, clusterIPs: [10.0.0.2], ports: [{port: 80}]}",
                "spec.clusterIP \"x\" is not an IP address",
            ),
        ];
        for (spec, want) in cases {
            let got = rejected_svc(&base(spec));
            assert!(got.starts_with("Service ns1/svc1: "), "{got}");
            assert!(got.contains(want), "{spec}: {got}");
        }
        let got = rejected_svc(&format!(
            "{}\nstatus: {{loadBalancer: {{ingress: [{{ip: '1.2.3.4; drop'}}]}}}}",
            base("{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
        ));
        assert!(got.contains("status.loadBalancer.ingress[0].ip \"1.2.3.4; drop\""), "{got}");
    }

    #[test]
    fn hostile_names_are_rejected() {
        for (ns, name) in [
            ("default", "web\"x"),
            ("default", "a{b}"),
            ("default", "a;b"),
            ("default", "a b"),
            ("de fault", "web"),
            ("", "web"),
            ("default", ""),
            ("default", "Web"),
            ("default", "a.b"),
        ] {
            let y = format!(
                "metadata: {{namespace: '{ns}', name: '{name}'}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: 80}}]}}"
            );
            let got = rejected_svc(&y);
            assert!(got.contains("is not a valid DNS-1123"), "{ns}/{name}: {got}");
        }
    }

    #[test]
    fn traffic_policies_follow_upstream_service_info() {
        let lb = |extra: &str| {
            proxied_svc(&format!(
                "metadata: {{namespace: a, name: b}}
spec:
  type: LoadBalancer
  clusterIP: 10.0.0.1
  ports: [{{port: 80, nodePort: 30080}}]
{extra}"
            ))
            .ports
            .remove(0)
        };
        let p = lb("  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  healthCheckNodePort: 30000");
        assert!(p.external_traffic_policy_local && p.internal_traffic_policy_local);
        assert_eq!(p.health_check_node_port, 30000);
        assert!(p.uses_cluster_endpoints() && p.uses_local_endpoints());
        let p = lb("  externalTrafficPolicy: Cluster\n  healthCheckNodePort: 30000");
        assert!(!p.external_traffic_policy_local);
        assert_eq!(p.health_check_node_port, 0, "only eTP Local LoadBalancers need a health check");
        assert_eq!(lb("").session_affinity_timeout, None);

        // externalTrafficPolicy only applies to externally accessible types (ExternalPolicyLocal).
        let cip = |extra: &str| {
            proxied_svc(&format!(
                "metadata: {{namespace: a, name: b}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: 80}}], {extra}}}"
            ))
            .ports
            .remove(0)
        };
        let p = cip("externalTrafficPolicy: Local, internalTrafficPolicy: Local");
        assert!(!p.external_traffic_policy_local && p.internal_traffic_policy_local);
        assert!(!p.uses_cluster_endpoints() && p.uses_local_endpoints());
        let p = cip("externalTrafficPolicy: Local, externalIPs: [192.168.99.1]");
        assert!(p.external_traffic_policy_local, "a ClusterIP Service with externalIPs is accessible");
        let p = cip("type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 30000");
        assert!(p.external_traffic_policy_local);
        assert_eq!(p.health_check_node_port, 0, "NodePort Services get no health check port");

        // Session affinity: the API default timeout, an explicit one.
        assert_eq!(cip("sessionAffinity: ClientIP").session_affinity_timeout, Some(10800));
        let p = cip("sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}");
        assert_eq!(p.session_affinity_timeout, Some(60));
        assert_eq!(cip("sessionAffinity: None").session_affinity_timeout, None);
    }

    #[test]
    fn source_ranges_are_trimmed_normalised_and_split_by_family() {
        let s = proxied_svc(
            "metadata: {namespace: a, name: b}
spec:
  type: LoadBalancer
  clusterIPs: [172.30.0.41, 'fd00::41']
  ports: [{port: 80, nodePort: 30080}]
  loadBalancerSourceRanges: [' 203.0.113.0/25', '203.0.113.000/025', '192.168.0.7/24 ', '2001:db8::/32']",
        );
        let ranges = |p: &ServicePort| p.load_balancer_source_ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        // Case 62: whitespace trimmed; case 61: leading zeros decimal; duplicates once; host bits cleared.
        assert_eq!(ranges(&s.ports[0]), vec!["203.0.113.0/25", "192.168.0.0/24"]);
        assert_eq!(ranges(&s.ports[1]), vec!["2001:db8::/32"]);
    }

    #[test]
    fn invalid_policies_and_ranges_reject_the_service() {
        let base = |spec: &str| {
            format!("metadata: {{namespace: ns1, name: svc1}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: 80}}], {spec}}}")
        };
        let cases = [
            (
                "loadBalancerSourceRanges: [10.0.0.0/8, bogus]",
                "spec.loadBalancerSourceRanges[1] \"bogus\" is not a CIDR",
            ),
            ("loadBalancerSourceRanges: ['10.0.0.1']", "spec.loadBalancerSourceRanges[0] \"10.0.0.1\" is not a CIDR"),
            ("loadBalancerSourceRanges: ['10.0.0.0/33']", "\"10.0.0.0/33\" is not a CIDR"),
            ("loadBalancerSourceRanges: ['10.0.0.0/-1']", "is not a CIDR"),
            ("loadBalancerSourceRanges: ['10.0.0.0/8; drop']", "is not a CIDR"),
            ("externalTrafficPolicy: local", "spec.externalTrafficPolicy \"local\" is not Cluster or Local"),
            ("internalTrafficPolicy: OnlyLocal", "spec.internalTrafficPolicy \"OnlyLocal\""),
            ("sessionAffinity: Cookie", "spec.sessionAffinity \"Cookie\" is not None or ClientIP"),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
                "timeoutSeconds 0 is out of range 1-86400",
            ),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
                "timeoutSeconds 86401",
            ),
            (
                "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 70000",
                "spec.healthCheckNodePort 70000 is out of range",
            ),
        ];
        for (spec, want) in cases {
            let got = rejected_svc(&base(spec));
            assert!(got.starts_with("Service ns1/svc1: "), "{got}");
            assert!(got.contains(want), "{spec}: {got}");
        }
    }

    #[test]
    fn endpoint_hints_are_read_sorted_and_bounded() {
        let s = proxied_slice(
            "metadata: {namespace: a, name: s, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  hints: {forZones: [{name: zone-b}, {name: zone-a}, {name: zone-b}], forNodes: [{name: node-1}]}
- addresses: [10.0.0.2]",
        );
        assert_eq!(s.endpoints[0].placement.zone_hints, vec!["zone-a", "zone-b"]);
        assert_eq!(s.endpoints[0].placement.node_hints, vec!["node-1"]);
        assert_eq!(*s.endpoints[1].placement, Placement { node_name: None, ..Default::default() });
        let zones: Vec<String> = (0..9).map(|i| format!("{{name: z{i}}}")).collect();
        let got = rejected_slice(&format!(
            "metadata: {{namespace: ns1, name: s1, labels: {{kubernetes.io/service-name: b}}}}
addressType: IPv4
endpoints: [{{addresses: [10.0.0.1], hints: {{forZones: [{}]}}}}]",
            zones.join(", ")
        ));
        assert!(got.contains("endpoints[0].hints.forZones has 9 entries, over the API limit of 8"), "{got}");
    }

    const SLICE: &str = "
metadata:
  namespace: ns1
  name: svc1-abc
  labels: {kubernetes.io/service-name: svc1}
addressType: IPv4
ports: [{name: p80, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.180.0.1, 10.180.0.9]
  nodeName: node-a
  hostname: web-0
- addresses: [10.180.0.2]
  conditions: {ready: false, terminating: true}
- addresses: [10.180.0.3]
  conditions: {ready: false, serving: false}
";

    #[test]
    fn slice_conversion_defaults_and_first_address() {
        let s = proxied_slice(SLICE);
        assert_eq!(s.service_name, "svc1");
        assert_eq!(s.family, Family::V4);
        assert_eq!(s.ports, vec![SlicePort { name: "p80".into(), protocol: Protocol::Tcp, port: 8080 }]);
        let ep = |ip: &str, ready, serving, terminating, node: Option<&str>| SliceEndpoint {
            ip: ip.parse().unwrap(),
            ready,
            serving,
            terminating,
            placement: Placement { node_name: node.map(String::from), ..Default::default() }.shared(),
        };
        assert_eq!(
            s.endpoints,
            vec![
                ep("10.180.0.1", true, true, false, Some("node-a")),
                // serving unset defaults to true even when not ready (case 24).
                ep("10.180.0.2", false, true, true, None),
                ep("10.180.0.3", false, false, false, None),
            ]
        );
    }

    #[test]
    fn slice_ports_with_nil_name_or_zero_port_are_ignored() {
        let s = proxied_slice(
            "metadata: {namespace: a, name: s, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{port: 80}, {name: x}, {name: y, port: 0}, {name: '', port: 81}, {name: z, port: 82, protocol: UDP}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: []}]",
        );
        assert_eq!(
            s.ports,
            vec![
                SlicePort { name: "".into(), protocol: Protocol::Tcp, port: 81 },
                SlicePort { name: "z".into(), protocol: Protocol::Udp, port: 82 },
            ]
        );
        assert_eq!(s.endpoints.len(), 1, "endpoint without addresses ignored");
    }

    #[test]
    fn skipped_slices() {
        let fqdn = "metadata: {namespace: a, name: s, labels: {kubernetes.io/service-name: b}}\naddressType: FQDN\nendpoints: [{addresses: [x.example.com]}]";
        assert_eq!(endpoint_slice(&slice(fqdn)), Ok(Converted::Skipped(Skip::FqdnSlice)));
        let other = "metadata: {namespace: a, name: s, labels: {service.kubernetes.io/service-proxy-name: x}}\naddressType: IPv4\nendpoints: []";
        assert_eq!(endpoint_slice(&slice(other)), Ok(Converted::Skipped(Skip::OtherProxy)));
    }

    #[test]
    fn invalid_slices_are_rejected_with_reason() {
        let with =
            |labels: &str, rest: &str| format!("metadata: {{namespace: ns1, name: s1, labels: {{{labels}}}}}\n{rest}");
        let l = "kubernetes.io/service-name: svc1";
        let cases = [
            (with("", "addressType: IPv4\nendpoints: []"), "missing label kubernetes.io/service-name"),
            (
                with("kubernetes.io/service-name: 'a;b'", "addressType: IPv4\nendpoints: []"),
                "\"a;b\" is not a valid Service name",
            ),
            (with(l, "addressType: ipv4\nendpoints: []"), "addressType \"ipv4\" is not IPv4, IPv6 or FQDN"),
            (
                with(l, "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: ['10.0.0']}]"),
                "endpoints[1].addresses[0] \"10.0.0\" is not an IP address",
            ),
            (
                with(l, "addressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]"),
                "\"fd00::1\" is IPv6 in an addressType IPv4 slice",
            ),
            (
                with(l, "addressType: IPv6\nendpoints: [{addresses: ['10.0.0.1']}]"),
                "is IPv4 in an addressType IPv6 slice",
            ),
            (
                with(l, "addressType: IPv4\nports: [{name: a, port: 70000}]\nendpoints: []"),
                "ports[0].port 70000 is out of range 0-65535",
            ),
            (with(l, "addressType: IPv4\nports: [{name: a, port: -1}]\nendpoints: []"), "ports[0].port -1"),
            (
                with(l, "addressType: IPv4\nports: [{name: a, port: 80, protocol: ICMP}]\nendpoints: []"),
                "ports[0].protocol \"ICMP\"",
            ),
            (with(l, "addressType: IPv4\nports: [{name: 'a}', port: 80}]\nendpoints: []"), "ports[0].name \"a}\""),
            (
                with(l, "addressType: IPv4\nports: [{name: a, port: 80}, {name: a, port: 81}]\nendpoints: []"),
                "ports[1] repeats name \"a\"",
            ),
        ];
        for (y, want) in cases {
            let got = rejected_slice(&y);
            assert!(got.starts_with("EndpointSlice ns1/s1: "), "{got}");
            assert!(got.contains(want), "{y}\n=> {got}");
        }
        let got = rejected_slice(&format!(
            "metadata: {{namespace: ns1, name: 's1\"; flush', labels: {{{l}}}}}\naddressType: IPv4\nendpoints: []"
        ));
        assert!(got.contains("is not a valid DNS-1123 subdomain"), "{got}");
    }

    #[test]
    fn absurd_slices_are_rejected() {
        let mut s = slice("metadata: {namespace: a, name: s, labels: {kubernetes.io/service-name: b}}\naddressType: IPv4\nendpoints: []");
        let ep: k8s_openapi::api::discovery::v1::Endpoint = serde_yaml::from_str("addresses: [10.0.0.1]").unwrap();
        s.endpoints = vec![ep.clone(); MAX_SLICE_ENDPOINTS + 1];
        assert!(endpoint_slice(&s).unwrap_err().reason.contains("1001 endpoints exceed"));
        let mut many = ep.clone();
        many.addresses = vec!["10.0.0.1".into(); MAX_ENDPOINT_ADDRESSES + 1];
        s.endpoints = vec![many];
        assert!(endpoint_slice(&s).unwrap_err().reason.contains("101 addresses"));
    }

    fn node_of(yaml: &str) -> NodeInfo {
        node(&serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn node_pod_cidrs_from_spec() {
        let n = node_of("metadata: {name: a}\nspec: {podCIDRs: [10.244.1.0/24, 'fd00:1::/64', bad]}");
        assert_eq!(n.pod_cidrs, vec![Cidr::parse("10.244.1.0/24").unwrap(), Cidr::parse("fd00:1::/64").unwrap()]);
        let n = node_of("metadata: {name: a}\nspec: {podCIDR: 10.244.2.0/24}");
        assert_eq!(n.pod_cidrs, vec![Cidr::parse("10.244.2.0/24").unwrap()]);
    }

    #[test]
    fn node_primary_ips_prefer_internal_then_external_per_family() {
        let n = node_of(
            "metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}
status:
  addresses:
  - {type: Hostname, address: node-a}
  - {type: ExternalIP, address: 203.0.113.5}
  - {type: InternalIP, address: not-an-ip}
  - {type: InternalIP, address: 192.168.0.2}
  - {type: InternalIP, address: 192.168.0.3}
  - {type: ExternalIP, address: '2001:db8::1'}",
        );
        assert_eq!(n.name, "node-a");
        assert_eq!(n.labels.get("topology.kubernetes.io/zone").map(String::as_str), Some("z1"));
        let ips: Vec<String> = n.primary_ips.iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, vec!["192.168.0.2", "2001:db8::1"]);

        let n = node_of("metadata: {name: n}\nstatus: {addresses: [{type: ExternalIP, address: 203.0.113.5}]}");
        assert_eq!(n.primary_ips, vec!["203.0.113.5".parse::<IpAddr>().unwrap()]);
        assert!(node_of("metadata: {name: n}").primary_ips.is_empty());
        let bad: Node = serde_yaml::from_str("metadata: {name: 'n;x'}").unwrap();
        assert!(node(&bad).unwrap_err().to_string().starts_with("Node n;x: metadata.name"));
    }

    #[test]
    fn node_being_deleted_by_timestamp_or_autoscaler_taint() {
        assert!(!node_of("metadata: {name: n}").being_deleted);
        assert!(!node_of("metadata: {name: n}\nspec: {taints: [{key: other, effect: NoSchedule}]}").being_deleted);
        assert!(
            node_of("metadata: {name: n}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}]}")
                .being_deleted
        );
        assert!(node_of("metadata: {name: n, deletionTimestamp: '2024-01-01T00:00:00Z'}").being_deleted);
    }
}
