"""Named training setups and the resolved configuration of one run (TrainConfig).

smoke      seconds on a CPU: the unit tests and a first try.
cpu-tiny   a 4-layer byte-level GPT that trains 200 steps in a few minutes on 2 CPU cores and learns
           the standard library well below its unigram entropy.
gpt2-124m  GPT-2 small (12 layers, 12 heads, 768 wide, context 1024) for one GPU, bf16 autocast. The
           vocabulary is padded to 50304 as in nanoGPT so that size and FLOPs are GPT-2 small's (124M
           parameters) although byte-level tokens use only 256 of the ids: the kernel speedup it measures
           is the one a GPT-2 small run would see. With a GPT-2 token file (--data x.bin) all ids are used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from kerneltune.train.model import GPTConfig


class ConfigError(ValueError):
    """A one-line problem with the options of a run."""


@dataclass(frozen=True)
class Preset:
    model: GPTConfig
    batch_size: int  # sequences per optimizer step, all processes together
    micro_batch: int  # sequences per forward/backward in one process
    steps: int
    lr: float
    eval_interval: int
    eval_iters: int  # global batches of validation data per evaluation
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    summary: str = ""


PRESETS: dict[str, Preset] = {
    "smoke": Preset(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32),
                    batch_size=8, micro_batch=4, steps=20, lr=3e-3, eval_interval=10, eval_iters=2,
                    summary="2 layers, 32 wide, context 32: seconds on a CPU"),
    "cpu-tiny": Preset(GPTConfig(block_size=128, vocab_size=256, n_layer=4, n_head=4, n_embd=128),
                       batch_size=32, micro_batch=32, steps=200, lr=3e-3, eval_interval=50, eval_iters=8,
                       summary="4 layers, 4 heads, 128 wide, context 128: 200 steps in minutes on 2 cores"),
    "gpt2-124m": Preset(GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
                        batch_size=32, micro_batch=16, steps=60, lr=6e-4, eval_interval=20, eval_iters=4,
                        summary="GPT-2 small, 124M parameters, context 1024, bf16 on one GPU"),
}


@dataclass
class TrainConfig:
    """Everything that decides a run's numbers; stored in checkpoints and summaries."""
    preset: str
    model: GPTConfig
    batch_size: int
    micro_batch: int
    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    eval_interval: int
    eval_iters: int
    weight_decay: float
    grad_clip: float
    betas: tuple = (0.9, 0.95)
    seed: int = 1337
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype; float32 = no autocast
    kernels: str = "reference"
    data: Optional[str] = None  # None: the embedded standard-library corpus

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = GPTConfig(**d["model"])
        d["betas"] = tuple(d["betas"])
        return cls(**d)


def resolve(preset: str, *, steps: Optional[int] = None, batch_size: Optional[int] = None,
            micro_batch: Optional[int] = None, lr: Optional[float] = None, eval_interval: Optional[int] = None,
            seed: int = 1337, device: str = "cpu", kernels: str = "reference", data: Optional[str] = None,
            vocab_size: int = 256, world: int = 1) -> TrainConfig:
    """A preset with the user's overrides -> TrainConfig. ConfigError (one line) on nonsense. Without an
    explicit micro_batch, the preset's is lowered so that `world` processes share the global batch."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    steps = p.steps if steps is None else steps
    batch_size = p.batch_size if batch_size is None else batch_size
    if micro_batch is None:  # the largest that divides each process's share, at most the preset's
        share = max(1, batch_size // world)
        micro_batch = max(d for d in range(1, min(p.micro_batch, share) + 1) if share % d == 0)
    lr = p.lr if lr is None else lr
    eval_interval = min(p.eval_interval, steps) if eval_interval is None else eval_interval
    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--micro-batch", micro_batch),
                    ("--eval-interval", eval_interval)):
        if v < 1:
            raise ConfigError(f"{name} {v}: must be at least 1")
    if not lr > 0:
        raise ConfigError(f"--lr {lr}: must be positive")
    model = p.model
    if vocab_size > model.vocab_size:  # a token file with a larger vocabulary: pad to a multiple of 64
        model = dataclasses.replace(model, vocab_size=(vocab_size + 63) // 64 * 64)
    return TrainConfig(preset=preset, model=model, batch_size=batch_size, micro_batch=micro_batch, steps=steps,
                       lr=lr, min_lr=lr / 10, warmup_steps=max(1, round(p.warmup_frac * steps)),
                       eval_interval=eval_interval, eval_iters=p.eval_iters, weight_decay=p.weight_decay,
                       grad_clip=p.grad_clip, seed=seed, device=device,
                       dtype="bfloat16" if device.startswith("cuda") else "float32", kernels=kernels, data=data)
