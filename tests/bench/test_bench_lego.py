"""``gppf bench lego``: quick sizes of every regime, JSON keys and ratio values; memory probe; timing."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gppf.bench.common import interleaved_times, peak_alloc_bytes
from gppf.bench.lego import GOALS, REGIMES, _child_argv, combine_processes, goal_keys, main_lego
from gppf.bench.r50 import default_recipe_tasks
from gppf.bench.small import distinct_routes
from gppf.config import RouterConfig, TrainConfig


def test_peak_alloc_bytes_counts_a_known_allocation():
    def region() -> None:
        a = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB, live while b is allocated
        b = torch.empty(500_000, dtype=torch.float32)  # 2 MB
        del a, b
        c = torch.empty(250_000, dtype=torch.float32)  # 1 MB after both are freed
        del c

    assert peak_alloc_bytes(region) == 6_000_000


def test_peak_alloc_bytes_ignores_memory_from_before_the_region():
    held = [torch.ones(2_000_000)]  # 8 MB allocated before the region and freed inside it

    def region() -> None:
        small = torch.empty(250_000, dtype=torch.float32)  # +1 MB
        held.clear()  # not seen: the profiler does not know the size of a block older than itself
        again = torch.empty(500_000, dtype=torch.float32)  # +2 MB: peak 3 MB
        del small, again

    assert peak_alloc_bytes(region) == 3_000_000
    assert peak_alloc_bytes(lambda: None) == 0


def test_interleaved_times_runs_setup_untimed_before_each_call():
    calls: list[str] = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2,
                              warmup=1, setup={"b": lambda: calls.append("setup")})
    assert calls == ["a", "setup", "b"] * 3
    assert [len(v) for v in times.values()] == [2, 2]


def test_regime_routes_and_tasks():
    assert len(default_recipe_tasks()) == 6 and len(set(default_recipe_tasks())) == 6
    routes = distinct_routes(tasks=["a", "b", "c"], layers=2, legos=8, active=2)
    assert routes == {"a": [[0, 1]] * 2, "b": [[2, 3]] * 2, "c": [[4, 5]] * 2}


def _ratio_ok(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_lego_quick_json_every_regime(capsys):
    assert main_lego(["--quick", "--json", "--threads", "1", "--warmup", "0", "--image-size", "32"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1, "exactly one JSON object on stdout"
    result = json.loads(out)
    goals = goal_keys(list(REGIMES))
    assert set(result["goals"]) == set(result["meets_goals"]) == set(goals) and len(goals) == 9
    assert all(isinstance(v, bool) for v in result["meets_goals"].values())
    for key in goals:
        assert _ratio_ok(result[key])
        regime, name = key.split("/")
        assert result["regimes"][regime][name] == result[key]
    for regime in ("r50_1task", "r50_6tasks"):
        r = result["regimes"][regime]
        models = {"dense_channels_last", "dense_contiguous", "routed_large", "routed_small"}
        assert set(r["median_step_s"]) == set(r["step_act_peak_bytes"]) == set(r["median_phase_s"]) == models
        med = r["median_step_s"]
        best = min(med["dense_channels_last"], med["dense_contiguous"])
        assert med[f"dense_{r['dense_weights']}"] == best  # the faster dense layout is the baseline
        assert r["routed_vs_dense_step"] == pytest.approx(med["routed_large"] / best)
        assert r["dense_contiguous_vs_channels_last_step"] == pytest.approx(
            med["dense_contiguous"] / med["dense_channels_last"])
        for phases in r["median_phase_s"].values():
            assert list(phases) == ["zero_grad", "forward", "backward", "optimizer"]
            assert all(v >= 0 for v in phases.values())
        assert (r["config"]["image_size"], r["config"]["batch_per_task"]) == (32, 2)
    assert result["regimes"]["r50_6tasks"]["config"]["task_names"] == default_recipe_tasks()
    assert result["regimes"]["r50_1task"]["config"]["tasks"] == 1
    small = result["regimes"]["r18_32px"]
    med = small["median_step_s"]
    assert set(med) == {"hard_sharing", "learned", "fixed", "shared_route", "hard_sharing_control"}
    base = (med["hard_sharing"] + med["hard_sharing_control"]) / 2  # both hard-sharing instances
    assert small["shared_route_vs_hard_sharing_step"] == pytest.approx(med["shared_route"] / base)
    assert small["control_vs_hard_sharing_step"] == pytest.approx(med["hard_sharing_control"] / med["hard_sharing"])
    assert set(small["updated_parameters"]) == set(small["grad_pass_s"]) == set(med) - {"hard_sharing_control"}
    upd = small["updated_parameters"]
    # one shared route updates what hard sharing updates (the same active width); two distinct routes
    # (quick: N=4, k=2, legos {0, 1} and {2, 3}) update every lego, twice the lego parameters
    assert upd["shared_route"] == pytest.approx(upd["hard_sharing"], rel=0.02)
    assert upd["fixed"] > 1.5 * upd["shared_route"]
    assert upd["hard_sharing"] <= small["parameters"]["hard_sharing"]
    assert small["learned_vs_hard_sharing_step"] == pytest.approx(med["learned"] / base)
    assert small["fixed_vs_hard_sharing_step"] == pytest.approx(med["fixed"] / base)
    assert small["skipped_steps"] == 0 and small["config"]["tasks"] >= 2
    p = small["parameters"]
    assert p["learned"] == p["fixed"] > p["hard_sharing"]  # N=4 legos stored vs N=k=2
    assert 0.0 <= small["learned_route_churn"] <= 1.0
    # the learned routes train with the engine's default learning rates (they set the route churn)
    assert f"'lr': {TrainConfig.lr}" in small["config"]["optimizer"]
    assert f"'router_lr_mult': {RouterConfig.router_lr_mult}" in small["config"]["optimizer"]
    for passes in small["grad_pass_s"].values():
        assert passes["norm_rel_diff"] < 1e-5  # the written-region norm equals the full norm
        assert passes["fused_written"] > 0 and passes["per_tensor_full"] > 0
    cfg = result["config"]
    assert cfg["threads"] == 1 and cfg["quick"] is True and cfg["torch"] == torch.__version__
    assert set(GOALS) == set(REGIMES)


def _run(values: dict[str, float]) -> dict:
    goals = goal_keys(["r50_1task"])
    return {"goals": goals, **values, "regimes": {"r50_1task": dict(values)}, "config": {"threads": 1}}


def test_processes_combine_to_the_median_of_each_ratio_with_every_value() -> None:
    key, n_key = "r50_1task/routed_vs_dense_step", "r50_1task/routed_n_large_vs_small_step"
    mem = "r50_1task/routed_vs_dense_act_mem"
    runs = [_run({key: 1.10, n_key: 1.00, mem: 1.0}), _run({key: 1.02, n_key: 1.07, mem: 1.0}),
            _run({key: 1.04, n_key: 1.06, mem: 1.0})]
    out = combine_processes(runs)
    assert out[key] == 1.04 and out[n_key] == 1.06  # medians, not means (1.053, 1.043)
    assert out["meets_goals"] == {key: True, n_key: False, mem: True}
    assert out["per_process"][key] == [1.10, 1.02, 1.04] and out["spread"][key] == [1.02, 1.10]
    assert out["config"]["processes"] == 3 and len(out["processes"]) == 3
    assert out["controls_per_process"] == {}  # (no regime with an A/A control ran)


def test_processes_flag_is_not_passed_on() -> None:
    argv = ["--quick", "--processes", "3", "--json", "--regime", "r18_32px", "--processes=2"]
    assert _child_argv(argv) == ["--quick", "--regime", "r18_32px"]


def test_bench_lego_in_two_fresh_processes(capsys) -> None:
    argv = ["--quick", "--json", "--regime", "r18_32px", "--warmup", "0", "--processes", "2"]
    assert main_lego(argv) == 0
    result = json.loads(capsys.readouterr().out)
    key = "r18_32px/learned_vs_hard_sharing_step"
    values = result["per_process"][key]
    assert len(values) == 2 and all(_ratio_ok(v) for v in values)
    assert result[key] == pytest.approx(sum(values) / 2)  # the median of two
    assert [p["r18_32px"][key.split("/")[1]] for p in result["processes"]] == values
    assert result["config"]["processes"] == 2 and result["config"]["quick"] is True
    control = "r18_32px/control_vs_hard_sharing_step"  # each process's A/A ratio, reported, not a goal
    assert result["controls_per_process"][control] == [p["r18_32px"][control.split("/")[1]]
                                                       for p in result["processes"]]
    assert control not in result["goals"]
