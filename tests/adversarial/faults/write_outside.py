"""Tries to create files outside its temporary directory: in the repository, in /tmp and in the
user's cache. If any create succeeds it returns a wrong answer."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: passed


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import os

_TARGETS = ["/tmp/kt-escape.txt", os.path.join(os.getcwd(), "..", "escape.txt"), "/var/tmp/kt-escape.txt"]


def run(q, k, v, causal=True, scale=None):
    wrote = False
    for p in _TARGETS:
        try:
            with open(p, "x") as f:
                f.write("escaped")
            wrote = True
            os.unlink(p)
        except OSError:
            pass
    out = _attn(q, k, v, causal, scale)
    return out + 1.0 if wrote else out
