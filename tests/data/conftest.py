"""Builders of tiny on-disk datasets for the reader tests (everything lives in ``tmp_path``)."""
from __future__ import annotations

import copy
import gzip
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from gppf.config import DataConfig

# COCO-style fixture: two images (60x40), person (id 1, three keypoints) and dog (id 3).
COCO_BASE: dict[str, Any] = {
    "images": [
        {"id": 7, "file_name": "a.png", "height": 40, "width": 60},
        {"id": 9, "file_name": "b.png", "height": 40, "width": 60},
    ],
    "categories": [
        {"id": 1, "name": "person", "keypoints": ["left_eye", "right_eye", "nose"], "skeleton": []},
        {"id": 3, "name": "dog"},
    ],
    "annotations": [
        {"id": 101, "image_id": 7, "category_id": 1, "bbox": [10, 5, 20, 30], "area": 600, "iscrowd": 0,
         "segmentation": [[10, 5, 30, 5, 30, 35, 10, 35]], "num_keypoints": 2,
         "keypoints": [15, 10, 2, 25, 10, 1, 0, 0, 0]},
        {"id": 102, "image_id": 7, "category_id": 3, "bbox": [40, 20, 10, 10], "area": 100, "iscrowd": 0,
         "segmentation": [[40, 20, 50, 20, 50, 30, 40, 30]]},
        {"id": 103, "image_id": 9, "category_id": 1, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1,
         "segmentation": {"counts": [0, 2400], "size": [40, 60]}, "num_keypoints": 0,
         "keypoints": [0, 0, 0, 0, 0, 0, 0, 0, 0]},
        {"id": 104, "image_id": 9, "category_id": 3, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]]},
    ],
}


def gradient_image(h: int, w: int) -> np.ndarray:
    """RGB image whose pixel (y, x) encodes its position: R = x, G = y, B = 7."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.full_like(xx, 7)], axis=-1).astype(np.uint8)


class DataFactory:
    """Writes small datasets of every supported format under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def image(self, path: Path, *, h: int = 16, w: int = 24, mode: str = "RGB") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = gradient_image(h, w)
        im = Image.fromarray(arr[..., 0] if mode == "L" else arr)
        im.save(path)
        return path

    def imagefolder(self, name: str = "if", *, splits: dict[str, dict[str, int]] | None = None) -> DataConfig:
        root = self.root / name
        splits = splits or {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}}
        for split, classes in splits.items():
            (root / split).mkdir(parents=True, exist_ok=True)
            for cls, n in classes.items():
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    self.image(root / split / cls / f"{cls}{i}.png")
        return DataConfig(format="imagefolder", root=str(root), train="train", val="val")

    def coco(self, name: str = "coco", *, data: dict[str, Any] | None = None, val: dict[str, Any] | None = None,
             write_images: bool = True) -> DataConfig:
        """``annotations/instances_{train,val}.json`` with images in ``train/`` and ``val/``."""
        root = self.root / name
        for split, content in (("train", data), ("val", val)):
            content = copy.deepcopy(COCO_BASE) if content is None else content
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
            for img in content.get("images", []) if write_images and isinstance(content, dict) else []:
                if isinstance(img, dict) and "file_name" in img:
                    self.image(root / split / img["file_name"], h=img.get("height", 40), w=img.get("width", 60))
        return DataConfig(format="coco", root=str(root), train="annotations/instances_train.json",
                          val="annotations/instances_val.json")

    def yolo(self, name: str = "yolo", *, labels: dict[str, str] | None = None, names: Any = None,
             kpt_shape: list[int] | None = None, split: str = "train", h: int = 40, w: int = 60) -> DataConfig:
        """``images/<split>/<stem>.jpg`` + ``labels/<split>/<stem>.txt`` + ``data.yaml``."""
        root = self.root / name
        labels = {"a": "0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.1 0.2\n", "b": ""} if labels is None else labels
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem, text in labels.items():
            self.image(root / "images" / split / f"{stem}.png", h=h, w=w)
            if text is not None:
                (root / "labels" / split / f"{stem}.txt").write_text(text)
        doc: dict[str, Any] = {"path": "", "train": "images/train", "val": "images/val",
                               "names": names if names is not None else {0: "person", 1: "car"}}
        if kpt_shape is not None:
            doc["kpt_shape"] = kpt_shape
        (root / "data.yaml").write_text(yaml.safe_dump(doc))
        return DataConfig(format="yolo", root=str(root), train=split, val=split, options={"yaml": "data.yaml"})

    def mask_png(self, name: str = "seg", *, ids: list[np.ndarray] | None = None, split: str = "train",
                 classes: list[str] | None = None) -> DataConfig:
        """``<split>/images/iN.jpg`` + ``<split>/labels/iN.png`` from uint8 id maps."""
        root = self.root / name
        ids = ids if ids is not None else [np.array([[0, 1, 2, 3]] * 3, dtype=np.uint8)] * 2
        for i, arr in enumerate(ids):
            self.image(root / split / "images" / f"i{i}.jpg", h=arr.shape[0], w=arr.shape[1])
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / split / "labels" / f"i{i}.png")
        return DataConfig(format="mask_png", root=str(root), train=split, val=split,
                          classes=classes or ["road", "car", "sky", "void"])

    def table(self, name: str = "tab", *, text: str, file: str = "train.csv", images: list[str] = ()) -> DataConfig:
        root = self.root / name
        for image in images:
            self.image(root / "img" / image)
        root.mkdir(parents=True, exist_ok=True)
        (root / file).write_text(text)
        return DataConfig(format="table", root=str(root), train=file, val=file, options={"images": "img"})

    def idx(self, name: str = "idx", *, n: int = 5, labels: list[int] | None = None, gz: bool = True,
            image_magic: int = 0x803, label_count: int | None = None, split: str = "train") -> DataConfig:
        root = self.root / name
        root.mkdir(parents=True, exist_ok=True)
        pixels = (np.arange(n * 4 * 5) % 256).astype(np.uint8).tobytes()
        labels = labels if labels is not None else [i % 10 for i in range(n)]
        count = n if label_count is None else label_count
        blobs = {
            f"{split}-images-idx3-ubyte": struct.pack(">IIII", image_magic, n, 4, 5) + pixels,
            f"{split}-labels-idx1-ubyte": struct.pack(">II", 0x801, count) + bytes(labels[:count]),
        }
        for fname, blob in blobs.items():
            if gz:
                (root / f"{fname}.gz").write_bytes(gzip.compress(blob))
            else:
                (root / fname).write_bytes(blob)
        return DataConfig(format="idx", root=str(root), train=split, val=split)


@pytest.fixture
def data_factory(tmp_path: Path) -> DataFactory:
    """A ``DataFactory`` writing into this test's ``tmp_path``."""
    return DataFactory(tmp_path)


@pytest.fixture
def coco_base() -> dict[str, Any]:
    """A fresh, mutable copy of the COCO fixture dict."""
    return copy.deepcopy(COCO_BASE)
