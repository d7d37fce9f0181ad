"""Missed tail: walks query rows in blocks of 32 and drops the last partial block (zeros there);
right for every N that is a multiple of 32, including the timed N=512."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

def run(q, k, v, causal=True, scale=None):
    n = q.shape[-2]
    full = _attn(q, k, v, causal, scale)
    out = torch.zeros_like(q)
    for i in range(0, n - 31, 32):
        out[:, :, i:i + 32] = full[:, :, i:i + 32]
    if n < 32:
        out.copy_(full)
    return out
