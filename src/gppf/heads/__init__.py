"""Task heads: ``forward(feats) -> outputs``, ``loss(outputs, batch) -> Tensor``, ``predict(outputs, batch)``.

Every head satisfies the ``gppf.interfaces.Head`` protocol (re-exported here). Constructor options a user
may set in ``TaskConfig.head`` are the keyword-only arguments with defaults (see ``gppf.tasks.base``).

Detection and keypoint heads live in ``gppf.heads.detection`` / ``gppf.heads.keypoints``.
"""
from __future__ import annotations

from gppf.heads.classification import ClassificationHead, pooled_mlp
from gppf.heads.fpn import FPN, conv_norm_act, group_norm
from gppf.heads.multilabel import MultilabelHead, masked_bce_with_logits
from gppf.heads.reid import ReidHead, batch_hard_triplet_loss
from gppf.heads.segmentation import SegmentationHead, resize_logits
from gppf.interfaces import Features, FeaturesLike, Head

__all__ = [
    "FPN",
    "ClassificationHead",
    "Features",
    "FeaturesLike",
    "Head",
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
