"""One thread per test process: the models here are tiny, and two OpenMP threads on two shared cores
spend more time waiting for each other than computing (10x slower on a loaded machine)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
