"""Task heads: ``forward(feats) -> outputs``, ``loss(outputs, batch) -> Tensor``, ``predict(outputs, batch)``.

Detection and keypoint heads live in ``gppf.heads.detection`` / ``gppf.heads.keypoints``.
"""
from __future__ import annotations

from gppf.heads.classification import ClassificationHead, pooled_mlp
from gppf.heads.fpn import FPN, FeaturesLike, conv_norm_act, group_norm
from gppf.heads.multilabel import MultilabelHead, masked_bce_with_logits
from gppf.heads.reid import ReidHead, batch_hard_triplet_loss
from gppf.heads.segmentation import SegmentationHead, resize_logits

__all__ = [
    "FPN",
    "ClassificationHead",
    "FeaturesLike",
    "MultilabelHead",
    "ReidHead",
    "SegmentationHead",
    "batch_hard_triplet_loss",
    "conv_norm_act",
    "group_norm",
    "masked_bce_with_logits",
    "pooled_mlp",
    "resize_logits",
]
