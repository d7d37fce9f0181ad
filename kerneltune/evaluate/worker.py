"""The worker: a child process that loads ONE candidate (or the trusted baselines), calls it on the
inputs the evaluator sends, times it, and sends results back. It never sees a reference result.

Run as ``python -m kerneltune.evaluate.worker CONFIG_JSON``; talks over two inherited pipe fds (see
protocol.py). Before it reads the candidate it confines itself (sandbox.py), turns the op's forbidden
functions into tripwires, pins strict numerics (no tf32) and snapshots every function a cheat would
patch (timers, synchronisation, this module, the wire); after each call it checks them all again,
and that no thread or process started by the candidate outlived ``run``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

_perf_ns = time.perf_counter_ns  # bound before any candidate code exists


class Verdict(Exception):
    """Ends the current request with a verdict (status, reason)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _resolve(path: str) -> Any:
    obj = importlib.import_module(path.split(".")[0])
    for part in path.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        import torch

        from kerneltune.evaluate import protocol
        from kerneltune.ops import get_op

        self.torch = torch
        self.protocol = protocol
        self.cfg = cfg
        self.device = cfg["device"]
        self.spec = get_op(cfg["op"])
        self.role = cfg["role"]  # "candidate" | "baseline"
        self.fns: dict[str, Callable[..., Any]] = {}
        self.slots: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        # vouched timing (_Vouch): slot -> the values its timed calls start from, its sketch and sketch seed
        self.pristine: dict[str, dict[str, Any]] = {}
        self.sketches: dict[str, Any] = {}
        self.sketch_seeds: dict[str, int] = {}
        self.tripped: list[str] = []
        self.flush_buf = None
        self.calls = 0
        self.snapshot: dict[str, Any] = {}
        self.frame_access: list[str] = []  # what the candidate's code reached for (_guard_frames)
        self.handlers: dict[int, Any] = {}  # the signal handlers before the candidate (candidate workers)
        # strict numerics: fp32 means fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        self.threads = torch.get_num_threads()
        if self.device == "cuda":
            torch.cuda.init()
        # Trusted bindings, taken before any candidate code exists and never looked up by name again: a
        # candidate that replaces Worker._check_tamper, the module clock or the wire changes nothing we call.
        self._tamper = Worker._check_tamper.__get__(self)
        self._leftovers = Worker._check_leftovers.__get__(self)
        self._clock = time.perf_counter_ns
        self._send, self._recv = protocol.send, protocol.recv
        self._frames = sys._current_frames
        from kerneltune.ops import base as _base

        self._tf_modes, self._td_modes = torch._C._len_torch_function_stack, torch._C._len_torch_dispatch_stack
        dump = torch._C._dispatch_dump
        self._aten_now = lambda: tuple(_dump_or_none(dump, op) for op in _base.VOUCH_ATEN)
        self.vouch_bound = dict(_base._F)
        self.vouch_aten = self._aten_now()
        self._handlers = {"load": self.load, "call": self.call, "time": self.time, "ceilings": self.ceilings,
                          "clear": self.clear}

    # -- guards ------------------------------------------------------------------------------------------
    def _guarded(self) -> dict[str, Any]:
        """name -> object for everything a cheat would patch; compared by identity after each call."""
        import json as _json
        import os as _os
        import select as _select
        import time as _time

        torch = self.torch
        g: dict[str, Any] = {}
        for name in ("perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns",
                     "process_time", "sleep"):
            g[f"time.{name}"] = getattr(_time, name)
        for name in ("write", "read", "readv", "_exit", "kill"):
            g[f"os.{name}"] = getattr(_os, name)
        g["select.select"] = _select.select
        g["json.dumps"], g["json.loads"] = _json.dumps, _json.loads
        for name in ("synchronize", "Event", "current_stream", "is_available"):
            g[f"torch.cuda.{name}"] = getattr(torch.cuda, name)
        for name in ("record", "elapsed_time", "synchronize"):
            g[f"torch.cuda.Event.{name}"] = getattr(torch.cuda.Event, name)
        for name in ("copy_", "cpu", "clone", "contiguous", "numpy", "to", "detach", "view", "reshape", "fill_",
                     "zero_", "untyped_storage", "data_ptr", "__class__"):
            g[f"torch.Tensor.{name}"] = getattr(torch.Tensor, name)
        g["torch.frombuffer"] = torch.frombuffer
        g["torch.empty"] = torch.empty
        g["torch.empty_like"] = torch.empty_like
        g["torch.allclose"] = torch.allclose
        g["torch.equal"] = torch.equal
        for mod in (self.protocol, sys.modules[__name__]):
            for k, v in vars(mod).items():
                if callable(v) and not k.startswith("__"):
                    g[f"{mod.__name__}.{k}"] = v
        for k in ("invoke", "compare", "reference", "make_inputs", "baselines", "digest", "rep_scales", "scaled",
                  "sketch"):
            g[f"spec.{k}"] = getattr(self.spec, k)
        for k in vars(_Vouch):
            if callable(getattr(_Vouch, k)) and not k.startswith("__"):
                g[f"_Vouch.{k}"] = getattr(_Vouch, k)
        for k in ("_foreach_norm", "_foreach_copy_", "mul", "stack"):
            g[f"torch.{k}"] = getattr(torch, k)
        g["torch.linalg.vector_norm"] = torch.linalg.vector_norm
        from kerneltune.ops import base as _base

        g["kerneltune.ops.base._norms"] = _base._norms  # what the timed calls' digests are made of
        for k in vars(Worker):
            if callable(getattr(Worker, k)) and not k.startswith("__"):
                g[f"Worker.{k}"] = getattr(Worker, k)
        return g

    def _settings(self) -> dict[str, Any]:
        torch = self.torch
        return {
            "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
            "torch.get_num_threads()": torch.get_num_threads(),
            "torch.is_grad_enabled()": torch.is_grad_enabled(),
        }

    def _check_tamper(self) -> None:
        for name, obj in self.snapshot.items():
            try:
                now = _resolve_guard(self, name)
            except Exception:
                now = None
            if now is not obj and not _same_method(now, obj):
                raise Verdict("rejected", f"tampering: the candidate replaced {name} (timer, synchronisation or "
                                          "evaluator code is off limits)")
        now = self._settings()
        for k, v in self.settings.items():
            if now[k] != v:
                raise Verdict("rejected", f"tampering: the candidate changed {k} from {v!r} to {now[k]!r}"
                                          + (" (a precision downgrade)" if "tf32" in k or "precision" in k else ""))
        if self.tripped:
            raise Verdict("rejected", f"called {self.tripped[0]}, which {self.spec.name} candidates may not use "
                                      "(the baseline or reference itself)")
        if self.frame_access:
            raise Verdict("rejected", f"reached for the evaluator's own state ({self.frame_access[0]}): a kernel has "
                                      "no business with frames, the garbage collector or trace hooks")
        if self.handlers and _signal_handlers() != self.handlers:
            raise Verdict("rejected", "tampering: the candidate installed a signal handler (a handler is given the "
                                      "interrupted frame: the evaluator's state)")

    def _thread_ids(self) -> set[int]:
        """Every thread with a Python state, however it was started (threading or _thread)."""
        return set(self._frames())

    def _check_leftovers(self, threads_before: set[int]) -> None:
        alive = [tid for tid in self._frames() if tid not in threads_before]
        if alive:
            names = {t.ident: t.name for t in threading.enumerate()}
            raise Verdict("rejected", f"work still running after run() returned: thread "
                                      f"{names.get(alive[0], alive[0])!r} started by the candidate was alive "
                                      "(finish all work before returning)")
        kids = _live_children()
        if kids:
            raise Verdict("rejected", f"work still running after run() returned: child process {kids[0]} started "
                                      "by the candidate was alive (finish all work before returning)")

    def _install_tripwires(self) -> None:
        import warnings

        torch = self.torch
        tripped = self.tripped

        def tripwire(label: str) -> Callable[..., Any]:
            def trip(*_a: Any, **_k: Any) -> Any:
                tripped.append(label)
                raise RuntimeError(f"kerneltune: {label} is forbidden in {self.spec.name} candidates")
            return trip

        for mod_path, attr in self.spec.forbidden_attrs:
            try:
                mod = importlib.import_module(mod_path)
            except ImportError:
                try:
                    mod = _resolve(mod_path)
                except Exception:
                    continue
            if hasattr(mod, attr):
                try:
                    setattr(mod, attr, tripwire(f"{mod_path}.{attr}"))
                except (AttributeError, TypeError):
                    pass
        self._lib = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in self.spec.forbidden_aten:
                packet = getattr(torch.ops.aten, name, None)
                if packet is None:
                    continue
                for overload in packet.overloads():
                    qual = name if overload == "default" else f"{name}.{overload}"
                    for key in ("CPU", "CUDA", "CompositeImplicitAutograd"):
                        try:
                            self._lib.impl(qual, tripwire(f"aten::{qual}"), key)
                        except Exception:
                            pass
        # the reference and the baselines are not for candidates either
        # the reference and the baselines are not for candidates either, by any path: instance, class, helpers
        for owner in (self.spec, type(self.spec)):
            owner.reference = tripwire(f"kerneltune's {self.spec.name} reference")  # type: ignore[method-assign]
            owner.baselines = tripwire(f"kerneltune's {self.spec.name} baselines")  # type: ignore[method-assign]
        for mod_name, cls_name in (("kerneltune.ops.adamw", "_TorchAdamW"),):
            mod = importlib.import_module(mod_name)
            getattr(mod, cls_name).__call__ = tripwire(f"kerneltune's {self.spec.name} baselines")

    # -- requests ----------------------------------------------------------------------------------------
    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        if self.role == "baseline":
            self.fns = dict(self.spec.baselines(self.device))
            self.snapshot = self._guarded()
            self.settings = self._settings()
            return {"ok": True, "names": list(self.fns), "threads": self.threads,
                    "torch": torch.__version__}
        self._install_tripwires()
        self.handlers = _signal_handlers()
        self.snapshot = self._guarded()
        self.settings = self._settings()
        path = os.path.join(self.cfg["workdir"], msg["filename"])
        with open(path, "w") as f:
            f.write(msg["source"])
        _guard_frames(path, self.frame_access)
        spec = importlib.util.spec_from_file_location(msg["module"], path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[msg["module"]] = module
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise Verdict("compile_error", f"syntax error at line {e.lineno}: {e.msg}") from None
        except BaseException as e:  # noqa: BLE001 - anything at import is the candidate's failure
            raise Verdict("compile_error", f"importing the candidate failed: {_short_exc(e, path)}") from None
        self._tamper()
        info: dict[str, Any] = {"ok": True, "threads": self.threads, "torch": torch.__version__}
        backend = msg["backend"]
        if backend == "cuda" and self.device != "cuda":
            from kerneltune.backends import cuda as cuda_backend

            src = getattr(module, "CUDA_SRC", None)
            if not isinstance(src, str):
                raise Verdict("compile_error", "a cuda candidate must define CUDA_SRC (its CUDA C++ source) as a string")
            if not msg.get("compile_cuda", True):
                return {**info, "compiled": False, "compile_note": "compile check skipped"}
            if cuda_backend.nvcc_path() is None:
                return {**info, "compiled": False, "compile_note": "nvcc not found: not compiled"}
            ok, log = cuda_backend.compile_check(src, self.cfg["workdir"])
            if not ok:
                raise Verdict("compile_error", f"nvcc: {log}")
            return {**info, "compiled": True, "compile_note": log}
        run = getattr(module, "run", None)
        if not callable(run):
            raise Verdict("compile_error", "the candidate defines no callable run()")
        self.fns = {"run": run}
        return info

    def _materialise(self, msg: dict[str, Any], flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        from kerneltune.ops.base import unflatten

        torch = self.torch
        slot = msg.get("slot")
        args = msg.get("args", {})
        if slot and slot in self.slots:
            tensors, _ = self.slots[slot]
            if flat:  # new values into the same buffers: an output cache keyed by address must miss
                self.pristine.pop(slot, None)
                new = unflatten(flat)
                for k, v in new.items():
                    if isinstance(v, list):
                        for dst, src in zip(tensors[k], v):
                            dst.copy_(src)
                    else:
                        tensors[k].copy_(v)
            self.slots[slot] = (tensors, args)
            return tensors, args
        dev = torch.device(self.device)
        tensors = {}
        for k, v in unflatten(flat).items():
            tensors[k] = [t.to(dev).clone() for t in v] if isinstance(v, list) else v.to(dev).clone()
        if slot:
            self.slots[slot] = (tensors, args)
        return tensors, args

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _poison(self, tensors: dict[str, Any]) -> None:
        """Fill freed memory of each input's size with NaN, so an output the candidate allocates but does
        not fully write shows NaN rather than a lucky leftover."""
        torch = self.torch
        for v in tensors.values():
            for t in (v if isinstance(v, list) else [v]):
                if t.is_floating_point() and t.numel() >= 1:
                    torch.empty_like(t).fill_(float("nan"))

    def call(self, msg: dict[str, Any], flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        from kerneltune.ops.base import flatten

        tensors, args = self._materialise(msg, flat)
        fn = self.fns[msg.get("fn", "run")]
        if msg.get("poison", True):
            self._poison(tensors)
        self._sync()
        threads_before = self._thread_ids()
        out = self._invoke(fn, tensors, args)
        self._sync()
        self._leftovers(threads_before)
        self._tamper()
        self.calls += 1
        reply = {k: v for k, v in out.items()}
        for k in self.spec.unchanged:
            reply[k] = tensors[k]
        return {"ok": True}, flatten(reply)

    def _invoke(self, fn: Callable[..., Any], tensors: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        from kerneltune.ops.adamw import ContractError as AdamContract
        from kerneltune.ops.attention import ContractError as AttnContract

        try:
            return self.spec.invoke(fn, tensors, args)
        except Verdict:
            raise
        except (AttnContract, AdamContract) as e:
            raise Verdict("rejected", str(e)) from None
        except SystemExit as e:
            raise Verdict("crashed", f"run() called sys.exit({e.code!r})") from None
        except MemoryError:
            raise Verdict("crashed", "run() ran out of memory (MemoryError): the worker's memory limit is "
                                     f"{(self.cfg.get('memory_bytes') or 0) / 2**30:.1f} GiB "
                                     "(raise it with --memory-limit)") from None
        except BaseException as e:  # noqa: BLE001
            if self.tripped or self.frame_access:  # a refusal it ran into: that is the verdict, not the crash
                self._tamper()
            raise Verdict("crashed", f"run() raised {_short_exc(e, self.cfg['workdir'])}") from None

    def time(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``reps`` timed calls after ``warmup`` untimed ones. With ``vouch`` (a seed), what the timed calls
        compute comes back too, summed up outside the timed interval (``digests``: see _Vouch), for the parent to
        compare with the reference's."""
        torch = self.torch
        slot = msg["slot"]
        tensors, args = self.slots[slot]
        fn = self.fns[msg["fn"]]
        reps, warmup = int(msg["reps"]), int(msg.get("warmup", 0))
        invoke, clock = self._invoke, self._clock
        if msg.get("sketch") is not None:
            self.sketch_seeds.setdefault(slot, int(msg["sketch"]))
        t_v = clock()
        vouch = _Vouch(self, slot, tensors, int(msg["vouch"]), reps) if msg.get("vouch") is not None else None
        fixed_ns = clock() - t_v  # the vouching's cost once a request (the parent's timer check allows for it)
        threads_before = self._thread_ids()
        for i in range(warmup):
            if vouch:
                vouch.before(-1 - i)
            out = invoke(fn, tensors, args)
            if vouch:
                vouch.after(out, None)
        self._sync()
        times: list[float] = []
        wall0 = clock()
        if self.device == "cuda":
            if self.flush_buf is None:  # larger than L2 (50 MB on H100): every rep starts cold
                self.flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for i, (start, end) in enumerate(events):
                if vouch:
                    vouch.before(i)
                self.flush_buf.zero_()
                start.record()
                out = invoke(fn, tensors, args)
                end.record()
                if vouch:
                    vouch.after(out, i)
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for i in range(reps):
                if vouch:
                    vouch.before(i)
                t0 = clock()
                out = invoke(fn, tensors, args)
                times.append((clock() - t0) / 1e6)
                if vouch:
                    vouch.after(out, i)
        wall_ms = (clock() - wall0) / 1e6
        reply: dict[str, Any] = {"ok": True, "times_ms": times, "wall_ms": wall_ms}
        if vouch:
            t_v, spent = clock(), vouch.spent_ns  # (finish's own digests are in its clock time)
            reply.update(vouch.finish())
            reply["vouch_fixed_ms"] = (fixed_ns + spent + clock() - t_v) / 1e6
            reply["vouch_call_ms"] = vouch.per_call_ns / 1e6
        self._leftovers(threads_before)
        self._tamper()
        self.calls += reps + warmup
        return reply

    def ceilings(self) -> dict[str, Any]:
        from kerneltune.evaluate.roofline import measure_ceilings

        return {"ok": True, "ceilings": measure_ceilings(self.device)}

    def clear(self, msg: dict[str, Any]) -> dict[str, Any]:
        prefix = str(msg.get("prefix", ""))
        self.slots = {k: v for k, v in self.slots.items() if not k.startswith(prefix)}
        for d in (self.pristine, self.sketches, self.sketch_seeds):
            for k in [k for k in d if k.startswith(prefix)]:
                del d[k]
        return {"ok": True}

    def serve(self, fd_in: int, fd_out: int) -> None:
        send, recv, handlers = self._send, self._recv, self._handlers
        protocol_error = self.protocol.ProtocolError
        while True:
            try:
                msg, flat = recv(fd_in)
            except protocol_error:
                return
            cmd = msg.get("cmd")
            out_tensors: dict[str, Any] = {}
            try:
                if cmd == "exit":
                    send(fd_out, {"ok": True})
                    return
                handler = handlers.get(cmd)
                if handler is None:
                    reply = {"ok": False, "status": "crashed", "reason": f"unknown request {cmd!r}"}
                elif cmd == "call":
                    reply, out_tensors = handler(msg, flat)
                elif cmd in ("load", "time", "clear"):
                    reply = handler(msg)
                else:
                    reply = handler()
                if self.role == "candidate" and self.snapshot:
                    self._tamper()  # after every request, whatever it was, before anything is sent
            except Verdict as v:
                reply, out_tensors = {"ok": False, "status": v.status, "reason": v.reason}, {}
            except BaseException as e:  # noqa: BLE001 - a worker never dies of a candidate's exception
                reply, out_tensors = {"ok": False, "status": "crashed", "reason": _short_exc(e, self.cfg["workdir"])}, {}
            try:
                send(fd_out, reply, out_tensors)
            except BaseException as e:  # noqa: BLE001
                send(fd_out, {"ok": False, "status": "crashed",
                              "reason": f"results could not be sent: {_short_exc(e, '')}"})


class _Vouch:
    """The timed calls' check, in the worker (OpSpec.scaled_input / in_place; docs/measurement.md). Made at the
    start of a vouched request: an in-place op's outputs are put back to the values they had at the slot's first
    vouched request. ``before(i)`` (outside the timed interval) writes ``scaled_input`` times call ``i``'s factor;
    ``after(out, i)`` sketches timed call ``i``'s outputs (every call up to VOUCH_DIGESTS a request, else that many
    drawn from the seed), or, for an in-place op, every VOUCH_BLOCK calls digests the block's change and puts the
    values back; ``finish()`` the rest, and the reply's fields. Everything it runs was bound before any candidate
    code existed, with __torch_function__ off; a torch function or dispatch mode left active, or a change at the
    dispatcher of the operators it uses, is tampering."""

    def __init__(self, worker: Worker, slot: str, tensors: dict[str, Any], seed: int, reps: int) -> None:
        from kerneltune.ops import base

        self.w, self.spec, self.tensors, self.seed = worker, worker.spec, tensors, seed
        self.f, self.block = base._F, base.VOUCH_BLOCK
        spec = self.spec
        keep = worker.pristine.get(slot)
        if keep is None:
            names = list(spec.in_place) + ([spec.scaled_input] if spec.scaled_input else [])
            keep = {n: [t.clone() for t in tensors[n]] if isinstance(tensors[n], list) else tensors[n].clone()
                    for n in names}
            worker.pristine[slot] = keep
        self.keep = keep
        self.before_state = {n: keep[n] for n in spec.in_place} or None
        self.sketch: tuple[Any, Any] | None = None
        self._check()
        self._restore()
        if spec.scaled_input is not None:
            first = spec.outputs[0]
            like = tensors[spec.scaled_input] if first not in tensors else tensors[first]
            self.sketch = worker.sketches.get(slot)
            if self.sketch is None:  # the slot's own, from its sketch seed (sent with its first request)
                self.sketch = worker.sketches[slot] = spec.sketch(like, worker.sketch_seeds.get(slot, 0))
        if reps <= base.VOUCH_DIGESTS:
            self.chosen: set[int] | None = None
        else:
            g = worker.torch.Generator().manual_seed(seed)
            self.chosen = set(worker.torch.randperm(reps, generator=g)[: base.VOUCH_DIGESTS].tolist())
        self.digests: list[Any] = []
        self.digested: list[int] = []
        self.blocks: list[int] = []
        self.in_block = 0
        self.spent_ns = 0  # the digests' time (see after)
        self.per_call_ns = 0  # the scaled input's writing, every call

    def _check_modes(self) -> None:
        w = self.w
        if w._tf_modes() or w._td_modes():
            raise Verdict("rejected", "tampering: a torch function or dispatch mode was left active around run() "
                                      "(it would see the evaluator's own computations)")
        for t in self.sketch or ():
            if type(t) is not w.torch.Tensor:  # noqa: E721 - a subclass would see its products
                raise Verdict("rejected", "tampering: the evaluator's sketch matrices were replaced")

    def _check(self) -> None:
        """Before the request's first digest and at its end: no mode, the bound functions and the dispatcher's
        kernels of the operators the check runs through as they were (per digest: no mode)."""
        w = self.w
        self._check_modes()
        if any(self.f[k] is not v for k, v in w.vouch_bound.items()) or w._aten_now() != w.vouch_aten:
            raise Verdict("rejected", "tampering: the functions or dispatcher kernels the evaluator checks the timed "
                                      "calls with were replaced")

    def _restore(self) -> None:
        for n in self.spec.in_place:
            self.f["foreach_copy"](self.tensors[n], self.keep[n])
        if self.spec.in_place:
            self.w._sync()

    def before(self, i: int | None) -> None:
        name = self.spec.scaled_input
        if name is None:
            return
        t = self.w._clock()
        x, dst = self.keep[name], self.tensors[name]
        if i is None:
            self.f["copy"](dst, x)
            return
        rows = self.spec.rep_scales(self.seed, i, x.numel() // max(x.shape[-1], 1), x.device)  # on the device
        self.f["mul"](x, self.f["to"](rows, x.dtype).view(*x.shape[:-1], 1), out=dst)
        self.per_call_ns += self.w._clock() - t

    def after(self, out: dict[str, Any], i: int | None) -> None:
        spec = self.spec
        if spec.in_place:
            self.in_block += 1
            if self.in_block == self.block:
                self._block_done()
        elif i is not None and (self.chosen is None or i in self.chosen):
            # at most VOUCH_DIGESTS a request, whatever its calls: their host time is the request's, which the
            # timer check allows for (on a GPU they are queued after the call's end event: nothing waits)
            w = self.w
            t = w._clock()
            self._check_modes()
            self.digests.append(spec.digest(out, sketch=self.sketch))
            self.digested.append(i)
            self.spent_ns += w._clock() - t

    def _block_done(self) -> None:
        t = self.w._clock()  # the digest and the restore: the vouching's time, which the timer check allows for
        self._check_modes()
        self.digests.append(self.spec.digest(self.tensors, self.before_state))
        self.blocks.append(self.in_block)
        self.in_block = 0
        self._restore()
        self.spent_ns += self.w._clock() - t

    def finish(self) -> dict[str, Any]:
        if self.spec.in_place and self.in_block:
            self._block_done()
        self.before(None)  # the scaled input as it was
        f = self.f
        self._check()
        with f["no_torch_function"]():
            flat = [f["tolist"](f["to"](d, "cpu")) for d in self.digests]
        return {"digests": flat, "digested": self.digested, "blocks": self.blocks}


# audited events that hand over frames (and with them every local of the evaluator's timing loop: the timed
# calls' sketch matrices, which calls are sketched, where a block ends), the garbage collector's graph, or a
# hook on the evaluator; "object.__getattr__" is audited for the attributes that lead to a frame (a frame's own
# f_back and f_locals raise no event: a frame must be refused where it is first handed out)
_FRAME_EVENTS = {"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
                 "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._getframemodulename",
                 "sys.monitoring.register_callback"}
_FRAME_ATTRS = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}
# stdlib helpers that hand frames back to their caller (inspect.currentframe and stack, traceback.walk_stack and
# walk_tb): what they ask for is refused where the code that called them is the candidate's (numba formats
# tracebacks, torch.fx and dynamo call inspect.currentframe, while a candidate's code is further up the stack)
_FRAME_HELPERS = ("inspect", "traceback")


def _guard_frames(candidate_path: str, found: list[str]) -> None:
    """An audit hook, installed before the candidate's module runs (it cannot be removed): the events above are
    refused (RuntimeError where they were asked for, and the candidate ``rejected`` at the end of its request)
    when the candidate's own code asked for them, itself or through inspect or traceback. torch's, numba's
    and Triton's own uses (their compilers walk frames) go on, also with the candidate's code further up. The static scan refuses the literal
    names; this holds the ones a candidate spells at run time. Known gaps (docs/measurement.md): a frame a
    library function other than these hands back (logging.currentframe), and a signal handler's (refused when
    the request ends)."""
    getframe = sys._getframe
    stdlib = os.path.dirname(os.__file__)
    helpers = {os.path.join(stdlib, n + ".py") for n in _FRAME_HELPERS}
    busy = threading.local()

    def held(f: Any) -> bool:
        # whose request it is: the asking code, or, where that is a helper's, the first code above the helpers
        # (the candidate's own walk_tb or currentframe is the candidate's; torch's, numba's are theirs)
        depth = 0
        while f is not None and f.f_code.co_filename in helpers and depth < 64:
            f, depth = f.f_back, depth + 1
        return f is not None and f.f_code.co_filename == candidate_path

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "object.__getattr__":
            if len(args) < 2 or args[1] not in _FRAME_ATTRS:
                return
        elif event not in _FRAME_EVENTS:
            return
        if getattr(busy, "on", False):
            return
        busy.on = True
        try:
            refuse = held(getframe(1))  # frame 1: the Python code that asked
        finally:
            busy.on = False
        if refuse:
            what = f"{event} {args[1]}" if event == "object.__getattr__" else event
            found.append(what)
            raise RuntimeError(f"kerneltune: {what} is refused to candidates (the evaluator's frames are off limits)")

    sys.addaudithook(hook)


def _signal_handlers() -> dict[int, Any]:
    """Every signal's Python handler (a handler is called with the frame it interrupted)."""
    import signal

    out = {}
    for s in signal.valid_signals():
        try:
            out[int(s)] = signal.getsignal(s)
        except (ValueError, OSError):
            continue
    return out


def _dump_or_none(dump: Callable[[str], str], op: str) -> str | None:
    try:
        return dump(op)
    except RuntimeError:  # an operator this torch does not have
        return None


def _resolve_guard(worker: Worker, name: str) -> Any:
    head, _, attr = name.rpartition(".")
    if head == "spec":
        return getattr(worker.spec, attr)
    if head == "Worker":
        return getattr(Worker, attr)
    if head == "_Vouch":
        return getattr(_Vouch, attr)
    if head == __name__:
        return getattr(sys.modules[__name__], attr)
    return getattr(_resolve(head), attr)


def _same_method(a: Any, b: Any) -> bool:
    """Bound methods are new objects on every access: compare what they bind."""
    fa, fb = getattr(a, "__func__", None), getattr(b, "__func__", None)
    return fa is not None and fa is fb and getattr(a, "__self__", None) is getattr(b, "__self__", None)


def _live_children() -> list[int]:
    pids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        return []
    live = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X"):
                live.append(pid)
        except OSError:
            pass
    return live


def _short_exc(e: BaseException, path: str) -> str:
    """'ValueError: msg (candidate.py line 12)': the innermost frame inside the candidate file."""
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if path and frame.filename.startswith(path):
            where = f" (line {frame.lineno}: {(frame.line or '').strip()[:80]})"
            break
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}{where}"


def main(cfg: dict[str, Any] | None = None) -> None:
    """Run as a program (config in argv[1]) or from the zygote's forked child (config given)."""
    if cfg is None:
        cfg = json.loads(sys.argv[1])
    fd_in, fd_out = cfg["fd_in"], cfg["fd_out"]
    # the candidate's stdin, stdout, stderr are not the wire: stdin is /dev/null, output goes to a file
    from kerneltune.evaluate import sandbox

    applied = sandbox.apply(cfg)
    worker = Worker(cfg)
    worker.applied = applied  # type: ignore[attr-defined]
    from kerneltune.evaluate import protocol

    protocol.send(fd_out, {"ok": True, "ready": True, "sandbox": applied, "pid": os.getpid()})
    worker.serve(fd_in, fd_out)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
