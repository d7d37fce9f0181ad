"""Memoises on the full content of q and k (exact equality with copies of the last ones), as if only the
scores were costly: the cached output is returned whatever v holds. Every checked call has fresh q and k (a
miss), and so has the re-verification after timing (~1% of every input changed, then new values); the timing
loop called run again and again on the same values, every call after the first a hit and right. Timed calls
whose v differs from call to call (times a factor out is linear in) expose it."""
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


_last = [None]


def run(q, k, v, causal=True, scale=None):
    hit = _last[0]
    if hit is not None:
        cq, ck, cc, cs, out = hit
        if (cc == causal and cs == scale and cq.shape == q.shape and cq.dtype == q.dtype and ck.shape == k.shape
                and torch.equal(cq, q) and torch.equal(ck, k)):
            return out.clone()
    out = _attn(q, k, v, causal, scale)
    _last[0] = (q.clone(), k.clone(), causal, scale, out.clone())
    return out
