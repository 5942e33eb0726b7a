"""Semantic segmentation head (semantic-FPN style) over the stride 4/8/16/32 pyramid.

FPN neck -> every level upsampled to stride 4 and summed -> 3x3 conv -> 1x1 classifier -> bilinear x4
to the input size. Loss: cross-entropy with ``ignore_index`` (255) against ``batch.stacked["mask"]``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from gppf.data.transforms import MASK_IGNORE
from gppf.heads.fpn import FPN, conv_norm_act
from gppf.interfaces import Batch, Features, LossParts, normalized_loss


def resize_logits(logits_BKhw: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of logits to ``size`` (no-op when it already matches)."""
    if tuple(logits_BKhw.shape[-2:]) == tuple(size):
        return logits_BKhw
    return F.interpolate(logits_BKhw, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationHead(nn.Module):
    """``forward(feats) -> logits [B, K, 4*H4, 4*W4]``; ``predict`` -> class ids ``[B, H, W]`` at mask size."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_classes: int,
        width: int = 128,
        label_smoothing: float = 0.0,
        ignore_index: int = MASK_IGNORE,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SegmentationHead needs num_classes >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.fpn = FPN(in_channels=in_channels, width=width)
        self.fuse = conv_norm_act(width, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: Features) -> Tensor:
        levels = self.fpn(feats.pyramid)
        size = levels[0].shape[-2:]
        fused_BWhw = levels[0]
        for level_BWhw in levels[1:]:
            fused_BWhw = fused_BWhw + F.interpolate(level_BWhw, size=size, mode="bilinear", align_corners=False)
        logits_BKhw = self.classifier(self.fuse(fused_BWhw))
        return F.interpolate(logits_BKhw, scale_factor=4.0, mode="bilinear", align_corners=False)

    def loss_parts(self, outputs: Tensor, batch: Batch) -> LossParts:
        """Cross-entropy summed over the labelled pixels, and their count."""
        mask_BHW = batch.stacked["mask"].to(outputs.device)
        logits_BKHW = resize_logits(outputs.float(), mask_BHW.shape[-2:])
        known = (mask_BHW != self.ignore_index).sum().float()
        ce = F.cross_entropy(logits_BKHW, mask_BHW, ignore_index=self.ignore_index,
                             label_smoothing=self.label_smoothing, reduction="sum")
        return {"ce": (ce, known)}

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Mean cross-entropy over the labelled pixels (0, still a function of ``outputs``, if none)."""
        return normalized_loss(self.loss_parts(outputs, batch))

    def predict(self, outputs: Tensor, batch: Batch) -> Tensor:
        mask = batch.stacked.get("mask")
        size = mask.shape[-2:] if mask is not None else batch.images.shape[-2:]
        return resize_logits(outputs.detach().float(), size).argmax(dim=1)
