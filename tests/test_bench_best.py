"""benchmarks/gpu/bench_best.py: the bench's fastest variant becomes the search's first point, and only a
variant that won at every shape where it ran, by the margin, inside the template's space."""

from __future__ import annotations

import csv
import json
import os
import sys

from tests.interp import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bench_best = load_file("benchmarks/gpu/bench_best.py", "bench_best")

TS = "2026-01-02T00:00:00Z"
DEFAULTS = {"BLOCK": 2048, "CHUNK": 65536, "num_warps": 8, "MOMENTS": "f32", "CACHE": "evict_first"}


def _row(contestant, kind, p50, status="ok", shape="N124", ts=TS):
    return {"timestamp": ts, "op": "adamw", "shape": shape, "causal": "", "contestant": contestant, "kind": kind,
            "status": status, "p50_ms": str(p50)}


def _run(tmp_path, capsys, rows, variants, name="triton_mt_table", margin=None):
    with open(tmp_path / "issue8.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "issue8_meta.json").write_text(json.dumps({
        "timestamp": TS, "candidates": {"adamw": {"name": name, "params": DEFAULTS}},
        "variants": {"adamw": {v: {**DEFAULTS, **knobs} for v, knobs in variants.items()}}}))
    argv = ["bench_best", str(tmp_path), "adamw", os.path.join(ROOT, "candidates", "adamw")]
    argv += ["--margin", str(margin)] if margin is not None else []
    old, sys.argv = sys.argv, argv
    try:
        assert bench_best.main() == 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return out.out.strip(), out.err


def test_the_fastest_variant_is_printed_as_a_full_point_of_the_template(tmp_path, capsys):
    rows = [_row("triton_mt_table", "candidate", 1.30), _row("adamw_fused", "baseline", 1.40),
            _row("variant CACHE=stream", "variant", 1.25), _row("variant CHUNK=16384", "variant", 1.20),
            _row("variant CACHE=none", "variant", 1.10, ts="2025-01-01T00:00:00Z")]   # an older run: not read
    out, err = _run(tmp_path, capsys, rows, {"variant CACHE=stream": {"CACHE": "stream"},
                                             "variant CHUNK=16384": {"CHUNK": 16384}},
                    name="triton_mt_table-0123abcd")   # a promoted copy: its template's space
    assert out == "triton_mt_table:BLOCK=2048,CACHE=evict_first,CHUNK=16384,MOMENTS=f32,num_warps=8"
    assert "0.923" in err


def test_a_variant_that_failed_at_a_shape_lost_by_the_margin_or_left_the_space_starts_nothing(tmp_path, capsys):
    rows = [_row("triton_mt_table", "candidate", 1.0), _row("triton_mt_table", "candidate", 1.0, shape="N2"),
            _row("variant CHUNK=16384", "variant", 0.5), _row("variant CHUNK=16384", "variant", 0, "failed", "N2"),
            _row("variant CACHE=stream", "variant", 0.995), _row("variant CACHE=stream", "variant", 0.995, shape="N2")]
    variants = {"variant CHUNK=16384": {"CHUNK": 16384}, "variant CACHE=stream": {"CACHE": "stream"}}
    out, err = _run(tmp_path, capsys, rows, variants)
    assert out == "" and "no adamw variant beat the candidate by 1%" in err
    out, _ = _run(tmp_path, capsys, rows, variants, margin=0.001)
    assert out.endswith("CACHE=stream,CHUNK=65536,MOMENTS=f32,num_warps=8")
    out, err = _run(tmp_path, capsys, [_row("triton_mt_table", "candidate", 1.0), _row("variant BLOCK=8192", "variant", 0.5)],
                    {"variant BLOCK=8192": {"BLOCK": 8192}})
    assert out == "" and "BLOCK=8192 is not in the space" in err
