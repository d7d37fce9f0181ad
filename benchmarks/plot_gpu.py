"""Plots of benchmarks/bench_gpu.py's CSV, one PNG per op; runs anywhere (no GPU), e.g. on recorded results.

    python benchmarks/plot_gpu.py benchmarks/results/issue8-h100.csv --out benchmarks/results/

attention / attention_backward: per (D, causal) panel, the candidate's speedup over every baseline against N
(log scale; 1.0 dashed), and the candidate's % of the measured bf16 matmul ceiling on a second axis.
adamw: median ms (p20-p80 bars) of every contestant and its % of the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict


def _f(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def plot_attention(op: str, rows: list[dict[str, str]], out: str) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["op"] == op and r.get("status") == "ok"]
    if not rows:
        return None
    panels = sorted({(int(r["D"]), r["causal"] == "True") for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        sub = [r for r in rows if int(r["D"]) == d and (r["causal"] == "True") == causal]
        series = defaultdict(list)
        pct = []
        for r in sub:
            if r["kind"] == "baseline" and _f(r["candidate_speedup"]):
                series[r["contestant"]].append((int(r["N"]), _f(r["candidate_speedup"])))
            if r["kind"] == "candidate":
                pct.append((int(r["N"]), _f(r["pct_matmul_ceiling"])))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"vs {name}")
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (B·N = 16k tokens)")
        ax.set_ylabel("kerneltune speedup (baseline p50 / ours)")
        ax.set_title(f"D={d} {'causal' if causal else 'full'}")
        if pct:
            pct.sort()
            ax2 = ax.twinx()
            ax2.plot([p[0] for p in pct], [p[1] for p in pct], color="black", ls=":", marker="x",
                     label="% bf16 matmul ceiling")
            ax2.set_ylim(0, 100)
            ax2.set_ylabel("% of measured bf16 matmul ceiling")
        ax.legend(fontsize=7, loc="upper left")
    dev = rows[0].get("device", "")
    fig.suptitle(f"{op} · bf16 · {dev} · torch {rows[0].get('torch', '')} · {rows[0].get('timestamp', '')}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, f"{op}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_adamw(rows: list[dict[str, str]], out: str) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["op"] == "adamw" and r.get("status") == "ok"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = [r["contestant"] for r in rows]
    p50 = [_f(r["p50_ms"]) for r in rows]
    lo = [p - _f(r["p20_ms"]) for p, r in zip(p50, rows)]
    hi = [_f(r["p80_ms"]) - p for p, r in zip(p50, rows)]
    bars = ax.bar(names, p50, yerr=[lo, hi], capsize=4, color=["C0" if r["kind"] == "candidate" else "C7" for r in rows])
    for b, r in zip(bars, rows):
        ax.annotate(f"{_f(r['pct_copy_ceiling']) or 0:.0f}% of copy BW", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per step (p50, p20–p80)")
    ax.set_title(f"AdamW step, GPT-2 124M fp32 · {rows[0].get('device', '')}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "adamw.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: beside the CSV)")
    args = ap.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_gpu: matplotlib is not installed here; rebuild the plots elsewhere from the CSV", file=sys.stderr)
        return 0
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    ts = max((r["timestamp"] for r in rows if r.get("op") != "ceiling"), default=None)
    rows = [r for r in rows if r["timestamp"] == ts]  # the latest run only
    out = args.out or os.path.dirname(os.path.abspath(args.csv))
    os.makedirs(out, exist_ok=True)
    for p in (plot_attention("attention", rows, out), plot_attention("attention_backward", rows, out),
              plot_adamw(rows, out)):
        if p:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
