"""How a search ends (Ctrl-C, an error, a limit), what it reuses from the store, and what its summary counts:
with a fake evaluator (no worker starts), so each test takes well under a second or two."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from typer.testing import CliRunner

import kerneltune.evaluate.evaluator as ev_mod
from kerneltune.cli import app
from kerneltune.evaluate.device import device_info, versions
from kerneltune.ops import get_op
from kerneltune.search.runner import Search, SearchConfig
from kerneltune.store import Store

SHAPE = "gpt-tiny"


def _cfg(template_dir, **kw):
    base = dict(op="adamw", device="cpu", proposer="templates", strategy="grid", budget=3, jobs=2,
                candidate_dirs=[template_dir], shapes=[SHAPE], timeout=60.0)
    return SearchConfig(**{**base, **kw})


def fake_result(cand, status="passed", speedup=1.0, shape=None):
    """What Evaluator.evaluate returns, in the fields the runner and the store read."""
    passed = status == "passed"
    spec = get_op("adamw")
    return {"candidate": cand.name, "name": cand.name, "hash": cand.hash, "op": "adamw", "backend": "torch",
            "status": status, "reason": "" if passed else f"{status} (fake)", "stage": "done" if passed else "check",
            "median_ms": 1.0 if passed else None, "p20_ms": 0.9 if passed else None, "p80_ms": 1.1 if passed else None,
            "speedup": speedup if passed else None, "baseline": "adamw_fused" if passed else None,
            "shape": shape if passed else None, "dtype": "float32" if passed else None, "noisy": None, "cases": [],
            "checks": {"cases": [c.name for c in spec.check_cases("cpu")]}, "notes": [], "duration_s": 0.01,
            "provenance": {"device": device_info("cpu"), "versions": versions(), "timestamp": "2026-01-01T00:00:00Z"}}


# -- Ctrl-C --------------------------------------------------------------------------------------------------
def test_ctrl_c_kills_the_evaluations_in_flight_at_once_and_keeps_what_had_finished(template_dir, tmp_path):
    store = Store(str(tmp_path / "kt.db"))
    s = Search(store, _cfg(template_dir, budget=3, jobs=3))
    aborted: list[float] = []
    calls: list[str] = []

    def evaluate(cand, **kw):
        calls.append(cand.hash)
        if len(calls) == 1:
            return fake_result(cand, shape=s.shape)  # finishes before the Ctrl-C
        for _ in range(300):  # a worker in its own session: it never sees the SIGINT, only abort() ends it
            if aborted:
                return fake_result(cand, "crashed")  # killed by us: no verdict
            time.sleep(0.05)
        return fake_result(cand, shape=s.shape)

    s.evaluator.evaluate = evaluate
    s.evaluator.abort = lambda: aborted.append(time.monotonic())
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    summary = s.run()
    took = time.monotonic() - t0
    assert summary["status"] == "interrupted"
    assert took < 4, f"run() waited {took:.1f} s for the evaluations in flight"
    assert aborted and aborted[0] - t0 < 4
    # the verdict given before the Ctrl-C is kept; the killed ones are not verdicts: pending for --resume
    evals = store.conn.execute("SELECT candidate_hash, status FROM evaluations").fetchall()
    assert [(h, st) for h, st in evals] == [(calls[0], "passed")]
    props = store.proposals(summary["run"])
    assert len(props) == 3 and sum(p["evaluation_id"] is None for p in props) == 2
    assert store.run(summary["run"])["status"] == "interrupted"
    assert summary["resume"] == f"kerneltune search --resume {summary['run']} --db {store.path}"
    store.close()


# -- an error that is not Ctrl-C -----------------------------------------------------------------------------
def test_an_unexpected_error_leaves_the_run_resumable_and_the_cli_says_how_in_one_line(template_dir, tmp_path,
                                                                                         monkeypatch):
    db = str(tmp_path / "kt.db")

    def boom(self, cand, **kw):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(ev_mod.Evaluator, "evaluate", boom)
    r = CliRunner().invoke(app, ["search", "adamw", "--device", "cpu", "--proposer", "templates", "--candidates",
                                 template_dir, "--shapes", SHAPE, "--budget", "2", "--jobs", "1", "--db", db])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Too many open files" in lines[0], r.stderr
    store = Store(db)
    (run,) = store.runs()
    assert run["status"] == "failed" and "OSError" in run["note"]
    assert f"kerneltune search --resume {run['id']} --db {db}" in lines[0]
    assert store.conn.execute("SELECT COUNT(*) FROM proposals WHERE evaluation_id IS NULL").fetchone()[0] >= 1
    store.close()
    # and --resume takes it (it is not 'done'): here it fails again the same way, still resumable
    r = CliRunner().invoke(app, ["search", "--resume", run["id"], "--db", db])
    assert r.exit_code == 1 and "already done" not in r.stderr and "resume with" in r.stderr


def test_a_time_limit_leaves_the_run_stopped_and_resumable(template_dir, tmp_path, monkeypatch):
    store = Store(str(tmp_path / "kt.db"))
    monkeypatch.setattr(ev_mod.Evaluator, "evaluate", lambda self, cand, **kw: fake_result(cand, shape=SHAPE))
    summary = Search(store, _cfg(template_dir, time_s=0.0, budget=3)).run()
    assert summary["status"] == "stopped" and summary["stop_reason"].startswith("time limit")
    assert summary["resume"] and store.run(summary["run"])["status"] == "stopped"
    store.close()
    # --resume with a new --time goes on, to the budget
    r = CliRunner().invoke(app, ["search", "--resume", summary["run"], "--time", "10m", "--db", store.path, "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["status"] == "done" and again["results"] == 3
    assert json.loads(Store(store.path).run(summary["run"])["options"])["time_s"] == 600


# -- the cache and --timeout ---------------------------------------------------------------------------------
def test_a_timeout_verdict_is_not_reused_under_a_longer_timeout(template_dir, tmp_path, monkeypatch):
    store = Store(str(tmp_path / "kt.db"))
    monkeypatch.setattr(ev_mod.Evaluator, "evaluate", lambda self, cand, **kw: fake_result(cand, "timeout"))
    first = Search(store, _cfg(template_dir, budget=1, jobs=1, timeout=2.0)).run()
    assert first["evaluated"] == 1 and first["by_status"] == {"timeout": 1}
    longer = Search(store, _cfg(template_dir, budget=1, jobs=1, timeout=300.0)).run()
    assert longer["evaluated"] == 1 and longer["cached"] == 0  # "raise --timeout" does something
    stored = json.loads(store.conn.execute("SELECT result FROM evaluations").fetchone()[0])
    assert stored["provenance"]["timeout_s"] == 2.0
    shorter = Search(store, _cfg(template_dir, budget=1, jobs=1, timeout=100.0)).run()
    assert shorter["cached"] == 1 and shorter["evaluated"] == 0  # out of 300 s: out of 100 s too
    # a timeout stored without its limit (kerneltune eval's) is never reused
    store.conn.execute("UPDATE evaluations SET result = json_remove(result, '$.provenance.timeout_s')")
    unknown = Search(store, _cfg(template_dir, budget=1, jobs=1, timeout=1.0)).run()
    assert unknown["evaluated"] == 1 and unknown["cached"] == 0
    store.close()


def test_timeout_must_be_finite_and_positive(tmp_path):
    cli = CliRunner()
    for bad in ("nan", "0", "-1", "inf"):
        r = cli.invoke(app, ["search", "adamw", "--timeout", bad, "--db", str(tmp_path / "kt.db")])
        assert r.exit_code == 2 and "--timeout" in r.stderr, (bad, r.output)
        r = cli.invoke(app, ["eval", str(tmp_path / "x.py"), "--timeout", bad, "--db", str(tmp_path / "kt.db")])
        assert r.exit_code == 2 and "--timeout" in r.stderr, (bad, r.output)


# -- --dtype without --shapes --------------------------------------------------------------------------------
def test_dtype_without_shapes_times_the_default_shapes_in_that_dtype(tmp_path):
    store = Store(str(tmp_path / "kt.db"))
    cfg = SearchConfig(op="attention", device="cpu", proposer="templates", budget=1, dtype="float16",
                       candidate_dirs=[os.path.join(os.path.dirname(__file__), "..", "..", "candidates", "attention")])
    s = Search(store, cfg)
    default = get_op("attention").timed_cases("cpu")
    assert [c.dtype for c in s.evaluator.opt.shapes] == ["float16"] * len(default)
    assert [c.dims for c in s.evaluator.opt.shapes] == [c.dims for c in default]
    assert "float16" in s.shape and "float32" not in s.shape
    store.close()


# -- the summary after --resume ------------------------------------------------------------------------------
def test_a_resumed_run_counts_replayed_results_apart_from_this_sessions(template_dir, tmp_path, monkeypatch):
    store = Store(str(tmp_path / "kt.db"))
    monkeypatch.setattr(ev_mod.Evaluator, "evaluate", lambda self, cand, **kw: fake_result(cand, shape=SHAPE))
    first = Search(store, _cfg(template_dir, budget=2)).run()
    assert first["evaluated"] == 2
    store.set_run_status(first["run"], "interrupted")
    resumed = Search(store, _cfg(template_dir, budget=4), run_id=first["run"])
    resumed.progress.started -= 60  # this session has run a minute when the summary is made
    summary = resumed.run()
    assert summary["results"] == 4 and summary["replayed"] == 2
    assert summary["evaluated"] == 2 and summary["cached"] == 0
    assert summary["evaluations_per_min"] <= 2.0  # 2 evaluations in this session's minute, not 4
    store.close()
