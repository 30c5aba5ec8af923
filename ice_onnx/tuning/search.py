"""Choosing a plan: per-block frontiers, one path of plans from cheapest to exact, and a
search along it that only end-to-end runs decide.

Each block has options (a setting, its cost, its damage when it alone is changed). Its
frontier is the lower convex hull of (cost, damage) ending at exact: settings that
another beats on both counts, or that a mix of two neighbours beats, drop out. The
path starts with every block at its cheapest frontier point and moves one block one
point towards exact per step, the step that removes the most damage per unit of added
cost first (the greedy order of a multiple-choice knapsack). Cost never decreases along
the path and the last plan is all exact.

The path depends only on the measurements, not on the budget. The search then finds,
by bisection, a plan on it that passes the budget end to end while its predecessor does
not (the all-exact end is checked first). A looser budget passes every plan a tighter
one passes, so its bisection turns left wherever the tighter one does and never ends
later on the path: a looser budget never yields a more expensive plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable


@dataclass(frozen=True)
class Option:
    setting: Hashable
    cost: float
    damage: float


def frontier(options: list[Option], exact: Option) -> list[Option]:
    """The lower convex hull of `options` in (cost, damage), cheapest first, ending at `exact`."""
    cheaper = sorted((o for o in options if o.cost < exact.cost), key=lambda o: (o.cost, o.damage))
    efficient: list[Option] = []
    for option in cheaper:
        if not efficient or option.damage < efficient[-1].damage:
            efficient.append(option)
    hull: list[Option] = []
    for option in [*efficient, exact]:
        while len(hull) >= 2 and not _below_chord(hull[-2], hull[-1], option):
            hull.pop()
        hull.append(option)
    return hull


def _below_chord(a: Option, b: Option, c: Option) -> bool:
    """Whether b lies strictly below the segment from a to c (costs a < b < c)."""
    return (b.damage - a.damage) * (c.cost - a.cost) < (c.damage - a.damage) * (b.cost - a.cost)


def plan_path(frontiers: dict[int, list[Option]]) -> list[dict[int, Option]]:
    """Plans (block -> option) from every block at its cheapest point to every block exact."""
    steps = []
    for block, points in frontiers.items():
        for position in range(1, len(points)):
            before, after = points[position - 1], points[position]
            gain = (before.damage - after.damage) / (after.cost - before.cost)
            steps.append((-gain, block, position))
    steps.sort()  # best gain first; a block's own steps keep their order (its gains decrease)
    state = {block: 0 for block in frontiers}
    path = [{block: frontiers[block][0] for block in frontiers}]
    for _, block, position in steps:
        state[block] = position
        path.append({b: frontiers[b][state[b]] for b in frontiers})
    return path


def first_passing(length: int, passes: Callable[[int], bool]) -> int:
    """Bisection for a position whose plan passes and whose predecessor fails (or 0).

    The last position (all exact) must pass; `passes` is called O(log length) times.
    """
    low, high = 0, length - 1
    while low < high:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle + 1
    return high
