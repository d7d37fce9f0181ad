"""Shape-specialised: processes queries in blocks of 64 and only full blocks; right when N is a
multiple of 64 (every timed shape), the tail rows are left unwritten otherwise."""
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
    full = (n // 64) * 64
    out = torch.empty_like(q)
    if full:
        out[:, :, :full] = _attn(q, k, v, causal, scale)[:, :, :full]
    return out
