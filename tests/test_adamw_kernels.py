"""The Triton AdamW templates against the fp64 reference, through the Triton CPU interpreter (correctness
only): tensors with tails, several chunks each, empty and one-element tensors, at knob points that reach every
code path (each cache hint, fp32 and fp64 moments, the smallest blocks and chunks); the defaults are
test_seeds'."""

from __future__ import annotations

import pytest
import torch

from kerneltune.ops import get_op
from kerneltune.ops.base import Case
from tests.interp import in_interpreter, load_file

SHAPES = [[], [1], [513], [3, 700], [4096], [2, 2, 1025], [7]]   # tails, chunks of 1024 and 4096, full blocks
MT_TABLE_POINTS = [{"BLOCK": 512, "CHUNK": 1024, "num_warps": 4, "MOMENTS": "f32", "CACHE": "stream"},
                   {"BLOCK": 512, "CHUNK": 4096, "num_warps": 2, "MOMENTS": "f64", "CACHE": "none"},
                   {"BLOCK": 1024, "CHUNK": 1024, "num_warps": 8, "MOMENTS": "f32", "CACHE": "evict_first"}]


def check_mt_table(point: int) -> None:
    mod = load_file("candidates/adamw/triton_mt_table.py")
    mod.KERNELTUNE["params"] = MT_TABLE_POINTS[point]
    spec = get_op("adamw")
    for seed in range(3):   # the seeds vary step, betas, eps and weight decay
        inputs = spec.make_inputs(Case("t", {"shapes": SHAPES}, dtype="float32"), seed)
        expected = spec.reference(inputs)
        got = spec.invoke(mod.run, {k: [t.clone() for t in v] for k, v in inputs.tensors.items()}, inputs.args)
        assert spec.compare(inputs, expected, got) == "", (point, seed)


@pytest.mark.parametrize("point", range(len(MT_TABLE_POINTS)))
def test_mt_table_matches_fp64_at_each_cache_hint(point):
    in_interpreter("tests.test_adamw_kernels", "check_mt_table", point)


def test_mt_table_refuses_an_unknown_cache_hint():
    pytest.importorskip("triton")
    mod = load_file("candidates/adamw/triton_mt_table.py")
    mod.KERNELTUNE["params"] = {**mod.KERNELTUNE["params"], "CACHE": "lru"}
    ps = [torch.zeros(3)]
    with pytest.raises(ValueError, match="CACHE must be one of"):
        mod.run(ps, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], step=1, lr=1e-3, beta1=0.9, beta2=0.99,
                eps=1e-8, weight_decay=0.0)
