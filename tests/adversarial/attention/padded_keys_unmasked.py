"""Bug, not a cheat: a block kernel's key tail. Keys are padded with zero rows to a multiple of 16 and the pad
is not masked: a padded key scores 0, its probability exp(0 - lse) is multiplied by a zero row of v. Right for
every row whose lse is above about -11; in a row of low scores (lse near -50) that probability, rounded to fp16
for the second matmul, is inf, and inf * 0 is NaN. (The forward of issue 8's warp-specialised kernel nearly
shipped with this.)"""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect
# REASON: low-scores


def run(q, k, v, causal=True, scale=None):
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    npad = -(-n // 16) * 16
    kp = torch.zeros(b, h, npad, d, dtype=q.dtype)
    vp = torch.zeros(b, h, npad, d, dtype=q.dtype)
    kp[:, :, :n], vp[:, :, :n] = k, v
    s = (q.float() @ kp.float().transpose(-1, -2)) * scale         # (B, H, N, Npad): keys past N score 0
    if causal:
        s = s.masked_fill(torch.ones(n, npad, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s[..., :n], dim=-1, keepdim=True)         # the row statistics of the real keys
    p = torch.exp(s - lse).to(q.dtype)                              # rounded for the tensor cores
    return (p.float() @ vp.float()).to(q.dtype)
