"""The typed contracts between backbones, heads, metrics and the data side.

* ``Features``: what every backbone returns (``LegoBackbone.forward``);
* ``Batch``: what every collate returns (``gppf.data.collate``, re-exported here);
* ``Head``: ``forward(feats) -> outputs``, ``loss(outputs, batch) -> Tensor``, ``predict(outputs, batch)``;
* ``CountedHead``: a head whose loss is normalised by a count (positives, labelled keypoints, known
  pixels) also gives ``loss_parts(outputs, batch) -> LossParts``, so that a distributed step can divide
  by the count over every rank that trains the task (``normalized_loss``);
* ``Metric``: ``update(preds, batch)``, ``compute() -> dict[str, float]``, ``reset()``.

This module imports only torch and ``gppf.data.collate``, so backbones, heads and tasks can all use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from gppf.data.collate import Batch

__all__ = ["Batch", "CountedHead", "Features", "FeaturesLike", "Head", "LossParts", "Metric", "Outputs", "Preds",
           "normalized_loss"]

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


LossParts = dict[str, tuple[Tensor, Tensor]]
"""The terms of a count-normalised loss: name -> ``(sum over the batch, count)``, both float scalars;
the loss is ``sum_i sum_i / max(count_i, 1)`` (``normalized_loss``). Constant factors go into the sums."""


def normalized_loss(parts: LossParts, *, counts_P: Tensor | None = None) -> Tensor:
    """``sum over terms of sum / max(count, 1)``. ``counts_P`` (one per term, in ``parts`` order) replaces
    the parts' own counts, e.g. by their total over the ranks that train the task."""
    sums = [s for s, _ in parts.values()]
    if counts_P is None:
        counts_P = torch.stack([torch.as_tensor(c, dtype=torch.float32) for _, c in parts.values()])
    counts_P = counts_P.to(device=sums[0].device, dtype=torch.float32).clamp(min=1.0)
    return torch.stack([s.float() / c for s, c in zip(sums, counts_P)]).sum()


@runtime_checkable
class CountedHead(Head, Protocol):
    """A head whose ``loss`` equals ``normalized_loss(loss_parts(outputs, batch))``."""

    def loss_parts(self, outputs: Outputs, batch: Batch) -> LossParts: ...


@runtime_checkable
class Metric(Protocol):
    """Accumulates predictions over a split; ``compute`` returns the task type's stable keys."""

    def update(self, preds: Preds, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...
