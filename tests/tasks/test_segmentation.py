from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from gppf.tasks import build_task
from gppf.tasks.segmentation import class_pixel_counts


def _task(tiny_cfg, **kw):
    return build_task(tiny_cfg("segmentation", **kw), feature_channels=[8, 16, 16, 16], pooled_dim=16)


def test_transforms_keep_mask_nearest_and_ignore(tiny_cfg):
    task = _task(tiny_cfg)
    for i in range(6):
        image, target = task.train_set[i]
        assert image.shape == (3, 32, 32)
        assert isinstance(target["mask"], tv_tensors.Mask) and target["mask"].shape == (32, 32)
        assert set(target["mask"].unique().tolist()) <= {0, 1, 2, 255}


def test_chance_majority_class(tiny_cfg):
    task = _task(tiny_cfg)
    counts_K = class_pixel_counts(task.val_set, num_classes=3)
    freq = float(counts_K.max()) / float(counts_K.sum())
    assert int(counts_K.argmax()) == 0
    assert task.chance() == pytest.approx({"pixel_acc": freq, "miou": freq / 3})


def test_loss_falls_and_metric_keys(tiny_cfg, tiny_backbone, fit, run_eval):
    task = _task(tiny_cfg, head={"width": 16})
    batch = task.collate([task.val_set[i] for i in range(12)])
    assert batch.stacked["mask"].shape == (12, 32, 32) and batch.stacked["mask"].dtype == torch.int64
    losses = fit(task=task, backbone=tiny_backbone, batch=batch, steps=30, lr=0.01)
    assert losses[-1] < 0.5 * losses[0]
    metrics = run_eval(task=task, backbone=tiny_backbone)
    assert set(metrics) == {"miou", "pixel_acc"}
    assert metrics["miou"] > task.chance()["miou"] + 0.2
