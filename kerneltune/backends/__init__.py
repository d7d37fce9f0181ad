"""Backends: what a candidate's ``backend`` means on each device.

A backend says where it can run, which dtypes it can be checked in, and whether its timings count
as performance on that device. Turning source into a callable is the candidate's own business
(numba.njit, triton.jit, torch.utils.cpp_extension); the worker imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("torch", "numba", "triton", "cuda")


@dataclass(frozen=True)
class Capability:
    runs: bool            # can run on this device at all
    timed: bool           # its timings are reported as performance here
    dtypes: tuple[str, ...]
    note: str = ""        # shown in the verdict when something is not done


ALL = ("float32", "float16", "bfloat16")


def capability(backend: str, device: str) -> Capability:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if device == "cuda":
        if backend == "numba":
            return Capability(False, False, (), "numba candidates are CPU kernels: evaluate them with --device cpu")
        return Capability(True, True, ALL)
    if backend == "triton":
        return Capability(True, False, ("float32", "float16"),
                          "checked through Triton's CPU interpreter in fp32 and fp16 at the check shapes; not timed: "
                          "interpreter speed is not performance")
    if backend == "cuda":
        return Capability(False, False, (), "no CUDA GPU on this machine")
    return Capability(True, True, ALL)
