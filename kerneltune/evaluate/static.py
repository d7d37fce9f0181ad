"""Reading a candidate file without running it: its metadata, its hash, and the checks that need no
execution (syntax, the KERNELTUNE dict, imports, forbidden calls)."""

from __future__ import annotations

import ast
import hashlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from kerneltune.backends import BACKENDS
from kerneltune.ops import get_op, op_names

ALLOWED_IMPORTS = {"torch", "triton", "numba", "numpy"}
# stdlib modules a kernel has no business with: they reach the evaluator, the network or other processes
DENIED_STDLIB = {"gc", "inspect", "socket", "ssl", "http", "urllib", "ftplib", "smtplib", "telnetlib", "pty",
                 "signal", "sqlite3", "multiprocessing", "subprocess", "pickle", "marshal", "shelve", "dbm",
                 "tracemalloc", "pdb", "bdb", "sys.monitoring", "resource", "faulthandler"}
# Introspection that walks to the caller or patches the interpreter: never needed by a kernel.
FORBIDDEN_ANYWHERE = {
    "_getframe": "walks the caller's frames",
    "f_back": "walks the caller's frames",
    "f_locals": "reads another frame's variables",
    "settrace": "installs a trace hook on the evaluator",
    "setprofile": "installs a profile hook on the evaluator",
    "get_referrers": "walks the garbage collector",
}


class StaticReject(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class CandidateFile:
    path: str | None
    name: str
    source: str
    hash: str
    meta: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    @property
    def op(self) -> str:
        return str(self.meta.get("op", ""))

    @property
    def backend(self) -> str:
        return str(self.meta.get("backend", ""))


def source_hash(source: str, params: dict[str, Any] | None = None) -> str:
    h = hashlib.sha256(source.encode())
    if params:
        h.update(repr(sorted(params.items())).encode())
    return h.hexdigest()


def guess_meta(source: str) -> dict[str, Any]:
    """The op and backend a file that does not parse says it has (to file its verdict under)."""
    import re

    meta: dict[str, Any] = {}
    for key in ("op", "backend"):
        m = re.search(rf"[\"']{key}[\"']\s*:\s*[\"'](\w+)[\"']", source)
        if m:
            meta[key] = m.group(1)
    return meta


def read_candidate(path: str) -> CandidateFile:
    """Read a file; raise StaticReject for unreadable ones (the verdict keeps the path)."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except FileNotFoundError:
        raise StaticReject("compile_error", f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise StaticReject("compile_error", f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise StaticReject("compile_error", f"{path}: cannot read ({e.strerror})") from None
    name = os.path.splitext(os.path.basename(path))[0]
    return CandidateFile(path=path, name=name, source=source, hash=source_hash(source))


def inspect_source(cand: CandidateFile) -> None:
    """Fill ``cand.meta`` and ``cand.summary``, or raise StaticReject with the verdict."""
    try:
        tree = ast.parse(cand.source, filename=cand.path or cand.name)
    except SyntaxError as e:
        raise StaticReject("compile_error", f"syntax error at line {e.lineno}: {e.msg}") from None
    cand.summary = (ast.get_docstring(tree) or "").strip().splitlines()[0] if ast.get_docstring(tree) else ""
    meta = None
    has_run = False
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            targets = [node.target.id]
        if "KERNELTUNE" in targets:
            try:
                meta = literal(node.value)  # type: ignore[arg-type]
            except ValueError:
                raise StaticReject("rejected", "KERNELTUNE must be a literal dict (no expressions), e.g. "
                                               "{\"op\": \"attention\", \"backend\": \"triton\"}") from None
        if "run" in targets or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "run"):
            has_run = True
    if not isinstance(meta, dict):
        raise StaticReject("rejected", "no KERNELTUNE dict: add KERNELTUNE = {\"op\": ..., \"backend\": ...} at "
                                       "module level")
    op, backend = meta.get("op"), meta.get("backend")
    if op not in op_names():
        raise StaticReject("rejected", f"KERNELTUNE['op'] is {op!r}: use one of {', '.join(op_names())}")
    if backend not in BACKENDS:
        raise StaticReject("rejected", f"KERNELTUNE['backend'] is {backend!r}: use one of {', '.join(BACKENDS)}")
    if not has_run:
        raise StaticReject("rejected", "the candidate defines no run() at module level")
    cand.meta = meta
    cand.hash = source_hash(cand.source, meta.get("params"))
    _check_imports(tree)
    _check_forbidden(cand.source, get_op(op))


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.LShift: lambda a, b: a << b, ast.Pow: lambda a, b: a**b, ast.FloorDiv: lambda a, b: a // b}


def literal(node: ast.AST) -> Any:
    """ast.literal_eval plus integer arithmetic between constants (``1 << 16``, ``64 * 1024``): what a knob
    table needs, and nothing that runs code."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = literal(node.left), literal(node.right)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            raise ValueError("arithmetic on non-numbers")
        if isinstance(node.op, (ast.Pow, ast.LShift)) and abs(b) > 64:
            raise ValueError("exponent too large")
        return _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.Dict):
        return {literal(k): literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items) if isinstance(node, ast.Tuple) else set(items)
    return ast.literal_eval(node)


def _check_imports(tree: ast.AST) -> None:
    stdlib = set(getattr(sys, "stdlib_module_names", ())) - DENIED_STDLIB
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise StaticReject("rejected", f"line {node.lineno}: relative import; a candidate is one "
                                               "self-contained file")
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if top in DENIED_STDLIB or name in DENIED_STDLIB:
                raise StaticReject("rejected", f"line {node.lineno}: imports {name}, which a kernel has no use "
                                               "for (it reaches the evaluator, other processes or the network)")
            if top not in ALLOWED_IMPORTS and top not in stdlib:
                raise StaticReject("rejected", f"line {node.lineno}: imports {name}; candidates may import only "
                                               "the standard library, torch, triton, numba and numpy")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "kerneltune" in node.value \
                and not _is_docstring(tree, node):
            raise StaticReject("rejected", f"line {node.lineno}: names kerneltune in code; a candidate may not "
                                           "reach the evaluator's own modules")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            raise StaticReject("rejected", f"line {node.lineno}: __import__(); import modules with a plain import")


def _is_docstring(tree: ast.AST, node: ast.Constant) -> bool:
    for owner in ast.walk(tree):
        if isinstance(owner, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = owner.body
            if body and isinstance(body[0], ast.Expr) and body[0].value is node:
                return True
    return False


def _check_forbidden(source: str, spec: Any) -> None:
    for needle in spec.forbidden_source:
        if needle in source:
            line = source[: source.index(needle)].count("\n") + 1
            raise StaticReject("rejected", f"line {line}: mentions {needle!r}: {spec.name} candidates may not call "
                                           "the baseline or the reference (the file may not even name it)")
    for needle, why in FORBIDDEN_ANYWHERE.items():
        if needle in source:
            line = source[: source.index(needle)].count("\n") + 1
            raise StaticReject("rejected", f"line {line}: uses {needle!r}, which {why}; kernels never need it")
