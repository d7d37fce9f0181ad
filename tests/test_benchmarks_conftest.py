"""benchmarks/conftest.py with --kt-device cuda (no GPU here: CUDA's events faked): each kt_bench test gets the
CUDA-event timer, which flushes L2 before the start event and syncs after the end event, as bench_gpu.py's Timer."""

from __future__ import annotations

import time
import types

import torch

from tests.interp import load_file


class _FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.t - self.t) * 1e3


def test_cuda_benchmarks_get_the_event_timer_and_cpu_ones_keep_perf_counter(monkeypatch):
    conftest = load_file("benchmarks/conftest.py", "kt_test_bench_conftest")

    def items():
        out = []
        for names in (["kt_bench", "benchmark"], ["tmp_path"]):
            marks: list = []
            out.append((types.SimpleNamespace(fixturenames=names, add_marker=marks.append), marks))
        return out

    for device, want in (("cpu", [[], []]), ("cuda", [[conftest._CudaEvents], []])):
        config = types.SimpleNamespace(getoption=lambda name, default=None, d=device: d)
        got = items()
        conftest.pytest_collection_modifyitems(config, [i for i, _ in got])
        assert [[type(m.kwargs["timer"]) for m in marks] for _, marks in got] == want
        assert all(m.name == "benchmark" for _, marks in got for m in marks)

    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    clock = conftest._CudaEvents()
    clock.flush = torch.ones(16, dtype=torch.uint8)  # the 256 MB buffer, small and on the CPU
    for _ in range(2):  # pytest-benchmark's pedantic: start, the call, end; round after round
        assert clock() == 0.0 and int(clock.flush.sum()) == 0 and not syncs   # flushed, start recorded, no wait
        clock.flush.fill_(1)
        time.sleep(0.02)
        assert 0.015 < clock() < 1.0 and syncs == [1]                           # end recorded after a device sync
        syncs.clear()
    assert clock.__name__ == "cuda_events_l2_flushed"  # what pytest-benchmark stores as the timer
