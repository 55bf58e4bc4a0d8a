//! Where objects come from: YAML manifests (and later the API server).
