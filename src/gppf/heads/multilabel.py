"""Multi-label head: linear (or MLP) on pooled features, BCE-with-logits that ignores ``-1`` labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gppf.heads.classification import PooledHead
from gppf.interfaces import Batch, LossParts, normalized_loss


def masked_bce_parts(logits_BC: Tensor, labels_BC: Tensor, *, pos_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """BCE summed over entries with a known label (``0``/``1``; ``-1`` is ignored), and their count."""
    known_BC = labels_BC >= 0
    weight_C = torch.full((logits_BC.shape[1],), float(pos_weight), device=logits_BC.device)
    bce_BC = F.binary_cross_entropy_with_logits(
        logits_BC.float(), labels_BC.float().clamp(min=0), pos_weight=weight_C, reduction="none"
    )
    return (bce_BC * known_BC).sum(), known_BC.sum().float()


def masked_bce_with_logits(logits_BC: Tensor, labels_BC: Tensor, *, pos_weight: float = 1.0) -> Tensor:
    """Mean BCE over entries with a known label (``0``/``1``); ``-1`` entries are ignored.

    A batch without any known label gives a zero loss that still depends on ``logits_BC``.
    """
    return normalized_loss({"bce": masked_bce_parts(logits_BC, labels_BC, pos_weight=pos_weight)})


class MultilabelHead(PooledHead):
    """``forward(feats) -> logits [B, C]``; ``loss`` on ``batch.stacked["labels"]``; ``predict`` -> probabilities."""

    def __init__(
        self, *, pooled_dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0, pos_weight: float = 1.0
    ) -> None:
        super().__init__(pooled_dim=pooled_dim, num_classes=num_classes, hidden=hidden, dropout=dropout)
        self.pos_weight = float(pos_weight)

    def loss_parts(self, outputs: Tensor, batch: Batch) -> LossParts:
        labels_BC = batch.stacked["labels"].to(outputs.device)
        return {"bce": masked_bce_parts(outputs, labels_BC, pos_weight=self.pos_weight)}

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return normalized_loss(self.loss_parts(outputs, batch))

    def predict(self, outputs: Tensor, batch: Batch) -> Tensor:
        return torch.sigmoid(outputs.detach().float())
