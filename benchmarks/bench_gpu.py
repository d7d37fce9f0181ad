"""Issue 8 on a GPU: kerneltune's attention forward/backward and AdamW against every torch baseline, every shape.

    python benchmarks/bench_gpu.py --out DIR [--db STORE] [--deadline 240] [--ops attention,attention_backward,adamw]

What it does, in one process on one GPU (trusted code: the kernels timed here are files that have passed
kerneltune's evaluator, in the search that chose them or in a `kerneltune eval`; this harness re-checks each
at every shape it times and records the error):
1. measures the device's ceilings in this run: copy bandwidth (read + write of a large buffer) and the bf16
   matmul rate (kerneltune.evaluate.roofline.measure_ceilings);
2. picks the contestant kernel per op: the best passed candidate in the store (--db, as `kerneltune
   leaderboard`) on this device, else the shipped template at its defaults;
3. attention forward and backward: the 24 shapes of the issue (N 512..16384, D 64 and 128, causal and full,
   B·N = 16k tokens, H·D = 2048), bf16; adamw: the GPT-2 small parameter list (124M fp32 params, 148 tensors);
4. probes (--probe-s): each attention contestant, the candidate and each variant, runs first in a child process
   of its own, all at once, at the smallest N of each (D, causal), checked against fp64: a kernel that hangs,
   faults (which would lose this process's CUDA context) or is wrong is recorded as failed and never runs in
   this process; the children's Triton compiles, side by side on the host's cores, fill the cache it reads;
5. per shape: inputs on the GPU; the candidate's output checked against the fp64 reference on batch 0, heads
   0..3 (the op's own tolerance); every baseline's relative error recorded; then candidate and baselines
   timed interleaved, round by round in rotating order, each call with CUDA events around it and L2 flushed
   (a 256 MB write) before it; p20/p50/p80 of all calls;
6. writes one CSV (one row per shape and contestant, with provenance) and prints a summary table last.

Baselines: attention: sdpa (default backend, primary), sdpa_flash, sdpa_cudnn, sdpa_efficient (pinned; a
backend that refuses a shape is recorded as failed), torch_math (N <= 4096: it holds B·H·N² scores),
torch_compile (torch.compile of the math version, N in --compile-n, ops in --compile-ops; its compile time is in
the warm-up);
attention_backward: the same, each timed without its forward (autograd over a retained graph, see
kerneltune/ops/attention_backward.py), plus sdpa_fwd_bwd (forward + backward); adamw: adamw_fused (primary),
adamw_foreach. Ratios are `baseline p50 / candidate p50` from the same interleaved rounds.

What a training step's attention costs (attention_backward's shapes): one more contestant, kerneltune_fwd_bwd
(kind "training"), is the forward candidate's run_with_lse (what a differentiated call runs: its output and row
logsumexp go to the backward) followed by the backward candidate's run, checked like the candidate (dq, dk, dv
against fp64) and timed in the same rounds; its speedup_vs_primary is against sdpa_fwd_bwd, SDPA's forward and
backward through autograd, the work a training step does with SDPA.

Variants (--also 'attention:GROUP_BY_HEAD=0;attention_backward:BLOCK_N1=128;adamw:CHUNK=16384'): the same candidate
file at other knob values, checked and timed in the same rounds as one more contestant (kind "variant",
named after the knobs it changes), so a knob's effect is a ratio measured side by side, not across runs.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kerneltune.check import git_commit  # noqa: E402
from kerneltune.evaluate.device import device_info, versions  # noqa: E402
from kerneltune.evaluate.roofline import measure_ceilings  # noqa: E402
from kerneltune.ops import get_op  # noqa: E402
from kerneltune.ops.adamw import PRESETS, gpt_param_shapes  # noqa: E402
from kerneltune.ops.attention import attention_fp64, issue8_shapes  # noqa: E402
from kerneltune.ops.attention_backward import attention_bwd_fp64  # noqa: E402
from kerneltune.ops.base import Case, Tolerance, compare_tensor  # noqa: E402
from kerneltune.report import dims_shape  # noqa: E402
from kerneltune.store.db import leaderboard  # noqa: E402

TEMPLATES = {"attention": "candidates/attention/triton_fa2.py",
             "attention_backward": "candidates/attention_backward/triton_fa2_bwd.py",
             "adamw": "candidates/adamw/triton_mt_table.py"}
DEV = "cuda"       # --dry-run-cpu: "cpu", tiny shapes, fp16, Triton's interpreter (checks this script, not speed)
HALF = torch.bfloat16
PRIMARY = {"attention": "sdpa", "attention_backward": "sdpa", "adamw": "adamw_fused"}
TRAINING = "kerneltune_fwd_bwd"   # attention_backward's rows: the forward candidate (with lse), then the backward
FIELDS = ["timestamp", "device", "device_key", "capability", "torch", "triton", "kerneltune", "git", "op", "B", "H",
          "N", "D", "causal", "dtype", "shape", "contestant", "kind", "candidate", "candidate_hash", "status", "p20_ms",
          "p50_ms", "p80_ms", "reps", "tflops", "gbps", "pct_matmul_ceiling", "pct_copy_ceiling", "speedup_vs_primary",
          "candidate_speedup", "rel_err", "copy_gbps", "matmul_bf16_tflops", "note"]


# -- contestants ----------------------------------------------------------------------------------------------
def load_module(path: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_also(spec: str | None) -> dict[str, list[dict[str, Any]]]:
    """'op:K=V,K=V;op:K=V' -> {op: [{K: V, ...}, ...]}; values are ints where they parse as ints."""
    out: dict[str, list[dict[str, Any]]] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        op, sep, knobs = part.partition(":")
        if not sep or not knobs.strip():
            raise SystemExit(f"bench_gpu: --also part {part!r} is not 'op:KNOB=VALUE[,KNOB=VALUE]'")
        point: dict[str, Any] = {}
        for kv in knobs.split(","):
            k, eq, v = kv.partition("=")
            if not eq or not k.strip():
                raise SystemExit(f"bench_gpu: --also knob {kv!r} is not KNOB=VALUE")
            v = v.strip()
            point[k.strip()] = int(v) if v.lstrip("-").isdigit() else v
        out.setdefault(op.strip(), []).append(point)
    return out


def load_variants(op: str, path: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    """{contestant name: module} for each point: the candidate's file loaded again, its params updated."""
    mods: dict[str, Any] = {}
    for i, point in enumerate(points):
        mod = load_module(path, f"kt_bench_{op}_variant{i}")
        known = getattr(mod, "KERNELTUNE", {}).get("params", {})
        unknown = sorted(set(point) - set(known))
        if unknown:
            raise SystemExit(f"bench_gpu: --also {op}: knob(s) {unknown} are not params of {os.path.basename(path)} "
                             f"(its params: {sorted(known)})")
        mod.KERNELTUNE["params"] = {**known, **point}
        mods["variant " + ",".join(f"{k}={v}" for k, v in point.items())] = mod
    return mods


def pick_candidate(op: str, db: str | None, device_key: str, workdir: str) -> tuple[str, str, str]:
    """(path, name, hash) of the best passed candidate of op in the store on this device, else the template."""
    if db and os.path.exists(db):
        con = sqlite3.connect(db)
        con.row_factory = sqlite3.Row
        # the leaderboard's first row: a candidate whose latest verdict is a failure, or a pass the evaluator marked
        # noisy, is not the best one, however high that pass's speedup
        rows = leaderboard(con, op, device_key, 1)
        con.close()
        if rows:
            row = rows[0]
            path = os.path.join(workdir, f"{row['name']}.py")
            with open(path, "w") as f:
                f.write(row["source"])
            return path, row["name"], row["candidate_hash"]
    from kerneltune.evaluate.static import read_candidate

    path = os.path.join(ROOT, TEMPLATES[op])
    c = read_candidate(path)
    return path, c.name, c.hash


# -- timing -----------------------------------------------------------------------------------------------------
class Timer:
    """Interleaved CUDA-event timing with an L2 flush before every call."""

    def __init__(self, rounds: int, turn_ms: float) -> None:
        self.rounds, self.turn_ms = rounds, turn_ms
        self.flush = torch.empty(256 << 20 if DEV == "cuda" else 1 << 20, dtype=torch.uint8, device=DEV)

    def _calls(self, fn: Callable[[], Any], n: int) -> list[float]:
        if DEV == "cpu":
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for s, e in ev:
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in ev]

    def run(self, fns: dict[str, Callable[[], Any]]) -> tuple[dict[str, list[float]], dict[str, str]]:
        failed: dict[str, str] = {}
        reps: dict[str, int] = {}
        for name, fn in list(fns.items()):
            try:
                fn()  # warm-up: compiles (Triton, torch.compile), builds graphs and tables
                _sync()
                t = min(self._calls(fn, 2))
                reps[name] = int(min(max(math.ceil(self.turn_ms / max(t, 1e-3)), 1), 200))
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run this shape is recorded, not fatal
                failed[name] = _one_line(e)
                fns.pop(name)
                _sync()
                _empty_cache()
        names = list(fns)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(self.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name] += self._calls(fns[name], reps[name])
        return times, failed


def _one_line(e: BaseException) -> str:
    """An exception as one line of at most ~200 characters: its type and the first line of its message."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]  # noqa: E731
    return pick(0.2), pick(0.5), pick(0.8)


def rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    a64, e64 = a.double(), e.to(a.device).double()
    return float(torch.linalg.vector_norm(a64 - e64) / torch.linalg.vector_norm(e64).clamp_min(1e-300))


# -- ops --------------------------------------------------------------------------------------------------------
def attention_shapes(only: str | None) -> list[tuple[int, int, int, int, bool]]:
    shapes = issue8_shapes()
    # the headline shapes first, so a deadline cuts the least important ones
    shapes.sort(key=lambda s: (s[3] != 128, not s[4], s[2] < 4096, s[2]))
    if only:
        keep = {int(x) for x in only.split(",") if x.strip()}
        shapes = [s for s in shapes if s[2] in keep]
    if DEV == "cpu":  # dry run: the same loop over tiny, awkward shapes
        shapes = [(1, 3, 80, 64, True), (2, 2, 64, 128, False)]
    return shapes


def bench_attention(op: str, cand: Any, fwd_cand: Any, args: argparse.Namespace, timer: Timer, ceil: dict[str, Any],
                    emit: Callable[..., None], deadline: float, variants: dict[str, Any] | None = None) -> None:
    spec = get_op(op)
    baselines = spec.baselines(DEV)  # built once per op: torch_compile's compiled function is kept in its closure
    dtname = "bfloat16" if HALF == torch.bfloat16 else "float16"
    for b, h, n, d, causal in attention_shapes(args.only_n):
        shape = dict(B=b, H=h, N=n, D=d, causal=causal, dtype=dtname)
        if time.monotonic() > deadline:
            emit(op, shape, "—", "candidate", status="skipped", note="deadline reached before this shape")
            continue
        try:
            _attention_shape(op, spec, baselines, cand, fwd_cand, args, timer, ceil, emit, shape, variants or {})
        except Exception as e:  # noqa: BLE001 - one shape's failure is its row; the other shapes still run
            emit(op, shape, "candidate", "candidate", status="error", note=f"{type(e).__name__}: {str(e)[:300]}")
        _empty_cache()


def _attention_shape(op: str, spec: Any, baselines: dict[str, Any], cand: Any, fwd_cand: Any,
                     args: argparse.Namespace, timer: Timer, ceil: dict[str, Any], emit: Callable[..., None],
                     shape: dict[str, Any], variants: dict[str, Any]) -> None:
    """One shape: checked against fp64, every contestant timed interleaved, one row each."""
    b, h, n, d, causal, dtname = (shape[x] for x in ("B", "H", "N", "D", "causal", "dtype"))
    tol = spec.tolerance(dtname)
    compile_n = {int(x) for x in args.compile_n.split(",") if x} if op in args.compile_ops.split(",") else set()
    g = torch.Generator(device=DEV).manual_seed(1234 + n + d + causal)
    q, k, v, do = (torch.randn(b, h, n, d, device=DEV, generator=g).to(HALF) for _ in range(4))
    case = Case(name=f"B{b} H{h} N{n} D{d}", dims={"B": b, "H": h, "N": n, "D": d}, dtype=dtname,
                args={"causal": causal})
    flops, nbytes = spec.flops(case), spec.bytes_moved(case)
    sl = (slice(0, 1), slice(0, min(h, 4)))  # the slice checked against fp64: batch 0, heads 0..3
    names = [x for x in baselines if not (x == "torch_math" and n > 4096)
             and not (x == "torch_compile" and n not in compile_n)]
    if op == "attention":
        ref = attention_fp64(q[sl], k[sl], v[sl], causal, None)[0]
        a = (q, k, v)
    else:
        o, lse = fwd_cand.run_with_lse(q, k, v, causal=causal)
        ref = attention_bwd_fp64(q[sl], k[sl], v[sl], do[sl], causal, None)
        a = (q, k, v, o, do, lse)
    runs = {"candidate": cand.run, **{x: m.run for x, m in variants.items()}, **{x: baselines[x] for x in names}}
    fns = {x: (lambda f=f, a=a, c=causal: f(*a, causal=c)) for x, f in runs.items()}
    own = ["candidate", *variants]  # kerneltune's contestants: checked against fp64 before timing
    if op == "attention_backward":  # a training step's attention: the forward that hands over lse, then this
        def fwd_bwd(qkv: tuple = (q, k, v), do: torch.Tensor = do, c: bool = causal) -> Any:
            o_, lse_ = fwd_cand.run_with_lse(*qkv, causal=c)
            return cand.run(*qkv, o_, do, lse_, causal=c)
        fns[TRAINING] = fwd_bwd
        own.append(TRAINING)
    whys, errs, broke = {}, {}, {}
    for x in own:
        try:
            whys[x], errs[x] = _check(op, fns[x](), ref, sl, tol)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is its row; the candidate's shape fails
            if x == "candidate":
                raise
            broke[x] = _one_line(e)
            fns.pop(x)
            _sync()
    # baselines' errors on the same slice (recorded; a failure to run is recorded when timing)
    for x in names:
        try:
            errs[x] = _check(op, fns[x](), ref, sl, tol)[1]
        except Exception:  # noqa: BLE001 - reported by the timer below
            pass
    fns = {x: f for x, f in fns.items() if not whys.get(x)}   # a wrong kernel is recorded, never timed
    times, failed = timer.run(fns)
    p50s = {x: quantiles(t)[1] for x, t in times.items() if t}
    cand_p50, prim_p50 = p50s.get("candidate"), p50s.get(PRIMARY[op])
    for x in [*own, *names]:
        kind = "candidate" if x == "candidate" else ("variant" if x in variants else
                                                     "training" if x == TRAINING else "baseline")
        bad = _not_timed(x, broke, whys, times, failed)
        if bad:
            emit(op, shape, x, kind, rel_err=errs.get(x) if bad["status"] == "incorrect" else None, **bad)
            continue
        p20, p50, p80 = quantiles(times[x])
        # the training row's work is the forward's and the backward's together, against SDPA's both ways
        work = flops + (get_op("attention").flops(case) if x == TRAINING else 0)
        prim = p50s.get("sdpa_fwd_bwd") if x == TRAINING else prim_p50
        tfl = work / (p50 * 1e-3) / 1e12
        emit(op, shape, x, kind, status="ok", p20_ms=p20, p50_ms=p50, p80_ms=p80, reps=len(times[x]), tflops=tfl,
             gbps=None if x == TRAINING else nbytes / (p50 * 1e-3) / 1e9, pct_matmul_ceiling=100 * tfl / _mm_ceiling(ceil),
             speedup_vs_primary=(prim / p50) if prim else None,
             candidate_speedup=(p50 / cand_p50) if cand_p50 and x != TRAINING else None, rel_err=errs.get(x),
             note="forward (run_with_lse) + backward; speedup_vs_primary is against sdpa_fwd_bwd"
             if x == TRAINING else None)
    # one line per shape as it ends, for a log read before (or without) the CSV; "vs X: r" is the candidate's
    # speedup over X, as in the summary table
    line = f"  {op} B{b} H{h} N{n} D{d} {'causal' if causal else 'full'}: "
    line += f"candidate {cand_p50:.3f} ms" if cand_p50 else "candidate not timed"
    if cand_p50 and prim_p50:
        line += f"; vs {PRIMARY[op]}: {prim_p50 / cand_p50:.2f}x"
    if TRAINING in p50s and "sdpa_fwd_bwd" in p50s:
        line += f"; forward + backward vs sdpa_fwd_bwd: {p50s['sdpa_fwd_bwd'] / p50s[TRAINING]:.2f}x"
    for x in variants:
        # a variant timed beside a candidate that was not (wrong at this shape) has a time but no ratio
        bad = _not_timed(x, broke, whys, times, failed)
        if bad:
            line += f"; vs {x}: {bad['status']}"
        elif cand_p50:
            line += f"; vs {x}: {quantiles(times[x])[1] / cand_p50:.2f}x"
        else:
            line += f"; {x}: {quantiles(times[x])[1]:.3f} ms"
    print(line, flush=True)
    del q, k, v, do, fns, a


def _not_timed(x: str, broke: dict[str, str], whys: dict[str, str], times: dict[str, list[float]],
               failed: dict[str, str]) -> dict[str, str] | None:
    """The row fields of a contestant that has no timing (it raised, was wrong, or failed in the timer)."""
    if x in broke:
        return {"status": "failed", "note": broke[x]}
    if whys.get(x):
        return {"status": "incorrect", "note": whys[x][:300]}
    if x in failed or x not in times:
        return {"status": "failed", "note": failed.get(x, "did not run")}
    return None


def _check(op: str, got: Any, ref: Any, sl: tuple[slice, slice], tol: Tolerance) -> tuple[str, float]:
    """(why it is wrong or "", relative error) of a kernel's output against the fp64 reference on slice sl."""
    if op == "attention":
        return compare_tensor("out", got[sl].cpu(), ref, tol), rel_err(got[sl], ref)
    whys = []
    for name_i, got_i, ref_i in zip(("dq", "dk", "dv"), got, ref):
        rms = float(ref_i.pow(2).mean().sqrt())   # the backward's atol scales with the gradient's size
        whys.append(compare_tensor(name_i, got_i[sl].cpu(), ref_i, Tolerance(tol.atol * rms, tol.rtol, tol.norm_rtol)))
    return "; ".join(w for w in whys if w), max(rel_err(gi[sl], ri) for gi, ri in zip(got, ref))


def _mm_ceiling(ceil: dict[str, Any]) -> float:
    m = ceil["matmul_tflops"]
    return m.get("bfloat16") or m["float32"]


def bench_adamw(cand: Any, args: argparse.Namespace, timer: Timer, ceil: dict[str, Any], emit: Callable[..., None],
                variants: dict[str, Any] | None = None) -> None:
    spec = get_op("adamw")
    variants = variants or {}
    kernels = {"candidate": cand, **variants}
    # correctness on the GPU at gpt-mini (the evaluator checked the rest): one step against the fp64 reference
    mini = Case("gpt-mini", {"shapes": gpt_param_shapes(*PRESETS["gpt-mini"])})
    inp = spec.make_inputs(mini, 1)
    expected = spec.reference(inp)
    whys, broke = {}, {}
    for x, mod in kernels.items():
        dev = {k_: [t.to(DEV).clone() for t in v_] for k_, v_ in inp.tensors.items()}
        try:
            mod.run(dev["params"], dev["grads"], dev["exp_avgs"], dev["exp_avg_sqs"], **inp.args)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is its row; the candidate's failure is the op's
            if x == "candidate":
                raise
            broke[x] = _one_line(e)
            _sync()
            continue
        whys[x] = spec.compare(inp, expected, {k_: [t.cpu() for t in dev[k_]] for k_ in spec.outputs})
    shapes = gpt_param_shapes(*PRESETS["gpt2-124m" if DEV == "cuda" else "gpt-tiny"])
    n = sum(math.prod(s) for s in shapes)
    shape = dict(B="", H="", N=n, D="", causal="", dtype="float32")
    g = torch.Generator(device=DEV).manual_seed(7)
    ps = [torch.randn(s, device=DEV, generator=g) for s in shapes]
    gs = [torch.randn(s, device=DEV, generator=g) * 0.1 for s in shapes]
    ms = [torch.randn(s, device=DEV, generator=g) * 0.05 for s in shapes]
    vs = [torch.rand(s, device=DEV, generator=g) * 0.01 for s in shapes]
    hp = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    baselines = spec.baselines(DEV)
    runs = {**{x: m.run for x, m in kernels.items() if x in whys and not whys[x]}, **baselines}
    fns: dict[str, Callable[[], Any]] = {}
    for name, f in runs.items():
        # each contestant its own buffers (a step changes them), the same starting values
        c = [[t.clone() for t in lst] for lst in (ps, gs, ms, vs)]
        step = [1000]

        def call(f=f, c=c, step=step):
            step[0] += 1
            f(c[0], c[1], c[2], c[3], step=step[0], **hp)
        fns[name] = call
    times, failed = timer.run(fns)
    cand_p50 = quantiles(times["candidate"])[1] if "candidate" in times else None
    prim_p50 = quantiles(times["adamw_fused"])[1] if "adamw_fused" in times else None
    for x in [*kernels, *baselines]:
        kind = "candidate" if x == "candidate" else ("variant" if x in variants else "baseline")
        bad = _not_timed(x, broke, whys, times, failed)
        if bad:
            emit("adamw", shape, x, kind, **bad)
            continue
        p20, p50, p80 = quantiles(times[x])
        gbps = 28.0 * n / (p50 * 1e-3) / 1e9
        emit("adamw", shape, x, kind, status="ok", p20_ms=p20, p50_ms=p50, p80_ms=p80, reps=len(times[x]),
             tflops=16.0 * n / (p50 * 1e-3) / 1e12, gbps=gbps, pct_copy_ceiling=100 * gbps / ceil["copy_gbps"],
             speedup_vs_primary=(prim_p50 / p50) if prim_p50 else None,
             candidate_speedup=(p50 / cand_p50) if cand_p50 else None, note="gpt2-124m, 148 tensors, 28 B/param")


# -- probes -----------------------------------------------------------------------------------------------------
# A kernel never run on this GPU can hang (a warp-specialised loop whose barriers never meet) or fault (and a
# fault loses the CUDA context for the whole process, every later shape with it). So each attention contestant,
# the candidate and each variant, first runs in a child process of its own, all of them at once: at the smallest
# N of each (D, causal) to be timed, checked against fp64. Their Triton compiles run on the host's cores side by
# side, into the cache that the timing process then reads. A contestant whose child fails, faults or passes its
# time is recorded as failed and never runs in this process.
def probe_children(jobs: dict[str, list[str]], timeout: float, workers: int) -> dict[str, str]:
    """Run each job (label -> argv) as a child process, ``workers`` at a time, each for at most ``timeout``
    seconds; {label: why it failed, or "" where it exited 0}."""
    pending, running, out = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < max(workers, 1):
            label, argv = pending.pop(0)
            f = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            running[label] = (proc, f, time.monotonic())
        time.sleep(0.05)
        for label, (proc, f, t_start) in list(running.items()):
            rc = proc.poll()
            late = rc is None and time.monotonic() - t_start > timeout
            if rc is None and not late:
                continue
            if late:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
                except OSError:
                    pass
                proc.wait()
            f.seek(0)
            lines = [x.strip() for x in f.read().splitlines() if x.strip()]
            f.close()
            del running[label]
            if late:
                out[label] = f"probe: no answer in {timeout:.0f} s (a hang?), killed"
            elif rc != 0:
                out[label] = f"probe: exit {rc}: {lines[-1][:240] if lines else 'no output'}"
            else:
                out[label] = ""
    return out


def probe_argv(op: str, path: str, fwd_path: str, point: dict[str, Any], args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--probe-op", op, "--probe-path", path,
            "--probe-fwd", fwd_path, "--probe-point", json.dumps(point)]
    if args.only_n:
        argv += ["--only-n", args.only_n]
    if args.dry_run_cpu:
        argv.append("--dry-run-cpu")
    return argv


def probe_one(args: argparse.Namespace) -> int:
    """The child: one contestant at the smallest N of each (D, causal) to be timed; exit 1 if it is wrong."""
    op = args.probe_op
    mod = load_module(args.probe_path, "kt_probe")
    point = json.loads(args.probe_point)
    if point:
        mod.KERNELTUNE["params"] = {**mod.KERNELTUNE.get("params", {}), **point}
    fwd = load_module(args.probe_fwd, "kt_probe_fwd") if op == "attention_backward" else None
    spec = get_op(op)
    dtname = "bfloat16" if HALF == torch.bfloat16 else "float16"
    tol = spec.tolerance(dtname)
    smallest: dict[tuple[int, bool], tuple[int, int, int]] = {}
    for b, h, n, d, causal in attention_shapes(args.only_n):
        if (d, causal) not in smallest or n < smallest[(d, causal)][2]:
            # B and H of 2: Triton compiles an int argument of 1 as a constant, so 2 is what most shapes run
            smallest[(d, causal)] = (min(b, 2), min(h, 2), n)
    for (d, causal), (b, h, n) in smallest.items():
        g = torch.Generator(device=DEV).manual_seed(99 + n + d + causal)
        q, k, v, do = (torch.randn(b, h, n, d, device=DEV, generator=g).to(HALF) for _ in range(4))
        sl = (slice(0, b), slice(0, h))
        if op == "attention":
            got, ref = mod.run(q, k, v, causal=causal), attention_fp64(q, k, v, causal, None)[0]
        else:
            o, lse = fwd.run_with_lse(q, k, v, causal=causal)
            got, ref = mod.run(q, k, v, o, do, lse, causal=causal), attention_bwd_fp64(q, k, v, do, causal, None)
        _sync()
        why = _check(op, got, ref, sl, tol)[0]
        if why:
            print(f"wrong at B{b} H{h} N{n} D{d} {'causal' if causal else 'full'}: {why[:200]}", flush=True)
            return 1
    print(f"ok at {len(smallest)} (D, causal) pairs", flush=True)
    return 0


def probe_contestants(ops: list[str], chosen: dict[str, tuple[str, str, str]],
                      also: dict[str, list[dict[str, Any]]], variants: dict[str, dict[str, Any]],
                      args: argparse.Namespace) -> dict[tuple[str, str], str]:
    """{(op, contestant): why} for the attention contestants whose probe failed (see above)."""
    jobs, keys = {}, {}
    for op in ops:
        if op not in ("attention", "attention_backward"):
            continue
        named = [("candidate", {})] + list(zip(variants.get(op, {}), also.get(op, [])))
        for name, point in named:
            label = f"{op}: {name}"
            jobs[label] = probe_argv(op, chosen[op][0], chosen["attention"][0], point, args)
            keys[label] = (op, name)
    if not jobs:
        return {}
    t = time.monotonic()
    print(f"probes: {len(jobs)} contestants, each in a child process ({args.probe_s:.0f} s at most)", flush=True)
    res = probe_children(jobs, args.probe_s, min(len(jobs), os.cpu_count() or 1))
    for label, why in res.items():
        if why:
            print(f"  {label}: {why}", flush=True)
    print(f"probes: {sum(1 for w in res.values() if not w)} of {len(jobs)} passed "
          f"({time.monotonic() - t:.0f} s)", flush=True)
    return {keys[label]: why for label, why in res.items() if why}


# -- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the CSV (and plots, if matplotlib is there)")
    ap.add_argument("--db", default=None, help="kerneltune store to take each op's best candidate from")
    ap.add_argument("--ops", default="adamw,attention,attention_backward")
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds: shapes not started by then are skipped")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--turn-ms", type=float, default=15.0, help="target time of one contestant's turn")
    ap.add_argument("--compile-n", default="1024,4096", help="N values where torch_compile is timed")
    ap.add_argument("--compile-ops", default="attention,attention_backward",
                    help="ops where torch_compile is timed (each shape is a compile of its own: device time)")
    ap.add_argument("--only-n", default=None, help="comma-separated N values (default: all six)")
    ap.add_argument("--csv", default="issue8.csv")
    ap.add_argument("--also", default=None, help="'op:KNOB=V[,KNOB=V][;op:...]', the candidate at other knob values "
                    "timed beside it (see the module doc)")
    ap.add_argument("--dry-run-cpu", action="store_true", help="check this script on a CPU: tiny shapes, fp16, "
                    "Triton's interpreter (set TRITON_INTERPRET=1); its timings mean nothing")
    ap.add_argument("--probe-s", type=float, default=150.0, help="seconds each attention contestant's probe (a "
                    "child process, all at once) may take; 0: no probes")
    for x in ("--probe-op", "--probe-path", "--probe-fwd", "--probe-point"):  # the probe's child (internal)
        ap.add_argument(x, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # bad numbers are a one-line usage error here, not a traceback minutes into a GPU run
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: give at least 1 round")
    for flag, value in (("--only-n", args.only_n), ("--compile-n", args.compile_n)):  # --compile-n '': none
        ns = [x.strip() for x in (value or "").split(",") if x.strip()]
        if not all(x.isdigit() and int(x) > 0 for x in ns) or (flag == "--only-n" and value is not None and not ns):
            ap.error(f"{flag} {value!r}: give comma-separated N values, e.g. 1024,4096")
    also = parse_also(args.also)
    bad = sorted(set(also) - set(TEMPLATES))
    if bad:
        print(f"bench_gpu: --also takes variants of {', '.join(TEMPLATES)}, not {bad}", file=sys.stderr)
        return 2
    global DEV, HALF
    if args.dry_run_cpu:
        DEV, HALF = "cpu", torch.float16
    elif not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.probe_op:
        return probe_one(args)
    t0 = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    info, ver = device_info(DEV), versions()
    git = git_commit(ROOT)  # '+dirty' when the tree has changes: the commit alone is not what ran
    ceil = measure_ceilings(DEV)
    print(f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul {_mm_ceiling(ceil):.0f} TFLOP/s "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = os.path.join(args.out, args.csv)
    f = open(path, "a", newline="")
    w = csv.DictWriter(f, fieldnames=FIELDS)
    if f.tell() == 0:
        w.writeheader()
    chosen: dict[str, tuple[str, str, str]] = {}
    common = {"timestamp": stamp, "device": info["name"], "device_key": info["key"],
              "capability": info.get("capability"), "torch": ver["torch"], "triton": ver.get("triton"),
              "kerneltune": ver["kerneltune"], "git": git, "copy_gbps": round(ceil["copy_gbps"], 1),
              "matmul_bf16_tflops": round(_mm_ceiling(ceil), 1)}
    rows: list[dict[str, Any]] = []

    def emit(op: str, shape: dict[str, Any], contestant: str, kind: str, **vals: Any) -> None:
        name, hsh = (chosen[op][1], chosen[op][2][:16]) if op in chosen else ("", "")
        # the shape named with its mask and dtype, as the ops' case names are: `kerneltune report` keys its series
        # by the name, and a causal and a full row under one name were one series
        row = {**common, "op": op, **shape, "shape": dims_shape(shape),
               "contestant": name if contestant == "candidate" else contestant, "kind": kind, "candidate": name,
               "candidate_hash": hsh, **vals}
        row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
        w.writerow(row)
        f.flush()
        rows.append(row)

    emit("ceiling", {}, "copy_gbps", "ceiling", status="ok", gbps=ceil["copy_gbps"], note="d2d copy, read + write")
    emit("ceiling", {}, "matmul_bf16", "ceiling", status="ok", tflops=_mm_ceiling(ceil),
         note="8192^3 bf16 matmul, torch")
    timer = Timer(args.rounds, args.turn_ms)
    work = tempfile.mkdtemp(prefix="kt_bench_")
    ops = [o for o in args.ops.split(",") if o]
    mods: dict[str, Any] = {}
    for op in set(ops) | ({"attention"} if "attention_backward" in ops else set()):
        chosen[op] = pick_candidate(op, args.db, info["key"], work)
        mods[op] = load_module(chosen[op][0], f"kt_bench_{op}")
        print(f"{op}: {chosen[op][1]} ({os.path.relpath(chosen[op][0], ROOT) if chosen[op][0].startswith(ROOT) else 'from the store'})"
              f" params {getattr(mods[op], 'KERNELTUNE', {}).get('params')}", flush=True)
    variants = {op: load_variants(op, chosen[op][0], also[op]) for op in also if op in chosen}
    for op, vs in variants.items():
        print(f"{op}: variants timed beside it: {', '.join(vs)}", flush=True)
    failed = probe_contestants(ops, chosen, also, variants, args) if args.probe_s > 0 else {}
    for (op, name), why in failed.items():
        if name == "candidate":  # the op's every shape would fail the same way (or hang): not timed
            emit(op, {}, "candidate", "candidate", status="failed", note=why)
            ops = [o for o in ops if o != op]
            if op == "attention" and "attention_backward" in ops:  # its o and lse come from this forward
                emit("attention_backward", {}, "candidate", "candidate", status="failed",
                     note=f"not timed: the forward's probe failed ({why[:200]})")
                ops.remove("attention_backward")
        else:
            emit(op, {}, name, "variant", status="failed", note=why)
            variants[op].pop(name)
    left = max(args.deadline - (time.monotonic() - t0), 0)
    share = {"adamw": 0.1, "attention": 0.45, "attention_backward": 0.45}
    for op in ops:
        t_op = time.monotonic()
        budget = left * share.get(op, 0.3) / max(sum(share.get(o, 0.3) for o in ops), 1e-9)
        try:
            if op == "adamw":
                bench_adamw(mods[op], args, timer, ceil, emit, variants.get(op))
            else:
                bench_attention(op, mods[op], mods["attention"], args, timer, ceil, emit, t_op + budget,
                                variants.get(op))
        except Exception as e:  # noqa: BLE001 - one op's failure must not lose the others' numbers
            emit(op, {}, "candidate", "candidate", status="error", note=f"{type(e).__name__}: {str(e)[:300]}")
            _empty_cache()
        print(f"{op}: done in {time.monotonic() - t_op:.0f} s", flush=True)
    f.close()
    with open(os.path.join(args.out, "issue8_meta.json"), "w") as mf:
        json.dump({"device": info, "versions": ver, "git": git, "ceilings": ceil, "timestamp": stamp,
                   "candidates": {k: {"name": v[1], "hash": v[2],
                                      "params": getattr(mods[k], "KERNELTUNE", {}).get("params")}
                                  for k, v in chosen.items()},
                   "variants": {k: {name: m.KERNELTUNE["params"] for name, m in v.items()}
                                for k, v in variants.items()}},
                  mf, indent=1, default=str)
    print_summary(rows)
    print(f"bench_gpu: {len(rows)} rows in {path}, {time.monotonic() - t0:.0f} s")
    return 0


def print_summary(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'op':<19}{'shape':<34}{'cand ms':>9}  {'vs primary':>10}  {'best baseline':<16}{'vs best':>8}  "
          f"{'% ceil':>7}   (fwd+bwd: kerneltune's forward with lse + backward, vs sdpa_fwd_bwd)")
    by: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    gone = [r for r in rows if r["op"] != "ceiling" and not r["shape"]]  # contestants whose probe failed
    for r in rows:
        if r["op"] != "ceiling" and r["shape"]:
            by.setdefault((r["op"], r["shape"], r.get("causal")), []).append(r)
    for (op, tag, _), rs in by.items():  # the shape names its mask and dtype
        cand = next((r for r in rs if r["kind"] == "candidate"), None)
        base = [r for r in rs if r["kind"] == "baseline" and r.get("status") == "ok" and r["contestant"] != "sdpa_fwd_bwd"]
        if cand is None or cand.get("status") != "ok":
            print(f"{op:<19}{tag:<34}{(cand or {}).get('status', '—'):>9}")
            continue
        best = min(base, key=lambda r: r["p50_ms"]) if base else None
        pct = cand.get("pct_matmul_ceiling") or cand.get("pct_copy_ceiling")
        var = "  ".join(f"{r['contestant']}: {r['candidate_speedup']:.2f}x" if r.get("status") == "ok"
                        else f"{r['contestant']}: {r.get('status')}" for r in rs if r["kind"] == "variant")
        print(f"{op:<19}{tag:<34}{cand['p50_ms']:>9.3f}  {cand.get('speedup_vs_primary') or 0:>9.2f}x  "
              f"{(best or {}).get('contestant', '—'):<16}{(best['p50_ms'] / cand['p50_ms']) if best else 0:>7.2f}x  "
              f"{pct or 0:>6.1f}%" + (f"  vs {var}" if var else ""))
        for t in (r for r in rs if r["kind"] == "training"):  # the forward + backward, against SDPA's both ways
            print(f"{'  fwd+bwd':<19}{tag:<34}" + (f"{t['p50_ms']:>9.3f}  {t.get('speedup_vs_primary') or 0:>9.2f}x  "
                                                 f"{'sdpa_fwd_bwd':<16}{'':>8}  {t['pct_matmul_ceiling']:>6.1f}%"
                                                 if t.get("status") == "ok" else f"{t.get('status'):>9}"))
    for r in gone:
        print(f"{r['op']:<19}not timed: {r['contestant']}: {r['status']}, {r['note']}")


if __name__ == "__main__":
    sys.exit(main())
