from __future__ import annotations

import pytest
import torch

from gppf.metrics.multilabel import expected_random_ap
from gppf.tasks import build_task


def _task(tiny_cfg, **kw):
    return build_task(tiny_cfg("multilabel", **kw), feature_channels=[8, 16, 16, 16], pooled_dim=16)


def test_batch_stacks_labels_with_unknowns(tiny_cfg):
    task = _task(tiny_cfg)
    batch = task.collate([task.val_set[i] for i in range(6)])
    labels_BC = batch.stacked["labels"]
    assert labels_BC.shape == (6, 3) and labels_BC.dtype == torch.float32
    assert bool((labels_BC[0] == -1).any()) and bool((labels_BC[5] == -1).any())


def test_chance_from_prevalence(tiny_cfg):
    task = _task(tiny_cfg)
    labels_NC = torch.stack([task.val_set.target(i)["labels"] for i in range(len(task.val_set))])
    expected = []
    for c in range(3):
        known = labels_NC[:, c] >= 0
        expected.append(expected_random_ap(num_pos=int((labels_NC[known, c] == 1).sum()), num_total=int(known.sum())))
    assert task.chance() == pytest.approx({"map": sum(expected) / 3, "mean_acc": 0.5})


def test_loss_falls_and_metric_keys(tiny_cfg, tiny_backbone, fit, run_eval):
    task = _task(tiny_cfg)
    batch = task.collate([task.train_set[i] for i in range(12)])
    losses = fit(task=task, backbone=tiny_backbone, batch=batch, steps=30, lr=0.01)
    assert losses[-1] < 0.5 * losses[0]
    metrics = run_eval(task=task, backbone=tiny_backbone)
    assert set(metrics) == {"map", "mean_acc"}
    assert metrics["map"] > task.chance()["map"] + 0.1
    assert metrics["mean_acc"] > 0.6
