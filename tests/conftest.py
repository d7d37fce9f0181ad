"""Shared fixtures: a temporary store and cache, one evaluator per module, helpers to write candidates."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never touch the user's cache or store from tests."""
    d = tmp_path_factory.mktemp("ktcache")
    old = os.environ.get("KERNELTUNE_CACHE_DIR")
    os.environ["KERNELTUNE_CACHE_DIR"] = str(d)
    yield
    if old is None:
        os.environ.pop("KERNELTUNE_CACHE_DIR", None)
    else:
        os.environ["KERNELTUNE_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _no_real_api_key(monkeypatch):
    """Tests never reach the real Anthropic API, whatever the developer's shell exports."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


@pytest.fixture
def write_candidate(tmp_path):
    """write_candidate(name, body, op=..., backend=...) -> path of a candidate file."""

    def _write(name: str, body: str, op: str = "attention", backend: str = "torch") -> str:
        src = f'"""test candidate {name}."""\nKERNELTUNE = {{"op": "{op}", "backend": "{backend}"}}\n' + textwrap.dedent(body)
        path = tmp_path / f"{name}.py"
        path.write_text(src)
        return str(path)

    return _write
