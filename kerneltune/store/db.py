"""SQLite store. WAL journal and a busy timeout make it safe with several writers (processes of a
search pool, two searches at once); each record is one transaction, so a killed process leaves every
finished record and no partial one. Candidates are keyed by the hash of their source; evaluations
keep losers and their reasons too (the llm.c habit: losers stay, with why they lost).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any, Iterator

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    hash       TEXT PRIMARY KEY,      -- sha256 of the source text
    op         TEXT NOT NULL,
    backend    TEXT NOT NULL,
    name       TEXT NOT NULL,         -- file stem
    path       TEXT,                  -- where it was read from, if from a file
    source     TEXT NOT NULL,
    summary    TEXT,                  -- the docstring's first line
    params     TEXT,                  -- JSON: KERNELTUNE["params"]
    origin     TEXT,                  -- seed | templates | claude | replay | user
    parent     TEXT,                  -- hash of the parent candidate
    created    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_hash TEXT NOT NULL REFERENCES candidates(hash),
    op             TEXT NOT NULL,
    device_key     TEXT NOT NULL,
    device_name    TEXT NOT NULL,
    status         TEXT NOT NULL,
    reason         TEXT NOT NULL,
    stage          TEXT,              -- the stage that decided the verdict
    dtype          TEXT,
    shape          TEXT,              -- the primary timed case, by name
    median_ms      REAL,
    p20_ms         REAL,
    p80_ms         REAL,
    speedup        REAL,              -- primary baseline median / candidate median, same run
    baseline       TEXT,              -- name of the primary baseline
    result         TEXT NOT NULL,     -- JSON: the whole result (cases, baselines, roofline, checks)
    provenance     TEXT NOT NULL,     -- JSON: device, versions, threads, sandbox, timestamp
    run_id         TEXT,
    duration_s     REAL,
    created        REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id         TEXT PRIMARY KEY,
    op         TEXT NOT NULL,
    device_key TEXT NOT NULL,
    proposer   TEXT NOT NULL,
    strategy   TEXT,
    options    TEXT NOT NULL,         -- JSON: everything needed to resume
    status     TEXT NOT NULL,         -- running | done | stopped (--time, --max-cost) | interrupted | failed
    note       TEXT,
    cost_usd   REAL NOT NULL DEFAULT 0,
    created    REAL NOT NULL,
    updated    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS proposals (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id         TEXT NOT NULL REFERENCES runs(id),
    candidate_hash TEXT NOT NULL REFERENCES candidates(hash),
    origin         TEXT NOT NULL,
    parent         TEXT,
    info           TEXT NOT NULL,     -- JSON: the proposer's handle (template + params, prompt id …)
    cost_usd       REAL NOT NULL DEFAULT 0,
    evaluation_id  INTEGER REFERENCES evaluations(id),   -- NULL until its evaluation is stored
    created        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS proposals_by_run ON proposals(run_id, id);
CREATE INDEX IF NOT EXISTS evaluations_by_candidate ON evaluations(candidate_hash, device_key);
CREATE INDEX IF NOT EXISTS evaluations_by_op ON evaluations(op, device_key, status);
"""


# an evaluation whose timing the evaluator marked noisy (timed twice on a busy machine) is never ranked
QUIET = "json_extract({}.result, '$.noisy') IS NULL"


def leaderboard(conn: sqlite3.Connection, op: str, device_key: str, limit: int) -> list[sqlite3.Row]:
    """The passed evaluations of ``op`` on ``device_key`` that rank, best speedup first, with the candidate's
    name, origin, params, backend and source: `kerneltune leaderboard` and benchmarks/bench_gpu.py choose from
    the same rows. ``conn`` must have ``row_factory = sqlite3.Row``."""
    return conn.execute(
        "SELECT e.*, c.name, c.origin, c.params, c.backend, c.source FROM evaluations e"
        " JOIN candidates c ON c.hash = e.candidate_hash"
        " WHERE e.op = ? AND e.device_key = ? AND e.status = 'passed' AND e.speedup IS NOT NULL"
        # the candidate's latest verdict, as Store.latest_evaluation (the search cache) and promote see it: a
        # failure counts at any shape (failures are stored without one), a pass at its own shape; a noisy pass
        # is no verdict on the speed and does not hide an earlier quiet one
        " AND e.id = (SELECT MAX(id) FROM evaluations e2 WHERE e2.candidate_hash = e.candidate_hash"
        " AND e2.device_key = e.device_key AND (e2.status != 'passed'"
        f" OR (e2.shape IS e.shape AND {QUIET.format('e2')})))"
        " ORDER BY e.speedup DESC LIMIT ?",
        (op, device_key, limit)).fetchall()


def cache_dir() -> str:
    """$KERNELTUNE_CACHE_DIR, else the user's cache directory."""
    env = os.environ.get("KERNELTUNE_CACHE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_cache_dir("kerneltune")


def default_db_path() -> str:
    return os.environ.get("KERNELTUNE_DB") or os.path.join(cache_dir(), "kerneltune.db")


class StoreError(Exception):
    pass


def _expected_columns() -> dict[str, set[str]]:
    """Each table of the schema and its columns (read from the schema itself, in memory)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        return {t: _columns(conn, t) for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                                               " AND name NOT LIKE 'sqlite_%'")}
    finally:
        conn.close()


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


class Store:
    def __init__(self, path: str | None = None, *, create: bool = True) -> None:
        """Open (and with ``create``, make) the store at ``path``. StoreError (one line) when the file is not a
        kerneltune store (another SQLite database, not SQLite at all), or, without ``create``, does not exist
        or holds no store yet: reading commands never make a store, nor add tables to another database."""
        self.path = path or default_db_path()
        parent = os.path.dirname(os.path.abspath(self.path))
        if not create and not os.path.isfile(self.path):
            raise StoreError(f"{self.path}: no such store (nothing has been evaluated into it); pass the --db a "
                             "search or eval wrote")
        try:
            os.makedirs(parent, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA busy_timeout = 60000")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: store schema v{version} is newer than this kerneltune "
                                 f"(v{SCHEMA_VERSION}); upgrade kerneltune or use another --db")
            self._check_tables(create)  # before anything is written to a file that may be another's database
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            with self._tx():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable kerneltune store ({e}); pass another --db") from None
        except OSError as e:
            raise StoreError(f"{self.path}: cannot open the store ({e.strerror}); pass a writable --db") from None

    def _check_tables(self, create: bool) -> None:
        """A table of ours that exists must have our columns (else this is another program's database); without
        ``create`` every table must exist."""
        have = {t for (t,) in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, cols in _expected_columns().items():
            if table not in have:
                if not create:
                    self.conn.close()
                    raise StoreError(f"{self.path}: not a kerneltune store (no {table} table); pass the --db a "
                                     "search or eval wrote")
                continue
            lacking = sorted(cols - _columns(self.conn, table))
            if lacking:
                self.conn.close()
                raise StoreError(f"{self.path}: not a kerneltune store (its {table} table has no column "
                                 f"{', '.join(lacking)}); pass another --db")

    def _tx(self) -> Any:
        conn = self.conn

        class _Tx:
            def __enter__(self_inner) -> None:
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type: Any, *_: Any) -> None:
                conn.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def close(self) -> None:
        self.conn.close()

    # -- writes --------------------------------------------------------------------------------------------
    def add_candidate(self, *, hash: str, op: str, backend: str, name: str, source: str, path: str | None,
                      summary: str, params: dict[str, Any] | None, origin: str, parent: str | None) -> None:
        with self._tx():
            self.conn.execute(
                "INSERT OR IGNORE INTO candidates (hash, op, backend, name, path, source, summary, params, origin,"
                " parent, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (hash, op, backend, name, path, source, summary, json.dumps(params or {}), origin, parent, time.time()))

    def add_evaluation(self, result: dict[str, Any], *, run_id: str | None = None) -> int:
        with self._tx():
            return self._insert_evaluation(result, run_id)

    def _insert_evaluation(self, result: dict[str, Any], run_id: str | None) -> int:
        prov = result["provenance"]
        cur = self.conn.execute(
            "INSERT INTO evaluations (candidate_hash, op, device_key, device_name, status, reason, stage, dtype,"
            " shape, median_ms, p20_ms, p80_ms, speedup, baseline, result, provenance, run_id, duration_s,"
            " created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (result["hash"], result["op"], prov["device"]["key"], prov["device"]["name"], result["status"],
             result["reason"], result.get("stage"), result.get("dtype"), result.get("shape"),
             result.get("median_ms"), result.get("p20_ms"), result.get("p80_ms"), result.get("speedup"),
             result.get("baseline"), json.dumps(result, default=str), json.dumps(prov, default=str), run_id,
             result.get("duration_s"), time.time()))
        return int(cur.lastrowid or 0)

    def add_run(self, run_id: str, *, op: str, device_key: str, proposer: str, strategy: str | None,
                options: dict[str, Any]) -> None:
        now = time.time()
        with self._tx():
            self.conn.execute("INSERT INTO runs (id, op, device_key, proposer, strategy, options, status, created,"
                              " updated) VALUES (?,?,?,?,?,?,?,?,?)",
                              (run_id, op, device_key, proposer, strategy, json.dumps(options), "running", now, now))

    def set_run_status(self, run_id: str, status: str, note: str | None = None, cost_usd: float | None = None) -> None:
        with self._tx():
            self.conn.execute("UPDATE runs SET status = ?, note = COALESCE(?, note), cost_usd = COALESCE(?, cost_usd),"
                              " updated = ? WHERE id = ?", (status, note, cost_usd, time.time(), run_id))

    def set_run_options(self, run_id: str, options: dict[str, Any]) -> None:
        """Replace a run's stored options (a resume with a new --time or --max-cost)."""
        with self._tx():
            self.conn.execute("UPDATE runs SET options = ?, updated = ? WHERE id = ?",
                              (json.dumps(options), time.time(), run_id))

    def add_proposal(self, run_id: str, candidate_hash: str, *, origin: str, parent: str | None,
                     info: dict[str, Any], cost_usd: float = 0.0) -> int:
        with self._tx():
            cur = self.conn.execute("INSERT INTO proposals (run_id, candidate_hash, origin, parent, info, cost_usd,"
                                    " created) VALUES (?,?,?,?,?,?,?)",
                                    (run_id, candidate_hash, origin, parent, json.dumps(info, default=str), cost_usd,
                                     time.time()))
            return int(cur.lastrowid or 0)

    def add_evaluation_for(self, result: dict[str, Any], *, run_id: str, proposal_id: int) -> int:
        """Store an evaluation and mark its proposal finished, in one transaction."""
        with self._tx():
            eid = self._insert_evaluation(result, run_id)
            self.conn.execute("UPDATE proposals SET evaluation_id = ? WHERE id = ?", (eid, proposal_id))
            return eid

    def link_proposal(self, proposal_id: int, evaluation_id: int) -> None:
        with self._tx():
            self.conn.execute("UPDATE proposals SET evaluation_id = ? WHERE id = ?", (evaluation_id, proposal_id))

    # -- reads ---------------------------------------------------------------------------------------------
    def candidate(self, ref: str) -> sqlite3.Row | None:
        """By full hash, unique hash prefix (>= 6 chars) or name."""
        row = self.conn.execute("SELECT * FROM candidates WHERE hash = ?", (ref,)).fetchone()
        if row is None and len(ref) >= 6:
            rows = self.conn.execute("SELECT * FROM candidates WHERE hash LIKE ?", (ref + "%",)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        if row is None:
            rows = self.conn.execute("SELECT * FROM candidates WHERE name = ? ORDER BY created DESC", (ref,)).fetchall()
            row = rows[0] if rows else None
        return row

    def evaluations(self, *, op: str | None = None, candidate_hash: str | None = None,
                    device_key: str | None = None, status: str | None = None) -> Iterator[sqlite3.Row]:
        q, args = "SELECT * FROM evaluations WHERE 1=1", []
        for col, val in (("op", op), ("candidate_hash", candidate_hash), ("device_key", device_key),
                         ("status", status)):
            if val is not None:
                q += f" AND {col} = ?"
                args.append(val)
        yield from self.conn.execute(q + " ORDER BY id", args)

    def run(self, run_id: str) -> sqlite3.Row | None:
        row = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            rows = self.conn.execute("SELECT * FROM runs WHERE id LIKE ?", (run_id + "%",)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return row

    def runs(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM runs ORDER BY created").fetchall()

    def proposals(self, run_id: str) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM proposals WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()

    def evaluation(self, evaluation_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM evaluations WHERE id = ?", (evaluation_id,)).fetchone()

    def latest_evaluation(self, candidate_hash: str, device_key: str, shape: str | None = None) -> sqlite3.Row | None:
        """The last evaluation of a candidate on a device (the cache that stops a re-evaluation)."""
        q = "SELECT * FROM evaluations WHERE candidate_hash = ? AND device_key = ?"
        args: list[Any] = [candidate_hash, device_key]
        if shape is not None:  # a timing counts only for the shape it was measured at; a failure counts anywhere
            q += " AND (status != 'passed' OR shape = ?)"
            args.append(shape)
        return self.conn.execute(q + " ORDER BY id DESC LIMIT 1", args).fetchone()

    def leaderboard(self, op: str, device_key: str, limit: int) -> list[sqlite3.Row]:
        """See the module's leaderboard()."""
        return leaderboard(self.conn, op, device_key, limit)

    def count(self, table: str) -> int:
        assert table in ("candidates", "evaluations", "runs", "proposals")
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
