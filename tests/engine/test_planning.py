"""The ``groups`` / ``auto`` planners: balanced packing, measured task costs (no side effects), the plan
kept on resume."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from gppf.config import load_config, to_dict
from gppf.engine.distributed import AUTO_MAX_IMBALANCE, DistInfo, plan_imbalance, plan_tasks
from gppf.engine.planning import measure_task_costs, saved_plan
from gppf.engine.trainer import _plan, _task_stream, build_run, train


def _max_load(plan: dict[str, list[int]], costs: dict[str, float], world: int) -> float:
    return max(sum(costs[t] for t, r in plan.items() if r == [w]) for w in range(world))


@pytest.mark.parametrize("seed", range(20))
def test_packing_is_near_optimal_on_random_costs(seed):
    """Fewer ranks than tasks: the most loaded rank is within 10% of the best partition (brute force),
    and on the default recipe's measured costs (AVX2 CPU, float32) it is the best one."""
    rng = random.Random(seed)
    n, world = rng.randint(3, 8), rng.choice([2, 3])
    costs = {f"t{i}": rng.uniform(1, 10) for i in range(n)}
    plan = plan_tasks(tasks=list(costs), costs=costs, world=world, planner="groups")
    assert all(len(r) == 1 for r in plan.values()) and {r[0] for r in plan.values()} == set(range(world))
    best = min(max(sum(costs[t] for t, w in zip(costs, owners) if w == r) for r in range(world))
               for owners in itertools.product(range(world), repeat=n))
    assert _max_load(plan, costs, world) <= 1.10 * best


def test_packing_finds_the_best_split_greedy_misses():
    # seconds of one global batch per task (default recipe, float32): greedy longest-first alone gives
    # 1.376 vs 1.124; the best split is 1.296 vs 1.204
    costs = {"shapes": 0.278, "attr": 0.286, "reid": 0.275, "det": 0.458, "seg": 0.563, "kp": 0.640}
    plan = plan_tasks(tasks=list(costs), costs=costs, world=2, planner="groups")
    assert _max_load(plan, costs, 2) == pytest.approx(1.296)


def test_plan_imbalance_is_the_busiest_rank_over_a_perfect_split():
    costs = {"a": 3.0, "b": 1.0, "c": 2.0}
    assert plan_imbalance({"a": [0], "b": [1], "c": [1]}, costs=costs, world=2) == 1.0
    assert plan_imbalance({"a": [0], "b": [0], "c": [1]}, costs=costs, world=2) == pytest.approx(4 / 3)
    assert plan_imbalance({"a": [0, 1], "b": [0, 1], "c": [0, 1]}, costs=costs, world=2) == 1.0
    assert plan_imbalance({"a": [0, 1], "b": [2], "c": [2]}, costs=costs, world=3) == pytest.approx(1.5)


@pytest.mark.parametrize(("costs", "world", "expected"), [
    # the default recipe's measured costs (float32, AVX2): packed at 1.02 of a perfect split -> groups
    ({"shapes": 0.278, "attr": 0.286, "reid": 0.275, "det": 0.458, "seg": 0.563, "kp": 0.640}, 2, "groups"),
    ({"a": 1.0, "b": 1.0}, 2, "groups"),
    ({"a": 1.0, "b": 1.0, "c": 1.0}, 2, "all"),  # best packing 2 : 1 = 1.33 of a perfect split
    ({"a": 9.0, "b": 1.0}, 2, "all"),  # one task dominates: groups would idle a rank 80% of the time
    ({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, 3, "all"),
])
def test_auto_planner_takes_groups_only_when_it_balances(costs, world, expected):
    plan = plan_tasks(tasks=list(costs), costs=costs, world=world, planner="auto")
    assert plan == plan_tasks(tasks=list(costs), costs=costs, world=world, planner=expected)
    groups = plan_tasks(tasks=list(costs), costs=costs, world=world, planner="groups")
    assert (plan_imbalance(groups, costs=costs, world=world) <= AUTO_MAX_IMBALANCE) == (expected == "groups")


def test_auto_is_the_default_planner_and_single_process_plans_nothing(tiny_cfg, tmp_path):
    cfg = tiny_cfg(steps=1)
    assert cfg.dist.planner == "auto"
    run = build_run(cfg, run_dir=tmp_path, resume=False)
    plan, costs = _plan(cfg, model=run.model, tasks=run.tasks, info=DistInfo(), device=run.device, amp=None,
                        state={})
    assert plan == {t: [0] for t in run.tasks} and costs == {}


def _two_tasks(tiny_cfg, big: int):
    return tiny_cfg(steps=2, extra=[f"tasks.0.batch_size={big}", "tasks.1.batch_size=2", "tasks.1.image_size=32",
                                    "train.checkpoint_every=0"])


def test_measured_costs_follow_the_work_and_change_nothing(tiny_cfg, tmp_path):
    cfg = _two_tasks(tiny_cfg, big=64)
    run = build_run(cfg, run_dir=tmp_path, resume=False)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    factories = {n: (lambda t=t: _task_stream(t, seed=0, shard=(0, 1), workers=0, position=None))
                 for n, t in run.tasks.items()}
    costs = measure_task_costs(model=run.model, streams=factories, in_process={"cls": True, "seg": True},
                               device=run.device, amp_dtype=None, channels_last=False, info=DistInfo())
    assert set(costs) == {"cls", "seg"} and all(c > 0 for c in costs.values())
    assert costs["cls"] > 1.5 * costs["seg"]  # batch 64 vs 2 at the same size (measured ratio ~4)
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None or not p.grad.any() for p in run.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]


def test_checkpoint_keeps_the_plan_and_resume_reuses_it(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(steps=3)
    train(cfg, run_dir=tmp_path)
    state = json.loads(next((tmp_path / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["user"]["plan"] == {"cls": [0], "seg": [0]}
    kept = {"positions": {}, "world": 2, "plan": {"cls": [1], "seg": [0]}}
    assert saved_plan(kept, tasks=["cls", "seg"], world=2) == {"cls": [1], "seg": [0]}
    assert saved_plan(kept, tasks=["cls", "seg"], world=3) is None  # another world size: plan again
    assert saved_plan(kept, tasks=["cls", "other"], world=2) is None
    run = build_run(cfg, run_dir=tmp_path / "x", resume=False)
    monkeypatch.setattr("gppf.engine.trainer.measure_task_costs", lambda **kw: pytest.fail("re-measured"))
    info2 = DistInfo(rank=0, world=2, local_rank=0)
    groups = tiny_cfg(steps=3, extra=["dist.planner=groups"])
    plan, costs = _plan(groups, model=run.model, tasks=run.tasks, info=info2, device=run.device, amp=None,
                        state=kept)
    assert plan == {"cls": [1], "seg": [0]} and costs == {}


def test_a_sampled_task_costs_its_probability_times_its_batch(tiny_cfg, tmp_path):
    """Static costs 1 : 1 : 2 (batch 8, 8, 16 at 32 px); the third task joins a step with p = 0.25, so it
    counts 0.5: packed with one of the others, not alone."""
    cfg = tiny_cfg(steps=1, extra=["dist.planner=groups", "dist.task_costs=static", "tasks.1.image_size=32",
                                   "tasks.0.batch_size=8", "tasks.1.batch_size=8"])
    extra = {"name": "cls2", "type": "classification", "batch_size": 16, "image_size": 32, "sample_weight": 0.25,
             "data": {"format": "synthetic", "options": {"domain": "pastel", "size": 32, "num_train": 48,
                                                          "num_val": 16}}}
    base = to_dict(cfg)
    base["tasks"].append(extra)
    cfg = load_config(base=base)
    run = build_run(cfg, run_dir=tmp_path, resume=False)
    info2 = DistInfo(rank=0, world=2, local_rank=0)
    plan, costs = _plan(cfg, model=run.model, tasks=run.tasks, info=info2, device=run.device, amp=None, state={})
    assert costs == {"cls": 8 * 32**2, "seg": 8 * 32**2, "cls2": 0.25 * 16 * 32**2}
    assert plan["cls2"] in (plan["cls"], plan["seg"]) and plan["cls"] != plan["seg"]
