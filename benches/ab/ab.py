#!/usr/bin/env python3
"""ab.py OUTDIR — what benches/ab/ab.sh measured, as markdown.

1. Each variant against nginx: per round, the issue's target ratios from that round's own run (phoenix
   cell ÷ the nginx cell measured minutes before it); the median over rounds and the (min–max).
2. Variant b against variant a, cell by cell: the median of the per-round ratios b ÷ a, and each round's.
"""
import glob, json, statistics, sys
from collections import defaultdict

out_dir = sys.argv[1]
# runs[variant][round] = {(kind, target, cell): row}
runs = defaultdict(dict)
for f in sorted(glob.glob(f"{out_dir}/[ab]-*/mesh.jsonl")):
    variant, rnd = f.split("/")[-2].split("-")
    cells = {}
    for line in open(f):
        if line.strip():
            r = json.loads(line)
            cells[(r["kind"], r["target"], r["cell"])] = r
    runs[variant][int(rnd)] = cells

if not runs:
    sys.exit(f"ab.py: no {out_dir}/a-N/mesh.jsonl or b-N/mesh.jsonl (run benches/ab/ab.sh first)")

P, NB = "phoenix listener->backend", "nginx->backend"
CH, NN, DEP = "phoenix client->listener h2", "nginx->nginx", "nginx->phoenix (deployed)"
CHH, DEPH = "phoenix client->listener h2, h2c backend", "nginx->phoenix (deployed, h2c backend)"

# (label, kind, phoenix target, nginx target, cells, metric, goal, lower is better)
TARGETS = []
for mode, goal in (("full", 0.3), ("resumed", 0.25)):
    TARGETS.append((f"listener CPU per {mode} handshake + request", "hs", P, NB,
                    [f"{mode} c1", f"{mode} c4"], "server_us_per_hs", goal, True))
for label, chain, metric, goal, le in (
    ("chain req/s, default (HTTP/1.1 backend)", CH, "rps", 1.5, False),
    ("chain proxy CPU per request, default", CH, "us_proxy", 0.6, True),
    ("chain p99, default", CH, "p99_ms", 1.0, True),
    ("deployed req/s, default", DEP, "rps", 1.0, False),
    ("chain req/s, `backend_http2`", CHH, "rps", 1.5, False),
    ("chain proxy CPU per request, `backend_http2`", CHH, "us_proxy", 0.6, True),
    ("chain p99, `backend_http2`", CHH, "p99_ms", 1.0, True),
    ("deployed req/s, `backend_http2`", DEPH, "rps", 1.0, False),
):
    TARGETS.append((label, "wrk", chain, NN, ["c32 ka", "c64 ka"], metric, goal, le))


def ratios(variant, kind, mine, ref, cell, metric):
    xs = []
    for rnd, cells in sorted(runs[variant].items()):
        p, n = cells.get((kind, mine, cell)), cells.get((kind, ref, cell))
        if p and n and p.get(metric) and n.get(metric):
            xs.append(p[metric] / n[metric])
    return xs


def fmt(xs):
    if not xs:
        return "-"
    return f"**{statistics.median(xs):.2f}x** ({min(xs):.2f}–{max(xs):.2f})"


variants = sorted(runs)
print(f"rounds: {', '.join(f'{v}: {len(runs[v])}' for v in variants)}\n")
print("| target (ratio to nginx in the same run) | cell | goal | " + " | ".join(f"variant {v}" for v in variants) + " |")
print("|---|---|---:|" + "---:|" * len(variants))
for label, kind, mine, ref, cells, metric, goal, le in TARGETS:
    for cell in cells:
        cols = []
        for v in variants:
            xs = ratios(v, kind, mine, ref, cell, metric)
            met = ""
            if xs:
                med = statistics.median(xs)
                met = " met" if (med <= goal if le else med >= goal) else " not met"
            cols.append(fmt(xs) + met)
        print(f"| {label} | {cell} | {'≤' if le else '≥'} {goal}x | " + " | ".join(cols) + " |")

if {"a", "b"} <= set(runs):
    print("\n| phoenix cell | metric | a (median) | b (median) | b ÷ a, median of rounds | rounds |")
    print("|---|---|---:|---:|---:|---|")
    keys = sorted({k for cells in runs["a"].values() for k in cells if "phoenix" in k[1]})
    for key in keys:
        for metric in ("server_us_per_hs", "us_proxy", "us_client", "us_mtls", "rps"):
            pairs = [(runs["a"][r][key][metric], runs["b"][r][key][metric])
                     for r in sorted(runs["a"]) if r in runs["b"] and key in runs["a"][r]
                     and key in runs["b"][r] and runs["a"][r][key].get(metric) and runs["b"][r][key].get(metric)]
            if not pairs:
                continue
            rs = [b / a for a, b in pairs]
            print(f"| {key[1]} {key[2]} | {metric} | {statistics.median(a for a, _ in pairs):.1f} | "
                  f"{statistics.median(b for _, b in pairs):.1f} | **{statistics.median(rs):.3f}** | "
                  + " ".join(f"{x:.2f}" for x in rs) + " |")
