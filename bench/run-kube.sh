#!/usr/bin/env bash
# Event → kernel latency and RSS of the kproxy daemon fed through the fake API server
# (tests/support/fakeapi.rs), at 10k services x 10 endpoints with minSyncPeriod 0, in a throwaway
# network namespace. Needs root, nft and iproute2. Override the size with SERVICES, EPS, CHANGES.
# Prints a markdown section to stdout; paste it into bench/RESULTS.md. The targets (p99 under
# 20 ms, RSS under 64 MiB) are reported, never enforced.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES=${SERVICES:-10000}
EPS=${EPS:-10}
CHANGES=${CHANGES:-100}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p kproxy -p kproxy-bench >&2
NS=kpxk$$
cleanup() {
  # Only what runs in our namespace: the bench, kproxy and nft monitor started below.
  for pid in $(ip netns pids "$NS" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up

load0=$(cut -d' ' -f1-3 /proc/loadavg)
out=$(ip netns exec "$NS" "$TARGET/release/kproxy-bench" kube --services "$SERVICES" --endpoints "$EPS" \
  --changes "$CHANGES" --kproxy "$TARGET/release/kproxy")
get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$out"; }
verdict() { python3 -c "import sys; v, t = float(sys.argv[1]), float(sys.argv[2]); print('met' if v < t else 'missed')" "$1" "$2"; }

echo "### $(date -u +%Y-%m-%d) — event → kernel through the API, $(uname -r), $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo
echo "\`bench/run-kube.sh\`: ${SERVICES} services x ${EPS} endpoints served by the fake API server, kproxy with"
echo "\`--iptables-min-sync-period 0s\`, $(get changes) sequential one-endpoint EndpointSlice changes; kernel = first"
echo "\`nft monitor\` line naming the new endpoint. Load average before / after: ${load0} / $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "| measure | value | target |"
echo "|---|---|---|"
echo "| event → kernel p50 / p99 / max (ms) | $(get event_kernel_p50_ms) / $(get event_kernel_p99_ms) / $(get event_kernel_max_ms) | p99 < 20: $(verdict "$(get event_kernel_p99_ms)" 20) |"
echo "| kproxy sync per change, p50: build / diff / apply / whole sync (ms) | $(get sync_build_p50_ms) / $(get sync_diff_p50_ms) / $(get sync_apply_p50_ms) / $(get sync_elapsed_p50_ms) | |"
echo "| kproxy sync per change, whole sync p99 (ms) | $(get sync_elapsed_p99_ms) | |"
echo "| network programming (kubeproxy_network_programming_duration_seconds: trigger-time annotation → kernel), count / mean (ms) | $(get netprog_count) / $(get netprog_mean_ms) | |"
echo "| start → first sync (s), of which the first sync (ms) | $(get startup_s) / $(get first_sync_ms) | |"
# RSS is judged after start-up and after the changes (what the node pays for as long as kproxy
# runs); the peak, during the cold start, is reported beside it with its own verdict, since a
# container memory limit must cover it.
echo "| VmRSS after the first sync / after the changes (MiB) | $(get rss_synced_mib) / $(get rss_end_mib) | < 64: $(verdict "$(get rss_end_mib)" 64) |"
echo "| VmHWM, the peak during the cold start (MiB) | $(get hwm_end_mib) | < 64: $(verdict "$(get hwm_end_mib)" 64) |"
