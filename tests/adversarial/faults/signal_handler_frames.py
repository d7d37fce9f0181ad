"""Installs a signal handler (signal imported under a name built at run time): a handler is called with the
frame it interrupted, which could be the worker's timing loop. The handlers are compared with those before the
candidate at the end of every request."""
import importlib
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: signal handler

_sig = importlib.import_module("sig" + "nal")
_seen = []


def _handler(signum, frame):
    _seen.append(frame)


def run(q, k, v, causal=True, scale=None):
    if not _seen:
        _sig.signal(_sig.SIGUSR2, _handler)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)
