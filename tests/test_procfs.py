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
    assert procfs.cpu_busy({10**6}) is None  # no such CPU: nothing to judge, not a zero load
    assert procfs.allowed_cpus() == set(os.sched_getaffinity(0))


def test_folders_of_a_dead_evaluator_are_swept_and_a_live_ones_kept(tmp_path):
    """kill -9 gives an evaluator no chance to remove its workers' folders: the next one removes those whose
    owner is gone or whose pid now names a younger process, and keeps its own, a live one's, and any other."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        names = {"dead": f"kerneltune-candidate-{gone.pid}-abc", "mine": f"kerneltune-baseline-{os.getpid()}-x1",
                 "live": f"kerneltune-zygote-{live.pid}-y2", "reused": f"kerneltune-probe-{live.pid}-z3",
                 "other": "kerneltune-candidate-notapid", "unrelated": f"pytest-{gone.pid}-q"}
        for key, name in names.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / "output.txt").write_text(key)
        old = procfs.started_at(live.pid) - 3600  # made an hour before the live process started: not its folder
        os.utime(tmp_path / names["reused"], (old, old))
        removed = procfs.sweep_stale_dirs(str(tmp_path))
        assert sorted(os.path.basename(p) for p in removed) == sorted([names["dead"], names["reused"]])
        assert sorted(os.listdir(tmp_path)) == sorted(n for k, n in names.items() if k not in ("dead", "reused"))
    finally:
        live.kill()
        live.wait()
