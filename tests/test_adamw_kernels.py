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
        # run_unchecked (kerneltune.optim's entry point on a step it checked itself): the same update
        calls, checked = [], mod._checked
        mod._checked = lambda lists, dev, calls=calls, checked=checked: calls.append(1) or checked(lists, dev)
        unchecked = {**inputs.args, "unchecked": True}
        try:
            got = spec.invoke(mod.run, {k: [t.clone() for t in v] for k, v in inputs.tensors.items()}, unchecked)
        finally:
            mod._checked = checked
        assert spec.compare(inputs, expected, got) == "" and calls == [], (point, seed)


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


def check_mt_table_strided() -> None:
    """Non-contiguous params, moments and grads (views into larger buffers, a transpose) take the copy path:
    the caller's tensors hold the update afterwards, as the fp64 reference has it."""
    mod = load_file("candidates/adamw/triton_mt_table.py")
    spec = get_op("adamw")
    inputs = spec.make_inputs(Case("t", {"shapes": [[37, 9], [300], [5, 64]]}, dtype="float32"), 1)
    expected = spec.reference(inputs)
    views = {}
    for k, ts in inputs.tensors.items():
        vs = []
        for i, t in enumerate(ts):
            if t.dim() == 2 and i == 0:
                v = torch.empty(t.shape[1], t.shape[0]).t()       # a transpose: non-contiguous, same shape
            else:
                v = torch.empty(*t.shape[:-1], t.shape[-1] * 2)[..., ::2]  # every other element of a buffer
            v.copy_(t)
            assert not v.is_contiguous()
            vs.append(v)
        views[k] = vs
    grads_before = [g.clone() for g in views["grads"]]
    got = spec.invoke(mod.run, views, inputs.args)
    assert spec.compare(inputs, expected, got) == ""
    assert all(torch.equal(a, b) for a, b in zip(views["grads"], grads_before))  # read, never written


def test_mt_table_updates_non_contiguous_tensors_through_a_copy():
    in_interpreter("tests.test_adamw_kernels", "check_mt_table_strided")


def test_mt_table_refuses_what_breaks_the_contract_with_a_clear_error():
    pytest.importorskip("triton")
    mod = load_file("candidates/adamw/triton_mt_table.py")
    z = lambda *s, **k: [torch.zeros(*s, **k)]  # noqa: E731
    hyper = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    cases = [((z(3), z(3), z(3), z(3, dtype=torch.float64)), TypeError, "float32 on one device"),
             ((z(3, dtype=torch.float16), z(3), z(3), z(3)), TypeError, "float32 on one device"),
             ((z(3), z(3, device="meta"), z(3), z(3)), TypeError, "float32 on one device"),
             ((z(3), z(1, 3), z(3), z(3)), ValueError, "one shape"),
             ((z(3), z(3), z(4), z(3)), ValueError, "one shape"),
             ((z(3) * 2, z(3), z(3), z(3)), ValueError, "equal length")]
    for lists, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            mod.run(*lists, **hyper)
    with pytest.raises(ValueError, match="1-based"):
        mod.run(z(3), z(3), z(3), z(3), **{**hyper, "step": 0})


def check_mt_table_guard(guard: bool) -> None:
    """Lists with the metadata of lists that passed before skip the checks in one C++ call; lists that differ
    from them in any property take the checks again: a bad one is refused, a strided one goes through the copy
    path, and every update matches the fp64 reference. (guard False: a torch without the C++ check.)"""
    mod = load_file("candidates/adamw/triton_mt_table.py")
    if not guard:
        mod._TensorGuards = None
    spec = get_op("adamw")
    shapes = [[37, 9], [300], [5, 64]]
    calls = []
    real = mod._checked_each
    mod._checked_each = lambda lists, dev: calls.append(1) or real(lists, dev)
    skips = mod._TensorGuards is not None
    assert skips or not guard  # the torch CI installs has it

    def step(seed, change=None):
        inputs = spec.make_inputs(Case("t", {"shapes": shapes}, dtype="float32"), seed)
        tensors = {k: [t.clone() for t in v] for k, v in inputs.tensors.items()}
        if change:
            change(tensors)
        got = spec.invoke(mod.run, tensors, inputs.args)
        assert spec.compare(inputs, spec.reference(inputs), got) == "", seed

    step(0)
    assert len(calls) == 1 and len(mod._GUARDS) == int(skips)
    step(1)  # new tensors, the same metadata
    assert len(calls) == 1 + (not skips)
    before = len(calls)

    def strided(ts):  # a transposed moment: the same shape, other strides
        v = torch.empty(9, 37).t()
        v.copy_(ts["exp_avgs"][0])
        ts["exp_avgs"][0] = v
    step(2, strided)
    assert len(calls) == before + 1
    for bad, exc in (((lambda ts: ts["grads"].__setitem__(1, ts["grads"][1].double())), TypeError),
                     ((lambda ts: ts["exp_avg_sqs"].__setitem__(2, ts["exp_avg_sqs"][2].reshape(64, 5))), ValueError)):
        inputs = spec.make_inputs(Case("t", {"shapes": shapes}, dtype="float32"), 3)
        tensors = {k: [t.clone() for t in v] for k, v in inputs.tensors.items()}
        bad(tensors)
        with pytest.raises(exc):
            spec.invoke(mod.run, tensors, inputs.args)
    step(4)  # the remembered lists' metadata still passes in one call
    assert len(calls) == before + 3 + (not skips)


@pytest.mark.parametrize("guard", [True, False], ids=["torch-check", "no-torch-check"])
def test_mt_table_checks_again_what_differs_from_lists_that_passed(guard):
    in_interpreter("tests.test_adamw_kernels", "check_mt_table_guard", guard)
