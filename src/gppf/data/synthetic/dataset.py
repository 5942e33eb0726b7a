"""The ``synthetic`` reader: procedural multi-domain scenes for every task type, generated on the fly.

Items are rendered in ``__getitem__`` from per-item RNGs seeded by (seed, split, task type, index), so a
dataset holds no images, is identical across runs and processes, and train/val never share items.
"""
from __future__ import annotations

import contextlib
import difflib
import io
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors

from gppf.config import DataConfig
from gppf.data.base import BadSamples, DataError, OnBad, SampleDataset
from gppf.data.synthetic import creature
from gppf.data.synthetic.domains import DOMAINS, Domain
from gppf.data.synthetic.scenes import (
    COLOURS, Scene, identity_table, render_classification, render_detection, render_keypoints,
    render_multilabel, render_reid, render_segmentation,
)
from gppf.data.synthetic.shapes import SHAPES, mask_box

TASK_TYPES: tuple[str, ...] = ("classification", "multilabel", "detection", "segmentation", "keypoints", "reid")
DOMAIN_CHOICES: tuple[str, ...] = (*DOMAINS, "mixed")
MAX_IDENTITIES = len(SHAPES) * len(COLOURS) * (1 + 4 * (len(COLOURS) - 1))
_SPLIT_SALT = {"train": 0x747261696E, "val": 0x76616C}
_COMMON = ("domain", "size", "num_train", "num_val", "seed")
_PER_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("num_classes",),
    "multilabel": ("num_classes", "max_objects"),
    "detection": ("num_classes", "max_objects"),
    "segmentation": ("num_classes", "max_objects"),
    "keypoints": (),
    "reid": ("num_identities",),
}
_DEFAULT_CLASSES = {"classification": 10, "multilabel": 10, "detection": 6, "segmentation": 6}
# option -> (lowest, highest) accepted integer
_INT_RANGES: dict[str, tuple[int, int]] = {
    "size": (16, 1024), "num_train": (1, 10**9), "num_val": (1, 10**9), "seed": (0, 2**63 - 1),
    "num_classes": (1, len(SHAPES)), "max_objects": (1, 16), "num_identities": (10, MAX_IDENTITIES),
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Validated options of one synthetic task (see ``docs/builtin-data.md``)."""

    task_type: str
    domain: str = "flat"
    size: int = 64
    num_train: int = 2000
    num_val: int = 400
    seed: int = 0
    num_classes: int = 0
    max_objects: int = 4
    num_identities: int = 300

    @property
    def val_identities(self) -> int:
        """Identities held out for val (the last 20%, at least 2)."""
        return max(2, round(0.2 * self.num_identities))


def _check_key(key: str, *, task_type: str) -> None:
    allowed = _COMMON + _PER_TASK[task_type]
    if key in allowed:
        return
    if key in _INT_RANGES:
        raise DataError(f"data.options.{key}: does not apply to task type '{task_type}' for format "
                        f"'synthetic' (options: {', '.join(allowed)})")
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise DataError(f"data.options.{key}: unknown option for format 'synthetic'{hint} "
                    f"(known: {', '.join(allowed)})")


def _check_value(key: str, value: Any) -> Any:
    if key == "domain":
        if value not in DOMAIN_CHOICES:
            close = difflib.get_close_matches(str(value), DOMAIN_CHOICES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(f"data.options.domain: unknown domain {value!r}{hint} "
                            f"(domains: {', '.join(DOMAIN_CHOICES)})")
        return value
    lo, hi = _INT_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DataError(f"data.options.{key}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def parse_options(cfg: DataConfig, *, task_type: str) -> SyntheticSpec:
    """Validate ``cfg.options`` (and ``cfg.classes``) for ``task_type``; errors name the key."""
    if task_type not in TASK_TYPES:
        raise DataError(f"format 'synthetic' does not support task type '{task_type}' "
                        f"(supports: {', '.join(TASK_TYPES)})")
    values: dict[str, Any] = {}
    for key, value in cfg.options.items():
        _check_key(str(key), task_type=task_type)
        values[str(key)] = _check_value(str(key), value)
    values.setdefault("num_classes", _DEFAULT_CLASSES.get(task_type, 0))
    spec = SyntheticSpec(task_type=task_type, **values)
    if task_type == "reid" and spec.num_val < 2 * spec.val_identities:
        raise DataError(f"data.options.num_val: reid val needs >= 2 samples per identity, i.e. >= "
                        f"{2 * spec.val_identities} for num_identities={spec.num_identities}")
    if cfg.classes is not None and list(cfg.classes) != _class_names(spec, split="train"):
        raise DataError(f"data.classes: the synthetic classes are fixed ({_class_names(spec, split='train')}); "
                        "choose how many with data.options.num_classes")
    return spec


def _class_names(spec: SyntheticSpec, *, split: str) -> list[str]:
    if spec.task_type == "keypoints":
        return ["creature"]
    if spec.task_type == "reid":
        ids = identity_table(seed=spec.seed, count=spec.num_identities)
        n_train = spec.num_identities - spec.val_identities
        return [i.name for i in (ids[:n_train] if split == "train" else ids[n_train:])]
    shapes = list(SHAPES[: spec.num_classes])
    return ["background", *shapes] if spec.task_type == "segmentation" else shapes


class SyntheticDataset(SampleDataset):
    """Procedural samples of one task type, domain and split (see module docstring).

    Extras: ``scene(i)`` (the rendered :class:`Scene` with per-object masks); detection and keypoints
    have ``coco`` (a pycocotools ``COCO`` of the split); detection has ``cat_ids``; keypoints have
    ``keypoint_names``, ``sigmas``, ``skeleton`` and ``flip_pairs``; reid has ``identity_offset``
    (``identity - identity_offset`` indexes ``classes``).
    """

    def __init__(self, spec: SyntheticSpec, *, split: Literal["train", "val"], on_bad_sample: OnBad = "error") -> None:
        if split not in _SPLIT_SALT:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        self.spec, self.split, self.task_type, self.domain = spec, split, spec.task_type, spec.domain
        self.bad = BadSamples(policy=on_bad_sample, where=f"synthetic:{spec.domain}/{split}")
        self.classes = _class_names(spec, split=split)
        self._length = spec.num_train if split == "train" else spec.num_val
        if spec.task_type == "detection":
            self.cat_ids = list(range(1, spec.num_classes + 1))
        if spec.task_type == "keypoints":
            self.keypoint_names = list(creature.KEYPOINT_NAMES)
            self.sigmas = np.array(creature.KEYPOINT_SIGMAS, dtype=np.float64)
            self.skeleton = [list(p) for p in creature.SKELETON]
            self.flip_pairs = [list(p) for p in creature.FLIP_PAIRS]
        if spec.task_type == "reid":
            self._identities = identity_table(seed=spec.seed, count=spec.num_identities)
            self.identity_offset = 0 if split == "train" else spec.num_identities - spec.val_identities

    def __len__(self) -> int:
        return self._length

    def _rngs(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        base = [self.spec.seed, _SPLIT_SALT[self.split], TASK_TYPES.index(self.task_type), index]
        return np.random.default_rng([*base, 0]), np.random.default_rng([*base, 1])

    def _domain(self, sty: np.random.Generator) -> Domain:
        if self.domain == "mixed":
            return list(DOMAINS.values())[int(sty.integers(len(DOMAINS)))]
        return DOMAINS[self.domain]

    def scene(self, index: int) -> Scene:
        """Render item ``index`` with its per-object masks (what ``__getitem__`` converts)."""
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} samples")
        geo, sty = self._rngs(index)
        kw: dict[str, Any] = {"domain": self._domain(sty), "size": self.spec.size}
        t, n = self.task_type, self.spec.num_classes
        if t == "classification":
            return render_classification(geo, sty, num_classes=n, **kw)
        if t in ("multilabel", "detection", "segmentation"):
            fn = {"multilabel": render_multilabel, "detection": render_detection,
                  "segmentation": render_segmentation}[t]
            return fn(geo, sty, num_classes=n, max_objects=self.spec.max_objects, **kw)
        if t == "keypoints":
            return render_keypoints(geo, sty, **kw)
        label = self.identity_offset + index % len(self.classes)
        return render_reid(geo, sty, identity=self._identities[label], label=label, **kw)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        scene = self.scene(int(index))
        image = tv_tensors.Image(torch.from_numpy(scene.image).permute(2, 0, 1).contiguous())
        return image, self.scene_target(scene, index=int(index))

    def scene_target(self, scene: Scene, *, index: int) -> dict[str, Any]:
        """The contract target (``docs/ARCHITECTURE.md``) of a rendered scene."""
        size = self.spec.size
        out: dict[str, Any] = {"image_id": index, "orig_size": (size, size)}
        t = self.task_type
        if t == "classification":
            out["label"] = scene.labels[0]
        elif t == "multilabel":
            out["labels"] = torch.zeros(len(self.classes), dtype=torch.float32)
            out["labels"][scene.labels] = 1.0
        elif t == "detection":
            boxes = torch.tensor([mask_box(m) for m in scene.masks], dtype=torch.float32).reshape(-1, 4)
            out["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(size, size))
            out["labels"] = torch.tensor(scene.labels, dtype=torch.int64)
        elif t == "segmentation":
            mask = np.zeros((size, size), dtype=np.int64)
            for m, label in zip(scene.masks, scene.labels):
                mask[m] = label + 1
            out["mask"] = tv_tensors.Mask(torch.from_numpy(mask))
        elif t == "keypoints":
            out["keypoints"] = torch.from_numpy(scene.keypoints)
            out["box"] = torch.tensor(scene.box, dtype=torch.float32)
            out["crop_box"] = torch.tensor([0, 0, size, size], dtype=torch.float32)
            out["area"] = scene.area
        else:
            out["identity"] = scene.labels[0]
        return out

    # ------------------------------------------------------------------------- pycocotools views

    @cached_property
    def coco(self) -> COCO:
        """Ground truth of the whole split as a pycocotools ``COCO`` (detection and keypoints)."""
        if self.task_type not in ("detection", "keypoints"):
            raise AttributeError(f"'coco' is only available for detection and keypoints, not {self.task_type}")
        size = self.spec.size
        images, anns = [], []
        for i in range(len(self)):
            images.append({"id": i, "width": size, "height": size, "file_name": f"{self.split}/{i:06d}.png"})
            scene = self.scene(i)
            for ann in (_keypoint_ann(scene) if self.task_type == "keypoints" else _box_anns(scene)):
                anns.append({**ann, "id": len(anns) + 1, "image_id": i, "iscrowd": 0})
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns, "categories": self._categories()}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _categories(self) -> list[dict[str, Any]]:
        if self.task_type == "keypoints":
            skeleton = [[a + 1, b + 1] for a, b in creature.SKELETON]
            return [{"id": 1, "name": "creature", "supercategory": "creature",
                     "keypoints": self.keypoint_names, "skeleton": skeleton}]
        return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(self.classes)]


def _xywh(box: tuple[int, int, int, int]) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def _box_anns(scene: Scene) -> list[dict[str, Any]]:
    anns = []
    for m, label in zip(scene.masks, scene.labels):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"bbox": _xywh(mask_box(m)), "area": float(m.sum()), "category_id": label + 1,
                     "segmentation": rle})
    return anns


def _keypoint_ann(scene: Scene) -> list[dict[str, Any]]:
    kps = scene.keypoints
    return [{"keypoints": [round(float(v), 3) for v in kps.reshape(-1)], "num_keypoints": int((kps[:, 2] > 0).sum()),
             "area": scene.area, "bbox": _xywh(scene.box), "category_id": 1}]


def build(cfg: DataConfig, *, split: Literal["train", "val"], task_type: str, on_bad_sample: str) -> SampleDataset:
    """Build the synthetic dataset of ``split`` for ``task_type`` from ``cfg.options``."""
    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    spec = parse_options(cfg, task_type=task_type)
    return SyntheticDataset(spec, split=split, on_bad_sample=on_bad_sample)  # type: ignore[arg-type]
