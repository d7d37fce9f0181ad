"""The results CSV (one row per contestant, shape and run, with provenance) and `kerneltune report`:
PNGs of the speedup per shape per op and of its history over commits, and a markdown summary.

Rows come from `kerneltune bench --csv`, `kerneltune bench --check --csv` and the pytest-benchmark
suite (benchmarks/). Every row carries its provenance (FIELDS); a file written before a column existed
simply lacks it (a missing commit reads as 'unknown').
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from typing import Any, Iterable, Optional

import typer

FIELDS = ["timestamp", "commit", "source", "device", "device_key", "torch", "triton", "numba", "kerneltune",
          "threads", "op", "shape", "dtype", "candidate", "candidate_hash", "contestant", "kind", "p20_ms",
          "p50_ms", "p80_ms", "speedup_vs_primary", "pct_of_roof", "gbps", "tflops"]
NUMERIC = {"p20_ms", "p50_ms", "p80_ms", "speedup_vs_primary", "pct_of_roof", "gbps", "tflops", "check_speedup",
           "recorded_speedup", "foreign_load", "candidate_speedup"}
DEFAULT_CSV = os.path.join(".benchmarks", "kerneltune-results.csv")


# -- the CSV -----------------------------------------------------------------------------------------------
def append_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the CSV at ``path``. Columns: the file's own header, then FIELDS, then any other key;
    when the rows bring a column the file lacks, the file is rewritten with the wider header (old rows keep
    their values, new columns empty), so one CSV can hold rows from every source."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old_header: list[str] = []
    old_rows: list[dict[str, str]] = []
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            old_header = list(csv.DictReader(f).fieldnames or [])
    keys_in_order = [k for r in rows for k in r]
    header = list(old_header) or [k for k in FIELDS]
    for k in FIELDS + keys_in_order:
        if k not in header:
            header.append(k)
    if old_header and header == old_header:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header, extrasaction="ignore").writerows(rows)
        return
    if exists:  # the header widens (a new column in the rows or in FIELDS): every old row is carried over
        with open(path, newline="") as f:
            old_rows = list(csv.DictReader(f))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(old_rows)
        w.writerows(rows)
    os.replace(tmp, path)


class ReportError(Exception):
    """A results CSV that cannot be read at all (one line: the file and what is wrong)."""


def read_rows(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Every row of every CSV, numbers as floats (None when empty), with 'file' and 'line' set. The commit is
    the row's ``commit``, else ``git`` (benchmarks/bench_gpu.py's column), else 'unknown'. ReportError when a
    file is not a UTF-8 CSV."""
    rows = []
    for p in paths:
        try:
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                for r in reader:
                    row: dict[str, Any] = {k: (v if v != "" else None) for k, v in r.items()
                                           if k is not None and isinstance(v, str)}
                    for k in NUMERIC & row.keys():
                        try:
                            row[k] = float(row[k]) if row[k] is not None else None
                        except ValueError:
                            row[k] = None
                    row["commit"] = row.get("commit") or row.get("git") or "unknown"
                    if any(row.get(k) for k in "BHND"):  # benchmarks/bench_gpu.py's: the shape from its columns
                        row["shape"] = dims_shape(row)
                    row["file"] = p
                    row["line"] = reader.line_num
                    rows.append(row)
        except UnicodeDecodeError as e:
            raise ReportError(f"{p}: not a UTF-8 text CSV (byte {e.start}: {e.reason}); pass a results CSV that "
                              "kerneltune bench --csv, bench --check --csv or pytest benchmarks/ wrote") from None
        except csv.Error as e:
            raise ReportError(f"{p}: not a readable CSV ({e}); pass a results CSV") from None
    return rows


def dims_shape(row: dict[str, Any]) -> str:
    """The shape name of a row that carries its dims as columns (benchmarks/bench_gpu.py's CSV): the dims it has,
    the mask and the dtype, as the ops' case names read ('B4 H16 N4096 D128 causal bfloat16', adamw's
    'N124475904 float32'). bench_gpu.py names its rows with it; a CSV it wrote before named them by B, H, N, D
    alone (a causal and a full row under one name), so read_rows renames its rows the same way."""
    parts = [f"{k}{row[k]}" for k in ("B", "H", "N", "D") if row.get(k) not in (None, "")]
    causal = row.get("causal")
    if causal in (True, "True"):
        parts.append("causal")
    elif causal in (False, "False"):
        parts.append("full")
    if row.get("dtype"):
        parts.append(str(row["dtype"]))
    return " ".join(parts)


def usable(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows a report can use, and one note per row it cannot: a candidate row without an op, shape or
    candidate, or with a speedup that is not a finite number above 0 (a ratio of times cannot be 0)."""
    good, bad = [], []
    for r in rows:
        why = ""
        if r.get("kind") == "candidate":
            missing = [k for k in ("op", "shape", "candidate") if not r.get(k)]
            sp = r.get("speedup_vs_primary")
            if missing:
                why = f"no {', '.join(missing)}"
            elif sp is not None and not (math.isfinite(sp) and sp > 0):
                why = f"speedup_vs_primary {sp!r} is not a finite number above 0"
        if why:
            bad.append(f"{r.get('file')}:{r.get('line')}: {why}")
        else:
            good.append(r)
    return good, bad


def default_csvs() -> list[str]:
    found = [DEFAULT_CSV] if os.path.isfile(DEFAULT_CSV) else []
    return found + sorted(glob.glob(os.path.join("benchmarks", "results", "*.csv")))


# -- what the plots show -------------------------------------------------------------------------------------
# A series: (op, shape, candidate, device_key, dtype, source). The dtype, where a shape name lacks it, keeps two
# precisions apart; the source keeps the pytest-benchmark suite's ratios (contestants one after another) and
# `bench --check`'s (interleaved, statistics) out of one series: a change between them is no change of the kernel.
Key = tuple[str, str, str, str, str, str]


def _series_key(r: dict[str, Any]) -> Key:
    return (r.get("op") or "?", r.get("shape") or "?", r.get("candidate") or "?", r.get("device_key") or "?",
            r.get("dtype") or "", r.get("source") or "")


def _ratio(r: dict[str, Any]) -> bool:
    """A candidate row with a ratio worth plotting: timed, and not marked noisy by the evaluator's noise gate
    (timed twice on a machine too busy to trust it)."""
    return r.get("kind") == "candidate" and r.get("speedup_vs_primary") is not None and not r.get("noisy")


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each candidate's latest measured speedup over its op's primary baseline, per series (op, shape, device,
    dtype, source)."""
    best: dict[Key, dict[str, Any]] = {}
    for r in rows:
        if not _ratio(r):
            continue
        k = _series_key(r)
        if k not in best or (r.get("timestamp") or "") >= (best[k].get("timestamp") or ""):
            best[k] = r
    return [best[k] for k in sorted(best)]


def history(rows: list[dict[str, Any]]) -> dict[Key, list[tuple[str, float, int]]]:
    """Per series (op, shape, candidate, device, dtype, source): [(commit, median speedup of its rows, rows)] in
    the order the commits were first measured."""
    first_seen: dict[str, str] = {}
    by: dict[Key, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if not _ratio(r):
            continue
        c = r["commit"]
        ts = r.get("timestamp") or ""
        if c not in first_seen or ts < first_seen[c]:
            first_seen[c] = ts
        by[_series_key(r)][c].append(float(r["speedup_vs_primary"]))
    out = {}
    for k, per in sorted(by.items()):
        commits = sorted(per, key=lambda c: (first_seen[c], c))
        out[k] = [(c, statistics.median(per[c]), len(per[c])) for c in commits]
    return out


# -- plots -----------------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedups(op: str, items: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Grouped bars: one group per shape, one bar per candidate (and device, when several), height = speedup
    over the op's primary baseline (latest row). The data plotted goes into the PNG's 'Description' text chunk
    (JSON) and is returned."""
    import textwrap

    plt = _plt()
    devices = sorted({r.get("device_key") or "?" for r in items})
    sources = {r.get("source") or "" for r in items}

    def series(r: dict[str, Any]) -> str:
        return (r["candidate"] + (f" · {r.get('device_key') or '?'}" if len(devices) > 1 else "")
                + (f" · {r.get('source') or '?'}" if len(sources) > 1 else ""))

    shapes = sorted({r["shape"] for r in items})
    names = sorted({series(r) for r in items})
    val = {(r["shape"], series(r)): float(r["speedup_vs_primary"]) for r in items}
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(shapes) * max(len(names), 1) ** 0.5 + 3), 4.8))
    for j, c in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i, s in enumerate(shapes) if (s, c) in val]
        ys = [val[(s, c)] for s in shapes if (s, c) in val]
        ax.bar(xs, ys, width=width, color=f"C{j % 10}", label=c)
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(["\n".join(textwrap.wrap(s, 22)) for s in shapes], fontsize=8)
    ax.set_ylabel("speedup over the primary baseline (×)")
    ax.set_ylim(0, max([1.0, *val.values()]) * 1.15)
    try:
        from kerneltune.ops import get_op

        primary = get_op(op).primary_baseline
    except ValueError:
        primary = "the primary baseline"
    ax.set_title(f"{op}: speedup over {primary} per shape (latest; > 1 is faster)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    data = {"op": op, "shapes": shapes, "series": names,
            "speedup": {f"{s} | {c}": v for (s, c), v in sorted(val.items())}}
    fig.savefig(path, dpi=100, metadata={"Title": f"kerneltune speedup {op}", "Description": json.dumps(data)})
    plt.close(fig)
    return data


def plot_history(series: dict[Key, list[tuple[str, float, int]]], path: str) -> dict[str, Any]:
    """Speedup over commits, one line per series (op, shape, candidate, device, dtype, source), commits on the x
    axis in the order they were first measured."""
    plt = _plt()
    commits: list[str] = []
    for pts in series.values():
        for c, _, _ in pts:
            if c not in commits:
                commits.append(c)
    pos = {c: i for i, c in enumerate(commits)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(commits) + 4), 4.5))
    data: dict[str, Any] = {"commits": commits, "series": {}}
    sources = {k[5] for k in series}
    for j, (k, pts) in enumerate(series.items()):
        name = f"{k[0]} {k[2]} @ {k[1]}" + (f" ({k[5] or '?'})" if len(sources) > 1 else "")
        ax.plot([pos[c] for c, _, _ in pts], [v for _, v, _ in pts], marker="o", color=f"C{j % 10}", label=name)
        data["series"][f"{name} [{k[3]}]"] = [[c, v] for c, v, _ in pts]
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(commits)))
    ax.set_xticklabels([c[:12] for c in commits], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("commit (in the order first measured)")
    ax.set_ylabel("speedup over the primary baseline (×)")
    ax.set_ylim(bottom=0)
    ax.set_title("speedup over commits")
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": "kerneltune history", "Description": json.dumps(data)})
    plt.close(fig)
    return data


# -- the report ----------------------------------------------------------------------------------------------
def build_report(csv_paths: list[str], out_dir: str, drop_warn: float = 0.10) -> dict[str, Any]:
    """Write speedup-<op>.png, history.png and report.md under ``out_dir``; return what was written and shown."""
    rows, skipped = usable(read_rows(csv_paths))
    os.makedirs(out_dir, exist_ok=True)
    now = latest(rows)
    files: list[str] = []
    plotted: dict[str, Any] = {}
    for op in sorted({r["op"] for r in now}):
        p = os.path.join(out_dir, f"speedup-{op}.png")
        plotted[os.path.basename(p)] = plot_speedups(op, [r for r in now if r["op"] == op], p)
        files.append(p)
    hist = history(rows)
    hp = os.path.join(out_dir, "history.png")
    plotted["history.png"] = plot_history(hist, hp)
    files.append(hp)
    drops = []
    for k, pts in hist.items():
        if len(pts) >= 2 and pts[-2][1] > 0:
            change = pts[-1][1] / pts[-2][1] - 1
            if change < -drop_warn:
                drops.append({"op": k[0], "shape": k[1], "candidate": k[2], "device_key": k[3], "source": k[5],
                              "from_commit": pts[-2][0], "to_commit": pts[-1][0], "from": pts[-2][1], "to": pts[-1][1],
                              "change": change})
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write(_markdown(csv_paths, rows, now, hist, drops, files, drop_warn, skipped))
    files.append(md)
    return {"files": files, "rows": len(rows), "csv": csv_paths, "latest": now, "drops": drops, "plotted": plotted,
            "skipped": skipped}


def _markdown(csv_paths: list[str], rows: list[dict[str, Any]], now: list[dict[str, Any]],
              hist: dict[Key, list[tuple[str, float, int]]], drops: list[dict[str, Any]],
              files: list[str], drop_warn: float, skipped: Optional[list[str]] = None) -> str:
    from kerneltune.ops import get_op, op_names

    primary = {op: get_op(op).primary_baseline for op in op_names()}
    base_p50: dict[tuple[Any, ...], Any] = {}
    for r in rows:  # the primary baseline's p50 from the same run (and, for `kerneltune bench`, the same candidate's)
        if r.get("kind") == "baseline" and r.get("contestant") == primary.get(r.get("op") or ""):
            k = (r.get("timestamp"), r.get("op"), r.get("shape"), r.get("device_key"))
            base_p50[k + (r.get("candidate"),)] = r.get("p50_ms")
            base_p50.setdefault(k, r.get("p50_ms"))
    lines = ["# kerneltune report", "",
             f"{len(rows)} rows from {', '.join(f'`{p}`' for p in csv_paths)}. Speedup = the primary baseline's median "
             "over the candidate's, both measured in the same run (interleaved round by round by `kerneltune bench` "
             "and `bench --check`; one after the other in the pytest-benchmark suite), never across runs.", ""]
    if skipped:
        lines += [f"{len(skipped)} malformed row(s) skipped:", ""] + [f"- {w}" for w in skipped[:20]]
        lines += ([f"- … and {len(skipped) - 20} more"] if len(skipped) > 20 else []) + [""]
    noisy = sum(1 for r in rows if r.get("kind") == "candidate" and r.get("noisy"))
    if noisy:
        lines += [f"{noisy} candidate row(s) left out: timed twice on a machine too busy to trust the ratio "
                  "(`noisy`).", ""]
    if drops:
        lines += [f"**{len(drops)} series dropped by more than {drop_warn:.0%} at their latest commit:**", ""]
        lines += [f"- {d['op']} {d['candidate']} @ {d['shape']} ({d['device_key']}, {d['source'] or '?'}): {d['from']:.3g}× at "
                  f"{d['from_commit'][:12]} → {d['to']:.3g}× at {d['to_commit'][:12]} ({d['change']:+.0%})" for d in drops]
        lines.append("")
    lines += ["## Latest speedup per shape", "",
              "| op | shape | device | candidate | speedup | candidate p50 ms | baseline p50 ms | commit | when | source |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in now:
        k = (r.get("timestamp"), r.get("op"), r.get("shape"), r.get("device_key"))
        b = base_p50.get(k + (r.get("candidate"),), base_p50.get(k))
        lines.append(f"| {r['op']} | {r['shape']} | {r.get('device') or r.get('device_key')} | {r['candidate']} | "
                     f"{r['speedup_vs_primary']:.3f}× | {_f(r.get('p50_ms'))} | {_f(b)} | {r['commit'][:12]} | "
                     f"{r.get('timestamp') or ''} | {r.get('source') or ''} |")
    lines += ["", "## History over commits", "",
              "| op | candidate | shape | device | commits | first | latest | change | source |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k, pts in hist.items():
        first, last = pts[0][1], pts[-1][1]
        lines.append(f"| {k[0]} | {k[2]} | {k[1]} | {k[3]} | {len(pts)} | {first:.3f}× ({pts[0][0][:12]}) | "
                     f"{last:.3f}× ({pts[-1][0][:12]}) | {last / first - 1:+.1%} | {k[5]} |")
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in files if p.endswith(".png")] + [""]
    return "\n".join(lines)


def _f(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.4g}"


def report_cmd(
    csv_paths: Optional[list[str]] = typer.Option(None, "--csv", help="results CSV (repeatable; default: "
                                                  ".benchmarks/kerneltune-results.csv and benchmarks/results/*.csv)"),
    out_dir: str = typer.Option(os.path.join(".benchmarks", "report"), "--out", help="directory for the PNGs and report.md"),
    json_out: bool = typer.Option(False, "--json", help="print machine-readable JSON on stdout"),
) -> None:
    """PNGs of the speedup per shape per op and its history over commits, and a markdown summary, from results CSVs."""
    paths = list(csv_paths or default_csvs())
    if not paths:
        print("error: no results CSV: pass --csv FILE (write one with kerneltune bench --csv, bench --check --csv "
              "or pytest benchmarks/)", file=sys.stderr)
        raise typer.Exit(2)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"error: --csv {missing[0]}: no such file", file=sys.stderr)
        raise typer.Exit(2)
    try:
        info = build_report(paths, out_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    if info["skipped"]:
        print(f"note: {len(info['skipped'])} malformed row(s) skipped (listed in report.md), the first: "
              f"{info['skipped'][0]}", file=sys.stderr)
    if json_out:
        print(json.dumps(info, indent=1, default=str))
    else:
        for p in info["files"]:
            print(p)
        for d in info["drops"]:
            print(f"drop: {d['op']} {d['candidate']} @ {d['shape']}: {d['from']:.3g}× → {d['to']:.3g}× "
                  f"({d['change']:+.0%}) at {d['to_commit'][:12]}", file=sys.stderr)
