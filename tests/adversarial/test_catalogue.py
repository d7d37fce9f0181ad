"""The evaluator cannot be fooled: every file of the adversarial catalogue gets the verdict it declares.

Each candidate file under attention/, attention_backward/, adamw/, faults/ and honest/ declares

    # EXPECT: <status>[|<status>...]    the allowed verdicts (a cheat never lists `passed`, an honest one
                                        lists only `passed`)
    # REASON: <substring>               optional: the verdict's reason must contain it (case-insensitive), so
                                        the right guard is proven to have caught it
    # TIMEOUT: <seconds>                optional: this file's evaluation limit (hangs get a short one)
    # NEEDS: namespaces                 optional: only run where workers get PID namespaces and Landlock
                                        signal scoping (it signals other processes)

All files go through one evaluator with a temporary store. Around every evaluation the test checks that the
store is intact (integrity, one new evaluation row, earlier rows unchanged, nothing a candidate wrote), that the
trusted baseline worker survived, and that secrets set in the parent's environment never reach a candidate.
Order: the cheats, then the faults, then the honest candidates, then a last health check, so the honest ones
also prove that the evaluator still works after every fault.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from kerneltune.evaluate import zygote
from kerneltune.evaluate.evaluator import STATUSES, Evaluator, Options
from kerneltune.evaluate.process import namespaces_available
from kerneltune.evaluate.sandbox import landlock_abi
from kerneltune.evaluate.static import guess_meta
from kerneltune.ops import get_op
from kerneltune.store import Store

HERE = Path(__file__).parent
GROUPS = ("attention", "attention_backward", "adamw", "faults", "honest")
DEFAULT_TIMEOUT = 120.0
MARK = b"candidate was here"  # what faults/write_store.py appends to any store it manages to open
SECRETS = {"ANTHROPIC_API_KEY": "sk-test-adversarial-0123456789", "FOO_TOKEN": "tok-adversarial-secret",
           "MY_SECRET": "s3cr3t-adversarial"}


def _files() -> list[Path]:
    return [p for g in GROUPS for p in sorted((HERE / g).glob("*.py"))]


def _header(path: Path) -> dict[str, str]:
    text = path.read_text()
    out = {}
    for key in ("EXPECT", "REASON", "TIMEOUT", "NEEDS"):
        m = re.search(rf"^# {key}:[ \t]*(.+?)[ \t]*$", text, re.M)
        if m:
            out[key] = m.group(1)
    return out


def _rows_digest(db: Path) -> tuple[int, int, str]:
    """(candidates, evaluations, sha256 over every evaluation row) read through a separate connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        nc = conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
        rows = conn.execute("SELECT id, candidate_hash, status, reason, result FROM evaluations ORDER BY id").fetchall()
        h = hashlib.sha256(repr(rows).encode()).hexdigest()
        return nc, len(rows), h
    finally:
        conn.close()


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _store_files_clean(db: Path) -> None:
    for p in (db, Path(f"{db}-wal")):
        if p.exists():
            data = p.read_bytes()
            assert MARK not in data, f"a candidate wrote into {p}"
    size = db.stat().st_size
    head = db.read_bytes()[:100]
    page = int.from_bytes(head[16:18], "big") or 65536
    pages = int.from_bytes(head[28:32], "big")
    assert size % page == 0, f"{db} is {size} bytes, not a whole number of {page}-byte pages (appended to?)"
    assert pages * page <= size


def _stat(pid: int, field: int) -> int:
    """A numeric field of /proc/PID/stat, counted from the state (0) on: 1 the parent, 3 the session."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[field])
    except (OSError, IndexError, ValueError):
        return 0


def _ppid(pid: int) -> int:
    return _stat(pid, 1)


def _sid(pid: int) -> int:
    return _stat(pid, 3)


def _ours(pid: int) -> bool:
    """Started by this test process, or orphaned (re-parented to init): another session's live workers are
    not ours to judge."""
    me = os.getpid()
    for _ in range(64):
        pid = _ppid(pid)
        if pid == me or pid <= 1:
            return True
    return False


class _State:
    def __init__(self, ev: Evaluator, store: Store, db: Path) -> None:
        self.ev, self.store, self.db = ev, store, db
        self.evaluations = 0
        self.results: dict[str, dict] = {}


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    db = tmp_path_factory.mktemp("adversarial-store") / "kt.db"
    store = Store(str(db))
    t0 = time.monotonic()
    progress = ((lambda msg: print(f"  [{time.monotonic() - t0:7.2f}] {msg}", flush=True))
                if os.environ.get("KT_ADVERSARIAL_PROGRESS") else None)
    ev = Evaluator(Options(device="cpu", rounds=2, round_ms=10, min_reps=3, timeout=DEFAULT_TIMEOUT,
                           memory_gb=4.0), store=store,
                   progress=progress)
    st = _State(ev, store, db)
    yield st
    ev.close()
    store.close()
    _print_summary(st)


def _print_summary(st: _State) -> None:
    lines = ["", "adversarial catalogue verdicts:"]
    for name, r in st.results.items():
        lines.append(f"  {name:48s} {r['status']:13s} {r['duration_s']:6.1f}s  {r['reason'][:110]}")
    print("\n".join(lines))


def _env(monkeypatch, db: Path) -> None:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KERNELTUNE_DB", str(db))


def _timed_cases(path: Path) -> list | None:
    """AdamW files are timed on gpt-tiny (0.44M parameters), not the CPU default gpt-mini (13.9M): each check
    and re-verification of gpt-mini took 3-12 s a seed on 2 cores, about 18 s of each file that reaches timing,
    and no AdamW file here depends on the timed case's size (the attention files keep their default cases: a
    cheat there keys on a large N)."""
    if guess_meta(path.read_text()).get("op") == "adamw":
        return [get_op("adamw").parse_case("gpt-tiny", "float32")]
    return None


def _evaluate(st: _State, path: Path, timeout: float) -> dict:
    before = _rows_digest(st.db)
    st.ev.opt.timeout = timeout
    st.ev.opt.shapes = _timed_cases(path)
    try:
        r = st.ev.evaluate_path(str(path))
    finally:
        st.ev.opt.timeout = DEFAULT_TIMEOUT
        st.ev.opt.shapes = None
    st.evaluations += 1
    # the store: intact, exactly one new evaluation, earlier rows untouched, nothing written by a candidate
    assert _integrity(st.db) == "ok"
    nc, ne, _ = _rows_digest(st.db)
    assert ne == before[1] + 1, f"expected one new evaluation row, store has {ne} (had {before[1]})"
    assert ne == st.evaluations
    conn = sqlite3.connect(f"file:{st.db}?mode=ro", uri=True)
    try:
        old = conn.execute("SELECT id, candidate_hash, status, reason, result FROM evaluations WHERE id <= ? "
                           "ORDER BY id", (before[1],)).fetchall()
    finally:
        conn.close()
    assert hashlib.sha256(repr(old).encode()).hexdigest() == before[2], "earlier evaluation rows changed"
    _store_files_clean(st.db)
    return r


FILES = _files()


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_candidate(path: Path, state: _State, monkeypatch) -> None:
    _check_file(path, state, monkeypatch)


# Workers are forked by the zygote by default (kerneltune/evaluate/zygote.py); these files also go through
# workers exec'd as fresh interpreters, the fallback, where the worker runs as __main__ and /proc, the
# descriptors and the environment come from exec instead of from the zygote's child.
EXECD = ("attention/patch_worker_timer", "faults/inherited_fds", "faults/secrets_proc_environ", "faults/kill_parent",
         "faults/fork_bomb")


@pytest.mark.parametrize("name", EXECD)
def test_candidate_in_an_execd_worker(name: str, state: _State, monkeypatch) -> None:
    monkeypatch.setenv("KERNELTUNE_WORKER_START", "exec")
    _check_file(HERE / f"{name}.py", state, monkeypatch, key=f"{name} (exec)")
    sandbox = state.results[f"{name} (exec)"]["provenance"]["sandbox"]
    assert sandbox and sandbox["start"] == "exec", sandbox


def _check_file(path: Path, state: _State, monkeypatch, key: str = "") -> None:
    hdr = _header(path)
    assert "EXPECT" in hdr, f"{path.name} has no '# EXPECT:' line"
    allowed = [s.strip() for s in hdr["EXPECT"].split("|")]
    assert all(s in STATUSES for s in allowed), f"{path.name}: unknown status in {allowed}"
    group = path.parent.name
    if group == "honest":
        assert allowed == ["passed"], "honest candidates must expect exactly `passed`"
    elif group in ("attention", "adamw"):
        assert "passed" not in allowed or path.stem.endswith("_restored"), "a cheat may never expect `passed`"
    text = path.read_text()
    assert text.lstrip().startswith('"""'), f"{path.name} must start with a docstring saying what it tries"
    if hdr.get("NEEDS") == "namespaces" and not (namespaces_available() and landlock_abi() >= 6):
        pytest.skip("signals other processes: needs PID namespaces and Landlock signal scoping to be safe")

    _env(monkeypatch, state.db)
    baseline_pids = {n: w.proc.pid for n, w in state.ev._baseline_workers.items() if w.proc.poll() is None}
    timeout = float(hdr.get("TIMEOUT", DEFAULT_TIMEOUT))
    t0 = time.monotonic()
    r = _evaluate(state, path, timeout)
    state.results[key or f"{group}/{path.stem}"] = r
    took = time.monotonic() - t0

    # the evaluator is still in charge: no stray workers of ours, baseline worker not killed by a candidate
    for name, pid in baseline_pids.items():
        w = state.ev._baseline_workers.get(name)
        assert w is not None and w.proc.pid == pid and w.proc.poll() is None, \
            f"the trusted {name} baseline worker died while evaluating {path.name}"
    assert took < timeout + 30, f"evaluation took {took:.0f}s against a {timeout:.0f}s limit"

    assert r["status"] in allowed, (f"{group}/{path.name}: got {r['status']!r} ({r['reason']}), "
                                    f"expected {'|'.join(allowed)}")
    if "REASON" in hdr and r["status"] != "passed":
        assert hdr["REASON"].lower() in r["reason"].lower(), \
            f"{path.name}: reason {r['reason']!r} does not mention {hdr['REASON']!r} (caught by the wrong guard?)"


def test_healthy_after_all(state: _State, monkeypatch) -> None:
    """After the whole catalogue: an honest candidate still passes, the store is whole and complete, and no
    process a candidate started is still alive."""
    _env(monkeypatch, state.db)
    r = _evaluate(state, HERE / "honest" / "attn_math_fp32.py", DEFAULT_TIMEOUT)
    assert r["status"] == "passed", r["reason"]
    if zygote.enabled():  # the catalogue's workers were forked, not exec'd after a silent fallback
        sandbox = r["provenance"]["sandbox"]
        assert sandbox["start"] == "fork", sandbox
        forked = [n for n, x in state.results.items() if ((x.get("provenance") or {}).get("sandbox") or {})
                  .get("start") == "fork"]
        assert len(forked) >= len(state.results) // 2, f"only {len(forked)} of {len(state.results)} files forked"
    assert _integrity(state.db) == "ok"
    assert state.store.count("evaluations") == state.evaluations
    # fork-bomb children and forked writers die with their worker (PID namespace, session kill). A worker the
    # zygote forked has the zygote's command line: any such process but the zygote and the live baseline
    # workers' sessions is a stray.
    time.sleep(0.5)
    keep_sids = {w.proc.pid for w in state.ev._baseline_workers.values() if w.proc.poll() is None}
    strays = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        pid = int(entry)
        execd = b"kerneltune.evaluate.worker" in cmd and b'"role": "candidate"' in cmd
        forked = b"kerneltune.evaluate.zygote" in cmd and pid != zygote.current_pid() and _sid(pid) not in keep_sids
        if (execd or forked) and _ours(pid):
            strays.append(pid)
    assert not strays, f"candidate worker processes still alive: {strays}"
    # and no timing left its load meter sampling (candidates here end timings by crashing or tampering)
    meters = [t for t in threading.enumerate() if t.name == "kerneltune-loadmeter"]
    assert not meters, f"{len(meters)} load meter thread(s) outlived their timing"
