"""``gppf bench dist``: one rank's timed figures add up; the full 1-vs-2-rank launch (slow)."""
from __future__ import annotations

import json
import math

import pytest

from gppf.bench.dist import TimedIter, bench_config, main_dist, parse_args, summarise, worker
from gppf.engine import simt
from gppf.engine.distributed import TaskGroup
from gppf.lego.optim import LegoSGD


def test_timed_iter_counts_time_blocked_in_next():
    stream = TimedIter(iter([1, 2]))
    assert [next(stream), next(stream)] == [1, 2]
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.seconds >= 0.0


def test_bench_config_same_global_batch_under_every_planner():
    a = bench_config(config=None, overrides=[], quick=False, planner="all", steps=7, workers=0)
    g = bench_config(config=None, overrides=["tasks.0.batch_size=16"], quick=False, planner="groups", steps=7,
                     workers=1)
    assert (a.dist.planner, g.dist.planner, a.dist.backend, a.train.device) == ("all", "groups", "gloo", "cpu")
    assert a.train.threads == 1 and a.train.steps == 7 and g.train.num_workers == 1
    assert [t.batch_size for t in a.tasks] == [32, 32, 16, 16, 16, 32]  # the built-in recipe's
    assert g.tasks[0].batch_size == 16  # user overrides win


def test_one_rank_worker_figures_add_up(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args(["--quick", "--worker", "--out", str(tmp_path / "w"), "--steps", "2", "--warmup", "1"])
    originals = (simt.broadcast_flag, simt.all_reduce_scalars, TaskGroup.sum_, LegoSGD.share_used)
    assert worker(args) == 0
    # the timed collectives are restored afterwards (nothing leaks into the rest of the process)
    assert (simt.broadcast_flag, simt.all_reduce_scalars, TaskGroup.sum_, LegoSGD.share_used) == originals
    rank = json.loads((tmp_path / "w.rank0").read_text())
    assert rank["rank"] == 0 and rank["threads"] == 1 and len(rank["tasks"]) == 6
    assert rank["images"] == 2 * 6 * 8  # 2 timed steps x 6 tasks x quick batch 8
    syncs = ("wait_ranks_s", "grad_allreduce_s", "loss_count_sync_s", "used_rows_sync_s", "loss_scalars_sync_s")
    parts = rank["compute_s"] + rank["data_wait_s"] + sum(rank[k] for k in syncs)
    assert rank["loss_scalars_sync_s"] > 0  # timed (one process: it returns at once, but it ran)
    assert parts == pytest.approx(rank["wall_s"]) and rank["compute_s"] > 0 and rank["data_wait_s"] > 0
    assert math.isfinite(rank["last_loss"])
    assert rank["grad_synced_elements"] == rank["grad_sync_collectives"] == 0  # one process: nothing to reduce
    assert rank["grad_elements"] > 0
    one = summarise({"ranks": [rank], "launch_s": 1.0}, steps=2)
    assert one["steps_per_s"] == pytest.approx(2 / rank["wall_s"]) and one["imbalance"] == 1.0
    assert one["images_per_s"] == pytest.approx(96 / rank["wall_s"])


@pytest.mark.slow
def test_bench_dist_quick_prints_one_json(capsys):
    assert main_dist(["--quick", "--json", "--steps", "1", "--warmup", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result["scaling_efficiency"]) == {"all", "groups", "auto"}
    one = result["variants"]["1_rank"]["steps_per_s"]
    for planner, eff in result["scaling_efficiency"].items():
        assert eff == pytest.approx(result["variants"][f"2_ranks_{planner}"]["steps_per_s"] / (2 * one))
        ranks = result["variants"][f"2_ranks_{planner}"]["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        # both ranks reduced the same spans (the tiny quick model's regions may join into whole buckets)
        assert all(0 < r["grad_synced_elements"] <= r["grad_elements"] for r in ranks)
        assert ranks[0]["grad_synced_elements"] == ranks[1]["grad_synced_elements"]
        assert ranks[0]["grad_sync_collectives"] == ranks[1]["grad_sync_collectives"] > 0
    groups = result["variants"]["2_ranks_groups"]["ranks"]
    assert sorted(groups[0]["tasks"] + groups[1]["tasks"]) == sorted(result["variants"]["1_rank"]["ranks"][0]["tasks"])
    auto = result["variants"]["2_ranks_auto"]["ranks"]
    assert auto[0]["plan"] == auto[1]["plan"]  # both ranks took the same plan (groups' or all's)
    assert all(len(r) == 1 for r in auto[0]["plan"].values()) or all(r == [0, 1] for r in auto[0]["plan"].values())
