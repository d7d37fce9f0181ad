"""kerneltune.optim.AdamW's own host time per step: what its Python side costs, with the served kernel a no-op.

A tuned optimizer step is as fast as the slower of the device and the host (``optim_step.py``); this script
times the host side that belongs to the optimizer itself: the bucketing, the checks, the step counts, the
serving decision, with every AdamW call served by a kernel that does nothing (so it runs on any device,
a CPU included, and the figure is the optimizer's alone). With ``--against FILE`` it steps a second
optimizer built from another revision's ``kerneltune/optim.py`` (``git show REV:kerneltune/optim.py > FILE``)
on the same parameters, interleaved in rounds in one process: the A/B this machine's noise allows (two
processes minutes apart differed by 2x on the 2-core CI VM). ``--no-count-adds`` leaves out the foreach
add of the step counts, which on a CPU is 148 scalar adds (about 160 us for GPT-2 small's larger group)
and on a GPU one launch.

Usage: python benchmarks/optim_host.py [--preset gpt2-124m] [--device cpu] [--rounds 25] [--steps 20]
                                       [--against FILE] [--no-count-adds] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Any

import torch


def noop_serving() -> Any:
    """Every adamw call served by a kernel that does nothing; returns a function that puts serving back."""
    from kerneltune.library import serve
    from kerneltune.registry import Decision, Entry

    entry = Entry(op="adamw", device_key="any", device_name="any", dtype="float32", dims={}, args={}, bucket="any",
                  candidate=os.path.abspath(__file__), source_hash="no-op", params={}, baseline="none",
                  speedup=1.0, name="no-op")
    choice = serve.Choice(lambda *a, **k: None, "no-op", entry, Decision(entry, "exact", "the no-op kernel"))
    real = serve.choose

    def choose(op, device, dims, dtype, args=None):
        return choice if op == "adamw" else real(op, device, dims, dtype, args)

    serve.choose = choose

    def restore() -> None:
        serve.choose = real
    return restore


def load_optim(path: str) -> Any:
    """Another revision's ``kerneltune/optim.py`` as a module of its own (it imports the installed package's
    other modules)."""
    spec = importlib.util.spec_from_file_location("kerneltune_optim_other", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"optim_host.py: cannot load {path}: give the path of an optim.py file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(a: argparse.Namespace) -> dict:
    import kerneltune
    from kerneltune import optim
    from kerneltune.train.model import GPT
    from kerneltune.train.presets import PRESETS

    torch.manual_seed(0)
    model = GPT(PRESETS[a.preset].model).to(a.device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    mods = {"this": optim}
    if a.against:
        mods["against"] = load_optim(a.against)
    restore = noop_serving()
    real_add = torch._foreach_add_
    try:
        opts = {name: m.AdamW(model.optimizer_groups(0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                              fused=a.device.startswith("cuda")) for name, m in mods.items()}
        for o in opts.values():  # state created, groups remembered
            for _ in range(3):
                o.step()
        if not a.count_adds:
            torch._foreach_add_ = lambda *args, **kw: None
        kerneltune.reset_served()
        us: dict[str, list[float]] = {n: [] for n in opts}
        for r in range(a.rounds):
            order = list(opts.items())
            for name, o in order[r % 2:] + order[:r % 2]:
                best = float("inf")
                for _ in range(3):  # the least of three: a round's figure with the VM's hiccups left out
                    t0 = time.perf_counter()
                    for _ in range(a.steps):
                        o.step()
                    best = min(best, (time.perf_counter() - t0) / a.steps)
                us[name].append(best * 1e6)
    finally:
        torch._foreach_add_ = real_add
        restore()
    served = kerneltune.served().get("adamw", {})
    out = {"device": a.device, "torch": torch.__version__, "preset": a.preset,
           "tensors": sum(len(g["params"]) for g in opts["this"].param_groups), "rounds": a.rounds,
           "steps": a.steps, "count_adds": a.count_adds, "served": served,
           "host_us": {n: {"median": statistics.median(v), "min": min(v)} for n, v in us.items()}}
    if a.against:
        out["against"] = a.against
        out["ratio"] = out["host_us"]["against"]["median"] / out["host_us"]["this"]["median"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--steps", type=int, default=20, help="steps per timing (each round takes the least of three)")
    ap.add_argument("--against", default="", metavar="FILE", help="another revision's kerneltune/optim.py")
    ap.add_argument("--no-count-adds", dest="count_adds", action="store_false",
                    help="leave out the foreach add of the step counts")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.against and not os.path.isfile(a.against):
        print(f"optim_host.py: --against {a.against}: no such file (git show REV:kerneltune/optim.py > FILE)",
              file=sys.stderr)
        return 2
    out = measure(a)
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{a.preset} ({out['tensors']} tensors) on {a.device}, {a.rounds} rounds; host time per step, the kernel "
          f"a no-op{'' if a.count_adds else ', count adds left out'}")
    for name, r in out["host_us"].items():
        label = "this checkout" if name == "this" else a.against
        print(f"  {label:40s} median {r['median']:8.1f} us   least {r['min']:8.1f} us")
    if "ratio" in out:
        print(f"  {out['ratio']:.2f}x less host time than {a.against}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    raise SystemExit(main())
