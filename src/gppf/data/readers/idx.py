"""``idx`` reader: MNIST-style IDX files ``<root>/<split>-{images-idx3,labels-idx1}-ubyte[.gz]``."""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from gppf.config import DataConfig
from gppf.data.base import DataError, OnBad
from gppf.data.readers.common import ReaderDataset, SampleError, check_options, require_task, root_dir, split_name

FORMAT = "idx"
IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}


class IdxDataset(ReaderDataset):
    """Grey images held in memory (uint8 ``[N, H, W]``), returned as 3-channel RGB."""

    def __init__(
        self, *, images: np.ndarray, labels: np.ndarray, keep: np.ndarray, classes: list[str],
        policy: OnBad, where: str,
    ) -> None:
        super().__init__(classes=classes, policy=policy, where=where, task_type="classification")
        self.images = images
        self.labels = labels
        self.keep = keep  # indices into the files of the items that passed validation

    def __len__(self) -> int:
        return len(self.keep)

    def _load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        j = int(self.keep[index])
        grey = torch.from_numpy(self.images[j])
        h, w = grey.shape
        image = tv_tensors.Image(grey.unsqueeze(0).expand(3, h, w).contiguous())
        return image, {"label": int(self.labels[j]), "image_id": j, "orig_size": (int(h), int(w))}

    def target(self, index: int) -> dict[str, Any]:
        """Target of sample ``index`` without building the image."""
        j = int(self.keep[index])
        h, w = self.images.shape[1:]
        return {"label": int(self.labels[j]), "image_id": j, "orig_size": (int(h), int(w))}

    def annotation_counts(self) -> dict[str, int]:
        return {"labels": len(self.keep)}


def _find(root: Path, name: str) -> Path:
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return path
    raise DataError(f"IDX file not found: {root / name}[.gz]")


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """Read an IDX file, validating its magic number, dimensions and size."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(data)} bytes, no header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"IDX file {path}: bad magic number 0x{found:08x} (expected 0x{magic:08x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise DataError(
            f"IDX file {path}: header dims {list(dims)} need {expected} bytes of data, found {len(data) - header}"
        )
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(dims)


def _classes(cfg: DataConfig, names: str | None) -> list[str]:
    if cfg.classes is not None:
        return list(cfg.classes)
    if names is None:
        return NAMES["mnist"]
    if names not in NAMES:
        raise DataError(f"data.options.names: unknown class list '{names}' (known: {', '.join(NAMES)})")
    return NAMES[names]


def build(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: OnBad) -> IdxDataset:
    """Build the ``idx`` dataset of ``split`` (see docs/data-formats.md)."""
    opts = check_options(cfg, allowed={"names": str}, reader=FORMAT)
    require_task(reader=FORMAT, task_type=task_type, supported=("classification",))
    root = root_dir(cfg)
    name = split_name(cfg, split)
    images_path = _find(root, f"{name}-images-idx3-ubyte")
    labels_path = _find(root, f"{name}-labels-idx1-ubyte")
    images = read_idx(images_path, magic=IMAGES_MAGIC)
    labels = read_idx(labels_path, magic=LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"IDX count mismatch: {images_path} has {len(images)} images, {labels_path} has {len(labels)} labels"
        )
    if len(images) == 0:
        raise DataError(f"IDX file {images_path} holds no images")
    classes = _classes(cfg, opts.get("names"))
    valid = labels < len(classes)
    ds = IdxDataset(
        images=images, labels=labels, keep=np.flatnonzero(valid), classes=classes,
        policy=on_bad_sample, where=str(images_path),
    )
    for i in np.flatnonzero(~valid):
        message = f"{labels_path}: item {i} has label {labels[i]} >= {len(classes)} classes"
        ds.drop(SampleError(message, kind="bad_label"))
    if len(ds) == 0:
        raise DataError(f"no valid items in {images_path}")
    return ds
