"""What /proc says about processes and CPUs: the process table the evaluator stops and kills workers by,
and the meter that tells a quiet machine from a busy one.

One reading of /proc/<pid>/stat serves all of it: a worker's processes (its session and every descendant),
the CPU its own process tree used, and the CPU everything else used on the CPUs this process may run on.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple


class Proc(NamedTuple):
    ppid: int
    sid: int
    ticks: int  # utime + stime
    start: int  # start time in ticks since boot: with the pid, names one process for good
    state: str  # R running, S/D sleeping, T stopped, t stopped by its tracer, Z zombie, ...


def stat_fields(path: str) -> list[str]:
    """The fields of a /proc/<pid>/stat (or /proc/<pid>/task/<tid>/stat) file after "pid (comm)": [0] the
    state, [1] the parent, [3] the session, [11] + [12] CPU ticks, [13] + [14] reaped children's, [19] the
    start. Raises OSError when it cannot be read (FileNotFoundError: the process or thread is gone)."""
    with open(path) as f:
        raw = f.read()
    return raw[raw.rfind(")") + 2:].split()


def proc_table() -> dict[int, Proc]:
    """pid -> Proc of every process /proc shows (empty where there is no /proc)."""
    table: dict[int, Proc] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            rest = stat_fields(f"/proc/{entry}/stat")
            table[int(entry)] = Proc(int(rest[1]), int(rest[3]), int(rest[11]) + int(rest[12]), int(rest[19]),
                                     rest[0])
        except (OSError, IndexError, ValueError):
            continue
    return table


STOPPED_STATES = frozenset("TtZXx")  # a thread in one of these runs no more: stopped, stopped by its tracer, dead


def all_threads_stopped(pid: int, signalled: bool = False) -> bool:
    """Is every thread of ``pid`` stopped (or gone)? A group stop stops them all, but a thread another process
    traces can be let go by its tracer on its own; /proc/<pid>/stat shows the first thread only. Once the
    process has been sent SIGSTOP, a thread in uninterruptible sleep (D: a driver call, on a GPU) counts as
    stopped: it uses no CPU, and it stops before it returns to its own code."""
    ok = STOPPED_STATES | {"D", "I"} if signalled else STOPPED_STATES
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            if stat_fields(f"/proc/{pid}/task/{tid}/stat")[0] not in ok:
                return False
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended
        except (OSError, IndexError):
            return False  # unreadable: never taken for stopped
    return True


@functools.lru_cache(maxsize=1)
def stopping_fails() -> str:
    """Why this machine cannot stop a process and see it stopped ('' when it can): the evaluator's timed turns
    run alone only where a SIGSTOPped process shows as stopped in /proc (a sandboxed kernel may not)."""
    try:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        return f"no process to stop could start ({e})"
    try:
        time.sleep(0.05)
        if all_threads_stopped(proc.pid):  # a reading that cannot tell running from stopped proves nothing
            return "a running process reads as stopped in /proc"
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 2
        while not all_threads_stopped(proc.pid):
            if time.monotonic() > deadline:
                return "a SIGSTOPped process was not seen stopped in /proc within 2 s"
            time.sleep(0.005)
        if not os.path.isdir(f"/proc/{proc.pid}/task"):
            return "/proc shows no threads of a running process"
        os.kill(proc.pid, signal.SIGCONT)
        return ""
    finally:
        proc.kill()
        proc.wait()


def descendants(roots: set[int], table: dict[int, Proc]) -> set[int]:
    """``roots`` (those alive) and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p.ppid, []).append(pid)
    found = {r for r in roots if r in table}
    todo = list(found)
    while todo:
        for kid in children.get(todo.pop(), ()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def tree_pids(leader: int, table: dict[int, Proc]) -> list[int]:
    """The processes of the session ``leader`` leads and all their descendants: a process that left the
    session with setsid() is still found (in a PID namespace, orphans are re-parented to the worker)."""
    return sorted(descendants({pid for pid, p in table.items() if p.sid == leader} | {leader}, table))


def own_ticks(root: int) -> int:
    """CPU ticks of ``root`` and all its descendants, their reaped children included (a snapshot)."""
    table = proc_table()
    total = 0
    for pid in descendants({root}, table):
        total += table[pid].ticks
        try:
            rest = stat_fields(f"/proc/{pid}/stat")
            total += int(rest[13]) + int(rest[14])  # + cutime + cstime
        except (OSError, IndexError, ValueError):
            pass
    return total


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity, which its workers inherit); None: all of them."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cpu_busy(cpus: set[int] | None = None) -> tuple[int, int] | None:
    """(busy ticks, number of CPUs) from /proc/stat, over ``cpus`` (None: all); None where there is none.
    Busy: user, nice, system, irq, softirq and steal (guest time is inside user); not idle or iowait. Where
    /proc/stat does not list every CPU asked for (a container's view numbered its own way), all of them."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    per: dict[int, int] = {}
    for ln in lines:
        if ln.startswith("cpu") and ln[3:4].isdigit():
            head = ln.split()
            v = [int(x) for x in head[1:]]
            per[int(head[0][3:])] = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    if cpus is not None and cpus <= per.keys():
        per = {c: t for c, t in per.items() if c in cpus}
    return (sum(per.values()), len(per)) if per else None


class LoadMeter:
    """CPU time used by processes other than this one and its descendants, between start() and stop(),
    as a share of the CPUs this process may run on (0.5 = half of them busy all along). None where /proc is
    missing (not Linux).

    The CPUs' time comes from /proc/stat (steal time included), only for the CPUs in this process's
    affinity: on a host shared by pinned containers, load on another container's cores is not ours to
    judge. This process tree's own share is followed process by process, sampled every ``interval``
    seconds, so a worker that is killed and reaped by init (sandbox teardown) still counts as ours up to
    its last sample."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._t0 = 0.0
        self._cpus = allowed_cpus()
        self._busy0: tuple[int, int] | None = None
        self._seen: dict[tuple[int, int], list[int]] = {}  # (pid, start) -> [ticks at first sight, latest]
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.cores: float | None = None  # the same, in cores

    def _sample(self, first: bool = False) -> None:
        table = proc_table()
        now = {(pid, table[pid].start): table[pid].ticks for pid in descendants({os.getpid()}, table)}
        for k, ticks in now.items():
            if k in self._seen:
                self._seen[k][1] = ticks
            else:  # there at start: count from now; born since: count all of it
                self._seen[k] = [ticks if first else 0, ticks]
        for k, v in self._seen.items():  # seen as ours once, ours for good (a killed parent's orphan lives on)
            p = table.get(k[0]) if k not in now else None
            if p is not None and p.start == k[1]:
                v[1] = max(v[1], p.ticks)

    def _run(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "LoadMeter":
        self._t0 = time.monotonic()
        self._busy0 = cpu_busy(self._cpus)
        if self._busy0 is not None:
            self._sample(first=True)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="kerneltune-loadmeter", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> float | None:
        wall = time.monotonic() - self._t0
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        busy1 = cpu_busy(self._cpus)
        if self._busy0 is None or busy1 is None or wall <= 0 or busy1[1] != self._busy0[1]:
            return None  # no /proc, or the CPUs counted changed meanwhile (hotplug): no load to judge
        own = sum(last - first for first, last in self._seen.values())
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        ncpu = max(busy1[1], 1)
        self.cores = round(min(max(busy1[0] - self._busy0[0] - own, 0) / hz / wall, ncpu), 3)  # ticks are coarse
        return round(self.cores / ncpu, 3)


def wait_quiet(limit: float, max_wait_s: float, window_s: float = 1.0) -> float | None:
    """Sample the foreign load over short windows until it is at most ``limit`` or ``max_wait_s`` passed;
    return the last sample."""
    deadline = time.monotonic() + max_wait_s
    while True:
        m = LoadMeter().start()
        time.sleep(window_s)
        load = m.stop()
        if load is None or load <= limit or time.monotonic() >= deadline:
            return load


# -- the evaluator's temp folders ---------------------------------------------------------------------------
_DIR = re.compile(r"kerneltune-(candidate|baseline|probe|zygote)-(\d+)-(\d+)-[^/]+")
_swept = threading.Lock()
_sweep_done = False


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (with the pid, it names one process for good); None when
    there is no such process."""
    try:
        return int(stat_fields(f"/proc/{pid}/stat")[19])
    except (OSError, IndexError, ValueError):
        return None


def sweep_stale_dirs(tmp: str | None = None) -> list[str]:
    """Remove the temp folders an evaluator that no longer runs left behind (kill -9 gives it no chance to
    clean up): this user's ``kerneltune-<role>-<pid>-<start>-*`` folders whose process (that pid, started at
    that tick) is gone. The name is the only thing trusted: a sandboxed candidate can change a folder's times,
    not rename it. Folders of a live evaluator, and any not named so, are left alone."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for name in names:
        m = _DIR.fullmatch(name)
        if not m or start_ticks(int(m.group(2))) == int(m.group(3)):
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


def private_dir(role: str) -> str:
    """A new folder only this user can enter, for a worker, a probe or the zygote, named after this process
    so a later evaluator can tell whether its owner still runs. The first call in a process also removes the
    folders dead evaluators left (sweep_stale_dirs)."""
    global _sweep_done
    me = start_ticks(os.getpid())
    with _swept:
        if not _sweep_done and me is not None:  # no /proc here: no owner can be told alive, so nothing is swept
            _sweep_done = True
            sweep_stale_dirs()
    path = tempfile.mkdtemp(prefix=f"kerneltune-{role}-{os.getpid()}-{me or 0}-")
    os.chmod(path, 0o700)
    return path
