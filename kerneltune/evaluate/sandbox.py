"""Confinement of a worker process, applied by the worker to itself before it reads a candidate.

Layers (each reported by ``kerneltune doctor``):
- resource limits: address space (CPU runs), file size, core dumps, process count;
- Landlock (Linux >= 5.13): the file system is read-only except the worker's own temporary directory
  and /dev, so a candidate cannot write the store, the registry or anything else; with ABI >= 4 no TCP
  connect or bind; with ABI >= 6 no signals to processes outside the sandbox; Landlock also refuses
  ptrace-style access (e.g. /proc/<pid>/environ) to processes outside it;
- the parent runs the worker in fresh user and PID namespaces where ``unshare`` allows it, so the
  process-count limit applies even to root and every process the candidate starts dies with the worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import struct
from typing import Any

_FS_BITS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1}  # up to MAKE_SYM / REFER / TRUNCATE
_READ_ONLY = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE | READ_FILE | READ_DIR
_NET_TCP = (1 << 0) | (1 << 1)  # BIND_TCP | CONNECT_TCP
_SCOPE = (1 << 0) | (1 << 1)  # ABSTRACT_UNIX_SOCKET | SIGNAL
_SYS_CREATE, _SYS_ADD, _SYS_RESTRICT = 444, 445, 446
_PR_SET_NO_NEW_PRIVS, _PR_SET_PDEATHSIG = 38, 1


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is not available."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return 0
    try:
        r = _libc().syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(int(r), 0)


def apply_landlock(writable: list[str], max_abi: int | None = None) -> int:
    """Make the file system read-only except ``writable``; block TCP and outside signals where the ABI
    allows (``max_abi`` caps the features used). Returns the ABI used (0: not applied)."""
    abi = landlock_abi()
    if max_abi is not None:
        abi = min(abi, max_abi)
    if abi <= 0:
        return 0
    libc = _libc()
    fs = _FS_BITS_BY_ABI.get(abi, (1 << 15) - 1)
    fields = [fs]
    if abi >= 4:
        fields.append(_NET_TCP)
    if abi >= 6:
        fields.append(_SCOPE)
    attr = struct.pack(f"<{len(fields)}Q", *fields)
    fd = libc.syscall(_SYS_CREATE, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        for path, access in [("/", _READ_ONLY & fs), *[(p, fs) for p in writable]]:
            if not os.path.exists(path):
                continue
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("<Qi", access, pfd)
                if libc.syscall(_SYS_ADD, ctypes.c_int(fd), ctypes.c_int(1), ctypes.c_char_p(rule),
                                ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
            finally:
                os.close(pfd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_RESTRICT, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(fd)
    return abi


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send this process ``sig`` (SIGKILL) when its parent dies (Linux)."""
    try:
        _libc().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_limits(memory_bytes: int | None, file_bytes: int, nproc: int | None) -> None:
    """Resource limits for this process and what it starts."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def apply(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything above, as the worker's config asks. Returns what was applied (for provenance)."""
    die_with_parent()
    set_limits(cfg.get("memory_bytes"), cfg.get("file_bytes", 512 << 20), cfg.get("nproc"))
    abi = 0
    if cfg.get("landlock", True):
        abi = apply_landlock([cfg["workdir"], "/dev", *cfg.get("writable", [])], cfg.get("landlock_max_abi"))
    return {"landlock_abi": abi, "memory_bytes": cfg.get("memory_bytes"), "nproc": cfg.get("nproc")}
