"""Work that finishes after run() returns: on big shapes it forks; the child computes the output into
shared memory and exits, the parent returns the (not yet written) shared buffer at once."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected|incorrect|crashed


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import os


def run(q, k, v, causal=True, scale=None):
    if q.shape[-2] < 128:
        return _attn(q, k, v, causal, scale)
    out = torch.empty_like(q).share_memory_()
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            out.copy_(_attn(q, k, v, causal, scale))
        finally:
            os._exit(0)
    return out
