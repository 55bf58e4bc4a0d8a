//! Owns the current, converted view of the cluster (Services, EndpointSlices, the own Node), the
//! count of changes not yet synced, and the merge of slices into per-family `ClusterState`.
//!
//! Like upstream's ServiceChangeTracker/EndpointsChangeTracker, Services and EndpointSlices are
//! stored independently: a slice may arrive before its Service (case 30) and is used as soon as
//! the Service shows up. A rejected object is treated as absent, so a bad update removes the
//! object's previous good version rather than leaving stale rules for something that no longer
//! exists in that form.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use rules::model::{Cidr, ClusterState, Endpoint, Family, NodeInfo, Protocol, ServicePort, ServicePortName};

use super::convert::{self, Converted, ServiceInfo, SliceInfo};
use super::Rejected;

/// `(namespace, name)`.
type Key = (String, String);

/// Distinct Services whose Service object, or whose endpoints, changed since the last
/// [`ChangeTracker::take_pending`]; upstream's `*_changes_pending` gauges count the same thing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    pub services: usize,
    pub endpoints: usize,
}

/// The store the sources feed and the sync loop reads.
#[derive(Debug, Clone, Default)]
pub struct ChangeTracker {
    node_name: String,
    services: BTreeMap<Key, ServiceInfo>,
    slices: BTreeMap<Key, SliceInfo>,
    node: Option<NodeInfo>,
    /// Services (ns, name) whose Service object changed.
    pending_services: BTreeSet<Key>,
    /// Services (ns, name) whose endpoints changed (keyed by Service, as upstream).
    pending_endpoints: BTreeSet<Key>,
    /// The CIDRs of all ServiceCIDR objects, sorted and deduplicated; empty when none are known.
    service_cidrs: Vec<Cidr>,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of slice changes not yet taken by a sync.
    trigger_times: Vec<SystemTime>,
    /// Objects a watch source rejected since the last sync, for the invalid-objects metric.
    rejected: Vec<Rejected>,
    /// The merged per-family view the rules are built from, kept up to date with every change
    /// (only the changed Service's ports are recomputed).
    states: BTreeMap<Family, ClusterState>,
    /// The slices of each Service (by the slice's service-name label).
    /// (A sorted `Vec`: most Services have one slice, and a one-element `BTreeSet` costs a whole
    /// node, ~0.5 KiB per Service.)
    slices_by_service: BTreeMap<Key, Vec<Key>>,
    /// What changed since the last [`ChangeTracker::take_changes`].
    changes: Changes,
}

/// What changed since the last sync: the Services whose ports or endpoints changed, with their
/// ports and endpoints before (`old`) per family, so that a sync can rebuild just those. `full`
/// when something every rule depends on changed (the Node, ServiceCIDRs).
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub full: bool,
    pub services: BTreeSet<(String, String)>,
    pub old: BTreeMap<Family, ClusterState>,
}

impl Changes {
    /// The changed ports of `family` before the change.
    pub fn before(&self, family: Family) -> &ClusterState {
        self.old.get(&family).unwrap_or(&EMPTY_STATE)
    }
    /// The changed ports of a family after the change, from `now`, that family's state as the
    /// changes were taken (the sync reads both under the tracker's lock). Copied only when a sync
    /// asks: a full sync never does, and after a start-up every Service counts as changed (copying
    /// them all took 35 ms at 10k Services x 10 endpoints and 130 ms at 50k x 5, before the first
    /// sync).
    pub fn after(&self, now: &ClusterState) -> ClusterState {
        now.restrict(&self.services)
    }
}

static EMPTY_STATE: ClusterState =
    ClusterState { services: BTreeMap::new(), endpoints: BTreeMap::new(), service_cidrs: Vec::new() };

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// At most this many trigger times are kept between two syncs: they only feed a latency
/// histogram, and a sync loop that never takes them must not make the tracker grow forever.
pub const MAX_TRIGGER_TIMES: usize = 4096;

impl ChangeTracker {
    /// An empty tracker for the node called `own_node_name` (`--hostname-override` or hostname).
    pub fn new(own_node_name: &str) -> Self {
        ChangeTracker { node_name: own_node_name.to_string(), ..Default::default() }
    }

    /// Adds or replaces a Service. `Ok(true)` when the model changed, `Ok(false)` for a no-op.
    ///
    /// `Err` means the object is invalid and is treated as absent: an earlier valid version, if
    /// any, has been removed (and counted as a pending change), so a caller should sync when
    /// [`Self::pending_service_changes`] says so, whatever the result.
    pub fn upsert_service(&mut self, svc: &Service) -> Result<bool, Rejected> {
        let key = key_of(svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref());
        match convert::service(svc) {
            Ok(Converted::Proxied(info)) => Ok(self.put_service(key, Some(info))),
            Ok(Converted::Skipped(why)) => {
                tracing::debug!(namespace = %key.0, name = %key.1, reason = %why, "not proxying Service");
                Ok(self.put_service(key, None))
            }
            Err(r) => {
                self.put_service(key, None);
                Err(r)
            }
        }
    }

    /// Removes a Service; `true` if it was there.
    pub fn delete_service(&mut self, namespace: &str, name: &str) -> bool {
        self.put_service((namespace.to_string(), name.to_string()), None)
    }

    /// Adds or replaces an EndpointSlice; same contract as [`Self::upsert_service`].
    pub fn upsert_slice(&mut self, slice: &EndpointSlice) -> Result<bool, Rejected> {
        let key = key_of(slice.metadata.namespace.as_deref(), slice.metadata.name.as_deref());
        match convert::endpoint_slice(slice) {
            Ok(Converted::Proxied(info)) => Ok(self.put_slice(key, Some(info))),
            Ok(Converted::Skipped(why)) => {
                tracing::debug!(namespace = %key.0, name = %key.1, reason = %why, "not using EndpointSlice");
                Ok(self.put_slice(key, None))
            }
            Err(r) => {
                self.put_slice(key, None);
                Err(r)
            }
        }
    }

    /// Removes an EndpointSlice (by the slice's own name); `true` if it was there.
    pub fn delete_slice(&mut self, namespace: &str, name: &str) -> bool {
        self.put_slice((namespace.to_string(), name.to_string()), None)
    }

    /// Records this node's Node object. Other nodes' objects are ignored (`Ok(false)`): only the
    /// own node's IPs and labels matter to the rules. An invalid own Node is treated as unknown.
    pub fn set_node(&mut self, node: &Node) -> Result<bool, Rejected> {
        if node.metadata.name.as_deref() != Some(self.node_name.as_str()) {
            return Ok(false);
        }
        match convert::node(node) {
            Ok(info) => Ok(self.put_node(Some(info))),
            Err(r) => {
                self.put_node(None);
                Err(r)
            }
        }
    }

    /// Forgets the own Node (it was deleted); `true` if it was known.
    pub fn delete_node(&mut self, name: &str) -> bool {
        name == self.node_name && self.put_node(None)
    }

    /// [`Self::replace_converted`] for API objects: converts them first (a rejection for each
    /// invalid one, before the duplicates).
    pub fn replace_all(
        &mut self,
        services: impl AsRef<[Service]>,
        slices: impl AsRef<[EndpointSlice]>,
        nodes: impl AsRef<[Node]>,
        own_node_name: &str,
    ) -> (bool, Vec<Rejected>) {
        fn ok<T>(rejected: &mut Vec<Rejected>, r: Result<Converted<T>, Rejected>) -> Option<T> {
            r.map_err(|r| rejected.push(r)).ok().and_then(Converted::proxied)
        }
        let mut rejected = Vec::new();
        let services: Vec<ServiceInfo> =
            services.as_ref().iter().filter_map(|s| ok(&mut rejected, convert::service(s))).collect();
        let slices: Vec<SliceInfo> =
            slices.as_ref().iter().filter_map(|s| ok(&mut rejected, convert::endpoint_slice(s))).collect();
        let mut own_nodes = Vec::new();
        for n in nodes.as_ref().iter().filter(|n| n.metadata.name.as_deref() == Some(own_node_name)) {
            match convert::node(n) {
                Ok(info) => own_nodes.push(info),
                Err(r) => rejected.push(r),
            }
        }
        let (changed, more) = self.replace_converted(services, slices, own_nodes, own_node_name);
        rejected.extend(more);
        (changed, rejected)
    }

    /// Replaces everything with the given converted objects (a full read of a source), as if each
    /// missing object were deleted and each given one upserted. Returns whether anything changed,
    /// and a rejection for each duplicate (the first one is kept). Of `nodes`, only the one named
    /// `own_node_name` is used.
    pub fn replace_converted(
        &mut self,
        services: Vec<ServiceInfo>,
        slices: Vec<SliceInfo>,
        nodes: Vec<NodeInfo>,
        own_node_name: &str,
    ) -> (bool, Vec<Rejected>) {
        self.node_name = own_node_name.to_string();
        let mut rejected = Vec::new();
        let key = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        // Services and slices are keyed side by side (at 50k of each, 49 ms on one thread).
        let ((mut new_services, rejected_services), (mut new_slices, rejected_slices)) = both(
            || keyed(services, "Service", |s| key(&s.namespace, &s.name)),
            || keyed(slices, "EndpointSlice", |s| key(&s.namespace, &s.name)),
        );
        rejected.extend(rejected_services);
        rejected.extend(rejected_slices);
        let mut new_node = None;
        for info in nodes.into_iter().filter(|n| n.name == own_node_name) {
            if new_node.is_none() {
                new_node = Some(info);
            } else {
                rejected.push(Rejected::new("Node", "", own_node_name, "duplicate Node; the first one is used"));
            }
        }

        if self.services.is_empty() && self.slices.is_empty() {
            let changed = self.fill(new_services, new_slices);
            return (self.put_node(new_node) || changed, rejected);
        }
        // Each Service's merged state is recomputed once at the end, not once for the Service and
        // again for each of its slices (at 50k Services that was half of a cold start's load).
        let mut changed = self.then_refresh(|t, touched| {
            let mut changed = false;
            let keys: BTreeSet<Key> = t.services.keys().chain(new_services.keys()).cloned().collect();
            for key in keys {
                let new = new_services.remove(&key);
                changed |= t.set_service(key, new, touched);
            }
            let keys: BTreeSet<Key> = t.slices.keys().chain(new_slices.keys()).cloned().collect();
            for key in keys {
                let new = new_slices.remove(&key);
                changed |= t.set_slice(key, new, touched);
            }
            changed
        });
        changed |= self.put_node(new_node);
        (changed, rejected)
    }

    /// `replace_converted` into a tracker without Services and slices (a start-up): the maps are
    /// taken as they are and each Service's merged state is computed once, appended to the
    /// states, with none of the per-object bookkeeping of a change (a third of a 10k-Service
    /// start-up's load). The same result as setting each object and refreshing each Service.
    fn fill(&mut self, services: BTreeMap<Key, ServiceInfo>, slices: BTreeMap<Key, SliceInfo>) -> bool {
        let changed = !services.is_empty() || !slices.is_empty();
        // Every map below is made from sorted input in one pass (`collect` into a B-tree sorts,
        // which is linear on sorted input, and builds it bottom-up): inserting one key at a time
        // compared strings at every level, most of a 50k-Service start-up's load.
        // Slices grouped by their Service (borrowed: no key is copied for this), each group in
        // slice-key order (a stable sort).
        let mut owned: Vec<(Owner, &Key, &SliceInfo)> =
            slices.iter().map(|(k, s)| ((s.namespace.as_str(), s.service_name.as_str()), k, s)).collect();
        owned.sort_by(|a, b| a.0.cmp(&b.0));
        let mut groups: Vec<(Owner, Vec<(&Key, &SliceInfo)>)> = Vec::new();
        for (owner, key, slice) in owned {
            match groups.last_mut() {
                Some((o, g)) if *o == owner => g.push((key, slice)),
                _ => groups.push((owner, vec![(key, slice)])),
            }
        }
        // Each Service that has a Service object or slices, once, in key order, with its slices:
        // the lower and the upper half of the Services side by side (at 50k Services x 5
        // endpoints the merge took 65 ms on one thread).
        let split = services.keys().nth(services.len() / 2).map(|k| (k.0.as_str(), k.1.as_str()));
        let (lower, upper) = match split {
            Some(at) => {
                let g = groups.partition_point(|(o, _)| *o < at);
                let at_key = (at.0.to_string(), at.1.to_string());
                ((services.range(..at_key.clone()), &groups[..g]), Some((services.range(at_key..), &groups[g..])))
            }
            None => ((services.range::<Key, _>(..), &groups[..]), None),
        };
        let (mut low, high) = both(
            || merge_range(lower.0, lower.1),
            || upper.map(|(svcs, owners)| merge_range(svcs, owners)).unwrap_or_default(),
        );
        for (f, (ports, eps)) in high.merged {
            let (p, e) = low.merged.entry(f).or_default();
            p.extend(ports);
            e.extend(eps);
        }
        low.touched.extend(high.touched);
        // The states' maps here, the indexes by key on a second thread (at 50k Services, ~50
        // and ~60 ms on one thread).
        let merged = std::mem::take(&mut low.merged);
        let (states, (by_service, pending_services, pending_endpoints)) = both(
            || {
                let maps = |(f, (ports, eps)): (Family, MergedFamily)| {
                    (f, ports.into_iter().collect::<BTreeMap<_, _>>(), eps.into_iter().collect::<BTreeMap<_, _>>())
                };
                merged.into_iter().map(maps).collect::<Vec<_>>()
            },
            || {
                let owned = |((ns, name), g): &(Owner, Vec<(&Key, &SliceInfo)>)| {
                    ((ns.to_string(), name.to_string()), g.iter().map(|(k, _)| (*k).clone()).collect::<Vec<_>>())
                };
                let by_service: BTreeMap<Key, Vec<Key>> = groups.iter().map(owned).collect();
                let pending_endpoints: BTreeSet<Key> = by_service.keys().cloned().collect();
                (by_service, services.keys().cloned().collect::<BTreeSet<Key>>(), pending_endpoints)
            },
        );
        for (f, services, endpoints) in states {
            // The states hold no Service yet (only ServiceCIDRs).
            let st = self.states.entry(f).or_default();
            st.services = services;
            st.endpoints = endpoints;
        }
        self.slices_by_service = by_service;
        union_into(&mut self.pending_services, pending_services);
        union_into(&mut self.pending_endpoints, pending_endpoints);
        let touched = low.touched;
        if touched.iter().any(|k| !self.changes.services.contains(k)) {
            for f in FAMILIES {
                self.changes.old.entry(f).or_default();
            }
        }
        union_into(&mut self.changes.services, touched.into_iter().collect());
        self.services = services;
        self.slices = slices;
        changed
    }

    /// A copy laid out densely ([`rules::model::dense`]), for keeping after a large sync.
    pub fn dense_copy(&self) -> ChangeTracker {
        use rules::model::{dense, dense_set};
        ChangeTracker {
            node_name: self.node_name.clone(),
            services: dense(&self.services),
            slices: dense(&self.slices),
            node: self.node.clone(),
            pending_services: dense_set(&self.pending_services),
            pending_endpoints: dense_set(&self.pending_endpoints),
            service_cidrs: self.service_cidrs.clone(),
            trigger_times: self.trigger_times.clone(),
            rejected: self.rejected.clone(),
            states: self.states.iter().map(|(f, s)| (*f, s.dense_copy())).collect(),
            slices_by_service: dense(&self.slices_by_service),
            changes: self.changes.clone(),
        }
    }

    /// Service ports of `family` and their endpoints, as the rules builder wants them.
    ///
    /// A service port's endpoints come from every slice of that Service and family that has a port
    /// with the same (name, protocol); the port *number* is the slice's (case 4, 15), so one
    /// named port may map to different numbers in different slices. The same `IP:port` in two
    /// slices counts once, a non-terminating copy winning over a terminating one (case 25).
    /// Endpoints are ordered by their `IP:port` string, as upstream orders them.
    pub fn cluster_state(&self, family: Family) -> ClusterState {
        self.state(family).clone()
    }

    /// [`Self::cluster_state`] without a copy: the view is kept up to date as objects change.
    pub fn state(&self, family: Family) -> &ClusterState {
        self.states.get(&family).unwrap_or(&EMPTY_STATE)
    }

    /// What changed since the last call (or since the tracker was made: then everything).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The state computed from scratch, for tests of the incremental one.
    #[cfg(test)]
    fn compute_state(&self, family: Family) -> ClusterState {
        let mut state = ClusterState::default();
        for key in self.services.keys() {
            self.merge_service(key, family, &mut state);
        }
        state.service_cidrs = self.service_cidrs.iter().filter(|c| c.family() == family).copied().collect();
        state
    }

    /// Adds the ports of Service `key` of `family` and their endpoints to `state`.
    fn merge_service(&self, key: &Key, family: Family, state: &mut ClusterState) {
        let Some(svc) = self.services.get(key) else { return };
        let slices: Vec<&SliceInfo> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .filter(|s| s.family == family)
            .collect();
        for sp in svc.ports.iter().filter(|p| p.family() == family) {
            let eps = merge_endpoints(&slices, sp.name.port_name(), sp.name.protocol());
            if !eps.is_empty() {
                state.endpoints.insert(sp.name.clone(), eps);
            }
            state.services.insert(sp.name.clone(), sp.clone());
        }
    }

    /// Recomputes the ports of Service `key` in every family's state, first remembering how they
    /// were before the first change since the last sync.
    fn refresh(&mut self, key: &Key) {
        if self.changes.services.insert(key.clone()) {
            for f in FAMILIES {
                let old = self.changes.old.entry(f).or_default();
                self.states.get(&f).unwrap_or(&EMPTY_STATE).copy_service_into(&key.0, &key.1, old);
            }
        }
        for f in FAMILIES {
            let mut st = self.states.remove(&f).unwrap_or_default();
            let gone: Vec<ServicePortName> = st.ports_of(&key.0, &key.1).cloned().collect();
            for n in gone {
                st.services.remove(&n);
                st.endpoints.remove(&n);
            }
            self.merge_service(key, f, &mut st);
            self.states.insert(f, st);
        }
    }

    /// This node as the rules see it; just the configured name until its Node object is known.
    pub fn node(&self) -> NodeInfo {
        self.node.clone().unwrap_or_else(|| NodeInfo { name: self.node_name.clone(), ..Default::default() })
    }

    /// Whether the own Node object has been seen (health checks need it).
    pub fn node_known(&self) -> bool {
        self.node.is_some()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// Services with a changed Service object since the last `take_pending`.
    pub fn pending_service_changes(&self) -> usize {
        self.pending_services.len()
    }

    /// Services with changed endpoints since the last `take_pending`.
    pub fn pending_endpoint_changes(&self) -> usize {
        self.pending_endpoints.len()
    }

    /// Records the CIDRs of all ServiceCIDR objects (networking.k8s.io/v1); `true` if the set
    /// changed. Order and duplicates do not matter.
    pub fn set_service_cidrs(&mut self, cidrs: impl IntoIterator<Item = Cidr>) -> bool {
        let mut new: Vec<Cidr> = cidrs.into_iter().collect();
        new.sort();
        new.dedup();
        if new == self.service_cidrs {
            return false;
        }
        self.service_cidrs = new;
        for f in FAMILIES {
            let st = self.states.entry(f).or_default();
            st.service_cidrs = self.service_cidrs.iter().filter(|c| c.family() == f).copied().collect();
        }
        self.changes.full = true;
        true
    }

    /// The known service CIDRs, sorted; empty when there are no ServiceCIDR objects (or no API).
    pub fn service_cidrs(&self) -> &[Cidr] {
        &self.service_cidrs
    }

    /// Whether the tracker holds this Service (a valid, proxied one).
    pub fn has_service(&self, namespace: &str, name: &str) -> bool {
        self.services.contains_key(&(namespace.to_string(), name.to_string()))
    }

    /// Whether the tracker holds this EndpointSlice.
    pub fn has_slice(&self, namespace: &str, name: &str) -> bool {
        self.slices.contains_key(&(namespace.to_string(), name.to_string()))
    }

    /// The (namespace, name) of every Service the tracker holds, in order. A source that relists
    /// uses it to find the objects that disappeared while it was not watching.
    pub fn service_keys(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.services.keys().map(|(ns, n)| (ns.as_str(), n.as_str()))
    }

    /// The (namespace, name) of every EndpointSlice the tracker holds, in order.
    pub fn slice_keys(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.slices.keys().map(|(ns, n)| (ns.as_str(), n.as_str()))
    }

    /// Records when the change behind an EndpointSlice update was triggered (its
    /// `endpoints.kubernetes.io/last-change-trigger-time`), for network-programming latency.
    /// Beyond [`MAX_TRIGGER_TIMES`] untaken times, new ones are dropped.
    pub fn record_trigger_time(&mut self, t: SystemTime) {
        if self.trigger_times.len() < MAX_TRIGGER_TIMES {
            self.trigger_times.push(t);
        }
    }

    /// Notes an object a source rejected (after logging it), so the sync loop can count it.
    /// Beyond [`MAX_TRIGGER_TIMES`] untaken ones, new ones are dropped.
    pub fn record_rejected(&mut self, r: Rejected) {
        if self.rejected.len() < MAX_TRIGGER_TIMES {
            self.rejected.push(r);
        }
    }

    /// The rejections recorded since the last call.
    pub fn take_rejected(&mut self) -> Vec<Rejected> {
        std::mem::take(&mut self.rejected)
    }

    /// The trigger times recorded since the last call; a sync takes them when it starts and
    /// observes `now - t` for each once it has programmed the kernel.
    pub fn take_trigger_times(&mut self) -> Vec<SystemTime> {
        std::mem::take(&mut self.trigger_times)
    }

    /// Returns the pending counts and resets them (call when a sync starts from this state).
    pub fn take_pending(&mut self) -> Pending {
        let p = Pending { services: self.pending_services.len(), endpoints: self.pending_endpoints.len() };
        self.pending_services.clear();
        self.pending_endpoints.clear();
        p
    }

    fn put_service(&mut self, key: Key, new: Option<ServiceInfo>) -> bool {
        self.then_refresh(|t, touched| t.set_service(key, new, touched))
    }

    fn put_slice(&mut self, key: Key, new: Option<SliceInfo>) -> bool {
        self.then_refresh(|t, touched| t.set_slice(key, new, touched))
    }

    /// Makes a change that lists the Services it touched, then refreshes each of those once.
    fn then_refresh(&mut self, change: impl FnOnce(&mut Self, &mut BTreeSet<Key>) -> bool) -> bool {
        let mut touched = BTreeSet::new();
        let changed = change(self, &mut touched);
        for k in &touched {
            self.refresh(k);
        }
        changed
    }

    /// `put_service` without the refresh: the Services whose merged state is now out of date are
    /// added to `touched`, for the caller to refresh (once each, however many objects changed).
    fn set_service(&mut self, key: Key, new: Option<ServiceInfo>, touched: &mut BTreeSet<Key>) -> bool {
        if self.services.get(&key) == new.as_ref() {
            return false;
        }
        match new {
            Some(info) => self.services.insert(key.clone(), info),
            None => self.services.remove(&key),
        };
        touched.insert(key.clone());
        self.pending_services.insert(key);
        true
    }

    /// `put_slice` without the refresh (see `set_service`).
    fn set_slice(&mut self, key: Key, new: Option<SliceInfo>, touched: &mut BTreeSet<Key>) -> bool {
        let old = self.slices.get(&key);
        if old == new.as_ref() {
            return false;
        }
        // Both the old and the new owning Service see an endpoint change (the label may move).
        let owners: BTreeSet<Key> =
            old.iter().copied().chain(new.as_ref()).map(|s| (s.namespace.clone(), s.service_name.clone())).collect();
        if let Some(o) = old {
            let owner = (o.namespace.clone(), o.service_name.clone());
            if let Some(set) = self.slices_by_service.get_mut(&owner) {
                set.retain(|k| *k != key);
                if set.is_empty() {
                    self.slices_by_service.remove(&owner);
                }
            }
        }
        if let Some(n) = &new {
            let set = self.slices_by_service.entry((n.namespace.clone(), n.service_name.clone())).or_default();
            if let Err(at) = set.binary_search(&key) {
                set.insert(at, key.clone());
            }
        }
        match new {
            Some(info) => self.slices.insert(key, info),
            None => self.slices.remove(&key),
        };
        touched.extend(owners.iter().cloned());
        self.pending_endpoints.extend(owners);
        true
    }

    fn put_node(&mut self, new: Option<NodeInfo>) -> bool {
        if self.node == new {
            return false;
        }
        self.node = new;
        self.changes.full = true;
        true
    }
}

/// One family's merged service ports and endpoints, before they become a state's maps.
type MergedFamily = (Vec<(ServicePortName, Arc<ServicePort>)>, Vec<(ServicePortName, Vec<Endpoint>)>);

/// The Service (namespace, name) a slice belongs to, borrowed from the slice.
type Owner<'a> = (&'a str, &'a str);

/// What [`merge_range`] made of a range of Services: the merged ports and endpoints per family
/// and the Services touched, each in key order.
#[derive(Default)]
struct Merged {
    merged: BTreeMap<Family, MergedFamily>,
    touched: Vec<Key>,
}

/// Merges each Service of `services` and each owner of `groups` (both sorted, over the same key
/// range) once, in key order: a Service's ports with the endpoints of its slices. An owner
/// without a Service object is only touched.
fn merge_range<'a>(
    services: impl Iterator<Item = (&'a Key, &'a ServiceInfo)>,
    groups: &[(Owner<'_>, Vec<(&Key, &SliceInfo)>)],
) -> Merged {
    let mut out = Merged::default();
    let (mut svcs, mut owners) = (services.peekable(), groups.iter().peekable());
    let borrowed = |k: &'a Key| (k.0.as_str(), k.1.as_str());
    loop {
        let (key, svc, slices) = match (svcs.peek(), owners.peek()) {
            (None, None) => break,
            (Some((k, _)), Some((g, _))) if borrowed(k) == *g => {
                let ((k, svc), (_, sl)) = (svcs.next().expect("peeked"), owners.next().expect("peeked"));
                (k.clone(), Some(svc), sl.as_slice())
            }
            (Some((k, _)), Some((g, _))) if borrowed(k) > *g => {
                let ((ns, name), sl) = owners.next().expect("peeked");
                ((ns.to_string(), name.to_string()), None, sl.as_slice())
            }
            (Some(_), _) => {
                let (k, svc) = svcs.next().expect("peeked");
                (k.clone(), Some(svc), &[][..])
            }
            (None, Some(_)) => {
                let ((ns, name), sl) = owners.next().expect("peeked");
                ((ns.to_string(), name.to_string()), None, sl.as_slice())
            }
        };
        out.touched.push(key);
        let Some(svc) = svc else { continue };
        for f in FAMILIES {
            let (ports, eps) = out.merged.entry(f).or_default();
            let family_slices: Vec<&SliceInfo> = slices.iter().map(|(_, s)| *s).filter(|s| s.family == f).collect();
            for sp in svc.ports.iter().filter(|p| p.family() == f) {
                let e = merge_endpoints(&family_slices, sp.name.port_name(), sp.name.protocol());
                if !e.is_empty() {
                    eps.push((sp.name.clone(), e));
                }
                ports.push((sp.name.clone(), sp.clone()));
            }
        }
    }
    out
}

/// Runs `a` here and `b` on a second thread, and returns both results; both here when no thread
/// can be started.
fn both<A: Send, B: Send>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    let (mut a, mut b) = (Some(a), Some(b));
    let done = std::thread::scope(|s| {
        let run_b = || (b.take().expect("runs once"))();
        let h = std::thread::Builder::new().name("kproxy-fill".into()).spawn_scoped(s, run_b).ok()?;
        let a = (a.take().expect("runs once"))();
        Some((a, h.join().expect("the second fill thread panicked")))
    });
    done.unwrap_or_else(|| ((a.take().expect("not run"))(), (b.take().expect("not run"))()))
}

/// Adds `new` to `set`, taking it whole when the set is empty.
fn union_into(set: &mut BTreeSet<Key>, new: BTreeSet<Key>) {
    if set.is_empty() {
        *set = new;
    } else {
        set.extend(new);
    }
}

fn key_of(ns: Option<&str>, name: Option<&str>) -> Key {
    (ns.unwrap_or("").to_string(), name.unwrap_or("").to_string())
}

/// `items` by key, the first of each key kept and a rejection for each later one, in input order.
/// The map is built from sorted input in one pass: inserting one key at a time compared strings
/// at every level of the tree (at 50k Services and as many slices, 67-117 ms of the load).
fn keyed<T>(items: Vec<T>, kind: &'static str, key: impl Fn(&T) -> Key) -> (BTreeMap<Key, T>, Vec<Rejected>) {
    let mut order: Vec<(Key, usize)> = items.iter().enumerate().map(|(i, t)| (key(t), i)).collect();
    order.sort_unstable();
    let mut items: Vec<Option<T>> = items.into_iter().map(Some).collect();
    let mut dups: Vec<(usize, Rejected)> = Vec::new();
    let mut out: Vec<(Key, T)> = Vec::with_capacity(order.len());
    for (k, i) in order {
        if out.last().is_some_and(|(last, _)| *last == k) {
            dups.push((i, duplicate(kind, &k)));
        } else {
            out.push((k, items[i].take().expect("each index once")));
        }
    }
    dups.sort_unstable_by_key(|(i, _)| *i);
    (out.into_iter().collect(), dups.into_iter().map(|(_, r)| r).collect())
}

fn duplicate(kind: &'static str, key: &Key) -> Rejected {
    Rejected::new(kind, &key.0, &key.1, "duplicate object with the same namespace and name; the first one is used")
}

fn merge_endpoints(slices: &[&SliceInfo], port_name: &str, protocol: Protocol) -> Vec<Endpoint> {
    let mut eps = Vec::new();
    for slice in slices {
        for port in slice.ports.iter().filter(|p| p.name == port_name && p.protocol == protocol) {
            eps.extend(slice.endpoints.iter().map(|e| Endpoint {
                ip: e.ip,
                port: port.port,
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                placement: e.placement.clone(),
            }));
        }
    }
    rules::model::order_unique(&mut eps);
    eps
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::model::{ServicePort, ServicePortName};

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("fixture Service")
    }
    /// A slice fixture: `ports` and `endpoints` are YAML flow sequences.
    fn slice(name: &str, service: &str, family: &str, ports: &str, endpoints: &str) -> EndpointSlice {
        serde_yaml::from_str(&format!(
            "metadata: {{namespace: ns1, name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: {family}
ports: {ports}
endpoints: {endpoints}"
        ))
        .expect("fixture EndpointSlice")
    }
    const SVC_HTTP: &str = "metadata: {namespace: ns1, name: svc1}
spec: {clusterIP: 172.30.0.41, ports: [{name: http, port: 80}, {name: https, port: 443}]}";
    fn spn(port: &str) -> ServicePortName {
        ServicePortName::new("ns1", "svc1", port, Protocol::Tcp)
    }

    #[test]
    fn named_port_maps_to_different_numbers_per_slice() {
        let mut t = ChangeTracker::new("node-a");
        assert_eq!(t.upsert_service(&svc(SVC_HTTP)), Ok(true));
        t.upsert_slice(&slice("a", "svc1", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.1.1]}]")).unwrap();
        t.upsert_slice(&slice(
            "b",
            "svc1",
            "IPv4",
            "[{name: http, port: 9090}]",
            "[{addresses: [10.0.1.2], nodeName: node-a}]",
        ))
        .unwrap();
        let st = t.cluster_state(Family::V4);
        assert_eq!(st.services.len(), 2);
        assert_eq!(
            st.endpoints.get(&spn("http")),
            Some(&vec![Endpoint::ready("10.0.1.1", 8080), Endpoint::ready("10.0.1.2", 9090).on_node("node-a")])
        );
        // Case 14: https has no slice port, so no endpoints (the rules will reject).
        assert_eq!(st.endpoints.get(&spn("https")), None);
    }

    #[test]
    fn endpoint_hints_reach_the_cluster_state() {
        let mut t = ChangeTracker::new("n");
        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        t.upsert_slice(&slice(
            "a",
            "svc1",
            "IPv4",
            "[{name: http, port: 80}]",
            "[{addresses: [10.0.1.1], hints: {forZones: [{name: z1}], forNodes: [{name: n}]}}]",
        ))
        .unwrap();
        let eps = &t.cluster_state(Family::V4).endpoints[&spn("http")];
        assert_eq!(eps[0], Endpoint::ready("10.0.1.1", 80).with_zone_hints(&["z1"]).with_node_hints(&["n"]));
    }

    #[test]
    fn port_name_and_protocol_must_match() {
        let mut t = ChangeTracker::new("n");
        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        t.upsert_slice(&slice(
            "a",
            "svc1",
            "IPv4",
            "[{name: p80, port: 80}, {name: http, port: 80, protocol: UDP}]",
            "[{addresses: [10.0.1.1]}]",
        ))
        .unwrap();
        assert!(t.cluster_state(Family::V4).endpoints.is_empty());
    }

    #[test]
    fn slice_before_service_is_used_once_service_arrives() {
        let mut t = ChangeTracker::new("n");
        t.upsert_slice(&slice("a", "svc1", "IPv4", "[{name: http, port: 80}]", "[{addresses: [10.0.1.1]}]")).unwrap();
        assert!(t.cluster_state(Family::V4).services.is_empty());
        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        assert_eq!(
            t.cluster_state(Family::V4).endpoints.get(&spn("http")),
            Some(&vec![Endpoint::ready("10.0.1.1", 80)])
        );
    }

    #[test]
    fn keyed_keeps_the_first_of_each_key_and_rejects_later_ones_in_input_order() {
        let items = vec![("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5), ("b", 6)];
        let (m, rejected) = keyed(items, "Service", |(n, _)| ("ns".to_string(), n.to_string()));
        let kept: Vec<(&str, i32)> = m.iter().map(|(k, (_, v))| (k.1.as_str(), *v)).collect();
        assert_eq!(kept, vec![("a", 2), ("b", 1), ("c", 4)]);
        let names: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        for (line, name) in names.iter().zip(["ns/b", "ns/a", "ns/b"]) {
            assert!(line.starts_with(&format!("Service {name}: duplicate")), "{names:?}");
        }
    }

    #[test]
    fn duplicate_endpoint_across_slices_prefers_non_terminating() {
        let mut t = ChangeTracker::new("n");
        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        let ports = "[{name: http, port: 80}]";
        t.upsert_slice(&slice(
            "a",
            "svc1",
            "IPv4",
            ports,
            "[{addresses: [10.0.1.1], conditions: {terminating: true}}, {addresses: [10.0.1.10]}]",
        ))
        .unwrap();
        t.upsert_slice(&slice(
            "b",
            "svc1",
            "IPv4",
            ports,
            "[{addresses: [10.0.1.1]}, {addresses: [10.0.1.10], conditions: {terminating: true}}]",
        ))
        .unwrap();
        let eps = t.cluster_state(Family::V4).endpoints.remove(&spn("http")).unwrap();
        assert_eq!(eps.len(), 2);
        assert!(eps.iter().all(|e| !e.terminating), "{eps:?}");
        // Ordered by the "IP:port" string, as upstream: ':' sorts after '0'.
        assert_eq!(eps[0].ip.to_string(), "10.0.1.10");
    }

    #[test]
    fn families_are_kept_apart() {
        let mut t = ChangeTracker::new("n");
        t.upsert_service(&svc("metadata: {namespace: ns1, name: svc1}
spec: {clusterIPs: [172.30.0.41, 'fd00::41'], ports: [{name: http, port: 80}]}"))
            .unwrap();
        t.upsert_slice(&slice("v4", "svc1", "IPv4", "[{name: http, port: 80}]", "[{addresses: [10.0.1.1]}]")).unwrap();
        t.upsert_slice(&slice("v6", "svc1", "IPv6", "[{name: http, port: 80}]", "[{addresses: ['fd00:10::1']}]"))
            .unwrap();
        let v4 = t.cluster_state(Family::V4);
        let v6 = t.cluster_state(Family::V6);
        assert_eq!(v4.services[&spn("http")].cluster_ip.to_string(), "172.30.0.41");
        assert_eq!(v6.services[&spn("http")].cluster_ip.to_string(), "fd00::41");
        assert_eq!(v4.endpoints[&spn("http")], vec![Endpoint::ready("10.0.1.1", 80)]);
        assert_eq!(v6.endpoints[&spn("http")], vec![Endpoint::ready("fd00:10::1", 80)]);
    }

    #[test]
    fn no_op_updates_return_false_and_count_nothing() {
        let mut t = ChangeTracker::new("n");
        let s = svc(SVC_HTTP);
        let sl = slice("a", "svc1", "IPv4", "[{name: http, port: 80}]", "[{addresses: [10.0.1.1]}]");
        assert_eq!(t.upsert_service(&s), Ok(true));
        assert_eq!(t.upsert_slice(&sl), Ok(true));
        assert_eq!(t.take_pending(), Pending { services: 1, endpoints: 1 });
        let mut s2 = s.clone();
        s2.metadata.resource_version = Some("2".into()); // irrelevant to the rules
        assert_eq!(t.upsert_service(&s2), Ok(false));
        assert_eq!(t.upsert_slice(&sl), Ok(false));
        assert_eq!(t.take_pending(), Pending::default());
        assert!(t.delete_slice("ns1", "a"));
        assert!(!t.delete_slice("ns1", "a"));
        assert!(t.delete_service("ns1", "svc1"));
        assert!(!t.delete_service("ns1", "svc1"));
        assert_eq!((t.pending_service_changes(), t.pending_endpoint_changes()), (1, 1));
    }

    #[test]
    fn pending_counts_distinct_services() {
        let mut t = ChangeTracker::new("n");
        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        t.upsert_service(&svc(
            "metadata: {namespace: ns1, name: svc1}\nspec: {clusterIP: 172.30.0.41, ports: [{port: 81}]}",
        ))
        .unwrap();
        t.upsert_slice(&slice("a", "svc1", "IPv4", "[]", "[]")).unwrap();
        t.upsert_slice(&slice("b", "svc1", "IPv4", "[]", "[{addresses: [10.0.0.1]}]")).unwrap();
        // Moving slice b to another Service touches both Services' endpoints.
        t.upsert_slice(&slice("b", "svc2", "IPv4", "[]", "[{addresses: [10.0.0.1]}]")).unwrap();
        assert_eq!(t.pending_service_changes(), 1);
        assert_eq!(t.pending_endpoint_changes(), 2);
    }

    #[test]
    fn rejected_update_removes_previous_version_and_headless_removes_service() {
        let mut t = ChangeTracker::new("n");
        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        t.take_pending();
        let bad = svc("metadata: {namespace: ns1, name: svc1}\nspec: {clusterIP: 172.30.0.41, ports: [{port: 0}]}");
        let err = t.upsert_service(&bad).unwrap_err();
        assert!(err.to_string().contains("port 0 is out of range"), "{err}");
        assert_eq!(t.service_count(), 0);
        assert_eq!(t.pending_service_changes(), 1);

        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        assert_eq!(t.upsert_service(&svc("metadata: {namespace: ns1, name: svc1}\nspec: {clusterIP: None}")), Ok(true));
        assert_eq!(t.service_count(), 0);

        t.upsert_slice(&slice("a", "svc1", "IPv4", "[]", "[]")).unwrap();
        assert!(t.upsert_slice(&slice("a", "svc1", "IPv4", "[]", "[{addresses: [bad]}]")).is_err());
        assert_eq!(t.slice_count(), 0);
    }

    #[test]
    fn node_defaults_to_configured_name_and_ignores_other_nodes() {
        let mut t = ChangeTracker::new("node-a");
        assert_eq!(t.node(), NodeInfo { name: "node-a".into(), ..Default::default() });
        assert!(!t.node_known());
        let other: Node = serde_yaml::from_str("metadata: {name: node-b}").unwrap();
        assert_eq!(t.set_node(&other), Ok(false));
        let own: Node = serde_yaml::from_str(
            "metadata: {name: node-a, labels: {zone: z}}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}",
        )
        .unwrap();
        assert_eq!(t.set_node(&own), Ok(true));
        assert_eq!(t.set_node(&own), Ok(false));
        assert_eq!(t.node().primary_ips, vec!["192.168.0.2".parse::<std::net::IpAddr>().unwrap()]);
        assert!(t.delete_node("node-a"));
        assert!(!t.node_known());
    }

    #[test]
    fn service_cidrs_are_a_sorted_set_and_report_changes() {
        let mut t = ChangeTracker::new("n");
        assert!(t.service_cidrs().is_empty());
        let c = |s: &str| Cidr::parse(s).unwrap();
        assert!(t.set_service_cidrs([c("fd00:10:96::/112"), c("172.30.0.0/16"), c("172.30.0.0/16")]));
        assert_eq!(t.service_cidrs(), &[c("172.30.0.0/16"), c("fd00:10:96::/112")]);
        assert!(!t.set_service_cidrs([c("fd00:10:96::/112"), c("172.30.0.0/16")]), "same set, other order");
        assert_eq!(t.cluster_state(Family::V4).service_cidrs, vec![c("172.30.0.0/16")], "each family its own");
        assert_eq!(t.cluster_state(Family::V6).service_cidrs, vec![c("fd00:10:96::/112")]);
        assert!(t.set_service_cidrs([]));
        assert!(t.service_cidrs().is_empty());
        assert_eq!(t.take_pending(), Pending::default(), "not a Service or endpoints change");
    }

    #[test]
    fn keys_list_what_is_held() {
        let mut t = ChangeTracker::new("n");
        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        t.upsert_service(&svc("metadata: {namespace: ns1, name: headless}\nspec: {clusterIP: None}")).unwrap();
        t.upsert_slice(&slice("a", "svc1", "IPv4", "[]", "[]")).unwrap();
        assert_eq!(t.service_keys().collect::<Vec<_>>(), vec![("ns1", "svc1")]);
        assert_eq!(t.slice_keys().collect::<Vec<_>>(), vec![("ns1", "a")]);
        assert!(t.has_service("ns1", "svc1") && !t.has_service("ns1", "headless"));
        assert!(t.has_slice("ns1", "a") && !t.has_slice("ns2", "a"));
    }

    #[test]
    fn trigger_times_are_taken_once_and_bounded() {
        let mut t = ChangeTracker::new("n");
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        t.record_trigger_time(t0);
        assert_eq!(t.take_trigger_times(), vec![t0]);
        assert!(t.take_trigger_times().is_empty());
        for _ in 0..MAX_TRIGGER_TIMES + 10 {
            t.record_trigger_time(t0);
        }
        assert_eq!(t.take_trigger_times().len(), MAX_TRIGGER_TIMES);
    }

    #[test]
    fn rejections_are_kept_for_the_sync_loop_and_bounded() {
        let mut t = ChangeTracker::new("n");
        let r = Rejected::new("Service", "ns", "bad", "spec.ports[0].port 0 is out of range 1-65535".to_string());
        t.record_rejected(r.clone());
        assert_eq!(t.take_rejected(), vec![r.clone()]);
        assert!(t.take_rejected().is_empty());
        for _ in 0..MAX_TRIGGER_TIMES + 5 {
            t.record_rejected(r.clone());
        }
        assert_eq!(t.take_rejected().len(), MAX_TRIGGER_TIMES);
    }

    #[test]
    fn replace_all_reports_changes_and_rejections() {
        let mut t = ChangeTracker::new("x");
        let services = vec![
            svc(SVC_HTTP),
            svc("metadata: {namespace: ns1, name: bad}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 70000}]}"),
            svc("metadata: {namespace: ns1, name: svc1}\nspec: {clusterIP: 10.9.9.9, ports: [{port: 1}]}"),
        ];
        let slices = vec![slice("a", "svc1", "IPv4", "[{name: http, port: 80}]", "[{addresses: [10.0.1.1]}]")];
        let nodes: Vec<Node> = vec![
            serde_yaml::from_str("metadata: {name: other}").unwrap(),
            serde_yaml::from_str(
                "metadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}]}",
            )
            .unwrap(),
        ];
        let (changed, rejected) = t.replace_all(&services, &slices, &nodes, "node-a");
        assert!(changed);
        let lines: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("Service ns1/bad: spec.ports[0].port 70000"), "{lines:?}");
        assert!(lines[1].contains("Service ns1/svc1: duplicate"), "{lines:?}");
        assert_eq!(
            *t.cluster_state(Family::V4).services[&spn("http")],
            ServicePort::cluster_ip("ns1", "svc1", "http", Protocol::Tcp, "172.30.0.41", 80)
        );
        assert_eq!(t.node().name, "node-a");
        assert_eq!(t.node().primary_ips.len(), 1);
        assert_eq!(t.take_pending(), Pending { services: 1, endpoints: 1 });

        let (changed, _) = t.replace_all(&services, &slices, &nodes, "node-a");
        assert!(!changed, "same input again is a no-op");
        assert_eq!(t.take_pending(), Pending::default());

        let (changed, rejected) = t.replace_all(&[], &[], &[], "node-a");
        assert!(changed && rejected.is_empty());
        assert_eq!(t.service_count() + t.slice_count(), 0);
        assert!(!t.node_known());
        assert_eq!(t.take_pending(), Pending { services: 1, endpoints: 1 });
    }

    /// The incrementally kept state equals one computed from scratch after every kind of change,
    /// and `take_changes` hands out exactly the changed Services, before and after.
    #[test]
    fn incremental_state_matches_a_full_merge() {
        let mut t = ChangeTracker::new("node-a");
        let check = |t: &ChangeTracker, what: &str| {
            // The dense copy the daemon keeps after a big sync holds the same, and its indexes
            // (services, slices, slices by Service) merge to the same state.
            let d = t.dense_copy();
            for f in FAMILIES {
                assert_eq!(t.state(f), &t.compute_state(f), "{what} ({f:?})");
                assert_eq!(d.state(f), t.state(f), "{what} ({f:?}), dense copy");
                assert_eq!(&d.compute_state(f), t.state(f), "{what} ({f:?}), dense copy merged");
            }
        };
        let svc2 = "metadata: {namespace: ns1, name: svc2}
spec: {clusterIP: 172.30.0.42, ipFamilies: [IPv4, IPv6], clusterIPs: [172.30.0.42, 'fd00::42'], ports: [{name: http, port: 80}]}";
        t.upsert_service(&svc(SVC_HTTP)).unwrap();
        check(&t, "service");
        t.upsert_slice(&slice("a", "svc1", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.1.1]}]")).unwrap();
        check(&t, "slice");
        t.upsert_slice(&slice("b", "svc2", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.1.2]}]")).unwrap();
        check(&t, "slice before its service");
        t.upsert_service(&svc(svc2)).unwrap();
        t.upsert_slice(&slice("c", "svc2", "IPv6", "[{name: http, port: 8080}]", "[{addresses: ['fd00::7']}]"))
            .unwrap();
        check(&t, "dual-stack service and slices");
        let _ = t.take_changes();
        // Moving slice a from svc1 to svc2 changes both.
        t.upsert_slice(&slice("a", "svc2", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.1.1]}]")).unwrap();
        check(&t, "slice moved");
        let c = t.take_changes();
        let names = |st: &ClusterState| st.endpoints.keys().map(|n| n.name().to_string()).collect::<Vec<_>>();
        assert_eq!(c.services.len(), 2);
        assert_eq!(names(c.before(Family::V4)), vec!["svc1", "svc2"]);
        assert_eq!(names(&c.after(t.state(Family::V4))), vec!["svc2"], "svc1 has no endpoints any more");
        assert_eq!(c.after(t.state(Family::V6)).services.len(), 1, "svc2's IPv6 port is part of the change");
        assert!(!c.full);
        // A no-op changes nothing; deletions and the node do.
        t.upsert_service(&svc(svc2)).unwrap();
        assert!(t.take_changes().services.is_empty());
        t.delete_service("ns1", "svc2");
        check(&t, "service deleted");
        t.delete_slice("ns1", "a");
        check(&t, "slice deleted");
        let c = t.take_changes();
        assert_eq!(c.services.len(), 1);
        assert!(c.after(t.state(Family::V4)).services.is_empty() && c.before(Family::V4).services.len() == 1);
        assert!(t.set_service_cidrs([Cidr::parse("172.30.0.0/16").unwrap()]));
        check(&t, "service CIDRs");
        assert!(t.take_changes().full);
        // replace_all refreshes each touched Service once, after every object is in: the same
        // state, and the changes hold exactly the touched Services as they were before.
        let services = vec![svc(SVC_HTTP), svc(svc2)];
        let slices = vec![
            slice("a", "svc1", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.1.9]}]"),
            slice("c", "svc2", "IPv6", "[{name: http, port: 8080}]", "[{addresses: ['fd00::7']}]"),
        ];
        let (changed, rejected) = t.replace_all(&services, &slices, &[], "node-a");
        assert!(changed && rejected.is_empty());
        check(&t, "replace_all");
        let c = t.take_changes();
        assert_eq!(c.services.len(), 2, "svc1 (slice a back) and svc2 (back, slice b gone)");
        assert!(c.before(Family::V4).endpoints.is_empty(), "neither had endpoints before");
        let svcs = |st: &ClusterState| st.services.keys().map(|n| n.name().to_string()).collect::<BTreeSet<_>>();
        assert_eq!(svcs(c.before(Family::V4)), BTreeSet::from(["svc1".to_string()]), "svc2 did not exist before");
        assert_eq!(svcs(&c.after(t.state(Family::V4))), BTreeSet::from(["svc1".to_string(), "svc2".to_string()]));
        assert_eq!(names(&c.after(t.state(Family::V4))), vec!["svc1"]);
        assert_eq!(names(&c.after(t.state(Family::V6))), vec!["svc2"]);
    }

    /// Filling an empty tracker (a start-up) gives what upserting each object gives: the same
    /// merged states, slices by Service, pending counts and changes.
    #[test]
    fn a_start_up_fill_equals_object_by_object() {
        let dual = "metadata: {namespace: ns1, name: svc2}
spec: {clusterIP: 172.30.0.42, ipFamilies: [IPv4, IPv6], clusterIPs: [172.30.0.42, 'fd00::42'], ports: [{name: http, port: 80}]}";
        let services = vec![svc(SVC_HTTP), svc(dual)];
        let slices = vec![
            // Slices of one Service whose names sort in another order than they are given, the
            // same address twice (terminating first), a slice without its Service, both families.
            slice(
                "z",
                "svc1",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.1.2]}, {addresses: [10.0.1.10]}]",
            ),
            slice(
                "a",
                "svc1",
                "IPv4",
                "[{name: http, port: 8080}, {name: https, port: 8443}]",
                "[{addresses: [10.0.1.2], conditions: {ready: false, terminating: true}}, {addresses: [10.0.1.1]}]",
            ),
            slice("m", "gone", "IPv4", "[{name: http, port: 80}]", "[{addresses: [10.0.9.9]}]"),
            slice("y", "zz-after-all", "IPv4", "[{name: http, port: 80}]", "[{addresses: [10.0.9.8]}]"),
            slice("b", "svc2", "IPv6", "[{name: http, port: 8080}]", "[{addresses: ['fd00::7']}]"),
            slice("c", "svc2", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.2.1]}]"),
        ];
        let mut filled = ChangeTracker::new("node-a");
        let (changed, rejected) = filled.replace_all(&services, &slices, &[], "node-a");
        assert!(changed && rejected.is_empty());
        let mut one_by_one = ChangeTracker::new("node-a");
        for s in &slices {
            one_by_one.upsert_slice(s).unwrap();
        }
        for s in &services {
            one_by_one.upsert_service(s).unwrap();
        }
        for f in FAMILIES {
            assert_eq!(filled.state(f), one_by_one.state(f), "{f:?}");
            assert_eq!(filled.state(f), &filled.compute_state(f), "{f:?}");
        }
        assert_eq!(filled.slices_by_service, one_by_one.slices_by_service);
        let v4 = filled.state(Family::V4);
        let eps: Vec<String> = v4.endpoints[&spn("http")].iter().map(|e| e.addr_string()).collect();
        assert_eq!(eps, vec!["10.0.1.10:8080", "10.0.1.1:8080", "10.0.1.2:8080"]);
        assert!(
            v4.endpoints[&spn("http")].iter().all(|e| !e.terminating),
            "the ready copy replaced the terminating one"
        );
        assert_eq!(filled.take_pending(), one_by_one.take_pending());
        let (a, b) = (filled.take_changes(), one_by_one.take_changes());
        assert_eq!(a.services, b.services);
        assert_eq!(a.services.len(), 4, "svc1, svc2 and the missing Services of slices m and y");
        for f in FAMILIES {
            assert_eq!(a.before(f), b.before(f));
            assert_eq!(a.after(filled.state(f)), b.after(one_by_one.state(f)));
        }
        // The next load goes the incremental way and changes nothing.
        let (changed, _) = filled.replace_all(&services, &slices, &[], "node-a");
        assert!(!changed);
    }
}

#[cfg(test)]
mod fill_against_the_incremental_way {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn gen(rng: &mut Rng) -> (Vec<ServiceInfo>, Vec<SliceInfo>) {
        let mut services = Vec::new();
        let nss = ["a", "b", "default"];
        let names = ["s0", "s1", "s2", "s3", "s10", "x"];
        for _ in 0..rng.below(8) {
            let ns = nss[rng.below(3) as usize];
            let name = names[rng.below(6) as usize];
            let dual = rng.below(3);
            let (ips, fams) = match dual {
                0 => ("[10.0.0.1]".to_string(), "[IPv4]"),
                1 => ("['fd00::1']".to_string(), "[IPv6]"),
                _ => ("[10.0.0.1, 'fd00::1']".to_string(), "[IPv4, IPv6]"),
            };
            let first = if dual == 1 { "'fd00::1'" } else { "10.0.0.1" };
            let nports = 1 + rng.below(3);
            let ports: Vec<String> = (0..nports).map(|i| format!("{{name: p{i}, port: {}}}", 80 + i)).collect();
            let y = format!("metadata: {{namespace: {ns}, name: {name}}}\nspec: {{clusterIP: {first}, clusterIPs: {ips}, ipFamilies: {fams}, ports: [{}]}}", ports.join(", "));
            let s: Service = serde_yaml::from_str(&y).unwrap();
            if let Ok(Converted::Proxied(i)) = convert::service(&s) {
                services.push(i);
            }
        }
        let mut slices = Vec::new();
        for k in 0..rng.below(10) {
            let ns = nss[rng.below(3) as usize];
            let owner = names[rng.below(6) as usize];
            let v6 = rng.below(2) == 1;
            let fam = if v6 { "IPv6" } else { "IPv4" };
            let nports = 1 + rng.below(3);
            let ports: Vec<String> = (0..nports)
                .map(|_| {
                    let i = rng.below(3);
                    format!("{{name: p{i}, port: {}}}", 8000 + rng.below(3))
                })
                .collect();
            let neps = rng.below(5);
            let eps: Vec<String> = (0..neps).map(|_| {
                let a = rng.below(12);
                let ip = if v6 { format!("'fd00::{a}'") } else { format!("10.1.0.{a}") };
                let term = rng.below(3) == 0;
                format!("{{addresses: [{ip}], nodeName: n{}, conditions: {{ready: {}, serving: true, terminating: {term}}}}}", rng.below(3), !term)
            }).collect();
            let y = format!("metadata: {{namespace: {ns}, name: sl{}, labels: {{kubernetes.io/service-name: {owner}}}}}\naddressType: {fam}\nports: [{}]\nendpoints: [{}]", k % 4, ports.join(", "), eps.join(", "));
            let mut s: EndpointSlice = serde_yaml::from_str(&y).unwrap();
            for p in s.ports.iter_mut().flatten() {
                p.protocol.get_or_insert_with(|| "TCP".into());
            }
            if let Ok(Converted::Proxied(i)) = convert::endpoint_slice(&s) {
                slices.push(i);
            }
        }
        (services, slices)
    }

    /// What `replace_converted` did before `fill`: set each object, refresh each touched Service.
    fn incremental(t: &mut ChangeTracker, services: Vec<ServiceInfo>, slices: Vec<SliceInfo>) -> bool {
        let mut ns: BTreeMap<Key, ServiceInfo> = BTreeMap::new();
        for i in services {
            ns.entry((i.namespace.clone(), i.name.clone())).or_insert(i);
        }
        let mut nsl: BTreeMap<Key, SliceInfo> = BTreeMap::new();
        for i in slices {
            nsl.entry((i.namespace.clone(), i.name.clone())).or_insert(i);
        }
        t.then_refresh(|t, touched| {
            let mut changed = false;
            for (k, v) in ns {
                changed |= t.set_service(k, Some(v), touched);
            }
            for (k, v) in nsl {
                changed |= t.set_slice(k, Some(v), touched);
            }
            changed
        })
    }

    /// Random clusters (both families, dual-stack, Services without slices, slices without
    /// their Service, repeated and terminating endpoints, earlier changes not yet taken): `fill`
    /// leaves the tracker exactly as setting the objects one by one does.
    #[test]
    fn fill_equals_incremental_randomized() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for iter in 0..3000 {
            let (services, slices) = gen(&mut rng);
            let pre = rng.below(3);
            let mut a = ChangeTracker::new("n");
            let mut b = ChangeTracker::new("n");
            for t in [&mut a, &mut b] {
                if pre >= 1 {
                    // a Service that came and went, changes not taken
                    let s: Service = serde_yaml::from_str("metadata: {namespace: a, name: s1}\nspec: {clusterIP: 10.0.0.9, ports: [{name: p0, port: 80}]}").unwrap();
                    t.upsert_service(&s).unwrap();
                    if pre == 2 {
                        let _ = t.take_changes();
                        let _ = t.take_pending();
                    }
                    t.delete_service("a", "s1");
                }
                t.set_service_cidrs([Cidr::parse("10.0.0.0/8").unwrap()]);
            }
            let ca = a.replace_converted(services.clone(), slices.clone(), vec![], "n").0;
            let cb = incremental(&mut b, services.clone(), slices.clone());
            assert_eq!(ca, cb, "iter {iter} changed");
            for f in FAMILIES {
                assert_eq!(a.state(f), b.state(f), "iter {iter} {f:?}");
                assert_eq!(a.state(f), &a.compute_state(f), "iter {iter} {f:?}");
            }
            assert_eq!(a.slices_by_service, b.slices_by_service, "iter {iter}");
            assert_eq!(a.pending_services, b.pending_services, "iter {iter}");
            assert_eq!(a.pending_endpoints, b.pending_endpoints, "iter {iter}");
            assert_eq!(a.changes.services, b.changes.services, "iter {iter}");
            assert_eq!(a.changes.old, b.changes.old, "iter {iter} old");
            assert_eq!(a.changes.full, b.changes.full);
            let (x, y) = (a.take_changes(), b.take_changes());
            for f in FAMILIES {
                assert_eq!(x.after(a.state(f)), y.after(b.state(f)), "iter {iter} {f:?} after");
            }
            assert_eq!(a.services, b.services);
            assert_eq!(a.slices, b.slices);
        }
    }
}
