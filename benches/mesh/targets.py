#!/usr/bin/env python3
"""targets.py RESULTS_DIR/mesh.jsonl — the issue's targets as ratios, from the medians of one run.

Prints a markdown table: measured phoenix value, nginx value, ratio, target, met or not.
"""
import json, statistics, sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
vals = defaultdict(list)
foreign = defaultdict(float)
for r in rows:
    for k, v in r.items():
        if isinstance(v, (int, float)) and v is not None:
            vals[(r["kind"], r["target"], r["cell"], k)].append(v)
    key = (r["kind"], r["target"], r["cell"])
    foreign[key] = max(foreign[key], r.get("foreign_cores", 0))


def m(kind, target, cell, key):
    xs = vals.get((kind, target, cell, key))
    return statistics.median(xs) if xs else None


def rng(kind, target, cell, key):
    xs = vals.get((kind, target, cell, key))
    return f"{min(xs):.0f}–{max(xs):.0f}" if xs and len(xs) > 1 else ""


out = ["| target | cell | phoenix (range) | nginx (range) | ratio | goal | met |", "|---|---|---:|---:|---:|---:|:-:|"]


def line(what, cell, p, pr, n, nr, goal, le=True, fmt="{:.0f}"):
    if p is None or n is None:
        out.append(f"| {what} | {cell} | - | - | - | {goal} | - |")
        return
    ratio = p / n if n else float("nan")
    met = ratio <= goal if le else ratio >= goal
    out.append(f"| {what} | {cell} | {fmt.format(p)} ({pr}) | {fmt.format(n)} ({nr}) | **{ratio:.2f}x** | {'≤' if le else '≥'} {goal}x | {'yes' if met else 'NO'} |")


P, NB, NF = "phoenix listener->backend", "nginx->backend", "nginx fixed"
for mode, goal in (("full", 0.3), ("resumed", 0.25)):
    for c in ("c1", "c4"):
        cell = f"{mode} {c}"
        for ref in (NB, NF):
            line(f"listener CPU µs per {mode} handshake+req vs {ref}", cell,
                 m("hs", P, cell, "server_us_per_hs"), rng("hs", P, cell, "server_us_per_hs"),
                 m("hs", ref, cell, "server_us_per_hs"), rng("hs", ref, cell, "server_us_per_hs"), goal)
CH, NN, DEP = "phoenix client->listener h2", "nginx->nginx", "nginx->phoenix (deployed)"
DEPU = "nginx->phoenix unix (deployed)"
CHH, DEPH = "phoenix client->listener h2, h2c backend", "nginx->phoenix (deployed, h2c backend)"
for conns in ("c32", "c64"):
    for ka in ("ka", "close"):
        cell = f"{conns} {ka}"
        line("chain req/s (h2 mesh link)", cell, m("wrk", CH, cell, "rps"), rng("wrk", CH, cell, "rps"),
             m("wrk", NN, cell, "rps"), rng("wrk", NN, cell, "rps"), 1.5, le=False)
        line("chain p99 ms", cell, m("wrk", CH, cell, "p99_ms"), "", m("wrk", NN, cell, "p99_ms"), "", 1.0,
             fmt="{:.2f}")
        line("chain proxy CPU µs/req (client+mtls)", cell, m("wrk", CH, cell, "us_proxy"), "",
             m("wrk", NN, cell, "us_proxy"), "", 0.6, fmt="{:.1f}")
        line("deployed nginx->phoenix req/s vs nginx->nginx", cell, m("wrk", DEP, cell, "rps"),
             rng("wrk", DEP, cell, "rps"), m("wrk", NN, cell, "rps"), rng("wrk", NN, cell, "rps"), 1.0, le=False)
        line("deployed, nginx to the client over a unix socket", cell, m("wrk", DEPU, cell, "rps"),
             rng("wrk", DEPU, cell, "rps"), m("wrk", NN, cell, "rps"), rng("wrk", NN, cell, "rps"), 1.0, le=False)
        # backend_http2 = true: the listener reaches an h2c backend (nginx -> nginx stays on HTTP/1.1).
        line("chain req/s, h2c backend", cell, m("wrk", CHH, cell, "rps"), rng("wrk", CHH, cell, "rps"),
             m("wrk", NN, cell, "rps"), rng("wrk", NN, cell, "rps"), 1.5, le=False)
        line("chain proxy CPU µs/req, h2c backend", cell, m("wrk", CHH, cell, "us_proxy"), "",
             m("wrk", NN, cell, "us_proxy"), "", 0.6, fmt="{:.1f}")
        line("chain p99 ms, h2c backend", cell, m("wrk", CHH, cell, "p99_ms"), "", m("wrk", NN, cell, "p99_ms"), "",
             1.0, fmt="{:.2f}")
        line("deployed req/s, h2c backend", cell, m("wrk", DEPH, cell, "rps"), rng("wrk", DEPH, cell, "rps"),
             m("wrk", NN, cell, "rps"), rng("wrk", NN, cell, "rps"), 1.0, le=False)
for n in ("n1000", "n5000"):
    p = m("idle", P, n, "kib_per_conn")
    nn = m("idle", NF, n, "kib_per_conn")
    ok = "yes" if p is not None and p <= 16 else "NO"
    out.append(f"| listener KiB per idle mTLS conn | {n} | {p if p is None else f'{p:.1f}'} | "
               f"{nn if nn is None else f'{nn:.1f}'} | {'-' if not (p and nn) else f'{p / nn:.2f}x'} | ≤ 16 KiB | {ok} |")
out.append("")
scheds = sorted({r.get("phoenix_sched", "other (before --sched)") for r in rows})
out.append(f"phoenix scheduling policy: {', '.join(scheds)}")
out.append(f"max foreign load over all cells: {max(foreign.values()):.2f} cores; "
           f"cells with foreign > 0.08: {sum(1 for v in foreign.values() if v > 0.08)} of {len(foreign)}")
print("\n".join(out))
