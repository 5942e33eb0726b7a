"""`gppf bench routing`: variant routes, the known-pair statistic and the summary arithmetic."""
from __future__ import annotations

import pytest

from gppf.bench.routing import pair_statistic, shared_fraction, summarise, variant_routes

TASKS = ["a", "b", "c", "d"]


def test_variant_routes_have_the_stated_structure():
    kw = dict(tasks=TASKS, layers=5, legos=8, active=2, seed=0)
    assert variant_routes("learned", **kw) is None
    hard = variant_routes("hard", **kw)
    assert all(hard[t] == [[0, 1]] * 5 for t in TASKS)
    disjoint = variant_routes("disjoint", **kw)
    used = [set(disjoint[t][0]) for t in TASKS]
    assert all(not (used[i] & used[j]) for i in range(4) for j in range(i + 1, 4))
    rand = variant_routes("random", **kw)
    assert rand == variant_routes("random", **kw) and rand != variant_routes("random", **{**kw, "seed": 1})
    assert all(len(set(row)) == 2 and row == sorted(row) for t in TASKS for row in rand[t])
    with pytest.raises(ValueError, match="T\\*k <= N"):
        variant_routes("disjoint", **{**kw, "legos": 6})


def test_pair_statistic_within_and_across():
    routes = {"a": [[0, 1], [0, 1]], "b": [[0, 1], [0, 2]], "c": [[4, 5], [4, 5]], "d": [[4, 6], [1, 5]]}
    assert shared_fraction(routes, "a", "b") == pytest.approx(0.75)
    stat = pair_statistic(routes, [("a", "b"), ("c", "d")])
    assert stat["within"] == pytest.approx((0.75 + 0.5) / 2)
    # across: a-c 0, a-d 0.25, b-c 0, b-d 0
    assert stat["across"] == pytest.approx(0.25 / 4)


def test_summary_gain_over_hard_sharing_per_seed():
    def run(x, y, wall=1.0):
        return {"metrics": {"t1": x, "t2": y}, "wall_s": wall, "routes": {}}

    runs = {"hard": [run(0.5, 0.5), run(0.6, 0.4)], "learned": [run(0.7, 0.5, 2.0), run(0.6, 0.6, 4.0)]}
    out = summarise(runs, pairs=None)
    assert out["hard"]["gain_vs_hard"] == {"mean": 0.0, "std": 0.0}
    assert out["learned"]["gain_vs_hard"]["mean"] == pytest.approx((0.1 + 0.1) / 2)
    assert out["learned"]["tasks"]["t1"]["mean"] == pytest.approx(0.65)
    assert out["learned"]["wall_s"]["mean"] == pytest.approx(3.0)
