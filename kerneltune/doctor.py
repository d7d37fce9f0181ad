"""`kerneltune doctor`: what works on this machine and what does not, one line each."""

from __future__ import annotations

import os
import shutil
from typing import Any


def _row(name: str, status: str, detail: str) -> dict[str, str]:
    return {"name": name, "status": status, "detail": detail}


def diagnose(db: str | None = None) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    import torch

    rows.append(_row("torch", "ok", f"{torch.__version__}, {torch.get_num_threads()} threads"))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows.append(_row("gpu", "ok", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"))
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "no device visible"
        rows.append(_row("gpu", "missing", f"no CUDA GPU ({why}): triton runs through its CPU interpreter "
                                           "(correctness only), cuda candidates are compile-checked only"))
    for mod, use in (("triton", "triton candidates"), ("numba", "numba candidates")):
        try:
            m = __import__(mod)
            rows.append(_row(mod, "ok", f"{m.__version__}"))
        except Exception as e:  # noqa: BLE001
            rows.append(_row(mod, "missing", f"{use} cannot run: {type(e).__name__}: {e}"))
    from kerneltune.backends import cuda as cuda_backend

    nvcc = cuda_backend.nvcc_path()
    rows.append(_row("nvcc", "ok" if nvcc else "missing",
                     f"{nvcc} ({cuda_backend.nvcc_version()})" if nvcc else "not found: cuda candidates cannot be compiled"))
    from kerneltune.evaluate.process import namespaces_available
    from kerneltune.evaluate.sandbox import landlock_abi

    abi = landlock_abi()
    rows.append(_row("sandbox: landlock", "ok" if abi else "warn",
                     f"ABI {abi}: candidates cannot write outside their temp dir"
                     + ("; no TCP" if abi >= 4 else "") + ("; no signals outside" if abi >= 6 else "")
                     if abi else "unavailable: a candidate could write files its user can write (the store included)"))
    ns = namespaces_available()
    rows.append(_row("sandbox: namespaces", "ok" if ns else "warn",
                     "user+PID namespaces: process limit applies, nothing outlives the worker" if ns else
                     "unshare unavailable: processes a candidate starts are killed by session id only"))
    rows.append(_worker_start_row())
    from kerneltune.evaluate.evaluator import Options
    from kerneltune.evaluate.procfs import stopping_fails

    why = stopping_fails()
    off = not Options().isolate
    rows.append(_row("timing: turns alone", "warn" if why or off else "ok",
                     "off (KERNELTUNE_ISOLATE=0): other workers run during each timed turn" if off else
                     f"other workers cannot be stopped during timed turns: {why}" if why else
                     "every other worker is stopped (SIGSTOP) during each timed turn" +
                     ("" if ns else "; without PID namespaces a process that leaves a worker's tree is not "
                      "found, so cases record isolated: false")))
    if torch.cuda.is_available():
        from kerneltune.evaluate.process import cuda_confinement

        conf = cuda_confinement()
        rows.append(_row("sandbox: cuda", "warn" if conf.note else "ok",
                         f"CUDA workers run with: {conf.describe()}" + (f"; {conf.note}" if conf.note else "")))
    from kerneltune.store.db import Store, StoreError, default_db_path

    path = db or default_db_path()
    try:
        s = Store(path)
        n = s.count("evaluations")
        s.close()
        rows.append(_row("store", "ok", f"{path} ({n} evaluations)"))
    except StoreError as e:
        rows.append(_row("store", "fail", str(e)))
    key = os.environ.get("ANTHROPIC_API_KEY")
    try:
        import anthropic  # noqa: F401

        sdk = "anthropic SDK installed"
    except ImportError:
        sdk = "anthropic SDK not installed (pip install 'kerneltune[claude]')"
    rows.append(_row("claude", "ok" if key else "missing",
                     f"ANTHROPIC_API_KEY is set ({len(key)} chars); {sdk}" if key else
                     f"ANTHROPIC_API_KEY not set: the offline templates proposer is used; {sdk}"))
    cc = shutil.which("cc") or shutil.which("gcc")
    rows.append(_row("c compiler", "ok" if cc else "missing", cc or "none: triton GPU builds need one"))
    return rows


def _worker_start_row() -> dict[str, str]:
    """How CPU workers start here: forked by the zygote (torch imported once), or exec'd, and why."""
    from kerneltune.evaluate import zygote
    from kerneltune.evaluate.process import ZYGOTE_ENV, child_env, namespaces_available

    if not zygote.enabled():
        return _row("workers", "ok", "CPU workers are exec'd (KERNELTUNE_WORKER_START=exec): each imports torch")
    try:
        z = zygote.get(child_env(ZYGOTE_ENV))
    except zygote.Unavailable as e:
        return _row("workers", "warn", f"CPU workers are exec'd, each importing torch: the zygote failed ({e})")
    if namespaces_available() and not z.namespaces:
        return _row("workers", "warn", "CPU workers are exec'd, each importing torch: the zygote's children cannot "
                                       "enter namespaces here")
    return _row("workers", "ok", "CPU workers are forked by a zygote that imported torch once; GPU workers are exec'd")


def as_dict(rows: list[dict[str, str]]) -> dict[str, Any]:
    return {r["name"]: r for r in rows}
