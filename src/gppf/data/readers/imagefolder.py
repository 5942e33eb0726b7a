"""``imagefolder`` reader: ``<root>/<split>/<class>/*`` for classification and re-identification."""
from __future__ import annotations

from pathlib import Path
from typing import Any

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
from gppf.data.readers.images import IMAGE_EXTENSIONS, image_size, load_rgb

FORMAT = "imagefolder"
TASK_TYPES = ("classification", "reid")


class ImageFolderDataset(ReaderDataset):
    """Images labelled by their class (or identity) folder; ``labels[i]`` is sample ``i``'s label."""

    def __init__(
        self, *, samples: list[tuple[Path, int]], classes: list[str], policy: OnBad, where: str, task_type: str
    ) -> None:
        super().__init__(classes=classes, policy=policy, where=where, task_type=task_type)
        self.files = [p for p, _ in samples]
        self.labels = [y for _, y in samples]
        self.key = "identity" if task_type == "reid" else "label"

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image = load_rgb(self.files[index])
        h, w = image.shape[-2:]
        return image, {self.key: self.labels[index], "image_id": index, "orig_size": (int(h), int(w))}

    def target(self, index: int) -> dict[str, Any]:
        """Target of sample ``index`` from the image header only (falls back to a full load on errors)."""
        try:
            h, w = image_size(self.files[index])
        except DataError:
            return self[index][1]
        return {self.key: self.labels[index], "image_id": index, "orig_size": (h, w)}

    def annotation_counts(self) -> dict[str, int]:
        return {"labels": len(self.labels)}


def _scan(folder: Path, *, extensions: tuple[str, ...]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Images per class sub-folder (searched recursively), plus image files lying directly in ``folder``."""
    groups: dict[str, list[Path]] = {}
    stray: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            groups[entry.name] = sorted(
                p for p in entry.rglob("*")
                if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file()
            )
        elif entry.suffix.lower() in extensions:
            stray.append(entry)
    return groups, stray


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _classes(cfg: DataConfig, *, root: Path, split: str, groups: dict[str, list[Path]], folder: Path) -> list[str]:
    """Class list shared by both splits: ``cfg.classes`` or the train split's class folders."""
    train_dir = root / cfg.train
    if cfg.classes is not None:
        classes, origin = list(cfg.classes), "data.classes"
    elif split == "val" and train_dir.is_dir():
        classes, origin = _class_folders(train_dir), f"the class folders of {train_dir}"
    else:
        classes, origin = sorted(groups), "the class folders"
    for name in groups:
        if name not in classes:
            raise DataError(f"class folder {folder / name} is not in {origin} ({len(classes)} classes)")
    return classes


def _check_disjoint(*, train_dir: Path, val_dir: Path, val_ids: list[str]) -> None:
    """Re-identification: val identities must not occur in train."""
    if not train_dir.is_dir():
        return
    overlap = sorted(set(val_ids) & set(_class_folders(train_dir)))
    if overlap:
        shown = ", ".join(overlap[:5]) + (" ..." if len(overlap) > 5 else "")
        raise DataError(
            f"reid identities overlap between {train_dir} and {val_dir}: {len(overlap)} shared ({shown})"
        )


def build(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: OnBad) -> ImageFolderDataset:
    """Build the ``imagefolder`` dataset of ``split`` (see docs/data-formats.md)."""
    opts = check_options(cfg, allowed={"extensions": list}, reader=FORMAT)
    require_task(reader=FORMAT, task_type=task_type, supported=TASK_TYPES)
    root = root_dir(cfg)
    folder = require_dir(root / split_name(cfg, split), what=f"{split} split folder")
    if not all(isinstance(e, str) and e.strip(".") for e in opts.get("extensions", [])):
        raise DataError(f"data.options.extensions: expected file extensions like ['.jpg'], got {opts['extensions']!r}")
    extensions = tuple(f".{e.lower().lstrip('.')}" for e in opts.get("extensions", []))
    groups, stray = _scan(folder, extensions=extensions or IMAGE_EXTENSIONS)
    if not any(groups.values()):
        raise DataError(f"empty split folder {folder}: no images in class sub-folders")
    if task_type == "reid":
        classes = sorted(groups)
        if split == "val":
            _check_disjoint(train_dir=root / cfg.train, val_dir=folder, val_ids=classes)
    else:
        classes = _classes(cfg, root=root, split=split, groups=groups, folder=folder)
    index = {name: i for i, name in enumerate(classes)}
    samples = [(p, index[name]) for name, paths in groups.items() for p in paths]
    ds = ImageFolderDataset(
        samples=samples, classes=classes, policy=on_bad_sample, where=str(folder), task_type=task_type
    )
    for path in stray:
        ds.drop(SampleError(f"image {path} is not inside a class folder", kind="stray_image"))
    return ds
