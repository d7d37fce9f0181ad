"""On a CUDA GPU: the Triton and CUDA seeds pass and are timed against the baselines (skipped without one)."""

from __future__ import annotations

import glob
import os

import pytest

from kerneltune.evaluate.evaluator import Evaluator, Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SEEDS = sorted(p for p in glob.glob(os.path.join(ROOT, "candidates", "*", "*.py"))
                   if os.path.basename(p).startswith(("triton", "cuda")))


@pytest.fixture(scope="module")
def evaluator():
    with Evaluator(Options(device="cuda", timeout=900, rounds=3)) as ev:
        yield ev


@pytest.mark.gpu
@pytest.mark.parametrize("path", GPU_SEEDS, ids=lambda p: os.path.relpath(p, ROOT))
def test_gpu_seed_passes_and_is_timed(evaluator, path):
    r = evaluator.evaluate_path(path)
    assert r["status"] == "passed", r["reason"]
    assert r["median_ms"] > 0 and r["speedup"] > 0
    assert r["provenance"]["device"]["kind"] == "cuda"
    assert r["provenance"]["timing"]["clock"].startswith("cuda events")


@pytest.mark.gpu
def test_gpu_bf16_attention_is_checked(evaluator):
    r = evaluator.evaluate_path(os.path.join(ROOT, "candidates", "attention", "triton_flash.py"))
    assert r["status"] == "passed" and r["checks"]["dtypes_not_checked"] == []
