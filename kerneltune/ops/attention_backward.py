"""attention_backward: dq, dk, dv of o = softmax(q kᵀ · scale [+ causal mask]) v, given dO and the forward's row statistics.

Contract: ``run(q, k, v, o, do, lse, causal=True, scale=None) -> (dq, dk, dv)``; q, k, v, o, do: (B, H, N, D),
contiguous, one dtype (fp32, fp16, bf16), 1 <= D <= 256; lse: fp32 (B, H, N), the natural-log logsumexp of
the scaled, masked scores of each row (what attention's ``run_with_lse`` returns); o the forward output in
the input dtype. Returns three new (B, H, N, D) tensors of the input dtype; inputs are not modified.

    P  = exp(q kᵀ·scale [masked] - lse)          (B, H, N, N)
    dV = Pᵀ dO;   dP = dO Vᵀ;   Δ = rowsum(dO ∘ O);   dS = P ∘ (dP - Δ)
    dQ = scale · dS K;   dK = scale · dSᵀ Q

The reference is the gradient in fp64 at (q, k, v, dO): its own P from q, k, v (never the fp32 lse the
candidate is given), and Δ from the o the candidate is given (rounded to the dtype), as the formula above
has it: where a row's softmax is peaked (the check cases of low scores), dP - Δ cancels, and the rounding of
o alone took an exact backward past the tolerance when Δ came from the exact O. Large problems go head by
head in row blocks, on the parent's GPU when it has one (see attention.attention_fp64).

Work: FLOPs = 10·B·H·N²·D (five N×N×D matmuls, 2.5× the forward), halved when causal.
Bytes (the floor): read q, k, v, o, do and write dq, dk, dv once (8·B·H·N·D·itemsize) + lse (4·B·H·N).

Baselines (timed without their forward): ``sdpa`` is the backward of torch's default SDPA backend, i.e.
``torch.autograd.grad`` through a graph whose forward ran once per input values, outside the timed calls
(the backend's own saved output and logsumexp, as in training); the pinned flash, cuDNN and efficient
backends, ``torch_math`` and (on CUDA) ``torch_compile`` (the math version through ``torch.compile``, its
compiled AOTAutograd backward) the same way; ``sdpa_fwd_bwd`` includes the forward (labelled secondary).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from kerneltune.ops.attention import (
    _REF_BYTES,
    VALUES,
    ContractError,
    _case,  # attention's cases (its VALUES too), never with lse here
    _overlaps,
    _reference_device,
    attention_fp64,
    draw,
    half_multiblock_cases,
)
from kerneltune.ops.attention import SPEC as _ATTENTION
from kerneltune.ops.base import DTYPES, Case, Inputs, OpSpec, Tolerance, compare_tensor, dtype_name, rel_seed

# Relative to the RMS of each gradient: a gradient has elements near 0 that a plain rtol cannot judge.
# fp32: fp32 accuracy (tf32 ≈ 1e-3 fails the norm test); fp16/bf16: P and dS rounded for the tensor cores
# as every fused backward does, accumulated in fp32; the element-wise atol admits the outliers of a plain
# half-precision autograd backward (dP rounded before dP - Δ cancels), the norm test stays tight.
_TOL = {
    "float32": Tolerance(atol=1e-4, rtol=1e-3, norm_rtol=1e-4),
    "float16": Tolerance(atol=3e-2, rtol=2e-2, norm_rtol=5e-3),
    "bfloat16": Tolerance(atol=2e-1, rtol=1e-1, norm_rtol=4e-2),
}


def attention_bwd_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal: bool,
                       scale: float | None, o: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in fp64 on the CPU, the exact gradient at (q, k, v) for upstream gradient do; with ``o``,
    Δ = rowsum(dO ∘ O) is taken from that o (the forward's output as a backward is given it, rounded to its
    dtype) instead of the exact O."""
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if b * h * n * n * 8 <= _REF_BYTES:
        q64, k64, v64, do64 = (x.to(torch.float64) for x in (q, k, v, do))
        s = (q64 @ k64.transpose(-1, -2)) * scale  # (B, H, N, N)
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        o64 = p @ v64 if o is None else o.to(s.device, torch.float64)
        dv = p.transpose(-1, -2) @ do64
        dp = do64 @ v64.transpose(-1, -2)
        ds = p * (dp - (do64 * o64).sum(-1, keepdim=True))
        return ((ds @ k64) * scale).cpu(), ((ds.transpose(-1, -2) @ q64) * scale).cpu(), dv.cpu()
    dev = _reference_device(float(b) * h * n * n * d)
    dq = torch.empty(b, h, n, d, dtype=torch.float64)
    dk = torch.empty(b, h, n, d, dtype=torch.float64)
    dv = torch.empty(b, h, n, d, dtype=torch.float64)
    rows = max(1, min(n, _REF_BYTES // (8 * n)))
    for bi in range(b):
        for hi in range(h):
            qh, kh, vh, doh = (x[bi, hi].to(dev).to(torch.float64) for x in (q, k, v, do))  # (N, D)
            dkh = torch.zeros_like(kh)
            dvh = torch.zeros_like(vh)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                kend = r1 if causal else n
                s = (qh[r0:r1] @ kh[:kend].T) * scale  # (R, kend)
                if causal:
                    i = torch.arange(r0, r1, device=dev)[:, None]
                    s = s.masked_fill(torch.arange(kend, device=dev)[None, :] > i, float("-inf"))
                p = torch.softmax(s, dim=-1)
                oh = p @ vh[:kend] if o is None else o[bi, hi, r0:r1].to(dev, torch.float64)  # (R, D)
                dvh[:kend] += p.T @ doh[r0:r1]
                dp = doh[r0:r1] @ vh[:kend].T
                ds = p * (dp - (doh[r0:r1] * oh).sum(-1, keepdim=True))
                dq[bi, hi, r0:r1] = ((ds @ kh[:kend]) * scale).cpu()
                dkh[:kend] += (ds.T @ qh[r0:r1]) * scale
            dk[bi, hi] = dkh.cpu()
            dv[bi, hi] = dvh.cpu()
    return dq, dk, dv


def sketch_bases(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
                 u: torch.Tensor, do: torch.Tensor | None = None, o: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """The timed calls' check (OpSpec.vouch_bases): with the rows of U (K × B·H·N, fp64) laid over the rows of
    every head, U·blockdiag(P) ("P", the forward's: U·out = G·v) and, with ``do``, U·blockdiag(Pᵀ) ("Pt":
    U·dv = G·dO) and scale·U·blockdiag(dSᵀ) ("dSt": U·dk = G·q), dS from ``o`` as the reference takes it.
    fp64 on the CPU; head by head in row blocks, on the GPU when the parent has one, as the references."""
    b, h, n, d = q.shape
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    dev = _reference_device(float(b) * h * n * n * d) if b * h * n * n * 8 > _REF_BYTES else torch.device("cpu")
    kk = u.shape[0]
    names = ("P",) if do is None else ("P", "Pt", "dSt")
    out = {x: torch.zeros(kk, b * h * n, dtype=torch.float64) for x in names}
    rows = max(1, min(n, _REF_BYTES // (8 * n)))
    for bi in range(b):
        for hi in range(h):
            c0 = (bi * h + hi) * n
            uh = u[:, c0:c0 + n].to(dev, torch.float64)  # (K, N)
            qh, kh, vh = (x[bi, hi].to(dev).to(torch.float64) for x in (q, k, v))
            gp = torch.zeros(kk, n, dtype=torch.float64, device=dev)
            gpt = torch.zeros(kk, n, dtype=torch.float64, device=dev)
            gds = torch.zeros(kk, n, dtype=torch.float64, device=dev)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                kend = r1 if causal else n
                s = (qh[r0:r1] @ kh[:kend].T) * sc
                if causal:
                    i = torch.arange(r0, r1, device=dev)[:, None]
                    s = s.masked_fill(torch.arange(kend, device=dev)[None, :] > i, float("-inf"))
                p = torch.softmax(s, dim=-1)  # (R, kend)
                gp[:, :kend] += uh[:, r0:r1] @ p
                if do is not None:
                    doh = do[bi, hi, r0:r1].to(dev, torch.float64)
                    oh = p @ vh[:kend] if o is None else o[bi, hi, r0:r1].to(dev, torch.float64)
                    ds = p * (doh @ vh[:kend].T - (doh * oh).sum(-1, keepdim=True))
                    gpt[:, r0:r1] = uh[:, :kend] @ p.T
                    gds[:, r0:r1] = (uh[:, :kend] @ ds.T) * sc
            out["P"][:, c0:c0 + n] = gp.cpu()
            if do is not None:
                out["Pt"][:, c0:c0 + n] = gpt.cpu()
                out["dSt"][:, c0:c0 + n] = gds.cpu()
    return out


class AttentionBackward(OpSpec):
    name = "attention_backward"
    signature = "run(q, k, v, o, do, lse, causal=True, scale=None) -> (dq, dk, dv)"
    summary = "attention backward: dq, dk, dv from q, k, v, o, dO and the forward's fp32 logsumexp per row"
    forbidden_source = _ATTENTION.forbidden_source + ("_attention_backward",)
    forbidden_attrs = _ATTENTION.forbidden_attrs
    forbidden_aten = _ATTENTION.forbidden_aten + (
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward",
        "_scaled_dot_product_fused_attention_overrideable_backward",
        "_flash_attention_backward",
        "_efficient_attention_backward",
    )
    outputs = ("dq", "dk", "dv")
    scaled_input = "do"  # each timed call gets dO with a fresh factor a query row (o and lse fixed; vouch_bases)
    unchanged = ("q", "k", "v", "o", "do", "lse")
    primary_baseline = "sdpa"

    # -- cases -----------------------------------------------------------------------------------------
    def smoke_case(self) -> Case:
        return _case(1, 2, 16, 32, "float32", True)

    def check_cases(self, device: str) -> list[Case]:
        shapes = [  # awkward on purpose: N=1, N and D off every block size, odd head counts
            (1, 1, 1, 64, True), (2, 3, 17, 48, False), (1, 2, 127, 80, True), (1, 1, 33, 128, False),
            (3, 1, 64, 16, True), (1, 1, 1, 8, False),
        ]
        cases = [_case(*s[:4], "float32", s[4]) for s in shapes]
        for dtype in ("float16", "bfloat16"):
            cases += [_case(*s[:4], dtype, s[4]) for s in shapes[1:3]]
        # values that random draws never reach (attention's VALUES), at shapes already compiled above
        cases += [_case(*s[:4], dtype, s[4], values="low_scores")
                  for dtype in ("float16", "bfloat16") for s in shapes[1:3]]
        cases += [_case(*s[:4], "float32", s[4], values=values)
                  for values in VALUES[1:] for s in shapes[1:3]]
        cases += half_multiblock_cases(device, lse=False)
        return cases

    def timed_cases(self, device: str) -> list[Case]:
        if device == "cuda":
            return [_case(4, 16, 4096, 128, "bfloat16", True), _case(8, 32, 2048, 64, "bfloat16", False)]
        return [_case(2, 4, 256, 64, "float32", True)]

    def parse_case(self, text: str, dtype: str) -> Case:
        """'B,H,N,D' or 'B,H,N,D,causal|full', as attention."""
        c = _ATTENTION.parse_case(text, dtype)
        return _case(*(c.dims[x] for x in "BHND"), c.dtype, c.args["causal"])

    # -- data --------------------------------------------------------------------------------------------
    def make_inputs(self, case: Case, seed: int) -> Inputs:
        g = torch.Generator().manual_seed(rel_seed("attention_backward", case.name, seed))
        t, scale = draw(case, g, seed, ("q", "k", "v", "do"))  # (B, H, N, D) each
        return self._with_forward(t, bool(case.args["causal"]), scale)

    @staticmethod
    def _with_forward(t: dict[str, torch.Tensor], causal: bool, scale: float | None) -> Inputs:
        """The inputs plus o (rounded to the dtype) and lse (fp32) of the forward at q, k, v."""
        o, lse = attention_fp64(t["q"], t["k"], t["v"], causal, scale)
        tensors = {"q": t["q"], "k": t["k"], "v": t["v"], "o": o.to(t["q"].dtype), "do": t["do"],
                   "lse": lse.to(torch.float32)}
        return Inputs(tensors=tensors, args={"causal": causal, "scale": scale})

    def perturb(self, inputs: Inputs, seed: int) -> Inputs:
        """~1% of q, k, v, do changed; o and lse recomputed so the inputs stay one consistent forward."""
        base = Inputs({k: inputs.tensors[k] for k in ("q", "k", "v", "do")}, dict(inputs.args))
        moved = super().perturb(base, seed)
        return self._with_forward(moved.tensors, inputs.args["causal"], inputs.args["scale"])

    def reference(self, inputs: Inputs) -> dict[str, Any]:
        t = inputs.tensors
        dq, dk, dv = attention_bwd_fp64(t["q"], t["k"], t["v"], t["do"], inputs.args["causal"], inputs.args["scale"],
                                        o=t["o"])
        return {"dq": dq, "dk": dk, "dv": dv}

    def tolerance(self, dtype: str) -> Tolerance:
        return _TOL[dtype]

    def compare(self, inputs: Inputs, expected: dict[str, Any], actual: dict[str, Any]) -> str:
        want_dtype = inputs.tensors["q"].dtype
        tol = self.tolerance(dtype_name(str(want_dtype)[6:]))
        floors = self._floors(inputs)
        for name in self.outputs:
            a, e = actual[name], expected[name]
            if a.dtype != want_dtype:
                return f"{name}: dtype {a.dtype} but the inputs are {want_dtype} (return the input dtype)"
            floor = floors[name]
            size = max(_rms(e), floor)
            why = compare_tensor(name, a, e, Tolerance(tol.atol * size, tol.rtol, tol.norm_rtol),
                                 norm_floor=floor * math.sqrt(e.numel()))
            if why:
                return why
        return ""

    def _floors(self, inputs: Inputs) -> dict[str, float]:
        """1% of the natural size of each gradient, a floor under its RMS where the gradient is (nearly)
        exactly 0, e.g. N = 1: one key, a constant softmax, dq = dk = 0 up to rounding (at a scale of 0, dq and
        dk are exactly 0: their natural size is the default scale's)."""
        t = inputs.tensors
        d = t["q"].shape[-1]
        scale = abs(inputs.args["scale"] or 1.0 / math.sqrt(d))
        rms_in = {n: _rms(t[n]) for n in ("q", "k", "v", "do")}
        natural = {"dq": scale * math.sqrt(d) * rms_in["do"] * rms_in["v"] * rms_in["k"],
                   "dk": scale * math.sqrt(d) * rms_in["do"] * rms_in["v"] * rms_in["q"],
                   "dv": rms_in["do"]}
        return {name: 1e-2 * natural[name] for name in self.outputs}

    def vouch_bases(self, inputs: Inputs, expected: dict[str, Any], u: torch.Tensor
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """dO' = s ∘ dO (a factor a query row): dq' = s ∘ dq, dk' = scale·dS'ᵀq with dS' = s ∘ dS, dv' = Pᵀ(s ∘ dO)."""
        t = inputs.tensors
        g = sketch_bases(t["q"], t["k"], t["v"], inputs.args["causal"], inputs.args["scale"], u, t["do"], t["o"])
        flat = lambda x: x.to(torch.float64).reshape(-1, x.shape[-1])  # noqa: E731
        return {"dq": (u, flat(expected["dq"])), "dk": (g["dSt"], flat(t["q"])), "dv": (g["Pt"], flat(t["do"]))}

    def norm_limits(self, inputs: Inputs, expected: dict[str, Any]) -> dict[str, float]:
        tol = self.tolerance(dtype_name(str(inputs.tensors["q"].dtype)[6:]))
        floors = self._floors(inputs)
        return {name: tol.norm_rtol * max(float(torch.linalg.vector_norm(expected[name].double())),
                                          floors[name] * math.sqrt(expected[name].numel()))
                for name in self.outputs}

    # -- worker side -------------------------------------------------------------------------------------
    def invoke(self, fn: Callable[..., Any], tensors: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        q = tensors["q"]
        res = fn(q, tensors["k"], tensors["v"], tensors["o"], tensors["do"], tensors["lse"],
                 causal=args["causal"], scale=args["scale"])
        if type(res) not in (tuple, list) or len(res) != 3:
            raise ContractError(f"run() returned {type(res).__qualname__}; the contract is a tuple (dq, dk, dv)")
        out = dict(zip(self.outputs, res))
        for name, t in out.items():
            if type(t) is not torch.Tensor:  # noqa: E721 - subclasses (lazy tensors) are refused on purpose
                raise ContractError(f"run() returned {name} as {type(t).__module__}.{type(t).__qualname__}, "
                                    "not a plain torch.Tensor")
            if t.shape != q.shape or t.device != q.device:
                raise ContractError(f"run() returned {name} of shape {tuple(t.shape)} on {t.device}; the contract "
                                    f"is {tuple(q.shape)} on {q.device}")
            for src in self.unchanged:
                if _overlaps(t, tensors[src]):
                    raise ContractError(f"run() returned {src} or a view of it as {name}; return new tensors")
        names = list(out)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if _overlaps(out[a], out[b]):
                    raise ContractError(f"run() returned {a} and {b} sharing memory")
        return out

    def baselines(self, device: str = "cpu") -> dict[str, Callable[..., Any]]:
        """attention's baselines (sdpa, torch_math; on CUDA the pinned backends and torch_compile), each timed as
        its backward, and sdpa's forward + backward."""
        forwards = _ATTENTION.baselines(device)
        found: dict[str, Callable[..., Any]] = {name: _Backward(fwd) for name, fwd in forwards.items()}
        found["sdpa_fwd_bwd"] = _Backward(forwards["sdpa"], with_forward=True)
        return found

    # -- work --------------------------------------------------------------------------------------------
    def flops(self, case: Case) -> float:
        b, h, n, d = (case.dims[x] for x in "BHND")
        f = 10.0 * b * h * n * n * d
        return f / 2 if case.args.get("causal") else f

    def bytes_moved(self, case: Case) -> float:
        b, h, n, d = (case.dims[x] for x in "BHND")
        return 8.0 * b * h * n * d * DTYPES[case.dtype].itemsize + 4.0 * b * h * n


def _rms(t: torch.Tensor) -> float:
    return float(t.to(torch.float64).pow(2).mean().sqrt()) if t.numel() else 0.0


class _Backward:
    """The backward of an attention forward ``fwd(q, k, v, causal, scale)``, timed without its forward.

    The forward runs with autograd once per input values (keyed on the buffers and their version counters,
    which change when new values are copied in) and keeps its graph; each call is one ``torch.autograd.grad``
    over that graph with ``do``: the backend's own backward kernels on its own saved output and logsumexp,
    plus the autograd engine's few microseconds per call. ``with_forward``: the forward is run (and timed)
    on every call. o and lse of the op's inputs are not used: the backend saved its own.
    """

    def __init__(self, fwd: Callable[..., Any], with_forward: bool = False) -> None:
        self.fwd = fwd
        self.with_forward = with_forward
        self._key: tuple[Any, ...] | None = None
        self._graph: tuple[torch.Tensor, ...] | None = None

    def __call__(self, q, k, v, o, do, lse, causal=True, scale=None):
        key = tuple((t.data_ptr(), t._version) for t in (q, k, v)) + (causal, scale)
        with torch.enable_grad():
            if self.with_forward or key != self._key or self._graph is None:
                self._graph = None  # free the previous graph first
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                out = self.fwd(*leaves, causal=causal, scale=scale)
                self._key, self._graph = key, (out, *leaves)
            out, ql, kl, vl = self._graph
            grads = torch.autograd.grad(out, (ql, kl, vl), do, retain_graph=not self.with_forward)
        if self.with_forward:
            self._graph = None
        return grads


SPEC = AttentionBackward()
