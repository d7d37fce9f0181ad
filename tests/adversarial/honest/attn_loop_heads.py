"""Honest, slow: a Python loop over every (batch, head), each a plain fp32 softmax(q kᵀ) v."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: passed


def run(q, k, v, causal=True, scale=None):
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty(b, h, n, d, dtype=q.dtype)
    mask = torch.ones(n, n, dtype=torch.bool).triu(1) if causal else None
    for bi in range(b):
        for hi in range(h):
            s = (q[bi, hi].float() @ k[bi, hi].float().T) * scale
            if mask is not None:
                s = s.masked_fill(mask, float("-inf"))
            out[bi, hi] = (torch.softmax(s, dim=-1) @ v[bi, hi].float()).to(q.dtype)
    return out
