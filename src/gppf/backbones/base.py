"""Backbone interface, feature container and the name -> builder registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from gppf.lego.router import TaskRouter
from gppf.registry import Registry


@dataclass
class Features:
    """What every backbone returns: a feature pyramid (strides ``feature_strides``) and pooled features."""

    pyramid: list[Tensor]
    pooled: Tensor


class LegoBackbone(nn.Module):
    """Common interface of lego backbones; subclasses implement ``forward_features``."""

    feature_channels: list[int]
    feature_strides: list[int]
    pooled_dim: int
    router: TaskRouter

    def forward_features(self, x_BCHW: Tensor, task: str) -> list[Tensor]:
        raise NotImplementedError

    def pool(self, pyramid: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, x_BCHW: Tensor, task: str) -> Features:
        pyramid = self.forward_features(x_BCHW, task)
        return Features(pyramid=pyramid, pooled=self.pool(pyramid))

    def forward_pooled(self, x_BCHW: Tensor, task: str) -> Tensor:
        return self.forward(x_BCHW, task).pooled

    @property
    def tasks(self) -> list[str]:
        return list(self.router.tasks)

    def lego_parameters(self) -> list[nn.Parameter]:
        """Parameters other than the router logits."""
        return [p for n, p in self.named_parameters() if not n.startswith("router.")]


BackboneBuilder = Callable[..., LegoBackbone]
BACKBONES: Registry[BackboneBuilder] = Registry("backbone")


def create_backbone(name: str, *, tasks: Sequence[str] = ("default",), **kwargs: Any) -> LegoBackbone:
    """Build a registered backbone, e.g. ``create_backbone("gppf_r50", legos=16, active=4, tasks=[...])``."""
    return BACKBONES.get(name)(tasks=tasks, **kwargs)


def list_backbones() -> list[str]:
    return BACKBONES.names()
