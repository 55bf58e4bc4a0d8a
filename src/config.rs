//! kube-proxy-compatible flags, parsed and validated once into a `Config` that is passed
//! explicitly to every part of the daemon.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rules::model::{Cidr, Family, LocalDetector, NodeInfo, NodePortAddresses};

use crate::config_file::KubeProxyConfiguration;

/// A configuration error: names the flag (or field) and says what is wrong with the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for {flag}: {reason}")]
    Invalid { flag: &'static str, value: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    File(String),
}

fn invalid(flag: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { flag, value: value.to_string(), reason: reason.into() }
}

/// The flags, with kube-proxy's names and defaults.
#[derive(Debug, Parser)]
#[command(name = "kproxy", version, about = "A Rust kube-proxy: Services and EndpointSlices to atomic nftables rules")]
pub struct Flags {
    /// Which proxy mode to use: 'nftables' (default) or 'iptables'.
    #[arg(long = "proxy-mode", default_value = "")]
    pub proxy_mode: String,
    /// If non-empty, use this string as identification instead of the actual hostname.
    #[arg(long = "hostname-override", default_value = "")]
    pub hostname_override: String,
    /// The CIDR range of the pods in the cluster (comma-separated dual-stack pair allowed).
    /// Traffic to a ClusterIP from outside it is masqueraded.
    #[arg(long = "cluster-cidr", default_value = "")]
    pub cluster_cidr: String,
    /// Which node IPs NodePorts answer on: 'primary' (default), 'all', or a comma-separated
    /// list of CIDRs.
    #[arg(long = "nodeport-addresses", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// SNAT all traffic sent via Service cluster IPs.
    #[arg(long = "masquerade-all", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub masquerade_all: bool,
    /// The bit of the packet mark that requests masquerade (0-31).
    #[arg(long = "iptables-masquerade-bit", default_value_t = 14)]
    pub masquerade_bit: u8,
    /// How often rules are re-synced in full even without changes (e.g. '30s', '2m').
    #[arg(long = "iptables-sync-period", default_value = "30s")]
    pub sync_period: String,
    /// Minimum interval between two syncs ('0s' allowed).
    #[arg(long = "iptables-min-sync-period", default_value = "1s")]
    pub min_sync_period: String,
    /// kproxy: read Service, EndpointSlice and Node objects from the YAML files in DIR instead of
    /// an API server, and re-read them on change.
    #[arg(long = "manifests", value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// kproxy: print the ruleset as an nft script and exit, without touching the kernel.
    #[arg(long = "dry-run", default_value_t = false)]
    pub dry_run: bool,
    /// Remove everything kproxy (or kube-proxy) programmed and exit.
    #[arg(long = "cleanup", default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub cleanup: bool,
    /// Log verbosity, as kube-proxy's -v (0 = info, 2 = more info, 4+ = debug, 6+ = trace).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u8,
    /// Log format: 'text' (default) or 'json'.
    #[arg(long = "logging-format", default_value = "text")]
    pub logging_format: String,
    /// Path to a kubeconfig file with authorization and API server location.
    #[arg(long = "kubeconfig", default_value = "")]
    pub kubeconfig: String,
    /// The address of the Kubernetes API server (overrides the kubeconfig).
    #[arg(long = "master", default_value = "")]
    pub master: String,
    /// A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file. When given, the other
    /// kube-proxy flags are ignored, except --hostname-override, as upstream.
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address and port of the health server (/healthz, /livez).
    #[arg(long = "healthz-bind-address", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Address and port of the metrics server (/metrics).
    #[arg(long = "metrics-bind-address", default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// Maximum requests per second to the API server.
    #[arg(long = "kube-api-qps", default_value_t = 5.0)]
    pub kube_api_qps: f32,
    /// Burst of requests to the API server.
    #[arg(long = "kube-api-burst", default_value_t = 10)]
    pub kube_api_burst: u32,
    /// Content type of requests to the API server.
    #[arg(long = "kube-api-content-type", default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,

    // kube-proxy flags kproxy accepts so that existing command lines keep working; setting one
    // to a non-default value logs a warning naming it until it is implemented.
    #[arg(long = "bind-address", default_value = "0.0.0.0", hide = true)]
    pub bind_address: String,
    #[arg(long = "bind-address-hard-fail", default_value_t = false, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub bind_address_hard_fail: bool,
    #[arg(long = "profiling", default_value_t = false, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub profiling: bool,
    #[arg(long = "show-hidden-metrics-for-version", default_value = "", hide = true)]
    pub show_hidden_metrics_for_version: String,
    #[arg(long = "feature-gates", default_value = "", hide = true)]
    pub feature_gates: String,
    #[arg(long = "write-config-to", default_value = "", hide = true)]
    pub write_config_to: String,
    #[arg(long = "init-only", default_value_t = false, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub init_only: bool,
    /// iptables mode: IPv4 NodePorts also answer on localhost (sets route_localnet=1) when the
    /// nodeport addresses cover 127.0.0.1.
    #[arg(long = "iptables-localhost-nodeports", default_value_t = true, num_args = 0..=1, default_missing_value = "true")]
    pub iptables_localhost_nodeports: bool,
    #[arg(long = "detect-local-mode", default_value = "", hide = true)]
    pub detect_local_mode: String,
    #[arg(long = "pod-bridge-interface", default_value = "", hide = true)]
    pub pod_bridge_interface: String,
    #[arg(long = "pod-interface-name-prefix", default_value = "", hide = true)]
    pub pod_interface_name_prefix: String,
    #[arg(long = "oom-score-adj", default_value_t = -999, allow_negative_numbers = true, hide = true)]
    pub oom_score_adj: i32,
    #[arg(long = "conntrack-max-per-core", default_value_t = 32768, hide = true)]
    pub conntrack_max_per_core: i32,
    #[arg(long = "conntrack-min", default_value_t = 131072, hide = true)]
    pub conntrack_min: i32,
    #[arg(long = "conntrack-tcp-timeout-established", default_value = "24h0m0s", hide = true)]
    pub conntrack_tcp_timeout_established: String,
    #[arg(long = "conntrack-tcp-timeout-close-wait", default_value = "1h0m0s", hide = true)]
    pub conntrack_tcp_timeout_close_wait: String,
    #[arg(long = "conntrack-tcp-be-liberal", default_value_t = false, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub conntrack_tcp_be_liberal: bool,
    #[arg(long = "conntrack-udp-timeout", default_value = "0s", hide = true)]
    pub conntrack_udp_timeout: String,
    #[arg(long = "conntrack-udp-timeout-stream", default_value = "0s", hide = true)]
    pub conntrack_udp_timeout_stream: String,
    #[arg(long = "config-sync-period", default_value = "15m0s", hide = true)]
    pub config_sync_period: String,
    #[arg(long = "ipvs-sync-period", default_value = "30s", hide = true)]
    pub ipvs_sync_period: String,
    #[arg(long = "ipvs-min-sync-period", default_value = "0s", hide = true)]
    pub ipvs_min_sync_period: String,
    #[arg(long = "ipvs-scheduler", default_value = "", hide = true)]
    pub ipvs_scheduler: String,
    #[arg(long = "ipvs-exclude-cidrs", default_value = "", hide = true)]
    pub ipvs_exclude_cidrs: String,
    #[arg(long = "ipvs-strict-arp", default_value_t = false, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub ipvs_strict_arp: bool,
    #[arg(long = "ipvs-tcp-timeout", default_value = "0s", hide = true)]
    pub ipvs_tcp_timeout: String,
    #[arg(long = "ipvs-tcpfin-timeout", default_value = "0s", hide = true)]
    pub ipvs_tcpfin_timeout: String,
    #[arg(long = "ipvs-udp-timeout", default_value = "0s", hide = true)]
    pub ipvs_udp_timeout: String,
    /// Deprecated in kube-proxy; no effect.
    #[arg(long = "healthz-port", hide = true)]
    pub healthz_port: Option<u16>,
    /// Deprecated in kube-proxy; no effect.
    #[arg(long = "metrics-port", hide = true)]
    pub metrics_port: Option<u16>,
    /// Deprecated in kube-proxy; no effect.
    #[arg(long = "proxy-port-range", default_value = "", hide = true)]
    pub proxy_port_range: String,
    #[arg(long = "vmodule", default_value = "", hide = true)]
    pub vmodule: String,
}

/// Which ruleset kind kproxy programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Nftables,
    Iptables,
}

impl ProxyMode {
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
        }
    }
}

/// `--nodeport-addresses`, resolved to keywords and per-family CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortSpec {
    Primary,
    Cidrs(Vec<Cidr>),
}

impl NodePortSpec {
    /// What NodePorts answer on in one family, given the node's primary IPs and local addresses.
    pub fn resolve(&self, family: Family, primary_ips: &[IpAddr], local_ips: &[IpAddr]) -> NodePortAddresses {
        match self {
            NodePortSpec::Primary => {
                NodePortAddresses::Ips(primary_ips.iter().filter(|ip| Family::of(ip) == family).copied().collect())
            }
            NodePortSpec::Cidrs(cidrs) => {
                let mine: Vec<&Cidr> = cidrs.iter().filter(|c| c.family() == family).collect();
                // As upstream: no CIDR of this family, or a /0, means every local address.
                if mine.is_empty() || mine.iter().any(|c| c.len == 0) {
                    return NodePortAddresses::All;
                }
                NodePortAddresses::Ips(
                    local_ips
                        .iter()
                        .filter(|ip| Family::of(ip) == family && !ip.is_loopback())
                        .filter(|ip| mine.iter().any(|c| c.contains(ip)))
                        .copied()
                        .collect(),
                )
            }
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: ProxyMode,
    pub hostname: String,
    pub cluster_cidrs: Vec<Cidr>,
    /// How traffic from local pods is detected (`--detect-local-mode`).
    pub detect_local: DetectLocal,
    pub nodeport: NodePortSpec,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    /// iptables mode: IPv4 NodePorts also answer on 127.0.0.1 when the nodeport addresses cover
    /// it (`--iptables-localhost-nodeports`, `iptables.localhostNodePorts`; default true).
    pub localhost_nodeports: bool,
    pub manifests: Option<PathBuf>,
    pub dry_run: bool,
    pub cleanup: bool,
    pub verbosity: u8,
    pub json_logs: bool,
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub kube_api_qps: f32,
    pub kube_api_burst: u32,
    pub healthz_bind_address: String,
    pub metrics_bind_address: String,
    /// Settings given that kproxy does not implement yet (flag or config field names), for a
    /// warning at start-up.
    pub unimplemented: Vec<String>,
}

/// The local-traffic detection mode, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocal {
    /// Source inside `--cluster-cidr` of the family (none given: no detector).
    ClusterCidr,
    /// Source inside the Node's `spec.podCIDRs` of the family.
    NodeCidr,
    /// Input interface is this bridge.
    BridgeInterface(String),
    /// Input interface name starts with this prefix.
    InterfaceNamePrefix(String),
}

impl DetectLocal {
    /// This family's detector, given the node as last seen.
    pub fn detector(&self, family: Family, cluster_cidrs: &[Cidr], node: &NodeInfo) -> LocalDetector {
        let of_family = |cidrs: &[Cidr]| cidrs.iter().copied().find(|c| c.family() == family);
        let d = match self {
            DetectLocal::ClusterCidr => of_family(cluster_cidrs).map(LocalDetector::Cidr),
            DetectLocal::NodeCidr => of_family(&node.pod_cidrs).map(LocalDetector::Cidr),
            DetectLocal::BridgeInterface(i) => Some(LocalDetector::Bridge(i.clone())),
            DetectLocal::InterfaceNamePrefix(p) => Some(LocalDetector::InterfacePrefix(p.clone())),
        };
        d.unwrap_or(LocalDetector::None)
    }
}

/// An interface name (or prefix) nft can match: 1-15 bytes, no quotes, whitespace or `*`.
fn check_ifname(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 15 {
        return Err("longer than 15 characters".into());
    }
    if s.chars().any(|c| c == '"' || c == '\'' || c == '*' || c == '/' || c.is_whitespace() || c.is_control()) {
        return Err("must not contain quotes, whitespace, '/' or '*'".into());
    }
    Ok(())
}

impl Config {
    /// The pure-rules build configuration for one family, with the node as last seen.
    pub fn build_config(
        &self,
        family: Family,
        nodeport: NodePortAddresses,
        node: &NodeInfo,
    ) -> rules::model::BuildConfig {
        let mut b = rules::model::BuildConfig::new(family).with_node(node);
        b.local_detector = self.detect_local.detector(family, &self.cluster_cidrs, node);
        b.masquerade_all = self.masquerade_all;
        b.masquerade_bit = self.masquerade_bit;
        b.nodeport_addresses = nodeport;
        b
    }
}

/// Parses a Go-style duration: `30s`, `1m30s`, `100ms`, `2h`, `0`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| format!("bad number {:?}", &rest[..num_end]))?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let mult = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit (e.g. 30s)".into()),
            u => return Err(format!("unknown unit {u:?}")),
        };
        total += n * mult;
    }
    Ok(Duration::from_secs_f64(total))
}

/// Settings before validation, from the flags or from a config file. `names` says what to call
/// each setting in an error: the flag, or the config field.
struct Raw {
    from_file: bool,
    mode: String,
    hostname: String,
    cluster_cidr: String,
    detect_local_mode: String,
    bridge_interface: String,
    interface_name_prefix: String,
    nodeport: Vec<String>,
    masquerade_all: bool,
    masquerade_bit: i64,
    sync_period: String,
    min_sync_period: String,
    localhost_nodeports: bool,
    logging_format: String,
    verbosity: u32,
    kubeconfig: String,
    master: String,
    qps: f32,
    burst: i64,
    healthz: String,
    metrics: String,
}

impl Raw {
    fn name(&self, flag: &'static str, field: &'static str) -> &'static str {
        if self.from_file {
            field
        } else {
            flag
        }
    }
}

impl Flags {
    /// Settings that were changed from kube-proxy's defaults but are not implemented yet.
    fn unimplemented(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut note = |cond: bool, name: &str| {
            if cond {
                out.push(name.to_string());
            }
        };
        note(self.bind_address != "0.0.0.0" && self.bind_address != "::", "--bind-address");
        note(self.bind_address_hard_fail, "--bind-address-hard-fail");
        note(self.profiling, "--profiling");
        note(!self.show_hidden_metrics_for_version.is_empty(), "--show-hidden-metrics-for-version");
        note(!self.feature_gates.is_empty(), "--feature-gates");
        note(!self.write_config_to.is_empty(), "--write-config-to");
        note(self.init_only, "--init-only");
        note(self.oom_score_adj != -999, "--oom-score-adj");
        note(self.conntrack_max_per_core != 32768, "--conntrack-max-per-core");
        note(self.conntrack_min != 131072, "--conntrack-min");
        note(self.conntrack_tcp_timeout_established != "24h0m0s", "--conntrack-tcp-timeout-established");
        note(self.conntrack_tcp_timeout_close_wait != "1h0m0s", "--conntrack-tcp-timeout-close-wait");
        note(self.conntrack_tcp_be_liberal, "--conntrack-tcp-be-liberal");
        note(self.conntrack_udp_timeout != "0s", "--conntrack-udp-timeout");
        note(self.conntrack_udp_timeout_stream != "0s", "--conntrack-udp-timeout-stream");
        note(!self.vmodule.is_empty(), "--vmodule");
        out
    }

    fn raw_from_flags(&self) -> Raw {
        Raw {
            from_file: false,
            mode: self.proxy_mode.clone(),
            hostname: self.hostname_override.clone(),
            cluster_cidr: self.cluster_cidr.clone(),
            detect_local_mode: self.detect_local_mode.clone(),
            bridge_interface: self.pod_bridge_interface.clone(),
            interface_name_prefix: self.pod_interface_name_prefix.clone(),
            nodeport: self.nodeport_addresses.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit as i64,
            sync_period: self.sync_period.clone(),
            min_sync_period: self.min_sync_period.clone(),
            localhost_nodeports: self.iptables_localhost_nodeports,
            logging_format: self.logging_format.clone(),
            verbosity: self.verbosity as u32,
            kubeconfig: self.kubeconfig.clone(),
            master: self.master.clone(),
            qps: self.kube_api_qps,
            burst: self.kube_api_burst as i64,
            healthz: self.healthz_bind_address.clone(),
            metrics: self.metrics_bind_address.clone(),
        }
    }

    fn raw_from_file(&self, f: &KubeProxyConfiguration) -> Raw {
        use crate::config_file::set;
        let mode = f.mode.clone().unwrap_or_default();
        let ipt = f.iptables.as_ref();
        let nft = f.nftables.as_ref();
        // The section of the mode in use wins; the other is the fallback, then the top level.
        let (first_period, first_min, first_all, first_bit) = if mode == "iptables" {
            (
                ipt.and_then(|i| set(&i.sync_period)),
                ipt.and_then(|i| set(&i.min_sync_period)),
                ipt.and_then(|i| i.masquerade_all),
                ipt.and_then(|i| i.masquerade_bit),
            )
        } else {
            (
                nft.and_then(|n| set(&n.sync_period)),
                nft.and_then(|n| set(&n.min_sync_period)),
                nft.and_then(|n| n.masquerade_all),
                nft.and_then(|n| n.masquerade_bit),
            )
        };
        let cc = f.client_connection.as_ref();
        Raw {
            from_file: true,
            mode,
            // --hostname-override wins over the file, as upstream.
            hostname: if self.hostname_override.trim().is_empty() {
                f.hostname_override.clone().unwrap_or_default()
            } else {
                self.hostname_override.clone()
            },
            cluster_cidr: f.cluster_cidr.clone().unwrap_or_default(),
            detect_local_mode: f.detect_local_mode.clone().unwrap_or_default(),
            bridge_interface: f.detect_local.as_ref().and_then(|d| d.bridge_interface.clone()).unwrap_or_default(),
            interface_name_prefix: f
                .detect_local
                .as_ref()
                .and_then(|d| d.interface_name_prefix.clone())
                .unwrap_or_default(),
            nodeport: f.node_port_addresses.clone().unwrap_or_default(),
            masquerade_all: first_all.unwrap_or(false)
                || ipt.and_then(|i| i.masquerade_all).unwrap_or(false)
                || nft.and_then(|n| n.masquerade_all).unwrap_or(false),
            masquerade_bit: first_bit.map(|b| b as i64).unwrap_or(14),
            sync_period: first_period
                .or(set(&f.sync_period))
                .or(ipt.and_then(|i| set(&i.sync_period)))
                .unwrap_or("30s")
                .to_string(),
            min_sync_period: first_min
                .or(set(&f.min_sync_period))
                .or(ipt.and_then(|i| set(&i.min_sync_period)))
                .unwrap_or("1s")
                .to_string(),
            localhost_nodeports: ipt.and_then(|i| i.localhost_node_ports).unwrap_or(true),
            logging_format: f
                .logging
                .as_ref()
                .and_then(|l| l.format.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "text".into()),
            verbosity: f.logging.as_ref().and_then(|l| l.verbosity).unwrap_or(0).max(self.verbosity as u32),
            kubeconfig: cc.and_then(|c| c.kubeconfig.clone()).unwrap_or_default(),
            master: self.master.clone(),
            qps: cc.and_then(|c| c.qps).filter(|q| *q > 0.0).unwrap_or(5.0),
            burst: cc.and_then(|c| c.burst).filter(|b| *b > 0).unwrap_or(10) as i64,
            healthz: set(&f.healthz_bind_address).unwrap_or("0.0.0.0:10256").to_string(),
            metrics: set(&f.metrics_bind_address).unwrap_or("127.0.0.1:10249").to_string(),
        }
    }

    /// Validates the flags (and the config file, when given) into a `Config`.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let (raw, unimplemented) = match &self.config {
            Some(path) => {
                let f = KubeProxyConfiguration::load(path).map_err(|e| ConfigError::File(e.to_string()))?;
                let un =
                    f.unimplemented_fields().into_iter().map(|s| format!("{} field {s}", path.display())).collect();
                (self.raw_from_file(&f), un)
            }
            None => (self.raw_from_flags(), self.unimplemented()),
        };
        let mode = match raw.mode.as_str() {
            "" | "nftables" => ProxyMode::Nftables,
            "iptables" => ProxyMode::Iptables,
            other => {
                return Err(invalid(raw.name("--proxy-mode", "mode"), other, "must be 'nftables' or 'iptables'"));
            }
        };
        // Error messages name the setting as the user wrote it: the flag, or the field of the
        // section of the mode in use.
        let section = |ipt: &'static str, nft: &'static str| if mode == ProxyMode::Iptables { ipt } else { nft };
        let hostname = if raw.hostname.trim().is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_lowercase()).unwrap_or_default()
        } else {
            raw.hostname.trim().to_lowercase()
        };
        let cidr_name = raw.name("--cluster-cidr", "clusterCIDR");
        let mut cluster_cidrs = Vec::new();
        for part in raw.cluster_cidr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let c = Cidr::parse(part).map_err(|e| invalid(cidr_name, &raw.cluster_cidr, e))?;
            if cluster_cidrs.iter().any(|o: &Cidr| o.family() == c.family()) {
                return Err(invalid(cidr_name, &raw.cluster_cidr, "at most one CIDR per IP family"));
            }
            cluster_cidrs.push(c);
        }
        let mode_name = raw.name("--detect-local-mode", "detectLocalMode");
        let iface = |flag: &'static str, field: &'static str, v: &str| -> Result<String, ConfigError> {
            let name = raw.name(flag, field);
            let v = v.trim();
            if v.is_empty() {
                return Err(invalid(
                    name,
                    v,
                    format!("{name} is required by {mode_name} {}", raw.detect_local_mode.trim()),
                ));
            }
            check_ifname(v).map_err(|e| invalid(name, v, e))?;
            Ok(v.to_string())
        };
        let detect_local = match raw.detect_local_mode.trim() {
            "" | "ClusterCIDR" => DetectLocal::ClusterCidr,
            "NodeCIDR" => DetectLocal::NodeCidr,
            "BridgeInterface" => DetectLocal::BridgeInterface(iface(
                "--pod-bridge-interface",
                "detectLocal.bridgeInterface",
                &raw.bridge_interface,
            )?),
            "InterfaceNamePrefix" => DetectLocal::InterfaceNamePrefix(iface(
                "--pod-interface-name-prefix",
                "detectLocal.interfaceNamePrefix",
                &raw.interface_name_prefix,
            )?),
            other => {
                return Err(invalid(
                    mode_name,
                    other,
                    "must be ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix",
                ))
            }
        };
        let np_name = raw.name("--nodeport-addresses", "nodePortAddresses");
        let np: Vec<String> = raw.nodeport.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        // Unset means `primary` in nftables mode and every address in iptables mode, as upstream.
        let nodeport = if (np.is_empty() && mode == ProxyMode::Nftables) || np == ["primary"] {
            NodePortSpec::Primary
        } else if np.is_empty() || np == ["all"] {
            NodePortSpec::Cidrs(vec![])
        } else {
            let mut cidrs = Vec::new();
            for p in &np {
                if p == "primary" || p == "all" || p == "localhost" {
                    return Err(invalid(
                        np_name,
                        &np.join(","),
                        format!("the keyword {p:?} cannot be combined with CIDRs"),
                    ));
                }
                cidrs.push(Cidr::parse(p).map_err(|e| invalid(np_name, p, e))?);
            }
            NodePortSpec::Cidrs(cidrs)
        };
        let bit_name =
            raw.name("--iptables-masquerade-bit", section("iptables.masqueradeBit", "nftables.masqueradeBit"));
        if !(0..=31).contains(&raw.masquerade_bit) {
            return Err(invalid(bit_name, &raw.masquerade_bit.to_string(), "must be 0-31"));
        }
        let sp_name = raw.name("--iptables-sync-period", section("iptables.syncPeriod", "nftables.syncPeriod"));
        let sync_period = parse_duration(&raw.sync_period).map_err(|e| invalid(sp_name, &raw.sync_period, e))?;
        if sync_period.is_zero() {
            return Err(invalid(sp_name, &raw.sync_period, "must be greater than 0"));
        }
        let msp_name =
            raw.name("--iptables-min-sync-period", section("iptables.minSyncPeriod", "nftables.minSyncPeriod"));
        let min_sync_period =
            parse_duration(&raw.min_sync_period).map_err(|e| invalid(msp_name, &raw.min_sync_period, e))?;
        let json_logs = match raw.logging_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(invalid(raw.name("--logging-format", "logging.format"), other, "must be 'text' or 'json'"))
            }
        };
        for (name, v) in [
            (raw.name("--healthz-bind-address", "healthzBindAddress"), &raw.healthz),
            (raw.name("--metrics-bind-address", "metricsBindAddress"), &raw.metrics),
        ] {
            parse_bind_address(v).map_err(|e| invalid(name, v, e))?;
        }
        if raw.burst < 0 {
            return Err(invalid(
                raw.name("--kube-api-burst", "clientConnection.burst"),
                &raw.burst.to_string(),
                "must not be negative",
            ));
        }
        if self.manifests.is_none() && self.dry_run {
            return Err(ConfigError::Unsupported("--dry-run needs --manifests DIR".into()));
        }
        Ok(Config {
            mode,
            hostname,
            cluster_cidrs,
            detect_local,
            nodeport,
            masquerade_all: raw.masquerade_all,
            masquerade_bit: raw.masquerade_bit as u8,
            sync_period,
            min_sync_period,
            localhost_nodeports: raw.localhost_nodeports,
            manifests: self.manifests,
            dry_run: self.dry_run,
            cleanup: self.cleanup,
            verbosity: raw.verbosity.min(255) as u8,
            json_logs,
            kubeconfig: Some(raw.kubeconfig.trim()).filter(|k| !k.is_empty()).map(PathBuf::from),
            master: Some(raw.master.trim().to_string()).filter(|m| !m.is_empty()),
            kube_api_qps: raw.qps,
            kube_api_burst: raw.burst as u32,
            healthz_bind_address: raw.healthz,
            metrics_bind_address: raw.metrics,
            unimplemented,
        })
    }
}

/// Parses `ip:port` / `[ip6]:port` (an empty host is not allowed; kube-proxy defaults it).
pub fn parse_bind_address(s: &str) -> Result<std::net::SocketAddr, String> {
    s.trim().parse::<std::net::SocketAddr>().map_err(|_| "must be IP:port (e.g. 0.0.0.0:10256)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["kproxy", "--manifests", "/tmp"];
        v.extend_from_slice(args);
        Flags::try_parse_from(v).map_err(|e| e.to_string())?.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn defaults_match_kube_proxy() {
        let c = parse(&["--hostname-override", "Node-A"]).unwrap();
        assert_eq!(c.mode, ProxyMode::Nftables);
        assert_eq!(c.hostname, "node-a");
        assert_eq!(c.sync_period, Duration::from_secs(30));
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.masquerade_bit, 14);
        assert_eq!(c.nodeport, NodePortSpec::Primary);
        assert!(!c.masquerade_all);
    }

    #[test]
    fn flags_parse_with_equals_and_bool_values() {
        let c = parse(&["--masquerade-all=true", "--cluster-cidr=10.0.0.0/8,fd00::/64", "-v=4"]).unwrap();
        assert!(c.masquerade_all);
        assert_eq!(c.cluster_cidrs.len(), 2);
        assert_eq!(c.verbosity, 4);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--cluster-cidr", "10.0.0.0/99"]).unwrap_err();
        assert!(e.contains("--cluster-cidr"), "{e}");
        let e = parse(&["--proxy-mode", "ipvs"]).unwrap_err();
        assert!(e.contains("--proxy-mode"), "{e}");
        let e = parse(&["--iptables-min-sync-period", "soon"]).unwrap_err();
        assert!(e.contains("--iptables-min-sync-period"), "{e}");
        let e = parse(&["--no-such-flag"]).unwrap_err();
        assert!(e.contains("--no-such-flag"), "{e}");
    }

    fn testdata(name: &str) -> String {
        format!("{}/testdata/config/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn kubeadm_config_conf_parses_with_defaults() {
        let c = parse(&["--config", &testdata("kubeadm-config.conf"), "--hostname-override", "node-a"]).unwrap();
        assert_eq!(c.mode, ProxyMode::Nftables, "an empty mode means nftables");
        assert_eq!(c.hostname, "node-a");
        assert_eq!(c.cluster_cidrs, vec![Cidr::parse("10.244.0.0/16").unwrap()]);
        assert_eq!(c.sync_period, Duration::from_secs(30), "0s means the default");
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.masquerade_bit, 14);
        assert_eq!(c.nodeport, NodePortSpec::Primary);
        assert_eq!(c.healthz_bind_address, "0.0.0.0:10256");
        assert_eq!(c.metrics_bind_address, "127.0.0.1:10249");
        assert_eq!(c.kubeconfig.as_deref(), Some(std::path::Path::new("/var/lib/kube-proxy/kubeconfig.conf")));
    }

    #[test]
    fn every_field_parses_and_implemented_ones_take_effect() {
        let c = parse(&["--config", &testdata("every-field.conf")]).unwrap();
        assert_eq!(c.hostname, "node-from-file");
        assert_eq!(c.cluster_cidrs.len(), 2);
        assert!(c.masquerade_all);
        assert_eq!(c.masquerade_bit, 12, "the nftables section wins in nftables mode");
        assert_eq!(c.sync_period, Duration::from_secs(60));
        assert_eq!(c.min_sync_period, Duration::from_millis(500));
        assert_eq!(c.verbosity, 4);
        assert!(c.json_logs);
        assert_eq!(c.kube_api_qps, 20.0);
        assert_eq!(c.kube_api_burst, 40);
        assert_eq!(c.metrics_bind_address, "0.0.0.0:10249");
        assert_eq!(c.nodeport, NodePortSpec::Cidrs(vec![Cidr::parse("192.168.0.0/24").unwrap()]));
        assert_eq!(c.detect_local, DetectLocal::ClusterCidr);
        let un = c.unimplemented.join(" ");
        for f in ["featureGates", "conntrack.maxPerCore", "oomScoreAdj", "enableProfiling"] {
            assert!(un.contains(f), "{f} should be reported as not implemented: {un}");
        }
        assert!(!un.contains("detectLocal"), "detect-local settings are implemented: {un}");
    }

    #[test]
    fn the_iptables_section_wins_in_iptables_mode() {
        let conf =
            std::fs::read_to_string(testdata("every-field.conf")).unwrap().replace("mode: nftables", "mode: iptables");
        let dir = std::env::temp_dir().join(format!("kproxy-config-ipt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ipt.conf");
        std::fs::write(&path, &conf).unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.mode, ProxyMode::Iptables);
        assert_eq!(c.masquerade_bit, 13, "the iptables section wins in iptables mode");
        assert_eq!(c.sync_period, Duration::from_secs(45));
        assert_eq!(c.min_sync_period, Duration::from_secs(2));
        assert!(!c.localhost_nodeports);
        assert!(!c.unimplemented.iter().any(|u| u.contains("localhostNodePorts")), "{:?}", c.unimplemented);
        std::fs::write(&path, conf.replace("masqueradeBit: 13", "masqueradeBit: 40")).unwrap();
        let e = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.contains("iptables.masqueradeBit"), "{e}");
        std::fs::remove_dir_all(&dir).ok();

        // Flags: nodePortAddresses defaults to every address in iptables mode, as upstream.
        let c = parse(&["--proxy-mode", "iptables"]).unwrap();
        assert_eq!(c.nodeport, NodePortSpec::Cidrs(vec![]));
        assert!(c.localhost_nodeports);
        assert_eq!(parse(&[]).unwrap().nodeport, NodePortSpec::Primary);
        let c = parse(&["--proxy-mode", "iptables", "--iptables-localhost-nodeports=false"]).unwrap();
        assert!(!c.localhost_nodeports && c.unimplemented.is_empty(), "{:?}", c.unimplemented);
    }

    #[test]
    fn detect_local_modes_from_flags() {
        assert_eq!(parse(&[]).unwrap().detect_local, DetectLocal::ClusterCidr);
        assert_eq!(parse(&["--detect-local-mode", "NodeCIDR"]).unwrap().detect_local, DetectLocal::NodeCidr);
        let c = parse(&["--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "cbr0"]).unwrap();
        assert_eq!(c.detect_local, DetectLocal::BridgeInterface("cbr0".into()));
        assert!(c.unimplemented.is_empty(), "{:?}", c.unimplemented);
        let c = parse(&["--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=veth"]).unwrap();
        assert_eq!(c.detect_local, DetectLocal::InterfaceNamePrefix("veth".into()));
        assert!(c.unimplemented.is_empty(), "{:?}", c.unimplemented);
        // The other mode's interface setting is ignored, as upstream.
        let c = parse(&["--detect-local-mode", "NodeCIDR", "--pod-bridge-interface", "cbr0"]).unwrap();
        assert_eq!(c.detect_local, DetectLocal::NodeCidr);
    }

    #[test]
    fn detect_local_errors_name_the_flag() {
        let e = parse(&["--detect-local-mode", "Bogus"]).unwrap_err();
        assert!(e.contains("--detect-local-mode"), "{e}");
        let e = parse(&["--detect-local-mode", "BridgeInterface"]).unwrap_err();
        assert!(e.contains("--pod-bridge-interface"), "{e}");
        let e = parse(&["--detect-local-mode", "InterfaceNamePrefix"]).unwrap_err();
        assert!(e.contains("--pod-interface-name-prefix"), "{e}");
        for bad in ["a-name-longer-than-15", "ve th", "veth*", "cb\"r0"] {
            let e =
                parse(&["--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", bad]).unwrap_err();
            assert!(e.contains("--pod-interface-name-prefix"), "{bad}: {e}");
            let e = parse(&["--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", bad]).unwrap_err();
            assert!(e.contains("--pod-bridge-interface"), "{bad}: {e}");
        }
    }

    #[test]
    fn detect_local_errors_name_the_field() {
        let dir = std::env::temp_dir().join(format!("kproxy-cfg-dl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        let cases = [
            ("mode", "detectLocalMode: Bogus\n", Err("detectLocalMode")),
            ("bridge", "detectLocalMode: BridgeInterface\n", Err("detectLocal.bridgeInterface")),
            (
                "prefix",
                "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: 'a b'}\n",
                Err("detectLocal.interfaceNamePrefix"),
            ),
            (
                "ok",
                "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: veth}\n",
                Ok(DetectLocal::InterfaceNamePrefix("veth".into())),
            ),
            ("node", "detectLocalMode: NodeCIDR\n", Ok(DetectLocal::NodeCidr)),
        ];
        for (name, body, want) in cases {
            let p = dir.join(name);
            std::fs::write(&p, format!("{head}{body}")).unwrap();
            let got = parse(&["--config", p.to_str().unwrap()]);
            match want {
                Ok(d) => assert_eq!(got.unwrap().detect_local, d, "{name}"),
                Err(needle) => {
                    let e = got.unwrap_err();
                    assert!(e.contains(needle), "{name}: {e}");
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn detector_per_mode_and_family() {
        let node = NodeInfo {
            pod_cidrs: vec![Cidr::parse("10.244.1.0/24").unwrap(), Cidr::parse("fd00:1::/64").unwrap()],
            ..Default::default()
        };
        let cc = [Cidr::parse("10.244.0.0/16").unwrap()];
        let v4 = Family::V4;
        assert_eq!(DetectLocal::ClusterCidr.detector(v4, &cc, &node), LocalDetector::Cidr(cc[0]));
        assert_eq!(DetectLocal::ClusterCidr.detector(Family::V6, &cc, &node), LocalDetector::None);
        assert_eq!(DetectLocal::ClusterCidr.detector(v4, &[], &node), LocalDetector::None);
        assert_eq!(DetectLocal::NodeCidr.detector(Family::V6, &cc, &node), LocalDetector::Cidr(node.pod_cidrs[1]));
        assert_eq!(DetectLocal::NodeCidr.detector(v4, &cc, &NodeInfo::default()), LocalDetector::None);
        assert_eq!(
            DetectLocal::BridgeInterface("cbr0".into()).detector(Family::V6, &[], &node),
            LocalDetector::Bridge("cbr0".into())
        );
    }

    #[test]
    fn bad_config_files_name_the_field() {
        let dir = std::env::temp_dir().join(format!("kproxy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases = [
            ("unknown", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnoSuchField: 1\n", "noSuchField"),
            ("nested", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnftables:\n  syncPeriodd: 1s\n", "syncPeriodd"),
            ("cidr", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.0.0.0/40\n", "clusterCIDR"),
            ("period", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnftables:\n  minSyncPeriod: soon\n", "nftables.minSyncPeriod"),
            ("mode", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n", "mode"),
            ("kind", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n", "kind"),
            ("type", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n  masqueradeAll: maybe\n", "masqueradeAll"),
        ];
        for (name, text, needle) in cases {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            let e = parse(&["--config", p.to_str().unwrap()]).unwrap_err();
            assert!(e.contains(needle), "{name}: {e}");
        }
        let e = parse(&["--config", "/nonexistent/kproxy.conf"]).unwrap_err();
        assert!(e.contains("/nonexistent/kproxy.conf"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unimplemented_flags_are_reported_by_name() {
        let c = parse(&["--conntrack-max-per-core", "0", "--oom-score-adj", "-999", "--profiling"]).unwrap();
        assert_eq!(c.unimplemented, vec!["--profiling".to_string(), "--conntrack-max-per-core".to_string()]);
    }

    #[test]
    fn nodeport_addresses_resolve_per_family() {
        let c = parse(&["--nodeport-addresses", "192.168.0.0/24"]).unwrap();
        let local: Vec<IpAddr> =
            ["192.168.0.2", "192.168.1.2", "127.0.0.1", "2001:db8::1"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(
            c.nodeport.resolve(Family::V4, &[], &local),
            NodePortAddresses::Ips(vec!["192.168.0.2".parse().unwrap()])
        );
        assert_eq!(c.nodeport.resolve(Family::V6, &[], &local), NodePortAddresses::All);
        let c = parse(&["--nodeport-addresses", "0.0.0.0/0"]).unwrap();
        assert_eq!(c.nodeport.resolve(Family::V4, &[], &local), NodePortAddresses::All);
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.nodeport.resolve(Family::V4, &["192.168.0.2".parse().unwrap()], &local),
            NodePortAddresses::Ips(vec!["192.168.0.2".parse().unwrap()])
        );
        assert!(parse(&["--nodeport-addresses", "primary,10.0.0.0/8"]).is_err());
    }
}
