"""KERNELTUNE_VERIFY's check of a backward kernel's first call is the evaluator's own check: the attention_backward
op's compare against its fp64 reference, with Δ taken from the o the kernel was given (rounded to the dtype) and
the op's backward tolerances. An honest half-precision backward (P and dS rounded to the dtype, fp32
accumulation: what every fused backward does) is served at every N, and a wrong one is still dropped."""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch

import kerneltune
from kerneltune.library import serve
from kerneltune.ops import get_op
from kerneltune.ops.attention import _case
from tests.library.conftest import TEST_KERNELS, kt_warnings

ROUNDED = os.path.join(TEST_KERNELS, "attention_backward", "torch_flash_rounded.py")
BWD = get_op("attention_backward")

# (dtype, (B, H, N, D), causal, seed): random inputs as the evaluator draws them (seed 2: q at 2.5×, larger
# logits), one query block and several; the exact fp32 backward with the forward's tolerance dropped an honest
# kernel at about a third of such inputs
HALF_CASES = [(dtype, shape, causal, seed)
              for dtype in ("float16", "bfloat16")
              for shape, causal in (((1, 2, 256, 64), True), ((1, 2, 256, 128), False), ((2, 4, 128, 64), True),
                                    ((1, 2, 300, 64), True), ((1, 1, 513, 64), False))
              for seed in (1, 2, 3)]


def _entry(path: str, dtype: str, shape: tuple[int, ...], causal: bool, device: str = "cpu"):
    import kerneltune.registry as reg

    b, h, n, d = shape
    return path, dict(op="attention_backward", dims={"B": b, "H": h, "N": n, "D": d}, dtype=dtype,
                      args={"causal": causal}, speedup=1.5, backend="torch", device_key=reg.device_key(device))


def _wrong_kernel(tmp_path) -> str:
    """torch_flash_rounded.py with NO_DELTA: dS = P ∘ dP, Δ left out."""
    path = tmp_path / "kernels" / "attention_backward" / "torch_flash_rounded_no_delta.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(open(ROUNDED).read().replace("NO_DELTA = False", "NO_DELTA = True"))
    return str(path)


def _train_step(dtype: str, shape: tuple[int, ...], causal: bool, seed: int, device: str = "cpu"):
    """One differentiated call on the op's own random inputs for the case (q, k, v, dO and the scale as the
    evaluator draws them): (warnings of kerneltune, served counts, the gradients, the fp64 reference's)."""
    b, h, n, d = shape
    inputs = BWD.make_inputs(_case(b, h, n, d, dtype, causal), seed)
    t, scale = inputs.tensors, inputs.args["scale"]
    q, k, v = (t[x].detach().clone().to(device).requires_grad_() for x in "qkv")
    serve.reset_served()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = kerneltune.attention(q, k, v, causal=causal, scale=scale)
        got = torch.autograd.grad(out, (q, k, v), t["do"].to(device))
    return kt_warnings(caught), kerneltune.served(), got, inputs


@pytest.mark.parametrize("dtype,shape,causal,seed", HALF_CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_an_honest_half_precision_backward_kernel_is_served_under_verify(user_registry, monkeypatch, dtype, shape,
                                                                        causal, seed):
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    user_registry([_entry(ROUNDED, dtype, shape, causal)])
    msgs, served, _, _ = _train_step(dtype, shape, causal, seed)
    assert msgs == [], msgs
    assert served["attention_backward"] == {"torch_flash_rounded": 1}, served
    # checked, and kept for the calls that follow
    e = serve.choose("attention_backward", torch.device("cpu"), dict(zip("BHND", shape)), dtype,
                     {"causal": causal}).entry
    assert e is not None and not serve.is_bad(e) and not serve.verify_pending(e)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_wrong_backward_kernel_is_still_dropped_under_verify(user_registry, monkeypatch, tmp_path, dtype):
    """Δ left out: dropped on its first call with one warning, the gradients the reference's (SDPA's backward)."""
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    shape, causal = (1, 2, 300, 64), True
    user_registry([_entry(_wrong_kernel(tmp_path), dtype, shape, causal)])
    for step in range(2):
        msgs, served, got, inputs = _train_step(dtype, shape, causal, 1 + step)
        assert served["attention_backward"] == {"reference": 1}, served
        assert len(msgs) == (1 - step) and all("disagreed with the reference" in m and "torch_flash_rounded_no_delta"
                                               in m for m in msgs), msgs
        expected = BWD.reference(inputs)
        # SDPA's own backward at the check's tolerance (its o is SDPA's, not the rounded fp64 one the op takes Δ
        # from: that difference is far inside it)
        assert BWD.compare(inputs, expected, dict(zip(BWD.outputs, got))) == ""


def test_without_verify_nothing_is_checked(user_registry, monkeypatch, tmp_path):
    """The check costs only where asked for: without KERNELTUNE_VERIFY even the wrong kernel serves."""
    la = importlib.import_module("kerneltune.library.attention")
    ran = []
    monkeypatch.setattr(la, "_verify_backward", lambda *a: ran.append(1) or "")
    shape, causal = (1, 2, 33, 16), True
    user_registry([_entry(_wrong_kernel(tmp_path), "float32", shape, causal)])
    msgs, served, _, _ = _train_step("float32", shape, causal, 1)
    assert msgs == [] and ran == [] and served["attention_backward"] == {"torch_flash_rounded_no_delta": 1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_verify_checks_a_backward_kernel_on_its_device(user_registry, monkeypatch, tmp_path, dtype):
    """On a GPU the kernel's gradients are compared with the fp64 reference (computed where the evaluator would):
    the honest kernel serves, the wrong one is dropped."""
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    monkeypatch.setenv("KERNELTUNE_MIN_SPEEDUP", "0")
    shape, causal = (2, 4, 1100, 64), True
    user_registry([_entry(ROUNDED, dtype, shape, causal, "cuda")])
    for seed in (1, 2, 3):
        serve.reload()
        msgs, served, got, inputs = _train_step(dtype, shape, causal, seed, "cuda")
        assert msgs == [] and served["attention_backward"] == {"torch_flash_rounded": 1}, (msgs, served)
        assert all(g.device.type == "cuda" for g in got)
    user_registry([_entry(_wrong_kernel(tmp_path), dtype, shape, causal, "cuda")])
    msgs, served, _, _ = _train_step(dtype, shape, causal, 1, "cuda")
    assert len(msgs) == 1 and "disagreed with the reference" in msgs[0] and served["attention_backward"] == {
        "reference": 1}, (msgs, served)
