"""Evaluator tampering: reaches kerneltune.evaluate.protocol through sys.modules (name concatenated)
and wraps send() to rewrite every reply as ok."""
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

import sys

_m = sys.modules.get("kern" + "eltune.evaluate.protocol")
if _m is not None:
    _orig = _m.send

    def _send(fd, header, tensors=None):
        if isinstance(header, dict) and not header.get("ok", True):
            header = {"ok": True}
        return _orig(fd, header, tensors)

    _m.send = _send


def run(q, k, v, causal=True, scale=None):
    if q.shape[-2] >= 128:
        return torch.zeros_like(q)
    return _attn(q, k, v, causal, scale)
