#!/usr/bin/env bash
# `make bench`: kproxy's netlink apply against `nft -f` of the same ruleset text, in throwaway
# network namespaces, at 1k and 10k services x 10 endpoints (override with SIZES="1000 10000").
# POLICIES=1 adds a "+policies" row after each size: the same cluster with the traffic policies of
# issue 4 (eTP/iTP=Local, ClientIP affinity, source ranges, zone hints; see `cluster()` in
# src/main.rs), its one-endpoint change on a non-affinity service.
# Prints a markdown section to stdout; paste it into bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/kproxy-bench
[ -x "$BIN" ] || cargo build --release -p kproxy-bench
SIZES=${SIZES:-"1000 10000"}
EPS=${EPS:-10}
MIXES=plain
[ "${POLICIES:-0}" = 1 ] && MIXES="plain policies"
P=kpxb$$
W=$(mktemp -d)
cleanup() { for ns in "$P"a "$P"b; do ip netns del "$ns" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT

ms() { python3 -c "import sys; print('%.1f' % ((float(sys.argv[2]) - float(sys.argv[1])) * 1000))" "$1" "$2"; }
now() { date +%s.%N; }

echo "### $(date -u +%Y-%m-%d) — $(uname -r), $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo
echo "| services x eps | build (ms) | render (MB) | kproxy cold start (ms) | nft -f cold start (ms) | ratio | kproxy 1-ep change, kernel p50/p99 (ms) | kproxy 1-ep change, build+diff+apply p50 (ms) | nft -f 1-ep delta p50 (ms) | ratio |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for N in $SIZES; do
for MIX in $MIXES; do
  F=(); LABEL=""
  [ "$MIX" = policies ] && F=(--policies) && LABEL=" +policies"
  pure=$("$BIN" pure --services "$N" --endpoints "$EPS" --repeats 5 "${F[@]}")
  get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
  ip netns add "$P"a; ip netns add "$P"b
  ap=$(ip netns exec "$P"a "$BIN" apply --services "$N" --endpoints "$EPS" --repeats 20 "${F[@]}")
  "$BIN" text --services "$N" --endpoints "$EPS" "${F[@]}" >"$W/full.nft"
  "$BIN" delta --services "$N" --endpoints "$EPS" "${F[@]}" >"$W/delta.nft"
  "$BIN" undelta --services "$N" --endpoints "$EPS" "${F[@]}" >"$W/undelta.nft"
  t0=$(now); ip netns exec "$P"b nft -f "$W/full.nft"; t1=$(now)
  nftcold=$(ms "$t0" "$t1")
  deltas=()
  for _ in 1 2 3 4 5; do
    t0=$(now); ip netns exec "$P"b nft -f "$W/delta.nft"; t1=$(now)
    deltas+=("$(ms "$t0" "$t1")")
    ip netns exec "$P"b nft -f "$W/undelta.nft"
  done
  nftdelta=$(printf '%s\n' "${deltas[@]}" | sort -n | sed -n 3p)
  cold=$(get cold_total_ms "$ap")
  ratio1=$(python3 -c "print('%.1fx' % ($nftcold / $cold))")
  chg=$(get change_total_p50_ms "$ap")
  ratio2=$(python3 -c "print('%.1fx' % ($nftdelta / max($chg, 0.001)))")
  echo "| ${N} x ${EPS}${LABEL} | $(get build_ms "$pure") | $(get text_mb "$pure") | $cold | $nftcold | $ratio1 | $(get change_kernel_p50_ms "$ap") / $(get change_kernel_p99_ms "$ap") | $chg | $nftdelta | $ratio2 |"
  ip netns del "$P"a; ip netns del "$P"b
done
done
