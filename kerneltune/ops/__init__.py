"""Op specs by name. A new op is one module here with a ``SPEC`` and one line in ``_MODULES``."""

from __future__ import annotations

import importlib

from kerneltune.ops.base import Case, Inputs, OpSpec, Tolerance

_MODULES = {"attention": "kerneltune.ops.attention", "adamw": "kerneltune.ops.adamw",
            "attention_backward": "kerneltune.ops.attention_backward"}

__all__ = ["Case", "Inputs", "OpSpec", "Tolerance", "get_op", "op_names"]


def op_names() -> list[str]:
    return list(_MODULES)


def get_op(name: str) -> OpSpec:
    """The spec of op ``name``; ValueError naming the known ops otherwise."""
    if name not in _MODULES:
        raise ValueError(f"unknown op {name!r}: kerneltune knows {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).SPEC
