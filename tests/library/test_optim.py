"""kerneltune.optim.AdamW against torch.optim.AdamW: 100 steps of a small model, param groups, closures, options
a kernel cannot honour, state_dicts both ways, and a registry numba kernel forced to serve."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import kerneltune
from kerneltune.optim import AdamW
from tests.library.conftest import kt_warnings


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # awkward sizes, a one-element tensor, a frozen one (never a grad: skipped, as torch skips it)
    m = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 1), torch.nn.Flatten(0),
                            torch.nn.Linear(5, 3))
    m[2].bias.requires_grad_(False)
    return m


def groups(m: torch.nn.Module) -> list[dict]:
    return [{"params": list(m[0].parameters()), "lr": 3e-2, "weight_decay": 0.0},
            {"params": list(m[2].parameters()) + list(m[4].parameters())}]


def train(m: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1, closure: bool = False) -> list:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(5, 7, generator=g)

        def loss_fn(x=x):
            opt.zero_grad()
            loss = (m(x) ** 2).mean() + m(x).sin().sum()
            loss.backward()
            return loss

        if closure:
            losses.append(float(opt.step(loss_fn)))
        else:
            losses.append(float(loss_fn().detach()))
            opt.step()
    return losses


def assert_same(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0, rtol: float = 0.0) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=n)


def assert_same_state(o1: torch.optim.Optimizer, o2: torch.optim.Optimizer, atol=0.0, rtol=0.0) -> None:
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s1["state"][i][key], s2["state"][i][key], atol=atol, rtol=rtol, msg=f"{i}.{key}")


@pytest.mark.parametrize("closure", [False, True])
def test_matches_torch_adamw_over_100_steps(closure):
    m1 = small_model()
    m2 = copy.deepcopy(m1)
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    o1, o2 = torch.optim.AdamW(groups(m1), **kw), AdamW(groups(m2), **kw)
    steps = 30 if closure else 100
    assert train(m1, o1, steps, closure=closure) == train(m2, o2, steps, closure=closure)
    assert_same(m1, m2)
    assert_same_state(o1, o2)
    assert kerneltune.served() == {"adamw": {"reference": steps}}


@pytest.mark.parametrize("opts", [dict(amsgrad=True), dict(maximize=True), dict(foreach=False),
                                  dict(lr=torch.tensor(1e-2)), dict(fused=True)], ids=str)
def test_every_option_torch_has_works_the_same(opts):
    m1 = small_model(3)
    m2 = copy.deepcopy(m1)
    o1, o2 = torch.optim.AdamW(m1.parameters(), **opts), AdamW(m2.parameters(), **opts)
    train(m1, o1, 5)
    train(m2, o2, 5)
    assert_same(m1, m2)


def test_state_dicts_load_both_ways():
    m1 = small_model(4)
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(groups(m1), lr=5e-3)
    train(m1, o1, 7)
    # torch -> kerneltune, then both continue
    m2.load_state_dict(m1.state_dict())
    o2 = AdamW(groups(m2), lr=5e-3)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # state_dict() hands out the live tensors
    assert_same_state(o1, o2)
    train(m1, o1, 6, seed=2)
    train(m2, o2, 6, seed=2)
    assert_same(m1, m2)
    # kerneltune -> torch
    m3 = copy.deepcopy(m2)
    o3 = torch.optim.AdamW(groups(m3), lr=5e-3)
    o3.load_state_dict(copy.deepcopy(o2.state_dict()))
    assert_same_state(o2, o3)
    train(m2, o2, 4, seed=3)
    train(m3, o3, 4, seed=3)
    assert_same(m2, m3)


def test_step_hooks_run_once_per_step():
    m = small_model()
    opt = AdamW(m.parameters())
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    torch.optim.AdamW(small_model().parameters())  # a torch AdamW in the same process wraps torch's own step
    train(m, opt, 3)
    assert calls == ["pre", "post"] * 3


def test_a_registry_numba_kernel_serves_when_forced_and_matches(user_registry, monkeypatch):
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[13, 7], [13]]}, speedup=0.2))])
    monkeypatch.setenv("KERNELTUNE_MIN_SPEEDUP", "0")
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    m1 = small_model(5)
    m2 = copy.deepcopy(m1)
    # a bf16 tensor in a group: the kernel contract is fp32, so torch's step takes it, the rest is tuned
    extra1 = torch.nn.Parameter(torch.randn(6, dtype=torch.bfloat16))
    extra2 = torch.nn.Parameter(extra1.detach().clone())
    kw = dict(lr=1e-2, weight_decay=0.05)
    o1 = torch.optim.AdamW(groups(m1) + [{"params": [extra1]}], **kw)
    o2 = AdamW(groups(m2) + [{"params": [extra2]}], **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(100):
            for m, extra, o in ((m1, extra1, o1), (m2, extra2, o2)):
                o.zero_grad()
                x = torch.randn(5, 7, generator=torch.Generator().manual_seed(step))
                ((m(x) ** 2).mean() + (extra.float() ** 2).sum()).backward()
                o.step()
    assert kt_warnings(caught) == []
    served = kerneltune.served()["adamw"]
    assert served["numba_cpu"] == 200 and served["reference"] == 100  # two fp32 groups tuned, bf16 by torch
    # the kernel rounds differently from torch's fp32 math (moments in fp64): within a few ulp per step
    assert_same(m1, m2, atol=1e-5, rtol=1e-4)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-4)
    assert torch.equal(extra1, extra2)
    assert all(float(s["step"]) == 100 for s in o2.state_dict()["state"].values())


def test_per_parameter_step_counts_are_honoured(user_registry, monkeypatch):
    """A parameter that joins late (no grad for a while) keeps its own step count, as in torch."""
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    a1, b1 = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a1, b1))
    o1, o2 = torch.optim.AdamW([a1, b1], lr=0.1), AdamW([a2, b2], lr=0.1)
    for step in range(6):
        for a, b, o in ((a1, b1, o1), (a2, b2, o2)):
            o.zero_grad()
            loss = (a ** 2).sum() + ((b ** 3).sum() if step >= 3 else 0)
            loss.backward()
            o.step()
    assert [float(o2.state[p]["step"]) for p in (a2, b2)] == [6.0, 3.0]
    torch.testing.assert_close(a1, a2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b1, b2, atol=1e-6, rtol=1e-5)
    assert kerneltune.served()["adamw"]["numba_cpu"] == 9  # 3 steps of a alone, 3 of {a, b} split by step count


@pytest.fixture
def device_counts(monkeypatch):
    """Step counts taken as if they lived on a GPU (a fused optimizer's), where the optimizer remembers the counts
    it wrote instead of reading them (a read waits for the device); counts in host memory are read every step."""
    monkeypatch.setattr("kerneltune.optim._is_cpu", lambda t: False)


@pytest.mark.parametrize("where", ["host", "device"])
def test_step_counts_written_behind_the_optimizers_back_are_read_again(user_registry, monkeypatch, where):
    """The tuned step remembers the counts it wrote (no device read per step); a count changed since — by
    load_state_dict or an in-place write — must still be the one the kernel's bias correction uses."""
    if where == "device":
        monkeypatch.setattr("kerneltune.optim._is_cpu", lambda t: False)
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    torch.manual_seed(3)
    a1, b1 = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5, 3))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a1, b1))
    # fused=False keeps the counts on the host, so torch.optim.AdamW takes them as they are
    o1, o2 = torch.optim.AdamW([a1, b1], lr=0.05), AdamW([a2, b2], lr=0.05)

    def step(i: int) -> None:
        for a, b, o in ((a1, b1, o1), (a2, b2, o2)):
            o.zero_grad()
            ((a ** 2).sum() + (b.sin() * (i + 1)).sum()).backward()
            o.step()

    for i in range(3):
        step(i)
    for o in (o1, o2):  # an in-place write: bias correction changes a lot at small counts
        o.state[o.param_groups[0]["params"][0]]["step"].fill_(0.0)
    step(3)
    saved = copy.deepcopy(o1.state_dict())  # counts 1 and 4
    for i in range(4, 7):
        step(i)
    for o in (o1, o2):  # back to the saved state: new step tensors, different counts
        o.load_state_dict(copy.deepcopy(saved))
    step(7)
    assert [float(o2.state[p]["step"]) for p in (a2, b2)] == [2.0, 5.0]
    torch.testing.assert_close(a1, a2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b1, b2, atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)
    assert kerneltune.served()["adamw"]["numba_cpu"] == 13  # split by count from the fill_ on


def test_eager_step_and_the_custom_op_take_the_kernel_and_agree(user_registry, monkeypatch):
    """Eager ``adamw_step`` calls the kernel directly (the custom op's dispatch costs more host time than
    the fused step); ``torch.ops.kerneltune.adamw_`` (what a graph records) runs the same body. Both update
    the same way, bump the version counters of what they change, and count as the kernel's calls."""
    from kerneltune.optim import adamw_step

    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    g = torch.Generator().manual_seed(11)
    shapes = [(3, 5), (7,), (1,)]
    base = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    base[3] = [t.abs() for t in base[3]]
    kw = dict(step=4, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    eager = [[t.clone() for t in ts] for ts in base]
    op = [[t.clone() for t in ts] for ts in base]
    versions = [t._version for t in eager[0] + eager[2] + eager[3]]
    assert adamw_step(*eager, **kw)
    torch.ops.kerneltune.adamw_(*op, *kw.values())
    assert all(t._version > v for t, v in zip(eager[0] + eager[2] + eager[3], versions))
    ref = [[t.clone() for t in ts] for ts in base]
    o = torch.optim.AdamW([torch.nn.Parameter(p) for p in ref[0]], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for p, gr, m, v in zip(o.param_groups[0]["params"], ref[1], ref[2], ref[3]):
        p.grad = gr
        o.state[p] = {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": v}
    o.step()
    for a, b, c in zip(eager[0] + eager[2] + eager[3], op[0] + op[2] + op[3], ref[0] + ref[2] + ref[3]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
    assert kerneltune.served()["adamw"]["numba_cpu"] == 2


def test_a_kernel_that_writes_then_raises_on_its_first_call_is_undone_and_torch_steps(user_registry, monkeypatch):
    """A kernel's first call at some shapes is where it compiles, and may fail after updating some tensors (a
    per-tensor loop that compiles its parallel path at the first large tensor): without $KERNELTUNE_VERIFY
    the tensors are still put back before torch's step takes them, so nothing is updated twice."""
    from kerneltune.library import serve

    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    monkeypatch.delenv("KERNELTUNE_VERIFY", raising=False)

    def half_then_raise(params, grads, exp_avgs, exp_avg_sqs, **kw):
        params[0].sub_(1.0)
        exp_avgs[0].add_(1.0)
        raise RuntimeError("could not compile the parallel loop")

    monkeypatch.setattr(serve, "_kernel", lambda e: half_then_raise)
    torch.manual_seed(5)
    a1, b1 = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(6))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a1, b1))
    o1, o2 = torch.optim.AdamW([a1, b1], lr=0.1), AdamW([a2, b2], lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for a, b, o in ((a1, b1, o1), (a2, b2, o2)):
                o.zero_grad()
                ((a ** 2).sum() + b.sin().sum()).backward()
                o.step()
    assert any("could not compile" in w for w in kt_warnings(caught))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert_same_state(o1, o2)
    assert kerneltune.served()["adamw"] == {"reference": 3}


def test_a_kernel_that_raises_after_serving_steps_is_dropped_and_torch_takes_every_later_step(user_registry,
                                                                                             monkeypatch):
    """A group that went whole to the kernel is remembered with the kernel chosen for it; a kernel that then
    raises (its fourth call: the second step's second group) is marked bad, and the remembered choice goes with
    it: that group's step and every later step are torch's, and the result is torch's AdamW's all along."""
    from kerneltune.library import serve

    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    real = serve._kernel
    calls = []

    def kernel(e):
        run = real(e)

        def counted(*args, **kw):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("lost the device")
            return run(*args, **kw)
        return counted

    monkeypatch.setattr(serve, "_kernel", kernel)
    m1 = small_model(3)
    m2 = copy.deepcopy(m1)
    o1, o2 = torch.optim.AdamW(groups(m1), lr=1e-2), AdamW(groups(m2), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(m1, o1, 6)
        train(m2, o2, 6)
    assert any("lost the device" in w for w in kt_warnings(caught))
    assert len(calls) == 4  # none after the raise
    assert kerneltune.served()["adamw"] == {"numba_cpu": 3, "reference": 5}  # torch's: steps 2 (a group) to 6
    assert_same(m1, m2, atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)


def test_a_kernel_that_served_other_shapes_and_raises_on_new_ones_is_undone(user_registry, monkeypatch):
    """The copy to put back is kept on a kernel's first call at each set of shapes, not only its first call:
    a kernel that served one model and writes then raises on another's shapes changes nothing there."""
    from kerneltune.library import serve

    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    monkeypatch.delenv("KERNELTUNE_VERIFY", raising=False)
    real = serve._kernel

    def kernel(e):
        run = real(e)

        def fails_on_six(params, grads, exp_avgs, exp_avg_sqs, **kw):
            if params[0].shape == (6,):
                params[0].sub_(1.0)
                raise RuntimeError("no code for these shapes")
            return run(params, grads, exp_avgs, exp_avg_sqs, **kw)
        return fails_on_six

    monkeypatch.setattr(serve, "_kernel", kernel)
    p = torch.nn.Parameter(torch.randn(4))
    o = AdamW([p], lr=0.1)
    for _ in range(3):  # served: remembered, and its shapes marked as run
        o.zero_grad()
        (p ** 2).sum().backward()
        o.step()
    a1 = torch.nn.Parameter(torch.randn(6))
    a2 = torch.nn.Parameter(a1.detach().clone())
    o1, o2 = torch.optim.AdamW([a1], lr=0.1), AdamW([a2], lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for a, opt in ((a1, o1), (a2, o2)):
            opt.zero_grad()
            a.sin().sum().backward()
            opt.step()
    assert any("no code for these shapes" in w for w in kt_warnings(caught))
    assert torch.equal(a1, a2)
    assert_same_state(o1, o2)


def test_without_kerneltune_verify_no_call_is_checked_not_even_the_first(user_registry, monkeypatch):
    """The first call at given shapes keeps a copy to put back, but checking it against the fp64 reference
    (seconds on a CPU at GPT-2 small's size) is what $KERNELTUNE_VERIFY asks for, and only then."""
    import kerneltune.optim as ko

    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    monkeypatch.delenv("KERNELTUNE_VERIFY", raising=False)
    checked = []
    monkeypatch.setattr(ko, "_verify", lambda *a, **k: checked.append(1) or "")
    p = torch.nn.Parameter(torch.randn(9))
    o = AdamW([p], lr=0.1)
    for _ in range(2):
        o.zero_grad()
        (p ** 2).sum().backward()
        o.step()
    assert checked == [] and kerneltune.served()["adamw"] == {"numba_cpu": 2}
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    kerneltune.reset_served()
    ko.serve.reload()
    o.zero_grad()
    (p ** 2).sum().backward()
    o.step()
    assert checked == [1]


def test_a_param_whose_grad_comes_and_goes_costs_no_read_of_the_step_counts(user_registry, monkeypatch,
                                                                           device_counts):
    """The counts this optimizer wrote are known without a device read, also when the params with grads
    change from step to step (one of them used every other step), and they are the right ones."""
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    torch.manual_seed(5)
    ps1 = [torch.nn.Parameter(torch.randn(n)) for n in (4, 3, 5, 2)]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    o1, o2 = torch.optim.AdamW(ps1, lr=0.05), AdamW(ps2, lr=0.05)
    reads: list[int] = []
    real = AdamW._read_counts
    monkeypatch.setattr(AdamW, "_read_counts", staticmethod(lambda steps: reads.append(len(steps)) or real(steps)))
    for step in range(9):
        for ps, o in ((ps1, o1), (ps2, o2)):
            o.zero_grad(set_to_none=True)
            used = [p for i, p in enumerate(ps) if i != 1 or step % 2 == 0]  # ps[1]: even steps only
            sum(((p * (step + 1)).sin()).sum() for p in used).backward()
            o.step()
    assert reads == [4]  # the first step's fresh counts, once
    assert [float(o2.state[p]["step"]) for p in ps2] == [9.0, 5.0, 9.0, 9.0]
    for a, b in zip(ps1, ps2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)


def test_a_step_under_inference_mode_takes_torchs_step_and_agrees(user_registry, monkeypatch):
    """Inference tensors keep no version counter, which the remembered step counts need: torch's step
    takes such a call, with the result torch's AdamW gives."""
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    torch.manual_seed(7)
    ps1 = [torch.nn.Parameter(torch.randn(n)) for n in (4, 6)]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    o1, o2 = torch.optim.AdamW(ps1, lr=0.05), AdamW(ps2, lr=0.05)
    for step in range(4):
        for ps, o in ((ps1, o1), (ps2, o2)):
            o.zero_grad()
            sum((p * (step + 1)).sin().sum() for p in ps).backward()
            if step % 2:
                with torch.inference_mode():
                    o.step()
            else:
                o.step()
    served = kerneltune.served()["adamw"]
    assert served == {"numba_cpu": 2, "reference": 2}
    for a, b in zip(ps1, ps2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("guard", [True, False], ids=["torch-check", "no-torch-check"])
def test_a_group_checked_in_one_call_is_checked_per_tensor_again_when_a_tensor_changes(user_registry, monkeypatch,
                                                                                        guard):
    """A group sent whole to the kernel is remembered with a C++ check of its tensors' metadata: later steps
    pass it in one call; a step where a gradient, a moment or a param differs from what passed (strides, no
    gradient) takes the tests per tensor again, and every step agrees with torch's AdamW."""
    import kerneltune.optim as ko
    if not guard:
        monkeypatch.setattr(ko, "_TensorGuards", None)
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    torch.manual_seed(11)
    shapes = [(6, 5), (7,), (3, 4), (2,)]
    ps1 = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    o1, o2 = torch.optim.AdamW(ps1, lr=0.05), AdamW(ps2, lr=0.05)
    per_tensor = []
    real = AdamW._bucketed
    monkeypatch.setattr(AdamW, "_bucketed", staticmethod(lambda ps, left: per_tensor.append(1) or real(ps, left)))

    def strided_grad(ps, o):  # the same values, transposed strides
        ps[0].grad = ps[0].grad.t().contiguous().t()

    def moment(ps, o, strided):
        m = o.state[ps[2]]["exp_avg"]
        o.state[ps[2]]["exp_avg"] = m.t().contiguous().t() if strided else m.contiguous()

    def no_grad(ps, o):
        ps[1].grad = None

    def strided_param(ps, o):  # the same values in every other element of a buffer
        p = ps[3]
        p.data = torch.empty(2 * p.numel())[::2].copy_(p.data)

    changes = {2: strided_grad, 4: lambda ps, o: moment(ps, o, True), 5: lambda ps, o: moment(ps, o, False),
               6: no_grad, 8: strided_param}
    tuned = []
    for step in range(9):
        for ps, o in ((ps1, o1), (ps2, o2)):
            o.zero_grad()
            sum(((p * (step + 1)).sin()).sum() for p in ps).backward()
            if step in changes:
                changes[step](ps, o)
            kerneltune.reset_served()
            o.step()
        tuned.append(kerneltune.served()["adamw"].get("numba_cpu", 0))
        for a, b in zip(ps1, ps2):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)
    # per tensor: the first step, and the steps whose tensors differ from the remembered group (2, 4, 6, 8);
    # step 5 puts the moment back as it was, and step 7 has every gradient again: both pass in one call
    assert len(per_tensor) == (5 if guard else 9)
    # a strided moment sends its param to torch (step 4), the others take the kernel; ps[1], a step behind from
    # step 6 on, is a call of its own (steps 7 and 8)
    assert tuned == [1, 1, 1, 1, 1, 1, 1, 2, 2]


def test_every_write_to_the_state_and_every_change_of_a_groups_params_is_followed(user_registry):
    """Between the steps of a group the kernel takes whole (remembered, checked in one call): every write that
    can change which dict is a param's (assignment, del, pop, update, |=, setdefault, clear, a dict emptied, a
    load, a plain dict put in) and every change of the group's params (one replaced in its list, two of one
    shape swapped: the same metadata) is followed, and every step agrees with torch's AdamW, state included."""
    from collections import defaultdict

    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    torch.manual_seed(12)
    shapes = [(6, 5), (7,), (3, 4), (7,), (5,)]
    ps1 = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    o1, o2 = torch.optim.AdamW(ps1, lr=0.05), AdamW(ps2, lr=0.05)

    def fresh(o, p):  # a new dict of new tensors with the old values: the old tensors must not be the ones updated
        return {k: v.clone() for k, v in o.state[p].items()}

    def replace_param(ps, o):  # a new param (no state yet) in the old one's place, in the same list
        ps[1] = torch.nn.Parameter(ps[1].detach().clone())
        o.param_groups[0]["params"][1] = ps[1]

    def swap_same_shape(ps, o):  # two params of one shape swap places in the group's list
        gp = o.param_groups[0]["params"]
        gp[1], gp[3] = gp[3], gp[1]

    changes = {
        2: lambda ps, o: o.state.__setitem__(ps[0], fresh(o, ps[0])),
        3: lambda ps, o: o.state.__delitem__(ps[1]),
        4: lambda ps, o: o.state.update({ps[2]: fresh(o, ps[2])}),
        5: lambda ps, o: o.state[ps[0]].clear(),
        6: lambda ps, o: o.state.pop(ps[3]),
        7: lambda ps, o: o.state.__ior__({ps[4]: fresh(o, ps[4])}),
        8: lambda ps, o: o.state.setdefault(ps[2], {k: v.clone() for k, v in o.state.pop(ps[2]).items()}),
        9: lambda ps, o: o.load_state_dict(copy.deepcopy(o.state_dict())),
        11: replace_param,
        12: swap_same_shape,
        14: lambda ps, o: o.state.clear(),
        16: lambda ps, o: setattr(o, "state", defaultdict(dict, {p: fresh(o, p) for p in o.state})),
    }
    for step in range(18):
        for ps, o in ((ps1, o1), (ps2, o2)):
            if step in changes:
                changes[step](ps, o)
            o.zero_grad()
            sum(((p * (step + 1)).sin()).sum() for p in ps).backward()
            o.step()
        for a, b in zip(ps1, ps2):  # (the kernel's moments are fp64 inside: a few ulp apart after 18 steps)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
            for key in ("step", "exp_avg", "exp_avg_sq"):  # per param: a replaced param leaves its state behind
                torch.testing.assert_close(o1.state[a][key], o2.state[b][key], atol=1e-5, rtol=1e-5)
    assert list(kerneltune.served()["adamw"]) == ["numba_cpu"]  # every update by the kernel, none by torch's step


def test_state_deleted_or_replaced_is_freed_at_once(user_registry):
    """A param's state deleted (a frozen layer's, to free its memory) is freed at once, not kept by what the
    optimizer remembers of its groups until some later step; the same for the whole state replaced."""
    import gc
    import weakref
    from collections import defaultdict

    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 5), (7,), (3, 4)]]
    o = AdamW(ps, lr=0.05)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        o.step()
    assert kerneltune.served()["adamw"]["numba_cpu"] == 3
    held = weakref.ref(o.state[ps[0]]["exp_avg"])
    ps[0].grad = None
    del o.state[ps[0]]
    gc.collect()
    assert held() is None
    for _ in range(2):  # the group whole again
        for p in ps:
            p.grad = torch.randn_like(p)
        o.step()
    assert list(kerneltune.served()["adamw"]) == ["numba_cpu"]  # (ps[0], a count behind, a call of its own)
    held = [weakref.ref(o.state[p]["exp_avg_sq"]) for p in ps]
    o.state = defaultdict(dict)
    gc.collect()
    assert [h() for h in held] == [None, None, None]


def test_a_compiled_step_agrees_and_traces_no_metadata_check(user_registry, monkeypatch):
    """torch.compile(opt.step): the step still agrees with torch's AdamW, and the C++ metadata check of the
    eager path is never handed to the tracer (no warning about it)."""
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    torch._dynamo.reset()
    torch.manual_seed(3)
    ps1 = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 5), (7,), (3, 4)]]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    o1, o2 = torch.optim.AdamW(ps1, lr=0.05), AdamW(ps2, lr=0.05)
    step2 = torch.compile(o2.step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(3):
            for ps, o, st in ((ps1, o1, o1.step), (ps2, o2, step2)):
                o.zero_grad()
                sum((p * (s + 1)).sin().sum() for p in ps).backward()
                st()
    torch._dynamo.reset()
    assert not [w for w in caught if "TensorGuards" in str(w.message)]
    for a, b in zip(ps1, ps2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert kerneltune.served()["adamw"]["numba_cpu"] == 3


def _unchecked_kernel(user_registry, **flags: bool):
    """tests/library/kernels/adamw/torch_unchecked.py served for every adamw call, its module flags (WRONG,
    HALF_THEN_RAISE, LENIENT) set; returns its CALLS list."""
    import os

    import kerneltune.optim as ko
    from tests.library.conftest import TEST_KERNELS

    user_registry([(os.path.join(TEST_KERNELS, "adamw", "torch_unchecked.py"),
                    dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0, backend="torch"))])
    run = ko._choose([torch.zeros(4)]).run
    assert run is not None and run.__name__ == "run"
    run.__globals__.update(flags)
    return run.__globals__["CALLS"]


def test_a_step_that_passes_the_groups_record_takes_the_kernels_run_unchecked(user_registry):
    """The first step checks the group per tensor and calls the kernel's run; once the group's record is made
    (every tensor checked against the contract), later steps that pass its metadata check take run_unchecked;
    a step whose tensors differ (a strided gradient) takes run again. Every step agrees with torch's AdamW."""
    calls = _unchecked_kernel(user_registry)
    torch.manual_seed(3)
    shapes = [(6, 5), (7,), (1,)]
    ps1 = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    o1, o2 = torch.optim.AdamW(ps1, lr=0.05, weight_decay=0.1), AdamW(ps2, lr=0.05, weight_decay=0.1)
    for step in range(5):
        for ps, o in ((ps1, o1), (ps2, o2)):
            o.zero_grad()
            sum(((p * (step + 1)).sin()).sum() for p in ps).backward()
            if step == 3:
                ps[0].grad = ps[0].grad.t().contiguous().t()  # strided: not the record's metadata
            o.step()
    assert_same(torch.nn.ParameterList(ps1), torch.nn.ParameterList(ps2), atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)
    # step 3: the strided gradient's param goes to torch's step, the others to run (tested per tensor, as a
    # part of the group: no record); step 4 passes the record made at step 0 again
    assert calls == ["run", "run_unchecked", "run_unchecked", "run", "run_unchecked"]


def test_a_group_is_remembered_for_run_unchecked_only_when_every_list_meets_the_contract():
    """_meets_contract, checked when a group's record is made (what run_unchecked then takes on trust): every
    tensor of the four lists fp32, contiguous, on the bucket's device, tensor i of every list of one shape."""
    import kerneltune.optim as ko

    cpu = torch.device("cpu")
    ps = [torch.randn(4, 3), torch.randn(5)]

    def lists():
        return [t.clone() for t in ps], [torch.randn_like(t) for t in ps], (
            [torch.zeros_like(t) for t in ps], [torch.zeros_like(t) for t in ps], [torch.tensor(1.0)] * 2)

    p, g, st = lists()
    assert ko._meets_contract(cpu, p, g, st)
    assert not ko._meets_contract(torch.device("meta"), p, g, st)
    breaks = {"fp64 moment": lambda p, g, st: st[0].__setitem__(1, st[0][1].double()),
              "fp16 grad": lambda p, g, st: g.__setitem__(0, g[0].half()),
              "strided second moment": lambda p, g, st: st[1].__setitem__(0, torch.zeros(3, 4).t()),
              "moment of another shape": lambda p, g, st: st[0].__setitem__(0, torch.zeros(12)),
              "grad of another shape": lambda p, g, st: g.__setitem__(1, torch.zeros(5, 1)),
              "fp64 param": lambda p, g, st: p.__setitem__(0, p[0].double())}
    for name, brk in breaks.items():
        p, g, st = lists()
        brk(p, g, st)
        assert not ko._meets_contract(cpu, p, g, st), name


def test_run_unchecked_is_verified_on_its_own_first_use(user_registry, monkeypatch):
    """KERNELTUNE_VERIFY checks run and run_unchecked each on its first use: a run_unchecked that leaves out the
    weight decay is caught there, the kernel dropped, what it changed put back, and torch's step agrees."""
    monkeypatch.setenv("KERNELTUNE_VERIFY", "1")
    calls = _unchecked_kernel(user_registry, WRONG=True)
    torch.manual_seed(4)
    p1 = torch.nn.Parameter(torch.randn(9))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = torch.optim.AdamW([p1], lr=0.05, weight_decay=0.5), AdamW([p2], lr=0.05, weight_decay=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            for p, o in ((p1, o1), (p2, o2)):
                p.grad = torch.sin(p.detach() * (step + 1))
                o.step()
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)
    assert calls == ["run", "run_unchecked"]  # dropped after its first, wrong, use
    assert any("torch_unchecked" in w for w in kt_warnings(caught))


def test_a_run_unchecked_that_fails_half_way_on_its_first_call_is_undone_without_kerneltune_verify(user_registry):
    """run served the first step; run_unchecked's first call (step 2) updates one tensor and raises: the copy
    taken before each entry point's first call puts it back, the kernel is dropped, and torch's step agrees."""
    calls = _unchecked_kernel(user_registry, HALF_THEN_RAISE=True)
    torch.manual_seed(5)
    ps1 = [torch.nn.Parameter(torch.randn(s)) for s in ((4, 3), (6,))]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    o1, o2 = torch.optim.AdamW(ps1, lr=0.1), AdamW(ps2, lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            for ps, o in ((ps1, o1), (ps2, o2)):
                for p in ps:
                    p.grad = torch.cos(p.detach() * (step + 2))
                o.step()
    for a, b in zip(ps1, ps2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)
    assert calls == ["run", "run_unchecked"]
    assert any("fails half-way" in w for w in kt_warnings(caught))


def test_a_group_that_breaks_the_contract_is_never_given_to_run_unchecked(user_registry):
    """A moment that breaks the contract (fp64, a state_dict from elsewhere) is never handed to a kernel, not even
    to one whose run would take it (LENIENT): its param goes to torch's step, which raises as torch.optim.AdamW
    does; the group's record is never made for such lists (_meets_contract), so run_unchecked never serves."""
    calls = _unchecked_kernel(user_registry, LENIENT=True)
    p, q = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    o, t = AdamW([p], lr=0.1), torch.optim.AdamW([q], lr=0.1)
    for step in range(4):
        p.grad, q.grad = torch.randn(5), torch.randn(5)
        if step == 0:
            o.step()
            t.step()
            o.state[p]["exp_avg"] = o.state[p]["exp_avg"].double()
            t.state[q]["exp_avg"] = t.state[q]["exp_avg"].double()
            continue
        with pytest.raises(RuntimeError) as ours:
            o.step()
        with pytest.raises(RuntimeError) as torchs:
            t.step()
        assert str(ours.value) == str(torchs.value)
    assert calls == ["run"]


def test_the_kernel_is_launched_under_the_device_guard_of_its_tensors(user_registry, monkeypatch):
    """run and run_unchecked run inside serve.device_guard(the params' device), which makes their GPU the current
    one where it is not (tests/library/test_serve.py tests the guard itself); here a recording guard on CPU, every
    step still torch's AdamW's."""
    import contextlib

    from kerneltune.library import serve

    calls = _unchecked_kernel(user_registry)

    @contextlib.contextmanager
    def guard(device):
        calls.append(f"enter {device}")
        yield
        calls.append("exit")

    monkeypatch.setattr(serve, "device_guard", guard)
    torch.manual_seed(5)
    p1 = torch.nn.Parameter(torch.randn(6))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = torch.optim.AdamW([p1], lr=0.05, weight_decay=0.1), AdamW([p2], lr=0.05, weight_decay=0.1)
    for step in range(2):
        for p, o in ((p1, o1), (p2, o2)):
            p.grad = torch.cos(p.detach() * (step + 1))
            o.step()
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)
    assert calls == ["enter cpu", "run", "exit", "enter cpu", "run_unchecked", "exit"]


def test_host_counts_written_where_no_version_counter_sees_are_read(user_registry):
    """Counts in host memory are read every step: a write that bypasses the version counter (another process's,
    through shared memory, as an A3C-style shared optimizer state has it; here a numpy view) still decides the
    bias correction, as in torch."""
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    torch.manual_seed(7)
    a1 = torch.nn.Parameter(torch.randn(4))
    a2 = torch.nn.Parameter(a1.detach().clone())
    o1, o2 = torch.optim.AdamW([a1], lr=0.05), AdamW([a2], lr=0.05)
    for i in range(3):
        for a, o in ((a1, o1), (a2, o2)):
            o.zero_grad()
            (a.sin() * (i + 1)).sum().backward()
            o.step()
            if i == 1:
                o.state[a]["step"].numpy()[...] = 40.0  # no version bump: what a write from another process is
    assert [float(o.state[a]["step"]) for a, o in ((a1, o1), (a2, o2))] == [41.0, 41.0]
    torch.testing.assert_close(a1, a2, atol=1e-6, rtol=1e-5)
    assert_same_state(o1, o2, atol=1e-6, rtol=1e-5)
    assert kerneltune.served()["adamw"]["numba_cpu"] == 3


def test_moments_that_no_longer_fit_their_param_never_reach_the_kernel(user_registry):
    """A param resized (or cast) after its state was made: torch's step takes it and raises as torch does; the
    kernel is never handed moments of another size (a numba kernel wrote past their end)."""
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    ps = [torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(5))]
    o = AdamW(ps, lr=0.05)
    for _ in range(2):
        o.zero_grad()
        sum(p.sin().sum() for p in ps).backward()
        o.step()
    before = o.state[ps[1]]["exp_avg"].clone()
    ps[0].data = torch.randn(3)
    o.zero_grad()
    sum(p.sin().sum() for p in ps).backward()
    with pytest.raises(RuntimeError):  # torch's own error for the resized param
        o.step()
    assert o.state[ps[0]]["exp_avg"].shape == (7,)
    assert not torch.equal(before, o.state[ps[1]]["exp_avg"])  # the fitting param took the kernel
    assert kerneltune.served()["adamw"]["numba_cpu"] == 3


def test_a_param_listed_twice_is_stepped_as_torch_steps_it(user_registry):
    """torch steps a param listed twice twice (with a warning), its count advancing twice: so does this one."""
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    torch.manual_seed(2)
    a1 = torch.nn.Parameter(torch.randn(4))
    a2 = torch.nn.Parameter(a1.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o1, o2 = torch.optim.AdamW([a1, a1], lr=0.05), AdamW([a2, a2], lr=0.05)
        for i in range(3):
            for a, o in ((a1, o1), (a2, o2)):
                o.zero_grad()
                (a.sin() * (i + 1)).sum().backward()
                o.step()
    assert float(o2.state[a2]["step"]) == float(o1.state[a1]["step"]) == 6.0
    torch.testing.assert_close(a1, a2, atol=1e-6, rtol=1e-5)


def test_a_sparse_gradient_raises_before_any_group_after_it_is_stepped(user_registry):
    """torch raises on a sparse gradient before it updates that group or a later one: a tuned group after it
    must not have been stepped either."""
    user_registry([("adamw/numba_cpu.py", dict(op="adamw", dims={"shapes": [[4]]}, speedup=2.0))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 3)
    o = AdamW([{"params": list(emb.parameters())}, {"params": list(lin.parameters())}], lr=0.05)
    before = [p.detach().clone() for p in lin.parameters()]
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        o.step()
    assert all(torch.equal(b, p) for b, p in zip(before, lin.parameters())) and len(o.state) == 0
