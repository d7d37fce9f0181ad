"""Strategies on recorded evaluations: nothing is run or timed here."""

from __future__ import annotations

import pytest

from kerneltune.search.space import Point
from kerneltune.search.strategies import make_strategy, parse_options, strategy_names
from tests.search.conftest import landscape


def drive(strategy, budget):
    asked = []
    for _ in range(budget):
        p = strategy.ask()
        if p is None:
            break
        asked.append(p)
        strategy.tell(p, landscape(p))
    return asked


def test_space_counts_and_restrictions(space):
    pts = list(space.all_points())
    assert len(pts) == 6 * 3 * 4 - 3  # (A=6, C=3) ruled out for each B
    assert all(not (p.as_dict()["A"] == 6 and p.as_dict()["C"] == 3) for p in pts)
    assert len(set(pts)) == len(pts)


@pytest.mark.parametrize("name", strategy_names())
def test_never_repeats_and_is_reproducible(space, name):
    a = drive(make_strategy(name, space, seed=7), 40)
    b = drive(make_strategy(name, space, seed=7), 40)
    assert a == b
    assert len(set(a)) == len(a)
    assert a[0] == Point.of("torch_tpl", {"A": 1, "B": "x", "C": 0}) or name == "grid"


def test_grid_covers_everything_then_stops(space):
    asked = drive(make_strategy("grid", space, seed=0), 1000)
    assert set(asked) == set(space.all_points())


def best_after(name, space, seed, budget):
    s = make_strategy(name, space, seed)
    drive(s, budget)
    return s.best()[1]


def test_evolve_beats_random_on_average(space):
    optimum = max(v for p in space.all_points() if (v := landscape(p)) is not None)
    evo = [best_after("evolve", space, seed, 30) for seed in range(12)]
    rnd = [best_after("random", space, seed, 30) for seed in range(12)]
    assert sum(evo) / len(evo) > sum(rnd) / len(rnd)
    hits_evo, hits_rnd = sum(v == optimum for v in evo), sum(v == optimum for v in rnd)
    assert hits_evo >= 9 and hits_evo > hits_rnd  # 30 of 69 points: evolution finds the optimum most times


def test_failures_never_become_parents(space):
    s = make_strategy("evolve", space, seed=3, options={"islands": 1})
    drive(s, 30)
    for island in s.islands:
        assert all(p.as_dict()["B"] != "y" for p in island)


def test_options_are_checked():
    assert parse_options("evolve", ["population=12", "mutation_rate=0.5"]) == {"population": 12, "mutation_rate": 0.5}
    with pytest.raises(ValueError, match="evolve takes"):
        parse_options("evolve", ["nope=1"])
    with pytest.raises(ValueError, match="expected a int"):
        parse_options("evolve", ["population=lots"])


def test_instantiate_rewrites_only_the_params(space):
    t = space.templates["torch_tpl"]
    c = t.instantiate({"A": 3, "B": "z", "C": 1})
    assert '"A": 3' in c.source.replace("'", '"') and "def run(" in c.source
    c2 = t.instantiate({"A": 3, "B": "z", "C": 1})
    assert c.hash == c2.hash and c.hash != t.instantiate({"A": 4, "B": "z", "C": 1}).hash


@pytest.mark.parametrize("name", strategy_names())
def test_start_points_come_first_in_every_strategy_and_are_never_repeated(space, name):
    opts = parse_options(name, ["start=torch_tpl:A=5,B=z;torch_tpl:C=2"])
    asked = drive(make_strategy(name, space, seed=1, options=opts), 12)
    assert asked[:2] == [Point.of("torch_tpl", {"A": 5, "B": "z", "C": 0}), Point.of("torch_tpl", {"A": 1, "B": "x", "C": 2})]
    assert len(set(asked)) == len(asked)
    if name != "grid":  # then the templates' defaults
        assert asked[2] == Point.of("torch_tpl", {"A": 1, "B": "x", "C": 0})


@pytest.mark.parametrize("start, why", [("nope:A=1", "no template 'nope'"), ("torch_tpl:D=1", "'D=1' is not KNOB=VALUE"),
                                        ("torch_tpl:A=7", "A=7 is not in the space"), ("torch_tpl:A", "'A' is not"),
                                        ("torch_tpl:A=6,C=3", "breaks a restriction")])
def test_a_malformed_start_point_is_refused_naming_what_is_wrong(space, start, why):
    with pytest.raises(ValueError, match=why):
        make_strategy("random", space, seed=0, options={"start": start})
