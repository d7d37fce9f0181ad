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
  worker runs as PID 1 of a namespace of its own, and the process in between reports its exit status
  the way ``unshare`` does (128 + N for a signal);
- then ``worker.main`` applies the same resource limits and Landlock rules as an exec'd worker.

The zygote imports torch, numpy and the op specs, never Triton or numba (they read their settings from
the environment at import) and never CUDA (a CUDA context does not survive ``fork``): GPU workers are
always exec'd. The zygote dies with the evaluator, and its workers die with it. Where anything about it
fails, the parent falls back to exec'ing the worker (``WorkerProcess`` does), and
``KERNELTUNE_WORKER_START=exec`` turns it off.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

_MSG = 1 << 20
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
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    from kerneltune.evaluate import sandbox

    # (getppid() is 0 here: the parent is outside the new PID namespace. Should it die before this line,
    # the parent's kill, which takes every process of the worker's session, takes this one too.)
    sandbox.die_with_parent()
    _libc_call("mount", b"none", b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None)
    _libc_call("mount", b"proc", b"/proc", b"proc", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC), None)


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


def _namespaces_work() -> bool:
    """Can a forked child enter fresh namespaces here (the same syscalls ``unshare`` makes)?"""
    pid = os.fork()
    if pid == 0:
        try:
            _enter_namespaces()
            os._exit(0 if os.getpid() == 1 and os.listdir("/proc") is not None else 3)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def serve(sock: socket.socket) -> None:
    """The zygote's loop: spawn and poll requests from the parent until it goes away."""
    import importlib

    from kerneltune.evaluate import sandbox

    sandbox.die_with_parent()
    for name in PRELOAD:
        importlib.import_module(name)
    from kerneltune.ops import get_op, op_names

    for name in op_names():
        get_op(name)
    leaked = [m for m in NEVER_PRELOADED if m in sys.modules]
    import torch

    if torch.cuda.is_initialized():
        leaked.append("a CUDA context")
    hello = {"ok": not leaked, "pid": os.getpid(), "namespaces": _namespaces_work() if not leaked else False,
             "reason": f"the zygote's imports loaded {', '.join(leaked)}" if leaked else ""}
    sock.send(json.dumps(hello).encode())
    if leaked:
        return
    statuses: dict[int, int | None] = {}
    me = os.getpid()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, _MSG, 8)
        except InterruptedError:
            continue
        if not msg:
            return
        req = json.loads(msg)
        reply: dict[str, Any] = {}
        try:
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
                reply = {"pid": pid}
            elif req["cmd"] == "poll":
                _reap(statuses)
                pid = int(req["pid"])
                reply = {"returncode": statuses.get(pid), "known": pid in statuses}
                if statuses.get(pid) is not None:
                    del statuses[pid]
            else:
                raise ValueError(f"unknown request {req['cmd']!r}")
        except Exception as e:  # noqa: BLE001
            reply = {"error": f"{type(e).__name__}: {e}"}
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
    serve(sock)
    os._exit(0)


# -- the parent's side -----------------------------------------------------------------------------------

class ForkedProcess:
    """What ``WorkerProcess`` needs of ``subprocess.Popen``, for a worker the zygote forked."""

    def __init__(self, zygote: "Zygote", pid: int) -> None:
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
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
    """The parent's handle on one zygote process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.lock = threading.Lock()
        self.workdir = tempfile.mkdtemp(prefix="kerneltune-zygote-")
        os.chmod(self.workdir, 0o700)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self._log = open(os.path.join(self.workdir, "zygote.log"), "wb")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "kerneltune.evaluate.zygote", str(theirs.fileno())],
                                         stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env={**env, "HOME": self.workdir, "TMPDIR": self.workdir},
                                         pass_fds=(theirs.fileno(),), start_new_session=True)
        finally:
            theirs.close()
        self.sock.settimeout(120)
        try:
            hello = json.loads(self.sock.recv(_MSG) or b"{}")
        except (OSError, ValueError) as e:
            self.close()
            raise Unavailable(f"the zygote did not start: {e}") from None
        if not hello.get("ok"):
            self.close()
            raise Unavailable(hello.get("reason") or f"the zygote did not start{self._log_tail()}")
        self.namespaces = bool(hello.get("namespaces"))
        self.sock.settimeout(30)

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.workdir, "zygote.log"), "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1][:200]}" if lines else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _ask(self, req: dict[str, Any], fds: tuple[int, ...] = ()) -> dict[str, Any]:
        with self.lock:
            try:
                socket.send_fds(self.sock, [json.dumps(req).encode()], list(fds))
                raw = self.sock.recv(_MSG)
            except OSError as e:
                raise Unavailable(f"the zygote stopped answering: {e}") from None
        if not raw:
            raise Unavailable("the zygote went away")
        reply = json.loads(raw)
        if "error" in reply:
            raise Unavailable(f"the zygote refused: {reply['error']}")
        return reply

    def spawn(self, cfg: dict[str, Any], env: dict[str, str], cwd: str, fds: tuple[int, int, int],
              namespaces: bool) -> ForkedProcess:
        """Fork a worker; ``fds`` are the worker's wire (in, out) and its output file."""
        if namespaces and not self.namespaces:
            raise Unavailable("the zygote's children cannot enter namespaces here")
        reply = self._ask({"cmd": "spawn", "cfg": cfg, "env": env, "cwd": cwd, "namespaces": namespaces}, fds)
        return ForkedProcess(self, int(reply["pid"]))

    def returncode(self, pid: int) -> int | None:
        try:
            reply = self._ask({"cmd": "poll", "pid": pid})
        except Unavailable:
            return -signal.SIGKILL  # a zygote that is gone took its workers with it
        if not reply.get("known"):
            return -signal.SIGKILL
        return reply.get("returncode")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)


_lock = threading.Lock()
_zygote: Zygote | None = None
_failures: list[str] = []
MAX_STARTS = 3


def enabled() -> bool:
    return os.environ.get("KERNELTUNE_WORKER_START", "fork").strip().lower() != "exec" and sys.platform == "linux"


def _start_in_a_lasting_thread(env: dict[str, str]) -> Zygote:
    """Start a zygote from a daemon thread that lives as long as this process.

    The zygote asks the kernel to kill it when its parent goes (PR_SET_PDEATHSIG), and for the kernel the
    parent is the *thread* that started it: started from a search's evaluation thread, it would die with that
    thread, taking workers of other threads with it."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def start() -> None:
        try:
            box["zygote"] = Zygote(env)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        done.set()
        _forever.wait()

    threading.Thread(target=start, name="kerneltune-zygote", daemon=True).start()
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["zygote"]


_forever = threading.Event()  # never set: the starting threads stay until the process exits


def get(env: dict[str, str]) -> Zygote:
    """This process's zygote, started on first use and again if it died (at most ``MAX_STARTS`` failed starts)."""
    global _zygote
    with _lock:
        if _zygote is not None and _zygote.alive():
            return _zygote
        if _zygote is not None:
            _zygote.close()
            _zygote = None
        if len(_failures) >= MAX_STARTS:
            raise Unavailable(f"the zygote failed {len(_failures)} times (last: {_failures[-1]})")
        try:
            _zygote = _start_in_a_lasting_thread(env)
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
