//! Conversion from Kubernetes objects to the rules model, and the change tracker.
