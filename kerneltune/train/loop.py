"""The reference pre-training loop, nanoGPT's train.py in a few functions: AdamW with a cosine schedule
after a linear warm-up, gradient clipping, gradient accumulation, bf16 autocast on GPU,
DistributedDataParallel under torchrun (gloo on CPU, nccl on GPU), periodic validation loss,
checkpoint and resume, one log line per step.

A `Run` is one model, its optimizer and its step counter; `train()` drives one Run, compare.py drives
two in lockstep. Everything a step computes is a function of the seed and the step number: batches come
from data.Batches, each Run keeps its own torch RNG state (dropout), so a resumed run, a run on two
processes and the tuned twin of a reference run all see the same data in the same order.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TextIO

import torch
import torch.distributed as dist

from kerneltune.train import kernels as kernel_choice
from kerneltune.train.data import Batches, Corpus
from kerneltune.train.model import GPT
from kerneltune.train.presets import TrainConfig


class TrainError(ValueError):
    """A one-line problem with the run's setup (batch sizes, checkpoint, device)."""


# ---------------------------------------------------------------- processes

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> tuple[Dist, str]:
    """Under torchrun (RANK and WORLD_SIZE set): join the process group, gloo on CPU, nccl on GPU, one GPU
    per local rank. Otherwise one process. Returns (Dist, the device this process uses)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return d, device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def global_mean(x: torch.Tensor, d: Dist) -> float:
    if d.world > 1:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # gloo has no AVG
        x /= d.world
    return x.item()


# ---------------------------------------------------------------- one run

def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    ratio = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (cfg.lr - cfg.min_lr)


class Run:
    def __init__(self, cfg: TrainConfig, batches: Batches, kernels: kernel_choice.Kernels, d: Dist, device: str):
        world_rows = cfg.micro_batch * d.world
        if cfg.batch_size % world_rows:
            raise TrainError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch {cfg.micro_batch} "
                             f"× {d.world} process(es); pick sizes that divide")
        self.cfg, self.batches, self.kernels, self.d, self.device = cfg, batches, kernels, d, device
        self.accum = cfg.batch_size // world_rows  # micro-steps per optimizer step in each process
        self.autocast = (torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if cfg.dtype != "float32"
                         else contextlib.nullcontext())
        torch.manual_seed(cfg.seed)  # same initial weights in every process and for both kernel choices
        self.model = GPT(cfg.model, kernels.attend).to(device)
        if d.rank > 0:  # other dropout masks in every process (as nanoGPT's seed offset); rank 0 as a lone run
            torch.manual_seed(cfg.seed + d.rank)
        self.rng = torch.get_rng_state()  # this run's own stream for dropout, see own_rng()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.startswith("cuda") else None
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[d.local_rank] if
                    device.startswith("cuda") else None) if d.world > 1 else None)
        self.optimizer = kernels.make_adamw(self.model.optimizer_groups(cfg.weight_decay), lr=cfg.lr,
                                            betas=cfg.betas, eps=1e-8)
        self.step = 0
        self.history: dict[str, list] = {"step": [], "loss": [], "ms": [], "lr": [], "val_step": [], "val_loss": []}

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Swap in this run's RNG state, so two runs in one process each see the stream a lone run would."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.device)

    def micro_batches(self, split: str, step: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for m in range(self.accum):  # this process's rows of the step's global batch
            x, y = self.batches.get(split, step, self.d.rank * self.accum + m, self.cfg.micro_batch)
            yield m, x, y  # on self.device already

    def train_step(self) -> dict:
        """One optimizer step on the global batch of step self.step; returns loss (global mean), ms, lr."""
        model = self.model if self.ddp is None else self.ddp
        lr = lr_at(self.cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with self.own_rng():
            loss_sum = torch.zeros((), device=self.device)
            for m, x, y in self.micro_batches("train", self.step):
                if self.ddp is not None:  # all-reduce the gradients once, after the last micro-step
                    self.ddp.require_backward_grad_sync = m == self.accum - 1
                with self.autocast:
                    _, loss = model(x, y)
                (loss / self.accum).backward()
                loss_sum += loss.detach()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        loss = global_mean(loss_sum / self.accum, self.d)  # .item() waits for the device: the step is done
        ms = (time.perf_counter() - t0) * 1e3
        for k, v in (("step", self.step), ("loss", loss), ("ms", ms), ("lr", lr)):
            self.history[k].append(v)
        self.step += 1
        return {"step": self.step - 1, "loss": loss, "ms": ms, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same eval_iters global batches every time."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(self.cfg.eval_iters):
            for _, x, y in self.micro_batches("val", i):
                with self.autocast:
                    total += self.model(x, y)[1].float()
        self.model.train()
        loss = global_mean(total / (self.cfg.eval_iters * self.accum), self.d)
        if self.history["val_step"][-1:] == [self.step]:  # evaluated again right after a resume
            self.history["val_loss"][-1] = loss
        else:
            self.history["val_step"].append(self.step)
            self.history["val_loss"].append(loss)
        return loss

    # -------------------------------------------------------------- checkpoint

    def state_dict(self, corpus: Corpus) -> dict:
        """Everything resume needs: weights, optimizer moments, step (= data position: batches are a
        function of the step), this run's RNG states, the loss history, and what data it was."""
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "rng": self.rng,
                "cuda_rng": self.cuda_rng.cpu() if self.cuda_rng is not None else None,
                "history": self.history, "corpus": {"name": corpus.name, "sha256": corpus.info["sha256"]},
                "world": self.d.world}

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.rng, self.history = ckpt["step"], ckpt["rng"], ckpt["history"]
        if self.cuda_rng is not None and ckpt["cuda_rng"] is not None:
            self.cuda_rng = ckpt["cuda_rng"]

    def save(self, path: str, corpus: Corpus) -> None:
        if not self.d.master:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(self.state_dict(corpus), tmp)
        os.replace(tmp, path)  # never a half-written checkpoint


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise TrainError(f"--resume {path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: no code runs
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise TrainError(f"--resume {path}: not a kerneltune train checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise TrainError(f"--resume {path}: not a kerneltune train checkpoint (no config/model)")
    return ckpt


# ---------------------------------------------------------------- logging

def log_line(r: dict, tokens_per_step: int, flops_per_token: int, peak: float) -> str:
    """nanoGPT's one line per step: loss, time, throughput, MFU against the stated peak."""
    tok_s = tokens_per_step / (r["ms"] / 1e3)
    mfu = flops_per_token * tok_s / peak if peak else None
    return (f"step {r['step']}: loss {r['loss']:.4f}, lr {r['lr']:.2e}, {r['ms']:.1f} ms, "
            f"{tok_s:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")


def median(xs: list[float]) -> Optional[float]:
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def timing_warmup(steps: int) -> int:
    """Steps left out of step-time statistics: allocator, autotuning and caches settle in the first ones."""
    return min(max(3, steps // 10), max(0, steps - 1))


def timing(run: Run, tokens_per_step: int, flops_per_token: int, peak: float) -> dict:
    skip = timing_warmup(len(run.history["ms"]))
    ms = sorted(run.history["ms"][skip:])
    if not ms:
        return {"timed_steps": 0}
    med = median(ms)
    tok_s = tokens_per_step / (med / 1e3)
    return {"timed_steps": len(ms), "warmup_steps_excluded": skip, "median_step_ms": med,
            "p20_step_ms": ms[int(0.2 * (len(ms) - 1))], "p80_step_ms": ms[int(0.8 * (len(ms) - 1))],
            "tokens_per_s": tok_s, "mfu": flops_per_token * tok_s / peak if peak else None}


# ---------------------------------------------------------------- one training run

@dataclass
class Setup:
    """What train() and compare() share: corpus, batches, processes, the MFU peak."""
    cfg: TrainConfig
    corpus: Corpus
    batches: Batches
    d: Dist
    device: str
    peak: float
    peak_source: str
    log: Callable[[str], None]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.model.block_size


def make_setup(cfg: TrainConfig, corpus: Corpus, d: Dist, device: str, stream: TextIO = sys.stdout) -> Setup:
    from kerneltune.train.mfu import device_peak

    if cfg.model.vocab_size < corpus.vocab_size:
        raise TrainError(f"{corpus.name}: tokens up to {corpus.vocab_size - 1} but the model's vocabulary "
                         f"is {cfg.model.vocab_size}")
    if device.startswith("cuda"):  # as nanoGPT: fp32 matmuls outside autocast may use TF32, in both runs alike
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak, source = device_peak(device)
    peak *= d.world  # MFU of the whole job: model FLOP/s of all processes over the peak of all devices

    def log(msg: str) -> None:
        if d.master:
            print(msg, file=stream, flush=True)

    batches = Batches(corpus, cfg.model.block_size, cfg.batch_size, cfg.seed, device)
    return Setup(cfg, corpus, batches, d, device, peak, source, log)


def describe_setup(s: Setup, model: GPT) -> list[str]:
    ent = s.corpus.unigram_entropy()
    c = s.cfg
    return [
        f"model: {c.preset}, {c.model.n_layer} layers, {c.model.n_head} heads, {c.model.n_embd} wide, "
        f"context {c.model.block_size}, vocab {c.model.vocab_size}, {model.num_params() / 1e6:.2f}M parameters",
        f"data: {s.corpus.name}, {s.corpus.train.size:,} train / {s.corpus.val.size:,} val tokens, unigram entropy "
        f"{ent['nats']:.3f} nats = {ent['bits']:.3f} bits/token",
        f"batch: {c.batch_size} × {c.model.block_size} tokens per step = {s.d.world} process(es) × "
        f"{c.batch_size // (c.micro_batch * s.d.world)} micro-steps × {c.micro_batch}; {c.steps} steps, lr {c.lr:g} "
        f"(warm-up {c.warmup_steps}, cosine to {c.min_lr:g}), {c.dtype} on {s.device}, seed {c.seed}",
        f"mfu peak: {s.peak_source}" + (f" × {s.d.world}" if s.d.world > 1 else ""),
    ]


def train(s: Setup, *, checkpoint: Optional[str] = None, resume: Optional[dict] = None,
          stop_at: Optional[int] = None) -> dict:
    """Train one model; returns the run's summary. `stop_at` ends early as if interrupted (after writing the
    checkpoint) while the schedule still spans cfg.steps."""
    cfg = s.cfg
    kernels = kernel_choice.get(cfg.kernels, s.device)
    kernels.reset()
    run = Run(cfg, s.batches, kernels, s.d, s.device)
    if resume is not None:
        run.load_state_dict(resume)
    fpt = run.model.flops_per_token()
    for line in describe_setup(s, run.model):
        s.log(line)
    if resume is not None:
        s.log(f"resumed at step {run.step} from a checkpoint")
    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    t_start = time.perf_counter()
    while True:
        if run.step % cfg.eval_interval == 0 or run.step == cfg.steps:
            s.log(f"step {run.step}: val loss {run.evaluate():.4f}")
        if checkpoint and (run.step % cfg.eval_interval == 0 or run.step == stop):
            run.save(checkpoint, s.corpus)
        if run.step >= stop:
            break
        s.log(log_line(run.train_step(), s.tokens_per_step, fpt, s.peak))
    served = kernels.served()
    s.log(f"kernels ({cfg.kernels}): {kernel_choice.describe(served)}")
    return {"kernels": cfg.kernels, "served": served, "steps_done": run.step, "stopped_early": run.step < cfg.steps,
            "final_val_loss": run.history["val_loss"][-1], "final_val_step": run.history["val_step"][-1], "final_train_loss": (run.history["loss"] or [None])[-1],
            "wall_s": time.perf_counter() - t_start, "flops_per_token": fpt,
            "params": run.model.num_params(), **timing(run, s.tokens_per_step, fpt, s.peak),
            "history": run.history, "checkpoint": checkpoint}
