"""Tiny in-memory data and a tiny backbone stand-in for the task-type tests.

``tiny_memory`` is a test-only reader (registered as ``TINY_READER``) producing 32x32 images whose
colour encodes the target, so a tiny network can fit them in a few steps.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision import tv_tensors

from gppf.config import DataConfig, TaskConfig
from gppf.data.base import READERS, BadSamples, SampleDataset
from gppf.interfaces import FeaturesLike

TINY_READER = "test_tiny_memory"
PALETTE = torch.tensor([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40], [40, 220, 220], [220, 40, 220]])
REID_IDS = [3, 7, 11, 20, 21, 40]  # deliberately non-contiguous


class TinyFeatures:
    """Stand-in for ``gppf.backbones.Features``."""

    def __init__(self, pyramid: list[Tensor], pooled: Tensor) -> None:
        self.pyramid = pyramid
        self.pooled = pooled


class TinyBackbone(nn.Module):
    """Four strided conv stages (strides 4, 8, 16, 32) + global average pooling of the last stage."""

    feature_channels = [8, 16, 16, 16]
    pooled_dim = 16

    def __init__(self) -> None:
        super().__init__()
        chans = [3, *self.feature_channels]
        strides = [4, 2, 2, 2]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=strides[i], padding=1), nn.ReLU())
            for i in range(4)
        )

    def forward(self, x_BCHW: Tensor) -> FeaturesLike:
        pyramid = []
        for stage in self.stages:
            x_BCHW = stage(x_BCHW)
            pyramid.append(x_BCHW)
        return TinyFeatures(pyramid, pyramid[-1].mean(dim=(2, 3)))


def _colour_image(rgb: Tensor, gen: torch.Generator, *, size: int) -> Tensor:
    noise = torch.randint(-20, 21, (3, size, size), generator=gen)
    return (rgb.view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)


def _sample(task_type: str, index: int, gen: torch.Generator, *, size: int, num_classes: int) -> tuple[Tensor, dict]:
    if task_type == "classification":
        label = index % num_classes
        return _colour_image(PALETTE[label], gen, size=size), {"label": label}
    if task_type == "reid":
        slot = index % len(REID_IDS)
        return _colour_image(PALETTE[slot], gen, size=size), {"identity": REID_IDS[slot]}
    if task_type == "multilabel":
        labels_C = torch.randint(0, 2, (3,), generator=gen).float()
        rgb = torch.where(labels_C > 0, 220, 40)
        if index % 5 == 0:
            labels_C[index % 3] = -1.0
        return _colour_image(rgb, gen, size=size), {"labels": labels_C}
    if task_type == "regression":  # the docs/tasks.md example: value = grey level in [0, 1]
        grey = int(torch.randint(40, 221, (1,), generator=gen))
        return _colour_image(torch.tensor([grey] * 3), gen, size=size), {"value": grey / 255}
    if task_type == "segmentation":
        image = _colour_image(torch.tensor([40, 40, 40]), gen, size=size)
        mask = torch.zeros(size, size, dtype=torch.int64)
        cls = 1 + index % (num_classes - 1)
        y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
        mask[y0 : y0 + size // 2, x0 : x0 + size // 2] = cls
        image[:, mask == cls] = PALETTE[cls].view(3, 1).to(torch.uint8)
        mask[0, :] = 255
        return image, {"mask": tv_tensors.Mask(mask)}
    raise ValueError(f"tiny reader does not support task type {task_type}")


class TinyMemoryDataset(SampleDataset):
    """Deterministic in-memory samples for one task type."""

    def __init__(self, *, task_type: str, n: int, size: int, num_classes: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.classes = [] if task_type in ("reid", "regression") else [f"c{i}" for i in range(num_classes)]
        self.bad = BadSamples(policy="error", where="tiny")
        self.items = []
        for i in range(n):
            image, target = _sample(task_type, i, gen, size=size, num_classes=num_classes)
            target.update(image_id=i, orig_size=(size, size))
            self.items.append((tv_tensors.Image(image), target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.items[index]
        return image, dict(target)


def _tiny_reader(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: str) -> TinyMemoryDataset:
    opts = {"n": 24, "size": 32, "num_classes": 3, **cfg.options}
    seed = 0 if split == "train" else 1
    return TinyMemoryDataset(task_type=task_type, seed=seed, **opts)


if TINY_READER not in READERS:
    READERS.add(TINY_READER, _tiny_reader)


def tiny_task_config(task_type: str, **overrides: Any) -> TaskConfig:
    """A ``TaskConfig`` on the tiny reader with 32x32 images."""
    options = overrides.pop("options", {})
    fields: dict[str, Any] = {"name": f"tiny_{task_type}", "type": task_type, "image_size": 32, "batch_size": 12}
    fields.update(overrides)
    return TaskConfig(data=DataConfig(format=TINY_READER, options=options), **fields)


def train_steps(*, task: Any, backbone: nn.Module, batch: Any, steps: int, lr: float = 0.01) -> list[float]:
    """Fit ``backbone`` + ``task.head`` on one fixed batch; returns the loss of every step."""
    params = list(backbone.parameters()) + list(task.head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    backbone.train()
    task.head.train()
    losses = []
    for _ in range(steps):
        loss = task.head.loss(task.head(backbone(batch.images)), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def evaluate(*, task: Any, backbone: nn.Module, batch_size: int = 8) -> dict[str, float]:
    """Run ``task``'s metric over its val split."""
    backbone.eval()
    task.head.eval()
    metric = task.new_metric()
    loader = torch.utils.data.DataLoader(task.val_set, batch_size=batch_size, collate_fn=task.collate)
    with torch.no_grad():
        for batch in loader:
            metric.update(task.head.predict(task.head(backbone(batch.images)), batch), batch)
    return metric.compute()


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: tiny models run far faster than with oversubscribed shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_backbone() -> TinyBackbone:
    return TinyBackbone()


@pytest.fixture
def tiny_cfg():
    """Factory fixture: ``tiny_cfg(task_type, **overrides) -> TaskConfig``."""
    return tiny_task_config


@pytest.fixture
def fit():
    """``fit(task=, backbone=, batch=, steps=, lr=) -> list[float]`` (see ``train_steps``)."""
    return train_steps


@pytest.fixture
def run_eval():
    """``run_eval(task=, backbone=) -> dict`` (see ``evaluate``)."""
    return evaluate
