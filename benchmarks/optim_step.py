"""One optimizer step of GPT-2 small, as a training loop takes it: torch.optim.AdamW against kerneltune.optim.AdamW.

The parameters are the training model's own (``GPT(PRESETS[...].model)``), in its two groups (weight decay
on matrices, none on vectors), with random gradients. Both optimizers get the same arguments (fused=True on
CUDA). Measured side by side, interleaved in rounds:

- ``step_ms``: time per step, N steps back to back and one sync at the end: the slower of the host and the
  device sets it;
- ``host_ms``: host time per step call (what the Python side costs before it returns);
- ``kernel_host_ms`` (kerneltune): the part of ``host_ms`` spent inside the served kernel's calls (its
  ``run()``: its checks, its launch; and kerneltune's first-call bookkeeping); ``host_ms`` minus this is the
  optimizer's own (0 where nothing served);
- ``device_ms`` (CUDA): device time per step alone: the stream is first held by a sleep kernel long enough
  for the host to queue all N steps, so CUDA events around them time the GPU's work only (``host_ahead``
  says whether the host did get ahead; where it did not, the figure is not reported);
- the kernel that served each kerneltune step (``kerneltune.served()``);
- with ``--profile N``: N more kerneltune steps under cProfile, the functions that take the most host time
  (own time and with what they call, per step): where the host side goes, the kernel's launch included.

A tuned step that is quick on the device but slow on the host, or that waits for the device, shows here
before it shows as a slower training step.

Usage: python benchmarks/optim_step.py [--device cuda] [--preset gpt2-124m] [--steps 50] [--rounds 5] [--profile N]
                                      [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time

import torch


def build(preset: str, device: str, seed: int):
    from kerneltune.train.model import GPT
    from kerneltune.train.presets import PRESETS

    torch.manual_seed(seed)
    model = GPT(PRESETS[preset].model).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile(opt, steps: int, device: str, top: int = 25) -> list[dict]:
    """The functions that take the most host time over ``steps`` steps of ``opt``, per step: own time, time
    with callees, calls (cProfile: its own cost inflates every figure alike; read them as shares)."""
    sync(device)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        opt.step()
    pr.disable()
    sync(device)
    st = pstats.Stats(pr)
    rows = []
    for (file, line, fn), (_cc, calls, own, cum, _callers) in st.stats.items():  # type: ignore[attr-defined]
        where = f"{file.split('site-packages/')[-1]}:{line}({fn})" if line else fn
        rows.append({"function": where, "calls": calls / steps, "own_us": own / steps * 1e6, "cum_us": cum / steps * 1e6})
    rows.sort(key=lambda r: r["own_us"], reverse=True)
    return rows[:top]


@contextlib.contextmanager
def kernel_host_time():
    """While open, the host seconds spent inside the served kernel's calls (``kerneltune.optim._adamw_impl``,
    which ``_step_with`` looks up at each call) add up in the yielded one-element list; put back on exit
    (the script may run inside another process: tests)."""
    from kerneltune import optim

    inside = [0.0]
    impl = optim._adamw_impl

    def timed_impl(*args, **kwargs):
        t = time.perf_counter()
        try:
            return impl(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t

    optim._adamw_impl = timed_impl
    try:
        yield inside
    finally:
        optim._adamw_impl = impl


def measure(a: argparse.Namespace) -> dict:
    """Both optimizers stepped side by side (module docstring); the JSON report."""
    import kerneltune
    from kerneltune import optim
    from kerneltune.train.kernels import adamw_options

    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(a.device).index or 0)  # events, the sleep and synchronize() act on the current one
    kw = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **adamw_options(a.device))
    contestants = {}
    for name, cls in (("torch.optim.AdamW", torch.optim.AdamW), ("kerneltune.optim.AdamW", optim.AdamW)):
        m = build(a.preset, a.device, 0)
        contestants[name] = cls(m.optimizer_groups(0.1), **kw)
    n_params = sum(p.numel() for g in contestants["torch.optim.AdamW"].param_groups for p in g["params"])
    samples: dict[str, dict[str, list[float]]] = {n: {"step_ms": [], "host_ms": [], "device_ms": []}
                                                  for n in contestants}
    samples["kerneltune.optim.AdamW"]["kernel_host_ms"] = []
    ahead = True
    with kernel_host_time() as inside:
        for opt in contestants.values():  # warm-up: state allocation, compiles, first-call checks
            for _ in range(3):
                opt.step()
        sync(a.device)
        kerneltune.reset_served()
        for r in range(a.rounds):
            order = list(contestants.items())
            order = order[r % 2:] + order[:r % 2]
            for name, opt in order:
                sync(a.device)
                t0 = time.perf_counter()
                host = 0.0
                inside[0] = 0.0
                for _ in range(a.steps):
                    h0 = time.perf_counter()
                    opt.step()
                    host += time.perf_counter() - h0
                sync(a.device)
                samples[name]["step_ms"].append((time.perf_counter() - t0) * 1e3 / a.steps)
                samples[name]["host_ms"].append(host * 1e3 / a.steps)
                if "kernel_host_ms" in samples[name]:
                    samples[name]["kernel_host_ms"].append(inside[0] * 1e3 / a.steps)
                if cuda:  # the device's time alone: hold the stream while the host queues every step
                    ms, queued = device_ms(opt, a.steps)
                    samples[name]["device_ms"].append(ms)
                    ahead = ahead and queued
    out = {"device": torch.cuda.get_device_name(torch.device(a.device)) if cuda else a.device,
           "torch": torch.__version__, "preset": a.preset, "params": n_params, "steps": a.steps,
           "rounds": a.rounds, "options": {k: v for k, v in kw.items() if k != "betas"},
           "served": kerneltune.served().get("adamw", {}), "results": {}}
    out["host_ahead"] = ahead if cuda else None
    for name, s in samples.items():
        out["results"][name] = {k: statistics.median(v) for k, v in s.items() if v and (k != "device_ms" or ahead)}
    if a.profile > 0:
        out["profile"] = profile(contestants["kerneltune.optim.AdamW"], a.profile, a.device)
    t, k = out["results"]["torch.optim.AdamW"], out["results"]["kerneltune.optim.AdamW"]
    out["speedup"] = t["step_ms"] / k["step_ms"]
    if "device_ms" in t and "device_ms" in k:
        out["device_speedup"] = t["device_ms"] / k["device_ms"]
    return out


def device_ms(opt, steps: int) -> tuple[float, bool]:
    """The device's time per step alone: the stream is held by a sleep kernel while the host queues every
    step; and whether the sleep was still running once they were all queued (else the figure is not the
    device's alone)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    hold = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # about a second at H100 clocks: far longer than queueing N steps
    hold.record()
    start.record()
    for _ in range(steps):
        opt.step()
    end.record()
    queued = hold.query() is False
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, queued


def report(out: dict, a: argparse.Namespace) -> None:
    print(f"{a.preset} ({out['params'] / 1e6:.1f}M params) on {out['device']}, {a.rounds} rounds of {a.steps} steps; "
          f"medians per step")
    for name, r in out["results"].items():
        dev = f"   device alone {r['device_ms']:8.3f} ms" if "device_ms" in r else ""
        inner = f" (in the kernel's calls {r['kernel_host_ms']:.3f})" if "kernel_host_ms" in r else ""
        print(f"  {name:24s} step {r['step_ms']:8.3f} ms   host {r['host_ms']:8.3f} ms{inner}{dev}")
    extra = f", device alone {out['device_speedup']:.3f}x" if "device_speedup" in out else ""
    print(f"  speedup {out['speedup']:.3f}x{extra} (torch / kerneltune); kerneltune steps served by {out['served']}")
    for row in out.get("profile", []):
        print(f"    {row['own_us']:8.1f} us own {row['cum_us']:8.1f} us with callees  {row['calls']:6.1f} calls  "
              f"{row['function']}")
    if out["host_ahead"] is False:
        print("  device-alone times left out: the host did not queue every step within the sleep")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--steps", type=int, default=50, help="steps per turn")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then N kerneltune steps under cProfile: the top functions by host time")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for flag in ("steps", "rounds"):  # 0 would end in a traceback (a median of nothing), not a measurement
        if getattr(a, flag) < 1:
            ap.error(f"--{flag} {getattr(a, flag)}: give at least 1")
    from kerneltune.train.presets import PRESETS

    if a.preset not in PRESETS:  # else a KeyError once the model is built
        ap.error(f"--preset {a.preset}: use one of {', '.join(PRESETS)}")
    out = measure(a)
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        report(out, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
