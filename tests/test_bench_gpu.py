"""benchmarks/bench_gpu.py on a CPU: the candidate it takes from the store is the leaderboard's, its rows name the
mask and dtype in the shape, a variant timed beside a wrong candidate does not hide the verdict, the commit carries
its dirty mark, and bad numbers are one-line usage errors."""

from __future__ import annotations

import argparse
import csv
import types

import pytest
import torch
import torch.nn.functional as F

from tests.interp import ROOT, load_file


def _bench_gpu():
    return load_file("benchmarks/bench_gpu.py", "kt_test_bench_gpu")  # a fresh module: DEV and HALF are its own


def _eval(store, h, status, speedup=None, shape=None, noisy=None):
    from kerneltune.evaluate.device import device_info

    store.add_evaluation({"hash": h, "op": "attention", "status": status, "reason": "" if status == "passed" else "x",
                          "speedup": speedup, "shape": shape, "median_ms": 1.0 if speedup else None,
                          "baseline": "sdpa" if speedup else None, "noisy": noisy,
                          "provenance": {"device": device_info("cpu")}})


def test_the_candidate_taken_from_the_store_is_the_leaderboards_first(tmp_path):
    """Not the highest speedup of any pass: a pass the evaluator marked noisy, and a candidate whose latest verdict
    is a failure, are off the leaderboard and so not benched."""
    from kerneltune.evaluate.device import device_info
    from kerneltune.store import Store

    db = str(tmp_path / "kt.db")
    store = Store(db)
    shape = "B4 H16 N4096 D128 causal bfloat16"
    for h, name in (("aa" * 32, "good"), ("bb" * 32, "noisy_outlier"), ("cc" * 32, "later_incorrect")):
        store.add_candidate(hash=h, op="attention", backend="torch", name=name, source=f"# {name}\n", path=None,
                            summary="", params={}, origin="user", parent=None)
    _eval(store, "aa" * 32, "passed", 1.05, shape)
    _eval(store, "bb" * 32, "passed", 1.60, shape, noisy="the baseline's own calls varied 2.8x")
    _eval(store, "cc" * 32, "passed", 1.30, shape)
    _eval(store, "cc" * 32, "incorrect")  # found wrong later
    key = device_info("cpu")["key"]
    path, name, hsh = _bench_gpu().pick_candidate("attention", db, key, str(tmp_path))
    assert (name, hsh) == ("good", "aa" * 32) and open(path).read() == "# good\n"
    assert [r["name"] for r in store.leaderboard("attention", key, 20)] == ["good"]   # what the leaderboard shows
    store.close()
    # nothing on the board for this op: the shipped template
    assert _bench_gpu().pick_candidate("adamw", db, key, str(tmp_path))[0].endswith("candidates/adamw/triton_mt_table.py")


def test_a_variant_timed_beside_a_wrong_candidate_leaves_the_candidates_verdict_alone(capsys):
    """The shape's log line once read a status off the variant's (absent) failure: a TypeError, and an `error` row
    for the candidate beside its real `incorrect` one."""
    bg = _bench_gpu()
    bg.DEV, bg.HALF = "cpu", torch.float16
    bg.attention_shapes = lambda only: [(1, 2, 64, 64, True)]

    def sdpa(q, k, v, causal=True, scale=None):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal).to(q.dtype)

    wrong = types.SimpleNamespace(run=lambda q, k, v, causal=True: torch.zeros_like(q))
    rows = []

    def emit(op, shape, contestant, kind, **vals):
        rows.append((contestant, kind, vals.get("status")))

    args = argparse.Namespace(only_n=None, compile_n="", compile_ops="")
    ceil = {"matmul_tflops": {"float32": 1.0}, "copy_gbps": 1.0}
    bg.bench_attention("attention", wrong, None, args, bg.Timer(1, 1.0), ceil, emit, float("inf"),
                       {"variant BLOCK_M=64": types.SimpleNamespace(run=sdpa)})
    assert [r for r in rows if r[1] == "candidate"] == [("candidate", "candidate", "incorrect")]
    assert ("variant BLOCK_M=64", "variant", "ok") in rows
    assert "candidate not timed; variant BLOCK_M=64: " in capsys.readouterr().out


def test_rows_name_the_mask_and_dtype_and_the_commit_its_dirty_mark(tmp_path, monkeypatch, capsys):
    """A causal and a full row of one B, H, N, D are two shapes (`kerneltune report` keys its series by the name);
    `git` is kerneltune.check.git_commit's, '+dirty' included."""
    from kerneltune.check import git_commit

    bg = _bench_gpu()

    def fake_attention(op, cand, fwd, args, timer, ceil, emit, deadline, variants=None):
        for causal in (True, False):
            emit(op, dict(B=4, H=16, N=4096, D=128, causal=causal, dtype="bfloat16"), "candidate", "candidate",
                 status="ok", p50_ms=1.0, speedup_vs_primary=1.1 if causal else 0.9, pct_matmul_ceiling=50.0)

    def fake_adamw(cand, args, timer, ceil, emit, variants=None):
        emit("adamw", dict(B="", H="", N=1000, D="", causal="", dtype="float32"), "candidate", "candidate",
             status="ok", p50_ms=1.0, speedup_vs_primary=1.0, pct_copy_ceiling=10.0)

    monkeypatch.setattr(bg, "bench_attention", fake_attention)
    monkeypatch.setattr(bg, "bench_adamw", fake_adamw)
    monkeypatch.setattr(bg, "measure_ceilings", lambda dev: {"copy_gbps": 1.0, "matmul_tflops": {"float32": 1.0}})
    assert bg.main(["--out", str(tmp_path), "--dry-run-cpu", "--ops", "attention,adamw", "--probe-s", "0"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "issue8.csv", newline="")))
    assert [r["shape"] for r in rows if r["op"] != "ceiling"] == [
        "B4 H16 N4096 D128 causal bfloat16", "B4 H16 N4096 D128 full bfloat16", "N1000 float32"]
    assert {r["git"] for r in rows} == {git_commit(ROOT)}
    out = capsys.readouterr().out
    assert "B4 H16 N4096 D128 causal bfloat16" in out and "B4 H16 N4096 D128 full bfloat16" in out


@pytest.mark.parametrize("argv, says", [(["--rounds", "0"], "--rounds 0"), (["--only-n", "abc"], "--only-n 'abc'"),
                                        (["--only-n", ","], "--only-n ','"), (["--compile-n", "1k"], "--compile-n")])
def test_bench_gpu_bad_numbers_are_a_usage_error(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        _bench_gpu().main(["--out", str(tmp_path), "--dry-run-cpu", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("script, argv", [
    ("optim_step", ["--rounds", "0"]), ("optim_step", ["--steps", "0"]), ("optim_step", ["--preset", "nope"]),
    ("optim_host", ["--rounds", "0"]), ("optim_host", ["--steps", "-1"]), ("optim_host", ["--preset", "nope"]),
    ("attention_fallback_bwd", ["--rounds", "0"])])
def test_the_host_benchmarks_bad_numbers_are_a_usage_error(capsys, script, argv):
    mod = load_file(f"benchmarks/{script}.py", f"kt_test_{script}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--device", "cpu", *(["--preset", "smoke"] if script != "attention_fallback_bwd" and
                                       "--preset" not in argv else []), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f": error: {argv[0]}" in err[-1] and "Traceback" not in "\n".join(err), err
