"""Tuned attention in a nanoGPT-style model, explicitly: a module, or a patch helper that says what it replaced.

    from kerneltune import CausalSelfAttention, patch_attention
    attn = CausalSelfAttention(n_embd=384, n_head=6)       # a module: c_attn, c_proj, resid_dropout as in nanoGPT
    report = patch_attention(model)                         # nanoGPT's own modules, patched in place
    print(report)                                           # which modules now call kerneltune.attention
    unpatch_attention(model)                                # back to their own forward

Nothing is patched at import and no torch function is replaced: only the modules ``patch_attention`` lists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kerneltune.library.attention import attention

_PATCHED = "_kerneltune_patched"


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nanoGPT's CausalSelfAttention.forward with kerneltune.attention in place of SDPA."""
    b, t, c = x.shape                                                      # (B, T, C)
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)                     # 3 x (B, T, C)
    hs = c // self.n_head
    q, k, v = (z.view(b, t, self.n_head, hs).transpose(1, 2).contiguous() for z in (q, k, v))  # (B, nh, T, hs)
    p = float(getattr(self, "dropout", 0.0) or 0.0)
    if self.training and p > 0:
        # attention dropout is not part of the kernel contract: these calls stay with torch
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    else:
        y = attention(q, k, v, causal=True)                                # (B, nh, T, hs)
    y = y.transpose(1, 2).contiguous().view(b, t, c)                       # (B, T, C)
    return self.resid_dropout(self.c_proj(y))


class CausalSelfAttention(nn.Module):
    """nanoGPT's causal self-attention (same submodule and attribute names, so state_dicts match) served by
    kerneltune.attention. Attention dropout, when ``dropout > 0`` and training, runs on torch SDPA."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    forward = _forward


@dataclass
class Patched:
    module: str        # its qualified name in the model ('' for the model itself)
    cls: str
    note: str = ""

    def __str__(self) -> str:
        return f"{self.module or '<model>'} ({self.cls}): forward -> kerneltune.attention" + \
            (f"; {self.note}" if self.note else "")


def _looks_like_nanogpt(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "c_attn", None), nn.Linear) and isinstance(getattr(m, "c_proj", None), nn.Module)
            and isinstance(getattr(m, "n_head", None), int) and isinstance(getattr(m, "n_embd", None), int)
            and isinstance(getattr(m, "resid_dropout", None), nn.Module)
            and m.c_attn.out_features == 3 * m.n_embd and not isinstance(m, CausalSelfAttention))


def patch_attention(model: nn.Module) -> list[Patched]:
    """Make every nanoGPT-style causal self-attention module in ``model`` (attributes c_attn, c_proj, n_head,
    n_embd, resid_dropout) call kerneltune.attention; return what was patched. Idempotent."""
    done = []
    for name, m in model.named_modules():
        if not _looks_like_nanogpt(m):
            continue
        note = "attention dropout > 0: training calls stay on torch SDPA" if float(getattr(m, "dropout", 0) or 0) else ""
        if not getattr(m, _PATCHED, False):
            # this instance only; its class is untouched. A partial of the module-level function, not a bound
            # method: pickle saves that by reference (kerneltune.library.nn._forward) and the module by value,
            # so torch.save(model) loads back patched (a bound method pickles as getattr(m, '_forward'))
            m.forward = functools.partial(_forward, m)
            setattr(m, _PATCHED, True)
        done.append(Patched(name, type(m).__name__, note))
    return done


def unpatch_attention(model: nn.Module) -> list[str]:
    """Undo patch_attention; return the names of the modules restored."""
    names = []
    for name, m in model.named_modules():
        if getattr(m, _PATCHED, False):
            del m.forward
            delattr(m, _PATCHED)
            names.append(name)
    return names
