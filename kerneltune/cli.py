"""`kerneltune …`: the command line (typer + rich). Every reporting command has --json.

Exit codes: 0 success (every candidate passed), 1 a candidate did not pass / a check failed,
2 usage error (bad option, missing file, no GPU for --device cuda …).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

# an evaluation whose timing the evaluator marked noisy (timed twice on a busy machine) is never ranked: the
# leaderboard's own test, one definition
from kerneltune.store.db import QUIET as _QUIET

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find faster attention and optimizer kernels; every number verified and measured side by side.")
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

DeviceOpt = typer.Option("cpu", "--device", help="cpu or cuda")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON on stdout")
DbOpt = typer.Option(None, "--db", help="SQLite store (default: the user cache dir, or $KERNELTUNE_DB)")


def usage_error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)  # one line, never wrapped
    raise typer.Exit(2)


def _check_device(device: str) -> str:
    device = device.lower()
    if device not in ("cpu", "cuda"):
        usage_error(f"--device {device!r}: use cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            usage_error("--device cuda: no CUDA GPU on this machine (torch sees none); use --device cpu")
    return device


def _open_store(db: Optional[str], create: bool = True) -> Any:
    """The store (``create=False``: reading commands, which never make one: a missing file is an error)."""
    from kerneltune.store.db import Store, StoreError

    try:
        return Store(db, create=create)
    except StoreError as e:
        usage_error(str(e))


def _parse_shapes(op: str, shapes: Optional[list[str]], dtype: Optional[str], device: str = "cpu") -> Any:
    from kerneltune.ops import get_op
    from kerneltune.search.runner import timed_cases

    try:  # the shapes given, or with only --dtype the op's default shapes in that dtype (as a search times them)
        return timed_cases(get_op(op), device, shapes, dtype)
    except ValueError as e:
        usage_error(str(e))


def _progress_ctx(enabled: bool) -> Any:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                    transient=True, disable=not enabled)


def _fmt(x: Optional[float], spec: str = ".3f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


OLDER_CHECKS_MARK = " [yellow](older checks)[/]"  # passed before the op gained check cases
NOISY_MARK = " [yellow](noisy)[/]"  # after a ratio the noise gate did not trust (timed twice on a busy machine)
STATUS_STYLE = {"passed": "green", "incorrect": "red", "rejected": "magenta", "compile_error": "yellow",
                "crashed": "red", "timeout": "yellow", "unsupported": "dim"}


def _run_evaluations(paths: list[str], *, device: str, timeout: float, memory_gb: float, seeds: int,
                     shapes: Any, time_it: bool, db: Optional[str], show_progress: bool) -> list[dict[str, Any]]:
    from kerneltune.evaluate.evaluator import BaselineError, Evaluator, Options

    store = _open_store(db)
    opts = Options(device=device, timeout=timeout, memory_gb=memory_gb, seeds=seeds, shapes=shapes, time_it=time_it)
    results = []
    try:
        with _progress_ctx(show_progress) as progress:
            task = progress.add_task("starting", total=len(paths))
            with Evaluator(opts, store=store, progress=lambda m: progress.update(task, description=m)) as ev:
                for i, path in enumerate(paths):
                    progress.update(task, description=f"[{i + 1}/{len(paths)}] {os.path.basename(path)}")
                    results.append(ev.evaluate_path(path))
                    progress.advance(task)
    except BaselineError as e:
        print(f"error: {e}", file=sys.stderr)  # the verdicts already given are stored
        raise typer.Exit(1) from None
    finally:
        store.close()
    return results


@app.command("eval")
def eval_cmd(
    paths: list[str] = typer.Argument(..., help="candidate files"),
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    timeout: float = typer.Option(300.0, "--timeout", help="seconds per candidate, all stages"),
    memory_limit: float = typer.Option(8.0, "--memory-limit", help="GiB per candidate worker"),
    seeds: int = typer.Option(3, "--seeds", help="fresh random inputs per check shape"),
    shapes: Optional[list[str]] = typer.Option(None, "--shapes", help="timed shape(s), e.g. 2,8,512,64,causal"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="dtype of the timed shapes"),
    no_time: bool = typer.Option(False, "--no-time", help="verify only"),
    db: Optional[str] = DbOpt,
) -> None:
    """Verify and time candidate files; exit 0 only when every candidate passed."""
    device = _check_device(device)
    from kerneltune.search.runner import valid_timeout

    if not valid_timeout(timeout) or seeds < 1 or not (memory_limit > 0 and math.isfinite(memory_limit)):
        usage_error("--timeout, --memory-limit and --seeds must be positive (and finite)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        usage_error(f"{missing[0]}: no such file (give paths to candidate .py files)")
    parsed = None
    if shapes or dtype:
        ops = {_peek_op(p) for p in paths}
        if len(ops) != 1 or None in ops:
            usage_error("--shapes/--dtype need candidates of one op")
        parsed = _parse_shapes(ops.pop(), shapes, dtype, device)
    results = _run_evaluations(paths, device=device, timeout=timeout, memory_gb=memory_limit, seeds=seeds,
                               shapes=parsed, time_it=not no_time, db=db, show_progress=not json_out)
    if json_out:
        print(json.dumps(results, indent=1, default=str))
    else:
        _print_eval_table(results)
    raise typer.Exit(0 if all(r["status"] == "passed" for r in results) else 1)


def _peek_op(path: str) -> Optional[str]:
    from kerneltune.evaluate.static import StaticReject, inspect_source, read_candidate

    try:
        c = read_candidate(path)
        inspect_source(c)
        return c.op
    except StaticReject:
        return None


def _print_eval_table(results: list[dict[str, Any]]) -> None:
    t = Table(title="kerneltune eval", show_lines=False)
    for col in ("candidate", "status", "median ms", "p20–p80 ms", "speedup", "% roof", "reason"):
        t.add_column(col, overflow="fold")
    for r in results:
        st = r["status"]
        spread = f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f}" if r.get("p20_ms") is not None else "—"
        sp = f"{r['speedup']:.2f}× vs {r['baseline']}" if r.get("speedup") is not None else "—"
        if r.get("noisy"):
            sp += NOISY_MARK
        reason = r["reason"] or "; ".join(r.get("notes") or [])
        t.add_row(os.path.relpath(r["candidate"]) if os.path.exists(r["candidate"]) else r["candidate"],
                  f"[{STATUS_STYLE.get(st, '')}]{st}[/]", _fmt(r.get("median_ms")), spread, sp,
                  _fmt(r.get("pct_of_roof"), ".1f", "%"), reason)
    out.print(t)
    if results:
        prov = results[0]["provenance"]
        out.print(f"[dim]device {prov['device']['name']} · torch {prov['versions']['torch']} · "
                  f"threads {prov.get('threads')} · {prov['timestamp']}[/dim]", highlight=False)


def candidates_dir() -> str:
    """$KERNELTUNE_CANDIDATES, else the shipped candidates: candidates/ beside the kerneltune package in a source
    checkout, kerneltune/candidates/ in an installed wheel."""
    env = os.environ.get("KERNELTUNE_CANDIDATES")
    if env:
        return env
    from kerneltune.registry import shipped_candidates_dir

    return shipped_candidates_dir()


@app.command("bench")
def bench_cmd(
    op: Optional[str] = typer.Argument(None, help="attention or adamw (with --check: only this op's entries)"),
    device: str = DeviceOpt,
    shapes: Optional[list[str]] = typer.Option(None, "--shapes", help="timed shape(s), e.g. 2,8,512,64,causal"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="dtype of the timed shapes"),
    json_out: bool = JsonOpt,
    timeout: float = typer.Option(600.0, "--timeout", help="seconds per candidate"),
    csv_path: Optional[str] = typer.Option(None, "--csv", help="append one row per contestant to this CSV"),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="directory of candidates (default: candidates/OP)"),
    db: Optional[str] = DbOpt,
    check: bool = typer.Option(False, "--check", help="regression check of every registry entry for this device "
                                                      "(docs/ci.md); exit 1 on a regression"),
    registry: Optional[str] = typer.Option(None, "--registry", help="with --check: this registry file only"),
    tolerance: float = typer.Option(0.10, "--tolerance", help="with --check: minimum relative drop that counts"),
    confidence: float = typer.Option(0.99, "--confidence", help="with --check: bootstrap confidence level"),
    confirm: int = typer.Option(2, "--confirm", help="with --check: re-measurements a regression must survive"),
    max_foreign_load: float = typer.Option(0.25, "--max-foreign-load",
                                           help="with --check: share of the CPUs other processes may use"),
    strict: bool = typer.Option(False, "--strict", help="with --check: inconclusive or nothing checked fails too"),
    record: bool = typer.Option(False, "--record", help="with --check: measure each entry 5 times on a quiet machine "
                                                        "and write that into the registry as the recorded speedup"),
) -> None:
    """Baselines and every candidate under candidates/OP in one table: median, p20/p80, speedups, % of roof.
    With --check: has any registry winner for this device got slower relative to its baseline (docs/ci.md)?"""
    from kerneltune.backends import capability
    from kerneltune.evaluate.static import StaticReject, inspect_source, read_candidate
    from kerneltune.ops import op_names

    if check:
        from kerneltune.check import check_command

        raise typer.Exit(check_command(op=op, device=_check_device(device), registry=registry, tolerance=tolerance,
                                       confidence=confidence, confirm=confirm, max_foreign_load=max_foreign_load,
                                       strict=strict, timeout=timeout, json_out=json_out, csv_path=csv_path,
                                       shapes=shapes, dtype=dtype, candidates=candidates, record=record))
    if op not in op_names():
        usage_error(f"unknown op {op!r}: use one of {', '.join(op_names())}" if op else
                    f"give an op ({', '.join(op_names())}), or --check for the registry's regression check")
    from kerneltune.search.runner import valid_timeout

    if not valid_timeout(timeout):  # as eval: NaN would pass a plain `timeout <= 0`
        usage_error(f"--timeout {timeout}: give the seconds per candidate as a finite number above 0")
    device = _check_device(device)
    folder = candidates or os.path.join(candidates_dir(), op)
    paths = sorted(glob.glob(os.path.join(folder, "*.py")))
    if not paths:
        usage_error(f"no candidates in {folder} (pass --candidates DIR)")
    runnable = []
    for p in paths:
        try:
            c = read_candidate(p)
            inspect_source(c)
            if capability(c.backend, device).timed:
                runnable.append(p)
        except StaticReject:
            runnable.append(p)  # it will get its verdict
    skipped = sorted(set(paths) - set(runnable))
    parsed = _parse_shapes(op, shapes, dtype, device)
    results = _run_evaluations(runnable, device=device, timeout=timeout, memory_gb=16.0, seeds=2, shapes=parsed,
                               time_it=True, db=db, show_progress=not json_out)
    rows = bench_rows(results)
    if csv_path:
        from kerneltune.report import append_rows

        append_rows(csv_path, rows)  # one CSV for every source: the header widens when a row brings a column
    if json_out:
        print(json.dumps({"op": op, "device": device, "rows": rows, "results": results,
                          "not_timed_here": skipped}, indent=1, default=str))
    else:
        _print_bench(op, results, skipped)
    raise typer.Exit(0 if all(r["status"] == "passed" for r in results) else 1)


def bench_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per (candidate, case, contestant), with provenance: the CSV and --json format (docs/ci.md).
    ``speedup_vs_primary`` is the op's primary baseline's p50 over this contestant's (1.0 on the primary's own
    row); a baseline row also carries ``candidate_speedup``, the candidate's speedup over that baseline."""
    from kerneltune.check import git_commit
    from kerneltune.ops import get_op, op_names

    rows: list[dict[str, Any]] = []
    commit = git_commit() if any(r.get("cases") for r in results) else "unknown"
    for r in results:
        prov = r["provenance"]
        primary = get_op(r["op"]).primary_baseline if r.get("op") in op_names() else None
        for case in r.get("cases", []):
            prim_p50 = (case["baselines"].get(primary) or {}).get("median_ms") if primary else None
            common = {"timestamp": prov["timestamp"], "commit": commit, "source": "bench",
                      "device": prov["device"]["name"], "device_key": prov["device"]["key"],
                      "torch": prov["versions"]["torch"], "triton": prov["versions"].get("triton"),
                      "numba": prov["versions"].get("numba"), "kerneltune": prov["versions"]["kerneltune"],
                      "threads": prov.get("threads"), "op": r["op"], "shape": case["name"], "dtype": case["case"]["dtype"],
                      "candidate": r["name"], "candidate_hash": r["hash"][:16],
                      # how the run was timed: others' CPU load, the noise gate's word, whether turns ran alone
                      "foreign_load": case.get("foreign_load"), "noisy": case.get("noisy") or "",
                      "isolated": case.get("isolated")}
            rows.append({**common, "contestant": r["name"], "kind": "candidate", "p20_ms": case["p20_ms"],
                         "p50_ms": case["median_ms"], "p80_ms": case["p80_ms"], "speedup_vs_primary": case["speedup"],
                         "pct_of_roof": case["roofline"].get("pct_of_roof"), "gbps": case["roofline"]["gbps"],
                         "tflops": case["roofline"]["tflops"]})
            for name, b in case["baselines"].items():
                rows.append({**common, "contestant": name, "kind": "baseline", "p20_ms": b["p20_ms"],
                             "p50_ms": b["median_ms"], "p80_ms": b["p80_ms"],
                             "speedup_vs_primary": 1.0 if name == primary else (
                                 prim_p50 / b["median_ms"] if prim_p50 and b["median_ms"] else None),
                             "candidate_speedup": b["speedup"],  # the candidate's speedup over this baseline
                             "pct_of_roof": b["roofline"].get("pct_of_roof"), "gbps": b["roofline"]["gbps"],
                             "tflops": b["roofline"]["tflops"]})
    return rows


def _print_bench(op: str, results: list[dict[str, Any]], skipped: list[str]) -> None:
    passed = [r for r in results if r["status"] == "passed" and r.get("cases")]
    for r in results:
        if r["status"] != "passed" or not r.get("cases"):
            why = r["reason"] or "; ".join(r.get("notes") or [])
            out.print(f"[{STATUS_STYLE.get(r['status'], '')}]{r['name']}: {r['status']}[/] {why}", highlight=False)
    for p in skipped:
        out.print(f"[dim]{os.path.basename(p)}: not timed on this device[/dim]")
    if not passed:
        return
    case_names = [c["name"] for c in passed[0]["cases"]]
    for ci, case_name in enumerate(case_names):
        baselines = list(passed[0]["cases"][ci]["baselines"])
        t = Table(title=f"kerneltune bench {op} · {case_name}")
        for col in ("contestant", "median ms", "p20–p80 ms", *[f"speedup vs {b}" for b in baselines], "% roof", "GB/s", "TFLOP/s"):
            t.add_column(col)
        first = passed[0]["cases"][ci]
        for b in baselines:
            s = first["baselines"][b]
            t.add_row(f"[cyan]{b}[/] (baseline)", f"{s['median_ms']:.3f}", f"{s['p20_ms']:.3f}–{s['p80_ms']:.3f}",
                      *["" for _ in baselines], _fmt(s["roofline"].get("pct_of_roof"), ".1f", "%"),
                      f"{s['roofline']['gbps']:.1f}", f"{s['roofline']['tflops']:.3f}")
        for r in passed:
            c = r["cases"][ci]
            t.add_row(r["name"] + (NOISY_MARK if c.get("noisy") else ""), f"{c['median_ms']:.3f}",
                      f"{c['p20_ms']:.3f}–{c['p80_ms']:.3f}", *[f"{c['baselines'][b]['speedup']:.2f}×" for b in baselines],
                      _fmt(c["roofline"].get("pct_of_roof"), ".1f", "%"), f"{c['roofline']['gbps']:.1f}",
                      f"{c['roofline']['tflops']:.3f}")
        out.print(t)
    prov = passed[0]["provenance"]
    out.print(f"[dim]speedup = baseline median / candidate median, interleaved in the same run as each candidate · "
              f"baseline rows from {passed[0]['name']}'s run · device {prov['device']['name']} · "
              f"torch {prov['versions']['torch']} · threads {prov.get('threads')} · {prov['timestamp']}[/dim]",
              highlight=False)


@app.command("doctor")
def doctor_cmd(json_out: bool = JsonOpt, db: Optional[str] = DbOpt) -> None:
    """What works on this machine: torch, triton, numba, nvcc, GPU, sandbox, store, API key."""
    from kerneltune.doctor import diagnose

    checks = diagnose(db)
    if json_out:
        print(json.dumps(checks, indent=1))
    else:
        t = Table(title="kerneltune doctor")
        for col in ("component", "status", "detail"):
            t.add_column(col, overflow="fold")
        for c in checks:
            style = {"ok": "green", "missing": "yellow", "warn": "yellow", "fail": "red"}[c["status"]]
            t.add_row(c["name"], f"[{style}]{c['status']}[/]", c["detail"])
        out.print(t)
    raise typer.Exit(1 if any(c["status"] == "fail" for c in checks) else 0)


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1.5h' -> seconds."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text or "")
    if not m:
        raise ValueError(f"--time {text!r}: write seconds or a number with s, m or h, e.g. 10m")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@app.command("search")
def search_cmd(
    op: Optional[str] = typer.Argument(None, help="attention or adamw (omit with --resume)"),
    device: str = DeviceOpt,
    proposer: str = typer.Option("auto", "--proposer",
                                 help="auto (claude with ANTHROPIC_API_KEY, else templates), templates (offline "
                                      "autotuner), claude, or replay (with --from RUN)"),
    model: Optional[str] = typer.Option(None, "--model", help="Claude model (default claude-sonnet-4-6)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="output tokens per Claude answer (8000)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="sampling temperature 0-1 (API default)"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Claude requests in flight at once (2)"),
    from_run: Optional[str] = typer.Option(None, "--from", help="with --proposer replay: the Claude run to replay"),
    strategy: str = typer.Option("evolve", "--strategy", help="evolve, random or grid"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="strategy (or Claude proposer) option key=value "
                                                                      "(repeatable)"),
    budget: int = typer.Option(40, "--budget", help="candidates to evaluate"),
    time_limit: Optional[str] = typer.Option(None, "--time", help="stop after this long, e.g. 10m"),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="stop before paid proposers spend more (USD)"),
    jobs: int = typer.Option(2, "--jobs", help="evaluations in flight (timing is always one at a time)"),
    seed: int = typer.Option(0, "--seed", help="seed of the strategy"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds per candidate"),
    candidates: Optional[list[str]] = typer.Option(None, "--candidates", help="template folders (default candidates/OP)"),
    shapes: Optional[list[str]] = typer.Option(None, "--shapes", help="timed shape(s) (default: the op's)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="dtype of the timed shapes"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue run RUN where it stopped"),
    json_out: bool = JsonOpt,
    db: Optional[str] = DbOpt,
) -> None:
    """Search for a faster kernel within a budget, with a live leaderboard; resumable after any stop."""
    from kerneltune.search.runner import Search, SearchConfig, SearchError, valid_timeout
    from kerneltune.search.strategies import parse_options
    from kerneltune.search.view import LiveView

    if not valid_timeout(timeout):
        usage_error(f"--timeout {timeout}: give the seconds per candidate as a finite number above 0")
    if max_cost is not None and not (max_cost >= 0 and math.isfinite(max_cost)):
        usage_error(f"--max-cost {max_cost}: give a finite number of USD, 0 or more")
    store = _open_store(db)
    run_id = None
    if resume:
        row = store.run(resume)
        if row is None:
            usage_error(f"--resume {resume}: no such run in {store.path} (see kerneltune runs)")
        if row["status"] == "done":
            usage_error(f"--resume {resume}: that run is already done")
        cfg = SearchConfig.from_json(json.loads(row["options"]))
        run_id = row["id"]
        _check_device(cfg.device)
        # a run stopped by --time or --max-cost goes on with a new limit when one is given (stored with the run)
        try:
            if time_limit:
                cfg.time_s = parse_duration(time_limit)
        except ValueError as e:
            usage_error(str(e))
        if max_cost is not None:
            cfg.max_cost = max_cost
        if time_limit or max_cost is not None:
            store.set_run_options(run_id, dataclasses.asdict(cfg))
    else:
        from kerneltune.ops import op_names

        if op is None or op not in op_names():
            usage_error(f"give an op ({', '.join(op_names())}) or --resume RUN")
        device = _check_device(device)
        if budget < 1 or jobs < 1:
            usage_error("--budget and --jobs must be at least 1")
        try:
            t = parse_duration(time_limit) if time_limit else None
            from kerneltune.propose.factory import split_options

            strategy_pairs, popts = split_options(option or [])
            opts = parse_options(strategy, strategy_pairs)
        except ValueError as e:
            usage_error(str(e))
        if shapes or dtype:
            _parse_shapes(op, shapes, dtype, device)  # a bad shape is a usage error now, not mid-run
        popts.update({k: v for k, v in (("model", model), ("max_tokens", max_tokens), ("temperature", temperature),
                                        ("concurrency", concurrency), ("from_run", from_run)) if v is not None})
        cfg = SearchConfig(op=op, device=device, proposer=proposer, strategy=strategy, seed=seed, budget=budget,
                           time_s=t, max_cost=max_cost, jobs=jobs, timeout=timeout, strategy_options=opts,
                           candidate_dirs=[os.path.abspath(c) for c in (candidates or [os.path.join(candidates_dir(), op)])],
                           shapes=list(shapes or []), dtype=dtype, proposer_options=popts)
    try:
        search = Search(store, cfg, run_id=run_id)
    except (SearchError, ValueError) as e:
        usage_error(str(e))
    err.print(f"run {search.run_id}: {cfg.op} on {cfg.device}, proposer {cfg.proposer}, strategy {cfg.strategy}, "
              f"budget {cfg.budget}" + (" (resumed)" if resume else ""), highlight=False)
    for line in [getattr(search.proposer, "chosen_because", "")] + list(getattr(search.proposer, "notes", [])):
        if line:
            err.print(line, highlight=False)
    try:
        with LiveView(enabled=True) as view:
            search.on_update = view.update
            summary = search.run()
    except Exception as e:  # noqa: BLE001 - the run is stored as failed, resumable: say so in one line
        store.close()
        why = " ".join(str(e).split()) or type(e).__name__
        print(f"error: the search stopped: {type(e).__name__}: {why}; every finished evaluation is stored; "
              f"resume with: {search.resume_command()}", file=sys.stderr)
        raise typer.Exit(1) from None
    store.close()
    if json_out:
        print(json.dumps(summary, indent=1, default=str))
    else:
        best = summary["best"]
        out.print(f"{summary['results']} results ({summary['evaluated']} evaluated, {summary['cached']} cached) in "
                  f"{summary['elapsed_s']} s; {summary['by_status']}", highlight=False)
        if best:
            out.print(f"best: [green]{best['name']}[/] {best['speedup']:.3f}× vs {summary['baseline']} "
                      f"at {summary['shape']} (median {best['median_ms']:.3f} ms)", highlight=False)
        if summary.get("noisy"):
            out.print(f"[yellow]{summary['noisy']} passed result(s) were timed twice on a machine too busy to trust "
                      f"the ratio: not ranked (kerneltune show NAME; evaluate them again when it is quiet)[/]",
                      highlight=False)
    if summary["status"] == "interrupted":
        err.print(f"interrupted: every finished evaluation is stored; resume with: {summary['resume']}",
                  highlight=False)
        raise typer.Exit(130)
    if summary["status"] == "stopped":
        err.print(f"{summary['stop_reason']}: the run can go on with {summary['resume']} (with --time or --max-cost "
                  f"for a new limit)", highlight=False)
    if summary["status"] == "failed":
        print(f"error: {summary['stop_reason']}", file=sys.stderr)
        raise typer.Exit(1)
    raise typer.Exit(0 if summary["best"] else 1)


def _noisy(e: Any) -> str:
    """The noise gate's word on a stored evaluation ('' when its timing was quiet or it was not timed)."""
    try:
        return str(json.loads(e["result"] or "{}").get("noisy") or "")
    except (ValueError, TypeError, IndexError, KeyError):
        return ""




@app.command("runs")
def runs_cmd(json_out: bool = JsonOpt, db: Optional[str] = DbOpt) -> None:
    """Searches in the store: status, progress, best speedup, cost."""
    store = _open_store(db, create=False)
    rows = []
    for r in store.runs():
        stats = store.conn.execute(
            "SELECT COUNT(p.id) AS n, COUNT(p.evaluation_id) AS finished, MAX(CASE WHEN e.status='passed'"
            f" AND {_QUIET.format('e')} THEN e.speedup END)"
            " AS best FROM proposals p LEFT JOIN evaluations e ON e.id = p.evaluation_id WHERE p.run_id = ?",
            (r["id"],)).fetchone()
        opts = json.loads(r["options"])
        rows.append({"run": r["id"], "op": r["op"], "device_key": r["device_key"], "proposer": r["proposer"],
                     "strategy": r["strategy"], "status": r["status"], "note": r["note"], "budget": opts.get("budget"),
                     "proposals": stats["n"], "finished": stats["finished"], "best_speedup": stats["best"],
                     "cost_usd": r["cost_usd"], "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created"]))})
    store.close()
    if json_out:
        print(json.dumps(rows, indent=1))
        return
    t = Table(title="kerneltune runs")
    for col in ("run", "op", "status", "finished/budget", "best speedup", "cost", "proposer", "note"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["run"], r["op"], r["status"], f"{r['finished']}/{r['budget']}", _fmt(r["best_speedup"], ".3f", "×"),
                  f"${r['cost_usd']:.4f}", f"{r['proposer']}/{r['strategy']}", r["note"] or "")
    out.print(t)


def _device_key(device: str) -> str:
    from kerneltune.evaluate.device import device_info

    return device_info(device)["key"]


@app.command("leaderboard")
def leaderboard_cmd(
    op: str = typer.Argument(..., help="attention or adamw"),
    device: str = DeviceOpt,
    limit: int = typer.Option(20, "--limit"),
    json_out: bool = JsonOpt,
    db: Optional[str] = DbOpt,
) -> None:
    """Passed candidates of OP on this device, best speedup first (each candidate's latest evaluation)."""
    from kerneltune.ops import op_names

    if op not in op_names():
        usage_error(f"unknown op {op!r}: use one of {', '.join(op_names())}")
    device = _check_device(device)
    store = _open_store(db, create=False)
    key = _device_key(device)
    # each candidate's latest quiet verdict (kerneltune.store.db.leaderboard; bench_gpu.py picks from it too)
    rows = store.leaderboard(op, key, limit)
    from kerneltune.evaluate.evaluator import missing_checks
    from kerneltune.ops import get_op, op_names

    spec = get_op(op) if op in op_names() else None
    board = [{"rank": i, "candidate": r["name"], "hash": r["candidate_hash"], "backend": r["backend"],
              "origin": r["origin"], "speedup": r["speedup"], "baseline": r["baseline"], "median_ms": r["median_ms"],
              "p20_ms": r["p20_ms"], "p80_ms": r["p80_ms"], "shape": r["shape"], "run": r["run_id"],
              "params": json.loads(r["params"] or "{}"),
              # passed before the op gained check cases (promote does not use such a pass)
              "checks_current": spec is None or not missing_checks(spec, json.loads(r["result"] or "{}"), device)}
             for i, r in enumerate(rows, 1)]
    store.close()
    if json_out:
        print(json.dumps({"op": op, "device_key": key, "leaderboard": board}, indent=1))
        return
    t = Table(title=f"leaderboard · {op} · {key}")
    for col in ("#", "candidate", "backend", "origin", "speedup", "median ms", "p20–p80", "shape", "hash"):
        t.add_column(col)
    for b in board:
        t.add_row(str(b["rank"]), b["candidate"] + ("" if b["checks_current"] else OLDER_CHECKS_MARK), b["backend"],
                  b["origin"] or "", f"{b['speedup']:.3f}× vs {b['baseline']}", _fmt(b["median_ms"], ".3f"),
                  f"{_fmt(b['p20_ms'], '.3f')}–{_fmt(b['p80_ms'], '.3f')}", b["shape"] or "", b["hash"][:12])
    out.print(t)
    older = sum(1 for b in board if not b["checks_current"])
    if older:
        out.print(f"[yellow]{older} row(s) passed before the {op} checks gained cases (older checks): promote does "
                  f"not use such a pass; evaluate the candidate again (kerneltune eval) to check it as today[/]")


@app.command("show")
def show_cmd(candidate: str = typer.Argument(..., help="hash, hash prefix or name"), json_out: bool = JsonOpt,
             prompts: bool = typer.Option(False, "--prompts", help="print the Claude prompts and answers in full"),
             db: Optional[str] = DbOpt) -> None:
    """A candidate: its source, parent chain, every verdict and timing, and the Claude requests behind it."""
    from kerneltune.store.messages import messages_for
    from kerneltune.store.messages import summary as message_summary

    store = _open_store(db, create=False)
    row = store.candidate(candidate)
    if row is None:
        usage_error(f"no candidate {candidate!r} in {store.path} (use a hash prefix or a name from the leaderboard)")
    chain = []
    seen = {row["hash"]}
    parent = row["parent"]
    while parent and parent not in seen:
        seen.add(parent)
        prow = store.candidate(parent)
        if prow is None:
            break
        chain.append({"hash": prow["hash"], "name": prow["name"], "origin": prow["origin"]})
        parent = prow["parent"]
    evals = [{"id": e["id"], "device": e["device_name"], "status": e["status"], "reason": e["reason"],
              "stage": e["stage"], "shape": e["shape"], "median_ms": e["median_ms"], "p20_ms": e["p20_ms"],
              "p80_ms": e["p80_ms"], "speedup": e["speedup"], "baseline": e["baseline"], "run": e["run_id"],
              "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["created"])), "noisy": _noisy(e)}
             for e in store.evaluations(candidate_hash=row["hash"])]
    msgs = [{**message_summary(m), "request": m["request"], "answer": m["text"]} for m in messages_for(store, row["hash"])]
    info = {"hash": row["hash"], "name": row["name"], "op": row["op"], "backend": row["backend"], "origin": row["origin"],
            "summary": row["summary"], "params": json.loads(row["params"] or "{}"), "parents": chain,
            "evaluations": evals, "messages": msgs, "source": row["source"]}
    store.close()
    if json_out:
        print(json.dumps(info, indent=1))
        return
    from rich.syntax import Syntax

    out.print(f"[bold]{info['name']}[/] {info['hash']}  ({info['op']}, {info['backend']}, origin {info['origin']})",
              highlight=False)
    if info["summary"]:
        out.print(info["summary"], highlight=False)
    if chain:
        out.print("parents: " + " ← ".join(f"{c['name']} ({c['hash'][:10]})" for c in chain), highlight=False)
    t = Table(title="evaluations")
    for col in ("when", "device", "status", "shape", "median ms", "p20–p80", "speedup", "reason"):
        t.add_column(col, overflow="fold")
    for e in evals:
        spread = f"{e['p20_ms']:.3f}–{e['p80_ms']:.3f}" if e["p20_ms"] is not None else "—"
        t.add_row(e["when"], e["device"], e["status"], e["shape"] or "", _fmt(e["median_ms"]), spread,
                  _fmt(e["speedup"], ".3f", "×") + (NOISY_MARK if e["noisy"] else ""), e["reason"])
    out.print(t)
    if msgs:
        mt = Table(title="Claude requests behind it")
        for col in ("when", "model", "kind", "attempt", "tokens in/out (cache w/r)", "cost", "stop", "latency"):
            mt.add_column(col)
        for m in msgs:
            mt.add_row(m["when"], m["model"], m["kind"], str(m["attempt"]),
                       f"{m['input_tokens']}/{m['output_tokens']} ({m['cache_write_tokens']}/{m['cache_read_tokens']})",
                       f"${m['cost_usd']:.4f}", m["stop_reason"] or "", _fmt(m["latency_s"], ".1f", " s"))
        out.print(mt)
        if prompts:
            for m in msgs:
                req = m["request"]
                for block in req.get("system", []):
                    out.rule(f"system (request {m['id']})")
                    out.print(block.get("text", ""), markup=False, highlight=False)
                for turn in req.get("messages", []):
                    out.rule(f"{turn['role']} (request {m['id']})")
                    out.print(turn["content"] if isinstance(turn["content"], str) else json.dumps(turn["content"]),
                              markup=False, highlight=False)
                out.rule(f"answer (request {m['id']})")
                out.print(m["answer"] or "", markup=False, highlight=False)
        else:
            out.print("[dim]kerneltune show --prompts prints the prompts and answers in full[/dim]")
    out.print(Syntax(info["source"], "python", line_numbers=True))


from kerneltune.cli_train import train_cmd  # noqa: E402 - its own module; heavy imports stay inside it

app.command("train")(train_cmd)


from kerneltune.report import report_cmd  # noqa: E402 - results CSVs -> PNGs + markdown (docs/ci.md)

app.command("report")(report_cmd)


from kerneltune.cli_registry import register as _register_registry  # noqa: E402 - promote, registry, explain

_register_registry(app)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
