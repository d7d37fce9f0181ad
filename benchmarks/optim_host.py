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

``--template FILE`` serves an AdamW template instead (its ``run()``, and its ``run_unchecked`` on the steps the
optimizer has checked), with its kernel launch a no-op, so its checks, addresses and table count too;
``--torch`` steps ``torch.optim.AdamW(fused=True)`` in the same rounds with its kernel (``torch._fused_adamw_``)
a no-op: the two optimizers' host sides side by side, which decide a step's
time wherever the host, not the device, is the slower.

Usage: python benchmarks/optim_host.py [--preset gpt2-124m] [--device cpu] [--rounds 25] [--steps 20]
                                       [--against FILE] [--template FILE] [--torch] [--no-count-adds] [--json]
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


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](...)`` does nothing (the host side before it still runs)."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *a, **k: None


def template_without_launch(path: str) -> Any:
    """An AdamW template's ``run()`` with every kernel launch in its module a no-op: its checks, addresses and
    table run as they would, nothing is computed."""
    import triton

    mod = _load(path, "kerneltune_adamw_template", "an adamw candidate file")
    kernels = [n for n, v in vars(mod).items() if isinstance(v, triton.runtime.jit.JITFunction)]
    if not kernels or not callable(getattr(mod, "run", None)):
        raise SystemExit(f"optim_host.py: {path} has no run() or no @triton.jit kernel to stand in for")
    for n in kernels:
        setattr(mod, n, _NoLaunch())
    return mod.run


def noop_serving(fn: Any = None, name: str = "no-op") -> Any:
    """Every adamw call served by ``fn`` (default: a kernel that does nothing); returns a function that puts
    serving back."""
    from kerneltune.library import serve
    from kerneltune.registry import Decision, Entry

    entry = Entry(op="adamw", device_key="any", device_name="any", dtype="float32", dims={}, args={}, bucket="any",
                  candidate=os.path.abspath(__file__), source_hash="no-op", params={}, baseline="none",
                  speedup=1.0, name=name)
    choice = serve.Choice(fn or (lambda *a, **k: None), name, entry, Decision(entry, "exact", f"the {name} kernel"))
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
    return _load(path, "kerneltune_optim_other", "an optim.py file")


def _load(path: str, name: str, what: str) -> Any:
    """The file at ``path`` as a fresh module ``name``; ``what`` it should be, for the error."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"optim_host.py: cannot load {path}: give the path of {what}")
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
    restore = (noop_serving(template_without_launch(a.template), os.path.basename(a.template)) if a.template
               else noop_serving())
    real_add, real_fused = torch._foreach_add_, torch._fused_adamw_
    try:
        fused = a.device.startswith("cuda") or a.torch
        opts = {name: m.AdamW(model.optimizer_groups(0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                              fused=fused) for name, m in mods.items()}
        if a.torch:  # torch's fused AdamW, its kernel a no-op too: its own host side alone
            torch._fused_adamw_ = lambda *args, **kw: None
            opts["torch"] = torch.optim.AdamW(model.optimizer_groups(0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                                              fused=True)
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
        torch._foreach_add_, torch._fused_adamw_ = real_add, real_fused
        restore()
    served = kerneltune.served().get("adamw", {})
    out = {"device": a.device, "torch": torch.__version__, "preset": a.preset,
           "tensors": sum(len(g["params"]) for g in opts["this"].param_groups), "rounds": a.rounds,
           "steps": a.steps, "count_adds": a.count_adds, "served": served,
           "host_us": {n: {"median": statistics.median(v), "min": min(v)} for n, v in us.items()}}
    if a.against:
        out["against"] = a.against
        out["ratio"] = out["host_us"]["against"]["median"] / out["host_us"]["this"]["median"]
    if a.torch:
        out["vs_torch"] = out["host_us"]["torch"]["median"] / out["host_us"]["this"]["median"]
    out["kernel"] = os.path.relpath(a.template) if a.template else "no-op"
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
    ap.add_argument("--template", default="", metavar="FILE", help="serve this AdamW template (run, run_unchecked) "
                    "with its kernel launch a no-op (its checks, addresses and table counted) instead of a no-op kernel")
    ap.add_argument("--torch", action="store_true", help="also step torch.optim.AdamW(fused=True) with its kernel "
                    "(torch._fused_adamw_) a no-op, in the same rounds: its host side against this one's")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for flag in ("rounds", "steps"):  # 0 would end in a traceback (a median of nothing), not a measurement
        if getattr(a, flag) < 1:
            ap.error(f"--{flag} {getattr(a, flag)}: give at least 1")
    from kerneltune.train.presets import PRESETS

    if a.preset not in PRESETS:  # else a KeyError once the model is built
        ap.error(f"--preset {a.preset}: use one of {', '.join(PRESETS)}")
    for flag, path, how in (("--against", a.against, "git show REV:kerneltune/optim.py > FILE"),
                            ("--template", a.template, "e.g. candidates/adamw/triton_mt_table.py")):
        if path and not os.path.isfile(path):
            print(f"optim_host.py: {flag} {path}: no such file ({how})", file=sys.stderr)
            return 2
    out = measure(a)
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    what = f"{a.template}'s run() with its launch a no-op" if a.template else "the kernel a no-op"
    print(f"{a.preset} ({out['tensors']} tensors) on {a.device}, {a.rounds} rounds; host time per step, "
          f"{what}{'' if a.count_adds else ', count adds left out'}")
    labels = {"this": "this checkout", "against": a.against, "torch": "torch AdamW(fused=True), kernel a no-op"}
    for name, r in out["host_us"].items():
        print(f"  {labels[name]:40s} median {r['median']:8.1f} us   least {r['min']:8.1f} us")
    if "ratio" in out:
        print(f"  {out['ratio']:.2f}x less host time than {a.against}")
    if "vs_torch" in out:
        print(f"  torch's host time / this checkout's: {out['vs_torch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    raise SystemExit(main())
