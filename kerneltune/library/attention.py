"""``kerneltune.attention``: softmax(q kᵀ·scale [+ causal mask]) v through the registry's winner, with autograd.

Two torch custom ops (``torch.library``), so ``torch.compile`` traces a call as one opaque node:

    kerneltune::attention(q, k, v, causal, scale, grad, want_lse) -> (out, lse)  # (B, H, N, D) -> (B, H, N, Dv)
    kerneltune::attention_backward(grad_out, q, k, v, out, lse, causal, scale, lse_ok) -> (dq, dk, dv)

A call enters them only where a registry kernel serves what the call needs: its backward, when autograd
records the call (grad mode on and q, k or v requiring grad), else its forward. Any other call is torch's
``scaled_dot_product_attention`` with SDPA's own backward, so the fallback costs nothing; in particular a
forward kernel with no backward kernel beside it never serves a call that will be differentiated (its
backward would have to recompute SDPA's forward: the step would pay a forward more than SDPA alone).
Inside them each op picks its kernel when it runs (``serve.choose``): a registry kernel for this device,
shape bucket and dtype (for the forward of a call autograd records, ``grad``, only where the backward has
one too), else the reference — torch's ``scaled_dot_product_attention``, forward or backward (its backward
after its forward recomputed from the saved q, k, v; under torch.compile the decision to enter the ops is
made once for every shape a traced site may see, since a traced shape may be symbolic, and this serves the
shapes no backward kernel reaches, at the cost of one more SDPA forward).

Registry kernels take the op contract's inputs: (B, H, N, D) with one shape for q, k, v, dtype fp32, fp16
or bf16, D <= 256. Other calls (cross-attention lengths, float64, other ranks) always get the reference.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kerneltune.library import serve
from kerneltune.ops.base import companion

OP = "attention"
OP_BACKWARD = "attention_backward"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHUNK_BYTES = 256 << 20  # the reference backward materialises at most this much of the score matrix at once


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """softmax(q kᵀ·scale [+ causal mask]) v for q, k, v of shape (B, H, N, D); scale defaults to 1/sqrt(D).

    Causal: query i sees keys j <= i. Differentiable in q, k and v; traceable by torch.compile
    (fullgraph). Served by the registry's winner for this device, shape and dtype (a call autograd records:
    only where a backward winner serves it), else by torch SDPA.
    """
    causal, scale = bool(causal), None if scale is None else float(scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    serves, want_lse = _may_serve(q, causal, grad) if _fits_contract(q, k, v) else (False, False)
    if not serves:
        # Nothing in the registry for this call: torch's SDPA as it is, with its own fused backward (the custom
        # ops, whose reference backward recomputes SDPA's forward, are for calls a registry kernel serves).
        # SDPA's output as it is: for transposed inputs it keeps their layout, which the caller's usual
        # transpose back makes contiguous without a copy (a .contiguous() here would add one to every call)
        out = sdpa(q, k, v, causal, scale)
        if not torch.compiler.is_compiling():
            serve.count(OP, serve.REFERENCE)
            if out.requires_grad:
                out.register_hook(_count_reference_backward)
        return out
    return torch.ops.kerneltune.attention(q, k, v, causal, scale, grad, want_lse)[0]


def _count_reference_backward(grad: Tensor) -> None:
    serve.count(OP_BACKWARD, serve.REFERENCE)


_may_serve_cache: dict[tuple[Any, ...], tuple[bool, bool]] = {}


def _may_serve(q: Tensor, causal: bool, grad: bool) -> tuple[bool, bool]:
    """(whether the call enters the custom ops, whether their forward hands the backward kernel the row
    logsumexp), remembered per call signature until the registry's answer may change (a training step makes
    dozens of identical calls: the fallback must cost next to nothing over SDPA itself). ``grad``: autograd
    records the call, so the backward is what a kernel must serve."""
    op = OP_BACKWARD if grad else OP
    if torch.compiler.is_compiling():  # a traced shape may be symbolic (dynamic=True, or a recompile after a new
        # shape): not by shape, and no logsumexp from the forward (whether its shape has kernels is not known)
        return _kernel_may_serve_some(q.device.type, q.device.index, _dtype(q), causal, op), False
    key = (q.device, q.shape, q.dtype, causal, op, serve.generation())
    hit = _may_serve_cache.get(key)
    if hit is None:
        hit = _kernel_may_serve(q, causal, op)
        if len(_may_serve_cache) > 4096:
            _may_serve_cache.clear()
        _may_serve_cache[key] = hit
    return hit


def _kernel_may_serve(q: Tensor, causal: bool, op: str) -> tuple[bool, bool]:
    """(whether the registry would serve ``op``, the forward or the backward, for this call; whether, a
    backward kernel serving, the forward kernel's file has ``run_with_lse`` to hand it the row logsumexp at no
    cost: otherwise the backward recomputes it, once, even where a checkpoint runs the forward twice)."""
    if _choose(op, q, causal).run is None:
        return False, False
    return True, op == OP_BACKWARD and companion(_choose(OP, q, causal).run, "run_with_lse") is not None


def _choose(op: str, q: Tensor, causal: bool) -> serve.Choice:
    """The registry's kernel for ``op`` at this call's device, shape, dtype and mask (``serve.choose``)."""
    return serve.choose(op, q.device, _dims(q), _dtype(q), {"causal": causal})


@torch.compiler.assume_constant_result
def _kernel_may_serve_some(device_type: str, index: Optional[int], dtype: str, causal: bool, op: str) -> bool:
    """Whether the registry could serve ``op`` for this device, dtype and mask at some shape (Registry.servable:
    its backend runs here, at or above the minimum speedup, its file intact; and not dropped in this process).
    torch.compile decides at trace time, where a shape may be symbolic: then a traced call is the custom ops,
    which pick per shape when they run (the reference for a shape no kernel reaches); else SDPA in the graph,
    with SDPA's own backward."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    found = serve.registry().servable((op,), device, dtype, {"causal": causal})
    return any(not serve.is_bad(e) for e in found)


def _fits_contract(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (q.dim() == 4 and k.shape == q.shape and v.shape == q.shape and q.dtype in _KERNEL_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and 1 <= q.shape[-1] <= 256 and q.device == k.device == v.device
            and q.device.type in ("cpu", "cuda"))


def _dims(q: Tensor) -> dict[str, int]:
    b, h, n, d = q.shape
    return {"B": b, "H": h, "N": n, "D": d}


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# -- forward ------------------------------------------------------------------------------------------------
@torch.library.custom_op("kerneltune::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float], grad: bool = False,
                  want_lse: bool = False) -> tuple[Tensor, Tensor]:
    """(out, lse). ``grad``: autograd records the call. A forward kernel then serves only where a backward
    kernel serves this shape too (else SDPA's backward, after SDPA's forward recomputed, would follow it: the
    kernel's time on top of all of SDPA's); this matters where the decision to enter the op was made without
    the shape (torch.compile: for every shape of a traced site at once) or before a backward kernel was
    dropped. ``want_lse`` (asked where the forward kernel has ``run_with_lse``): lse is the fp32 (B, H, N)
    natural-log row logsumexp the backward kernel takes, from it (recomputed where the kernel failed);
    otherwise zeros, never read."""
    out = lse = None
    fits = _fits_contract(q, k, v)
    if fits:
        choice = _choose(OP, q, causal)
        if choice.run is not None and (not grad or _choose(OP_BACKWARD, q, causal).run is not None):
            got = _run_kernel(choice, q, k, v, causal, scale, want_lse)
            if got is not None:
                serve.count(OP, choice.name)
                out, lse = got
    if out is None:
        serve.count(OP, serve.REFERENCE)
        out = reference_forward(q, k, v, causal, scale)
    if lse is None:
        lse = (row_logsumexp(q, k, causal, scale) if want_lse and fits
               else q.new_zeros(q.shape[:-1], dtype=torch.float32))
    return out, lse


@_attention_op.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float], grad: bool = False,
                    want_lse: bool = False) -> tuple[Tensor, Tensor]:
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


def reference_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float]) -> Tensor:
    """torch's scaled_dot_product_attention, returned contiguous (the layout the fake promises)."""
    return sdpa(q, k, v, causal, scale).contiguous()


def sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float]) -> Tensor:
    """torch's scaled_dot_product_attention, a scale of 0 or below given as the same scores at a positive one:
    torch's causal path is NaN there (its mask goes in before the scale). q kᵀ·s = (-q) kᵀ·|s|, and at s = 0
    every score is 0, as (0·q) kᵀ (which keeps q in the graph: its gradient is 0)."""
    if scale is not None and scale <= 0:
        q, scale = (-q, -scale) if scale < 0 else (q * 0.0, 1.0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _run_kernel(choice: serve.Choice, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float],
                want_lse: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """(out, lse) of the registry kernel, lse None unless ``want_lse`` and the kernel's file has
    ``run_with_lse``; None when it failed (it is then dropped for this process)."""
    e = choice.entry
    assert e is not None and choice.run is not None
    with_lse = companion(choice.run, "run_with_lse") if want_lse else None
    try:
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        with serve.device_guard(q.device):  # a launch on q's GPU where it is not the current one
            if with_lse is not None:
                out, lse = with_lse(qc, kc, vc, causal=causal, scale=scale)
            else:
                out, lse = choice.run(qc, kc, vc, causal=causal, scale=scale), None
    except Exception as ex:  # noqa: BLE001 - a kernel that raises never takes the caller down
        serve.mark_bad(e, f"{e.name} raised {type(ex).__name__}: {ex}")
        return None
    if type(out) is not torch.Tensor or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:  # noqa: E721
        serve.mark_bad(e, f"{e.name} returned {getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}, "
                          f"not {tuple(q.shape)} {q.dtype}")
        return None
    if with_lse is not None and (type(lse) is not torch.Tensor or lse.shape != q.shape[:-1]  # noqa: E721
                                 or lse.dtype != torch.float32 or lse.device != q.device):
        serve.mark_bad(e, f"{e.name}'s run_with_lse returned an lse of {getattr(lse, 'shape', type(lse))} "
                          f"{getattr(lse, 'dtype', '')}, not {tuple(q.shape[:-1])} torch.float32")
        return None
    part = "run_with_lse" if with_lse is not None else ""  # the entry point that ran
    if serve.verify_pending(e, part):  # run and run_with_lse each checked on its own first use, and only then
        why = _verify_forward(q, k, v, causal, scale, out, lse)
        if why:
            serve.verify_failed(OP, e, why)
            return None
        serve.mark_verified(e, part)
    return out.contiguous(), None if lse is None else lse.contiguous()


def _verify_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float], out: Tensor,
                    lse: Tensor | None = None) -> str:
    """'' when ``out`` (and ``lse``, where given) match the op's fp64 reference within the evaluator's
    tolerance for the dtype."""
    from kerneltune.ops import get_op
    from kerneltune.ops.base import Inputs

    spec = get_op(OP)
    args: dict[str, Any] = {"causal": causal, "scale": scale}
    actual = {"out": out.detach().cpu()}
    if lse is not None:
        args["lse"] = True
        actual["lse"] = lse.detach().cpu()
    inputs = Inputs({"q": q.detach().cpu(), "k": k.detach().cpu(), "v": v.detach().cpu()}, args)
    return spec.compare(inputs, spec.reference(inputs), actual)


# -- backward -----------------------------------------------------------------------------------------------
@torch.library.custom_op("kerneltune::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           causal: bool, scale: Optional[float], lse_ok: bool = False
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """``lse``: the forward's row logsumexp where ``lse_ok`` (the forward was asked for it), else recomputed
    here when a backward kernel needs it."""
    if _fits_contract(q, k, v) and grad_out.shape == q.shape:
        choice = _choose(OP_BACKWARD, q, causal)
        if choice.run is not None:
            given = lse if lse_ok and lse.shape == q.shape[:-1] else row_logsumexp(q, k, causal, scale)
            grads = _run_backward_kernel(choice, grad_out, q, k, v, out, given, causal, scale)
            if grads is not None:
                serve.count(OP_BACKWARD, choice.name)
                return grads
    serve.count(OP_BACKWARD, serve.REFERENCE)
    return reference_backward(grad_out, q, k, v, causal, scale)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             causal: bool, scale: Optional[float], lse_ok: bool = False
                             ) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def reference_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                       scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """SDPA's own backward (its flash, cuDNN or memory-efficient kernel where one takes the call), after its
    forward recomputed from q, k, v. A custom op's body runs with autograd's dispatch keys excluded, so they
    are let back in for it (torch's ``_ForceDispatchKeyGuard``, the rest of the dispatch state as it was).
    Where this torch has no such guard, or autograd still records nothing under it, the exact backward
    serves, with one warning; inference tensors (which autograd cannot save) take it silently. Any other
    error is SDPA's own, and raised."""
    if torch.is_inference_mode_enabled() or any(t.is_inference() for t in (grad_out, q, k, v)):
        return exact_backward(grad_out, q, k, v, causal, scale)
    try:
        guard = _autograd_back_on()
    except (AttributeError, TypeError) as ex:  # a torch without these parts, or with another signature
        return _exact_instead(f"{type(ex).__name__}: {ex}", grad_out, q, k, v, causal, scale)
    with guard, torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        out = sdpa(*leaves, causal, scale)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype)) if out.grad_fn is not None else None
    if grads is None:
        return _exact_instead("autograd recorded nothing", grad_out, q, k, v, causal, scale)
    dq, dk, dv = grads
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _exact_instead(why: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                   scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    serve.warn_once(f"kerneltune.attention: SDPA's backward cannot run inside the custom op on this torch "
                    f"({why}); the exact fp32 backward serves instead (slower)")
    return exact_backward(grad_out, q, k, v, causal, scale)


def _autograd_back_on() -> Any:
    """A guard that runs its block with autograd's dispatch keys taken out of the thread's excluded keys."""
    dk = torch._C.DispatchKey
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (dk.AutogradFunctionality, dk.AutogradOther, dk.AutogradNestedTensor):
        excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def exact_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                   scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Exact gradients of softmax(q kᵀ·scale [+ mask]) v, recomputed in fp32 (fp64 for fp64 inputs): the
    reference backward where SDPA's cannot run inside the custom op, and for inference tensors. (A backward kernel
    is checked on its first call, $KERNELTUNE_VERIFY, by the attention_backward op's own check instead:
    ``_verify_backward``.)

    Per block of query rows (so at most _CHUNK_BYTES of scores at a time), with P = softmax(S):
        dV += Pᵀ dO;  dP = dO Vᵀ;  dS = P ∘ (dP - rowsum(dP ∘ P));  dQ = dS K·scale;  dK += dSᵀ Q·scale
    Causal masking is top-left aligned, as in SDPA: query i sees keys j <= i.
    """
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    nk = k.shape[-2]
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf, gf = (t.detach().to(ct) for t in (q, k, v, grad_out))  # (..., N, D), (..., Nk, D), (..., Nk, Dv)
    cf = torch.contiguous_format  # the layout the fake promises, whatever the saved inputs' strides
    dq = torch.empty_like(qf, memory_format=cf)
    dk = torch.zeros_like(kf, memory_format=cf)
    dv = torch.zeros_like(vf, memory_format=cf)
    for i0, i1 in _row_blocks(q, nk, qf.element_size()):
        s = (qf[..., i0:i1, :] @ kf.transpose(-1, -2)) * sc               # (..., m, Nk)
        if causal:
            s = s.masked_fill(_causal_mask(i0, i1, nk, q.device), float("-inf"))
        p = torch.softmax(s, dim=-1)                                       # (..., m, Nk)
        g = gf[..., i0:i1, :]                                              # (..., m, Dv)
        dv += p.transpose(-1, -2) @ g
        dp = g @ vf.transpose(-1, -2)                                      # (..., m, Nk)
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
        dq[..., i0:i1, :] = (ds @ kf) * sc
        dk += (ds.transpose(-1, -2) @ qf[..., i0:i1, :]) * sc
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _run_backward_kernel(choice: serve.Choice, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, causal: bool, scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor] | None:
    """A registry ``attention_backward`` kernel: ``run(q, k, v, o, do, lse, causal=, scale=) -> (dq, dk, dv)``."""
    e = choice.entry
    assert e is not None and choice.run is not None
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    try:
        with serve.device_guard(q.device):  # a launch on q's GPU where it is not the current one
            grads = tuple(choice.run(q, k, v, out, grad_out, lse, causal=causal, scale=scale))
    except Exception as ex:  # noqa: BLE001 - a kernel that raises never takes the caller down
        serve.mark_bad(e, f"{e.name} raised {type(ex).__name__}: {ex}")
        return None
    if len(grads) != 3 or any(type(g) is not torch.Tensor or g.shape != t.shape or g.dtype != t.dtype  # noqa: E721
                              for g, t in zip(grads, (q, k, v))):
        serve.mark_bad(e, f"{e.name} did not return (dq, dk, dv) shaped and typed like (q, k, v)")
        return None
    if choice.verify:
        why = _verify_backward(q, k, v, out, grad_out, lse, causal, scale, grads)
        if why:
            serve.verify_failed(OP_BACKWARD, e, why)
            return None
        serve.mark_verified(e)
    dq, dk, dv = (g.contiguous() for g in grads)
    return dq, dk, dv


def _verify_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, lse: Tensor, causal: bool,
                     scale: Optional[float], grads: tuple[Tensor, ...]) -> str:
    """'' when ``grads`` (dq, dk, dv) pass the evaluator's own check of the attention_backward op on the inputs the
    kernel was given: its fp64 reference, with Δ = rowsum(dO ∘ O) from that ``out`` (rounded to the dtype, as the
    kernel had it), and its tolerances (relative to each gradient's size). On CPU copies, as the evaluator's parent
    holds them; the reference takes a large problem to the GPU where there is one (``reference_device``)."""
    from kerneltune.ops import get_op
    from kerneltune.ops.base import Inputs

    spec = get_op(OP_BACKWARD)
    tensors = {name: t.detach().cpu() for name, t in (("q", q), ("k", k), ("v", v), ("o", out), ("do", grad_out),
                                                          ("lse", lse))}
    inputs = Inputs(tensors, {"causal": causal, "scale": scale})
    actual = {name: g.detach().cpu() for name, g in zip(spec.outputs, grads)}
    return spec.compare(inputs, spec.reference(inputs), actual)


def row_logsumexp(q: Tensor, k: Tensor, causal: bool, scale: Optional[float]) -> Tensor:
    """(B, H, N) fp32 natural-log logsumexp of each row of the scaled, masked scores q kᵀ·scale."""
    nk = k.shape[-2]
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf = q.float(), k.float()
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for i0, i1 in _row_blocks(q, nk, qf.element_size()):
        s = (qf[..., i0:i1, :] @ kf.transpose(-1, -2)) * sc               # (..., m, Nk)
        if causal:
            s = s.masked_fill(_causal_mask(i0, i1, nk, q.device), float("-inf"))
        lse[..., i0:i1] = torch.logsumexp(s, dim=-1)
    return lse


def _row_blocks(q: Tensor, nk: int, itemsize: int) -> list[tuple[int, int]]:
    """Blocks of query rows whose (…, rows, Nk) score tiles (three of them) stay under _CHUNK_BYTES."""
    n = q.shape[-2]
    lead = max(1, math.prod(q.shape[:-2]))
    rows = max(1, _CHUNK_BYTES // max(1, lead * nk * itemsize * 3))
    return [(i0, min(n, i0 + rows)) for i0 in range(0, n, rows)]


def _causal_mask(i0: int, i1: int, nk: int, device: torch.device) -> Tensor:
    """(rows, Nk) True where key j > query i (masked), top-left aligned as in SDPA."""
    return torch.arange(i0, i1, device=device)[:, None] < torch.arange(nk, device=device)[None, :]


# -- autograd -----------------------------------------------------------------------------------------------
def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, causal, scale, _, want_lse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.lse_ok = causal, scale, want_lse
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, grad_out: Tensor, _grad_lse: Any) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.kerneltune.attention_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.causal,
                                                         ctx.scale, ctx.lse_ok)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
