"""Task type ``classification``: single label per image, metrics ``top1`` / ``top5`` (fractions).

Head options (``cfg.head``, from ``ClassificationHead``): ``hidden`` (0 = linear head), ``dropout``,
``label_smoothing``. Transforms: train ``RandomResizedCrop`` + flip, val resize short side + centre crop.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.heads.classification import ClassificationHead
from gppf.metrics.classification import TopKAccuracy, classification_chance
from gppf.tasks.base import TaskType


class ClassificationType(TaskType):
    name = "classification"
    head = ClassificationHead
    primary_metric = "top1"
    train_mode = "crop"
    val_mode = "center_crop"

    def new_metric(self, cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> TopKAccuracy:
        return TopKAccuracy(num_classes=num_classes)

    def chance(self, *, num_classes: int, dataset: Dataset) -> dict[str, float]:
        return classification_chance(num_classes=num_classes)
