"""``kerneltune.optim.AdamW``: a drop-in for ``torch.optim.AdamW`` whose step runs the registry's AdamW winner.

It *is* a ``torch.optim.AdamW`` (a subclass): the same arguments, param groups, closures, hooks and
state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so state_dicts load both ways.
On each step, the parameters of a group are split into buckets of one (device, dtype, step count);
a bucket is updated by the registry kernel for its device and size when one serves (through the
``kerneltune::adamw_`` custom op), and by torch's own AdamW step otherwise. Options a kernel cannot
honour — amsgrad, maximize, capturable, differentiable, a tensor lr or betas, gradient scaling of a
fused step, sparse or complex gradients, non-fp32 or non-contiguous tensors, a step under inference_mode —
always take torch's step.
"""

from __future__ import annotations

import inspect
import itertools
import operator
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from kerneltune.library import serve
from kerneltune.ops.base import companion

OP = "adamw"

__all__ = ["AdamW"]

_version = operator.attrgetter("_version")  # a tensor's autograd version counter
_shape = operator.attrgetter("shape")
_grad = operator.attrgetter("grad")
_is_cpu = operator.attrgetter("is_cpu")


def _sparse(p: Tensor) -> bool:
    """A param whose gradient is sparse (torch's step raises on it)."""
    g = p.grad
    return g is not None and g.is_sparse


_dtype = operator.attrgetter("dtype")


def _all_fit(device: torch.device, params: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> Any:
    """True when every param's moments fit it (``_moments_fit``), tested list-wide in C-level passes (the usual
    step of a group never remembered, one with a frozen param, say, takes this every step); else which fit."""
    shapes = list(map(_shape, params))
    index = device.index if device.type == "cuda" else -1  # (get_device: an int, no device object made)
    if (list(map(_shape, ms)) == shapes and list(map(_shape, vs)) == shapes
            and all(map(Tensor.is_contiguous, ms)) and all(map(Tensor.is_contiguous, vs))
            and set(map(_dtype, ms)) == {torch.float32} == set(map(_dtype, vs))
            and set(map(Tensor.get_device, ms)) == {index} == set(map(Tensor.get_device, vs))):
        return True
    return list(map(_moments_fit, params, ms, vs))


def _moments_fit(p: Tensor, m: Tensor, v: Tensor) -> bool:
    """The param's moments are what the adamw contract takes with it: fp32, contiguous, its shape and device."""
    f32 = torch.float32
    return (m.dtype is f32 and v.dtype is f32 and m.shape == p.shape and v.shape == p.shape
            and m.device == p.device and v.device == p.device and m.is_contiguous() and v.is_contiguous())
_States = tuple[list[Tensor], list[Tensor], list[Tensor]]  # exp_avg, exp_avg_sq, step of each param
_Bucket = tuple[torch.device, list[Tensor], list[Tensor], Optional[_States]]  # states None: still to look up


class _Counts:
    """One record of step counts this optimizer wrote: the count tensors of a list (held, so their ids stay
    theirs), their version counters after the write, and the value written."""

    __slots__ = ("steps", "key", "versions", "value", "_by_id", "_distinct")

    def __init__(self, steps: list[Tensor], key: tuple[int, ...], value: float) -> None:
        self.steps, self.key, self._distinct = list(steps), key, None
        self.update(value)

    def update(self, value: float) -> None:
        self.versions, self.value, self._by_id = list(map(_version, self.steps)), value, None

    def version_of(self, tid: int) -> Optional[int]:
        if self._by_id is None:
            self._by_id = dict(zip(self.key, self.versions))
        return self._by_id.get(tid)

    @property
    def distinct(self) -> list[Tensor]:
        if self._distinct is None:
            self._distinct = list({id(s): s for s in self.steps}.values())
        return self._distinct


class _Group:
    """What a step that sent a whole group to the kernel leaves for the next: the C++ check of the group's
    params, gradients and moments, their device and shapes, and the kernel chosen for them (valid while
    ``serve.generation()`` is ``gen``)."""

    __slots__ = ("guard", "device", "n", "shapes", "choice", "gen")

    def __init__(self, guard: Any, device: torch.device, shapes: tuple[Any, ...]) -> None:
        self.guard, self.device, self.n, self.shapes = guard, device, len(shapes), shapes
        self.choice: Optional[serve.Choice] = None
        self.gen: Any = None


try:  # torch's C++ tensor-metadata check (what torch.compile's guards run)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # a torch without it: the tests per tensor on every step
    _TensorGuards = None


@torch.compiler.disable  # a C++ object: nothing for a traced step to trace (the tuned path skips it there)
def _metadata_guard(tensors: list[Tensor]) -> Any:
    """A C++ check, ``.check(*tensors)``, that tensors have these tensors' dtypes, devices, sizes and strides
    (and types, requires_grad, dispatch keys); None where this torch has none. Sizes and strides are given:
    each is checked exactly (None would leave that dimension unchecked). It keeps no reference to them."""
    if _TensorGuards is None:
        return None
    try:
        return _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                             dynamic_dims_strides=[list(t.stride()) for t in tensors])
    except Exception:  # noqa: BLE001 - another torch's signature: no shortcut
        return None


def _raw_torch_step() -> Callable[..., Any]:
    """torch.optim.AdamW.step without the profiling/hook wrapper torch installs on first use (our own step is
    wrapped already; calling the wrapped one would run every step hook twice)."""
    return inspect.unwrap(torch.optim.AdamW.step, stop=lambda f: not getattr(f, "hooked", False))


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW, stepped by the registry's tuned kernel where one serves (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rest: list[dict[str, Any]] = []  # groups (or parts of groups) that torch's step updates
        compiling = torch.compiler.is_compiling()  # a traced step: the C++ check is not something to trace
        raising = None
        for group in self.param_groups:
            tunable = self._tunable(group)
            known = self._guarded(group) if tunable and not compiling else None
            # torch's step raises on a sparse gradient before it updates that group or any later one: the groups
            # before it are stepped, then torch's step takes it and raises. (A remembered group's gradients
            # passed the metadata check, which a sparse one fails: nothing to look at there.)
            if known is None and any(map(_sparse, group["params"])):
                raising = group
                break
            if not tunable:
                rest.append(group)
                continue
            leftover = self._tuned_group(group, known)
            if leftover:
                rest.append({**group, "params": leftover})
        if rest:
            self._torch_step(rest)
        if raising is not None:
            self._torch_step([raising])  # raises as torch.optim.AdamW does
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for k in ("_kt_last", "_kt_index", "_kt_guards"):  # records of the tensors the load replaced
            self.__dict__.pop(k, None)

    # -- torch's step, for what no kernel takes ------------------------------------------------------------
    def _torch_step(self, groups: list[dict[str, Any]]) -> None:
        saved = self.param_groups
        self.param_groups = groups
        try:
            with torch.set_grad_enabled(any(g.get("differentiable") for g in groups)):
                _raw_torch_step()(self)
        finally:
            self.param_groups = saved
        serve.count(OP, serve.REFERENCE)

    def _tunable(self, group: dict[str, Any]) -> bool:
        if torch.is_inference_mode_enabled():  # its tensors keep no version counter, which the counts rely on
            return False
        if group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable"):
            return False
        if not group.get("decoupled_weight_decay", True):
            return False
        if torch.is_tensor(group["lr"]) or any(torch.is_tensor(b) for b in group["betas"]):
            return False
        if group.get("fused") and (getattr(self, "grad_scale", None) is not None
                                   or getattr(self, "found_inf", None) is not None):
            return False
        return True

    # -- the tuned path ------------------------------------------------------------------------------------
    # The host side is paid on every step, for each of GPT-2 small's 148 tensors. A group whose params all went
    # to the kernel is remembered with a C++ check of its tensors' metadata (_metadata_guard): the next step's
    # params, gradients and moments pass it in one call when their dtypes, devices, sizes and strides are those
    # that passed the tests below. Otherwise every per-tensor test is one cheap attribute (a dtype is a
    # singleton, compared by identity; float32 excludes complex), the device is tested once per bucket, and
    # the list-wide tests run through map() in C.
    def _tuned_group(self, group: dict[str, Any], known: Optional[tuple[_Bucket, _Group]]) -> list[Tensor]:
        """Update what a registry kernel serves (``known``: the group as its record's one bucket, from
        ``_guarded``); return the params left for torch's step."""
        leftover: list[Tensor] = []
        buckets = [known[0]] if known is not None else self._bucketed(group["params"], leftover)
        rec = known[1] if known is not None else None
        for device, params, grads, states in buckets:
            if states is None and (device.type not in ("cpu", "cuda") or any(g.device != device for g in grads)):
                leftover += params
                continue
            choice = _choose(params) if rec is None else _choose_for(rec, params)
            if choice.run is None:
                leftover += params
                continue
            if states is None:
                states = self._states(params, group)
                # moments that do not fit their param (a param resized or cast after its state was made) go to
                # torch's step, which raises as it would: a kernel is never handed tensors outside the contract
                fits = _all_fit(device, params, states[0], states[1])
                if fits is not True:
                    leftover += [p for p, ok in zip(params, fits) if not ok]
                    params, grads = [p for p, ok in zip(params, fits) if ok], [g for g, ok in zip(grads, fits) if ok]
                    states = tuple([x for x, ok in zip(xs, fits) if ok] for xs in states)  # type: ignore[assignment]
                    if not params:
                        continue
                if (len(params) == len(group["params"]) and not torch.compiler.is_compiling()  # next step: one call
                        and _meets_contract(device, params, grads, states)):
                    self._remember_group(group, device, params, grads, states)
            exp_avgs, exp_avg_sqs, steps = states
            key = tuple(map(id, steps))
            values = self._step_values(steps, key)
            if values.count(values[0]) == len(values):  # the usual case: one count for the whole bucket
                parts = [(values[0], choice, params, grads, exp_avgs, exp_avg_sqs, steps, key)]
            else:  # a part split off by its step count is its own size
                by_step: dict[float, list[int]] = {}
                for i, t in enumerate(values):
                    by_step.setdefault(t, []).append(i)
                parts = []
                for t, idx in by_step.items():
                    sel, ss = [params[i] for i in idx], [steps[i] for i in idx]
                    parts.append((t, _choose(sel), sel, [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                                  [exp_avg_sqs[i] for i in idx], ss, tuple(map(id, ss))))
            for t, part, sel, sg, sm, sv, ss, skey in parts:
                # a step that passed the group's record (its tensors' metadata that of tensors checked against
                # the adamw contract when it was made) may take the kernel's run_unchecked
                checked = rec is not None and sel is params
                ok = _step_with(part, sel, sg, sm, sv, step=int(t) + 1, lr=float(group["lr"]),
                                beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
                                eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                                shapes=rec.shapes if checked else None, checked=checked)
                if not ok:  # the kernel failed or was dropped: torch's step takes these (nothing was changed)
                    leftover += sel
                    continue
                torch._foreach_add_(self._distinct(ss, skey), 1.0)  # one launch, where torch makes one a tensor
                self._remember_steps(ss, skey, t + 1)
        return leftover

    @staticmethod
    def _bucketed(group_params: list[Tensor], leftover: list[Tensor]) -> list[_Bucket]:
        """The params with an fp32, dense, contiguous gradient, by device (states still to look up); the
        others go to ``leftover`` (a param without a gradient is skipped, as torch skips it)."""
        buckets: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
        f32, strided = torch.float32, torch.strided
        if len(set(map(id, group_params))) != len(group_params):  # a param listed twice: torch steps it twice
            leftover += group_params
            return []
        for p in group_params:
            g = p.grad
            if g is None:
                continue
            if (p.dtype is not f32 or g.dtype is not f32 or g.layout is not strided or not p.is_contiguous()
                    or not g.is_contiguous()):
                leftover.append(p)
                continue
            b = buckets.get(p.device)
            if b is None:
                b = buckets[p.device] = ([], [])
            b[0].append(p)
            b[1].append(g)
        return [(device, params, grads, None) for device, (params, grads) in buckets.items()]

    @torch.compiler.disable
    def _guarded(self, group: dict[str, Any]) -> Optional[tuple[_Bucket, _Group]]:
        """The group as one bucket, states included, with its record, when its params, gradients and moments
        pass the metadata check remembered from a step that sent the whole group to the kernel; else None (the
        tests per tensor)."""
        gp = group["params"]
        rec = self.__dict__.get("_kt_guards", {}).get(id(gp))  # keyed by the list; the check is of metadata
        if rec is None or rec.n != len(gp) or len(set(map(id, gp))) != rec.n:  # (a param put in twice since)
            return None
        grads = list(map(_grad, gp))
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            return None
        states = self._states(gp, group)  # the guard was made once these existed
        if not rec.guard.check(*gp, *grads, *states[0], *states[1]):
            return None
        return (rec.device, list(gp), grads, states), rec

    def _remember_group(self, group: dict[str, Any], device: torch.device, params: list[Tensor], grads: list[Tensor],
                        states: _States) -> None:
        guard = _metadata_guard([*params, *grads, *states[0], *states[1]])
        guards = self.__dict__.setdefault("_kt_guards", {})
        if guard is None:
            guards.pop(id(group["params"]), None)
            return
        if len(guards) > 64:
            guards.clear()
        guards[id(group["params"])] = _Group(guard, device, tuple(map(_shape, params)))

    def _states(self, params: list[Tensor], group: dict[str, Any]) -> _States:
        """exp_avg, exp_avg_sq and step of each param, the state created as torch creates it where missing."""
        ms, vs, steps = [], [], []
        state = self.state
        for p in params:
            s = state.get(p)
            if not s:
                s = self._state(p, group)
            ms.append(s["exp_avg"])
            vs.append(s["exp_avg_sq"])
            steps.append(s["step"])
        return ms, vs, steps

    # -- step counts without a device sync ---------------------------------------------------------------
    def _step_values(self, steps: list[Tensor], key: tuple[int, ...]) -> list[float]:
        """The step counts as host numbers. Reading a step tensor that lives on the GPU (fused/capturable
        state) waits for the whole backward pass; so the counts this optimizer wrote are remembered with each
        tensor's version counter, which any later write (torch's step, load_state_dict, fill_) bumps: only a
        tensor changed behind our back is read, all of those in one transfer. (A write that bypasses
        autograd's counter — through ``.data``, a numpy view, or an in-place collective such as
        ``dist.broadcast`` — is not seen: set counts with ``fill_``, ``copy_`` or ``load_state_dict``.) Each
        write is one record of its list of count tensors; the usual step asks for the list it wrote last,
        checked list-wide, and any other list (a param without a grad this step, a part at another count)
        finds its tensors through the index of the latest record holding each. ``key``: the tensors' ids."""
        # counts in host memory are read as they are: no sync to save, and a write that no version counter
        # sees (another process's, through shared memory: the A3C pattern) is read too
        if all(map(_is_cpu, steps)):
            return list(map(Tensor.item, steps))
        last = self.__dict__.get("_kt_last", {}).get(key)  # ids of held tensors: sound
        if last is not None and list(map(_version, steps)) == last.versions:
            return [last.value] * len(steps)
        out: list[Optional[float]] = [None] * len(steps)
        unknown = self._from_records(steps, out)
        if unknown:
            for i, v in zip(unknown, self._read_counts([steps[i] for i in unknown])):
                out[i] = v
        return out  # type: ignore[return-value]

    @staticmethod
    def _read_counts(steps: list[Tensor]) -> list[float]:
        """The counts' values, in one transfer (a device sync where they live on a GPU)."""
        try:
            return torch.stack([s.detach().reshape(()).to(torch.float64) for s in steps]).cpu().tolist()
        except RuntimeError:  # counts on several devices (state loaded by hand): one read each
            return [float(s) for s in steps]

    def _from_records(self, steps: list[Tensor], out: list[Optional[float]]) -> list[int]:
        """Fill ``out`` for the tensors that the latest record holding them has at their current version;
        return the indices still unknown."""
        last, index = self.__dict__.get("_kt_last", {}), self.__dict__.get("_kt_index", {})
        rest = []
        for i, s in enumerate(steps):
            rec = last.get(index.get(id(s)))  # ids are sound: a record holds its tensors
            if rec is not None and rec.version_of(id(s)) == s._version:
                out[i] = rec.value
            else:
                rest.append(i)
        return rest

    def _distinct(self, steps: list[Tensor], key: tuple[int, ...]) -> list[Tensor]:
        """The count tensors once each (a count shared by params is added to once): the record's, where the
        list has one."""
        rec = self.__dict__.get("_kt_last", {}).get(key)
        if rec is not None:
            return rec.distinct
        return list({id(s): s for s in steps}.values())

    def _remember_steps(self, steps: list[Tensor], key: tuple[int, ...], value: float) -> None:
        """Record the counts just written: one record of the list, keyed by its tensors' ids ``key`` (the
        record holds them, so no other tensor can take one of those ids), and an index from each id to it.
        The versions are kept as a list for the list-wide check (a count tensor shared by params appears
        twice); the lookups by id build their map when first asked."""
        last = self.__dict__.setdefault("_kt_last", {})
        index = self.__dict__.setdefault("_kt_index", {})
        if len(last) > 64:  # lists whose params with grads changed, parts split by count, rebuilt groups
            last.clear()
            index.clear()
        rec = last.get(key)
        if rec is None:
            last[key] = _Counts(steps, key, value)
        else:  # the same list again (the usual step): its new versions and value
            rec.update(value)
        index.update(dict.fromkeys(key, key))

    def _state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The parameter's state, created exactly as torch.optim.AdamW creates it."""
        state = self.state[p]
        if len(state) == 0:
            fused_or_capturable = bool(group.get("fused") or group.get("capturable"))
            scalar = torch.float32 if (group.get("fused") or torch.get_default_dtype() != torch.float64) \
                else torch.float64
            state["step"] = (torch.zeros((), dtype=scalar, device=p.device) if fused_or_capturable
                             else torch.tensor(0.0, dtype=scalar))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


# -- the custom op ---------------------------------------------------------------------------------------------
def adamw_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
               step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> bool:
    """One AdamW step (op contract: 1-based ``step``) by the registry kernel for these tensors.

    Returns False, having changed nothing, when no kernel serves them (or the kernel failed): the caller
    then takes torch's step."""
    if not params:
        return True
    return _step_with(_choose(params), params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1,
                      beta2=beta2, eps=eps, weight_decay=weight_decay)


def _choose(params: list[Tensor]) -> serve.Choice:
    # the dims a registry entry records for adamw (registry.norm_dims), without a list of every shape
    return serve.choose(OP, params[0].device, {"numel": sum(map(Tensor.numel, params)), "tensors": len(params)},
                        "float32", {})


def _choose_for(rec: _Group, params: list[Tensor]) -> serve.Choice:
    """``_choose`` for a remembered group, asked again only when what ``serve.choose`` answers may change."""
    gen = serve.generation()
    if rec.gen != gen or rec.choice is None:
        rec.choice, rec.gen = _choose(params), gen
    return rec.choice


def _meets_contract(device: torch.device, params: list[Tensor], grads: list[Tensor], states: _States) -> bool:
    """Whether the group's four lists meet the adamw contract's preconditions, which a kernel's run_unchecked
    takes on trust: every tensor fp32, contiguous, on ``device``, tensor i of every list of one shape. Checked
    once, when the group's record is made; the record's metadata check then holds every later step to it."""
    f32 = torch.float32
    shapes = list(map(_shape, params))
    for ts in (params, grads, *states[:2]):
        if (any(t.dtype is not f32 or t.device != device or not t.is_contiguous() for t in ts)
                or list(map(_shape, ts)) != shapes):
            return False
    return True


def _step_with(choice: serve.Choice, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], *, step: int, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, shapes: Optional[tuple[Any, ...]] = None, checked: bool = False) -> bool:
    """``adamw_step`` with the serving decision already made (``shapes``: the params' shapes, where known;
    ``checked``: the lists meet the contract's preconditions, checked by the caller, so the kernel's
    ``run_unchecked`` may serve)."""
    if choice.run is None:
        return False
    if torch.compiler.is_compiling():  # a graph sees the custom op: its schema says what it mutates
        torch.ops.kerneltune.adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                                    weight_decay)
    else:
        # eager: the same body, called directly. The custom op's dispatch costs ~1 ms of host time for
        # 4 lists of 148 tensors (GPT-2 small), as much as the fused step's whole host side; its one effect
        # besides the call, bumping the version counters of what it mutates, is done here as well
        _adamw_impl(choice, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                    shapes=shapes, checked=checked)
        _bump_versions([*params, *exp_avgs, *exp_avg_sqs])
    return not serve.is_bad(choice.entry)


@torch.library.custom_op("kerneltune::adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _adamw_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    _adamw_impl(_choose(params), params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)


def _adamw_impl(choice: serve.Choice, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], step: int, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, shapes: Optional[tuple[Any, ...]] = None, checked: bool = False) -> None:
    """The registry kernel's update (its ``run_unchecked`` where the caller checked the lists and the kernel's
    file has one), checked on the first call of each entry point where $KERNELTUNE_VERIFY asks; a kernel that
    raises or disagrees is marked bad and what it changed is put back (see ``backup``)."""
    if choice.run is None:
        return
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    e = choice.entry
    assert e is not None
    unchecked = companion(choice.run, "run_unchecked") if checked else None
    run, part = (unchecked, "run_unchecked") if unchecked is not None else (choice.run, "")
    verify = serve.verify_pending(e, part)
    # a copy to put back, only where it can be needed: the call that is checked ($KERNELTUNE_VERIFY), and the
    # kernel's first call at these shapes in this process, where its compilations happen (a numba kernel may
    # compile its parallel loop at the first large tensor, after updating smaller ones). Cloning 3 x 4 B x
    # 124M on every step would cost more than the kernel saves; later calls run code that already ran (a
    # fault on the device ends the process's CUDA context, which no copy would survive)
    first = (serve.entry_id(e), part, tuple(map(_shape, params)) if shapes is None else shapes)  # per entry point
    backup = ([[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
              if verify or first not in _ran else None)
    try:
        with serve.device_guard(params[0].device):  # a launch on the tensors' GPU where it is not the current one
            run(params, grads, exp_avgs, exp_avg_sqs, **hyper)
        why = _verify(backup, grads, (params, exp_avgs, exp_avg_sqs), hyper) if verify else ""
    except Exception as ex:  # noqa: BLE001 - a kernel that raises never takes the caller down
        why = f"raised {type(ex).__name__}: {ex}"
        serve.mark_bad(e, f"{e.name} {why}")
    else:
        if why:
            serve.verify_failed(OP, e, why)
    if why:  # put everything back: the caller takes torch's step for these tensors
        for ts, olds in zip((params, exp_avgs, exp_avg_sqs), backup or ()):
            for t, old in zip(ts, olds):
                t.copy_(old)
        return
    if verify:
        serve.mark_verified(e, part)
    _ran.add(first)
    serve.count(OP, choice.name)


_ran: set[tuple[Any, ...]] = set()  # (registry entry, shapes) that completed a call in this process


def _bump_versions(tensors: list[Tensor]) -> None:
    """What the custom op does for the tensors it mutates: bump their autograd version counters."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except (TypeError, RuntimeError, AssertionError):  # torch < 2.5 takes one tensor a call
        for t in tensors:
            torch.autograd.graph.increment_version(t)


@_adamw_op.register_fake
def _adamw_fake(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    return None


def _verify(before: list[list[Tensor]], grads: list[Tensor], after: tuple[list[Tensor], ...],
            hyper: dict[str, Any]) -> str:
    """'' when the kernel's update matches the op's fp64 reference within the evaluator's tolerance."""
    from kerneltune.ops import get_op
    from kerneltune.ops.base import Inputs, cpu_references

    spec = get_op(OP)
    cpu = lambda ts: [t.detach().cpu() for t in ts]  # noqa: E731
    inputs = Inputs({"params": cpu(before[0]), "grads": cpu(grads), "exp_avgs": cpu(before[1]),
                     "exp_avg_sqs": cpu(before[2])}, dict(hyper))
    actual = {"params": cpu(after[0]), "exp_avgs": cpu(after[1]), "exp_avg_sqs": cpu(after[2])}
    with cpu_references():  # never gigabytes of the training GPU for a check
        return spec.compare(inputs, spec.reference(inputs), actual)
