#!/usr/bin/env bash
# `make bench` (as root): the scale benchmark of issue 6, in throwaway network namespaces named
# kpxb-<pid>-*, all deleted on exit. Every external command runs under `timeout`; a measurement
# that times out or fails is recorded as such ("timed out after N s"), never as a number.
#
#   control plane, per size NxE (services x endpoints):
#     kproxy nftables (netlink, in-process, `kproxy-bench apply`): cold start, one-endpoint change,
#       one-service add and delete, no-op resync (p50/p99), peak RSS and CPU of the bench process;
#     the kproxy daemon from --manifests: process start -> first sync committed, VmHWM, CPU;
#     peers: `nft -f` of kproxy's own dry-run text, `nft -f` of upstream kube-proxy's nftables
#       layout (bench/src/upstream_nft.rs), and, when rules::iptables exists, `iptables-restore`
#       of upstream's iptables layout and the kproxy iptables-mode daemon;
#   data plane, per service count: first-packet latency (TCP connect through DNAT to a ClusterIP).
#
# Knobs (environment): SIZES ("1000x10 10000x10"), POLICIES (1: the issue-4 policy mix),
# DP_SIZES ("100 10000 50000"), DP_EPS (endpoints per service in the data-plane clusters),
# DP_COUNT (connections per point), UPSTREAM_TIMEOUT / NFT_TIMEOUT (s, per `nft -f`), DELTA_RUNS,
# REPEATS (in-process repetitions), IPT_MAX / DP_UPSTREAM_MAX (largest service count a slow peer
# is run at), OUT (raw results dir). bench/report.py turns $OUT/raw.txt
# into the markdown tables and bench/results.png.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
BIN=${BIN:-target/release/kproxy-bench}
KPROXY=${KPROXY:-target/release/kproxy}
SIZES=${SIZES-"1000x10 10000x10 1000x1 10000x1 50000x5 5000x50"}
POLICIES=${POLICIES:-1}
DP_SIZES=${DP_SIZES-"100 10000 50000"}
DP_EPS=${DP_EPS:-1}
DP_COUNT=${DP_COUNT:-3000}
UPSTREAM_TIMEOUT=${UPSTREAM_TIMEOUT:-300}
NFT_TIMEOUT=${NFT_TIMEOUT:-300}
DELTA_TIMEOUT=${DELTA_TIMEOUT:-120}
DELTA_RUNS=${DELTA_RUNS:-5}
# Above these service counts a peer is not run (recorded as skipped): iptables-restore and the
# iptables-mode daemon (IPT_MAX), upstream's nftables layout in the data plane (DP_UPSTREAM_MAX).
IPT_MAX=${IPT_MAX:-50000}
DP_UPSTREAM_MAX=${DP_UPSTREAM_MAX:-50000}
OUT=${OUT:-bench/out}
if [ ! -x "$BIN" ] || [ ! -x "$KPROXY" ]; then cargo build --release -p kproxy -p kproxy-bench; fi
mkdir -p "$OUT"
RAW=$OUT/raw.txt
: >"$RAW"
P=kpxb-$$-
W=$(mktemp -d /tmp/kpxb-$$-XXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P"); do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rec() { echo "$*" >>"$RAW"; echo "  $*" >&2; }
say() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
newns() { ip netns del "$P$1" 2>/dev/null; ip netns add "$P$1" && ip -n "$P$1" link set lo up; }
delns() { ip netns del "$P$1" 2>/dev/null || true; }
# ms LIMIT NS CMD...: run CMD in namespace NS under `timeout LIMIT`; print its wall time in ms,
# "timeout" or "error".
ms() {
  local lim=$1 ns=$2; shift 2
  local t0 t1 rc
  t0=$(date +%s%N)
  timeout "$lim" ip netns exec "$P$ns" "$@" >/dev/null 2>"$W/err"; rc=$?
  t1=$(date +%s%N)
  if [ $rc = 124 ]; then echo timeout
  elif [ $rc != 0 ]; then echo error; say "error ($rc): $* : $(head -c 300 "$W/err")"
  else awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f\n", d / 1e6 }'; fi
}
# list of times → "p50 p99" (nearest rank over what was measured); anything not a number wins.
stats() { python3 - "$@" <<'EOF'
import sys
v = sys.argv[1:]
bad = [x for x in v if x in ("timeout", "error")]
if bad or not v:
    print((bad[0] if bad else "none") + " " + (bad[0] if bad else "none")); sys.exit()
f = sorted(float(x) for x in v)
p = lambda q: f[round((len(f) - 1) * q)]
print("%.1f %.1f" % (p(0.5), p(0.99)))
EOF
}
# alternate NS FWD BACK CMD...: the scripts FWD and BACK fed alternately to CMD (nft -f,
# iptables-restore --noflush) DELTA_RUNS times each in namespace NS; the times of both directions
# pooled: "p50 p99".
alternate() {
  local ns=$1 fwd=$2 back=$3 a=() t f; shift 3
  for _ in $(seq "$DELTA_RUNS"); do
    for f in "$fwd" "$back"; do
      t=$(ms "$DELTA_TIMEOUT" "$ns" "$@" "$f"); a+=("$t")
      if [ "$t" = timeout ] || [ "$t" = error ]; then stats "${a[@]}"; return; fi
    done
  done
  stats "${a[@]}"
}
has_ipt=0
"$BIN" ipt-text --services 1 --endpoints 1 >/dev/null 2>&1 && has_ipt=1

say "sizes: $SIZES; policies=$POLICIES; data plane: $DP_SIZES x $DP_EPS; load $(cut -d' ' -f1-3 /proc/loadavg)"
rec "meta date=$(date -u +%Y-%m-%dT%H:%MZ) kernel=$(uname -r) cpus=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\" commit=$(git rev-parse --short HEAD) policies=$POLICIES nft=\"$(nft --version)\" ipt=\"$(iptables --version)\" load_start=\"$(cut -d' ' -f1-3 /proc/loadavg)\""

# `nft -f` of one layout's scripts ($W/<prefix>text.nft, ...delta/undelta/svc-add/svc-del) in a
# fresh namespace: cold load, then the endpoint change and the service add/delete, alternately.
# Args: record name, namespace suffix, cold-load timeout (s), script prefix.
nft_peer() {
  local name=$1 ns=$2 limit=$3 pre=$4 cold d50 d99 s50 s99
  newns "$ns"
  cold=$(ms "$limit" "$ns" nft -f "$W/${pre}text.nft")
  if [ "$cold" != timeout ] && [ "$cold" != error ]; then
    read -r d50 d99 < <(alternate "$ns" "$W/${pre}delta.nft" "$W/${pre}undelta.nft" nft -f)
    read -r s50 s99 < <(alternate "$ns" "$W/${pre}svc-add.nft" "$W/${pre}svc-del.nft" nft -f)
  else d50=skipped; d99=skipped; s50=skipped; s99=skipped; fi
  rec "$name size=$size cold_ms=$cold limit_s=$limit delta_p50_ms=$d50 delta_p99_ms=$d99 svc_p50_ms=$s50 svc_p99_ms=$s99"
  delns "$ns"
}

for size in $SIZES; do
  N=${size%x*}; E=${size#*x}
  F=(--services "$N" --endpoints "$E")
  [ "$POLICIES" = 1 ] && F+=(--policies)
  R=${REPEATS:-20}; [ "$N" -ge 50000 ] && R=${REPEATS:-10}
  say "== $N x $E"
  rec "pure size=$size $(timeout 900 "$BIN" pure "${F[@]}" --repeats 5 || echo failed=1)"

  # kproxy nftables, in-process through the netlink backend; extra cold starts for p50/p99.
  newns k
  rec "apply size=$size $(timeout 1800 ip netns exec "${P}k" "$BIN" apply "${F[@]}" --repeats "$R" || echo timed_out_or_failed=1)"
  colds=()
  runs=3; [ "$N" -ge 50000 ] && runs=1
  for _ in $(seq $((runs - 1))); do
    newns k
    c=$(timeout 900 ip netns exec "${P}k" "$BIN" load "${F[@]}" | sed -n 's/.* cold_total_ms=\([^ ]*\).*/\1/p')
    colds+=("${c:-error}")
  done
  delns k
  rec "cold size=$size extra_runs=\"${colds[*]:-}\""

  # The scripts, once.
  for s in text delta undelta svc-add svc-del upstream-text upstream-delta upstream-undelta upstream-svc-add upstream-svc-del; do
    timeout 900 "$BIN" "$s" "${F[@]}" >"$W/$s.nft"
  done
  rec "scripts size=$size kproxy_mb=$(du -m "$W/text.nft" | cut -f1) upstream_mb=$(du -m "$W/upstream-text.nft" | cut -f1) upstream_lines=$(wc -l <"$W/upstream-text.nft")"

  # nft -f of kproxy's own dry-run text, then of upstream's layout.
  nft_peer nft_kproxy n "$NFT_TIMEOUT" ""
  nft_peer nft_upstream u "$UPSTREAM_TIMEOUT" upstream-
  rm -f "$W"/*.nft

  # The daemon from manifests (plain mix: the manifests carry no policies).
  rm -rf "$W/m"; "$BIN" manifests --services "$N" --endpoints "$E" --dir "$W/m"
  newns d
  rec "daemon size=$size mode=nftables $(timeout 900 ip netns exec "${P}d" "$BIN" daemon-cold --kproxy "$KPROXY" --dir "$W/m" --count 600 || echo failed=1)"
  delns d

  # iptables: upstream's iptables-mode text through iptables-restore, and kproxy's iptables mode.
  if [ $has_ipt = 1 ] && [ "$N" -gt "$IPT_MAX" ]; then
    rec "ipt_restore size=$size skipped=IPT_MAX=$IPT_MAX"
  elif [ $has_ipt = 1 ]; then
    for s in ipt-text ipt-delta ipt-undelta; do timeout 900 "$BIN" "$s" "${F[@]}" >"$W/$s.txt"; done
    newns i
    cold=$(ms "$UPSTREAM_TIMEOUT" i iptables-restore --noflush "$W/ipt-text.txt")
    if [ "$cold" != timeout ] && [ "$cold" != error ]; then
      read -r d50 d99 < <(alternate i "$W/ipt-delta.txt" "$W/ipt-undelta.txt" iptables-restore --noflush)
    else d50=skipped; d99=skipped; fi
    rec "ipt_restore size=$size cold_ms=$cold limit_s=$UPSTREAM_TIMEOUT delta_p50_ms=$d50 delta_p99_ms=$d99 mb=$(du -m "$W/ipt-text.txt" | cut -f1)"
    delns i
    if [ "$cold" != timeout ] && [ "$cold" != error ]; then
      # kproxy's iptables mode per sync: full restore, then partial restores of endpoint changes.
      newns i
      rec "$(timeout 900 ip netns exec "${P}i" "$BIN" ipt-apply "${F[@]}" --repeats 10 || echo "ipt_apply size=$size failed=1")"
      delns i
    fi
    if [ "$N" -le 10000 ]; then
      newns d
      rec "daemon size=$size mode=iptables $(timeout 900 ip netns exec "${P}d" "$BIN" daemon-cold --kproxy "$KPROXY" --dir "$W/m" --count 180 -- --proxy-mode iptables || echo failed=1)"
      delns d
    fi
    rm -f "$W"/ipt-*.txt
  else
    rec "ipt_restore size=$size not_available=1"
  fi
  rm -rf "$W/m"
done

# Data plane: node namespace (rules, client) --veth-- server namespace (every endpoint address
# is local there through one `local` route; the listener answers on all of them).
for N in $DP_SIZES; do
  say "== data plane, $N services x $DP_EPS"
  newns c; newns s
  v0=${P}v0 v1=${P}v1
  ip link add "$v0" netns "${P}c" type veth peer name "$v1" netns "${P}s"
  ip -n "${P}c" addr add 192.168.0.2/24 dev "$v0"; ip -n "${P}c" link set "$v0" up
  ip -n "${P}s" addr add 192.168.0.3/24 dev "$v1"; ip -n "${P}s" link set "$v1" up
  ip -n "${P}c" route add default via 192.168.0.3
  ip -n "${P}s" route add local 10.64.0.0/10 dev lo
  ip netns exec "${P}s" "$BIN" serve --port 8080 >/dev/null &
  PIDS+=($!)
  sleep 0.5
  last=$((N - 1))
  cip="172.$((16 + (last >> 16))).$(((last >> 8) & 255)).$((last & 255))"
  ep="10.$((64 + ((last * DP_EPS) >> 16))).$((((last * DP_EPS) >> 8) & 255)).$(((last * DP_EPS) & 255))"
  G=(--services "$N" --endpoints "$DP_EPS")
  probe() { timeout 300 ip netns exec "${P}c" "$BIN" connect --target "$1" --count "$DP_COUNT" || echo "failed=1"; }
  rec "dp services=$N layout=none target=$ep:8080 $(probe "$ep:8080")"
  l=$(timeout 900 ip netns exec "${P}c" "$BIN" load "${G[@]}" | sed -n 's/.* cold_total_ms=\([^ ]*\).*/\1/p')
  if [ -n "$l" ]; then rec "dp services=$N layout=kproxy load_ms=$l target=$cip:80 $(probe "$cip:80")"
  else rec "dp services=$N layout=kproxy load=failed"; fi
  ip netns exec "${P}c" nft delete table ip kube-proxy 2>/dev/null
  if [ "$N" -gt "$DP_UPSTREAM_MAX" ]; then
    rec "dp services=$N layout=upstream skipped=DP_UPSTREAM_MAX=$DP_UPSTREAM_MAX"
  else
    timeout 900 "$BIN" upstream-text "${G[@]}" >"$W/up.nft"
    l=$(ms "$UPSTREAM_TIMEOUT" c nft -f "$W/up.nft")
    if [ "$l" != timeout ] && [ "$l" != error ]; then rec "dp services=$N layout=upstream load_ms=$l target=$cip:80 $(probe "$cip:80")"
    else rec "dp services=$N layout=upstream load=$l limit_s=$UPSTREAM_TIMEOUT"; fi
    ip netns exec "${P}c" nft delete table ip kube-proxy 2>/dev/null
    rm -f "$W/up.nft"
  fi
  if [ $has_ipt = 1 ] && [ "$N" -gt "$IPT_MAX" ]; then
    rec "dp services=$N layout=iptables skipped=IPT_MAX=$IPT_MAX"
  elif [ $has_ipt = 1 ]; then
    timeout 900 "$BIN" ipt-text "${G[@]}" >"$W/ipt.txt"
    "$BIN" ipt-jumps "${G[@]}" >>"$W/ipt.txt"
    l=$(ms "$UPSTREAM_TIMEOUT" c iptables-restore --noflush "$W/ipt.txt")
    if [ "$l" != timeout ] && [ "$l" != error ]; then rec "dp services=$N layout=iptables load_ms=$l target=$cip:80 $(probe "$cip:80")"
    else rec "dp services=$N layout=iptables load=$l limit_s=$UPSTREAM_TIMEOUT"; fi
    rm -f "$W/ipt.txt"
  else
    rec "dp services=$N layout=iptables not_available=1"
  fi
  kill "${PIDS[-1]}" 2>/dev/null; wait "${PIDS[-1]}" 2>/dev/null
  unset 'PIDS[-1]'
  delns c; delns s
done
rec "meta load_end=\"$(cut -d' ' -f1-3 /proc/loadavg)\""
say "raw results: $RAW"
