"""adamw's check cases beyond plain random draws: a fresh optimizer's first step with zero gradients, a second moment
at 0 or below eps² (VALUES), an empty parameter list and tensors without elements; hyper-parameters that do not
move together. A kernel that is right only where v > 0 (m·rsqrt(v̂) / (1 + eps·rsqrt(v̂)), torch's update in other
algebra) passes every plain draw and fails here; torch.optim.AdamW and the shipped candidates pass."""

from __future__ import annotations

import math
import os

import pytest
import torch

from kerneltune.evaluate import protocol
from kerneltune.ops import get_op
from kerneltune.ops.adamw import VALUES
from kerneltune.ops.base import Case, flatten, unflatten
from tests.interp import in_interpreter, load_file

ADAMW = get_op("adamw")
CASES = ADAMW.check_cases("cpu")
VALUE_CASES = [c for c in CASES if c.args.get("values")]
SIZE_CASES = [c for c in CASES if not c.dims["shapes"] or any(math.prod(s) == 0 for s in c.dims["shapes"])]
NEW_CASES = VALUE_CASES + SIZE_CASES
PLAIN_CASES = [c for c in CASES if c not in NEW_CASES]
# a tensor without elements first, before others (a multi-tensor kernel's base pointer): not a check case, whose
# same empty first gradient in every draw a cheat keyed on it would take for a repeated (timed) call
ZERO_FIRST = Case(name="zero-size first", dims={"shapes": [[0], [3, 0], [5], [1, 0]]})
LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs")


def _copy(inputs):
    return {k: [t.clone() for t in v] for k, v in inputs.tensors.items()}


def _verdict(fn, case, seed):
    inputs = ADAMW.make_inputs(case, seed)
    return ADAMW.compare(inputs, ADAMW.reference(inputs), ADAMW.invoke(fn, _copy(inputs), inputs.args))


def _step_with(update):
    """An fp32 AdamW step over the lists whose parameter update is ``update(m, v, bc2, eps)`` (torch's: m /
    (sqrt(v / bc2) + eps))."""
    def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.sub_(lr / bc1 * update(m, v, bc2, eps))
    return run


def _rsqrt(m, v, bc2, eps):  # the reviewer's mutant: the same value as torch's wherever v > 0
    r = (v / bc2).rsqrt()
    return m * r / (1 + eps * r)


MUTANTS = {
    "rsqrt": _rsqrt,
    "eps_squared_in_sqrt": lambda m, v, bc2, eps: m / (v / bc2 + eps * eps).sqrt(),
    "eps_as_floor": lambda m, v, bc2, eps: m / (v / bc2).sqrt().clamp_min(eps),
    "nan_to_zero_without_eps": lambda m, v, bc2, eps: torch.nan_to_num(m / (v / bc2).sqrt(), nan=0.0),
}


def test_the_new_cases_are_there_small_and_named_apart():
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names)
    assert {c.args["values"] for c in VALUE_CASES} == set(VALUES)
    assert any(c.dims["shapes"] == [] for c in CASES)  # an empty parameter list
    assert any(s and math.prod(s) == 0 for c in SIZE_CASES for s in c.dims["shapes"])
    assert any(all(math.prod(s) == 0 for s in c.dims["shapes"]) and c.dims["shapes"] for c in SIZE_CASES)
    for c in NEW_CASES:  # every case runs in every evaluation, on 2-core CI machines too
        assert sum(math.prod(s) for s in c.dims["shapes"]) <= 5000, c.name
    # after the cases that were there before: an adversarial candidate's first failure (and its reason) stays
    assert CASES.index(NEW_CASES[0]) == len(PLAIN_CASES) and all(CASES.index(c) >= len(PLAIN_CASES) for c in NEW_CASES)


@pytest.mark.parametrize("seed", range(6))
def test_fresh_state_has_zero_moments_and_zero_or_tiny_gradients(seed):
    case = next(c for c in VALUE_CASES if c.args["values"] == "fresh")
    inputs = ADAMW.make_inputs(case, seed)
    a, t = inputs.args, inputs.tensors
    assert a["step"] == 1
    assert all(not x.any() for x in t["exp_avgs"] + t["exp_avg_sqs"])
    grads = t["grads"]
    whole = [g for g in grads if not g.any()]
    assert 1 <= len(whole) < len(grads)  # whole tensors without gradient, and others with some
    flat = torch.cat([g.reshape(-1) for g in grads if g.any()])
    zero = float((flat == 0).double().mean())
    tiny = float(((flat != 0) & (flat.abs() <= 10 * a["eps"])).double().mean())
    assert 0.1 < zero < 0.3 and 0.1 < tiny < 0.3, (zero, tiny)
    # the reference is finite, and where g = 0 the parameter only decays: 0 / (0 + eps) = 0
    expected = ADAMW.reference(inputs)
    decay = 1 - a["lr"] * a["weight_decay"]
    for p, g, e in zip(t["params"], grads, expected["params"]):
        assert torch.isfinite(e).all()
        assert torch.equal(e[g == 0], p.double()[g == 0] * decay)


@pytest.mark.parametrize("seed", range(6))
def test_zero_v_state_has_v_at_zero_or_below_eps_squared_where_the_gradient_is_zero(seed):
    case = next(c for c in VALUE_CASES if c.args["values"] == "zero_v")
    inputs = ADAMW.make_inputs(case, seed)
    eps, t = inputs.args["eps"], inputs.tensors
    v = torch.cat([x.reshape(-1) for x in t["exp_avg_sqs"]])
    m = torch.cat([x.reshape(-1) for x in t["exp_avgs"]])
    g = torch.cat([x.reshape(-1) for x in t["grads"]])
    at_zero, below = v == 0, (v > 0) & (v < eps * eps)
    assert 0.05 < float(at_zero.double().mean()) < 0.6 and 0.05 < float(below.double().mean()) < 0.6  # one tensor all idle
    assert not g[at_zero | below].any() and not m[at_zero].any()
    assert (m[below].abs() <= v[below].sqrt()).all()
    assert any(not x.any() for x in t["grads"])  # one tensor all idle
    assert all(torch.isfinite(e).all() for k in ADAMW.outputs for e in ADAMW.reference(inputs)[k])


def test_hyper_parameters_do_not_move_together():
    """lr, beta1 and weight decay each vary on their own; weight decay 0 meets several lrs within one evaluation's
    seeds (1..3); seed 3 (the timed cases' values) never has weight decay 0; step and eps still vary."""
    draws = [(c, s, ADAMW.make_inputs(c, s).args) for c in CASES for s in (1, 2, 3)]
    assert len({a["lr"] for _, _, a in draws if a["weight_decay"] == 0}) >= 2
    assert all(a["weight_decay"] > 0 for _, s, a in draws if s == 3)
    for x, y in (("lr", "beta1"), ("lr", "weight_decay"), ("beta1", "weight_decay")):
        pairs = {(a[x], a[y]) for _, _, a in draws}
        assert len(pairs) > 3, (x, y, pairs)  # not a function of each other
    plain = [a for c, _, a in draws if not c.args.get("values")]
    assert len({a["step"] for a in plain}) == 3 and len({a["eps"] for a in plain}) == 2


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("impl", ["adamw_foreach", "adamw_fused"])
def test_torch_optim_adamw_passes_every_new_case(impl, seed):
    fn = ADAMW.baselines()[impl]
    for case in NEW_CASES + [ZERO_FIRST]:
        assert _verdict(fn, case, seed) == "", (impl, case.name, seed)


@pytest.mark.parametrize("name", MUTANTS)
def test_an_update_right_only_where_v_is_positive_fails_every_value_case(name):
    fn = _step_with(MUTANTS[name])
    for case in VALUE_CASES:
        for seed in range(6):
            why = _verdict(fn, case, seed)
            assert why, (name, case.name, seed)
            if name == "rsqrt":
                assert "NaN" in why
    if name == "rsqrt":  # what the cases add: the plain ones let it through
        assert all(_verdict(fn, c, s) == "" for c in PLAIN_CASES for s in (1, 2, 3))


def test_a_tensor_the_step_leaves_unchanged_is_compared_exactly_not_passed_by_a_zero_norm():
    """g = m = v = 0 and no weight decay: the reference's change is 0 (update 0 / (0 + eps)), so the norm test
    has nothing to be relative to; the element test then allows the rounding of the stored value only (4 ulp) for
    params, nothing for the moments: p unchanged passes, p moved by 8 ulp, NaN, or a moment not exactly 0 fail."""
    shapes = [[64], [5]]
    p = [torch.randn(s, generator=torch.Generator().manual_seed(i)) + 2.0 for i, s in enumerate(shapes)]
    zeros = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
    from kerneltune.ops.base import Inputs

    inputs = Inputs({"params": p, "grads": zeros(), "exp_avgs": zeros(), "exp_avg_sqs": zeros()},
                    dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0))
    expected = ADAMW.reference(inputs)
    assert all(torch.equal(e, x.double()) for e, x in zip(expected["params"], p))
    good = {"params": [x.clone() for x in p], "exp_avgs": zeros(), "exp_avg_sqs": zeros()}
    assert ADAMW.compare(inputs, expected, good) == ""
    far = {**good, "params": [x * (1 + 8 * torch.finfo(torch.float32).eps) for x in p]}
    assert "outside tolerance" in ADAMW.compare(inputs, expected, far)
    nan = {**good, "params": [p[0].clone(), torch.full((5,), float("nan"))]}
    assert "NaN" in ADAMW.compare(inputs, expected, nan)
    for k in ("exp_avgs", "exp_avg_sqs"):
        off = {**good, k: [torch.zeros(64), torch.full((5,), 1e-30)]}
        assert "outside tolerance" in ADAMW.compare(inputs, expected, off), k


def _wire(tensors):
    """``tensors`` there and back: flatten, the worker protocol's message over a pipe, unflatten."""
    r, w = os.pipe()
    try:
        for part in protocol.encode({"cmd": "call"}, flatten(tensors)):
            os.write(w, bytes(part))
        header, flat = protocol.recv(r, deadline=None)
    finally:
        os.close(r)
        os.close(w)
    assert header == {"cmd": "call"}
    return unflatten(flat)


def test_empty_lists_and_zero_size_tensors_cross_the_wire_and_compare():
    """An empty parameter list and tensors without elements: the inputs reach the worker and its outputs come back
    with their lengths and shapes (flatten/unflatten, protocol), and compare passes the reference's own values."""
    for case in SIZE_CASES + [ZERO_FIRST]:
        inputs = ADAMW.make_inputs(case, 1)
        shapes = [tuple(s) for s in case.dims["shapes"]]
        there = _wire(inputs.tensors)
        assert set(there) == set(LISTS)
        assert all([tuple(t.shape) for t in there[k]] == shapes for k in LISTS), case.name
        expected = ADAMW.reference(inputs)
        back = _wire({k: [e.float() for e in expected[k]] for k in ADAMW.outputs})
        assert all([tuple(t.shape) for t in back[k]] == shapes for k in ADAMW.outputs), case.name
        assert ADAMW.compare(inputs, expected, back) == "", case.name
        if shapes:  # and still catches a tensor with elements left alone
            assert "not updated" in ADAMW.compare(inputs, expected, {k: there[k] for k in ADAMW.outputs}) or \
                all(math.prod(s) == 0 for s in shapes)


def _check_candidate(path: str, params: dict | None = None) -> None:
    """``path``'s run (and run_unchecked, where it has one) over every new case and ZERO_FIRST, seeds 0..3."""
    mod = load_file(path, "kt_new_cases_" + os.path.basename(path)[:-3].replace("-", "_"))
    if params:
        mod.KERNELTUNE["params"] = {**mod.KERNELTUNE["params"], **params}
    for case in NEW_CASES + [ZERO_FIRST]:
        for seed in range(4):
            inputs = ADAMW.make_inputs(case, seed)
            expected = ADAMW.reference(inputs)
            for unchecked in (False, True):
                got = ADAMW.invoke(mod.run, _copy(inputs), {**inputs.args, "unchecked": unchecked})
                assert ADAMW.compare(inputs, expected, got) == "", (path, params, case.name, seed, unchecked)


@pytest.mark.parametrize("path", ["candidates/adamw/numba_cpu.py", "candidates/adamw/numba_tpl.py"])
def test_shipped_numba_candidates_pass_the_new_cases(path):
    pytest.importorskip("numba")
    _check_candidate(path)


def check_triton_candidates() -> None:
    from tests.test_adamw_kernels import MT_TABLE_POINTS

    _check_candidate("candidates/adamw/triton_multitensor.py")
    _check_candidate("candidates/adamw/triton_mt_table-5083c73e.py")  # the promoted copy: checked, never edited
    for point in MT_TABLE_POINTS:
        _check_candidate("candidates/adamw/triton_mt_table.py", point)


def test_shipped_triton_candidates_pass_the_new_cases_in_the_interpreter():
    in_interpreter("tests.test_ops_adamw_cases", "check_triton_candidates")
