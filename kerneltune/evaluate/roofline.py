"""Ceilings of a device, measured (not from a datasheet) once and cached, and where a timing sits
under them.

copy_gbps: a large device-to-device copy, counting bytes read plus bytes written.
matmul_tflops[dtype]: a large square matrix product through torch (fp32 without tf32 on GPU).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch


def _best_ms(fn, reps: int, device: str) -> float:
    """The fastest of ``reps`` runs: a ceiling is the best the device showed, not its typical pace."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return min(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def measure_ceilings(device: str) -> dict[str, Any]:
    """Measure copy bandwidth and matmul throughput on ``device`` (run in a trusted worker)."""
    dev = torch.device(device)
    # the best of several sizes: a working set that sits in a large last-level cache moves faster than DRAM,
    # and a ceiling must not be below what a kernel can show
    sizes = [256 << 20, 1 << 30] if device == "cuda" else [16 << 20, 64 << 20, 256 << 20]
    best = 0.0
    for nbytes in sizes:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
        dst = torch.empty_like(src)
        ms = _best_ms(lambda s=src, d=dst: d.copy_(s), 20 if device == "cuda" else 9, device)
        best = max(best, 2 * nbytes / (ms * 1e-3) / 1e9)
        del src, dst
    out: dict[str, Any] = {"copy_gbps": best, "matmul_tflops": {}, "copy_sizes_bytes": sizes}
    dtypes = ["float32", "bfloat16", "float16"] if device == "cuda" else ["float32"]
    n = 8192 if device == "cuda" else 1024
    for name in dtypes:
        dt = getattr(torch, name)
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        ms = _best_ms(lambda a=a, b=b: a @ b, 10 if device == "cuda" else 5, device)
        out["matmul_tflops"][name] = 2 * n**3 / (ms * 1e-3) / 1e12
    return out


def cache_path(device_key: str) -> str:
    from kerneltune.store.db import cache_dir

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_key)
    return os.path.join(cache_dir(), "ceilings", f"{safe}.json")


def load_cached(device_key: str) -> dict[str, Any] | None:
    try:
        with open(cache_path(device_key)) as f:
            data = json.load(f)
        if isinstance(data, dict) and "copy_gbps" in data and "matmul_tflops" in data:
            return data
    except (OSError, ValueError):
        pass
    return None


def save(device_key: str, ceilings: dict[str, Any]) -> None:
    path = cache_path(device_key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(ceilings, f, indent=1)
    os.replace(tmp, path)


def roofline(flops: float, nbytes: float, median_ms: float, ceilings: dict[str, Any] | None,
             dtype: str) -> dict[str, Any]:
    """Achieved rates and the fraction of the floor time: floor = max(flops/peak, bytes/bandwidth)."""
    sec = median_ms * 1e-3
    out: dict[str, Any] = {"gbps": nbytes / sec / 1e9, "tflops": flops / sec / 1e12}
    if ceilings:
        peak = ceilings["matmul_tflops"].get(dtype) or ceilings["matmul_tflops"].get("float32")
        t_mem = nbytes / (ceilings["copy_gbps"] * 1e9)
        t_math = flops / (peak * 1e12) if peak else 0.0
        floor = max(t_mem, t_math)
        out.update({"bound": "memory" if t_mem >= t_math else "compute", "floor_ms": floor * 1e3,
                    "pct_of_roof": 100.0 * floor / sec, "copy_gbps": ceilings["copy_gbps"], "peak_tflops": peak})
    return out
