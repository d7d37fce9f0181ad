"""The acceptance run of docs/train.md: `kerneltune train --compare --preset cpu-tiny --steps 200` on the CPU.
Minutes on 2 cores, so marked slow: run with `pytest -m slow tests/train/test_acceptance.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_cpu_tiny_compare_200_steps(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kerneltune.cli", "train", "--compare", "--preset", "cpu-tiny",
                        "--steps", "200", "--out", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=3600, env={**os.environ})
    if r.returncode == 2 and "--kernels tuned needs" in r.stderr:
        pytest.skip(r.stderr.strip())
    sm = json.loads(r.stdout)
    assert r.returncode == 0, r.stderr[-2000:]
    ent = sm["unigram_entropy"]["nats"]
    lo = sm["loss"]
    assert lo["final_val_reference"] < ent - 0.7 and lo["final_val_tuned"] < ent - 0.7  # well below unigram
    assert lo["within_tolerance"] and lo["max_abs_diff_train_curve"] <= lo["tolerance_nats"] == 0.02
    assert sm["speedup"] > 0 and sm["timing"]["tuned"]["timed_steps"] == 180
    assert (tmp_path / "compare.png").stat().st_size > 10_000 and (tmp_path / "compare.json").is_file()
