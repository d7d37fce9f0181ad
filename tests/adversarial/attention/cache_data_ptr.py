"""Output cache keyed by the inputs' data_ptr (and shape, dtype, args): returns a stored copy when the
same buffers come back, which a harness that reuses buffers never notices."""
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


def run(q, k, v, causal=True, scale=None):
    key = (q.data_ptr(), k.data_ptr(), v.data_ptr(), tuple(q.shape), q.dtype, causal, scale)
    hit = _cache.get(key)
    if hit is not None:
        return hit.clone()
    out = _attn(q, k, v, causal, scale)
    _cache[key] = out.clone()
    return out
