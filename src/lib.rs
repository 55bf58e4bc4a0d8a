//! kproxy: a Rust kube-proxy. The daemon's modules; `main.rs` only wires them together.

pub mod backend;
pub mod config;
pub mod config_file;
pub mod daemon;
pub mod http;
pub mod localaddrs;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod source;
pub mod sync;
pub mod sync_iptables;
