from __future__ import annotations

import pytest
import torch

from gppf.config import ConfigError
from gppf.tasks import TASK_TYPES, build_task


def _task(tiny_cfg, **kw):
    return build_task(tiny_cfg("classification", **kw), feature_channels=[8, 16, 16, 16], pooled_dim=16)


def test_registered_with_primary_metric():
    assert TASK_TYPES.get("classification").primary_metric == "top1"


def test_build_task_datasets_and_batch(tiny_cfg):
    task = _task(tiny_cfg, options={"n": 10})
    assert (task.name, task.num_classes, len(task.train_set), len(task.val_set)) == ("tiny_classification", 3, 10, 10)
    batch = task.collate([task.train_set[i] for i in range(4)])
    assert batch.images.shape == (4, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.stacked["label"].tolist() == [0, 1, 2, 0]
    assert task.chance() == pytest.approx({"top1": 1 / 3, "top5": 1.0})


def test_unknown_head_option_is_named(tiny_cfg):
    with pytest.raises(ConfigError, match=r"tasks\.tiny_classification\.head\.label_smothing.*label_smoothing"):
        _task(tiny_cfg, head={"label_smothing": 0.1})


def test_loss_falls_and_metric_beats_chance(tiny_cfg, tiny_backbone, fit, run_eval):
    task = _task(tiny_cfg, head={"label_smoothing": 0.1, "hidden": 16})
    batch = task.collate([task.train_set[i] for i in range(12)])
    losses = fit(task=task, backbone=tiny_backbone, batch=batch, steps=30, lr=0.01)
    assert losses[-1] < 0.5 * losses[0]
    metrics = run_eval(task=task, backbone=tiny_backbone)
    assert set(metrics) == {"top1", "top5"}
    assert metrics["top1"] > task.chance()["top1"]
    assert metrics["top5"] == 1.0  # top-min(5, C) with C = 3
