"""Does nothing on a timed call (the same q as the call before) but remembers it; a TorchFunctionMode left
on the stack would do the work when the evaluator's check of the timed calls first touches that output,
outside the timed interval. The check runs with __torch_function__ off and refuses an active mode."""
import math

import torch
from torch.overrides import TorchFunctionMode

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected|incorrect
# REASON: mode was left active


def _attn(q, k, v, causal, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


_pending = {}


class _Lazy(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _pending and getattr(func, '__name__', '') in ('linalg_vector_norm', '_foreach_norm', 'mm', 'to', 'reshape'):
            for a in list(args) + [x for a in args if isinstance(a, (list, tuple)) for x in a]:
                if isinstance(a, torch.Tensor) and id(a) in _pending:
                    out, q, k, v, causal, scale = _pending.pop(id(a))
                    out.copy_(_attn(q, k, v, causal, scale))
        return func(*args, **kwargs)


_mode = [None]
_last = [None]


def run(q, k, v, causal=True, scale=None):
    if _mode[0] is None:
        _mode[0] = _Lazy()
        _mode[0].__enter__()
    _pending.clear()
    last = _last[0]
    timed = last is not None and last.shape == q.shape and last.dtype == q.dtype and torch.equal(last, q)
    _last[0] = q.clone()
    if not timed:
        return _attn(q, k, v, causal, scale)
    out = torch.empty_like(q)
    _pending[id(out)] = (out, q, k, v, causal, scale)
    return out
