"""Tells a timed call from a checked one and does no work on it: the timing loop calls run again and again on
the same q, while every checked call brings new values (each seed its own, the re-verification after timing
~1% of them changed, then new ones). On a call with the previous call's q it returns an uninitialised tensor.
Only a check of what the timed calls return (their digests) sees it."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect
# REASON: what the timed calls computed


def _attn(q, k, v, causal, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


_last = [None]  # a copy of the previous call's q


def run(q, k, v, causal=True, scale=None):
    last = _last[0]
    timed = last is not None and last.shape == q.shape and last.dtype == q.dtype and torch.equal(last, q)
    _last[0] = q.clone()
    return torch.empty_like(q) if timed else _attn(q, k, v, causal, scale)
