"""The Claude proposer: asks Claude (the official ``anthropic`` SDK, imported here and only here) for one
complete candidate file per request, feeds the evaluator's verdicts back, repairs failures.

- Requests: ``system`` = two prompt-cached blocks (contract and rules; device and examples), one user message
  (the search so far, or the failing file and its verdict). See prompts.py and docs/claude.md.
- Reliability: the SDK retries 408/409/429/5xx (529 overloaded included) and connection errors with
  exponential backoff, honouring ``retry-after``/``retry-after-ms`` (anthropic/_base_client.py
  ``_should_retry``/``_calculate_retry_timeout``); ``max_retries`` (default 4) bounds it. What still fails is
  recorded (with the retries made) and the next request tried; so is a 200 whose body is no message (a
  gateway's HTML page: "invalid response from the API", the body kept). ``max_failures`` failures in a row
  (or an error no retry can fix: a bad key, an unknown model) stop the proposer with a ``stop_reason``.
- Malformed answers: an answer cut off at max_tokens (whatever it holds; the message says how to raise the
  limit), a refusal (stop_reason "refusal"; not sent back to Claude), no ```python block, a KERNELTUNE for
  another op: recorded (cost counted), no candidate; the next request says why. Code that is there but
  broken (syntax error, no run()) *is* proposed: the evaluator gives it compile_error/rejected, and the
  repair round sends the reason back.
- Cost: every response's usage is priced (input, output, cache write, cache read); with ``max_cost`` no
  request is sent whose worst case (estimated input at the dearer of the input and cache-write prices +
  max_tokens of output) would take the spend past it.
- Provenance: every request and response (raw JSON) goes to the store's ``messages`` table; the API key
  never does (store/messages.py redacts it from every text stored).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kerneltune.evaluate.static import CandidateFile, StaticReject, inspect_source, source_hash
from kerneltune.propose import prompts
from kerneltune.propose.base import Proposal, Proposer
from kerneltune.store import messages as msgstore

DEFAULT_MODEL = "claude-sonnet-4-6"

# USD per million tokens: (input, output, cache write (5-minute TTL), cache read). Public list prices;
# override with the proposer option price="in,out,cache_write,cache_read".
PRICES: dict[str, tuple[float, float, float, float]] = {
    "claude-opus-4-6": (5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-5": (5.0, 25.0, 6.25, 0.50),
    "claude-opus-4-1": (15.0, 75.0, 18.75, 1.50),
    "claude-opus-4-0": (15.0, 75.0, 18.75, 1.50),
    "claude-sonnet-4-6": (3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4-5": (3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4-0": (3.0, 15.0, 3.75, 0.30),
    "claude-haiku-4-5": (1.0, 5.0, 1.25, 0.10),
}
# A model not in the table is priced like the dearest Claude ever listed, so --max-cost still holds.
CONSERVATIVE_PRICE = (15.0, 75.0, 18.75, 1.50)
CHARS_PER_TOKEN = 3.0   # for the worst-case estimate of a request's input (code tokenises densely)
FAILING = ("compile_error", "incorrect", "crashed", "rejected", "timeout")
FATAL_STATUS = (400, 401, 403, 404, 413)


def price_of(model: str, override: Any = None) -> tuple[tuple[float, float, float, float], str]:
    """(prices, note): the model's prices per million tokens, and a note when they are a guess."""
    if override:
        vals = [float(x) for x in (override.split(",") if isinstance(override, str) else override)]
        if len(vals) != 4 or any(v < 0 for v in vals):
            raise ValueError("price must be four non-negative numbers: input,output,cache_write,cache_read "
                             "(USD per million tokens)")
        return (vals[0], vals[1], vals[2], vals[3]), "prices given with the price option"
    for name in sorted(PRICES, key=len, reverse=True):
        if model == name or model.startswith(name + "-"):
            return PRICES[name], ""
    return CONSERVATIVE_PRICE, (f"no price known for model {model!r}: costs are counted at ${CONSERVATIVE_PRICE[0]:g}/"
                                f"${CONSERVATIVE_PRICE[1]:g} per million input/output tokens (conservative); "
                                "pass --option price=in,out,cache_write,cache_read to correct it")


def cost_of(usage: dict[str, Any], price: tuple[float, float, float, float]) -> float:
    return (price[0] * (usage.get("input_tokens") or 0) + price[1] * (usage.get("output_tokens") or 0)
            + price[2] * (usage.get("cache_creation_input_tokens") or 0)
            + price[3] * (usage.get("cache_read_input_tokens") or 0)) / 1e6


@dataclass
class _Job:
    kind: str                  # propose | repair
    attempt: int = 0           # 0 for a new proposal; k for the k-th repair of a lineage
    parent: str | None = None  # hash of the failing candidate (repair)
    source: str = ""           # the failing source (repair)
    status: str = ""
    reason: str = ""


class ClaudeProposer(Proposer):
    name = "claude"

    def __init__(self, op: str, device: str = "cpu", *, store: Any = None, run_id: str | None = None,
                 candidate_dirs: list[str] | None = None, shape: str | None = None, max_cost: float | None = None,
                 model: str = DEFAULT_MODEL, max_tokens: int = 8000, temperature: float | None = None, concurrency: int = 2,
                 repair_attempts: int = 2, max_retries: int = 4, timeout: float = 600.0, max_failures: int = 4,
                 price: Any = None, client: Any = None) -> None:
        if max_tokens < 1 or concurrency < 1 or repair_attempts < 0 or max_retries < 0 or max_failures < 1:
            raise ValueError("max_tokens, concurrency and max_failures must be >= 1; repair_attempts and "
                             "max_retries >= 0")
        if temperature is not None and not 0.0 <= temperature <= 1.0:
            raise ValueError(f"temperature {temperature}: use a value from 0 to 1")
        self.op, self.device, self.store, self.run_id = op, device, store, run_id
        self.model, self.max_tokens = model, int(max_tokens)
        self.temperature = None if temperature is None else float(temperature)
        self.concurrency, self.repair_attempts, self.max_failures = int(concurrency), int(repair_attempts), int(max_failures)
        self.max_cost = max_cost
        self.price, self.price_note = price_of(model, price)
        self.shape = shape
        self.stop_reason = ""
        self.notes: list[str] = [self.price_note] if self.price_note else []
        self.state = prompts.SearchState()
        self._repairs: deque[_Job] = deque()
        self._repaired: set[str] = set()     # parents that already have a repair (or whose lineage ended)
        self._failures_in_row = 0
        self._spent = msgstore.run_cost(store, run_id) if (store is not None and run_id) else 0.0
        self._lock = threading.Lock()
        self._client = client or self._make_client(max_retries, timeout)
        from kerneltune.evaluate import roofline
        from kerneltune.evaluate.device import device_info

        info = device_info(device)
        examples = prompts.load_examples(op, device, candidate_dirs or [])
        self.system = [
            {"type": "text", "text": prompts.system_rules(op, device), "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": prompts.system_context(info, roofline.load_cached(info["key"]), examples),
             "cache_control": {"type": "ephemeral"}},
        ]

    @staticmethod
    def _make_client(max_retries: int, timeout: float) -> Any:
        import anthropic  # lazily: kerneltune works without the SDK

        # api key and base URL from ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL; an explicit timeout also lifts the
        # SDK's refusal of long non-streaming requests (max_tokens above ~21k)
        return anthropic.Anthropic(max_retries=max_retries, timeout=timeout)

    # -- the Proposer interface -----------------------------------------------------------------------------
    @property
    def cost_usd(self) -> float:
        return self._spent

    def exhausted(self) -> bool:
        return bool(self.stop_reason)

    def propose(self, n: int) -> list[Proposal]:
        out: list[Proposal] = []
        while not out and not self.stop_reason and n > 0:
            batch = self._affordable(self._next_jobs(min(n, self.concurrency)))
            if not batch:
                break
            for job, request, reply in self._send_all(batch):
                p = self._handle(job, request, reply)
                if p is not None:
                    out.append(p)
        return out

    def tell(self, proposal: Proposal, result: dict[str, Any]) -> None:
        self.state.add(result, proposal.candidate.source)
        info = proposal.info or {}
        attempt = int(info.get("attempt", 0))
        if (proposal.origin == "claude" and result.get("status") in FAILING and attempt < self.repair_attempts
                and proposal.candidate.hash not in self._repaired):
            self._repairs.append(_Job("repair", attempt + 1, proposal.candidate.hash, proposal.candidate.source,
                                      str(result.get("status")), str(result.get("reason") or "")))

    def point_of(self, info: dict[str, Any]) -> Any:
        """The runner's resume hook: the key of a stored proposal is its info."""
        return info

    def replay(self, key: Any, result: dict[str, Any] | None) -> None:
        info = key if isinstance(key, dict) else {}
        if info.get("parent"):
            self._repaired.add(info["parent"])
        if result is None:
            return
        source = ""
        if self.store is not None and info.get("hash"):
            row = self.store.candidate(info["hash"])
            source = row["source"] if row is not None else ""
        cand = CandidateFile(path=None, name=str(result.get("name")), source=source, hash=str(result.get("hash")))
        self.tell(Proposal(candidate=cand, origin="claude" if info.get("model") else "other", info=info), result)

    # -- jobs -----------------------------------------------------------------------------------------------
    def _next_jobs(self, k: int) -> list[_Job]:
        jobs: list[_Job] = []
        while self._repairs and len(jobs) < k:
            job = self._repairs.popleft()
            if job.parent in self._repaired:
                continue
            self._repaired.add(job.parent or "")
            jobs.append(job)
        while len(jobs) < k:
            jobs.append(_Job("propose"))
        return jobs

    def request_for(self, job: _Job) -> dict[str, Any]:
        if job.kind == "repair":
            text = prompts.repair_message(job.source, job.status, job.reason, job.attempt, self.repair_attempts, self.op)
        else:
            text = prompts.propose_message(self.state, self.op, self.shape)
        req: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "system": self.system,
                               "messages": [{"role": "user", "content": text}]}
        if self.temperature is not None:
            req["temperature"] = self.temperature
        return req

    def worst_case_usd(self, request: dict[str, Any]) -> float:
        chars = sum(len(b["text"]) for b in request["system"]) + sum(len(m["content"]) for m in request["messages"])
        est_in = int(chars / CHARS_PER_TOKEN) + 50
        return (est_in * max(self.price[0], self.price[2]) + request["max_tokens"] * self.price[1]) / 1e6

    def _affordable(self, jobs: list[_Job]) -> list[tuple[_Job, dict[str, Any]]]:
        batch: list[tuple[_Job, dict[str, Any]]] = []
        reserved = 0.0
        for job in jobs:
            req = self.request_for(job)
            worst = self.worst_case_usd(req)
            if self.max_cost is not None and self._spent + reserved + worst > self.max_cost:
                if job.kind == "repair":   # not sent: let a later call (or a resume) try it
                    self._repaired.discard(job.parent or "")
                    self._repairs.appendleft(job)
                if not batch:
                    self.stop_reason = (f"cost limit: ${self._spent:.4f} spent of --max-cost ${self.max_cost:.4f}; the "
                                        f"next request could cost up to ${worst:.4f} ({self.max_tokens} output tokens "
                                        f"at ${self.price[1]:g}/M), so it was not sent")
                break
            reserved += worst
            batch.append((job, req))
        return batch

    # -- requests -------------------------------------------------------------------------------------------
    def _send_all(self, batch: list[tuple[_Job, dict[str, Any]]]) -> list[tuple[_Job, dict[str, Any], dict[str, Any]]]:
        if len(batch) == 1:
            job, req = batch[0]
            return [(job, req, self._send(req))]
        pool = ThreadPoolExecutor(max_workers=len(batch), thread_name_prefix="kt-claude")
        try:
            futs = [(job, req, pool.submit(self._send, req)) for job, req in batch]
            return [(job, req, fut.result()) for job, req, fut in futs]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)   # Ctrl-C: do not wait for answers nobody reads

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request through the SDK (which does the retries). Runs in a worker thread: no store access.

        Every reply has ``retries`` (the retries the SDK made, failed requests included) and ``body`` (the
        response body when one was read)."""
        import anthropic

        t0 = time.monotonic()
        body: str | None = None
        try:
            kwargs = dict(request)
            if "temperature" in kwargs:   # not a parameter of this SDK's create(): sent as a body field
                kwargs["extra_body"] = {"temperature": kwargs.pop("temperature")}
            raw = self._client.messages.with_raw_response.create(**kwargs)
            body = raw.text()
            got = {"body": body, "request_id": raw.headers.get("request-id"),
                   "retries": getattr(raw, "retries_taken", None)}
            try:
                msg = raw.parse()
                problem = _not_a_message(msg)
            except (ValueError, anthropic.APIResponseValidationError) as e:   # JSONDecodeError is a ValueError
                problem = f"{type(e).__name__}: {_one_line(str(e))[:200]}"
            if problem:   # a gateway's page, a truncated or foreign body: counted, not fatal; the body is kept
                ctype = raw.headers.get("content-type") or "no content-type"
                return {"ok": False, "fatal": False, "latency": time.monotonic() - t0, **got,
                        "error": f"invalid response from the API (HTTP {raw.status_code}, {ctype}): {problem}; "
                                 f"the body begins {_one_line(body)[:160]!r}"}
            return {"ok": True, "msg": msg, "latency": time.monotonic() - t0, **got}
        except anthropic.APIStatusError as e:
            try:
                body = e.response.text
            except Exception:  # noqa: BLE001 - the body is a courtesy
                pass
            return {"ok": False, "error": f"{type(e).__name__} (HTTP {e.status_code}): {_one_line(e.message)}",
                    "fatal": e.status_code in FATAL_STATUS, "body": body, "latency": time.monotonic() - t0,
                    "request_id": getattr(e, "request_id", None), "retries": _retries_of(e)}
        except anthropic.APIResponseValidationError as e:   # a 200 the SDK itself would not take (strict client)
            try:
                body = e.response.text
            except Exception:  # noqa: BLE001 - the body is a courtesy
                pass
            return {"ok": False, "fatal": False, "body": body, "latency": time.monotonic() - t0,
                    "request_id": e.response.headers.get("request-id"), "retries": _retries_of(e),
                    "error": f"invalid response from the API (HTTP {e.status_code}): {_one_line(e.message)[:200]}; "
                             f"the body begins {_one_line(body or '')[:160]!r}"}
        except anthropic.APIConnectionError as e:   # includes APITimeoutError; already retried by the SDK
            return {"ok": False, "error": f"{type(e).__name__}: {_one_line(str(e))}", "fatal": False, "body": body,
                    "latency": time.monotonic() - t0, "retries": _retries_of(e)}
        except Exception as e:  # noqa: BLE001 - anything else is a bug or a setup problem: stop, say what
            return {"ok": False, "error": f"{type(e).__name__}: {_one_line(str(e))}", "fatal": True, "body": body,
                    "latency": time.monotonic() - t0, "retries": _retries_of(e)}

    def _record(self, job: _Job, request: dict[str, Any], reply: dict[str, Any], **kw: Any) -> int:
        if self.store is None:
            return 0
        return msgstore.add_message(self.store, run_id=self.run_id, kind=job.kind, model=self.model, request=request,
                                    attempt=job.attempt, parent=job.parent, response=reply.get("body"),
                                    latency_s=round(reply.get("latency") or 0.0, 3),
                                    request_id=reply.get("request_id"), retries=reply.get("retries"), **kw)

    def _failed(self, why: str) -> None:
        self._failures_in_row += 1
        if self._failures_in_row >= self.max_failures and not self.stop_reason:
            self.stop_reason = f"{self._failures_in_row} Claude requests in a row gave no candidate; the last: {why}"

    def _handle(self, job: _Job, request: dict[str, Any], reply: dict[str, Any]) -> Proposal | None:
        if not reply["ok"]:
            err = msgstore.redact(reply["error"])
            self._record(job, request, reply, outcome="error", problem=err)
            if job.kind == "repair":   # the request failed, not the repair: try it again later
                self._repaired.discard(job.parent or "")
                self._repairs.appendleft(job)
            if reply.get("fatal"):
                self.stop_reason = f"the Anthropic API refused the request: {err}"
            else:
                self._failed(err)
            return None
        msg = reply["msg"]
        usage = _usage(msg)
        cost = cost_of(usage, self.price)
        with self._lock:
            self._spent += cost
        text = "".join(t for t in (getattr(b, "text", None) for b in msg.content if getattr(b, "type", "") == "text")
                       if isinstance(t, str))
        stop = getattr(msg, "stop_reason", None)
        common = dict(text=text, usage=usage, cost_usd=cost, stop_reason=stop)
        parsed = prompts.parse_answer(text, self.op)
        # the stop reason first: a cut-off or refused answer is that, whatever its text holds or lacks
        if stop == "refusal":
            problem = ("Claude refused to answer (stop_reason refusal): no candidate; the refusal is not sent "
                       "back to Claude")
            self._record(job, request, reply, outcome="malformed", problem=problem, **common)
            self._failed(problem)   # counted and paid for; nothing in it helps the next request
            return None
        if stop in ("max_tokens", "model_context_window_exceeded"):
            where = ("before the file was complete: write a shorter file" if parsed.source is not None else
                     "before any code block: keep the reasoning short and start the file sooner")
            limit = (f"max_tokens ({self.max_tokens} output tokens)" if stop == "max_tokens"
                     else "the model's context window")
            parsed = prompts.Parsed(None, f"the answer was cut off at {limit} {where}, or raise --max-tokens "
                                          f"(now {self.max_tokens})")
        if parsed.source is None:
            self._record(job, request, reply, outcome="malformed", problem=parsed.problem, **common)
            self.state.add_malformed(parsed.problem)
            self._failed(f"malformed answer: {parsed.problem}")
            return None
        cand = candidate_of(parsed.source)
        mid = self._record(job, request, reply, outcome="candidate", candidate_hash=cand.hash, **common)
        self._failures_in_row = 0
        info = {"model": self.model, "kind": job.kind, "attempt": job.attempt, "message_id": mid, "hash": cand.hash,
                "parent": job.parent, "usage": usage, "stop_reason": stop}
        return Proposal(candidate=cand, origin="claude", parent=job.parent, key=info, cost_usd=cost, info=info)


def candidate_of(source: str) -> CandidateFile:
    """A CandidateFile for a proposed source, with the hash the store will know it by (the evaluator folds
    KERNELTUNE params into the hash of a file that parses)."""
    cand = CandidateFile(path=None, name="claude", source=source, hash=source_hash(source))
    try:
        inspect_source(cand)
    except StaticReject:
        pass
    cand.name = f"claude-{cand.hash[:8]}"
    return cand


_USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _not_a_message(msg: Any) -> str:
    """Why ``msg`` (what the SDK parsed, leniently) is not a Messages API message ("" when it is one): the
    proposer reads its content blocks, its usage (to price it) and its stop reason."""
    content = getattr(msg, "content", None)
    if not isinstance(content, list):
        return "not a message (no content list)"
    usage = getattr(msg, "usage", None)
    if usage is None:
        return "not a message (no usage)"
    for k in _USAGE_KEYS:
        v = getattr(usage, k, None)
        if (v is None and k in _USAGE_KEYS[:2]) or (v is not None and (isinstance(v, bool) or not isinstance(v, int))):
            return f"not a message (usage.{k} is {v!r})"
    if not isinstance(getattr(msg, "stop_reason", None), (str, type(None))):
        return "not a message (stop_reason is not a string)"
    return ""


def _retries_of(err: BaseException) -> int | None:
    """The retries the SDK made before ``err``: the SDK numbers every try in its x-stainless-retry-count header,
    and an APIStatusError/APIConnectionError carries the request of the last try."""
    try:
        return int(err.request.headers["x-stainless-retry-count"])  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _usage(msg: Any) -> dict[str, Any]:
    u = msg.usage
    return {"input_tokens": getattr(u, "input_tokens", 0) or 0, "output_tokens": getattr(u, "output_tokens", 0) or 0,
            "cache_creation_input_tokens": getattr(u, "cache_creation_input_tokens", 0) or 0,
            "cache_read_input_tokens": getattr(u, "cache_read_input_tokens", 0) or 0}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def options_from(proposer_options: dict[str, Any]) -> dict[str, Any]:
    """The ClaudeProposer keyword arguments in ``proposer_options`` (CLI flags / --option), typed."""
    conv = {"model": str, "max_tokens": int, "temperature": float, "concurrency": int, "repair_attempts": int,
            "max_retries": int, "api_timeout": float, "max_failures": int, "price": str}
    out: dict[str, Any] = {}
    for k, v in (proposer_options or {}).items():
        if k in conv and v is not None:
            try:
                out["timeout" if k == "api_timeout" else k] = conv[k](v) if not isinstance(v, (list, tuple)) else v
            except (TypeError, ValueError):
                raise ValueError(f"proposer option {k}={v!r}: expected {conv[k].__name__}") from None
    return out



__all__ = ["ClaudeProposer", "DEFAULT_MODEL", "PRICES", "price_of", "cost_of", "candidate_of", "options_from"]
