"""Pareto fronts, hypervolume and knee (comparison/fronts.py) against brute force and hand-computed areas."""

import random

import pytest

from comparison.fronts import hypervolume, knee, pareto_front


def dominated(p, q):
    """q dominates p: at least as accurate, at most as costly, better in one."""
    return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])


@pytest.mark.parametrize("seed", range(5))
def test_front_is_the_brute_force_non_dominated_set(seed):
    rng = random.Random(seed)
    points = [(round(rng.random(), 1), round(rng.random(), 1)) for _ in range(40)]  # rounding makes ties
    front = pareto_front(points)
    expected = {p for p in points if not any(dominated(p, q) for q in points)}
    assert {points[i] for i in front} == expected
    assert len(front) == len(expected)  # equal points appear once
    costs = [points[i][1] for i in front]
    accs = [points[i][0] for i in front]
    assert costs == sorted(costs) and accs == sorted(accs) and len(set(costs)) == len(costs)


def test_hypervolume_hand_computed():
    ref = (0.5, 10.0)
    # one point: the rectangle (0.9 - 0.5) x (10 - 4), over the box (1 - 0.5) x 10
    assert hypervolume([(0.9, 4.0)], ref) == pytest.approx(0.4 * 6 / 5)
    # two steps: (0.7, 2) covers 0.2 x 8, (0.9, 6) adds 0.2 x 4
    two = [(0.7, 2.0), (0.9, 6.0)]
    assert hypervolume(two, ref) == pytest.approx((0.2 * 8 + 0.2 * 4) / 5)
    # a dominated point, a point worse than the reference, and order change nothing
    assert hypervolume(two[::-1] + [(0.6, 7.0), (0.95, 12.0), (0.4, 1.0)], ref) == pytest.approx(hypervolume(two, ref))
    assert hypervolume([], ref) == 0.0
    assert hypervolume([(1.0, 0.0)], ref) == pytest.approx(1.0)


def test_hypervolume_matches_a_grid_count():
    rng = random.Random(3)
    points = [(0.5 + 0.5 * rng.random(), 10 * rng.random()) for _ in range(12)]
    ref, n = (0.5, 10.0), 400
    inside = 0
    for i in range(n):
        for j in range(n):
            a, c = 0.5 + 0.5 * (i + 0.5) / n, 10 * (j + 0.5) / n
            inside += any(p[0] >= a and p[1] <= c for p in points)
    assert hypervolume(points, ref) == pytest.approx(inside / n**2, abs=0.01)


def test_knee_is_the_bend_of_the_front():
    # cheap and poor, the bend (most accuracy for little cost), and expensive for a little more
    points = [(0.60, 1.0), (0.88, 2.0), (0.90, 10.0), (0.50, 5.0)]
    front = pareto_front(points)
    assert front == [0, 1, 2]
    assert knee(points, front) == 1
    assert knee(points, [0]) == 0
    assert knee(points, [0, 2]) == 0  # two points: the cheaper
