"""Task type ``multilabel`` (e.g. pedestrian attributes): ``C`` binary labels per image, ``-1`` unknown.

Metrics ``map`` (mean class AP) and ``mean_acc`` (label-based mA), see ``gppf.metrics.multilabel``.
Head options: ``hidden``, ``dropout``, ``pos_weight`` (BCE weight of positive labels).
Transforms: resize to ``S x S`` (no crop: crops can remove the labelled attribute) + flip.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.data.collate import collate_batch
from gppf.data.transforms import build_train_transform, build_val_transform
from gppf.heads.multilabel import MultilabelHead
from gppf.metrics.multilabel import MultilabelMetric, multilabel_chance
from gppf.tasks.base import TASK_TYPES, TaskType, head_options, iter_targets

HEAD_DEFAULTS: dict[str, Any] = {"hidden": 0, "dropout": 0.0, "pos_weight": 1.0}


def build_head(
    cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
) -> MultilabelHead:
    opts = head_options(cfg, HEAD_DEFAULTS)
    return MultilabelHead(pooled_dim=pooled_dim, num_classes=num_classes, **opts)


def train_transform(cfg: TaskConfig) -> Callable:
    return build_train_transform(image_size=cfg.image_size, mode="resize")


def val_transform(cfg: TaskConfig) -> Callable:
    return build_val_transform(image_size=cfg.image_size, mode="resize")


def new_metric(cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> MultilabelMetric:
    return MultilabelMetric()


def chance(*, num_classes: int, dataset: Dataset) -> dict[str, float]:
    labels_NC = torch.stack([torch.as_tensor(t["labels"]).float() for t in iter_targets(dataset)])
    return multilabel_chance(labels_NC)


MULTILABEL = TaskType(
    name="multilabel",
    build_head=build_head,
    train_transform=train_transform,
    val_transform=val_transform,
    collate=collate_batch,
    new_metric=new_metric,
    chance=chance,
    primary_metric="map",
)
TASK_TYPES.add(MULTILABEL.name, MULTILABEL)
