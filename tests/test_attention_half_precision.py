"""Half precision (fp16, bf16) in the attention ops' checks: the torch_math baselines hold the check's tolerance
at real sizes (their scores in fp32), and the check cases reach past one block of the largest block size in the
search spaces (128, triton_fa2's defaults): there honest half-precision kernels pass, and a bug of the multi-block
path (a key loop that starts a block late) does not."""

from __future__ import annotations

import math

import pytest
import torch

from kerneltune.ops import get_op
from kerneltune.ops.attention import _case, torch_math

ATT = get_op("attention")
BWD = get_op("attention_backward")
HALF = ("float16", "bfloat16")
# (B, H, N, D, causal) where the baseline rounded its scores to bf16 and failed the check (N = 512, 1024)
TMATH_SHAPES = [(1, 2, 512, 128, False), (1, 2, 512, 64, True), (1, 2, 1024, 128, True)]
_ids = lambda s: "x".join(map(str, s[:4])) + ("-causal" if s[4] else "-full")  # noqa: E731


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", TMATH_SHAPES, ids=_ids)
def test_the_torch_math_baseline_passes_the_half_precision_check(shape, dtype):
    fn = ATT.baselines("cpu")["torch_math"]
    for seed in (1, 2, 3):
        inputs = ATT.make_inputs(_case(*shape[:4], dtype, shape[4]), seed)
        t = inputs.tensors
        out = fn(t["q"], t["k"], t["v"], causal=inputs.args["causal"], scale=inputs.args["scale"])
        assert out.dtype == t["q"].dtype
        why = ATT.compare(inputs, ATT.reference(inputs), {"out": out})
        assert why == "", (seed, why)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", TMATH_SHAPES[:2], ids=_ids)
def test_the_torch_math_backward_baseline_passes_the_half_precision_check(shape, dtype):
    fn = BWD.baselines("cpu")["torch_math"]
    for seed in (1, 3):
        inputs = BWD.make_inputs(_case(*shape[:4], dtype, shape[4]), seed)
        t = inputs.tensors
        got = fn(t["q"], t["k"], t["v"], t["o"], t["do"], t["lse"], causal=inputs.args["causal"],
                 scale=inputs.args["scale"])
        why = BWD.compare(inputs, BWD.reference(inputs), dict(zip(BWD.outputs, got)))
        assert why == "", (seed, why)


def test_the_compiled_baselines_compile_that_same_math():
    """torch_compile (CUDA) is torch.compile of torch_math, forward and (as its autograd backward) backward."""
    assert ATT.baselines("cuda")["torch_compile"].fn is torch_math
    assert BWD.baselines("cuda")["torch_compile"].fwd.fn is torch_math


# -- check cases past one block ---------------------------------------------------------------------------------
def _half(op: str, device: str, dtype: str) -> list:
    return [c for c in get_op(op).check_cases(device) if c.dtype == dtype]


@pytest.mark.parametrize("op", ["attention", "attention_backward"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_check_cases_reach_past_one_block_of_128_on_cuda(op, dtype):
    """Several query blocks of 128 and a ragged tail (N off every block size), both masks; the forward's
    run_with_lse there too, and rows of low scores at the full mask (keys past a ragged N)."""
    big = [c for c in _half(op, "cuda", dtype) if c.dims["N"] > 256 and c.dims["N"] % 16 != 0]
    plain = [c for c in big if not c.args.get("values") and not c.args.get("lse")]
    assert {c.args["causal"] for c in plain} == {True, False}, [c.name for c in big]
    assert any(c.args.get("values") == "low_scores" and not c.args["causal"] for c in big)
    assert any(c.args.get("lse") for c in big) == (op == "attention")


@pytest.mark.parametrize("op,added", [("attention", 8), ("attention_backward", 6)])
def test_the_large_half_precision_cases_are_cuda_only_and_few(op, added):
    """Every check case runs in every evaluation; on CPU these cost more than half again of one (numba, and the
    Triton interpreter, which has no bf16): they run where half precision is native (docs/measurement.md)."""
    spec = get_op(op)
    cpu, cuda = spec.check_cases("cpu"), spec.check_cases("cuda")
    assert [c.name for c in cuda[:len(cpu)]] == [c.name for c in cpu]
    extra = cuda[len(cpu):]
    assert len(extra) == added and all(c.dtype in HALF and c.dims["N"] > 256 for c in extra)
    assert all(c.dims["N"] <= 256 for c in cpu if c.dtype in HALF)
    assert len({c.name for c in cuda}) == len(cuda)


def _probs(t: dict, causal: bool, scale: float | None, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, S) of the inputs in ``dtype`` (S masked)."""
    q, k = t["q"].to(dtype), t["k"].to(dtype)
    n, d = q.shape[-2], q.shape[-1]
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * sc
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1), s


def _late_loop(n: int) -> torch.Tensor:
    """(N, N) True where a kernel whose key loop starts one block (64 keys) late past its first query block of 128
    rows misses the key: rows >= 128, keys < 64."""
    i = torch.arange(n)[:, None]
    return (i >= 128) & (torch.arange(n)[None, :] < 64)


def _forward(inputs, bug: bool) -> dict:
    """A fused forward as tensor cores run it: scores and the softmax statistics in fp32, P rounded to the dtype
    for P·v, accumulated in fp32; with ``bug`` the multi-block path's key loop starts a block late."""
    t, causal, scale = inputs.tensors, inputs.args["causal"], inputs.args["scale"]
    dt = t["q"].dtype
    _, s = _probs(t, causal, scale, torch.float32)
    if bug:
        s = s.masked_fill(_late_loop(s.shape[-1]), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l_ = p.sum(-1, keepdim=True)
    out = ((p.to(dt).float() @ t["v"].float()) / l_).to(dt)
    got = {"out": out}
    if inputs.args.get("lse"):
        got["lse"] = (m + torch.log(l_)).squeeze(-1)
    return got


def _backward(inputs, bug: bool) -> dict:
    """A fused backward as tensor cores run it: P = exp(S - lse) and Δ from the given o in fp32, P and dS rounded to
    the dtype for the matmuls that take them; with ``bug`` dq's key loop starts a block late past the first
    query block."""
    t, causal, scale = inputs.tensors, inputs.args["causal"], inputs.args["scale"]
    dt = t["q"].dtype
    sc = 1.0 / math.sqrt(t["q"].shape[-1]) if scale is None else scale
    _, s = _probs(t, causal, scale, torch.float32)
    p = torch.exp(s - t["lse"][..., None])
    do, o, v, q, k = (t[x].float() for x in ("do", "o", "v", "q", "k"))
    dv = p.to(dt).float().transpose(-1, -2) @ do
    ds = (p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))).to(dt).float()
    dk = (ds.transpose(-1, -2) @ q) * sc
    if bug:
        ds = ds.masked_fill(_late_loop(ds.shape[-1]), 0.0)
    dq = (ds @ k) * sc
    return {"dq": dq.to(dt), "dk": dk.to(dt), "dv": dv.to(dt)}


KERNELS = {"attention": _forward, "attention_backward": _backward}


@pytest.mark.parametrize("op", ["attention", "attention_backward"])
def test_honest_half_precision_kernels_pass_the_large_cases_and_a_multiblock_bug_does_not(op):
    """At the half-precision check cases past two blocks of 128 (on CUDA): the fp64 reference rounded to the dtype
    and an honest fused kernel pass at several seeds; a kernel whose key loop starts a block late past its first
    query block of 128 (exact at N <= 128, where every other half-precision case is) fails, causal and full."""
    spec, kernel = get_op(op), KERNELS[op]
    caught = set()
    for dtype in HALF:
        for case in (c for c in _half(op, "cuda", dtype) if c.dims["N"] > 256):
            for seed in (1, 2, 3, 4):
                inputs = spec.make_inputs(case, seed)
                expected = spec.reference(inputs)
                dt = inputs.tensors["q"].dtype
                best = {name: (x.float() if name == "lse" else x.to(dt)) for name, x in expected.items()}
                assert spec.compare(inputs, expected, best) == "", (case.name, seed)
                assert spec.compare(inputs, expected, kernel(inputs, False)) == "", (case.name, seed)
                if spec.compare(inputs, expected, kernel(inputs, True)):
                    caught.add((dtype, case.args["causal"]))
    assert caught == {(dt, c) for dt in HALF for c in (True, False)}, caught
