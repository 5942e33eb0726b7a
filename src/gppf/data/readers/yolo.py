"""``yolo`` reader: Ultralytics layout ``images/<split>/*`` + ``labels/<split>/*.txt`` (normalized coords)."""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pycocotools.coco import COCO
from torchvision import tv_tensors

from gppf.config import DataConfig
from gppf.data.base import DataError, OnBad
from gppf.data.readers.common import (
    ReaderDataset,
    SampleError,
    check_options,
    names_from_yaml,
    require_dir,
    require_file,
    require_task,
    root_dir,
    split_name,
)
from gppf.data.readers.images import image_size, list_images, load_rgb
from gppf.data.readers.targets import Obj, flip_pairs, object_target, person_crop

FORMAT = "yolo"
TASK_TYPES = ("detection", "segmentation", "multilabel", "keypoints")
TOLERANCE = 1e-3  # normalized coordinates may exceed [0, 1] by this much (rounding) before it is an error


@dataclass
class Meta:
    """Dataset-level facts: class names and the pose layout ``kpt_shape = (K, 2 or 3)``."""

    names: list[str]
    kpt_shape: tuple[int, int] | None
    flip_index: list[int]


class YoloDataset(ReaderDataset):
    """YOLO images (or person crops for ``keypoints``); objects are stored normalized, scaled at load.

    ``coco`` is an in-memory pycocotools ground truth built from the labels (image ids = indices into
    ``files``, category id = class index, so ``cat_ids[label] == label``).
    """

    def __init__(self, *, meta: Meta, classes: list[str], policy: OnBad, where: str, task_type: str,
                 crop_scale: float) -> None:
        super().__init__(classes=classes, policy=policy, where=where, task_type=task_type)
        self.names = meta.names
        self.cat_ids = list(range(len(meta.names)))
        self.kpt_shape = meta.kpt_shape
        self.flip_index = meta.flip_index
        self.crop_scale = crop_scale
        self.files: list[Path] = []
        self.objects: list[list[Obj]] = []
        self.samples: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        i, k = self.samples[index]
        image = load_rgb(self.files[i])
        h, w = (int(s) for s in image.shape[-2:])
        if self.task_type == "keypoints":
            obj = to_pixels(self.objects[i][k], h=h, w=w)
            return person_crop(image, obj=obj, image_id=i, scale=self.crop_scale,
                               flip_pairs=flip_pairs(self.flip_index))
        objs = [to_pixels(o, h=h, w=w) for o in self.objects[i]]
        target = object_target(objs, task_type=self.task_type, h=h, w=w, num_classes=len(self.names))
        return image, {**target, "image_id": i, "orig_size": (h, w)}

    @property
    def num_images(self) -> int:
        return len({i for i, _ in self.samples})

    @property
    def num_keypoints(self) -> int:
        """``K`` of ``kpt_shape`` (0 without pose labels)."""
        return self.kpt_shape[0] if self.kpt_shape else 0

    @property
    def keypoint_names(self) -> list[str]:
        return [f"kp{j}" for j in range(self.num_keypoints)]

    def annotation_counts(self) -> dict[str, int]:
        if self.task_type == "keypoints":
            persons = [self.objects[i][k] for i, k in self.samples]
            return {"persons": len(persons), "keypoints": int(sum((o.keypoints[:, 2] > 0).sum() for o in persons))}
        key = {"detection": "boxes", "segmentation": "masks", "multilabel": "objects"}[self.task_type]
        return {key: sum(len(objs) for objs in self.objects)}

    @cached_property
    def coco(self) -> COCO:
        """pycocotools ground truth in pixels (reads each image header once)."""
        gt = COCO()
        gt.dataset = coco_dict(self)
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt


def to_pixels(obj: Obj, *, h: int, w: int) -> Obj:
    """Scale a normalized object to pixels of an ``h x w`` image."""
    scale = np.array([w, h, w, h], dtype=np.float64)
    segm = [list(np.asarray(p) * np.tile([w, h], len(p) // 2)) for p in obj.segm] if obj.segm else None
    kpts = None
    if obj.keypoints is not None:
        kpts = obj.keypoints.copy()
        kpts[:, 0] *= w
        kpts[:, 1] *= h
    return Obj(label=obj.label, box=obj.box * scale, segm=segm, keypoints=kpts, area=obj.area * h * w,
               ann_id=obj.ann_id)


def _polygon_area(poly: list[float]) -> float:
    x, y = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def coco_dict(ds: YoloDataset) -> dict[str, Any]:
    """COCO-format dict of the labels in pixel coordinates (``segmentation``/``keypoints`` when present)."""
    images, anns = [], []
    for i, path in enumerate(ds.files):
        try:
            h, w = image_size(path)
        except SampleError as exc:  # unreadable header: counted (or raised) like any bad sample
            ds.drop(exc)
            continue
        images.append({"id": i, "file_name": path.name, "height": h, "width": w})
        for obj in (to_pixels(o, h=h, w=w) for o in ds.objects[i]):
            x0, y0, x1, y1 = (float(v) for v in obj.box)
            ann = {"id": obj.ann_id, "image_id": i, "category_id": obj.label, "iscrowd": 0,
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(obj.area)}
            if obj.segm:
                ann["segmentation"] = [[float(v) for v in p] for p in obj.segm]
            if obj.keypoints is not None:
                ann["keypoints"] = [float(v) for v in obj.keypoints.reshape(-1)]
                ann["num_keypoints"] = int((obj.keypoints[:, 2] > 0).sum())
            anns.append(ann)
    cats = [{"id": c, "name": n} for c, n in enumerate(ds.names)]
    if ds.kpt_shape is not None:
        for cat in cats:
            cat["keypoints"] = ds.keypoint_names
            cat["skeleton"] = []
    return {"images": images, "annotations": anns, "categories": cats}


def _numbers(fields: list[str], *, where: str, num_classes: int) -> tuple[int, np.ndarray]:
    """Class index and coordinates of one line, validated."""
    try:
        values = [float(f) for f in fields]
    except ValueError:
        bad = next(f for f in fields if not _is_float(f))
        raise SampleError(f"{where}: non-numeric field '{bad}'", kind="malformed_line") from None
    if not all(math.isfinite(v) for v in values):
        raise SampleError(f"{where}: non-finite value", kind="malformed_line")
    cls = values[0]
    if not cls.is_integer() or not 0 <= cls < num_classes:
        raise SampleError(f"{where}: unknown class index {fields[0]} (dataset has {num_classes} classes)",
                          kind="unknown_class")
    return int(cls), np.asarray(values[1:], dtype=np.float64)


def _inside(coords: np.ndarray, *, where: str) -> np.ndarray:
    """Normalized coordinates clipped to [0, 1]; further out than ``TOLERANCE`` is an error."""
    if (coords < -TOLERANCE).any() or (coords > 1 + TOLERANCE).any():
        raise SampleError(f"{where}: coordinates outside the image (normalized values must lie in [0, 1])",
                          kind="box_outside")
    return np.clip(coords, 0.0, 1.0)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _box_from_cxcywh(c: np.ndarray, *, where: str) -> np.ndarray:
    cx, cy, bw, bh = c
    if bw <= 0 or bh <= 0:
        raise SampleError(f"{where}: zero or negative box size w={bw} h={bh}", kind="bad_box")
    return np.clip(np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]), 0.0, 1.0)


def parse_line(line: str, *, where: str, meta: Meta, ann_id: int) -> Obj:
    """One label line: box ``cls cx cy w h``, polygon ``cls x1 y1 ...`` or pose ``cls box K*(x y [v])``."""
    fields = line.split()
    if meta.kpt_shape is not None:
        k, d = meta.kpt_shape
        if len(fields) != 5 + k * d:
            raise SampleError(f"{where}: keypoint count mismatch: expected {5 + k * d} fields (class, box, "
                              f"{k} keypoints x {d}), got {len(fields)}", kind="keypoint_mismatch")
    elif len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        raise SampleError(f"{where}: wrong field count {len(fields)}: expected 5 (class cx cy w h) or an odd "
                          "number >= 7 (class and polygon x y pairs)", kind="malformed_line")
    cls, c = _numbers(fields, where=where, num_classes=len(meta.names))
    if meta.kpt_shape is not None or len(fields) == 5:
        box = _box_from_cxcywh(_inside(c[:4], where=where), where=where)
        obj = Obj(label=cls, box=box, area=float((box[2] - box[0]) * (box[3] - box[1])), ann_id=ann_id)
        if meta.kpt_shape is not None:
            obj.keypoints = _keypoints(c[4:], kpt_shape=meta.kpt_shape, where=where)
        else:
            x0, y0, x1, y1 = box
            obj.segm = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        return obj
    c = _inside(c, where=where)
    xs, ys = c[0::2], c[1::2]
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    if box[2] <= box[0] or box[3] <= box[1]:
        raise SampleError(f"{where}: degenerate polygon (zero width or height)", kind="bad_box")
    return Obj(label=cls, box=box, segm=[list(c)], area=_polygon_area(list(c)), ann_id=ann_id)


def _keypoints(values: np.ndarray, *, kpt_shape: tuple[int, int], where: str) -> np.ndarray:
    k, d = kpt_shape
    raw = values.reshape(k, d)
    kpts = np.zeros((k, 3), dtype=np.float64)
    kpts[:, :2] = _inside(raw[:, :2], where=where)
    if d == 3:
        if not np.isin(raw[:, 2], (0, 1, 2)).all():
            raise SampleError(f"{where}: keypoint visibility must be 0, 1 or 2", kind="keypoint_mismatch")
        kpts[:, 2] = raw[:, 2]
    else:
        kpts[:, 2] = np.where((raw[:, :2] > 0).any(axis=1), 2.0, 0.0)
    return kpts


def _meta(cfg: DataConfig, *, opts: dict[str, Any], root: Path, task_type: str) -> Meta:
    """Class names and pose layout from ``data.classes`` / options / the dataset yaml."""
    doc: dict[str, Any] = {}
    path = root / opts["yaml"] if "yaml" in opts else None
    if path is None and cfg.classes is None:
        found = sorted(root.glob("*.yaml"))
        if len(found) != 1:
            raise DataError(f"yolo needs class names: set data.classes or data.options.yaml (found "
                            f"{len(found)} yaml files in {root})")
        path = found[0]
    if path is not None:
        try:
            doc = yaml.safe_load(require_file(path, what="dataset yaml").read_text()) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"malformed YAML in {path}: {exc}") from exc
        if not isinstance(doc, dict) or "names" not in doc:
            raise DataError(f"{path}: dataset yaml has no 'names'")
    names = list(cfg.classes) if cfg.classes is not None else names_from_yaml(doc["names"], source=str(path))
    shape = opts.get("kpt_shape", doc.get("kpt_shape"))
    if shape is not None and (not isinstance(shape, list) or len(shape) != 2 or shape[1] not in (2, 3)
                              or not isinstance(shape[0], int) or shape[0] < 1):
        raise DataError(f"kpt_shape must be [K, 2 or 3], got {shape!r} ({path or 'data.options'})")
    if task_type == "keypoints" and shape is None:
        raise DataError("yolo keypoints need kpt_shape (in the dataset yaml or data.options.kpt_shape)")
    flip = doc.get("flip_idx") or (list(range(shape[0])) if shape else [])
    if shape and sorted(flip) != list(range(shape[0])):
        raise DataError(f"{path}: flip_idx must be a permutation of 0..{shape[0] - 1}")
    return Meta(names=names, kpt_shape=tuple(shape) if shape else None, flip_index=list(flip))


def _read_labels(ds: YoloDataset, *, labels_dir: Path, meta: Meta) -> None:
    """Parse every label file; bad lines are dropped (or raise), label files without image too."""
    stems = {p.stem for p in ds.files}
    if len(stems) != len(ds.files):
        raise DataError(f"two images share a file stem in {ds.files[0].parent}")
    ann_id = 1
    for path in ds.files:
        objs: list[Obj] = []
        label = labels_dir / f"{path.stem}.txt"
        try:
            lines = label.read_text().splitlines() if label.is_file() else []
        except (OSError, UnicodeDecodeError) as exc:
            ds.drop(SampleError(f"cannot read label file {label}: {exc}", kind="malformed_line"))
            lines = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                objs.append(parse_line(line, where=f"{label}:{n}", meta=meta, ann_id=ann_id))
                ann_id += 1
            except SampleError as exc:
                ds.drop(exc)
        ds.objects.append(objs)
    for orphan in sorted(p for p in labels_dir.glob("*.txt") if p.stem not in stems):
        ds.drop(SampleError(f"label file {orphan} has no image in {ds.files[0].parent}", kind="orphan_label"))


def build(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: OnBad) -> YoloDataset:
    """Build the ``yolo`` dataset of ``split`` (see docs/data-formats.md)."""
    opts = check_options(cfg, allowed={"yaml": str, "kpt_shape": list, "crop_scale": (int, float)}, reader=FORMAT)
    require_task(reader=FORMAT, task_type=task_type, supported=TASK_TYPES)
    root = root_dir(cfg)
    name = split_name(cfg, split)
    images_dir = require_dir(root / "images" / name, what=f"{split} image folder")
    labels_dir = require_dir(root / "labels" / name, what=f"{split} label folder")
    meta = _meta(cfg, opts=opts, root=root, task_type=task_type)
    classes = ["background", *meta.names] if task_type == "segmentation" else list(meta.names)
    ds = YoloDataset(meta=meta, classes=classes, policy=on_bad_sample, where=str(images_dir),
                     task_type=task_type, crop_scale=float(opts.get("crop_scale", 1.25)))
    ds.files = list_images(images_dir)
    if not ds.files:
        raise DataError(f"empty split folder {images_dir}: no images")
    _read_labels(ds, labels_dir=labels_dir, meta=meta)
    if task_type == "keypoints":
        ds.samples = [(i, k) for i, objs in enumerate(ds.objects) for k, o in enumerate(objs)
                      if (o.keypoints[:, 2] > 0).any()]
    else:
        ds.samples = [(i, -1) for i in range(len(ds.files))]
    if not ds.samples:
        raise DataError(f"{labels_dir}: no usable samples for task type {task_type}")
    return ds
