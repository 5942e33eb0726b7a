"""Happy paths of every reader: target schema, label mappings, geometry, pycocotools ground truth."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

import gppf.data.readers  # noqa: F401
from gppf.config import DataConfig, RunConfig, TaskConfig
from gppf.data.base import READERS, DataError
from gppf.data.check import check_config, main_check, print_check


def build(cfg: DataConfig, task_type: str, *, split: str = "train", policy: str = "error"):
    return READERS.get(cfg.format)(cfg, split=split, task_type=task_type, on_bad_sample=policy)


def assert_item(item, *, keys: set[str]) -> dict:
    image, target = item
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert image.ndim == 3 and image.shape[0] == 3
    assert keys | {"image_id", "orig_size"} <= set(target)
    assert isinstance(target["image_id"], int)
    assert tuple(target["orig_size"]) == tuple(image.shape[-2:])
    return target


def test_all_formats_registered():
    assert {"imagefolder", "coco", "yolo", "mask_png", "table", "idx"} <= set(READERS.names())


# ----------------------------------------------------------------------------- imagefolder


def test_imagefolder_classification_uses_train_classes_for_val(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"ant": 1, "bee": 2, "cat": 1}, "val": {"cat": 2}})
    train, val = build(cfg, "classification"), build(cfg, "classification", split="val")
    assert train.classes == val.classes == ["ant", "bee", "cat"]
    assert sorted(train.labels) == [0, 1, 1, 2] and val.labels == [2, 2]
    target = assert_item(val[1], keys={"label"})
    assert target["label"] == 2 and target["image_id"] == 1


def test_imagefolder_grey_image_becomes_rgb_and_classes_order(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 1, "b": 1}})
    data_factory.image(Path(cfg.root) / "train" / "b" / "grey.png", mode="L")
    cfg.classes = ["b", "a"]
    ds = build(cfg, "classification")
    assert ds.classes == ["b", "a"] and len(ds) == 3
    image, target = ds[ds.files.index(Path(cfg.root) / "train" / "b" / "grey.png")]
    assert image.shape == (3, 16, 24) and target["label"] == 0
    assert torch.equal(image[0], image[2]) and torch.equal(image[0], image[1])


def test_imagefolder_reid_identities(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"p1": 2, "p2": 1}, "val": {"p7": 2}})
    train, val = build(cfg, "reid"), build(cfg, "reid", split="val")
    assert train.classes == ["p1", "p2"] and val.classes == ["p7"]
    assert assert_item(train[2], keys={"identity"})["identity"] == 1


# ----------------------------------------------------------------------------- coco


def test_coco_detection_boxes_labels_and_ids(data_factory):
    ds = build(data_factory.coco(), "detection")
    assert ds.classes == ["person", "dog"] and ds.cat_ids == [1, 3]
    target = assert_item(ds[0], keys={"boxes", "labels"})
    assert target["image_id"] == 7
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert target["boxes"].tolist() == [[10, 5, 30, 35], [40, 20, 50, 30]]
    assert target["labels"].tolist() == [0, 1] and target["labels"].dtype == torch.int64
    crowd_image = ds[1][1]  # the crowd person of image 9 is not a detection target
    assert crowd_image["labels"].tolist() == [1] and crowd_image["image_id"] == 9
    assert ds.annotation_counts() == {"boxes": 3, "crowd": 1}


def _evaluate(gt, detections: list[dict], iou_type: str) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(detections), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_coco_ground_truth_evaluates_perfect_detections(data_factory):
    ds = build(data_factory.coco(), "detection", split="val")
    dets = []
    for i in range(len(ds)):
        _, t = ds[i]
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            x0, y0, x1, y1 = box
            dets.append({"image_id": t["image_id"], "category_id": ds.cat_ids[label],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 1.0})
    assert _evaluate(ds.coco, dets, "bbox") == pytest.approx(1.0)


def test_coco_segmentation_mask_values(data_factory, coco_base):
    coco_base["annotations"][1]["bbox"] = [15, 10, 10, 10]  # dog inside the person: small one painted on top
    coco_base["annotations"][1]["segmentation"] = [[15, 10, 25, 10, 25, 20, 15, 20]]
    ds = build(data_factory.coco(data=coco_base), "segmentation")
    assert ds.classes == ["background", "person", "dog"]
    mask = assert_item(ds[0], keys={"mask"})["mask"]
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (40, 60)
    assert mask[0, 0] == 0 and mask[30, 12] == 1 and mask[15, 20] == 2
    crowd = ds[1][1]["mask"]  # crowd RLE covers the image (ignore) except the dog painted over it
    assert crowd[35, 50] == 255 and crowd[10, 10] == 2


def test_coco_multilabel(data_factory):
    ds = build(data_factory.coco(), "multilabel")
    assert assert_item(ds[0], keys={"labels"})["labels"].tolist() == [1.0, 1.0]
    assert ds[1][1]["labels"].tolist() == [1.0, 1.0]  # crowd person still means "person present"


def test_coco_keypoints_top_down_crop(data_factory):
    ds = build(data_factory.coco(), "keypoints")
    assert len(ds) == 1 and ds.num_images == 1  # the crowd person is no sample
    assert ds.classes == ["person"] and ds.keypoint_names == ["left_eye", "right_eye", "nose"]
    assert ds.flip_index == [1, 0, 2]
    image, t = ds[0]
    assert_item((image, t), keys={"keypoints", "box", "crop_box", "area", "ann_id"})
    assert t["box"].tolist() == [10, 5, 30, 35] and t["ann_id"] == 101 and t["image_id"] == 7
    assert t["crop_box"].tolist() == [7, 1, 33, 39]  # 20x30 box * 1.25 around (20, 20) -> 25x37.5
    assert image.shape == (3, 38, 26)
    kp = t["keypoints"]
    assert kp.shape == (3, 3) and kp.dtype == torch.float32
    assert kp.tolist() == [[8, 9, 2], [18, 9, 1], [0, 0, 0]]
    # the gradient image encodes (x, y): the crop pixel under a keypoint is the original pixel there
    x, y = int(kp[0, 0]), int(kp[0, 1])
    assert image[0, y, x] == 15 and image[1, y, x] == 10


def test_coco_keypoints_ground_truth_oks(data_factory, coco_base):
    coco_base["categories"][0]["keypoints"] = [f"k{i}" for i in range(17)]
    for ann in coco_base["annotations"]:
        if ann["category_id"] == 1:
            ann["keypoints"] = ([15, 10, 2, 25, 12, 2] if not ann["iscrowd"] else [0] * 6) + [0] * 45
    ds = build(data_factory.coco(val=coco_base), "keypoints", split="val")
    gt = ds.coco
    dets = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
            for a in gt.dataset["annotations"] if not a["iscrowd"]]
    assert _evaluate(gt, dets, "keypoints") == pytest.approx(1.0)


def test_coco_images_option_per_split(data_factory, coco_base):
    cfg = data_factory.coco(write_images=False)
    for img in coco_base["images"]:
        data_factory.image(Path(cfg.root) / "pics" / "v" / img["file_name"], h=40, w=60)
    cfg.options = {"images": {"train": "pics/t", "val": "pics/v"}}
    assert len(build(cfg, "detection", split="val")) == 2
    with pytest.raises(DataError, match="pics/t"):
        build(cfg, "detection", split="train")


# ----------------------------------------------------------------------------- yolo


def test_yolo_detection_pixels_and_unlabelled_image(data_factory):
    ds = build(data_factory.yolo(labels={"a": "0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.1 0.2\n", "b": None}), "detection")
    assert ds.classes == ["person", "car"] and ds.cat_ids == [0, 1]
    t = assert_item(ds[0], keys={"boxes", "labels"})
    np.testing.assert_allclose(t["boxes"].tolist(), [[15, 10, 45, 30], [12, 6, 18, 14]], atol=1e-4)
    assert t["labels"].tolist() == [0, 1]
    assert ds[1][1]["boxes"].shape == (0, 4)  # no label file: no objects


def test_yolo_segmentation_polygon_and_box(data_factory):
    poly = "1 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n0 0.7 0.7 0.2 0.2\n"
    ds = build(data_factory.yolo(labels={"a": poly}), "segmentation")
    assert ds.classes == ["background", "person", "car"]
    mask = assert_item(ds[0], keys={"mask"})["mask"]
    assert mask[12, 15] == 2 and mask[28, 42] == 1 and mask[35, 5] == 0
    assert ds.annotation_counts() == {"masks": 2}


def test_yolo_multilabel_and_names_from_list(data_factory):
    cfg = data_factory.yolo(labels={"a": "1 0.5 0.5 0.2 0.2\n"}, names=["x", "y", "z"])
    t = assert_item(build(cfg, "multilabel")[0], keys={"labels"})
    assert t["labels"].tolist() == [0.0, 1.0, 0.0]


def test_yolo_keypoints_three_dims(data_factory):
    line = "0 0.5 0.5 0.4 0.5 0.5 0.5 2 0.4 0.4 1 0 0 0\n0 0.2 0.2 0.1 0.1 0 0 0 0 0 0 0 0 0\n"
    cfg = data_factory.yolo(labels={"a": line}, names=["person"], kpt_shape=[3, 3])
    ds = build(cfg, "keypoints")
    assert len(ds) == 1  # the second person has no visible keypoint
    image, t = ds[0]
    assert_item((image, t), keys={"keypoints", "box", "crop_box", "area", "ann_id"})
    np.testing.assert_allclose(t["box"].tolist(), [18, 10, 42, 30], atol=1e-4)
    x0, y0 = t["crop_box"][:2].tolist()
    assert t["keypoints"][0].tolist() == pytest.approx([30 - x0, 20 - y0, 2])
    assert t["keypoints"][2].tolist() == [0, 0, 0]
    assert image[0, int(t["keypoints"][0, 1]), int(t["keypoints"][0, 0])] == 30


def test_yolo_keypoints_two_dims_and_coco_ground_truth(data_factory):
    line = "0 0.5 0.5 0.4 0.5 " + " ".join(["0.5 0.5"] * 17) + "\n"
    cfg = data_factory.yolo(labels={"a": line, "b": line}, names=["person"], kpt_shape=[17, 2])
    ds = build(cfg, "keypoints")
    assert len(ds) == 2 and ds[0][1]["keypoints"][:, 2].tolist() == [2.0] * 17
    gt = ds.coco
    assert len(gt.imgs) == 2 and gt.imgs[0]["width"] == 60
    dets = [{"image_id": a["image_id"], "category_id": 0, "keypoints": a["keypoints"], "score": 1.0}
            for a in gt.dataset["annotations"]]
    assert _evaluate(gt, dets, "keypoints") == pytest.approx(1.0)


def test_yolo_names_from_config_or_single_yaml(data_factory):
    cfg = data_factory.yolo()
    cfg.options = {}
    assert build(cfg, "detection").classes == ["person", "car"]  # the only yaml in the root
    cfg.classes = ["p", "c"]
    assert build(cfg, "detection").classes == ["p", "c"]


# ----------------------------------------------------------------------------- mask_png


def test_mask_png_ignore_index_removed_and_renumbered(data_factory):
    ids = [np.array([[0, 1, 2, 3, 255]] * 2, dtype=np.uint8)]
    cfg = data_factory.mask_png(ids=ids)
    cfg.options = {"ignore_index": 1}
    ds = build(cfg, "segmentation")
    assert ds.classes == ["road", "sky", "void"] and ds.ignored_classes == ["car"]
    mask = assert_item(ds[0], keys={"mask"})["mask"]
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
    assert mask[0].tolist() == [0, 255, 1, 2, 255]


def test_mask_png_classes_txt(data_factory):
    cfg = data_factory.mask_png()
    cfg.classes = None
    (Path(cfg.root) / "classes.txt").write_text("a\nb\nc\nd\n")
    assert build(cfg, "segmentation").classes == ["a", "b", "c", "d"]


# ----------------------------------------------------------------------------- table


def test_table_csv_columns_with_unknown(data_factory):
    cfg = data_factory.table(text="image,cat,dog\nx.png,1,-1\ny.png,0,1\n", images=["x.png", "y.png"])
    ds = build(cfg, "multilabel")
    assert ds.classes == ["cat", "dog"]
    assert assert_item(ds[0], keys={"labels"})["labels"].tolist() == [1.0, -1.0]
    cfg.classes = ["dog", "cat"]
    assert build(cfg, "multilabel")[0][1]["labels"].tolist() == [-1.0, 1.0]


def test_table_csv_names_and_json(data_factory):
    cfg = data_factory.table(text="image,labels\nx.png,b;a\ny.png,\n", images=["x.png", "y.png"])
    ds = build(cfg, "multilabel")
    assert ds.classes == ["a", "b"] and ds[0][1]["labels"].tolist() == [1.0, 1.0]
    assert ds[1][1]["labels"].tolist() == [0.0, 0.0]
    entries = [{"image": "x.png", "labels": ["b"]}, {"image": "y.png", "labels": ["a"]}]
    cfg = data_factory.table("tj", text=json.dumps(entries), file="t.json", images=["x.png", "y.png"])
    cfg.classes = ["a", "b"]
    ds = build(cfg, "classification")
    assert [assert_item(ds[i], keys={"label"})["label"] for i in range(2)] == [1, 0]


def test_table_val_uses_train_label_names(data_factory):
    cfg = data_factory.table(text="image,labels\nx.png,b;c\n", images=["x.png"])
    (Path(cfg.root) / "val.csv").write_text("image,labels\nx.png,c\n")
    cfg.val = "val.csv"
    ds = build(cfg, "multilabel", split="val")
    assert ds.classes == ["b", "c"] and ds[0][1]["labels"].tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_images_and_labels(data_factory, gz):
    cfg = data_factory.idx(n=3, labels=[4, 0, 9], gz=gz)
    cfg.options = {"names": "fashion-mnist"}
    ds = build(cfg, "classification")
    assert len(ds) == 3 and ds.classes[9] == "Ankle boot"
    image, t = ds[2]
    assert_item((image, t), keys={"label"})
    assert image.shape == (3, 4, 5) and t["label"] == 9
    assert image[0].flatten().tolist() == list(range(40, 60)) and torch.equal(image[0], image[2])


def test_cheap_target_matches_loaded_target(data_factory):
    cases = [
        (data_factory.imagefolder(), "reid"),
        (data_factory.idx(n=3), "classification"),
        (data_factory.table(text="image,a,b\nx.png,1,-1\n", images=["x.png"]), "multilabel"),
    ]
    for cfg, task_type in cases:
        ds = build(cfg, task_type)
        for i in range(len(ds)):
            cheap, loaded = ds.target(i), ds[i][1]
            assert cheap.keys() == loaded.keys()
            assert all(torch.equal(torch.as_tensor(cheap[k]), torch.as_tensor(loaded[k])) for k in cheap)


def test_keypoint_flip_pairs_in_targets(data_factory):
    coco_target = build(data_factory.coco(), "keypoints")[0][1]
    assert coco_target["flip_pairs"] == [[0, 1]]
    line = "0 0.5 0.5 0.4 0.5 0.5 0.5 2 0.4 0.4 1 0 0 0\n"
    cfg = data_factory.yolo(labels={"a": line}, names=["person"], kpt_shape=[3, 3])
    doc = yaml.safe_load((Path(cfg.root) / "data.yaml").read_text())
    (Path(cfg.root) / "data.yaml").write_text(yaml.safe_dump({**doc, "flip_idx": [0, 2, 1]}))
    ds = build(cfg, "keypoints")
    assert ds.num_keypoints == 3 and ds[0][1]["flip_pairs"] == [[1, 2]]


# ----------------------------------------------------------------------------- skip policy, check


def test_skip_returns_next_sample_and_counts_once(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 3}})
    bad = Path(cfg.root) / "train" / "a" / "a1.png"
    bad.write_bytes(b"not an image")
    ds = build(cfg, "classification", policy="skip")
    assert ds.files[1] == bad
    assert ds[1][1]["image_id"] == 2 and ds[1][1]["image_id"] == 2
    assert ds.bad.total == 1 and ds.bad.counts["corrupt_image"] == 1
    assert len(list(ds)) == 3


def _run_config(data_factory, *, break_image: bool) -> RunConfig:
    folder = data_factory.imagefolder()
    if break_image:
        (Path(folder.root) / "val" / "dog" / "dog0.png").write_bytes(b"")
    return RunConfig(tasks=[
        TaskConfig(name="cls", type="classification", data=folder),
        TaskConfig(name="det", type="detection", data=data_factory.coco(), on_bad_sample="skip"),
        TaskConfig(name="seg", type="segmentation", data=data_factory.mask_png()),
    ])


def test_check_config_counts_and_problems(data_factory):
    report = check_config(_run_config(data_factory, break_image=True))
    rows = {(r["task"], r["split"]): r for r in report}
    assert len(report) == 6
    assert rows["cls", "train"]["images"] == 4 and rows["cls", "train"]["problem_count"] == 0
    assert rows["det", "val"]["annotations"] == {"boxes": 3, "crowd": 1} and rows["det", "val"]["classes"] == 2
    assert rows["seg", "train"]["decoded"] == 2
    broken = rows["cls", "val"]
    assert broken["problem_count"] == 1 and "dog0.png" in broken["problems"][0] and broken["decoded"] == 1


def test_check_config_reports_skipped_samples(data_factory):
    run = _run_config(data_factory, break_image=False)
    coco = Path(run.tasks[1].data.root)
    (coco / "train" / "b.png").write_bytes(b"broken")
    row = check_config(run)[2]
    assert (row["task"], row["split"], row["policy"]) == ("det", "train", "skip")
    assert row["skipped"] == 1 and row["problem_count"] == 1 and row["decoded"] == 2
    assert "skipped 1 bad samples (corrupt_image: 1)" in row["problems"][0] and "b.png" in row["problems"][1]


def test_check_config_decode_limit_and_print(data_factory, capsys):
    report = check_config(_run_config(data_factory, break_image=False), decode=1)
    assert all(r["decoded"] == 1 and r["problem_count"] == 0 for r in report)
    print_check(report)
    out = capsys.readouterr().out
    assert "cls" in out and "boxes=3" in out and "no problems found" in out


def test_main_check_return_codes(data_factory, tmp_path, capsys):
    for broken in (False, True):
        cfg = _run_config(data_factory, break_image=broken)
        path = tmp_path / f"run{broken}.yaml"
        tasks = [{"name": t.name, "type": t.type, "on_bad_sample": t.on_bad_sample,
                  "data": {"format": t.data.format, "root": t.data.root, "train": t.data.train,
                           "val": t.data.val, "classes": t.data.classes}} for t in cfg.tasks]
        path.write_text(yaml.safe_dump({"tasks": tasks}))
        assert main_check(str(path), []) == int(broken)
    assert main_check(str(path), ["tasks.cls.data.root=/nonexistent"]) == 1
    assert "data root not found: /nonexistent" in capsys.readouterr().out
    assert main_check(str(tmp_path / "missing.yaml"), []) == 1
