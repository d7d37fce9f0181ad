"""adamw: one multi-tensor AdamW step, in place, exactly as ``torch.optim.AdamW`` at 1-based ``step``.

Contract (DESIGN.md): ``run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
weight_decay) -> None``; lists of equal length, tensor i of each list has one shape, fp32 params and
state. Per element (decoupled weight decay, bias correction):

    p  <- p · (1 - lr·wd)
    m  <- β1·m + (1-β1)·g
    v  <- β2·v + (1-β2)·g²
    p  <- p - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)

grads are read-only. Work per element: ~16 FLOPs (counted as 16); bytes: read p, g, m, v and write
p, m, v = 7 × 4 = 28 bytes per parameter (the floor for fp32 state).

Optional entry point: ``run_unchecked(...)``, the same arguments and result as ``run``, for a caller that has
checked run's preconditions itself (lists of equal length, every tensor fp32, contiguous and on one device,
tensor i of every list of one shape): it may skip its own checks of them, the host time of a step over many
tensors. kerneltune.optim calls it only on a step whose tensors have the metadata of tensors it checked (its
group's record); the evaluator checks it on the cases marked ``unchecked``, as ``run`` on the others, and
once more on each timed case after timing (``companions``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch

from kerneltune.ops.base import (
    Case,
    Inputs,
    OpSpec,
    Tolerance,
    companion,
    compare_tensor,
    prod,
    reference_device,
    rel_seed,
)

# A GPT-2-shaped parameter list, scaled by (layers, width, vocab, block): wte, wpe, per layer
# ln_1 (w, b), attn c_attn (w, b), c_proj (w, b), ln_2 (w, b), mlp c_fc (w, b), c_proj (w, b); ln_f (w, b).


def gpt_param_shapes(n_layer: int, n_embd: int, vocab: int, block: int) -> list[list[int]]:
    e = n_embd
    shapes: list[list[int]] = [[vocab, e], [block, e]]
    for _ in range(n_layer):
        shapes += [[e], [e], [3 * e, e], [3 * e], [e, e], [e], [e], [e], [4 * e, e], [4 * e], [e, 4 * e], [e]]
    shapes += [[e], [e]]
    return shapes


PRESETS: dict[str, tuple[int, int, int, int]] = {
    "gpt2-124m": (12, 768, 50304, 1024),   # 124M parameters, 148 tensors
    "gpt-mini": (6, 384, 8192, 256),       # 13.9M parameters, 76 tensors
    "gpt-tiny": (2, 128, 256, 64),         # 0.4M parameters, 28 tensors
}

# params: relative to the change of p (see compare): an update computed in fp16 (≈5e-4) or bf16 (≈4e-3) fails.
_TOL = Tolerance(atol=0.0, rtol=2e-3, norm_rtol=1e-4)
# state: fp32 rounding of b·m + (1-b)·g, where the two terms can cancel: an absolute floor of 1e-6 · max|m|.
_STATE_TOL = Tolerance(atol=1e-6, rtol=1e-5, norm_rtol=1e-5)


_LARGE = 1 << 24  # parameters from which the reference runs on the parent's GPU, where it has one


class ContractError(Exception):
    """A candidate broke the op contract: verdict ``rejected``."""


# Check cases whose values, not their shapes, are the test (``Case.args["values"]``; the case name says which).
# Plain draws never reach them (moments random and positive, gradients never exactly 0, step 1 only with a state
# a fresh optimizer never has), and each breaks a kind of kernel that passes every plain draw:
#   fresh   the first step of a new optimizer: step 1, exp_avgs = exp_avg_sqs = 0, the gradients of a third of
#           the tensors all 0, of the others a fifth of the elements 0 and a fifth about eps in size. Where g = 0
#           the update is 0 / (0 + eps) = 0: a kernel that computes m / (sqrt(v̂) + eps) as m·r / (1 + eps·r),
#           r = rsqrt(v̂) (the same for v > 0), writes NaN there. Where |g| is about eps, sqrt(v̂) = |g| and the
#           update is lr·g / (|g| + eps): an eps out of its place (inside the sqrt, squared, a max) is off.
#   zero_v  parameters no gradient has reached for a while (an embedding's unused rows), at any step: g = 0 on
#           a share of the elements (all of one tensor) and there v = m = 0, or 0 < v < eps² with |m| <= sqrt(v):
#           the update is 0, or eps's, not sqrt(v̂)'s.
VALUES = ("fresh", "zero_v")
_VALUE_SHAPES = [[40, 33], [1000], [], [7], [3, 5], [257]]  # 2600 elements: every case costs each evaluation


def _case(name: str, shapes: list[list[int]], unchecked: bool = False, values: str | None = None) -> Case:
    n = sum(prod(s) for s in shapes)
    name = f"{name} ({n / 1e6:.2f}M params, {len(shapes)} tensors)"
    args: dict[str, Any] = {}
    if values is not None:
        assert values in VALUES, values
        name += " " + values.replace("_", "-")
        args["values"] = values
    if unchecked:
        name += " unchecked"
        args["unchecked"] = True
    return Case(name=name, dims={"shapes": shapes}, dtype="float32", args=args)


# The hyper-parameters of a draw (make_inputs), each keyed on the seed in its own way and lr and beta1 also on
# the case, so that no two move together: weight decay 0 (seeds 1, 4, ...) meets more than one lr over the check
# cases of one evaluation (seeds 1..3), and weight decay is never 0 at seed 3 (the timed cases' values).
_STEPS = (1, 7, 1000, 2, 123456)
_LRS = (1e-3, 3e-2, 6e-4)
_BETA1S = (0.9, 0.8, 0.95)
_BETA2S = (0.999, 0.95, 0.99)
_EPSS = (1e-8, 1e-6)
_WDS = (0.1, 0.0, 0.01)


def hyper_parameters(case: Case, seed: int) -> dict[str, Any]:
    """The step and hyper-parameters of ``case``'s draw ``seed``."""
    turn = rel_seed("adamw hyper-parameters", case.name) % 9  # the case's offsets of lr (turn % 3) and beta1
    return {
        "step": _STEPS[seed % 5],
        "lr": _LRS[(seed // 2 + turn) % 3],
        "beta1": _BETA1S[(seed + seed // 3 + turn // 3) % 3],
        "beta2": _BETA2S[(seed // 3) % 3],
        "eps": _EPSS[seed % 2],
        "weight_decay": _WDS[seed % 3],
    }


class AdamW(OpSpec):
    name = "adamw"
    signature = ("run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay)"
                 " -> None")
    summary = "one AdamW step over lists of fp32 tensors, in place, as torch.optim.AdamW does"
    forbidden_source = ("torch.optim", "_fused_adam", "_fused_adamw", "from torch import optim")
    forbidden_attrs = (
        ("torch", "_fused_adamw_"), ("torch", "_fused_adam_"),
        ("torch._C._VariableFunctions", "_fused_adamw_"), ("torch._C._VariableFunctions", "_fused_adam_"),
        ("torch.optim", "AdamW"), ("torch.optim", "Adam"),
        ("torch.optim.adamw", "adamw"), ("torch.optim.adam", "adam"), ("torch.optim.adamw", "AdamW"),
        ("torch.optim.adam", "Adam"), ("torch.optim.adam", "_multi_tensor_adam"),
        ("torch.optim.adam", "_single_tensor_adam"), ("torch.optim.adam", "_fused_adam"),
    )
    forbidden_aten = ("_fused_adamw_", "_fused_adam_", "_fused_adamw", "_fused_adam")
    outputs = ("params", "exp_avgs", "exp_avg_sqs")
    in_place = outputs  # the timed calls start from the timing state, put back every VOUCH_BLOCK calls
    unchanged = ("grads",)
    primary_baseline = "adamw_fused"
    companions = {"run_unchecked": ("unchecked", "kerneltune.optim's steps whose tensors it checked itself")}

    # -- cases -----------------------------------------------------------------------------------------
    def smoke_case(self) -> Case:
        return _case("smoke", [[4, 3], [5]])

    def check_cases(self, device: str) -> list[Case]:
        awkward = [[], [1], [7], [129, 33], [1000], [3, 5, 7], [2, 1, 1, 3]]
        return [
            _case("awkward", awkward),
            _case("one tensor", [[4099]]),
            _case("gpt-tiny", gpt_param_shapes(*PRESETS["gpt-tiny"])),
            _case("many small", [[i % 13 + 1] for i in range(200)]),
            # run_unchecked, where a candidate has it (else run): the lists run's checks would pass (and the
            # timed case, once after timing: OpSpec.companions)
            _case("awkward", awkward, unchecked=True),
            _case("gpt-tiny", gpt_param_shapes(*PRESETS["gpt-tiny"]), unchecked=True),
            _case("many small", [[i % 13 + 1] for i in range(200)], unchecked=True),
            # values plain draws never reach (VALUES)
            _case("odd sizes", _VALUE_SHAPES, values="fresh"),
            _case("odd sizes", _VALUE_SHAPES, values="zero_v"),
            # no tensor at all; tensors without elements, among others and alone (the first tensor has elements:
            # the same empty first gradient in every draw would look like a repeated call to a candidate keyed on
            # it, tests/adversarial/adamw/skip_timed_calls.py, and the check, not the guard there, would catch it)
            _case("empty", []),
            _case("zero-size", [[5], [0], [3, 0], [2, 0, 4]]),
            _case("zero-size only", [[0], [4, 0]]),
        ]

    def timed_cases(self, device: str) -> list[Case]:
        if device == "cuda":
            return [_case("gpt2-124m", gpt_param_shapes(*PRESETS["gpt2-124m"]))]
        return [_case("gpt-mini", gpt_param_shapes(*PRESETS["gpt-mini"]))]

    def parse_case(self, text: str, dtype: str) -> Case:
        """A preset name (gpt2-124m, gpt-mini, gpt-tiny) or a ';'-separated list of shapes, e.g. '1024x768;768'."""
        text = text.strip()
        if dtype not in ("float32", "fp32", "f32"):
            raise ValueError(f"adamw takes fp32 params and state only, not {dtype!r}: drop --dtype or use float32")
        if text in PRESETS:
            return _case(text, gpt_param_shapes(*PRESETS[text]))
        shapes: list[list[int]] = []
        for part in text.split(";"):
            dims = [p for p in re.split(r"[x, ]+", part.strip()) if p]
            if not all(d.isdigit() for d in dims):
                raise ValueError(f"adamw shapes {text!r}: write a preset ({', '.join(PRESETS)}) or shapes like "
                                 "'1024x768;768' (';' between tensors, 'x' between dims)")
            shapes.append([int(d) for d in dims])
        return _case("custom", shapes)

    # -- data --------------------------------------------------------------------------------------------
    def make_inputs(self, case: Case, seed: int) -> Inputs:
        g = torch.Generator().manual_seed(rel_seed("adamw", case.name, seed))
        shapes = case.dims["shapes"]
        params = [torch.randn(s, generator=g) for s in shapes]
        grads = [torch.randn(s, generator=g) * 0.1 for s in shapes]
        exp_avgs = [torch.randn(s, generator=g) * 0.05 for s in shapes]
        exp_avg_sqs = [torch.rand(s, generator=g) * 0.01 for s in shapes]  # v >= 0
        # hyper-parameters vary per seed, so ignoring one of them (or mishandling step) shows
        args = hyper_parameters(case, seed)
        values = case.args.get("values")
        if values == "fresh":
            args["step"] = 1
            exp_avgs = [torch.zeros(s) for s in shapes]
            exp_avg_sqs = [torch.zeros(s) for s in shapes]
            # (never the first tensor, whose values differ from draw to draw: a candidate keyed on the first
            # gradient, tests/adversarial/adamw/skip_timed_calls.py, must meet the guard that is there for it)
            whole = set((1 + torch.randperm(len(shapes) - 1, generator=g)[: max(1, len(shapes) // 3)]).tolist())
            for i, x in enumerate(grads):
                u = torch.rand(x.shape, generator=g)
                sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
                tiny = sign * args["eps"] * 10.0 ** (2 * torch.rand(x.shape, generator=g) - 1)  # eps/10 .. 10 eps
                x.copy_(torch.zeros_like(x) if i in whole else
                        torch.where(u < 0.2, 0.0, torch.where(u < 0.4, tiny, x)))
        elif values == "zero_v":
            idle_tensor = 1 + int(torch.randint(len(shapes) - 1, (1,), generator=g))  # not the first (as above)
            for i, (x, m, v) in enumerate(zip(grads, exp_avgs, exp_avg_sqs)):
                u = torch.rand(x.shape, generator=g) * (0.3 if i == idle_tensor else 1.0)
                small_v = args["eps"] ** 2 * 10.0 ** (-4 * torch.rand(x.shape, generator=g))  # eps²/1e4 .. eps²
                small_m = small_v.sqrt() * (2 * torch.rand(x.shape, generator=g) - 1)      # |m| <= sqrt(v)
                idle, zero = u < 0.3, u < 0.15
                x.masked_fill_(idle, 0.0)
                v.copy_(torch.where(zero, 0.0, torch.where(idle, small_v, v)))
                m.copy_(torch.where(zero, 0.0, torch.where(idle, small_m, m)))
        if case.args.get("unchecked"):
            args["unchecked"] = True
        return Inputs(tensors={"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                      args=args)

    def reference(self, inputs: Inputs) -> dict[str, Any]:
        # GPT-2 small's 124M parameters take seconds on CPU cores and milliseconds on the parent's GPU
        dev = reference_device(sum(t.numel() for t in inputs.tensors["params"]) >= _LARGE)
        if dev.type == "cuda":
            try:
                return self._reference_on(inputs, dev)
            except torch.cuda.OutOfMemoryError:  # the GPU is busy with workers: the CPU takes longer, that is all
                torch.cuda.empty_cache()
        return self._reference_on(inputs, torch.device("cpu"))

    @staticmethod
    def _reference_on(inputs: Inputs, dev: torch.device) -> dict[str, Any]:
        a = inputs.args
        b1, b2, lr, wd, eps, t = a["beta1"], a["beta2"], a["lr"], a["weight_decay"], a["eps"], a["step"]
        bc1 = 1.0 - b1 ** t
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        out: dict[str, list[torch.Tensor]] = {"params": [], "exp_avgs": [], "exp_avg_sqs": []}
        for p, g, m, v in zip(*(inputs.tensors[x] for x in ("params", "grads", "exp_avgs", "exp_avg_sqs"))):
            # fp64 copies updated in place (a reference chain's inputs are the call before's outputs: never
            # written); torch.optim.AdamW's order of operations, 1.7x faster than out of place on the CPU
            p, m, v = (x.to(dev, torch.float64, copy=True) for x in (p, m, v))
            g = g.to(dev, torch.float64)
            p.mul_(1.0 - lr * wd)
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-(lr / bc1))
            out["params"].append(p)
            out["exp_avgs"].append(m)
            out["exp_avg_sqs"].append(v)
        return out

    def tolerance(self, dtype: str) -> Tolerance:
        return _TOL

    def compare(self, inputs: Inputs, expected: dict[str, Any], actual: dict[str, Any]) -> str:
        for name in self.outputs:
            got, want, before = actual[name], expected[name], inputs.tensors[name]
            if len(got) != len(want):
                return f"{name}: {len(got)} tensors came back, {len(want)} expected"
            for i, (a, e, b) in enumerate(zip(got, want, before)):
                if a.dtype != torch.float32:
                    return f"{name}[{i}]: dtype {a.dtype}; params and state stay float32"
                if name == "params":
                    # relative to the change of p, so an update computed in low precision cannot hide
                    why = compare_tensor(f"params[{i}]", a, e, _TOL, delta_of=b)
                else:
                    amax = float(e.abs().max()) if e.numel() else 0.0
                    tol = Tolerance(_STATE_TOL.atol * amax, _STATE_TOL.rtol, _STATE_TOL.norm_rtol)
                    why = compare_tensor(f"{name}[{i}]", a, e, tol)
                if why:
                    if bool(torch.equal(a, b)) and not bool(torch.equal(e.to(b.device, a.dtype), b)):
                        why += " (this tensor was not updated at all)"
                    return why
        return ""

    def norm_limits(self, inputs: Inputs, expected: dict[str, Any]) -> dict[str, float]:
        """compare's norm tests: the params' relative to their change (plus one ulp of the stored value), the
        state's relative to its value."""
        eps = torch.finfo(torch.float32).eps
        change = math.sqrt(sum(float(torch.linalg.vector_norm(e.double() - b.to(e.device, torch.float64))) ** 2
                               for e, b in zip(expected["params"], inputs.tensors["params"])))
        size = {name: math.sqrt(sum(float(torch.linalg.vector_norm(e.double())) ** 2 for e in expected[name]))
                for name in self.outputs}
        return {"params": _TOL.norm_rtol * change + eps * size["params"],
                "exp_avgs": _STATE_TOL.norm_rtol * size["exp_avgs"],
                "exp_avg_sqs": _STATE_TOL.norm_rtol * size["exp_avg_sqs"]}

    # -- worker side -------------------------------------------------------------------------------------
    def invoke(self, fn: Callable[..., Any], tensors: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        lists = {k: list(tensors[k]) for k in ("params", "grads", "exp_avgs", "exp_avg_sqs")}
        # the outputs are the tensor objects the caller owns: rebinding list entries does not count
        keep = {k: list(v) for k, v in lists.items()}
        # the candidate's optional entry point, from the module that defines run (the library's on a checked step)
        call = (companion(fn, "run_unchecked") if args.get("unchecked") else None) or fn
        call(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
             step=args["step"], lr=args["lr"], beta1=args["beta1"], beta2=args["beta2"], eps=args["eps"],
             weight_decay=args["weight_decay"])
        return {k: keep[k] for k in self.outputs}

    def baselines(self, device: str = "cpu") -> dict[str, Callable[..., Any]]:
        return {"adamw_fused": _TorchAdamW(fused=True), "adamw_foreach": _TorchAdamW(foreach=True)}

    # -- work --------------------------------------------------------------------------------------------
    def flops(self, case: Case) -> float:
        return 16.0 * sum(prod(s) for s in case.dims["shapes"])

    def bytes_moved(self, case: Case) -> float:
        return 28.0 * sum(prod(s) for s in case.dims["shapes"])


class _TorchAdamW:
    """``torch.optim.AdamW`` driven through its public ``step()``, over the caller's own buffers.

    The optimizer is built once per set of buffers (as in a training loop); each call sets the
    hyper-parameters and the step count, and calls ``step()``: what a user pays per step, and as little
    more as can be. torch's step adds 1 to every parameter's step tensor; the count it must start from
    is set by ONE foreach add over all of them (the value they hold is known on the host: this wrapper
    owns them), not by a write per tensor. A write per tensor would cost a launch each — 148 for GPT-2
    small, more host time than the fused step itself — and a baseline slowed by its harness makes every
    candidate look faster than it is.
    """

    def __init__(self, **impl: bool) -> None:
        self.impl = impl
        self._key: tuple[int, ...] | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._steps: list[torch.Tensor] = []
        self._held = 0.0  # the value every tensor of _steps holds (after the last step(): its step argument)

    def __call__(self, params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
        if not params:  # nothing to update (torch.optim refuses an empty parameter list)
            return
        key = tuple(id(t) for t in (*params, *grads, *exp_avgs, *exp_avg_sqs))
        if key != self._key:
            ps = [torch.nn.Parameter(p, requires_grad=True) for p in params]  # shares p's storage
            opt = torch.optim.AdamW(ps, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                                    **self.impl)
            # fused/capturable kernels read the step count on the parameters' device, as torch keeps it
            on_device = self.impl.get("fused") or self.impl.get("capturable")
            for p, g, m, v in zip(ps, grads, exp_avgs, exp_avg_sqs):
                p.grad = g
                opt.state[p] = {"step": torch.tensor(float(step - 1), dtype=torch.float32,
                                                     device=p.device if on_device else "cpu"),
                                "exp_avg": m, "exp_avg_sq": v}
            self._key, self._opt = key, opt
            self._steps = [opt.state[p]["step"] for p in ps]
            self._held = float(step - 1)
        opt = self._opt
        group = opt.param_groups[0]
        group.update(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        try:
            if self._held != step - 1:  # small integers: exact in fp32
                torch._foreach_add_(self._steps, float(step - 1) - self._held)
            opt.step()
        except BaseException:
            self._key = None  # what the step tensors hold is no longer known: rebuild on the next call
            raise
        self._held = float(step)


SPEC = AdamW()
