"""The reference of the library's ``kerneltune::attention_backward`` op, what serves where the custom ops run
and no backward kernel reaches the shape (a compiled call site with dynamic shapes, a dropped kernel): SDPA's
own backward after its forward recomputed (since 2026-11-28) against the exact fp32 recomputation (before, and
still where torch cannot let autograd back into the custom op), side by side in one process, interleaved,
median of the rounds. Both are called as the custom op's body calls them.

Usage: python benchmarks/attention_fallback_bwd.py [--device cpu] [--dtype float32] [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time

import torch

SHAPES = [(4, 8, 512, 64), (1, 8, 2048, 64)]  # (B, H, N, D), causal


def measure(a: argparse.Namespace) -> dict:
    la = importlib.import_module("kerneltune.library.attention")
    dtype = getattr(torch, a.dtype)
    fns = {"sdpa_recomputed": la.reference_backward, "exact_fp32": la.exact_backward}
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    g = torch.Generator(device=a.device).manual_seed(0)
    rows = []
    for shape in SHAPES:
        q, k, v, do = (torch.randn(shape, device=a.device, generator=g).to(dtype) for _ in range(4))
        ms: dict[str, list[float]] = {n: [] for n in fns}
        for r in range(a.rounds + 1):  # the first round warms up, and is dropped
            for n, f in fns.items():
                sync()
                t0 = time.perf_counter()
                f(do, q, k, v, True, None)
                sync()
                if r:
                    ms[n].append((time.perf_counter() - t0) * 1e3)
        med = {n: statistics.median(v) for n, v in ms.items()}
        rows.append({"shape": list(shape), "causal": True, "median_ms": med,
                     "exact_over_sdpa": med["exact_fp32"] / med["sdpa_recomputed"]})
    return {"device": a.device, "device_name": (torch.cuda.get_device_name(a.device)
                                                if a.device.startswith("cuda") else "cpu"),
            "torch": torch.__version__, "dtype": a.dtype, "rounds": a.rounds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.rounds < 1:  # 0 would end in a traceback (a median of nothing), not a measurement
        ap.error(f"--rounds {a.rounds}: give at least 1")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("attention_fallback_bwd.py: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    out = measure(a)
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"kerneltune::attention_backward's reference, {out['device_name']}, {a.dtype}, causal, "
          f"median of {a.rounds} rounds")
    for r in out["rows"]:
        m = r["median_ms"]
        print(f"  B,H,N,D {tuple(r['shape'])}: SDPA's own (forward recomputed) {m['sdpa_recomputed']:.1f} ms, "
              f"exact fp32 {m['exact_fp32']:.1f} ms: {r['exact_over_sdpa']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
