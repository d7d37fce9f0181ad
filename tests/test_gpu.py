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


@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 2048])  # one batched computation, and the row-block path (9·2048²·8 B > 256 MiB)
def test_gpu_fp64_references_take_cuda_inputs_and_answer_on_the_cpu(n):
    import torch

    from kerneltune.ops.attention import attention_fp64
    from kerneltune.ops.attention_backward import attention_bwd_fp64

    g = torch.Generator(device="cuda").manual_seed(n)
    q, k, v, do = (torch.randn(1, 9 if n > 64 else 2, n, 64, device="cuda", generator=g).to(torch.bfloat16)
                   for _ in range(4))
    for causal in (True, False):
        out, lse = attention_fp64(q, k, v, causal, None)
        grads = attention_bwd_fp64(q, k, v, do, causal, None)
        assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in (out, lse, *grads))
        want = torch.nn.functional.scaled_dot_product_attention(*(x.double() for x in (q, k, v)), is_causal=causal)
        assert torch.allclose(out, want.cpu(), atol=1e-9)
