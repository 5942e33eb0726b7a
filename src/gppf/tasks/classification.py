"""Task type ``classification``: single label per image, metrics ``top1`` / ``top5`` (fractions).

Head options (``cfg.head``): ``hidden`` (0 = linear head), ``dropout``, ``label_smoothing``.
Transforms: train ``RandomResizedCrop`` + flip, val resize short side + centre crop.
"""
from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.data.collate import collate_batch
from gppf.data.transforms import build_train_transform, build_val_transform
from gppf.heads.classification import ClassificationHead
from gppf.metrics.classification import TopKAccuracy, classification_chance
from gppf.tasks.base import TASK_TYPES, TaskType, head_options

HEAD_DEFAULTS: dict[str, Any] = {"hidden": 0, "dropout": 0.0, "label_smoothing": 0.0}


def build_head(
    cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
) -> ClassificationHead:
    opts = head_options(cfg, HEAD_DEFAULTS)
    return ClassificationHead(pooled_dim=pooled_dim, num_classes=num_classes, **opts)


def train_transform(cfg: TaskConfig) -> Callable:
    return build_train_transform(image_size=cfg.image_size, mode="crop")


def val_transform(cfg: TaskConfig) -> Callable:
    return build_val_transform(image_size=cfg.image_size, mode="center_crop")


def new_metric(cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> TopKAccuracy:
    return TopKAccuracy(num_classes=num_classes)


def chance(*, num_classes: int, dataset: Dataset) -> dict[str, float]:
    return classification_chance(num_classes=num_classes)


CLASSIFICATION = TaskType(
    name="classification",
    build_head=build_head,
    train_transform=train_transform,
    val_transform=val_transform,
    collate=collate_batch,
    new_metric=new_metric,
    chance=chance,
    primary_metric="top1",
)
TASK_TYPES.add(CLASSIFICATION.name, CLASSIFICATION)
