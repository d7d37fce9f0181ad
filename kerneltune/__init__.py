"""kerneltune: find faster attention and optimizer kernels, measured by an evaluator nobody can fool.

Library use (no search needed)::

    import kerneltune
    out = kerneltune.attention(q, k, v, causal=True)        # (B, H, N, D), differentiable, torch.compile-able
    opt = kerneltune.optim.AdamW(model.parameters(), lr=3e-4)
    kerneltune.served()                                      # {"attention": {"reference": 12}, ...}

Each call is served by the registry's winner for this device, shape bucket and dtype, or by the
reference (torch SDPA, torch.optim.AdamW). The library loads lazily: ``import kerneltune`` alone does
not import torch.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "attention": ("kerneltune.library.attention", "attention"),
    "served": ("kerneltune.library.serve", "served"),
    "reset_served": ("kerneltune.library.serve", "reset_served"),
    "decisions": ("kerneltune.library.serve", "decisions"),
    "patch_attention": ("kerneltune.library.nn", "patch_attention"),
    "unpatch_attention": ("kerneltune.library.nn", "unpatch_attention"),
    "CausalSelfAttention": ("kerneltune.library.nn", "CausalSelfAttention"),
}

__all__ = ["__version__", "attention", "optim", "served", "reset_served", "decisions", "patch_attention",
           "unpatch_attention", "CausalSelfAttention"]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        # a submodule (kerneltune.optim, .library, .registry …), imported on first use like the names above:
        # importing it binds it here, so this runs once per submodule
        import importlib.util

        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'kerneltune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
