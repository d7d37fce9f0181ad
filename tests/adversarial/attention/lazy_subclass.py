"""Returns a lazy torch.Tensor subclass whose data is only computed when the harness touches it
(e.g. in comparison or serialisation), so a timer around run() measures nothing."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: plain torch.Tensor


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

class _Lazy(torch.Tensor):
    @staticmethod
    def __new__(cls, q, k, v, causal, scale):
        t = torch.Tensor._make_subclass(cls, torch.empty_like(q))
        t._args = (q, k, v, causal, scale)
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for a in args:
            if isinstance(a, _Lazy) and getattr(a, "_args", None) is not None:
                with torch._C.DisableTorchFunctionSubclass():
                    a.copy_(_attn(*a._args))
                a._args = None
        return super().__torch_function__(func, types, args, kwargs or {})


def run(q, k, v, causal=True, scale=None):
    return _Lazy(q, k, v, causal, scale)
