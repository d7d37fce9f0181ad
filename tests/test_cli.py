"""The command line as a user and a CI job meet it: JSON on stdout, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from kerneltune.cli import app
from tests.test_evaluator import ATTN_OK


def kt(*args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kerneltune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_eval_json_contract_and_exit_codes(write_candidate, tmp_path):
    good = write_candidate("good", ATTN_OK.format(tweak="pass"))
    bad = write_candidate("bad", ATTN_OK.format(tweak="out = out * 1.01"))
    db = str(tmp_path / "kt.db")
    r = kt("eval", good, bad, "--device", "cpu", "--json", "--db", db, "--seeds", "1")
    assert r.returncode == 1, r.stderr
    results = json.loads(r.stdout)
    assert [x["status"] for x in results] == ["passed", "incorrect"]
    for x in results:
        assert {"candidate", "status", "reason", "median_ms", "speedup"} <= set(x)
    assert results[0]["speedup"] > 0 and results[1]["speedup"] is None and results[1]["reason"]
    r = kt("eval", good, "--json", "--db", db, "--seeds", "1", "--no-time")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["status"] == "passed"
    import sqlite3

    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_usage_errors_exit_2_with_one_line(write_candidate):
    good = write_candidate("good", ATTN_OK.format(tweak="pass"))
    for args, words in ((["eval", good, "--device", "cuda"], "no CUDA GPU"),
                        (["eval", "nope.py"], "no such file"),
                        (["eval", good, "--device", "tpu"], "use cpu or cuda"),
                        (["bench", "conv"], "unknown op"),
                        (["eval", good, "--shapes", "1,2,3"], "B,H,N,D"),
                        (["search", "adamw", "--proposer", "templates", "--option", "start=numba_tpl:BLOCK=3"],
                         "BLOCK=3 is not in the space")):
        r = CliRunner().invoke(app, args)  # in this process: the exit status and stderr a shell sees, 2 s less each
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_prints_speedups_over_each_baseline(write_candidate, tmp_path):
    folder = tmp_path / "cands"
    folder.mkdir()
    (folder / "plain.py").write_text(open(write_candidate("plain", ATTN_OK.format(tweak="pass"))).read())
    csv_path = tmp_path / "out.csv"
    r = kt("bench", "attention", "--candidates", str(folder), "--shapes", "1,2,64,32,causal", "--json",
           "--csv", str(csv_path), "--db", str(tmp_path / "kt.db"))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    rows = {(x["contestant"], x["kind"]) for x in data["rows"]}
    assert rows == {("plain", "candidate"), ("sdpa", "baseline"), ("torch_math", "baseline")}
    for x in data["rows"]:
        assert x["p20_ms"] <= x["p50_ms"] <= x["p80_ms"] and x["device"] and x["torch"]
    import csv

    with open(csv_path, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 3 and list(got[0])[0] == "timestamp"
    assert {(x["contestant"], x["kind"]) for x in got} == rows and all(x["device"] and x["p50_ms"] for x in got)
    # the same file takes rows from the regression check (wider): the header grows, the rows stay
    from kerneltune.report import append_rows

    append_rows(str(csv_path), [{"timestamp": "t", "op": "attention", "check_status": "ok"}])
    with open(csv_path, newline="") as f:
        again = list(csv.DictReader(f))
    assert len(again) == 4 and again[:3] == [{**x, "check_status": ""} for x in got]


def test_doctor_json():
    r = kt("doctor", "--json")
    assert r.returncode == 0, r.stderr
    rows = {c["name"]: c for c in json.loads(r.stdout)}
    assert {"torch", "gpu", "triton", "numba", "nvcc", "sandbox: landlock", "workers", "store", "claude"} <= set(rows)
    if sys.platform == "linux":  # this machine's CPU workers are forked by the zygote, and doctor started one
        assert rows["workers"]["status"] == "ok" and "forked" in rows["workers"]["detail"], rows["workers"]


def test_doctor_never_prints_the_key():
    r = kt("doctor", "--json", env_extra={"ANTHROPIC_API_KEY": "sk-ant-test-SECRETVALUE"})
    assert "SECRETVALUE" not in r.stdout + r.stderr


def test_bench_rows_and_table_carry_the_noise_gates_word():
    """`bench`'s CSV/JSON rows say how each case was timed (others' load, noisy, turns run alone), and its
    table marks a noisy ratio instead of showing it like a measurement."""
    from kerneltune import cli as cli_mod

    roof = {"pct_of_roof": None, "gbps": 1.0, "tflops": 0.1}
    noisy = "other processes kept 60% of the CPUs busy [c0, timed twice]"
    case = {"name": "c0", "case": {"dtype": "float32"}, "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1,
            "speedup": 2.0, "roofline": roof, "foreign_load": 0.6, "isolated": True, "noisy": noisy,
            "baselines": {"adamw_fused": {"median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.1, "speedup": 2.0,
                                          "roofline": roof}}}
    res = {"name": "k1", "hash": "ab" * 32, "op": "adamw", "status": "passed", "reason": "", "cases": [case],
           "provenance": {"timestamp": "t", "device": {"name": "X", "key": "cpu:x"}, "threads": 2,
                          "versions": {"torch": "2", "kerneltune": "0"}}}
    quiet = {**res, "name": "k2", "cases": [{**case, "noisy": None, "foreign_load": 0.0}]}
    rows = cli_mod.bench_rows([res, quiet])
    assert [(r["contestant"], r["noisy"], r["foreign_load"], r["isolated"]) for r in rows] == [
        ("k1", noisy, 0.6, True), ("adamw_fused", noisy, 0.6, True), ("k2", "", 0.0, True),
        ("adamw_fused", "", 0.0, True)]
    with cli_mod.out.capture() as cap:
        cli_mod._print_bench("adamw", [res, quiet], [])
    lines = cap.get().splitlines()
    assert any("k1 (noisy)" in ln for ln in lines) and not any("k2 (noisy)" in ln for ln in lines)


def _bench_result():
    roof = {"pct_of_roof": None, "gbps": 1.0, "tflops": 0.1}
    b = lambda ms, sp: {"median_ms": ms, "p20_ms": ms * 0.9, "p80_ms": ms * 1.1, "speedup": sp, "roofline": roof}  # noqa: E731
    case = {"name": "c0", "case": {"dtype": "float32"}, "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1,
            "speedup": 2.0, "roofline": roof, "baselines": {"adamw_fused": b(2.0, 2.0), "adamw_foreach": b(4.0, 4.0)}}
    return {"name": "k1", "hash": "ab" * 32, "op": "adamw", "status": "passed", "reason": "", "cases": [case],
            "provenance": {"timestamp": "t", "device": {"name": "X", "key": "cpu:x"}, "threads": 2,
                           "versions": {"torch": "2", "kerneltune": "0"}}}


def test_bench_rows_carry_commit_source_and_the_documented_speedup_vs_primary():
    """docs/ci.md: every row has `commit` and `source`; `speedup_vs_primary` is the primary baseline's p50 over
    this contestant's (1.0 on the primary's row); the candidate's ratio over a baseline is `candidate_speedup`."""
    from kerneltune import cli as cli_mod
    from kerneltune.check import git_commit

    rows = cli_mod.bench_rows([_bench_result()])
    assert all(r["commit"] == git_commit() and r["source"] == "bench" for r in rows)
    got = {r["contestant"]: r["speedup_vs_primary"] for r in rows}
    assert got == {"k1": 2.0, "adamw_fused": 1.0, "adamw_foreach": 0.5}
    assert {r["contestant"]: r.get("candidate_speedup") for r in rows if r["kind"] == "baseline"} == {
        "adamw_fused": 2.0, "adamw_foreach": 4.0}


def _lb_eval(store, h, status, speedup=None, shape=None, noisy=None):
    from kerneltune.evaluate.device import device_info

    store.add_evaluation({"hash": h, "op": "adamw", "status": status, "reason": "" if status == "passed" else "x",
                          "speedup": speedup, "shape": shape, "median_ms": 1.0 if speedup else None,
                          "baseline": "adamw_fused" if speedup else None, "noisy": noisy,
                          "provenance": {"device": device_info("cpu")}})


def test_leaderboard_drops_a_pass_that_a_later_failure_replaced(tmp_path):
    """Failures are stored without a shape: the leaderboard's latest evaluation is Store.latest_evaluation's
    (the search cache's, promote's), so a later `incorrect` takes the candidate off the board."""
    from kerneltune.store import Store

    db = str(tmp_path / "kt.db")
    store = Store(db)
    for h in ("aa" * 32, "bb" * 32):
        store.add_candidate(hash=h, op="adamw", backend="torch", name=h[:4], source="x", path=None, summary="",
                            params={}, origin="user", parent=None)
    _lb_eval(store, "aa" * 32, "passed", 1.5, "gpt-tiny")
    _lb_eval(store, "aa" * 32, "incorrect")  # found wrong later
    _lb_eval(store, "bb" * 32, "passed", 1.2, "gpt-tiny")
    _lb_eval(store, "bb" * 32, "passed", 3.0, "gpt-tiny", noisy="busy")  # a noisy pass hides nothing
    store.close()
    r = CliRunner().invoke(app, ["leaderboard", "adamw", "--db", db, "--json"])
    assert r.exit_code == 0, r.output
    board = json.loads(r.stdout)["leaderboard"]
    assert [(b["hash"][:2], b["speedup"]) for b in board] == [("bb", 1.2)]


def test_reading_commands_never_make_a_store_and_refuse_a_foreign_one(tmp_path):
    import sqlite3

    cli = CliRunner()
    missing = str(tmp_path / "missing.db")
    for argv in (["runs"], ["leaderboard", "adamw"], ["show", "abcdef"]):
        r = cli.invoke(app, [*argv, "--db", missing])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "no such store" in r.stderr, r.output
        assert not os.path.exists(missing)
    foreign = str(tmp_path / "other.db")
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE runs(x)")
    con.commit()
    con.close()
    before = open(foreign, "rb").read()
    r = cli.invoke(app, ["runs", "--db", foreign])
    assert r.exit_code == 2 and "not a kerneltune store" in r.stderr, r.output
    assert open(foreign, "rb").read() == before  # nothing added to another program's database
    r = cli.invoke(app, ["leaderboard", "adamww", "--db", foreign])
    assert r.exit_code == 2 and "unknown op 'adamww'" in r.stderr
