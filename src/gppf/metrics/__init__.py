"""Task metrics. Every value is a fraction in ``[0, 1]`` (higher is better)."""
from __future__ import annotations

from gppf.metrics.classification import TopKAccuracy, classification_chance, topk_correct
from gppf.metrics.multilabel import (
    MultilabelMetric,
    average_precision,
    expected_random_ap,
    label_mean_accuracy,
    mean_average_precision,
    multilabel_chance,
)
from gppf.metrics.retrieval import RetrievalMetric, query_gallery_split, retrieval_chance, retrieval_metrics
from gppf.metrics.segmentation import (
    SegmentationMetric,
    confusion_matrix,
    miou_from_confusion,
    pixel_acc_from_confusion,
    segmentation_chance,
)

__all__ = [
    "MultilabelMetric",
    "RetrievalMetric",
    "SegmentationMetric",
    "TopKAccuracy",
    "average_precision",
    "classification_chance",
    "confusion_matrix",
    "expected_random_ap",
    "label_mean_accuracy",
    "mean_average_precision",
    "miou_from_confusion",
    "multilabel_chance",
    "pixel_acc_from_confusion",
    "query_gallery_split",
    "retrieval_chance",
    "retrieval_metrics",
    "segmentation_chance",
    "topk_correct",
]
