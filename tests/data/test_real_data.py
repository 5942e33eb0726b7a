"""Readers on the shared real datasets, unchanged (opt-in: ``pytest -m realdata``).

Data location: ``$GPPF_DATA`` or ``<repo>/../shared/data``; tests skip cleanly when it is absent.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

import gppf.data.readers  # noqa: F401
from gppf.config import DataConfig, load_config, read_yaml
from gppf.data.base import READERS
from gppf.data.check import check_config

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("GPPF_DATA") or REPO.parent / "shared" / "data")
CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist", "Unlabelled"]


def dataset(sub: str, **cfg_kw):
    if not (DATA / sub).is_dir():
        pytest.skip(f"real dataset {DATA / sub} not available (set GPPF_DATA)")
    cfg = DataConfig(root=str(DATA / sub), **cfg_kw)
    return lambda task_type, split: READERS.get(cfg.format)(cfg, split=split, task_type=task_type,
                                                            on_bad_sample="error")


def check_items(ds, indices, *, keys: set[str]) -> list[dict]:
    targets = []
    for i in indices:
        image, target = ds[i]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape[0] == 3
        assert keys | {"image_id", "orig_size"} <= set(target)
        assert tuple(target["orig_size"]) == tuple(image.shape[-2:])
        targets.append(target)
    return targets


def test_cifar10_imagefolder():
    make = dataset("cifar10", format="imagefolder", train="train", val="test")
    train, val = make("classification", "train"), make("classification", "val")
    assert (len(train), len(val)) == (50000, 10000)
    assert train.classes == val.classes and len(train.classes) == 10 and "airplane" in train.classes
    targets = check_items(val, range(0, 10000, 1000), keys={"label"})
    assert sorted(t["label"] for t in targets) == list(range(10))
    assert val[0][0].shape == (3, 32, 32)


def test_camvid_mask_png():
    make = dataset("camvid", format="mask_png", classes=CAMVID, options={"ignore_index": 11})
    train, val = make("segmentation", "train"), make("segmentation", "val")
    assert (len(train), len(val)) == (367, 101) and len(train.classes) == 11
    for t in check_items(val, range(0, 101, 25), keys={"mask"}):
        assert t["mask"].shape == (360, 480)
        values = set(t["mask"].unique().tolist())
        assert values <= set(range(11)) | {255} and len(values) > 3


def test_coco8_yolo_detection_and_ground_truth():
    make = dataset("ultralytics/coco8", format="yolo", options={"yaml": "coco8.yaml"})
    train, val = make("detection", "train"), make("detection", "val")
    assert (len(train), len(val)) == (4, 4) and len(val.classes) == 80 and val.classes[0] == "person"
    targets = check_items(val, range(4), keys={"boxes", "labels"})
    assert sum(len(t["boxes"]) for t in targets) == val.annotation_counts()["boxes"] == 17
    dets = []
    for t in targets:
        h, w = t["orig_size"]
        assert (t["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (t["boxes"][:, :2] >= 0).all()
        for (x0, y0, x1, y1), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            dets.append({"image_id": t["image_id"], "category_id": val.cat_ids[label],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 1.0})
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(val.coco, val.coco.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_coco8_yolo_multilabel():
    ds = dataset("ultralytics/coco8", format="yolo", options={"yaml": "coco8.yaml"})("multilabel", "train")
    labels = torch.stack([t["labels"] for t in check_items(ds, range(4), keys={"labels"})])
    assert labels.shape == (4, 80) and set(labels.unique().tolist()) == {0.0, 1.0}


def test_coco8_seg_yolo_segmentation():
    make = dataset("ultralytics/coco8-seg", format="yolo", options={"yaml": "coco8-seg.yaml"})
    ds = make("segmentation", "val")
    assert len(ds.classes) == 81 and ds.classes[0] == "background"
    for t in check_items(ds, range(4), keys={"mask"}):
        values = set(t["mask"].unique().tolist())
        assert 0 in values and len(values) > 1 and max(values) <= 80


def test_coco8_pose_yolo_keypoints():
    make = dataset("ultralytics/coco8-pose", format="yolo", options={"yaml": "coco8-pose.yaml"})
    train, val = make("keypoints", "train"), make("keypoints", "val")
    assert (len(train), len(val)) == (7, 14) and train.kpt_shape == (17, 3)
    assert train.flip_index[:3] == [0, 2, 1]
    assert len(val.coco.anns) == 14
    for t in check_items(val, range(len(val)), keys={"keypoints", "box", "crop_box", "ann_id"}):
        kp = t["keypoints"]
        assert kp.shape == (17, 3) and (kp[:, 2] > 0).any()
        vis = kp[:, 2] > 0  # crop pixels + crop origin == the ground truth keypoints in the original image
        gt = torch.tensor(val.coco.anns[t["ann_id"]]["keypoints"], dtype=torch.float32).reshape(17, 3)
        torch.testing.assert_close(kp[vis, :2] + t["crop_box"][:2], gt[vis, :2])
        h, w = t["image_size"]
        assert (gt[vis, 0] <= w).all() and (gt[vis, 1] <= h).all()


def test_fashion_mnist_idx():
    make = dataset("fashion-mnist", format="idx", train="train", val="t10k", options={"names": "fashion-mnist"})
    train, val = make("classification", "train"), make("classification", "val")
    assert (len(train), len(val)) == (60000, 10000) and train.classes[9] == "Ankle boot"
    targets = check_items(train, range(0, 60000, 6000), keys={"label"})
    assert all(0 <= t["label"] < 10 for t in targets) and train[0][0].shape == (3, 28, 28)


def test_imagenet10_imagefolder():
    make = dataset("ultralytics/imagenet10", format="imagefolder", train="train", val="val")
    train, val = make("classification", "train"), make("classification", "val")
    assert len(train.classes) == 10 and val.classes == train.classes
    check_items(val, range(len(val)), keys={"label"})


def test_check_config_on_shared_data_yaml():
    if not DATA.is_dir():
        pytest.skip(f"real datasets not available at {DATA}")
    tree = read_yaml(REPO / "configs" / "shared_data.yaml")
    overrides = [f"tasks.{t['name']}.data.root={t['data']['root'].replace('../shared/data', str(DATA))}"
                 for t in tree["tasks"]]
    cfg = load_config(REPO / "configs" / "shared_data.yaml", overrides)
    report = check_config(cfg, decode=40)
    assert len(report) == 12
    problems = [(r["task"], r["split"], r["problems"]) for r in report if r["problem_count"]]
    assert problems == []
    rows = {(r["task"], r["split"]): r for r in report}
    assert rows["cifar10", "train"]["images"] == 50000 and rows["cifar10", "val"]["decoded"] == 40
    assert rows["coco8_det", "val"]["annotations"] == {"boxes": 17} and rows["coco8_pose", "val"]["decoded"] == 14
    assert rows["fashion_mnist", "val"]["samples"] == 10000 and rows["camvid", "train"]["classes"] == 11
