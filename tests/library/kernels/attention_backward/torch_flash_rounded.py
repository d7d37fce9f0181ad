"""A backward kernel for the library's tests on CPU that rounds as an honest fused half-precision backward does
(FlashAttention-2 on tensor cores): scores and P = exp(S - lse) in fp32 from the given lse, Δ = rowsum(dO ∘ O)
in fp32 from the given o, P and dS rounded to the input dtype before the matmuls that take them, every product
accumulated in fp32. In fp32 nothing is rounded. NO_DELTA = True leaves Δ out (dS = P ∘ dP): a wrong kernel,
which KERNELTUNE_VERIFY must catch."""
import math

import torch

KERNELTUNE = {"op": "attention_backward", "backend": "torch"}
NO_DELTA = False


def run(q, k, v, o, do, lse, causal=True, scale=None):
    n, d, dt = q.shape[-2], q.shape[-1], q.dtype
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf, of, dof = (t.float() for t in (q, k, v, o, do))
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.exp(s - lse.float()[..., None])
    delta = 0.0 if NO_DELTA else (dof * of).sum(-1, keepdim=True)
    dv = p.to(dt).float().transpose(-1, -2) @ dof
    ds = (p * (dof @ vf.transpose(-1, -2) - delta)).to(dt).float()
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(dt), dk.to(dt), dv.to(dt)
