"""evolve: an island-model genetic search.

Each island keeps its own population (the best ``population`` points it has seen). A new point is
the child of two parents picked by tournament (the fittest of ``tournament`` random members),
crossed over uniformly and mutated knob by knob. Every ``migration_every`` results on an island, its
best point joins the next island. Islands start from the templates' defaults plus random points.
Failed candidates (fitness None) never become parents.
"""

from __future__ import annotations

from kerneltune.search.space import Point
from kerneltune.search.strategies import StrategyBase

_options = {
    "islands": (2, "number of islands (independent populations)"),
    "population": (8, "points kept per island"),
    "tournament": (3, "members compared when picking a parent"),
    "mutation_rate": (0.3, "probability that a knob changes in a child"),
    "crossover_rate": (0.7, "probability that a child has two parents"),
    "migration_every": (6, "results per island between migrations of its best point"),
    "init_random": (3, "random points per island before evolution starts"),
}


class Strategy(StrategyBase):
    name = "evolve"

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        n = max(1, int(self.options["islands"]))
        self.islands: list[dict[Point, float]] = [dict() for _ in range(n)]
        self.home: dict[Point, int] = {}
        self.results_on: list[int] = [0] * n
        self.next_island = 0
        self.seeded: list[int] = [0] * n

    def ask(self) -> Point | None:
        for p in self.first_points():  # the start points and the hand-written defaults: the first generation
            if self.is_new(p):
                self.home[p] = self._island()
                return self._claim(p)
        for _ in range(200):
            i = self._island()
            members = self.islands[i]
            if self.seeded[i] < self.options["init_random"] or len(members) < 2:
                self.seeded[i] += 1
                p = self.space.random_point(self.rng)
            else:
                a = self._tournament(members)
                if self.rng.random() < self.options["crossover_rate"]:
                    p = self.space.crossover(a, self._tournament(members), self.rng)
                else:
                    p = a
                p = self.space.mutate(p, self.rng, self.options["mutation_rate"])
            if p is not None and self.is_new(p):
                self.home[p] = i
                return self._claim(p)
        p = self.space.random_point(self.rng)  # a crowded space: fall back to anything new
        return self._claim(p) if p is not None and self.is_new(p) else None

    def _island(self) -> int:
        i = self.next_island
        self.next_island = (i + 1) % len(self.islands)
        return i

    def _tournament(self, members: dict[Point, float]) -> Point:
        pool = sorted(members, key=Point.label)  # sorted: reproducible whatever the dict order
        picks = [self.rng.choice(pool) for _ in range(max(1, int(self.options["tournament"])))]
        return max(picks, key=lambda p: members[p])

    def tell(self, point: Point, fitness: float | None) -> None:
        super().tell(point, fitness)
        i = self.home.get(point, 0)
        self.results_on[i] += 1
        if fitness is not None:
            isl = self.islands[i]
            isl[point] = fitness
            if len(isl) > self.options["population"]:
                del isl[min(sorted(isl, key=Point.label), key=lambda p: isl[p])]
        if self.results_on[i] % max(1, int(self.options["migration_every"])) == 0 and self.islands[i]:
            best = max(self.islands[i], key=lambda p: self.islands[i][p])
            nxt = self.islands[(i + 1) % len(self.islands)]
            nxt[best] = self.islands[i][best]
