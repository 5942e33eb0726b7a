"""Semantic segmentation metrics from a confusion matrix accumulated over the whole split.

``confusion[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``; pixels whose ground
truth equals ``ignore_index`` (255) are skipped. ``miou`` averages ``TP / (TP + FP + FN)`` over the
classes present in the ground truth or in the prediction; ``pixel_acc`` is ``trace / total``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gppf.data.collate import Batch
from gppf.data.transforms import MASK_IGNORE


def confusion_matrix(
    pred_N: Tensor, gt_N: Tensor, *, num_classes: int, ignore_index: int = MASK_IGNORE
) -> Tensor:
    """int64 ``[K, K]`` confusion (rows ground truth, columns prediction) of flat label tensors."""
    valid_N = gt_N != ignore_index
    gt_V, pred_V = gt_N[valid_N].long(), pred_N[valid_N].long()
    if gt_V.numel() and (int(gt_V.min()) < 0 or int(gt_V.max()) >= num_classes):
        raise ValueError(
            f"mask holds class ids outside [0, {num_classes}) other than ignore {ignore_index}: "
            f"min {int(gt_V.min())}, max {int(gt_V.max())}"
        )
    flat_V = gt_V * num_classes + pred_V.clamp(0, num_classes - 1)
    return torch.bincount(flat_V, minlength=num_classes * num_classes).view(num_classes, num_classes)


def miou_from_confusion(confusion_KK: Tensor) -> float:
    """Mean IoU over classes present in ground truth or prediction."""
    cm_KK = confusion_KK.double()
    tp_K = cm_KK.diag()
    union_K = cm_KK.sum(0) + cm_KK.sum(1) - tp_K
    present_K = union_K > 0
    if not bool(present_K.any()):
        raise ValueError("miou: the confusion matrix is empty")
    return float((tp_K[present_K] / union_K[present_K]).mean())


def pixel_acc_from_confusion(confusion_KK: Tensor) -> float:
    total = int(confusion_KK.sum())
    if total == 0:
        raise ValueError("pixel_acc: the confusion matrix is empty")
    return float(confusion_KK.diag().sum()) / total


class SegmentationMetric:
    """Confusion over a split; ``update(preds, batch)`` compares class ids ``[B, H, W]`` with
    ``batch.stacked["mask"]``; ``compute()`` gives ``miou`` and ``pixel_acc``."""

    def __init__(self, *, num_classes: int, ignore_index: int = MASK_IGNORE) -> None:
        if num_classes < 1:
            raise ValueError(f"SegmentationMetric needs num_classes >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, preds: Tensor, batch: Batch) -> None:
        gt_BHW = batch.stacked["mask"]
        if preds.shape != gt_BHW.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} != mask shape {tuple(gt_BHW.shape)}")
        cm_KK = confusion_matrix(
            preds.reshape(-1), gt_BHW.to(preds.device).reshape(-1),
            num_classes=self.num_classes, ignore_index=self.ignore_index,
        )
        self.confusion += cm_KK.cpu()

    def compute(self) -> dict[str, float]:
        return {"miou": miou_from_confusion(self.confusion), "pixel_acc": pixel_acc_from_confusion(self.confusion)}


def segmentation_chance(class_pixels_K: Tensor) -> dict[str, float]:
    """Predicting the majority class everywhere: its pixel frequency as ``pixel_acc``; ``miou`` is its
    IoU (its frequency) divided by the number of classes present in the ground truth."""
    counts_K = class_pixels_K.double()
    total = float(counts_K.sum())
    if total == 0:
        raise ValueError("segmentation_chance: no labelled pixels")
    majority_freq = float(counts_K.max()) / total
    return {"miou": majority_freq / int((counts_K > 0).sum()), "pixel_acc": majority_freq}
