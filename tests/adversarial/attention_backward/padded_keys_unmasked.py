"""Bug, not a cheat: the backward's key tail. Keys are padded with zero rows to a multiple of 16 and the pad is
not masked: P = exp(0 - lse) at a padded key, rounded to fp16, is inf in a row of low scores (lse near -50),
dS there is inf, and dq = dS k meets the pad's zero rows: inf * 0 is NaN. (issue 8's warp-specialised dQ
kernel had this fault at a ragged N before it ever ran.)"""
import math

import torch

KERNELTUNE = {"op": "attention_backward", "backend": "torch"}
# EXPECT: incorrect
# REASON: low-scores


def run(q, k, v, o, do, lse, causal=True, scale=None):
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    npad = -(-n // 16) * 16
    kp = torch.zeros(b, h, npad, d)
    vp = torch.zeros(b, h, npad, d)
    kp[:, :, :n], vp[:, :, :n] = k.float(), v.float()
    qf, dof = q.float(), do.float()
    s = (qf @ kp.transpose(-1, -2)) * scale                         # (B, H, N, Npad): keys past N score 0
    if causal:
        s = s.masked_fill(torch.ones(n, npad, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.exp(s - lse[..., None]).to(q.dtype).float()           # rounded for the tensor cores
    dv = p.transpose(-1, -2) @ dof                                  # (B, H, Npad, D)
    dp = dof @ vp.transpose(-1, -2)
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = (p * (dp - delta)).to(q.dtype).float()
    dq = (ds @ kp) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(q.dtype), dk[:, :, :n].to(q.dtype), dv[:, :, :n].to(q.dtype)
