"""benchmarks/gpu/sharded_pytest.py: a selection dealt to pytest processes run at once, failures and a
timeout reported as such (the GPU call runs the tests marked gpu through it)."""

from __future__ import annotations

import json
import os

from tests.interp import load_file


def _suite(tmp_path, monkeypatch, body: str) -> str:
    """A test file in a folder of its own, the working directory (the script runs from pytest's rootdir)."""
    d = tmp_path / "suite"
    d.mkdir()
    (d / "test_things.py").write_text(body)
    monkeypatch.chdir(d)
    return "test_things.py"


def test_every_test_runs_once_across_the_shards_and_a_failure_is_exit_1(tmp_path, monkeypatch, capsys):
    script = load_file("benchmarks/gpu/sharded_pytest.py", "sharded_pytest")
    suite = _suite(tmp_path, monkeypatch, "import pytest, os\n"
                             "@pytest.mark.parametrize('i', range(7))\n"
                             "def test_ok(i):\n    open(os.environ['MARKS'] + f'/{i}', 'x').close()\n"
                             "def test_bad():\n    assert 1 == 2\n"
                             "def test_left_out():\n    raise SystemExit('must not run')\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("MARKS", str(marks))
    rc = script.main(["--shards", "3", "--timeout", "120", "--logs", str(tmp_path / "logs"),
                      "--json", str(tmp_path / "out.json"), "--", suite, "-k", "not left_out"])
    assert rc == 1
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["collected"] == 8 and len(out["shards"]) == 3
    assert sorted(os.listdir(marks)) == [str(i) for i in range(7)]  # each case once (a second run would raise)
    assert out["totals"] == {"passed": 7, "failed": 1, "error": 0, "skipped": 0}
    assert sorted(r["tests"] for r in out["shards"]) == [2, 3, 3]
    assert "1 failed" in capsys.readouterr().out


def test_a_shard_past_the_timeout_is_stopped_and_the_run_is_exit_2(tmp_path, monkeypatch, capsys):
    script = load_file("benchmarks/gpu/sharded_pytest.py", "sharded_pytest")
    suite = _suite(tmp_path, monkeypatch, "import time\n"
                             "def test_quick():\n    pass\n"
                             "def test_slow():\n    time.sleep(60)\n")
    rc = script.main(["--shards", "2", "--timeout", "8", "--logs", str(tmp_path / "logs"), "--", suite])
    assert rc == 2
    text = capsys.readouterr().out
    assert "stopped at the timeout" in text and "1 shards stopped" in text and "1 passed" in text


def test_a_shard_that_cannot_find_its_tests_is_a_failure(tmp_path, monkeypatch, capsys):
    """Run from elsewhere than the rootdir, the shards' ids name nothing: exit 1, never a silent pass."""
    script = load_file("benchmarks/gpu/sharded_pytest.py", "sharded_pytest")
    suite = _suite(tmp_path, monkeypatch, "def test_a():\n    pass\n")
    ids, options = script.collect([suite])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(script, "collect", lambda args: (ids, options))
    assert script.main(["--shards", "1", "--logs", str(tmp_path / "logs"), "--", suite]) == 1


def test_nothing_collected_is_exit_2_and_bad_shards_a_clear_error(tmp_path, monkeypatch, capsys):
    script = load_file("benchmarks/gpu/sharded_pytest.py", "sharded_pytest")
    suite = _suite(tmp_path, monkeypatch, "def test_a():\n    pass\n")
    assert script.main(["--logs", str(tmp_path / "logs"), "--", suite, "-k", "nothing_matches"]) == 2
    assert script.main(["--shards", "0", "--", suite]) == 2
    assert "--shards must be at least 1" in capsys.readouterr().err


_SLOW = ("import pytest\n"
         "@pytest.mark.slow\n"
         "def test_slow_fails():\n    assert False, 'ran, and failed'\n"
         "@pytest.mark.slow\n"
         "def test_slow_fails_too():\n    assert False, 'ran, and failed'\n")
_ADDOPTS = ('[tool.pytest.ini_options]\nmarkers = ["slow: slow"]\n'
            'addopts = "-m \'not slow\'"\n')   # the project's default deselects what the selection asks for


def test_every_shard_gets_the_selections_options(tmp_path, monkeypatch, capsys):
    """`-- -m slow FILE` with addopts `-m 'not slow'`: a shard run with the ids alone deselected them (exit 5,
    taken as a pass); with the selection's options the slow tests run, and fail."""
    script = load_file("benchmarks/gpu/sharded_pytest.py", "sharded_pytest")
    suite = _suite(tmp_path, monkeypatch, _SLOW)
    (tmp_path / "suite" / "pyproject.toml").write_text(_ADDOPTS)
    rc = script.main(["--shards", "2", "--logs", str(tmp_path / "logs"), "--json", str(tmp_path / "out.json"),
                      "--", "-m", "slow", suite])
    assert rc == 1
    assert json.loads((tmp_path / "out.json").read_text())["totals"]["failed"] == 2
    # pytest's own parser tells the options (and their values) from the paths
    ids, options = script.collect(["-m", "slow", suite, "-k", "fails"])
    assert len(ids) == 2 and options == ["-m", "slow", "-k", "fails"]


def test_a_shard_that_runs_fewer_tests_than_it_was_dealt_is_a_failure(tmp_path, monkeypatch, capsys):
    """Exit 5 (no tests ran) for a shard given ids, or fewer run than dealt, is never a pass."""
    script = load_file("benchmarks/gpu/sharded_pytest.py", "sharded_pytest")
    suite = _suite(tmp_path, monkeypatch, _SLOW + "def test_plain():\n    pass\n")
    (tmp_path / "suite" / "pyproject.toml").write_text(_ADDOPTS)
    ids = script.collect(["-m", "slow or not slow", suite])[0]
    assert len(ids) == 3
    monkeypatch.setattr(script, "collect", lambda args: (ids[:2], []))  # the slow ones, their option lost
    assert script.main(["--shards", "2", "--logs", str(tmp_path / "logs"), "--", suite]) == 1
    assert "(only 0 of them ran)" in capsys.readouterr().out
    monkeypatch.setattr(script, "collect", lambda args: (ids[1:], []))  # one slow, one plain: 1 of 2 runs
    assert script.main(["--shards", "1", "--logs", str(tmp_path / "logs"), "--", suite]) == 1
    out = capsys.readouterr().out
    assert "2 tests (only 1 of them ran), 1 passed" in out
