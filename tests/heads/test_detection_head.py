"""FCOS head: shapes, target assignment on hand-made boxes, decode roundtrip, loss, predict mapping."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torchvision import tv_tensors

from gppf.data.collate import Batch
from gppf.heads.detection import (
    FCOSHead,
    decode_ltrb,
    encode_ltrb,
    fcos_assign,
    grid_points,
    level_size_ranges,
)

CHANNELS = [8, 16, 24, 32]
STRIDES = [4, 8, 16, 32]


def _feats(batch: int, size: int) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)
    pyramid = [torch.randn(batch, c, size // s, size // s, generator=gen) for c, s in zip(CHANNELS, STRIDES)]
    return SimpleNamespace(pyramid=pyramid, pooled=torch.randn(batch, 32, generator=gen))


def _target(boxes: list[list[float]], labels: list[int], *, image_id: int, size: int, orig: tuple[int, int]) -> dict:
    return {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes).reshape(-1, 4), format="XYXY", canvas_size=(size, size)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": image_id,
        "orig_size": orig,
    }


def _single_level_inputs(stride: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    points = grid_points(height=size // stride, width=size // stride, stride=stride)
    strides = torch.full((points.shape[0],), stride)
    ranges = torch.tensor([[0.0, 64.0]]).expand(points.shape[0], 2)
    return points, strides, ranges


def test_forward_shapes_and_points() -> None:
    head = FCOSHead(in_channels=CHANNELS, num_classes=3, width=16)
    out = head(_feats(2, 64))
    n = 8 * 8 + 4 * 4 + 2 * 2
    assert out["cls_logits"].shape == (2, n, 3)
    assert out["box_ltrb"].shape == (2, n, 4)
    assert out["centerness"].shape == (2, n)
    assert out["points"].shape == (n, 2)
    assert out["point_strides"].tolist() == [8] * 64 + [16] * 16 + [32] * 4
    assert out["points"][0].tolist() == [4.0, 4.0] and out["points"][64].tolist() == [8.0, 8.0]
    assert bool((out["box_ltrb"] > 0).all())
    head.eval()
    assert set(head(_feats(2, 64))) == set(out)  # same structure in eval mode


def test_p2_level_and_stride_validation() -> None:
    head = FCOSHead(in_channels=CHANNELS, num_classes=2, width=16, strides=(4, 8, 16, 32))
    assert head(_feats(1, 64))["cls_logits"].shape[1] == 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2
    with pytest.raises(ValueError, match="not in the backbone strides"):
        FCOSHead(in_channels=CHANNELS, num_classes=2, strides=(8, 64))
    with pytest.raises(ValueError, match="increasing"):
        FCOSHead(in_channels=CHANNELS, num_classes=2, strides=(16, 8))
    with pytest.raises(ValueError, match="num_classes"):
        FCOSHead(in_channels=CHANNELS, num_classes=0)


def test_level_size_ranges_follow_fcos() -> None:
    assert level_size_ranges(strides=[8, 16, 32]) == [(0.0, 64.0), (64.0, 128.0), (128.0, math.inf)]
    assert level_size_ranges(strides=[4, 8], size_mult=4.0) == [(0.0, 16.0), (16.0, math.inf)]


def test_assignment_on_hand_made_box() -> None:
    """Box (16,16)-(48,40), centre (32,28): with radius 1.5 the stride-8 positives are the cell centres
    strictly inside (20,16)-(44,40): x in {28, 36}, y in {20, 28, 36}. The stride-16/32 points either fall
    outside their centre region or have max distance < 64 (out of their size ranges)."""
    head = FCOSHead(in_channels=CHANNELS, num_classes=3, width=16)
    out = head(_feats(1, 64))
    labels, boxes = head.assign(out, [_target([[16, 16, 48, 40]], [2], image_id=0, size=64, orig=(64, 64))])
    pos = labels[0] >= 0
    got = sorted(tuple(p) for p in out["points"][pos].tolist())
    assert got == sorted((x, y) for x in (28.0, 36.0) for y in (20.0, 28.0, 36.0))
    assert out["point_strides"][pos].unique().tolist() == [8]
    assert labels[0][pos].unique().tolist() == [2]
    assert boxes[0][pos].unique(dim=0).tolist() == [[16.0, 16.0, 48.0, 40.0]]
    assert bool((boxes[0][~pos] == 0).all())


def test_assignment_without_center_sampling_and_ambiguity() -> None:
    points, strides, ranges = _single_level_inputs(8)
    big, small = [0.0, 0.0, 40.0, 40.0], [16.0, 16.0, 40.0, 40.0]
    labels, boxes = fcos_assign(
        points=points, point_strides=strides, point_ranges=ranges,
        boxes=torch.tensor([big, small]), labels=torch.tensor([0, 1]), center_radius=0.0,
    )
    inside_big = (points < 40).all(dim=1)
    inside_small = inside_big & (points > 16).all(dim=1)
    assert torch.equal(labels >= 0, inside_big)
    assert bool((labels[inside_small] == 1).all()) and bool((labels[inside_big & ~inside_small] == 0).all())
    assert boxes[inside_small].unique(dim=0).tolist() == [small]


def test_assignment_size_range_and_empty() -> None:
    points, strides, _ = _single_level_inputs(8)
    too_large = torch.tensor([[32.0, 64.0]]).expand(points.shape[0], 2)  # objects with max distance <= 32 only
    labels, _ = fcos_assign(
        points=points, point_strides=strides, point_ranges=too_large,
        boxes=torch.tensor([[0.0, 0.0, 20.0, 20.0]]), labels=torch.tensor([0]),
    )
    assert not bool((labels >= 0).any())
    labels, boxes = fcos_assign(
        points=points, point_strides=strides, point_ranges=too_large,
        boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
    )
    assert labels.tolist() == [-1] * points.shape[0] and boxes.shape == (points.shape[0], 4)


def test_encode_decode_roundtrip() -> None:
    points = torch.tensor([[10.0, 12.0], [30.5, 7.25]])
    boxes = torch.tensor([[2.0, 3.0, 20.0, 30.0], [25.0, 1.0, 40.0, 9.5]])
    assert torch.allclose(decode_ltrb(points, encode_ltrb(points, boxes)), boxes)


def _perfect_outputs(head: FCOSHead, out: dict, targets: list[dict]) -> dict:
    """Outputs that encode the assigned gt boxes exactly (high scores at positives only)."""
    labels, boxes = head.assign(out, targets)
    pos = labels >= 0
    cls = torch.full_like(out["cls_logits"], -12.0)
    cls[pos] = cls[pos].scatter(1, labels[pos][:, None], 12.0)
    ltrb = torch.ones_like(out["box_ltrb"])
    ltrb[pos] = encode_ltrb(out["points"].expand(len(targets), -1, -1)[pos], boxes[pos])
    return {**out, "cls_logits": cls, "box_ltrb": ltrb, "centerness": torch.where(pos, 12.0, -12.0)}


def test_predict_decodes_assigned_boxes_back_in_original_pixels() -> None:
    head = FCOSHead(in_channels=CHANNELS, num_classes=3, width=16)
    feats = _feats(2, 64)
    targets = [
        _target([[16, 16, 48, 40], [2, 40, 20, 62]], [2, 0], image_id=7, size=64, orig=(128, 32)),
        _target([[0, 0, 64, 64]], [1], image_id=9, size=64, orig=(64, 64)),
    ]
    batch = Batch(images=torch.zeros(2, 3, 64, 64), targets=targets)
    perfect = _perfect_outputs(head, head(feats), targets)
    preds = head.predict(perfect, batch)
    assert [p["image_id"] for p in preds] == [7, 9]
    # image 7: original is 128 high x 32 wide -> x * 0.5, y * 2
    order = preds[0]["labels"].argsort(descending=True)
    assert preds[0]["labels"][order].tolist() == [2, 0]
    expected = torch.tensor([[8.0, 32.0, 24.0, 80.0], [1.0, 80.0, 10.0, 124.0]])
    assert torch.allclose(preds[0]["boxes"][order], expected, atol=1e-4)
    assert preds[1]["boxes"].tolist() == [[0.0, 0.0, 64.0, 64.0]] and preds[1]["labels"].tolist() == [1]
    assert bool((preds[0]["scores"] > 0.99).all())
    terms = head.loss_terms(perfect, batch)
    assert float(terms["box"]) < 1e-4 and float(terms["cls"]) < 1e-4


def test_predict_uses_recorded_scale() -> None:
    head = FCOSHead(in_channels=CHANNELS, num_classes=1, width=16)
    target = _target([[8, 8, 40, 40]], [0], image_id=1, size=64, orig=(100, 100))
    target["scale"] = (2.0, 2.0)
    batch = Batch(images=torch.zeros(1, 3, 64, 64), targets=[target])
    preds = head.predict(_perfect_outputs(head, head(_feats(1, 64)), [target]), batch)
    assert torch.allclose(preds[0]["boxes"], torch.tensor([[16.0, 16.0, 80.0, 80.0]]))


def test_loss_is_finite_with_empty_images_and_backpropagates() -> None:
    head = FCOSHead(in_channels=CHANNELS, num_classes=2, width=16)
    feats = _feats(2, 64)
    targets = [
        _target([], [], image_id=0, size=64, orig=(64, 64)),
        _target([[4, 4, 60, 30]], [1], image_id=1, size=64, orig=(64, 64)),
    ]
    loss = head.loss(head(feats), Batch(images=torch.zeros(2, 3, 64, 64), targets=targets))
    assert loss.ndim == 0 and bool(torch.isfinite(loss))
    loss.backward()
    assert head.cls_logits.weight.grad is not None and float(head.bbox_pred.weight.grad.abs().sum()) > 0
    empty = [_target([], [], image_id=i, size=64, orig=(64, 64)) for i in range(2)]
    empty_loss = head.loss(head(feats), Batch(images=torch.zeros(2, 3, 64, 64), targets=empty))
    assert bool(torch.isfinite(empty_loss)) and float(empty_loss.detach()) > 0  # focal loss on all-background
