"""Timer tampering: replaces time.perf_counter and time.perf_counter_ns with clocks that run at a
tenth of real speed, so anything timed with them looks 10x faster."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: tampering


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import time

_real, _real_ns = time.perf_counter, time.perf_counter_ns
_t0, _t0_ns = _real(), _real_ns()
time.perf_counter = lambda: _t0 + (_real() - _t0) * 0.1
time.perf_counter_ns = lambda: _t0_ns + (_real_ns() - _t0_ns) // 10


def run(q, k, v, causal=True, scale=None):
    return _attn(q, k, v, causal, scale)
