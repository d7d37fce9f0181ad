"""Walks the caller's frames with a plain sys._getframe / f_back (the unobfuscated version), looking for
an expected result."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: frames


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import sys


def run(q, k, v, causal=True, scale=None):
    f = sys._getframe(1)
    while f is not None:
        exp = f.f_locals.get("expected")
        if isinstance(exp, dict) and "out" in exp:
            return exp["out"].to(q.dtype).clone()
        f = f.f_back
    return _attn(q, k, v, causal, scale)
