"""An honest run, and a run_with_lse (what kerneltune.attention calls for training) whose logsumexp is right
on the small check cases and in log2 units from N = 512 on: the evaluator re-verifies the timed case through
run_with_lse after timing."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect
# REASON: wrong after


def run_with_lse(q, k, v, causal=True, scale=None):
    n = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.softmax(s, -1) @ v.float()).to(q.dtype)
    return out, (lse * 1.4426950408889634 if n >= 512 else lse)


def run(q, k, v, causal=True, scale=None):
    return run_with_lse(q, k, v, causal, scale)[0]
