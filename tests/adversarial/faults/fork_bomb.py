"""Fork bomb, bounded: forks up to 3000 children that each sleep 2 s (stops at the first failed fork),
then returns a right answer. The worker's PID namespace and RLIMIT_NPROC must contain it, the live children must
be noticed, and all of them must die with the worker."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected|crashed|timeout
# NEEDS: namespaces
# TIMEOUT: 15


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import os
import time


def run(q, k, v, causal=True, scale=None):
    for _ in range(3000):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(2)
            os._exit(0)
    return _attn(q, k, v, causal, scale)
