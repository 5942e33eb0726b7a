"""The backbone template (``LegoBackbone``) and ``create_backbone`` over ``gppf.registry.BACKBONES``.

Every backbone runs the same ``forward``: ``forward_features(x, task)`` computes the routed trunk output
(whatever the architecture needs: ResNet a list of stage maps, ViT a ``TokenGrid``) under the task's BN
statistics, then ``pyramid(trunk)`` and ``pool(trunk)`` read the two views heads use (``Features``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import torch
from torch import Tensor, nn

from gppf import registry
from gppf.interfaces import Features
from gppf.lego.layers import LegoRows
from gppf.lego.router import Route, TaskRouter
from gppf.registry import Registry

Trunk = TypeVar("Trunk")

__all__ = ["BACKBONES", "BackboneBuilder", "Features", "LegoBackbone", "create_backbone", "list_backbones"]


class LegoBackbone(nn.Module, Generic[Trunk]):
    """Template of lego backbones; subclasses implement ``forward_features``, ``pyramid`` and ``pool``.

    Subclasses set ``feature_channels`` / ``feature_strides`` (the pyramid), ``pooled_dim`` and ``router``.
    """

    feature_channels: list[int]
    feature_strides: list[int]
    pooled_dim: int
    router: TaskRouter

    def forward_features(self, x_BCHW: Tensor, task: str, *, route: Route | None = None) -> Trunk:
        """The trunk output of ``task`` along ``route`` (default: ``self.router(task)``), called under
        the task's BN statistics."""
        raise NotImplementedError

    def pyramid(self, trunk: Trunk) -> list[Tensor]:
        """Feature maps at ``feature_strides`` with ``feature_channels``."""
        raise NotImplementedError

    def pool(self, trunk: Trunk) -> Tensor:
        """Pooled features ``[B, pooled_dim]``."""
        raise NotImplementedError

    def lego_rows(self) -> list[LegoRows]:
        """Every parameter whose rows (or, ``dim=1``, columns) are lego channels, with the routing point
        that picks them.

        A training step maps its routes to the rows they use (``gppf.lego.layers.rows_used``) and tells
        its optimizer (``LegoSGD.prepare``); parameters not listed are dense. The default lists none:
        always correct (plain SGD for every parameter), only not lazy.
        """
        return []

    def forward(self, x_BCHW: Tensor, task: str, *, route: Route | None = None) -> Features:
        """Features of ``task``; ``route`` (default ``self.router(task)``) lets a step route once, up front."""
        with self.task_statistics(task):
            trunk = self.forward_features(x_BCHW, task, route=route)
        return Features(pyramid=self.pyramid(trunk), pooled=self.pool(trunk))

    def forward_pooled(self, x_BCHW: Tensor, task: str, *, route: Route | None = None) -> Tensor:
        """Only the pooled features (skips dense pyramid work, e.g. the ViT's simple pyramid)."""
        with self.task_statistics(task):
            trunk = self.forward_features(x_BCHW, task, route=route)
        return self.pool(trunk)

    # ------------------------------------------------------------------ per-task BN statistics
    def init_task_statistics(self) -> None:
        """Give every BatchNorm per-task running statistics (buffers ``task_running_mean/var`` [T, C]).

        Affine weights stay shared (they are lego parameters); only the normalisation statistics are
        kept per task, because tasks come from different visual domains: one blended EMA over all
        domains normalises each domain wrongly at eval (measured on the default recipe: detection
        mAP50 0.015 with blended statistics vs 0.267 with the task's own batch statistics).
        """
        tasks = len(self.router.tasks)
        for bn in self._batch_norms():
            bn.register_buffer("task_running_mean", bn.running_mean.detach().repeat(tasks, 1))
            bn.register_buffer("task_running_var", bn.running_var.detach().repeat(tasks, 1))

    def _batch_norms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]

    @contextlib.contextmanager
    def task_statistics(self, task: str) -> Iterator[None]:
        """Use ``task``'s BN running statistics inside the block (and store their updates after)."""
        bns = [m for m in self._batch_norms() if hasattr(m, "task_running_mean")]
        t = self.router.task_id(task)
        with torch.no_grad():
            for bn in bns:
                bn.running_mean.copy_(bn.task_running_mean[t])
                bn.running_var.copy_(bn.task_running_var[t])
        yield
        if self.training:
            with torch.no_grad():
                for bn in bns:
                    bn.task_running_mean[t].copy_(bn.running_mean)
                    bn.task_running_var[t].copy_(bn.running_var)

    def add_task(self, task: str, *, init_from: str | None = None) -> None:
        """Route a new task (e.g. for sparse transfer), copying ``init_from``'s logits and statistics."""
        src = self.router.task_id(init_from) if init_from else None
        self.router.add_task(task, init_from=init_from)
        for bn in self._batch_norms():
            if hasattr(bn, "task_running_mean"):
                mean = bn.task_running_mean[src] if src is not None else torch.zeros_like(bn.running_mean)
                var = bn.task_running_var[src] if src is not None else torch.ones_like(bn.running_var)
                bn.task_running_mean = torch.cat([bn.task_running_mean, mean[None]])
                bn.task_running_var = torch.cat([bn.task_running_var, var[None]])

    @property
    def tasks(self) -> list[str]:
        return list(self.router.tasks)

    def lego_parameters(self) -> list[nn.Parameter]:
        """Parameters other than the router logits."""
        return [p for n, p in self.named_parameters() if not n.startswith("router.")]


BackboneBuilder = Callable[..., LegoBackbone]
"""``builder(*, tasks, legos=..., active=..., width_mult=..., router=...) -> LegoBackbone``."""
BACKBONES: Registry[BackboneBuilder] = registry.BACKBONES


def create_backbone(name: str, *, tasks: Sequence[str] = ("default",), **kwargs: Any) -> LegoBackbone:
    """Build a registered backbone, e.g. ``create_backbone("gppf_r50", legos=16, active=4, tasks=[...])``."""
    return BACKBONES.get(name)(tasks=tasks, **kwargs)


def list_backbones() -> list[str]:
    """Names of the registered backbones (built-in and entry points)."""
    return BACKBONES.names()
