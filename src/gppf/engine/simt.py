"""The SIMT step: Single Iteration, Multiple Tasks — one optimizer step sees a batch of every task.

Read top to bottom (``SIMTStep.__call__``):

1. for each task this rank trains and that is sampled this step (every task, or a weighted subset
   drawn from a step-seeded generator so that every rank agrees): draw its route first, and tell a
   ``LegoSGD`` which lego rows these routes use (``prepare``: the only link between the step and
   the optimizer; it brings those rows up to date before any forward reads them). Then per task: draw
   its next batch (own resolution, collate and sampler), run it through its route and head under
   autocast, weight its loss, scale it by the task's share of the global batch and backpropagate at
   once, which frees the task's graph before the next task (peak memory stays near that of the
   largest single task);
2. add the routers' auxiliary losses (once per step, split over ranks);
3. one fused norm over the network's gradient regions this step wrote (``written_grads``: for a lego
   parameter of a ``LegoSGD``, only the rows prepared for this step; every other row is exactly zero),
   and one over the router's logits, tell whether any gradient is non-finite (a norm is then
   non-finite); agree over all ranks whether any loss or gradient was non-finite and, if so, skip the
   step everywhere;
4. all-reduce the gradients in fixed buckets (zeros for unused parameters; nothing at all in a single
   process): a ``LegoSGD`` first merges the step's lego rows over ranks (``share_used``), so a bucket
   written only sparsely is reduced by the regions any rank wrote, packed, the same on every rank
   (``GradSync``; no rank can hang);
5. clip the network's gradient by its norm after the sync (in a single process the norm of step 3;
   with several ranks the norm of the written regions of all ranks, after the sum), so clipping costs
   one multiply of the written regions, and only when it clips; optimizer step, scheduler step, zero
   the gradients (buffers kept for the next step).

The router's logits are neither in the clipping norm nor clipped: their gradient is rescaled to unit
RMS per routing point (``gppf.lego.router``), a norm of ``sqrt(tasks x points x legos)`` whatever the
loss, so counting it would clip the whole network by a constant factor (``5 / sqrt(6 * 8 * 8) = 0.26``
on the default recipe) whenever routes learn, and not when they are fixed or frozen; the router's
step size is set by its learning rate.

Steps 3, 4 and 5 thus cost in proportion to the legos a step used (on all ranks), not to ``N``,
wherever ``LegoSGD`` tracks lego rows (lazily: on the CPU by default; a weight whose legos are its input
columns, used above ``_STRIDED_MAX_FRACTION``, counts as wholly written).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from gppf.engine.distributed import DistInfo, GradSync, TaskGroup, all_reduce_scalars, broadcast_flag
from gppf.engine.model import MultiTaskModel
from gppf.engine.weighting import LossWeighting
from gppf.engine.sync_bn import SyncBatchStats
from gppf.interfaces import Batch, LossParts, Outputs, normalized_loss
from gppf.lego.layers import rows_used
from gppf.lego.optim import RowOptimizer
from gppf.lego.router import Route


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
    grad_norm: float = 0.0  # the network's gradient norm (router logits excluded), before clipping
    router_grads: dict[str, float] = field(default_factory=dict)  # gradient norms on the router logits


@dataclass
class SIMTStep:
    """One optimizer step over every task; all collaborators are passed in explicitly."""

    model: MultiTaskModel
    streams: dict[str, Iterator[Batch]]  # task -> iterator of Batch (this rank's shard)
    losses: dict[str, Callable[[Outputs, Batch], torch.Tensor]]  # task -> head.loss
    global_batch: dict[str, int]  # task -> global batch size of one step
    weighting: LossWeighting  # weight(task, loss) -> weighted loss, observe(dict)
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
    # task -> its ranks (count-normalised losses and synced BN reduce over them); missing: this rank alone
    groups: dict[str, TaskGroup] = field(default_factory=dict)
    # task -> head.loss_parts for count-normalised losses (gppf.interfaces.CountedHead)
    loss_parts: dict[str, Callable[[Outputs, Batch], LossParts]] = field(default_factory=dict)
    sync_bn: bool = False  # BatchNorm batch statistics over the task's ranks (``dist.sync_bn``)

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

    def _routes(self, tasks: list[str]) -> dict[str, Route]:
        """Route every task of this step, and prepare a ``LegoSGD`` for the lego rows the routes use.

        A task trained on several ranks rescales its share of the router gradient to ``1 / ranks`` RMS
        (``TaskRouter.forward``): the gradient sync sums the shares."""
        with self._autocast():
            routes = {t: self.model.backbone.router(t, grad_rms=self._router_grad_rms(t)) for t in tasks}
        if isinstance(self.optimizer, RowOptimizer) and self.optimizer.lazy_params:
            declared = self.model.backbone.lego_rows()
            self.optimizer.prepare(rows_used(declared, [r.idx_LK for r in routes.values()]))
        return routes

    def __call__(self, step: int) -> StepResult:
        task_sum: dict[str, float] = {t: 0.0 for t in self.global_batch}
        count: dict[str, float] = {t: 0.0 for t in self.global_batch}
        bad_tasks: list[str] = []

        # 1. route every sampled task of this rank (-> optimizer), then batch -> head -> weighted loss -> backward
        sampled = self.tasks_this_step(step)
        routes = self._routes([t for t in self.streams if t in sampled])
        for task, route in routes.items():
            batch = next(self.streams[task]).to(self.device, channels_last=self.channels_last)
            share = len(batch) / self.global_batch[task]
            group = self.groups.get(task)
            synced = self.sync_bn and group is not None and group.distributed
            with self._autocast():
                with SyncBatchStats(group) if synced else contextlib.nullcontext():  # the task's BN layers
                    outputs = self.model(batch.images, task, route=route)
                loss = self._task_loss(task, outputs, batch, share=share)
            if not torch.isfinite(loss):
                bad_tasks.append(task)
                if synced:  # the other ranks' synced-BN backward reduces with ours (the step is skipped)
                    (loss * 0.0).backward()
                continue
            (self.weighting.weight(task, loss) * share).backward()
            task_sum[task] += loss.item() * len(batch)
            count[task] += len(batch)

        # 2. router auxiliary losses, once per step (each rank adds 1/world of them)
        aux, router_grads = router_aux_backward(self.model.backbone.router, world=self.info.world)

        # 3. skip everywhere if any rank saw a non-finite loss or gradient (one fused norm pass)
        network, router = self._network_and_router()
        written = written_grads(network, self.optimizer)
        norm = total_norm(written) if not bad_tasks else 0.0
        router_norm = total_norm([p.grad for p in router if p.grad is not None])
        bad_grad = not (math.isfinite(norm) and math.isfinite(router_norm))
        if broadcast_flag(bool(bad_tasks) or bad_grad, self.info, device=self.device):
            self.optimizer.zero_grad(set_to_none=False)
            return self._result(step, task_sum, count, aux, skipped=True,
                                bad=bad_tasks or (["<gradient>"] if bad_grad else ["<other rank>"]))

        # 4. hang-free gradient sync: the same collectives in the same order on every rank; lego rows
        #    merged over ranks first, so a sparsely written bucket is reduced by the regions any rank wrote
        if self.info.enabled and isinstance(self.optimizer, RowOptimizer):
            self.optimizer.share_used()
        self.grad_sync()

        # 5. clip the network's gradient (by its norm after the sync; the router's is not clipped), step, zero
        if self.info.enabled:  # other ranks' rows arrived: the regions of all ranks, summed
            written = written_grads(network, self.optimizer)
            norm = total_norm(written) if self.grad_clip > 0 else 0.0
        if self.grad_clip > 0:
            clip_(written, norm=norm, max_norm=self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)
        result = self._result(step, task_sum, count, aux, skipped=False, bad=[])
        result.grad_norm, result.router_grads = norm, router_grads
        self.weighting.observe(result.task_losses)
        return result

    def _router_grad_rms(self, task: str) -> float:
        """``1 / ranks`` that train ``task`` (the gradient sync sums their router gradients); 1 alone."""
        group = self.groups.get(task)
        return 1.0 if group is None else 1.0 / len(group.ranks)

    def _network_and_router(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The synced parameters split into the network's (clipped) and the router's (not clipped)."""
        router_ids = {id(p) for p in self.model.backbone.router.parameters()}
        network = [p for p in self.grad_sync.params if id(p) not in router_ids]
        return network, [p for p in self.grad_sync.params if id(p) in router_ids]

    def _task_loss(self, task: str, outputs: Outputs, batch: Batch, *, share: float) -> torch.Tensor:
        """This rank's loss of ``task``, such that ``share`` x it, summed over the task's ranks, is the loss
        of the task's global batch. A count-normalised loss divides its sums by the counts summed over
        the task's ranks (one collective, issued by each of them whatever the values), then by ``share``."""
        group = self.groups.get(task)
        if task not in self.loss_parts or group is None or not group.distributed:
            return self.losses[task](outputs, batch).float()
        parts = self.loss_parts[task](outputs, batch)
        counts_P = torch.stack([c.detach().float().reshape(()) for _, c in parts.values()]).to(self.device)
        return normalized_loss(parts, counts_P=group.sum_(counts_P)) / share

    def _result(self, step: int, task_sum: dict[str, float], count: dict[str, float],
                aux: dict[str, torch.Tensor], *, skipped: bool, bad: list[str]) -> StepResult:
        """Reduce per-task loss sums and sample counts over ranks into global means."""
        scalars = {f"sum/{t}": v for t, v in task_sum.items()} | {f"n/{t}": v for t, v in count.items()}
        scalars = all_reduce_scalars(scalars, self.info, device=self.device)
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


def written_grads(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradient regions a backward may have written since the last ``zero_grad``.

    For a lego parameter of a ``LegoSGD`` (which knows the rows the step's routes use), the views of
    those row runs (contiguous) or column runs (2-D strided; ``LegoSGD.grad_regions``); for every other
    parameter its whole gradient.
    Rows left out are exactly zero (``LegoSGD.zero_grad`` clears every written row), so norms and
    scalings over the regions equal those over the full gradients, at a cost proportional to the legos
    used. Before a ``LegoSGD``'s ``share_used`` only this process's rows are in it; after it, every
    rank's (the same regions on every rank).
    """
    regions = optimizer.grad_regions if isinstance(optimizer, RowOptimizer) else None
    out: list[torch.Tensor] = []
    for p in params:
        if p.grad is None:
            continue
        views = None if regions is None else regions(p)
        out.extend([p.grad] if views is None else views)
    return out


def total_norm(grads: list[torch.Tensor]) -> float:
    """The 2-norm of all ``grads`` together (one fused ``foreach`` pass); ``inf`` / ``nan`` iff some
    element is non-finite (or the sum of squares overflows, which no finite step survives either)."""
    if not grads:
        return 0.0
    rows = [g for g in grads if g.dim() == 2 and g.stride(-1) == 1 and not g.is_contiguous()]
    if not rows:
        return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=True))
    # column runs of lego weights (2-D strided views, ``LegoSGD.grad_regions``): per-row norms (contiguous
    # reductions); torch's norm of a whole strided view is several times slower and sums naively
    rest = [g for g in grads if not (g.dim() == 2 and g.stride(-1) == 1 and not g.is_contiguous())]
    parts = [torch.linalg.vector_norm(g, dim=-1) for g in rows]
    if rest:
        parts.append(torch.nn.utils.get_total_norm(rest, norm_type=2.0, error_if_nonfinite=False, foreach=True)[None])
    return float(torch.linalg.vector_norm(torch.cat([p.float() for p in parts])))


def clip_(grads: list[torch.Tensor], *, norm: float, max_norm: float) -> None:
    """Scale ``grads`` in place by ``max_norm / (norm + 1e-6)`` if that is below 1
    (``torch.nn.utils.clip_grad_norm_``'s rule with a precomputed norm)."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0 and grads:
        torch._foreach_mul_(grads, coef)
