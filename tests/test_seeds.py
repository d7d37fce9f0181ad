"""The shipped seed and template candidates: each passes where it can run, and says so where it cannot."""

from __future__ import annotations

import glob
import os

import pytest

from kerneltune.backends.cuda import nvcc_path
from kerneltune.evaluate.evaluator import Evaluator, Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = sorted(glob.glob(os.path.join(ROOT, "candidates", "*", "*.py")))
CPU_SEEDS = [p for p in SEEDS if "cuda" not in os.path.basename(p)]
CUDA_SEEDS = [p for p in SEEDS if "cuda" in os.path.basename(p)]


def test_there_are_seeds_for_every_backend_and_op():
    names = {os.path.relpath(p, ROOT) for p in SEEDS}
    for op in ("attention", "adamw"):
        for kind in ("numba", "triton", "cuda"):
            assert any(n.startswith(f"candidates/{op}/{kind}") for n in names), (op, kind)


@pytest.fixture(scope="module")
def evaluator():
    with Evaluator(Options(device="cpu", time_it=False, seeds=2, timeout=300, compile_cuda=False)) as ev:
        yield ev


@pytest.mark.parametrize("path", CPU_SEEDS, ids=lambda p: os.path.relpath(p, ROOT))
def test_cpu_seeds_pass(evaluator, path):
    r = evaluator.evaluate_path(path)
    assert r["status"] == "passed", r["reason"]
    if "triton" in path:
        assert r["median_ms"] is None and "interpreter" in " ".join(r["notes"])
        assert r["checks"]["dtypes_not_checked"] == (["bfloat16"] if "attention" in path else [])


@pytest.mark.parametrize("path", CUDA_SEEDS, ids=os.path.basename)
def test_cuda_seeds_say_no_gpu_as_a_verdict(evaluator, path):
    r = evaluator.evaluate_path(path)
    assert r["status"] == "unsupported" and "no CUDA GPU" in r["reason"]


@pytest.mark.slow
@pytest.mark.skipif(nvcc_path() is None, reason="needs nvcc")
@pytest.mark.parametrize("path", CUDA_SEEDS, ids=os.path.basename)
def test_cuda_seeds_compile_with_nvcc_in_the_sandbox(path):
    with Evaluator(Options(device="cpu", timeout=600)) as ev:
        r = ev.evaluate_path(path)
    assert r["status"] == "unsupported" and "compiled with nvcc" in r["reason"], r["reason"]
