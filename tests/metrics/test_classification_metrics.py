from __future__ import annotations

import pytest
import torch

from gppf.data.collate import Batch
from gppf.metrics.classification import TopKAccuracy, classification_chance


def _batch(labels):
    return Batch(images=torch.zeros(len(labels), 3, 2, 2), targets=[{} for _ in labels],
                 stacked={"label": torch.tensor(labels)})


def test_top1_top5_hand_computed():
    logits_BC = torch.tensor([
        [0.1, 0.2, 0.9, 0.3, 0.0, 0.0],  # label 2: rank 1
        [0.1, 0.5, 0.6, 0.7, 0.8, 0.9],  # label 0: rank 6 -> misses top5
        [0.9, 0.8, 0.1, 0.2, 0.3, 0.0],  # label 1: rank 2
        [0.9, 0.8, 0.7, 0.6, 0.1, 0.5],  # label 5: rank 5
    ])
    metric = TopKAccuracy(num_classes=6)
    metric.update(logits_BC[:2], _batch([2, 0]))
    metric.update(logits_BC[2:], _batch([1, 5]))
    assert metric.compute() == pytest.approx({"top1": 0.25, "top5": 0.75})
    metric.reset()
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()


def test_top5_uses_min_5_c():
    metric = TopKAccuracy(num_classes=3)
    metric.update(torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]]), _batch([0, 2]))
    assert metric.compute() == {"top1": 0.0, "top5": 1.0}


def test_chance():
    assert classification_chance(num_classes=10) == pytest.approx({"top1": 0.1, "top5": 0.5})
    assert classification_chance(num_classes=2) == pytest.approx({"top1": 0.5, "top5": 1.0})
