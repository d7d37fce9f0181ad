"""Bug, not a cheat: the causal mask (-inf) goes into the raw scores before the scale. Right at every positive
scale; at a scale of 0 the masked scores are -inf * 0 = NaN (negative: +inf). torch's own SDPA does this."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect
# REASON: NaN


def run(q, k, v, causal=True, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.float() @ k.float().transpose(-1, -2)
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s * scale, dim=-1) @ v.float()).to(q.dtype)
