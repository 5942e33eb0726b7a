"""Top-down heatmap keypoint head.

Semantic-FPN style: the pyramid goes through an FPN neck, every level is upsampled to the finest one
(stride 4) and summed, refined by a small GroupNorm conv tower and projected to ``K`` heatmaps.
Coordinates are continuous (pixel ``i`` spans ``[i, i + 1)``, as in torchvision transforms v2); heatmap
cell ``(j, i)`` is centred at input pixel ``((i + 0.5) * stride, (j + 0.5) * stride)``.

Targets: ``batch.targets[i]["keypoints"]`` ``[K, 3]`` (x, y, visibility) in network-input pixels of the
crop. The loss is the visibility-weighted squared error against Gaussian heatmaps (``sigma`` heatmap
cells), summed over pixels, averaged over labelled keypoints and divided by the Gaussian mass
``2 pi sigma^2`` (an all-zero prediction scores 0.5). ``predict`` takes the argmax with a quarter-cell
shift towards the higher neighbour and maps the result to ORIGINAL image pixels through ``crop_box``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gppf.heads.fpn import FPN, conv_norm_act
from gppf.interfaces import Batch, Features, LossParts, normalized_loss


def target_keypoints(targets: Sequence[Mapping[str, Any]]) -> Tensor:
    """Stack the targets' ``keypoints`` into a plain float tensor ``[B, K, 3]``."""
    return torch.stack([torch.as_tensor(t["keypoints"]).as_subclass(Tensor).float().reshape(-1, 3) for t in targets])


def gaussian_heatmaps(
    *, keypoints: Tensor, heatmap_size: tuple[int, int], stride: int, sigma: float
) -> tuple[Tensor, Tensor]:
    """Gaussian target heatmaps ``[B, K, h, w]`` and weights ``[B, K]`` from keypoints ``[B, K, 3]``.

    A keypoint counts (weight 1) when its visibility is > 0 and it lies inside the input image
    ``(h * stride, w * stride)``.
    """
    h, w = heatmap_size
    u = keypoints[..., 0] / stride - 0.5  # heatmap cell coordinates
    v = keypoints[..., 1] / stride - 0.5
    xs = torch.arange(w, device=keypoints.device, dtype=keypoints.dtype)
    ys = torch.arange(h, device=keypoints.device, dtype=keypoints.dtype)
    gx = torch.exp(-((xs - u[..., None]) ** 2) / (2 * sigma**2))  # [B, K, w]
    gy = torch.exp(-((ys - v[..., None]) ** 2) / (2 * sigma**2))  # [B, K, h]
    heatmaps = gy[..., :, None] * gx[..., None, :]
    x, y = keypoints[..., 0], keypoints[..., 1]
    inside = (x >= 0) & (x < w * stride) & (y >= 0) & (y < h * stride)
    weights = ((keypoints[..., 2] > 0) & inside).to(keypoints.dtype)
    return heatmaps, weights


def heatmap_argmax(heatmaps: Tensor, *, stride: int) -> tuple[Tensor, Tensor]:
    """Peak locations ``[B, K, 2]`` (x, y input pixels) and peak values ``[B, K]``.

    Away from the border the peak moves a quarter cell towards its higher neighbour (per axis).
    """
    h, w = heatmaps.shape[-2:]
    flat = heatmaps.flatten(2)
    conf, idx = flat.max(dim=-1)
    u, v = idx % w, idx // w

    def at(vv: Tensor, uu: Tensor) -> Tensor:
        return flat.gather(2, (vv.clamp(0, h - 1) * w + uu.clamp(0, w - 1)).unsqueeze(-1)).squeeze(-1)

    du = torch.sign(at(v, u + 1) - at(v, u - 1)) * ((u > 0) & (u < w - 1))
    dv = torch.sign(at(v + 1, u) - at(v - 1, u)) * ((v > 0) & (v < h - 1))
    x = (u.to(heatmaps.dtype) + 0.25 * du + 0.5) * stride
    y = (v.to(heatmaps.dtype) + 0.25 * dv + 0.5) * stride
    return torch.stack([x, y], dim=-1), conf


def input_to_crop_frame(*, target: Mapping[str, Any], input_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x0, y0, sx, sy): original = (x0, y0) + input * (sx, sy).

    The input image is assumed to be the whole ``crop_box`` ``[x0, y0, x1, y1]`` (original pixels) resized
    to ``input_size`` (H, W); without ``crop_box`` the crop is the whole original image (``orig_size``).
    """
    if "crop_box" in target:
        x0, y0, x1, y1 = torch.as_tensor(target["crop_box"]).reshape(-1)[:4].tolist()
    else:
        orig_h, orig_w = (float(s) for s in target["orig_size"])
        x0, y0, x1, y1 = 0.0, 0.0, orig_w, orig_h
    return x0, y0, (x1 - x0) / input_size[1], (y1 - y0) / input_size[0]


def keypoints_to_original(
    xy: Tensor, *, targets: Sequence[Mapping[str, Any]], input_size: tuple[int, int]
) -> Tensor:
    """Map ``[B, K, 2]`` input-pixel coordinates to original image pixels (see :func:`input_to_crop_frame`)."""
    frames = torch.tensor(
        [input_to_crop_frame(target=t, input_size=input_size) for t in targets], dtype=xy.dtype, device=xy.device
    ).reshape(-1, 4)
    return frames[:, None, :2] + xy * frames[:, None, 2:]


class HeatmapKeypointHead(nn.Module):
    """FPN-fused stride-4 heatmap head for ``num_keypoints`` keypoints (see module docstring)."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_keypoints: int,
        in_strides: Sequence[int] = (4, 8, 16, 32),
        width: int = 128,
        num_convs: int = 2,
        sigma: float = 2.0,
    ) -> None:
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        self.num_keypoints, self.sigma = num_keypoints, sigma
        self.stride = int(in_strides[0])
        self.fpn = FPN(in_channels=in_channels, width=width)
        self.tower = nn.Sequential(*(conv_norm_act(width, width) for _ in range(num_convs)))
        self.out = nn.Conv2d(width, num_keypoints, 1)
        nn.init.normal_(self.out.weight, std=0.001)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: Features) -> Tensor:
        """``feats.pyramid`` -> raw heatmaps ``[B, K, H / stride, W / stride]``."""
        levels = self.fpn(feats.pyramid)
        fused = levels[0]
        for level in levels[1:]:
            fused = fused + F.interpolate(level, size=fused.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.tower(fused))

    def loss_parts(self, outputs: Tensor, batch: Batch) -> LossParts:
        """Weighted squared error summed over labelled keypoints (over ``2 pi sigma^2``) and their count."""
        pred = outputs.float()
        keypoints = target_keypoints(batch.targets).to(pred.device)
        target, weights = gaussian_heatmaps(
            keypoints=keypoints, heatmap_size=pred.shape[-2:], stride=self.stride, sigma=self.sigma
        )
        per_kp = ((pred - target) ** 2).sum(dim=(-2, -1))
        return {"heatmap": ((per_kp * weights).sum() / (2 * math.pi * self.sigma**2), weights.sum())}

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Visibility-weighted heatmap MSE, normalized as in the module docstring."""
        return normalized_loss(self.loss_parts(outputs, batch))

    @torch.no_grad()
    def predict(self, outputs: Tensor, batch: Batch) -> dict[str, Tensor]:
        """``keypoints [B, K, 3]`` (x, y in ORIGINAL image pixels, confidence = heatmap peak) and
        ``scores [B]`` (mean keypoint confidence)."""
        input_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        xy, conf = heatmap_argmax(outputs.float(), stride=self.stride)
        xy = keypoints_to_original(xy, targets=batch.targets, input_size=input_size)
        return {"keypoints": torch.cat([xy, conf[..., None]], -1), "scores": conf.mean(-1)}
