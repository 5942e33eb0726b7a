"""The typed contracts between backbones, heads, metrics and the data side.

* ``Features``: what every backbone returns (``LegoBackbone.forward``);
* ``Batch``: what every collate returns (``gppf.data.collate``, re-exported here);
* ``Head``: ``forward(feats) -> outputs``, ``loss(outputs, batch) -> Tensor``, ``predict(outputs, batch)``;
* ``Metric``: ``update(preds, batch)``, ``compute() -> dict[str, float]``, ``reset()``.

This module imports only torch and ``gppf.data.collate``, so backbones, heads and tasks can all use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from gppf.data.collate import Batch

__all__ = ["Batch", "Features", "FeaturesLike", "Head", "Metric", "Outputs", "Preds"]

Outputs = Any
"""A head's raw outputs (a tensor or a dict of tensors); its type never depends on ``training``."""
Preds = Any
"""A head's predictions, in the form its task type's metric consumes."""


@dataclass
class Features:
    """Backbone output: a feature ``pyramid`` (strides ``feature_strides``, ``[B, C_l, H_l, W_l]``) and
    ``pooled`` features ``[B, D]``."""

    pyramid: list[Tensor]
    pooled: Tensor


class FeaturesLike(Protocol):
    """Anything with ``pyramid`` and ``pooled`` (e.g. a test backbone's own container)."""

    pyramid: list[Tensor]
    pooled: Tensor


@runtime_checkable
class Head(Protocol):
    """A task head (an ``nn.Module``). ``loss`` returns a scalar; ``predict`` feeds the task's metric."""

    def forward(self, feats: Features) -> Outputs: ...

    def loss(self, outputs: Outputs, batch: Batch) -> Tensor: ...

    def predict(self, outputs: Outputs, batch: Batch) -> Preds: ...


@runtime_checkable
class Metric(Protocol):
    """Accumulates predictions over a split; ``compute`` returns the task type's stable keys."""

    def update(self, preds: Preds, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...
