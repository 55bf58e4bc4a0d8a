#!/usr/bin/env python3
# Generates kproxy.json (the Grafana dashboard) next to this file:
#   python3 deploy/dashboards/generate.py > deploy/dashboards/kproxy.json
# Edit this script rather than the JSON; tests/observability.rs checks that the two agree and that
# every metric the dashboard queries is exported by kproxy.
import json
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
RI = "$__rate_interval"
panels = []
pid = [0]
y = [0]

def nid():
    pid[0] += 1
    return pid[0]

def row(title):
    panels.append({"type": "row", "title": title, "id": nid(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]}, "panels": []})
    y[0] += 1

x_cursor = [0]
row_h = [0]

def place(w, h):
    if x_cursor[0] + w > 24:
        y[0] += row_h[0]
        x_cursor[0] = 0
        row_h[0] = 0
    g = {"h": h, "w": w, "x": x_cursor[0], "y": y[0]}
    x_cursor[0] += w
    row_h[0] = max(row_h[0], h)
    return g

def newrow(title):
    if x_cursor[0] > 0:
        y[0] += row_h[0]
    x_cursor[0] = 0
    row_h[0] = 0
    row(title)

def ts(title, targets, unit="short", w=12, h=8, desc="", stack=False, minz=True):
    fc = {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10 if not stack else 60,
                                                 "stacking": {"mode": "normal" if stack else "none"}}},
          "overrides": []}
    if minz:
        fc["defaults"]["min"] = 0
    panels.append({"type": "timeseries", "title": title, "id": nid(), "datasource": DS, "description": desc,
                   "gridPos": place(w, h), "fieldConfig": fc,
                   "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
                               "tooltip": {"mode": "multi"}},
                   "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                               for i, (e, l) in enumerate(targets)]})

def stat(title, expr, unit="short", w=4, h=4, desc="", thresholds=None):
    panels.append({"type": "stat", "title": title, "id": nid(), "datasource": DS, "description": desc,
                   "gridPos": place(w, h),
                   "fieldConfig": {"defaults": {"unit": unit, "thresholds": thresholds or {"mode": "absolute", "steps": [{"color": "green", "value": None}]}}, "overrides": []},
                   "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
                   "targets": [{"datasource": DS, "expr": expr, "refId": "A"}]})

def q(p, metric, by="le", extra=""):
    return f'histogram_quantile({p}, sum by ({by}) (rate({metric}_bucket{{{SEL}{extra}}}[{RI}])))'

red_if_pos = {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}]}
red_if_zero = {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}

newrow("Overview")
stat("Nodes up", f'sum(up{{{SEL}}})', desc="Scraped kproxy targets that are up.")
stat("Unhealthy families", f'count(kproxy_healthy{{{SEL}}} == 0) or vector(0)', thresholds=red_if_pos,
     desc="Families whose queued change waited longer than the health timeout (/livez 503).")
stat("Nodes not eligible", f'count(kproxy_node_eligible{{{SEL}}} == 0) or vector(0)', thresholds=red_if_pos,
     desc="Nodes whose /healthz fails the node check: Node unknown, being deleted or tainted ToBeDeletedByClusterAutoscaler.")
stat("Failed syncs (range)", f'sum(increase(kubeproxy_sync_proxy_rules_nftables_sync_failures_total{{{SEL}}}[$__range]))',
     thresholds=red_if_pos)
stat("Sync p99 (all)", q(0.99, "kubeproxy_sync_proxy_rules_duration_seconds"), unit="s")
stat("Invalid objects (range)", f'sum(increase(kproxy_objects_rejected_total{{{SEL}}}[$__range]))')

newrow("Sync latency")
ts("Sync latency p50 / p99, full and partial (cluster)", [
    (q(0.99, "kubeproxy_sync_full_proxy_rules_duration_seconds"), "full p99"),
    (q(0.5, "kubeproxy_sync_full_proxy_rules_duration_seconds"), "full p50"),
    (q(0.99, "kubeproxy_sync_partial_proxy_rules_duration_seconds"), "partial p99"),
    (q(0.5, "kubeproxy_sync_partial_proxy_rules_duration_seconds"), "partial p50"),
], unit="s", desc="Whole-sync latency per IP family sync, from the upstream histograms (ExponentialBuckets(0.001, 2, 15)).")
ts("Sync latency p99 per node", [
    (q(0.99, "kubeproxy_sync_proxy_rules_duration_seconds", by="instance, ip_family, le"), "{{instance}} {{ip_family}}"),
], unit="s")
ts("Network programming latency p50 / p99", [
    (q(0.99, "kubeproxy_network_programming_duration_seconds"), "p99 cluster"),
    (q(0.5, "kubeproxy_network_programming_duration_seconds"), "p50 cluster"),
    (q(0.99, "kubeproxy_network_programming_duration_seconds", by="instance, le"), "p99 {{instance}}"),
], unit="s", desc="From an EndpointSlice's last-change-trigger-time to the kernel (API source only).")
ts("Mean time per phase: build / diff / commit", [
    (f'sum by (phase) (rate(kproxy_sync_phase_duration_seconds_sum{{{SEL}}}[{RI}])) / sum by (phase) (rate(kproxy_sync_phase_duration_seconds_count{{{SEL}}}[{RI}]))', "{{phase}}"),
], unit="s", stack=True, desc="build: model to ruleset; diff: ruleset to transaction; commit: the netlink transaction in the kernel.")
ts("Phase p99 per node", [
    (q(0.99, "kproxy_sync_phase_duration_seconds", by="instance, phase, le"), "{{instance}} {{phase}}"),
], unit="s")
ts("Syncs per second by kind and result", [
    (f'sum by (kind, result) (rate(kproxy_syncs_total{{{SEL}}}[{RI}]))', "{{kind}} {{result}}"),
], unit="ops")

newrow("Failures and health")
ts("Sync failures per node", [
    (f'sum by (instance) (rate(kubeproxy_sync_proxy_rules_nftables_sync_failures_total{{{SEL}}}[{RI}]))', "{{instance}}"),
    (f'sum by (instance) (rate(kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{{{SEL}}}[{RI}]))', "cleanup {{instance}}"),
], unit="ops")
ts("Seconds since last successful sync / queued change waiting", [
    (f'time() - kubeproxy_sync_proxy_rules_last_timestamp_seconds{{{SEL}}}', "since sync {{instance}} {{ip_family}}"),
    (f'clamp_min(kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{{{SEL}}} - kubeproxy_sync_proxy_rules_last_timestamp_seconds{{{SEL}}}, 0)', "queued after sync {{instance}} {{ip_family}}"),
], unit="s")
ts("Health: /healthz and /livez answers", [
    (f'sum by (code) (rate(kubeproxy_proxy_healthz_total{{{SEL}}}[{RI}]))', "healthz {{code}}"),
    (f'sum by (code) (rate(kubeproxy_proxy_livez_total{{{SEL}}}[{RI}]))', "livez {{code}}"),
], unit="reqps")
ts("Healthy families and eligible nodes", [
    (f'sum by (ip_family) (kproxy_healthy{{{SEL}}})', "healthy {{ip_family}}"),
    (f'sum(kproxy_node_eligible{{{SEL}}})', "eligible nodes"),
])

newrow("Changes and transactions")
ts("Pending changes", [
    (f'sum by (instance) (kubeproxy_sync_proxy_rules_service_changes_pending{{{SEL}}})', "services {{instance}}"),
    (f'sum by (instance) (kubeproxy_sync_proxy_rules_endpoint_changes_pending{{{SEL}}})', "endpoints {{instance}}"),
])
ts("Changes per second", [
    (f'sum(rate(kubeproxy_sync_proxy_rules_service_changes_total{{{SEL}}}[{RI}]))', "services"),
    (f'sum(rate(kubeproxy_sync_proxy_rules_endpoint_changes_total{{{SEL}}}[{RI}]))', "endpoints"),
], unit="ops")
ts("Transaction size: mean messages and bytes", [
    (f'sum by (instance) (rate(kproxy_transaction_messages_sum{{{SEL}}}[{RI}])) / sum by (instance) (rate(kproxy_transaction_messages_count{{{SEL}}}[{RI}]))', "messages {{instance}}"),
    (f'sum by (instance) (rate(kproxy_transaction_bytes_sum{{{SEL}}}[{RI}])) / sum by (instance) (rate(kproxy_transaction_bytes_count{{{SEL}}}[{RI}]))', "bytes {{instance}}"),
], desc="Netlink messages and bytes of each applied nftables batch.")
ts("Elements added / removed per second", [
    (f'sum by (op) (rate(kproxy_transaction_elements_total{{{SEL}}}[{RI}]))', "{{op}}"),
], unit="ops")
ts("Invalid objects skipped, by kind and reason", [
    (f'sum by (kind, reason) (increase(kproxy_objects_rejected_total{{{SEL}}}[{RI}]))', "{{kind}} {{reason}}"),
], desc="Each skip is logged once with the object's name and the full reason.")
ts("Ruleset objects", [
    (f'max by (object) (kproxy_ruleset_objects{{{SEL}}})', "{{object}} (max node)"),
    (f'sum by (traffic_policy) (kubeproxy_sync_proxy_rules_no_local_endpoints_total{{{SEL}}})', "no local endpoints {{traffic_policy}}"),
], desc="Service ports, endpoints, chains, rules, sets and set/map elements the kernel holds after the last successful sync.")

newrow("Process")
ts("Resident memory", [
    (f'process_resident_memory_bytes{{{SEL}}}', "{{instance}}"),
], unit="bytes", w=8)
ts("CPU", [
    (f'rate(process_cpu_seconds_total{{{SEL}}}[{RI}])', "{{instance}}"),
], unit="percentunit", w=8)
ts("Runtime tasks", [
    (f'kproxy_runtime_alive_tasks{{{SEL}}}', "{{instance}}"),
], w=8, desc="Tasks alive in the sync loop's async runtime (kproxy's counterpart of go_goroutines).")

# The panels of kubernetes-mixin's "Kubernetes / Proxy" dashboard (dashboards/proxy.libsonnet),
# with its queries, so operators keep the view they know.
newrow("Kubernetes / Proxy (kubernetes-mixin)")
stat("Up", f'sum(up{{{SEL}}})', w=4, h=7)
ts("Rules Sync Rate", [(f'sum(rate(kubeproxy_sync_proxy_rules_duration_seconds_count{{{SEL}}}[5m]))', "rate")], unit="ops", w=10, h=7)
ts("Rule Sync Latency 99th Quantile", [(f'histogram_quantile(0.99,rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket{{{SEL}}}[5m]))', "{{instance}}")], unit="s", w=10, h=7)
ts("Network Programming Rate", [(f'sum(rate(kubeproxy_network_programming_duration_seconds_count{{{SEL}}}[5m]))', "rate")], unit="ops")
ts("Network Programming Latency 99th Quantile", [(f'histogram_quantile(0.99, sum(rate(kubeproxy_network_programming_duration_seconds_bucket{{{SEL}}}[5m])) by (instance, le))', "{{instance}}")], unit="s")
ts("Kube API Request Rate", [
    (f'sum(rate(rest_client_requests_total{{{SEL},code=~"2.."}}[5m]))', "2xx"),
    (f'sum(rate(rest_client_requests_total{{{SEL},code=~"3.."}}[5m]))', "3xx"),
    (f'sum(rate(rest_client_requests_total{{{SEL},code=~"4.."}}[5m]))', "4xx"),
    (f'sum(rate(rest_client_requests_total{{{SEL},code=~"5.."}}[5m]))', "5xx"),
], unit="ops", w=8, desc="API source only.")
ts("Post Request Latency 99th Quantile", [(f'histogram_quantile(0.99, sum(rate(rest_client_request_duration_seconds_bucket{{{SEL},verb="POST"}}[5m])) by (verb, host, le))', "{{verb}} {{host}}")], unit="s", w=16)
ts("Get Request Latency 99th Quantile", [(f'histogram_quantile(0.99, sum(rate(rest_client_request_duration_seconds_bucket{{{SEL},verb="GET"}}[5m])) by (verb, host, le))', "{{verb}} {{host}}")], unit="s", w=24)
ts("Memory", [(f'process_resident_memory_bytes{{{SEL}}}', "{{instance}}")], unit="bytes", w=8)
ts("CPU usage", [(f'rate(process_cpu_seconds_total{{{SEL}}}[5m])', "{{instance}}")], w=8)
ts("Tasks (Goroutines in kube-proxy)", [(f'kproxy_runtime_alive_tasks{{{SEL}}}', "{{instance}}")], w=8)

dash = {
    "title": "kproxy",
    "uid": "kproxy-sync",
    "description": "kproxy sync latency first: full and partial syncs, network programming, the build/diff/commit split, failures, pending changes, transaction sizes, invalid objects, health, process. The last row keeps the kubernetes-mixin \"Kubernetes / Proxy\" panels.",
    "tags": ["kproxy", "kube-proxy", "kubernetes-mixin"],
    "editable": True,
    "graphTooltip": 1,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-1h", "to": "now"},
    "timezone": "",
    "annotations": {"list": []},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        {"name": "job", "label": "job", "type": "query", "datasource": DS,
         "query": {"query": "label_values(kproxy_build_info, job)", "refId": "job"},
         "definition": "label_values(kproxy_build_info, job)", "refresh": 2, "includeAll": False, "multi": False,
         "current": {"text": "kube-proxy", "value": "kube-proxy"}, "sort": 1, "hide": 0},
        {"name": "instance", "label": "node", "type": "query", "datasource": DS,
         "query": {"query": 'label_values(kproxy_build_info{job=~"$job"}, instance)', "refId": "instance"},
         "definition": 'label_values(kproxy_build_info{job=~"$job"}, instance)', "refresh": 2, "includeAll": True,
         "multi": True, "allValue": ".+", "current": {"text": "All", "value": "$__all"}, "sort": 1, "hide": 0},
    ]},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
