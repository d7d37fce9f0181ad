"""The bench's fastest variant of an op as a search start point: `TEMPLATE:KNOB=V,...` on stdout, or nothing.

    python benchmarks/gpu/bench_best.py BENCH_DIR OP TEMPLATE_DIR [--margin 0.01]

`bench_gpu.py --also` times the candidate at other knob values beside it, in the same rounds. A variant's
ratio there is a measurement of the trusted bench, not a verdict: this names the variant of the latest run
whose p50 beat the candidate's (geometric mean over the shapes where both ran, by more than the margin; a
variant that failed or was wrong at any shape is out), so that `kerneltune search OP --option start=...`
puts it through the full evaluator first. Nothing is printed when no variant won, when the run's candidate
is not a template of TEMPLATE_DIR, or when the point is not in that template's space (why, on stderr).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from kerneltune.search.space import Space, SpaceError, load_template  # noqa: E402


def best_variant(rows: list[dict[str, str]], op: str, margin: float) -> tuple[str, float] | None:
    """(variant name, geometric mean of its p50 / the candidate's p50) of the best winning variant, or None."""
    by_shape: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        if r["op"] == op:
            by_shape.setdefault(r["shape"] + "|" + r.get("causal", ""), {})[
                "candidate" if r["kind"] == "candidate" else r["contestant"]] = r
    ratios: dict[str, list[float]] = {}
    out: set[str] = set()
    for shape in by_shape.values():
        cand = shape.get("candidate")
        if cand is None or cand["status"] != "ok":
            continue
        for name, r in shape.items():
            if r["kind"] != "variant":
                continue
            if r["status"] != "ok":
                out.add(name)
                continue
            ratios.setdefault(name, []).append(float(r["p50_ms"]) / float(cand["p50_ms"]))
    scored = {n: math.exp(sum(map(math.log, xs)) / len(xs)) for n, xs in ratios.items() if n not in out}
    if not scored:
        return None
    name = min(scored, key=scored.get)
    return (name, scored[name]) if scored[name] < 1.0 - margin else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_dir")
    ap.add_argument("op")
    ap.add_argument("template_dir")
    ap.add_argument("--margin", type=float, default=0.01, help="fraction of the candidate's p50 to beat it by")
    args = ap.parse_args()
    try:
        with open(os.path.join(args.bench_dir, "issue8_meta.json")) as f:
            meta = json.load(f)
        with open(os.path.join(args.bench_dir, "issue8.csv"), newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["timestamp"] == meta["timestamp"]]
    except (OSError, ValueError, KeyError) as e:
        print(f"bench_best: no bench run to read in {args.bench_dir} ({e})", file=sys.stderr)
        return 0
    won = best_variant(rows, args.op, args.margin)
    if won is None:
        print(f"bench_best: no {args.op} variant beat the candidate by {args.margin:.0%}", file=sys.stderr)
        return 0
    name, ratio = won
    params = meta.get("variants", {}).get(args.op, {}).get(name)
    template = re.sub(r"-[0-9a-f]{8}$", "", meta["candidates"][args.op]["name"])   # a promoted copy's template
    path = os.path.join(args.template_dir, template + ".py")
    try:
        t = load_template(path) if params and os.path.exists(path) else None
        if t is None:
            raise SpaceError(f"{path} is not a template here" if params else f"the run's meta has no params for {name}")
        point = f"{template}:" + ",".join(f"{k}={params[k]}" for k in sorted(t.space) if k in params)
        Space([t]).parse_points(point)
    except SpaceError as e:
        print(f"bench_best: {name} ({ratio:.3f} of the candidate's time) cannot start a search: {e}", file=sys.stderr)
        return 0
    print(f"bench_best: {name} ran in {ratio:.3f} of the candidate's time", file=sys.stderr)
    print(point)
    return 0


if __name__ == "__main__":
    sys.exit(main())
