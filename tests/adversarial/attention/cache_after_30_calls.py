"""Output cache (keyed by buffer address and shape) switched on only after 30 calls, so a
harness that checks the first few calls sees honest work."""
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
_calls = [0]


def run(q, k, v, causal=True, scale=None):
    _calls[0] += 1
    key = (q.data_ptr(), tuple(q.shape), q.dtype, causal)
    if _calls[0] > 30 and key in _cache:
        return _cache[key].clone()
    out = _attn(q, k, v, causal, scale)
    _cache[key] = out.clone()
    return out
