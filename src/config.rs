//! kube-proxy-compatible flags, parsed and validated once into a `Config` that is passed
//! explicitly to every part of the daemon.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rules::model::{Cidr, Family, NodePortAddresses};

/// A configuration error: names the flag (or field) and says what is wrong with the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for {flag}: {reason}")]
    Invalid { flag: &'static str, value: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
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
    /// Path to a kubeconfig file (the API source is not implemented yet; use --manifests).
    #[arg(long = "kubeconfig", default_value = "")]
    pub kubeconfig: String,
    /// The address of the Kubernetes API server (overrides the kubeconfig).
    #[arg(long = "master", default_value = "")]
    pub master: String,
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
            NodePortSpec::Primary => NodePortAddresses::Ips(
                primary_ips.iter().filter(|ip| Family::of(ip) == family).copied().collect(),
            ),
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
    pub nodeport: NodePortSpec,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub manifests: Option<PathBuf>,
    pub dry_run: bool,
    pub cleanup: bool,
    pub verbosity: u8,
    pub json_logs: bool,
}

impl Config {
    /// The pure-rules build configuration for one family.
    pub fn build_config(&self, family: Family, nodeport: NodePortAddresses) -> rules::model::BuildConfig {
        let mut b = rules::model::BuildConfig::new(family);
        b.cluster_cidr = self.cluster_cidrs.iter().copied().find(|c| c.family() == family);
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

impl Flags {
    /// Validates the flags into a `Config`.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mode = match self.proxy_mode.as_str() {
            "" | "nftables" => ProxyMode::Nftables,
            "iptables" => ProxyMode::Iptables,
            other => {
                return Err(invalid("--proxy-mode", other, "must be 'nftables' or 'iptables'"));
            }
        };
        if mode == ProxyMode::Iptables {
            return Err(ConfigError::Unsupported(
                "--proxy-mode iptables is not implemented yet; use nftables (the default)".into(),
            ));
        }
        let hostname = if self.hostname_override.trim().is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_lowercase())
                .unwrap_or_default()
        } else {
            self.hostname_override.trim().to_lowercase()
        };
        let mut cluster_cidrs = Vec::new();
        for part in self.cluster_cidr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let c = Cidr::parse(part).map_err(|e| invalid("--cluster-cidr", &self.cluster_cidr, e))?;
            if cluster_cidrs.iter().any(|o: &Cidr| o.family() == c.family()) {
                return Err(invalid("--cluster-cidr", &self.cluster_cidr, "at most one CIDR per IP family"));
            }
            cluster_cidrs.push(c);
        }
        let np: Vec<String> =
            self.nodeport_addresses.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        let nodeport = if np.is_empty() || np == ["primary"] {
            NodePortSpec::Primary
        } else if np == ["all"] {
            NodePortSpec::Cidrs(vec![])
        } else {
            let mut cidrs = Vec::new();
            for p in &np {
                if p == "primary" || p == "all" || p == "localhost" {
                    return Err(invalid(
                        "--nodeport-addresses",
                        &np.join(","),
                        format!("the keyword {p:?} cannot be combined with CIDRs"),
                    ));
                }
                cidrs.push(Cidr::parse(p).map_err(|e| invalid("--nodeport-addresses", p, e))?);
            }
            NodePortSpec::Cidrs(cidrs)
        };
        if self.masquerade_bit > 31 {
            return Err(invalid("--iptables-masquerade-bit", &self.masquerade_bit.to_string(), "must be 0-31"));
        }
        let sync_period = parse_duration(&self.sync_period)
            .map_err(|e| invalid("--iptables-sync-period", &self.sync_period, e))?;
        if sync_period.is_zero() {
            return Err(invalid("--iptables-sync-period", &self.sync_period, "must be greater than 0"));
        }
        let min_sync_period = parse_duration(&self.min_sync_period)
            .map_err(|e| invalid("--iptables-min-sync-period", &self.min_sync_period, e))?;
        let json_logs = match self.logging_format.as_str() {
            "text" => false,
            "json" => true,
            other => return Err(invalid("--logging-format", other, "must be 'text' or 'json'")),
        };
        if self.manifests.is_none() && !self.cleanup {
            return Err(ConfigError::Unsupported(
                "the Kubernetes API source is not implemented yet: pass --manifests DIR".into(),
            ));
        }
        Ok(Config {
            mode,
            hostname,
            cluster_cidrs,
            nodeport,
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            sync_period,
            min_sync_period,
            manifests: self.manifests,
            dry_run: self.dry_run,
            cleanup: self.cleanup,
            verbosity: self.verbosity,
            json_logs,
        })
    }
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

    #[test]
    fn nodeport_addresses_resolve_per_family() {
        let c = parse(&["--nodeport-addresses", "192.168.0.0/24"]).unwrap();
        let local: Vec<IpAddr> = ["192.168.0.2", "192.168.1.2", "127.0.0.1", "2001:db8::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
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
