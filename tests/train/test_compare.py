"""--compare: both kernel choices from one state, the JSON summary's fields, the PNG, the verdict."""

from __future__ import annotations

import io
import json
import sys

import pytest

from kerneltune.train import compare as cmp
from kerneltune.train import kernels as kernel_choice
from kerneltune.train import loop
from kerneltune.train.data import stdlib_corpus
from kerneltune.train.presets import resolve


def _tuned_or_skip():
    try:
        kernel_choice.tuned("cpu")
    except kernel_choice.KernelsUnavailable as e:
        pytest.skip(str(e))


def test_compare_writes_png_and_json_with_the_fields(tmp_path):
    _tuned_or_skip()
    cfg = resolve("smoke", steps=8, eval_interval=4)
    log = io.StringIO()
    s = loop.make_setup(cfg, stdlib_corpus(), loop.Dist(), "cpu", stream=log)
    sm = cmp.compare(s, out_dir=str(tmp_path))
    with open(tmp_path / "compare.json") as f:
        on_disk = json.load(f)
    assert on_disk["speedup"] == sm["speedup"] and on_disk["kind"] == "kerneltune-train-compare"
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for key in ("versions", "device", "config", "corpus", "unigram_entropy", "served", "speedup", "timing",
                "loss", "curves", "mfu_peak", "wall_s"):
        assert key in on_disk, key
    assert on_disk["corpus"]["python"] == sys.version.split()[0] and len(on_disk["corpus"]["sha256"]) == 64
    c = on_disk["curves"]
    assert c["step"] == list(range(8)) and c["val_step"] == [0, 4, 8]
    assert len(c["train_reference"]) == len(c["train_tuned"]) == len(c["ms_tuned"]) == 8
    lo = on_disk["loss"]
    diffs = [abs(a - b) for a, b in zip(c["train_reference"], c["train_tuned"])]
    assert lo["max_abs_diff_train_curve"] == max(diffs) <= lo["tolerance_nats"] == cmp.DEFAULT_TOLERANCE["float32"]
    assert lo["within_tolerance"] is True
    assert c["val_reference"][0] == c["val_tuned"][0]  # the same initial weights
    t = on_disk["timing"]
    assert on_disk["speedup"] == pytest.approx(t["reference"]["median_step_ms"] / t["tuned"]["median_step_ms"])
    assert t["tuned"]["warmup_steps_excluded"] == loop.timing_warmup(8) and t["tuned"]["timed_steps"] == 8 - 3
    served = on_disk["served"]["tuned"]  # the tuned run asked the registry for every attention and step
    assert sum(served["attention"].values()) >= cfg.model.n_layer * 8 and sum(served["adamw"].values()) == 8
    assert "kernels served to tuned" in log.getvalue() and "speedup ×" in log.getvalue()


def test_a_loss_gap_beyond_tolerance_is_reported(tmp_path):
    _tuned_or_skip()
    cfg = resolve("smoke", steps=4, eval_interval=4)
    s = loop.make_setup(cfg, stdlib_corpus(), loop.Dist(), "cpu", stream=io.StringIO())
    sm = cmp.compare(s, out_dir=str(tmp_path), tolerance=0.0)
    gap = sm["loss"]["max_abs_diff_train_curve"]
    assert sm["loss"]["within_tolerance"] is (gap == 0.0 and sm["loss"]["max_abs_diff_val"] == 0.0)
    assert "OUTSIDE" in cmp.verdict_line({**sm, "loss": {**sm["loss"], "within_tolerance": False}})


def test_missing_matplotlib_is_a_clear_error_before_training(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(cmp.PlotUnavailable, match="pip install matplotlib"):
        cmp.compare(None, out_dir="unused")


def _nan_after(calls_before_nan):
    """A tuned choice whose attention answers NaN after some calls (a bf16 kernel that overflowed, say)."""
    from kerneltune.train.model import sdpa_attend

    n = {"calls": 0}

    def attend(q, k, v, causal=True):
        n["calls"] += 1
        y = sdpa_attend(q, k, v, causal)
        return y * float("nan") if n["calls"] > calls_before_nan else y

    def tuned(device):
        r = kernel_choice.reference(device)
        return kernel_choice.Kernels("tuned", attend, r.make_adamw,
                                     lambda: {"attention": {"goes-nan": n["calls"]}}, lambda: None)
    return tuned


@pytest.mark.parametrize("calls_before_nan", [0, 10])
def test_a_loss_that_goes_nan_fails_the_compare_and_the_json_stays_strict(tmp_path, monkeypatch, calls_before_nan):
    monkeypatch.setattr(kernel_choice, "tuned", _nan_after(calls_before_nan))
    cfg = resolve("smoke", steps=6, eval_interval=3)
    s = loop.make_setup(cfg, stdlib_corpus(), loop.Dist(), "cpu", stream=io.StringIO())
    sm = cmp.compare(s, out_dir=str(tmp_path))
    lo = sm["loss"]
    assert lo["within_tolerance"] is False
    assert lo["nonfinite_steps"]["reference"] == [] and lo["nonfinite_steps"]["tuned"]
    assert "not finite" in cmp.verdict_line(sm) and "OUTSIDE" in cmp.verdict_line(sm)

    def refuse(tok):
        raise AssertionError(f"compare.json holds {tok}: not JSON")
    on_disk = json.loads((tmp_path / "compare.json").read_text(), parse_constant=refuse)
    assert on_disk["loss"]["within_tolerance"] is False and None in on_disk["curves"]["train_tuned"]


def test_worst_difference_carries_nan():
    assert cmp._worst([0.0, float("nan"), 0.5]) != cmp._worst([0.0, 0.5])
    assert cmp._worst([0.0, 0.25, 0.5]) == 0.5 and cmp._worst([]) == 0.0
