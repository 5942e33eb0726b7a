"""Top-k accuracy for single-label classification. Values are fractions in ``[0, 1]``."""
from __future__ import annotations

import torch
from torch import Tensor

from gppf.data.collate import Batch


def topk_correct(logits_BC: Tensor, labels_B: Tensor, *, k: int) -> Tensor:
    """Bool ``[B]``: the label is among the ``k`` highest logits (``k`` clipped to ``C``)."""
    k = min(int(k), logits_BC.shape[1])
    top_BK = logits_BC.topk(k, dim=1).indices
    return (top_BK == labels_B.to(top_BK.device).view(-1, 1)).any(dim=1)


class TopKAccuracy:
    """Accumulates ``top1`` and ``top5`` over a split.

    ``top5`` is top-``min(5, C)`` accuracy (so it is 1.0 for ``C <= 5``). ``update(preds, batch)`` takes
    logits ``[B, C]`` and reads ``batch.stacked["label"]``.
    """

    def __init__(self, *, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"TopKAccuracy needs num_classes >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.correct1 = 0
        self.correct5 = 0

    @torch.no_grad()
    def update(self, preds: Tensor, batch: Batch) -> None:
        logits_BC = preds.detach().float()
        labels_B = batch.stacked["label"]
        self.count += int(labels_B.numel())
        self.correct1 += int(topk_correct(logits_BC, labels_B, k=1).sum())
        self.correct5 += int(topk_correct(logits_BC, labels_B, k=5).sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("TopKAccuracy.compute: no samples were seen")
        return {"top1": self.correct1 / self.count, "top5": self.correct5 / self.count}


def classification_chance(*, num_classes: int) -> dict[str, float]:
    """Uniform random guessing: ``top1 = 1/C``, ``top5 = min(5, C)/C``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return {"top1": 1.0 / num_classes, "top5": min(5, num_classes) / num_classes}
