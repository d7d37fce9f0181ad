"""One element off: the very last element of the output is off by 1e-2 when the output has more than
1000 elements (an off-by-one in a tail loop)."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

def run(q, k, v, causal=True, scale=None):
    out = _attn(q, k, v, causal, scale)
    if out.numel() > 1000:
        out.view(-1)[-1] += 1e-2
    return out
