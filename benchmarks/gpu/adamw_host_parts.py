"""Where the host time of one call of the AdamW template goes, part by part, on GPT-2 small's two groups.

The template's ``run()`` is timed whole, then its parts alone, each as the mean of N back-to-back calls:
``checked_us`` (the contract's checks), ``ptrs_us`` (the 4 lists' addresses), ``table_us`` (the cached device
table's lookup), ``stream_us`` (the current stream), ``launch_us`` (Triton's JIT launch of the kernel alone),
``compiled_runner_us`` (the compiled kernel's own launcher, without the JIT's binding: what a cheaper launch
could save; ``compiled_runner_args`` says which arguments it took). Where the template remembers lists that
passed its checks (``_checked_each`` beside ``_checked``), ``checked_each_us`` is the per-tensor checks alone
(what a call whose lists differ from those pays) and ``checked_us`` the usual call's. The kernels queue on the device
meanwhile; the device is synchronised before and after each figure. Output: JSON on stdout.

Run from the repository root (GPU host):  python3 benchmarks/gpu/adamw_host_parts.py [candidates/adamw/FILE.py]
Environment: PRESET (default gpt2-124m), DEV (default cuda; cpu runs under TRITON_INTERPRET=1), N (calls per
figure, default 200), NO_LAUNCH=1 (the host parts only, nothing launched: on a CPU, the checks at full size).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from kerneltune.train.model import GPT  # noqa: E402
from kerneltune.train.presets import PRESETS  # noqa: E402

DEFAULT = "candidates/adamw/triton_mt_table-5083c73e.py"  # the shipped H100 entry when this was written


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_us(f, n: int) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        f()
    dt = (time.perf_counter() - t) / n * 1e6
    sync()
    return dt


def group_parts(tmt, ps: list[torch.Tensor], n: int) -> dict:
    """The figures for one parameter group (its own gradients and zero moments)."""
    knobs = tmt.KERNELTUNE["params"]
    block, chunk, warps = int(knobs["BLOCK"]), int(knobs["CHUNK"]), int(knobs["num_warps"])
    evict, store = tmt._CACHE_HINTS[knobs["CACHE"]]
    lists = [ps, [torch.randn_like(p) * 1e-2 for p in ps], [torch.zeros_like(p) for p in ps],
             [torch.zeros_like(p) for p in ps]]
    hyper = dict(step=5, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    dev = ps[0].device
    no_launch = os.environ.get("NO_LAUNCH", "") not in ("", "0")
    if no_launch:
        tmt._checked(lists, dev)  # what the first call remembers
    else:
        tmt.run(*lists, **hyper)  # compiles; builds the table
    sync()
    ptrs = tuple(map(torch.Tensor.data_ptr, itertools.chain(*lists)))
    numels = tuple(map(torch.Tensor.numel, ps))
    table, t, c, aligned = tmt._table(ptrs, numels, 0.9, 0.95, chunk, dev)
    firsts = (lists[0][0], lists[1][0], lists[2][0], lists[3][0])

    def launch():
        return tmt._adamw_aligned[(c,)](*firsts, table, t, c, 0.999, 1e-3, 0.5, 1e-8, CHUNK=chunk, BLOCK=block,
                                        ALIGNED=aligned, F64=knobs["MOMENTS"] == "f64", EVICT=evict,
                                        STORE=store, num_warps=warps)

    r = {"tensors": len(ps)}
    if not no_launch:
        r["run_us"] = timed_us(lambda: tmt.run(*lists, **hyper), n)
        r["launch_us"] = timed_us(launch, n)
    if hasattr(tmt, "_checked_each"):
        r["checked_each_us"] = timed_us(lambda: tmt._checked_each(lists, dev), 5 * n)
    r.update({
         "checked_us": timed_us(lambda: tmt._checked(lists, dev), 5 * n),
         "ptrs_us": timed_us(lambda: tuple(map(torch.Tensor.data_ptr, itertools.chain(*lists))), 5 * n),
         "table_us": timed_us(lambda: tmt._table(ptrs, numels, 0.9, 0.95, chunk, dev), 5 * n),
         "stream_us": (timed_us(lambda: torch.cuda.current_stream(dev).cuda_stream, 5 * n)
                       if dev.type == "cuda" else None)})
    if no_launch:
        return r
    try:  # the compiled kernel's own launcher (Triton 3.x): runtime arguments, else constexprs too
        runner = launch()[(c, 1, 1)]
        args = (*firsts, table, t, c, 0.999, 1e-3, 0.5, 1e-8)
        try:
            runner(*args)
            r["compiled_runner_args"] = "runtime args"
        except TypeError as e:
            r["compiled_runner_err_runtime_args"] = f"{type(e).__name__}: {e}"[:200]
            args = (*args, chunk, block, aligned, knobs["MOMENTS"] == "f64", evict, store)
            runner(*args)
            r["compiled_runner_args"] = "with constexprs"
        sync()
        r["compiled_runner_us"] = timed_us(lambda: runner(*args), n)
    except Exception as e:  # noqa: BLE001 - a figure this Triton cannot give is reported, not fatal
        r["compiled_runner_err"] = f"{type(e).__name__}: {e}"[:300]
    return r


def main(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("adamw_template", path)
    tmt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tmt)
    n = int(os.environ.get("N", 200))
    torch.manual_seed(0)
    model = GPT(PRESETS[os.environ.get("PRESET", "gpt2-124m")].model).to(os.environ.get("DEV", "cuda"))
    out: dict = {"candidate": os.path.basename(path), "calls": n}
    for gi, group in enumerate(model.optimizer_groups(0.1)):
        out[f"group{gi}"] = group_parts(tmt, group["params"], n)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT), indent=1))
