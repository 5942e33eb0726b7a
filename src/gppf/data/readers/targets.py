"""Target builders shared by the object readers (``coco``, ``yolo``): one object list, five task types."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

IGNORE = 255


@dataclass
class Obj:
    """One annotated object in pixel coordinates of its image."""

    label: int
    box: np.ndarray  # [4] XYXY float
    segm: Any = None  # list of flat polygons [x1, y1, x2, y2, ...] or a COCO RLE dict
    keypoints: np.ndarray | None = None  # [K, 3] (x, y, v)
    area: float = 0.0
    ann_id: int = -1
    crowd: bool = False


def detection_target(objs: list[Obj], *, h: int, w: int) -> dict[str, Any]:
    """``boxes`` (XYXY ``BoundingBoxes``) and ``labels``; crowd objects are left out."""
    kept = [o for o in objs if not o.crowd]
    boxes = np.stack([o.box for o in kept]) if kept else np.zeros((0, 4))
    boxes = np.clip(boxes, 0, [w, h, w, h])
    return {
        "boxes": tv_tensors.BoundingBoxes(
            torch.as_tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.as_tensor([o.label for o in kept], dtype=torch.int64),
    }


def multilabel_target(objs: list[Obj], *, num_classes: int) -> dict[str, Any]:
    """Multi-hot ``labels [C]`` of the classes present (crowd objects count as present)."""
    labels = torch.zeros(num_classes, dtype=torch.float32)
    for o in objs:
        labels[o.label] = 1.0
    return {"labels": labels}


def segm_to_rle(segm: Any, *, h: int, w: int) -> dict[str, Any]:
    """COCO polygons / uncompressed RLE / RLE to one compressed RLE (as pycocotools' annToRLE)."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


def semantic_mask(objs: list[Obj], *, h: int, w: int) -> tv_tensors.Mask:
    """Class-id mask: background ``0``, class ``c`` as ``c + 1``, crowd regions ``255`` (ignore).

    Larger objects are painted first so that smaller ones stay visible where they overlap.
    """
    mask = np.zeros((h, w), dtype=np.int64)
    crowd = [o for o in objs if o.crowd and o.segm is not None]
    solid = sorted((o for o in objs if not o.crowd and o.segm is not None), key=lambda o: -o.area)
    order = [(o, IGNORE) for o in crowd] + [(o, o.label + 1) for o in solid]
    if order:
        with warnings.catch_warnings():  # pycocotools' Cython arrays trip a numpy 2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            planes = mask_utils.decode([segm_to_rle(o.segm, h=h, w=w) for o, _ in order])
        for j, (_, value) in enumerate(order):
            mask[planes[:, :, j] > 0] = value
    return tv_tensors.Mask(torch.from_numpy(mask))


def crop_box_for(box: np.ndarray, *, scale: float) -> tuple[int, int, int, int]:
    """Integer ``(x0, y0, x1, y1)``: ``box`` enlarged by ``scale`` around its centre (>= 1 px)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    bw, bh = max(box[2] - box[0], 1.0) * scale, max(box[3] - box[1], 1.0) * scale
    x0, y0 = math.floor(cx - bw / 2), math.floor(cy - bh / 2)
    x1, y1 = max(math.ceil(cx + bw / 2), x0 + 1), max(math.ceil(cy + bh / 2), y0 + 1)
    return x0, y0, x1, y1


def person_crop(
    image: tv_tensors.Image, *, obj: Obj, image_id: int, scale: float, flip_pairs: list[list[int]]
) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """Top-down sample: the enlarged person box cut out (zero padding outside the image).

    Visible keypoints may lie outside the crop (annotated outside the person box); they are kept.
    """
    x0, y0, x1, y1 = crop_box_for(obj.box, scale=scale)
    crop = F.crop(image, top=y0, left=x0, height=y1 - y0, width=x1 - x0)
    kpts = np.array(obj.keypoints, dtype=np.float32)
    visible = kpts[:, 2] > 0
    kpts[visible, 0] -= x0
    kpts[visible, 1] -= y0
    kpts[~visible, :2] = 0.0
    h, w = image.shape[-2:]
    target = {
        "keypoints": torch.from_numpy(kpts),
        "box": torch.as_tensor(obj.box, dtype=torch.float32),
        "crop_box": torch.tensor([x0, y0, x1, y1], dtype=torch.float32),
        "area": float(obj.area),
        "ann_id": int(obj.ann_id),
        "image_id": int(image_id),
        "image_size": (int(h), int(w)),
        "orig_size": (y1 - y0, x1 - x0),
    }
    if flip_pairs:
        target["flip_pairs"] = [list(p) for p in flip_pairs]
    return tv_tensors.Image(crop), target


def flip_index(names: list[str]) -> list[int]:
    """Horizontal-flip permutation of keypoints from ``left_*`` / ``right_*`` names (identity otherwise)."""
    out = list(range(len(names)))
    for i, name in enumerate(names):
        for a, b in (("left", "right"), ("right", "left")):
            if a in name:
                partner = name.replace(a, b)
                if partner in names:
                    out[i] = names.index(partner)
    return out


def flip_pairs(index: list[int]) -> list[list[int]]:
    """``[left, right]`` pairs of a flip permutation (its non-fixed points, each pair once)."""
    return [[i, j] for i, j in enumerate(index) if i < j and index[j] == i]


def object_target(
    objs: list[Obj], *, task_type: str, h: int, w: int, num_classes: int
) -> dict[str, Any]:
    """Per-image target for detection, segmentation or multilabel."""
    if task_type == "detection":
        return detection_target(objs, h=h, w=w)
    if task_type == "segmentation":
        return {"mask": semantic_mask(objs, h=h, w=w)}
    if task_type == "multilabel":
        return multilabel_target(objs, num_classes=num_classes)
    raise ValueError(f"object_target: unsupported task type {task_type!r}")
