#!/usr/bin/env python3
"""Summarises soak CSVs (soak.py's PREFIX-ARM.csv): a row every --every seconds per arm, the growth
slope after --warmup seconds (least squares, KiB per minute and per million requests), and with
--plot FILE a PNG of RssAnon and VmRSS over time (needs matplotlib).

    python3 benches/soak/summarize.py RUN/soak-A.csv RUN/soak-B.csv ... [--every 300] [--plot out.png]
"""
import argparse
import csv
from pathlib import Path


def load(path):
    with open(path) as f:
        return [{k: (float(v) if k != "arm" else v) for k, v in row.items()} for row in csv.DictReader(f)]


def slope(xs, ys):
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--every", type=float, default=300)
    ap.add_argument("--warmup", type=float, default=600)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--title", default="mesh listener memory under the soak")
    args = ap.parse_args()
    runs = {p: load(p) for p in args.csv}
    first_name = args.csv[0].stem

    print("| min | " + " | ".join(f"{p.stem} RSS / anon MiB" for p in runs) + f" | requests ({first_name}) |")
    print("|---|" + "---|" * len(runs) + "---|")
    first = next(iter(runs.values()))
    t = 0.0
    end = max(r["t_s"] for r in first)
    while t <= end + 1:
        cells = []
        for rows in runs.values():
            row = min(rows, key=lambda r: abs(r["t_s"] - t))
            cells.append(f"{row['vmrss_kib'] / 1024:.1f} / {row['rssanon_kib'] / 1024:.1f}")
        req = min(first, key=lambda r: abs(r["t_s"] - t))["requests_total"]
        print(f"| {t / 60:.0f} | " + " | ".join(cells) + f" | {max(req, 0) / 1e6:.2f} M |")
        t += args.every

    print()
    print("| run | RssAnon slope after warm-up, KiB/min | KiB per million requests | VmHWM MiB | fds min-max | backend conns min-max |")
    print("|---|---|---|---|---|---|")
    for path, rows in runs.items():
        late = [r for r in rows if r["t_s"] >= args.warmup and r["requests_total"] >= 0]
        s_min = slope([r["t_s"] / 60 for r in late], [r["rssanon_kib"] for r in late])
        s_req = slope([r["requests_total"] / 1e6 for r in late], [r["rssanon_kib"] for r in late])
        print(f"| {path.stem} | {s_min:.1f} | {s_req:.0f} | {rows[-1]['vmhwm_kib'] / 1024:.1f} | "
              f"{min(r['fds'] for r in late):.0f}-{max(r['fds'] for r in late):.0f} | "
              f"{min(r['backend_conns'] for r in late):.0f}-{max(r['backend_conns'] for r in late):.0f} |")

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
        for path, rows in runs.items():
            name = path.stem
            xs = [r["t_s"] / 60 for r in rows]
            line, = ax.plot(xs, [r["vmrss_kib"] / 1024 for r in rows], label=f"{name} VmRSS", lw=1)
            ax.plot(xs, [r["rssanon_kib"] / 1024 for r in rows], label=f"{name} RssAnon", lw=1,
                    ls="--", color=line.get_color())
        ax.set_xlabel("minutes")
        ax.set_ylabel("MiB")
        ax.set_title(args.title)
        ax.grid(alpha=0.3)
        ax.legend(ncol=3, fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
