"""Pareto fronts of (accuracy, cost) points, their hypervolume against a common reference point, and the knee.

Accuracy is maximised, cost (deployed latency, nonzero parameters) minimised. Written by hand for two objectives,
where each is a sort and a sweep: Optuna's own non-dominated sort and hypervolume (``optuna._hypervolume``) are
private, and the 2-D front of a 3-objective study is not its ``best_trials``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float]  # (accuracy, cost)


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points, by increasing cost (and accuracy). A point is dominated when another
    is at least as accurate and at most as costly, and better in one; of equal points the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][0] > best:
            front.append(i)
            best = points[i][0]
    return front


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` = (worst accuracy, worst cost), as a fraction of the
    box from the reference to the ideal point (accuracy 1, cost 0): 0 when no point beats the reference, 1 for a
    perfect model at no cost."""
    acc_ref, cost_ref = reference
    inside = [(a, c) for a, c in points if a > acc_ref and c < cost_ref]
    area, covered = 0.0, acc_ref
    for a, c in sorted(inside, key=lambda p: (p[1], -p[0])):  # sweep by cost: each point adds the strip it lifts
        if a > covered:
            area += (a - covered) * (cost_ref - c)
            covered = a
    return area / ((1.0 - acc_ref) * cost_ref)


def knee(points: Sequence[Point], front: Sequence[int]) -> int:
    """The front's knee: the point farthest above the chord between its two ends, accuracy and cost each scaled
    to the front's range (the usual "maximum distance to the line" rule); a front of one or two points: its cheapest
    point. Returns an index into ``points``."""
    if len(front) <= 2:
        return front[0]
    (a0, c0), (a1, c1) = points[front[0]], points[front[-1]]
    span_a, span_c = (a1 - a0) or 1.0, (c1 - c0) or 1.0

    def lift(i: int) -> float:  # scaled: the chord runs from (0, 0) to (1, 1); above it is a better trade
        a, c = (points[i][0] - a0) / span_a, (points[i][1] - c0) / span_c
        return a - c

    return max(front, key=lift)
