"""The search end to end on a small template and shape: stored as it goes, resumable after kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

from typer.testing import CliRunner

from kerneltune.cli import app
from kerneltune.ops import get_op
from kerneltune.search.runner import Search, SearchConfig
from kerneltune.store import Store


def test_search_stores_everything_and_never_repeats(template_dir, tmp_path, monkeypatch):
    store = Store(str(tmp_path / "kt.db"))
    cfg = SearchConfig(op="adamw", device="cpu", strategy="random", budget=4, jobs=2, candidate_dirs=[template_dir],
                       shapes=["gpt-tiny"], timeout=120)
    summary = Search(store, cfg).run()
    assert summary["status"] == "done" and summary["results"] == 4 and summary["evaluated"] == 4
    assert summary["best"]["speedup"] > 0
    run = summary["run"]
    props = store.proposals(run)
    assert len(props) == 4 and all(p["evaluation_id"] for p in props)
    assert len({p["candidate_hash"] for p in props}) == 4
    # a second run with the same seed proposes the same points: all answered from the store, none evaluated
    again = Search(store, cfg).run()
    assert again["cached"] == 4 and again["evaluated"] == 0
    n_evals = store.count("evaluations")
    assert n_evals == 4
    # the op gains a check case: a stored pass did not go through it, so it is checked (and timed) again
    spec = get_op("adamw")
    plain = type(spec).check_cases
    extra = spec.parse_case("3x5;7", "float32")
    monkeypatch.setattr(type(spec), "check_cases", lambda self, device: plain(self, device) + [extra])
    third = Search(store, SearchConfig(**{**cfg.__dict__, "budget": 2})).run()
    assert third["cached"] == 0 and third["evaluated"] == 2
    newest = json.loads(store.conn.execute("SELECT result FROM evaluations ORDER BY id DESC").fetchone()[0])
    assert extra.name in newest["checks"]["cases"]
    store.close()


def _kt(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "kerneltune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def test_kill_9_then_resume_loses_nothing_and_repeats_nothing(template_dir, tmp_path):
    db = str(tmp_path / "kt.db")
    args = ["search", "adamw", "--device", "cpu", "--candidates", template_dir, "--shapes", "gpt-tiny",
            "--budget", "4", "--jobs", "1", "--strategy", "grid", "--db", db, "--json"]
    tmp = tmp_path / "tmp"  # the workers' folders, where this test can see what a kill -9 leaves behind
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = _kt(args, env=env)
    deadline = time.monotonic() + 240
    done = 0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if os.path.exists(db):
            try:
                done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
            except sqlite3.OperationalError:
                continue
            if done >= 2:
                break
        assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # its workers die with it (they follow their parent), their folders stay
    leaked = [n for n in os.listdir(tmp) if n.startswith("kerneltune-") and f"-{proc.pid}-" in n]
    assert leaked, os.listdir(tmp)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finished_before = con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    assert finished_before >= 2
    run_id, status = con.execute("SELECT id, status FROM runs").fetchone()
    assert status == "running"  # killed: it never got to say otherwise
    con.close()
    r = subprocess.run([sys.executable, "-m", "kerneltune.cli", "search", "--resume", run_id, "--db", db, "--json"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert not [n for n in os.listdir(tmp) if n.startswith("kerneltune-")], os.listdir(tmp)  # swept, and its own removed
    summary = json.loads(r.stdout)
    assert summary["status"] == "done" and summary["results"] == 4
    con = sqlite3.connect(db)
    rows = con.execute("SELECT candidate_hash FROM evaluations").fetchall()
    assert len(rows) == 4 and len({h for (h,) in rows}) == 4  # every finished one kept, none twice
    assert con.execute("SELECT COUNT(*) FROM proposals WHERE evaluation_id IS NULL").fetchone()[0] == 0
    assert con.execute("SELECT status FROM runs").fetchone()[0] == "done"
    # the leaderboard and show read it back (in this process: the store is what is under test, not a start-up)
    cli = CliRunner()

    def read(*argv):
        r = cli.invoke(app, [*argv, "--db", db, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    board = read("leaderboard", "adamw")
    statuses = con.execute("SELECT status, reason FROM evaluations").fetchall()
    assert len(board["leaderboard"]) == 4, statuses
    best = board["leaderboard"][0]
    shown = read("show", best["hash"][:12])
    assert shown["hash"] == best["hash"] and "def run(" in shown["source"] and shown["evaluations"]
    runs = read("runs")
    assert runs[0]["finished"] == 4 and runs[0]["status"] == "done"


def test_a_failing_primary_baseline_stops_the_search_with_one_line_and_nothing_lost(template_dir, tmp_path,
                                                                                      monkeypatch):
    """No speedup can be measured when the primary baseline fails: the search stops (status failed, the reason
    as its stop reason), stores no verdict for the candidates it could not time, and can be resumed."""
    import kerneltune.evaluate.evaluator as ev_mod

    def broken(self, worker, spec, case, *a, **kw):
        raise ev_mod.BaselineError(f"the primary baseline {spec.primary_baseline} failed on {case.name} (test)")

    monkeypatch.setattr(ev_mod.Evaluator, "_time_case", broken)
    store = Store(str(tmp_path / "kt.db"))
    cfg = SearchConfig(op="adamw", device="cpu", strategy="random", budget=3, jobs=1, candidate_dirs=[template_dir],
                       shapes=["gpt-tiny"], timeout=120)
    summary = Search(store, cfg).run()
    assert summary["status"] == "failed" and "primary baseline adamw_fused failed" in summary["stop_reason"]
    assert summary["results"] == 0 and store.count("evaluations") == 0
    assert summary["resume"] and store.proposals(summary["run"])  # proposed, stored, waiting for --resume
    store.close()


def test_a_noisy_timing_is_shown_but_never_ranked():
    """A pass whose timing the evaluator marked noisy (timed twice on a busy machine) is counted and shown with
    its ratio, but stays off the board, so it can never be the search's best."""
    from kerneltune.search.runner import Progress

    p = Progress(run_id="r", op="adamw", device="cpu", budget=3)

    def result(name, speedup, noisy=None):
        return {"name": name, "hash": name * 8, "status": "passed", "speedup": speedup, "median_ms": 1.0,
                "p20_ms": 0.9, "p80_ms": 1.1, "noisy": noisy}

    p.record(result("steady", 0.95), cached=False)
    p.record(result("stalled", 1.64, noisy="the baseline's own calls varied 12.1x [gpt-mini, timed twice]"), False)
    assert p.best["name"] == "steady" and [r["name"] for r in p.board] == ["steady"]
    assert p.noisy == 1 and p.by_status == {"passed": 2}
    assert "1.64×" in p.last and "not ranked" in p.last


def test_a_proposer_never_takes_a_noisy_ratio_for_fitness():
    """Live or replayed on resume, a noisy pass reaches the proposer without a speedup or timings."""
    from kerneltune.propose.templates import fitness
    from kerneltune.search.runner import _as_fitness

    noisy = {"status": "passed", "speedup": 1.64, "median_ms": 52.8, "cases": [{"speedup": 1.64}],
             "noisy": "the baseline's own calls varied 12.1x [gpt-mini, timed twice]"}
    quiet = {**noisy, "noisy": None, "speedup": 0.95}
    assert fitness(_as_fitness(noisy)) is None and _as_fitness(noisy)["cases"] == []
    assert _as_fitness(quiet) is quiet and fitness(_as_fitness(quiet)) == 0.95
