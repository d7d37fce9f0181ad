"""The training loop: the schedule, learning, determinism, checkpoint + resume = an uninterrupted run."""

from __future__ import annotations

import io
import math

import pytest
import torch

from kerneltune.train import loop
from kerneltune.train.data import stdlib_corpus
from kerneltune.train.presets import resolve


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def setup(corpus, **kw):
    cfg = resolve("smoke", **kw)
    return loop.make_setup(cfg, corpus, loop.Dist(), "cpu", stream=io.StringIO())


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    cfg = resolve("smoke", steps=100, lr=1.0)
    assert cfg.warmup_steps == 10 and cfg.min_lr == 0.1
    lrs = [loop.lr_at(cfg, s) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    mid = 10 + 45  # halfway through the cosine: halfway between lr and min_lr
    assert lrs[mid] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_loss_falls_and_reruns_are_identical(corpus):
    s = setup(corpus, steps=40, eval_interval=20)
    r1 = loop.train(s)
    h = r1["history"]
    assert len(h["loss"]) == 40 and h["val_step"] == [0, 20, 40]
    assert h["val_loss"][0] > math.log(256) - 0.3  # untrained: about uniform over bytes
    assert h["val_loss"][-1] < h["val_loss"][0] - 1.5
    assert sum(h["loss"][-5:]) / 5 < sum(h["loss"][:5]) / 5 - 1.0
    r2 = loop.train(setup(corpus, steps=40, eval_interval=20))
    assert r2["history"]["loss"] == h["loss"] and r2["history"]["val_loss"] == h["val_loss"]
    r3 = loop.train(setup(corpus, steps=1, seed=7))
    assert r3["history"]["loss"][0] != h["loss"][0]


def test_checkpoint_and_resume_give_the_uninterrupted_trajectory(corpus, tmp_path):
    ref = loop.train(setup(corpus, steps=24, eval_interval=8))
    ckpt = str(tmp_path / "ckpt.pt")
    part = loop.train(setup(corpus, steps=24, eval_interval=8), checkpoint=ckpt, stop_at=13)
    assert part["steps_done"] == 13 and part["stopped_early"]
    state = loop.load_checkpoint(ckpt)
    assert state["step"] == 13 and len(state["history"]["loss"]) == 13
    resumed = loop.train(setup(corpus, steps=24, eval_interval=8), checkpoint=ckpt, resume=state)
    assert resumed["steps_done"] == 24
    assert resumed["history"]["loss"] == ref["history"]["loss"]  # bit for bit
    assert resumed["history"]["val_step"] == ref["history"]["val_step"] == [0, 8, 16, 24]
    assert resumed["history"]["val_loss"] == ref["history"]["val_loss"]
    assert loop.load_checkpoint(ckpt)["step"] == 24


def test_dropout_streams_survive_resume(corpus, tmp_path):
    """With dropout the RNG state is part of the trajectory: it travels in the checkpoint."""
    import dataclasses

    def s():
        st = setup(corpus, steps=10, eval_interval=5)
        st.cfg.model = dataclasses.replace(st.cfg.model, dropout=0.2)
        return st

    ref = loop.train(s())
    ckpt = str(tmp_path / "d.pt")
    loop.train(s(), checkpoint=ckpt, stop_at=4)
    torch.manual_seed(12345)  # whatever the global RNG did in between must not matter
    resumed = loop.train(s(), resume=loop.load_checkpoint(ckpt))
    assert resumed["history"]["loss"] == ref["history"]["loss"]


def test_batch_sizes_that_do_not_divide(corpus):
    with pytest.raises(loop.TrainError, match="multiple"):
        loop.train(setup(corpus, batch_size=6, micro_batch=4))


def test_default_micro_batch_shares_the_global_batch_among_processes():
    assert resolve("cpu-tiny").micro_batch == 32
    assert resolve("cpu-tiny", world=2).micro_batch == 16  # torchrun --nproc_per_node 2 needs no --micro-batch
    assert resolve("cpu-tiny", world=2, micro_batch=8).micro_batch == 8
