"""Hang-free distributed training: fixed-order flat all-reduce of the gradients, and a task planner.

Every rank issues the same collectives in the same order: after its local backward, each rank
all-reduces the gradients of *all* parameters (zeros where it did not use them) in fixed flat buckets;
a bucket that the step wrote only sparsely (lego rows of a ``LegoSGD``, on the CPU where it tracks
them: the rows any rank's routes used, merged over ranks first) is reduced by its written regions,
packed, so the reduced volume follows the legos used, not ``N``.
No rank ever skips a collective, so legos or heads that are unused on some ranks can never deadlock
(the failure mode of DDP with ``find_unused_parameters``). A task's loss on a rank is scaled by
``local_count / global_count`` of that task's global batch, so the SUM all-reduce yields exactly the
gradient of the global-batch mean, whatever the split of tasks over ranks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gppf.lego.optim import RowOptimizer


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, backend: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ``auto`` takes the ``groups`` plan when its busiest rank's planned cost is at most this multiple of a
# perfect split (total / world); measured on the built-in recipe at 2 CPU ranks (docs/distributed.md),
# ``all`` lost ~15% of ``groups``' throughput to work that does not halve with the batch and to its
# per-task collectives
AUTO_MAX_IMBALANCE = 1.15


def plan_tasks(*, tasks: list[str], costs: dict[str, float], world: int, planner: str) -> dict[str, list[int]]:
    """Ranks that train each task. ``all``: every rank trains every task. ``groups``: ranks are split
    into task groups in proportion to task cost (``gppf.engine.planning``); each task gets at least one
    rank, and with fewer ranks than tasks several tasks share a rank, balanced by cost (``_pack_tasks``).
    ``auto``: the ``groups`` plan if it is balanced within ``AUTO_MAX_IMBALANCE`` (``plan_imbalance``),
    else ``all``."""
    if planner == "all" or world == 1:
        return {t: list(range(world)) for t in tasks}
    if planner == "auto":
        plan = plan_tasks(tasks=tasks, costs=costs, world=world, planner="groups")
        balanced = plan_imbalance(plan, costs=costs, world=world) <= AUTO_MAX_IMBALANCE
        return plan if balanced else plan_tasks(tasks=tasks, costs=costs, world=world, planner="all")
    if world < len(tasks):
        return _pack_tasks(tasks, costs, world)
    total = sum(costs.values())
    share = {t: max(1, math.floor(world * costs[t] / total)) for t in tasks}
    while sum(share.values()) > world:
        share[max(share, key=lambda t: share[t])] -= 1
    for t in sorted(tasks, key=lambda t: -costs[t] / share[t]):
        if sum(share.values()) == world:
            break
        share[t] += 1
    plan, start = {}, 0
    for t in tasks:
        plan[t] = list(range(start, start + share[t]))
        start += share[t]
    return plan


def plan_imbalance(plan: dict[str, list[int]], *, costs: dict[str, float], world: int) -> float:
    """The busiest rank's planned cost (a task's cost split evenly over its ranks) / (total / world):
    1.0 is a perfect split."""
    load = [0.0] * world
    for t, ranks in plan.items():
        for r in ranks:
            load[r] += costs[t] / len(ranks)
    total = sum(load)
    return max(load) * world / total if total > 0 else 1.0


def _pack_tasks(tasks: list[str], costs: dict[str, float], world: int) -> dict[str, list[int]]:
    """One rank per task, minimising the most loaded rank's cost: longest-first greedy, then single
    moves or swaps off the most loaded rank while they lower its load (deterministic for equal costs)."""
    owner: dict[str, int] = {}
    load = [0.0] * world
    for t in sorted(tasks, key=lambda t: -costs[t]):
        r = min(range(world), key=lambda i: load[i])
        owner[t], load[r] = r, load[r] + costs[t]
    while (move := _improving_move(tasks, costs, owner, load)) is not None:
        t, lo, u = move
        hi = owner[t]
        delta = costs[t] - (costs[u] if u is not None else 0.0)
        owner[t], load[hi], load[lo] = lo, load[hi] - delta, load[lo] + delta
        if u is not None:
            owner[u] = hi
    return {t: [owner[t]] for t in tasks}


def _improving_move(tasks: list[str], costs: dict[str, float], owner: dict[str, int],
                    load: list[float]) -> tuple[str, int, str | None] | None:
    """A task ``t`` of the most loaded rank to move to rank ``lo`` (swapped with ``lo``'s task ``u``, or
    not swapped: ``None``) such that both ranks end below the current maximum; ``None`` if there is none."""
    hi = max(range(len(load)), key=lambda i: load[i])
    eps = 1e-12 * (1.0 + load[hi])
    for t in (t for t in tasks if owner[t] == hi):
        for lo in (r for r in range(len(load)) if r != hi):
            for u in [None, *(u for u in tasks if owner[u] == lo)]:
                delta = costs[t] - (costs[u] if u is not None else 0.0)
                if delta > 0 and load[lo] + delta < load[hi] - eps:
                    return t, lo, u
    return None


class GradSync:
    """Sums every parameter's gradient over ranks, in fixed flat buckets (zeros for unused parameters);
    a bucket that the step wrote only sparsely is reduced by its written regions, packed.

    In a single process it does nothing (no buckets, no copies): the gradients are already the sum.
    With several ranks every gradient is a view of one of a few persistent flat buckets (laid out like
    its parameter), so a bucket is all-reduced in place: nothing is flattened or copied back. A gradient
    that was replaced since (set to ``None`` and re-created) is copied into its view once.
    With ``rows`` (a ``LegoSGD`` whose ``share_used()`` merged the step's lego rows over ranks before the
    call), a bucket's written regions are its lego gradients' ``rows.grad_regions`` (the rows any rank's
    routes used: the same on every rank) and every other gradient whole. Where they hold at most
    ``sparse_below`` of the bucket, they are copied into one flat tensor, all-reduced and copied back
    (everything else is zero on every rank), so the reduced volume follows the legos used, not ``N``,
    for two copies of the regions (one all-reduce per region instead cost more on gloo). Every rank
    makes the same choices in the same order (no rank can hang). ``synced_elements``: elements the last
    call all-reduced; ``collectives``: all-reduces it issued.
    """

    def __init__(self, *, params: list[nn.Parameter], info: DistInfo, bucket_mb: float = 25.0,
                 rows: RowOptimizer | None = None, sparse_below: float = 0.6) -> None:
        self.info = info
        self.params = params
        self.rows = rows
        self.sparse_below = sparse_below
        self.synced_elements = self.collectives = 0
        for p in params:  # every parameter owns a gradient buffer from the start
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.buckets: list[Tensor] = []
        self.views: list[list[tuple[nn.Parameter, Tensor]]] = []
        if not info.enabled:
            return
        for group in _chunks(params, bucket_mb * 2**20):
            self._add_bucket(group)

    def _add_bucket(self, params: list[Tensor]) -> None:
        """One flat buffer for ``params``; their gradients become views of it (values kept)."""
        flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        views, offset = [], 0
        for p in params:
            view = _bucket_view(flat, p, offset)
            view.copy_(p.grad)
            p.grad = view
            views.append((p, view))
            offset += p.numel()
        self.buckets.append(flat)
        self.views.append(views)

    def __call__(self) -> None:
        if not self.info.enabled:
            return
        self.synced_elements = self.collectives = 0
        for flat, views in zip(self.buckets, self.views):
            for p, view in views:
                g = p.grad
                if g is None:
                    view.zero_()
                    p.grad = view
                elif g.data_ptr() != view.data_ptr() or g.stride() != view.stride():
                    view.copy_(g)
                    p.grad = view
            regions = self._sparse_regions(flat, views)
            if regions is None:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                n = flat.numel()
            else:
                n = _reduce_packed(regions)
            self.synced_elements += n
            self.collectives += int(n > 0)

    def _sparse_regions(self, flat: Tensor, views: list[tuple[nn.Parameter, Tensor]]) -> list[Tensor] | None:
        """The bucket's written regions if they hold at most ``sparse_below`` of it, else ``None``."""
        if self.rows is None or self.sparse_below <= 0:
            return None
        regions: list[Tensor] = []
        for p, _ in views:
            got = self.rows.grad_regions(p)
            regions.extend([p.grad] if got is None else got)
        return regions if sum(r.numel() for r in regions) <= self.sparse_below * flat.numel() else None


def _reduce_packed(regions: list[Tensor]) -> int:
    """All-reduce ``regions`` (gradient views of one bucket) as one packed tensor; its size."""
    regions = [r for r in regions if r.numel()]
    if not regions:
        return 0
    sizes = [r.numel() for r in regions]
    flat = torch.empty(sum(sizes), dtype=regions[0].dtype, device=regions[0].device)
    parts = [part.view(r.shape) for part, r in zip(flat.split(sizes), regions)]
    torch._foreach_copy_(parts, regions)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    torch._foreach_copy_(regions, parts)
    return flat.numel()


def _chunks(tensors: list[Tensor], limit_bytes: float) -> list[list[Tensor]]:
    """``tensors`` in order, in groups of one dtype and device, each closed once it reaches ``limit_bytes``."""
    out: list[list[Tensor]] = []
    cur: list[Tensor] = []
    size = 0
    for t in tensors:
        if cur and (t.dtype != cur[0].dtype or t.device != cur[0].device):
            out.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.numel() * t.element_size()
        if size >= limit_bytes:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def _bucket_view(flat: Tensor, p: Tensor, offset: int) -> Tensor:
    """``p.numel()`` elements of ``flat`` from ``offset``, shaped and strided like ``p`` when ``p`` is
    contiguous or channels_last (dense either way), else contiguous. A tensor on the bucket's storage,
    not an autograd view of it, so that optimizers may ``detach_()`` it in ``zero_grad``."""
    if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
        stride = p.stride()
    else:
        stride = torch.empty(p.shape, device="meta").stride()
    out = torch.empty(0, dtype=flat.dtype, device=flat.device)
    with torch.no_grad():
        out.set_(flat.untyped_storage(), flat.storage_offset() + offset, p.shape, stride)
    return out


class BufferSync:
    """Merges BatchNorm running statistics across ranks before eval and checkpoints.

    A rank only updates the statistics of the legos its tasks used. Each element that changed since
    the last sync is averaged over the ranks that changed it; untouched elements keep their value.
    """

    def __init__(self, *, module: nn.Module, info: DistInfo) -> None:
        self.info = info
        self.buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.snapshot = [b.detach().clone() for b in self.buffers]

    def __call__(self) -> None:
        if not self.info.enabled:
            return
        for buf, snap in zip(self.buffers, self.snapshot):
            changed = (buf != snap).to(buf.dtype)
            stacked = torch.stack([buf * changed, changed])
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
            merged = torch.where(stacked[1] > 0, stacked[0] / stacked[1].clamp_min(1), snap)
            buf.copy_(merged)
            snap.copy_(merged)


def all_reduce_scalars(values: dict[str, float], info: DistInfo, *, device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over ranks (same keys on every rank, sorted order).

    The tensor lives on ``device`` (the training device): NCCL reduces CUDA tensors only.
    """
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def broadcast_flag(flag: bool, info: DistInfo, *, device: torch.device) -> bool:
    """True on every rank if any rank says True (a tensor on the training ``device``, as NCCL needs)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclass(frozen=True, eq=False)
class TaskGroup:
    """The ranks that train one task and the process group over them.

    ``group`` is ``None`` where no collective is needed: a single process, or a task that one rank
    trains alone (the ``groups`` planner with a task per rank). Collectives on it use tensors on
    ``device``, the training device.
    """

    ranks: tuple[int, ...]
    device: torch.device
    group: Any = None  # a torch.distributed ProcessGroup

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` (on ``device``) in place with SUM over the task's ranks; returns it."""
        if self.group is not None:
            self._check(t)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def gather(self, t: Tensor) -> Tensor:
        """``[ranks, *t.shape]``: ``t`` of every rank of the group (``t[None]`` without a group)."""
        if self.group is None:
            return t[None]
        self._check(t)
        out = [torch.empty_like(t) for _ in self.ranks]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def _check(self, t: Tensor) -> None:
        index = self.device.index
        if t.device.type != self.device.type or (index is not None and t.device.index != index):
            raise ValueError(f"a task-group collective got a tensor on {t.device}, not the training "
                             f"device {self.device}")


def task_groups(plan: dict[str, list[int]], *, info: DistInfo, device: torch.device) -> dict[str, TaskGroup]:
    """A ``TaskGroup`` per task of ``plan`` (task -> ranks). Every rank must call this, with the same
    plan: ``dist.new_group`` is collective, called in the plan's task order on every rank (also by
    ranks outside the group). A task on every rank uses the default (world) group; a task on one
    rank gets no group."""
    out = {}
    for task, ranks in plan.items():
        group = None
        if info.enabled and len(ranks) > 1:
            group = dist.group.WORLD if len(ranks) == info.world else dist.new_group(ranks=sorted(ranks))
        out[task] = TaskGroup(ranks=tuple(ranks), device=device, group=group)
    return out
