"""attention (forward): o = softmax(q kᵀ · scale [+ causal mask]) v.

Contract (DESIGN.md): ``run(q, k, v, causal=True, scale=None) -> Tensor``; q, k, v: (B, H, N, D),
contiguous, one dtype (fp32, fp16, bf16), 1 <= D <= 256; returns a new (B, H, N, D) tensor of that
dtype; scale defaults to 1/sqrt(D); inputs are not modified. Causal: query i sees keys j <= i.

Work: FLOPs = 4·B·H·N²·D (two matmuls of 2·N²·D each per head), halved when causal.
Bytes (the floor): read q, k, v and write o once = 4·B·H·N·D·itemsize.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch

from kerneltune.ops.base import DTYPES, Case, Inputs, OpSpec, Tolerance, compare_tensor, dtype_name, rel_seed


class ContractError(Exception):
    """A candidate broke the op contract (wrong return type, aliasing an input …): verdict ``rejected``."""


_TOL = {
    # fp32 means fp32 accuracy: tf32 (≈3e-4) and half precision (≈5e-4) fail the norm test.
    "float32": Tolerance(atol=2e-5, rtol=1e-3, norm_rtol=5e-5),
    "float16": Tolerance(atol=2e-3, rtol=1e-2, norm_rtol=3e-3),
    "bfloat16": Tolerance(atol=1.6e-2, rtol=5e-2, norm_rtol=2.5e-2),
}


def _case(b: int, h: int, n: int, d: int, dtype: str, causal: bool) -> Case:
    tag = "causal" if causal else "full"
    return Case(name=f"B{b} H{h} N{n} D{d} {tag} {dtype}", dims={"B": b, "H": h, "N": n, "D": d},
                dtype=dtype, args={"causal": causal})


class Attention(OpSpec):
    name = "attention"
    signature = "run(q, k, v, causal=True, scale=None) -> Tensor"
    summary = "attention forward: softmax(q kᵀ·scale [+ causal mask]) v over (B, H, N, D) tensors"
    forbidden_source = ("scaled_dot_product", "multi_head_attention_forward")
    forbidden_attrs = (
        ("torch.nn.functional", "scaled_dot_product_attention"),
        ("torch._C._nn", "scaled_dot_product_attention"),
        ("torch.nn.functional", "multi_head_attention_forward"),
    )
    forbidden_aten = (
        "scaled_dot_product_attention",
        "_scaled_dot_product_attention_math",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_fused_sdp_choice",
    )
    outputs = ("out",)
    unchanged = ("q", "k", "v")
    primary_baseline = "sdpa"

    # -- cases -----------------------------------------------------------------------------------------
    def smoke_case(self) -> Case:
        return _case(1, 2, 16, 32, "float32", True)

    def check_cases(self, device: str) -> list[Case]:
        shapes = [  # awkward on purpose: N=1, N and D off every block size, odd head counts
            (1, 1, 1, 64, True), (2, 3, 17, 48, False), (1, 2, 127, 80, True), (1, 1, 33, 128, False),
            (3, 1, 64, 16, True), (1, 5, 200, 64, True), (1, 1, 1, 8, False),
        ]
        cases = [_case(*s[:4], "float32", s[4]) for s in shapes]
        for dtype in ("float16", "bfloat16"):
            cases += [_case(*s[:4], dtype, s[4]) for s in shapes[:4]]
        return cases

    def timed_cases(self, device: str) -> list[Case]:
        if device == "cuda":
            return [_case(8, 16, 2048, 128, "bfloat16", True), _case(4, 32, 4096, 64, "bfloat16", False)]
        return [_case(2, 8, 512, 64, "float32", True)]

    def parse_case(self, text: str, dtype: str) -> Case:
        """'B,H,N,D' or 'B,H,N,D,causal|full', e.g. '2,8,512,64,causal'."""
        parts = [p.strip() for p in re.split(r"[,x ]+", text.strip()) if p.strip()]
        causal = True
        if parts and parts[-1].lower() in ("causal", "full", "noncausal", "non-causal"):
            causal = parts.pop().lower() == "causal"
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"attention shape {text!r}: write B,H,N,D[,causal|full] with positive integers, "
                             "e.g. 2,8,512,64,causal")
        b, h, n, d = (int(p) for p in parts)
        if d > 256:
            raise ValueError(f"attention shape {text!r}: head dim D={d} is over the contract's 256")
        return _case(b, h, n, d, dtype_name(dtype), causal)

    # -- data --------------------------------------------------------------------------------------------
    def make_inputs(self, case: Case, seed: int) -> Inputs:
        g = torch.Generator().manual_seed(rel_seed("attention", case.name, seed))
        b, h, n, d = (case.dims[x] for x in "BHND")
        dt = DTYPES[case.dtype]
        gain = (1.0, 1.0, 2.5)[seed % 3]  # larger logits on some seeds: a missing max-subtraction shows
        q = (torch.randn(b, h, n, d, generator=g) * gain).to(dt)  # (B, H, N, D)
        k = torch.randn(b, h, n, d, generator=g).to(dt)
        v = torch.randn(b, h, n, d, generator=g).to(dt)
        scale = None if seed % 2 == 0 else float(0.05 + 0.45 * torch.rand((), generator=g))
        return Inputs(tensors={"q": q, "k": k, "v": v}, args={"causal": bool(case.args["causal"]), "scale": scale})

    def reference(self, inputs: Inputs) -> dict[str, Any]:
        q, k, v = (inputs.tensors[x].to(torch.float64) for x in ("q", "k", "v"))  # (B, H, N, D)
        scale = inputs.args["scale"]
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        s = (q @ k.transpose(-1, -2)) * scale  # (B, H, N, N)
        if inputs.args["causal"]:
            n = q.shape[-2]
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return {"out": torch.softmax(s, dim=-1) @ v}  # (B, H, N, D)

    def tolerance(self, dtype: str) -> Tolerance:
        return _TOL[dtype]

    def compare(self, inputs: Inputs, expected: dict[str, Any], actual: dict[str, Any]) -> str:
        out = actual["out"]
        want_dtype = inputs.tensors["q"].dtype
        if out.dtype != want_dtype:
            return f"out: dtype {out.dtype} but the inputs are {want_dtype} (return the input dtype)"
        return compare_tensor("out", out, expected["out"], self.tolerance(dtype_name(str(want_dtype)[6:])))

    # -- worker side -------------------------------------------------------------------------------------
    def invoke(self, fn: Callable[..., Any], tensors: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        q, k, v = tensors["q"], tensors["k"], tensors["v"]
        out = fn(q, k, v, causal=args["causal"], scale=args["scale"])
        if type(out) is not torch.Tensor:  # noqa: E721 - subclasses (lazy tensors) are refused on purpose
            raise ContractError(f"run() returned {type(out).__module__}.{type(out).__qualname__}, "
                                "not a plain torch.Tensor (no subclasses, no lazy results)")
        if out.shape != q.shape or out.device != q.device:
            raise ContractError(f"run() returned shape {tuple(out.shape)} on {out.device}; the contract is "
                                f"{tuple(q.shape)} on {q.device}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if _overlaps(out, t):
                raise ContractError(f"run() returned {name} or a view of it; return a new tensor")
        return {"out": out}

    def baselines(self, device: str = "cpu") -> dict[str, Callable[..., Any]]:
        import torch.nn.functional as F

        def sdpa(q, k, v, causal=True, scale=None):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

        def torch_math(q, k, v, causal=True, scale=None):
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            s = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, N, N), fp32 softmax
            if causal:
                n = q.shape[-2]
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            return torch.softmax(s, dim=-1).to(q.dtype) @ v

        found: dict[str, Callable[..., Any]] = {"sdpa": sdpa, "torch_math": torch_math}
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                   ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                                   ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
                def pinned(q, k, v, causal=True, scale=None, _b=backend):
                    with sdpa_kernel(_b):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
                found[label] = pinned
        return found

    # -- work --------------------------------------------------------------------------------------------
    def flops(self, case: Case) -> float:
        b, h, n, d = (case.dims[x] for x in "BHND")
        f = 4.0 * b * h * n * n * d
        return f / 2 if case.args.get("causal") else f

    def bytes_moved(self, case: Case) -> float:
        b, h, n, d = (case.dims[x] for x in "BHND")
        return 4.0 * b * h * n * d * DTYPES[case.dtype].itemsize


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b share any bytes of storage."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.device != sb.device or sa.nbytes() == 0 or sb.nbytes() == 0:
        return False
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


SPEC = Attention()
