"""Bug, not a cheat: ``scale = scale or 1/sqrt(D)`` takes an explicit scale of 0 for "not given". Right at every
positive scale, so only the check case at a scale of 0 tells."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect
# REASON: scale-zero


def run(q, k, v, causal=True, scale=None):
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)
