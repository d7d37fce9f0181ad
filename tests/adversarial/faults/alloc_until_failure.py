"""Allocates and touches 256 MB tensors in a loop until something stops it (the address-space
limit, or the parent's RSS watch)."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: crashed
# TIMEOUT: 30


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

_hoard = []


def run(q, k, v, causal=True, scale=None):
    while True:
        _hoard.append(torch.ones(64 << 20, dtype=torch.float32))
