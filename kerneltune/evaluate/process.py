"""Parent side of a worker: start it confined, talk to it with deadlines, and put it down for good.

A worker that dies, hangs, floods its output or grows past its memory limit becomes a verdict here;
the evaluator itself never waits without a deadline and never reads more than it asked for.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from kerneltune.evaluate import protocol, zygote
from kerneltune.evaluate.procfs import (
    Proc,
    all_threads_stopped,
    private_dir,
    proc_table,
    tree_pids,
)

_SECRET = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.I)
_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "CUDA_PATH",
             "LD_LIBRARY_PATH", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "PYTHONPATH", "VIRTUAL_ENV", "TRITON_PTXAS_PATH",
             "PYTHONHASHSEED", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# what every worker's environment has from interpreter start-up on (the zygote is started with it)
ZYGOTE_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
OUTPUT_CAP = 64 << 20  # bytes of stdout+stderr a candidate may write (its file-size limit)
STOP_WAIT_S = 1.0  # how long a worker's processes may take to be seen stopped (WorkerProcess.stop)

SIGNAL_WORDS = {signal.SIGSEGV: "segmentation fault", signal.SIGBUS: "bus error", signal.SIGABRT: "abort",
                signal.SIGFPE: "floating-point exception", signal.SIGILL: "illegal instruction",
                signal.SIGKILL: "killed", signal.SIGXFSZ: "output file over its size limit",
                signal.SIGTERM: "terminated", signal.SIGXCPU: "CPU time limit"}


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The worker's environment: a short allowlist of the parent's, never a secret."""
    env = {k: v for k, v in os.environ.items()
           if (k in _ENV_KEEP or k.startswith("LC_")) and not _SECRET.search(k)}
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return {k: v for k, v in env.items() if not _SECRET.search(k)}


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Can workers run in fresh user + PID namespaces (util-linux ``unshare``)?"""
    exe = shutil.which("unshare")
    if not exe or sys.platform != "linux":
        return False
    try:
        r = subprocess.run([exe, "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc",
                            sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and r.stdout.strip() == "1"


@dataclass(frozen=True)
class Confinement:
    """Which confinement layers a worker gets: user+PID namespaces, Landlock, the process-count limit."""

    namespaces: bool = True
    landlock: bool = True
    nproc: bool = True
    note: str = ""  # what was given up, and why (empty: nothing)
    writable: tuple[str, ...] = ()  # paths Landlock leaves writable beyond the worker's own folder and /dev

    def describe(self) -> str:
        ll = "landlock" + (f" (+ writable {', '.join(self.writable)})" if self.writable else "")
        on = [n for n, v in (("namespaces", self.namespaces), (ll, self.landlock),
                             ("process limit", self.nproc and self.namespaces)) if v]
        return ", ".join(on) or "none"


# Tried in order until a confined process can use the GPU: every layer first; then Landlock with /proc
# writable (an H100 host's driver refused to start under Landlock until the process could write /proc,
# found by benchmarks/gpu/landlock_probe.py; inside the PID namespace that /proc is the sandbox's own);
# then each layer given up alone (the process limit is the cheapest to lose: it only bounds fork bombs),
# then two, then none.
_CUDA_TRIES = (Confinement(True, True, True), Confinement(True, True, True, writable=("/proc",)),
               Confinement(True, True, False), Confinement(True, False, True),
               Confinement(False, True, False), Confinement(True, False, False), Confinement(False, False, False))
_CUDA_PROBE = ("import json, sys; from kerneltune.evaluate import sandbox; sandbox.apply(json.loads(sys.argv[1])); "
               "import torch; torch.cuda.init(); x = torch.ones(1024, device='cuda'); "
               "assert float((x + x).sum()) == 2048.0; torch.cuda.synchronize(); print('probe-ok')")


@functools.lru_cache(maxsize=1)
def _die_with_us() -> list[str]:
    """``setpriv --pdeathsig KILL``, where util-linux has it: the exec'd process (unshare, or the worker) gets
    SIGKILL when the thread that started it ends (and unshare --kill-child takes the worker with it)."""
    exe = shutil.which("setpriv")
    if not exe:
        return []
    try:
        ok = subprocess.run([exe, "--pdeathsig", "KILL", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return [exe, "--pdeathsig", "KILL"] if ok else []


def _wrap_namespaces(argv: list[str]) -> list[str]:
    return [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child",
            "--mount-proc", *argv]


@functools.lru_cache(maxsize=1)
def cuda_confinement() -> Confinement:
    return probe_confinement(_CUDA_PROBE, "CUDA")


def probe_confinement(code: str, what: str) -> Confinement:
    """The strongest confinement under which ``code`` (a worker's first use of CUDA) runs on this machine.

    Some GPU hosts refuse CUDA inside a user namespace, under Landlock or under a process-count limit
    (the driver starts threads and opens device files): the probe starts a tiny confined process per
    combination, strongest first, and keeps the first that runs a kernel. What was given up is recorded
    in every result's provenance and shown by ``kerneltune doctor``; nothing is given up silently."""
    ns_ok = namespaces_available()
    failures: list[str] = []
    for conf in _CUDA_TRIES:
        if conf.namespaces and not ns_ok:
            continue
        workdir = private_dir("probe")
        cfg = {"workdir": workdir, "memory_bytes": None, "file_bytes": OUTPUT_CAP,
               "nproc": 1024 if (conf.namespaces and conf.nproc) else None, "landlock": conf.landlock,
               "writable": list(conf.writable)}
        argv = [sys.executable, "-c", code, json.dumps(cfg)]
        if conf.namespaces:
            argv = _wrap_namespaces(argv)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=workdir,
                               env=child_env({"HOME": workdir, "TMPDIR": workdir}))
            ok, tail = r.returncode == 0 and "probe-ok" in r.stdout, (r.stderr or r.stdout).strip().splitlines()
        except (OSError, subprocess.SubprocessError) as e:
            ok, tail = False, [str(e)]
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if ok:
            note = "" if not failures else f"{what} failed under stronger confinement (" + "; ".join(failures) + ")"
            return Confinement(conf.namespaces and ns_ok, conf.landlock, conf.nproc, note, conf.writable)
        failures.append(f"{conf.describe()}: {(tail[-1] if tail else 'no output')[:160]}")
    return Confinement(ns_ok, True, True, f"{what} failed under every confinement tried (" + "; ".join(failures) + ")")


def confinement_for(device: str, sandbox: bool) -> Confinement:
    if not sandbox:
        return Confinement(False, False, False, "sandbox turned off")
    if device == "cuda":
        return cuda_confinement()
    return Confinement(namespaces_available(), True, True)


@dataclass
class Death:
    """How a worker ended, in words."""

    status: str
    reason: str


class WorkerProcess:
    """One confined worker. ``request`` sends a message and waits (with a deadline) for the reply."""

    def __init__(self, *, op: str, device: str, role: str, backend: str = "torch",
                 memory_bytes: int | None = None, sandbox: bool = True, label: str = "") -> None:
        self.op, self.device, self.role, self.backend = op, device, role, backend
        self.label = label or role
        self.workdir = private_dir(role)
        self.out_path = os.path.join(self.workdir, "output.txt")
        self.memory_bytes = memory_bytes
        self.killed_for: tuple[str, str] | None = None  # (status, reason) when the evaluator ended it
        self.sandbox_info: dict[str, Any] = {}
        self.worker_pid: int | None = None  # as the worker sees itself (1: PID 1 of its own namespace)
        self.stopped: set[int] = set()  # its processes this evaluator has SIGSTOPped (while another is timed)
        self.confinement = conf = confinement_for(device, sandbox)
        use_ns = conf.namespaces
        cfg = {"device": device, "role": role, "op": op, "workdir": self.workdir,
               "memory_bytes": memory_bytes if device == "cpu" else None, "file_bytes": OUTPUT_CAP,
               "nproc": 1024 if (use_ns and conf.nproc) else None, "landlock": conf.landlock,
               "writable": list(conf.writable)}
        env_extra = {"HOME": self.workdir, "TMPDIR": self.workdir, "TRITON_CACHE_DIR": os.path.join(self.workdir, "triton"),
                     "NUMBA_CACHE_DIR": os.path.join(self.workdir, "numba"),
                     "TORCHINDUCTOR_CACHE_DIR": os.path.join(self.workdir, "inductor"), **ZYGOTE_ENV}
        if backend == "triton" and device == "cpu":
            env_extra["TRITON_INTERPRET"] = "1"
        self._out = open(self.out_path, "wb")
        self.proc: subprocess.Popen[bytes] | zygote.ForkedProcess | None = None
        self.started_by, self.start_note = "exec", ""
        r1, w1 = os.pipe()  # parent -> worker
        r2, w2 = os.pipe()  # worker -> parent
        if device == "cpu" and zygote.enabled():
            # the zygote forks a worker that has imported torch already; it confines itself the same way
            try:
                self.proc = zygote.get(child_env(ZYGOTE_ENV)).spawn(
                    {**cfg, "fd_in": r1, "fd_out": w2}, child_env(env_extra), self.workdir,
                    (r1, w2, self._out.fileno()), use_ns)
                self.started_by = "fork"
            except zygote.Unavailable as e:
                self.start_note = str(e)
                for fd in (r1, w1, r2, w2):  # a fork that did happen late must not share the new worker's wire
                    os.close(fd)
                r1, w1 = os.pipe()
                r2, w2 = os.pipe()
        if self.proc is None:
            cfg.update(fd_in=r1, fd_out=w2)
            argv = [sys.executable, "-m", "kerneltune.evaluate.worker", json.dumps(cfg)]
            if use_ns:
                argv = _wrap_namespaces(argv)
            # killed when this process dies (setpriv's parent-death signal, from a thread that lasts as long as
            # the process): a worker stopped while another is timed would never see its wire close
            argv = _die_with_us() + argv
            out, env = self._out, child_env(env_extra)
            self.proc = zygote.in_lasting_thread(lambda: subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                pass_fds=(r1, w2), start_new_session=True))
        os.close(r1)
        os.close(w2)
        self.fd_out, self.fd_in = w1, r2
        self.namespaces = use_ns
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if memory_bytes:
            self._watcher = threading.Thread(target=self._watch_memory, daemon=True)
            self._watcher.start()

    # -- talking -------------------------------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        """Wait for the worker's hello (raises WorkerDied/WorkerTimeout)."""
        header, _ = self.request(None, timeout=timeout)
        self.worker_pid = header.get("pid")
        self.sandbox_info = {**header.get("sandbox", {}), "start": self.started_by}
        if self.start_note:
            self.sandbox_info["start_note"] = self.start_note

    def request(self, header: dict[str, Any] | None, tensors: dict[str, torch.Tensor] | None = None, *,
                timeout: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        deadline = time.monotonic() + timeout
        try:
            if header is not None:
                protocol.send(self.fd_out, header, tensors)
            return protocol.recv(self.fd_in, deadline)
        except protocol.Timeout:
            self.kill()
            raise WorkerTimeout(timeout) from None
        except (protocol.ProtocolError, BrokenPipeError, OSError) as e:
            death = self.death(str(e))
            raise WorkerDied(death) from None

    # -- ending ----------------------------------------------------------------------------------------------
    def death(self, detail: str = "") -> Death:
        """Why the worker went away (waits briefly for its exit status)."""
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        if self.killed_for:
            return Death(*self.killed_for)
        lost = self.proc.zygote.lost() if isinstance(self.proc, zygote.ForkedProcess) else ""
        if lost:
            return Death("crashed", f"the worker was lost with the zygote process that forked it ({lost}); "
                                    "not necessarily the candidate's doing: evaluate it again")
        tail = self.output_tail()
        sig = None
        if code is not None and code < 0:
            sig = -code
        elif code is not None and code > 128 and self.namespaces:
            sig = code - 128  # unshare reports a child killed by signal N as exit status 128+N
        try:
            signum = signal.Signals(sig) if sig is not None else None
        except ValueError:
            signum = None
        if signum == signal.SIGXFSZ:
            return Death("crashed", f"the candidate wrote more than {OUTPUT_CAP >> 20} MB of output and was stopped")
        if signum is not None:
            word = SIGNAL_WORDS.get(signum, signum.name)
            return Death("crashed", f"the worker died of {signum.name} ({word}) while running the candidate{tail}")
        return Death("crashed", f"the candidate ended the worker process (exit status {code}){tail}")

    def output_tail(self, n: int = 400) -> str:
        try:
            with open(self.out_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - n))
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return f"; last output: {lines[-1][:200]}" if lines else ""

    def pids(self, table: dict[int, Proc] | None = None) -> list[int]:
        """Every process of the worker: its session (it leads one) and every descendant (procfs.tree_pids)."""
        return tree_pids(self.proc.pid, proc_table() if table is None else table)

    def stop(self, table: dict[int, Proc] | None = None) -> bool:
        """SIGSTOP every process of the worker, and look again until each one is seen stopped: a fork racing
        the signal is caught by the next look, and a process whose tracer (another of its processes) swallowed
        the signal gets it again once the tracer is stopped too. A candidate's process still running after
        STOP_WAIT_S ends its worker, and the candidate is rejected: the others' timings must not share the CPUs
        with it. A trusted baseline worker is left as it is instead. False: not every process was stopped."""
        deadline = time.monotonic() + STOP_WAIT_S
        while True:
            table = proc_table() if table is None else table
            running = [p for p in self.pids(table) if not all_threads_stopped(p, p in self.stopped)]
            if not running:
                return True
            if time.monotonic() > deadline:
                if self.role != "baseline":  # a trusted baseline is left running
                    self.killed_for = ("rejected", "a process of the candidate kept running after SIGSTOP (a tracer "
                                                   "of its own resuming it?): nothing of it may run while the "
                                                   "others are timed")
                    self.kill()
                return False
            for pid in running:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except (ProcessLookupError, PermissionError):
                    continue
                self.stopped.add(pid)
            table = None
            time.sleep(0.001)  # the signal lands on a process running on another CPU in microseconds

    def resume(self) -> None:
        """SIGCONT what ``stop`` stopped (nothing else of it can have started meanwhile)."""
        if not self.stopped:
            return
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
        self.stopped.clear()

    def _watch_memory(self) -> None:
        limit = self.memory_bytes or 0
        while not self._watch_stop.wait(0.2):
            if self.stopped:  # stopped for another's timed turn: it grows no more, and the scan would cost CPU
                continue
            rss = 0
            for pid in self.pids():
                if self.namespaces and pid == self.proc.pid:
                    continue  # unshare, or the zygote's in-between process: it waits, and allocates nothing
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, ValueError, IndexError):
                    continue
            if rss > limit * 1.1:
                self.killed_for = ("crashed", f"the candidate's processes used {rss / 2**30:.1f} GiB, over the memory limit of "
                                   f"{limit / 2**30:.1f} GiB (raise it with --memory-limit)")
                self.kill()
                return

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (its session; its PID namespace when used)."""
        for _ in range(3):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        if self.proc.poll() is None and not self.stopped:  # a stopped worker cannot answer: it is killed below
            try:
                protocol.send(self.fd_out, {"cmd": "exit"})
                protocol.recv(self.fd_in, time.monotonic() + 2)
            except Exception:  # noqa: BLE001
                pass
        self.kill()
        self._watch_stop.set()
        for fd in (self.fd_out, self.fd_in):
            try:
                os.close(fd)
            except OSError:
                pass
        self._out.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class WorkerDied(Exception):
    def __init__(self, death: Death) -> None:
        super().__init__(death.reason)
        self.death = death


class WorkerTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:.0f} s")
        self.seconds = seconds
