"""A forward kernel with run_with_lse for the library's tests on CPU: softmax(q kᵀ·scale [+ mask]) v and the
row logsumexp in fp32 torch. LSE_UNITS = "log2" gives the logsumexp in log2 units (a bug the library must
catch when it checks run_with_lse on its first use)."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
LSE_UNITS = "natural"


def run_with_lse(q, k, v, causal=True, scale=None):
    n, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype)
    return out, lse * (1.4426950408889634 if LSE_UNITS == "log2" else 1.0)


def run(q, k, v, causal=True, scale=None):
    return run_with_lse(q, k, v, causal, scale)[0]
