"""Task type ``detection``: boxes + class labels, metrics ``map`` (AP@[.5:.95]) / ``map50`` (COCO).

Head: FCOS (``gppf.heads.detection.FCOSHead``). Head options: the head's keyword arguments with defaults
(``width``, ``num_convs``, ``strides`` (pyramid levels used, default P3-P5), ``center_radius``,
``size_mult``, ``focal_alpha``, ``focal_gamma``, ``prior_prob``, ``score_thresh``, ``nms_thresh``,
``topk_per_level``, ``max_detections``); ``in_strides`` is set from the backbone pyramid.
Transforms: train ``RandomResizedCrop`` + flip, val plain resize to ``S x S`` (predictions are mapped
back to original pixels with ``orig_size``); both drop degenerate boxes.
Metric: pycocotools against ``dataset.coco`` (labels -> category ids via ``dataset.cat_ids``) when the
val reader offers them, else against ground truth rebuilt from the val batches.
Chance level: 0 for both keys (a detector guessing boxes at random has AP ~ 0).
"""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.heads.detection import FCOSHead
from gppf.metrics.coco import CocoDetectionMetric
from gppf.tasks.base import TaskType, reader_of

FEATURE_STRIDES = (4, 8, 16, 32)


class DetectionType(TaskType):
    name = "detection"
    head = FCOSHead
    primary_metric = "map"
    train_mode = "crop"
    boxes = True
    fixed_head_args = ("in_strides",)

    def head_inputs(
        self, cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
    ) -> dict[str, Any]:
        return {"in_channels": feature_channels, "in_strides": FEATURE_STRIDES, "num_classes": num_classes}

    def new_metric(self, cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> CocoDetectionMetric:
        reader = reader_of(dataset)
        return CocoDetectionMetric(
            num_classes=num_classes, coco=getattr(reader, "coco", None), cat_ids=getattr(reader, "cat_ids", None)
        )

    def chance(self, *, num_classes: int, dataset: Dataset) -> dict[str, float]:
        return {"map": 0.0, "map50": 0.0}
