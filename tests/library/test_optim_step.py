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


def test_optim_host_serves_a_templates_run_without_its_launch_beside_torchs_fused_step(capsys):
    """optim_host.py --template --torch: the template's own run() serves every call (its checks, addresses and
    table) with its kernel launch a no-op, torch's fused AdamW steps in the same rounds with its kernel a no-op;
    nothing is computed, and torch's kernel and serving are put back."""
    import pytest
    import torch

    from kerneltune.library import serve

    pytest.importorskip("triton")
    script = load_file("benchmarks/optim_host.py", "optim_host")
    choose, fused = serve.choose, torch._fused_adamw_
    assert script.main(["--preset", "smoke", "--rounds", "2", "--steps", "2", "--torch", "--no-count-adds",
                        "--template", "candidates/adamw/triton_mt_table.py", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert serve.choose is choose and torch._fused_adamw_ is fused
    assert out["served"] == {"triton_mt_table.py": 2 * 3 * 2 * 2}  # 2 rounds, 3 timings of 2 steps, 2 groups
    assert set(out["host_us"]) == {"this", "torch"} and out["vs_torch"] > 0
    assert out["kernel"] == "candidates/adamw/triton_mt_table.py"
    assert script.main(["--preset", "smoke", "--template", "candidates/adamw/none.py"]) == 2
    assert "--template candidates/adamw/none.py: no such file" in capsys.readouterr().err


def test_a_template_without_its_launch_checks_and_computes_nothing(tmp_path):
    """The stand-in launch: the template's run() still refuses bad lists (its checks ran) and leaves the
    tensors as they were (no kernel ran)."""
    import pytest
    import torch

    pytest.importorskip("triton")
    script = load_file("benchmarks/optim_host.py", "optim_host")
    run = script.template_without_launch("candidates/adamw/triton_mt_table.py")
    ps = [torch.randn(7, 5), torch.randn(33)]
    lists = [[p.clone() for p in ps], [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
             [torch.zeros_like(p) for p in ps]]
    run(*lists, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    assert all(torch.equal(a, b) for a, b in zip(lists[0], ps)) and all(not m.any() for m in lists[2])
    with pytest.raises(ValueError, match="equal length"):
        run(lists[0], lists[1][:1], lists[2], lists[3], step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.1)
    bad = tmp_path / "k.py"
    bad.write_text("def run(*a, **k):\n    pass\n")
    with pytest.raises(SystemExit, match="no @triton.jit kernel"):
        script.template_without_launch(str(bad))
