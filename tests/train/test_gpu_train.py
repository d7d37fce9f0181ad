"""The loop on a GPU: bf16 autocast, fused reference AdamW, tuned kernels, in a short compare."""

from __future__ import annotations

import io
import math

import pytest

from kerneltune.train import compare as cmp
from kerneltune.train import loop
from kerneltune.train.data import stdlib_corpus
from kerneltune.train.presets import resolve

pytestmark = pytest.mark.gpu


def test_compare_on_cuda_in_bf16(tmp_path):
    cfg = resolve("smoke", steps=12, eval_interval=6, device="cuda")
    assert cfg.dtype == "bfloat16"
    s = loop.make_setup(cfg, stdlib_corpus(), loop.Dist(), "cuda", stream=io.StringIO())
    sm = cmp.compare(s, out_dir=str(tmp_path))
    c = sm["curves"]
    assert all(math.isfinite(x) for x in c["train_reference"] + c["train_tuned"])
    assert c["val_reference"][-1] < c["val_reference"][0] - 0.5 and c["val_tuned"][-1] < c["val_tuned"][0] - 0.5
    assert sm["loss"]["within_tolerance"], sm["loss"]
    assert "fused=True" in str(sm["served"]["reference"]) and "bf16 dense data sheet" in sm["mfu_peak"]["source"] \
        or "measured bf16" in sm["mfu_peak"]["source"]
    assert sum(sm["served"]["tuned"]["attention"].values()) > 0
