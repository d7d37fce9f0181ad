"""`kerneltune train`: the reference pre-training loop (kerneltune/train/), one run or --compare.

Registered in cli.py. Under torchrun (RANK/WORLD_SIZE set) every process runs this command and the
first one logs and writes files. Exit codes: 0 done (--compare: the loss curves agree within the
tolerance), 1 --compare found them apart, 2 usage error (one line on stderr), 3 --compare did not finish
(a kernel or the machine failed: its traceback, then one line).
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from typing import Optional

import typer

DEFAULT_PRESET = "cpu-tiny"


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)  # one line
    raise typer.Exit(2)


def train_cmd(
    preset: Optional[str] = typer.Option(None, "--preset", help="smoke | cpu-tiny | gpt2-124m (default cpu-tiny)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps (default: the preset's)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="sequences per step, all processes together"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="sequences per forward/backward in one process"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (cosine to lr/10 after warm-up)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default cpu)"),
    kernels: Optional[str] = typer.Option(None, "--kernels", help="reference (torch) or tuned (kerneltune's registry)"),
    compare: bool = typer.Option(False, "--compare", help="train reference and tuned in lockstep and compare"),
    data: Optional[str] = typer.Option(None, "--data", help="text file, or .bin of uint16 tokens (default: Python's stdlib source)"),
    out_dir: str = typer.Option("out-train", "--out", help="directory for train.json / compare.json + compare.png"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="save a checkpoint here at every evaluation and at the end"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue the run saved in this checkpoint"),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", help="stop after this many steps as if interrupted (the schedule still spans --steps)"),
    eval_interval: Optional[int] = typer.Option(None, "--eval-interval", help="steps between validation losses"),
    seed: Optional[int] = typer.Option(None, "--seed", help="initial weights and batch order (default 1337)"),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="--compare: largest loss difference accepted, nats (default 0.02 fp32, 0.1 bf16)"),
    json_out: bool = typer.Option(False, "--json", help="summary as JSON on stdout; step lines go to stderr"),
) -> None:
    """Pre-train a nanoGPT-style GPT with the reference or the tuned kernels, or --compare both."""
    from kerneltune.cli import _check_device
    from kerneltune.train import kernels as kernel_choice
    from kerneltune.train import loop
    from kerneltune.train.compare import PlotUnavailable, json_safe
    from kerneltune.train.data import DataError, load_corpus
    from kerneltune.train.presets import PRESETS, ConfigError, TrainConfig, resolve

    if kernels is not None and kernels not in kernel_choice.CHOICES:
        _fail(f"--kernels {kernels!r}: use reference or tuned")
    if preset is not None and preset not in PRESETS:
        _fail(f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    if compare and (kernels or checkpoint or resume or stop_at is not None):
        _fail("--compare trains both kernel choices from scratch; drop --kernels/--checkpoint/--resume/--stop-at")
    if tolerance is not None and not (tolerance >= 0 and math.isfinite(tolerance)):
        _fail(f"--tolerance {tolerance}: must be a finite number >= 0")
    if stop_at is not None and stop_at < 0:
        _fail(f"--stop-at {stop_at}: must be >= 0")
    _check_out_dir(out_dir)
    ckpt = None
    try:
        if resume:
            given = [n for n, v in (("--preset", preset), ("--steps", steps), ("--batch-size", batch_size),
                                    ("--micro-batch", micro_batch), ("--lr", lr), ("--data", data),
                                    ("--eval-interval", eval_interval), ("--seed", seed)) if v is not None]
            if given:
                _fail(f"--resume continues the checkpoint's run with its settings; drop {', '.join(given)}")
            ckpt = loop.load_checkpoint(resume)
            cfg = TrainConfig.from_dict(ckpt["config"])
            cfg.kernels = kernels or cfg.kernels
            cfg.device = _check_device(device or cfg.device)  # a GPU's checkpoint on a machine without one: exit 2
            dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
            if dtype != cfg.dtype:
                _fail(f"--resume {resume}: the run trained in {cfg.dtype}; on {cfg.device} it would go on in {dtype}: "
                      f"resume it on the kind of device it started on")
            corpus = load_corpus(cfg.data)
            if corpus.info["sha256"] != ckpt["corpus"]["sha256"]:
                _fail(f"--resume {resume}: trained on {ckpt['corpus']['name']} (sha256 {ckpt['corpus']['sha256'][:12]}), "
                      f"but that data reads differently here (sha256 {corpus.info['sha256'][:12]}; another Python?)")
            checkpoint = checkpoint or resume
        else:
            dev = _check_device(device or "cpu")
            corpus = load_corpus(data)
            cfg = resolve(preset or DEFAULT_PRESET, steps=steps, batch_size=batch_size, micro_batch=micro_batch,
                          lr=lr, eval_interval=eval_interval, seed=1337 if seed is None else seed, device=dev,
                          kernels=kernels or "reference", data=data, vocab_size=corpus.vocab_size,
                          world=int(os.environ.get("WORLD_SIZE", "1")))
        d, proc_device = loop.setup_distributed(cfg.device)
        s = loop.make_setup(cfg, corpus, d, proc_device, stream=sys.stderr if json_out else sys.stdout)
        if compare:
            from kerneltune.train.compare import compare as run_compare

            try:
                summary = run_compare(s, out_dir=out_dir, tolerance=tolerance)
            except (DataError, ConfigError, loop.TrainError, kernel_choice.KernelsUnavailable, PlotUnavailable):
                raise
            except Exception as e:  # noqa: BLE001 - exit 1 means "the curves are apart": a crash must not read so
                traceback.print_exc()
                print(f"error: --compare did not finish: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
                raise typer.Exit(3) from None
            code = 0 if summary["loss"]["within_tolerance"] else 1
        else:
            summary = loop.train(s, checkpoint=checkpoint, resume=ckpt, stop_at=stop_at)
            summary = write_train_summary(s, summary, out_dir) if d.master else summary
            code = 0
    except (DataError, ConfigError, loop.TrainError, kernel_choice.KernelsUnavailable, PlotUnavailable) as e:
        _fail(str(e))
    finally:
        loop.teardown_distributed()
    if json_out and d.master:
        print(json.dumps(json_safe(summary), indent=1, default=str, allow_nan=False))
    raise typer.Exit(code)


def _check_out_dir(out_dir: str) -> None:
    """--out must be a directory this process can write, checked before any training (not after it)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        _fail(f"--out {out_dir}: exists and is not a directory; name a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        _fail(f"--out {out_dir}: cannot create it ({e.strerror}); name a writable directory")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        _fail(f"--out {out_dir}: not writable; name a writable directory")


def write_train_summary(s, summary: dict, out_dir: str) -> dict:
    """train.json next to the run: the summary plus what the data and the machine were."""
    from kerneltune.evaluate.device import device_info, versions
    from kerneltune.train.compare import json_safe

    ent = s.corpus.unigram_entropy()
    summary = {"kind": "kerneltune-train", "versions": versions(),
               "device": {**device_info("cuda" if s.device.startswith("cuda") else "cpu"), "processes": s.d.world},
               "config": s.cfg.to_dict(), "mfu_peak": {"flops": s.peak, "source": s.peak_source},
               "corpus": {"name": s.corpus.name, **s.corpus.info}, "unigram_entropy": ent, **summary}
    os.makedirs(out_dir, exist_ok=True)
    summary["files"] = {"json": os.path.join(out_dir, "train.json")}
    with open(summary["files"]["json"], "w") as f:
        json.dump(json_safe(summary), f, indent=1, default=str, allow_nan=False)
    s.log(f"final val loss {summary['final_val_loss']:.4f} nats (step {summary['final_val_step']}) vs unigram entropy "
          f"{ent['nats']:.4f} nats ({ent['bits']:.3f} bits/token); wrote {summary['files']['json']}")
    return summary
