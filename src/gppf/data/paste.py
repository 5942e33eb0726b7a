"""``gppf data paste``: paste Fashion-MNIST items onto backgrounds and write standard datasets to disk.

Items are cut out by their own intensity (pixels above a threshold, holes filled), tinted, scaled and
pasted without blending, so boxes and masks are exact. ``build_paste_dataset`` writes under ``out``::

    annotations/instances_{train,val}.json + images/{train,val}/*.png   COCO: bbox, RLE masks, area
    {train,val}/images/*.png + {train,val}/labels/*.png + classes.txt   mask PNGs (0 = background)
    multilabel_{train,val}.csv                                           image,<class...> with 0/1
    summary.json

Train images use Fashion-MNIST's train items and val images its t10k items, so no item is shared.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_fill_holes

from gppf.data.base import DataError
from gppf.data.synthetic.domains import DOMAINS, far_colour, hsv, to_uint8
from gppf.data.synthetic.shapes import mask_box

FMNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FMNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_SPLIT_SALT = {"train": 0x5041_5354, "val": 0x5641_4C}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
Split = Literal["train", "val"]


# ----------------------------------------------------------------------------- IDX input


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array from ``path`` (gzipped when it ends in ``.gz``)."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] == 0:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex() or 'missing'}, "
                        "expected 0x0000080N)")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise DataError(f"{path}: IDX payload has {len(data) - header} bytes, header {dims} needs {math.prod(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(root: Path, name: str) -> Path:
    for candidate in (root / name, root / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file not found: {root / name}")


def load_fashion_mnist(root: Path, *, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Items ``uint8 [N, H, W]`` and labels ``uint8 [N]`` of ``split`` (val = the t10k files)."""
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder not found: {root}")
    image_path, label_path = (_idx_path(root, n) for n in FMNIST_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise DataError(f"{image_path}: expected a 3-d image array, got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{label_path}: expected {len(images)} labels, got shape {labels.shape}")
    if labels.size and int(labels.max()) >= len(FMNIST_CLASSES):
        raise DataError(f"{label_path}: label {int(labels.max())} outside 0..{len(FMNIST_CLASSES) - 1}")
    return images, labels


# ----------------------------------------------------------------------------- scenes


class Backgrounds:
    """Background canvases: random crops of images in ``folder``, or procedural domain backgrounds."""

    def __init__(self, folder: Path | None, *, size: int) -> None:
        self.size = size
        self.files: list[Path] = []
        if folder is not None:
            if not folder.is_dir():
                raise DataError(f"backgrounds folder not found: {folder}")
            self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not self.files:
                raise DataError(f"backgrounds folder has no images ({', '.join(sorted(_IMAGE_SUFFIXES))}): {folder}")

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A ``float32 [size, size, 3]`` canvas."""
        if not self.files:
            domain = ("flat", "textured", "noisy", "pastel")[int(rng.integers(4))]
            return DOMAINS[domain].background(rng, self.size)
        path = self.files[int(rng.integers(len(self.files)))]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as exc:
            raise DataError(f"cannot decode background image {path}: {exc}") from exc
        side = max(1, int(min(img.size) * rng.uniform(0.5, 1.0)))
        x0, y0 = int(rng.integers(img.width - side + 1)), int(rng.integers(img.height - side + 1))
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(crop, dtype=np.float32)


@dataclass
class PasteScene:
    """One composed image with the visible mask and class of each pasted item."""

    image: np.ndarray
    masks: list[np.ndarray]
    labels: list[int]


def _cutout(rng: np.random.Generator, item: np.ndarray, *, side: int, tint_ref: np.ndarray,
            threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """A tinted ``float32 [side, side, 3]`` patch of ``item`` and its hole-free alpha mask."""
    grey = np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
    alpha = binary_fill_holes(grey > threshold)
    tint = far_colour(rng, lambda r: hsv(r.random(), r.uniform(0.3, 1.0), r.uniform(0.7, 1.0)), tint_ref, 80)
    return tint * (0.3 + 0.7 * grey[..., None] / 255.0), alpha


def paste_scene(rng: np.random.Generator, *, items: np.ndarray, labels: np.ndarray, size: int, max_objects: int,
                backgrounds: Backgrounds, threshold: int = 32, min_visible: float = 0.7) -> PasteScene:
    """Paste 1..max_objects items; each keeps ``min_visible`` of its pixels after later pastes."""
    canvas = backgrounds.sample(rng)
    ref = canvas.reshape(-1, 3).mean(axis=0)
    visible: list[np.ndarray] = []
    fulls: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            k = int(rng.integers(len(items)))
            side = int(rng.integers(round(0.35 * size), round(0.6 * size) + 1))
            patch, alpha = _cutout(rng, items[k], side=side, tint_ref=ref, threshold=threshold)
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            full = np.zeros((size, size), dtype=bool)
            full[y0:y0 + side, x0:x0 + side] = alpha
            after = [v & ~full for v in visible]
            if full.sum() < 16 or any(a.sum() < min_visible * f.sum() for a, f in zip(after, fulls)):
                continue
            canvas[y0:y0 + side, x0:x0 + side][alpha] = patch[alpha]
            visible, fulls, classes = after + [full], fulls + [full], classes + [int(labels[k])]
            break
    return PasteScene(image=to_uint8(canvas), masks=visible, labels=classes)


# ----------------------------------------------------------------------------- writers


class SplitWriter:
    """Writes one split in the COCO, mask-PNG and multilabel-CSV layouts at once."""

    def __init__(self, out: Path, *, split: Split) -> None:
        self.out, self.split = out, split
        self.coco_dir, self.mask_images, self.mask_labels = (
            out / "images" / split, out / split / "images", out / split / "labels")
        for d in (self.coco_dir, self.mask_images, self.mask_labels, out / "annotations"):
            d.mkdir(parents=True, exist_ok=True)
        self.images: list[dict[str, Any]] = []
        self.anns: list[dict[str, Any]] = []
        self.rows: list[list[Any]] = []

    def add(self, name: str, scene: PasteScene) -> None:
        """Write the image, its label PNG and its annotations."""
        image_path = self.coco_dir / name
        Image.fromarray(scene.image).save(image_path)
        _link_or_copy(image_path, self.mask_images / name)
        semantic = np.zeros(scene.image.shape[:2], dtype=np.uint8)
        for m, label in zip(scene.masks, scene.labels):
            semantic[m] = label + 1
        Image.fromarray(semantic).save(self.mask_labels / name)
        image_id = len(self.images) + 1
        h, w = semantic.shape
        self.images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for m, label in zip(scene.masks, scene.labels):
            self.anns.append(_coco_ann(m, label=label, ann_id=len(self.anns) + 1, image_id=image_id))
        present = set(scene.labels)
        self.rows.append([f"images/{self.split}/{name}", *(int(c in present) for c in range(len(FMNIST_CLASSES)))])

    def close(self) -> dict[str, Any]:
        """Write the json and csv files; return this split's summary."""
        coco_path = self.out / "annotations" / f"instances_{self.split}.json"
        categories = [{"id": i + 1, "name": n, "supercategory": "fashion"} for i, n in enumerate(FMNIST_CLASSES)]
        coco_path.write_text(json.dumps({"images": self.images, "annotations": self.anns, "categories": categories}))
        csv_path = self.out / f"multilabel_{self.split}.csv"
        with csv_path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", *FMNIST_CLASSES])
            writer.writerows(self.rows)
        per_class = np.bincount([a["category_id"] - 1 for a in self.anns], minlength=len(FMNIST_CLASSES))
        return {"images": len(self.images), "objects": len(self.anns), "per_class": per_class.tolist(),
                "coco": str(coco_path), "masks": str(self.out / self.split), "csv": str(csv_path)}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _coco_ann(mask: np.ndarray, *, label: int, ann_id: int, image_id: int) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x0, y0, x1, y1 = mask_box(mask)  # type: ignore[misc]  # visible masks are never empty
    return {"id": ann_id, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}


# ----------------------------------------------------------------------------- entry points


def _check_args(*, num_train: int, num_val: int, size: int, max_objects: int, seed: int) -> None:
    checks = {"num_train": (num_train, 1), "num_val": (num_val, 1), "size": (size, 32),
              "max_objects": (max_objects, 1), "seed": (seed, 0)}
    for key, (value, lo) in checks.items():
        if value < lo:
            raise DataError(f"{key} must be >= {lo}, got {value}")
    if max_objects > 16:
        raise DataError(f"max_objects must be <= 16, got {max_objects}")


def build_paste_dataset(*, fmnist_root: Path, out: Path, num_train: int, num_val: int, size: int,
                        max_objects: int, seed: int, backgrounds: Path | None) -> dict[str, Any]:
    """Write a pasted Fashion-MNIST dataset under ``out`` (layout in the module docstring)."""
    _check_args(num_train=num_train, num_val=num_val, size=size, max_objects=max_objects, seed=seed)
    if out.exists() and not out.is_dir():
        raise DataError(f"output path exists and is not a folder: {out}")
    bgs = Backgrounds(backgrounds, size=size)
    summary: dict[str, Any] = {"out": str(out), "size": size, "classes": list(FMNIST_CLASSES), "splits": {}}
    for split, count in (("train", num_train), ("val", num_val)):
        items, labels = load_fashion_mnist(fmnist_root, split=split)  # type: ignore[arg-type]
        writer = SplitWriter(out, split=split)  # type: ignore[arg-type]
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLIT_SALT[split], i])
            writer.add(f"{i:06d}.png", paste_scene(rng, items=items, labels=labels, size=size,
                                                   max_objects=max_objects, backgrounds=bgs))
        summary["splits"][split] = writer.close()
    (out / "classes.txt").write_text("\n".join(["background", *FMNIST_CLASSES]) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _default_fmnist() -> Path | None:
    root = os.environ.get("GPPF_DATA")
    return Path(root) / "fashion-mnist" if root else None


def main_paste(argv: list[str]) -> int:
    """``gppf data paste``: parse ``argv``, build the dataset, print the summary as JSON."""
    parser = argparse.ArgumentParser(
        prog="gppf data paste",
        description="Paste Fashion-MNIST items onto backgrounds; write COCO json, mask PNGs and a multilabel CSV.",
    )
    default = _default_fmnist()
    parser.add_argument("--fmnist", type=Path, default=default, required=default is None,
                        help="folder with the Fashion-MNIST IDX .gz files (default: $GPPF_DATA/fashion-mnist)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=2000, help="train images (default 2000)")
    parser.add_argument("--num-val", type=int, default=400, help="val images (default 400)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    parser.add_argument("--max-objects", type=int, default=4, help="items per image, 1..N (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backgrounds", type=Path, default=None,
                        help="folder of background images (default: procedural backgrounds)")
    args = parser.parse_args(argv)
    try:
        summary = build_paste_dataset(
            fmnist_root=args.fmnist, out=args.out, num_train=args.num_train, num_val=args.num_val,
            size=args.size, max_objects=args.max_objects, seed=args.seed, backgrounds=args.backgrounds,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "classes"}, indent=2))
    return 0
