"""Classification head: linear (or one-hidden-layer MLP) on the pooled features, cross-entropy loss."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gppf.interfaces import Batch, Features



def pooled_mlp(*, in_dim: int, out_dim: int, hidden: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """``Dropout -> Linear`` or, with ``hidden > 0``, ``Linear -> ReLU -> Dropout -> Linear``."""
    if hidden > 0:
        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))


class PooledHead(nn.Module):
    """Base of heads mapping pooled features to ``num_classes`` logits with ``pooled_mlp``."""

    def __init__(self, *, pooled_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__} needs num_classes >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.mlp = pooled_mlp(in_dim=pooled_dim, out_dim=num_classes, hidden=hidden, dropout=dropout)

    def forward(self, feats: Features) -> Tensor:
        return self.mlp(feats.pooled)


class ClassificationHead(PooledHead):
    """``forward(feats) -> logits [B, C]``; ``loss`` is CE on ``batch.stacked["label"]``; ``predict`` -> logits."""

    def __init__(
        self, *, pooled_dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(pooled_dim=pooled_dim, num_classes=num_classes, hidden=hidden, dropout=dropout)
        self.label_smoothing = float(label_smoothing)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        labels_B = batch.stacked["label"].to(outputs.device)
        return F.cross_entropy(outputs.float(), labels_B, label_smoothing=self.label_smoothing)

    def predict(self, outputs: Tensor, batch: Batch) -> Tensor:
        return outputs.detach().float()
