"""Calls aten's CPU flash kernel behind SDPA (the for_cpu variant of the flash backend)
directly under an obfuscated name, with a silent fallback."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: may not use


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

_NAME = "_scaled_dot" + "_product_fl" + "ash_attention_for_cpu"  # no name the static scan knows


def run(q, k, v, causal=True, scale=None):
    if q.shape[-2] >= 128:
        try:
            return getattr(torch.ops.aten, _NAME)(q, k, v, is_causal=causal, scale=scale)[0]
        except Exception:
            pass
    return _attn(q, k, v, causal, scale)
