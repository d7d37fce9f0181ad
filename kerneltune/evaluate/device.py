"""The device a measurement ran on, and the provenance every number carries (DESIGN rule 5)."""

from __future__ import annotations

import functools
import os
import platform
import re
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def device_info(device: str) -> dict[str, Any]:
    """name, kind, key (a normalised id used for caches and the registry) and details of 'cpu', 'cuda' (the
    current CUDA device) or 'cuda:N' (GPU N: a machine's GPUs need not be one model)."""
    if device == "cuda" or device.startswith("cuda:"):
        index = torch.cuda.current_device() if device == "cuda" else int(device.split(":", 1)[1])
        return _cuda_info(index)
    return _cpu_info()


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> dict[str, Any]:
    p = torch.cuda.get_device_properties(index)
    name = p.name
    cc = f"{p.major}.{p.minor}"
    key = f"cuda:{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}:sm{p.major}{p.minor}"
    return {"kind": "cuda", "name": name, "key": key, "compute_capability": cc,
            "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
            "cuda": torch.version.cuda}


@functools.lru_cache(maxsize=None)
def _cpu_info() -> dict[str, Any]:
    threads = torch.get_num_threads()
    model = cpu_model()
    key = f"cpu:{re.sub(r'[^a-z0-9]+', '-', model.lower()).strip('-')}:{threads}t"
    return {"kind": "cpu", "name": model, "key": key, "threads": threads, "cores": os.cpu_count(),
            "machine": platform.machine()}


@functools.lru_cache(maxsize=None)
def versions() -> dict[str, str | None]:
    import kerneltune

    out: dict[str, str | None] = {"kerneltune": kerneltune.__version__, "torch": torch.__version__,
                                  "python": platform.python_version()}
    for mod in ("triton", "numba", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional backend is a fact, not an error
            out[mod] = None
    return out
