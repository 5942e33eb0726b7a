from __future__ import annotations

import pytest
import torch

from gppf.data.collate import Batch
from gppf.metrics.segmentation import (
    SegmentationMetric,
    confusion_matrix,
    miou_from_confusion,
    pixel_acc_from_confusion,
    segmentation_chance,
)

GT = torch.tensor([0, 0, 0, 1, 1, 2, 255, 2])
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
# IoU: class 0 = 2 / (3 + 3 - 2), class 1 = 1 / (2 + 2 - 1), class 2 = 1 / (2 + 2 - 1)
MIOU = (0.5 + 1 / 3 + 1 / 3) / 3


def test_confusion_hand_computed_and_ignore():
    cm_KK = confusion_matrix(PRED, GT, num_classes=3)
    assert cm_KK.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert miou_from_confusion(cm_KK) == pytest.approx(MIOU)
    assert pixel_acc_from_confusion(cm_KK) == pytest.approx(4 / 7)


def test_miou_only_over_classes_present():
    cm_KK = confusion_matrix(PRED, GT, num_classes=5)  # classes 3, 4 absent from gt and prediction
    assert miou_from_confusion(cm_KK) == pytest.approx(MIOU)
    cm_KK = confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), num_classes=5)  # 3 only predicted
    assert miou_from_confusion(cm_KK) == pytest.approx((1 / 2 + 0) / 2)


def test_out_of_range_gt_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), num_classes=3)


def test_metric_accumulates_over_split():
    metric = SegmentationMetric(num_classes=3)
    for half in (slice(0, 4), slice(4, 8)):
        mask_BHW = GT[half].view(1, 2, 2)
        metric.update(PRED[half].view(1, 2, 2), Batch(images=torch.zeros(1, 3, 2, 2), targets=[{}],
                                                      stacked={"mask": mask_BHW}))
    assert metric.compute() == pytest.approx({"miou": MIOU, "pixel_acc": 4 / 7})


def test_chance_majority_class():
    # pixels per class 6, 3, 1: predicting class 0 -> acc 0.6, IoU_0 = 0.6, others 0
    assert segmentation_chance(torch.tensor([6, 3, 1, 0])) == pytest.approx({"pixel_acc": 0.6, "miou": 0.2})
