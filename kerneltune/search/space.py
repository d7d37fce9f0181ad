"""The knob space that template candidates declare, and how a point in it becomes a candidate file.

A template is an ordinary candidate (it passes as it stands, with its default ``params``) whose
``KERNELTUNE`` dict also has ``space`` (knob -> allowed values) and optionally ``restrictions``
(Python expressions over the knobs that every valid point satisfies, e.g. ``"BLOCK_M * BLOCK_N <= 8192"``).
A point is (template, params); instantiating it rewrites the ``KERNELTUNE`` literal of the source with
those params, so the candidate file is self-contained and its hash names the point.
"""

from __future__ import annotations

import ast
import glob
import itertools
import os
import pprint
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from kerneltune.backends import capability
from kerneltune.evaluate.static import (
    CandidateFile,
    StaticReject,
    inspect_source,
    read_candidate,
    source_hash,
)

Params = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Point:
    template: str
    params: Params

    @classmethod
    def of(cls, template: str, params: dict[str, Any]) -> "Point":
        return cls(template, tuple(sorted(params.items())))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def label(self) -> str:
        return f"{self.template}[" + ",".join(f"{k}={v}" for k, v in self.params) + "]"


class SpaceError(ValueError):
    pass


@dataclass
class Template:
    name: str
    path: str
    source: str
    backend: str
    op: str
    space: dict[str, list[Any]]
    defaults: dict[str, Any]
    restrictions: list[str] = field(default_factory=list)
    _compiled: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for knob, values in self.space.items():
            if not isinstance(values, list) or not values:
                raise SpaceError(f"{self.path}: KERNELTUNE['space'][{knob!r}] must be a non-empty list of values")
        missing = set(self.space) - set(self.defaults)
        if missing:
            raise SpaceError(f"{self.path}: knob(s) {sorted(missing)} have no default in KERNELTUNE['params']")
        for expr in self.restrictions:
            try:
                code = compile(expr, f"{self.path}:restriction", "eval")
            except SyntaxError as e:
                raise SpaceError(f"{self.path}: restriction {expr!r} is not a Python expression ({e.msg})") from None
            unknown = {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)} - set(self.space) \
                - set(self.defaults) - {"min", "max", "abs", "True", "False", "None"}
            if unknown:
                raise SpaceError(f"{self.path}: restriction {expr!r} names unknown knob(s) {sorted(unknown)}")
            self._compiled.append(code)

    def valid(self, params: dict[str, Any]) -> bool:
        env = {**self.defaults, **params}
        safe = {"__builtins__": {}, "min": min, "max": max, "abs": abs}
        try:
            return all(bool(eval(code, safe, env)) for code in self._compiled)  # noqa: S307 - knob arithmetic only
        except Exception:  # noqa: BLE001 - a restriction that cannot be evaluated rules the point out
            return False

    def size(self) -> int:
        n = 1
        for values in self.space.values():
            n *= len(values)
        return n

    def instantiate(self, params: dict[str, Any], *, parent: str | None = None, origin: str = "templates") -> CandidateFile:
        """The candidate file for ``params``: the template's source with its KERNELTUNE literal rewritten."""
        meta = {"op": self.op, "backend": self.backend, "params": {**self.defaults, **params},
                "space": self.space, "template": self.name, "origin": origin}
        if self.restrictions:
            meta["restrictions"] = self.restrictions
        if parent:
            meta["parent"] = parent
        tree = ast.parse(self.source)
        lines = self.source.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "KERNELTUNE" for t in node.targets):
                start, end = node.lineno - 1, node.end_lineno or node.lineno
                literal = "KERNELTUNE = " + pprint.pformat(meta, width=110, sort_dicts=False) + "\n"
                src = "".join(lines[:start]) + literal + "".join(lines[end:])
                tag = source_hash(src)[:8]
                cand = CandidateFile(path=None, name=f"{self.name}-{tag}", source=src, hash=source_hash(src))
                return cand
        raise SpaceError(f"{self.path}: no KERNELTUNE assignment to rewrite")


class Space:
    """All templates of an op that can be timed on a device."""

    def __init__(self, templates: list[Template]) -> None:
        if not templates:
            raise SpaceError("no template candidates (KERNELTUNE['space']) for this op and device")
        self.templates = {t.name: t for t in templates}

    @classmethod
    def discover(cls, op: str, device: str, folders: list[str]) -> "Space":
        found = []
        for folder in folders:
            for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
                t = load_template(path)
                if t is not None and t.op == op and capability(t.backend, device).timed:
                    found.append(t)
        # a promoted copy (NAME-HASH.py, kept beside its template for the registry) names the template it came
        # from: the template's own file (NAME.py) speaks for it, whichever order the folders list them in
        found.sort(key=lambda t: os.path.splitext(os.path.basename(t.path))[0] == t.name)
        if not found:
            raise SpaceError(f"no template candidates for {op} that can be timed on {device} in "
                             f"{', '.join(folders)}: a template is a candidate whose KERNELTUNE has a 'space'")
        return cls(found)

    def parse_points(self, text: str) -> list[Point]:
        """'TEMPLATE:KNOB=V,KNOB=V;TEMPLATE:...' -> points (knobs not named: the template's defaults). Each value
        must be one of the knob's values in the space, and the point must satisfy the restrictions."""
        points = []
        for part in (x.strip() for x in (text or "").split(";")):
            if not part:
                continue
            name, sep, knobs = part.partition(":")
            t = self.templates.get(name.strip())
            if t is None:
                raise SpaceError(f"point {part!r}: no template {name.strip()!r} here "
                                 f"(templates: {', '.join(sorted(self.templates))}); write TEMPLATE:KNOB=V,KNOB=V")
            params = {k: t.defaults[k] for k in t.space}
            for kv in (x for x in knobs.split(",") if x.strip()) if sep else []:
                k, eq, raw = (y.strip() for y in kv.partition("="))
                if not eq or k not in t.space:
                    raise SpaceError(f"point {part!r}: {kv.strip()!r} is not KNOB=VALUE with a knob of {t.name} "
                                     f"({', '.join(sorted(t.space))})")
                match = [v for v in t.space[k] if str(v) == raw]
                if not match:
                    raise SpaceError(f"point {part!r}: {k}={raw} is not in the space (values: {t.space[k]})")
                params[k] = match[0]
            if not t.valid(params):
                raise SpaceError(f"point {part!r} breaks a restriction of {t.name}: {t.restrictions}")
            points.append(Point.of(t.name, params))
        return points

    def default_points(self) -> list[Point]:
        return [Point.of(t.name, t.defaults) for t in self.templates.values() if t.valid(t.defaults)]

    def random_point(self, rng: random.Random, tries: int = 200) -> Point | None:
        names = sorted(self.templates)
        for _ in range(tries):
            t = self.templates[rng.choice(names)]
            params = {k: rng.choice(v) for k, v in sorted(t.space.items())}
            if t.valid(params):
                return Point.of(t.name, params)
        return None

    def all_points(self) -> Iterator[Point]:
        """Every valid point, template by template, knobs in lexicographic order of their values' positions."""
        for name in sorted(self.templates):
            t = self.templates[name]
            knobs = sorted(t.space)
            for combo in itertools.product(*(t.space[k] for k in knobs)):
                params = dict(zip(knobs, combo))
                if t.valid(params):
                    yield Point.of(name, params)

    def size(self) -> int:
        return sum(t.size() for t in self.templates.values())

    def mutate(self, p: Point, rng: random.Random, rate: float) -> Point:
        """Each knob moves, with probability ``rate``, to a neighbouring value (or any value, 1 time in 4)."""
        t = self.templates[p.template]
        for _ in range(50):
            params = p.as_dict()
            changed = False
            for knob in sorted(t.space):
                if rng.random() < rate:
                    values = t.space[knob]
                    i = values.index(params[knob]) if params.get(knob) in values else 0
                    if rng.random() < 0.25 or len(values) <= 2:
                        params[knob] = rng.choice(values)
                    else:
                        params[knob] = values[max(0, min(len(values) - 1, i + rng.choice((-1, 1))))]
                    changed = changed or params[knob] != p.as_dict().get(knob)
            if not changed:  # force one change
                knob = rng.choice(sorted(t.space))
                params[knob] = rng.choice(t.space[knob])
            if t.valid(params):
                return Point.of(t.name, params)
        return p

    def crossover(self, a: Point, b: Point, rng: random.Random) -> Point:
        """Uniform crossover between points of one template; across templates, the fitter parent's template."""
        if a.template != b.template:
            return a
        t = self.templates[a.template]
        pa, pb = a.as_dict(), b.as_dict()
        for _ in range(20):
            child = {k: (pa if rng.random() < 0.5 else pb)[k] for k in sorted(t.space)}
            if t.valid(child):
                return Point.of(t.name, child)
        return a


def load_template(path: str) -> Template | None:
    """A Template when the file declares a space; None for an ordinary candidate; SpaceError when broken."""
    try:
        cand = read_candidate(path)
        inspect_source(cand)
    except StaticReject as e:
        raise SpaceError(f"{path}: {e.reason}") from None
    meta = cand.meta
    if not meta.get("space"):
        return None
    if not isinstance(meta["space"], dict):
        raise SpaceError(f"{path}: KERNELTUNE['space'] must be a dict of knob -> list of values")
    return Template(name=meta.get("template") or cand.name, path=path, source=cand.source, backend=cand.backend,
                    op=cand.op, space=meta["space"], defaults=dict(meta.get("params") or {}),
                    restrictions=list(meta.get("restrictions") or []))
