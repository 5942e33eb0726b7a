"""Task type ``segmentation``: per-pixel class ids (``255`` ignored), metrics ``miou`` / ``pixel_acc``.

Metrics are computed on masks at the network input resolution (val masks are letterboxed with nearest
neighbour, padding is ignore). Head options (from ``SegmentationHead``): ``width`` (FPN channels),
``label_smoothing``, ``ignore_index``.
Transforms: train large-scale jitter (0.5x-2x) + random ``S x S`` crop + flip, val letterbox.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.data.transforms import MASK_IGNORE
from gppf.heads.segmentation import SegmentationHead
from gppf.metrics.segmentation import SegmentationMetric, segmentation_chance
from gppf.tasks.base import TaskType, iter_targets


def class_pixel_counts(dataset: Dataset, *, num_classes: int) -> torch.Tensor:
    """int64 ``[K]`` labelled pixels per class over the raw masks of ``dataset`` (ignore skipped)."""
    counts_K = torch.zeros(num_classes, dtype=torch.int64)
    for target in iter_targets(dataset):
        mask_HW = torch.as_tensor(target["mask"]).reshape(-1)
        valid = mask_HW[(mask_HW != MASK_IGNORE) & (mask_HW >= 0) & (mask_HW < num_classes)]
        counts_K += torch.bincount(valid.long(), minlength=num_classes)
    return counts_K


class SegmentationType(TaskType):
    name = "segmentation"
    head = SegmentationHead
    primary_metric = "miou"
    train_mode = "jitter"
    val_mode = "letterbox"

    def head_inputs(
        self, cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
    ) -> dict[str, Any]:
        return {"in_channels": feature_channels, "num_classes": num_classes}

    def new_metric(self, cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> SegmentationMetric:
        return SegmentationMetric(num_classes=num_classes)

    def chance(self, *, num_classes: int, dataset: Dataset) -> dict[str, float]:
        return segmentation_chance(class_pixel_counts(dataset, num_classes=num_classes))
