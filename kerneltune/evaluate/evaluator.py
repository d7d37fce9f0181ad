"""The evaluator: stages that stop early, each candidate in its own confined worker.

    static     read the file without running it: syntax, KERNELTUNE, imports, forbidden calls
    load       import (and compile) in the worker
    smoke      one tiny case
    check      every check case (awkward shapes, every dtype the backend can do) and every timed
               case, over several fresh seeds; output memory poisoned; inputs must come back unchanged
    time       candidate and baselines (a separate, trusted worker) interleaved round by round
    reverify   new values in the same buffers after timing: a cache keyed by address or call count fails
    roofline   achieved GB/s and TFLOP/s against the device's measured ceilings

The parent owns inputs, references and comparisons; a worker never sees an expected result.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import secrets
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch

from kerneltune.backends import capability
from kerneltune.evaluate import roofline as roof
from kerneltune.evaluate.device import device_info, versions
from kerneltune.evaluate.process import WorkerDied, WorkerProcess, WorkerTimeout
from kerneltune.evaluate.procfs import LoadMeter, proc_table, stopping_fails, wait_quiet
from kerneltune.evaluate.static import (
    CandidateFile,
    StaticReject,
    guess_meta,
    inspect_source,
    read_candidate,
    source_hash,
)
from kerneltune.ops import Case, OpSpec, get_op
from kerneltune.ops.base import VOUCH_BLOCK, VOUCH_DIGESTS, Inputs, flatten, unflatten

LARGE_CASE_BYTES = 1 << 30  # a timed case moving this much is checked with one seed before timing (two after)
STATUSES = ("passed", "incorrect", "rejected", "compile_error", "crashed", "timeout", "unsupported")


@dataclass
class Options:
    device: str = "cpu"
    timeout: float = 300.0            # seconds for one candidate, all stages
    memory_gb: float = 8.0            # per worker (address space on CPU; RSS watch on both)
    seeds: int = 3                    # fresh random inputs per check case
    rounds: int = 7                   # interleaved timing rounds
    round_ms: float = 40.0            # target time of one contestant's turn in a round
    min_reps: int = 15                # at least this many timed calls per contestant
    shapes: list[Case] | None = None  # timed cases (None: the op's defaults for the device)
    time_it: bool = True
    sandbox: bool = True
    baselines: list[str] | None = None  # None: all the op has on the device
    compile_cuda: bool = True         # without a GPU: compile-check CUDA candidates with nvcc (minutes each)
    samples: bool = False             # keep every timed call, per round, in each case's "samples_ms"
    # while one contestant takes its turn, every other worker is stopped (SIGSTOP); KERNELTUNE_ISOLATE=0: not
    isolate: bool = field(default_factory=lambda: os.environ.get("KERNELTUNE_ISOLATE", "1") != "0")


class BaselineError(RuntimeError):
    """The op's primary baseline failed on a timed case: no speedup can be measured here, for any candidate.
    Not a verdict on the candidate (nothing is stored for it); the caller stops with this one line."""


def block_means(times: list[float], blocks: list[int]) -> list[float]:
    """An in-place op's timed calls are checked a block at a time (the state's change over the block): each call
    is timed as its block's mean, so that work moved between the calls of a block (all of it into the block's
    last call, the others empty) gains nothing. ``blocks``: the calls of each block, in order."""
    if sum(blocks) != len(times) or any(b < 1 for b in blocks):  # (a candidate's is checked: vouch_check)
        return times
    out: list[float] = []
    for b in blocks:
        part = times[len(out):len(out) + b]
        out += [sum(part) / b] * b
    return out


class _BaselineDropped(Exception):
    """A secondary baseline failed while being timed: it leaves this case's table (the candidate pays nothing)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(why)
        self.name, self.why = name, why


class Outcome(Exception):
    """Ends an evaluation early with a verdict."""

    def __init__(self, status: str, reason: str, stage: str) -> None:
        super().__init__(reason)
        self.status, self.reason, self.stage = status, reason, stage


@dataclass
class _Timing:
    turns: list[tuple[float, float, int]] = field(default_factory=list)  # (wall ms, reported ms, calls) per turn
    # per turn: the worker's vouching (ms) for its digests and once a request, the digests, and (ms) per call
    fixed: list[tuple[float, int, float]] = field(default_factory=list)
    per_turn: list[list[float]] = field(default_factory=list)  # the timed calls of each turn, in round order

    @property
    def times(self) -> list[float]:
        return [t for turn in self.per_turn for t in turn]

    def stats(self, samples: bool = False) -> dict[str, Any]:
        times = self.times
        q = _quantiles(times)
        st: dict[str, Any] = {"median_ms": q[1], "p20_ms": q[0], "p80_ms": q[2], "reps": len(times)}
        if samples:  # Options.samples: round r of every contestant is index r (kerneltune.check's statistics)
            st["samples_ms"] = [list(t) for t in self.per_turn]
        return st


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    if len(s) == 1:
        return s[0], s[0], s[0]
    qs = statistics.quantiles(s, n=10, method="inclusive")
    return qs[1], statistics.median(s), qs[7]


class DeviceLock:
    """Readers-writer lock over the device: loading and checking candidates share it (several workers at
    once), timing takes it alone, so no two timings share a device or compete for the cores being timed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Evaluator:
    """Evaluates candidates on one device. Keeps one trusted baseline worker per op across candidates."""

    def __init__(self, options: Options | None = None, store: Any = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.opt = options or Options()
        self.store = store
        self.progress = progress or (lambda _msg: None)
        self.device = self.opt.device
        self._baseline_workers: dict[str, WorkerProcess] = {}
        self._ceilings: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self.lock = DeviceLock()
        self._active: set[WorkerProcess] = set()
        self._active_lock = threading.Lock()  # guards _active, _isolating and every worker's stop/resume
        self._isolating = False

    # -- public ------------------------------------------------------------------------------------------
    def evaluate_path(self, path: str, *, origin: str = "user", parent: str | None = None,
                      run_id: str | None = None) -> dict[str, Any]:
        try:
            cand = read_candidate(path)
        except StaticReject as r:
            return self._finish(CandidateFile(path, path, "", source_hash("")), r.status, r.reason, "static",
                                time.monotonic(), store=False)
        return self.evaluate(cand, origin=origin, parent=parent, run_id=run_id)

    def evaluate(self, cand: CandidateFile, *, origin: str = "user", parent: str | None = None,
                 run_id: str | None = None) -> dict[str, Any]:
        t0 = time.monotonic()
        eval_id = next(self._ids)
        res: dict[str, Any] = {}
        try:
            inspect_source(cand)
        except StaticReject as r:
            if not cand.meta:  # unparsable: still record it, under the op its text names (if any)
                cand.meta = guess_meta(cand.source)
            self._store_candidate(cand, origin, parent)
            return self._finish(cand, r.status, r.reason, "static", t0, run_id=run_id)
        self._store_candidate(cand, origin, parent)
        spec = get_op(cand.op)
        cap = capability(cand.backend, self.device)
        worker: WorkerProcess | None = None
        stage = "load"
        try:
            worker = WorkerProcess(op=spec.name, device=self.device, role="candidate", backend=cand.backend,
                                   memory_bytes=int(self.opt.memory_gb * 2**30), sandbox=self.opt.sandbox,
                                   label=cand.name)
            self._register(worker)
            deadline = t0 + self.opt.timeout
            left = lambda: max(deadline - time.monotonic(), 0.01)  # noqa: E731
            self.progress(f"{cand.name}: loading")
            with self.lock.shared():
                worker.start(timeout=left())
                # how the worker runs is provenance of every verdict from here on, a failed load's too
                res["sandbox"] = {**worker.sandbox_info, "namespaces": worker.namespaces,
                                  "given_up": worker.confinement.note}
                reply, _ = worker.request({"cmd": "load", "source": cand.source, "filename": f"{cand.name}.py",
                                           "module": f"kt_candidate_{cand.name}", "backend": cand.backend,
                                           "compile_cuda": self.opt.compile_cuda},
                                          timeout=left())
            if not reply.get("ok"):
                raise Outcome(reply["status"], reply["reason"], stage)
            res["threads"] = reply.get("threads")
            if not cap.runs:
                note = reply.get("compile_note") or ""
                raise Outcome("unsupported", f"{cap.note}; not run" + (f" ({note})" if note else ""), stage)
            stage = "smoke"
            self.progress(f"{cand.name}: smoke test")
            self._check(worker, spec, spec.smoke_case(), 0, left, stage, slot=None, last={})
            stage = "check"
            timed = [c for c in (self.opt.shapes or spec.timed_cases(self.device)) if c.dtype in cap.dtypes]
            if not cap.timed:  # timed shapes only matter where timings count (and cost minutes in an interpreter)
                timed = []
            checks = [c for c in spec.check_cases(self.device) if c.dtype in cap.dtypes]
            skipped = sorted({c.dtype for c in spec.check_cases(self.device)} - set(cap.dtypes))
            last: dict[str, Any] = {}
            after: dict[str, Any] = {}  # slot -> its in-place outputs after its last check (where timing starts)
            last_call: dict[str, tuple[int, int]] = {}  # slot -> (seed, index) of the candidate's last timed call
            n_checks = 0
            one_seed: list[str] = []
            for i, case in enumerate(checks + timed):
                slot = f"t{i - len(checks)}" if i >= len(checks) else None
                # a large timed case (GPT-2 small's optimizer state: 3.5 GB a call) gets one seed here, the last
                # (the values and arguments its slot keeps for timing, as the baselines get them); it is checked
                # twice more after timing (new values, same buffers); the check cases take every seed
                large = slot is not None and spec.bytes_moved(case) >= LARGE_CASE_BYTES
                if large:
                    one_seed.append(case.name)
                for seed in range(self.opt.seeds if large else 1, self.opt.seeds + 1):
                    self.progress(f"{cand.name}: check {case.name} seed {seed}")
                    self._check(worker, spec, case, seed, left, stage, slot=slot, last=last, after=after)
                    n_checks += 1
            res["checks"] = {"calls": n_checks + 1, "cases": [c.name for c in checks + timed],
                             "seeds": self.opt.seeds, "dtypes_not_checked": skipped,
                             "one_seed_before_timing": one_seed}
            notes = [cap.note] if cap.note else []
            if not (self.opt.time_it and cap.timed and timed):
                res["notes"] = notes
                raise Outcome("passed", "", "check")
            stage = "time"
            res["cases"] = []
            with self.lock.exclusive():
                for i, case in enumerate(timed):
                    res["cases"].append(self._time_case(worker, spec, case, f"t{i}", left, cand.name, eval_id,
                                                        after.get(f"t{i}"), last_call))
            stage = "reverify"
            for i, case in enumerate(timed):
                self.progress(f"{cand.name}: re-verify {case.name}")
                try:
                    # the values of the last timed call, with ~1% of the elements changed (a cache keyed on a
                    # fingerprint of a few values hits, and returns that call's answer) ...
                    with self.lock.shared():  # CPU work: never during another's timed turn
                        timed_values = spec.make_inputs(case, self.opt.seeds)
                        if f"t{i}" in last_call:
                            timed_values = spec.scale_input(timed_values, *last_call[f"t{i}"])
                        near = spec.perturb(timed_values, 2000 + i)
                    self._check(worker, spec, case, 2000 + i, left, stage, slot=f"t{i}", last=last, inputs=near)
                    # ... and entirely new values, in the same buffers, through the op's optional entry points
                    # where the candidate has them (the library's other calls, at the size that is served)
                    again = replace(case, args={**case.args, **spec.companion_args}) if spec.companion_args else case
                    self._check(worker, spec, again, 1000 + i, left, stage, slot=f"t{i}", last=last)
                except Outcome as o:
                    if o.status == "incorrect":
                        raise Outcome(o.status, f"correct before timing, wrong after {worker_calls(res)} calls "
                                                f"with new values in the same buffers: {o.reason}", stage) from None
                    raise
            for c in res["cases"]:
                if c.get("noisy"):
                    notes.append(f"timing noisy: {c['noisy']}; the ratio is not reliable: time it again on a "
                                 f"quieter machine")
            res["notes"] = notes
            raise Outcome("passed", "", "done")
        except Outcome as o:
            return self._finish(cand, o.status, o.reason, o.stage, t0, extra=res, spec=spec, run_id=run_id)
        except WorkerTimeout:
            return self._finish(cand, "timeout", f"no answer within the {self.opt.timeout:.0f} s limit during "
                                                 f"{stage} (raise --timeout if the kernel is just slow)", stage, t0,
                                extra=res, spec=spec, run_id=run_id)
        except WorkerDied as e:
            return self._finish(cand, e.death.status, f"{e.death.reason} (during {stage})", stage, t0, extra=res,
                                spec=spec, run_id=run_id)
        finally:
            if worker is not None:
                with self._active_lock:
                    self._active.discard(worker)
                worker.close()
            if res.get("cases") is not None:
                with self.lock.exclusive():
                    for w in self._baseline_workers.values():  # free this evaluation's baseline buffers
                        try:
                            w.request({"cmd": "clear", "prefix": f"{eval_id}:"}, timeout=60)
                        except (WorkerDied, WorkerTimeout):
                            w.close()

    def _register(self, worker: WorkerProcess) -> None:
        """A new candidate worker joins the evaluator's (killed by abort, stopped during others' timed turns)."""
        with self._active_lock:
            self._active.add(worker)
            if self._isolating:  # born during another candidate's timing: it waits, stopped, until the end
                worker.stop()

    def abort(self) -> None:
        """Kill every worker now (Ctrl-C): evaluations in flight end without a verdict worth keeping."""
        with self._active_lock:
            active = list(self._active)
        for w in active + list(self._baseline_workers.values()):
            w.kill()

    def close(self) -> None:
        for w in self._baseline_workers.values():
            w.close()
        self._baseline_workers.clear()

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- stages ------------------------------------------------------------------------------------------
    def _check(self, worker: WorkerProcess, spec: OpSpec, case: Case, seed: int, left: Callable[[], float],
               stage: str, *, slot: str | None, last: dict[str, Any], inputs: Any = None,
               after: dict[str, Any] | None = None) -> None:
        msg_inputs = inputs
        with self.lock.shared():  # a large reference may run on the device: never during another's timing
            inputs = msg_inputs if msg_inputs is not None else spec.make_inputs(case, seed)
            expected = spec.reference(inputs)
        msg = {"cmd": "call", "fn": "run", "args": inputs.args, "slot": slot, "poison": True}
        with self.lock.shared():
            reply, flat = worker.request(msg, flatten(inputs.tensors), timeout=left())
        where = f"[{case.name}, seed {seed}]"
        if not reply.get("ok"):
            raise Outcome(reply["status"], f"{reply['reason']} {where}", stage)
        try:
            with self.lock.shared():  # comparing GBs of inputs is CPU work: never during another's timed turn
                actual = unflatten(flat)
                for name in spec.unchanged:
                    got, sent = actual[name], inputs.tensors[name]
                    pairs = zip(got, sent) if isinstance(sent, list) else [(got, sent)]
                    if isinstance(sent, list) and len(got) != len(sent):
                        raise Outcome("rejected", f"modified its input list {name} {where}", stage)
                    for g, s in pairs:
                        if g.shape != s.shape or not torch.equal(g, s):
                            raise Outcome("rejected", f"modified its input {name} (inputs are read-only) {where}",
                                          stage)
            missing = [o for o in spec.outputs if o not in actual]
            if missing:
                raise Outcome("crashed", f"the worker returned no {missing[0]} {where}", stage)
            with self.lock.shared():  # the reference (and so the comparison) may be on the device
                why = spec.compare(inputs, expected, actual)
        except Outcome:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise Outcome("incorrect", f"outputs could not be compared ({e}) {where}", stage) from None
        key = slot or case.name
        if why:
            prev = last.get(key)
            with self.lock.shared():  # the previous call's reference, recomputed (not kept: GBs at GPT-2 scale)
                cached = prev is not None and not spec.compare(prev, spec.reference(prev), actual)
            if cached:
                raise Outcome("rejected", "output cached across calls: new values in the same buffers gave the "
                                          f"old result {where}", stage)
            raise Outcome("incorrect", f"{why} {where}", stage)
        last[key] = inputs
        if slot and after is not None and spec.in_place:
            after[slot] = {k: actual[k] for k in spec.in_place}

    def _baseline_worker(self, spec: OpSpec) -> WorkerProcess:
        w = self._baseline_workers.get(spec.name)
        if w is not None and w.proc.poll() is None:
            return w
        w = WorkerProcess(op=spec.name, device=self.device, role="baseline", sandbox=self.opt.sandbox,
                          memory_bytes=None)
        w.start(timeout=120)
        reply, _ = w.request({"cmd": "load"}, timeout=120)
        if not reply.get("ok"):
            raise RuntimeError(f"the {spec.name} baseline worker failed to start: {reply.get('reason')}")
        w.baseline_names = reply["names"]  # type: ignore[attr-defined]
        self._baseline_workers[spec.name] = w
        return w

    def ceilings(self, worker: WorkerProcess) -> dict[str, Any] | None:
        """The device's measured ceilings: cached per device, else measured once by the trusted ``worker``."""
        if self._ceilings is None:
            key = device_info(self.device)["key"]
            self._ceilings = roof.load_cached(key)
            if self._ceilings is None:
                self.progress("measuring the device's ceilings (once per device)")
                reply, _ = worker.request({"cmd": "ceilings"}, timeout=600)
                if reply.get("ok"):
                    self._ceilings = reply["ceilings"]
                    self._ceilings["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    roof.save(key, self._ceilings)
        return self._ceilings

    def _time_case(self, worker: WorkerProcess, spec: OpSpec, case: Case, slot: str, left: Callable[[], float],
                   label: str, eval_id: int, after: dict[str, Any] | None = None,
                   last_call: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
        bw = self._baseline_worker(spec)
        names = [n for n in bw.baseline_names if self.opt.baselines is None or n in self.opt.baselines]  # type: ignore[attr-defined]
        if spec.primary_baseline not in names:
            names.insert(0, spec.primary_baseline)
        # the baselines get the same inputs, in their own buffers, and must pass the same check
        inputs = spec.make_inputs(case, self.opt.seeds)  # the values the candidate's slot now holds
        expected = spec.reference(inputs)
        bslot = f"{eval_id}:{slot}"
        dropped: dict[str, str] = {}
        for name in list(names):
            reply, flat = bw.request({"cmd": "call", "fn": name, "args": inputs.args, "slot": f"{bslot}:{name}",
                                      "poison": False}, flatten(inputs.tensors), timeout=600)
            why = (f"failed: {reply.get('reason')}" if not reply.get("ok") else
                   spec.compare(inputs, expected, unflatten(flat)))
            if why and name == spec.primary_baseline:
                raise BaselineError(f"the primary baseline {name} failed on {case.name} ({why[:300]}): no speedup "
                                    f"can be measured on this device; check torch on it (kerneltune doctor), or time "
                                    f"other shapes with --shapes")
            if why:  # a secondary baseline that cannot run this case (a pinned backend, a compiler) is left out
                dropped[name] = why if not reply.get("ok") else f"disagrees with the reference: {why}"
                names.remove(name)
        # every timed call is vouched for: the candidate's digests against the reference's (OpSpec.digest,
        # docs/measurement.md); an in-place op's timed calls start where its last check left the slot
        start = Inputs({**inputs.tensors, **after}, inputs.args) if spec.in_place and after else inputs
        vouch_refs: dict[int, dict[str, Any]] = {}
        # drawn from the OS, never derived from what a candidate knows (its evaluation's number, slot and case
        # name): a candidate that could recompute the sketch's U and W would return a result made to match it
        vouch_seeds = iter(lambda: secrets.randbits(40), None)
        sketch_seed = secrets.randbits(40)

        def vouch_ref(calls: int) -> dict[str, Any]:  # in-place: one per number of calls in a block (<= 8)
            if calls in vouch_refs:  # (the timing lock is held: nothing else uses the device)
                return vouch_refs[calls]
            if not spec.in_place:
                vouch_refs[calls] = spec.digest_reference(start, expected, 1, seed=sketch_seed)
                return vouch_refs[calls]
            one = None  # one chain of reference steps, a digest reference after each
            for k, out in enumerate(itertools.islice(spec.reference_chain(start), calls), 1):
                one = one or out
                if k not in vouch_refs:
                    vouch_refs[k] = spec.digest_reference(start, out, k, one_call=one)
            return vouch_refs[calls]

        def vouch_check(r: dict[str, Any], seed: int, n: int, warmup: int) -> str:
            digests = r.get("digests") or []
            if spec.in_place:
                blocks = r.get("blocks") or []
                if sum(blocks) != n + warmup or len(blocks) != len(digests) or any(b > VOUCH_BLOCK for b in blocks):
                    return f"digests of {blocks} calls came back for {n + warmup}"
                return next((w for d, b in zip(digests, blocks) if (w := spec.check_digest(vouch_ref(b), d))), "")
            digested = r.get("digested") or []
            if (len(digested) != len(digests) or len(set(digested)) != len(digested)
                    or len(digested) != min(n, VOUCH_DIGESTS) or any(not 0 <= i < n for i in digested)):
                return f"digests of {len(digests)} calls came back for {n} timed calls"
            rows = inputs.tensors[spec.scaled_input].numel() // inputs.tensors[spec.scaled_input].shape[-1]
            for d, i in zip(digests, digested):
                why = spec.check_digest(vouch_ref(1), d, spec.rep_scales(seed, i, rows))
                if why:
                    return f"timed call {i + 1} of {n}: {why}"
            return ""

        contestants: list[tuple[str, WorkerProcess, str, str]] = [("candidate", worker, "run", slot)]
        contestants += [(n, bw, n, f"{bslot}:{n}") for n in names]

        def timed_turn(label_c: str, w: WorkerProcess, fn: str, s: str, n: int, warmup: int,
                       check: bool = True) -> dict[str, Any]:
            seed = next(vouch_seeds)  # the baselines' turns are vouched the same way: the same work around each call
            r, _ = w.request({"cmd": "time", "fn": fn, "slot": s, "reps": n, "warmup": warmup, "vouch": seed,
                              "sketch": sketch_seed}, timeout=left())
            if not r.get("ok") and label_c != "candidate":  # the trusted worker failed: no verdict on the candidate
                why = f"failed while timing {case.name}: {str(r.get('reason'))[:300]}"
                if label_c == spec.primary_baseline:
                    raise BaselineError(f"the primary baseline {label_c} {why}: no speedup can be measured; check "
                                        f"torch on this device (kerneltune doctor), or time other shapes with --shapes")
                raise _BaselineDropped(label_c, why)
            if not r.get("ok"):
                raise Outcome(r["status"], f"{r['reason']} [{case.name}, while timing]", "time")
            r["_vouch"] = (seed, n, warmup)
            if label_c == "candidate" and last_call is not None and n + warmup:  # the values its last call saw
                last_call[slot] = (seed, n - 1 if n else -warmup)
            if check:
                checked(label_c, r)
            return r

        def drop(e: _BaselineDropped) -> None:  # a secondary baseline that failed: out of this case's table
            dropped[e.name] = e.why
            names.remove(e.name)
            contestants[:] = [c for c in contestants if c[0] != e.name]

        def checked(label_c: str, r: dict[str, Any]) -> None:
            """The candidate's digests (a parent's computation: outside the turn's wall-clock time)."""
            if label_c == "candidate":
                why = vouch_check(r, *r["_vouch"])
                if why:
                    raise Outcome("incorrect", f"{why} [{case.name}, while timing]", "time")

        with self._isolated_turns() as turn:
            # calibrate: how many calls fill one turn of a round
            reps: dict[str, int] = {}
            for label_c, w, fn, s in list(contestants):
                self.progress(f"{label}: calibrating {label_c} on {case.name}")
                turn(w)
                try:
                    r = timed_turn(label_c, w, fn, s, 1, 2)
                except _BaselineDropped as e:
                    drop(e)
                    continue
                t = max(min(r["times_ms"]), 1e-4)
                reps[label_c] = int(min(max(math.ceil(self.opt.round_ms / t), 1), 5000))
            rounds = max(self.opt.rounds, math.ceil(self.opt.min_reps / max(min(reps.values()), 1)))
            rc = reps["candidate"]  # the references, before the turns: the evaluator's wall clock times each turn
            for calls in ({1, min(rc, VOUCH_BLOCK), rc % VOUCH_BLOCK or 1} if spec.in_place else {1}):
                vouch_ref(calls)

            timed = "timed twice"
            for attempt in (1, 2):
                timing = {c[0]: _Timing() for c in contestants}
                t_attempt = time.monotonic()
                meter = LoadMeter().start()
                try:
                    for r_i in range(rounds):
                        order = contestants[r_i % len(contestants):] + contestants[: r_i % len(contestants)]
                        for label_c, w, fn, s in order:
                            if label_c in dropped:
                                continue
                            self.progress(f"{label}: timing {case.name} round {r_i + 1}/{rounds} ({label_c})")
                            turn(w)
                            try:
                                # the turn's warm-up call (the other contestants' turns left the caches cold): a
                                # request of its own, so the cross-check below sees only timed calls. Estimating it
                                # at the candidate's pace misjudged a call whose time varies: an honest 20 ms
                                # candidate that reads /proc was rejected.
                                timed_turn(label_c, w, fn, s, 0, 1)
                                t_start = time.perf_counter()
                                r = timed_turn(label_c, w, fn, s, reps[label_c], 0, check=False)
                            except _BaselineDropped as e:
                                drop(e)
                                continue
                            wall = (time.perf_counter() - t_start) * 1e3
                            checked(label_c, r)
                            tm = timing[label_c]
                            times = [float(x) for x in r["times_ms"]]
                            if spec.in_place:  # checked a block at a time: timed so too (see block_means)
                                times = block_means(times, r.get("blocks") or [])
                            tm.per_turn.append(times)
                            tm.turns.append((wall, sum(times), len(times)))
                            tm.fixed.append((min(max(float(r.get("vouch_fixed_ms") or 0.0), 0.0), wall),
                                             max(len(r.get("digests") or []), 1),
                                             min(max(float(r.get("vouch_call_ms") or 0.0), 0.0), wall)))
                finally:  # its sampling thread ends with the timing, however the timing ends
                    load = meter.stop()
                # foreign CPU load judges CPU timings; a GPU's own timing is judged by the baseline's spread alone
                noisy = timing_noise(timing[spec.primary_baseline].times, load if self.device == "cpu" else None)
                if not noisy or attempt == 2:
                    break
                wait = min(QUIET_WAIT_S, left() - 2 * (time.monotonic() - t_attempt))  # never at the verdict's cost
                if wait < 0:
                    timed = "timed once: too little of its time limit left to time it again"
                    break
                self.progress(f"{label}: timing of {case.name} was noisy ({noisy}); waiting for a quieter machine "
                              f"(up to {wait:.0f} s) and timing it again")
                wait_quiet(NOISY_LOAD / 2, wait)
        self._check_timer(timing, names, case)
        cand = timing["candidate"].stats(self.opt.samples)
        out: dict[str, Any] = {"case": case.to_json(), "name": case.name, **cand, "baselines": {}}
        out["vouched"] = True  # every timed call's result was checked (missing_checks: older results were not)
        out["foreign_load"] = load
        # without PID namespaces a process that left a worker's session and tree (double fork, setsid) is not
        # found, so not stopped: the turns ran alone only as far as the evaluator could see
        out["isolated"] = turn.alone and worker.namespaces and bw.namespaces
        if noisy:  # timed twice, noisy both times: the ratio stands, marked, and a search does not rank it
            out["noisy"] = f"{noisy} [{case.name}, {timed}]"
        if dropped:
            out["baselines_left_out"] = dropped
        for n in names:
            st = timing[n].stats(self.opt.samples)
            st["speedup"] = st["median_ms"] / cand["median_ms"] if cand["median_ms"] > 0 else None
            out["baselines"][n] = st
        out["speedup"] = out["baselines"][spec.primary_baseline]["speedup"]
        out["roofline"] = roof.roofline(spec.flops(case), spec.bytes_moved(case), cand["median_ms"],
                                        self.ceilings(bw), case.dtype)
        for n in names:
            out["baselines"][n]["roofline"] = roof.roofline(spec.flops(case), spec.bytes_moved(case),
                                                            out["baselines"][n]["median_ms"], self._ceilings,
                                                            case.dtype)
        return out

    def isolating(self) -> bool:
        """Do timed turns run alone here: asked for (Options.isolate), and this machine can stop a process and
        see it stopped (kerneltune doctor says why not)?"""
        return self.opt.isolate and not stopping_fails()

    @contextlib.contextmanager
    def _isolated_turns(self) -> Iterator["_Turns"]:
        """Yield ``turn``: from the calibration to the last timed round, call ``turn(w)`` before each request of
        a contestant; every other worker of this evaluator (the other contestants, idle candidates of a parallel
        search) is then stopped with SIGSTOP until the timing ends or its own turn comes. A thread a candidate
        leaves running between calls (started at import, or native, where no check sees it) cannot slow the
        baselines it is compared with, and an idle thread pool of one contestant cannot slow another.
        ``turn.alone`` says afterwards whether every other worker was seen stopped in every turn."""
        def workers() -> list[WorkerProcess]:  # the live ones: a dead worker's pid may name another process now
            ws = list(self._active) + [w for w in self._baseline_workers.values() if w not in self._active]
            return [w for w in ws if w.proc.poll() is None]

        turn = _Turns(self.isolating())
        if not turn.alone:
            yield turn
            return

        def stop_others(w: WorkerProcess) -> None:
            with self._active_lock:
                table = proc_table()
                for other in workers():
                    if other is not w and not other.stop(table):
                        turn.alone = False
                w.resume()

        turn.stop_others = stop_others
        with self._active_lock:
            self._isolating = True
        try:
            yield turn
        finally:
            with self._active_lock:
                self._isolating = False
                for w in workers():
                    w.resume()

    def _check_timer(self, timing: dict[str, _Timing], baselines: list[str], case: Case) -> None:
        """The candidate's clock against the evaluator's: in every one of its turns, the time it reported must
        account for the wall time the turn took, given the per-call overhead the trusted baseline worker shows
        (IPC, L2 flush). The best turn decides, so a machine busy with other work does not trip it; a patched
        timer under-reports in every turn."""
        # the vouching's work once a request (an in-place op's restore and last digest; the at most 64 sketches
        # of a request's calls) is allowed for: the baselines' own, and the candidate's up to 1.5 times the
        # baselines' largest cost a digest, for its own number of digests (its figure comes from its process, so
        # it cannot stretch the allowance); the scaled input's writing before each call likewise, a call; an
        # in-place op's blocks are in base_over
        per_digest = 1.5 * max((f / d for b in baselines for f, d, _ in timing[b].fixed), default=0.0)
        per_call = 1.5 * max((c / max(n, 1) for b in baselines for (_, _, n), (_, _, c)
                              in zip(timing[b].turns, timing[b].fixed)), default=0.0)

        def allowed(t: _Timing, i: int, capped: bool) -> float:
            if not t.fixed:
                return 0.0
            f, d, c = t.fixed[i]
            n = t.turns[i][2]
            return min(f, per_digest * d + 2.0) + min(c, per_call * n + 1.0) if capped else f + c

        def untimed_per_call(t: _Timing, capped: bool = False) -> list[float]:
            return [max(w - s - allowed(t, i, capped), 0.0) / max(n, 1) for i, (w, s, n) in enumerate(t.turns)]

        base = [min(untimed_per_call(timing[b])) for b in baselines if timing[b].turns]
        base_over = max(base) if base else 0.0
        c = timing["candidate"]
        untimed = untimed_per_call(c, True)
        best = min(range(len(c.turns)), key=lambda i: untimed[i])
        wall, reported, calls = c.turns[best]
        unexplained = wall - reported - allowed(c, best, True) - calls * base_over
        if unexplained > 0.15 * wall and unexplained > 10:
            raise Outcome("rejected", f"timer tampering: in its best turn the candidate reported {reported:.1f} ms of "
                                      f"work for {calls} calls that took {wall:.1f} ms of the evaluator's wall clock "
                                      f"[{case.name}]", "time")

    # -- results -------------------------------------------------------------------------------------------
    def _store_candidate(self, cand: CandidateFile, origin: str, parent: str | None) -> None:
        if self.store is None:
            return
        self.store.add_candidate(hash=cand.hash, op=cand.op or "unknown", backend=cand.backend or "unknown", name=cand.name,
                                 source=cand.source, path=cand.path, summary=cand.summary,
                                 params=cand.meta.get("params"), origin=cand.meta.get("origin", origin),
                                 parent=parent or cand.meta.get("parent"))

    def _finish(self, cand: CandidateFile, status: str, reason: str, stage: str, t0: float, *,
                extra: dict[str, Any] | None = None, spec: OpSpec | None = None, store: bool = True,
                run_id: str | None = None) -> dict[str, Any]:
        extra = extra or {}
        cases = extra.get("cases") or []
        primary = cases[0] if cases and status == "passed" else None
        res: dict[str, Any] = {
            "candidate": cand.path or cand.name,
            "name": cand.name,
            "hash": cand.hash,
            "op": cand.op or None,
            "backend": cand.backend or None,
            "status": status,
            "reason": "" if status == "passed" else reason,
            "stage": stage,
            "median_ms": primary["median_ms"] if primary else None,
            "p20_ms": primary["p20_ms"] if primary else None,
            "p80_ms": primary["p80_ms"] if primary else None,
            "speedup": primary["speedup"] if primary else None,
            "baseline": spec.primary_baseline if (primary and spec) else None,
            "shape": primary["name"] if primary else None,
            "dtype": primary["case"]["dtype"] if primary else None,
            "pct_of_roof": (primary["roofline"].get("pct_of_roof") if primary else None),
            "noisy": next((c["noisy"] for c in cases if c.get("noisy")), None) if status == "passed" else None,
            "cases": cases if status == "passed" else [],
            "checks": extra.get("checks"),
            "notes": extra.get("notes", []),
            "duration_s": round(time.monotonic() - t0, 3),
            "provenance": {
                "device": device_info(self.device),
                "versions": versions(),
                "threads": extra.get("threads"),
                "sandbox": extra.get("sandbox"),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "candidate_hash": cand.hash,
                "timing": {"rounds": self.opt.rounds, "round_ms": self.opt.round_ms,
                           "clock": "cuda events, L2 flushed" if self.device == "cuda" else "perf_counter"},
            },
        }
        if self.store is not None and store:
            res["op"] = res["op"] or "unknown"
            self.store.add_evaluation(res, run_id=run_id)
        return res


class _Turns:
    """What ``Evaluator._isolated_turns`` yields: called before a contestant's request, it stops the others."""

    def __init__(self, alone: bool) -> None:
        self.alone = alone  # the turns ran alone: asked for, possible here, every other worker seen stopped
        self.stop_others: Callable[[WorkerProcess], None] = lambda _w: None

    def __call__(self, w: WorkerProcess) -> None:
        self.stop_others(w)


NOISY_SPREAD = 2.0  # the trusted baseline's p80/p20 above this: the machine, not the kernel, set the times
NOISY_LOAD = 0.25  # other processes' share of all CPUs during timing above this: the same
QUIET_WAIT_S = 30.0  # how long a noisy timing waits for a quieter machine before it is timed again


def timing_noise(baseline_ms: list[float], foreign_load: float | None) -> str:
    """Why a timing cannot be trusted ('' when it can): the trusted baseline's own calls spread too far (its
    code never changes, so its spread is the machine's), or other processes kept the CPUs busy. A ratio
    measured so can be off by several times (a 2-thread baseline stalls behind a busy core far more than a
    1-thread kernel); on 118 quiet evaluations of this project's CPU AdamW searches the baseline's p80/p20 was
    at most 1.43."""
    why = []
    if len(baseline_ms) >= 5:
        p20, _, p80 = _quantiles(baseline_ms)
        if p20 > 0 and p80 / p20 > NOISY_SPREAD:
            why.append(f"the baseline's own calls varied {p80 / p20:.1f}x between p20 and p80")
    if foreign_load is not None and foreign_load > NOISY_LOAD:
        why.append(f"other processes kept {foreign_load:.0%} of the CPUs busy")
    return "; ".join(why)


def worker_calls(res: dict[str, Any]) -> int:
    """How many timed calls the candidate made (for verdicts that say 'wrong after N calls')."""
    return sum(c.get("reps", 0) for c in res.get("cases", []))


def missing_checks(spec: Any, result: dict[str, Any], device: str) -> list[str]:
    """The op's check cases (on ``device``, in the dtypes the evaluation could run) that a stored result did
    not go through, and ``VOUCHED`` where its timed calls were not checked: a pass from before the op gained
    them is no pass of today's checks."""
    checks = result.get("checks") or {}
    skipped = set(checks.get("dtypes_not_checked") or [])
    done = set(checks.get("cases") or [])
    missing = [c.name for c in spec.check_cases(device) if c.dtype not in skipped and c.name not in done]
    if any(not c.get("vouched") for c in result.get("cases") or []):  # timed before the timed calls were checked
        missing.append(VOUCHED)
    return missing


VOUCHED = "the timed calls' check"  # what missing_checks names for a result timed before it (docs/measurement.md)
