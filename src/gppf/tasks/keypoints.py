"""Task type ``keypoints`` (top-down): one person/object crop per sample, metrics ``ap`` (COCO OKS AP) and
``pck`` (PCK@0.2 of the box size).

Samples carry ``keypoints [K, 3]`` (x, y, visibility) in crop pixels, ``box`` / ``crop_box`` in original
pixels. Head: ``gppf.heads.keypoints.HeatmapKeypointHead``; options ``width``, ``num_convs``, ``sigma``,
``flip_pairs`` (list of ``[left, right]`` index pairs), ``rotate`` (max degrees), ``scale_jitter``.

Transforms: the plain keypoint tensor is wrapped as ``tv_tensors.KeyPoints`` so torchvision moves it with
the image, then unwrapped back to ``[K, 3]``. Val: plain resize of the crop to ``S x S``. Train: resize,
random rotation / scale (``RandomAffine``) and, only when flip pairs are known (``flip_pairs`` head
option, or ``target["flip_pairs"]`` from the reader), a horizontal flip that swaps left/right keypoints.

Metric: OKS AP against ``dataset.coco`` when it holds keypoint annotations, else against ground truth
rebuilt from the val batches; OKS sigmas ``dataset.sigmas`` when offered, else COCO's for 17 keypoints,
else 0.07 each (``gppf.metrics.coco.default_sigmas``). Primary metric: ``ap``.
Chance levels: ``ap`` 0; ``pck`` = PCK of guessing every keypoint at the crop centre.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from gppf.config import TaskConfig
from gppf.data.transforms import build_train_transform, build_val_transform
from gppf.heads.keypoints import HeatmapKeypointHead
from gppf.metrics.coco import CocoKeypointMetric
from gppf.tasks.base import TaskType, raw_target, reader_of
from gppf.tasks.detection import FEATURE_STRIDES

CHANCE_SAMPLES = 512  # raw targets read to estimate the centre-guess PCK

def num_keypoints_of(dataset: Any) -> int:
    """``K`` from the reader (``num_keypoints`` or ``keypoint_names``), else from the first sample."""
    reader = reader_of(dataset)
    if getattr(reader, "num_keypoints", None):
        return int(reader.num_keypoints)
    if getattr(reader, "keypoint_names", None):
        return len(reader.keypoint_names)
    if len(dataset) == 0:
        raise ValueError("keypoints: cannot infer the number of keypoints of an empty dataset")
    return int(torch.as_tensor(raw_target(dataset, 0)["keypoints"]).reshape(-1, 3).shape[0])


class KeypointsToTV:
    """Wrap ``target["keypoints"] [K, 3]`` as ``KeyPoints [K, 2]`` + ``target["visibility"] [K]``."""

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        kpts = torch.as_tensor(target["keypoints"]).as_subclass(torch.Tensor).float().reshape(-1, 3)
        height, width = F.get_size(image)
        target = dict(target)
        target["keypoints"] = tv_tensors.KeyPoints(kpts[:, :2], canvas_size=(height, width))
        target["visibility"] = kpts[:, 2].clone()
        return image, target


class KeypointsFromTV:
    """Inverse of :class:`KeypointsToTV`: back to a plain float ``[K, 3]`` tensor."""

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        target = dict(target)
        xy = target["keypoints"].as_subclass(torch.Tensor).reshape(-1, 2)
        target["keypoints"] = torch.cat([xy, target.pop("visibility")[:, None]], dim=1)
        return image, target


def flip_permutation(pairs: Sequence[Sequence[int]], num_keypoints: int) -> list[int]:
    """Index permutation swapping each ``(left, right)`` pair."""
    perm = list(range(num_keypoints))
    for a, b in pairs:
        perm[int(a)], perm[int(b)] = int(b), int(a)
    return perm


class RandomFlipKeypoints:
    """Horizontal flip with probability ``p`` that swaps left/right keypoints; no-op without pairs.

    Pairs come from ``flip_pairs`` or the sample's ``target["flip_pairs"]``. Runs on plain ``[K, 3]``.
    """

    def __init__(self, *, flip_pairs: Sequence[Sequence[int]] | None, p: float = 0.5) -> None:
        if flip_pairs and any(len(pair) != 2 for pair in flip_pairs):
            raise ValueError(f"flip_pairs must be [left, right] index pairs, got {flip_pairs!r}")
        self.flip_pairs = [tuple(pair) for pair in flip_pairs] if flip_pairs else None
        self.p = p

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        pairs = self.flip_pairs or target.get("flip_pairs")
        if not pairs or float(torch.rand(())) >= self.p:
            return image, target
        kpts = target["keypoints"].clone()
        width = F.get_size(image)[1]
        kpts[:, 0] = width - kpts[:, 0]
        target = dict(target)
        target["keypoints"] = kpts[flip_permutation(pairs, kpts.shape[0])]
        return F.horizontal_flip(image), target


def _with_keypoints(pipeline: Callable) -> v2.Compose:
    return v2.Compose([KeypointsToTV(), pipeline])


def centre_guess_pck(dataset: Dataset, *, threshold: float = 0.2, max_samples: int = CHANCE_SAMPLES) -> float:
    """PCK@``threshold`` of predicting every keypoint at the crop centre (raw targets, evenly spaced subset)."""
    n = len(dataset)  # type: ignore[arg-type]
    hits = total = 0
    m = min(n, max_samples)
    for i in sorted({(j * n) // m for j in range(m)}):
        target = raw_target(dataset, i)
        kpts = torch.as_tensor(target["keypoints"]).float().reshape(-1, 3)
        if "crop_box" in target:
            x0, y0, x1, y1 = torch.as_tensor(target["crop_box"]).float().reshape(4).tolist()
            centre = torch.tensor([(x1 - x0) / 2, (y1 - y0) / 2])
        else:
            centre = torch.tensor([float(target["orig_size"][1]) / 2, float(target["orig_size"][0]) / 2])
        box = torch.as_tensor(target["box"]).float().reshape(4)
        size = max(float(box[2] - box[0]), float(box[3] - box[1]), 1e-6)
        labelled = kpts[:, 2] > 0
        hits += int(((kpts[:, :2] - centre).norm(dim=-1) <= threshold * size)[labelled].sum())
        total += int(labelled.sum())
    return hits / total if total else 0.0


class KeypointsType(TaskType):
    name = "keypoints"
    head = HeatmapKeypointHead
    primary_metric = "ap"
    fixed_head_args = ("in_strides",)
    extra_options = {"flip_pairs": None, "rotate": 30.0, "scale_jitter": 0.25}

    def head_inputs(
        self, cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
    ) -> dict[str, Any]:
        return {"in_channels": feature_channels, "in_strides": FEATURE_STRIDES,
                "num_keypoints": num_keypoints_of(dataset)}

    def train_transform(self, cfg: TaskConfig) -> Callable:
        opts = self.options(cfg)
        jitter = float(opts["scale_jitter"])
        extra = [
            v2.RandomAffine(degrees=float(opts["rotate"]), scale=(1.0 - jitter, 1.0 + jitter)),
            KeypointsFromTV(),
            RandomFlipKeypoints(flip_pairs=opts["flip_pairs"]),
        ]
        pipeline = build_train_transform(image_size=cfg.image_size, mode="resize", hflip=False, extra=extra)
        return _with_keypoints(pipeline)

    def val_transform(self, cfg: TaskConfig) -> Callable:
        pipeline = build_val_transform(image_size=cfg.image_size, mode="resize", extra=[KeypointsFromTV()])
        return _with_keypoints(pipeline)

    def new_metric(self, cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> CocoKeypointMetric:
        reader = reader_of(dataset)
        return CocoKeypointMetric(
            num_keypoints=num_keypoints_of(dataset),
            coco=getattr(reader, "coco", None),
            sigmas=getattr(reader, "sigmas", None),
        )

    def chance(self, *, num_classes: int, dataset: Dataset) -> dict[str, float]:
        return {"ap": 0.0, "pck": centre_guess_pck(dataset)}
