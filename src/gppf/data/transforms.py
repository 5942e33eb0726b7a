"""Transform pipelines (torchvision transforms v2) that keep images and targets consistent.

A pipeline is called as ``tf(image, target) -> (image, target)`` with ``image`` a ``tv_tensors.Image``
uint8 ``[3, H, W]`` and ``target`` a dict. ``tv_tensors`` in the target (``BoundingBoxes``, ``Mask``,
``KeyPoints``) follow every geometric step; masks are resized with nearest neighbour and padded with
``MASK_IGNORE`` (255). Plain tensors and python values in the target pass through unchanged (so
keypoints stored as a plain ``[K, 3]`` tensor must be handled by the task's own ``extra`` steps).
Every pipeline ends with ``ToDtype(float32, scale=True)`` + ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``
and yields square ``image_size x image_size`` images, so batches always stack.

Geometry modes (``build_train_transform(mode=...)`` / ``build_val_transform(mode=...)``):

* ``crop``: ``RandomResizedCrop(image_size, scale=crop_scale)`` (train only).
* ``jitter``: large-scale jitter, ``ScaleJitter((S, S), jitter_scale)`` then ``RandomCrop(S)`` padding
  where needed (train only; detection / segmentation).
* ``resize``: stretch to ``S x S``.
* ``center_crop``: resize the short side to ``S`` then centre crop (val only; classification).
* ``letterbox``: resize the long side to ``S`` (aspect kept), pad right/bottom to ``S x S``.

Options: ``hflip`` adds ``RandomHorizontalFlip`` (train; pass ``False`` and flip in ``extra`` when the
task needs to swap left/right keypoints), ``boxes`` appends ``ClampBoundingBoxes`` +
``SanitizeBoundingBoxes`` (drops degenerate boxes and their ``labels``), ``extra`` inserts callables
``(image, target) -> (image, target)`` after geometry and before dtype conversion.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MASK_IGNORE = 255

TrainMode = Literal["crop", "jitter", "resize", "letterbox"]
ValMode = Literal["resize", "center_crop", "letterbox"]


def pad_fill() -> dict[Any, int]:
    """Fill values for padding: masks get ``MASK_IGNORE``, everything else 0."""
    return {tv_tensors.Mask: MASK_IGNORE, "others": 0}


class Letterbox(v2.Transform):
    """Resize so the long side is ``size`` (aspect kept), then pad right/bottom to ``size x size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.size / max(height, width)
        new_h = min(self.size, max(1, round(height * scale)))
        new_w = min(self.size, max(1, round(width * scale)))
        return {"hw": [new_h, new_w], "pad": [0, 0, self.size - new_w, self.size - new_h]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = self._call_kernel(F.resize, inpt, params["hw"], antialias=True)
        fill = MASK_IGNORE if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(F.pad, out, params["pad"], fill=fill)

    # torchvision < 0.21 called these private names
    _get_params = make_params
    _transform = transform


def normalize_steps() -> list[Callable]:
    """Final steps of every pipeline: uint8 image -> float in [0, 1] -> ImageNet normalization."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]


def _geometry(
    mode: str, *, image_size: int, crop_scale: tuple[float, float], jitter_scale: tuple[float, float]
) -> list[Callable]:
    size = int(image_size)
    if mode == "crop":
        return [v2.RandomResizedCrop(size, scale=crop_scale, antialias=True)]
    if mode == "jitter":
        return [
            v2.ScaleJitter(target_size=(size, size), scale_range=jitter_scale, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True, fill=pad_fill()),
        ]
    if mode == "resize":
        return [v2.Resize((size, size), antialias=True)]
    if mode == "center_crop":
        return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if mode == "letterbox":
        return [Letterbox(size)]
    raise ValueError(f"unknown transform mode '{mode}' (crop, jitter, resize, center_crop, letterbox)")


def _box_steps(boxes: bool) -> list[Callable]:
    return [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()] if boxes else []


def build_train_transform(
    *,
    image_size: int,
    mode: TrainMode = "crop",
    hflip: bool = True,
    boxes: bool = False,
    crop_scale: tuple[float, float] = (0.35, 1.0),
    jitter_scale: tuple[float, float] = (0.5, 2.0),
    extra: Sequence[Callable] = (),
) -> v2.Compose:
    """Training pipeline: geometry ``mode`` + optional flip + ``extra`` + box sanitizing + normalize."""
    if mode == "center_crop":
        raise ValueError("center_crop is a val mode; use crop, jitter, resize or letterbox for training")
    steps: list[Callable] = [v2.ToImage()]
    steps += _geometry(mode, image_size=image_size, crop_scale=crop_scale, jitter_scale=jitter_scale)
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += list(extra) + _box_steps(boxes) + normalize_steps()
    return v2.Compose(steps)


def build_val_transform(
    *,
    image_size: int,
    mode: ValMode = "resize",
    boxes: bool = False,
    extra: Sequence[Callable] = (),
) -> v2.Compose:
    """Deterministic evaluation pipeline: geometry ``mode`` + ``extra`` + box sanitizing + normalize."""
    if mode not in ("resize", "center_crop", "letterbox"):
        raise ValueError(f"val transform mode must be resize, center_crop or letterbox, got '{mode}'")
    steps: list[Callable] = [v2.ToImage()]
    steps += _geometry(mode, image_size=image_size, crop_scale=(1.0, 1.0), jitter_scale=(1.0, 1.0))
    steps += list(extra) + _box_steps(boxes) + normalize_steps()
    return v2.Compose(steps)


def denormalize(images_BCHW: Tensor) -> Tensor:
    """Undo the ImageNet normalization: float images in ``[0, 1]`` (for visualisation)."""
    mean_C11 = torch.tensor(IMAGENET_MEAN, device=images_BCHW.device).view(-1, 1, 1)
    std_C11 = torch.tensor(IMAGENET_STD, device=images_BCHW.device).view(-1, 1, 1)
    return (images_BCHW * std_C11 + mean_C11).clamp(0.0, 1.0)
