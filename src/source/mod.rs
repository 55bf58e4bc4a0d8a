//! Owns where Kubernetes objects come from: `files` reads them from a manifests directory
//! (`--manifests DIR`); an API-server watcher will sit next to it and feed the same tracker.

pub mod files;

pub use files::{load_dir, parse_file, DirWatcher, Snapshot};
