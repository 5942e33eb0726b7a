"""Shared head building blocks: a GroupNorm helper and an FPN neck.

``FPN(in_channels=[C4, C8, C16, C32], width=W)`` maps a stride 4/8/16/32 pyramid to the same strides
at a common width: lateral 1x1 convs, a top-down pathway (nearest upsampling + sum), then a 3x3 conv
on every level. Usable by any dense head (segmentation here; detection may reuse it).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``channels`` (batch-size independent)."""
    return nn.GroupNorm(math.gcd(32, int(channels)), int(channels))


def conv_norm_act(in_channels: int, out_channels: int, *, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias) + GroupNorm + ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        group_norm(out_channels),
        nn.ReLU(inplace=True),
    )


class FPN(nn.Module):
    """Feature pyramid network neck: ``forward(pyramid) -> list[Tensor]`` at ``width`` channels."""

    def __init__(self, *, in_channels: Sequence[int], width: int) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("FPN needs at least one input level")
        self.width = int(width)
        self.lateral = nn.ModuleList(nn.Conv2d(c, self.width, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_norm_act(self.width, self.width) for _ in in_channels)

    def forward(self, pyramid: Sequence[Tensor]) -> list[Tensor]:
        if len(pyramid) != len(self.lateral):
            raise ValueError(f"FPN built for {len(self.lateral)} levels, got {len(pyramid)}")
        laterals = [conv(x_BCHW) for conv, x_BCHW in zip(self.lateral, pyramid)]
        merged = [laterals[-1]]
        for lateral_BWHW in reversed(laterals[:-1]):
            top_BWHW = F.interpolate(merged[0], size=lateral_BWHW.shape[-2:], mode="nearest")
            merged.insert(0, lateral_BWHW + top_BWHW)
        return [smooth(x_BWHW) for smooth, x_BWHW in zip(self.smooth, merged)]
