"""``mask_png`` reader: ``<root>/<split>/images/*`` paired by stem with ``<root>/<split>/labels/*.png``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from gppf.config import DataConfig
from gppf.data.base import DataError, OnBad
from gppf.data.readers.common import (
    ReaderDataset,
    SampleError,
    check_options,
    require_dir,
    require_task,
    root_dir,
    split_name,
)
from gppf.data.readers.images import list_images, load_label_map, load_rgb
from gppf.data.readers.targets import IGNORE

FORMAT = "mask_png"


class MaskPngDataset(ReaderDataset):
    """Image + class-id PNG pairs; ids are remapped through ``lut`` (ignored ids -> 255)."""

    def __init__(
        self, *, pairs: list[tuple[Path, Path]], classes: list[str], lut: np.ndarray, num_ids: int,
        policy: OnBad, where: str,
    ) -> None:
        super().__init__(classes=classes, policy=policy, where=where, task_type="segmentation")
        self.pairs = pairs
        self.lut = lut
        self.num_ids = num_ids

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_path, label_path = self.pairs[index]
        image = load_rgb(image_path)
        ids = load_label_map(label_path)
        h, w = image.shape[-2:]
        if ids.shape != (h, w):
            raise SampleError(
                f"label {label_path} is {ids.shape[1]}x{ids.shape[0]} but image {image_path} is {w}x{h}",
                kind="size_mismatch",
            )
        mapped = self.lut[ids]
        if (mapped < 0).any():
            bad = sorted(int(v) for v in np.unique(ids[mapped < 0]))
            raise SampleError(
                f"label {label_path} has class ids {bad} outside 0..{self.num_ids - 1} (and not ignored)",
                kind="label_out_of_range",
            )
        mask = tv_tensors.Mask(torch.from_numpy(mapped.astype(np.int64)))
        return image, {"mask": mask, "image_id": index, "orig_size": (int(h), int(w))}

    def annotation_counts(self) -> dict[str, int]:
        return {"masks": len(self.pairs)}


def _class_names(cfg: DataConfig, root: Path) -> list[str]:
    if cfg.classes is not None:
        return list(cfg.classes)
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"mask_png needs class names: set data.classes or provide {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"class list {path} is empty")
    return names


def _ignore_ids(value: Any) -> set[int]:
    ids = value if isinstance(value, list) else [value]
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= IGNORE:
            raise DataError(f"data.options.ignore_index: {v!r} is not a class id in 0..255")
    return {int(v) for v in ids}


def _lut(*, num_ids: int, ignore: set[int]) -> tuple[np.ndarray, list[int]]:
    """Id -> contiguous class (``-1`` = out of range); ignored ids and 255 -> 255."""
    lut = np.full(256, -1, dtype=np.int64)
    kept = [i for i in range(num_ids) if i not in ignore]
    lut[kept] = np.arange(len(kept))
    lut[sorted(ignore | {IGNORE})] = IGNORE
    return lut, kept


def _pair(images: list[Path], labels_dir: Path, ds: MaskPngDataset) -> list[tuple[Path, Path]]:
    """Pair images with ``<stem>.png`` labels; unmatched files are bad samples."""
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() == ".png"}
    pairs, seen = [], set()
    for img in images:
        if img.stem in seen:
            raise DataError(f"two images share the stem '{img.stem}' in {img.parent}")
        seen.add(img.stem)
        if img.stem in labels:
            pairs.append((img, labels[img.stem]))
        else:
            ds.drop(SampleError(f"no label {labels_dir / (img.stem + '.png')} for image {img}", kind="missing_label"))
    for stem in sorted(set(labels) - seen):
        ds.drop(SampleError(f"label {labels[stem]} has no image in {images[0].parent}", kind="orphan_label"))
    return pairs


def build(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: OnBad) -> MaskPngDataset:
    """Build the ``mask_png`` dataset of ``split`` (see docs/data-formats.md)."""
    opts = check_options(cfg, allowed={"ignore_index": (int, list)}, reader=FORMAT)
    require_task(reader=FORMAT, task_type=task_type, supported=("segmentation",))
    root = root_dir(cfg)
    folder = require_dir(root / split_name(cfg, split), what=f"{split} split folder")
    images_dir = require_dir(folder / "images", what="image folder")
    labels_dir = require_dir(folder / "labels", what="label folder")
    names = _class_names(cfg, root)
    ignore = _ignore_ids(opts.get("ignore_index", []))
    lut, kept = _lut(num_ids=len(names), ignore=ignore)
    images = list_images(images_dir)
    if not images:
        raise DataError(f"empty split folder {images_dir}: no images")
    ds = MaskPngDataset(
        pairs=[], classes=[names[i] for i in kept], lut=lut, num_ids=len(names),
        policy=on_bad_sample, where=str(folder),
    )
    ds.pairs = _pair(images, labels_dir, ds)
    if not ds.pairs:
        raise DataError(f"no usable image/label pairs in {folder}")
    ds.ignored_classes = [names[i] for i in sorted(ignore) if i < len(names)]
    return ds
