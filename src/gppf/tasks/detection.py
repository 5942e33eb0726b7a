"""Task type ``detection``: boxes + class labels, metrics ``map`` (AP@[.5:.95]) / ``map50`` (COCO).

Head: FCOS (``gppf.heads.detection.FCOSHead``). Head options (``cfg.head``): ``width``, ``num_convs``,
``strides`` (pyramid levels used, default P3-P5), ``center_radius``, ``size_mult``, ``score_thresh``,
``nms_thresh``, ``topk_per_level``, ``max_detections``.
Transforms: train ``RandomResizedCrop`` + flip, val plain resize to ``S x S`` (predictions are mapped
back to original pixels with ``orig_size``); both drop degenerate boxes.
Metric: pycocotools against ``dataset.coco`` (labels -> category ids via ``dataset.cat_ids``) when the
val reader offers them, else against ground truth rebuilt from the val batches.
Chance level: 0 for both keys (a detector guessing boxes at random has AP ~ 0).
"""
from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.data.collate import collate_batch
from gppf.data.transforms import build_train_transform, build_val_transform
from gppf.heads.detection import FCOSHead
from gppf.metrics.coco import CocoDetectionMetric
from gppf.tasks.base import TASK_TYPES, TaskType, head_options

HEAD_DEFAULTS: dict[str, Any] = {
    "width": 128,
    "num_convs": 2,
    "strides": [8, 16, 32],
    "center_radius": 1.5,
    "size_mult": 8.0,
    "score_thresh": 0.05,
    "nms_thresh": 0.6,
    "topk_per_level": 1000,
    "max_detections": 100,
}
FEATURE_STRIDES = (4, 8, 16, 32)


def reader_of(dataset: Any) -> Any:
    """The reader under (possibly nested) ``TransformedDataset`` wrappers."""
    while hasattr(dataset, "base"):
        dataset = dataset.base
    return dataset


def build_head(
    cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
) -> FCOSHead:
    opts = head_options(cfg, HEAD_DEFAULTS)
    opts["strides"] = [int(s) for s in opts["strides"]]
    return FCOSHead(in_channels=feature_channels, in_strides=FEATURE_STRIDES, num_classes=num_classes, **opts)


def train_transform(cfg: TaskConfig) -> Callable:
    return build_train_transform(image_size=cfg.image_size, mode="crop", boxes=True)


def val_transform(cfg: TaskConfig) -> Callable:
    return build_val_transform(image_size=cfg.image_size, mode="resize", boxes=True)


def new_metric(cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> CocoDetectionMetric:
    reader = reader_of(dataset)
    return CocoDetectionMetric(
        num_classes=num_classes, coco=getattr(reader, "coco", None), cat_ids=getattr(reader, "cat_ids", None)
    )


def chance(*, num_classes: int, dataset: Dataset) -> dict[str, float]:
    return {"map": 0.0, "map50": 0.0}


DETECTION = TaskType(
    name="detection",
    build_head=build_head,
    train_transform=train_transform,
    val_transform=val_transform,
    collate=collate_batch,
    new_metric=new_metric,
    chance=chance,
    primary_metric="map",
)
TASK_TYPES.add(DETECTION.name, DETECTION)
