"""What every op spec provides: the contract a candidate implements, the reference it is judged by,
the inputs it is judged on, the tolerance, the work it does (FLOPs, bytes) and the baselines it races.

An op spec is trusted code. It runs in the parent (inputs, reference, comparison) and in the worker
processes (how to call ``run`` and the baselines); it never runs candidate code itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "half": "float16", "f16": "float16",
                 "bf16": "bfloat16"}


def dtype_name(name: str) -> str:
    """Normalise a user-written dtype ('bf16', 'float16' …) to its canonical name, or raise ValueError."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of float32, float16, bfloat16 (or fp32, fp16, bf16)")
    return key


@dataclass(frozen=True)
class Case:
    """One problem instance: the dims (JSON-able, op-specific), a dtype and fixed call arguments.

    ``args`` are fixed keyword arguments (e.g. causal). Arguments drawn at random per seed (adamw's
    hyper-parameters, an explicit attention scale) come from the op's ``make_inputs``.
    """

    name: str
    dims: dict[str, Any]
    dtype: str = "float32"
    args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dims": self.dims, "dtype": self.dtype, "args": self.args}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Case":
        return cls(name=d["name"], dims=d["dims"], dtype=d.get("dtype", "float32"), args=d.get("args", {}))

    def __hash__(self) -> int:  # dims may hold lists
        return hash((self.name, self.dtype, repr(sorted(self.dims.items())), repr(sorted(self.args.items()))))


@dataclass
class Inputs:
    """Tensors (CPU, in the case dtype) plus scalar arguments of one call.

    ``tensors`` maps a name to a tensor or a list of tensors, in the order of ``run``'s positional
    parameters; ``args`` are keyword arguments.
    """

    tensors: dict[str, torch.Tensor | list[torch.Tensor]]
    args: dict[str, Any]


@dataclass(frozen=True)
class Tolerance:
    """A result passes when every element satisfies |a - e| <= atol + rtol*|e| and, over the whole
    output, ||a - e|| / ||e|| <= norm_rtol. NaN or inf where the reference is finite never passes."""

    atol: float
    rtol: float
    norm_rtol: float


def flatten(tensors: dict[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{'q': t, 'params': [a, b]} -> {'q': t, 'params.0': a, 'params.1': b} (the wire format's names)."""
    flat: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if isinstance(value, (list, tuple)):
            flat[f"{name}.#"] = torch.tensor(len(value))  # the length, so an empty list survives the trip
            for i, t in enumerate(value):
                flat[f"{name}.{i}"] = t
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Inverse of :func:`flatten`."""
    out: dict[str, Any] = {}
    lengths = {k[:-2]: int(v) for k, v in flat.items() if k.endswith(".#")}
    for name, n in lengths.items():
        out[name] = [flat[f"{name}.{i}"] for i in range(n)]
    for k, v in flat.items():
        if k.endswith(".#"):
            continue
        base, _, idx = k.rpartition(".")
        if base in lengths and idx.isdigit():
            continue
        out[k] = v
    return out


_cpu_only: contextvars.ContextVar[bool] = contextvars.ContextVar("kerneltune_cpu_references", default=False)


@contextlib.contextmanager
def cpu_references() -> Iterator[None]:
    """References computed inside stay on the CPU (a training process checking a kernel must not take
    gigabytes of its own GPU for the check)."""
    token = _cpu_only.set(True)
    try:
        yield
    finally:
        _cpu_only.reset(token)


def reference_device(large: bool) -> torch.device:
    """Where the parent computes an fp64 reference: its GPU for a large problem when it has one
    ($KERNELTUNE_REFERENCE_DEVICE=cpu, or inside cpu_references(), keeps every reference on the CPU)."""
    want = os.environ.get("KERNELTUNE_REFERENCE_DEVICE", "auto")
    if want != "cpu" and not _cpu_only.get() and large and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


_COMPARE_CHUNK = 1 << 22  # elements compared at once: bounded fp64 temporaries for 100M-element outputs


def compare_tensor(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance,
                   delta_of: torch.Tensor | None = None, norm_floor: float = 0.0) -> str:
    """Compare one output with its fp64 reference. Returns '' when it passes, else a one-line reason.

    With ``delta_of`` (the value before an in-place update), the relative parts of the tolerance apply
    to the *change* (expected - delta_of), so an update computed in lower precision cannot hide behind
    a large unchanged value; a few ulps of the stored value are always allowed.
    ``norm_floor``: the norm test is relative to at least this (an output that is exactly 0 in exact
    arithmetic, e.g. a gradient through a constant softmax, is judged against its natural size).
    Runs on ``expected``'s device (the others are moved there), ``_COMPARE_CHUNK`` elements at a time.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)} but expected {tuple(expected.shape)}"
    numel = actual.numel()
    if numel == 0:
        return ""
    dev = expected.device
    a_all, e_all = actual.detach().reshape(-1), expected.detach().reshape(-1)
    d_all = delta_of.detach().reshape(-1) if delta_of is not None else None
    eps = torch.finfo(actual.dtype).eps if actual.dtype.is_floating_point else 0.0
    n_nan = n_over = 0
    first_nan = first_over = -1
    err_sq = ref_sq = 0.0
    for lo in range(0, numel, _COMPARE_CHUNK):
        hi = min(numel, lo + _COMPARE_CHUNK)
        a = a_all[lo:hi].to(dev, torch.float64)
        e = e_all[lo:hi].to(torch.float64)
        bad_nan = (~torch.isfinite(a)) & torch.isfinite(e)
        k = int(bad_nan.sum())
        if k:
            n_nan += k
            if first_nan < 0:
                first_nan = lo + int(bad_nan.nonzero()[0, 0])
        if n_nan:
            continue  # the verdict is the NaN one: only count them
        err = (a - e).abs()
        if d_all is not None:
            change = e - d_all[lo:hi].to(dev, torch.float64)
            ulp = eps * e.abs()
            allowed = 4 * ulp + tol.atol + tol.rtol * change.abs()
            norm_err = (err - ulp).clamp_min(0)  # rounding the stored value is not an error of the update
            ref_sq += _sq(float(torch.linalg.vector_norm(change)))
        else:
            allowed = tol.atol + tol.rtol * e.abs()
            norm_err = err
            ref_sq += _sq(float(torch.linalg.vector_norm(e)))
        over = err > allowed
        k = int(over.sum())
        if k:
            n_over += k
            if first_over < 0:
                first_over = lo + int(over.nonzero()[0, 0])
        err_sq += _sq(float(torch.linalg.vector_norm(norm_err)))
    if n_nan:
        return (f"{name}: {n_nan} element(s) NaN/inf where the reference is finite (first at "
                f"{_index(first_nan, actual.shape)})")
    if n_over:
        ai, ei = float(a_all[first_over]), float(e_all[first_over])
        return (f"{name}: {n_over} of {numel} element(s) outside tolerance; first at "
                f"{_index(first_over, actual.shape)}: got {ai:.6g}, expected {ei:.6g} (atol {tol.atol:g}, "
                f"rtol {tol.rtol:g})")
    ref_norm = max(math.sqrt(ref_sq), norm_floor)
    if ref_norm > 0:
        rel = math.sqrt(err_sq) / ref_norm
        if rel > tol.norm_rtol:
            what = "relative error of the update" if delta_of is not None else "relative error"
            return (f"{name}: {what} {rel:.3g} exceeds {tol.norm_rtol:g} for {actual.dtype}"
                    " (computed in lower precision?)")
    return ""


def _index(flat: int, shape: Any) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))


def _sq(x: float) -> float:
    return x * x  # inf past 1.3e154, where x ** 2 raises OverflowError


class OpSpec:
    """Base class of an op spec. Subclasses fill in the class attributes and the methods."""

    name: str = ""
    signature: str = ""
    summary: str = ""
    # Substrings that may not appear anywhere in a candidate's source (a static first line of defence).
    forbidden_source: tuple[str, ...] = ()
    # Python attributes replaced by tripwires in the candidate's process: ("torch.nn.functional", "x").
    forbidden_attrs: tuple[tuple[str, str], ...] = ()
    # aten operators overridden by tripwires at the dispatcher (catches every path to them).
    forbidden_aten: tuple[str, ...] = ()
    # names of output tensors (flattened names' bases) and of inputs that must come back unchanged
    outputs: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    primary_baseline: str = ""
    # the op's optional entry points (what the library calls besides run: attention's run_with_lse, adamw's
    # run_unchecked): name -> (the case arg under which ``invoke`` calls it where a candidate has it, what the
    # library calls it for, as `kerneltune explain` says); the evaluator re-verifies each timed case once
    # under those args, so they are checked at the sizes that are served, not only on small check cases
    companions: dict[str, tuple[str, str]] = {}

    # The timed calls are checked too (the evaluator's "vouch", docs/measurement.md): what they compute is summed
    # up in the worker (``digest``) and compared with the reference's. ``scaled_input``: the input multiplied by
    # a fresh factor before each timed call, every output linear in it (attention's v, the backward's dO), so no
    # two timed calls see the same values; their outputs are sketched (a random ±1 projection of the rows and
    # of the columns), which estimates each call's distance from the reference. ``in_place``: the outputs
    # updated in place (adamw's params and state), put back every ``VOUCH_BLOCK`` calls; each block's change
    # is summed up (L1, L2 norms) against the reference's steps.
    scaled_input: str | None = None
    in_place: tuple[str, ...] = ()

    @property
    def companion_args(self) -> dict[str, Any]:
        """The case args that make ``invoke`` call every optional entry point a candidate has."""
        return {arg: True for arg, _ in self.companions.values()}

    # -- cases -------------------------------------------------------------------------------------
    def smoke_case(self) -> Case:
        raise NotImplementedError

    def check_cases(self, device: str) -> list[Case]:
        raise NotImplementedError

    def timed_cases(self, device: str) -> list[Case]:
        raise NotImplementedError

    def parse_case(self, text: str, dtype: str) -> Case:
        raise NotImplementedError

    # -- data ----------------------------------------------------------------------------------------
    def make_inputs(self, case: Case, seed: int) -> Inputs:
        raise NotImplementedError

    def reference(self, inputs: Inputs) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        raise NotImplementedError

    def perturb(self, inputs: Inputs, seed: int) -> Inputs:
        """The same inputs with ~1% of the elements of each tensor changed (at least one): a cache keyed on
        a sample of the values (a fingerprint) misses the change."""
        g = torch.Generator().manual_seed(rel_seed(self.name, "perturb", seed))

        def one(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            flat = t.view(-1)
            if flat.numel():
                idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 100)]
                bump = torch.randn(idx.numel(), generator=g).abs() * 0.5 + 0.1
                flat[idx] = (flat[idx].double() + bump.double()).to(t.dtype)
            return t

        return Inputs({k: [one(t) for t in v] if isinstance(v, list) else one(v) for k, v in inputs.tensors.items()},
                      dict(inputs.args))

    def tolerance(self, dtype: str) -> Tolerance:
        raise NotImplementedError

    def compare(self, inputs: Inputs, expected: dict[str, Any], actual: dict[str, Any]) -> str:
        raise NotImplementedError

    # -- the timed calls' check (both sides) ---------------------------------------------------------------
    def rep_scales(self, seed: int, i: int, rows: int, device: Any = "cpu") -> torch.Tensor:
        """The factors of ``scaled_input``'s rows on call ``i`` of a timed request (fp64, one a row: of v, each
        key's; of dO, each query's): 1 + k/128, k in [8, 64) from an integer hash of (seed, call, row) computed
        on ``device`` (no host-device copy, so a GPU worker never waits for the call before; the same integers
        everywhere), exact in every float dtype, so x·s rounds alike everywhere. A factor a row, not one a call:
        no cached answer can be rescaled to it."""
        c = rel_seed("rep", seed, i) & 0x7FFFFFFF
        h = (_F["arange"](rows, device=device, dtype=torch.int64) + c) & 0x7FFFFFFF
        for mult in (0x45D9F3B, 0x2C1B3C6D):  # odd multipliers; each product masked back to 31 bits
            h = ((h >> 16) ^ h) & 0x7FFFFFFF
            h = ((h & 0xFFFF) * mult + (((h >> 16) * mult) & 0xFFFF) * 65536) & 0x7FFFFFFF
        h = ((h >> 16) ^ h) & 0x7FFFFFFF
        return 1.0 + (8 + h % 56).to(torch.float64) / 128

    def scaled(self, x: torch.Tensor, seed: int, i: int) -> torch.Tensor:
        """``x`` (the scaled input's values) with call ``i``'s factors, in x's dtype and device (``torch.mul``
        of x and the factors in x's dtype: what the worker writes, bit for bit)."""
        f = self.rep_scales(seed, i, x.numel() // max(x.shape[-1], 1), x.device).to(x.dtype)
        return torch.mul(x, f.view(*x.shape[:-1], 1))

    def scale_input(self, inputs: Inputs, seed: int, i: int) -> Inputs:
        """``inputs`` as timed call ``i`` of the request with ``seed`` saw them."""
        if self.scaled_input is None:
            return inputs
        t = inputs.tensors[self.scaled_input]
        return Inputs({**inputs.tensors, self.scaled_input: self.scaled(t, seed, i)}, dict(inputs.args))

    def vouch_bases(self, inputs: Inputs, expected: dict[str, Any], u: torch.Tensor
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For an op with a ``scaled_input``: per output, (G, B) with U·out = G·(s ∘ B) for the row factors s of
        any timed call (G: K × rows, B: rows × last dim, fp64): what makes each call's expected sketch cheap."""
        raise NotImplementedError

    def sketch(self, like: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, W): random ±1 matrices, fp64, on ``like``'s device, for outputs shaped like ``like`` seen as
        (rows, last dim): ``U @ X @ W`` is SKETCH numbers whose mean square is ‖X‖² in expectation."""
        g = torch.Generator().manual_seed(rel_seed("sketch", seed))
        rows, cols = like.numel() // max(like.shape[-1], 1), like.shape[-1]
        u = torch.randint(0, 2, (SKETCH[0], rows), generator=g, dtype=torch.float64) * 2 - 1
        w = torch.randint(0, 2, (cols, SKETCH[1]), generator=g, dtype=torch.float64) * 2 - 1
        return u.to(like.device), w.to(like.device)

    def digest(self, outputs: dict[str, Any], before: dict[str, Any] | None = None,
               sketch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """A call's outputs summed up, fp64, on their device. With ``sketch`` (U, W): ``U @ X @ W`` of each output
        X seen as (rows, last dim). Without: [L1, L2] of each output (of its change since ``before``, for in-place
        ones). Runs with torch functions bound before any candidate code and __torch_function__ off."""
        f = _F
        with f["no_torch_function"]():
            vals: list[torch.Tensor] = []
            for name in self.outputs:
                if sketch is not None:
                    x = outputs[name]
                    x = f["to"](f["reshape"](x, (-1, x.shape[-1])), sketch[0].device, torch.float64)
                    vals.append(f["reshape"](f["mm"](sketch[0], f["mm"](x, sketch[1])), (-1,)))  # tall-skinny first
                    continue
                xs = _as_list(outputs[name])
                if before is not None and name in before:
                    xs = [f["sub"](x, b) if (x.dtype, x.device) == (b.dtype, b.device) else
                          f["sub"](f["to"](x, torch.float64), f["to"](b, x.device, torch.float64))
                          for x, b in zip(xs, _as_list(before[name]))]
                if xs:
                    l1 = f["sum"](f["stack"](_norms(xs, 1)))
                    l2 = f["sqrt"](f["sum"](f["square"](f["stack"](_norms(xs, 2)))))
                else:
                    l1 = l2 = f["zeros"]((), dtype=torch.float64)
                vals.append(f["stack"]([l1, l2]))
            return f["cat"](vals)

    def norm_limits(self, inputs: Inputs, expected: dict[str, Any]) -> dict[str, float]:
        """Per output: the largest L2 distance from the reference that ``compare``'s norm test lets pass,
        norm_rtol times the reference's norm (ops with another norm test override this)."""
        tol = self.tolerance(dtype_name(str(_as_list(next(iter(inputs.tensors.values())))[0].dtype)[6:]))
        return {name: tol.norm_rtol * _l2(expected[name]) for name in self.outputs}

    def reference_chain(self, inputs: Inputs) -> Iterator[dict[str, Any]]:
        """The references of calls in a row from ``inputs``, each call from the ``in_place`` outputs of the one
        before (an op without them: the same reference every time)."""
        while True:
            out = self.reference(inputs)
            yield out
            if self.in_place:
                inputs = Inputs({**inputs.tensors, **{n: out[n] for n in self.in_place}}, inputs.args)

    def reference_calls(self, inputs: Inputs, calls: int) -> dict[str, Any]:
        """The reference of ``calls`` calls in a row from ``inputs`` (``reference_chain``'s ``calls``-th)."""
        return next(itertools.islice(self.reference_chain(inputs), calls - 1, None))

    def digest_reference(self, inputs: Inputs, expected: dict[str, Any], calls: int = 1,
                         seed: int | None = None, one_call: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a timed call's digest is checked against (``check_digest``), from ``expected``, the reference for
        ``inputs`` (for an in-place op, of ``calls`` calls from ``inputs``), and how far a result that passes
        ``compare`` can be: its norm test bounds ‖a − e‖ by the norm limit. An op with a ``scaled_input``: the
        sketch's (U, W from ``seed``) bases, each call's expected sketch G·(s ∘ B·W); the sketch's root mean square
        difference estimates ‖a − e‖. In place: the L1/L2 norms of the change, |‖a‖ − ‖e‖| <= ‖a − e‖ <= the
        limit for L2, sqrt(numel) times it for L1, ``calls`` times over."""
        limit = self.norm_limits(inputs, expected if calls == 1 else one_call or self.reference(inputs))
        if self.scaled_input is not None:
            first = _as_list(expected[self.outputs[0]])[0]
            u, w = self.sketch(first.cpu(), seed or 0)
            bases = self.vouch_bases(inputs, expected, u)
            return {"bases": [(g, b @ w) for g, b in (bases[n] for n in self.outputs)],
                    "limit": [limit[n] for n in self.outputs]}
        before = {k: _as_list(inputs.tensors[k]) for k in self.in_place} or None
        want = [float(x) for x in self.digest(expected, before)]
        allowed = []
        for name in self.outputs:
            n = sum(t.numel() for t in _as_list(expected[name]))
            allowed += [calls * math.sqrt(n) * limit[name], calls * limit[name]]
        return {"want": want, "allowed": allowed}

    def check_digest(self, ref: dict[str, Any], got: list[float], factors: torch.Tensor | None = None) -> str:
        """'' when one timed call's (or block's) digest ``got`` is within ``ref``'s limits of the reference's (for
        a call with row ``factors``); else which output, and by how much."""
        if self.scaled_input is not None:
            a = torch.tensor(got, dtype=torch.float64)
            k = a.numel() // max(len(self.outputs), 1)
            for j, name in enumerate(self.outputs):
                g, bw = ref["bases"][j]
                e = (g @ (factors[:, None] * bw)).reshape(-1) if factors is not None else (g @ bw).reshape(-1)
                if a.numel() != k * len(self.outputs) or e.numel() != k:
                    return f"a digest of {a.numel()} numbers came back, {e.numel() * len(self.outputs)} expected"
                est = float((a[j * k:(j + 1) * k] - e).square().mean().sqrt())  # estimates ‖a − e‖; NaN fails
                # a passing result is within the limit at factor 1; the factors (< 1.5) scale the outputs with
                # them, and the sketch's estimate (U and W fixed per slot, 8 x 8) can be off by up to ~2x for an
                # error of low rank: 3x the limit is the bound, while skipped or faked work is off by ‖e‖
                allowed = 3.0 * ref["limit"][j] + 1e-12 * float(e.abs().max()) + 1e-30
                if not est <= allowed:
                    return (f"{name} is about {est:.3g} from the reference's (its sketch; a result that passes is "
                            f"within about {ref['limit'][j]:.3g}): what the timed calls computed is not what the "
                            f"checked calls return")
            return ""
        for j, (e, lim) in enumerate(zip(ref["want"], ref["allowed"])):
            a = float(got[j]) if j < len(got) else float("nan")
            allowed = lim + 1e-6 * abs(e) + 1e-30
            if not abs(a - e) <= allowed:  # NaN fails
                name, what = self.outputs[j // 2], ("L1 norm", "L2 norm")[j % 2]
                return (f"the change of {name} over the timed calls: {what} {a:.6g}, the reference's {e:.6g} (at "
                        f"most {allowed:.3g} apart for a result that passes): what the timed calls computed is not "
                        f"what the checked calls return")
        return ""

    # -- in the worker ---------------------------------------------------------------------------------
    def invoke(self, fn: Callable[..., Any], tensors: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """Call ``fn`` the way the contract says; return the outputs by name (in the worker)."""
        raise NotImplementedError

    def baselines(self) -> dict[str, Callable[..., Any]]:
        """name -> callable with ``run``'s signature (in the trusted baseline worker)."""
        raise NotImplementedError

    # -- work ------------------------------------------------------------------------------------------
    def flops(self, case: Case) -> float:
        raise NotImplementedError

    def bytes_moved(self, case: Case) -> float:
        raise NotImplementedError

    def describe(self, case: Case) -> str:
        return case.name


def _as_list(x: Any) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# What the timed calls' check computes with, bound when this module is imported (in a worker, before any
# candidate code exists): replacing torch's functions or methods by name later changes nothing it calls.
_F: dict[str, Any] = {
    "mm": torch.mm, "to": torch.Tensor.to, "reshape": torch.Tensor.reshape, "sub": torch.sub, "stack": torch.stack,
    "cat": torch.cat, "sum": torch.sum, "square": torch.square, "sqrt": torch.sqrt, "zeros": torch.zeros,
    "vector_norm": torch.linalg.vector_norm, "foreach_norm": torch._foreach_norm, "mul": torch.mul,
    "foreach_copy": torch._foreach_copy_, "copy": torch.Tensor.copy_, "tolist": torch.Tensor.tolist,
    "no_torch_function": torch._C.DisableTorchFunction, "arange": torch.arange,
}
SKETCH = (8, 8)  # a sketch's rows and columns: 64 numbers an output, whose mean square estimates ‖X‖²
VOUCH_BLOCK = 8  # an in-place op's timed calls are put back to their start every so many calls
VOUCH_DIGESTS = 64  # the most timed calls of one request whose outputs are sketched (drawn from its seed)
# the aten operators the check runs through (their dispatcher entries are compared before and after each call)
VOUCH_ATEN = ("aten::mm", "aten::_to_copy", "aten::view", "aten::sub.Tensor", "aten::stack", "aten::cat",
              "aten::sum", "aten::square", "aten::sqrt", "aten::linalg_vector_norm", "aten::_foreach_norm.Scalar",
              "aten::mul.out", "aten::_foreach_copy_", "aten::copy_")


def _norms(xs: list[torch.Tensor], order: int) -> list[torch.Tensor]:
    """Each tensor's L``order`` norm, accumulated and returned in fp64 (one foreach launch where torch has it for
    these tensors, else one norm each)."""
    if len(xs) > 1:
        try:
            return list(_F["foreach_norm"](xs, order, dtype=torch.float64))
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return [_F["vector_norm"](x, order, dtype=torch.float64) for x in xs]


def _l2(x: Any) -> float:
    xs = _as_list(x)
    return math.sqrt(sum(float(torch.linalg.vector_norm(t.double())) ** 2 for t in xs))


def rel_seed(*parts: Any) -> int:
    """A deterministic 63-bit seed from any parts (stable across processes, unlike hash())."""
    import hashlib

    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def prod(shape: Any) -> int:
    return int(math.prod(shape))


def companion(fn: Callable[..., Any] | None, name: str) -> Callable[..., Any] | None:
    """Another function of the file that defines ``fn`` (a candidate's ``run``), e.g. attention's optional
    ``run_with_lse``; None where there is none. Looked up in the globals of ``fn`` itself, decorators that keep
    ``__wrapped__`` (functools.wraps, ``torch.no_grad()``) unwrapped: the evaluator and the library find the same
    function."""
    if fn is None:
        return None
    found = getattr(inspect.unwrap(fn), "__globals__", {}).get(name)
    return found if callable(found) else None
