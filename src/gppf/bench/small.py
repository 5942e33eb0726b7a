"""The small-image regime of ``gppf bench lego``: whole SIMT steps of GPPF-R18 at 32 px, several tasks.

At small resolution the convolutions are cheap, so every per-step pass over the stored parameters
(non-finite check, clipping, gradient sync, zeroing, optimizer) weighs on the step time. Each variant
is the engine's real ``SIMTStep`` (forward, backward per task, router losses, fused norm with
non-finite check, clipping, ``LegoSGD`` step, zero_grad) on ``tasks`` classification tasks with a
fixed random batch each (data loading excluded), stepped interleaved:

* ``hard_sharing``: ``N = k`` (``active``) with one fixed route shared by every task: the dense
  network of the same active width (the dense fast path, no gathers, no gates);
* ``learned``: ``N = legos``, ``k = active``, learned routes (``topk_st``: straight-through gates and
  router losses), the default estimator of the engine;
* ``fixed``: ``N = legos``, ``k = active``, a distinct fixed route per task (no gates);
* ``shared_route``: ``N = legos``, ``k = active``, one fixed route shared by every task: the lego
  machinery (gathers, in-place gradient accumulation, row-restricted optimizer passes) at the
  parameter volume of hard sharing. Distinct routes use more legos per step (two tasks on disjoint
  routes: twice the parameters to gather, accumulate, update and zero); this variant separates what
  routing itself costs from what owning more parameters costs;
* ``hard_sharing_control``: a second hard-sharing step built the same way (same seed and weights, its
  own memory). Two identical models in one process differ in step time on a shared machine (where
  their memory landed: up to ~7% on this project's CPU machines), so ``control_vs_hard_sharing_step``
  (A/A: ideally 1) is the resolution of the process's ratios, and the baseline of every
  ``*_vs_hard_sharing_step`` ratio is the mean of the two instances' median steps.

``learned_route_churn`` is the median fraction of (task, routing point) routes of ``learned`` that
change from one timed step to the next (routes from fresh logits, the router's learning rate the
engine's default): each change makes ``LegoSGD`` catch up the legos that come back.

``updated_parameters`` is the median number of parameter elements ``LegoSGD`` updated per step (the
union of the step's routes plus every dense parameter).

``grad_pass_s`` times the per-step gradient passes alone on each variant's gradients after a real
step's backward: ``fused_written`` is what the engine does now (one fused norm over the written
gradient regions, which also detects non-finite values), ``per_tensor_full`` the former check (per-tensor
``isfinite`` over every gradient, then ``clip_grad_norm_`` over every gradient).
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gppf
from gppf.bench.common import CLOCKS, Repeat, Stepper, dtype_name, interleaved_times, medians, peak_alloc_bytes, ratio
from gppf.config import RouterConfig, TrainConfig
from gppf.data.collate import Batch
from gppf.engine.distributed import DistInfo, GradSync
from gppf.engine.model import MultiTaskModel
from gppf.engine.simt import SIMTStep, total_norm, written_grads
from gppf.engine.weighting import StaticWeighting
from gppf.lego.optim import LegoSGD, RowMasks
from gppf.lego.router import route_churn

VARIANTS = ("hard_sharing", "learned", "fixed", "shared_route")
CONTROL = "hard_sharing_control"  # a second hard-sharing instance: the A/A control of the baseline
SMALL_DEFAULTS: dict[str, Any] = dict(tasks=2, batch=64, image_size=32, legos=8, active=2, classes=10)
SMALL_QUICK: dict[str, Any] = dict(tasks=2, batch=4, image_size=32, legos=4, active=2, classes=10)
SGD_KERNELS: dict[str, dict[str, bool | None]] = {  # LegoSGD's kernel; "default": torch's choice (the fused kernel is what the trainer uses)
    "fused": dict(fused=True, foreach=None), "foreach": dict(fused=None, foreach=True),
    "default": dict(fused=None, foreach=None)}
# the engine's defaults (``train.*``, ``model.router.router_lr_mult``): the router's learning rate sets how
# often learned routes change, and with them how many skipped legos ``LegoSGD`` catches up per step
OPTIM: dict[str, Any] = dict(lr=TrainConfig.lr, momentum=TrainConfig.momentum, weight_decay=TrainConfig.weight_decay,
                             router_lr_mult=RouterConfig.router_lr_mult, grad_clip=TrainConfig.grad_clip)


class PooledClassifier(nn.Module):
    """Linear classifier on the backbone's pooled features (the bench's task head)."""

    def __init__(self, *, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, features: Any) -> Tensor:
        return self.fc(features.pooled)

    @staticmethod
    def loss(logits: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(logits.float(), batch.stacked["label"])


def task_names(n: int) -> list[str]:
    return [f"task{i}" for i in range(n)]


def distinct_routes(*, tasks: list[str], layers: int, legos: int, active: int) -> dict[str, list[list[int]]]:
    """One fixed route per task: task ``i`` takes legos ``i*k .. i*k+k-1`` (mod N) at every point."""
    return {t: [sorted({(i * active + j) % legos for j in range(active)})] * layers for i, t in enumerate(tasks)}


def build_model(variant: str, *, tasks: list[str], legos: int, active: int, classes: int) -> MultiTaskModel:
    """GPPF-R18 (width 1) with one linear head per task, routed as ``variant`` says."""
    torch.manual_seed(0)
    n = active if variant == "hard_sharing" else legos
    # hard top-k with straight-through gates: the routed step after the search phase (``soft_topk``
    # searches with every lego active, N/k x the compute, for its first steps only)
    backbone = gppf.create_backbone("gppf_r18", tasks=tasks, legos=n, active=active, router={"mode": "topk_st"})
    layers = backbone.router.num_layers
    if variant in ("hard_sharing", "shared_route"):
        for t in tasks:
            backbone.router.fix_route(t, [list(range(active))] * layers)
    elif variant == "fixed":
        for t, route in distinct_routes(tasks=tasks, layers=layers, legos=legos, active=active).items():
            backbone.router.fix_route(t, route)
    elif variant != "learned":
        raise ValueError(f"unknown variant {variant!r}")
    heads = {t: PooledClassifier(dim=backbone.pooled_dim, classes=classes) for t in tasks}
    return MultiTaskModel(backbone=backbone, heads=heads).train().to(memory_format=torch.channels_last)


class TimedLegoSGD(LegoSGD):
    """The trainer's ``LegoSGD``, recording the time of its ``step`` and ``zero_grad`` and the parameter
    elements each step updates; ``frozen``: both do nothing (gradients and the prepared rows stay, for
    probing the gradient passes)."""

    def __init__(self, *args: Any, clock: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.frozen = clock, False
        self.times: dict[str, list[float]] = {"step": [], "zero_grad": []}
        self.updated: list[int] = []
        self._prepared_elements = 0

    def prepare(self, used: RowMasks) -> None:
        super().prepare(used)
        lazy = {id(p) for p in self.lazy_params}
        self._prepared_elements += sum(p.numel() if m is None else p.numel() * int(m.sum()) // m.size
                                       for p, m in used.items() if id(p) in lazy)

    def updated_elements(self) -> int:
        """Elements the coming ``step()`` updates: the prepared lego rows and every other parameter
        with a gradient (an upper bound for lego rows prepared by several calls)."""
        lazy = {id(p) for p in self.lazy_params}
        dense = sum(p.numel() for g in self.param_groups for p in g["params"]
                    if id(p) not in lazy and p.grad is not None)
        return dense + self._prepared_elements

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.frozen:
            return None
        self.updated.append(self.updated_elements())
        self._prepared_elements = 0
        t0 = self.clock()
        out = super().step(closure)
        self.times["step"].append(self.clock() - t0)
        return out

    def zero_grad(self, set_to_none: bool = False) -> None:
        if self.frozen:
            return
        t0 = self.clock()
        super().zero_grad(set_to_none=set_to_none)
        self.times["zero_grad"].append(self.clock() - t0)

    def medians(self, last: int) -> dict[str, float]:
        return {k: statistics.median(v[-last:]) for k, v in self.times.items()}


def build_step(variant: str, *, tasks: int, batch: int, image_size: int, legos: int, active: int,
               classes: int, sgd: str = "fused", clock: str = "wall", device: str = "cpu",
               amp_dtype: torch.dtype | None = torch.bfloat16) -> SIMTStep:
    """The engine's SIMT step over ``tasks`` fixed batches on ``device`` (SGD as the trainer builds it)."""
    names = task_names(tasks)
    model = build_model(variant, tasks=names, legos=legos, active=active, classes=classes).to(device)
    groups = model.param_groups(lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"],
                                router_lr_mult=OPTIM["router_lr_mult"])
    optimizer = TimedLegoSGD(groups, lr=OPTIM["lr"], momentum=OPTIM["momentum"], nesterov=True,
                             lego_params=model.backbone.lego_rows(), clock=CLOCKS[clock],
                             **SGD_KERNELS[sgd])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(1)
    streams = {}
    for t in names:
        x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(memory_format=torch.channels_last)
        y = torch.randint(0, classes, (batch,), generator=gen)
        streams[t] = Repeat(Batch(images=x.to(device), targets=[], stacked={"label": y.to(device)}))
    info = DistInfo()
    return SIMTStep(model=model, streams=streams, losses={t: model.heads[t].loss for t in names},
                    global_batch={t: batch for t in names},
                    weighting=StaticWeighting(tasks=names, static_weights={t: 1.0 for t in names}),
                    optimizer=optimizer, scheduler=None,
                    grad_sync=GradSync(params=params, info=info), info=info,
                    device=torch.device(device), grad_clip=OPTIM["grad_clip"], amp_dtype=amp_dtype,
                    channels_last=True)


def legacy_checks(params: list[nn.Parameter], max_norm: float) -> float:
    """The former per-step passes: per-tensor ``isfinite`` over every gradient, then ``clip_grad_norm_``."""
    grads = [p.grad for p in params if p.grad is not None]
    bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def grad_pass_times(stepper: Stepper, *, repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median time of the fused written-region norm vs the legacy full passes on one step's gradients."""
    step = stepper.step_fn
    opt = step.optimizer
    opt.frozen = True
    replace(step, grad_clip=0.0)(stepper.calls)  # forward + backward: gradients and prepared rows stay
    params = step.grad_sync.params
    times: dict[str, list[float]] = {"fused_written": [], "per_tensor_full": []}
    norms = {}
    for _ in range(repeats):
        t0 = clock()
        norms["fused_written"] = total_norm(written_grads(params, opt))
        t1 = clock()
        norms["per_tensor_full"] = legacy_checks(params, max_norm=float("inf"))
        t2 = clock()
        times["fused_written"].append(t1 - t0)
        times["per_tensor_full"].append(t2 - t1)
    opt.frozen = False
    opt.step()  # consume the prepared rows, as the step would have
    opt.zero_grad(set_to_none=False)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["norm_rel_diff"] = abs(norms["fused_written"] - norms["per_tensor_full"]) / max(norms["per_tensor_full"], 1e-30)
    return out


def run_small_regime(*, tasks: int, batch: int, image_size: int, legos: int, active: int, classes: int,
                     repeats: int, warmup: int, sgd: str = "fused", clock: str = "wall",
                     device: str = "cpu", amp_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """Interleaved whole-SIMT-step times, step memory and gradient-pass times of the variants."""
    steppers = {v: Stepper(build_step(v.removesuffix("_control"), tasks=tasks, batch=batch, image_size=image_size,
                                      legos=legos, active=active, classes=classes, sgd=sgd, clock=clock,
                                      device=device, amp_dtype=amp_dtype))
                for v in (*VARIANTS, CONTROL)}
    router = steppers["learned"].step_fn.model.backbone.router
    seen: list[dict[str, list[list[int]]]] = []  # the learned routes before each step (untimed)
    samples = interleaved_times(steppers, repeats=repeats, warmup=warmup, clock=CLOCKS[clock],
                                setup={"learned": lambda: seen.append(router.routes())})
    seen.append(router.routes())
    churn = [route_churn(a, b) for a, b in zip(seen[warmup:], seen[warmup + 1:])]
    med = medians(samples)
    base = (med["hard_sharing"] + med[CONTROL]) / 2  # the baseline: both hard-sharing instances
    steppers.pop(CONTROL)  # (only its step times are reported)
    optimizer_s = {v: s.step_fn.optimizer.medians(repeats) for v, s in steppers.items()}
    updated = {v: int(statistics.median(s.step_fn.optimizer.updated[-repeats:])) for v, s in steppers.items()}
    mem = {v: peak_alloc_bytes(s, device=device) for v, s in steppers.items()}
    passes = {v: grad_pass_times(s, repeats=max(3, repeats), clock=CLOCKS[clock]) for v, s in steppers.items()}
    params = {v: sum(p.numel() for p in s.step_fn.model.parameters()) for v, s in steppers.items()}
    return {
        "learned_vs_hard_sharing_step": ratio(med["learned"], base),
        "fixed_vs_hard_sharing_step": ratio(med["fixed"], base),
        "shared_route_vs_hard_sharing_step": ratio(med["shared_route"], base),
        "control_vs_hard_sharing_step": ratio(med[CONTROL], med["hard_sharing"]),
        "learned_vs_hard_sharing_act_mem": ratio(mem["learned"], mem["hard_sharing"]),
        "median_step_s": med,
        "step_samples_s": samples,
        "learned_route_churn": statistics.median(churn),
        "step_act_peak_bytes": mem,
        "median_optimizer_s": optimizer_s,
        "grad_pass_s": passes,
        "parameters": params,
        "updated_parameters": updated,
        "skipped_steps": sum(s.skipped for s in steppers.values()),
        "config": dict(backbone="gppf_r18", width_mult=1.0, tasks=tasks, batch_per_task=batch,
                       image_size=image_size, legos=legos, active=active, classes=classes, repeats=repeats,
                       warmup=warmup, clock=clock, device=device, step="gppf.engine.simt.SIMTStep (whole step, fixed batches)",
                       optimizer=f"LegoSGD(nesterov, {sgd} kernel, {OPTIM})", dtype=dtype_name(amp_dtype),
                       memory_format="channels_last"),
    }
