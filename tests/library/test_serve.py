"""serve.choose: a decision per device and exact shape, the same as Registry.decide's (what `kerneltune explain`
says) whatever order a process meets the shapes of a bucket in; and the device guard kernels launch under."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import kerneltune
import kerneltune.registry as reg
from kerneltune.library import serve
from tests.library.conftest import TEST_KERNELS

LSE_KERNEL = os.path.join(TEST_KERNELS, "attention", "torch_lse.py")
CAUSAL = {"causal": True}
# measured at N=4096, B*H=4; every shape below is in bucket D8 N1024 BH4, at distance 2 (in reach), 2.77 and
# 2.42 octaves (beyond it: the reference)
SHAPES = {(1, 4, 1024, 8): "torch_lse", (1, 4, 600, 8): "reference", (3, 1, 1024, 8): "reference"}


def test_a_decision_is_the_registrys_for_the_exact_shape_whatever_came_first_in_its_bucket(user_registry):
    path = user_registry([(LSE_KERNEL, dict(op="attention", dims={"B": 1, "H": 4, "N": 4096, "D": 8},
                                            args=CAUSAL, backend="torch"))])
    assert len({reg.bucket("attention", dict(zip("BHND", s))) for s in SHAPES}) == 1
    r = reg.load(path)
    for order in itertools.permutations(SHAPES):
        serve.reload()
        kerneltune.reset_served()
        for shape in order:
            dims = dict(zip("BHND", shape))
            decided = r.decide("attention", "cpu", dims, "float32", CAUSAL).entry
            assert serve.choose("attention", torch.device("cpu"), dims, "float32", CAUSAL).name == SHAPES[shape] \
                == (decided.name if decided else "reference"), (order, shape)
            q, k, v = (torch.randn(shape) for _ in range(3))
            with torch.no_grad():
                out = kerneltune.attention(q, k, v, causal=True)
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                       atol=2e-5, rtol=1e-4)
        assert kerneltune.served() == {"attention": {"torch_lse": 1, "reference": 2}}, order
    listed = {tuple(d["dims"][x] for x in "BHND"): (d["bucket"], d["kernel"]) for d in kerneltune.decisions()}
    assert listed == {s: ("D8 N1024 BH4", name) for s, name in SHAPES.items()}


@pytest.mark.filterwarnings("ignore:kerneltune. the registry holds attention kernels only for other devices")
def test_a_decision_is_made_per_cuda_device(user_registry, monkeypatch):
    """Two GPUs of one process may be different models: the registry's device key is each GPU's own (mocked
    here, as registry.device_key reads the given device's properties), and so is the decision."""
    keys = {0: "cuda:nvidia-h100-80gb-hbm3:sm90", 1: "cuda:nvidia-a100-sxm4-40gb:sm80"}
    real = reg.device_key
    monkeypatch.setattr(reg, "device_key", lambda device: keys[torch.device(device).index or 0]
                        if reg.device_kind(device) == "cuda" else real(device))
    user_registry([(LSE_KERNEL, dict(op="attention", dims={"B": 1, "H": 2, "N": 8, "D": 4}, args=CAUSAL,
                                     device_key=keys[0], backend="torch"))])
    dims = {"B": 1, "H": 2, "N": 8, "D": 4}
    for order in ((0, 1), (1, 0)):
        serve.reload()
        for i in order:
            for device in (torch.device("cuda", i), f"cuda:{i}"):
                got = serve.choose("attention", device, dims, "float32", CAUSAL).name
                assert got == ("torch_lse" if i == 0 else "reference"), (order, device)
        assert sorted((d["device"], d["kernel"]) for d in kerneltune.decisions()) == [
            ("cuda:0", "torch_lse"), ("cuda:1", "reference")]


@pytest.fixture
def mocked_cuda(monkeypatch):
    """A CUDA of two devices as far as torch.cuda.current_device and torch.cuda.device go: returns the list of
    devices torch.cuda.device entered and the current index, [0] at first."""
    current, entered = [0], []

    class Device:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            entered.append(self.index)
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", Device)
    return entered, current


def test_the_device_guard_makes_the_tensors_gpu_current_only_where_it_is_not(mocked_cuda, monkeypatch):
    entered, current = mocked_cuda
    with serve.device_guard(torch.device("cuda", 1)):
        assert current == [1]
    assert current == [0] and entered == [1]
    with serve.device_guard(torch.device("cuda", 0)):  # already current: nothing entered
        assert current == [0]
    current[0] = 1
    with serve.device_guard(torch.device("cuda", 0)):
        assert current == [0]
    assert current == [1] and entered == [1, 0]
    # the common paths cost one shared no-op, and CPU never asks CUDA anything
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked CUDA on the CPU path"))
    assert serve.device_guard(torch.device("cpu")) is serve.device_guard(torch.device("cpu", 0)) is serve._NO_GUARD
