"""Compile the Triton templates for an NVIDIA GPU on a machine without one: errors, registers, spills, shared memory.

    python benchmarks/gpu/compile_check.py [--arch 90] [--ops attention,attention_backward,adamw]
        [--also 'attention:TMA=1;attention_backward:BLOCK_N1=128'] [--space 8]
        [--grid 'attention:BLOCK_M=64|128,num_warps=4|8'] [--cases 1] [--n 1024] [--dtype bf16] [--csv FILE]
        [--json]

Device time is short; a compile error found on the GPU costs a call. This runs each template's own `run()` on
small CPU tensors with Triton's launches turned into compiles for the target (Triton's `warmup` path with a
target-only driver): the full pipeline down to a cubin through the wheel's ptxas, for the same kernels and
specialisations that the bench's shapes take (bf16, or --dtype fp16; head dims 64 and 128, causal and full, N a
multiple of every block, or --n; AdamW on a GPT-like parameter list). Nothing runs, so nothing here says anything about speed or
correctness (the interpreter tests and the GPU do that).

Per point and kernel it reports: compiled or the compiler's error (one line); registers per thread; the stack
frame and the spill stores in the SASS (STL: a register spilled to it; any is flagged); shared memory against
the target's per-block limit (over it: the launch would fail and the template's run time fallback takes fewer
stages or smaller blocks); wgmma instructions (Hopper's tensor-core MMA), TMA copies, 128-bit global
accesses and global atomics (how many of them 128-bit) in the PTX, and whether Triton warp-specialised the
kernel (its warp groups' register budgets, setmaxnreg, in the PTX, and their values from the SASS; num_warps
is then the whole program's). Exit 1 when any point failed to compile.

Points: each template's defaults, the --also variants (bench_gpu.py's syntax: the candidate at other knob
values), --grid (every combination of the listed values, restrictions ignored: to find which points spill),
and --space N random valid points of its space (seeded). --csv writes a row per kernel and point. Use the
Triton of the machine that will run them (see the bench CSV's `triton` column) for a verdict that carries over.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import re
import subprocess
import sys
from typing import Any, Iterator

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

TEMPLATES = {"attention": "candidates/attention/triton_fa2.py",
             "attention_backward": "candidates/attention_backward/triton_fa2_bwd.py",
             "adamw": "candidates/adamw/triton_mt_table.py"}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}  # bytes per block


class CompileOnly:
    """Triton's launches become compiles for ``arch`` while the context is open (no GPU, no launch)."""

    def __init__(self, arch: int) -> None:
        self.arch, self.kernels = arch, []

    def __enter__(self) -> "CompileOnly":
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        target = GPUTarget("cuda", self.arch, 32)

        class TargetOnly:  # what a warm-up asks of the driver: a device, a stream, a target
            def get_current_device(self) -> int:
                return 0

            def get_current_stream(self, device: Any = None) -> int:
                return 0

            def get_current_target(self) -> Any:
                return target

            def get_active_torch_device(self) -> torch.device:
                return torch.device("cpu")

        if not hasattr(driver, "set_active") or not hasattr(JITFunction, "run"):
            raise SystemExit("compile_check: this Triton has no driver.set_active / JITFunction.run to compile through")
        self._run, self._cls = JITFunction.run, JITFunction
        driver.set_active(TargetOnly())
        original, kernels = JITFunction.run, self.kernels

        def compile_only(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            k = original(fn, *args, grid=grid, warmup=True, **kwargs)
            kernels.append((fn.fn.__name__, k))
            return k

        JITFunction.run = compile_only
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cls.run = self._run   # the target-only driver stays: without a GPU there is no other to go back to


def resources(kernel: Any, arch: int) -> dict[str, Any]:
    """Registers, stack frame (spills), local and shared memory of a compiled kernel, and what its PTX uses."""
    import tempfile

    import triton

    md = kernel.metadata
    ptx = kernel.asm.get("ptx", "")
    glob = re.findall(r"\b(ld|st)\.global\S*", ptx)
    wide = re.findall(r"\b(ld|st)\.global\S*\.v4\.b32", ptx)
    atomics = re.findall(r"\b(?:atom|red)\.global\S*", ptx)
    out = {"num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
           "wgmma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor"),
           "global_access": len(glob), "global_128bit": len(wide),
           "atomics": len(atomics), "atomics_128bit": sum(".v4." in a for a in atomics),
           # warp specialisation: Triton gives each warp group of a specialised kernel its register budget
           "setmaxnreg": ptx.count("setmaxnreg")}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage, sass = (_run([tool, flag, f.name]) for flag in ("--dump-resource-usage", "-sass"))
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m:
        out.update(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(3)))
    if sass:   # a register spill is a store to the stack (STL) and a load back (LDL) in the SASS
        out.update(spill_stores=len(re.findall(r"\bSTL\b", sass)), spill_loads=len(re.findall(r"\bLDL\b", sass)))
        # a warp-specialised kernel's register budgets: what its warp groups give back and take (USETMAXREG)
        budgets = {kind: sorted({int(v, 16) for k, v in re.findall(
            r"USETMAXREG\.(\w+)\.CTAPOOL\s+(?:UP\d+,\s*)?(0x[0-9a-f]+)", sass) if k == kind})
            for kind in ("DEALLOC", "TRY_ALLOC")}
        if any(budgets.values()):
            out["ws_regs"] = (f"down to {'/'.join(map(str, budgets['DEALLOC']))}, "
                              f"up to {'/'.join(map(str, budgets['TRY_ALLOC']))}")
    flags = []
    if out.get("spill_stores") or out.get("local"):
        flags.append(f"spills: {out.get('spill_stores', 0)} stores to a {out.get('stack', 0)} B stack frame a thread")
    limit = SHARED_LIMIT.get(arch)
    if limit and md.shared > limit:
        flags.append(f"shared {md.shared} B > {limit} B: the launch fails, the run time fallback shrinks it")
    out["flags"] = flags
    return out


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def load(op: str, params: dict[str, Any]) -> Any:
    """A fresh copy of the op's template module at ``params`` (over its defaults)."""
    from bench_gpu import load_module  # noqa: E402 - benchmarks/ is on the path (see __main__)

    mod = load_module(os.path.join(ROOT, TEMPLATES[op]), f"kt_cc_{op}_{abs(hash(str(params)))}")
    mod.KERNELTUNE["params"] = {**mod.KERNELTUNE["params"], **params}
    return mod


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cases(op: str, n: int = 1024, dtype: str = "bf16") -> Iterator[tuple[str, Any]]:
    """(label, call(mod)) per specialisation the bench's shapes take: small tensors, nothing runs. n: the
    attention cases' sequence length (1024, a multiple of every block, as the bench's; another n compiles the
    specialisations of a ragged N, and labels the cases with it); dtype: the attention inputs' (DTYPES)."""
    if op == "adamw":
        from kerneltune.ops.adamw import PRESETS, gpt_param_shapes

        shapes = gpt_param_shapes(*PRESETS["gpt-tiny"])
        lists = [[torch.zeros(s) for s in shapes] for _ in range(4)]
        yield "gpt-tiny fp32", lambda mod: mod.run(*lists, step=3, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                                                   weight_decay=0.1)
        return
    for d in (128, 64):
        for causal in (True, False):
            q, k, v, o, do = (torch.zeros(1, 2, n, d, dtype=DTYPES[dtype]) for _ in range(5))
            lse = torch.zeros(1, 2, n)
            label = f"D{d} {'causal' if causal else 'full'} {dtype}" + ("" if n == 1024 else f" N{n}")
            if op == "attention":
                yield label, (lambda mod, q=q, k=k, v=v, c=causal: mod.run_with_lse(q, k, v, causal=c))
            else:
                yield label, (lambda mod, a=(q, k, v, o, do, lse), c=causal: mod.run(*a, causal=c))


def parse_grid(spec: str) -> list[dict[str, Any]]:
    """'OP:KNOB=a|b,KNOB=c|d' -> every combination as a point (the other knobs at the template's defaults)."""
    from bench_gpu import parse_also  # noqa: E402 - benchmarks/ is on the path (see __main__)

    (_, (point,)), = parse_also(spec).items()
    knobs = {k: [int(v) if v.lstrip("-").isdigit() else v for v in str(vals).split("|")] for k, vals in point.items()}
    return [dict(zip(knobs, combo)) for combo in itertools.product(*knobs.values())]


def points(op: str, also: list[dict[str, Any]], n_space: int, seed: int,
           grids: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    from kerneltune.search.space import Space, load_template

    t = load_template(os.path.join(ROOT, TEMPLATES[op]))
    out: list[dict[str, Any]] = [{}] + also + [g for g in grids or [] if g not in also]
    if n_space and t is not None:
        rng = random.Random(seed)
        space = Space([t])
        for _ in range(n_space):
            p = space.random_point(rng)
            if p is not None and p.as_dict() not in out:
                out.append(p.as_dict())
    return out


def check(op: str, point: dict[str, Any], arch: int, n_cases: int = 0, n: int = 1024,
          dtype: str = "bf16") -> list[dict[str, Any]]:
    rows = []
    for i, (label, call) in enumerate(cases(op, n, dtype)):
        if n_cases and i >= n_cases:
            break
        row: dict[str, Any] = {"op": op, "point": point, "case": label}
        with CompileOnly(arch) as cc:
            try:
                call(load(op, point))
            except Exception as e:  # noqa: BLE001 - a compile error is this point's verdict, the others go on
                msg = str(e).strip().splitlines()
                row.update(status="error", error=f"{type(e).__name__}: {msg[-1][:300] if msg else ''}")
        if "status" not in row:
            row.update(status="ok", kernels={name: resources(k, arch) for name, k in cc.kernels})
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as one number: 90 = H100/H200")
    ap.add_argument("--ops", default="attention,attention_backward,adamw")
    ap.add_argument("--also", default=None, help="'op:KNOB=V[,KNOB=V][;op:...]': more points (bench_gpu.py's syntax)")
    ap.add_argument("--space", type=int, default=0, help="also N random valid points of each template's space")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=0, help="at most this many specialisations an op (0: all four)")
    ap.add_argument("--n", type=int, default=1024, help="the attention cases' N (default 1024, a multiple of every "
                    "block; e.g. 1000 for the masks of a ragged N)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the attention inputs' dtype (default bf16, "
                    "the bench's)")
    ap.add_argument("--template", action="append", default=[], help="OP=PATH: check this file for OP instead of "
                    f"its bench template ({', '.join(f'{k}={v}' for k, v in TEMPLATES.items())})")
    ap.add_argument("--grid", action="append", default=[], help="'OP:KNOB=a|b,KNOB=c|d': every combination of "
                    "these values, restrictions ignored (to find which points spill; repeatable)")
    ap.add_argument("--csv", default=None, help="also write one row per kernel and point to this CSV")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    from bench_gpu import parse_also  # noqa: E402 - benchmarks/ is this script's parent's folder

    also = parse_also(args.also)
    for spec in args.template:
        op, eq, path = spec.partition("=")
        if not eq or op not in TEMPLATES or not os.path.exists(path):
            print(f"compile_check: --template {spec!r}: write OP=PATH with OP one of {', '.join(TEMPLATES)} "
                  "and an existing file", file=sys.stderr)
            return 2
        TEMPLATES[op] = os.path.abspath(path)
    grids: dict[str, list[dict[str, Any]]] = {}
    for spec in args.grid:
        grids.setdefault(spec.partition(":")[0].strip(), []).extend(parse_grid(spec))
    import triton

    rows = []
    for op in (o for o in args.ops.split(",") if o):
        if op not in TEMPLATES:
            print(f"compile_check: unknown op {op!r} (use {', '.join(TEMPLATES)})", file=sys.stderr)
            return 2
        for point in points(op, also.get(op, []), args.space, args.seed, grids.get(op)):
            new = check(op, point, args.arch, args.cases, args.n, args.dtype)
            rows += new
            if not args.json:
                _print(new)
    bad = [r for r in rows if r["status"] != "ok"]
    if args.csv:
        write_csv(args.csv, rows, triton.__version__, args.arch)
    if args.json:
        print(json.dumps({"triton": triton.__version__, "arch": args.arch, "rows": rows}, indent=1))
    else:
        print(f"triton {triton.__version__}, sm{args.arch}: {len(rows) - len(bad)} of {len(rows)} compiled"
              + (f"; failed: {sorted({json.dumps(r['point']) + ' ' + r['op'] for r in bad})}" if bad else ""))
    return 1 if bad else 0


CSV_FIELDS = ["triton", "arch", "op", "case", "point", "kernel", "status", "num_warps", "num_stages", "regs",
              "stack", "spill_stores", "shared", "wgmma", "tma", "global_128bit", "global_access", "error",
              "atomics", "atomics_128bit", "setmaxnreg", "ws_regs"]


def write_csv(path: str, rows: list[dict[str, Any]], version: str, arch: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            head = {"triton": version, "arch": arch, "op": r["op"], "case": r["case"], "status": r["status"],
                    "point": ",".join(f"{k}={v}" for k, v in r["point"].items()) or "defaults"}
            if r["status"] != "ok":
                w.writerow({**head, "error": r["error"]})
            for name, k in (r.get("kernels") or {}).items():
                w.writerow({**head, "kernel": name, **k})


def _print(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        head = f"{r['op']:<19} {json.dumps(r['point']) if r['point'] else 'defaults':<40} {r['case']:<18}"
        if r["status"] != "ok":
            print(f"{head} ERROR {r['error']}", flush=True)
            continue
        for name, k in r["kernels"].items():
            print(f"{head} {name:<16} w{k['num_warps']} s{k['num_stages']} regs {k.get('regs', '?'):>3} "
                  f"stack {k.get('stack', '?'):>4} STL {k.get('spill_stores', '?'):>3} shared {k['shared'] // 1024:>3} KiB wgmma {k['wgmma']:>3} "
                  f"tma {k['tma']:>2} 128-bit ld/st {k['global_128bit']:>2} of {k['global_access']:>2}"
                  + (f" atomics {k['atomics_128bit']} of {k['atomics']} 128-bit" if k.get("atomics") else "")
                  + ((" warp-specialised" + (f" (registers {k['ws_regs']})" if k.get("ws_regs") else ""))
                     if k.get("setmaxnreg") else "")
                  + ("  " + "; ".join(k["flags"]) if k["flags"] else ""), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
