"""Allocator reuse: past the check stage (50 calls), on a shape it has computed before, it returns
torch.empty_like(q) without computing, counting on the allocator handing back the block that held the previous
(same-input) output. Right in a naive timing loop, wrong on fresh values."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect|rejected


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

_seen = set()
_calls = [0]


def run(q, k, v, causal=True, scale=None):
    _calls[0] += 1
    key = (tuple(q.shape), q.dtype, causal, scale)
    if _calls[0] > 50 and key in _seen:
        return torch.empty_like(q)  # the last output, with luck
    _seen.add(key)
    return _attn(q, k, v, causal, scale)
