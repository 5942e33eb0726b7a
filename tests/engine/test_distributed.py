"""2 gloo ranks on CPU, tasks with disjoint routes: no hang, and every gradient equals a single process."""
from __future__ import annotations

import os
import signal
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
    meta = _meta(double)
    assert meta["world"] == "2"
    # the sync reduced the lego gradients of the legos used on any rank (4 of 5), every other gradient whole
    lazy, params = int(meta["lazy"]), int(meta["params"])
    assert lazy > params // 2 and int(meta["synced"]) == params - lazy // 5
    assert _meta(single)["synced"] == "0"
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


def _launch(world: int, *args: str) -> subprocess.Popen:
    """The worker with ``args``, alone (``world`` 1) or under torchrun, in its own session."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world == 1:
        cmd = [sys.executable, str(WORKER), *args]
        env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(WORKER), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # e.g. a hang: end the launcher and its ranks (its own session)
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += "\n[timed out after 240 s: a hang?]"
    assert proc.returncode == 0, output[-5000:]


def _assert_all_close(got: dict, ref: dict, *, what: str) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def test_two_gloo_ranks_detection_with_batchnorm_in_training_mode(tmp_path):
    """A detection task (loss over its number of positives) beside a classification task, both split
    over 2 ranks (``all`` planner), BatchNorm in training mode, batch 8 = 4 + 4 per step:

    * ``dist.sync_bn: true``: every first-step gradient, the parameters after two steps and the
      per-task BN running statistics equal one process on the same global batch (rtol 1e-4, atol 1e-5;
      gradients up to ~0.4); parameters and statistics are bit-identical on both ranks;
    * BN frozen: equal as well, so the positives are counted over both ranks (with each rank's own
      count instead, 56 of 65 gradient tensors
      differ, e.g. the stem BN bias by 18% of its size);
    * a NaN detection loss on rank 1 with synced BN: both ranks skip the step (no hang);
    * ``dist.sync_bn: false``: each rank normalises with its own 4 images: the backbone's gradients
      differ from one process by O(1) (measured: stem conv 0.89 max abs vs 0.39 max gradient) and each
      rank keeps its own running statistics (merged by ``BufferSync`` at checkpoints).
    """
    single, double = tmp_path / "single", tmp_path / "double"
    procs = [_launch(1, "det", str(single), "bn-sync,bn-frozen"),
             _launch(2, "det", str(double), "bn-sync,bn-local,bn-frozen,bn-sync-nan")]
    for proc in procs:  # the reference and the 2-rank run side by side (the test's wall time)
        _finish(proc)
    for mode in ("bn-sync", "bn-frozen"):
        ref, got = load_file(str(single / f"{mode}.grads")), load_file(str(double / f"{mode}.grads"))
        assert _meta(double / f"{mode}.grads")["world"] == "2"
        assert sum(int(ref[n].abs().sum() > 0) for n in ref) > 40  # detection head, classifier, backbone
        _assert_all_close(got, ref, what=f"{mode} gradient")
        alone = load_file(str(single / f"{mode}.state0"))
        rank0, rank1 = load_file(str(double / f"{mode}.state0")), load_file(str(double / f"{mode}.state1"))
        assert any(n.startswith("buffer.") for n in alone)
        _assert_all_close(rank0, alone, what=f"{mode} after two steps:")
        assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
        losses = [[float(v) for v in _meta(d / f"{mode}.grads")["det_losses"].split(",")] for d in (single, double)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # the logged global detection loss
    # a non-finite loss on one rank with synced BN: both ranks skip that step (no hang), then train on
    nan = _meta(double / "bn-sync-nan.grads")
    assert nan["skipped"] == "True,False"
    assert nan["bad"].split(",")[0] == "<gradient>"  # rank 0: rank 1's NaN reached it through synced BN
    ref, local = load_file(str(single / "bn-sync.grads")), load_file(str(double / "bn-local.grads"))
    stem = "backbone.conv1.weight"
    assert (local[stem] - ref[stem]).abs().max() > 0.2 * ref[stem].abs().max()
    rank0, rank1 = load_file(str(double / "bn-local.state0")), load_file(str(double / "bn-local.state1"))
    stats = "buffer.backbone.bn1.task_running_mean"
    assert not torch.allclose(rank0[stats], rank1[stats])


def test_three_gloo_ranks_task_group_of_two_with_synced_bn(tmp_path):
    """``groups`` planner on 3 ranks: task a on ranks 0 and 1 (a ``dist.new_group`` task group), b alone
    on rank 2; BN in training mode, ``dist.sync_bn: true``: a's BN layers and the collectives of the
    step run in the group of two, b's in none (no hang), and every gradient and the parameters after
    three steps equal one process (rtol 1e-4, atol 1e-5)."""
    single, triple = tmp_path / "single" / "g.safetensors", tmp_path / "triple" / "g.safetensors"
    single.parent.mkdir(parents=True)
    triple.parent.mkdir(parents=True)
    procs = [_launch(1, "groups", str(single), "0", "1"), _launch(3, "groups", str(triple), "0", "1")]
    for proc in procs:
        _finish(proc)
    assert _meta(triple)["world"] == "3" and _meta(triple)["trained_here"] == "a"
    ref, got = load_file(str(single)), load_file(str(triple))
    assert sum(int(ref[n].abs().sum() > 0) for n in ref) > 10
    _assert_all_close(got, ref, what="gradient")
    alone = load_file(f"{single}.params0")
    ranks = [load_file(f"{triple}.params{r}") for r in range(3)]
    _assert_all_close(ranks[0], alone, what="parameters after three steps:")
    assert all(torch.equal(ranks[0][n], other[n]) for other in ranks[1:] for n in alone)


def test_planner_groups_proportional_and_covering():
    plan = plan_tasks(tasks=["a", "b", "c"], costs={"a": 4.0, "b": 2.0, "c": 2.0}, world=8, planner="groups")
    assert sorted(r for ranks in plan.values() for r in ranks) == list(range(8))
    assert len(plan["a"]) == 4 and len(plan["b"]) == 2 and len(plan["c"]) == 2
    few = plan_tasks(tasks=["a", "b", "c"], costs={"a": 4.0, "b": 2.0, "c": 2.0}, world=2, planner="groups")
    assert all(len(r) == 1 for r in few.values()) and {r[0] for r in few.values()} == {0, 1}
    assert plan_tasks(tasks=["a", "b"], costs={"a": 1, "b": 1}, world=3, planner="all") == {
        "a": [0, 1, 2], "b": [0, 1, 2]}


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


def _lego_sync(monkeypatch, **kw: float):
    """One bucket: a lego parameter of 64 legos of a row (512 elements each), one of 16 legos of a column,
    a dense one; a LegoSGD prepared for rows 1 and 40 and columns 1 and 3, their gradients written; the
    sizes of the all-reduces."""
    import gppf.engine.distributed as D
    from gppf.lego.layers import LegoRows, rows_used
    from gppf.lego.optim import LegoSGD

    rows_w, cols_w = torch.nn.Parameter(torch.randn(64, 512)), torch.nn.Parameter(torch.randn(5, 16))
    dense = torch.nn.Parameter(torch.randn(7))
    declared = [LegoRows(param=rows_w, point=0, width=1, legos=64),
                LegoRows(param=cols_w, point=1, width=1, legos=16, dim=1)]
    opt = LegoSGD([rows_w, cols_w, dense], lr=0.1, momentum=0.9, lego_params=declared, lazy=True)
    sync = D.GradSync(params=[rows_w, cols_w, dense], info=D.DistInfo(rank=0, world=2), rows=opt, **kw)
    assert [b.numel() for b in sync.buckets] == [32768 + 80 + 7]
    opt.prepare(rows_used(declared, [torch.tensor([[1, 40], [1, 3]])]))
    rows_w.grad[[1, 40]] = 2.0
    cols_w.grad[:, [1, 3]] = 3.0
    dense.grad.fill_(4.0)
    reduced: list[int] = []
    real = D.dist.all_reduce
    monkeypatch.setattr(D.dist, "all_reduce", lambda t, **kwargs: (reduced.append(t.numel()), real(t, **kwargs))[1])
    opt.share_used()  # (one rank: the union is its own rows)
    sync()
    expect_rows, expect_cols = torch.zeros(64, 512), torch.zeros(5, 16)
    expect_rows[[1, 40]], expect_cols[:, [1, 3]] = 2.0, 3.0
    assert torch.equal(rows_w.grad, expect_rows) and torch.equal(cols_w.grad, expect_cols)
    assert torch.equal(dense.grad, torch.full((7,), 4.0))
    assert {p.grad.untyped_storage().data_ptr() for p in (rows_w, cols_w, dense)} == {
        sync.buckets[0].untyped_storage().data_ptr()}  # still views of the bucket
    assert sync.synced_elements == sum(reduced) and sync.collectives == len(reduced)
    return opt, declared, reduced


def test_grad_sync_reduces_a_sparse_bucket_by_the_regions_written_on_any_rank(one_rank_group, monkeypatch):
    """A bucket whose written regions hold at most ``sparse_below`` of it is reduced by those regions,
    packed: the lego rows (contiguous runs) and columns (strided runs) of the merged routes, dense
    gradients whole."""
    from gppf.lego.layers import rows_used

    opt, declared, reduced = _lego_sync(monkeypatch)
    assert reduced == [2 * 512 + 5 * 2 + 7]  # of 32855 elements
    with pytest.raises(RuntimeError, match="after share_used"):
        opt.prepare(rows_used(declared, [torch.tensor([[0, 2], [0, 2]])]))
    opt.step()
    opt.zero_grad(set_to_none=False)
    opt.prepare(rows_used(declared, [torch.tensor([[0, 2], [0, 2]])]))  # a new step may prepare again


def test_grad_sync_reduces_a_densely_written_bucket_whole_in_place(one_rank_group, monkeypatch):
    _, _, reduced = _lego_sync(monkeypatch, sparse_below=0.01)  # 1041 of 32855 elements: above 1%
    assert reduced == [32855]


def test_grad_sync_single_process_keeps_gradients_and_builds_no_buckets():
    from gppf.engine.distributed import DistInfo, GradSync

    lin = torch.nn.Linear(4, 2)
    sync = GradSync(params=list(lin.parameters()), info=DistInfo())
    assert sync.buckets == [] and all(torch.equal(p.grad, torch.zeros_like(p)) for p in lin.parameters())
    grad = lin.weight.grad
    sync()
    assert lin.weight.grad is grad


class _Recorded(Exception):
    pass


def test_scalar_collectives_build_their_tensors_on_the_training_device(monkeypatch):
    """NCCL reduces CUDA tensors only: every tensor handed to a collective is on ``device`` (here
    ``meta``, which no default could produce)."""
    import gppf.engine.distributed as D

    seen: list[torch.device] = []

    def record(t, *args, **kwargs):
        seen.append(t.device)
        raise _Recorded

    monkeypatch.setattr(D.dist, "all_reduce", record)
    two = D.DistInfo(rank=0, world=2)
    meta = torch.device("meta")
    with pytest.raises(_Recorded):
        D.all_reduce_scalars({"a": 1.0}, two, device=meta)
    with pytest.raises(_Recorded):
        D.broadcast_flag(True, two, device=meta)
    assert seen == [meta, meta]
    # a single process issues no collective at all
    assert D.all_reduce_scalars({"a": 1.0}, D.DistInfo(), device=meta) == {"a": 1.0}
    assert D.broadcast_flag(True, D.DistInfo(), device=meta) is True


def test_scalar_collectives_and_task_group_values(one_rank_group):
    import torch.distributed as dist

    from gppf.engine.distributed import DistInfo, TaskGroup, all_reduce_scalars, broadcast_flag, task_groups

    two, cpu = DistInfo(rank=0, world=2), torch.device("cpu")
    assert all_reduce_scalars({"b": 2.5, "a": 1.0}, two, device=cpu) == {"a": 1.0, "b": 2.5}
    assert broadcast_flag(True, two, device=cpu) and not broadcast_flag(False, two, device=cpu)
    group = TaskGroup(ranks=(0,), device=cpu, group=dist.group.WORLD)
    assert torch.equal(group.sum_(torch.tensor([3.0, 4.0])), torch.tensor([3.0, 4.0]))
    assert torch.equal(group.gather(torch.tensor([1.0, 2.0])), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="training device meta"):  # a tensor off the training device
        TaskGroup(ranks=(0,), device=torch.device("meta"), group=dist.group.WORLD).sum_(torch.ones(2))
    # a task that one rank trains (or a single process) gets no group: no collective, nothing changes
    alone = task_groups({"a": [0], "b": [1]}, info=DistInfo(rank=0, world=2), device=cpu)
    assert not alone["a"].distributed and not alone["b"].distributed
    assert torch.equal(alone["a"].sum_(torch.ones(2)), torch.ones(2))
    assert task_groups({"a": [0, 1]}, info=DistInfo(rank=0, world=2), device=cpu)["a"].group is dist.group.WORLD


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collectives_run_under_nccl_on_cuda():
    """A one-rank NCCL group (its reductions are the identity) rejects CPU tensors: every collective
    of the step, the count sums and synced BatchNorm run on the CUDA training device."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from gppf.engine.distributed import DistInfo, TaskGroup, all_reduce_scalars, broadcast_flag
    from gppf.engine.sync_bn import group_batch_norm

    cuda = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=cuda)
    try:
        two = DistInfo(rank=0, world=2)
        assert all_reduce_scalars({"a": 1.5}, two, device=cuda) == {"a": 1.5}
        assert broadcast_flag(True, two, device=cuda)
        group = TaskGroup(ranks=(0,), device=cuda, group=dist.group.WORLD)
        assert group.sum_(torch.tensor([2.0], device=cuda)).item() == 2.0
        x = torch.randn(4, 3, 5, 5, device=cuda, requires_grad=True)
        w = torch.ones(3, device=cuda, requires_grad=True)
        out = group_batch_norm(x, weight=w, bias=None, running_mean=torch.zeros(3, device=cuda),
                               running_var=torch.ones(3, device=cuda), momentum=0.1, eps=1e-5, group=group)
        out.square().sum().backward()
        torch.testing.assert_close(out, F.batch_norm(x, None, None, w, None, training=True), rtol=1e-4, atol=1e-4)
        assert x.grad is not None and x.grad.device == cuda
    finally:
        dist.destroy_process_group()
