"""Model FLOPs utilisation: achieved model FLOP/s (GPT.flops_per_token × tokens/s) over a stated peak.

GPU: the dense bf16 tensor-core peak from the data sheet of the device when it is known (H100 SXM
989 TFLOP/s as nanoGPT's A100 312), else a measured bf16 matmul rate. CPU: no data sheet applies, so
the peak is the fp32 matmul rate measured here and now (torch.mm, 1024², best of several) with the
threads this process has: an MFU near 100% means "as fast as a large torch matmul on these cores".
The summary always says which peak was used.
"""

from __future__ import annotations

import functools
import time

import torch

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets
# (matched longest name first: "L40S" before "L40" before "L4", "H800 PCIe" before "H800")
DATASHEET_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800 PCIe", 756e12),
    ("H800", 989e12), ("GH200", 989e12), ("A100", 312e12), ("A10G", 70e12), ("L4", 121e12), ("L40", 181e12),
    ("L40S", 362e12),
)


def datasheet_bf16(name: str) -> float:
    """The data sheet's dense bf16 peak of a GPU by its name (0.0: not known); the longest matching entry wins,
    so an "NVIDIA L40S" is not taken for an L4."""
    for key, flops in sorted(DATASHEET_BF16, key=lambda kv: -len(kv[0])):
        if key in name:
            return flops
    return 0.0


def measured_matmul_flops(device: str, dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 2)
    return 2 * n ** 3 / best


def device_peak(device: str) -> tuple[float, str]:
    """(peak FLOP/s of one process's device, where that number comes from); measured once per process."""
    return _device_peak(device, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _device_peak(device: str, threads: int) -> tuple[float, str]:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        flops = datasheet_bf16(name)
        if flops:
            return flops, f"{name} bf16 dense data sheet {flops / 1e12:.0f} TFLOP/s"
        flops = measured_matmul_flops(device, torch.bfloat16, n=4096)
        return flops, f"{name} measured bf16 matmul {flops / 1e12:.0f} TFLOP/s"
    flops = measured_matmul_flops("cpu", torch.float32)
    return flops, f"CPU measured fp32 matmul {flops / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} threads"
