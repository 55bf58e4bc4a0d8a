//! `--config FILE`: kube-proxy's `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1).
//!
//! Every field of the type parses (strictly: an unknown field is an error naming it, as upstream's
//! strict decoding); the fields kproxy implements take effect, the others are reported as
//! warnings naming them when set to a non-default value. Zero values mean "default", as upstream's
//! defaulting treats them.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// A config-file error: names the file and the field (serde's path) and says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: field {field}: {reason}")]
    Field { path: String, field: &'static str, reason: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f32>,
    pub burst: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IptablesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NftablesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpvsSection {
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<String>,
    pub tcp_fin_timeout: Option<String>,
    pub udp_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WinkernelSection {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Conntrack {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<String>,
    pub tcp_close_wait_timeout: Option<String>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<String>,
    pub udp_stream_timeout: Option<String>,
}

/// component-base's LoggingConfiguration (the parts kproxy reads; `options` is free-form).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Logging {
    pub format: Option<String>,
    pub flush_frequency: Option<serde_yaml::Value>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<serde_yaml::Value>,
    pub options: Option<serde_yaml::Value>,
}

/// The whole `KubeProxyConfiguration`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    pub logging: Option<Logging>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<IptablesSection>,
    pub ipvs: Option<IpvsSection>,
    pub nftables: Option<NftablesSection>,
    pub winkernel: Option<WinkernelSection>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<Conntrack>,
    pub config_sync_period: Option<String>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
    /// Newer releases also accept the sync periods at the top level.
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// A string that is set and not the zero value.
pub fn set(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|v| !v.is_empty() && *v != "0s" && *v != "0")
}

impl KubeProxyConfiguration {
    /// Reads and strictly decodes a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError::Read { path: p.clone(), source: e })?;
        Self::parse(&p, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Self, ConfigFileError> {
        let c: KubeProxyConfiguration = serde_yaml::from_str(text)
            .map_err(|e| ConfigFileError::Parse { path: path.into(), message: e.to_string() })?;
        if c.api_version.as_deref() != Some(API_VERSION) {
            return Err(ConfigFileError::Field {
                path: path.into(),
                field: "apiVersion",
                reason: format!("must be {API_VERSION:?}, got {:?}", c.api_version.as_deref().unwrap_or("")),
            });
        }
        if c.kind.as_deref() != Some(KIND) {
            return Err(ConfigFileError::Field {
                path: path.into(),
                field: "kind",
                reason: format!("must be {KIND:?}, got {:?}", c.kind.as_deref().unwrap_or("")),
            });
        }
        Ok(c)
    }

    /// Fields set to a non-default value that kproxy does not implement yet.
    pub fn unimplemented_fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut note = |cond: bool, name: &'static str| {
            if cond {
                out.push(name);
            }
        };
        note(self.feature_gates.as_ref().is_some_and(|g| !g.is_empty()), "featureGates");
        note(set(&self.bind_address).is_some_and(|b| b != "0.0.0.0" && b != "::"), "bindAddress");
        note(self.bind_address_hard_fail == Some(true), "bindAddressHardFail");
        note(self.enable_profiling == Some(true), "enableProfiling");
        note(set(&self.show_hidden_metrics_for_version).is_some(), "showHiddenMetricsForVersion");
        note(self.oom_score_adj.is_some(), "oomScoreAdj");
        if let Some(c) = &self.conntrack {
            note(c.max_per_core.is_some_and(|v| v != 0), "conntrack.maxPerCore");
            note(c.min.is_some_and(|v| v != 0), "conntrack.min");
            note(set(&c.tcp_established_timeout).is_some(), "conntrack.tcpEstablishedTimeout");
            note(set(&c.tcp_close_wait_timeout).is_some(), "conntrack.tcpCloseWaitTimeout");
            note(c.tcp_be_liberal == Some(true), "conntrack.tcpBeLiberal");
            note(set(&c.udp_timeout).is_some(), "conntrack.udpTimeout");
            note(set(&c.udp_stream_timeout).is_some(), "conntrack.udpStreamTimeout");
        }
        if let Some(i) = &self.iptables {
            note(i.snat_node_internal_ip == Some(true), "iptables.snatNodeInternalIP");
        }
        out
    }
}
