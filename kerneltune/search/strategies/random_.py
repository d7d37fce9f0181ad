"""random: uniform samples of valid points, never the same point twice."""

from __future__ import annotations

from kerneltune.search.space import Point
from kerneltune.search.strategies import StrategyBase

_options = {"defaults_first": (True, "evaluate every template's default params before sampling")}


class Strategy(StrategyBase):
    name = "random"

    def ask(self) -> Point | None:
        for p in self.first_points(self.options["defaults_first"]):
            if self.is_new(p):
                return self._claim(p)
        for _ in range(500):
            p = self.space.random_point(self.rng)
            if p is None:
                return None
            if self.is_new(p):
                return self._claim(p)
        return None
