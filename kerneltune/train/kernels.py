"""Which attention and AdamW a training run uses, chosen explicitly (never by import-time patching).

reference: torch.nn.functional.scaled_dot_product_attention and torch.optim.AdamW (fused on GPU).
tuned:     kerneltune.attention and kerneltune.optim.AdamW, which look up the registry's winner per
           device, shape and dtype and fall back to the reference where no winner beats it;
           kerneltune.served() says which kernel answered each call.
Both optimizers get the same arguments (fused=True on GPU), so where no AdamW winner serves, the
tuned run falls back to the very step the reference takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kerneltune.train.model import Attend, sdpa_attend

CHOICES = ("reference", "tuned")


class KernelsUnavailable(RuntimeError):
    """kerneltune's library API is not there (yet); one line, for the CLI."""


@dataclass
class Kernels:
    name: str
    attend: Attend
    make_adamw: Callable[..., torch.optim.Optimizer]  # (param_groups, **torch AdamW kwargs)
    served: Callable[[], dict]  # op -> {kernel: calls} since reset()
    reset: Callable[[], None]


def adamw_options(device: str) -> dict:
    return {"fused": device.startswith("cuda")}


def reference(device: str) -> Kernels:
    fused = adamw_options(device)["fused"]

    def make_adamw(groups: Any, **kw: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, **adamw_options(device), **kw)

    label = {"attention": {"torch.scaled_dot_product_attention": None},
             "adamw": {f"torch.optim.AdamW(fused={fused})": None}}
    return Kernels("reference", sdpa_attend, make_adamw, lambda: label, lambda: None)


def tuned(device: str) -> Kernels:
    try:
        import kerneltune
        from kerneltune import optim

        attention, adamw_cls = kerneltune.attention, optim.AdamW
        served, reset = kerneltune.served, kerneltune.reset_served
    except (ImportError, AttributeError) as e:
        raise KernelsUnavailable(f"--kernels tuned needs kerneltune.attention, kerneltune.optim.AdamW and "
                                 f"kerneltune.served() ({e}); use --kernels reference") from None

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        return attention(q, k, v, causal=causal)

    def make_adamw(groups: Any, **kw: Any) -> torch.optim.Optimizer:
        return adamw_cls(groups, **adamw_options(device), **kw)

    return Kernels("tuned", attend, make_adamw, served, reset)


def get(name: str, device: str) -> Kernels:
    if name not in CHOICES:
        raise ValueError(f"--kernels {name!r}: use reference or tuned")
    return reference(device) if name == "reference" else tuned(device)


def describe(served: dict) -> str:
    """{'attention': {'triton_flash_v3': 1200}, 'adamw': {'reference': 100}} ->
    'attention: triton_flash_v3 ×1200 · adamw: reference ×100' (counts left out when not counted)."""
    parts = []
    for op, kernels in sorted(served.items()):
        names = ", ".join(k if n is None else f"{k} ×{n}" for k, n in sorted(kernels.items()))
        parts.append(f"{op}: {names or 'none'}")
    return " · ".join(parts) or "nothing served"
