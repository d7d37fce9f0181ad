"""CUDA C++ backend helpers: find nvcc and compile-check a candidate's ``CUDA_SRC`` without a GPU.

A CUDA candidate defines module-level ``CUDA_SRC`` (kernels + host launchers taking ``at::Tensor``),
``CPP_SRC`` (declarations for ``load_inline``) and ``FUNCTIONS`` (launcher names). On a GPU machine the
candidate builds itself with ``torch.utils.cpp_extension.load_inline`` on its first CUDA call. On a
machine without a GPU, :func:`compile_check` proves the source compiles: it runs ``nvcc -c`` on it with the
include paths and defines torch uses for extensions.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from functools import lru_cache
from pathlib import Path

__all__ = ["nvcc_path", "nvcc_version", "compile_check", "nvcc_command"]


def nvcc_path() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, then PATH, then /usr/local/cuda/bin; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            cand = Path(root) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    found = shutil.which("nvcc")
    if found:
        return found
    cand = Path("/usr/local/cuda/bin/nvcc")
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return None


@lru_cache(maxsize=8)
def _version_of(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def nvcc_version() -> str | None:
    """nvcc's release as "X.Y" (e.g. "13.0"), or None when nvcc is absent or does not answer."""
    path = nvcc_path()
    return _version_of(path) if path else None


# Generated at torch build time and shipped only in CUDA wheels; every c10/cuda header includes it.
_SHIMS = {
    "c10/cuda/impl/cuda_cmake_macros.h": "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n",
}


def _shim_dir(workdir: Path, incs: list[str]) -> str | None:
    """Write the generated headers a CPU-only torch lacks into workdir/_kt_shim; None when none is missing."""
    missing = [rel for rel in _SHIMS if not any((Path(i) / rel).is_file() for i in incs)]
    if not missing:
        return None
    root = workdir / "_kt_shim"
    for rel in missing:
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(_SHIMS[rel])
    return str(root)


def _torch_flags(workdir: Path | None = None) -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths

    incs = list(include_paths())
    flags = []
    for inc in incs:
        flags += ["-I", inc]
    shim = _shim_dir(workdir, incs) if workdir is not None else None
    if shim:
        flags += ["-I", shim]  # searched after torch's own headers
    py_inc = sysconfig.get_paths().get("include")
    if py_inc:
        flags += ["-I", py_inc]
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    flags += [
        "-DTORCH_EXTENSION_NAME=kt_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        # the same half/bf16 operator switches torch's extension builder passes to nvcc
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
    ]
    return flags


def nvcc_command(src: str, obj: str, *, arch: str = "sm_90", nvcc: str | None = None) -> list[str]:
    """The nvcc command line compile_check runs (exposed for logging and provenance)."""
    nvcc = nvcc or nvcc_path() or "nvcc"
    flags = _torch_flags(Path(src).parent)
    return [nvcc, "-std=c++17", f"-arch={arch}", "-O3", "-Xcompiler", "-fPIC", *flags, "-c", src, "-o", obj]


def _tail(text: str, n: int = 30) -> str:
    """Last ~n lines of compiler output, starting at the first error so header warnings don't crowd it out."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    first_err = next((i for i, ln in enumerate(lines) if re.search(r"\berror\b", ln)), None)
    if first_err is not None:
        lines = lines[first_err:]
    return "\n".join(lines[-n:])


def compile_check(cuda_src: str, workdir: str, *, arch: str = "sm_90", timeout: float = 900.0) -> tuple[bool, str]:
    """Compile ``cuda_src`` to an object file with nvcc for ``arch``; no GPU needed.

    Writes ``workdir/candidate.cu`` and runs ``nvcc -std=c++17 -arch=<arch> -c -o candidate.o`` with torch's
    extension include paths, the Python include dir, ``-DTORCH_EXTENSION_NAME=kt_check`` and torch's
    ``_GLIBCXX_USE_CXX11_ABI``. Headers that torch generates at build time and CPU-only wheels lack
    (``c10/cuda/impl/cuda_cmake_macros.h``) are supplied from a shim dir searched after torch's includes,
    so sources using ``c10/cuda/CUDAGuard.h`` etc. compile here too. Returns ``(True, "compiled with nvcc X.Y for <arch>")`` or
    ``(False, "<last ~30 lines of the compiler output>")``.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    src = wd / "candidate.cu"
    obj = wd / "candidate.o"
    src.write_text(cuda_src)
    if obj.exists():
        obj.unlink()
    try:
        cmd = nvcc_command(str(src), str(obj), arch=arch, nvcc=nvcc)
    except Exception as exc:  # torch missing or broken: report, never raise
        return False, f"could not build the nvcc command line: {type(exc).__name__}: {exc}"
    try:
        proc = subprocess.run(cmd, cwd=str(wd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"nvcc timed out after {timeout:.0f} s"
    except OSError as exc:
        return False, f"could not run nvcc: {exc}"
    if proc.returncode != 0 or not obj.exists():
        out = _tail((proc.stdout or "") + "\n" + (proc.stderr or ""))
        return False, out or f"nvcc exited with status {proc.returncode}"
    return True, f"compiled with nvcc {nvcc_version() or '?'} for {arch}"
