"""Task costs for the ``groups`` planner (``dist.task_costs``): measured on the run's own model and data.

``static`` estimates a task's cost as batch x pixels. That misjudges the work: on the built-in
recipe the 64 px tasks with dense heads (keypoints, segmentation, detection) cost 1.7-2.5x the 48 px
classification-like ones, and the old estimate (which also multiplied by the loss weight) put the
two most expensive tasks on one rank. ``measured`` (the default) times, before training, one global
batch of every task through the run's model: the batch's loading (when the task loads in the training
process, ``num_workers: 0``), forward, loss and backward under the run's autocast, on a throw-away copy
of the model (the run's parameters, statistics and RNG streams are left exactly as they were). Every
rank times every task and the costs are averaged over ranks, so all ranks derive the same plan.
The plan is stored in each checkpoint and a resumed run with the same world size keeps it.
"""
from __future__ import annotations

import copy
import random
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from gppf.engine.distributed import DistInfo, all_reduce_scalars
from gppf.engine.model import MultiTaskModel
from gppf.interfaces import Batch

COST_REPEATS = 2  # timed passes per task (the fastest counts: the first pays one-off allocations)


def static_cost(*, batch_size: int, image_size: int) -> float:
    """A task's compute estimate without running it: batch x pixels."""
    return float(batch_size * image_size**2)


def measure_task_costs(*, model: MultiTaskModel, streams: Mapping[str, Callable[[], Iterator[Batch]]],
                       in_process: Mapping[str, bool],
                       device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
                       info: DistInfo) -> dict[str, float]:
    """Seconds of one global batch of each task (see the module docstring), agreed over ranks.

    ``streams``: task -> a factory of a stream of *global* batches (fresh, unsharded); ``in_process``:
    whether the task's batches are loaded in the training process (then loading counts).
    Every rank times every task (all ranks busy at once, as in training) and the mean over ranks counts:
    a single timing on a shared machine moved by up to 1.6x between calls.
    """
    names = list(streams)
    costs = {n: 0.0 for n in names}
    probe = copy.deepcopy(model)
    with _rng_kept(device):
        for name in names:
            costs[name] = _time_task(probe, name, streams[name](), load_counts=in_process[name],
                                     device=device, amp_dtype=amp_dtype, channels_last=channels_last)
    del probe
    if info.enabled:
        costs = {n: c / info.world for n, c in all_reduce_scalars(costs, info, device=device).items()}
    return costs


def _time_task(probe: MultiTaskModel, name: str, stream: Iterator[Batch], *, load_counts: bool,
               device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> float:
    """Fastest of ``COST_REPEATS`` timed (load +) forward + loss + backward passes of one batch."""
    best = float("inf")
    for _ in range(COST_REPEATS):
        t0 = time.perf_counter()
        batch = next(stream)
        load = time.perf_counter() - t0
        batch = batch.to(device, channels_last=channels_last)
        _sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            route = probe.backbone.router(name)
            loss = probe.heads[name].loss(probe(batch.images, name, route=route), batch).float()
        loss.backward()
        _sync(device)
        compute = time.perf_counter() - t1
        probe.zero_grad(set_to_none=True)
        best = min(best, compute + (load if load_counts else 0.0))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _rng_kept:
    """Restores torch's (CPU and ``device``'s), numpy's and Python's global RNG states on exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> None:
        self.torch_cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.numpy = np.random.get_state()
        self.python = random.getstate()

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def saved_plan(state: Mapping[str, Any], *, tasks: list[str], world: int) -> dict[str, list[int]] | None:
    """The plan a checkpoint's run trained with, when it fits this run (same tasks and world size)."""
    plan = state.get("plan")
    if not isinstance(plan, dict) or state.get("world") != world or sorted(plan) != sorted(tasks):
        return None
    return {t: [int(r) for r in plan[t]] for t in tasks}
