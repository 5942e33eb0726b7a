"""Anchor-free FCOS detection head over a light FPN of the backbone pyramid.

Outputs are flattened over all points of all used levels (``N`` points):

- ``cls_logits`` ``[B, N, C]``, ``centerness`` ``[B, N]`` (logits),
- ``box_ltrb`` ``[B, N, 4]`` distances (pixels of the network input) from the point to the box sides,
- ``points`` ``[N, 2]`` (x, y) input pixels and ``point_strides`` ``[N]``.

Coordinates are continuous (pixel ``i`` spans ``[i, i + 1)``), as in torchvision transforms v2. Targets
(``batch.targets[i]["boxes"]`` XYXY in input pixels, ``["labels"]`` int64) are assigned with the FCOS
rules: a point is positive for a box when it lies in the box's centre region (``center_radius`` strides
around the centre, clipped to the box) and the largest of its four distances falls in the level's size
range; ties go to the smallest box. ``predict`` returns boxes in original image coordinates.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.transforms.v2.functional import convert_bounding_box_format

from gppf.heads.fpn import FPN, group_norm
from gppf.interfaces import Batch, Features, LossParts, normalized_loss

_MAX_LOG_DIST = 10.0  # exp clamp of the box-distance logits (e^10 strides is far beyond any image)


def level_size_ranges(*, strides: Sequence[int], size_mult: float = 8.0) -> list[tuple[float, float]]:
    """FCOS size ranges: level ``l`` takes boxes whose largest point-to-side distance is in
    ``(size_mult * stride_{l-1}, size_mult * stride_l]``; the first starts at 0, the last is unbounded.
    With strides 8/16/32 this gives the FCOS ranges ``[0, 64], [64, 128], [128, inf]``."""
    uppers = [size_mult * s for s in strides[:-1]] + [math.inf]
    lowers = [0.0] + uppers[:-1]
    return list(zip(lowers, uppers))


def grid_points(*, height: int, width: int, stride: int, device: torch.device | None = None) -> Tensor:
    """Centres ``[H * W, 2]`` (x, y) of the cells of a stride-``stride`` feature map, row-major."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def encode_ltrb(points: Tensor, boxes: Tensor) -> Tensor:
    """Distances ``[..., 4]`` from ``points [..., 2]`` to the sides of XYXY ``boxes [..., 4]``."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], -1)


def decode_ltrb(points: Tensor, ltrb: Tensor) -> Tensor:
    """Inverse of :func:`encode_ltrb`: XYXY boxes from points and side distances."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], -1)


def centerness_target(ltrb: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` of positive distances ``[n, 4]``."""
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-6)) * (
        tb.min(1).values / tb.max(1).values.clamp(min=1e-6)
    )
    return ratio.clamp(min=0.0).sqrt()


def fcos_assign(
    *,
    points: Tensor,
    point_strides: Tensor,
    point_ranges: Tensor,
    boxes: Tensor,
    labels: Tensor,
    center_radius: float = 1.5,
) -> tuple[Tensor, Tensor]:
    """Assign one image's gt boxes ``[M, 4]`` to points ``[N, 2]``.

    ``point_ranges [N, 2]`` holds each point's level size range. Returns ``labels [N]`` (``-1`` =
    background) and the matched boxes ``[N, 4]`` (zeros for background). Fully vectorized (``N x M``).
    """
    n = points.shape[0]
    if boxes.numel() == 0:
        return labels.new_full((n,), -1), points.new_zeros((n, 4))
    ltrb = encode_ltrb(points[:, None, :], boxes[None, :, :])  # [N, M, 4]
    inside = ltrb.min(-1).values > 0
    if center_radius > 0:
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # [M, 2]
        rad = point_strides.to(boxes.dtype)[:, None, None] * center_radius  # [N, 1, 1]
        region = torch.cat(
            [torch.maximum(centres - rad, boxes[None, :, :2]), torch.minimum(centres + rad, boxes[None, :, 2:])],
            dim=-1,
        )  # [N, M, 4]
        inside = encode_ltrb(points[:, None, :], region).min(-1).values > 0
    max_dist = ltrb.max(-1).values
    in_range = (max_dist >= point_ranges[:, :1]) & (max_dist <= point_ranges[:, 1:])
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, -1)
    areas = torch.where(inside & in_range, areas, torch.full_like(areas, math.inf))
    best_area, best = areas.min(dim=1)
    positive = torch.isfinite(best_area)
    out_labels = torch.where(positive, labels[best], labels.new_full((n,), -1))
    out_boxes = torch.where(positive[:, None], boxes[best], torch.zeros_like(boxes[best]))
    return out_labels, out_boxes


def target_boxes(target: Mapping[str, Any]) -> Tensor:
    """A target's ``boxes`` as a plain float XYXY tensor ``[n, 4]``."""
    boxes = target["boxes"]
    if isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
        boxes = convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    return torch.as_tensor(boxes).as_subclass(torch.Tensor).reshape(-1, 4).float()


def input_to_original_scale(*, target: Mapping[str, Any], input_size: tuple[int, int]) -> tuple[float, float]:
    """(sx, sy) mapping network-input pixels to original image pixels.

    Uses ``target["scale"]`` ((sx, sy) input -> original) when a transform recorded one, else assumes a
    plain resize of the whole original image (``orig_size``) to ``input_size`` (H, W).
    """
    if "scale" in target:
        sx, sy = torch.as_tensor(target["scale"], dtype=torch.float64).reshape(-1)[:2].tolist()
        return sx, sy
    orig_h, orig_w = (float(v) for v in target["orig_size"])
    return orig_w / input_size[1], orig_h / input_size[0]


def boxes_to_original(boxes: Tensor, *, target: Mapping[str, Any], input_size: tuple[int, int]) -> Tensor:
    """Map XYXY boxes from network-input pixels to original image pixels (clipped to the image)."""
    sx, sy = input_to_original_scale(target=target, input_size=input_size)
    out = boxes * boxes.new_tensor([sx, sy, sx, sy])
    orig_h, orig_w = (float(v) for v in target["orig_size"])
    out[:, 0::2] = out[:, 0::2].clamp(0, orig_w)
    out[:, 1::2] = out[:, 1::2].clamp(0, orig_h)
    return out


def _tower(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), group_norm(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """FCOS head: FPN over the chosen pyramid levels, shared GroupNorm towers, per-level scales.

    ``in_channels``/``in_strides`` describe the backbone pyramid; ``strides`` picks the levels used
    (default P3-P5). Loss = focal (cls) + GIoU (box) + BCE (centerness), each over ``max(1, #pos)``
    (``loss_parts``: a distributed step divides by the positives of the task's global batch).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_classes: int,
        in_strides: Sequence[int] = (4, 8, 16, 32),
        strides: Sequence[int] = (8, 16, 32),
        width: int = 128,
        num_convs: int = 2,
        center_radius: float = 1.5,
        size_mult: float = 8.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        topk_per_level: int = 1000,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"FCOSHead needs num_classes >= 1, got {num_classes}")
        missing = [s for s in strides if s not in in_strides]
        if missing:
            raise ValueError(f"detection strides {missing} not in the backbone strides {list(in_strides)}")
        if list(strides) != sorted(set(strides)):
            raise ValueError(f"detection strides must be strictly increasing, got {list(strides)}")
        self.num_classes = num_classes
        self.strides = [int(s) for s in strides]
        self.level_ids = [list(in_strides).index(s) for s in strides]
        self.size_ranges = level_size_ranges(strides=self.strides, size_mult=size_mult)
        self.center_radius, self.focal_alpha, self.focal_gamma = center_radius, focal_alpha, focal_gamma
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.topk_per_level, self.max_detections = topk_per_level, max_detections
        self.fpn = FPN(in_channels=[in_channels[i] for i in self.level_ids], width=width)
        self.cls_tower, self.box_tower = _tower(width, num_convs), _tower(width, num_convs)
        self.cls_logits = nn.Conv2d(width, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float) -> None:
        for module in [self.cls_tower, self.box_tower, self.cls_logits, self.bbox_pred, self.centerness]:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Features) -> dict[str, Tensor]:
        """``feats.pyramid`` (backbone strides) -> dict of flattened outputs (see module docstring)."""
        fpn = self.fpn([feats.pyramid[i] for i in self.level_ids])
        cls, ltrb, ctr, points, point_strides = [], [], [], [], []
        for level, (x, stride) in enumerate(zip(fpn, self.strides)):
            c, r = self.cls_tower(x), self.box_tower(x)
            dist = (self.scales[level] * self.bbox_pred(r)).clamp(max=_MAX_LOG_DIST).exp() * stride
            cls.append(self.cls_logits(c).flatten(2).transpose(1, 2))
            ltrb.append(dist.flatten(2).transpose(1, 2))
            ctr.append(self.centerness(r).flatten(1))
            pts = grid_points(height=x.shape[-2], width=x.shape[-1], stride=stride, device=x.device)
            points.append(pts)
            point_strides.append(torch.full((pts.shape[0],), stride, device=x.device, dtype=torch.long))
        return {
            "cls_logits": torch.cat(cls, 1),
            "box_ltrb": torch.cat(ltrb, 1),
            "centerness": torch.cat(ctr, 1),
            "points": torch.cat(points, 0),
            "point_strides": torch.cat(point_strides, 0),
        }

    def _point_ranges(self, point_strides: Tensor) -> Tensor:
        table = torch.tensor(self.size_ranges, device=point_strides.device, dtype=torch.float32)
        level = torch.searchsorted(torch.tensor(self.strides, device=point_strides.device), point_strides)
        return table[level]

    def assign(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
        """FCOS targets for a batch: labels ``[B, N]`` (-1 = background) and boxes ``[B, N, 4]``."""
        points, strides = outputs["points"], outputs["point_strides"]
        ranges = self._point_ranges(strides)
        labels, boxes = [], []
        for target in targets:
            lab, box = fcos_assign(
                points=points,
                point_strides=strides,
                point_ranges=ranges,
                boxes=target_boxes(target).to(points.device),
                labels=torch.as_tensor(target["labels"]).reshape(-1).long().to(points.device),
                center_radius=self.center_radius,
            )
            labels.append(lab)
            boxes.append(box)
        return torch.stack(labels), torch.stack(boxes)

    def loss_parts(self, outputs: Mapping[str, Tensor], batch: Batch) -> LossParts:
        """The focal (``cls``), GIoU (``box``) and centerness BCE sums over the batch, each with the number
        of positive points, their normaliser (see ``gppf.interfaces.normalized_loss``)."""
        cls = outputs["cls_logits"].float()
        labels, boxes = self.assign(outputs, batch.targets)
        pos = labels >= 0
        num_pos = pos.sum().float()
        onehot = torch.zeros_like(cls)
        onehot[pos] = F.one_hot(labels[pos], self.num_classes).to(cls.dtype)
        loss_cls = sigmoid_focal_loss(cls, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        points = outputs["points"].expand(cls.shape[0], -1, -1)[pos]
        pred_boxes = decode_ltrb(points, outputs["box_ltrb"].float()[pos])
        loss_box = generalized_box_iou_loss(pred_boxes, boxes[pos], reduction="sum")
        ctr_target = centerness_target(encode_ltrb(points, boxes[pos]))
        loss_ctr = F.binary_cross_entropy_with_logits(
            outputs["centerness"].float()[pos], ctr_target, reduction="sum"
        )
        return {"cls": (loss_cls, num_pos), "box": (loss_box, num_pos), "centerness": (loss_ctr, num_pos)}

    def loss_terms(self, outputs: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """The three loss terms ``cls``, ``box``, ``centerness`` (each normalized by ``max(1, #positives)``)."""
        return {k: s / c.clamp(min=1) for k, (s, c) in self.loss_parts(outputs, batch).items()}

    def loss(self, outputs: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """Sum of :meth:`loss_terms`."""
        return normalized_loss(self.loss_parts(outputs, batch))

    def _decode_image(
        self, cls: Tensor, ltrb: Tensor, ctr: Tensor, outputs: Mapping[str, Tensor], input_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Threshold, per-level top-k, decode and NMS for one image (input-pixel boxes)."""
        probs = cls.float().sigmoid()
        scores_all = (probs * ctr.float().sigmoid()[:, None]).sqrt()
        boxes, scores, labels = [], [], []
        for stride in self.strides:
            level = outputs["point_strides"] == stride
            cand = (probs[level] > self.score_thresh).flatten()
            flat_idx = cand.nonzero().squeeze(1)
            level_scores = scores_all[level].flatten()[flat_idx]
            level_scores, order = level_scores.topk(min(self.topk_per_level, level_scores.numel()))
            flat_idx = flat_idx[order]
            point_idx = flat_idx // self.num_classes
            boxes.append(decode_ltrb(outputs["points"][level][point_idx], ltrb.float()[level][point_idx]))
            scores.append(level_scores)
            labels.append(flat_idx % self.num_classes)
        boxes_t, scores_t, labels_t = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        boxes_t[:, 0::2] = boxes_t[:, 0::2].clamp(0, input_size[1])
        boxes_t[:, 1::2] = boxes_t[:, 1::2].clamp(0, input_size[0])
        keep = batched_nms(boxes_t, scores_t, labels_t, self.nms_thresh)[: self.max_detections]
        return boxes_t[keep], scores_t[keep], labels_t[keep]

    @torch.no_grad()
    def predict(self, outputs: Mapping[str, Tensor], batch: Batch) -> list[dict[str, Any]]:
        """Per image: ``boxes [n, 4]`` XYXY in ORIGINAL image pixels, ``scores [n]``, ``labels [n]`` int64,
        ``image_id``. Boxes are mapped back with :func:`boxes_to_original`."""
        input_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        results = []
        for i, target in enumerate(batch.targets):
            boxes, scores, labels = self._decode_image(
                outputs["cls_logits"][i], outputs["box_ltrb"][i], outputs["centerness"][i], outputs, input_size
            )
            boxes = boxes_to_original(boxes, target=target, input_size=input_size)
            results.append({"boxes": boxes, "scores": scores, "labels": labels, "image_id": target["image_id"]})
        return results
