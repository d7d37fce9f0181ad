"""Fixtures: a simulated Messages API the real SDK talks to, a clean Anthropic environment, one evaluator."""

from __future__ import annotations

import os

import pytest

from kerneltune.evaluate.evaluator import Evaluator, Options
from kerneltune.ops import get_op

from .fake_api import FakeAPI

KEY = "sk-test-kt-" + "Z9q" * 12 + "-SECRETKEY"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = os.path.join(ROOT, "candidates", "attention")
SHAPE = "1,2,64,32,causal"


@pytest.fixture(autouse=True)
def clean_anthropic_env(monkeypatch):
    """No real key, profile or endpoint from the developer's environment ever reaches a test."""
    for name in list(os.environ):
        if name.startswith("ANTHROPIC_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def api(monkeypatch):
    """The fake API, with ANTHROPIC_BASE_URL and a test key pointing the SDK at it."""
    server = FakeAPI()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    yield server
    server.close()


@pytest.fixture(scope="module")
def evaluator():
    spec = get_op("attention")
    opts = Options(device="cpu", rounds=2, round_ms=5, seeds=1, timeout=60,
                   shapes=[spec.parse_case(SHAPE, "float32")], baselines=[spec.primary_baseline])
    with Evaluator(opts) as ev:
        yield ev
