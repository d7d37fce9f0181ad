"""The search loop: ask the proposer, evaluate in a pool, store everything the moment it finishes.

- Pool: ``jobs`` evaluations at once, each in its own worker process; loading and checking overlap,
  timing holds the device alone (the evaluator's DeviceLock).
- Store: each proposal is written before it is evaluated, each verdict the moment it is known, in one
  transaction with the link to its proposal; a run killed with kill -9 loses only what was in flight.
- Resume: finished evaluations of the run are replayed into the proposer (none repeated); proposals
  left unfinished are evaluated first.
- Cache: a candidate (source + params hash) already evaluated on this device at the run's shape is
  never evaluated again; its stored verdict is used, unless it was measured with other software, timed on a
  busy machine, or passed before the op had the check cases it has now.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from kerneltune.evaluate.device import device_info, versions
from kerneltune.evaluate.evaluator import BaselineError, Evaluator, Options, missing_checks
from kerneltune.evaluate.static import CandidateFile
from kerneltune.ops import get_op
from kerneltune.propose.base import Proposal, Proposer


@dataclass
class SearchConfig:
    op: str
    device: str = "cpu"
    proposer: str = "templates"
    strategy: str = "evolve"
    seed: int = 0
    budget: int = 40
    time_s: float | None = None
    max_cost: float | None = None
    jobs: int = 2
    timeout: float = 300.0
    strategy_options: dict[str, Any] = field(default_factory=dict)
    candidate_dirs: list[str] = field(default_factory=list)
    proposer_options: dict[str, Any] = field(default_factory=dict)
    shapes: list[str] = field(default_factory=list)   # timed shapes as written on the command line
    dtype: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Progress:
    """What the live view shows; updated by the runner, read by the view."""

    run_id: str
    op: str
    device: str
    budget: int
    done: int = 0
    cached: int = 0
    replayed: int = 0   # finished in an earlier session of this run (--resume): counted, not evaluated now
    in_flight: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    board: list[dict[str, Any]] = field(default_factory=list)   # passed results, best first
    started: float = field(default_factory=time.monotonic)
    cost_usd: float = 0.0
    last: str = ""
    proposer: str = ""
    noisy: int = 0  # passed, but timed on a machine too busy to trust the ratio (left off the board)

    @property
    def best(self) -> dict[str, Any] | None:
        return self.board[0] if self.board else None

    @property
    def evaluated(self) -> int:
        """Results evaluated in this session (not answered from the store, not replayed from an earlier one)."""
        return self.done - self.cached - self.replayed

    def record(self, result: dict[str, Any], cached: bool, replayed: bool = False) -> None:
        self.done += 1
        self.cached += int(cached)
        self.replayed += int(replayed)
        self.by_status[result["status"]] = self.by_status.get(result["status"], 0) + 1
        if result.get("noisy"):  # timed twice on a busy machine: shown, never ranked
            self.noisy += 1
        elif result["status"] == "passed" and result.get("speedup") is not None:
            self.board.append({"name": result["name"], "hash": result["hash"], "speedup": result["speedup"],
                               "median_ms": result["median_ms"], "p20_ms": result["p20_ms"],
                               "p80_ms": result["p80_ms"], "params": result.get("params")})
            self.board.sort(key=lambda r: -r["speedup"])
        self.last = (f"{result['name']}: {result['status']}" + (f" {result['speedup']:.2f}×" if result.get("speedup") else "")
                     + (" (noisy timing: not ranked)" if result.get("noisy") else ""))


def _as_fitness(result: dict[str, Any]) -> dict[str, Any]:
    """What a proposer is told: a ratio timed on a busy machine is no fitness, so a noisy pass comes without a
    speedup (and without the baseline timings that went with it)."""
    if not result.get("noisy"):
        return result
    return {**result, "speedup": None, "cases": [], "median_ms": None}


class SearchError(Exception):
    pass


# stop reasons of a run that can go on: it ends 'stopped' (resumable), not 'done'
LIMIT_REASONS = ("time limit", "cost limit")


def make_proposer(cfg: SearchConfig, store: Any = None, run_id: str | None = None) -> Proposer:
    """templates | claude | replay | auto: see kerneltune.propose.factory (errors: SearchError, one line)."""
    from kerneltune.propose.factory import make_proposer as _make

    return _make(cfg, store, run_id)


def timed_cases(spec: Any, device: str, shapes: list[str] | None, dtype: str | None) -> list[Any] | None:
    """The timed cases a search (or eval/bench) asks for: the shapes given (in ``dtype``, else float32), else
    with only a dtype the op's default timed cases for ``device`` in that dtype, else None (the op's defaults).
    ValueError (one line) on a bad shape or dtype."""
    from kerneltune.ops.base import dtype_name

    if shapes:
        return [spec.parse_case(s, dtype or "float32") for s in shapes]
    if not dtype:
        return None
    dt = dtype_name(dtype)
    if spec.name == "adamw" and dt != "float32":
        raise ValueError(f"adamw takes fp32 params and state only, not {dtype!r}")
    return [dataclasses.replace(c, dtype=dt, name=c.name.replace(c.dtype, dt)) for c in spec.timed_cases(device)]


def valid_timeout(timeout: Any) -> bool:
    """A per-candidate timeout: a finite number of seconds above 0 (NaN compares false with everything)."""
    return isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout) and timeout > 0


def new_run_id(op: str) -> str:
    return f"{op}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


class Search:
    def __init__(self, store: Any, cfg: SearchConfig, *, run_id: str | None = None,
                 on_update: Callable[[Progress], None] | None = None, proposer: Proposer | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.spec = get_op(cfg.op)
        self.device_key = device_info(cfg.device)["key"]
        self.resuming = run_id is not None
        self.run_id = run_id or new_run_id(cfg.op)
        self.proposer = proposer or make_proposer(cfg, store, self.run_id)
        self._queued: list[tuple[Proposal, int]] = []   # proposed and stored, not yet submitted
        self.on_update = on_update or (lambda _p: None)
        self.progress = Progress(self.run_id, cfg.op, cfg.device, cfg.budget, proposer=self.proposer.name)
        self.stop_reason = ""
        self._stop = threading.Event()
        cases = timed_cases(self.spec, cfg.device, cfg.shapes, cfg.dtype)
        opts = Options(device=cfg.device, timeout=cfg.timeout, baselines=[self.spec.primary_baseline], shapes=cases)
        self.evaluator = Evaluator(opts, store=None)
        self.shape = (cases or self.spec.timed_cases(cfg.device))[0].name

    # -- store ---------------------------------------------------------------------------------------------
    def _store_candidate(self, p: Proposal) -> None:
        c = p.candidate
        from kerneltune.evaluate.static import StaticReject, inspect_source

        try:
            inspect_source(c)
        except StaticReject:
            pass
        self.store.add_candidate(hash=c.hash, op=c.op or self.cfg.op, backend=c.backend or "unknown", name=c.name,
                                 source=c.source, path=c.path, summary=c.summary, params=c.meta.get("params"),
                                 origin=p.origin, parent=p.parent)

    def _replay(self) -> list[tuple[Proposal, int]]:
        """Feed the run's finished evaluations back to the proposer; return unfinished proposals."""
        pending: list[tuple[Proposal, int]] = []
        for row in self.store.proposals(self.run_id):
            info = json.loads(row["info"])
            key = getattr(self.proposer, "point_of", lambda _i: None)(info)
            if row["evaluation_id"] is not None:
                ev = self.store.evaluation(row["evaluation_id"])
                result = json.loads(ev["result"]) if ev else None
                self.proposer.replay(key, _as_fitness(result) if result else result)
                if result:
                    result.setdefault("params", info.get("params"))
                    self.progress.record(result, cached=False, replayed=True)
            else:
                cand_row = self.store.candidate(row["candidate_hash"])
                cand = CandidateFile(path=cand_row["path"], name=cand_row["name"], source=cand_row["source"],
                                     hash=cand_row["hash"])
                pending.append((Proposal(candidate=cand, origin=row["origin"], parent=row["parent"], key=key,
                                         info=info), row["id"]))
                self.proposer.replay(key, None)
        self.progress.cost_usd = self.proposer.cost_usd
        return pending

    # -- loop ------------------------------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
        self._stop.set()

    def _limits_reached(self, in_flight: int) -> bool:
        cfg = self.cfg
        if self.progress.done + in_flight >= cfg.budget:
            return True
        if cfg.time_s is not None and time.monotonic() - self.progress.started >= cfg.time_s:
            self.stop(f"time limit of {cfg.time_s:.0f} s reached")
            return True
        if cfg.max_cost is not None and self.proposer.cost_usd >= cfg.max_cost:
            self.stop(f"cost limit of ${cfg.max_cost:.2f} reached")
            return True
        return self._stop.is_set()

    def run(self) -> dict[str, Any]:
        """Search until the budget, a limit, the proposer's end, Ctrl-C or an error. Ctrl-C returns status
        'interrupted' at once (the workers are killed, not waited for); any other exception marks the run
        'failed' (resumable) and propagates; a --time or --max-cost limit leaves it 'stopped' (resumable)."""
        cfg = self.cfg
        if self.resuming:
            self.store.set_run_status(self.run_id, "running")
            pending = self._replay()
        else:
            self.store.add_run(self.run_id, op=cfg.op, device_key=self.device_key, proposer=cfg.proposer,
                               strategy=cfg.strategy, options=asdict(cfg))
            pending = []
        inflight: dict[Future[dict[str, Any]], tuple[Proposal, int]] = {}
        status = "done"
        # not a `with` block: leaving one waits for every evaluation in flight, and on Ctrl-C they must be killed
        # first (workers run in their own session and never see the SIGINT), then left behind
        pool = ThreadPoolExecutor(max_workers=max(1, cfg.jobs), thread_name_prefix="kt-eval")
        try:
            while True:
                while len(inflight) < max(1, cfg.jobs) and not self._limits_reached(len(inflight)):
                    want = min(max(1, cfg.jobs) - len(inflight), cfg.budget - self.progress.done - len(inflight))
                    item = pending.pop(0) if pending else self._next_proposal(want)
                    if item is None:
                        break
                    proposal, pid = item
                    if self._use_cached(proposal, pid):
                        continue
                    fut = pool.submit(self.evaluator.evaluate, proposal.candidate, origin=proposal.origin,
                                      parent=proposal.parent, run_id=self.run_id)
                    inflight[fut] = (proposal, pid)
                self.progress.in_flight = len(inflight)
                self.on_update(self.progress)
                if not inflight:
                    break
                done, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    proposal, pid = inflight.pop(fut)
                    try:
                        result = fut.result()
                    except BaselineError as e:
                        # nothing can be timed on this device: stop now (the evaluations in flight are
                        # killed); the proposals without a verdict stay for --resume
                        status = "failed"
                        self.stop(str(e))
                        self.evaluator.abort()
                        continue
                    self._finish(proposal, pid, result, cached=False)
                if status == "failed":
                    break
            if status == "done" and self.stop_reason.startswith(LIMIT_REASONS) and self.progress.done < cfg.budget:
                status = "stopped"  # --time or --max-cost: the run can go on (--resume)
        except KeyboardInterrupt:
            status = "interrupted"
            self._interrupt(inflight)
        except BaseException as e:
            status = "failed"
            self.stop(f"stopped by an error: {type(e).__name__}: {e}")
            self.evaluator.abort()
            raise
        finally:
            # evaluations still in flight were killed above (or there are none): do not wait for them
            pool.shutdown(wait=not inflight, cancel_futures=True)
            self.evaluator.close()
            note = self.stop_reason or ("budget spent" if self.progress.done >= cfg.budget else "proposer exhausted")
            self.store.set_run_status(self.run_id, status, note=note, cost_usd=self.proposer.cost_usd)
        return self.summary(status)

    def _interrupt(self, inflight: dict[Future[dict[str, Any]], tuple[Proposal, int]]) -> None:
        """Ctrl-C: keep the verdicts that were already given, then kill the evaluations in flight (whatever
        they return after that is not a verdict); their proposals stay pending for --resume."""
        finished = [(f, inflight.pop(f)) for f in list(inflight) if f.done()]
        try:
            for fut, (proposal, pid) in finished:
                try:
                    result = fut.result()
                except BaseException:  # noqa: BLE001 - no verdict: stays pending
                    continue
                self._finish(proposal, pid, result, cached=False)
        finally:  # a second Ctrl-C while storing them still kills the workers
            self.stop("interrupted (Ctrl-C)")
            self.evaluator.abort()
            for fut in inflight:
                fut.cancel()

    def _next_proposal(self, want: int = 1) -> tuple[Proposal, int] | None:
        """The next proposal, stored. Asks the proposer for ``want`` at once (a paid proposer sends that many
        requests concurrently); the extra ones wait in ``_queued``, already stored, so a resume finds them."""
        if not self._queued:
            props = self.proposer.propose(max(1, want))
            if not props:
                if not self.stop_reason:
                    self.stop_reason = (getattr(self.proposer, "stop_reason", "")
                                        or "proposer exhausted (every point of the space evaluated)")
                return None
            for p in props:
                self._store_candidate(p)
                pid = self.store.add_proposal(self.run_id, p.candidate.hash, origin=p.origin, parent=p.parent,
                                              info=p.info, cost_usd=p.cost_usd)
                self._queued.append((p, pid))
        return self._queued.pop(0)

    def _use_cached(self, proposal: Proposal, pid: int) -> bool:
        row = self.store.latest_evaluation(proposal.candidate.hash, self.device_key, self.shape)
        if row is None:
            return False
        result = json.loads(row["result"])
        if result.get("provenance", {}).get("versions") != versions():
            return False  # measured with other software (kerneltune, torch, triton, numba): measure again
        if result.get("noisy"):
            return False  # timed on a busy machine: measure again
        if result.get("status") == "passed" and missing_checks(self.spec, result, self.cfg.device):
            return False  # passed checks that have grown since (new check cases): check it again
        if result.get("status") == "timeout":
            measured = result.get("provenance", {}).get("timeout_s")
            if not isinstance(measured, (int, float)) or measured < self.cfg.timeout:
                return False  # ran out of a shorter (or unknown) --timeout than this run's: try it with this one
        self.store.link_proposal(pid, int(row["id"]))
        self._finish(proposal, pid, result, cached=True)
        return True

    def _finish(self, proposal: Proposal, pid: int, result: dict[str, Any], cached: bool) -> None:
        if self._stop.is_set() and self.stop_reason.startswith("interrupted"):
            return  # killed by us, not a verdict: the proposal stays pending for --resume
        if not cached:
            # the limit it ran under is provenance: a timeout verdict holds only for limits up to that one
            result = {**result, "provenance": {**result.get("provenance", {}), "timeout_s": self.cfg.timeout}}
            self.store.add_evaluation_for(result, run_id=self.run_id, proposal_id=pid)
        result = {**result, "params": proposal.info.get("params")}
        self.proposer.tell(proposal, _as_fitness(result))
        self.progress.cost_usd = self.proposer.cost_usd
        self.progress.record(result, cached)
        self.on_update(self.progress)

    def resume_command(self) -> str:
        """How to continue this run, with the store it is in."""
        import shlex

        path = getattr(self.store, "path", None)
        return f"kerneltune search --resume {self.run_id}" + (f" --db {shlex.quote(str(path))}" if path else "")

    def summary(self, status: str) -> dict[str, Any]:
        p = self.progress
        elapsed = time.monotonic() - p.started  # this session's time (a resumed run's earlier sessions not counted)
        evaluated = p.evaluated  # evaluated in this session: not cached, not replayed from an earlier session
        return {
            "run": self.run_id, "op": self.cfg.op, "device": device_info(self.cfg.device)["name"],
            "device_key": self.device_key, "status": status, "stop_reason": self.stop_reason or None,
            "proposer": self.cfg.proposer, "strategy": self.cfg.strategy, "budget": self.cfg.budget,
            "results": p.done, "evaluated": evaluated, "cached": p.cached, "replayed": p.replayed,
            "by_status": p.by_status,
            "best": p.best, "leaderboard": p.board[:10], "noisy": p.noisy, "baseline": self.spec.primary_baseline, "shape": self.shape,
            "elapsed_s": round(elapsed, 1),
            "evaluations_per_min": round(evaluated / (elapsed / 60), 2) if elapsed > 0 else None,
            "cost_usd": round(self.proposer.cost_usd, 4),
            "resume": self.resume_command() if status != "done" else None,
        }
