"""benchmarks/optim_step.py on the CPU: both optimizers stepped side by side, and the host time inside the
served kernel's calls reported apart from the optimizer's own (what the GPU runs read to see where a tuned
step's host time goes)."""

from __future__ import annotations

import json

import pytest

import kerneltune.optim as ko
from tests.interp import load_file


def _run(capsys, *extra):
    script = load_file("benchmarks/optim_step.py", "optim_step")
    assert script.main(["--device", "cpu", "--preset", "smoke", "--steps", "3", "--rounds", "2", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_served_kernels_host_time_is_part_of_the_steps_and_reported_apart(user_registry, monkeypatch, capsys):
    pytest.importorskip("numba")
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    impl = ko._adamw_impl
    out = _run(capsys)
    assert ko._adamw_impl is impl  # put back
    k = out["results"]["kerneltune.optim.AdamW"]
    assert out["served"] == {"numba_cpu": 2 * 2 * 3}  # 2 groups a step, 2 rounds of 3 steps (no device-time rounds on a CPU)
    assert 0 < k["kernel_host_ms"] < k["host_ms"]
    assert set(out["results"]["torch.optim.AdamW"]) == {"step_ms", "host_ms"}  # no device time on a CPU


def test_with_nothing_served_no_host_time_is_the_kernels(monkeypatch, capsys):
    monkeypatch.setenv("KERNELTUNE_DISABLE", "1")
    out = _run(capsys)
    assert out["served"] == {"reference": 2 * 3}  # torch's one step a call
    assert out["results"]["kerneltune.optim.AdamW"]["kernel_host_ms"] == 0.0


def test_profile_lists_where_the_host_time_of_a_step_goes(monkeypatch, capsys):
    monkeypatch.setenv("KERNELTUNE_DISABLE", "1")
    out = _run(capsys, "--profile", "2")
    rows = out["profile"]
    assert 0 < len(rows) <= 25
    assert [r["own_us"] for r in rows] == sorted((r["own_us"] for r in rows), reverse=True)
    assert all(r["function"] for r in rows)
    assert all(r["cum_us"] >= r["own_us"] >= 0 and r["calls"] > 0 for r in rows)


def test_optim_host_times_this_optimizer_against_another_revision_with_a_noop_kernel(tmp_path, capsys):
    """benchmarks/optim_host.py: every call served by the no-op kernel (both optimizers, every round and
    timing), serving put back afterwards, and a missing --against file a one-line error."""
    import torch

    from kerneltune.library import serve
    from kerneltune.train.model import GPT
    from kerneltune.train.presets import PRESETS

    script = load_file("benchmarks/optim_host.py", "optim_host")
    choose, add = serve.choose, torch._foreach_add_
    other = tmp_path / "optim.py"
    other.write_text(open(ko.__file__).read())
    assert script.main(["--preset", "smoke", "--rounds", "2", "--steps", "2", "--against", str(other),
                        "--no-count-adds", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert serve.choose is choose and torch._foreach_add_ is add  # put back
    assert out["served"] == {"no-op": 2 * 2 * 2 * 3 * 2}  # 2 optimizers, 2 rounds, 3 timings of 2 steps, 2 groups
    assert set(out["host_us"]) == {"this", "against"}
    assert all(0 < r["min"] <= r["median"] for r in out["host_us"].values())
    assert out["ratio"] > 0 and out["tensors"] == len(list(GPT(PRESETS["smoke"].model).parameters()))
    assert script.main(["--preset", "smoke", "--against", str(tmp_path / "none.py")]) == 2
    assert "no such file" in capsys.readouterr().err
