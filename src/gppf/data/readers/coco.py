"""``coco`` reader: COCO-format JSON for detection, segmentation, multilabel and top-down keypoints."""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from torchvision import tv_tensors

from gppf.config import DataConfig
from gppf.data.base import DataError, OnBad
from gppf.data.readers.common import (
    ReaderDataset,
    SampleError,
    check_options,
    per_split,
    require_dir,
    require_file,
    require_task,
    root_dir,
    split_name,
)
from gppf.data.readers.images import load_rgb
from gppf.data.readers.targets import Obj, flip_index, flip_pairs, object_target, person_crop

FORMAT = "coco"
TASK_TYPES = ("detection", "segmentation", "multilabel", "keypoints")
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image before it is an error


@dataclass
class ImageRec:
    """A listed image: original id, file and the size the JSON declares."""

    id: int
    path: Path
    h: int
    w: int


@dataclass
class Categories:
    """Categories used by the task: original ids, names and (keypoints) the keypoint names."""

    ids: list[int]
    names: list[str]
    keypoint_names: list[str]


@dataclass
class _Ctx:
    """What annotation validation needs to know about the file."""

    path: Path
    cats: Categories
    index: dict[int, int]  # image id -> position in ``recs``
    recs: list[ImageRec]
    all_cat_ids: set[int]
    task_type: str
    seen: set[int]


class CocoDataset(ReaderDataset):
    """COCO images (or person crops for ``keypoints``) with original ids kept.

    ``coco`` is a pycocotools ``COCO`` over the validated annotations; ``cat_ids[label]`` is the original
    category id of object label ``label`` (an index into ``names``).
    """

    def __init__(
        self, *, data: dict[str, Any], cats: Categories, classes: list[str], policy: OnBad, where: str,
        task_type: str, crop_scale: float,
    ) -> None:
        super().__init__(classes=classes, policy=policy, where=where, task_type=task_type)
        self.data = data
        self.cat_ids = cats.ids
        self.names = cats.names
        self.keypoint_names = cats.keypoint_names
        self.flip_index = flip_index(cats.keypoint_names)
        self.crop_scale = crop_scale
        self.images: list[ImageRec] = []
        self.objects: list[list[Obj]] = []
        self.samples: list[tuple[int, int]] = []  # (image index, object index or -1)
        self.dropped_image_ids: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @cached_property
    def coco(self) -> COCO:
        """pycocotools ground truth of the validated annotations (for COCOeval)."""
        gt = COCO()
        gt.dataset = self.data
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt

    def _load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        i, k = self.samples[index]
        rec = self.images[i]
        image = load_rgb(rec.path)
        h, w = (int(s) for s in image.shape[-2:])
        if (h, w) != (rec.h, rec.w):
            raise SampleError(
                f"image {rec.path} is {w}x{h} but its JSON entry (id {rec.id}) says {rec.w}x{rec.h}",
                kind="size_mismatch",
            )
        if self.task_type == "keypoints":
            return person_crop(image, obj=self.objects[i][k], image_id=rec.id, scale=self.crop_scale,
                               flip_pairs=flip_pairs(self.flip_index))
        target = object_target(self.objects[i], task_type=self.task_type, h=h, w=w, num_classes=len(self.names))
        return image, {**target, "image_id": rec.id, "orig_size": (h, w)}

    @property
    def num_images(self) -> int:
        return len({i for i, _ in self.samples})

    @property
    def num_keypoints(self) -> int:
        """Keypoints per person (0 unless the task type is ``keypoints``)."""
        return len(self.keypoint_names)

    def annotation_counts(self) -> dict[str, int]:
        objs = [o for group in self.objects for o in group]
        if self.task_type == "keypoints":
            persons = [self.objects[i][k] for i, k in self.samples]
            return {"persons": len(persons), "keypoints": int(sum((o.keypoints[:, 2] > 0).sum() for o in persons))}
        key = {"detection": "boxes", "segmentation": "masks", "multilabel": "objects"}[self.task_type]
        return {key: sum(not o.crowd for o in objs), "crowd": sum(o.crowd for o in objs)}


def load_json(path: Path) -> dict[str, Any]:
    """Parse a COCO annotation file and check its top-level structure."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read annotation file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{path}: missing required key '{key}'")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _categories(data: dict[str, Any], *, path: Path, task_type: str) -> Categories:
    """Sorted categories (only those with ``keypoints`` for the keypoints task)."""
    seen: dict[int, dict[str, Any]] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(f"{path}: category #{i} needs an integer 'id' and a string 'name'")
        if cat["id"] in seen:
            raise DataError(f"{path}: duplicate category id {cat['id']}")
        seen[cat["id"]] = cat
    cats = [seen[k] for k in sorted(seen)]
    kpt_names: list[str] = []
    if task_type == "keypoints":
        cats = [c for c in cats if isinstance(c.get("keypoints"), list) and c["keypoints"]]
        if not cats:
            raise DataError(f"{path}: no category defines 'keypoints' (needed for task type keypoints)")
        kpt_names = [str(n) for n in cats[0]["keypoints"]]
        if any(len(c["keypoints"]) != len(kpt_names) for c in cats):
            raise DataError(f"{path}: keypoint categories define different numbers of keypoints")
    if not cats:
        raise DataError(f"{path}: 'categories' is empty")
    return Categories(ids=[c["id"] for c in cats], names=[c["name"] for c in cats], keypoint_names=kpt_names)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _image_dir(opts: dict[str, Any], *, root: Path, ann_path: Path, split: str) -> Path:
    """Option ``images``; else ``<root>/<json stem after its last '_'>`` if it exists; else ``<root>``."""
    if "images" in opts:
        return require_dir(root / str(per_split(opts["images"], split=split, key="images")), what="image folder")
    tail = root / ann_path.stem.rsplit("_", 1)[-1]
    return tail if tail.is_dir() else root


def _image(img: Any, *, i: int, path: Path, image_dir: Path) -> ImageRec:
    """Validate one ``images`` entry; raises ``SampleError`` naming it."""
    if not isinstance(img, dict) or not _is_int(img.get("id")):
        raise SampleError(f"{path}: image #{i} has no integer 'id'", kind="bad_image_entry")
    name, h, w = img.get("file_name"), img.get("height"), img.get("width")
    if not isinstance(name, str) or not name or not _is_int(h) or not _is_int(w) or h <= 0 or w <= 0:
        raise SampleError(
            f"{path}: image id {img['id']} needs 'file_name' and positive integer 'height'/'width'",
            kind="bad_image_entry",
        )
    file = image_dir / name
    if not file.is_file():
        raise SampleError(f"{path}: image id {img['id']}: file not found: {file}", kind="missing_image")
    return ImageRec(id=img["id"], path=file, h=h, w=w)


def _images(data: dict[str, Any], *, path: Path, image_dir: Path, ds: CocoDataset) -> dict[int, int]:
    """Fill ``ds.images``; returns image id -> index. Duplicate ids are fatal; bad entries are dropped."""
    index: dict[int, int] = {}
    listed: set[Any] = set()
    kept = []
    for i, img in enumerate(data["images"]):
        iid = img.get("id") if isinstance(img, dict) and _is_int(img.get("id")) else None
        if iid is not None and iid in listed:
            raise DataError(f"{path}: duplicate image id {iid}")
        listed.add(iid)
        try:
            rec = _image(img, i=i, path=path, image_dir=image_dir)
        except SampleError as exc:
            ds.drop(exc)
            continue
        index[rec.id] = len(ds.images)
        ds.images.append(rec)
        kept.append(img)
    data["images"] = kept
    ds.dropped_image_ids = {i for i in listed if i is not None} - set(index)
    return index


def _box(ann: dict[str, Any], *, where: str, rec: ImageRec) -> np.ndarray:
    """``bbox`` xywh -> XYXY, checked to be positive-sized and inside the image."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
        raise SampleError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}", kind="bad_box")
    x, y, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0:
        raise SampleError(f"{where}: zero or negative box size w={bw} h={bh}", kind="bad_box")
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + bw > rec.w + t or y + bh > rec.h + t:
        raise SampleError(
            f"{where}: box [{x}, {y}, {bw}, {bh}] lies outside the {rec.w}x{rec.h} image", kind="box_outside"
        )
    return np.array([x, y, x + bw, y + bh], dtype=np.float64)


def _segmentation(ann: dict[str, Any], *, where: str, rec: ImageRec) -> Any:
    """Validate polygons (flat lists, >= 3 points) or an RLE dict of the image's size."""
    segm = ann.get("segmentation")
    if isinstance(segm, list) and segm:
        for poly in segm:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(_is_num(v) for v in poly):
                raise SampleError(f"{where}: polygons must be flat [x1, y1, x2, y2, ...] lists of >= 3 points",
                                  kind="bad_segmentation")
        return segm
    if isinstance(segm, dict) and "counts" in segm:
        if list(segm.get("size", [])) != [rec.h, rec.w]:
            raise SampleError(f"{where}: RLE size {segm.get('size')} differs from image size [{rec.h}, {rec.w}]",
                              kind="bad_segmentation")
        return segm
    raise SampleError(f"{where}: missing or empty 'segmentation'", kind="bad_segmentation")


def _keypoints(ann: dict[str, Any], *, where: str, k: int) -> np.ndarray:
    kpts = ann.get("keypoints")
    if not isinstance(kpts, list) or len(kpts) != 3 * k:
        got = len(kpts) if isinstance(kpts, list) else kpts
        raise SampleError(f"{where}: keypoint count mismatch: expected {3 * k} values ({k} x 3), got {got}",
                          kind="keypoint_mismatch")
    arr = np.asarray(kpts, dtype=np.float64).reshape(k, 3) if all(_is_num(v) for v in kpts) else None
    if arr is None or not np.isin(arr[:, 2], (0, 1, 2)).all():
        raise SampleError(f"{where}: keypoints must be numbers with visibility 0, 1 or 2", kind="keypoint_mismatch")
    return arr


def _object(ann: dict[str, Any], *, ctx: _Ctx) -> Obj | None:
    """Validate one annotation; ``None`` when it is not used by the task (other category)."""
    cats = ctx.cats
    where = f"{ctx.path}: annotation id {ann['id']}"
    if ann["id"] in ctx.seen:
        raise SampleError(f"{where}: duplicate annotation id", kind="bad_annotation")
    ctx.seen.add(ann["id"])
    cid, iid = ann.get("category_id"), ann.get("image_id")
    if not _is_int(cid) or cid not in ctx.all_cat_ids:
        raise SampleError(f"{where}: unknown category id {cid!r}", kind="unknown_category")
    if not _is_int(iid) or iid not in ctx.index:
        raise SampleError(f"{where}: unknown image id {iid!r}", kind="unknown_image")
    if cid not in cats.ids:
        return None
    rec = ctx.recs[ctx.index[iid]]
    crowd = ann.setdefault("iscrowd", 0)
    if crowd not in (0, 1):
        raise SampleError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}", kind="bad_annotation")
    box = _box(ann, where=where, rec=rec)
    area = ann.setdefault("area", float((box[2] - box[0]) * (box[3] - box[1])))
    obj = Obj(label=cats.ids.index(ann["category_id"]), box=box, area=float(area), ann_id=ann["id"], crowd=bool(crowd))
    if ctx.task_type == "segmentation":
        obj.segm = _segmentation(ann, where=where, rec=rec)
    if ctx.task_type == "keypoints":
        obj.keypoints = _keypoints(ann, where=where, k=len(cats.keypoint_names))
        ann["num_keypoints"] = int((obj.keypoints[:, 2] > 0).sum())
    return obj


def _annotations(data: dict[str, Any], *, path: Path, cats: Categories, index: dict[int, int], ds: CocoDataset,
                 task_type: str) -> None:
    """Fill ``ds.objects``; bad annotations are dropped (or raise), others kept in ``data`` for COCOeval."""
    ds.objects = [[] for _ in ds.images]
    ctx = _Ctx(path=path, cats=cats, index=index, recs=ds.images, all_cat_ids={c["id"] for c in data["categories"]},
               task_type=task_type, seen=set())
    kept = []
    for i, ann in enumerate(data["annotations"]):
        try:
            if not isinstance(ann, dict) or not _is_int(ann.get("id")):
                raise SampleError(f"{path}: annotation #{i} has no integer 'id'", kind="bad_annotation")
            if _is_int(ann.get("image_id")) and ann["image_id"] in ds.dropped_image_ids:
                continue  # its image was already reported
            obj = _object(ann, ctx=ctx)
        except SampleError as exc:
            ds.drop(exc)
            continue
        if obj is not None:
            ds.objects[index[ann["image_id"]]].append(obj)
            kept.append(ann)
    data["annotations"] = kept
    data["categories"] = [c for c in data["categories"] if c["id"] in cats.ids]


def _samples(ds: CocoDataset) -> list[tuple[int, int]]:
    """One sample per image, or per non-crowd person with a visible keypoint (``keypoints``)."""
    if ds.task_type != "keypoints":
        return [(i, -1) for i in range(len(ds.images))]
    return [
        (i, k)
        for i, objs in enumerate(ds.objects)
        for k, o in enumerate(objs)
        if not o.crowd and (o.keypoints[:, 2] > 0).any()
    ]


def build(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: OnBad) -> CocoDataset:
    """Build the ``coco`` dataset of ``split`` (see docs/data-formats.md)."""
    opts = check_options(cfg, allowed={"images": (str, dict), "crop_scale": (int, float)}, reader=FORMAT)
    require_task(reader=FORMAT, task_type=task_type, supported=TASK_TYPES)
    root = root_dir(cfg)
    path = require_file(root / split_name(cfg, split), what=f"{split} annotation file")
    data = load_json(path)
    cats = _categories(data, path=path, task_type=task_type)
    if cfg.classes is not None and list(cfg.classes) != cats.names:
        raise DataError(f"data.classes {cfg.classes} differ from the categories of {path}: {cats.names}")
    classes = ["background", *cats.names] if task_type == "segmentation" else list(cats.names)
    ds = CocoDataset(data=data, cats=cats, classes=classes, policy=on_bad_sample, where=str(path),
                     task_type=task_type, crop_scale=float(opts.get("crop_scale", 1.25)))
    image_dir = _image_dir(opts, root=root, ann_path=path, split=split)
    index = _images(data, path=path, image_dir=image_dir, ds=ds)
    _annotations(data, path=path, cats=cats, index=index, ds=ds, task_type=task_type)
    ds.samples = _samples(ds)
    if not ds.samples:
        raise DataError(f"{path}: no usable samples for task type {task_type}")
    return ds
