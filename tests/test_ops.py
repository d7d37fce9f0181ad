"""Op specs: references against an independent implementation, tolerances that catch wrong kernels."""

from __future__ import annotations

import math

import pytest
import torch

from kerneltune.library.attention import sdpa
from kerneltune.ops import get_op
from kerneltune.ops.base import Case, flatten, unflatten
from tests.interp import load_file

ATT = get_op("attention")
ADAMW = get_op("adamw")


def _sdpa64(inputs):
    # torch's SDPA in fp64; a scale of 0 or below given as the same scores at a positive one (torch's causal
    # path is NaN there: see the test below), as kerneltune.attention's fallback gives it
    q, k, v = (inputs.tensors[x].double() for x in "qkv")
    return sdpa(q, k, v, inputs.args["causal"], inputs.args["scale"])


def test_sdpa_is_no_reference_at_a_scale_of_zero_or_below_when_causal():
    """Why _sdpa64 rewrites such scales: torch's own SDPA (fp64, CPU) is NaN there. If this fails, torch mended it
    and the rewrite can go."""
    case = next(c for c in ATT.check_cases("cpu") if c.args.get("values") == "scale_zero" and c.args["causal"])
    inputs = ATT.make_inputs(case, 1)
    q, k, v = (inputs.tensors[x].double() for x in "qkv")
    raw = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.0)
    assert torch.isnan(raw).any()
    # ours: at a scale of 0 each row is the mean of the values it sees
    want = v.cumsum(-2) / torch.arange(1, v.shape[-2] + 1, dtype=torch.float64)[:, None]
    assert torch.allclose(ATT.reference(inputs)["out"], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ATT.check_cases("cpu"), ids=lambda c: c.name)
def test_attention_reference_matches_torch_sdpa_in_fp64(case):
    for seed in range(3):
        inputs = ATT.make_inputs(case, seed)
        ref = ATT.reference(inputs)["out"]
        assert torch.allclose(ref, _sdpa64(inputs), rtol=1e-10, atol=1e-12)


def test_inputs_are_fresh_per_seed_and_deterministic():
    case = ATT.check_cases("cpu")[1]
    a, b, a2 = ATT.make_inputs(case, 1), ATT.make_inputs(case, 2), ATT.make_inputs(case, 1)
    assert not torch.equal(a.tensors["q"], b.tensors["q"])
    assert torch.equal(a.tensors["q"], a2.tensors["q"])


def _attention_variants(inputs):
    """Each wrong kernel the tolerances must catch, computed from the honest output."""
    dt = inputs.tensors["q"].dtype
    good = _sdpa64(inputs)
    q, k, v = (inputs.tensors[x].double() for x in "qkv")
    d = q.shape[-1]
    off = good.clone()
    off.view(-1)[off.numel() // 2] += 0.5
    nan = good.clone()
    nan.view(-1)[-1] = float("nan")
    wrong_scale = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=inputs.args["causal"],
                                                                   scale=1.0 / d)
    no_mask = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=not inputs.args["causal"],
                                                               scale=inputs.args["scale"])
    tail = good.clone()
    tail[..., -1, :] = 0  # the last row of a non-multiple N never written
    half = torch.nn.functional.scaled_dot_product_attention(q.half().double(), k.half().double(), v.half().double(),
                                                            is_causal=inputs.args["causal"], scale=inputs.args["scale"])
    return {"one element off": off.to(dt), "NaN": nan.to(dt), "wrong scale": wrong_scale.to(dt),
            "causal flipped": no_mask.to(dt), "missed tail": tail.to(dt), "fp16 inputs": half.to(dt)}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_attention_tolerance_passes_honest_and_fails_wrong(dtype):
    case = ATT.parse_case("2,3,67,48,causal", dtype)
    inputs = ATT.make_inputs(case, 1)  # seed 1: an explicit scale
    expected = ATT.reference(inputs)
    honest = _sdpa64(inputs).to(inputs.tensors["q"].dtype)
    assert ATT.compare(inputs, expected, {"out": honest}) == ""
    for name, out in _attention_variants(inputs).items():
        if name == "fp16 inputs" and dtype != "float32":
            continue  # half precision is the expected precision of half inputs
        assert ATT.compare(inputs, expected, {"out": out}), f"{name} passed at {dtype}"


def test_attention_fp32_rejects_tf32_like_error():
    case = ATT.parse_case("1,2,256,64,full", "float32")
    inputs = ATT.make_inputs(case, 0)
    expected = ATT.reference(inputs)
    out = expected["out"].float()
    noisy = out * (1 + 3e-4 * (2 * torch.rand_like(out) - 1))  # tf32-sized relative error, never 1e-3 elementwise
    assert "lower precision" in ATT.compare(inputs, expected, {"out": noisy})


def _adamw_step(inputs, *, skip_last=False, no_wd=False, no_bias_corr=False, step_offset=0, half_update=False):
    a = inputs.args
    out = {k: [x.clone() for x in v] for k, v in inputs.tensors.items()}
    n = len(out["params"])
    for i, (p, g, m, v) in enumerate(zip(out["params"], out["grads"], out["exp_avgs"], out["exp_avg_sqs"])):
        if skip_last and i == n - 1:
            continue
        step = a["step"] + step_offset
        if not no_wd:
            p.mul_(1 - a["lr"] * a["weight_decay"])
        m.mul_(a["beta1"]).add_(g, alpha=1 - a["beta1"])
        v.mul_(a["beta2"]).addcmul_(g, g, value=1 - a["beta2"])
        bc1 = 1.0 if no_bias_corr else 1 - a["beta1"] ** step
        bc2 = 1.0 if no_bias_corr else 1 - a["beta2"] ** step
        upd = (a["lr"] / bc1) * m / (v.sqrt() / math.sqrt(bc2) + a["eps"])
        p.sub_(upd.half().float() if half_update else upd)
    return {k: out[k] for k in ADAMW.outputs}


@pytest.mark.parametrize("case", ADAMW.check_cases("cpu"), ids=lambda c: c.name)
def test_adamw_reference_matches_torch_optim(case):
    for seed in range(3):
        inputs = ADAMW.make_inputs(case, seed)
        expected = ADAMW.reference(inputs)
        t = {k: [x.clone() for x in v] for k, v in inputs.tensors.items()}
        actual = ADAMW.invoke(ADAMW.baselines()["adamw_foreach"], t, inputs.args)
        assert ADAMW.compare(inputs, expected, actual) == ""
        assert ADAMW.compare(inputs, expected, _adamw_step(inputs)) == ""


def test_adamw_reference_chain_never_writes_its_inputs():
    """The reference updates fp64 copies in place: neither the inputs nor an earlier call's outputs (the next
    call's inputs, kept by the evaluator for blocks of fewer calls) may change."""
    inputs = ADAMW.make_inputs(ADAMW.check_cases("cpu")[0], 1)
    before = {k: [x.clone() for x in v] for k, v in inputs.tensors.items()}
    chain = ADAMW.reference_chain(inputs)
    first = next(chain)
    kept = {k: [x.clone() for x in first[k]] for k in ADAMW.outputs}
    second, third = next(chain), next(chain)
    for k, v in inputs.tensors.items():
        assert all(torch.equal(a, b) for a, b in zip(v, before[k])), k
    for k in ADAMW.outputs:
        assert all(torch.equal(a, b) for a, b in zip(first[k], kept[k])), k
        assert not any(torch.equal(a, b) for a, b in zip(second[k], third[k])), k  # each call a step further


@pytest.mark.parametrize("wrong", ["skip_last", "no_wd", "no_bias_corr", "step_offset", "half_update"])
def test_adamw_tolerance_catches_wrong_updates(wrong):
    case = ADAMW.check_cases("cpu")[0]
    caught = 0
    for seed in range(4):  # hyper-parameters vary by seed; each mistake must show on some seed
        inputs = ADAMW.make_inputs(case, seed)
        kw = {"step_offset": 1} if wrong == "step_offset" else {wrong: True}
        caught += bool(ADAMW.compare(inputs, ADAMW.reference(inputs), _adamw_step(inputs, **kw)))
    assert caught >= 3, f"{wrong} passed on {4 - caught} of 4 seeds"


def test_flatten_roundtrip_keeps_empty_lists():
    d = {"q": torch.ones(2), "params": [torch.zeros(3), torch.ones(())], "none": []}
    back = unflatten(flatten(d))
    assert torch.equal(back["q"], d["q"]) and len(back["params"]) == 2 and back["none"] == []


def test_work_counts():
    case = ATT.parse_case("2,4,128,64,causal", "bfloat16")
    assert ATT.flops(case) == 4 * 2 * 4 * 128 * 128 * 64 / 2
    assert ATT.bytes_moved(case) == 4 * 2 * 4 * 128 * 64 * 2
    c = ADAMW.parse_case("10x10;5", "float32")
    assert ADAMW.bytes_moved(c) == 28 * 105


def test_parse_case_errors_are_one_line_and_helpful():
    with pytest.raises(ValueError, match="B,H,N,D"):
        ATT.parse_case("2,8,512", "float32")
    with pytest.raises(ValueError, match="fp32"):
        ADAMW.parse_case("gpt-tiny", "bf16")


@pytest.mark.parametrize("shape", [(), (1,), (37,), (5, 7, 3), (1000,)])
def test_chunked_compare_gives_the_same_verdicts(shape, monkeypatch):
    """compare_tensor in chunks of 7 elements answers exactly as in one piece: passes, the first element out of
    tolerance (as a multi-dimensional index) and the count, NaNs first, the norm test of an update."""
    import kerneltune.ops.base as base
    from kerneltune.ops.base import Tolerance, compare_tensor

    g = torch.Generator().manual_seed(math.prod(shape) + len(shape))
    before = torch.randn(shape, generator=g)
    exact = before.double() + 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64)
    tol = Tolerance(atol=1e-6, rtol=1e-3, norm_rtol=1e-4)
    cases = [exact.float()]
    n = max(math.prod(shape), 1)
    wrong = exact.float().reshape(-1).clone()
    wrong[n // 2] += 1.0
    wrong[-1] += 0.5
    cases.append(wrong.reshape(shape))
    nan = exact.float().reshape(-1).clone()
    nan[-1] = float("nan")
    cases.append(nan.reshape(shape))
    cases.append((exact + 3e-4 * (exact - before.double())).float())  # every element a little off: the norm test
    for actual in cases:
        for delta in (None, before):
            monkeypatch.setattr(base, "_COMPARE_CHUNK", 1 << 22)
            whole = compare_tensor("x", actual, exact, tol, delta_of=delta)
            monkeypatch.setattr(base, "_COMPARE_CHUNK", 7)
            assert compare_tensor("x", actual, exact, tol, delta_of=delta) == whole
    monkeypatch.setattr(base, "_COMPARE_CHUNK", 7)
    assert compare_tensor("x", cases[0], exact, tol, delta_of=before) == ""
    if n > 1:
        msg = compare_tensor("x", cases[1], exact, tol, delta_of=before)
        first = tuple(int(i) for i in torch.unravel_index(torch.tensor(n // 2), shape)) if shape else ()
        assert "2 of" in msg and f"first at {first}" in msg, msg
        assert "NaN" in compare_tensor("x", cases[2], exact, tol)


def test_reference_device_large_problems_go_to_the_gpu_unless_told(monkeypatch):
    from kerneltune.ops.base import cpu_references, reference_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("KERNELTUNE_REFERENCE_DEVICE", raising=False)
    assert reference_device(True).type == "cuda" and reference_device(False).type == "cpu"
    with cpu_references():
        assert reference_device(True).type == "cpu"
    assert reference_device(True).type == "cuda"
    monkeypatch.setenv("KERNELTUNE_REFERENCE_DEVICE", "cpu")
    assert reference_device(True).type == "cpu"


@pytest.mark.parametrize("impl", ["adamw_fused", "adamw_foreach"])
def test_adamw_baselines_take_each_calls_step_in_the_same_buffers(impl):
    """The torch baselines are driven like a training loop (one optimizer per set of buffers): the step count
    and hyper-parameters of every call must still be the call's own, including a step repeated (timing)
    and a step going backwards (re-verification with new values)."""
    fn = ADAMW.baselines()[impl]
    case = ADAMW.check_cases("cpu")[0]
    bufs = None
    for seed, step in ((0, 3), (1, 3), (2, 9), (3, 1), (4, 2)):
        inputs = ADAMW.make_inputs(case, seed)
        inputs.args["step"] = step
        if bufs is None:
            bufs = {k: [x.clone() for x in v] for k, v in inputs.tensors.items()}
        else:  # new values in the same tensors, as the evaluator's slots hold them
            for k, v in inputs.tensors.items():
                for dst, src in zip(bufs[k], v):
                    dst.copy_(src)
        actual = ADAMW.invoke(fn, bufs, inputs.args)
        assert ADAMW.compare(inputs, ADAMW.reference(inputs), actual) == "", (seed, step)


@pytest.mark.slow
def test_attention_backward_compiled_baseline_matches_fp64():
    """The bench's torch_compile baseline of attention_backward (built for CUDA, run here on the CPU): the math
    version through torch.compile, its backward the compiled AOTAutograd graph, at a ragged causal shape.
    Slow: 30 s of Inductor compiles on a 2-core machine with a cold cache."""
    pytest.importorskip("torch._inductor")
    spec = get_op("attention_backward")
    compiled = spec.baselines("cuda")["torch_compile"]
    inputs = spec.make_inputs(Case(name="compiled", dims={"B": 1, "H": 3, "N": 37, "D": 24}, dtype="float32",
                                   args={"causal": True}), 11)
    got = spec.invoke(compiled, inputs.tensors, inputs.args)
    assert spec.compare(inputs, spec.reference(inputs), got) == ""
    wrong = {k: v * 1.01 if k == "dk" else v for k, v in got.items()}
    assert "dk" in spec.compare(inputs, spec.reference(inputs), wrong)


def test_run_with_lse_is_found_beside_a_decorated_run(tmp_path):
    """attention's optional run_with_lse is looked up in the file that defines run, through decorators that keep
    __wrapped__ (torch.no_grad() on run): the evaluator checks the lse it returns, as the library uses it."""
    src = tmp_path / "cand.py"
    src.write_text(
        "import torch\n"
        "import torch.nn.functional as F\n"
        "def run_with_lse(q, k, v, causal=True, scale=None):\n"
        "    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale), "
        "torch.full(q.shape[:-1], 7.0)\n"
        "@torch.no_grad()\n"
        "def run(q, k, v, causal=True, scale=None):\n"
        "    return run_with_lse(q, k, v, causal, scale)[0]\n")
    mod = load_file(str(src), "kt_cand_decorated")
    spec = get_op("attention")
    case = next(c for c in spec.check_cases("cpu") if c.args.get("lse") and c.dtype == "float32")
    inputs = spec.make_inputs(case, 0)
    got = spec.invoke(mod.run, inputs.tensors, inputs.args)
    assert set(got) == {"out", "lse"} and float(got["lse"].flatten()[0]) == 7.0
    assert "lse" in spec.compare(inputs, spec.reference(inputs), got)  # the wrong lse is caught


def test_adamws_run_unchecked_is_what_the_unchecked_cases_check(tmp_path):
    """adamw's optional run_unchecked (what kerneltune.optim calls on a step it has checked itself) is looked up
    beside run and checked on the cases marked unchecked; a wrong one (no weight decay) fails there while run
    passes every other case."""
    src = tmp_path / "cand.py"
    src.write_text(
        "import torch\n"
        "def _step(ps, gs, ms, vs, step, lr, beta1, beta2, eps, weight_decay):\n"
        "    with torch.no_grad():\n"
        "        for p, g, m, v in zip(ps, gs, ms, vs):\n"
        "            p.mul_(1 - lr * weight_decay)\n"
        "            m.mul_(beta1).add_(g, alpha=1 - beta1)\n"
        "            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)\n"
        "            den = (v.double().sqrt() / (1 - beta2 ** step) ** 0.5 + eps)\n"
        "            p.sub_((lr / (1 - beta1 ** step) * m.double() / den).float())\n"
        "def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):\n"
        "    _step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)\n"
        "def run_unchecked(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):\n"
        "    _step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, 0.0)\n")
    mod = load_file(str(src), "kt_cand_unchecked")
    spec = get_op("adamw")
    cases = spec.check_cases("cpu")
    unchecked = [c for c in cases if c.args.get("unchecked")]
    assert unchecked and len({c.name for c in cases}) == len(cases)
    for case in cases:
        inputs = spec.make_inputs(case, 3)   # seed 3: weight decay 0.1
        assert inputs.args["weight_decay"] > 0
        got = spec.invoke(mod.run, {k: [t.clone() for t in v] for k, v in inputs.tensors.items()}, inputs.args)
        why = spec.compare(inputs, spec.reference(inputs), got)
        assert (why != "") == bool(case.args.get("unchecked")), (case.name, why)


def _scaled(inputs, name, c):
    from kerneltune.ops.base import Inputs

    return Inputs({**inputs.tensors, name: (inputs.tensors[name].double() * c).to(inputs.tensors[name].dtype)},
                  inputs.args)


@pytest.mark.parametrize("op,dims,dtype", [
    ("attention", {"B": 2, "H": 3, "N": 37, "D": 40}, "float32"),
    ("attention", {"B": 1, "H": 8, "N": 65, "D": 64}, "bfloat16"),
    ("attention_backward", {"B": 2, "H": 3, "N": 29, "D": 48}, "float32"),
    ("attention_backward", {"B": 1, "H": 4, "N": 33, "D": 64}, "float16"),
])
def test_timed_calls_digests_pass_a_result_that_passes_and_fail_skipped_cached_or_downgraded_ones(op, dims, dtype):
    """The timed calls' check (OpSpec.digest with a sketch / check_digest): each timed call's scaled input has a
    factor a row, and the outputs' sketch is the reference's G·(s ∘ B·W); a result within the dtype's tolerance
    (the fp64 reference at the call's inputs, rounded to the dtype) passes on every call, while zeros, half the
    rows, one head copied over the others, another call's answer (a cache that ignores the scaled input, even
    rescaled by the mean factor), or (fp32) a bf16 computation, fail."""
    spec = get_op(op)
    dt = getattr(torch, dtype)
    case = Case(name="t", dims=dims, dtype=dtype, args={"causal": True})
    inputs = spec.make_inputs(case, 5)
    ref = spec.digest_reference(inputs, spec.reference(inputs), seed=77)
    sketch = spec.sketch(inputs.tensors["q"], 77)
    seed = 1234
    x = inputs.tensors[spec.scaled_input]
    rows = x.numel() // x.shape[-1]

    def outputs(i, cast=dt):
        got = spec.reference(spec.scale_input(inputs, seed, i))
        return {k: v.to(cast).to(dt) for k, v in got.items() if k in spec.outputs}

    for i in range(5):
        s = spec.rep_scales(seed, i, rows)
        assert float(s.min()) >= 1.0625 and float(s.max()) < 1.5 and len(set(s.tolist())) > 1
        assert torch.equal(spec.scaled(x, seed, i), spec.scaled(x.clone(), seed, i))
        good = outputs(i)
        assert spec.check_digest(ref, spec.digest(good, sketch=sketch).tolist(), s) == ""
        other = outputs(i + 100)
        ratio = float(spec.rep_scales(seed, i, rows).mean() / spec.rep_scales(seed, i + 100, rows).mean())
        wrong = [{k: torch.zeros_like(v) for k, v in good.items()},
                 {k: torch.cat([v[..., : v.shape[-2] // 2, :], torch.zeros_like(v[..., v.shape[-2] // 2:, :])], -2)
                  for k, v in good.items()},
                 {k: v[:, :1].expand_as(v).contiguous() for k, v in good.items()},
                 other, {k: (v.double() * ratio).to(dt) for k, v in other.items()}]
        if dtype == "float32":
            wrong.append(outputs(i, torch.bfloat16))
        for w in wrong:
            assert "what the timed calls computed" in spec.check_digest(ref, spec.digest(w, sketch=sketch).tolist(), s)


def test_adamw_timed_calls_digest_is_the_change_over_a_blocks_steps():
    """adamw's timed calls: blocks of k <= VOUCH_BLOCK steps in a row from the state the slot held; a block's
    digest, of the change, is the reference's k steps within k times the check's norm limits, and a block that
    skipped one step (or left the moments alone) is outside them."""
    spec = get_op("adamw")
    case = spec.parse_case("64x48;48;7x5", "float32")
    inputs = spec.make_inputs(case, 4)
    before = {k: inputs.tensors[k] for k in spec.in_place}
    for k in (1, 3, 8):
        ref = spec.digest_reference(inputs, spec.reference_calls(inputs, k), k)
        state = {n: [t.clone() for t in inputs.tensors[n]] for n in ("params", "grads", "exp_avgs", "exp_avg_sqs")}
        for _ in range(k):  # the candidate's k steps: torch's own AdamW arithmetic in fp32
            _fp32_step(state, inputs.args)
        assert spec.check_digest(ref, spec.digest(state, before).tolist()) == ""
        fewer = {n: [t.clone() for t in inputs.tensors[n]] for n in state}
        for _ in range(k - 1):
            _fp32_step(fewer, inputs.args)
        frozen = {**state, "exp_avgs": [t.clone() for t in inputs.tensors["exp_avgs"]]}
        for wrong in (fewer, frozen):
            assert "what the timed calls computed" in spec.check_digest(ref, spec.digest(wrong, before).tolist())


def _fp32_step(s, a):
    b1, b2, lr, wd, eps, t = a["beta1"], a["beta2"], a["lr"], a["weight_decay"], a["eps"], a["step"]
    for p, g, m, v in zip(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"]):
        p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps), value=-lr / (1 - b1 ** t))
