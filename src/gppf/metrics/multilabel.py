"""Multi-label metrics: class-wise average precision (``map``) and label-based mean accuracy (``mean_acc``).

Labels are ``1`` (positive), ``0`` (negative) or ``-1`` (unknown; ignored everywhere).

* ``average_precision`` equals sklearn's ``average_precision_score``: ``sum_n (R_n - R_{n-1}) P_n`` over the
  distinct score thresholds (tied scores form one threshold). ``map`` averages it over classes that have at
  least one known positive.
* ``mean_acc`` is the pedestrian-attribute "label-based mA": per class ``(TPR + TNR) / 2`` at threshold 0.5
  on probabilities, averaged over classes with any known label. A class without known positives (or
  negatives) uses only the rate that is defined.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gppf.data.collate import Batch


def average_precision(scores_N: Tensor, targets_N: Tensor) -> float:
    """sklearn-style AP of ``scores_N`` for binary ``targets_N`` (needs at least one positive)."""
    targets_N = targets_N.float()
    if float(targets_N.sum()) <= 0:
        raise ValueError("average_precision needs at least one positive")
    order_N = torch.argsort(scores_N, descending=True, stable=True)
    scores_sorted_N = scores_N[order_N]
    hits_N = targets_N[order_N]
    tp_N = hits_N.cumsum(0)
    seen_N = torch.arange(1, hits_N.numel() + 1, dtype=torch.float32, device=hits_N.device)
    last_of_tie_T = torch.nonzero(scores_sorted_N[1:] != scores_sorted_N[:-1]).flatten()
    ends_T = torch.cat([last_of_tie_T, torch.tensor([hits_N.numel() - 1], device=hits_N.device)])
    tp_T = tp_N[ends_T]
    precision_T = tp_T / seen_N[ends_T]
    recall_T = tp_T / tp_N[-1]
    recall_prev_T = torch.cat([recall_T.new_zeros(1), recall_T[:-1]])
    return float(((recall_T - recall_prev_T) * precision_T).sum())


def expected_random_ap(*, num_pos: int, num_total: int) -> float:
    """Expected AP of a uniformly random ranking of ``num_total`` items with ``num_pos`` positives.

    ``E[AP] = (H_N + (n - 1) / (N - 1) * (N - H_N)) / N`` with ``H_N`` the N-th harmonic number.
    """
    n, total = int(num_pos), int(num_total)
    if not 1 <= n <= total:
        raise ValueError(f"need 1 <= num_pos <= num_total, got {n}, {total}")
    harmonic = math.fsum(1.0 / r for r in range(1, total + 1))
    slope = (n - 1) / (total - 1) if total > 1 else 0.0
    return (harmonic + slope * (total - harmonic)) / total


def mean_average_precision(scores_NC: Tensor, labels_NC: Tensor) -> float:
    """Mean over classes with a known positive of ``average_precision`` on the known labels."""
    aps = []
    for c in range(labels_NC.shape[1]):
        known_N = labels_NC[:, c] >= 0
        targets_N = labels_NC[known_N, c]
        if float((targets_N == 1).sum()) > 0:
            aps.append(average_precision(scores_NC[known_N, c], targets_N == 1))
    if not aps:
        raise ValueError("mean_average_precision: no class has a known positive label")
    return sum(aps) / len(aps)


def label_mean_accuracy(probs_NC: Tensor, labels_NC: Tensor, *, threshold: float = 0.5) -> float:
    """Label-based mean accuracy: mean over classes of ``(TPR + TNR) / 2`` at ``threshold``."""
    pred_NC = probs_NC >= threshold
    pos_NC, neg_NC = labels_NC == 1, labels_NC == 0
    num_pos_C, num_neg_C = pos_NC.sum(0).float(), neg_NC.sum(0).float()
    tpr_C = (pred_NC & pos_NC).sum(0).float() / num_pos_C.clamp(min=1)
    tnr_C = (~pred_NC & neg_NC).sum(0).float() / num_neg_C.clamp(min=1)
    has_pos_C, has_neg_C = num_pos_C > 0, num_neg_C > 0
    rates_C = (tpr_C * has_pos_C + tnr_C * has_neg_C) / (has_pos_C.float() + has_neg_C.float()).clamp(min=1)
    valid_C = has_pos_C | has_neg_C
    if not bool(valid_C.any()):
        raise ValueError("label_mean_accuracy: no known labels")
    return float(rates_C[valid_C].mean())


class MultilabelMetric:
    """Accumulates probabilities ``[B, C]`` (``preds``) and ``batch.stacked["labels"]``; keys ``map``, ``mean_acc``."""

    def __init__(self, *, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self._probs: list[Tensor] = []
        self._labels: list[Tensor] = []

    @torch.no_grad()
    def update(self, preds: Tensor, batch: Batch) -> None:
        self._probs.append(preds.detach().float().cpu())
        self._labels.append(batch.stacked["labels"].detach().float().cpu())

    def compute(self) -> dict[str, float]:
        if not self._probs:
            raise ValueError("MultilabelMetric.compute: no samples were seen")
        probs_NC, labels_NC = torch.cat(self._probs), torch.cat(self._labels)
        return {
            "map": mean_average_precision(probs_NC, labels_NC),
            "mean_acc": label_mean_accuracy(probs_NC, labels_NC, threshold=self.threshold),
        }


def multilabel_chance(labels_NC: Tensor) -> dict[str, float]:
    """Chance levels from label prevalence: ``map`` of random scores (exact expectation per class),
    ``mean_acc`` = 0.5 (any constant or random predictor scores (TPR + TNR) / 2 = 0.5 in expectation)."""
    aps = []
    for c in range(labels_NC.shape[1]):
        known_N = labels_NC[:, c] >= 0
        num_pos = int((labels_NC[known_N, c] == 1).sum())
        if num_pos > 0:
            aps.append(expected_random_ap(num_pos=num_pos, num_total=int(known_N.sum())))
    return {"map": sum(aps) / len(aps) if aps else 0.0, "mean_acc": 0.5}
