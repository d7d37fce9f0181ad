"""Library tests: every test starts from a fresh serving state, with no registry but the ones it writes."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest

import kerneltune.registry as reg
from kerneltune.library import serve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = os.path.join(ROOT, "candidates")
TEST_KERNELS = os.path.join(ROOT, "tests", "library", "kernels")  # kernels for the tests, <op>/<name>.py


@pytest.fixture(autouse=True)
def _fresh_library(monkeypatch, tmp_path):
    for var in (reg.ENV_REGISTRY, reg.ENV_MIN_SPEEDUP, reg.ENV_DISABLE, serve.ENV_VERIFY, serve.ENV_LOG):
        monkeypatch.delenv(var, raising=False)
    # the shipped registry may hold entries measured on this very machine: tests see only their own
    monkeypatch.setattr(reg, "shipped_path", lambda: str(tmp_path / "shipped-empty.json"))
    serve.reload()
    serve.reset_served()
    yield
    serve.reload()
    serve.reset_served()


def entry_for(path: str, op: str, *, dims: dict, dtype: str = "float32", args: dict | None = None,
              speedup: float = 1.5, device_key: str | None = None, backend: str = "numba") -> dict:
    """A registry entry (JSON) as `kerneltune promote` writes it, for the candidate file at ``path``."""
    with open(path) as f:
        source = reg.strip_header(f.read())
    return {"op": op, "device_key": device_key or reg.device_key("cpu"), "device_name": "test cpu", "dtype": dtype,
            "dims": reg.norm_dims(op, dims), "args": args or {}, "bucket": reg.bucket(op, dims),
            "candidate": os.path.relpath(path, os.path.join(os.path.dirname(os.path.dirname(path)))),
            "source_hash": reg.file_hash(source), "params": reg.file_meta(source).get("params") or {}, "baseline": "sdpa" if op == "attention" else "adamw_fused",
            "speedup": speedup, "p20_ms": 1.0, "median_ms": 1.0, "p80_ms": 1.0, "versions": {}, "timestamp": "t",
            "provenance": {"test": True}, "backend": backend}


@pytest.fixture
def user_registry(tmp_path, monkeypatch):
    """user_registry([(seed relative path, entry kwargs), ...]) -> path of a registry in $KERNELTUNE_REGISTRY,
    its candidates copied under tmp/candidates/<op>/. A path under tests/library/kernels/ (TEST_KERNELS) is one
    of the kernels kept for the tests."""

    def _write(items: list[tuple[str, dict]], *, env: bool = True) -> str:
        root = tmp_path / "user"
        entries = []
        for rel, kw in items:
            src = rel if os.path.isabs(rel) else os.path.join(SEEDS, rel)
            dst = root / "candidates" / os.path.relpath(src, os.path.dirname(os.path.dirname(src)))
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            entries.append(entry_for(str(dst), **kw))
        path = root / "registry.json"
        path.write_text(json.dumps({"format": 1, "entries": entries}))
        if env:
            monkeypatch.setenv(reg.ENV_REGISTRY, str(path))
        serve.reload()
        return str(path)

    return _write


def kt_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, reg.KernelTuneWarning)]
