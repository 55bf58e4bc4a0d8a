//! kube-proxy-compatible flags and configuration.
