"""A fork server for CPU workers: one process that has imported torch forks each worker.

Starting a worker as a fresh interpreter costs an ``import torch`` (about 2.5 s on a 2-core machine), which
dominated the evaluation of a small CPU candidate. The zygote pays it once per evaluator process. Each
worker it forks is confined as before, in the child, before any candidate code exists:

- it is a session leader with its own output file, /dev/null as stdin, and no file descriptor but the
  wire (every descriptor of the zygote, its control socket included, is closed);
- its environment is replaced by the allowlisted one the parent sends (the zygote itself was started
  with that allowlist, so it holds no secret to leak);
- where the parent asks for namespaces it enters fresh user, PID and mount namespaces and mounts its
  own /proc, as ``unshare --user --map-root-user --pid --fork --kill-child --mount-proc`` does: the
  worker runs as PID 1 of a namespace of its own, and the process in between ends the way the worker
  did, as ``unshare`` does (the same exit status, or killed by the same signal);
- then ``worker.main`` applies the same resource limits and Landlock rules as an exec'd worker.

The zygote imports torch, numpy and the op specs, never Triton or numba (they read their settings from
the environment at import) and never CUDA (a CUDA context does not survive ``fork``): GPU workers are
always exec'd. Nor may it have run a parallel CPU op: OpenMP's thread pool does not survive ``fork``
either (a child's first parallel op would hang), so before it says hello the zygote forks a probe that
runs one, and one that enters the namespaces. The zygote dies with the evaluator, and its workers die with it. Where anything about it
fails, the parent falls back to exec'ing the worker (``WorkerProcess`` does), and
``KERNELTUNE_WORKER_START=exec`` turns it off.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

from kerneltune.evaluate import procfs

_MSG = 1 << 20
REQUEST_TIMEOUT = 30.0  # seconds for the zygote to answer a spawn or a poll
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
PRELOAD = ("torch", "numpy", "kerneltune.ops", "kerneltune.evaluate.protocol", "kerneltune.evaluate.sandbox",
           "kerneltune.evaluate.worker")
NEVER_PRELOADED = ("triton", "numba")


class Unavailable(Exception):
    """The zygote cannot start a worker now; the caller execs one instead."""


# -- the zygote process ----------------------------------------------------------------------------------

def _libc_call(name: str, *args: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name} failed: {os.strerror(err)}")


def _enter_namespaces() -> None:
    """Fresh user (this uid as root), PID and mount namespaces, then fork: returns in the child, which is
    PID 1 of the new namespace with its own /proc; the process in between waits and mirrors its status."""
    uid, gid = os.getuid(), os.getgid()
    _libc_call("unshare", _CLONE_NEWUSER | _CLONE_NEWPID | _CLONE_NEWNS)
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)
    pid = os.fork()
    if pid:
        _end_as(pid)
    from kerneltune.evaluate import sandbox

    # (getppid() is 0 here: the parent is outside the new PID namespace. Should it die before this line,
    # the parent's kill, which takes every process of the worker's session, takes this one too.)
    sandbox.die_with_parent()
    _libc_call("mount", b"none", b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None)
    _libc_call("mount", b"proc", b"/proc", b"proc", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC), None)


def _end_as(pid: int) -> None:
    """Wait for ``pid``, then end the way it ended: its exit status, or killed by its signal (no core)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal that does not end a process by default
    os._exit(os.WEXITSTATUS(status))


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _child(req: dict[str, Any], fds: list[int], zygote_pid: int) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        from kerneltune.evaluate import sandbox, worker

        sandbox.die_with_parent()
        if os.getppid() != zygote_pid:
            os._exit(1)
        os.setsid()
        fd_in, fd_out, out = fds
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        _close_fds_except({0, 1, 2, fd_in, fd_out})
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(req["env"])
        tempfile.tempdir = None  # found again from the new TMPDIR, should anything have cached the zygote's
        os.chdir(req["cwd"])
        cfg = {**req["cfg"], "fd_in": fd_in, "fd_out": fd_out}
        if req["namespaces"]:
            _enter_namespaces()
        worker.main(cfg)
        code = 0
    except BaseException:  # noqa: BLE001 - report anything, then end this process, never the zygote's loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _probe(fn: Any, timeout: float = 20.0) -> bool:
    """Does ``fn`` succeed in a forked child within ``timeout`` seconds (a hung child is killed)?"""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if fn() else 3)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.005)


def _in_namespaces() -> bool:
    _enter_namespaces()
    return os.getpid() == 1 and [p for p in os.listdir("/proc") if p.isdigit()] == ["1"]


def _parallel_op() -> bool:
    import torch

    torch.set_num_threads(max(2, torch.get_num_threads()))
    x = torch.ones(1 << 22)
    return float((x * 2).sum()) == float(2 << 22)


def serve(sock: socket.socket, parent: int) -> None:
    """The zygote's loop: spawn and poll requests from the parent until it goes away."""
    import importlib

    from kerneltune.evaluate import sandbox

    here = os.getcwd()  # the zygote's own temporary folder, which it removes when its parent goes

    def parent_gone(*_: Any) -> None:
        shutil.rmtree(here, ignore_errors=True)
        os._exit(0)  # its workers die with it (each asked the kernel to be killed when the zygote goes)

    signal.signal(signal.SIGTERM, parent_gone)
    sandbox.die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:
        parent_gone()
    for name in PRELOAD:
        importlib.import_module(name)
    from kerneltune.ops import get_op, op_names

    for name in op_names():
        get_op(name)
    leaked = [m for m in NEVER_PRELOADED if m in sys.modules]
    import torch

    if torch.cuda.is_initialized():
        leaked.append("a CUDA context")
    if not leaked and not _probe(_parallel_op):
        leaked.append("a thread pool that a forked child cannot use (a parallel op hung or failed in it)")
    hello = {"ok": not leaked, "pid": os.getpid(), "namespaces": _probe(_in_namespaces) if not leaked else False,
             "reason": f"the zygote's imports loaded {', '.join(leaked)}" if leaked else ""}
    sock.send(json.dumps(hello).encode())
    if leaked:
        return
    statuses: dict[int, int | None] = {}  # every child's exit status, kept: a few bytes a worker
    me = os.getpid()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, _MSG, 8)
        except InterruptedError:
            continue
        if not msg:
            return
        reply: dict[str, Any] = {}
        try:
            req = json.loads(msg)
            reply["id"] = req.get("id")
            if req["cmd"] == "spawn":
                if len(fds) != 3:
                    raise ValueError(f"a spawn request carries 3 descriptors, not {len(fds)}")
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    _child(req, fds, me)
                statuses[pid] = None
                reply["pid"] = pid
            elif req["cmd"] == "poll":
                _reap(statuses)
                pid = int(req["pid"])
                reply.update(returncode=statuses.get(pid), known=pid in statuses)
            else:
                raise ValueError(f"unknown request {req['cmd']!r}")
        except Exception as e:  # noqa: BLE001 - a bad request is answered, never the end of the zygote
            reply["error"] = f"{type(e).__name__}: {e}"
        finally:
            for fd in fds:
                os.close(fd)
        _reap(statuses)
        sock.send(json.dumps(reply).encode())


def _reap(statuses: dict[int, int | None]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        statuses[pid] = os.waitstatus_to_exitcode(status)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    serve(sock, int(sys.argv[2]))
    os._exit(0)


# -- the parent's side -----------------------------------------------------------------------------------

class ForkedProcess:
    """What ``WorkerProcess`` needs of ``subprocess.Popen``, for a worker the zygote forked."""

    def __init__(self, zygote: "Zygote", pid: int) -> None:
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None
        self._lock = threading.Lock()  # the memory watch and death() may ask at once

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                self.returncode = self.zygote.returncode(self.pid)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode  # type: ignore[return-value]


class Zygote:
    """The parent's handle on one zygote process. Any request that fails, times out or gets an answer out of
    step ends this zygote (its workers die with it) rather than ever reading one worker's answer as another's."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lock = threading.Lock()
        self.broken = ""
        self._next_id = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = procfs.private_dir("zygote")
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._log = open(os.path.join(self.workdir, "zygote.log"), "wb")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kerneltune.evaluate.zygote", str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
                env={**env, "HOME": self.workdir, "TMPDIR": self.workdir}, pass_fds=(theirs.fileno(),),
                start_new_session=True)
            theirs.close()
            self.sock.settimeout(120)
            hello = json.loads(self.sock.recv(_MSG) or b"{}")
            if not hello.get("ok"):
                raise Unavailable(hello.get("reason") or f"the zygote did not start{self._log_tail()}")
        except (OSError, ValueError, Unavailable) as e:
            theirs.close()
            self.close()
            raise e if isinstance(e, Unavailable) else Unavailable(f"the zygote did not start: {e}") from None
        self.namespaces = bool(hello.get("namespaces"))
        self.sock.settimeout(REQUEST_TIMEOUT)

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.workdir, "zygote.log"), "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1][:200]}" if lines else ""

    def lost(self) -> str:
        """Why this zygote is gone ('' while it runs): its workers went with it."""
        if self.broken:
            return self.broken
        if self.proc is None or self.proc.poll() is not None:
            return "the zygote process died"
        return ""

    def alive(self) -> bool:
        return not self.lost()

    def _ask(self, req: dict[str, Any], fds: tuple[int, ...] = ()) -> dict[str, Any]:
        with self.lock:
            if self.broken:
                raise Unavailable(self.broken)
            self._next_id += 1
            req = {**req, "id": self._next_id}
            try:
                socket.send_fds(self.sock, [json.dumps(req).encode()], list(fds))
                raw = self.sock.recv(_MSG)
                reply = json.loads(raw) if raw else None
                if reply is None:
                    raise OSError("the zygote went away")
                if reply.get("id") != req["id"]:
                    raise OSError(f"answer {reply.get('id')} to request {req['id']}")
            except (OSError, ValueError) as e:  # socket.timeout is an OSError
                self.broken = f"the zygote stopped answering ({e}); it was ended, with its workers"
                self._end()
                raise Unavailable(self.broken) from None
        if "error" in reply:
            raise Unavailable(f"the zygote refused a request: {reply['error']}")
        return reply

    def spawn(self, cfg: dict[str, Any], env: dict[str, str], cwd: str, fds: tuple[int, int, int],
              namespaces: bool) -> ForkedProcess:
        """Fork a worker; ``fds`` are the worker's wire (in, out) and its output file."""
        if namespaces and not self.namespaces:
            raise Unavailable("the zygote's children cannot enter namespaces here")
        reply = self._ask({"cmd": "spawn", "cfg": cfg, "env": env, "cwd": cwd, "namespaces": namespaces}, fds)
        try:
            return ForkedProcess(self, int(reply["pid"]))
        except (KeyError, TypeError, ValueError):
            raise Unavailable(f"the zygote answered a spawn without a pid: {reply}") from None

    def returncode(self, pid: int) -> int | None:
        try:
            reply = self._ask({"cmd": "poll", "pid": pid})
        except Unavailable:
            return -signal.SIGKILL  # a zygote that is gone took its workers with it
        if not reply.get("known"):
            return -signal.SIGKILL
        return reply.get("returncode")

    def _end(self) -> None:
        """Kill the zygote (its workers die with it: each asked the kernel for that)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.broken = self.broken or "the zygote was closed"
        try:
            self.sock.close()
        except OSError:
            pass
        self._end()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


_lock = threading.Lock()
_zygote: Zygote | None = None
_failures: list[str] = []
MAX_FAILED_STARTS = 3  # then every worker of this process is exec'd
MAX_STARTS = 20  # a zygote that keeps dying is not worth starting again
_starts = 0


def enabled() -> bool:
    return os.environ.get("KERNELTUNE_WORKER_START", "fork").strip().lower() != "exec" and sys.platform == "linux"


def in_lasting_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` in a daemon thread that lives as long as this process, and return what it returns (or raise
    what it raised). For the kernel, the parent of a child is the *thread* that started it, and a child's
    PR_SET_PDEATHSIG fires when that thread ends: a child started from a search's evaluation thread would die
    with that thread. Started here, the zygote and exec'd workers die with the process, and only then."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = queue.Queue()
            threading.Thread(target=_serve, args=(_spawner,), name="kerneltune-spawner", daemon=True).start()
        q = _spawner
    box: dict[str, Any] = {}
    done = threading.Event()
    q.put((fn, box, done))
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _serve(q: "queue.Queue[tuple[Callable[[], Any], dict[str, Any], threading.Event]]") -> None:
    while True:
        fn, box, done = q.get()
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        done.set()


_spawner: "queue.Queue[Any] | None" = None
_spawner_lock = threading.Lock()  # not _lock: get() holds that while it starts a zygote here


def get(env: dict[str, str]) -> Zygote:
    """This process's zygote, started on first use and again if it died (at most ``MAX_STARTS`` starts and
    ``MAX_FAILED_STARTS`` failed ones)."""
    global _zygote, _starts
    with _lock:
        if _zygote is not None and _zygote.alive():
            return _zygote
        if _zygote is not None:
            _zygote.close()
            _zygote = None
        if len(_failures) >= MAX_FAILED_STARTS:
            raise Unavailable(f"the zygote failed to start {len(_failures)} times (last: {_failures[-1]})")
        if _starts >= MAX_STARTS:
            raise Unavailable(f"the zygote was started {_starts} times in this process; no more")
        _starts += 1
        try:
            _zygote = in_lasting_thread(lambda: Zygote(env))
        except (Unavailable, OSError) as e:
            _failures.append(str(e))
            raise Unavailable(str(e)) from None
        return _zygote


def current_pid() -> int | None:
    """The pid of this process's zygote while one runs."""
    z = _zygote
    return z.proc.pid if z is not None and z.alive() else None


def shutdown() -> None:
    global _zygote
    with _lock:
        if _zygote is not None:
            _zygote.close()
            _zygote = None


atexit.register(shutdown)


if __name__ == "__main__":
    main()
