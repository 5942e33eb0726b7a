"""Re-identification head: BNNeck embedding + identity classifier, CE + batch-hard triplet loss.

``pooled -> Linear -> feat`` (triplet loss), ``feat -> BatchNorm1d (bias frozen) -> emb`` (classifier input
and retrieval embedding), ``emb -> Linear (no bias) -> logits`` over the training identities. Training
identities may be any non-negative ints: classifier row ``i`` belongs to ``identities[i]``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gppf.interfaces import Batch, Features, LossParts, normalized_loss



def batch_hard_triplet_parts(emb_BD: Tensor, ids_B: Tensor, *, margin: float | None = 0.3) -> tuple[Tensor, Tensor]:
    """Batch-hard triplet loss summed over the valid anchors of the batch, and their count.

    Mining (hardest positive, hardest negative of each anchor) sees ``emb_BD`` only: under
    ``torchrun`` a rank's own share of the task's batch (docs/distributed.md, Semantics).
    """
    emb_BD = emb_BD.float()
    sq_B = (emb_BD * emb_BD).sum(1)
    dist_BB = (sq_B.view(-1, 1) + sq_B.view(1, -1) - 2.0 * emb_BD @ emb_BD.T).clamp(min=1e-12).sqrt()
    same_BB = ids_B.view(-1, 1) == ids_B.view(1, -1)
    eye_BB = torch.eye(len(ids_B), dtype=torch.bool, device=emb_BD.device)
    pos_BB, neg_BB = same_BB & ~eye_BB, ~same_BB
    valid_B = pos_BB.any(1) & neg_BB.any(1)
    if not bool(valid_B.any()):
        return emb_BD.sum() * 0.0, emb_BD.new_zeros(())
    hardest_pos_B = dist_BB.masked_fill(~pos_BB, float("-inf")).amax(1)
    hardest_neg_B = dist_BB.masked_fill(~neg_BB, float("inf")).amin(1)
    gap_V = (hardest_pos_B - hardest_neg_B)[valid_B]
    per_anchor_V = F.softplus(gap_V) if margin is None else F.relu(gap_V + margin)
    return per_anchor_V.sum(), valid_B.sum().float()


def batch_hard_triplet_loss(emb_BD: Tensor, ids_B: Tensor, *, margin: float | None = 0.3) -> Tensor:
    """Batch-hard triplet loss on Euclidean distances (soft margin ``softplus`` when ``margin`` is None).

    Anchors without a positive (same id, other sample) or without a negative are left out; a batch with
    no valid anchor gives a zero loss that still depends on ``emb_BD`` (never NaN).
    """
    return normalized_loss({"triplet": batch_hard_triplet_parts(emb_BD, ids_B, margin=margin)})


class ReidHead(nn.Module):
    """``forward(feats) -> {"feat", "emb", "logits"}``; ``predict`` -> L2-normalized ``emb`` ``[B, E]``."""

    def __init__(
        self,
        *,
        pooled_dim: int,
        identities: Sequence[int],
        emb_dim: int = 256,
        margin: float | None = 0.3,
        triplet_weight: float = 1.0,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        ids = [int(i) for i in identities]
        if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
            raise ValueError("ReidHead needs distinct non-negative training identities")
        self.num_ids = len(ids)
        self.margin = margin
        self.triplet_weight = float(triplet_weight)
        self.label_smoothing = float(label_smoothing)
        lookup_M = torch.full((max(ids) + 1,), -1, dtype=torch.int64)
        lookup_M[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("id_to_row", lookup_M, persistent=False)
        self.proj = nn.Linear(pooled_dim, emb_dim)
        self.bnneck = nn.BatchNorm1d(emb_dim)
        self.bnneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(emb_dim, self.num_ids, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feats: Features) -> dict[str, Tensor]:
        feat_BE = self.proj(feats.pooled)
        emb_BE = self.bnneck(feat_BE)
        return {"feat": feat_BE, "emb": emb_BE, "logits": self.classifier(emb_BE)}

    def rows(self, ids_B: Tensor) -> Tensor:
        """Classifier row of each identity (``-1`` for identities unseen in training)."""
        ids_B = ids_B.to(self.id_to_row.device)
        known_B = (ids_B >= 0) & (ids_B < self.id_to_row.numel())
        return torch.where(known_B, self.id_to_row[ids_B.clamp(0, self.id_to_row.numel() - 1)], -1)

    def loss_parts(self, outputs: dict[str, Tensor], batch: Batch) -> LossParts:
        """Cross-entropy summed over samples of known identity, and the weighted batch-hard triplet loss
        summed over valid anchors, each with its count."""
        ids_B = batch.stacked["identity"].to(outputs["feat"].device)
        rows_B = self.rows(ids_B)
        ce = F.cross_entropy(outputs["logits"].float(), rows_B, ignore_index=-1,
                             label_smoothing=self.label_smoothing, reduction="sum")
        triplet, anchors = batch_hard_triplet_parts(outputs["feat"], ids_B, margin=self.margin)
        return {"ce": (ce, (rows_B >= 0).sum().float()), "triplet": (self.triplet_weight * triplet, anchors)}

    def loss(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        return normalized_loss(self.loss_parts(outputs, batch))

    def predict(self, outputs: dict[str, Tensor], batch: Batch) -> Tensor:
        return F.normalize(outputs["emb"].detach().float(), dim=1)
