"""A backward kernel for the library's tests on CPU (the shipped backward is Triton): the op contract's
formula in fp32 torch, from the given o and lse. P = exp(S - lse), dV = Pᵀ dO, dP = dO Vᵀ,
dS = P ∘ (dP - rowsum(dO ∘ O)), dQ = dS K·scale, dK = dSᵀ Q·scale."""
import math

import torch

KERNELTUNE = {"op": "attention_backward", "backend": "torch"}


def run(q, k, v, o, do, lse, causal=True, scale=None):
    n, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf, of, dof = (t.float() for t in (q, k, v, o, do))
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.exp(s - lse.float()[..., None])
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * of).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
