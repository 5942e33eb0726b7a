"""2 gloo ranks on CPU, tasks with disjoint routes: no hang, and every gradient equals a single process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gppf.engine.distributed import plan_tasks

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(tmp_path: Path, planner: str, world: int, freeze_bn: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"grads_{planner}_{world}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world == 1:
        cmd = [sys.executable, str(WORKER), planner, str(out), freeze_bn]
        env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(WORKER), planner, str(out), freeze_bn]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize(("planner", "freeze_bn"), [("groups", "0"), ("all", "1")])
def test_two_gloo_ranks_match_single_process(tmp_path, planner, freeze_bn):
    single = _run(tmp_path / "single", planner, 1, freeze_bn)
    double = _run(tmp_path / "double", planner, 2, freeze_bn)
    assert _meta(double)["world"] == "2"
    if planner == "groups":  # rank 0 trained only one task: the other task's legos/head were unused there
        assert _meta(double)["trained_here"] in ("a", "b")
    ref, got = load_file(str(single)), load_file(str(double))
    assert ref.keys() == got.keys()
    nonzero = 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        nonzero += int(ref[name].abs().sum() > 0)
    assert nonzero > 10  # heads of both tasks and many backbone tensors got gradient
    # after three steps, both replicas hold bit-identical parameters, equal to the single process's
    rank0, rank1 = load_file(f"{double}.params0"), load_file(f"{double}.params1")
    alone = load_file(f"{single}.params0")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], alone[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert ref["heads.a.fc.weight" if "heads.a.fc.weight" in ref else next(k for k in ref if k.startswith("heads.a"))].abs().sum() > 0


def test_planner_groups_proportional_and_covering():
    plan = plan_tasks(tasks=["a", "b", "c"], costs={"a": 4.0, "b": 2.0, "c": 2.0}, world=8, planner="groups")
    assert sorted(r for ranks in plan.values() for r in ranks) == list(range(8))
    assert len(plan["a"]) == 4 and len(plan["b"]) == 2 and len(plan["c"]) == 2
    few = plan_tasks(tasks=["a", "b", "c"], costs={"a": 4.0, "b": 2.0, "c": 2.0}, world=2, planner="groups")
    assert all(len(r) == 1 for r in few.values()) and {r[0] for r in few.values()} == {0, 1}
    assert plan_tasks(tasks=["a", "b"], costs={"a": 1, "b": 1}, world=3, planner="all") == {"a": [0, 1, 2], "b": [0, 1, 2]}


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank (its all-reduce is the identity)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_grad_sync_reduces_gradients_in_place_as_bucket_views(one_rank_group):
    from gppf.engine.distributed import DistInfo, GradSync

    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    lin = torch.nn.Linear(4, 2)
    params = [conv.weight, conv.bias, lin.weight, lin.bias]
    lin.weight.grad = torch.full_like(lin.weight, 2.0)
    sync = GradSync(params=params, info=DistInfo(rank=0, world=2), bucket_mb=1e-4)  # "two ranks": buckets
    assert len(sync.buckets) >= 2 and sum(b.numel() for b in sync.buckets) == sum(p.numel() for p in params)
    assert torch.equal(lin.weight.grad, torch.full_like(lin.weight, 2.0))  # existing values kept
    assert conv.weight.grad.stride() == conv.weight.stride()  # laid out like its (channels_last) parameter
    owners = {p.grad.untyped_storage().data_ptr() for p in params}
    assert owners <= {b.untyped_storage().data_ptr() for b in sync.buckets}
    conv.weight.grad.add_(1.0)  # accumulating in place writes the bucket
    assert sync.buckets[0].sum() == conv.weight.numel()
    lin.bias.grad = torch.tensor([3.0, 4.0])  # replaced gradient: copied into its view and re-bound
    conv.bias.grad = None
    sync()
    assert torch.equal(lin.bias.grad, torch.tensor([3.0, 4.0])) and torch.equal(conv.bias.grad, torch.zeros(4))
    assert {p.grad.untyped_storage().data_ptr() for p in params} == owners
    assert torch.equal(conv.weight.grad, torch.ones_like(conv.weight))


def test_grad_sync_single_process_keeps_gradients_and_builds_no_buckets():
    from gppf.engine.distributed import DistInfo, GradSync

    lin = torch.nn.Linear(4, 2)
    sync = GradSync(params=list(lin.parameters()), info=DistInfo())
    assert sync.buckets == [] and all(torch.equal(p.grad, torch.zeros_like(p)) for p in lin.parameters())
    grad = lin.weight.grad
    sync()
    assert lin.weight.grad is grad
