"""Batching: ``collate_batch(samples) -> Batch``.

A sample is ``(image, target)`` after transforms: ``image`` a float ``[3, H, W]`` tensor (all images of a
batch share ``H, W``; the transform pipelines in ``gppf.data.transforms`` guarantee a square
``image_size``), ``target`` a dict. ``Batch`` is defined here (and re-exported by ``gppf.tasks.base``) so
that the data side does not import the task registry.

Stacking rule (``Batch.stacked``): a key is stacked when every target of the batch has it and the values
are all ``int`` (-> int64 ``[B]``), all ``float`` (-> float32 ``[B]``) or all tensors of one shape and dtype
(-> ``[B, ...]``, ``tv_tensors`` unwrapped to plain tensors). So ``label [B]``, ``labels [B, C]`` (multilabel),
``mask [B, H, W]``, ``identity [B]`` and ``image_id [B]`` are stacked; variable-size entries such as detection
``boxes`` / ``labels`` stay only in ``targets``. Consumers of variable-size targets must read ``targets``:
a detection batch whose images happen to hold the same number of boxes also gets ``stacked["labels"]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass
class Batch:
    """A collated batch.

    ``images``: float ``[B, 3, H, W]`` normalized; ``targets``: the per-sample target dicts (``tv_tensors``
    kept); ``stacked``: per-key ``[B, ...]`` tensors for keys whose values agree in shape (see module doc).
    """

    images: Tensor
    targets: list[dict[str, Any]]
    stacked: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, *, channels_last: bool = False) -> "Batch":
        """Copy to ``device`` (non-blocking); ``channels_last`` sets the images' memory format."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        images = self.images.to(device, non_blocking=True, memory_format=fmt)
        stacked = {k: v.to(device, non_blocking=True) for k, v in self.stacked.items()}
        targets = [_map_tensors(t, lambda x: x.to(device, non_blocking=True)) for t in self.targets]
        return Batch(images=images, targets=targets, stacked=stacked)

    def pin_memory(self) -> "Batch":
        """Page-locked copy (called by ``DataLoader(pin_memory=True)``)."""
        stacked = {k: v.pin_memory() for k, v in self.stacked.items()}
        targets = [_map_tensors(t, lambda x: x.pin_memory()) for t in self.targets]
        return Batch(images=self.images.pin_memory(), targets=targets, stacked=stacked)


def _map_tensors(target: dict[str, Any], fn: Any) -> dict[str, Any]:
    """Apply ``fn`` to the tensor values of a target dict (``tv_tensors`` keep their type under ``.to``)."""
    return {k: fn(v) if isinstance(v, Tensor) else v for k, v in target.items()}


def _stack_values(values: list[Any]) -> Tensor | None:
    """Stack one key's values across the batch, or ``None`` when they do not agree."""
    first = values[0]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.int64)
    if all(isinstance(v, float) for v in values):
        return torch.tensor(values, dtype=torch.float32)
    if isinstance(first, Tensor) and all(
        isinstance(v, Tensor) and v.shape == first.shape and v.dtype == first.dtype for v in values
    ):
        return torch.stack([v.as_subclass(Tensor) for v in values])
    return None


def stack_targets(targets: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """The ``stacked`` part of a batch: keys common to all targets whose values stack (module doc)."""
    if not targets:
        return {}
    common = [k for k in targets[0] if all(k in t for t in targets[1:])]
    stacked: dict[str, Tensor] = {}
    for key in common:
        value_B = _stack_values([t[key] for t in targets])
        if value_B is not None:
            stacked[key] = value_B
    return stacked


def collate_batch(samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> Batch:
    """Collate ``(image, target)`` samples into a ``Batch``; images must share one shape."""
    if not samples:
        raise ValueError("collate_batch: empty batch")
    images = [img for img, _ in samples]
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise ValueError(
            f"collate_batch: images differ in shape {sorted(shapes)}; the transform must produce one "
            "square image_size (use gppf.data.transforms builders)"
        )
    images_BCHW = torch.stack([img.as_subclass(Tensor) for img in images])
    targets = [dict(t) for _, t in samples]
    return Batch(images=images_BCHW, targets=targets, stacked=stack_targets(targets))
