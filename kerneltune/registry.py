"""The registry of winners: which promoted kernel serves an op on a device, shape bucket and dtype.

A registry is one JSON file (``FORMAT`` 1)::

    {"format": 1, "kerneltune": "0.1.0", "candidates_root": "candidates",
     "entries": [{"op": "attention", "device_key": "cuda:nvidia-h100-80gb-hbm3:sm90", "device_name": "...",
                  "dtype": "bfloat16", "dims": {"B": 8, "H": 16, "N": 2048, "D": 128}, "args": {"causal": true},
                  "bucket": "D128 N2048 BH128", "candidate": "attention/triton_flash-1a2b3c4d.py",
                  "name": "triton_flash-1a2b3c4d", "backend": "triton", "source_hash": "<sha256>",
                  "params": {...}, "baseline": "sdpa", "speedup": 1.31, "p20_ms": ..., "median_ms": ...,
                  "p80_ms": ..., "versions": {...}, "timestamp": "...", "provenance": {...}}]}

``candidate`` is relative to the registry's candidates root: ``candidates_root`` (relative to the JSON
file), by default ``candidates/`` beside it; for the registry shipped in the package, the shipped
candidates (``kerneltune/candidates/`` in an installed wheel, ``candidates/`` in a source checkout).

Lookup (``Registry.decide``), for an op called on a device with some dims and dtype:
exact entry (same device key, op, dtype, args and shape bucket) -> same device, nearest bucket within
reach (``NEAREST_REACH``: attention, the same head dim and two octaves of N and B*H) -> the reference.
Only entries recorded for this device key, whose backend runs on this device kind, whose measured speedup
is at least the minimum (1.0, or ``$KERNELTUNE_MIN_SPEEDUP``) and whose candidate file still hashes to the
source that passed, are ever chosen; a bucket whose own measurements are all below
the minimum gets the reference (a faster bucket elsewhere is no evidence for it). Among entries equally
placed (the exact bucket, or nearest buckets at one distance) a user registry's (``$KERNELTUNE_REGISTRY``) comes
before the shipped one's, then the higher speedup. A CUDA call looks at the entries of its own GPU's key.
A corrupt file warns once and counts as empty; a malformed entry (a missing field, a speedup that is not a
finite positive number) warns once and is left out, the file's other entries kept.
"""

from __future__ import annotations

import ast
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Iterable

FORMAT = 1
ENV_REGISTRY = "KERNELTUNE_REGISTRY"
ENV_MIN_SPEEDUP = "KERNELTUNE_MIN_SPEEDUP"
ENV_DISABLE = "KERNELTUNE_DISABLE"
DEFAULT_MIN_SPEEDUP = 1.0

# The provenance header `kerneltune promote` puts above a promoted source. Everything up to and including
# HEADER_END is not part of the evaluated source; the rest is byte for byte what passed.
HEADER_START = "# --- kerneltune promote: provenance ---"
HEADER_END = "# --- end of provenance: the evaluated source follows, unchanged ---"


class KernelTuneWarning(UserWarning):
    """Something in the registry is wrong (a corrupt file, a missing candidate …); the reference serves."""


class RegistryError(ValueError):
    """A registry cannot be written, or an entry is malformed; the message names the file and field."""


def warn(msg: str) -> None:
    warnings.warn(msg, KernelTuneWarning, stacklevel=3)


# -- devices ---------------------------------------------------------------------------------------------
def device_kind(device: Any) -> str:
    """'cpu' or 'cuda' for 'cpu', 'cuda', 'cuda:1' or a torch.device."""
    kind = getattr(device, "type", None) or str(device).split(":", 1)[0].lower()
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: kerneltune knows cpu and cuda")
    return kind


def device_key(device: Any) -> str:
    """The normalised key of this machine's ``device`` ('cpu', 'cuda', 'cuda:1', a torch.device): CPU model and
    threads, or the name and compute capability of that very GPU (the key the evaluator stores with every
    measurement). A CUDA device without an index is the current device, as torch places a tensor made on it."""
    from kerneltune.evaluate.device import device_info

    kind = device_kind(device)
    if kind == "cuda":
        return str(device_info(f"cuda:{_cuda_index(device)}")["key"])
    return str(device_info(kind)["key"])


def _cuda_index(device: Any) -> int:
    """The index of a CUDA device ('cuda', 'cuda:1', torch.device('cuda', 1)); none given: the current device."""
    index = getattr(device, "index", None) if not isinstance(device, str) else None
    if isinstance(device, str) and ":" in device:
        try:
            index = int(device.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"device {device!r}: not a CUDA device index") from None
    if index is None:
        import torch

        index = torch.cuda.current_device()
    return int(index)


def _as_key(device: Any) -> str:
    """A device key from a device ('cpu', 'cuda:0', torch.device) or a key given as such."""
    if isinstance(device, str) and device.count(":") >= 2:
        return device
    return device_key(device)


def _key_kind(key: str) -> str:
    return key.split(":", 1)[0]


# -- buckets ---------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def norm_dims(op: str, dims: dict[str, Any]) -> dict[str, Any]:
    """The dims a registry entry records: attention B, H, N, D; adamw numel and tensors (not every shape)."""
    if op.startswith("adamw") and "shapes" in dims:
        shapes = dims["shapes"]
        return {"numel": sum(math.prod(s) for s in shapes), "tensors": len(shapes)}
    return dict(dims)


def bucket(op: str, dims: dict[str, Any]) -> str:
    """The shape bucket of ``dims``: attention 'D{D} N{pow2(N)} BH{pow2(B*H)}', adamw 'P{pow2(numel)}'."""
    d = norm_dims(op, dims)
    if op.startswith("attention") and all(x in d for x in "BHND"):
        return f"D{d['D']} N{_pow2(d['N'])} BH{_pow2(d['B'] * d['H'])}"
    if op.startswith("adamw") and "numel" in d:
        return f"P{_pow2(d['numel'])}"
    return json.dumps(d, sort_keys=True)


def distance(op: str, a: dict[str, Any], b: dict[str, Any]) -> float:
    """How far apart two shapes are for serving purposes (0 = same bucket), in octaves; D counts double."""
    a, b = norm_dims(op, a), norm_dims(op, b)

    def octaves(x: float, y: float) -> float:
        return abs(math.log2(max(x, 1) / max(y, 1)))

    try:
        if op.startswith("attention"):
            return (octaves(a["N"], b["N"]) + octaves(a["B"] * a["H"], b["B"] * b["H"])
                    + 2 * octaves(a["D"], b["D"]))
        if op.startswith("adamw"):
            return octaves(a["numel"], b["numel"]) + 0.5 * octaves(a["tensors"], b["tensors"])
    except (KeyError, TypeError):
        pass
    return 0.0 if a == b else math.inf


# How far a nearest bucket may be from the call for its entry to serve, per op family (None: any distance).
# An attention kernel's standing against SDPA moves with the shape (on the H100, one kernel's ratio to cuDNN
# ran from 0.62x to 1.02x over the 24 shapes), so a winner serves only shapes of its own head dim
# within two octaves of N and B*H together; AdamW is a stream over the parameters, and any size takes it.
NEAREST_REACH: dict[str, float | None] = {"attention": 2.0, "adamw": None}


def _reach(op: str) -> float | None:
    """NEAREST_REACH of ``op``'s family (attention_backward is attention's)."""
    return NEAREST_REACH.get("attention" if op.startswith("attention") else op.split("_")[0])


def within_reach(op: str, measured: dict[str, Any], asked: dict[str, Any]) -> bool:
    """Whether an entry measured at ``measured`` may serve ``asked`` as the nearest bucket."""
    reach = _reach(op)
    if reach is None:
        return True
    a, b = norm_dims(op, measured), norm_dims(op, asked)
    if op.startswith("attention") and a.get("D") != b.get("D"):
        return False
    return distance(op, a, b) <= reach


def _reach_text(op: str) -> str:
    same_d = " at the same head dim" if op.startswith("attention") else ""
    return f"a nearest bucket serves within {_reach(op):g} octaves of N and B*H{same_d}"


def _dtype(dtype: Any) -> str:
    """'float32' for torch.float32, 'fp32', 'float32' …; other dtypes by their own name ('float64')."""
    from kerneltune.ops.base import dtype_name

    name = str(dtype).removeprefix("torch.")
    try:
        return dtype_name(name)
    except ValueError:
        return name


def _args_key(args: dict[str, Any] | None) -> str:
    return json.dumps(args, sort_keys=True) if args else "{}"


# -- entries ---------------------------------------------------------------------------------------------
@dataclass
class Entry:
    op: str
    device_key: str
    device_name: str
    dtype: str
    dims: dict[str, Any]
    args: dict[str, Any]
    bucket: str
    candidate: str                # relative to the registry's candidates root (or absolute)
    source_hash: str              # the hash of the source that passed (kerneltune.evaluate.static.source_hash)
    params: dict[str, Any]
    baseline: str
    speedup: float                # baseline median / candidate median, measured in one run
    p20_ms: float | None = None
    median_ms: float | None = None
    p80_ms: float | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    timestamp: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    name: str = ""                # the kernel's name in served() and explain; default: the file stem
    backend: str = ""
    root: str = field(default="", repr=False, compare=False)     # candidates root it resolves against
    source: str = field(default="", repr=False, compare=False)   # the registry file it came from

    def __post_init__(self) -> None:
        if not self.name:
            self.name = os.path.splitext(os.path.basename(self.candidate))[0]

    @property
    def path(self) -> str:
        """The absolute path of the candidate file (kept while root and candidate stay: a served kernel's
        identity, asked on every call)."""
        kept = self.__dict__.get("_path")
        if kept is not None and kept[0] == self.root and kept[1] == self.candidate:
            return kept[2]
        path = (self.candidate if os.path.isabs(self.candidate)
                else os.path.normpath(os.path.join(self.root, self.candidate)))
        self.__dict__["_path"] = (self.root, self.candidate, path)
        return path

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.op, self.device_key, self.dtype, _args_key(self.args), self.bucket)

    def describe(self) -> str:
        what = " ".join(x for x in (self.op, self.bucket, self.dtype, _args_text(self.args)) if x)
        return f"{self.name} ({self.backend or '?'}) for {what} on {self.device_key}: {self.speedup:.3g}× vs {self.baseline}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        d.pop("source")
        return d

    @classmethod
    def from_json(cls, d: Any, *, root: str = "", source: str = "", where: str = "") -> "Entry":
        if not isinstance(d, dict):
            raise RegistryError(f"{where}: an entry must be a JSON object")
        known = {f.name for f in fields(cls)} - {"root", "source"}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise RegistryError(f"{where}: missing field(s) {', '.join(missing)}; remove that entry or re-promote "
                                "its kernel with `kerneltune promote`")
        speedup = d["speedup"]
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup) \
                or speedup <= 0:
            # NaN compares False with everything (no minimum, no regression gate would ever apply to it) and an
            # infinite one would outrank every other entry: a speedup is a measured ratio of two times
            raise RegistryError(f"{where}: speedup {speedup!r} is not a finite positive number (baseline median / "
                                "kernel median); remove that entry or re-promote its kernel with `kerneltune promote`")
        try:
            e = cls(**{k: v for k, v in d.items() if k in known}, root=root, source=source)
            e.speedup = float(e.speedup)
        except (TypeError, ValueError) as ex:
            raise RegistryError(f"{where}: malformed entry ({ex})") from None
        if not isinstance(e.dims, dict) or not isinstance(e.args, dict) or not isinstance(e.params, dict):
            raise RegistryError(f"{where}: dims, args and params must be JSON objects")
        return e


def _args_text(args: dict[str, Any]) -> str:
    if "causal" in args:
        return "causal" if args["causal"] else "full"
    return " ".join(f"{k}={v}" for k, v in sorted(args.items()))


# -- candidate files -------------------------------------------------------------------------------------
def strip_header(text: str) -> str:
    """The evaluated source of a promoted file (the file itself when it has no provenance header)."""
    if text.startswith(HEADER_START):
        i = text.find(HEADER_END)
        if i >= 0:
            return text[i + len(HEADER_END):].removeprefix("\n")
    return text


def with_header(source: str, lines: Iterable[str]) -> str:
    body = "".join(f"# {ln}\n" for ln in lines)
    return f"{HEADER_START}\n{body}{HEADER_END}\n{source}"


def file_meta(text: str) -> dict[str, Any]:
    """The KERNELTUNE literal of a candidate source ({} when it has none that parses)."""
    from kerneltune.evaluate.static import literal

    try:
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "KERNELTUNE"
                                                    for t in node.targets):
                meta = literal(node.value)
                return meta if isinstance(meta, dict) else {}
    except (SyntaxError, ValueError):
        pass
    return {}


def file_hash(text: str) -> str:
    """The evaluator's hash of a candidate source (its KERNELTUNE params included)."""
    from kerneltune.evaluate.static import source_hash

    return source_hash(text, file_meta(text).get("params"))


# (path, mtime, size) -> (the hash of the evaluated source in the file, or None; why it cannot be read). The
# file's hash is kept, not a verdict: entries naming one file may record different source hashes.
_FILE_HASHES: dict[tuple[str, int, int], tuple[str | None, str]] = {}


def check_file(entry: Entry) -> str:
    """'' when the entry's candidate file is there and is the source that passed; else why not (one line)."""
    path = entry.path
    try:
        st = os.stat(path)
    except OSError:
        return f"candidate file {path} is missing (registry {entry.source or '?'}); re-promote it or remove the entry"
    key = (path, st.st_mtime_ns, st.st_size)
    kept = _FILE_HASHES.get(key)
    if kept is None:
        try:
            with open(path, encoding="utf-8") as f:
                kept = (file_hash(strip_header(f.read())), "")
        except (OSError, UnicodeDecodeError) as e:
            kept = (None, f"candidate file {path} cannot be read ({e}); re-promote it")
        _FILE_HASHES[key] = kept
    digest, unreadable = kept
    if digest is None:
        return unreadable
    if digest != entry.source_hash:
        return (f"candidate file {path} changed since it was promoted (its hash is not source_hash "
                f"{str(entry.source_hash)[:12]}); re-evaluate and re-promote it")
    return ""


# -- where registries live -------------------------------------------------------------------------------
def shipped_path() -> str:
    """The registry shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "registry.json")


def shipped_candidates_dir() -> str:
    """kerneltune/candidates/ in an installed wheel; candidates/ beside the package in a source checkout."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(pkg, "candidates")
    if os.path.isdir(inside):
        return inside
    return os.path.join(os.path.dirname(pkg), "candidates")


def candidates_root(registry_path: str, declared: str | None = None) -> str:
    """Where a registry's relative candidate paths point."""
    path = os.path.abspath(registry_path)
    if path == shipped_path() and not declared:
        return shipped_candidates_dir()
    return os.path.normpath(os.path.join(os.path.dirname(path), declared or "candidates"))


def min_speedup() -> float:
    raw = os.environ.get(ENV_MIN_SPEEDUP, "").strip()
    if not raw:
        return DEFAULT_MIN_SPEEDUP
    try:
        return float(raw)
    except ValueError:
        _warn_once(f"${ENV_MIN_SPEEDUP}={raw!r} is not a number; using {DEFAULT_MIN_SPEEDUP}")
        return DEFAULT_MIN_SPEEDUP


def disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warn(msg)


# -- the registry ----------------------------------------------------------------------------------------
@dataclass
class Decision:
    """What serves a call: ``entry`` (None = the reference), ``kind`` ('exact', 'nearest', 'reference'),
    ``reason`` (one line, for explain and logs) and ``warning`` (set when something is wrong and a user
    should hear about it: a missing or changed candidate file, entries only for another device …)."""

    entry: Entry | None
    kind: str
    reason: str
    warning: str | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass
class Source:
    """One registry file as read: ``root`` its candidates root (``candidates_root`` the value the file declares,
    written back by ``Registry.save``), ``entries`` how many entries were read, ``error`` what is wrong with it
    ('' when nothing), ``rejected`` the malformed entries left out (index, why, and op, device_key, name when
    the entry has them)."""

    path: str
    root: str
    entries: int = 0
    error: str = ""
    candidates_root: str | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)


class Registry:
    def __init__(self, entries: list[Entry] | None = None, sources: list[Source] | None = None) -> None:
        self.entries: list[Entry] = list(entries or [])
        self.sources: list[Source] = list(sources or [])

    def for_device(self, device_key: str) -> list[Entry]:
        return [e for e in self.entries if e.device_key == device_key]

    def lookup(self, op: str, device: Any, dims: dict[str, Any], dtype: str,
               args: dict[str, Any] | None = None) -> tuple[Entry | None, str]:
        """(the entry that would serve, or None for the reference; why)."""
        d = self.decide(op, device, dims, dtype, args)
        return d.entry, d.reason

    def servable(self, ops: tuple[str, ...], device: Any, dtype: str, args: dict[str, Any] | None = None
                 ) -> list[Entry]:
        """The entries ``decide`` could serve for one of ``ops`` at some shape on this device, dtype and
        arguments: whose backend runs here, at or above the minimum speedup, whose file is intact (what decide
        asks of an entry, short of the shape's bucket and reach)."""
        if disabled():
            return []
        key, want, floor = _as_key(device), _args_key(args), min_speedup()
        kind, dtype = _key_kind(key), _dtype(dtype)
        return [e for e in self.entries
                if e.op in ops and e.device_key == key and e.dtype == dtype and _args_key(e.args) == want
                and _runs_on(e.backend, kind) and e.speedup >= floor and not check_file(e)]

    def decide(self, op: str, device: Any, dims: dict[str, Any], dtype: str, args: dict[str, Any] | None = None,
               *, minimum: float | None = None, check_files: bool = True) -> Decision:
        """The full decision for a call; see the module docstring for the order."""
        key = _as_key(device)
        kind = _key_kind(key)
        dtype = _dtype(dtype)
        want_args = _args_key(args)
        asked = " ".join(x for x in (bucket(op, dims), dtype, _args_text(args or {})) if x)
        if disabled():
            return Decision(None, "reference", f"${ENV_DISABLE} is set: the reference serves every call")
        mine = [e for e in self.entries if e.op == op]
        if not mine:
            return Decision(None, "reference", f"no registry entry for {op}: the reference serves")
        here = [e for e in mine if e.device_key == key]
        if not here:
            others = sorted({e.device_key for e in mine})
            msg = (f"the registry holds {op} kernels only for other devices ({', '.join(others)}), not for this "
                   f"one ({key}): the reference serves")
            # the shipped registry holds other machines' winners by design; a user registry without one entry
            # for the device it is used on is probably the wrong registry: say so
            shipped = os.path.abspath(shipped_path())
            mistaken = any(os.path.abspath(e.source or "") != shipped for e in mine)
            return Decision(None, "reference", msg, warning=msg if mistaken else None)
        fits = [e for e in here if e.dtype == dtype and _args_key(e.args) == want_args]
        if not fits:
            have = sorted({f"{e.dtype} {_args_text(e.args)}".strip() for e in here})
            what = " ".join(x for x in (dtype, _args_text(args or {})) if x)
            return Decision(None, "reference", f"no {op} entry for {what} on {key} (entries: {'; '.join(have)}): "
                                               "the reference serves")
        floor = min_speedup() if minimum is None else minimum
        skipped: list[str] = []
        problems: list[str] = []
        eligible = []
        for e in fits:
            if not _runs_on(e.backend, kind):
                problems.append(f"{e.name}: backend {e.backend!r} cannot run on {kind} (registry {e.source})")
            elif not e.speedup >= floor:
                skipped.append(f"{e.name} at {e.bucket} is {e.speedup:.3g}× vs {e.baseline}, below the minimum "
                               f"{floor:g} (${ENV_MIN_SPEEDUP})")
            else:
                eligible.append(e)
        want = bucket(op, dims)
        if any(e.bucket == want for e in fits) and not any(e.bucket == want for e in eligible):
            # measured at this very bucket and slower than the floor: a faster bucket elsewhere says nothing here
            eligible = []
        rank = self._source_rank()  # a user registry's entry before the shipped one's
        target = norm_dims(op, dims)
        near: list[Entry] = []
        far: list[Entry] = []
        for e in eligible:
            (near if e.bucket == want or within_reach(op, e.dims, target) else far).append(e)
        if far:  # measured too far from this shape to say anything about it
            eligible = near
            skipped.append(f"{', '.join(sorted({e.name + ' at ' + e.bucket for e in far}))}: too far from {asked} "
                           f"({_reach_text(op)})")
        # docs/library.md, lookup step 4: the exact bucket (one per registry), else the nearest; then a user
        # registry's entry before the shipped one's; then the higher speedup
        ordered = sorted(eligible, key=lambda e: (e.bucket != want,
                                                  0.0 if e.bucket == want else distance(op, e.dims, target),
                                                  rank.get(e.source, len(rank)), -e.speedup))
        for e in ordered:
            why = check_file(e) if check_files else ""
            if why:
                problems.append(why)
                continue
            exact = e.bucket == want
            reason = (f"{'exact' if exact else 'nearest bucket'}: {e.describe()}"
                      + ("" if exact else f" (asked for {asked})"))
            return Decision(e, "exact" if exact else "nearest", reason, warning="; ".join(problems) or None,
                            skipped=skipped + problems)
        if problems:
            msg = "; ".join(problems) + ": the reference serves"
            return Decision(None, "reference", msg, warning=msg, skipped=skipped + problems)
        return Decision(None, "reference", "; ".join(skipped) + ": the reference serves", skipped=skipped)

    def _source_rank(self) -> dict[str, int]:
        """The place of each registry file in the lookup: the order of ``sources`` (the user registry, then the
        shipped one), then the order in which other files first appear among the entries."""
        rank: dict[str, int] = {}
        for s in self.sources:
            rank.setdefault(s.path, len(rank))
        for e in self.entries:
            rank.setdefault(e.source, len(rank))
        return rank

    def add(self, entry: Entry) -> Entry | None:
        """Add ``entry``; an entry with the same (op, device, dtype, args, bucket) is replaced and returned."""
        for i, e in enumerate(self.entries):
            if e.key() == entry.key():
                self.entries[i] = entry
                return e
        self.entries.append(entry)
        return None

    def save(self, path: str) -> None:
        """Write every entry to ``path`` (atomically); candidate paths become relative to its candidates root: the
        ``candidates_root`` the file declared when it was read (written back), else candidates/ beside it."""
        path = os.path.abspath(path)
        declared = next((s.candidates_root for s in self.sources if s.path == path and s.candidates_root), None)
        root = candidates_root(path, declared)
        out = []
        for e in self.entries:
            d = e.to_json()
            absolute = e.path
            d["candidate"] = (os.path.relpath(absolute, root) if _inside(absolute, root) else absolute)
            out.append(d)
        from kerneltune import __version__

        doc: dict[str, Any] = {"format": FORMAT, "kerneltune": __version__,
                               "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if declared:
            doc["candidates_root"] = declared
        doc["entries"] = out
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=os.path.dirname(path))
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=False)
                f.write("\n")
            os.replace(tmp, path)
        except OSError as ex:
            raise RegistryError(f"{path}: cannot write the registry ({ex.strerror}); pass a writable --registry") \
                from None


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == os.path.abspath(root)
    except ValueError:
        return False


def _runs_on(backend: str, kind: str) -> bool:
    from kerneltune.backends import BACKENDS, capability

    if not backend:
        return True  # an entry from before backends were recorded: its device key already says where it passed
    return backend in BACKENDS and capability(backend, kind).runs


def read_file(path: str) -> tuple[list[Entry], Source]:
    """The entries of one registry file. A missing file is an empty registry; a corrupt one (not JSON, not a
    registry, another format) is empty with ``Source.error`` set (the caller warns). A malformed entry is left out
    and listed in ``Source.rejected``, ``Source.error`` naming it; the file's other entries are read (each is
    checked on its own before it serves: its backend, its speedup, its file's hash)."""
    path = os.path.abspath(path)
    src = Source(path=path, root=candidates_root(path))
    if not os.path.exists(path):
        return [], src
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
        src.error = f"{path}: not a readable registry ({ex}); fix or delete it (the reference serves meanwhile)"
        return [], src
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        src.error = f"{path}: a registry is a JSON object with an 'entries' list; fix or delete it"
        return [], src
    if doc.get("format", FORMAT) != FORMAT:
        src.error = (f"{path}: registry format {doc.get('format')!r}, this kerneltune reads format {FORMAT}; "
                     "upgrade kerneltune or re-promote")
        return [], src
    declared = doc.get("candidates_root")
    if declared is not None and not isinstance(declared, str):
        src.error = f"{path}: candidates_root {declared!r} is not a folder name (a JSON string); fix or delete it"
        return [], src
    src.candidates_root = declared or None
    src.root = candidates_root(path, declared)
    entries = []
    for i, d in enumerate(doc["entries"]):
        try:
            entries.append(Entry.from_json(d, root=src.root, source=path, where=f"{path}: entries[{i}]"))
        except RegistryError as ex:
            raw = d if isinstance(d, dict) else {}
            src.rejected.append({"index": i, "reason": str(ex),
                                 **{k: raw[k] for k in ("op", "device_key", "name", "bucket", "dtype")
                                    if isinstance(raw.get(k), str)}})
    if src.rejected:
        more = len(src.rejected) - 1
        src.error = (src.rejected[0]["reason"] + (f" (and {more} more malformed entr{'y' if more == 1 else 'ies'})"
                                                  if more else "")
                     + f"; left out, the other {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} still read")
    src.entries = len(entries)
    return entries, src


def load(path: str | None = None) -> Registry:
    """``path`` alone when given; else the user registry ($KERNELTUNE_REGISTRY) first, then the shipped one.
    A corrupt file warns once (here) and counts as empty."""
    user = os.environ.get(ENV_REGISTRY, "").strip()
    paths = [path] if path else [p for p in (user, shipped_path()) if p]
    reg = Registry()
    for p in paths:
        entries, src = read_file(p)
        if not path and p == user and not os.path.exists(p):
            src.error = f"${ENV_REGISTRY}={p} does not exist; set it to a registry JSON (kerneltune promote writes one)"
        if src.error:
            warn(src.error)
        reg.entries += entries
        reg.sources.append(src)
    return reg
