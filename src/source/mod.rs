//! Owns where Kubernetes objects come from: `files` reads them from a manifests directory
//! (`--manifests DIR`); `kube` watches the API server. Both feed the same tracker.

pub mod files;
pub mod kube;

pub use files::{load_dir, parse_file, DirWatcher, Snapshot};
