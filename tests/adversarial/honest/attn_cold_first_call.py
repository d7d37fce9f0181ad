"""Honest, with a cold first call: after a pause (another contestant's turn), its first call spends 25 ms more,
as a kernel refilling cold caches or a lazily rebuilt workspace does; back-to-back calls do not. Every
millisecond is spent inside run() and is timed where it happens: the wall-clock cross-check must not take the
turn's warm-up call for hidden work."""
import math
import time

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: passed

_last_return = [0.0]


def run(q, k, v, causal=True, scale=None):
    if time.perf_counter() - _last_return[0] > 0.004:
        time.sleep(0.025)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = (torch.softmax(s, dim=-1) @ vf).to(q.dtype)
    _last_return[0] = time.perf_counter()
    return out
