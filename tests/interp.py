"""Test helpers: a repository file loaded as a module; a check function run in a fresh process under Triton's CPU
interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_interpreter(module: str, fn_name: str, *args) -> None:
    """Run ``module.fn_name(*args)`` in a fresh process with TRITON_INTERPRET=1: the interpreter is chosen when
    triton is imported, and this test process may have imported it already."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from {module} import {fn_name}; {fn_name}(*{args!r})"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]


def load_file(rel: str, name: str | None = None):
    """The file ``rel`` (relative to the repository root) as a fresh module: a candidate's KERNELTUNE params can be
    changed on it without touching any other copy."""
    spec = importlib.util.spec_from_file_location(name or f"kt_test_{os.path.basename(rel)[:-3]}",
                                                  os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
