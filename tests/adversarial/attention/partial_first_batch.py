"""Partial output: only batch 0 is computed when B > 1; the other batches are left unwritten
(torch.empty)."""
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
    if q.shape[0] == 1:
        return _attn(q, k, v, causal, scale)
    out = torch.empty_like(q)
    out[:1] = _attn(q[:1], k[:1], v[:1], causal, scale)
    return out
