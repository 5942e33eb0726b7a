"""Heatmap keypoint head: shapes, Gaussian targets, argmax decoding, loss and mapping to original pixels."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gppf.data.collate import Batch
from gppf.heads.keypoints import HeatmapKeypointHead, gaussian_heatmaps, heatmap_argmax

CHANNELS = [8, 16, 24, 32]
STRIDES = [4, 8, 16, 32]


def _feats(batch: int, size: int) -> SimpleNamespace:
    gen = torch.Generator().manual_seed(0)
    pyramid = [torch.randn(batch, c, size // s, size // s, generator=gen) for c, s in zip(CHANNELS, STRIDES)]
    return SimpleNamespace(pyramid=pyramid, pooled=torch.randn(batch, 32, generator=gen))


def _target(keypoints: list[list[float]], *, crop_box: list[float], image_id: int = 0) -> dict:
    x0, y0, x1, y1 = crop_box
    return {
        "keypoints": torch.tensor(keypoints),
        "box": torch.tensor(crop_box),
        "crop_box": torch.tensor(crop_box),
        "image_id": image_id,
        "orig_size": (int(y1 - y0), int(x1 - x0)),
    }


def test_forward_shape_and_bad_config() -> None:
    head = HeatmapKeypointHead(in_channels=CHANNELS, num_keypoints=5, width=32)
    assert head(_feats(2, 64)).shape == (2, 5, 16, 16)
    head.eval()
    assert head(_feats(1, 128)).shape == (1, 5, 32, 32)
    with pytest.raises(ValueError, match="num_keypoints"):
        HeatmapKeypointHead(in_channels=CHANNELS, num_keypoints=0)


def test_gaussian_heatmaps_peak_and_weights() -> None:
    kpts = torch.tensor([[[22.0, 6.0, 2.0], [5.0, 5.0, 0.0], [70.0, 10.0, 1.0]]])
    heatmaps, weights = gaussian_heatmaps(keypoints=kpts, heatmap_size=(16, 16), stride=4, sigma=2.0)
    assert heatmaps.shape == (1, 3, 16, 16)
    assert weights.tolist() == [[1.0, 0.0, 0.0]]  # invisible, outside the 64 x 64 input
    # x = 22 -> cell (22 / 4 - 0.5) = 5 exactly; y = 6 -> cell 1
    assert float(heatmaps[0, 0, 1, 5]) == pytest.approx(1.0)
    assert int(heatmaps[0, 0].argmax()) == 1 * 16 + 5


def test_argmax_roundtrip_within_a_quarter_cell() -> None:
    kpts = torch.tensor([[[22.0, 6.0, 2.0], [23.0, 41.0, 2.0], [37.9, 12.2, 2.0], [3.3, 60.7, 1.0]]])
    heatmaps, _ = gaussian_heatmaps(keypoints=kpts, heatmap_size=(16, 16), stride=4, sigma=2.0)
    xy, conf = heatmap_argmax(heatmaps, stride=4)
    err = (xy - kpts[..., :2]).abs()[0]
    assert float(err[:2].max()) < 1e-5  # cell centres and quarter positions are exact
    assert float(err[2].max()) <= 1.0 + 1e-5  # interior: within a quarter cell = stride / 4 pixels
    assert xy[0, 3].tolist() == [2.0, 62.0]  # border cells are not shifted (no outer neighbour)
    assert bool((conf > 0.5).all())


def test_loss_zero_at_target_ignores_unlabelled_and_half_for_zeros() -> None:
    head = HeatmapKeypointHead(in_channels=CHANNELS, num_keypoints=3, width=16, sigma=2.0)
    kpts = [[10.0, 12.0, 2.0], [40.0, 30.0, 1.0], [0.0, 0.0, 0.0]]
    batch = Batch(images=torch.zeros(1, 3, 64, 64), targets=[_target(kpts, crop_box=[0, 0, 64, 64])])
    target, _ = gaussian_heatmaps(keypoints=torch.tensor([kpts]), heatmap_size=(16, 16), stride=4, sigma=2.0)
    assert float(head.loss(target, batch)) == pytest.approx(0.0, abs=1e-7)
    noisy = target.clone()
    noisy[0, 2] = torch.rand(16, 16)  # the unlabelled keypoint's channel does not count
    assert float(head.loss(noisy, batch)) == pytest.approx(0.0, abs=1e-7)
    zeros = torch.zeros(1, 3, 16, 16)
    assert float(head.loss(zeros, batch)) == pytest.approx(0.5, abs=0.02)


def test_loss_backpropagates() -> None:
    head = HeatmapKeypointHead(in_channels=CHANNELS, num_keypoints=2, width=16)
    batch = Batch(
        images=torch.zeros(2, 3, 64, 64),
        targets=[_target([[10.0, 12.0, 2.0], [40.0, 30.0, 2.0]], crop_box=[0, 0, 64, 64])] * 2,
    )
    loss = head.loss(head(_feats(2, 64)), batch)
    loss.backward()
    assert loss.ndim == 0 and float(head.out.weight.grad.abs().sum()) > 0


def test_predict_maps_back_through_crop_box() -> None:
    head = HeatmapKeypointHead(in_channels=CHANNELS, num_keypoints=2, width=16)
    kpts = [[22.0, 6.0, 2.0], [30.0, 50.0, 2.0]]  # input pixels (64 x 64)
    targets = [
        _target(kpts, crop_box=[100.0, 50.0, 228.0, 82.0], image_id=3),  # 128 wide, 32 high: x * 2, y * 0.5
        _target(kpts, crop_box=[0.0, 0.0, 64.0, 64.0], image_id=4),
    ]
    batch = Batch(images=torch.zeros(2, 3, 64, 64), targets=targets)
    heatmaps, _ = gaussian_heatmaps(keypoints=torch.tensor([kpts] * 2), heatmap_size=(16, 16), stride=4, sigma=2.0)
    preds = head.predict(heatmaps, batch)
    assert preds["keypoints"].shape == (2, 2, 3) and preds["scores"].shape == (2,)
    expected = torch.tensor([[144.0, 53.0], [160.0, 75.0]])
    assert torch.allclose(preds["keypoints"][0, :, :2], expected, atol=1e-4)
    assert torch.allclose(preds["keypoints"][1, :, :2], torch.tensor(kpts)[:, :2], atol=1e-4)
    assert torch.allclose(preds["scores"], preds["keypoints"][..., 2].mean(-1))
