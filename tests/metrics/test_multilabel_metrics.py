from __future__ import annotations

import itertools

import pytest
import torch

from gppf.data.collate import Batch
from gppf.metrics.multilabel import (
    MultilabelMetric,
    average_precision,
    expected_random_ap,
    label_mean_accuracy,
    mean_average_precision,
    multilabel_chance,
)

SCORES_NC = torch.tensor([[0.8, 0.6, 0.1], [0.3, 0.9, 0.6], [0.4, 0.2, 0.2], [0.9, 0.7, 0.3]])
LABELS_NC = torch.tensor([[1.0, 0, 0], [0, -1, 0], [1, 1, 0], [-1, 0, 0]])


def test_average_precision_hand_computed():
    # ranks of positives 1 and 3: AP = 1/2 * 1 + 1/2 * 2/3
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([1, 0, 1, 0, 0]))
    assert ap == pytest.approx(0.5 + 1 / 3)


def test_average_precision_groups_ties_like_sklearn():
    # one threshold at 0.5 holding one positive of three items: P = 1/3, R = 1 (rank order is irrelevant)
    assert average_precision(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([1, 0, 0])) == pytest.approx(1 / 3)
    assert average_precision(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(
        0.5 + 0.5 * 2 / 3
    )
    with pytest.raises(ValueError, match="positive"):
        average_precision(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))


def test_map_ignores_unknown_and_skips_classes_without_positives():
    # class 0 on known rows: 0.8(+) 0.4(+) 0.3(-) -> 1; class 1: 0.7(-) 0.6(-) 0.2(+) -> 1/3; class 2: skipped
    assert mean_average_precision(SCORES_NC, LABELS_NC) == pytest.approx((1 + 1 / 3) / 2)


def test_label_mean_accuracy_hand_computed():
    # class 0: TPR 1/2, TNR 1 -> 0.75; class 1: TPR 0, TNR 0 -> 0; class 2 (no positives): TNR 3/4
    assert label_mean_accuracy(SCORES_NC, LABELS_NC) == pytest.approx((0.75 + 0.0 + 0.75) / 3)


def test_metric_accumulates_batches():
    metric = MultilabelMetric()
    for rows in (slice(0, 2), slice(2, 4)):
        batch = Batch(images=torch.zeros(2, 3, 2, 2), targets=[{}, {}], stacked={"labels": LABELS_NC[rows]})
        metric.update(SCORES_NC[rows], batch)
    assert metric.compute() == pytest.approx({"map": 2 / 3, "mean_acc": 0.5})


def _brute_force_random_ap(num_pos: int, num_total: int) -> float:
    perms = list(itertools.permutations(range(num_total)))
    targets = torch.tensor([1] * num_pos + [0] * (num_total - num_pos))
    total = sum(average_precision(-torch.tensor(p, dtype=torch.float32), targets) for p in perms)
    return total / len(perms)


@pytest.mark.parametrize("num_pos,num_total", [(1, 4), (2, 5), (3, 5), (5, 5)])
def test_expected_random_ap_matches_enumeration(num_pos, num_total):
    assert expected_random_ap(num_pos=num_pos, num_total=num_total) == pytest.approx(
        _brute_force_random_ap(num_pos, num_total)
    )


def test_chance_from_prevalence():
    chance = multilabel_chance(LABELS_NC)
    expected = (expected_random_ap(num_pos=2, num_total=3) + expected_random_ap(num_pos=1, num_total=3)) / 2
    assert chance == pytest.approx({"map": expected, "mean_acc": 0.5})
