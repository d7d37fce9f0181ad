"""Imports kerneltune's attention spec and takes its torch_math baseline through the class,
type(SPEC).baselines(SPEC, "cpu"), sidestepping the instance-level tripwire. The op's baselines are forbidden
to candidates."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: baseline


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
    if q.dtype == torch.float32:
        ops = importlib.import_module(_PKG + ".ops.attention")
        fn = type(ops.SPEC).baselines(ops.SPEC, "cpu")["torch_math"]
        return fn(q, k, v, causal=causal, scale=scale)
    return _attn(q, k, v, causal, scale)
