"""The pytest-benchmark suite: for every op, the registry's winners for this device and the shipped seeds,
against the op's torch baselines, on the shapes the registry serves here.

    pytest benchmarks/ --benchmark-only                       # CPU; a few minutes on 2 cores
    pytest benchmarks/ --benchmark-only --kt-device cuda      # on a GPU runner

Writes pytest-benchmark's JSON (``--benchmark-json``, default .benchmarks/kerneltune-benchmark.json: every
timing, with provenance in each benchmark's extra_info) and appends one row per contestant and shape to the
results CSV (``--kt-csv``, default .benchmarks/kerneltune-results.csv), with device, versions, commit,
timestamp and p20/p50/p80 — the file `kerneltune report` reads.

With ``--kt-device cuda`` each call is timed as benchmarks/bench_gpu.py's Timer and the evaluator time it: L2
flushed (a 256 MB write) before it, CUDA events around it, a full device sync after it (pytest-benchmark's timer
is _CudaEvents then); on the CPU, perf_counter around the call.

Candidates run in this process here, which the evaluator never allows: acceptable only because these are
shipped or promoted kernels that already passed it, and each is verified once more against the op's fp64
reference before it is timed (correct before fast). Contestants are timed one after another, not
interleaved: for decisions, use `kerneltune bench --check` (same-run interleaved ratios, statistics).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_RESULTS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}


def pytest_addoption(parser):
    g = parser.getgroup("kerneltune")
    g.addoption("--kt-device", default="cpu", help="cpu or cuda (default cpu)")
    g.addoption("--kt-csv", default=os.path.join(".benchmarks", "kerneltune-results.csv"),
                help="results CSV the rows are appended to ('' for none)")
    g.addoption("--kt-seconds", type=float, default=1.0, help="target timing per contestant and shape")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_json", None) is None and hasattr(config.option, "benchmark_json"):
        os.makedirs(".benchmarks", exist_ok=True)
        config.option.benchmark_json = Path(".benchmarks") / "kerneltune-benchmark.json"


def pytest_collection_modifyitems(config, items):
    """With --kt-device cuda, every kt_bench test gets _CudaEvents as its timer (pytest-benchmark's marker option):
    perf_counter around a launch times the host, not the kernel."""
    if config.getoption("kt_device", "cpu") != "cuda":
        return
    for item in items:
        if "kt_bench" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=_CudaEvents()))


class _CudaEvents:
    """pytest-benchmark's timer on CUDA. benchmark.pedantic (iterations=1) calls its timer exactly twice a round,
    before and after the call: the first call flushes L2 and records a start event, and returns 0; the second
    records the end event, waits for the device, and returns the seconds between the two events. So a round's
    duration (end - start) is the kernel's time on the GPU's clock, as benchmarks/bench_gpu.py's Timer measures
    it: the flush is queued ahead of the start event, which hides the call's launch behind it."""

    __name__ = "cuda_events_l2_flushed"   # what pytest-benchmark prints and stores as the timer

    def __init__(self) -> None:
        self.flush: Any = None
        self.start: Any = None

    def __call__(self) -> float:
        if self.start is None:
            if self.flush is None:  # larger than L2 (50 MB on H100): every call starts cold
                self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
            self.flush.zero_()
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
            return 0.0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        start, self.start = self.start, None
        return start.elapsed_time(end) / 1e3


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):  # Liger-Kernel naming
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# -- what is benchmarked ---------------------------------------------------------------------------------------
def _device(config) -> str:
    d = config.getoption("kt_device")
    if d == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--kt-device cuda: no CUDA GPU here")
    return d


def cases_for(op: str, device: str) -> list[Any]:
    """The shapes the registry serves for ``op`` on this device; the op's CPU default (small) when it has none."""
    from kerneltune import registry as reg
    from kerneltune.check import entry_case
    from kerneltune.evaluate.device import device_info
    from kerneltune.ops import get_op

    key = device_info(device)["key"]
    seen: dict[str, Any] = {}
    for e in reg.load().for_device(key):
        if e.op == op:
            c = entry_case(e)
            seen.setdefault(c.name, c)
    if not seen:
        for c in get_op(op).timed_cases(device if device == "cuda" else "cpu"):
            seen.setdefault(c.name, c)
    return list(seen.values())


def contestants_for(op: str, device: str) -> list[tuple[str, str, str]]:
    """(name, kind, path-or-baseline) — the primary baseline first, then the other baselines, then the registry
    winners for this device and the shipped seeds that can be timed here (one entry per file)."""
    from kerneltune import registry as reg
    from kerneltune.backends import capability
    from kerneltune.evaluate.device import device_info
    from kerneltune.ops import get_op

    spec = get_op(op)
    names = list(spec.baselines(device))
    names.sort(key=lambda n: n != spec.primary_baseline)
    out = [(n, "baseline", n) for n in names]
    files: dict[str, tuple[str, str]] = {}
    for e in reg.load().for_device(device_info(device)["key"]):
        if e.op == op and os.path.isfile(e.path) and not reg.check_file(e):
            files.setdefault(os.path.realpath(e.path), (e.name, "winner"))
    for p in sorted(glob.glob(str(ROOT / "candidates" / op / "*.py"))):
        meta = reg.file_meta(open(p, encoding="utf-8").read())
        if meta.get("op") == op and capability(meta.get("backend", ""), device).timed:
            files.setdefault(os.path.realpath(p), (Path(p).stem, "seed"))
    out += [(name, kind, path) for path, (name, kind) in files.items()]
    return out


def pytest_generate_tests(metafunc):
    op = getattr(metafunc.module, "OP", None)
    if op is None or "kt_case" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    cases = cases_for(op, device)
    who = contestants_for(op, device)
    metafunc.parametrize("kt_case", cases, ids=[_id(c.name) for c in cases], scope="module")
    metafunc.parametrize("kt_contestant", who, ids=[f"{k}:{n}" for n, k, _ in who])


def _id(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")


# -- running one -----------------------------------------------------------------------------------------------
def _load(path: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location(f"kt_bench_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a shipped/promoted kernel, verified below before it is timed
    return mod.run


def _to(x: Any, device: str) -> Any:
    if isinstance(x, list):
        return [t.to(device) for t in x]
    return x.to(device)


def _cpu(d: dict[str, Any]) -> dict[str, Any]:
    return {k: [t.cpu() for t in v] if isinstance(v, list) else v.cpu() for k, v in d.items()}


@pytest.fixture
def kt_bench(request, benchmark, kt_case, kt_contestant):
    """Verify the contestant once against the fp64 reference, then time it with pytest-benchmark."""
    from kerneltune.ops import get_op

    op = request.module.OP
    device = _device(request.config)
    spec = get_op(op)
    name, kind, where = kt_contestant
    fn = spec.baselines(device)[where] if kind == "baseline" else _load(where)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    inputs = spec.make_inputs(kt_case, 1)
    expected = spec.reference(inputs)
    mine = {k: _to([t.clone() for t in v] if isinstance(v, list) else v.clone(), device)
            for k, v in inputs.tensors.items()}
    got = spec.invoke(fn, mine, dict(inputs.args))
    sync()
    why = spec.compare(inputs, expected, _cpu(got))
    if why:
        pytest.fail(f"{name} is wrong on {kt_case.name}: {why} (correct before fast: not timed)")

    work = {k: _to(v, device) for k, v in spec.make_inputs(kt_case, 2).tensors.items()}
    args = dict(spec.make_inputs(kt_case, 2).args)

    def call() -> None:
        spec.invoke(fn, work, args)
        sync()

    t0 = time.perf_counter()
    call()
    one = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(max(request.config.getoption("kt_seconds") / one, 5), 200))
    benchmark.group = f"{op} · {kt_case.name}"
    from kerneltune.evaluate.procfs import LoadMeter

    if device == "cuda":  # the timer (_CudaEvents) flushes L2, records the events and syncs: the call only launches
        marker = request.node.get_closest_marker("benchmark")
        if marker is None or not isinstance(marker.kwargs.get("timer"), _CudaEvents):
            pytest.fail("--kt-device cuda: the benchmark has no CUDA-event timer (conftest's collection hook)")
        timed: Callable[[], Any] = lambda: spec.invoke(fn, work, args)  # noqa: E731
    else:
        timed = call
    meter = LoadMeter().start()  # CPU share other processes took meanwhile: a busy row is not a clean row
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=min(3, rounds))
    foreign = meter.stop()
    data = sorted(benchmark.stats.stats.data)
    q = statistics.quantiles(data, n=10, method="inclusive") if len(data) > 1 else [data[0]] * 9
    row = {"contestant": name, "kind": "baseline" if kind == "baseline" else "candidate", "role": kind,
           "p20_ms": q[1] * 1e3, "p50_ms": statistics.median(data) * 1e3, "p80_ms": q[7] * 1e3,
           "candidate_hash": _hash(where) if kind != "baseline" else "", "foreign_load": foreign}
    benchmark.extra_info.update({**_provenance(device), "op": op, "shape": kt_case.name, "dtype": kt_case.dtype,
                                 **row})
    _RESULTS.setdefault((op, kt_case.name, kt_case.dtype, device), {})[name] = row


def _hash(path: str) -> str:
    from kerneltune.registry import file_hash, strip_header

    return file_hash(strip_header(open(path, encoding="utf-8").read()))[:16]


def _provenance(device: str) -> dict[str, Any]:
    from kerneltune.check import git_commit
    from kerneltune.evaluate.device import device_info, versions

    info, v = device_info(device), versions()
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(str(ROOT)),
            "device": info["name"], "device_key": info["key"], "torch": v["torch"], "triton": v.get("triton"),
            "numba": v.get("numba"), "kerneltune": v["kerneltune"], "threads": torch.get_num_threads()}


def pytest_sessionfinish(session, exitstatus):
    """One CSV row per contestant and shape; speedup = primary baseline p50 / contestant p50 (this session)."""
    path = session.config.getoption("kt_csv", None)
    if not path or not _RESULTS:
        return
    from kerneltune.ops import get_op
    from kerneltune.report import append_rows

    rows = []
    for (op, shape, dtype, device), by in _RESULTS.items():
        prov = _provenance(device)
        primary = get_op(op).primary_baseline
        base = by.get(primary, {}).get("p50_ms")
        for name, r in by.items():
            rows.append({**prov, "source": "pytest-benchmark", "op": op, "shape": shape, "dtype": dtype,
                         "candidate": name, "candidate_hash": r["candidate_hash"], "contestant": name,
                         "kind": r["kind"], "p20_ms": r["p20_ms"], "p50_ms": r["p50_ms"], "p80_ms": r["p80_ms"],
                         "speedup_vs_primary": base / r["p50_ms"] if base and r["p50_ms"] else None,
                         "foreign_load": r["foreign_load"]})
    append_rows(path, rows)
    _RESULTS.clear()
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"kerneltune: {len(rows)} rows appended to {path}")
