"""kerneltune.attention against torch SDPA and an fp64 reference: forward and gradients, awkward shapes, every
dtype the CPU runs, a registry kernel forced to serve, and torch.compile without a graph break."""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import kerneltune
from tests.interp import in_interpreter
from tests.library.conftest import TEST_KERNELS, kt_warnings

# (B, H, N, D): N=1, odd head counts, N and D off every power of two, D=256 (the contract's limit)
SHAPES = [(1, 1, 1, 8), (2, 3, 17, 48), (1, 5, 33, 80), (3, 1, 64, 16), (1, 2, 7, 256)]
# (dtype, atol, rtol) against the fp64 reference, for forward outputs and for gradients
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 5e-2)}


def fp64_attention(q, k, v, causal, scale):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, k.shape[-2], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, (q, k, v)


def inputs(shape, dtype, seed, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * (gain if i == 0 else 1.0)).to(dtype).requires_grad_()
            for i in range(3)]


def grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g)


def no_grad_inputs(shape, dtype, seed):
    return [t.detach() for t in inputs(shape, dtype, seed)]


@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_sdpa_and_fp64(shape, dtype):
    atol, rtol = TOL[dtype]
    for seed, (causal, scale) in enumerate([(True, None), (False, None), (True, 0.3)]):
        q, k, v = inputs(shape, dtype, seed, gain=2.5 if seed == 2 else 1.0)
        out = kerneltune.attention(q, k, v, causal=causal, scale=scale)
        assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
        want, leaves = fp64_attention(q, k, v, causal, scale)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
        torch.testing.assert_close(out, sdpa, atol=atol, rtol=rtol)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(99 + seed)).to(dtype)
        ours = grads(out, (q, k, v), g)
        exact = grads(want, leaves, g.double())
        theirs = grads(sdpa, (q, k, v), g)
        for name, a, e, t in zip("qkv", ours, exact, theirs):
            assert a.dtype == dtype, name
            # gradients: relative to the gradient's own scale (a gradient has elements near 0)
            s = max(float(e.abs().max()), 1e-2)  # dq is exactly 0 at N=1
            # never less accurate than SDPA itself (whose CPU bf16 backward at D=256 is ~6e-2 off fp64)
            sdpa_err = float(((t.double() - e) / s).abs().max())
            torch.testing.assert_close(a.double() / s, e / s, atol=max(atol, 1.25 * sdpa_err), rtol=rtol,
                                       msg=f"d{name} vs fp64")
            torch.testing.assert_close(a.double() / s, t.double() / s, atol=2 * atol, rtol=2 * rtol,
                                       msg=f"d{name} vs SDPA")
    assert kerneltune.served() == {"attention": {"reference": 3}, "attention_backward": {"reference": 3}}


@pytest.mark.parametrize("scale", [0.0, -0.4])
def test_a_scale_of_zero_or_below_matches_fp64_where_torch_sdpa_is_nan(scale):
    """torch's SDPA puts its causal mask in before the scale (NaN rows at a scale of 0 or below); the reference
    path rewrites the call, so forward and gradients follow the formula, causal and full."""
    for causal in (True, False):
        q, k, v = inputs((2, 3, 17, 48), torch.float32, 7)
        out = kerneltune.attention(q, k, v, causal=causal, scale=scale)
        want, leaves = fp64_attention(q, k, v, causal, scale)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        for name, a, e in zip("qkv", grads(out, (q, k, v), g), grads(want, leaves, g.double())):
            torch.testing.assert_close(a.double(), e, atol=2e-5, rtol=1e-4, msg=f"d{name}")


def test_fp64_and_non_contract_inputs_take_the_reference_exactly():
    q, k, v = inputs((2, 3, 5, 12), torch.float64, 1)
    kv = [t.detach()[:, :, :4].clone().requires_grad_() for t in (k, v)]  # cross-attention: Nk != Nq
    for kk, vv in ((k, v), kv):
        out = kerneltune.attention(q, kk, vv, causal=True)
        ref = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        for a, b in zip(grads(out, (q, kk, vv), torch.ones_like(out)), grads(ref, (q, kk, vv), torch.ones_like(ref))):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_non_contiguous_inputs_and_inputs_unchanged():
    base = torch.randn(2, 9, 3, 24)  # (B, N, H, D) viewed as (B, H, N, D): not contiguous
    q, k, v = (base.transpose(1, 2) + i for i in range(3))
    keep = [t.clone() for t in (q, k, v)]
    out = kerneltune.attention(q, k, v, causal=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)
    for t, c in zip((q, k, v), keep):
        assert torch.equal(t, c)


def test_a_registry_numba_kernel_serves_when_forced_and_matches(user_registry, monkeypatch):
    """A forward kernel serves calls that autograd does not record (inference)."""
    user_registry([("attention/numba_cpu.py", dict(op="attention", dims={"B": 2, "H": 3, "N": 17, "D": 48},
                                                   args={"causal": True}, speedup=0.4))])
    q, k, v = no_grad_inputs((2, 3, 17, 48), torch.float32, 5)
    # recorded slower than torch: the reference serves by default
    kerneltune.attention(q, k, v, causal=True)
    assert kerneltune.served() == {"attention": {"reference": 1}}
    monkeypatch.setenv("KERNELTUNE_MIN_SPEEDUP", "0")
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    kerneltune.reset_served()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for shape in [(2, 3, 17, 48), (1, 3, 30, 48)]:  # the exact bucket, then the nearest one
            q, k, v = no_grad_inputs(shape, torch.float32, 6)
            out = kerneltune.attention(q, k, v, causal=True)
            torch.testing.assert_close(out.double(), fp64_attention(q, k, v, True, None)[0], atol=2e-5, rtol=1e-4)
        kerneltune.attention(q, k, v, causal=False)  # no entry for causal=False: the reference
        kerneltune.attention(*no_grad_inputs((1, 1, 1, 40), torch.float32, 7), causal=True)  # beyond reach
    assert kt_warnings(caught) == []
    assert kerneltune.served() == {"attention": {"numba_cpu": 2, "reference": 2}}
    kinds = {(d["bucket"], d["args"]["causal"]): (d["kernel"], d["kind"])
             for d in kerneltune.decisions() if d["op"] == "attention"}
    assert ("numba_cpu", "exact") in kinds.values() and ("numba_cpu", "nearest") in kinds.values()
    monkeypatch.setenv("KERNELTUNE_DISABLE", "1")
    kerneltune.reset_served()
    kerneltune.attention(q, k, v, causal=True)
    assert kerneltune.served() == {"attention": {"reference": 1}}
    # the per-signature dispatch cache follows the environment back, and a registry re-read
    monkeypatch.delenv("KERNELTUNE_DISABLE")
    kerneltune.attention(q, k, v, causal=True)
    monkeypatch.setenv("KERNELTUNE_MIN_SPEEDUP", "1")
    kerneltune.attention(q, k, v, causal=True)
    assert kerneltune.served() == {"attention": {"reference": 2, "numba_cpu": 1}}


def test_a_kernel_that_disagrees_on_first_use_is_dropped_with_one_warning(user_registry, monkeypatch, tmp_path):
    path = user_registry([("attention/numba_cpu.py", dict(op="attention", dims={"B": 1, "H": 2, "N": 9, "D": 16},
                                                          args={"causal": True}))])
    # a kernel that is wrong (its file hashes as registered: the registry trusts what passed; verification
    # on first use is the net for what the registry cannot know)
    import json
    import os

    doc = json.load(open(path))
    cand = os.path.join(os.path.dirname(path), "candidates", doc["entries"][0]["candidate"])
    src = open(cand).read().replace("o[d] = ai[d] * inv", "o[d] = ai[d] * inv * 1.01")
    open(cand, "w").write(src)
    from kerneltune import registry as reg

    doc["entries"][0]["source_hash"] = reg.file_hash(src)
    open(path, "w").write(json.dumps(doc))
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    from kerneltune.library import serve

    serve.reload()
    q, k, v = no_grad_inputs((1, 2, 9, 16), torch.float32, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = kerneltune.attention(q, k, v, causal=True)
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    msgs = kt_warnings(caught)
    assert len(msgs) == 1 and "disagreed with the reference" in msgs[0], msgs
    assert kerneltune.served() == {"attention": {"reference": 3}}


def test_torch_compile_fullgraph_no_graph_break():
    """A module calling kerneltune.attention compiles whole (fullgraph=True fails on any graph break), runs
    forward and backward, with the same values and gradients as eager."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(24, 72)

        def forward(self, x):  # (B, T, C) -> (B, T, C)
            b, t, c = x.shape
            q, k, v = (z.view(b, t, 3, 8).transpose(1, 2) for z in self.qkv(x).split(24, dim=2))
            return kerneltune.attention(q, k, v, causal=True).transpose(1, 2).reshape(b, t, c)

    torch._dynamo.reset()
    m = Block()
    x = torch.randn(2, 11, 24, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    ref = m(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.autograd.grad(y.sum(), x)[0]
    gr = torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(gy, gr, atol=1e-5, rtol=1e-5)
    # the reference fallback is plain SDPA inside the compiled graph: only the eager call is counted
    assert kerneltune.served()["attention"] == {"reference": 1}
    assert kerneltune.served()["attention_backward"] == {"reference": 1}


def test_torch_compile_with_dynamic_shapes_traces_and_serves(user_registry, monkeypatch):
    """torch.compile(dynamic=True): the traced shape is symbolic, so whether a kernel serves cannot be asked of
    it. With no entry for this device, dtype and mask that could serve (none, or one below the minimum speedup)
    the call is SDPA in the graph (not counted); with one, it is the custom op, which serves the shapes the
    kernel reaches when it runs (and the reference for the others). Inference calls: a forward kernel."""

    def f(q, k, v):
        return kerneltune.attention(q, k, v, causal=True)

    for speedup in (None, 0.4, 1.5):   # no entry; one below the minimum speedup (serves no shape); one that serves
        served = speedup == 1.5
        if speedup is not None:
            user_registry([("attention/numba_cpu.py", dict(op="attention", dims={"B": 2, "H": 3, "N": 17, "D": 48},
                                                           args={"causal": True}, speedup=speedup))])
        torch._dynamo.reset()
        kerneltune.reset_served()
        compiled = torch.compile(f, dynamic=True, fullgraph=True)
        # the entry's bucket, its nearest (in reach), another head dim (none): one graph for all three
        for shape in [(2, 3, 17, 48), (1, 3, 30, 48), (2, 3, 17, 40)]:
            q, k, v = no_grad_inputs(shape, torch.float32, shape[2])
            out = compiled(q, k, v)
            torch.testing.assert_close(out.double(), fp64_attention(q, k, v, True, None)[0], atol=2e-5, rtol=1e-4)
        counts = kerneltune.served().get("attention", {})
        assert counts == ({"numba_cpu": 2, "reference": 1} if served else {}), counts  # SDPA in a graph: uncounted


FWD_48 = ("attention/numba_cpu.py", dict(op="attention", dims={"B": 2, "H": 3, "N": 17, "D": 48},
                                         args={"causal": True}, speedup=1.5))
BWD_48 = (os.path.join(TEST_KERNELS, "attention_backward", "torch_math.py"),
          dict(op="attention_backward", dims={"B": 2, "H": 3, "N": 17, "D": 48}, args={"causal": True}, speedup=1.5,
               backend="torch"))
# the entries' bucket, its nearest (in reach), another head dim (no entry); scales: default, negative
GRAD_CASES = [((2, 3, 17, 48), None), ((1, 3, 30, 48), -0.3), ((2, 3, 17, 40), None)]


def no_exact(*args, **kwargs):
    raise AssertionError("the exact fp32 backward ran")


def check_grads(run, dtype, cases=GRAD_CASES):
    """Each case's gradients through ``run`` against fp64 and, bit for bit where SDPA computes them, SDPA's."""
    la = importlib.import_module("kerneltune.library.attention")
    atol, rtol = TOL[dtype]
    for shape, scale in cases:
        q, k, v = inputs(shape, dtype, shape[2])
        out = run(q, k, v, scale)
        want, leaves = fp64_attention(q, k, v, True, scale)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
        ours, exact = grads(out, (q, k, v), g), grads(want, leaves, g.double())
        qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
        theirs = grads(la.sdpa(qs, ks, vs, True, scale), (qs, ks, vs), g)
        for name, a, e, t in zip("qkv", ours, exact, theirs):
            sc = max(float(e.abs().max()), 1e-2)
            torch.testing.assert_close(a.double() / sc, e / sc, atol=atol, rtol=rtol, msg=f"d{name}")
            if shape[-1] != 48:  # no kernel reaches D 40: SDPA computed these, in the graph or in the custom op
                torch.testing.assert_close(a, t, atol=0, rtol=0, msg=f"d{name} vs SDPA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_forward_kernel_alone_never_serves_a_call_that_will_be_differentiated(user_registry, monkeypatch,
                                                                                dtype):
    """With no backward kernel, a call autograd records is SDPA's, forward and backward (a forward kernel there
    would cost the step its own time on top of SDPA's forward, which the backward would need again), eagerly
    and under torch.compile; the same calls without grad take the forward kernel."""
    user_registry([(FWD_48[0], {**FWD_48[1], "dtype": str(dtype)[6:]})])
    torch._dynamo.reset()
    call = lambda q, k, v, s: kerneltune.attention(q, k, v, causal=True, scale=s)  # noqa: E731
    compiled = torch.compile(call, dynamic=True, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_grads(call, dtype)
        assert kerneltune.served() == {"attention": {"reference": 3}, "attention_backward": {"reference": 3}}
        check_grads(compiled, dtype)  # SDPA in the graph: nothing counted
        assert kerneltune.served() == {"attention": {"reference": 3}, "attention_backward": {"reference": 3}}
        with torch.no_grad():
            for shape, scale in GRAD_CASES:
                call(*inputs(shape, dtype, 1), scale)
    assert kt_warnings(caught) == []
    assert kerneltune.served()["attention"] == {"reference": 4, "numba_cpu": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_with_a_backward_kernel_both_directions_serve_and_sdpas_backward_covers_the_rest(user_registry,
                                                                                       monkeypatch, dtype):
    """A forward and a backward kernel: a call autograd records goes through the custom ops, each direction
    its kernel where it reaches; under torch.compile with dynamic shapes every call does (the decision cannot
    depend on a symbolic shape), and where no kernel reaches, the custom ops' reference is SDPA both ways: its
    backward after its forward recomputed, never the exact fp32 backward (several times slower)."""
    monkeypatch.setattr(importlib.import_module("kerneltune.library.attention"), "exact_backward", no_exact)
    user_registry([(FWD_48[0], {**FWD_48[1], "dtype": str(dtype)[6:]}),
                   (BWD_48[0], {**BWD_48[1], "dtype": str(dtype)[6:]})])
    torch._dynamo.reset()
    call = lambda q, k, v, s: kerneltune.attention(q, k, v, causal=True, scale=s)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_grads(call, dtype)
        # eager: D 48 both kernels; D 40 is SDPA itself (counted as the reference both ways)
        assert kerneltune.served() == {"attention": {"numba_cpu": 2, "reference": 1},
                                       "attention_backward": {"torch_math": 2, "reference": 1}}
        kerneltune.reset_served()
        check_grads(torch.compile(call, dynamic=True, fullgraph=True), dtype)
    assert kt_warnings(caught) == []
    assert kerneltune.served() == {"attention": {"numba_cpu": 2, "reference": 1},
                                   "attention_backward": {"torch_math": 2, "reference": 1}}


def test_compiled_a_forward_kernel_serves_a_differentiated_call_only_where_the_backward_kernel_does(
        user_registry):
    """Under torch.compile the decision to enter the custom ops cannot look at the shape (it may be symbolic):
    with a backward entry for the device, dtype and mask, every differentiated call of a traced site enters
    them. Their forward then takes its kernel only where the backward kernel serves the shape too, and serves
    it still (a backward kernel dropped after the trace leaves the forward kernel too)."""
    from kerneltune.library import serve

    fwd40 = ("attention/numba_cpu.py", {**FWD_48[1], "dims": {"B": 2, "H": 3, "N": 17, "D": 40}})
    user_registry([fwd40, FWD_48, BWD_48])
    call = lambda q, k, v, s: kerneltune.attention(q, k, v, causal=True, scale=s)  # noqa: E731
    both = [((2, 3, 17, 40), None), ((2, 3, 17, 48), None)]  # a forward kernel each; a backward one at D 48
    for dynamic in (False, True):
        torch._dynamo.reset()
        kerneltune.reset_served()
        compiled = torch.compile(call, dynamic=dynamic, fullgraph=True)
        check_grads(compiled, torch.float32, both)  # D 40: SDPA both ways, bit for bit
        assert kerneltune.served() == {"attention": {"reference": 1, "numba_cpu": 1},
                                       "attention_backward": {"reference": 1, "torch_math": 1}}, dynamic
        with torch.no_grad():  # inference: the forward kernels, both
            for shape, scale in both:
                compiled(*no_grad_inputs(shape, torch.float32, 2), scale)
        assert kerneltune.served()["attention"] == {"reference": 1, "numba_cpu": 3}
    bwd = serve.choose("attention_backward", torch.device("cpu"), {"B": 2, "H": 3, "N": 17, "D": 48}, "float32",
                       {"causal": True}).entry
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        serve.mark_bad(bwd, "dropped by the test")
    kerneltune.reset_served()
    check_grads(compiled, torch.float32, [((2, 3, 17, 48), None)])  # the same graph: no retrace
    assert kerneltune.served() == {"attention": {"reference": 1}, "attention_backward": {"reference": 1}}


def test_where_sdpas_backward_cannot_run_in_the_custom_op_the_exact_one_serves_with_a_warning(user_registry,
                                                                                             monkeypatch):
    la = importlib.import_module("kerneltune.library.attention")
    user_registry([FWD_48, BWD_48])

    def unavailable():
        raise AttributeError("module 'torch._C' has no attribute '_ForceDispatchKeyGuard'")

    monkeypatch.setattr(la, "_autograd_back_on", unavailable)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, s: kerneltune.attention(q, k, v, causal=True, scale=s), dynamic=True,
                             fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # D 40: no kernel reaches it, so the compiled call's backward is the custom op's reference (twice)
        for shape, scale in [((2, 3, 17, 40), None), ((1, 2, 9, 40), 0.5)]:
            q, k, v = inputs(shape, torch.float32, 3)
            out = compiled(q, k, v, scale)
            want, leaves = fp64_attention(q, k, v, True, scale)
            g = torch.randn_like(out)
            for a, e in zip(grads(out, (q, k, v), g), grads(want, leaves, g.double())):
                torch.testing.assert_close(a.double(), e, atol=2e-5, rtol=1e-4)
    assert kerneltune.served()["attention_backward"] == {"reference": 2}
    msgs = kt_warnings(caught)
    assert len(msgs) == 1 and "exact fp32 backward serves" in msgs[0] and "_ForceDispatchKeyGuard" in msgs[0], msgs


def test_the_reference_backward_raises_sdpas_own_errors_and_leaves_the_dispatch_state_as_it_was():
    """An error of the recomputed SDPA (a gradient of the wrong shape) is raised, not covered by the exact
    backward; the thread's dispatch keys are the same after the op, returned or raised."""
    q, k, v = (t.detach() for t in inputs((2, 3, 17, 48), torch.float32, 4))
    o = kerneltune.attention(q, k, v)
    z = torch.zeros(2, 3, 17)  # no lse from the forward (lse_ok False): nothing reads it without a kernel
    keys = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.kerneltune.attention_backward(torch.randn(2, 3, 17, 40), q, k, v, o, z, True, None)
    assert (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()) == keys
    g = torch.randn(2, 3, 17, 48)
    got = torch.ops.kerneltune.attention_backward(g, q, k, v, o, z, True, None)
    assert (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()) == keys
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(F.scaled_dot_product_attention(*leaves, is_causal=True), leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.inference_mode():  # inference tensors: the exact backward, no warning
        qi, ki, vi, gi = (t.clone() for t in (q, k, v, g))
        got = torch.ops.kerneltune.attention_backward(gi, qi, ki, vi, o, z, True, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_the_fallback_backward_benchmark_reports_both_side_by_side(capsys):
    """benchmarks/attention_fallback_bwd.py: both backwards timed at every shape, with provenance, as JSON."""
    import json
    import runpy

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "attention_fallback_bwd.py")
    mod = runpy.run_path(path)
    assert mod["main"](["--rounds", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" and out["torch"] == torch.__version__ and len(out["rows"]) == 2
    for row in out["rows"]:
        assert set(row["median_ms"]) == {"sdpa_recomputed", "exact_fp32"}
        assert all(v > 0 for v in row["median_ms"].values()) and row["exact_over_sdpa"] > 0


@pytest.mark.parametrize("forward", ["triton_flash", "triton_fa2"])
def test_the_triton_kernels_serve_both_directions_through_the_library_in_the_interpreter(tmp_path, forward):
    """A shipped Triton forward and the FA2 backward registered at three shapes (N = 1, ragged N, D = 80), both
    masks, checked on first use ($KERNELTUNE_VERIFY): a call autograd records takes both kernels, and its
    output and gradients match fp64. The backward kernel gets the forward's row logsumexp: triton_fa2's
    run_with_lse (nothing recomputes it), or, from triton_flash which has none, one recomputed in the forward."""
    in_interpreter("tests.library.test_attention", "both_directions_through_the_library", str(tmp_path), forward)


def both_directions_through_the_library(tmp: str, forward: str) -> None:
    """(Run in a fresh process under TRITON_INTERPRET=1 by the test above.)"""
    import json
    import shutil

    import kerneltune.registry as reg
    from kerneltune.library import serve
    from tests.library.conftest import SEEDS, entry_for

    la = importlib.import_module("kerneltune.library.attention")
    recomputed = []
    real_lse = la.row_logsumexp
    la.row_logsumexp = lambda *a: recomputed.append(1) or real_lse(*a)
    reg.shipped_path = lambda: os.path.join(tmp, "none.json")
    shapes = [(1, 1, 1, 64), (2, 3, 77, 64), (2, 2, 40, 80)]
    entries = []
    for op, rel in (("attention", f"attention/{forward}.py"),
                    ("attention_backward", "attention_backward/triton_fa2_bwd.py")):
        dst = os.path.join(tmp, "candidates", rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(os.path.join(SEEDS, rel), dst)
        entries += [entry_for(dst, op=op, dims=dict(zip("BHND", shape)), args={"causal": c}, backend="triton")
                    for shape in shapes for c in (True, False)]
    path = os.path.join(tmp, "registry.json")
    with open(path, "w") as f:
        json.dump({"format": 1, "entries": entries}, f)
    os.environ.update({reg.ENV_REGISTRY: path, reg.ENV_MIN_SPEEDUP: "0", serve.ENV_VERIFY: "1"})
    serve.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, shape in enumerate(shapes):
            for causal in (True, False):
                q, k, v = inputs(shape, torch.float32, 20 + i)
                out = kerneltune.attention(q, k, v, causal=causal)
                want, leaves = fp64_attention(q, k, v, causal, None)
                torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(i))
                for name, a, e in zip("qkv", grads(out, (q, k, v), g), grads(want, leaves, g.double())):
                    sc = max(float(e.abs().max()), 1e-2)
                    torch.testing.assert_close(a.double() / sc, e / sc, atol=2e-5, rtol=1e-4, msg=f"d{name}")
    assert kt_warnings(caught) == []
    assert kerneltune.served() == {"attention": {forward: 6}, "attention_backward": {"triton_fa2_bwd": 6}}
    assert len(recomputed) == (0 if forward == "triton_fa2" else 6)


def lse_forward(tmp_path, name):
    """tests/library/kernels/attention/torch_lse.py as ``name``: torch_lse_log2 is the same kernel with its
    logsumexp in log2 units (LSE_UNITS)."""
    src = os.path.join(TEST_KERNELS, "attention", "torch_lse.py")
    if name != "torch_lse":
        path = tmp_path / "kernels" / "attention" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(open(src).read().replace('LSE_UNITS = "natural"', 'LSE_UNITS = "log2"'))
        src = str(path)
    return src, {**FWD_48[1], "backend": "torch"}


def test_the_backward_kernel_takes_the_forward_kernels_logsumexp_once_checked(user_registry, monkeypatch,
                                                                            tmp_path):
    """A forward kernel with run_with_lse hands the backward kernel its row logsumexp (nothing recomputes it),
    checked on the first use of run_with_lse even after run was checked by an inference call; one whose lse is
    wrong (log2 units) is dropped there with a warning that names it, and the gradients stay right. Without
    run_with_lse the backward recomputes it, once a step, also where a checkpoint runs the forward twice."""
    la = importlib.import_module("kerneltune.library.attention")
    recomputed = []
    real = la.row_logsumexp
    monkeypatch.setattr(la, "row_logsumexp", lambda *a: recomputed.append(1) or real(*a))
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    call = lambda q, k, v, s: kerneltune.attention(q, k, v, causal=True, scale=s)  # noqa: E731
    cases = [((2, 3, 17, 48), None), ((2, 3, 17, 48), -0.3)]
    for name in ("torch_lse", "torch_lse_log2"):
        user_registry([lse_forward(tmp_path, name), BWD_48])
        kerneltune.reset_served()
        recomputed.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():  # run checked first, by an inference call
                call(*no_grad_inputs((2, 3, 17, 48), torch.float32, 1), None)
            check_grads(call, torch.float32, cases)
        msgs = kt_warnings(caught)
        if name == "torch_lse":
            assert msgs == [] and recomputed == []
            assert kerneltune.served() == {"attention": {name: 3}, "attention_backward": {"torch_math": 2}}
        else:  # dropped at its first run_with_lse: the reference forward, the backward kernel recomputes lse
            assert len(msgs) == 1 and name in msgs[0] and "lse" in msgs[0], msgs
            assert kerneltune.served() == {"attention": {name: 1, "reference": 2},
                                           "attention_backward": {"torch_math": 2}}
    user_registry([FWD_48, BWD_48])  # numba_cpu: no run_with_lse
    recomputed.clear()
    for reentrant in (False, True):
        q, k, v = inputs((2, 3, 17, 48), torch.float32, 4)
        out = torch.utils.checkpoint.checkpoint(call, q, k, v, None, use_reentrant=reentrant)
        out.sum().backward()
    assert recomputed == [1, 1]


def test_custom_ops_pass_opcheck():
    """torch's own consistency checks of the custom ops: schema, fake (meta) impl, autograd registration."""
    q, k, v = inputs((1, 2, 5, 8), torch.float32, 3)
    torch.library.opcheck(torch.ops.kerneltune.attention.default, (q, k, v, True, None))
    torch.library.opcheck(torch.ops.kerneltune.attention.default, (q, k, v, False, 0.5, True, True))
    g = torch.randn(1, 2, 5, 8)
    o = kerneltune.attention(q, k, v).detach()
    lse = torch.logsumexp(torch.randn(1, 2, 5, 5), -1)
    for lse_ok in (False, True):
        torch.library.opcheck(torch.ops.kerneltune.attention_backward.default,
                              (g, q.detach(), k.detach(), v.detach(), o, lse, True, 0.5, lse_ok))


def _sdpa_with_grads(q, k, v, causal, g):
    """torch SDPA's output and gradients: the independent reference."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
    return out.detach(), torch.autograd.grad(out, leaves, g)


def test_kerneltune_verify_checks_each_entry_point_on_its_first_use_only(user_registry, monkeypatch, tmp_path):
    """Training calls (autograd records them, a backward kernel serves) take the forward kernel's run_with_lse:
    KERNELTUNE_VERIFY checks it on the first such call, not on every one; an inference call then takes run,
    checked on its own first use, and once; the backward kernel is checked once too. Values and gradients match
    SDPA's throughout."""
    la = importlib.import_module("kerneltune.library.attention")
    checked, exact = [], []
    real_verify, real_exact = la._verify_forward, la._verify_backward
    monkeypatch.setattr(la, "_verify_forward", lambda *a: checked.append("run" if a[6] is None else "run_with_lse")
                        or real_verify(*a))
    monkeypatch.setattr(la, "_verify_backward", lambda *a: exact.append(1) or real_exact(*a))
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    user_registry([lse_forward(tmp_path, "torch_lse"), BWD_48])
    shape = (2, 3, 17, 48)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):  # training steps
            q, k, v = inputs(shape, torch.float32, 30 + step)
            out = kerneltune.attention(q, k, v, causal=True)
            g = torch.randn(shape, generator=torch.Generator().manual_seed(step))
            want, want_grads = _sdpa_with_grads(q, k, v, True, g)
            torch.testing.assert_close(out.detach(), want, atol=2e-5, rtol=1e-4)
            for a, e in zip(grads(out, (q, k, v), g), want_grads):
                torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)
        assert checked == ["run_with_lse"] and exact == [1]
        for step in range(3):  # inference calls: run
            q, k, v = no_grad_inputs(shape, torch.float32, 40 + step)
            torch.testing.assert_close(kerneltune.attention(q, k, v, causal=True),
                                       F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4)
    assert kt_warnings(caught) == []
    assert checked == ["run_with_lse", "run"] and exact == [1]
    assert kerneltune.served() == {"attention": {"torch_lse": 7}, "attention_backward": {"torch_math": 4}}


def test_the_output_is_a_new_tensor_on_every_path_contiguous_where_a_kernel_serves(user_registry, monkeypatch,
                                                                                    tmp_path):
    """(B, N, H, D) inputs viewed as (B, H, N, D), as nanoGPT-style code passes them: where no kernel serves
    and with KERNELTUNE_DISABLE, SDPA's output as it is (its layout: no copy added); where kernels serve,
    inference and training, a contiguous one. Never an input's storage, and SDPA's values and gradients."""
    B, N, H, D = 2, 17, 3, 48
    kernel = [False]

    def call(grad):
        base = [torch.randn(B, N, H, D, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        leaves = [t.requires_grad_(grad) for t in base]
        q, k, v = (t.transpose(1, 2) for t in leaves)
        assert not q.is_contiguous()
        with torch.set_grad_enabled(grad):
            out = kerneltune.attention(q, k, v, causal=True)
        assert out.shape == (B, H, N, D) and (out.is_contiguous() or not kernel[0])
        assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in leaves)
        want = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
        torch.testing.assert_close(out.detach(), want, atol=2e-5, rtol=1e-4)
        if grad:
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
            _, want_grads = _sdpa_with_grads(q, k, v, True, g)
            for a, e in zip(torch.autograd.grad(out, leaves, g), want_grads):
                torch.testing.assert_close(a, e.transpose(1, 2), atol=2e-5, rtol=1e-4)

    for grad in (False, True):  # no registry: SDPA
        call(grad)
    assert kerneltune.served() == {"attention": {"reference": 2}, "attention_backward": {"reference": 1}}
    user_registry([lse_forward(tmp_path, "torch_lse"), BWD_48])
    monkeypatch.setenv("KERNELTUNE_DISABLE", "1")
    kerneltune.reset_served()
    for grad in (False, True):
        call(grad)
    assert kerneltune.served() == {"attention": {"reference": 2}, "attention_backward": {"reference": 1}}
    monkeypatch.delenv("KERNELTUNE_DISABLE")
    kerneltune.reset_served()
    kernel[0] = True
    for grad in (False, True):
        call(grad)
    assert kerneltune.served() == {"attention": {"torch_lse": 2}, "attention_backward": {"torch_math": 1}}


def test_kernels_are_launched_under_the_device_guard_of_their_tensors(user_registry, monkeypatch, tmp_path):
    """The forward (run and run_with_lse) and backward kernels run inside serve.device_guard(q.device), which
    makes q's GPU the current one where it is not (tests/library/test_serve.py tests the guard itself with a
    mocked CUDA); here a recording guard on CPU, the results still SDPA's."""
    from kerneltune.library import serve

    user_registry([lse_forward(tmp_path, "torch_lse"), BWD_48])
    events, depth = [], [0]

    @contextlib.contextmanager
    def guard(device):
        events.append(("guard", str(device)))
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def recorded(fn, name):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            events.append((name, depth[0] == 1))
            return fn(*a, **kw)

        return wrapper

    la = importlib.import_module("kerneltune.library.attention")
    q = torch.zeros(2, 3, 17, 48)
    fwd, bwd = la._choose(la.OP, q, True), la._choose(la.OP_BACKWARD, q, True)
    monkeypatch.setitem(fwd.run.__globals__, "run_with_lse", recorded(fwd.run.__globals__["run_with_lse"], "fwd lse"))
    monkeypatch.setitem(serve._kernels, serve.entry_id(fwd.entry), recorded(fwd.run, "fwd run"))
    monkeypatch.setitem(serve._kernels, serve.entry_id(bwd.entry), recorded(bwd.run, "bwd run"))
    monkeypatch.setattr(serve, "device_guard", guard)
    q, k, v = inputs((2, 3, 17, 48), torch.float32, 3)
    out = kerneltune.attention(q, k, v, causal=True)
    g = torch.randn(out.shape)
    got = grads(out, (q, k, v), g)
    with torch.no_grad():
        out2 = kerneltune.attention(q, k, v, causal=True)
    want, want_grads = _sdpa_with_grads(q, k, v, True, g)
    for a, e in zip((out.detach(), out2, *got), (want, want, *want_grads)):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)
    assert events == [("guard", "cpu"), ("fwd lse", True), ("guard", "cpu"), ("bwd run", True),
                      ("guard", "cpu"), ("fwd run", True), ("fwd lse", True)]  # torch_lse's run calls run_with_lse
    assert kerneltune.served() == {"attention": {"torch_lse": 2}, "attention_backward": {"torch_math": 1}}
