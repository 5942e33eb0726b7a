"""Task type ``detection``: registration, transforms, end-to-end coordinate mapping and a short fit."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision import tv_tensors

import gppf
from gppf.config import ConfigError, DataConfig, TaskConfig
from gppf.data.base import READERS, BadSamples, SampleDataset
from gppf.heads.detection import encode_ltrb
from gppf.metrics.coco import make_coco
from gppf.tasks import TASK_TYPES, build_task

DET_READER = "test_tiny_detection"
COLOURS = torch.tensor([[230, 40, 40], [40, 40, 230]], dtype=torch.uint8)
RAW_HW = (48, 64)  # raw images are not square: predictions must be mapped back per axis
CAT_IDS = [4, 9]


class TinyDetectionDataset(SampleDataset):
    """Grey images with one rectangle in each half (colour = class); optional COCO ground truth."""

    def __init__(self, *, n: int, seed: int, with_coco: bool) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.classes = ["red", "blue"]
        self.bad = BadSamples(policy="error", where="tiny-det")
        self.cat_ids = list(CAT_IDS)
        self.items = [self._sample(i, gen) for i in range(n)]
        self.coco = make_coco(self._coco_dict()) if with_coco else None

    def _sample(self, index: int, gen: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        h, w = RAW_HW
        image = (torch.full((3, h, w), 110) + torch.randint(-15, 16, (3, h, w), generator=gen)).to(torch.uint8)
        boxes, labels = [], []
        for half in range(1 + index % 2):
            bw, bh = (int(v) for v in torch.randint(12, 26, (2,), generator=gen))
            x0 = half * 32 + int(torch.randint(0, 32 - bw + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
            label = int(torch.randint(0, 2, (1,), generator=gen))
            image[:, y0 : y0 + bh, x0 : x0 + bw] = COLOURS[label].view(3, 1, 1)
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            labels.append(label)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=RAW_HW
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": 100 + index,
            "orig_size": RAW_HW,
        }
        return tv_tensors.Image(image), target

    def _coco_dict(self) -> dict[str, Any]:
        anns = []
        for _, target in self.items:
            for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                xywh = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
                anns.append({"id": len(anns) + 1, "image_id": target["image_id"], "category_id": CAT_IDS[label],
                             "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
        images = [{"id": t["image_id"], "height": RAW_HW[0], "width": RAW_HW[1]} for _, t in self.items]
        return {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in CAT_IDS]}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.items[index]
        return image, dict(target)


def _reader(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: str) -> TinyDetectionDataset:
    opts = {"n": 8, "with_coco": True, **cfg.options}
    return TinyDetectionDataset(seed=0 if split == "train" else 1, **opts)


if DET_READER not in READERS:
    READERS.add(DET_READER, _reader)


class TaskView(nn.Module):
    """A lego backbone seen as ``backbone(images) -> Features`` for one task."""

    def __init__(self, backbone: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone, self.task = backbone, task

    def forward(self, images: Tensor) -> Any:
        return self.backbone(images, task=self.task)


def _cfg(**overrides: Any) -> TaskConfig:
    options = overrides.pop("options", {})
    fields: dict[str, Any] = {"name": "det", "type": "detection", "image_size": 64, "head": {"width": 32}}
    fields.update(overrides)
    return TaskConfig(data=DataConfig(format=DET_READER, options=options), **fields)


def _backbone() -> TaskView:
    torch.manual_seed(0)
    return TaskView(gppf.create_backbone("gppf_r18", legos=4, active=2, tasks=["t"], width_mult=0.25), "t")


def _task(backbone: TaskView, **overrides: Any):
    b = backbone.backbone
    return build_task(_cfg(**overrides), feature_channels=b.feature_channels, pooled_dim=b.pooled_dim)


def test_registered_with_map_and_zero_chance() -> None:
    task_type = TASK_TYPES.get("detection")
    assert task_type.primary_metric == "map"
    assert task_type.chance(num_classes=2, dataset=None) == {"map": 0.0, "map50": 0.0}


def test_transforms_keep_boxes_consistent() -> None:
    backbone = _backbone()
    task = _task(backbone, augment=True)
    raw_image, raw = task.val_set.base[1]
    image, target = task.val_set[1]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    scale = torch.tensor([64 / RAW_HW[1], 64 / RAW_HW[0]] * 2)
    assert torch.allclose(target["boxes"].as_subclass(Tensor), raw["boxes"].as_subclass(Tensor) * scale)
    torch.manual_seed(3)
    for i in range(len(task.train_set)):
        image, target = task.train_set[i]
        boxes = target["boxes"].as_subclass(Tensor)
        assert image.shape == (3, 64, 64) and boxes.shape[0] == target["labels"].shape[0]
        assert bool((boxes >= 0).all() and (boxes <= 64).all())


def _perfect_outputs(head: nn.Module, out: dict, targets: list[dict]) -> dict:
    labels, boxes = head.assign(out, targets)
    pos = labels >= 0
    cls = torch.full_like(out["cls_logits"], -12.0)
    cls[pos] = cls[pos].scatter(1, labels[pos][:, None], 12.0)
    ltrb = torch.ones_like(out["box_ltrb"])
    ltrb[pos] = encode_ltrb(out["points"].expand(len(targets), -1, -1)[pos], boxes[pos])
    return {**out, "cls_logits": cls, "box_ltrb": ltrb, "centerness": torch.where(pos, 12.0, -12.0)}


@pytest.mark.parametrize("with_coco", [True, False])
def test_gt_encoded_outputs_score_map_one_against_original_coordinates(with_coco: bool) -> None:
    """val transform -> collate -> predict (mapped to original pixels) -> COCO eval against the raw boxes."""
    backbone = _backbone()
    task = _task(backbone, options={"with_coco": with_coco})
    metric = task.new_metric()
    assert (metric.coco is task.val_set.base.coco) and list(metric.cat_ids) == CAT_IDS
    loader = torch.utils.data.DataLoader(task.val_set, batch_size=3, collate_fn=task.collate)
    with torch.no_grad():
        for batch in loader:
            out = task.head(backbone(batch.images))
            metric.update(task.head.predict(_perfect_outputs(task.head, out, batch.targets), batch), batch)
    assert metric.compute() == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}


def test_few_steps_of_training_reduce_the_loss(fit: Any, run_eval: Any) -> None:
    backbone = _backbone()
    task = _task(backbone, augment=False)
    batch = task.collate([task.train_set[i] for i in range(len(task.train_set))])
    losses = fit(task=task, backbone=backbone, batch=batch, steps=20, lr=3e-3)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    scores = run_eval(task=task, backbone=backbone)
    assert set(scores) == {"map", "map50"} and all(0.0 <= v <= 1.0 for v in scores.values())


def test_unknown_head_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tasks.det.head.widht"):
        _task(_backbone(), head={"widht": 8})
