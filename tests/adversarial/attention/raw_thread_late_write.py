"""Work that finishes after run() returns, hidden from threading.enumerate(): the output's last
head is filled by a thread started with _thread.start_new_thread (no threading.Thread object) after run() has
returned; the rest is computed before returning. After the check stage (55 calls) run() returns right away and
the thread does all the work (so timing sees nothing)."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected|incorrect


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import _thread

_calls = [0]


def run(q, k, v, causal=True, scale=None):
    _calls[0] += 1
    if q.shape[-2] < 128:
        return _attn(q, k, v, causal, scale)
    out = torch.empty_like(q)
    if _calls[0] <= 55:
        out[:, :-1] = _attn(q[:, :-1], k[:, :-1], v[:, :-1], causal, scale)

        def work():
            out[:, -1:] = _attn(q[:, -1:], k[:, -1:], v[:, -1:], causal, scale)
    else:
        def work():
            out.copy_(_attn(q, k, v, causal, scale))

    _thread.start_new_thread(work, ())
    return out
