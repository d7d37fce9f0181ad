"""`kerneltune report` and the results CSV: the PNGs show the data (bar heights, commit order), the markdown
states it, and one CSV takes rows from every source."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kerneltune import report as rp

pytest.importorskip("matplotlib")


def row(op="adamw", shape="gpt-tiny", cand="numba_cpu", speedup=0.5, commit="c1", ts="2026-01-01T00:00:00Z",
        kind="candidate", contestant=None, p50=2.0, key="cpu:x:2t"):
    return {"timestamp": ts, "commit": commit, "source": "test", "device": "X", "device_key": key, "op": op,
            "shape": shape, "dtype": "float32", "candidate": cand, "contestant": contestant or cand, "kind": kind,
            "p20_ms": p50 * 0.9, "p50_ms": p50, "p80_ms": p50 * 1.1, "speedup_vs_primary": speedup}


def test_append_rows_widens_the_header_and_keeps_old_rows(tmp_path):
    p = str(tmp_path / "r.csv")
    with open(p, "w", newline="") as f:  # a file from before the commit column existed (like cpu-bench.csv)
        w = csv.DictWriter(f, fieldnames=["timestamp", "op", "shape", "candidate", "kind", "speedup_vs_primary"])
        w.writeheader()
        w.writerow({"timestamp": "t0", "op": "adamw", "shape": "s", "candidate": "old", "kind": "candidate",
                    "speedup_vs_primary": "0.25"})
    rp.append_rows(p, [row(commit="abc")])
    rp.append_rows(p, [row(commit="def")])  # same header now: a plain append
    rows = rp.read_rows([p])
    assert [r["commit"] for r in rows] == ["unknown", "abc", "def"]
    assert rows[0]["speedup_vs_primary"] == 0.25 and rows[1]["p50_ms"] == 2.0 and rows[0]["p50_ms"] is None
    header = open(p).readline().strip().split(",")
    assert header[:6] == ["timestamp", "op", "shape", "candidate", "kind", "speedup_vs_primary"]
    assert "commit" in header and "p80_ms" in header


def test_append_rows_keeps_old_rows_when_only_the_known_fields_widen_the_header(tmp_path):
    """A file whose header lacks a column of FIELDS, and new rows that lack it too: the header still widens,
    and the old rows must survive the rewrite (they were once dropped: the old rows were read only when the
    new rows brought a column)."""
    p = str(tmp_path / "r.csv")
    narrow = [k for k in rp.FIELDS if k != "commit"]
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=narrow)
        w.writeheader()
        w.writerow({"timestamp": "t0", "op": "attention", "candidate": "old", "kind": "candidate"})
    new = {k: v for k, v in row().items() if k != "commit"}
    rp.append_rows(p, [new])
    rows = rp.read_rows([p])
    assert [(r["op"], r["candidate"]) for r in rows] == [("attention", "old"), ("adamw", "numba_cpu")]
    assert "commit" in open(p).readline()


def _bars(png: str, rgb: tuple[int, int, int]) -> list[int]:
    """Heights in pixels of the bars drawn in colour ``rgb``, left to right (the middle column of each)."""
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[..., :3]
    mask = np.all(np.abs(img - np.array(rgb) / 255.0) < 0.02, axis=-1)
    cols = np.where(mask.sum(axis=0) > 3)[0]
    runs, start = [], cols[0]
    for a, b in zip(cols, cols[1:]):
        if b != a + 1:
            runs.append((start, a))
            start = b
    runs.append((start, cols[-1]))
    return [int(mask[:, (lo + hi) // 2].sum()) for lo, hi in runs]


def test_speedup_png_bar_heights_follow_the_data(tmp_path):
    p = str(tmp_path / "r.csv")
    rp.append_rows(p, [row(shape="gpt-tiny", speedup=0.5), row(shape="gpt-mini", speedup=2.0),
                       row(shape="gpt-tiny", speedup=9.0, ts="2025-01-01T00:00:00Z")])  # older: not the latest
    info = rp.build_report([p], str(tmp_path / "out"))
    png = str(tmp_path / "out" / "speedup-adamw.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    heights = _bars(png, (0x1F, 0x77, 0xB4))  # C0: the one candidate; shapes sorted: gpt-mini, gpt-tiny
    assert len(heights) == 2 and heights[1] / heights[0] == pytest.approx(0.5 / 2.0, rel=0.06), heights
    from PIL import Image

    meta = json.loads(Image.open(png).info["Description"])
    assert meta["speedup"] == {"gpt-mini | numba_cpu": 2.0, "gpt-tiny | numba_cpu": 0.5}
    assert info["plotted"]["speedup-adamw.png"] == meta


def test_history_over_commits_and_the_markdown(tmp_path):
    p = str(tmp_path / "r.csv")
    rows = [row(commit="aaa", speedup=1.2, ts="2026-01-01T00:00:00Z"),
            row(commit="bbb", speedup=1.25, ts="2026-01-02T00:00:00Z"),
            row(commit="bbb", speedup=1.15, ts="2026-01-02T00:01:00Z"),   # two runs of one commit: the median
            row(commit="ccc", speedup=0.9, ts="2026-01-03T00:00:00Z"),    # a 25 % drop
            row(op="attention", shape="B1 H4 N256 D64", cand="numba_cpu", speedup=0.6, commit="ccc",
                ts="2026-01-03T00:00:00Z"),
            row(kind="baseline", contestant="adamw_fused", cand="numba_cpu", speedup=0.9, commit="ccc",
                ts="2026-01-03T00:00:00Z", p50=1.8)]
    rp.append_rows(p, rows)
    out = str(tmp_path / "out")
    info = rp.build_report([p], out)
    assert sorted(os.path.basename(f) for f in info["files"]) == ["history.png", "report.md", "speedup-adamw.png",
                                                                  "speedup-attention.png"]
    h = info["plotted"]["history.png"]
    assert h["commits"] == ["aaa", "bbb", "ccc"]
    assert h["series"]["adamw numba_cpu @ gpt-tiny [cpu:x:2t]"] == [["aaa", 1.2], ["bbb", 1.2], ["ccc", 0.9]]
    assert [d["to_commit"] for d in info["drops"]] == ["ccc"] and info["drops"][0]["change"] == pytest.approx(-0.25)
    md = open(os.path.join(out, "report.md")).read()
    assert "1 series dropped by more than 10%" in md and "1.2× at aaa" not in md  # the drop is bbb -> ccc
    assert "| adamw | gpt-tiny | X | numba_cpu | 0.900× | 2 | 1.8 | ccc |" in md
    assert "![history.png](history.png)" in md
    from PIL import Image

    assert json.loads(Image.open(os.path.join(out, "history.png")).info["Description"]) == h


def test_a_noisy_row_is_left_out_of_the_plots_and_the_history(tmp_path):
    """A ratio the evaluator marked noisy (timed twice on a busy machine) neither becomes the latest speedup
    nor starts a drop warning; the markdown says how many rows were left out."""
    p = str(tmp_path / "r.csv")
    rp.append_rows(p, [row(commit="aaa", speedup=1.2, ts="2026-01-01T00:00:00Z"),
                       row(commit="bbb", speedup=0.4, ts="2026-01-02T00:00:00Z") | {"noisy": "the baseline's own calls "
                                                                                    "varied 2.8x"}])
    info = rp.build_report([p], str(tmp_path / "out"))
    assert [r["speedup_vs_primary"] for r in info["latest"]] == [1.2] and info["drops"] == []
    assert info["plotted"]["history.png"]["commits"] == ["aaa"]
    assert "1 candidate row(s) left out" in open(tmp_path / "out" / "report.md").read()


def test_report_command(tmp_path):
    p = str(tmp_path / "r.csv")
    rp.append_rows(p, [row()])
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "kerneltune.cli", "report", "--csv", p, "--out", str(tmp_path / "o"),
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert all(os.path.isfile(f) for f in info["files"]) and info["rows"] == 1
    r = subprocess.run([sys.executable, "-m", "kerneltune.cli", "report", "--csv", str(tmp_path / "none.csv")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_a_gpu_bench_rows_git_column_is_its_commit(tmp_path):
    """benchmarks/bench_gpu.py writes the commit as `git`: the history keeps its commits apart."""
    p = str(tmp_path / "gpu.csv")
    rows = [{**row(commit="", speedup=s, ts=f"2026-01-0{i}T00:00:00Z"), "git": g}
            for i, (g, s) in enumerate([("aaa", 2.0), ("bbb", 1.0)], 1)]
    rp.append_rows(p, rows)
    assert [r["commit"] for r in rp.read_rows([p])] == ["aaa", "bbb"]
    info = rp.build_report([p], str(tmp_path / "out"))
    assert len(info["drops"]) == 1 and info["drops"][0]["to_commit"] == "bbb"


def test_report_on_malformed_csvs_says_so_in_one_line_or_skips_the_bad_rows(tmp_path):
    from typer.testing import CliRunner

    from kerneltune.cli import app

    def report(p):
        r = CliRunner().invoke(app, ["report", "--csv", p, "--out", str(tmp_path / "o"), "--json"])
        r.returncode = r.exit_code
        return r

    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage\x89PNG\n")
    r = report(str(binary))
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    p = str(tmp_path / "r.csv")
    rp.append_rows(p, [row(speedup=0.0), row(shape="", cand="other"), row(cand="good", speedup=1.5),
                       row(cand="nan", speedup=float("nan"))])
    r = report(p)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["rows"] == 1 and len(info["skipped"]) == 3 and [x["candidate"] for x in info["latest"]] == ["good"]
    assert r.stderr.startswith("note: 3 malformed row(s) skipped")
    assert "3 malformed row(s) skipped" in open(info["files"][-1]).read()


def _gpu_row(ts, git, causal, speedup, shape=None, dtype="bfloat16"):
    """A row as benchmarks/bench_gpu.py writes it: dims, mask and dtype in columns, the commit as `git`, no source."""
    return {"timestamp": ts, "device": "H100", "device_key": "cuda:h100:sm90", "git": git, "op": "attention",
            "B": "4", "H": "16", "N": "4096", "D": "128", "causal": str(causal), "dtype": dtype,
            "shape": shape or f"B4 H16 N4096 D128 {'causal' if causal else 'full'} {dtype}",
            "contestant": "triton_fa2", "kind": "candidate", "candidate": "triton_fa2", "status": "ok",
            "p50_ms": "1.0", "speedup_vs_primary": str(speedup)}


def test_a_gpu_bench_csvs_causal_and_full_rows_are_two_series_under_either_naming(tmp_path):
    """bench_gpu.py once named a shape by B, H, N, D alone: its causal and full rows were one series, and the
    latest hid the other. The shape is named from the columns, so the old rows and the new (mask and dtype in
    the name) are the same two series."""
    p = str(tmp_path / "gpu.csv")
    old = "B4 H16 N4096 D128"
    rp.append_rows(p, [_gpu_row("2026-01-01T00:00:00Z", "aaa", True, 1.2, old),
                       _gpu_row("2026-01-01T00:00:00Z", "aaa", False, 0.8, old),
                       _gpu_row("2026-01-02T00:00:00Z", "bbb", True, 1.3),
                       _gpu_row("2026-01-02T00:00:00Z", "bbb", False, 0.7)])
    rows = rp.read_rows([p])
    assert [r["shape"] for r in rows] == ["B4 H16 N4096 D128 causal bfloat16", "B4 H16 N4096 D128 full bfloat16"] * 2
    now = rp.latest(rows)
    assert [(r["shape"], r["speedup_vs_primary"]) for r in now] == [("B4 H16 N4096 D128 causal bfloat16", 1.3),
                                                                    ("B4 H16 N4096 D128 full bfloat16", 0.7)]
    hist = rp.history(rows)
    assert [[(c, v) for c, v, _ in pts] for pts in hist.values()] == [[("aaa", 1.2), ("bbb", 1.3)],
                                                                      [("aaa", 0.8), ("bbb", 0.7)]]
    info = rp.build_report([p], str(tmp_path / "out"))
    assert sorted(info["plotted"]["speedup-attention.png"]["speedup"]) == [
        "B4 H16 N4096 D128 causal bfloat16 | triton_fa2", "B4 H16 N4096 D128 full bfloat16 | triton_fa2"]
    assert rp.dims_shape({"B": "", "H": "", "N": "124475904", "D": "", "causal": "", "dtype": "float32"}) == \
        "N124475904 float32"  # adamw's row


def test_the_recorded_h100_csv_has_a_series_per_shape_mask_and_op():
    rows, _ = rp.usable(rp.read_rows([os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                                                   "results", "issue8-h100.csv")]))
    now = rp.latest(rows)
    by_op = {op: sum(1 for r in now if r["op"] == op) for op in ("attention", "attention_backward")}
    assert by_op == {"attention": 24, "attention_backward": 24}  # 12 (B, H, N, D) x causal and full
    assert {r["shape"].split()[-2] for r in now if r["op"] == "attention"} == {"causal", "full"}


def test_pytest_benchmark_and_bench_check_rows_are_never_one_series(tmp_path):
    """The suite times contestants one after another, `bench --check` interleaved: a series mixing them would show
    the change of method as a change of the kernel (here a 'drop')."""
    p = str(tmp_path / "r.csv")
    rp.append_rows(p, [row(commit="aaa", speedup=1.2, ts="2026-01-01T00:00:00Z") | {"source": "bench --check"},
                       row(commit="bbb", speedup=0.6, ts="2026-01-02T00:00:00Z") | {"source": "pytest-benchmark"}])
    info = rp.build_report([p], str(tmp_path / "out"))
    assert info["drops"] == []
    assert sorted((r["source"], r["speedup_vs_primary"]) for r in info["latest"]) == [("bench --check", 1.2),
                                                                                      ("pytest-benchmark", 0.6)]
    assert sorted(info["plotted"]["speedup-adamw.png"]["speedup"]) == [
        "gpt-tiny | numba_cpu · bench --check", "gpt-tiny | numba_cpu · pytest-benchmark"]
    assert sorted(info["plotted"]["history.png"]["series"]) == [
        "adamw numba_cpu @ gpt-tiny (bench --check) [cpu:x:2t]", "adamw numba_cpu @ gpt-tiny (pytest-benchmark) [cpu:x:2t]"]
