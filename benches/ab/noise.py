#!/usr/bin/env python3
"""noise.py OUTDIR — is variant b's cost inside the noise of variant a?

For every phoenix cell of an `ab.sh` run and each CPU metric, the median over rounds of b ÷ a (same
round), against the noise between two runs of the same binary: the ratios a(round i) ÷ a(round j) and
b(i) ÷ b(j) over every pair of rounds i ≠ j. A cell's change is "inside the noise" when the median of
b ÷ a lies within the range those same-binary ratios span.
"""
import glob, itertools, json, statistics, sys
from collections import defaultdict

out_dir = sys.argv[1]
runs = defaultdict(dict)
for f in sorted(glob.glob(f"{out_dir}/[ab]-*/mesh.jsonl")):
    variant, rnd = f.split("/")[-2].split("-")
    runs[variant][int(rnd)] = {(r["kind"], r["target"], r["cell"]): r
                               for r in map(json.loads, filter(str.strip, open(f)))}
if not {"a", "b"} <= set(runs):
    sys.exit(f"noise.py: {out_dir} has no a-N and b-N runs (run benches/ab/ab.sh first)")

rounds = sorted(set(runs["a"]) & set(runs["b"]))
if len(rounds) < 2:
    sys.exit(f"noise.py: {out_dir} has {len(rounds)} complete round(s); the noise needs two at least")
keys = sorted({k for r in rounds for k in runs["a"][r] if "phoenix" in k[1]})
print(f"rounds: {len(rounds)}\n")
print("| phoenix cell | metric | a µs (median) | b µs (median) | b ÷ a (median; per round) | same binary, round ÷ round (min–max) | verdict |")
print("|---|---|---:|---:|---|---:|---|")
worse = 0
for key in keys:
    for metric in ("server_us_per_hs", "us_proxy"):
        vals = {v: {r: runs[v][r].get(key, {}).get(metric) for r in rounds} for v in "ab"}
        if not all(vals[v][r] for v in "ab" for r in rounds):
            continue
        ba = [vals["b"][r] / vals["a"][r] for r in rounds]
        same = [vals[v][i] / vals[v][j] for v in "ab" for i, j in itertools.permutations(rounds, 2)]
        lo, hi = min(same), max(same)
        med = statistics.median(ba)
        verdict = "inside the noise" if lo <= med <= hi else ("better" if med < lo else "WORSE")
        worse += verdict == "WORSE"
        print(f"| {key[1]} {key[2]} | {metric} | {statistics.median(vals['a'].values()):.1f} | "
              f"{statistics.median(vals['b'].values()):.1f} | **{med:.3f}** ({' '.join(f'{x:.2f}' for x in ba)}) | "
              f"{lo:.2f}–{hi:.2f} | {verdict} |")
print(f"\ncells worse than the noise: {worse}")
