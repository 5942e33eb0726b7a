"""Task type ``multilabel`` (e.g. pedestrian attributes): ``C`` binary labels per image, ``-1`` unknown.

Metrics ``map`` (mean class AP) and ``mean_acc`` (label-based mA), see ``gppf.metrics.multilabel``.
Head options (from ``MultilabelHead``): ``hidden``, ``dropout``, ``pos_weight`` (BCE weight of positives).
Transforms: resize to ``S x S`` (no crop: crops can remove the labelled attribute) + flip.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.heads.multilabel import MultilabelHead
from gppf.metrics.multilabel import MultilabelMetric, multilabel_chance
from gppf.tasks.base import TaskType, iter_targets


class MultilabelType(TaskType):
    name = "multilabel"
    head = MultilabelHead
    primary_metric = "map"

    def new_metric(self, cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> MultilabelMetric:
        return MultilabelMetric()

    def chance(self, *, num_classes: int, dataset: Dataset) -> dict[str, float]:
        labels_NC = torch.stack([torch.as_tensor(t["labels"]).float() for t in iter_targets(dataset)])
        return multilabel_chance(labels_NC)
