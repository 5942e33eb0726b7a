"""`gppf pretrain`: build a run from its config, train it with the SIMT step, evaluate, checkpoint.

Side effects (logging, TensorBoard, progress, checkpoints, report) stay here; the optimisation
itself is ``gppf.engine.simt.SIMTStep``.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from gppf.backbones import create_backbone
from gppf.config import RunConfig, save_config
from gppf.engine import checkpoint as ckpt
from gppf.engine.amp import resolve_amp
from gppf.engine.data import ShardTaskStream, TaskStream
from gppf.engine.distributed import BufferSync, DistInfo, GradSync, init_distributed, plan_tasks, task_groups
from gppf.engine.heap import long_lived_frozen
from gppf.engine.logging import MetricsLogger, Progress
from gppf.engine.model import MultiTaskModel
from gppf.engine.planning import measure_task_costs, saved_plan, static_cost
from gppf.engine.simt import SIMTStep, StepResult
from gppf.engine.tuning import finetune_param_groups, set_trainable
from gppf.engine.weighting import LossWeighting, build_weighting
from gppf.lego.optim import LegoSGD, RowOptimizer
from gppf.lego.router import route_churn
from gppf.tasks import Task, build_task, check_task_types
from gppf.tasks.base import reader_of


class TrainError(RuntimeError):
    """A run cannot start or continue; the message says which task or file is at fault."""


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: RunConfig
    run_dir: Path
    info: DistInfo
    device: torch.device
    model: MultiTaskModel
    tasks: dict[str, Task]
    plan: dict[str, list[int]]
    weighting: LossWeighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step_fn: SIMTStep
    streams: dict[str, TaskStream | ShardTaskStream]
    buffer_sync: BufferSync
    start_step: int = 0
    task_costs: dict[str, float] = field(default_factory=dict)  # the groups planner's costs (empty: not planned)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_threads(requested: int) -> int:
    """Intra-op threads: ``requested``, or half the usable cores (>= 1) so that data loading workers
    get the other half. On small shared CPUs spinning/oversubscribed OpenMP threads cost 10x+
    (measured: a default-recipe step took 10-15 s with 2 threads beside another job vs 1 s with 1)."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def seed_everything(seed: int, *, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_tasks(cfg: RunConfig, *, feature_channels: list[int], pooled_dim: int) -> dict[str, Task]:
    """Build every task; a task that fails to load is named before training starts."""
    if not cfg.tasks:
        raise TrainError("the config lists no tasks (add a 'tasks:' section)")
    tasks = {}
    for tc in cfg.tasks:
        try:
            task = build_task(tc, feature_channels=feature_channels, pooled_dim=pooled_dim)
        except Exception as exc:  # noqa: BLE001 - re-raised with the task named
            raise TrainError(f"task '{tc.name}' ({tc.type}, {tc.data.format}) failed to load: {exc}") from exc
        if len(task.train_set) == 0:
            raise TrainError(f"task '{tc.name}': training split is empty (dataset runs dry)")
        if len(task.val_set) == 0:
            raise TrainError(f"task '{tc.name}': validation split is empty")
        tasks[tc.name] = task
    return tasks


def build_model(cfg: RunConfig) -> MultiTaskModel:
    """The routed backbone (no heads). A fine-tuning run's backbone also routes its source run's tasks
    (``finetune.source_tasks``, first), so that the source checkpoint's router and statistics fit."""
    m = cfg.model
    r = m.router
    router = {"mode": r.mode, "mi_weight": r.mi_weight, "balance_weight": r.balance_weight, "tau_start": r.tau_start,
              "tau_end": r.tau_end, "init_std": r.init_std, "search_until": r.search_until, "freeze_at": r.freeze_at,
              "fixed_routes": {t.name: t.route for t in cfg.tasks if t.route is not None}, "seed": cfg.train.seed}
    extra = {"width_mult": m.width_mult} if m.width_mult != 1.0 else {}
    source = list(cfg.finetune.source_tasks) if cfg.finetune is not None else []
    backbone = create_backbone(m.backbone, tasks=source + [t.name for t in cfg.tasks], legos=m.legos,
                               active=m.active, router=router, **extra)
    linear = cfg.finetune is not None and cfg.finetune.mode == "linear"
    return MultiTaskModel(backbone=backbone, heads={}, frozen_backbone=linear)


def _optimizer(cfg: RunConfig, model: MultiTaskModel, weighting: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if cfg.finetune is not None:
        groups = finetune_param_groups(model, lr=t.lr, weight_decay=t.weight_decay,
                                       router_lr_mult=cfg.model.router.router_lr_mult,
                                       layer_decay=cfg.finetune.layer_decay, head_lr_mult=cfg.finetune.head_lr_mult)
    else:
        groups = model.param_groups(lr=t.lr, weight_decay=t.weight_decay,
                                    router_lr_mult=cfg.model.router.router_lr_mult)
    extra = [p for p in weighting.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0, "lr": t.lr, "name": "loss_weighting"})
    if t.optimizer == "sgd":  # torch.optim.SGD's update; unused legos deferred and caught up exactly
        lazy = {"auto": None, "on": True, "off": False}[t.lazy_legos]
        lego_params = model.backbone.lego_rows()  # the SIMT step prepares their rows and columns
        # torch's fused SGD kernel (CPU and CUDA): on CPU the default per-tensor loop took ~7x longer
        # per step at 32 px (gppf bench lego --regime r18_32px --sgd default vs fused)
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return LegoSGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True, lego_params=lego_params, lazy=lazy,
                       fused=fused or None)
    return torch.optim.AdamW(groups, lr=t.lr)


def _scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warm, total = cfg.train.warmup_steps, max(cfg.train.steps, 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _workers(cfg: RunConfig, task: Task) -> int:
    return task.cfg.num_workers if task.cfg.num_workers is not None else cfg.train.num_workers


def _task_stream(task: Task, *, seed: int, shard: tuple[int, int], workers: int,
                 position: dict | None) -> TaskStream | ShardTaskStream:
    """An infinite stream of ``task``'s batches (shard ``(index, count)`` of each global batch)."""
    batches = _epoch_batches(task, seed)
    if hasattr(reader_of(task.train_set), "stream") and batches is None:  # packed shards: sequential stream
        return ShardTaskStream(reader=reader_of(task.train_set), transform=task.train_set.transform,
                               collate=task.collate, batch_size=task.cfg.batch_size, seed=seed,
                               shard=shard, num_workers=workers, position=position)
    return TaskStream(dataset=task.train_set, collate=task.collate, batch_size=task.cfg.batch_size,
                      seed=seed, shard=shard, num_workers=workers, position=position, epoch_batches=batches)


def _streams(cfg: RunConfig, tasks: dict[str, Task], plan: dict[str, list[int]], info: DistInfo,
             positions: dict[str, dict] | None) -> dict[str, TaskStream | ShardTaskStream]:
    """This rank's infinite stream of each task it trains (its shard of the task's global batch)."""
    streams = {}
    for i, (name, task) in enumerate(tasks.items()):
        ranks = plan[name]
        if info.rank not in ranks:
            continue
        if task.cfg.batch_size < len(ranks):
            raise TrainError(f"task '{name}': batch_size {task.cfg.batch_size} < {len(ranks)} ranks training it")
        streams[name] = _task_stream(task, seed=cfg.train.seed * 1000 + i, shard=(ranks.index(info.rank), len(ranks)),
                                     workers=_workers(cfg, task), position=(positions or {}).get(name))
    return streams


def _plan(cfg: RunConfig, *, model: MultiTaskModel, tasks: dict[str, Task], info: DistInfo, device: torch.device,
          amp: torch.dtype | None, state: dict[str, Any]) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Which ranks train each task: the checkpoint's plan on resume (same tasks and world size), else
    ``plan_tasks`` on the ``dist.task_costs`` (``gppf.engine.planning``); and the costs used (if any)."""
    kept = saved_plan(state, tasks=list(tasks), world=info.world)
    if kept is not None:
        return kept, {}
    if cfg.dist.planner == "all" or info.world == 1:
        return plan_tasks(tasks=list(tasks), costs={}, world=info.world, planner=cfg.dist.planner), {}
    if cfg.dist.task_costs == "measured":
        factories = {n: (lambda t=t, i=i: _task_stream(t, seed=cfg.train.seed * 1000 + i, shard=(0, 1), workers=0,
                                                       position=None))
                     for i, (n, t) in enumerate(tasks.items())}
        costs = measure_task_costs(model=model, streams=factories, device=device, amp_dtype=amp, info=info,
                                   in_process={n: _workers(cfg, t) == 0 for n, t in tasks.items()},
                                   channels_last=cfg.train.channels_last)
    else:
        costs = {n: static_cost(batch_size=t.cfg.batch_size, image_size=t.cfg.image_size) for n, t in tasks.items()}
    probs = _sample_probs(cfg)  # a task that joins a step with probability p costs p x its batch's cost
    costs = {n: c * probs.get(n, 1.0) for n, c in costs.items()}
    return plan_tasks(tasks=list(tasks), costs=costs, world=info.world, planner=cfg.dist.planner), costs


def _sample_probs(cfg: RunConfig) -> dict[str, float]:
    """Per-task probability of joining a step: ``sample_weight`` relative to the largest one."""
    top = max(t.sample_weight for t in cfg.tasks)
    if top <= 0:
        raise TrainError("at least one task needs sample_weight > 0")
    return {t.name: t.sample_weight / top for t in cfg.tasks}


def _epoch_batches(task: Task, seed: int) -> Callable[[int], list[list[int]]] | None:
    """The task type's own deterministic batch sampler (e.g. P x K for reid), as epoch -> batches."""
    sampler = task.batch_sampler(batch_size=task.cfg.batch_size, seed=seed)
    if sampler is None:
        return None

    def epoch_batches(epoch: int) -> list[list[int]]:
        sampler.epoch = epoch
        return [list(b) for b in sampler]

    return epoch_batches


def build_run(cfg: RunConfig, *, run_dir: Path, resume: bool,
              init: Callable[[MultiTaskModel], None] | None = None) -> Run:
    """Construct model, tasks, optimizer, streams and the SIMT step; restore a checkpoint if asked.

    ``init``: called on the built model (heads attached, on the CPU) of a fresh run, before anything is
    trained or frozen, e.g. to load pre-trained weights (``gppf.transfer.finetune``); not on resume.
    A config with a ``finetune`` section freezes and groups parameters as ``gppf.engine.tuning`` says."""
    check_task_types(cfg)  # before any process group or model exists: a clear error naming tasks.<i>.type
    info = init_distributed(backend=cfg.dist.backend)
    seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
    device = resolve_device(cfg.train.device, info)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.threads))
    model = build_model(cfg)
    tasks = build_tasks(cfg, feature_channels=model.backbone.feature_channels, pooled_dim=model.backbone.pooled_dim)
    for name, task in tasks.items():
        model.heads[name] = task.head
    if init is not None and not resume:
        init(model)
    if cfg.finetune is not None:
        set_trainable(model, mode=cfg.finetune.mode, learn_routes=any(t.route is None for t in cfg.tasks))
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    weighting = build_weighting(cfg.train.loss_weighting, tasks=list(tasks),
                                static_weights={n: t.cfg.loss_weight for n, t in tasks.items()}).to(device)
    optimizer = _optimizer(cfg, model, weighting)
    scheduler = _scheduler(cfg, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    start, positions, state = 0, None, {}
    latest = ckpt.find_latest(run_dir) if resume else None
    if resume and latest is None:
        raise TrainError(f"--resume: no checkpoint found under {run_dir / 'checkpoints'}")
    if latest is not None:
        start, state, rng = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler,
                                                 extra_modules={"weighting": weighting})
        positions = state.get("positions", {}).get(str(info.rank))
        ckpt.restore_rng(rng)
    amp = resolve_amp(cfg.train.amp, device)
    plan, costs = _plan(cfg, model=model, tasks=tasks, info=info, device=device, amp=amp, state=state)
    streams = _streams(cfg, tasks, plan, info, positions)
    rows = optimizer if isinstance(optimizer, RowOptimizer) else None  # sparse buckets synced by written rows
    sync = GradSync(params=params, info=info, rows=rows, sparse_below=cfg.dist.sync_sparse_below)
    step_fn = SIMTStep(model=model, streams=streams, losses={n: t.head.loss for n, t in tasks.items() if n in streams},
                       global_batch={n: t.cfg.batch_size for n, t in tasks.items()}, weighting=weighting,
                       optimizer=optimizer, scheduler=scheduler, grad_sync=sync,
                       info=info, device=device, grad_clip=cfg.train.grad_clip, amp_dtype=amp,
                       channels_last=cfg.train.channels_last, sample_probs=_sample_probs(cfg), seed=cfg.train.seed,
                       groups=task_groups(plan, info=info, device=device), sync_bn=cfg.dist.sync_bn,
                       loss_parts={n: t.head.loss_parts for n, t in tasks.items()
                                   if n in streams and hasattr(t.head, "loss_parts")})
    return Run(cfg=cfg, run_dir=run_dir, info=info, device=device, model=model, tasks=tasks, plan=plan,
               weighting=weighting, optimizer=optimizer, scheduler=scheduler, step_fn=step_fn, streams=streams,
               buffer_sync=BufferSync(module=model, info=info), start_step=start, task_costs=costs)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Every task's metrics on its held-out validation split (main rank), plus chance levels.

    Reads the weights as they are (it never changes them): ``_settle`` them on every rank first.
    """
    if isinstance(run.optimizer, LegoSGD) and run.optimizer.pending:
        raise TrainError("evaluate(): deferred lego updates are pending; settle the run on every rank first")
    model, out = run.model, {}
    model.eval()
    amp = run.step_fn.amp_dtype
    for name, task in run.tasks.items():
        metric = task.new_metric()
        loader = DataLoader(task.val_set, batch_size=task.cfg.eval_batch_size or task.cfg.batch_size,
                            shuffle=False, collate_fn=task.collate, num_workers=0,
                            generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        for batch in loader:
            batch = batch.to(run.device, channels_last=run.cfg.train.channels_last)
            with torch.autocast(run.device.type, dtype=amp, enabled=amp is not None):
                outputs = model(batch.images, name)
            metric.update(task.head.predict(_float(outputs), batch), batch)
        out.update({f"{name}/{k}": float(v) for k, v in metric.compute().items()})
        out.update({f"{name}/chance/{k}": float(v) for k, v in task.chance().items()})
    model.train()
    return out


def _float(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: _float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_float(v) for v in outputs)
    return outputs


def _settle(run: Run) -> None:
    """On every rank: apply deferred lego updates (``LegoSGD.flush``, the only place they are applied
    outside a step) before weights are read for evaluation or a checkpoint, so every rank does the same
    arithmetic and replicas stay bit-identical, and merge BN statistics over ranks."""
    if isinstance(run.optimizer, LegoSGD):
        run.optimizer.flush()
    run.buffer_sync()


def save(run: Run, step: int) -> None:
    """Settle weights and statistics, gather sampler positions, write a checkpoint (main rank)."""
    _settle(run)
    positions = _gather_positions(run)
    if run.info.is_main:
        ckpt.save_checkpoint(run.run_dir, step=step, model=run.model, optimizer=run.optimizer,
                             scheduler=run.scheduler, extra_modules={"weighting": run.weighting},
                             state={"positions": positions, "world": run.info.world, "plan": run.plan},
                             rng=ckpt.capture_rng(), keep_last=run.cfg.train.keep_last)


def _gather_positions(run: Run) -> dict[str, dict]:
    mine = {n: s.position() for n, s in run.streams.items()}
    if not run.info.enabled:
        return {"0": mine}
    import torch.distributed as dist

    everyone: list[Any] = [None] * run.info.world
    dist.all_gather_object(everyone, mine)
    return {str(r): p for r, p in enumerate(everyone)}


def write_task_specs(run: Run) -> None:
    """``tasks.json``: what rebuilds each task's head and inputs without its dataset (extraction, export,
    predict, fine-tuning): type, head constructor arguments, class names, input size, normalisation."""
    from gppf.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    specs = {
        name: {"type": task.cfg.type, "head_args": task.head_args, "classes": task.train_set.classes,
               "num_classes": task.num_classes, "image_size": task.cfg.image_size,
               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "primary_metric": task.primary_metric}
        for name, task in run.tasks.items()
    }
    ckpt.atomic_write_text(run.run_dir / "tasks.json", json.dumps(specs, indent=1))


def _write_routes(run: Run) -> None:
    router = run.model.backbone.router  # a fine-tuning run's router also holds its source's tasks: left out
    routes = {name: route for name, route in router.routes().items() if name in run.tasks}
    (run.run_dir / "routes.json").write_text(json.dumps(routes, indent=1))
    meta = {"tasks": list(routes), "num_layers": router.num_layers, "num_legos": router.num_legos,
            "active": router.active, "primary_metric": {n: t.primary_metric for n, t in run.tasks.items()},
            "backbone": run.cfg.model.backbone}
    (run.run_dir / "router.json").write_text(json.dumps(meta, indent=1))


def elastic_restart_count() -> int:
    """How often this node's torchrun agent has relaunched its workers (0: first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def elastic_job() -> bool:
    """Launched by torchrun with ``--max-restarts`` > 0. Every rank decides alike (agents of other nodes
    may count restarts differently), so such a job always continues its own checkpoints."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0


def _check_restart_store(restart: int) -> None:
    """A relaunch on torchrun's shared rendezvous store reads the dead attempt's addresses (gloo fails to
    connect, NCCL may pick a stale id; pytorch/pytorch#135712): name the fix instead of hanging."""
    if restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise TrainError("torchrun restarted this job on its shared rendezvous store, which still holds the failed "
                         "attempt's keys: launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                         "(docs/distributed.md, Elastic restart)")


def can_resume(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint of a run with this very config (``--resume auto`` and elastic
    restarts). False when it holds no complete checkpoint (half-written ``.tmp`` folders never count);
    a ``TrainError`` when its checkpoints belong to a run with another config."""
    if ckpt.find_latest(run_dir) is None:
        return False
    import yaml

    from gppf.config import to_dict

    saved = run_dir / "config.yaml"
    mine = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if not saved.is_file() or yaml.safe_load(saved.read_text()) != mine:
        raise TrainError(f"{run_dir} holds checkpoints of a run with another config ({saved.name} differs): "
                         "resume it with its own config, or choose a new --out directory")
    return True


def train(cfg: RunConfig, *, run_dir: Path, resume: bool = False,
          init: Callable[[MultiTaskModel], None] | None = None) -> dict[str, float]:
    """Run (or resume) a SIMT training; returns the final validation metrics (``init``: see ``build_run``).

    Under ``torchrun --max-restarts N`` (N > 0) a relaunched job resumes from the run's last complete
    checkpoint by itself (see :func:`can_resume`).
    """
    restart = elastic_restart_count()
    _check_restart_store(restart)
    if not resume and elastic_job():
        resume = can_resume(cfg, run_dir)
    if not resume and ckpt.find_latest(run_dir) is not None:
        raise TrainError(f"{run_dir} already holds checkpoints of another run: continue it with "
                         f"--resume {run_dir}, or choose a new --out directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, run_dir=run_dir, resume=resume, init=init)
    if run.info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        write_task_specs(run)
    logger = MetricsLogger(run_dir=run_dir, enabled=run.info.is_main, append=resume)
    amp = run.step_fn.amp_dtype
    logger.run_info(run.start_step, device=str(run.device), world=run.info.world, amp_setting=cfg.train.amp,
                    autocast=str(amp).removeprefix("torch.") if amp is not None else "float32 (off)",
                    **({"plan": run.plan} if run.info.enabled else {}),
                    **({"task_costs_s": run.task_costs} if run.task_costs else {}))
    if elastic_job() and resume:
        logger.warn(f"elastic job (torchrun restart {restart} on this node): resumed from step {run.start_step}")
    progress = Progress(total=cfg.train.steps, start=run.start_step, enabled=run.info.is_main and cfg.train.progress)
    run.model.backbone.router.set_progress(run.start_step, cfg.train.steps)
    try:
        with long_lived_frozen():  # no full garbage collection of the model's objects every few steps
            _train_steps(run, cfg, logger, progress)
        progress.close()
        metrics = _eval_and_log(run, logger, cfg.train.steps)
        save(run, cfg.train.steps)
        if run.info.is_main:
            _write_routes(run)
            from gppf.report import write_report

            write_report(run_dir)
    finally:
        progress.close()
        logger.close()
    return metrics


def _train_steps(run: Run, cfg: RunConfig, logger: MetricsLogger, progress: Progress) -> None:
    """SIMT steps from the run's start to ``cfg.train.steps``: log, evaluate and checkpoint on schedule."""
    bad_streak = 0
    prev_routes = _log_router(run, logger, run.start_step, None)
    for step in range(run.start_step, cfg.train.steps):
        t0 = time.perf_counter()
        result = run.step_fn(step)
        bad_streak = _check_bad(result, bad_streak, cfg.train.max_bad_steps, logger)
        logger.train(result, lr=run.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0,
                     every=cfg.train.log_every)
        progress.update(result, seconds=time.perf_counter() - t0)
        done = step + 1
        run.model.backbone.router.set_progress(done, cfg.train.steps)  # search phase, tau, freeze
        if done % max(cfg.train.log_every, 1) == 0 or done == cfg.train.steps:
            prev_routes = _log_router(run, logger, done, prev_routes)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.steps:
            _eval_and_log(run, logger, done)
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            save(run, done)


def _log_router(run: Run, logger: MetricsLogger, step: int, prev: dict | None) -> dict[str, list[list[int]]]:
    """Log route churn since ``prev``, the k/(k+1) logit margins and the routes; return the routes."""
    router = run.model.backbone.router
    routes = router.routes()
    logger.router(step, churn=None if prev is None else route_churn(prev, routes), margins=router.margins(),
                  routes=routes, frozen=router.frozen)
    return routes


def _log_bad_samples(run: Run, logger: MetricsLogger) -> None:
    """Per-task counts of samples skipped under ``on_bad_sample: skip`` (index time + load time)."""
    for name, task in run.tasks.items():
        indexed = {split: getattr(ds.bad, "total", 0) for split, ds in (("train", task.train_set), ("val", task.val_set))}
        loaded = len(run.streams[name].skipped) if name in run.streams else 0
        if indexed["train"] or indexed["val"] or loaded:
            logger.data_problems(task=name, skipped_index_train=indexed["train"], skipped_index_val=indexed["val"],
                                 skipped_load_train=loaded)


def _eval_and_log(run: Run, logger: MetricsLogger, step: int) -> dict[str, float]:
    _log_bad_samples(run, logger)
    _settle(run)
    metrics = evaluate(run) if run.info.is_main else {}
    logger.val(step, metrics)
    if run.info.enabled:
        import torch.distributed as dist

        dist.barrier()
    return metrics


def _check_bad(result: StepResult, streak: int, limit: int, logger: MetricsLogger) -> int:
    if not result.skipped:
        return 0
    streak += 1
    logger.warn(f"step {result.step}: non-finite loss from {', '.join(result.bad_tasks)}; step skipped "
                f"({streak} in a row, limit {limit})")
    if streak >= limit:
        raise TrainError(f"stopping: {streak} consecutive steps with non-finite loss "
                         f"(last from task(s) {', '.join(result.bad_tasks)}); lower train.lr or check the data")
    return streak
