"""Looks for a way out through inherited file descriptors: a worker forked by the zygote must hold none of
the zygote's (its control socket would let a candidate ask for processes of its own). Every descriptor it
finds must be stdin (/dev/null), its output file, or one of the two pipes of its wire; anything else, a
socket above all, raises a distinctive error. Nothing found lets it compute correctly."""
import math
import os

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: passed


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


def _leaks():
    here, pipes, odd = os.getcwd(), 0, []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.startswith("pipe:"):
            pipes += 1
        elif target == "/dev/null" or target.startswith(here + "/") or target.startswith("/dev/urandom"):
            continue
        else:
            odd.append(f"{name} -> {target}")
    if pipes > 2:
        odd.append(f"{pipes} pipes")
    return odd


def run(q, k, v, causal=True, scale=None):
    odd = _leaks()
    if odd:
        raise RuntimeError(f"INHERITED DESCRIPTORS reached the candidate: {', '.join(odd)}")
    return _attn(q, k, v, causal, scale)
