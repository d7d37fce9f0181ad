"""`kerneltune train --compare`: the reference and the tuned kernels train the same model from the same
initial weights on the same batches, in one process, step by step in lockstep (the order alternates
every step), so that both see the same machine at the same moment.

Reported: the step-time speedup (median reference step time / median tuned step time, warm-up steps
left out), the largest difference between the two training-loss curves and between the validation
losses, whether both stay within a stated tolerance, and which kernels the tuned run was served.
Written: compare.json (summary, provenance and both curves) and compare.png (both loss curves and
their difference).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import datetime, timezone
from typing import Optional

from kerneltune.train import kernels as kernel_choice
from kerneltune.train.loop import Run, Setup, describe_setup, median, timing, timing_warmup

# Largest |loss difference| (nats per token) accepted between the two curves. fp32: the kernels may
# differ only by rounding, which training amplifies slowly. bf16: every kernel rounds its inputs and
# outputs to 8 mantissa bits, and two correct bf16 kernels drift apart by more over a run.
DEFAULT_TOLERANCE = {"float32": 0.02, "bfloat16": 0.1, "float16": 0.1}


class PlotUnavailable(RuntimeError):
    """matplotlib is missing; one line, for the CLI."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable("--compare draws its loss curves with matplotlib, which is not installed: "
                              "pip install matplotlib (or '.[dev]')") from None


def compare(s: Setup, *, out_dir: str, tolerance: Optional[float] = None) -> dict:
    """Train reference and tuned in lockstep for s.cfg.steps steps; write compare.json and compare.png
    under out_dir (first process only); return the summary."""
    require_matplotlib()
    cfg = s.cfg
    tol = DEFAULT_TOLERANCE.get(cfg.dtype, 0.1) if tolerance is None else tolerance
    chosen = {name: kernel_choice.get(name, s.device) for name in kernel_choice.CHOICES}
    chosen["tuned"].reset()
    runs = {name: Run(dataclasses.replace(cfg, kernels=name), s.batches, k, s.d, s.device)
            for name, k in chosen.items()}
    ref, tun = runs["reference"], runs["tuned"]
    fpt = ref.model.flops_per_token()
    for line in describe_setup(s, ref.model):
        s.log(line)
    s.log(f"compare: reference and tuned from seed {cfg.seed}, same batches, in lockstep; tolerance {tol} nats")
    t_start = time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            vr, vt = ref.evaluate(), tun.evaluate()
            s.log(f"step {step}: val loss reference {vr:.4f} tuned {vt:.4f} (Δ {vt - vr:+.4f})")
        if step == cfg.steps:
            break
        order = (ref, tun) if step % 2 == 0 else (tun, ref)
        res = {r.kernels.name: r.train_step() for r in order}
        a, b = res["reference"], res["tuned"]
        s.log(f"step {step}: loss reference {a['loss']:.4f} tuned {b['loss']:.4f} (Δ {b['loss'] - a['loss']:+.4f}), "
              f"{a['ms']:.1f} ms vs {b['ms']:.1f} ms (×{a['ms'] / b['ms']:.2f}), lr {a['lr']:.2e}")
    wall = time.perf_counter() - t_start
    served = chosen["tuned"].served()
    summary = summarize(s, ref, tun, served, fpt, tol, wall)
    s.log(f"kernels served to tuned: {kernel_choice.describe(served)}")
    s.log(verdict_line(summary))
    if s.d.master:
        os.makedirs(out_dir, exist_ok=True)
        summary["files"] = {"json": os.path.join(out_dir, "compare.json"), "png": os.path.join(out_dir, "compare.png")}
        with open(summary["files"]["json"], "w") as f:  # the numbers first: a failing plot loses none of them
            json.dump(json_safe(summary), f, indent=1, allow_nan=False)
        plot(summary, summary["files"]["png"])
        s.log(f"wrote {summary['files']['json']} and {summary['files']['png']}")
    return summary


def json_safe(x):
    """x with every non-finite float as None: compare.json is strict JSON (a loss that went NaN is null)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _worst(diffs: list) -> float:
    """The largest difference, NaN (a loss that was not finite) above every number: max() would skip it."""
    return max(diffs, key=lambda d: (math.isnan(d), d)) if diffs else 0.0


def summarize(s: Setup, ref: Run, tun: Run, served: dict, fpt: int, tol: float, wall: float) -> dict:
    from kerneltune.evaluate.device import device_info, versions

    hr, ht = ref.history, tun.history
    d_train = [abs(a - b) for a, b in zip(hr["loss"], ht["loss"])]
    d_val = [abs(a - b) for a, b in zip(hr["val_loss"], ht["val_loss"])]
    i_train = max(range(len(d_train)), key=lambda i: (math.isnan(d_train[i]), d_train[i])) if d_train else None
    # a loss that is not finite (a kernel that overflowed, say) fails the comparison, in either run
    nonfinite = {name: [st for st, v in zip(h["step"], h["loss"]) if not math.isfinite(v)]
                 + [f"val@{st}" for st, v in zip(h["val_step"], h["val_loss"]) if not math.isfinite(v)]
                 for name, h in (("reference", hr), ("tuned", ht))}
    t_ref = timing(ref, s.tokens_per_step, fpt, s.peak)
    t_tun = timing(tun, s.tokens_per_step, fpt, s.peak)
    # per-step ratio as well: both runs took step i back to back, so its ratio is the least disturbed
    skip = timing_warmup(len(hr["ms"]))
    ratios = [a / b for a, b in zip(hr["ms"][skip:], ht["ms"][skip:])]
    speedup = t_ref["median_step_ms"] / t_tun["median_step_ms"] if t_tun.get("median_step_ms") else None
    max_train, max_val = _worst(d_train), _worst(d_val)
    finite = not (nonfinite["reference"] or nonfinite["tuned"])
    return {
        "kind": "kerneltune-train-compare",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": {**device_info("cuda" if s.device.startswith("cuda") else "cpu"), "processes": s.d.world},
        "config": s.cfg.to_dict(),
        "params": ref.model.num_params(),
        "flops_per_token": fpt,
        "mfu_peak": {"flops": s.peak, "source": s.peak_source},
        "corpus": {"name": s.corpus.name, **s.corpus.info,
                   "train_tokens": int(s.corpus.train.size), "val_tokens": int(s.corpus.val.size)},
        "unigram_entropy": s.corpus.unigram_entropy(),
        "served": {"reference": kernel_choice.reference(s.device).served(), "tuned": served},
        "speedup": speedup,
        "speedup_median_of_step_ratios": median(ratios),
        "timing": {"reference": t_ref, "tuned": t_tun, "interleaved": "lockstep, order alternating each step"},
        "loss": {
            "tolerance_nats": tol,
            "max_abs_diff_train_curve": max_train,
            "max_abs_diff_train_curve_at_step": hr["step"][i_train] if i_train is not None else None,
            "max_abs_diff_val": max_val,
            "final_val_reference": hr["val_loss"][-1], "final_val_tuned": ht["val_loss"][-1],
            "final_val_diff": ht["val_loss"][-1] - hr["val_loss"][-1],
            "final_train_diff": (ht["loss"][-1] - hr["loss"][-1]) if hr["loss"] else None,
            "nonfinite_steps": nonfinite,
            "within_tolerance": finite and max_train <= tol and max_val <= tol,
        },
        "wall_s": wall,
        "curves": {"step": hr["step"], "train_reference": hr["loss"], "train_tuned": ht["loss"],
                   "ms_reference": hr["ms"], "ms_tuned": ht["ms"], "val_step": hr["val_step"],
                   "val_reference": hr["val_loss"], "val_tuned": ht["val_loss"]},
    }


def verdict_line(sm: dict) -> str:
    lo = sm["loss"]
    sp = "n/a" if sm["speedup"] is None else f"×{sm['speedup']:.3f}"
    ent = sm["unigram_entropy"]["nats"]
    bad = "; ".join(f"{name}'s loss not finite at step {', '.join(map(str, st[:5]))}{' …' if len(st) > 5 else ''}"
                    for name, st in lo.get("nonfinite_steps", {}).items() if st)
    return (f"{bad + ': OUTSIDE tolerance; ' if bad else ''}speedup {sp} (median step time, reference / tuned, {sm['timing']['tuned'].get('warmup_steps_excluded')} "
            f"warm-up steps left out); loss curves differ by at most {lo['max_abs_diff_train_curve']:.4f} (train, "
            f"step {lo['max_abs_diff_train_curve_at_step']}) and {lo['max_abs_diff_val']:.4f} (val) nats: "
            f"{'within' if lo['within_tolerance'] else 'OUTSIDE'} tolerance {lo['tolerance_nats']}; final val loss "
            f"{lo['final_val_reference']:.4f} / {lo['final_val_tuned']:.4f} vs unigram entropy {ent:.4f} nats")


def plot(sm: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, lo = sm["curves"], sm["loss"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    ax.plot(c["step"], c["train_reference"], label="train, reference", color="tab:blue", lw=1.2)
    ax.plot(c["step"], c["train_tuned"], label="train, tuned", color="tab:orange", lw=1.2, ls="--")
    ax.plot(c["val_step"], c["val_reference"], "o-", label="val, reference", color="tab:blue", ms=5)
    ax.plot(c["val_step"], c["val_tuned"], "s--", label="val, tuned", color="tab:orange", ms=4, mfc="none")
    ent = sm["unigram_entropy"]["nats"]
    ax.axhline(ent, color="grey", ls=":", lw=1)
    ax.text(c["step"][-1] if c["step"] else 0, ent, f"unigram entropy {ent:.3f} nats", ha="right", va="bottom",
            color="grey", fontsize=8)
    ax.set_ylabel("loss (nats / token)")
    sp = "n/a" if sm["speedup"] is None else f"{sm['speedup']:.3f}×"
    cfg = sm["config"]
    ax.set_title(f"{cfg['preset']} on {sm['device']['name']}: tuned vs reference, step-time speedup {sp}", fontsize=10)
    ax.legend(fontsize=8)
    diff = [b - a for a, b in zip(c["train_reference"], c["train_tuned"])]
    ax2.plot(c["step"], diff, color="tab:red", lw=1)
    ax2.axhspan(-lo["tolerance_nats"], lo["tolerance_nats"], color="tab:green", alpha=0.12,
                label=f"tolerance ±{lo['tolerance_nats']}")
    ax2.axhline(0, color="black", lw=0.5)
    ax2.set_ylabel("tuned − reference")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
