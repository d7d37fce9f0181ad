"""The offline proposer: template candidates instantiated at points a search strategy picks.

No network, no key: a real autotuner over the knob spaces the templates declare (block sizes,
parallel thresholds, accumulator precision, chunking, fastmath …), restrictions pruning invalid
combinations, the strategy (evolve, random, grid) mutating and crossing over the best so far.
"""

from __future__ import annotations

from typing import Any

from kerneltune.propose.base import Proposal, Proposer
from kerneltune.search.space import Point, Space
from kerneltune.search.strategies import make_strategy


def fitness(result: dict[str, Any]) -> float | None:
    """Speedup over the primary baseline for a passed, timed candidate; None otherwise."""
    if result.get("status") == "passed" and result.get("speedup") is not None:
        return float(result["speedup"])
    return None


class TemplatesProposer(Proposer):
    name = "templates"

    def __init__(self, space: Space, strategy: str = "evolve", seed: int = 0,
                 options: dict[str, Any] | None = None) -> None:
        self.space = space
        self.strategy = make_strategy(strategy, space, seed, options)
        self._hash_of: dict[Point, str] = {}
        self._done = False

    def _proposal(self, p: Point) -> Proposal:
        t = self.space.templates[p.template]
        parent = None
        best = self.strategy.best()
        if best is not None and best[0] != p and best[0].template == p.template:
            parent = self._hash_of.get(best[0])
        # a template at its own defaults is the hand-written kernel: the leaderboard calls it a seed
        origin = "seed" if p.as_dict() == {k: t.defaults[k] for k in t.space} else "templates"
        cand = t.instantiate(p.as_dict(), origin=origin)
        self._hash_of[p] = cand.hash
        return Proposal(candidate=cand, origin=origin, parent=None if origin == "seed" else parent, key=p,
                        info={"template": p.template, "params": p.as_dict()})

    def propose(self, n: int) -> list[Proposal]:
        out = []
        for _ in range(n):
            p = self.strategy.ask()
            if p is None:
                self._done = True
                break
            out.append(self._proposal(p))
        return out

    def tell(self, proposal: Proposal, result: dict[str, Any]) -> None:
        self.strategy.tell(proposal.key, fitness(result))

    def replay(self, key: Any, result: dict[str, Any] | None) -> None:
        if isinstance(key, Point):
            self.strategy.pending.discard(key)
            self.strategy.seen[key] = fitness(result) if result else None
            if result is not None:
                self.strategy.tell(key, fitness(result))

    def exhausted(self) -> bool:
        return self._done

    def point_of(self, info: dict[str, Any]) -> Point | None:
        if info.get("template") in self.space.templates and isinstance(info.get("params"), dict):
            return Point.of(info["template"], info["params"])
        return None
