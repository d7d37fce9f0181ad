"""benchmarks/plot_gpu.py reads a CSV that several GPU runs appended to: each shape from the latest run that
measured it, never a ratio mixed across runs."""

from __future__ import annotations

import os

from tests.interp import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
plot_gpu = load_file("benchmarks/plot_gpu.py", "plot_gpu")


def row(ts, op, n, kind, contestant, status="ok", p50="1.0", speedup="0.5", gbps="", tflops=""):
    return {"timestamp": ts, "device": "GPU X", "torch": "t", "triton": "tr", "git": ts[-3:], "op": op, "B": "1",
            "H": "2", "N": str(n), "D": "64", "causal": "True", "shape": f"B1 H2 N{n} D64", "contestant": contestant,
            "kind": kind, "candidate": "k" if kind == "candidate" else "", "status": status, "note": "boom",
            "p20_ms": p50, "p50_ms": p50, "p80_ms": p50, "candidate_speedup": speedup, "pct_matmul_ceiling": "50",
            "rel_err": "1e-3", "gbps": gbps, "tflops": tflops, "pct_copy_ceiling": ""}


def ceilings(ts, copy):
    return [row(ts, "ceiling", "", "ceiling", "copy_gbps", gbps=str(copy)),
            row(ts, "ceiling", "", "ceiling", "matmul_bf16", tflops="700")]


def test_a_shape_that_failed_is_taken_from_the_run_that_measured_it_and_the_rest_from_the_latest():
    a, b = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"
    rows = (ceilings(a, 1000) + [row(a, "attention", 512, "candidate", "candidate", status="error"),
                                 row(a, "attention", 4096, "candidate", "candidate", p50="2.0"),
                                 row(a, "attention", 4096, "baseline", "sdpa", speedup="0.9")]
            + ceilings(b, 1100) + [row(b, "attention", 512, "candidate", "candidate", p50="0.3"),
                                   row(b, "attention", 512, "baseline", "sdpa", speedup="0.7")])
    m = plot_gpu.merged(rows)
    cand = {r["N"]: r for r in m if r["kind"] == "candidate"}
    assert cand["512"]["timestamp"] == b and cand["512"]["status"] == "ok"
    assert cand["4096"]["timestamp"] == a
    assert {r["timestamp"] for r in m if r["op"] == "ceiling"} == {a, b}
    md = plot_gpu.markdown(m)
    assert md.count("Run 2026-") == 2 and "1000 GB/s" in md and "1100 GB/s" in md
    assert "| 64 | causal | 512 | 1×2 | 0.300 | 0.70×" in md and "| 64 | causal | 4096 | 1×2 | 2.000 | 0.90×" in md
    # a later run that fails a shape again does not hide the earlier measurement
    c = "2026-01-03T00:00:00Z"
    m2 = plot_gpu.merged(rows + ceilings(c, 1200) + [row(c, "attention", 512, "candidate", "candidate", status="error")])
    assert {r["timestamp"] for r in m2 if r["kind"] == "candidate" and r["N"] == "512"} == {b}


def test_a_shape_named_both_ways_in_one_csv_is_one_shape():
    """bench_gpu.py's shape name gained the mask and dtype; a CSV appended to across that change still reads as one
    row per shape, from its latest run (keyed by the B, H, N, D, mask and dtype columns, not the name)."""
    a, b = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"
    new = {"shape": "B1 H2 N512 D64 causal bfloat16", "dtype": "bfloat16"}
    rows = (ceilings(a, 1000) + [{**row(a, "attention", 512, "candidate", "candidate", p50="2.0"), "dtype": "bfloat16"},
                                 {**row(a, "attention", 512, "baseline", "sdpa", speedup="0.9"), "dtype": "bfloat16"}]
            + ceilings(b, 1100) + [{**row(b, "attention", 512, "candidate", "candidate", p50="0.3"), **new},
                                   {**row(b, "attention", 512, "baseline", "sdpa", speedup="0.7"), **new}])
    m = plot_gpu.merged(rows)
    assert {r["timestamp"] for r in m if r["op"] != "ceiling"} == {b}
    md = plot_gpu.markdown(m)
    assert md.count("| 64 | causal | 512 |") == 1 and "| 64 | causal | 512 | 1×2 | 0.300 | 0.70×" in md


def test_a_variant_gets_its_own_column_and_an_incorrect_one_says_so():
    a = "2026-01-01T00:00:00Z"
    rows = ceilings(a, 1000) + [row(a, "attention", 512, "candidate", "candidate", p50="0.3"),
                                row(a, "attention", 512, "baseline", "sdpa", speedup="0.7"),
                                row(a, "attention", 512, "variant", "variant GROUP_BY_HEAD=0", speedup="1.8"),
                                row(a, "attention", 1024, "candidate", "candidate", p50="0.5"),
                                row(a, "attention", 1024, "variant", "variant GROUP_BY_HEAD=0", status="incorrect")]
    md = plot_gpu.markdown(plot_gpu.merged(rows))
    assert "| vs variant GROUP_BY_HEAD=0 |" in md
    assert "| 64 | causal | 512 | 1×2 | 0.300 | 0.70× | — | — | — | — | — | 1.80× |" in md
    assert "| 64 | causal | 1024 | 1×2 | 0.500 | — | — | — | — | — | — | incorrect |" in md


def test_adamw_variants_are_rows_with_the_fused_ratio_and_a_failed_one_says_why():
    a = "2026-01-01T00:00:00Z"
    n = 124_000_000
    rows = ceilings(a, 3000) + [
        {**row(a, "adamw", n, "candidate", "candidate", p50="1.3", speedup="", gbps="2670"),
         "pct_copy_ceiling": "89.0", "speedup_vs_primary": "1.1"},
        {**row(a, "adamw", n, "variant", "variant CACHE=stream", p50="1.2", speedup="0.92", gbps="2890"),
         "pct_copy_ceiling": "96.3", "speedup_vs_primary": "1.19"},
        {**row(a, "adamw", n, "variant", "variant CACHE=lru", status="failed"), "note": "ValueError: CACHE must be"},
        {**row(a, "adamw", n, "baseline", "adamw_fused", p50="1.43", speedup="1.1", gbps="2430"),
         "pct_copy_ceiling": "81.0", "speedup_vs_primary": "1.0"}]
    md = plot_gpu.markdown(plot_gpu.merged(rows))
    assert "| kerneltune `k` | 1.300 (1.300–1.300) | — | 1.10× | 2670 | 89.0% |" in md
    assert "| `variant CACHE=stream` | 1.200 (1.200–1.200) | 0.92× | 1.19× | 2890 | 96.3% |" in md
    assert "| `variant CACHE=lru` | failed: ValueError: CACHE must be |" in md
    assert "| `adamw_fused` | 1.430 (1.430–1.430) | 1.10× | 1.00× | 2430 | 81.0% |" in md


bench_gpu = load_file("benchmarks/bench_gpu.py", "bench_gpu")


def test_also_parses_points_and_refuses_malformed_or_unknown_knobs():
    import pytest

    assert bench_gpu.parse_also("attention:GROUP_BY_HEAD=0,BLOCK_N=128; attention:num_warps=4") == {
        "attention": [{"GROUP_BY_HEAD": 0, "BLOCK_N": 128}, {"num_warps": 4}]}
    assert bench_gpu.parse_also(None) == {}
    for bad in ("attention", "attention:", "attention:BLOCK_N", "attention:=3"):
        with pytest.raises(SystemExit, match="--also"):
            bench_gpu.parse_also(bad)
    pytest.importorskip("triton")
    path = os.path.join(ROOT, "candidates", "attention", "triton_fa2.py")
    mods = bench_gpu.load_variants("attention", path, [{"GROUP_BY_HEAD": 0}])
    (name, mod), = mods.items()
    assert name == "variant GROUP_BY_HEAD=0" and mod.KERNELTUNE["params"]["GROUP_BY_HEAD"] == 0
    assert mod.KERNELTUNE["params"]["BLOCK_M"] == 128      # the other knobs stay the candidate's
    with pytest.raises(SystemExit, match="BLOCK_Q"):
        bench_gpu.load_variants("attention", path, [{"BLOCK_Q": 64}])
    (name, mod), = bench_gpu.load_variants("adamw", os.path.join(ROOT, bench_gpu.TEMPLATES["adamw"]),
                                           [{"CACHE": "stream", "CHUNK": 16384}]).items()
    assert name == "variant CACHE=stream,CHUNK=16384" and mod.KERNELTUNE["params"]["BLOCK"] == 2048


def test_probe_children_report_a_failure_a_pass_and_kill_a_hang_with_what_it_started(tmp_path):
    """The GPU bench's probes: a child that hangs is killed at its time with the processes it started (its
    process group), a failing child's last line is its reason, and the others still run."""
    import sys
    import time

    pidfile = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f" open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    jobs = {"ok": [sys.executable, "-c", "print('fine')"],
            "bad": [sys.executable, "-c", "import sys; print('step 1'); print('wrong at N80: dq differs'); sys.exit(3)"],
            "hang": [sys.executable, "-c", hang]}
    t0 = time.monotonic()
    out = bench_gpu.probe_children(jobs, timeout=4.0, workers=2)
    assert time.monotonic() - t0 < 30
    assert out["ok"] == ""
    assert out["bad"] == "probe: exit 3: wrong at N80: dq differs"
    assert out["hang"] == "probe: no answer in 4 s (a hang?), killed"
    pid = int(pidfile.read_text())
    for _ in range(100):  # the grandchild got SIGKILL with its group; wait for it to be reaped by init
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped is dead too
            assert f.read().split()[2] == "Z"


def test_the_bench_dry_run_probes_each_contestant_and_records_one_that_fails_without_timing_it(tmp_path):
    """bench_gpu.py --dry-run-cpu (Triton's interpreter): the candidate and a good variant pass their probes and
    are timed at every shape; a variant that cannot compile is one failed row, never run in the timing process."""
    import csv
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--dry-run-cpu", "--out",
                        str(tmp_path), "--ops", "attention", "--rounds", "1", "--turn-ms", "1",
                        "--also", "attention:BLOCK_M=48;attention:GROUP_BY_HEAD=0"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "probes: 2 of 3 passed" in r.stdout
    with open(tmp_path / "issue8.csv", newline="") as f:
        every = list(csv.DictReader(f))
    rows = [x for x in every if x["op"] == "attention"]
    failed = [x for x in rows if x["contestant"] == "variant BLOCK_M=48"]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and failed[0]["shape"] == ""
    assert failed[0]["note"].startswith("probe: exit 1:") and "power of 2" in failed[0]["note"]
    timed = [x for x in rows if x["shape"]]
    assert {x["contestant"] for x in timed if x["kind"] != "baseline"} == {"triton_fa2", "variant GROUP_BY_HEAD=0"}
    assert all(x["status"] == "ok" for x in timed if x["kind"] != "baseline")
    md = plot_gpu.markdown(plot_gpu.merged(every))
    assert "- not timed: variant BLOCK_M=48 (variant): failed, probe: exit 1:" in md


def test_the_training_rows_are_a_table_of_their_own_against_sdpa_forward_and_backward():
    a = "2026-01-01T00:00:00Z"
    rows = ceilings(a, 1000) + [
        row(a, "attention_backward", 4096, "candidate", "candidate", p50="3.0"),
        row(a, "attention_backward", 4096, "baseline", "sdpa_fwd_bwd", p50="2.4", speedup="0.8"),
        {**row(a, "attention_backward", 4096, "training", "kerneltune_fwd_bwd", p50="4.0", speedup="1.33"),
         "speedup_vs_primary": "0.6"},
        row(a, "attention_backward", 8192, "candidate", "candidate", p50="6.0"),
        row(a, "attention_backward", 8192, "training", "kerneltune_fwd_bwd", status="incorrect")]
    md = plot_gpu.markdown(plot_gpu.merged(rows))
    assert "### attention forward + backward (a training step's attention), bf16" in md
    assert "| 64 | causal | 4096 | 1×2 | 4.000 | 2.400 | 0.60× | 50.0% | 1.0e-03 |" in md
    assert "| 64 | causal | 8192 | 1×2 | incorrect: boom |" in md
    # the training row is not a column of the backward's table (its ratio is of other work)
    assert "vs kerneltune_fwd_bwd" not in md


def test_the_bench_dry_run_times_a_training_steps_attention_beside_sdpa_forward_and_backward(tmp_path):
    """bench_gpu.py --dry-run-cpu --ops attention_backward: each shape has a kerneltune_fwd_bwd row (the forward
    candidate's run_with_lse, then the backward candidate), checked against fp64 and timed in the same rounds, its
    ratio against sdpa_fwd_bwd's p50 of the same run."""
    import csv
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--dry-run-cpu", "--out",
                        str(tmp_path), "--ops", "attention_backward", "--rounds", "1", "--turn-ms", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "issue8.csv", newline="") as f:
        rows = [x for x in csv.DictReader(f) if x["op"] == "attention_backward"]
    shapes = {x["shape"] + x["causal"] for x in rows}
    assert len(shapes) == 2
    for sh in shapes:
        by = {x["contestant"]: x for x in rows if x["shape"] + x["causal"] == sh}
        t, sd = by["kerneltune_fwd_bwd"], by["sdpa_fwd_bwd"]
        assert t["kind"] == "training" and t["status"] == "ok" and float(t["rel_err"]) < 1e-2
        # the CSV keeps 5 decimals of each figure (rounding, not the ratio, sets the tolerance)
        assert float(t["speedup_vs_primary"]) == pytest.approx(float(sd["p50_ms"]) / float(t["p50_ms"]), rel=1e-3,
                                                               abs=1e-5)
    assert "forward + backward vs sdpa_fwd_bwd" in r.stdout
