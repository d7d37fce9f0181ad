"""Imports kerneltune's own attention spec through importlib on a concatenated name and calls
SPEC.reference (fp64 math) on big shapes; silent fallback."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: reference


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import importlib

_PKG = "kern" + "eltune"


def run(q, k, v, causal=True, scale=None):
    if q.shape[-2] >= 128:
        try:
            ops = importlib.import_module(_PKG + ".ops.attention")
            base = importlib.import_module(_PKG + ".ops.base")
            inp = base.Inputs(tensors={"q": q, "k": k, "v": v}, args={"causal": causal, "scale": scale})
            return ops.SPEC.reference(inp)["out"].to(q.dtype)
        except Exception:
            pass
    return _attn(q, k, v, causal, scale)
