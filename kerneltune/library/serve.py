"""Which kernel serves a library call, and the record of what served.

For each distinct (op, device, shape, dtype, args) a process asks the registry once (``Registry.decide``)
and remembers the answer (per exact shape, not per bucket: whether a nearest bucket is within reach depends on
the exact N and B*H; per CUDA device index, since two GPUs of a process may be different models); a registry
kernel is imported from its candidate file (trusted code: it passed the evaluator on this device) the first
time it serves. Anything that goes wrong — a corrupt registry, a missing or changed file, a kernel that fails
to import, raises, or (with ``$KERNELTUNE_VERIFY``) disagrees with the reference on its first call — warns once
and the reference serves from then on. ``served()`` counts the calls each kernel answered.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from kerneltune import registry as reg
from kerneltune.registry import Decision, Entry

ENV_VERIFY = "KERNELTUNE_VERIFY"
ENV_LOG = "KERNELTUNE_LOG"
REFERENCE = "reference"

log = logging.getLogger("kerneltune")

_lock = threading.RLock()
_served: dict[str, Counter[str]] = {}
_registry: tuple[str, reg.Registry] | None = None
_decisions: dict[tuple[Any, ...], tuple[Decision, str, dict[str, Any]]] = {}  # choose's key -> (decision, bucket, dims)
_kernels: dict[str, Callable[..., Any]] = {}
_bad: dict[str, str] = {}          # entry id -> why it no longer serves in this process
_generation = 0                    # bumped whenever a decision may change: see generation()
_verified: set[str] = set()
_warned: set[str] = set()


@dataclass
class Choice:
    """The kernel for one call: ``run`` is None for the reference."""

    run: Callable[..., Any] | None
    name: str
    entry: Entry | None
    decision: Decision

    @property
    def verify(self) -> bool:
        """True on the first call of a registry kernel in this process when $KERNELTUNE_VERIFY is set."""
        return verify_pending(self.entry)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def warn_once(msg: str) -> None:
    with _lock:
        if msg in _warned:
            return
        _warned.add(msg)
    reg.warn(f"kerneltune: {msg}")


def registry(env: str | None = None) -> reg.Registry:
    """The registry this process serves from; read again when $KERNELTUNE_REGISTRY (``env``: its value, read
    by the caller) changes."""
    global _registry
    if env is None:
        env = os.environ.get(reg.ENV_REGISTRY, "")
    with _lock:
        if _registry is None or _registry[0] != env:
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = reg.load()
            for w in caught:  # a corrupt file: once per process, whoever asks
                warn_once(str(w.message))
            _registry = (env, r)
            _decisions.clear()
            _bump()
        return _registry[1]


def _bump() -> None:
    global _generation
    _generation += 1


def generation() -> tuple[int, str, str, str]:
    """Changes whenever what ``choose`` answers may change: the registry was (re)read or reloaded, a kernel
    was marked bad, or one of the environment variables the decision reads. Callers cache on it."""
    return (_generation, *_env_key())


def _env_key() -> tuple[str, str, str]:
    """The environment variables a serving decision reads."""
    env = os.environ
    return env.get(reg.ENV_REGISTRY, ""), env.get(reg.ENV_MIN_SPEEDUP, ""), env.get(reg.ENV_DISABLE, "")


def reload() -> None:
    """Forget the registry, the decisions and the failures (tests; after promoting in a live process)."""
    global _registry
    with _lock:
        _registry = None
        _decisions.clear()
        _bad.clear()
        _bump()
        _verified.clear()
        _warned.clear()


def choose(op: str, device: Any, dims: dict[str, Any], dtype: str, args: dict[str, Any] | None = None) -> Choice:
    """The kernel that serves ``op`` for this call (the registry's decision cached per device, exact shape, dtype
    and arguments: ``Registry.decide`` tests a nearest bucket's reach on the exact N and B*H, so two shapes of
    one bucket may be decided differently)."""
    env = _env_key()
    r = registry(env[0])
    key = (op, *_device_slot(device), _dims_key(op, dims), str(dtype), reg._args_key(args), *env)
    with _lock:
        hit = _decisions.get(key)
    if hit is None:
        d = r.decide(op, device, dims, dtype, args)
        b, nd = reg.bucket(op, dims), reg.norm_dims(op, dims)
        with _lock:
            _decisions[key] = (d, b, nd)
        if d.warning:
            warn_once(d.warning)
        _log(f"{op} {b} {nd} {dtype} {reg._args_text(args or {})} on {reg._as_key(device)}: "
             f"{d.entry.name if d.entry else REFERENCE} ({d.reason})")
    else:
        d = hit[0]
    e = d.entry
    if e is None or entry_id(e) in _bad:
        return Choice(None, REFERENCE, None, d)
    fn = _kernel(e)
    if fn is None:
        return Choice(None, REFERENCE, None, d)
    return Choice(fn, e.name, e, d)


def _device_slot(device: Any) -> tuple[str, int | None]:
    """(kind, CUDA device index; None on CPU): a decision is made per GPU, since the registry's device key is
    that GPU's own (model and compute capability), and two GPUs of one process may differ."""
    kind = reg.device_kind(device)
    if kind == "cpu":
        return kind, None
    index = device.split(":", 1)[1] if isinstance(device, str) and ":" in device else getattr(device, "index", None)
    if index is None:  # 'cuda': the current device, as torch takes it
        import torch

        return kind, (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return kind, int(index)


def _dims_key(op: str, dims: dict[str, Any]) -> tuple[Any, ...]:
    """The call's exact shape as the registry reads it (``registry.norm_dims``: attention B, H, N, D; adamw numel
    and tensors), hashable: ``Registry.decide`` reads ``dims`` only through them, so one key, one decision."""
    d = reg.norm_dims(op, dims) if "shapes" in dims else dims
    try:
        key = tuple(sorted(d.items()))
        hash(key)
    except TypeError:  # a list in dims (not a shape this library asks about): its JSON text
        return (json.dumps(d, sort_keys=True, default=str),)
    return key


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: Any) -> Any:
    """A context in which a kernel launched for tensors on ``device`` runs on that device: ``torch.cuda.device``
    where ``device`` is a CUDA device other than the current one (Triton and other launchers take the current
    device, not the tensors'), else a no-op (the common case: CPU, or the current GPU)."""
    if getattr(device, "type", None) != "cuda":
        return _NO_GUARD
    import torch

    if device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def _log(msg: str) -> None:
    if _flag(ENV_LOG) and not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
    log.info(msg)


def entry_id(e: Entry) -> str:
    """One registry kernel's identity in this process (op, source hash, file)."""
    return f"{e.op}:{e.source_hash}:{e.path}"


def _kernel(e: Entry) -> Callable[..., Any] | None:
    eid = entry_id(e)
    with _lock:
        if eid in _kernels:
            return _kernels[eid]
        try:
            fn = _import_run(e)
        except Exception as ex:  # noqa: BLE001 - any failure to load a kernel means the reference serves
            mark_bad(e, f"{e.name} ({e.path}) failed to load: {type(ex).__name__}: {ex}")
            return None
        _kernels[eid] = fn
        return fn


def _import_run(e: Entry) -> Callable[..., Any]:
    """Import the candidate file as a module of its own and return its ``run``.

    The file is the evaluated source (the registry checked its hash), so its KERNELTUNE["params"] are
    the params that passed and were timed; the entry's copy must agree."""
    modname = f"kerneltune_served_{e.op}_{e.source_hash[:16]}"
    spec = importlib.util.spec_from_file_location(modname, e.path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {e.path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod  # triton.jit and numba look functions up through their module
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    meta = getattr(mod, "KERNELTUNE", {})
    file_params = meta.get("params") or {} if isinstance(meta, dict) else {}
    if e.params and file_params != e.params:
        raise ValueError(f"the registry entry's params {e.params} are not the file's {file_params}; re-promote it")
    run = getattr(mod, "run", None)
    if not callable(run):
        raise ImportError(f"{e.path} defines no run()")
    return run


def _verified_key(e: Entry, part: str) -> str:
    return f"{entry_id(e)}#{part}" if part else entry_id(e)


def verify_pending(e: Entry | None, part: str = "") -> bool:
    """True when $KERNELTUNE_VERIFY is set and ``part`` of ``e`` ("": its ``run``; "run_with_lse": that entry
    point) was not checked yet in this process: each entry point is checked on its own first use."""
    with _lock:
        return e is not None and _flag(ENV_VERIFY) and _verified_key(e, part) not in _verified


def mark_bad(e: Entry, why: str) -> None:
    """Stop serving ``e`` in this process (one warning says why)."""
    with _lock:
        _bad[entry_id(e)] = why
        _bump()
    warn_once(f"{why}; the reference serves {e.op} from now on")


def is_bad(e: Entry | None) -> bool:
    """True when ``e`` was dropped in this process (failed to load, raised, or failed verification)."""
    with _lock:
        return e is not None and entry_id(e) in _bad


def mark_verified(e: Entry, part: str = "") -> None:
    with _lock:
        _verified.add(_verified_key(e, part))


def count(op: str, name: str) -> None:
    with _lock:
        _served.setdefault(op, Counter())[name] += 1


def served() -> dict[str, dict[str, int]]:
    """op -> {kernel name or "reference": calls served} since the last reset_served()."""
    with _lock:
        return {op: dict(c) for op, c in _served.items()}


def reset_served() -> None:
    with _lock:
        _served.clear()


def decisions() -> list[dict[str, Any]]:
    """Every serving decision this process made (one per device, exact shape, dtype and arguments): op, device,
    bucket, dims, dtype, args, kernel, kind, reason."""
    with _lock:
        items = list(_decisions.items())
        bad = dict(_bad)
    out = []
    for key, (d, b, dims) in items:
        e = d.entry
        why = bad.get(entry_id(e)) if e is not None else None
        out.append({"op": key[0], "device": key[1] if key[2] is None else f"{key[1]}:{key[2]}", "bucket": b,
                    "dims": dims, "dtype": key[4], "args": json.loads(key[5]),
                    "kernel": REFERENCE if (e is None or why) else e.name, "kind": "reference" if why else d.kind,
                    "reason": why or d.reason})
    return out


def verify_failed(op: str, e: Entry, why: str) -> None:
    mark_bad(e, f"{e.name} disagreed with the reference on its first call ({why})")
