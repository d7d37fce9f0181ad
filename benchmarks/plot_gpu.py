"""Plots of benchmarks/bench_gpu.py's CSV, one PNG per op; runs anywhere (no GPU), e.g. on recorded results.

    python benchmarks/plot_gpu.py benchmarks/results/issue8-h100.csv --out benchmarks/results/
    python benchmarks/plot_gpu.py benchmarks/results/issue8-h100.csv --markdown   # the docs' tables, on stdout

attention / attention_backward: per (D, causal) panel, the candidate's speedup over every baseline against N
(log scale; 1.0 dashed), and the candidate's % of the measured bf16 matmul ceiling on a second axis.
attention_train (runs with bench_gpu's kerneltune_fwd_bwd rows): the same panels for a training step's attention,
kerneltune's forward (with lse) + backward against SDPA's forward + backward.
adamw: median ms (p20-p80 bars) of every contestant and its % of the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from typing import Callable


def _f(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def plot_attention(op: str, rows: list[dict[str, str]], out: str) -> str | None:
    """The candidate's speedup over every baseline, and its % of the matmul ceiling, per (D, causal)."""
    def series(r: dict[str, str]) -> tuple[str, float | None] | None:
        return (f"vs {r['contestant']}", _f(r["candidate_speedup"])) if r["kind"] == "baseline" else None
    return _panels([r for r in rows if r["op"] == op], op, op, series, "candidate", out)


def plot_training(rows: list[dict[str, str]], out: str) -> str | None:
    """A training step's attention: kerneltune's forward (with lse) + backward against SDPA's forward + backward
    (bench_gpu's kerneltune_fwd_bwd rows), and its % of the matmul ceiling over both directions' work."""
    def series(r: dict[str, str]) -> tuple[str, float | None] | None:
        return ("forward + backward vs sdpa_fwd_bwd", _f(r["speedup_vs_primary"])) if r["kind"] == "training" else None
    return _panels([r for r in rows if r["op"] == "attention_backward"], "attention forward + backward (training)",
                   "attention_train", series, "training", out)


def _panels(rows: list[dict[str, str]], title: str, name: str,
            series_of: Callable[[dict[str, str]], tuple[str, float | None] | None], pct_kind: str,
            out: str) -> str | None:
    """One panel per (D, causal): each series' speedup against N, and pct_kind's % of the bf16 matmul ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("status") == "ok"]
    if not any(r["kind"] == pct_kind for r in rows):
        return None
    panels = sorted({(int(r["D"]), r["causal"] == "True") for r in rows if r["kind"] == pct_kind})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        sub = [r for r in rows if int(r["D"]) == d and (r["causal"] == "True") == causal]
        series = defaultdict(list)
        pct = []
        for r in sub:
            pt = series_of(r)
            if pt and pt[1]:
                series[pt[0]].append((int(r["N"]), pt[1]))
            if r["kind"] == pct_kind:
                pct.append((int(r["N"]), _f(r["pct_matmul_ceiling"])))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # 0.7x and 1.4x equally far from parity
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
        ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    dev = rows[0].get("device", "")
    runs = " + ".join(sorted({r.get("timestamp", "") for r in rows}))
    fig.suptitle(f"{title} · bf16 · {dev} · torch {rows[0].get('torch', '')} · run(s) {runs}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
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
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.2))
    names = [r["contestant"] for r in rows]
    p50 = [_f(r["p50_ms"]) for r in rows]
    lo = [p - _f(r["p20_ms"]) for p, r in zip(p50, rows)]
    hi = [_f(r["p80_ms"]) - p for p, r in zip(p50, rows)]
    colour = {"candidate": "C0", "variant": "C9"}
    bars = ax.bar(names, p50, yerr=[lo, hi], capsize=4, color=[colour.get(r["kind"], "C7") for r in rows])
    for b, r in zip(bars, rows):
        ax.annotate(f"{_f(r['pct_copy_ceiling']) or 0:.0f}% of copy BW", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("ms per step (p50, p20–p80)")
    ax.set_title(f"AdamW step, GPT-2 124M fp32 · {rows[0].get('device', '')}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "adamw.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def merged(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each shape as its latest run measured it: the rows of the newest run whose candidate row for that
    (op, shape, mask) is ok, else of the newest run that has it at all; with the ceiling rows of every run
    kept. A CSV that several runs appended to (some shapes re-measured after a failure) reads as one table,
    every ratio and % of ceiling still from within one run."""
    runs: dict[tuple[str, ...], dict[str, list[dict[str, str]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["op"] != "ceiling":
            # a shape by its columns, not its name: bench_gpu's name gained the mask and dtype, and a CSV appended
            # to across that change names one shape both ways (a row without columns: its probe failed)
            dims = tuple(r.get(k, "") for k in ("B", "H", "N", "D", "causal", "dtype"))
            runs[(r["op"], *(dims if any(dims[:4]) else (r["shape"], r.get("causal", ""))))][r["timestamp"]].append(r)
    out = []
    for by_ts in runs.values():
        ok = [ts for ts, rs in by_ts.items() if any(x["kind"] == "candidate" and x["status"] == "ok" for x in rs)]
        out += by_ts[max(ok or by_ts)]
    used = {r["timestamp"] for r in out}
    return [r for r in rows if r["op"] == "ceiling" and r["timestamp"] in used] + out


def markdown(rows: list[dict[str, str]]) -> str:
    """The tables of docs/benchmarks.md: one row per shape, the candidate's speedup over each baseline."""
    lines = []
    for ts in sorted({r["timestamp"] for r in rows if r["op"] != "ceiling"}):
        run = [r for r in rows if r["timestamp"] == ts]
        ceil = {r["contestant"]: r for r in run if r["op"] == "ceiling"}
        any_row = next(r for r in run if r["op"] != "ceiling")
        ns = sorted({int(r["N"]) for r in run if r["op"].startswith("attention") and r["N"]})
        ops = sorted({r["op"] for r in run if r["op"] != "ceiling"})
        lines.append(f"Run {ts}: {any_row['device']} · torch {any_row['torch']} · triton {any_row['triton']} · commit "
                     f"{any_row['git']} · copy bandwidth {_f(ceil['copy_gbps']['gbps']):.0f} GB/s · bf16 matmul "
                     f"{_f(ceil['matmul_bf16']['tflops']):.0f} TFLOP/s (both measured in that run) · "
                     f"{', '.join(ops)}" + (f" at N = {', '.join(map(str, ns))}" if ns else "") + "  ")
    lines.append("")
    by: dict[tuple[str, str], dict[str, dict[str, str]]] = defaultdict(dict)
    order: list[tuple[str, str]] = []
    unshaped: dict[str, list[dict[str, str]]] = defaultdict(list)  # contestants whose probe failed (no shape)
    for r in rows:
        if r["op"] == "ceiling":
            continue
        if not r["shape"]:
            unshaped[r["op"]].append(r)
            continue
        key = (r["op"], r["shape"] + "|" + r.get("causal", ""))
        if key not in by:
            order.append(key)
        by[key][r["contestant"] if r["kind"] != "candidate" else "candidate"] = r
    cols = {"attention": ["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "torch_compile", "torch_math"],
            "attention_backward": ["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "torch_compile", "torch_math",
                                   "sdpa_fwd_bwd"]}
    for op, title in (("attention", "attention forward, bf16"), ("attention_backward", "attention backward, bf16")):
        keys = sorted((k for k in order if k[0] == op and "candidate" in by[k]),
                      key=lambda k: (-int(by[k]["candidate"]["D"] or 0), by[k]["candidate"]["causal"] != "True",
                                     int(by[k]["candidate"]["N"] or 0)))
        gone = [f"- not timed: {r['contestant']} ({r['kind']}): {r['status']}, {r['note'][:200]}" for r in unshaped[op]]
        if not keys:
            lines += [f"### {title}", "", *gone, ""] if gone else []
            continue
        # variants (bench_gpu --also): the candidate at other knobs, timed in the same rounds
        shown = cols[op] + sorted({x for k in keys for x, r in by[k].items() if r["kind"] == "variant"})
        lines += [f"### {title}", "",
                  "| D | mask | N | B×H | kerneltune ms | " + " | ".join(f"vs {c}" for c in shown)
                  + " | % matmul ceiling | rel. error |",
                  "|---" * (len(shown) + 7) + "|"]
        for k in keys:
            c = by[k]["candidate"]
            head = f"| {c['D']} | {'causal' if c['causal'] == 'True' else 'full'} | {c['N']} | {c['B']}×{c['H']} |"
            if c["status"] != "ok":
                lines.append(f"{head} {c['status']}: {c['note'][:90]} |" + " |" * (len(shown) + 2))
                continue
            vs = [_x(_f(by[k][b]["candidate_speedup"])) if b in by[k] and by[k][b]["status"] == "ok"
                  else (by[k][b]["status"] if b in by[k] else "—") for b in shown]
            lines.append(f"{head} {_f(c['p50_ms']):.3f} | " + " | ".join(vs)
                         + f" | {_f(c['pct_matmul_ceiling']):.1f}% | {_f(c['rel_err']):.1e} |")
        lines += ["", *gone, ""] if gone else [""]
    train = [k for k in order if k[0] == "attention_backward" and "kerneltune_fwd_bwd" in by[k]]
    if train:  # bench_gpu's training rows: kerneltune's forward (with lse) + backward, SDPA's both ways
        lines += ["### attention forward + backward (a training step's attention), bf16", "",
                  "| D | mask | N | B×H | kerneltune fwd+bwd ms | sdpa_fwd_bwd ms | speedup | % matmul ceiling "
                  "| rel. error |", "|---|---|---|---|---|---|---|---|---|"]
        for k in sorted(train, key=lambda k: (-int(by[k]["kerneltune_fwd_bwd"]["D"] or 0),
                                              by[k]["kerneltune_fwd_bwd"]["causal"] != "True",
                                              int(by[k]["kerneltune_fwd_bwd"]["N"] or 0))):
            t, sd = by[k]["kerneltune_fwd_bwd"], by[k].get("sdpa_fwd_bwd")
            head = f"| {t['D']} | {'causal' if t['causal'] == 'True' else 'full'} | {t['N']} | {t['B']}×{t['H']} |"
            if t["status"] != "ok":
                lines.append(f"{head} {t['status']}: {t['note'][:90]} | | | | |")
                continue
            sd_ms = f"{_f(sd['p50_ms']):.3f}" if sd and sd["status"] == "ok" else (sd["status"] if sd else "—")
            lines.append(f"{head} {_f(t['p50_ms']):.3f} | {sd_ms} | {_x(_f(t['speedup_vs_primary']))} | "
                         f"{_f(t['pct_matmul_ceiling']):.1f}% | {_f(t['rel_err']):.1e} |")
        lines.append("")
    ad = [r for r in rows if r["op"] == "adamw"]
    if ad:
        lines += ["### adamw, GPT-2 124M (fp32 params and state, 148 tensors)", "",
                  "| contestant | p50 ms (p20–p80) | speedup of kerneltune | fused p50 ÷ its p50 | GB/s "
                  "| % of copy bandwidth |", "|---|---|---|---|---|---|"]
        for r in ad:
            name = f"kerneltune `{r['candidate']}`" if r["kind"] == "candidate" else f"`{r['contestant']}`"
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status']}: {r['note'][:90]} | | | | |")
                continue
            lines.append(f"| {name} | {_f(r['p50_ms']):.3f} ({_f(r['p20_ms']):.3f}–{_f(r['p80_ms']):.3f}) | "
                         f"{_x(_f(r['candidate_speedup'])) if r['kind'] != 'candidate' else '—'} | "
                         f"{_x(_f(r.get('speedup_vs_primary', '')))} | {_f(r['gbps']):.0f} | "
                         f"{_f(r['pct_copy_ceiling']):.1f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: beside the CSV)")
    ap.add_argument("--markdown", action="store_true", help="print the docs' tables (markdown) instead of plotting")
    args = ap.parse_args()
    if args.markdown:
        with open(args.csv, newline="") as f:
            rows = list(csv.DictReader(f))
        print(markdown(merged(rows)))
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_gpu: matplotlib is not installed here; rebuild the plots elsewhere from the CSV", file=sys.stderr)
        return 0
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = merged(rows)  # each shape from the latest run that measured it
    out = args.out or os.path.dirname(os.path.abspath(args.csv))
    os.makedirs(out, exist_ok=True)
    for p in (plot_attention("attention", rows, out), plot_attention("attention_backward", rows, out),
              plot_training(rows, out), plot_adamw(rows, out)):
        if p:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
