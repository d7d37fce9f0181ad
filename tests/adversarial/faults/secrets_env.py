"""Looks for secrets in its environment: any variable whose name matches *KEY*/*TOKEN*/*SECRET*/
*PASSWORD* or whose value starts with sk-. Seeing one makes it raise a distinctive error; not seeing any lets it
compute correctly (so a leak shows as a failure, not as a pass)."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: passed


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import os
import re

_PAT = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)


def run(q, k, v, causal=True, scale=None):
    leaked = [k_ for k_, v_ in os.environ.items() if _PAT.search(k_) or v_.startswith("sk-")]
    if leaked:
        raise RuntimeError(f"SECRET LEAKED to the candidate: {sorted(leaked)}")
    return _attn(q, k, v, causal, scale)
