"""``gppf finetune``: train downstream tasks on a pre-trained run's backbone (or, ``--from none``, from scratch).

The downstream run is an ordinary training run (``gppf.engine.trainer.train``: same SIMT step,
optimizer, schedule, checkpoints, metrics, report) whose config carries a ``finetune`` section. Before
training, :func:`finetune` turns the user's config into a self-contained one:

* ``model`` becomes the source run's (``--from none``: the user's own), ``finetune.source`` /
  ``finetune.source_tasks`` name the source run and the tasks its backbone still routes (so the
  checkpoint's router and per-task BN statistics fit), and every downstream task's route is resolved
  to an explicit ``[L][k]`` list in ``tasks.<name>.route`` (except ``learn``, whose route the router learns
  and freezes after ``finetune.learn_steps``), with the method in ``finetune.resolved``.

So ``gppf eval RUN`` and ``gppf finetune --resume RUN`` rebuild the same model from ``RUN/config.yaml``
alone. Weights: the backbone (legos, shared parts, the source tasks' router state and statistics)
comes from the source run's last checkpoint; a downstream task starts from the BN statistics of the
pre-training task its route came from (``copy:<task>``, or ``auto`` choosing a task's route), else of the
same-named source task, else the mixture of all source tasks' statistics. New heads are created; a
head whose task name and type match a pre-training task is loaded from the checkpoint.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gppf.config import ConfigError, FinetuneConfig, RunConfig, TaskConfig
from gppf.engine.model import MultiTaskModel
from gppf.transfer.pretrained import Pretrained, load_pretrained

__all__ = ["Resolved", "finetune", "prepare_config", "resolve_route", "scratch_route"]


@dataclass(frozen=True)
class Resolved:
    """How a downstream task is routed: ``route`` (``None``: learned), the method written to
    ``finetune.resolved`` and the source task whose BN statistics it starts from (``None``: mixture)."""

    route: list[list[int]] | None
    method: str
    statistics_from: str | None


def finetune(cfg: RunConfig, *, from_run: Path | None, run_dir: Path, resume: bool = False) -> dict[str, float]:
    """Fine-tune ``cfg``'s tasks from ``from_run`` (``None``: from scratch, the baseline) into ``run_dir``;
    return the final validation metrics (``task/metric`` as ``gppf pretrain``).

    ``resume``: continue the fine-tuning run in ``run_dir``; ``cfg`` is then its saved ``config.yaml``
    (``from_run`` is ignored: a fine-tuning run directory is self-contained).
    """
    from gppf.engine.trainer import train

    if resume:
        if cfg.finetune is None or not cfg.finetune.source:
            raise ConfigError(f"{run_dir}: its config has no resolved 'finetune' section: not a fine-tuning run "
                              "(resume a pre-training with `gppf pretrain --resume`)")
        return train(cfg, run_dir=run_dir, resume=True)
    source = load_pretrained(from_run) if from_run is not None else None
    prepared, statistics_from = prepare_config(cfg, source=source)
    init = None if source is None else _Transfer(source=source, statistics_from=statistics_from)
    return train(prepared, run_dir=run_dir, resume=False, init=init)


def prepare_config(cfg: RunConfig, *, source: Pretrained | None) -> tuple[RunConfig, dict[str, str | None]]:
    """The self-contained config of the fine-tuning run (see the module docstring) and, per downstream
    task, the source task whose BN statistics it starts from."""
    out = copy.deepcopy(cfg)
    ft = out.finetune = copy.deepcopy(cfg.finetune) if cfg.finetune is not None else FinetuneConfig()
    if ft.source or ft.source_tasks or ft.resolved:
        raise ConfigError("finetune.source / source_tasks / resolved are written by `gppf finetune`; remove them "
                          "(to continue a fine-tuning run use `gppf finetune --resume RUN`)")
    names = [t.name for t in out.tasks]
    _check_route_keys(ft, names)
    if source is not None:
        _check_heads(out, source)
        out.model = copy.deepcopy(source.cfg.model)
        ft.source = str(source.run_dir)
        ft.source_tasks = [t for t in source.model.backbone.tasks if t not in names]
    else:
        ft.source = "none"
    layers, legos = _route_shape(out)
    statistics_from: dict[str, str | None] = {}
    for i, tc in enumerate(out.tasks):
        res = resolve_route(tc, ft, index=i, source=source, layers=layers, legos=legos, active=out.model.active)
        tc.route, ft.resolved[tc.name] = res.route, res.method
        statistics_from[tc.name] = res.statistics_from
    if any(t.route is None for t in out.tasks):
        _learn_schedule(out)
    return out, statistics_from


def _check_route_keys(ft: FinetuneConfig, names: list[str]) -> None:
    if isinstance(ft.route, dict):
        for key in ft.route:
            if key not in names:
                raise ConfigError(f"finetune.route.{key}: no downstream task named '{key}' (tasks: {', '.join(names)})")


def _check_heads(cfg: RunConfig, source: Pretrained) -> None:
    """A downstream task named like a pre-training task continues its head: the types must agree."""
    for tc in cfg.tasks:
        spec = source.specs.get(tc.name)
        if spec is not None and spec.type != tc.type:
            raise ConfigError(f"tasks.{tc.name}.type: the pre-training task '{tc.name}' is a {spec.type} task, "
                              f"whose head this task would continue; rename the task to train a new {tc.type} head")


def _route_shape(cfg: RunConfig) -> tuple[int, int]:
    """``(routing points L, legos N)`` of the configured backbone (built once, on the CPU)."""
    from gppf.engine.trainer import build_model

    probe = copy.deepcopy(cfg)
    probe.finetune = None
    probe.tasks = [TaskConfig(name="probe")]
    router = build_model(probe).backbone.router
    return router.num_layers, router.num_legos


def _learn_schedule(cfg: RunConfig) -> None:
    """``learn``: the router searches for the first half of ``finetune.learn_steps`` and freezes after them."""
    assert cfg.finetune is not None
    n, steps = cfg.finetune.learn_steps, max(cfg.train.steps, 1)
    fraction = min(n if n <= 1 else n / steps, 1.0)
    cfg.model.router.freeze_at = n if n > 1 else fraction
    cfg.model.router.search_until = fraction / 2


def _method(tc: TaskConfig, ft: FinetuneConfig) -> tuple[Any, str]:
    """The requested route of ``tc`` and the config key that asked for it."""
    if tc.route is not None:
        return tc.route, f"tasks.{tc.name}.route"
    if isinstance(ft.route, dict):
        return ft.route.get(tc.name, "auto"), f"finetune.route.{tc.name}"
    return ft.route, "finetune.route"


def resolve_route(tc: TaskConfig, ft: FinetuneConfig, *, index: int, source: Pretrained | None, layers: int,
                  legos: int, active: int) -> Resolved:
    """Resolve one task's route method (``copy:<task>``, ``auto``, ``learn``, explicit list); errors name the key.

    ``--from none`` (``source`` None): ``learn`` and explicit lists are kept; ``copy:`` and ``auto`` (no
    pre-trained legos to choose among: every route is equal) take :func:`scratch_route`.
    """
    value, key = _method(tc, ft)
    if isinstance(value, (list, tuple)):
        return Resolved(_explicit(value, key=key, layers=layers, legos=legos, active=active), "explicit", None)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected auto, learn, copy:<task> or an [L][k] list, got {value!r}")
    same_name = tc.name if source is not None and tc.name in source.model.backbone.tasks else None
    if value == "learn":
        return Resolved(None, "learn", same_name)
    if value.startswith("copy:"):
        src = value[len("copy:"):]
        if source is None:
            return Resolved(scratch_route(layers, active), f"scratch ({value} ignored: --from none)", None)
        routes = source.model.backbone.router.routes()
        if src not in routes:
            raise ConfigError(f"{key}: copy:{src}: unknown pre-training task '{src}' "
                              f"(tasks of {source.run_dir}: {', '.join(routes)})")
        return Resolved(routes[src], value, src)
    if value == "auto":
        if source is None:
            return Resolved(scratch_route(layers, active), "scratch (auto: --from none)", None)
        return _auto(tc, ft, source=source, seed=index)
    raise ConfigError(f"{key}: unknown route method {value!r} (auto, learn, copy:<task> or an [L][k] list)")


def scratch_route(layers: int, active: int) -> list[list[int]]:
    """The route of ``--from none``: legos ``0..k-1`` at every routing point (all legos are fresh, so any
    route is equivalent; this one is fixed and deterministic)."""
    return [list(range(active)) for _ in range(layers)]


def _explicit(value: Any, *, key: str, layers: int, legos: int, active: int) -> list[list[int]]:
    """Validate an explicit ``[L][k]`` route."""
    if len(value) != layers or not all(isinstance(row, (list, tuple)) for row in value):
        raise ConfigError(f"{key}: an explicit route needs {layers} rows (one per routing point) of {active} "
                          f"lego ids, got {len(value)} entries")
    for l, row in enumerate(value):
        if len(row) != active:
            raise ConfigError(f"{key}.{l}: {len(row)} legos, but model.active is {active} (k mismatch)")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in row):
            raise ConfigError(f"{key}.{l}: lego ids must be integers, got {row}")
        bad = [i for i in row if not 0 <= i < legos]
        if bad:
            raise ConfigError(f"{key}.{l}: lego id {bad[0]} out of range [0, {legos})")
        if len(set(row)) != len(row):
            raise ConfigError(f"{key}.{l}: repeats a lego ({row})")
    return [sorted(int(i) for i in row) for row in value]


def _auto(tc: TaskConfig, ft: FinetuneConfig, *, source: Pretrained, seed: int) -> Resolved:
    """Rank the candidate routes on the task's training data (``gppf.transfer.select``); take the best.

    The task starts from the BN statistics its route was scored with (``select.statistics_task``)."""
    from gppf.tasks import build_task
    from gppf.transfer import select
    from gppf.transfer.transferability import TransferabilityError

    backbone = source.model.backbone
    task = build_task(tc, feature_channels=backbone.feature_channels, pooled_dim=backbone.pooled_dim)
    try:
        ranking = select.rank_routes(backbone=backbone, task=task, candidates=select.candidate_routes(backbone),
                                     samples=ft.auto_samples, device=next(backbone.parameters()).device, seed=seed)
    except TransferabilityError as exc:
        raise ConfigError(f"finetune.route: auto cannot rank routes for task '{tc.name}' ({exc}); choose "
                          "copy:<task>, learn or an explicit route for it") from exc
    if os.environ.get("RANK", "0") == "0":  # every rank ranks (same result); one prints
        print(f"auto route for task '{tc.name}' (best first, {ranking[0].method if ranking else '-'}):")
        for r in ranking:
            print(f"  {r.candidate:<32} {r.score:+.4f}")
    if not ranking:
        raise ConfigError(f"finetune.route: auto found no candidate route for task '{tc.name}'")
    best = ranking[0]
    stats = select.statistics_task(backbone, candidate=best.candidate, route=best.route)
    return Resolved([list(map(int, row)) for row in best.route], f"auto:{best.candidate}", stats)


@dataclass
class _Transfer:
    """``build_run``'s ``init``: load the source backbone (and same-named heads) into a fresh model."""

    source: Pretrained
    statistics_from: dict[str, str | None]

    @torch.no_grad()
    def __call__(self, model: MultiTaskModel) -> None:
        src = self.source.model.backbone
        dst = model.backbone
        src_ids = {t: i for i, t in enumerate(src.tasks)}
        rows = [src_ids.get(t) for t in dst.tasks]  # destination task -> source row (None: new task)
        src_state, dst_state = src.state_dict(), dst.state_dict()
        routes = src.router.routes()
        new_state = {}
        for key, value in dst_state.items():
            theirs = src_state[key]
            if key.endswith("task_running_mean") or key.endswith("task_running_var"):
                new_state[key] = self._statistics(key, theirs, rows, dst.tasks, src_ids)
            elif key == "router.logits_TLN":
                new_state[key] = torch.stack([value[j] if r is None else theirs[r] for j, r in enumerate(rows)])
            elif key == "router.frozen_TLK":  # source tasks: their routes, fixed; new tasks: not frozen
                new_state[key] = torch.stack([value[j] if r is None or dst.tasks[j] in self.statistics_from
                                              else torch.tensor(routes[dst.tasks[j]]) for j, r in enumerate(rows)])
            else:
                new_state[key] = theirs
        dst.load_state_dict(new_state, strict=True)
        self._heads(model)

    def _statistics(self, key: str, theirs: torch.Tensor, rows: list[int | None], tasks: list[str],
                    src_ids: dict[str, int]) -> torch.Tensor:
        """Per destination task, the statistics row it starts from (see the module docstring)."""
        if key.endswith("mean"):
            mixture = theirs.mean(0)
        else:  # variance of the mixture of the source tasks' distributions
            mean_key = key[: -len("var")] + "mean"
            means = self.source.model.backbone.state_dict()[mean_key]
            mixture = theirs.mean(0) + means.var(0, unbiased=False)
        out = []
        for task, r in zip(tasks, rows):
            origin = self.statistics_from.get(task, task if r is not None else None)
            out.append(theirs[src_ids[origin]] if origin is not None else mixture)
        return torch.stack(out)

    def _heads(self, model: MultiTaskModel) -> None:
        specs = self.source.specs
        for name, head in model.heads.items():
            if name not in specs or name not in self.source.model.heads:
                continue
            theirs = self.source.model.heads[name]
            try:
                head.load_state_dict(theirs.state_dict(), strict=True)
            except RuntimeError as exc:
                raise ConfigError(f"tasks.{name}: a pre-training task of this name ({specs[name].type}) has a head "
                                  f"that does not fit this task's; rename the task to train a new head ({exc})") from exc
