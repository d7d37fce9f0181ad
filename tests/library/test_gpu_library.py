"""The library on a CUDA GPU, with the shipped Triton seeds forced to serve through a user registry: attention
forward and backward against SDPA and fp64, torch.compile without a graph break, AdamW against torch's fused
AdamW. Skipped without a GPU."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import kerneltune
import kerneltune.registry as reg
from tests.library.conftest import kt_warnings

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 5e-2)}


SHAPES = [(1, 1, 1, 64), (2, 3, 77, 64), (1, 5, 300, 128), (2, 4, 256, 80), (2, 4, 256, 64)]


@pytest.fixture
def cuda_registry(user_registry, monkeypatch):
    """The Triton seeds at every shape of the tests, both directions (an entry serves only its head dim, and
    near shapes: registry.within_reach), every dtype and mask; the AdamW seed."""
    key = reg.device_key("cuda")
    user_registry([
        *[(path, dict(op=op, dims=dict(zip("BHND", shape)), dtype=dt, args={"causal": c}, device_key=key,
                      backend="triton"))
          for op, path in (("attention", "attention/triton_flash.py"),
                           ("attention_backward", "attention_backward/triton_fa2_bwd.py"))
          for shape in SHAPES for dt in ("float32", "float16", "bfloat16") for c in (True, False)],
        ("adamw/triton_multitensor.py", dict(op="adamw", dims={"shapes": [[1024, 256], [256]]}, device_key=key,
                                             backend="triton")),
    ])
    monkeypatch.setenv("KERNELTUNE_MIN_SPEEDUP", "0")
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")


def fp64(q, k, v, causal):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, (q, k, v)


@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_triton_attention_serves_on_cuda_and_matches(cuda_registry, shape, dtype):
    """Calls autograd records: both Triton kernels (each checked against the exact reference on first use,
    $KERNELTUNE_VERIFY); the same calls without grad: the forward kernel."""
    atol, rtol = TOL[dtype]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for causal in (True, False):
            q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            with torch.no_grad():
                torch.testing.assert_close(kerneltune.attention(q, k, v, causal=causal),
                                           F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=atol,
                                           rtol=rtol)
            out = kerneltune.attention(q, k, v, causal=causal)
            want, leaves = fp64(q, k, v, causal)
            torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=atol,
                                       rtol=rtol)
            g = torch.randn_like(out)
            sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            for a, e, t in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, leaves, g.double()),
                               torch.autograd.grad(sdpa, (q, k, v), g)):
                s = max(float(e.abs().max()), 1e-2)
                sdpa_err = float(((t.double() - e) / s).abs().max())  # no less accurate than SDPA's own backward
                torch.testing.assert_close(a.double() / s, e / s, atol=max(atol, 1.25 * sdpa_err), rtol=rtol)
    assert kt_warnings(caught) == []
    assert kerneltune.served() == {"attention": {"triton_flash": 4}, "attention_backward": {"triton_fa2_bwd": 2}}


def test_a_forward_kernel_alone_leaves_a_differentiated_call_to_sdpa(user_registry, monkeypatch):
    """Only a forward kernel: a call autograd records is SDPA's, both ways; the same call without grad takes
    the kernel."""
    key = reg.device_key("cuda")
    user_registry([("attention/triton_flash.py", dict(op="attention", dims={"B": 2, "H": 4, "N": 256, "D": 64},
                                                      dtype="bfloat16", args={"causal": True}, device_key=key,
                                                      backend="triton"))])
    monkeypatch.setenv("KERNELTUNE_MIN_SPEEDUP", "0")
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = kerneltune.attention(q, k, v)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    theirs = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # SDPA's own backward, run twice
    with torch.no_grad():
        kerneltune.attention(q, k, v)
    assert kerneltune.served() == {"attention": {"reference": 1, "triton_flash": 1},
                                   "attention_backward": {"reference": 1}}


def test_compile_on_cuda_serves_the_kernel_without_graph_breaks(cuda_registry):
    torch._dynamo.reset()

    def f(q, k, v):
        return kerneltune.attention(q * 2, k, v, causal=True).sum(-1)

    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    y = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(y, f(q, k, v))
    y.sum().backward()
    assert kerneltune.served() == {"attention": {"triton_flash": 2}, "attention_backward": {"triton_fa2_bwd": 1}}


def _adamw_against_fused(steps: int) -> None:
    """``steps`` steps of a small CUDA model with torch's fused AdamW and with kerneltune.optim.AdamW, same data:
    the parameters agree at the end."""
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 3)).cuda()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    o2 = kerneltune.optim.AdamW(m2.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(steps):
        x = torch.randn(32, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_adamw_triton_kernel_matches_fused_torch_over_100_steps(cuda_registry):
    _adamw_against_fused(100)
    assert kerneltune.served()["adamw"] == {"triton_multitensor": 100}


def test_adamw_mt_table_template_takes_run_unchecked_on_checked_steps_and_matches_fused_torch(user_registry,
                                                                                              monkeypatch):
    """The AdamW template with run_unchecked (candidates/adamw/triton_mt_table.py) through kerneltune.optim on CUDA:
    the first step takes run, the later ones run_unchecked (each verified on its first use), and 50 steps agree
    with torch's fused AdamW."""
    import kerneltune.optim as ko

    key = reg.device_key("cuda")
    user_registry([("adamw/triton_mt_table.py", dict(op="adamw", dims={"shapes": [[1024, 256], [256]]},
                                                     device_key=key, backend="triton"))])
    monkeypatch.setenv("KERNELTUNE_MIN_SPEEDUP", "0")
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    monkeypatch.setattr(ko, "_ran", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _adamw_against_fused(50)
    assert kt_warnings(caught) == []
    assert kerneltune.served()["adamw"] == {"triton_mt_table": 50}
    assert {part for _, part, _ in ko._ran} == {"", "run_unchecked"}  # run first, then run_unchecked



def reference_backward_on_autograds_thread(device: str, shape: tuple, dtype: torch.dtype, tol: float) -> None:
    """Two compiled differentiated calls at ``shape``, where no kernel of the registry (forward and backward
    entries for the device, dtype and causal mask) reaches: the compiled site enters the custom ops, and the
    backward op serves the reference, SDPA's own backward, from inside the op with autograd's dispatch keys let
    back in, on the thread autograd runs the backward on (a device thread of its own on CUDA). Its gradients
    match SDPA's outside the op, and nothing warns (the exact fp32 backward, with a warning, is what serves
    where autograd records nothing inside the op)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: kerneltune.attention(q, k, v, causal=True), fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(2):
            torch.manual_seed(seed)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            out = compiled(q, k, v)
            g = torch.randn_like(out)
            out.backward(g)
            ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            theirs = torch.autograd.grad(F.scaled_dot_product_attention(*ref, is_causal=True), ref, g)
            for a, b in zip((q.grad, k.grad, v.grad), theirs):
                torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert kt_warnings(caught) == []
    assert kerneltune.served() == {"attention": {"reference": 2}, "attention_backward": {"reference": 2}}


def test_the_reference_backward_runs_sdpas_own_on_autograds_cuda_thread(user_registry, monkeypatch):
    key = reg.device_key("cuda")
    user_registry([(path, dict(op=op, dims={"B": 2, "H": 4, "N": 256, "D": 64}, dtype="bfloat16",
                               args={"causal": True}, device_key=key, backend="triton"))
                   for op, path in (("attention", "attention/triton_flash.py"),
                                    ("attention_backward", "attention_backward/triton_fa2_bwd.py"))])
    monkeypatch.setenv("KERNELTUNE_MIN_SPEEDUP", "0")
    reference_backward_on_autograds_thread("cuda", (2, 4, 256, 128), torch.bfloat16, 2e-2)
