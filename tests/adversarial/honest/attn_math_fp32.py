"""Honest: plain torch-op attention, upcast to fp32, explicit causal mask, cast back."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: passed


def run(q, k, v, causal=True, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ vf).to(q.dtype)
