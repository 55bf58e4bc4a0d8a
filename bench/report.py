#!/usr/bin/env python3
"""bench/report.py RAW [PNG]: turns bench/run.sh's raw.txt into the markdown section for
bench/RESULTS.md (stdout) and a plot of sync time and first-packet latency against the number of
services (PNG, default bench/results.png).

Ratios are kproxy / peer (lower is better; "25x" = the peer takes 25 times as long). A value that
was not measured stays a word ("timeout", "error", "n/a"), never a number.
"""
import re
import sys
from collections import defaultdict

TOKEN = re.compile(r'(\w+)=("[^"]*"|\S+)')


def parse(path):
    rows = defaultdict(list)
    for line in open(path):
        parts = line.split(None, 1)
        if not parts:
            continue
        kv = {k: v.strip('"') for k, v in TOKEN.findall(line)}
        rows[parts[0]].append(kv)
    return rows


def num(v):
    try:
        x = float(v)
        return x if x == x else None
    except (TypeError, ValueError):
        return None


def fmt(v, nd=1):
    x = num(v)
    if x is None:
        return {"timeout": "timed out", None: "n/a"}.get(v, v or "n/a")
    return f"{x:.{nd}f}"


def ratio(k, peer, limit_s=None):
    """kproxy / peer, with the peer's slowdown factor; a bound when the peer timed out."""
    a, b = num(k), num(peer)
    if peer == "timeout" and a and limit_s:
        b = float(limit_s) * 1e3
        return f"< {a / b:.3f} (> {b / a:.0f}x)"
    if a is None or b is None or a == 0:
        return "n/a"
    r = a / b
    return f"{r:.3f} ({b / a:.1f}x)" if r < 1 else f"{r:.2f} ({b / a:.2f}x)"


def pct(vals, q):
    v = sorted(vals)
    return v[round((len(v) - 1) * q)]


def by_size(rows, kind, **match):
    out = {}
    for r in rows.get(kind, []):
        if all(r.get(k) == v for k, v in match.items()):
            out[r.get("size")] = r
    return out


def n_of(size):
    n, e = size.split("x")
    return int(n), int(e)


def main():
    raw = sys.argv[1]
    png = sys.argv[2] if len(sys.argv) > 2 else "bench/results.png"
    rows = parse(raw)
    meta = {}
    for m in rows.get("meta", []):
        meta.update(m)
    pure = by_size(rows, "pure")
    apply = by_size(rows, "apply")
    cold = by_size(rows, "cold")
    nftk = by_size(rows, "nft_kproxy")
    nftu = by_size(rows, "nft_upstream")
    ipt = by_size(rows, "ipt_restore")
    dmn = by_size(rows, "daemon", mode="nftables")
    dmi = by_size(rows, "daemon", mode="iptables")
    sizes = [r["size"] for r in rows.get("pure", [])]

    p = print
    p(f"## {meta.get('date', '?')[:10]} — scale benchmark (issue 6), kernel {meta.get('kernel')}, "
      f"{meta.get('cpus')} x {meta.get('cpu')} (shared, loaded)")
    p()
    p(f"`make bench` at {meta.get('commit')} ({meta.get('nft')}, {meta.get('ipt')}); cluster mix "
      f"{'with' if meta.get('policies') == '1' else 'without'} the issue-4 policies; load average "
      f"{meta.get('load_start')} at the start, {meta.get('load_end')} at the end. Times in ms unless "
      "stated; ratio = kproxy / peer (lower is better), the factor in brackets is how many times longer the "
      "peer took. Raw lines: bench/results-raw.txt.")
    p()

    p("### Cold start (empty namespace → whole ruleset in the kernel)")
    p()
    p("| services x eps | kproxy build+diff | kproxy netlink commit | kproxy total, p50 / max (runs) | "
      "daemon start → synced (s) | `nft -f` kproxy text | ratio | `nft -f` upstream layout | ratio | "
      "`iptables-restore` upstream | ratio |")
    p("|---|---|---|---|---|---|---|---|---|---|---|")
    colds_p50 = {}
    for s in sizes:
        a = apply.get(s, {})
        runs = [num(a.get("cold_total_ms"))] + [num(x) for x in cold.get(s, {}).get("extra_runs", "").split()]
        runs = [x for x in runs if x is not None]
        c50 = pct(runs, 0.5) if runs else None
        colds_p50[s] = c50
        cs = f"{c50:.0f} / {max(runs):.0f} ({len(runs)})" if runs else "n/a"
        d = dmn.get(s, {})
        ds = fmt(d.get("cold_s"), 2) if "cold_s" in d else (f"timed out after {d['timed_out_s']} s" if "timed_out_s" in d else "n/a")
        k, u, i = nftk.get(s, {}), nftu.get(s, {}), ipt.get(s, {})
        uc = u.get("cold_ms")
        uc_s = f"timed out after {u.get('limit_s')} s" if uc == "timeout" else fmt(uc, 0)
        if "not_available" in i:
            ic = "not measured: iptables mode not available"
        elif "skipped" in i:
            ic = f"not run ({i['skipped']}, for time)"
        elif i.get("cold_ms") == "timeout":
            ic = f"timed out after {i.get('limit_s')} s"
        else:
            ic = i.get("cold_ms")
        p(f"| {s} | {fmt(a.get('cold_build_diff_ms'), 0)} | {fmt(a.get('cold_kernel_ms'), 0)} | {cs} | {ds} | "
          f"{fmt(k.get('cold_ms'), 0)} | {ratio(c50, k.get('cold_ms'))} | {uc_s} | {ratio(c50, uc, u.get('limit_s'))} | "
          f"{fmt(ic, 0)} | {ratio(c50, i.get('cold_ms'), i.get('limit_s'))} |")
    p()

    p("### One endpoint change, one service add/delete, no-op resync (p50 / p99)")
    p()
    p("kproxy: *kernel* is the netlink commit alone, *sync* is build + diff + commit (what one sync does). "
      "Peers: `nft -f` / `iptables-restore --noflush` of the same change as a script into a table that "
      "holds the cluster (the change and its reverse, alternately; both directions pooled).")
    p()
    p("| services x eps | kproxy 1-ep kernel | kproxy 1-ep sync | `nft -f` kproxy delta | `nft -f` upstream delta | "
      "ratio kernel / upstream; sync / upstream (p50) | `iptables-restore` delta | kproxy svc add/del kernel | kproxy svc add/del sync | "
      "`nft -f` kproxy svc add/del | `nft -f` upstream svc add/del | kproxy no-op resync |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        a, k, u, i = apply.get(s, {}), nftk.get(s, {}), nftu.get(s, {}), ipt.get(s, {})
        pair = lambda r, x: f"{fmt(r.get(x + '_p50_ms'))} / {fmt(r.get(x + '_p99_ms'))}" if r else "n/a"
        up_delta = pair(u, "delta") if u.get("cold_ms") not in ("timeout", "error") else "not measured (cold start timed out)"
        up_svc = pair(u, "svc") if u.get("cold_ms") not in ("timeout", "error") else "not measured (cold start timed out)"
        ipt_d = pair(i, "delta") if "cold_ms" in i and i["cold_ms"] not in ("timeout", "error") else "not measured"
        p(f"| {s} | {pair(a, 'change_kernel')} | {pair(a, 'change_total')} | {pair(k, 'delta')} | {up_delta} | "
          f"{ratio(a.get('change_kernel_p50_ms'), u.get('delta_p50_ms'))}; "
          f"{ratio(a.get('change_total_p50_ms'), u.get('delta_p50_ms'))} | {ipt_d} | {pair(a, 'svc_kernel')} | "
          f"{pair(a, 'svc_total')} | {pair(k, 'svc')} | {up_svc} | {pair(a, 'noop')} |")
    p()
    failed = [s for s in sizes if nftk.get(s, {}).get("svc_p50_ms") == "error"]
    if failed:
        p(f"`nft -f` of kproxy's own service add script failed at {', '.join(failed)} (`conflicting protocols "
          "specified: tcp vs. th`: nft 1.0.6 rejects the script's new DNAT rule against the endpoint map already "
          "in the kernel), so kproxy's dry-run text has no service add/delete peer number there; kproxy's netlink "
          "path is unaffected (its column is measured).")
        p()


    p("### Memory and CPU")
    p()
    p("| services x eps | bench process VmHWM after cold start (MiB) | CPU s of the in-process cold start | "
      "daemon VmHWM at first sync (MiB) | daemon CPU s to first sync | daemon first sync (ms) | "
      "iptables-mode daemon start → synced (s) | its VmHWM (MiB) |")
    p("|---|---|---|---|---|---|---|---|")
    for s in sizes:
        a, d, di = apply.get(s, {}), dmn.get(s, {}), dmi.get(s, {})
        if di:
            di_s = fmt(di.get("cold_s"), 2) if "cold_s" in di else (
                f"timed out after {di['timed_out_s']} s" if "timed_out_s" in di else "failed")
            di_h = fmt(di.get("hwm_mib"))
        else:
            di_s = di_h = "not measured" if n_of(s)[0] <= 10000 else "not run (> 10k)"
        p(f"| {s} | {fmt(a.get('cold_hwm_mib'))} | {fmt(a.get('cold_cpu_s'), 2)} | {fmt(d.get('hwm_mib'))} | "
          f"{fmt(d.get('cpu_s'), 2)} | {fmt(d.get('first_sync_ms'), 0)} | {di_s} | {di_h} |")
    p()

    dp = rows.get("dp", [])
    p("### Data plane: first-packet latency (TCP connect through DNAT to a ClusterIP, µs)")
    p()
    p("| services | layout | rules loaded in (ms) | connections | p50 | p90 | p99 |")
    p("|---|---|---|---|---|---|---|")
    for r in dp:
        if "count" in r:
            p(f"| {r['services']} | {r['layout']} | {fmt(r.get('load_ms'), 0) if 'load_ms' in r else '-'} | "
              f"{r['count']} (+{r.get('failures', '0')} failed) | {fmt(r['p50_us'])} | {fmt(r['p90_us'])} | {fmt(r['p99_us'])} |")
        else:
            why = ("not measured: iptables mode not available" if "not_available" in r else
                   f"not run ({r['skipped']}, for time)" if "skipped" in r else
                   f"not measured: loading the rules {'timed out after ' + r.get('limit_s', '?') + ' s' if r.get('load') == 'timeout' else 'failed'}")
            p(f"| {r['services']} | {r['layout']} | {why} | | | | |")
    p()

    # ---- the plot ----
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    main_sizes = {}
    for s in sizes:
        n, e = n_of(s)
        if e > 1 and (n not in main_sizes or n_of(main_sizes[n])[1] < e <= 10):
            main_sizes[n] = s
    ns = sorted(main_sizes)
    series = [
        ("kproxy netlink cold start", lambda s: colds_p50.get(s), "o-"),
        ("nft -f kproxy text", lambda s: num(nftk.get(s, {}).get("cold_ms")), "s--"),
        ("nft -f upstream layout", lambda s: num(nftu.get(s, {}).get("cold_ms")), "^-"),
        ("iptables-restore upstream", lambda s: num(ipt.get(s, {}).get("cold_ms")), "v-"),
        ("kproxy 1-endpoint change (kernel p50)", lambda s: num(apply.get(s, {}).get("change_kernel_p50_ms")), "o:"),
        ("nft -f upstream 1-endpoint delta p50", lambda s: num(nftu.get(s, {}).get("delta_p50_ms")), "^:"),
    ]
    for label, f, style in series:
        pts = [(n, f(main_sizes[n])) for n in ns]
        pts = [(n, v / 1e3) for n, v in pts if v is not None]
        if pts:
            ax1.plot(*zip(*pts), style, label=label)
    for n in ns:
        u = nftu.get(main_sizes[n], {})
        if u.get("cold_ms") == "timeout":
            ax1.annotate(f"upstream: timed out\nafter {u.get('limit_s')} s", (n, float(u.get("limit_s"))),
                         fontsize=7, ha="center")
            ax1.plot([n], [float(u.get("limit_s"))], "rx")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("services (" + ", ".join(main_sizes[n] for n in ns) + ")")
    ax1.set_ylabel("seconds")
    ax1.set_title("sync time")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    for layout, style in [("kproxy", "o-"), ("upstream", "^-"), ("iptables", "v-"), ("none", "k:")]:
        pts = sorted((int(r["services"]), num(r.get("p50_us")), num(r.get("p99_us"))) for r in dp
                     if r.get("layout") == layout and num(r.get("p50_us")) is not None)
        if pts:
            x = [a for a, _, _ in pts]
            lab = {"none": "no rules (direct to endpoint)", "upstream": "upstream nftables layout",
                   "iptables": "upstream iptables layout", "kproxy": "kproxy nftables"}[layout]
            ax2.plot(x, [b for _, b, _ in pts], style, label=lab + " p50")
            ax2.plot(x, [c for _, _, c in pts], style, alpha=0.4, label=lab + " p99")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("services")
    ax2.set_ylabel("µs (TCP connect)")
    ax2.set_title("first-packet latency")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"kproxy scale benchmark, {meta.get('date', '')[:10]}, {meta.get('cpus')} x {meta.get('cpu')} (shared)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"(plot: {png})", file=sys.stderr)


if __name__ == "__main__":
    main()
