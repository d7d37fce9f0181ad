"""A backward that does no work on a timed call (told from a checked one as the forward's skip_timed_calls.py
does: the previous call's q again): it returns uninitialised gradients there and honest ones otherwise.
Only a check of what the timed calls return (their digests, dO times a factor on each) sees it."""
import math

import torch

KERNELTUNE = {"op": "attention_backward", "backend": "torch"}
# EXPECT: incorrect
# REASON: what the timed calls computed


def _grads(q, k, v, o, do, lse, causal, scale):
    n, d = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf, of, dof = (t.float() for t in (q, k, v, o, do))
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.exp(s - lse.float()[..., None])
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * of).sum(-1, keepdim=True))
    return ((ds @ kf) * scale).to(q.dtype), ((ds.transpose(-1, -2) @ qf) * scale).to(k.dtype), \
        (p.transpose(-1, -2) @ dof).to(v.dtype)


_last = [None]  # a copy of the previous call's q


def run(q, k, v, o, do, lse, causal=True, scale=None):
    last = _last[0]
    timed = last is not None and last.shape == q.shape and last.dtype == q.dtype and torch.equal(last, q)
    _last[0] = q.clone()
    return tuple(torch.empty_like(q) for _ in range(3)) if timed else _grads(q, k, v, o, do, lse, causal, scale)
