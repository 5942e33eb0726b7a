"""The SIMT step: Single Iteration, Multiple Tasks — one optimizer step sees a batch of every task.

Read top to bottom (``SIMTStep.__call__``):

1. for each task this rank trains and that is sampled this step (every task, or a weighted subset
   drawn from a step-seeded generator so that every rank agrees): draw its next batch (own resolution, collate and sampler), run it
   through its route and head under autocast, weight its loss, scale it by the task's share of the
   global batch and backpropagate at once, which frees the task's graph before the next task (peak
   memory stays near that of the largest single task);
2. add the routers' auxiliary losses (once per step, split over ranks);
3. agree over all ranks whether any loss or gradient was non-finite; if so, skip the step everywhere;
4. all-reduce every gradient in fixed buckets (zeros for unused legos and heads: no rank can hang);
5. clip, optimizer step, scheduler step, zero the gradients (buffers kept for the next step).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from gppf.engine.distributed import DistInfo, GradSync, all_reduce_scalars, broadcast_flag
from gppf.engine.model import MultiTaskModel


@dataclass
class StepResult:
    """What one SIMT step did (values summed over ranks)."""

    step: int
    loss: float
    task_losses: dict[str, float]
    aux_losses: dict[str, float]
    samples: dict[str, int]
    skipped: bool = False
    bad_tasks: list[str] = field(default_factory=list)
    grad_norm: float = 0.0
    router_grads: dict[str, float] = field(default_factory=dict)  # gradient norms on the router logits


@dataclass
class SIMTStep:
    """One optimizer step over every task; all collaborators are passed in explicitly."""

    model: MultiTaskModel
    streams: dict[str, Any]  # task -> iterator of Batch (this rank's shard)
    losses: dict[str, Callable[[Any, Any], torch.Tensor]]  # task -> head.loss
    global_batch: dict[str, int]  # task -> global batch size of one step
    weighting: nn.Module  # LossWeighting: weight(task, loss) -> weighted loss, observe(dict)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    grad_sync: GradSync
    info: DistInfo
    device: torch.device
    grad_clip: float = 0.0
    amp_dtype: torch.dtype | None = torch.bfloat16
    channels_last: bool = True
    sample_probs: dict[str, float] = field(default_factory=dict)  # task -> P(task in a step); missing = 1
    seed: int = 0

    def tasks_this_step(self, step: int) -> list[str]:
        """Tasks sampled for ``step``: all, or each with its probability (at least one task)."""
        names = list(self.global_batch)
        if all(self.sample_probs.get(t, 1.0) >= 1.0 for t in names):
            return names
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draws = torch.rand(len(names), generator=gen).tolist()
        chosen = [t for t, u in zip(names, draws) if u < self.sample_probs.get(t, 1.0)]
        return chosen or [names[int(torch.randint(len(names), (1,), generator=gen))]]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, step: int) -> StepResult:
        task_sum: dict[str, float] = {t: 0.0 for t in self.global_batch}
        count: dict[str, float] = {t: 0.0 for t in self.global_batch}
        bad_tasks: list[str] = []

        # 1. every sampled task of this rank: batch -> route -> head -> weighted loss -> backward
        sampled = self.tasks_this_step(step)
        for task, stream in self.streams.items():
            if task not in sampled:
                continue
            batch = next(stream).to(self.device, channels_last=self.channels_last)
            with self._autocast():
                outputs = self.model(batch.images, task)
                loss = self.losses[task](outputs, batch).float()
            if not torch.isfinite(loss):
                bad_tasks.append(task)
                continue
            share = len(batch) / self.global_batch[task]
            (self.weighting.weight(task, loss) * share).backward()
            task_sum[task] += loss.item() * len(batch)
            count[task] += len(batch)

        # 2. router auxiliary losses, once per step (each rank adds 1/world of them)
        aux, router_grads = router_aux_backward(self.model.backbone.router, world=self.info.world)

        # 3. skip everywhere if any rank saw a non-finite loss or gradient
        bad_grad = not bad_tasks and not _grads_finite(self.grad_sync.params)
        if broadcast_flag(bool(bad_tasks) or bad_grad, self.info):
            self.optimizer.zero_grad(set_to_none=False)
            return self._result(step, task_sum, count, aux, skipped=True,
                                bad=bad_tasks or (["<gradient>"] if bad_grad else ["<other rank>"]))

        # 4. hang-free gradient sync: every parameter, fixed buckets, same order on every rank
        self.grad_sync()

        # 5. clip, step, zero
        norm = 0.0
        if self.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.grad_sync.params, self.grad_clip))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)
        result = self._result(step, task_sum, count, aux, skipped=False, bad=[])
        result.grad_norm, result.router_grads = norm, router_grads
        self.weighting.observe(result.task_losses)
        return result

    def _result(self, step: int, task_sum: dict[str, float], count: dict[str, float],
                aux: dict[str, torch.Tensor], *, skipped: bool, bad: list[str]) -> StepResult:
        """Reduce per-task loss sums and sample counts over ranks into global means."""
        scalars = {f"sum/{t}": v for t, v in task_sum.items()} | {f"n/{t}": v for t, v in count.items()}
        scalars = all_reduce_scalars(scalars, self.info)
        task_losses = {t: scalars[f"sum/{t}"] / scalars[f"n/{t}"] for t in task_sum if scalars[f"n/{t}"] > 0}
        aux_values = {k: float(v.detach()) for k, v in aux.items()}
        weights = self.weighting.weights()
        total = sum(weights.get(t, 1.0) * v for t, v in task_losses.items()) + sum(aux_values.values())
        return StepResult(step=step, loss=total if not skipped else math.nan, task_losses=task_losses,
                          aux_losses=aux_values, samples={t: int(scalars[f"n/{t}"]) for t in task_sum},
                          skipped=skipped, bad_tasks=bad)


def router_aux_backward(router: nn.Module, *, world: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Add the router's auxiliary losses' gradients to its logits; return the losses and gradient norms.

    Norms (this rank, before the all-reduce): ``task`` is the task losses' gradient on the logits so far,
    ``<loss>/rel`` each auxiliary loss's gradient norm relative to it.
    """
    aux = router.aux_losses()
    logits = router.logits_TLN
    task_grad = logits.grad if logits.grad is not None else torch.zeros_like(logits)
    stats = {"task": float(task_grad.norm())}
    for name, value in aux.items():
        if not value.requires_grad:
            continue
        (grad,) = torch.autograd.grad(value / world, logits)
        if stats["task"] > 0:  # zero before the zero-initialised residual branches open (first step)
            stats[f"{name}/rel"] = float(grad.norm()) / stats["task"]
        logits.grad = grad if logits.grad is None else logits.grad.add_(grad)
    return aux, stats


def _grads_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
