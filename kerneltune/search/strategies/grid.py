"""grid: the start points, then every valid point in order (templates by name, knobs lexicographically); stops
when exhausted."""

from __future__ import annotations

import itertools

from kerneltune.search.space import Point
from kerneltune.search.strategies import StrategyBase

_options: dict = {}


class Strategy(StrategyBase):
    name = "grid"

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self._it = itertools.chain(self.starts, self.space.all_points())

    def ask(self) -> Point | None:
        for p in self._it:
            if self.is_new(p):
                return self._claim(p)
        return None
