"""Malformed inputs: every case must raise ``DataError`` naming the culprit (or skip and count it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

import gppf.data.readers  # noqa: F401
from gppf.config import DataConfig
from gppf.data.base import READERS, DataError


def build(cfg: DataConfig, task_type: str, *, split: str = "train", policy: str = "error"):
    return READERS.get(cfg.format)(cfg, split=split, task_type=task_type, on_bad_sample=policy)


def raises(*fragments: str):
    """``pytest.raises(DataError)`` that also checks the message names every fragment."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return handled

    return _Check()


def yolo_line_case(data_factory, line: str, **kw):
    return data_factory.yolo(labels={"a": f"0 0.5 0.5 0.2 0.2\n{line}\n"}, **kw)


# ----------------------------------------------------------------------------- images (load time)


def test_corrupt_image_bytes(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 2}})
    bad = Path(cfg.root) / "train" / "a" / "a0.png"
    bad.write_bytes(b"\x89PNG garbage garbage garbage")
    ds = build(cfg, "classification")
    with raises(str(bad), "cannot decode"):
        ds[0]
    skipping = build(cfg, "classification", policy="skip")
    assert skipping[0][1]["image_id"] == 1 and skipping.bad.total == 1
    assert str(bad) in skipping.bad.examples[0]


def test_truncated_jpeg(data_factory):
    cfg = data_factory.yolo(labels={"a": "0 0.5 0.5 0.2 0.2\n", "b": ""})
    path = Path(cfg.root) / "images" / "train" / "a.jpg"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    (Path(cfg.root) / "images" / "train" / "a.png").unlink()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with raises(str(path), "truncated"):
        build(cfg, "detection")[0]


def test_zero_byte_image(data_factory):
    cfg = data_factory.yolo()
    path = Path(cfg.root) / "images" / "train" / "b.png"
    path.write_bytes(b"")
    with raises(str(path), "zero-byte"):
        build(cfg, "detection")[1]
    ds = build(cfg, "detection", policy="skip")
    assert ds[1][1]["image_id"] == 0 and ds.bad.counts["corrupt_image"] == 1


def test_corrupt_image_in_dataloader_worker_stays_data_error(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 1}})
    bad = Path(cfg.root) / "train" / "a" / "a0.png"
    bad.write_bytes(b"junk")
    loader = DataLoader(build(cfg, "classification"), batch_size=None, num_workers=1)
    with raises(str(bad)):
        next(iter(loader))


def test_all_samples_bad_under_skip(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 1}})
    (Path(cfg.root) / "train" / "a" / "a0.png").write_bytes(b"x")
    with raises(cfg.root, "none of the 1 samples"):
        build(cfg, "classification", policy="skip")[0]


# ----------------------------------------------------------------------------- coco


@pytest.mark.parametrize(
    ("bbox", "fragment"),
    [([50, 30, 30, 30], "outside"), ([10, 10, -5, 10], "negative box size"), ([10, 10, 0, 10], "zero"),
     ([10, 10, 5], "4 finite numbers")],
)
def test_coco_bad_box(data_factory, coco_base, bbox, fragment):
    coco_base["annotations"][1]["bbox"] = bbox
    cfg = data_factory.coco(data=coco_base)
    with raises("instances_train.json", "annotation id 102", fragment):
        build(cfg, "detection")


def test_coco_unknown_category_skip_counts(data_factory, coco_base):
    coco_base["annotations"][3]["category_id"] = 42
    cfg = data_factory.coco(data=coco_base)
    with raises("instances_train.json", "annotation id 104", "unknown category id 42"):
        build(cfg, "detection")
    ds = build(cfg, "detection", policy="skip")
    assert ds.bad.total == 1 and ds.bad.counts["unknown_category"] == 1
    assert ds[1][1]["labels"].tolist() == [] and 104 not in ds.coco.anns


def test_coco_unknown_image_id(data_factory, coco_base):
    coco_base["annotations"][0]["image_id"] = 8
    with raises("instances_train.json", "annotation id 101", "unknown image id 8"):
        build(data_factory.coco(data=coco_base), "detection")


def test_coco_missing_image_file(data_factory, coco_base):
    coco_base["images"].append({"id": 11, "file_name": "gone.png", "height": 40, "width": 60})
    coco_base["annotations"].append(dict(coco_base["annotations"][1], id=105, image_id=11))
    cfg = data_factory.coco(data=coco_base)
    (Path(cfg.root) / "train" / "gone.png").unlink()
    with raises("instances_train.json", "image id 11", "gone.png"):
        build(cfg, "detection")
    ds = build(cfg, "detection", policy="skip")
    assert len(ds) == 2 and ds.bad.counts == {"missing_image": 1}  # its annotation goes with it


def test_coco_malformed_json(data_factory):
    cfg = data_factory.coco()
    path = Path(cfg.root) / cfg.train
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with raises(str(path), ":2:", "malformed JSON"):
        build(cfg, "detection")


def test_coco_json_missing_images_key(data_factory, coco_base):
    del coco_base["images"]
    cfg = data_factory.coco(data=coco_base)
    with raises("instances_train.json", "'images'"):
        build(cfg, "detection")


def test_coco_duplicate_image_id(data_factory, coco_base):
    coco_base["images"][1]["id"] = 7
    with raises("instances_train.json", "duplicate image id 7"):
        build(data_factory.coco(data=coco_base), "detection")


def test_coco_keypoint_count_mismatch(data_factory, coco_base):
    coco_base["annotations"][0]["keypoints"] = [15, 10, 2, 25, 10, 1]
    with raises("instances_train.json", "annotation id 101", "keypoint count mismatch"):
        build(data_factory.coco(data=coco_base), "keypoints")


def test_coco_bad_segmentation(data_factory, coco_base):
    coco_base["annotations"][1]["segmentation"] = [[1, 2, 3, 4]]
    coco_base["annotations"][2]["segmentation"] = {"counts": [0, 2400], "size": [4, 6]}
    cfg = data_factory.coco(data=coco_base)
    with raises("instances_train.json", "annotation id 102", "polygons"):
        build(cfg, "segmentation")
    ds = build(cfg, "segmentation", policy="skip")
    assert ds.bad.counts == {"bad_segmentation": 2} and "annotation id 103" in ds.bad.examples[1]


def test_coco_image_size_differs_from_json(data_factory, coco_base):
    coco_base["images"][0]["width"] = 61
    coco_base["annotations"][0]["bbox"] = [10, 5, 20, 30]
    cfg = data_factory.coco(data=coco_base)
    data_factory.image(Path(cfg.root) / "train" / "a.png", h=40, w=60)
    with raises("a.png", "id 7", "61x40"):
        build(cfg, "detection")[0]


# ----------------------------------------------------------------------------- yolo


@pytest.mark.parametrize(
    ("line", "fragments"),
    [("7 0.5 0.5 0.2 0.2", ("unknown class index 7",)),
     ("0 0.5 0.5 0.2", ("wrong field count 4",)),
     ("0 0.5 0.5 0.2 0.2 0.3", ("wrong field count 6",)),
     ("0 0.5 abc 0.2 0.2", ("non-numeric field 'abc'",)),
     ("0 0.5 0.5 0 0.2", ("zero or negative box size",)),
     ("0 1.5 0.5 0.2 0.2", ("outside the image",)),
     ("0.5 0.5 0.5 0.2 0.2", ("unknown class index 0.5",))],
)
def test_yolo_bad_line_names_file_and_line(data_factory, line, fragments):
    cfg = yolo_line_case(data_factory, line)
    label = Path(cfg.root) / "labels" / "train" / "a.txt"
    with raises(f"{label}:2", *fragments):
        build(cfg, "detection")


def test_yolo_bad_line_skip_drops_only_that_line(data_factory):
    cfg = yolo_line_case(data_factory, "9 0.5 0.5 0.2 0.2")
    ds = build(cfg, "detection", policy="skip")
    assert ds[0][1]["labels"].tolist() == [0] and ds.bad.counts == {"unknown_class": 1}


def test_yolo_keypoint_count_mismatch(data_factory):
    cfg = data_factory.yolo(labels={"a": "0 0.5 0.5 0.2 0.2 0.5 0.5 2 0.4 0.4\n"}, kpt_shape=[2, 3])
    with raises("a.txt:1", "keypoint count mismatch", "expected 11"):
        build(cfg, "keypoints")


def test_yolo_orphan_label_file(data_factory):
    cfg = data_factory.yolo()
    orphan = Path(cfg.root) / "labels" / "train" / "zzz.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    with raises(str(orphan), "no image"):
        build(cfg, "detection")


def test_yolo_missing_split_and_names(data_factory):
    cfg = data_factory.yolo()
    with raises(str(Path(cfg.root) / "images" / "val2")):
        build(DataConfig(format="yolo", root=cfg.root, val="val2", options=cfg.options), "detection", split="val")
    (Path(cfg.root) / "other.yaml").write_text("names: [a]\n")
    with raises("data.options.yaml", "found 2 yaml files"):
        build(DataConfig(format="yolo", root=cfg.root), "detection")


# ----------------------------------------------------------------------------- imagefolder


def test_empty_split_folder(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 1}, "val": {"a": 0}})
    with raises(str(Path(cfg.root) / "val"), "empty split folder"):
        build(cfg, "classification", split="val")


def test_missing_split_folder(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 1}})
    with raises(str(Path(cfg.root) / "val"), "not found"):
        build(cfg, "classification", split="val")


def test_val_class_not_in_train(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 1}, "val": {"a": 1, "zebra": 1}})
    with raises(str(Path(cfg.root) / "val" / "zebra"), "not in"):
        build(cfg, "classification", split="val")


def test_reid_identity_overlap(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"p1": 1, "p2": 1}, "val": {"p2": 1, "p3": 1}})
    with raises("overlap", str(Path(cfg.root) / "train"), str(Path(cfg.root) / "val"), "p2"):
        build(cfg, "reid", split="val")


def test_stray_image_outside_class_folder(data_factory):
    cfg = data_factory.imagefolder(splits={"train": {"a": 1}})
    stray = data_factory.image(Path(cfg.root) / "train" / "loose.png")
    with raises(str(stray), "not inside a class folder"):
        build(cfg, "classification")
    assert build(cfg, "classification", policy="skip").bad.total == 1


# ----------------------------------------------------------------------------- mask_png


def test_mask_label_image_size_mismatch(data_factory):
    cfg = data_factory.mask_png()
    label = Path(cfg.root) / "train" / "labels" / "i1.png"
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(label)
    with raises(str(label), "5x5", "i1.jpg"):
        build(cfg, "segmentation")[1]
    ds = build(cfg, "segmentation", policy="skip")
    assert ds[1][1]["image_id"] == 0 and ds.bad.counts == {"size_mismatch": 1}


def test_mask_id_out_of_range(data_factory):
    cfg = data_factory.mask_png(ids=[np.array([[0, 1, 9]], dtype=np.uint8)])
    with raises("i0.png", "[9]", "outside 0..3"):
        build(cfg, "segmentation")[0]


def test_mask_missing_label(data_factory):
    cfg = data_factory.mask_png()
    (Path(cfg.root) / "train" / "labels" / "i0.png").unlink()
    with raises("i0.png", "no label", "i0.jpg"):
        build(cfg, "segmentation")
    ds = build(cfg, "segmentation", policy="skip")
    assert len(ds) == 1 and ds.bad.counts == {"missing_label": 1}


def test_mask_rgb_label_rejected(data_factory):
    cfg = data_factory.mask_png()
    label = Path(cfg.root) / "train" / "labels" / "i0.png"
    Image.new("RGB", (4, 3)).save(label)
    with raises(str(label), "mode RGB"):
        build(cfg, "segmentation")[0]


def test_mask_without_class_names(data_factory):
    cfg = data_factory.mask_png()
    cfg.classes = None
    with raises("classes.txt", "data.classes"):
        build(cfg, "segmentation")


# ----------------------------------------------------------------------------- table


def test_table_malformed_csv_row(data_factory):
    cfg = data_factory.table(text="image,cat,dog\nx.png,1,0\ny.png,1\n", images=["x.png", "y.png"])
    with raises("train.csv:3", "malformed row"):
        build(cfg, "multilabel")
    ds = build(cfg, "multilabel", policy="skip")
    assert len(ds) == 1 and ds.bad.counts == {"malformed_row": 1}


def test_table_bad_cell_value(data_factory):
    cfg = data_factory.table(text="image,cat,dog\nx.png,1,yes\n", images=["x.png"])
    with raises("train.csv:2", "'dog'", "'yes'"):
        build(cfg, "multilabel")


def test_table_unknown_label_name(data_factory):
    cfg = data_factory.table(text="image,labels\nx.png,cat\ny.png,cat;gnu\n", images=["x.png", "y.png"])
    cfg.classes = ["cat", "dog"]
    with raises("train.csv:3", "unknown label name 'gnu'"):
        build(cfg, "multilabel")
    entries = [{"image": "x.png", "labels": ["cat"]}, {"image": "y.png", "labels": ["gnu"]}]
    cfg = data_factory.table("tj", text=json.dumps(entries), file="t.json", images=["x.png", "y.png"])
    cfg.classes = ["cat", "dog"]
    with raises("t.json entry 1", "gnu"):
        build(cfg, "multilabel")


def test_table_missing_image(data_factory):
    cfg = data_factory.table(text="image,labels\nx.png,a\nnope.png,a\n", images=["x.png"])
    with raises("train.csv:3", "nope.png", "not found"):
        build(cfg, "multilabel")


def test_table_classification_needs_one_label(data_factory):
    cfg = data_factory.table(text="image,a,b\nx.png,1,1\n", images=["x.png"])
    with raises("train.csv:2", "exactly one positive label"):
        build(cfg, "classification")


def test_table_malformed_json(data_factory):
    cfg = data_factory.table(text='[{"image": "x.png", "labels": ["a"]},\n oops]', file="t.json", images=["x.png"])
    with raises("t.json:2", "malformed JSON"):
        build(cfg, "multilabel")


# ----------------------------------------------------------------------------- idx


def test_idx_bad_magic(data_factory):
    cfg = data_factory.idx(image_magic=0x1234)
    with raises("train-images-idx3-ubyte.gz", "bad magic number 0x00001234"):
        build(cfg, "classification")


def test_idx_count_mismatch(data_factory):
    cfg = data_factory.idx(n=5, label_count=4)
    with raises("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "5 images", "4 labels"):
        build(cfg, "classification")


def test_idx_truncated_data(data_factory):
    cfg = data_factory.idx(n=5, gz=False)
    path = Path(cfg.root) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with raises(str(path), "need 100 bytes", "found 93"):
        build(cfg, "classification")


def test_idx_corrupt_gzip_and_missing_file(data_factory):
    cfg = data_factory.idx()
    path = Path(cfg.root) / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08garbage")
    with raises(str(path), "cannot read IDX"):
        build(cfg, "classification")
    with raises("t10k-images-idx3-ubyte"):
        build(DataConfig(format="idx", root=cfg.root, val="t10k"), "classification", split="val")


def test_idx_label_out_of_range(data_factory):
    cfg = data_factory.idx(n=3, labels=[1, 12, 2])
    with raises("train-labels-idx1-ubyte.gz", "item 1", "label 12"):
        build(cfg, "classification")
    ds = build(cfg, "classification", policy="skip")
    assert len(ds) == 2 and ds[1][1]["label"] == 2 and ds.bad.total == 1


# ----------------------------------------------------------------------------- every reader


def _any_cfg(data_factory, fmt: str) -> tuple[DataConfig, str]:
    return {
        "imagefolder": lambda: (data_factory.imagefolder(), "classification"),
        "coco": lambda: (data_factory.coco(), "detection"),
        "yolo": lambda: (data_factory.yolo(), "detection"),
        "mask_png": lambda: (data_factory.mask_png(), "segmentation"),
        "table": lambda: (data_factory.table(text="image,a\nx.png,1\n", images=["x.png"]), "multilabel"),
        "idx": lambda: (data_factory.idx(), "classification"),
    }[fmt]()


@pytest.mark.parametrize("fmt", ["imagefolder", "coco", "yolo", "mask_png", "table", "idx"])
def test_unknown_option_key(data_factory, fmt):
    cfg, task_type = _any_cfg(data_factory, fmt)
    cfg.options = {**cfg.options, "bogus_opt": 1}
    with raises("data.options.bogus_opt", f"'{fmt}'"):
        build(cfg, task_type)


@pytest.mark.parametrize(("fmt", "task_type"), [("mask_png", "detection"), ("idx", "multilabel"),
                                                ("imagefolder", "keypoints"), ("table", "segmentation")])
def test_unsupported_task_type(data_factory, fmt, task_type):
    cfg, _ = _any_cfg(data_factory, fmt)
    with raises(f"'{fmt}'", f"'{task_type}'"):
        build(cfg, task_type)


def test_missing_root(tmp_path):
    with raises(str(tmp_path / "nowhere")):
        build(DataConfig(format="imagefolder", root=str(tmp_path / "nowhere")), "classification")
