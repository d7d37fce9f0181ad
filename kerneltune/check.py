"""`kerneltune bench --check`: has a registry winner got slower relative to its baseline, beyond noise?

For every registry entry recorded for this device, in one evaluator (one process, one trusted baseline
worker per op), the entry's candidate file is verified again exactly as `kerneltune eval` does (every
check shape, fresh seeds, re-verification after timing) and timed interleaved with the entry's
baseline, round by round. The verdict compares the speedup measured now with the one recorded:

    t_c[r], t_b[r]   the timed calls of the candidate's and the baseline's turn in round r (adjacent in time)
    S                = Q_q(all t_b) / Q_q(all t_c)      Q_q: the q-quantile (default q = 0.1) of pooled calls
    [lo, hi]         a percentile bootstrap CI of S (default 99 %), resampling whole rounds, pairs kept
    regression       when  recorded > hi · (1 + tolerance)             (default tolerance 0.10)

where "recorded" is the lowest of the quantile ratios `bench --check --record` measured in its quiet runs
(the spread between runs, which one run's bootstrap cannot see), else the entry's speedup.

Why a low quantile and not the median: interference (another process on a core, a descheduled thread at a
barrier, an interrupt) only ever adds time to a call, so the least disturbed calls carry the kernel's own
speed. On a 2-core machine shared with other jobs the median ratio of numba AdamW over fused AdamW moved
between 0.03 and 0.14 while the p10 ratio stayed within 0.25-0.32 (docs/ci.md has the figures).

A flagged entry is measured again (``confirm`` times, default 2, each a fresh evaluator with new workers,
after waiting for the machine to be quiet) and is a regression only if every measurement flags it. Each measurement records
the CPU time that processes other than this one and its workers used meanwhile ("foreign load", from
/proc/stat); a regression seen only while the machine was busy is reported as inconclusive, not as a
failure, and a busy measurement cannot clear one a quiet measurement flagged. A candidate that no longer
passes verification fails whatever the load.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from kerneltune.evaluate.procfs import LoadMeter, wait_quiet

STATUS_OK, STATUS_REGRESSION, STATUS_FAILED, STATUS_INCONCLUSIVE = "ok", "regression", "failed", "inconclusive"
FAILING = (STATUS_REGRESSION, STATUS_FAILED)


@dataclass
class CheckOptions:
    tolerance: float = 0.10           # minimum effect: relative drop of the speedup that counts
    confidence: float = 0.99          # two-sided bootstrap CI
    quantile: float = 0.10            # Q_q of the pooled calls of each contestant
    resamples: int = 2000             # bootstrap resamples (fixed seed: the same samples give the same CI)
    rounds: int = 20                  # interleaved rounds per measurement
    round_ms: float = 40.0            # target length of one contestant's turn
    min_reps: int = 30                # at least this many timed calls per contestant (more rounds if needed)
    seeds: int = 2                    # fresh random inputs per check shape (re-verification)
    confirm: int = 2                  # extra measurements of a flagged entry (fresh workers); all must flag it
    max_foreign_load: float = 0.25    # share of the CPUs other processes may use before a measurement is "busy"
    wait_quiet_s: float = 30.0        # before a confirmation, wait up to this long for a quiet machine
    timeout: float = 600.0            # seconds per evaluation
    seed: int = 0                     # of the bootstrap


# -- statistics ------------------------------------------------------------------------------------------
_MAX_PER_TURN = 256  # a turn of a very fast kernel holds thousands of calls: keep evenly spaced order statistics


def _thin(turn: Sequence[float]) -> list[float]:
    s = sorted(float(x) for x in turn)
    if len(s) <= _MAX_PER_TURN:
        return s
    step = (len(s) - 1) / (_MAX_PER_TURN - 1)
    return [s[round(i * step)] for i in range(_MAX_PER_TURN)]


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated q-quantile (numpy's default method)."""
    s = sorted(xs)
    if not s:
        raise ValueError("no samples")
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def speedup_stat(base_turns: Sequence[Sequence[float]], cand_turns: Sequence[Sequence[float]], q: float) -> float:
    """Q_q of every baseline call over Q_q of every candidate call."""
    b = [x for t in base_turns for x in t]
    c = [x for t in cand_turns for x in t]
    return quantile(b, q) / quantile(c, q)


def bootstrap_ci(base_turns: Sequence[Sequence[float]], cand_turns: Sequence[Sequence[float]], *, q: float,
                 confidence: float, resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``speedup_stat``, resampling rounds (the candidate's and the baseline's turn
    of one round stay together: they ran next to each other, under the same conditions)."""
    import numpy as np

    n = min(len(base_turns), len(cand_turns))
    if n < 2:
        raise ValueError("the bootstrap needs at least 2 rounds")
    bt = [np.asarray(_thin(t)) for t in base_turns[:n]]
    ct = [np.asarray(_thin(t)) for t in cand_turns[:n]]
    rng = random.Random(seed)
    stats = np.empty(resamples)
    for i in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        b = np.concatenate([bt[j] for j in idx])
        c = np.concatenate([ct[j] for j in idx])
        stats[i] = np.quantile(b, q) / np.quantile(c, q)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def finite_positive(x: Any) -> bool:
    """A number a speedup can be: finite and above 0 (NaN compares False with everything, so a NaN recorded
    speedup would never be judged a regression)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def judge(recorded: float, lo: float, hi: float, tolerance: float) -> str:
    """'regression' when the recorded speedup is above the CI's upper end by more than the tolerance; 'failed'
    when there is nothing to compare: a recorded speedup that is not a finite positive number, or no CI."""
    if not finite_positive(recorded) or math.isnan(hi):
        return STATUS_FAILED
    return STATUS_REGRESSION if recorded > hi * (1.0 + tolerance) else STATUS_OK


# -- registry entries -> cases -----------------------------------------------------------------------------
def entry_case(entry: Any) -> Any:
    """The Case an entry was timed at. A registry keeps attention dims whole but only adamw's numel and
    tensor count; the full case comes from ``provenance['case_json']`` when the entry has it, else from the
    preset its case name starts with, else a GPT-like list of the same numel and tensor count."""
    from kerneltune.ops import get_op
    from kerneltune.ops.base import Case

    prov = entry.provenance or {}
    if isinstance(prov.get("case_json"), dict):
        return Case.from_json(prov["case_json"])
    spec = get_op(entry.op)
    if entry.op == "adamw":
        from kerneltune.ops.adamw import PRESETS

        name = str(prov.get("case") or "")
        preset = next((p for p in PRESETS if name.split(" ")[0] == p), None)
        if preset:
            case = spec.parse_case(preset, "float32")
            if _norm(entry.op, case.dims) == _norm(entry.op, entry.dims):
                return case
        return _adamw_like(entry.dims)
    name = str(prov.get("case") or entry.bucket)
    return Case(name=name, dims=dict(entry.dims), dtype=entry.dtype, args=dict(entry.args))


def _norm(op: str, dims: dict[str, Any]) -> dict[str, Any]:
    from kerneltune.registry import norm_dims

    return norm_dims(op, dims)


def _adamw_like(dims: dict[str, Any]) -> Any:
    """A parameter list of exactly ``numel`` elements in ``tensors`` tensors: one square-ish matrix holding
    most of it and vectors of equal size for the rest (the numel and count the entry records)."""
    from kerneltune.ops.base import Case

    numel, n = int(dims["numel"]), max(int(dims.get("tensors", 1)), 1)
    small = max(min(numel // (4 * n), 4096), 1) if n > 1 else 0
    big = numel - small * (n - 1)
    shapes = [[big]] + [[small]] * (n - 1)
    return Case(name=f"approx ({numel / 1e6:.2f}M params, {n} tensors)", dims={"shapes": shapes}, dtype="float32")


# -- one entry ---------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    status: str                       # ok | regression | failed
    speedup: float | None = None      # S, the quantile ratio
    ci: tuple[float, float] | None = None
    median_speedup: float | None = None  # baseline median / candidate median (as the evaluator reports it)
    candidate_p50_ms: float | None = None
    baseline_p50_ms: float | None = None
    rounds: int = 0
    calls: tuple[int, int] = (0, 0)   # candidate, baseline
    foreign_load: float | None = None
    busy: bool = False
    reason: str = ""
    duration_s: float = 0.0
    result: dict[str, Any] = field(default_factory=dict, repr=False)


def measure(ev: Any, entry: Any, case: Any, opts: CheckOptions, recorded: float) -> Measurement:
    """One fresh evaluation of the entry's candidate file at its case, against its baseline; judged."""
    from kerneltune.evaluate.evaluator import BaselineError

    t0 = time.monotonic()
    ev.opt.shapes = [case]
    ev.opt.baselines = [entry.baseline]
    meter = LoadMeter().start()
    try:
        res = ev.evaluate_path(entry.path)
    except BaselineError as e:  # no reference point on this device: the entry cannot be checked, which fails
        meter.stop()
        return Measurement(status=STATUS_FAILED, reason=str(e), duration_s=round(time.monotonic() - t0, 2))
    load = meter.stop()
    # busy by this check's own meter, or by the evaluator's, which judged the timing itself (noisy: timed twice)
    busy = (load is not None and load > opts.max_foreign_load) or bool(res.get("noisy"))
    m = Measurement(status=STATUS_OK, foreign_load=load, busy=busy, duration_s=round(time.monotonic() - t0, 2),
                    result=res)
    if res["status"] != "passed":
        m.status = STATUS_FAILED
        m.reason = f"{res['status']}: {res['reason'] or '; '.join(res.get('notes') or [])}"
        return m
    cases = res.get("cases") or []
    if not cases:
        m.status = STATUS_FAILED
        m.reason = "passed verification but was not timed on this device"
        return m
    c = cases[0]
    b = (c.get("baselines") or {}).get(entry.baseline)
    if b is None or "samples_ms" not in c or "samples_ms" not in b:
        m.status = STATUS_FAILED
        m.reason = f"baseline {entry.baseline!r} was not timed (the op's baselines: {', '.join(c.get('baselines') or {})})"
        return m
    ct, bt = c["samples_ms"], b["samples_ms"]
    m.rounds = min(len(ct), len(bt))
    m.calls = (sum(len(t) for t in ct), sum(len(t) for t in bt))
    m.speedup = speedup_stat(bt, ct, opts.quantile)
    m.ci = bootstrap_ci(bt, ct, q=opts.quantile, confidence=opts.confidence, resamples=opts.resamples, seed=opts.seed)
    m.median_speedup = b.get("speedup")
    m.candidate_p50_ms, m.baseline_p50_ms = c.get("median_ms"), b.get("median_ms")
    m.status = judge(recorded, m.ci[0], m.ci[1], opts.tolerance)
    if m.status == STATUS_FAILED:
        m.reason = (f"no verdict: the recorded speedup {recorded!r} is not a finite positive number"
                    if not finite_positive(recorded) else f"no verdict: the speedup's CI is {m.ci}")
    return m


def recorded_speedup(entry: Any, opts: CheckOptions) -> tuple[float, float, str]:
    """(typical, floor, what they are): the speedup to compare with, like for like. From `bench --check
    --record` (provenance['check'], same quantile): the median of the quiet recording runs' quantile ratios
    and the lowest of them, the floor (the spread between runs, processes and memory layouts that one run's
    bootstrap cannot see). Else the entry's speedup (a ratio of medians, as promote records it), both."""
    chk = (entry.provenance or {}).get("check") or {}
    value = chk.get("speedup")
    if finite_positive(value) and chk.get("quantile") == opts.quantile:
        floor = chk.get("floor")
        floor = float(floor) if finite_positive(floor) and floor <= value else float(value)
        n = chk.get("quiet_runs") or len(chk.get("runs") or [])
        return float(value), floor, f"p{opts.quantile * 100:.0f} ratio: median (lowest) of {n} quiet recording runs"
    return float(entry.speedup), float(entry.speedup), "the entry's speedup (ratio of medians)"


def label(entry: Any) -> str:
    args = entry.args or {}
    extra = ("causal" if args.get("causal") else "full") if "causal" in args else ""
    what = " ".join(x for x in (entry.op, entry.bucket, entry.dtype, extra) if x)
    return f"{entry.name} ({what})"


# the keys docs/ci.md promises in every entry of the report, null until something is measured
_NOTHING_MEASURED: dict[str, Any] = {"shape": None, "speedup": None, "ci": None, "change": None}


def check_entry(ev: Any, entry: Any, opts: CheckOptions, progress: Callable[[str], None],
                fresh: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Measure one entry (again, if flagged: with a ``fresh()`` evaluator when given) and decide; a JSON-able
    record."""
    from kerneltune.registry import check_file

    if not finite_positive(entry.speedup):  # an entry made in code (a registry file refuses it when read)
        return {"entry": label(entry), "name": entry.name, "op": entry.op, "bucket": entry.bucket, "dtype": entry.dtype,
                "args": entry.args, "device_key": entry.device_key, "candidate": entry.path,
                "baseline": entry.baseline, "recorded_speedup": None, "recorded_floor": None, "recorded_as": "",
                "entry_speedup": None, **_NOTHING_MEASURED, "notes": [], "measurements": [], "status": STATUS_FAILED,
                "reason": f"its recorded speedup {entry.speedup!r} is not a finite positive number: no regression "
                          "can be judged against it; re-promote it (kerneltune promote)"}
    recorded, floor, recorded_as = recorded_speedup(entry, opts)
    rec: dict[str, Any] = {"entry": label(entry), "name": entry.name, "op": entry.op, "bucket": entry.bucket,
                           "dtype": entry.dtype, "args": entry.args, "device_key": entry.device_key,
                           "candidate": entry.path, "baseline": entry.baseline, "recorded_speedup": recorded,
                           "recorded_floor": floor, "recorded_as": recorded_as, "entry_speedup": float(entry.speedup),
                           **_NOTHING_MEASURED, "notes": []}
    if not os.path.isfile(entry.path):
        rec.update(status=STATUS_FAILED, reason=f"candidate file {entry.path} is missing", measurements=[])
        return rec
    changed = check_file(entry)
    if changed:
        rec["notes"].append(changed.split(";")[0] + ": measuring the file as it is now")
    try:
        case = entry_case(entry)
    except (KeyError, ValueError, TypeError) as e:
        rec.update(status=STATUS_FAILED, reason=f"cannot rebuild the shape it was timed at ({e})", measurements=[])
        return rec
    rec["shape"] = case.name
    measurements: list[Measurement] = []
    for attempt in range(1 + max(opts.confirm, 0)):
        if attempt:
            progress(f"{entry.name}: flagged; waiting up to {opts.wait_quiet_s:.0f} s for a quiet machine, then "
                     "measuring again")
            if opts.wait_quiet_s > 0:
                wait_quiet(opts.max_foreign_load, opts.wait_quiet_s)
        progress(f"{entry.name}: verifying and timing against {entry.baseline} ({attempt + 1})")
        try:
            if attempt and fresh is not None:  # a confirmation owes nothing to the first: new baseline worker too
                with fresh() as ev2:
                    m = measure(ev2, entry, case, opts, floor)
            else:
                m = measure(ev, entry, case, opts, floor)
        except RuntimeError as e:  # the trusted baseline worker itself failed
            m = Measurement(status=STATUS_FAILED, reason=f"baseline error: {e}")
        measurements.append(m)
        # a busy measurement's wide interval reads "ok" about anything: it cannot clear what a quiet one flagged,
        # so that is confirmed further (and stays inconclusive if no quiet measurement settles it)
        quiet_flag = any(x.status == STATUS_REGRESSION and not x.busy for x in measurements)
        if m.status == STATUS_FAILED or (m.status == STATUS_OK and not (m.busy and quiet_flag)):
            break
    rec["measurements"] = [_m_json(m) for m in measurements]
    last = measurements[-1]
    if last.status == STATUS_FAILED:
        rec.update(status=STATUS_FAILED, reason=last.reason)
    elif last.status == STATUS_OK and not (last.busy and quiet_flag):
        rec["status"] = STATUS_OK
        if len(measurements) > 1:
            flagged = sum(m.status == STATUS_REGRESSION for m in measurements)
            rec["notes"].append(f"flagged by {flagged} measurement(s), cleared by the last")
        if last.busy:
            rec["notes"].append(f"the machine was busy ({_busy_why(last, opts)}): a regression could hide in the noise")
    elif quiet_flag and any(m.status == STATUS_OK for m in measurements):
        flag = next(m for m in measurements if m.status == STATUS_REGRESSION and not m.busy)
        busy = [m for m in measurements if m.status == STATUS_OK]
        rec["status"] = STATUS_INCONCLUSIVE
        rec["reason"] = (f"speedup {flag.speedup:.3g}× on a quiet machine is {1 - flag.speedup / recorded:.0%} below "
                         f"the recorded {recorded:.3g}×, but {len(busy)} of {len(measurements) - 1} confirmation(s) "
                         f"ran on a busy machine ({_busy_why(busy[-1], opts)}) and could not confirm or clear it: "
                         "measure again on a quiet machine")
    elif all(m.busy for m in measurements):
        rec["status"] = STATUS_INCONCLUSIVE
        rec["reason"] = (f"speedup {last.speedup:.3g}× looks {1 - last.speedup / recorded:.0%} below the recorded "
                         f"{recorded:.3g}×, but other processes used up to "
                         f"{max(m.foreign_load or 0 for m in measurements):.0%} of the CPUs meanwhile "
                         f"(limit {opts.max_foreign_load:.0%}): measure again on a quiet machine")
    else:
        rec["status"] = STATUS_REGRESSION
        lo, hi = last.ci or (math.nan, math.nan)
        rec["reason"] = (f"speedup {last.speedup:.3g}× vs {entry.baseline} ({opts.confidence:.0%} CI {lo:.3g}–{hi:.3g}, "
                         f"{len(measurements)} measurements) is {1 - last.speedup / recorded:.0%} below the recorded "
                         f"{recorded:.3g}×" + (f" (lowest recorded run {floor:.3g}×)" if floor < recorded else "")
                         + f", beyond the tolerance of {opts.tolerance:.0%}")
    if last.speedup is not None:
        rec["speedup"] = last.speedup
        rec["ci"] = list(last.ci) if last.ci else None
        rec["change"] = last.speedup / recorded - 1.0 if recorded > 0 else None
    rec.setdefault("reason", "")
    return rec


def _busy_why(m: Measurement, opts: CheckOptions) -> str:
    """Why a measurement counts as busy: the foreign load (None without /proc), else the evaluator's noise gate."""
    if m.foreign_load is not None and m.foreign_load > opts.max_foreign_load:
        return f"other processes used {m.foreign_load:.0%} of the CPUs"
    return f"the evaluator found the timing noisy: {(m.result or {}).get('noisy') or 'see the measurement'}"


def _m_json(m: Measurement) -> dict[str, Any]:
    d = asdict(m)
    d.pop("result")
    d["ci"] = list(m.ci) if m.ci else None
    d["calls"] = list(m.calls)
    d["evaluation"] = {k: m.result.get(k) for k in ("status", "reason", "hash", "duration_s")} if m.result else None
    return d


# -- recording -----------------------------------------------------------------------------------------------
def record_entries(device: str, registry_path: str, *, runs: int = 5, op: str | None = None,
                   opts: CheckOptions | None = None, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Re-measure every entry of ``registry_path`` recorded for this device ``runs`` times, each after waiting for
    a quiet machine, and write what a quiet machine gives as the recorded numbers (through the registry API):
    ``speedup``, p20/median/p80 and versions from the run whose quantile ratio is the median of the quiet runs,
    and ``provenance['check']``: the statistic `bench --check` compares like for like (the median of the quiet
    runs' quantile ratios, every run listed). An entry with fewer than 2 quiet runs, or that fails verification,
    is left as it was. Returns one record per entry."""
    from kerneltune import registry as reg
    from kerneltune.evaluate.evaluator import Evaluator, Options

    opts = opts or CheckOptions()
    progress = progress or (lambda _m: None)
    from kerneltune.evaluate.device import device_info

    key = device_info(device)["key"]
    r = _load_checked(registry_path)
    bad = next((s for s in r.sources if s.rejected), None)
    if bad is not None:
        raise reg.RegistryError(f"{bad.error}; --record rewrites the registry, which would drop it: fix or remove "
                                "that entry first")
    todo = [e for e in r.for_device(key) if op is None or e.op == op]
    out = []
    eopts = Options(device=device, timeout=opts.timeout, seeds=opts.seeds, rounds=opts.rounds, round_ms=opts.round_ms,
                    min_reps=opts.min_reps, samples=True, memory_gb=16.0)
    with Evaluator(eopts, progress=progress) as ev:
        for e in todo:
            case = entry_case(e)
            ms: list[Measurement] = []
            for i in range(runs):
                wait_quiet(opts.max_foreign_load, opts.wait_quiet_s)
                progress(f"{e.name}: run {i + 1}/{runs}")
                ms.append(measure(ev, e, case, opts, float(e.speedup)))
            failed = [m for m in ms if m.status == STATUS_FAILED]
            quiet = sorted((m for m in ms if m.status != STATUS_FAILED and not m.busy), key=lambda m: m.speedup or 0.0)
            rep = quiet[(len(quiet) - 1) // 2] if quiet else None
            rec = {"entry": label(e), "runs": [_m_json(m) for m in ms], "updated": False}
            if failed:
                rec["reason"] = f"failed verification: {failed[0].reason}"
            elif len(quiet) < 2 or rep is None:
                rec["reason"] = f"only {len(quiet)} of {runs} runs on a quiet machine: left as it was"
            elif not finite_positive(rep.median_speedup):  # the entry's speedup must stay one (Entry.from_json)
                rec["reason"] = f"the median run's ratio of medians is {rep.median_speedup!r}: left as it was"
            else:
                c = rep.result["cases"][0]
                prov = rep.result["provenance"]
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                old = (e.provenance or {}).get("check") or {}
                # compared with the versions the entry holds now, before this session's replace them: a new torch
                # starts a new record
                same = (old.get("quantile") == opts.quantile and (e.provenance or {}).get("candidate_hash") ==
                        rep.result["hash"] and (e.versions or {}).get("torch") == prov["versions"].get("torch"))
                limit = opts.max_foreign_load
                # each run keeps its busy verdict: the evaluator's 'noisy' (on GPU the only noise signal) is not
                # in the foreign load
                history, quiet_values = merge_runs(old.get("runs") if same else None,
                                                   [[m.speedup, m.median_speedup, m.foreign_load, when, m.busy]
                                                    for m in ms], limit)
                if not quiet_values:  # a guard: the session's quiet runs are quiet in merge_runs too (same test)
                    rec["reason"] = "no run of the record on a quiet machine: left as it was"
                    out.append(rec)
                    continue
                e.speedup = float(rep.median_speedup or 0.0)
                e.p20_ms, e.median_ms, e.p80_ms = c["p20_ms"], c["median_ms"], c["p80_ms"]
                e.versions, e.timestamp = prov["versions"], prov["timestamp"]
                sessions = (old.get("sessions") or [old.get("recorded")] if same and old.get("recorded") else []) + [when]
                e.provenance = {**(e.provenance or {}), "run": None,  # the numbers are ours now, not a store's row
                                "evaluation": f"kerneltune bench --check --record, {when}: {runs} runs, see 'check'",
                                "case": case.name,
                                "case_json": case.to_json(),
                                "candidate_hash": rep.result["hash"], "threads": prov.get("threads"),
                                "baselines_ms": {n: b.get("median_ms") for n, b in c["baselines"].items()},
                                "check": {"statistic": "quantile ratio", "quantile": opts.quantile,
                                          "speedup": statistics_median(quiet_values), "floor": min(quiet_values),
                                          "quiet_runs": len(quiet_values),
                                          "runs": history,  # [quantile ratio, median ratio, foreign load, when, busy]
                                          "rounds": opts.rounds, "round_ms": opts.round_ms,
                                          "max_foreign_load": limit, "commit": git_commit(),
                                          "recorded": when, "sessions": sessions[-10:]}}
                r.add(e)
                rec.update(updated=True, speedup=e.speedup, check_speedup=e.provenance["check"]["speedup"])
            out.append(rec)
    r.save(registry_path)
    return out


def merge_runs(old: list[list[Any]] | None, new: list[list[Any]], limit: float,
               keep: int = 30) -> tuple[list[list[Any]], list[float]]:
    """Recording accumulates: the runs of earlier sessions (same source and torch) followed by the new ones, the
    last ``keep``; and the quantile ratios of those that ran on a quiet machine: not busy (Measurement.busy, the
    same test that picks the representative run). A run is [quantile ratio, median ratio, foreign load, when,
    busy]; older files have no 'when' and no 'busy': for them a foreign load above ``limit`` is busy (an unknown
    load, no /proc, is not, as in ``measure``)."""
    history = [list(x) + [None] * (4 - len(x)) for x in (old or [])] + [list(x) for x in new]
    history = history[-keep:]

    def busy(x: list[Any]) -> bool:
        return bool(x[4]) if len(x) > 4 and x[4] is not None else x[2] is not None and x[2] > limit

    quiet = [float(x[0]) for x in history if x[0] is not None and not busy(x)]
    return history, quiet


def statistics_median(xs: Sequence[float | None]) -> float:
    import statistics

    return float(statistics.median([x for x in xs if x is not None]))


# -- the whole check -----------------------------------------------------------------------------------------
def run_check(device: str, *, registry_path: str | None = None, op: str | None = None,
              opts: CheckOptions | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check every entry of the registry recorded for this device (of ``op``, when given), and report every
    malformed entry of it as failed. Raises RegistryError (one line) when a file cannot be read as a registry."""
    from kerneltune.evaluate.device import device_info, versions
    from kerneltune.evaluate.evaluator import Evaluator, Options

    opts = opts or CheckOptions()
    progress = progress or (lambda _m: None)
    key = device_info(device)["key"]
    r = _load_checked(registry_path)
    entries = [e for e in r.for_device(key) if op is None or e.op == op]
    rejected = [_rejected_record(s, x) for s in r.sources for x in s.rejected
                if op is None or x.get("op") in (None, op)]
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "device": device_info(device), "device_key": key, "registries": [s.path for s in r.sources],
        "options": asdict(opts), "versions": versions(), "commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "entries": [],
        "other_devices": sorted({e.device_key for e in r.entries} - {key}),
    }
    if entries:
        eopts = Options(device=device, timeout=opts.timeout, seeds=opts.seeds, rounds=opts.rounds,
                        round_ms=opts.round_ms, min_reps=opts.min_reps, samples=True, memory_gb=16.0)
        with Evaluator(eopts, progress=progress) as ev:
            for e in entries:
                report["entries"].append(check_entry(ev, e, opts, progress,
                                                     fresh=lambda: Evaluator(eopts, progress=progress)))
    report["entries"] += rejected
    counts = {s: sum(1 for x in report["entries"] if x["status"] == s)
              for s in (STATUS_OK, STATUS_REGRESSION, STATUS_FAILED, STATUS_INCONCLUSIVE)}
    report["summary"] = {**counts, "checked": len(report["entries"]), "duration_s": round(time.monotonic() - t0, 1)}
    return report


def _load_checked(registry_path: str | None) -> Any:
    """The registry to check (``registry_path`` alone, else the user registry and the shipped one), read without
    the library's warnings (the check reports for itself). A file that cannot be read as a registry at all (not
    JSON, not a registry, another format, a $KERNELTUNE_REGISTRY that does not exist) raises RegistryError with
    its one-line message; malformed entries are in the sources' ``rejected`` lists."""
    import warnings

    from kerneltune import registry as reg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", reg.KernelTuneWarning)
        r = reg.load(registry_path)
    broken = next((s for s in r.sources if s.error and not s.rejected), None)
    if broken is not None:
        raise reg.RegistryError(broken.error)
    return r


def _rejected_record(src: Any, x: dict[str, Any]) -> dict[str, Any]:
    """A failed check record for an entry the registry file holds but that cannot be read (reg.read_file)."""
    name = x.get("name") or f"entries[{x['index']}]"
    what = " ".join(v for v in (x.get("op"), x.get("bucket"), x.get("dtype")) if v)
    return {"entry": f"{name} ({what})" if what else name, "name": x.get("name") or "", "op": x.get("op"),
            "bucket": x.get("bucket"), "dtype": x.get("dtype"), "args": {}, "device_key": x.get("device_key") or "?",
            "candidate": None, "baseline": None, "registry": src.path, "recorded_speedup": None,
            "recorded_floor": None, "recorded_as": "", "entry_speedup": None, **_NOTHING_MEASURED, "notes": [],
            "measurements": [],
            "status": STATUS_FAILED, "reason": f"the registry cannot use this entry: {x['reason']}"}


def exit_code(report: dict[str, Any], strict: bool = False) -> int:
    """1 when an entry regressed or failed verification (or, with ``strict``, was inconclusive or nothing was
    checked); else 0."""
    s = report["summary"]
    if s[STATUS_REGRESSION] or s[STATUS_FAILED]:
        return 1
    if strict and (s[STATUS_INCONCLUSIVE] or not s["checked"]):
        return 1
    return 0


def failure_lines(report: dict[str, Any]) -> list[str]:
    """One line per regression or failure (and per inconclusive entry), for CI logs."""
    lines = []
    for x in report["entries"]:
        if x["status"] in FAILING or x["status"] == STATUS_INCONCLUSIVE:
            lines.append(f"{x['status'].upper()}: {x['entry']} on {x['device_key']}: {x['reason']}")
    return lines


def git_commit(cwd: str | None = None) -> str:
    """The checkout's commit (12 hex digits, '+dirty' when the tree has changes), else $GITHUB_SHA /
    $CI_COMMIT_SHA, else 'unknown'."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=cwd).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=cwd).stdout.strip()
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    for var in ("GITHUB_SHA", "CI_COMMIT_SHA"):
        if os.environ.get(var):
            return os.environ[var][:12]
    return "unknown"


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, default=str)


# -- rows for the results CSV ----------------------------------------------------------------------------------
def _primary_baseline(op: str | None) -> str | None:
    from kerneltune.ops import get_op, op_names

    return get_op(op).primary_baseline if op in op_names() else None


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per contestant (candidate, baseline) per entry measured, in the results-CSV format
    (kerneltune.report.FIELDS), from each entry's last measurement."""
    rows = []
    v = report["versions"]
    for x in report["entries"]:
        ms = x.get("measurements") or []
        if not ms or ms[-1].get("median_speedup") is None:
            continue
        m = ms[-1]
        common = {"timestamp": report["timestamp"], "commit": report["commit"], "source": "bench --check",
                  "device": report["device"]["name"], "device_key": report["device_key"], "torch": v.get("torch"),
                  "triton": v.get("triton"), "numba": v.get("numba"), "kerneltune": v.get("kerneltune"),
                  "threads": report["device"].get("threads"), "op": x["op"], "shape": x.get("shape") or x["bucket"],
                  "dtype": x["dtype"], "candidate": x["name"], "candidate_hash": (m.get("evaluation") or {}).get("hash", "")[:16]}
        # the primary baseline's p50 over each contestant's: known only when the entry's baseline is the primary
        # (its p50 is not measured here otherwise): then the candidate's ratio over it, and 1.0 on its own row;
        # else empty on both (the candidate's ratio over the entry's baseline goes in candidate_speedup)
        primary = x["baseline"] == _primary_baseline(x["op"])
        rows.append({**common, "contestant": x["name"], "kind": "candidate", "p50_ms": m["candidate_p50_ms"],
                     "speedup_vs_primary": m["median_speedup"] if primary else None, "check_speedup": m["speedup"],
                     "recorded_speedup": x["recorded_speedup"], "status": x["status"]})
        rows.append({**common, "contestant": x["baseline"], "kind": "baseline", "p50_ms": m["baseline_p50_ms"],
                     "speedup_vs_primary": 1.0 if primary else None, "candidate_speedup": m["median_speedup"]})
    return rows


# -- the command ----------------------------------------------------------------------------------------------
def check_command(*, op: str | None, device: str, registry: str | None, tolerance: float, confidence: float,
                  confirm: int, max_foreign_load: float, strict: bool, timeout: float, json_out: bool,
                  csv_path: str | None, shapes: Any = None, dtype: str | None = None,
                  candidates: str | None = None, record: bool = False) -> int:
    """Validate `bench --check`'s options (exit 2 with one line on a usage error), then run it."""
    import sys

    from kerneltune.ops import op_names

    def usage(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if shapes or dtype or candidates:
        return usage("--check measures each registry entry at the shape and dtype it was recorded at: drop "
                     "--shapes, --dtype and --candidates")
    if op is not None and op not in op_names():
        return usage(f"unknown op {op!r}: use one of {', '.join(op_names())}, or none for every op")
    # written so that NaN fails each test (it compares false with everything)
    if (not tolerance >= 0 or not 0.5 <= confidence < 1 or confirm < 0 or not 0 < max_foreign_load <= 1
            or not 0 < timeout < math.inf):
        return usage("--tolerance >= 0, 0.5 <= --confidence < 1, --confirm >= 0, 0 < --max-foreign-load <= 1 and "
                     "a finite --timeout > 0, please")
    opts = CheckOptions(tolerance=tolerance, confidence=confidence, confirm=confirm, max_foreign_load=max_foreign_load,
                        timeout=timeout)
    if record:
        return _record_command(device=device, op=op, registry=registry, opts=opts, json_out=json_out)
    return cli_check(device=device, op=op, registry=registry, opts=opts, strict=strict, json_out=json_out,
                     csv_path=csv_path)


def cli_check(*, device: str, op: str | None, registry: str | None, opts: CheckOptions, strict: bool,
              json_out: bool, csv_path: str | None) -> int:
    """`kerneltune bench --check`: prints the report (a table, or JSON with --json), one line per regression on
    stderr, appends rows to ``csv_path``; returns the exit code."""
    import sys

    from rich.console import Console

    err = Console(stderr=True)
    out = Console(width=None if sys.stdout.isatty() else 200)
    if registry and not os.path.isfile(registry):
        print(f"error: --registry {registry}: no such file", file=sys.stderr)
        return 2
    from kerneltune.registry import RegistryError

    try:
        with err.status("starting") as status:
            report = run_check(device, registry_path=registry, op=op, opts=opts,
                               progress=lambda m: status.update(m) if not json_out else None)
    except RegistryError as e:  # a file that is not a registry: nothing can be checked, which is not a pass
        print(f"error: cannot check the registry: {e}", file=sys.stderr)
        return 2
    if csv_path:
        from kerneltune.report import append_rows

        append_rows(csv_path, csv_rows(report))
    code = exit_code(report, strict)
    report["exit_code"] = code
    if json_out:
        print(to_json(report))
    else:
        _print_report(out, report, opts)
    for line in failure_lines(report):
        print(line, file=sys.stderr)
    return code


def _record_command(*, device: str, op: str | None, registry: str | None, opts: CheckOptions, json_out: bool) -> int:
    import sys

    from rich.console import Console

    from kerneltune import registry as reg

    path = registry or os.environ.get(reg.ENV_REGISTRY, "").strip() or reg.shipped_path()
    if not os.path.isfile(path):
        print(f"error: --registry {path}: no such file", file=sys.stderr)
        return 2
    err = Console(stderr=True)
    try:
        with err.status("recording") as status:
            recs = record_entries(device, path, op=op, opts=opts, progress=lambda m: status.update(m))
    except reg.RegistryError as e:
        print(f"error: cannot record into the registry: {e}", file=sys.stderr)
        return 2
    if json_out:
        print(json.dumps({"registry": path, "entries": recs}, indent=1, default=str))
    for x in recs:
        runs = ", ".join(f"{m['speedup']:.3g}" if m.get("speedup") is not None else m["status"] for m in x["runs"])
        line = (f"recorded {x['entry']}: speedup {x['speedup']:.3g}×, p{opts.quantile * 100:.0f} ratio "
                f"{x['check_speedup']:.3g}× (runs: {runs})" if x["updated"] else f"NOT RECORDED {x['entry']}: {x['reason']}")
        print(line, file=sys.stderr if json_out else sys.stdout)
    if not recs:
        print(f"nothing to record: {path} has no entry for this device", file=sys.stderr)
    return 0 if recs and all(x["updated"] for x in recs) else 1


_STYLE = {STATUS_OK: "green", STATUS_REGRESSION: "red", STATUS_FAILED: "red", STATUS_INCONCLUSIVE: "yellow"}


def _print_report(out: Any, report: dict[str, Any], opts: CheckOptions) -> None:
    from rich.table import Table

    s = report["summary"]
    if not s["checked"]:
        others = ", ".join(report["other_devices"]) or "none"
        out.print(f"nothing to check: no registry entry for this device ({report['device_key']}); entries exist for: "
                  f"{others}. Record some with kerneltune eval + kerneltune promote on this kind of machine.",
                  highlight=False)
        return
    t = Table(title=f"kerneltune bench --check · {report['device_key']}")
    for col in ("entry", "status", "recorded", f"now (p{opts.quantile * 100:.0f} ratio)", f"{opts.confidence:.0%} CI",
                "change", "median ratio", "foreign load", "note"):
        t.add_column(col, overflow="fold")
    for x in report["entries"]:
        ms = x.get("measurements") or [{}]
        m = ms[-1]
        ci = x.get("ci")
        recorded = x["recorded_speedup"]
        low = x.get("recorded_floor", recorded)
        t.add_row(x["entry"], f"[{_STYLE[x['status']]}]{x['status']}[/]",
                  "—" if recorded is None else
                  f"{recorded:.3g}×" + (f" (≥{low:.3g})" if low is not None and low < recorded else ""),
                  f"{x['speedup']:.3g}×" if x.get("speedup") is not None else "—",
                  f"{ci[0]:.3g}–{ci[1]:.3g}" if ci else "—",
                  f"{x['change']:+.0%}" if x.get("change") is not None else "—",
                  f"{m['median_speedup']:.3g}×" if m.get("median_speedup") is not None else "—",
                  f"{m['foreign_load']:.0%}" if m.get("foreign_load") is not None else "—",
                  "; ".join(([x["reason"]] if x["reason"] and x["status"] != STATUS_OK else []) + x["notes"]))
    out.print(t)
    out.print(f"[dim]{s['checked']} checked in {s['duration_s']} s: {s[STATUS_OK]} ok, {s[STATUS_REGRESSION]} "
              f"regressed, {s[STATUS_FAILED]} failed, {s[STATUS_INCONCLUSIVE]} inconclusive · regression when the "
              f"lowest recorded speedup > CI upper end × {1 + opts.tolerance:g} · commit {report['commit']} · torch "
              f"{report['versions']['torch']}[/dim]", highlight=False)
