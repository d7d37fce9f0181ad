"""Output cache keyed by buffer address plus a cheap content fingerprint (8 sampled elements of
each of q, k, v, and the arguments). New random values in the same buffers change the fingerprint, so a
re-verify with all-new values recomputes; only a call whose inputs differ OUTSIDE the sampled elements would
expose it. In the timing loop (same values every call) it does no work."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected|incorrect


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

_cache = {}


def _fp(t):
    flat = t.reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, 8).long()
    return tuple(flat[idx].tolist())


def run(q, k, v, causal=True, scale=None):
    key = (q.data_ptr(), tuple(q.shape), q.dtype, causal, scale, _fp(q), _fp(k), _fp(v))
    hit = _cache.get(key)
    if hit is not None:
        return hit.clone()
    out = _attn(q, k, v, causal, scale)
    _cache.clear()
    _cache[key] = out.clone()
    return out
