"""Task type ``keypoints``: registration, keypoint transforms, end-to-end coordinate mapping, short fit."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision import tv_tensors

import gppf
from gppf.config import DataConfig, TaskConfig
from gppf.data.base import READERS, BadSamples, SampleDataset
from gppf.heads.keypoints import gaussian_heatmaps, target_keypoints
from gppf.metrics.coco import make_coco
from gppf.tasks import TASK_TYPES, build_task
from gppf.tasks.keypoints import RandomFlipKeypoints, centre_guess_pck, num_keypoints_of

KP_READER = "test_tiny_keypoints"
CROP_HW = (40, 32)
KP_COLOURS = torch.tensor([[230, 40, 40], [40, 230, 40], [40, 40, 230]], dtype=torch.uint8)
SIGMAS = (0.1, 0.1, 0.1)


class TinyKeypointDataset(SampleDataset):
    """Top-down crops (40 x 32) of larger images with 3 keypoints drawn as coloured squares; two crops per
    image id; keypoint 1 unlabelled in every fourth sample. ``coco`` holds the keypoints in original pixels."""

    def __init__(self, *, n: int, seed: int, with_coco: bool) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.classes = ["creature"]
        self.bad = BadSamples(policy="error", where="tiny-kp")
        self.sigmas = SIGMAS
        self.items = [self._sample(i, gen) for i in range(n)]
        self.coco = make_coco(self._coco_dict()) if with_coco else None

    def _sample(self, index: int, gen: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        h, w = CROP_HW
        image = (torch.full((3, h, w), 100) + torch.randint(-10, 11, (3, h, w), generator=gen)).to(torch.uint8)
        xs, ys = torch.randint(4, w - 4, (3,), generator=gen), torch.randint(4, h - 4, (3,), generator=gen)
        xy = torch.stack([xs, ys], 1)
        vis = torch.tensor([2.0, 0.0 if index % 4 == 0 else 1.0, 2.0])
        for k in range(3):
            if vis[k] > 0:
                x, y = int(xy[k, 0]), int(xy[k, 1])
                image[:, y - 2 : y + 3, x - 2 : x + 3] = KP_COLOURS[k].view(3, 1, 1)
        kpts = torch.cat([xy.float() + 0.5, vis[:, None]], 1)  # centre of the drawn square
        kpts[vis == 0, :2] = 0.0
        x0, y0 = (int(v) for v in torch.randint(0, 60, (2,), generator=gen))
        crop_box = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
        target = {
            "keypoints": kpts, "box": crop_box + torch.tensor([3.0, 3.0, -3.0, -3.0]), "crop_box": crop_box,
            "area": float((w - 6) * (h - 6)), "ann_id": 1000 + index, "image_id": 10 + index // 2,
            "image_size": (120, 120), "orig_size": CROP_HW,
        }
        return tv_tensors.Image(image), target

    def _coco_dict(self) -> dict[str, Any]:
        anns = []
        for _, t in self.items:
            k = t["keypoints"].clone()
            labelled = k[:, 2] > 0
            k[labelled, :2] += t["crop_box"][:2]
            box = t["box"].tolist()
            anns.append({"id": t["ann_id"], "image_id": t["image_id"], "category_id": 1,
                         "keypoints": k.reshape(-1).tolist(), "num_keypoints": int(labelled.sum()), "area": t["area"],
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0})
        ids = sorted({t["image_id"] for _, t in self.items})
        return {"images": [{"id": i, "height": 120, "width": 120} for i in ids], "annotations": anns,
                "categories": [{"id": 1, "name": "creature"}]}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.items[index]
        return image, dict(target)


def _reader(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: str) -> TinyKeypointDataset:
    opts = {"n": 8, "with_coco": True, **cfg.options}
    return TinyKeypointDataset(seed=0 if split == "train" else 1, **opts)


if KP_READER not in READERS:
    READERS.add(KP_READER, _reader)


class TaskView(nn.Module):
    """A lego backbone seen as ``backbone(images) -> Features`` for one task."""

    def __init__(self, backbone: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone, self.task = backbone, task

    def forward(self, images: Tensor) -> Any:
        return self.backbone(images, task=self.task)


def _backbone() -> TaskView:
    torch.manual_seed(0)
    return TaskView(gppf.create_backbone("gppf_r18", legos=4, active=2, tasks=["t"], width_mult=0.25), "t")


def _task(backbone: TaskView, **overrides: Any):
    options = overrides.pop("options", {})
    fields: dict[str, Any] = {"name": "kp", "type": "keypoints", "image_size": 64, "head": {"width": 32}}
    fields.update(overrides)
    cfg = TaskConfig(data=DataConfig(format=KP_READER, options=options), **fields)
    b = backbone.backbone
    return build_task(cfg, feature_channels=b.feature_channels, pooled_dim=b.pooled_dim)


def test_registered_with_ap_and_centre_guess_chance() -> None:
    task_type = TASK_TYPES.get("keypoints")
    assert task_type.primary_metric == "ap"
    # centre (20, 20), threshold 0.2 * 50 = 10: first keypoint 5 px away (hit), second 15 px (miss)
    first = {"keypoints": torch.tensor([[25.0, 20.0, 2.0], [20.0, 35.0, 1.0], [0.0, 0.0, 0.0]]),
             "crop_box": torch.tensor([100.0, 100.0, 140.0, 140.0]), "box": torch.tensor([0.0, 0.0, 50.0, 30.0])}
    # no crop box: centre of orig_size (10, 30) -> (15, 5), threshold 0.2 * 20 = 4: one hit of one
    second = {"keypoints": torch.tensor([[14.0, 7.0, 2.0]]), "orig_size": (10, 30),
              "box": torch.tensor([0.0, 0.0, 20.0, 10.0])}
    assert task_type.chance(num_classes=1, dataset=[(None, first)]) == {"ap": 0.0, "pck": 0.5}
    assert centre_guess_pck([(None, first), (None, second)]) == pytest.approx(2 / 3)
    assert centre_guess_pck([(None, first), (None, second)], max_samples=1) == pytest.approx(0.5)
    assert 0.0 <= centre_guess_pck(TinyKeypointDataset(n=8, seed=0, with_coco=False)) <= 1.0


def test_num_keypoints_from_reader_or_sample() -> None:
    dataset = TinyKeypointDataset(n=2, seed=0, with_coco=False)
    assert num_keypoints_of(dataset) == 3
    dataset.num_keypoints = 5
    assert num_keypoints_of(dataset) == 5


def test_transforms_move_keypoints_with_the_image() -> None:
    task = _task(_backbone(), head={"width": 32, "flip_pairs": [[0, 2]]})
    _, raw = task.val_set.base[1]
    image, target = task.val_set[1]
    assert image.shape == (3, 64, 64) and type(target["keypoints"]) is Tensor and "visibility" not in target
    scale = torch.tensor([64 / CROP_HW[1], 64 / CROP_HW[0], 1.0])
    assert torch.allclose(target["keypoints"], raw["keypoints"] * scale)
    torch.manual_seed(0)
    image, target = task.train_set[1]
    assert image.shape == (3, 64, 64) and target["keypoints"].shape == (3, 3)
    assert target["keypoints"][:, 2].sort().values.tolist() == raw["keypoints"][:, 2].sort().values.tolist()


def test_random_flip_swaps_pairs_only_when_known() -> None:
    image = tv_tensors.Image(torch.arange(2 * 4 * 8, dtype=torch.uint8).reshape(2, 4, 8)[:1].expand(3, 4, 8))
    kpts = torch.tensor([[1.0, 1.0, 2.0], [4.0, 2.0, 1.0], [6.5, 3.0, 2.0]])
    flip = RandomFlipKeypoints(flip_pairs=[(0, 2)], p=1.0)
    out_image, out = flip(image, {"keypoints": kpts})
    assert torch.equal(out_image, image.flip(-1))
    assert out["keypoints"].tolist() == [[1.5, 3.0, 2.0], [4.0, 2.0, 1.0], [7.0, 1.0, 2.0]]
    _, same = RandomFlipKeypoints(flip_pairs=None, p=1.0)(image, {"keypoints": kpts})
    assert torch.equal(same["keypoints"], kpts)
    _, from_target = RandomFlipKeypoints(flip_pairs=None, p=1.0)(image, {"keypoints": kpts, "flip_pairs": [(0, 2)]})
    assert torch.equal(from_target["keypoints"], out["keypoints"])


@pytest.mark.parametrize("with_coco", [True, False])
def test_target_heatmaps_score_perfectly_in_original_coordinates(with_coco: bool) -> None:
    """val transform -> collate -> predict (mapped through crop_box) -> OKS AP / PCK against raw keypoints."""
    backbone = _backbone()
    task = _task(backbone, options={"with_coco": with_coco})
    metric = task.new_metric()
    assert (metric.coco is not None) == with_coco and metric.sigmas == SIGMAS
    loader = torch.utils.data.DataLoader(task.val_set, batch_size=3, collate_fn=task.collate)
    for batch in loader:
        heatmaps, _ = gaussian_heatmaps(
            keypoints=target_keypoints(batch.targets), heatmap_size=(16, 16), stride=task.head.stride, sigma=2.0
        )
        metric.update(task.head.predict(heatmaps, batch), batch)
    assert metric.compute() == {"ap": pytest.approx(1.0), "pck": pytest.approx(1.0)}


def test_few_steps_of_training_reduce_the_loss(fit: Any, run_eval: Any) -> None:
    backbone = _backbone()
    task = _task(backbone, augment=False)
    batch = task.collate([task.train_set[i] for i in range(len(task.train_set))])
    losses = fit(task=task, backbone=backbone, batch=batch, steps=20, lr=3e-3)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    scores = run_eval(task=task, backbone=backbone)
    assert set(scores) == {"ap", "pck"} and all(0.0 <= v <= 1.0 for v in scores.values())
