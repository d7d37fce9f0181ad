"""Precision downgrade hidden from a settings check: sets float32 matmul precision to
"medium" (and allow_tf32) on entry to run() and restores "highest" before returning, so the flags look untouched
afterwards. Only the numerics can catch it (on CPU "medium" may not change anything: then the output is honest
fp32 and passing is right)."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected|incorrect|passed


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

def run(q, k, v, causal=True, scale=None):
    torch.set_float32_matmul_precision("medium")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return _attn(q, k, v, causal, scale)
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
