"""Search strategies, registered by name and imported lazily.

A strategy is a small module with an ``_options`` table (name -> (default, help)) and a class
``Strategy`` with ``ask() -> Point | None`` (None: nothing left) and ``tell(point, fitness)``
(fitness: speedup over the primary baseline, None when the candidate did not pass). Strategies never
time anything: they can be tested, and replayed, on recorded evaluations.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

from kerneltune.search.space import Point, Space

_REGISTRY = {"evolve": "kerneltune.search.strategies.evolve", "random": "kerneltune.search.strategies.random_",
             "grid": "kerneltune.search.strategies.grid"}


def strategy_names() -> list[str]:
    return list(_REGISTRY)


# options every strategy takes
COMMON_OPTIONS = {"start": ("", "points evaluated before any other: 'TEMPLATE:KNOB=V,KNOB=V;TEMPLATE:...' (knobs "
                               "not named keep the template's defaults)")}


def options_of(name: str) -> dict[str, tuple[Any, str]]:
    return {**_module(name)._options, **COMMON_OPTIONS}


def _module(name: str) -> Any:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}: use one of {', '.join(_REGISTRY)}")
    return importlib.import_module(_REGISTRY[name])


def parse_options(name: str, pairs: list[str]) -> dict[str, Any]:
    """['population=12', 'mutation_rate=0.2'] -> typed values, checked against the strategy's table."""
    table = options_of(name)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in table:
            raise ValueError(f"strategy option {pair!r}: {name} takes {', '.join(f'{k}=…' for k in table) or 'no options'}")
        default = table[key][0]
        try:
            out[key] = type(default)(raw) if not isinstance(default, bool) else raw.lower() in ("1", "true", "yes")
        except ValueError:
            raise ValueError(f"strategy option {key}={raw!r}: expected a {type(default).__name__}") from None
    return out


def make_strategy(name: str, space: Space, seed: int, options: dict[str, Any] | None = None) -> "StrategyBase":
    opts = {k: v[0] for k, v in options_of(name).items()}
    opts.update(options or {})
    return _module(name).Strategy(space, random.Random(seed), **opts)


class StrategyBase:
    name = "base"

    def __init__(self, space: Space, rng: random.Random, **options: Any) -> None:
        self.space = space
        self.rng = rng
        self.options = options
        self.starts = space.parse_points(options.get("start", ""))   # a malformed point: SpaceError, before any run
        self.seen: dict[Point, float | None] = {}
        self.pending: set[Point] = set()

    def ask(self) -> Point | None:
        raise NotImplementedError

    def tell(self, point: Point, fitness: float | None) -> None:
        self.pending.discard(point)
        self.seen[point] = fitness

    def _claim(self, p: Point | None) -> Point | None:
        if p is not None:
            self.pending.add(p)
        return p

    def first_points(self, defaults: bool = True) -> list[Point]:
        """The points every strategy proposes first: the start option's, then (if asked) the templates' defaults."""
        return self.starts + (self.space.default_points() if defaults else [])

    def is_new(self, p: Point) -> bool:
        return p not in self.seen and p not in self.pending

    def best(self) -> tuple[Point, float] | None:
        scored = [(p, f) for p, f in self.seen.items() if f is not None]
        return max(scored, key=lambda x: x[1]) if scored else None
