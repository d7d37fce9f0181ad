"""`kerneltune train` as a user meets it: JSON on stdout, one-line errors with exit 2, resume through the
command line, and two processes under torchrun against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from kerneltune.cli import app


def kt(*args):
    return CliRunner().invoke(app, ["train", *args])


def test_json_summary_on_stdout_and_step_lines_on_stderr(tmp_path):
    r = kt("--preset", "smoke", "--steps", "4", "--json", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    sm = json.loads(r.stdout)
    assert sm["kind"] == "kerneltune-train" and sm["steps_done"] == 4 and len(sm["history"]["loss"]) == 4
    assert sm["served"] and sm["corpus"]["sha256"] and sm["unigram_entropy"]["bits"] > 4
    assert "mfu" in sm and "CPU measured fp32 matmul" in sm["mfu_peak"]["source"]
    steps = [ln for ln in r.stderr.splitlines() if ln.startswith("step ") and ", lr " in ln]
    assert len(steps) == 4 and all("tok/s" in ln and "mfu" in ln and " ms," in ln for ln in steps)
    assert json.loads((tmp_path / "train.json").read_text())["final_val_loss"] == sm["final_val_loss"]


def test_tuned_kernels_log_what_served(tmp_path):
    r = kt("--preset", "smoke", "--steps", "2", "--kernels", "tuned", "--out", str(tmp_path))
    if r.exit_code == 2 and "--kernels tuned needs" in r.stderr:
        pytest.skip(r.stderr)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("kernels (tuned):"))
    assert "attention:" in line and "adamw:" in line and "×" in line


def test_resume_through_the_command_line(tmp_path):
    full = json.loads(kt("--preset", "smoke", "--steps", "8", "--eval-interval", "4", "--json",
                         "--out", str(tmp_path / "a")).stdout)
    ckpt = str(tmp_path / "c.pt")
    r = kt("--preset", "smoke", "--steps", "8", "--eval-interval", "4", "--checkpoint", ckpt, "--stop-at", "5",
           "--out", str(tmp_path / "b"))
    assert r.exit_code == 0 and os.path.isfile(ckpt)
    r = kt("--resume", ckpt, "--json", "--out", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    assert "resumed at step 5" in r.stderr
    assert json.loads(r.stdout)["history"]["loss"] == full["history"]["loss"]


@pytest.mark.parametrize("args, words", [
    (["--preset", "nope"], "unknown; choose one of"),
    (["--data", "{tmp}/missing.txt"], "no such file"),
    (["--data", "{tmp}/odd.bin"], "is odd"),
    (["--resume", "{tmp}/missing.pt"], "no such checkpoint"),
    (["--resume", "{tmp}/odd.bin"], "not a kerneltune train checkpoint"),
    (["--resume", "{tmp}/any.pt", "--steps", "5"], "drop --steps"),
    (["--compare", "--kernels", "tuned"], "drop --kernels"),
    (["--kernels", "fast"], "use reference or tuned"),
    (["--device", "tpu"], "use cpu or cuda"),
    (["--steps", "0"], "at least 1"),
    (["--preset", "smoke", "--batch-size", "6", "--micro-batch", "4", "--steps", "1"], "not a multiple"),
    (["--preset", "cpu-tiny", "--data", "{tmp}/short.txt"], "fewer than one block"),
    (["--preset", "smoke", "--out", "{tmp}/afile"], "is not a directory"),
    (["--preset", "smoke", "--compare", "--out", "{tmp}/afile/sub"], "cannot create it"),
    (["--data", "{tmp}/big.bin"], "vocabulary"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    (tmp_path / "odd.bin").write_bytes(b"abc")
    (tmp_path / "short.txt").write_bytes(b"def f(): pass\n" * 5)
    (tmp_path / "any.pt").write_bytes(b"")
    (tmp_path / "afile").write_bytes(b"")
    np.array([1, 2, 3] * 400, dtype=np.uint16).tofile(tmp_path / "big.bin")
    args = [a.format(tmp=tmp_path) for a in args]
    if words == "vocabulary":  # tokens beyond the vocabulary are not an error: the model's vocabulary grows
        np.array(list(range(300)) * 20, dtype=np.uint16).tofile(tmp_path / "big.bin")
        r = kt("--preset", "smoke", "--steps", "1", "--data", str(tmp_path / "big.bin"), "--json",
               "--out", str(tmp_path))
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["config"]["model"]["vocab_size"] == 320
        return
    r = kt(*args, *([] if "--out" in args else ["--out", str(tmp_path)]))
    assert r.exit_code == 2, (args, r.output)
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_two_processes_under_torchrun_equal_one_process(tmp_path):
    """gloo, 2 processes × micro-batch 4 against 1 process × 2 micro-steps × 4: the same 8 sequences per step."""
    common = ["train", "--preset", "smoke", "--steps", "6", "--eval-interval", "3", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kerneltune.cli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    a, b = json.loads(two.stdout), json.loads(one.stdout)
    assert a["device"]["processes"] == 2 and b["device"]["processes"] == 1
    assert "2 process(es) × 1 micro-steps × 4" in two.stderr
    np.testing.assert_allclose(a["history"]["loss"], b["history"]["loss"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(a["history"]["val_loss"], b["history"]["val_loss"], rtol=0, atol=2e-5)
    assert a["history"]["loss"][-1] < a["history"]["loss"][0] - 0.3  # and it learned


def test_compare_json_and_exit_code_follow_the_tolerance(tmp_path):
    r = kt("--compare", "--preset", "smoke", "--steps", "4", "--tolerance", "0", "--json", "--out", str(tmp_path))
    if r.exit_code == 2 and "--kernels tuned needs" in r.stderr:
        pytest.skip(r.stderr)
    sm = json.loads(r.stdout)
    assert r.exit_code == (0 if sm["loss"]["within_tolerance"] else 1), r.stderr
    assert sm["loss"]["tolerance_nats"] == 0.0 and os.path.isfile(sm["files"]["png"])


def test_resume_refuses_a_device_that_changes_the_dtype(tmp_path, monkeypatch):
    """A CPU run (fp32) resumed on a GPU would go on in bf16; a GPU's checkpoint where there is none: exit 2."""
    import torch

    ckpt = str(tmp_path / "c.pt")
    assert kt("--preset", "smoke", "--steps", "4", "--checkpoint", ckpt, "--stop-at", "2",
              "--out", str(tmp_path)).exit_code == 0
    saved = torch.load(ckpt, weights_only=True)
    saved["config"]["device"], saved["config"]["dtype"] = "cuda", "bfloat16"
    torch.save(saved, str(tmp_path / "gpu.pt"))
    r = kt("--resume", str(tmp_path / "gpu.pt"), "--out", str(tmp_path))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    monkeypatch.setattr("kerneltune.cli._check_device", lambda d: d)  # as if this machine had a GPU
    r = kt("--resume", ckpt, "--device", "cuda", "--out", str(tmp_path))
    assert r.exit_code == 2 and "float32" in r.stderr and "bfloat16" in r.stderr, r.output


def test_a_compare_that_crashes_exits_3_not_1(tmp_path, monkeypatch):
    """Exit 1 says the loss curves are apart; a kernel that raises must not read so."""
    from kerneltune.train import kernels as kernel_choice

    def tuned(device):
        def attend(q, k, v, causal=True):
            raise RuntimeError("the kernel broke")
        r = kernel_choice.reference(device)
        return kernel_choice.Kernels("tuned", attend, r.make_adamw, lambda: {}, lambda: None)
    monkeypatch.setattr(kernel_choice, "tuned", tuned)
    r = kt("--preset", "smoke", "--steps", "2", "--compare", "--out", str(tmp_path))
    assert r.exit_code == 3, r.output
    assert r.stderr.strip().splitlines()[-1] == "error: --compare did not finish: RuntimeError: the kernel broke"


def test_default_micro_batch_divides_the_batch():
    from kerneltune.train.presets import resolve

    for bs, world in ((6, 1), (24, 1), (8, 2), (7, 1)):
        cfg = resolve("smoke", batch_size=bs, world=world)
        assert (bs // world) % cfg.micro_batch == 0 and cfg.micro_batch <= 4, (bs, world, cfg.micro_batch)
