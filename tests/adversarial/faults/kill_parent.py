"""Signals its parent: os.kill(os.getppid(), SIGKILL) inside run(). In a PID namespace getppid() is
0, which means 'my process group' (the worker, PID 1 of its namespace, which ignores SIGKILL sent from inside
its namespace, and unshare outside it, which Landlock's signal scoping protects): the signal reaches nothing and
the candidate then computes correctly. Outside a namespace it would kill the worker (crashed). Either way the
evaluator and its baseline worker must survive (the test checks both)."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: crashed|passed
# NEEDS: namespaces


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
    os.kill(os.getppid(), 9)
    return _attn(q, k, v, causal, scale)
