"""What /proc tells the evaluator: a worker's processes (however they left its session), the CPU its own
tree used, and the load of everything else on the CPUs it may run on."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kerneltune.evaluate import procfs
from kerneltune.evaluate.procfs import LoadMeter, own_ticks

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc")


def test_own_ticks_count_descendants_and_the_meter_reports_a_share():
    before = own_ticks(os.getpid())
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    subprocess.run([sys.executable, "-c", code], check=True)
    gained = (own_ticks(os.getpid()) - before) / os.sysconf("SC_CLK_TCK")
    assert gained >= 0.4, gained  # the child's CPU time is ours (in cutime once reaped)
    m = LoadMeter().start()
    time.sleep(0.2)
    share = m.stop()
    assert share is not None and 0.0 <= share <= 1.0 and m.cores is not None


def test_meter_keeps_a_worker_that_its_parent_abandoned():
    """A sandboxed worker whose parent dies is reaped by init, not by us: its CPU time must still count as
    ours (before this, the check's own workers read as 'foreign load')."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8: pass\n"
    m = LoadMeter(interval=0.05).start()
    # the child starts a grandchild and exits soon after: the grandchild is re-parented to init and burns on
    subprocess.run([sys.executable, "-c", "import subprocess, sys, time\n"
                    f"subprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(0.3)"], check=True)
    time.sleep(1.5)
    m.stop()
    own = sum(last - first for first, last in m._seen.values()) / os.sysconf("SC_CLK_TCK")
    assert own >= 0.6, own


def test_a_workers_tree_holds_a_grandchild_that_left_its_session():
    """The evaluator stops and kills a worker by its session and every descendant: a grandchild that called
    setsid() is still found; an unrelated process is not."""
    code = ("import os, subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(30)'])\n"
            "time.sleep(30)")
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            table = procfs.proc_table()
            kids = [pid for pid, p in table.items() if p.ppid == leader.pid]
            if kids and table[kids[0]].sid == kids[0]:  # the grandchild runs, in a session of its own
                break
            time.sleep(0.05)
        else:
            pytest.fail("the grandchild never left its session")
        tree = procfs.tree_pids(leader.pid, table)
        assert tree == sorted([leader.pid, kids[0]]), (tree, leader.pid, kids)
        assert other.pid not in tree and os.getpid() not in tree
    finally:
        for pid in procfs.tree_pids(leader.pid, procfs.proc_table()) + [other.pid]:
            os.kill(pid, 9)
        leader.wait()
        other.wait()


def test_cpu_busy_counts_only_the_cpus_asked_for():
    """The load meter judges the CPUs this process may run on: /proc/stat's per-CPU lines, summed over a set."""
    all_cpus = procfs.cpu_busy()
    assert all_cpus is not None and all_cpus[1] == len([ln for ln in open("/proc/stat") if ln[:3] == "cpu"
                                                          and ln[3:4].isdigit()])
    one = procfs.cpu_busy({0})
    assert one is not None and one[1] == 1 and 0 <= one[0] <= procfs.cpu_busy()[0]
    # a CPU /proc/stat does not list (a container's own numbering): judged over all it lists, never over none
    assert procfs.cpu_busy({10**6})[1] == all_cpus[1]
    assert procfs.allowed_cpus() == set(os.sched_getaffinity(0))


def test_folders_of_a_dead_evaluator_are_swept_and_a_live_ones_kept(tmp_path):
    """kill -9 gives an evaluator no chance to remove its workers' folders: the next one removes those whose
    owner is gone or whose pid now names another process (another start time), and keeps its own, a live
    one's, and any other; a folder's times, which a candidate can change, do not matter."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me, it = procfs.start_ticks(os.getpid()), procfs.start_ticks(live.pid)
        names = {"dead": f"kerneltune-candidate-{gone.pid}-5-abc", "mine": f"kerneltune-baseline-{os.getpid()}-{me}-x1",
                 "live": f"kerneltune-zygote-{live.pid}-{it}-y2", "reused": f"kerneltune-probe-{live.pid}-{it - 1}-z3",
                 "old": f"kerneltune-candidate-{gone.pid}-q", "unrelated": f"pytest-{gone.pid}-5-q"}
        for key, name in names.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / "output.txt").write_text(key)
        os.utime(tmp_path / names["live"], (0, 0))  # what a candidate could do to another worker's folder
        removed = procfs.sweep_stale_dirs(str(tmp_path))
        assert sorted(os.path.basename(p) for p in removed) == sorted([names["dead"], names["reused"]])
        assert sorted(os.listdir(tmp_path)) == sorted(n for k, n in names.items() if k not in ("dead", "reused"))
        made = procfs.private_dir("candidate")
        try:
            assert os.path.basename(made).startswith(f"kerneltune-candidate-{os.getpid()}-{me}-")
            assert procfs.sweep_stale_dirs(os.path.dirname(made)) == [] or made not in procfs.sweep_stale_dirs()
            assert os.path.isdir(made) and os.stat(made).st_mode & 0o777 == 0o700
        finally:
            os.rmdir(made)
    finally:
        live.kill()
        live.wait()


TRACED_SPINNER = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
spinner = os.fork()
if spinner != 0:
    print(spinner, flush=True)
if spinner == 0:  # the work left running; any process of the tree may trace it (Yama's scope 1 allows that)
    libc.prctl(0x59616d61, ctypes.c_ulong(-1 & (2**64 - 1)), 0, 0, 0)
    while True:
        pass
for _ in range(300):  # idle processes between the two: the tracer is signalled well after the spinner
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
if os.fork() == 0:  # its tracer, a later pid: stopped after it, it lets every SIGSTOP of the spinner go
    if libc.ptrace(0x4206, spinner, None, None) != 0:  # PTRACE_SEIZE
        print("seize failed", ctypes.get_errno(), flush=True)
        os._exit(1)
    print("traced", flush=True)
    while True:
        _, st = os.waitpid(spinner, 0x40000000)  # __WALL
        sig = os.WSTOPSIG(st) if os.WIFSTOPPED(st) else 0
        libc.ptrace(7, spinner, None, ctypes.c_void_p(0 if sig == signal.SIGSTOP else sig))  # PTRACE_CONT
time.sleep(60)
"""


def test_a_process_its_own_tracer_lets_go_is_stopped_all_the_same():
    """A candidate's process that another of its processes traces: the tracer swallows the SIGSTOP meant for it.
    The evaluator looks again until every thread of the tree is seen stopped, so the spinner is held once its
    tracer is; before that look, it ran on through the baselines' turns."""
    from kerneltune.evaluate.process import WorkerProcess

    class Tree:  # the parts of a WorkerProcess that stopping uses, around a plain process tree
        pids, stop, resume = WorkerProcess.pids, WorkerProcess.stop, WorkerProcess.resume

        def __init__(self):
            self.proc = subprocess.Popen([sys.executable, "-c", TRACED_SPINNER], start_new_session=True,
                                         stdout=subprocess.PIPE, text=True)
            self.stopped, self.killed_for = set(), None

        def kill(self):
            for pid in self.pids():
                os.kill(pid, 9)

    t = Tree()
    try:
        spinner = int(t.proc.stdout.readline())
        said = t.proc.stdout.readline()
        if "traced" not in said:
            pytest.skip(f"this kernel does not let a process trace its sibling ({said.strip()})")
        time.sleep(0.2)
        t.stop()
        assert t.killed_for is None, t.killed_for
        before = procfs.proc_table()[spinner].ticks
        time.sleep(0.5)
        after = procfs.proc_table()[spinner].ticks
        assert after - before <= 2, f"the traced spinner ran {(after - before) * 10} ms while stopped"
        assert all(procfs.all_threads_stopped(p) for p in t.pids())
        t.resume()
        assert not t.stopped
    finally:
        t.kill()
        t.proc.wait()


def test_turns_run_alone_only_where_a_stopped_process_is_seen_stopped(monkeypatch):
    """The probe passes on this Linux; where it fails (a kernel whose /proc does not show a SIGSTOPped process
    stopped), the evaluator does not stop workers at all (every candidate would be rejected as unstoppable;
    its cases then say `isolated: false`, which is isolating() below), and doctor says why."""
    from kerneltune.doctor import diagnose
    from kerneltune.evaluate import evaluator as ev_mod

    assert procfs.stopping_fails() == ""
    assert ev_mod.Evaluator(ev_mod.Options()).isolating()
    assert not ev_mod.Evaluator(ev_mod.Options(isolate=False)).isolating()
    monkeypatch.setattr(ev_mod, "stopping_fails", lambda: "a SIGSTOPped process was not seen stopped")
    assert not ev_mod.Evaluator(ev_mod.Options()).isolating()
    monkeypatch.setattr(procfs, "stopping_fails", lambda: "a SIGSTOPped process was not seen stopped")
    row = next(r for r in diagnose(None) if r["name"] == "timing: turns alone")
    assert row["status"] == "warn" and "not seen stopped" in row["detail"], row
