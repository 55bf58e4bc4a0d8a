//! Owns the step from Kubernetes objects to the `rules` model: validation and conversion
//! (`convert`), the merged, change-counting store (`tracker`) and the one error type that leaves
//! this module, [`Rejected`].
//!
//! Bad input never stops good input: every invalid object becomes one `Rejected` (one log line,
//! one metric increment for the caller) and is otherwise treated as if it did not exist.

pub mod convert;
pub mod tracker;
pub mod validate;

pub use convert::{Converted, ServiceInfo, Skip, SliceEndpoint, SliceInfo, SlicePort};
pub use tracker::{ChangeTracker, Pending};

use std::fmt;
use std::path::PathBuf;

/// One object (or one file) that was refused, and why.
///
/// `Display` is a single line meant for a warning log: `file: Kind namespace/name: reason`. Names
/// and reasons are printed with control characters escaped and absurdly long values cut, because
/// the very objects we reject are the ones whose names may contain newlines or megabytes of text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Rejected {
    /// `"Service"`, `"EndpointSlice"`, `"Node"`, or `"file"` when no object could be read at all.
    pub kind: &'static str,
    /// Empty for cluster-scoped objects (Node) and for whole files.
    pub namespace: String,
    /// Empty when the object had no readable name.
    pub name: String,
    /// The manifest file the object came from (files source only).
    pub file: Option<PathBuf>,
    pub reason: String,
}

impl Rejected {
    pub(crate) fn new(kind: &'static str, namespace: &str, name: &str, reason: impl Into<String>) -> Self {
        Rejected { kind, namespace: namespace.to_string(), name: name.to_string(), file: None, reason: reason.into() }
    }

    /// A whole file (or a document in it that is not a readable object).
    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Rejected {
            kind: "file",
            namespace: String::new(),
            name: String::new(),
            file: Some(path.into()),
            reason: reason.into(),
        }
    }

    pub(crate) fn in_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// `ns/name`, `name`, or empty, as the object is identified in logs.
    pub fn object(&self) -> String {
        match (self.namespace.is_empty(), self.name.is_empty()) {
            (true, true) => String::new(),
            (true, false) => self.name.clone(),
            (false, true) => format!("{}/(unnamed)", self.namespace),
            (false, false) => format!("{}/{}", self.namespace, self.name),
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", printable(&file.display().to_string(), 200))?;
        }
        if self.kind != "file" {
            let obj = self.object();
            if obj.is_empty() {
                write!(f, "{} (unnamed): ", self.kind)?;
            } else {
                write!(f, "{} {}: ", self.kind, printable(&obj, 120))?;
            }
        }
        f.write_str(&printable(&self.reason, 400))
    }
}

/// `s` with control characters (newlines above all) escaped and cut to about `max` chars, so a
/// hostile value can neither split a log line nor flood it.
pub(crate) fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max + 8));
    for (n, c) in s.chars().enumerate() {
        if n >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_display_is_one_line_naming_file_object_and_reason() {
        let r = Rejected::new("Service", "default", "web", "spec.ports[0].port 0 is out of range 1-65535")
            .in_file("/m/svc.yaml");
        assert_eq!(r.to_string(), "/m/svc.yaml: Service default/web: spec.ports[0].port 0 is out of range 1-65535");
        let r = Rejected::new("Node", "", "n1", "bad");
        assert_eq!(r.to_string(), "Node n1: bad");
        let r = Rejected::file("/m/x.yaml", "not UTF-8");
        assert_eq!(r.to_string(), "/m/x.yaml: not UTF-8");
        let r = Rejected::new("EndpointSlice", "", "", "document 2: missing field");
        assert_eq!(r.to_string(), "EndpointSlice (unnamed): document 2: missing field");
    }

    #[test]
    fn rejected_display_escapes_newlines_and_cuts_huge_names() {
        let r = Rejected::new("Service", "default", "a\nb", "bad\nname");
        let s = r.to_string();
        assert!(!s.contains('\n'), "{s}");
        assert!(s.contains("a\\nb"), "{s}");
        let long = "x".repeat(10_000);
        let s = Rejected::new("Service", "default", &long, &long).to_string();
        assert!(s.len() < 700, "{}", s.len());
    }
}
