"""Task type ``segmentation``: per-pixel class ids (``255`` ignored), metrics ``miou`` / ``pixel_acc``.

Metrics are computed on masks at the network input resolution (val masks are letterboxed with nearest
neighbour, padding is ignore). Head options: ``width`` (FPN channels), ``label_smoothing``.
Transforms: train large-scale jitter (0.5x-2x) + random ``S x S`` crop + flip, val letterbox.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.data.collate import collate_batch
from gppf.data.transforms import MASK_IGNORE, build_train_transform, build_val_transform
from gppf.heads.segmentation import SegmentationHead
from gppf.metrics.segmentation import SegmentationMetric, segmentation_chance
from gppf.tasks.base import TASK_TYPES, TaskType, head_options, iter_targets

HEAD_DEFAULTS: dict[str, Any] = {"width": 128, "label_smoothing": 0.0}


def build_head(
    cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
) -> SegmentationHead:
    opts = head_options(cfg, HEAD_DEFAULTS)
    return SegmentationHead(in_channels=feature_channels, num_classes=num_classes, **opts)


def train_transform(cfg: TaskConfig) -> Callable:
    return build_train_transform(image_size=cfg.image_size, mode="jitter")


def val_transform(cfg: TaskConfig) -> Callable:
    return build_val_transform(image_size=cfg.image_size, mode="letterbox")


def new_metric(cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> SegmentationMetric:
    return SegmentationMetric(num_classes=num_classes)


def class_pixel_counts(dataset: Dataset, *, num_classes: int) -> torch.Tensor:
    """int64 ``[K]`` labelled pixels per class over the raw masks of ``dataset`` (ignore skipped)."""
    counts_K = torch.zeros(num_classes, dtype=torch.int64)
    for target in iter_targets(dataset):
        mask_HW = torch.as_tensor(target["mask"]).reshape(-1)
        valid = mask_HW[(mask_HW != MASK_IGNORE) & (mask_HW >= 0) & (mask_HW < num_classes)]
        counts_K += torch.bincount(valid.long(), minlength=num_classes)
    return counts_K


def chance(*, num_classes: int, dataset: Dataset) -> dict[str, float]:
    return segmentation_chance(class_pixel_counts(dataset, num_classes=num_classes))


SEGMENTATION = TaskType(
    name="segmentation",
    build_head=build_head,
    train_transform=train_transform,
    val_transform=val_transform,
    collate=collate_batch,
    new_metric=new_metric,
    chance=chance,
    primary_metric="miou",
)
TASK_TYPES.add(SEGMENTATION.name, SEGMENTATION)
