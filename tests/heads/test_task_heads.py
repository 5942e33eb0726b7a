"""Classification / multilabel / segmentation / reid heads and the FPN neck."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gppf.data.collate import Batch
from gppf.heads import (
    FPN,
    ClassificationHead,
    MultilabelHead,
    ReidHead,
    SegmentationHead,
    batch_hard_triplet_loss,
    masked_bce_with_logits,
)

CHANNELS = [8, 16, 32, 32]


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Feats:
    pyramid: list[Tensor]
    pooled: Tensor


def _feats(batch: int = 2, size: int = 32) -> Feats:
    pyramid = [torch.randn(batch, c, size // s, size // s) for c, s in zip(CHANNELS, [4, 8, 16, 32])]
    return Feats(pyramid=pyramid, pooled=torch.randn(batch, 12))


def _batch(n: int, size: int = 32, **stacked: Tensor) -> Batch:
    return Batch(images=torch.zeros(n, 3, size, size), targets=[{} for _ in range(n)], stacked=stacked)


def test_fpn_keeps_strides_at_common_width():
    levels = FPN(in_channels=CHANNELS, width=24)(_feats().pyramid)
    assert [tuple(x.shape) for x in levels] == [(2, 24, 8, 8), (2, 24, 4, 4), (2, 24, 2, 2), (2, 24, 1, 1)]
    with pytest.raises(ValueError, match="levels"):
        FPN(in_channels=CHANNELS, width=8)(_feats().pyramid[:3])


def test_classification_head_loss_is_cross_entropy():
    head = ClassificationHead(pooled_dim=12, num_classes=5, label_smoothing=0.2)
    feats, batch = _feats(), _batch(2, label=torch.tensor([1, 4]))
    logits_BC = head(feats)
    assert logits_BC.shape == (2, 5)
    expected = F.cross_entropy(logits_BC, torch.tensor([1, 4]), label_smoothing=0.2)
    assert float(head.loss(logits_BC, batch).detach()) == pytest.approx(float(expected.detach()))
    assert ClassificationHead(pooled_dim=12, num_classes=5, hidden=7)(feats).shape == (2, 5)


def test_masked_bce_ignores_unknown_labels():
    logits_BC = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.2]], requires_grad=True)
    labels_BC = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]])
    known = labels_BC >= 0
    expected = F.binary_cross_entropy_with_logits(logits_BC[known], labels_BC[known])
    assert float(masked_bce_with_logits(logits_BC, labels_BC).detach()) == pytest.approx(float(expected.detach()))
    none_known = masked_bce_with_logits(logits_BC, torch.full((2, 3), -1.0))
    none_known.backward()
    assert float(none_known.detach()) == 0.0 and bool(torch.isfinite(logits_BC.grad).all())


def test_multilabel_head_predicts_probabilities():
    head = MultilabelHead(pooled_dim=12, num_classes=3)
    out = head(_feats())
    probs_BC = head.predict(out, _batch(2))
    assert probs_BC.shape == (2, 3) and bool(((probs_BC > 0) & (probs_BC < 1)).all())


def test_segmentation_head_upsamples_and_ignores():
    head = SegmentationHead(in_channels=CHANNELS, num_classes=4, width=16)
    with torch.no_grad():
        logits = head(_feats())
    assert logits.shape == (2, 4, 32, 32)
    mask_BHW = torch.randint(0, 4, (2, 32, 32))
    mask_BHW[:, :8] = 255
    expected = F.cross_entropy(logits, mask_BHW, ignore_index=255)
    assert float(head.loss(logits, _batch(2, mask=mask_BHW))) == pytest.approx(float(expected), rel=1e-5)
    all_ignored = head.loss(logits, _batch(2, mask=torch.full((2, 32, 32), 255)))
    assert float(all_ignored) == 0.0
    odd_mask = torch.zeros(2, 30, 34, dtype=torch.int64)  # logits are resized to the mask
    assert head.predict(logits, _batch(2, mask=odd_mask)).shape == (2, 30, 34)


def test_triplet_hand_computed():
    emb_BD = torch.tensor([[0.0], [1.0], [3.0]])
    ids_B = torch.tensor([0, 0, 1])
    # anchor 0: d+ = 1, d- = 3; anchor 1: d+ = 1, d- = 2; anchor 2 has no positive
    assert float(batch_hard_triplet_loss(emb_BD, ids_B, margin=1.5)) == pytest.approx((0.0 + 0.5) / 2)
    soft = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(-1.0))) / 2
    assert float(batch_hard_triplet_loss(emb_BD, ids_B, margin=None)) == pytest.approx(float(soft))


def test_triplet_without_positives_is_zero_not_nan():
    emb_BD = torch.randn(4, 6, requires_grad=True)
    loss = batch_hard_triplet_loss(emb_BD, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool(torch.isfinite(emb_BD.grad).all())


def test_reid_head_bnneck_and_lookup():
    head = ReidHead(pooled_dim=12, identities=[5, 9, 2], emb_dim=8)
    assert not head.bnneck.bias.requires_grad
    out = head(_feats(batch=4))
    assert out["logits"].shape == (4, 3) and out["feat"].shape == (4, 8)
    assert head.rows(torch.tensor([2, 5, 9, 7])).tolist() == [2, 0, 1, -1]
    loss = head.loss(out, _batch(4, identity=torch.tensor([5, 5, 9, 9])))
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    emb_BE = head.predict(out, _batch(4))
    assert torch.allclose(emb_BE.norm(dim=1), torch.ones(4))
    unseen = head.loss(head(_feats(batch=2)), _batch(2, identity=torch.tensor([7, 8])))
    assert float(unseen.detach()) == 0.0


def test_heads_on_real_tiny_backbone():
    gppf_backbones = pytest.importorskip("gppf.backbones")
    backbone = gppf_backbones.create_backbone("gppf_r18", legos=4, active=2, tasks=["t"], width_mult=0.25)
    feats = backbone(torch.randn(2, 3, 64, 64), task="t")
    dim, chans = backbone.pooled_dim, backbone.feature_channels
    assert ClassificationHead(pooled_dim=dim, num_classes=3)(feats).shape == (2, 3)
    assert SegmentationHead(in_channels=chans, num_classes=3, width=16)(feats).shape == (2, 3, 64, 64)
    assert ReidHead(pooled_dim=dim, identities=[0, 1], emb_dim=8)(feats)["emb"].shape == (2, 8)
