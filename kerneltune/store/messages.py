"""Provenance of paid proposals: every request sent to Claude and every response (or error), in the table
``messages`` of the store, created on demand (CREATE TABLE IF NOT EXISTS) on the Store's connection.

One row per request. ``candidate_hash`` is NULL for a request that produced no candidate (an API error, a
malformed answer). ``request`` holds the model, system blocks, messages and parameters as sent; never
headers, never the API key: every text stored here passes through :func:`redact` first.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id         TEXT,
    candidate_hash TEXT,              -- the candidate the answer became, NULL when none (error, malformed)
    parent         TEXT,              -- for a repair: the hash of the failing candidate
    attempt        INTEGER NOT NULL DEFAULT 0,   -- 0: a new proposal, k >= 1: the k-th repair of a lineage
    kind           TEXT NOT NULL,     -- propose | repair
    model          TEXT NOT NULL,
    request        TEXT NOT NULL,     -- JSON: {model, system, messages, max_tokens, temperature}
    response       TEXT,              -- the raw body of the response as received (JSON, or what a gateway sent)
    text           TEXT,              -- the answer's text blocks, joined
    usage          TEXT,              -- JSON: input, output, cache write, cache read tokens
    cost_usd       REAL NOT NULL DEFAULT 0,
    stop_reason    TEXT,              -- the API's stop_reason (end_turn, max_tokens, refusal …)
    outcome        TEXT NOT NULL,     -- candidate | malformed | error
    problem        TEXT,              -- why malformed (cut off, refused, no code …), or the error (redacted)
    latency_s      REAL,
    request_id     TEXT,
    retries        INTEGER,           -- retries the SDK made for this request (failed requests included)
    created        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_run ON messages(run_id, id);
CREATE INDEX IF NOT EXISTS messages_by_candidate ON messages(candidate_hash);
"""

_KEY_PATTERN = re.compile(r"\bsk-ant-[A-Za-z0-9_\-]{8,}")   # the shape of an Anthropic key
_SECRET_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")


def redact(text: Any) -> Any:
    """``text`` with the API key (from the environment) and anything shaped like an Anthropic key masked."""
    if not isinstance(text, str):
        return text
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 6:
            text = text.replace(secret, "[REDACTED]")
    return _KEY_PATTERN.sub("[REDACTED]", text)


def ensure_table(store: Any) -> None:
    if getattr(store, "_messages_table", False):
        return
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            store.conn.execute(stmt)
    store._messages_table = True


def add_message(store: Any, *, run_id: str | None, kind: str, model: str, request: dict[str, Any],
                outcome: str, attempt: int = 0, parent: str | None = None, candidate_hash: str | None = None,
                response: str | None = None, text: str | None = None, usage: dict[str, Any] | None = None,
                cost_usd: float = 0.0, stop_reason: str | None = None, problem: str | None = None,
                latency_s: float | None = None, request_id: str | None = None, retries: int | None = None) -> int:
    """Insert one request/response row (one statement: its own transaction) and return its id."""
    ensure_table(store)
    cur = store.conn.execute(
        "INSERT INTO messages (run_id, candidate_hash, parent, attempt, kind, model, request, response, text, usage,"
        " cost_usd, stop_reason, outcome, problem, latency_s, request_id, retries, created)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (run_id, candidate_hash, parent, attempt, kind, model, redact(json.dumps(request)), redact(response),
         redact(text), json.dumps(usage or {}), float(cost_usd), stop_reason, outcome, redact(problem), latency_s,
         request_id, retries, time.time()))
    return int(cur.lastrowid or 0)


def _rows(store: Any, where: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    ensure_table(store)
    rows = store.conn.execute(f"SELECT * FROM messages WHERE {where} ORDER BY id", args).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["request"] = json.loads(d["request"])
        d["usage"] = json.loads(d["usage"] or "{}")
        out.append(d)
    return out


def messages_for(store: Any, candidate_hash: str) -> list[dict[str, Any]]:
    """The requests behind a candidate, oldest first (for ``kerneltune show``)."""
    return _rows(store, "candidate_hash = ?", (candidate_hash,))


def messages_of_run(store: Any, run_id: str) -> list[dict[str, Any]]:
    """Every request of a run in the order sent (for ``--proposer replay``)."""
    return _rows(store, "run_id = ?", (run_id,))


def run_cost(store: Any, run_id: str) -> float:
    ensure_table(store)
    row = store.conn.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM messages WHERE run_id = ?", (run_id,)).fetchone()
    return float(row[0])


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """One line of a message for a table: when, model, attempt, tokens, cost, outcome."""
    u = m.get("usage") or {}
    return {"id": m["id"], "when": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m["created"])), "run": m["run_id"],
            "kind": m["kind"], "attempt": m["attempt"], "model": m["model"], "outcome": m["outcome"],
            "stop_reason": m["stop_reason"], "input_tokens": u.get("input_tokens"),
            "output_tokens": u.get("output_tokens"), "cache_write_tokens": u.get("cache_creation_input_tokens"),
            "cache_read_tokens": u.get("cache_read_input_tokens"), "cost_usd": m["cost_usd"],
            "latency_s": m["latency_s"], "problem": m["problem"]}
