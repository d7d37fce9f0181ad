"""kerneltune promote / registry / explain on recorded evaluations (a store written here, as the evaluator
writes it): the copy with its provenance header, one entry per timed shape, refusals, JSON, exit codes."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

import kerneltune.registry as reg
from kerneltune.cli import app
from kerneltune.evaluate.static import inspect_source, read_candidate
from kerneltune.ops import get_op
from kerneltune.store.db import Store
from tests.library.conftest import SEEDS, TEST_KERNELS

SEED = os.path.join(SEEDS, "adamw", "numba_cpu.py")


def record(db: str, path: str, *, status: str = "passed", device_key: str | None = None, timed: bool = True,
           speedups: tuple[float, ...] = (0.8,), noisy: str | None = None, checked: list[str] | None = None,
           vouched: bool = True) -> str:
    """Store a candidate and one evaluation of it, shaped like the evaluator's result; return its hash.
    ``checked``: the check cases it went through (default: every one the op has now); ``vouched``: its timed
    calls were checked (the evaluator's results since 2026-11-28)."""
    cand = read_candidate(path)
    inspect_source(cand)
    store = Store(db)
    store.add_candidate(hash=cand.hash, op=cand.op, backend=cand.backend, name=cand.name, source=cand.source,
                        path=path, summary=cand.summary, params=cand.meta.get("params"), origin="seed", parent=None)
    cases = []
    for i, sp in enumerate(speedups if (timed and status == "passed") else ()):
        shapes = [[64, 32], [32]] if i == 0 else [[4096, 1024]] * 8
        cases.append({"case": {"name": f"case{i}", "dims": {"shapes": shapes}, "dtype": "float32", "args": {}},
                      "name": f"case{i}", "median_ms": 2.0 / sp, "p20_ms": 1.9 / sp, "p80_ms": 2.1 / sp, "speedup": sp,
                      "baselines": {"adamw_fused": {"median_ms": 2.0}}, "vouched": vouched,
                      **({"noisy": noisy} if noisy else {})})
    key = device_key or reg.device_key("cpu")
    store.add_evaluation({
        "hash": cand.hash, "op": cand.op, "status": status, "reason": "" if status == "passed" else "params[0]: wrong",
        "stage": "time", "median_ms": cases[0]["median_ms"] if cases else None, "p20_ms": None, "p80_ms": None,
        "speedup": cases[0]["speedup"] if cases else None, "baseline": "adamw_fused" if cases else None,
        "shape": cases[0]["name"] if cases else None, "dtype": "float32", "cases": cases, "noisy": noisy,
        "checks": {"cases": [c.name for c in get_op(cand.op).check_cases("cpu")] if checked is None else checked,
                   "seeds": 3, "dtypes_not_checked": []},
        "provenance": {"device": {"key": key, "name": "Test CPU"}, "versions": {"torch": "2.x", "kerneltune": "0.1.0"},
                       "threads": 2, "timestamp": "2026-01-01T00:00:00Z", "timing": {"clock": "perf_counter"}}})
    store.close()
    return cand.hash


@pytest.fixture
def cli():
    runner = CliRunner()

    def _run(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return _run


def test_promote_copies_with_provenance_and_adds_one_entry_per_timed_shape(cli, tmp_path):
    db, registry = str(tmp_path / "kt.db"), str(tmp_path / "reg" / "registry.json")
    h = record(db, SEED, speedups=(0.8, 1.7))
    r = cli("promote", SEED, "--registry", registry, "--db", db, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    copy = tmp_path / "reg" / "candidates" / "adamw" / "numba_cpu.py"
    assert res["copied"] and res["file"] == str(copy) and len(res["added"]) == 2
    text = copy.read_text()
    assert text.startswith(reg.HEADER_START) and h in text.split(reg.HEADER_END)[0]
    assert reg.strip_header(text) == open(SEED).read()
    entries = reg.load(registry).entries
    assert {e.bucket for e in entries} == {"P4096", "P33554432"}
    for e in entries:
        assert e.source_hash == h and e.candidate == "adamw/numba_cpu.py" and reg.check_file(e) == ""
        assert e.device_key == reg.device_key("cpu") and e.baseline == "adamw_fused" and e.backend == "numba"
        assert e.provenance["evaluation"] and e.versions["torch"] == "2.x" and e.params == {"PARALLEL_MIN": 65536}
    # promoting again: the same file is found and reused, entries replaced in place
    r = cli("promote", h[:10], "--registry", registry, "--db", db, "--json")
    assert r.exit_code == 0 and not json.loads(r.stdout)["copied"]
    assert len(reg.load(registry).entries) == 2
    assert os.listdir(tmp_path / "reg" / "candidates" / "adamw") == ["numba_cpu.py"]


def test_registry_and_explain_report_what_serves(cli, tmp_path, monkeypatch):
    db, registry = str(tmp_path / "kt.db"), str(tmp_path / "registry.json")
    record(db, SEED, speedups=(0.8, 1.7))
    assert cli("promote", "numba_cpu", "--registry", registry, "--db", db).exit_code == 0
    r = cli("registry", "--registry", registry, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["entries"]
    assert sorted(x["status"] for x in rows) == ["below minimum", "serves"]
    r = cli("explain", "adamw", "--shape", "4096x1024;4096x1024", "--registry", registry, "--json")
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["kernel"] == "numba_cpu" and info["kind"] == "nearest", info
    r = cli("explain", "adamw", "--shape", "64x32;32", "--registry", registry, "--json")
    info = json.loads(r.stdout)
    assert info["kernel"] == "reference" and "below the minimum" in info["reason"]
    monkeypatch.setenv(reg.ENV_MIN_SPEEDUP, "0.5")
    info = json.loads(cli("explain", "adamw", "--shape", "64x32;32", "--registry", registry, "--json").stdout)
    assert info["kernel"] == "numba_cpu" and info["kind"] == "exact"
    r = cli("explain", "attention", "--shape", "2,8,512,64", "--registry", registry)
    assert r.exit_code == 0 and "no registry entry for attention" in r.stdout
    # a missing candidate file: registry exits 1 and says so
    os.remove(tmp_path / "candidates" / "adamw" / "numba_cpu.py")
    r = cli("registry", "--registry", registry, "--json")
    assert r.exit_code == 1 and {x["status"] for x in json.loads(r.stdout)["entries"]} == {"file missing"}


def test_explain_attention_says_what_a_differentiated_call_gets(cli, user_registry):
    """kerneltune.attention serves a call autograd records only with a backward kernel: explain says so."""
    fwd = ("attention/numba_cpu.py", dict(op="attention", dims={"B": 2, "H": 3, "N": 17, "D": 48},
                                          args={"causal": True}))
    bwd = (os.path.join(TEST_KERNELS, "attention_backward", "torch_math.py"),
           dict(op="attention_backward", dims={"B": 2, "H": 3, "N": 17, "D": 48}, args={"causal": True},
                backend="torch"))
    path = user_registry([fwd], env=False)
    r = cli("explain", "attention", "--shape", "2,3,17,48,causal", "--registry", path, "--json")
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["kernel"] == "numba_cpu"
    assert info["differentiated"]["forward"] == "reference" and info["differentiated"]["backward"] == "reference"
    assert "SDPA both ways" in cli("explain", "attention", "--shape", "2,3,17,48,causal", "--registry", path).stdout
    path = user_registry([fwd, bwd], env=False)
    info = json.loads(cli("explain", "attention", "--shape", "2,3,17,48,causal", "--registry", path, "--json").stdout)
    assert info["differentiated"] == {"forward": "numba_cpu", "backward": "torch_math",
                                      "reason": info["differentiated"]["reason"]}
    assert "forward numba_cpu, backward torch_math" in cli("explain", "attention", "--shape", "2,3,17,48,causal",
                                                           "--registry", path).stdout
    path = user_registry([bwd], env=False)  # a backward kernel alone: the forward is SDPA's, the backward its
    r = cli("explain", "attention", "--shape", "2,3,17,48,causal", "--registry", path)
    assert "reference" in r.stdout and "forward reference, backward torch_math" in r.stdout, r.stdout


def test_promote_refuses_what_did_not_pass_here(cli, tmp_path):
    db, registry = str(tmp_path / "kt.db"), str(tmp_path / "registry.json")
    record(db, SEED, status="incorrect")
    r = cli("promote", SEED, "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "has not passed on cpu:" in r.output and "incorrect" in r.output
    record(db, SEED, device_key="cpu:another-machine:8t")
    r = cli("promote", SEED, "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "it passed on cpu:another-machine:8t" in r.output
    r = cli("promote", SEED, "--registry", registry, "--db", db, "--device-key", "cpu:another-machine:8t", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["added"][0]["device_key"] == "cpu:another-machine:8t"
    assert not os.path.exists(tmp_path / "x.json")


def test_promote_refuses_a_pass_from_older_checks_or_one_a_later_verdict_contradicts(cli, tmp_path):
    db, registry = str(tmp_path / "kt.db"), str(tmp_path / "registry.json")
    everything = [c.name for c in get_op("adamw").check_cases("cpu")]
    record(db, SEED, checked=everything[:-1])          # evaluated before the op gained its last check case
    r = cli("promote", SEED, "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "passed before the adamw checks gained 1 case(s)" in r.output
    assert everything[-1] in r.output and "evaluate it again" in r.output and not os.path.exists(registry)
    board = cli("leaderboard", "adamw", "--device", "cpu", "--db", db, "--json")
    assert [b["checks_current"] for b in json.loads(board.stdout)["leaderboard"]] == [False]
    assert "(older checks)" in cli("leaderboard", "adamw", "--device", "cpu", "--db", db).stdout
    record(db, SEED, vouched=False)                    # timed before the timed calls were checked
    r = cli("promote", SEED, "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "gained 1 case(s) (the timed calls' check)" in r.output, r.output
    record(db, SEED)                                   # evaluated again: today's checks
    board = cli("leaderboard", "adamw", "--device", "cpu", "--db", db, "--json")
    assert [b["checks_current"] for b in json.loads(board.stdout)["leaderboard"]] == [True]
    record(db, SEED, status="incorrect")               # ... and then found wrong
    r = cli("promote", SEED, "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "its latest verdict on cpu:" in r.output and "is incorrect" in r.output
    record(db, SEED, speedups=(1.2,))
    record(db, SEED, status="crashed")                 # a later crash counts as the leaderboard counts it
    r = cli("promote", SEED, "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "is crashed" in r.output and not os.path.exists(registry), r.output
    assert json.loads(cli("leaderboard", "adamw", "--device", "cpu", "--db", db, "--json").stdout)["leaderboard"] == []
    record(db, SEED, speedups=(1.3,))                  # evaluated once more: the latest verdict a pass again
    r = cli("promote", SEED, "--registry", registry, "--db", db, "--json")
    assert r.exit_code == 0 and [a["speedup"] for a in json.loads(r.stdout)["added"]] == [1.3]


def test_promote_refuses_untimed_unknown_and_bad_usage(cli, tmp_path):
    db, registry = str(tmp_path / "kt.db"), str(tmp_path / "registry.json")
    record(db, SEED, timed=False)
    r = cli("promote", SEED, "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "never timed" in r.output
    assert not os.path.exists(registry) and not os.path.exists(tmp_path / "candidates")
    r = cli("promote", str(os.path.join(SEEDS, "attention", "numba_cpu.py")), "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "never been evaluated" in r.output
    assert cli("promote", "nosuchname", "--registry", registry, "--db", db).exit_code == 2
    assert cli("promote", SEED, "--device", "tpu", "--db", db).exit_code == 2
    assert cli("explain", "attention", "--shape", "2,8", "--registry", registry).exit_code == 2
    assert cli("explain", "nosuchop", "--shape", "2,8,512,64").exit_code == 2


def test_a_noisy_timing_is_neither_promoted_nor_ranked(cli, tmp_path):
    """A ratio the evaluator marked noisy (timed twice on a busy machine) does not reach the registry or the
    leaderboard; a later quiet timing of the same candidate does."""
    db, registry = str(tmp_path / "kt.db"), str(tmp_path / "registry.json")
    h = record(db, SEED, speedups=(1.64,), noisy="the baseline's own calls varied 12.1x [case0, timed twice]")
    r = cli("promote", SEED, "--registry", registry, "--db", db)
    assert r.exit_code == 1 and "too busy to trust" in r.output and not os.path.exists(registry)
    r = cli("leaderboard", "adamw", "--device", "cpu", "--db", db, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["leaderboard"] == []
    record(db, SEED, speedups=(0.9,))
    board = json.loads(cli("leaderboard", "adamw", "--device", "cpu", "--db", db, "--json").stdout)["leaderboard"]
    assert [b["speedup"] for b in board] == [0.9]
    record(db, SEED, speedups=(1.7,), noisy="other processes kept 60% of the CPUs busy [case0, timed twice]")
    board = json.loads(cli("leaderboard", "adamw", "--device", "cpu", "--db", db, "--json").stdout)["leaderboard"]
    assert [b["speedup"] for b in board] == [0.9]  # a later noisy timing neither ranks nor hides the quiet one
    r = cli("promote", SEED, "--registry", registry, "--db", db, "--json")
    assert r.exit_code == 0 and [a["speedup"] for a in json.loads(r.stdout)["added"]] == [0.9]
    # `show` lists all three, the noisy ones marked
    shown = json.loads(cli("show", h, "--db", db, "--json").stdout)["evaluations"]
    assert [(e["speedup"], bool(e["noisy"])) for e in shown] == [(1.64, True), (0.9, False), (1.7, True)]
    assert "other processes kept 60%" in shown[2]["noisy"]
    text = cli("show", h, "--db", db).stdout
    assert text.count("(noisy)") == 2 and "1.640×" in text


def test_promote_keeps_a_faster_entry_unless_forced(cli, tmp_path):
    db, registry = str(tmp_path / "kt.db"), str(tmp_path / "registry.json")
    record(db, SEED, speedups=(2.0,))
    assert cli("promote", SEED, "--registry", registry, "--db", db).exit_code == 0
    other = tmp_path / "numba_other.py"
    other.write_text(open(SEED).read().replace("one fused, parallel pass", "one fused parallel pass"))
    record(db, str(other), speedups=(1.5,))
    r = cli("promote", str(other), "--registry", registry, "--db", db, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["kept"][0]["kept"] == "numba_cpu"
    assert not (tmp_path / "candidates" / "adamw" / "numba_other.py").exists()
    r = cli("promote", str(other), "--registry", registry, "--db", db, "--force", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["added"][0]["replaced"] == "numba_cpu"
    assert [e.name for e in reg.load(registry).entries] == ["numba_other"]


def test_explain_names_the_served_files_optional_entry_points(cli, user_registry):
    """explain says which of the op's optional entry points the served file defines (read, never imported):
    run_unchecked for adamw (the optimizer's checked steps), run_with_lse for attention (training's forward)."""
    tiny = dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0)
    path = user_registry([(os.path.join(TEST_KERNELS, "adamw", "torch_unchecked.py"), {**tiny, "backend": "torch"})],
                         env=False)
    info = json.loads(cli("explain", "adamw", "--shape", "4", "--registry", path, "--json").stdout)
    assert info["kernel"] == "torch_unchecked" and info["entry_points"] == ["run", "run_unchecked"]
    assert "entry points: run, run_unchecked (kerneltune.optim's" in cli("explain", "adamw", "--shape", "4",
                                                                          "--registry", path).stdout
    path = user_registry([("adamw/numba_cpu.py", tiny)], env=False)
    info = json.loads(cli("explain", "adamw", "--shape", "4", "--registry", path, "--json").stdout)
    assert info["entry_points"] == ["run"]
    assert "entry points: run only (no run_unchecked)" in cli("explain", "adamw", "--shape", "4",
                                                              "--registry", path).stdout
    lse = (os.path.join(TEST_KERNELS, "attention", "torch_lse.py"),
           dict(op="attention", dims={"B": 2, "H": 3, "N": 17, "D": 48}, args={"causal": True}, backend="torch"))
    path = user_registry([lse], env=False)
    info = json.loads(cli("explain", "attention", "--shape", "2,3,17,48,causal", "--registry", path, "--json").stdout)
    assert info["entry_points"] == ["run", "run_with_lse"] and info["entry_points_unused"] == ["run_with_lse"]
    assert "unused here: no backward kernel" in cli("explain", "attention", "--shape", "2,3,17,48,causal",
                                                    "--registry", path).stdout
    bwd = (os.path.join(TEST_KERNELS, "attention_backward", "torch_math.py"),
           dict(op="attention_backward", dims={"B": 2, "H": 3, "N": 17, "D": 48}, args={"causal": True},
                backend="torch"))
    path = user_registry([lse, bwd], env=False)  # a backward kernel serves: the lse is handed over
    info = json.loads(cli("explain", "attention", "--shape", "2,3,17,48,causal", "--registry", path, "--json").stdout)
    assert info["entry_points"] == ["run", "run_with_lse"] and "entry_points_unused" not in info
    info = json.loads(cli("explain", "attention", "--shape", "2,3,17,64,causal", "--json").stdout)  # nothing serves
    assert info["kernel"] == "reference" and "entry_points" not in info


def test_explain_reads_entry_points_as_the_library_finds_them(tmp_path):
    """_defined (explain's reading of a file) against ops.base.companion (the library's lookup in run's module) on
    files that bind the name in other ways: imported, annotated, in a tuple, inside if/try, a latin-1 file; a name
    bound to a constant is not an entry point for either."""
    import sys

    from kerneltune.cli_registry import _defined
    from kerneltune.ops.base import companion
    from tests.interp import load_file

    (tmp_path / "kt_helpers_mod.py").write_text("def run_unchecked(*a, **k):\n    pass\n")
    bodies = {
        "imported": "from kt_helpers_mod import run_unchecked\n",
        "annotated": "from typing import Callable\ndef _u(*a, **k):\n    pass\nrun_unchecked: Callable = _u\n",
        "tuple": "def _u(*a, **k):\n    pass\nrun_unchecked, other = _u, 1\n",
        "in_try": "try:\n    def run_unchecked(*a, **k):\n        pass\nexcept ImportError:\n    pass\n",
        "in_if": "import os\nif os.sep:\n    def run_unchecked(*a, **k):\n        pass\n",
        "constant": "run_unchecked = None\n",
        "absent": "",
    }
    sys.path.insert(0, str(tmp_path))
    try:
        for name, body in bodies.items():
            path = tmp_path / f"cand_{name}.py"
            path.write_text(body + "def run(*a, **k):\n    pass\n")
            found = companion(load_file(str(path), f"kt_cand_{name}").run, "run_unchecked") is not None
            assert (_defined(str(path), {"run_unchecked": ""}) == ["run_unchecked"]) == found, name
            assert found == (name not in ("constant", "absent")), name
        latin = tmp_path / "cand_latin.py"
        latin.write_bytes("# -*- coding: latin-1 -*-\n# caf\xe9\ndef run_unchecked(*a, **k):\n    pass\n"
                          "def run(*a, **k):\n    pass\n".encode("latin-1"))
        assert _defined(str(latin), {"run_unchecked": ""}) == ["run_unchecked"]
    finally:
        sys.path.remove(str(tmp_path))


def test_promote_into_a_registry_with_its_own_candidates_root_keeps_it_and_stays_relative(cli, tmp_path):
    """A registry that declares "candidates_root": promote copies under it and writes it back, with the entry's
    candidate relative to it, so the folder can move (it used to lose the key and write absolute paths)."""
    import shutil

    db, folder = str(tmp_path / "kt.db"), tmp_path / "reg"
    folder.mkdir()
    (folder / "registry.json").write_text(json.dumps({"format": 1, "candidates_root": "kernels", "entries": []}))
    record(db, SEED)
    r = cli("promote", SEED, "--registry", str(folder / "registry.json"), "--db", db, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["file"] == str(folder / "kernels" / "adamw" / "numba_cpu.py")
    doc = json.loads((folder / "registry.json").read_text())
    assert doc["candidates_root"] == "kernels" and [e["candidate"] for e in doc["entries"]] == ["adamw/numba_cpu.py"]
    shutil.move(str(folder), str(tmp_path / "moved"))
    back = reg.load(str(tmp_path / "moved" / "registry.json"))
    assert [reg.check_file(e) for e in back.entries] == [""]


def test_registry_checks_the_files_of_other_devices_entries_too(tmp_path):
    """The CI check (exit 1 on a missing or changed file) must catch an edited kernel that serves only on a GPU
    the CI machine lacks: the shipped registry's H100 entries, read on a CPU."""
    shipped = os.path.join(os.path.dirname(os.path.abspath(reg.__file__)), "registry.json")  # (conftest hides it)
    with open(shipped) as f:
        doc = json.load(f)
    gpu = [e for e in doc["entries"] if e["device_key"].startswith("cuda:")]
    if not gpu:
        pytest.skip("the shipped registry holds no GPU entry")
    root = tmp_path / "candidates"
    for e in gpu:
        os.makedirs(root / os.path.dirname(e["candidate"]), exist_ok=True)
        with open(os.path.join(os.path.dirname(shipped), "..", "candidates", e["candidate"])) as src:
            (root / e["candidate"]).write_text(src.read())
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({**doc, "entries": gpu, "candidates_root": "candidates"}))
    run = CliRunner().invoke
    r = run(app, ["registry", "--registry", str(path), "--json"])
    assert r.exit_code == 0 and {x["status"] for x in json.loads(r.stdout)["entries"]} == {"other device"}, r.output
    with open(root / gpu[0]["candidate"], "a") as f:
        f.write("\n# edited\n")
    r = run(app, ["registry", "--registry", str(path), "--json"])
    assert r.exit_code == 1 and "file changed" in {x["status"] for x in json.loads(r.stdout)["entries"]}, r.output
    os.remove(root / gpu[0]["candidate"])
    r = run(app, ["registry", "--registry", str(path), "--json"])
    assert r.exit_code == 1 and "file missing" in {x["status"] for x in json.loads(r.stdout)["entries"]}, r.output
