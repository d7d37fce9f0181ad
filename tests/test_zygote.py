"""CPU workers forked by the zygote are confined like exec'd ones, and the zygote's failures cost nothing but time.

The adversarial catalogue runs every file through forked workers (the default) and a few through exec'd
ones; these tests check the zygote itself: what a forked worker gets, a zygote that dies, and the fallback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kerneltune.evaluate import zygote
from kerneltune.evaluate.process import WorkerDied, WorkerProcess, namespaces_available

pytestmark = pytest.mark.skipif(not zygote.enabled(), reason="the zygote is Linux only")


def _worker(monkeypatch, start: str) -> WorkerProcess:
    monkeypatch.setenv("KERNELTUNE_WORKER_START", start)
    w = WorkerProcess(op="attention", device="cpu", role="candidate", memory_bytes=4 << 30)
    w.start(timeout=120)
    return w


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_forked_worker_is_confined_as_an_execd_one(monkeypatch):
    forked, execd = _worker(monkeypatch, "fork"), _worker(monkeypatch, "exec")
    try:
        assert forked.started_by == "fork" and forked.sandbox_info["start"] == "fork", forked.start_note
        assert execd.started_by == "exec" and execd.sandbox_info["start"] == "exec"
        same = ("landlock_abi", "memory_bytes", "nproc")
        assert {k: forked.sandbox_info[k] for k in same} == {k: execd.sandbox_info[k] for k in same}
        assert forked.sandbox_info["landlock_abi"] == execd.sandbox_info["landlock_abi"]
        assert forked.namespaces == execd.namespaces == namespaces_available()
        if namespaces_available():  # each is PID 1 of a namespace of its own
            assert forked.worker_pid == execd.worker_pid == 1
        # a session of its own, which the evaluator's kill and memory watch rely on
        assert os.getsid(forked.proc.pid) == forked.proc.pid
        assert forked.proc.pid != zygote.current_pid()
    finally:
        forked.close()
        execd.close()
    assert forked.proc.poll() is not None and not _alive(forked.proc.pid)


def test_the_workers_of_a_zygote_that_dies_die_with_it_and_the_next_worker_gets_a_new_zygote(monkeypatch):
    w = _worker(monkeypatch, "fork")
    try:
        old = zygote.current_pid()
        assert old is not None
        pids = w.pids()
        assert pids, "the worker's session is empty"
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids), "a worker outlived its zygote"
        with pytest.raises(WorkerDied) as e:
            w.request({"cmd": "clear"}, timeout=5)
        assert "lost with the zygote" in str(e.value), e.value
    finally:
        w.close()
    w2 = _worker(monkeypatch, "fork")
    try:
        assert w2.started_by == "fork"
        assert zygote.current_pid() not in (None, old)
    finally:
        w2.close()


def test_a_zygote_that_cannot_start_leaves_the_worker_execd_with_the_reason(monkeypatch):
    def refuse(env):
        raise zygote.Unavailable("test: no zygote today")

    monkeypatch.setattr(zygote, "get", refuse)
    w = _worker(monkeypatch, "fork")
    try:
        assert w.started_by == "exec"
        assert w.sandbox_info["start_note"] == "test: no zygote today"
        reply, _ = w.request({"cmd": "clear"}, timeout=30)
        assert reply.get("ok"), reply
    finally:
        w.close()


def test_exit_statuses_of_forked_workers_read_as_execd_ones(monkeypatch):
    """A candidate that segfaults as it loads: the status the evaluator turns into words is the same either way
    (in a PID namespace, the process in between reports 128 + N as ``unshare`` does)."""
    deaths = {}
    for start in ("fork", "exec"):
        w = _worker(monkeypatch, start)
        try:
            with pytest.raises(WorkerDied) as e:
                w.request({"cmd": "load", "source": "import ctypes\nctypes.string_at(0)\n", "filename": "seg.py",
                           "module": "kt_candidate_seg", "backend": "torch", "compile_cuda": False}, timeout=60)
            assert w.started_by == start
            deaths[start] = (e.value.death.reason, w.proc.returncode)
        finally:
            w.close()
    assert deaths["fork"] == deaths["exec"], deaths
    assert "SIGSEGV" in deaths["fork"][0], deaths


def test_a_zygote_started_by_a_thread_that_ends_outlives_it(monkeypatch):
    """The kernel kills the zygote when the *thread* that started it ends (PR_SET_PDEATHSIG): a search starts
    workers from its evaluation threads, so the zygote must be started from a thread that lasts."""
    zygote.shutdown()
    first: dict[str, int | None] = {}

    def in_a_thread() -> None:
        w = _worker(monkeypatch, "fork")
        first["pid"] = zygote.current_pid()
        w.close()

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    time.sleep(0.3)
    assert first["pid"] is not None and _alive(first["pid"])
    w = _worker(monkeypatch, "fork")
    try:
        assert w.started_by == "fork" and zygote.current_pid() == first["pid"]
    finally:
        w.close()


def test_a_zygote_that_stops_answering_is_ended_and_the_worker_execd(monkeypatch):
    """A request that times out ends the zygote (never an answer read as another request's) and the worker
    is exec'd on a wire of its own; the next worker gets a new zygote."""
    zygote.shutdown()
    monkeypatch.setattr(zygote, "REQUEST_TIMEOUT", 1.0)
    w = _worker(monkeypatch, "fork")
    w.close()
    stalled = zygote.current_pid()
    assert stalled is not None
    os.kill(stalled, signal.SIGSTOP)
    try:
        w = _worker(monkeypatch, "fork")
        try:
            assert w.started_by == "exec" and "stopped answering" in w.start_note, w.start_note
            reply, _ = w.request({"cmd": "clear"}, timeout=30)
            assert reply.get("ok"), reply
        finally:
            w.close()
    finally:
        try:
            os.kill(stalled, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert not _alive(stalled)
    w = _worker(monkeypatch, "fork")
    try:
        assert w.started_by == "fork" and zygote.current_pid() not in (None, stalled)
    finally:
        w.close()


def test_the_zygote_refuses_to_fork_after_a_parallel_op():
    """OpenMP's thread pool does not survive fork: a child of a process that ran a parallel op hangs in its
    first one. The zygote's start-up probe tells the two apart (in a fresh process: this one has run ops)."""
    code = ("import torch\nfrom kerneltune.evaluate import zygote\n"
            "print(zygote._probe(zygote._parallel_op, 5))\n"
            "torch.set_num_threads(2)\nx = torch.ones(1 << 22)\nfloat((x * 2).sum())\n"
            "print(zygote._probe(zygote._parallel_op, 5))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["True", "False"], r.stdout + r.stderr


STOPPED_ORPHAN = r"""
import os, sys, threading, time
os.environ["KERNELTUNE_WORKER_START"] = sys.argv[1]
from kerneltune.evaluate.process import WorkerProcess
box = {}
def make():  # started by a thread that ends at once: the worker must outlive it, and not this process
    box["w"] = WorkerProcess(op="adamw", device="cpu", role="candidate")
t = threading.Thread(target=make)
t.start()
t.join()
w = box["w"]
w.start(timeout=120)
time.sleep(0.5)
alive = w.proc.poll() is None
w.stop()  # as while another contestant is timed: a stopped worker never sees its wire close
print(" ".join(map(str, w.pids())), "alive" if alive else "dead", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("start", ["exec", "fork"])
def test_a_stopped_worker_dies_with_its_evaluator(start):
    """An evaluator killed with -9 while a worker is stopped for another's turn: the worker must not live on,
    stopped, holding its memory (or a GPU's). Exec'd workers die by setpriv's parent-death signal, set from a
    thread that lasts as long as the evaluator; forked ones with their zygote."""
    p = subprocess.Popen([sys.executable, "-c", STOPPED_ORPHAN, start], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().split()
        assert line and line[-1] == "alive", line  # the worker outlived the thread that started it
        pids = [int(x) for x in line[:-1]]
        assert pids
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [pid for pid in pids if _alive(pid)]
            if not left:
                break
            time.sleep(0.1)
        assert not left, f"{len(left)} process(es) of the stopped worker outlived its evaluator"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
