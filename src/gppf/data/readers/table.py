"""``table`` reader: a CSV or JSON label table plus an image folder (multilabel, classification)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
from gppf.data.readers.images import image_size, load_rgb

FORMAT = "table"
TASK_TYPES = ("multilabel", "classification")


@dataclass
class Row:
    """One raw table row: ``names`` (label-name form) or ``values`` (one 0/1/-1 cell per class column)."""

    where: str
    image: str
    names: list[str] | None = None
    values: list[str] | None = None


class TableDataset(ReaderDataset):
    """Images with label vectors (``multilabel``) or single labels (``classification``)."""

    def __init__(self, *, classes: list[str], policy: OnBad, where: str, task_type: str) -> None:
        super().__init__(classes=classes, policy=policy, where=where, task_type=task_type)
        self.files: list[Path] = []
        self.targets: list[torch.Tensor | int] = []

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image = load_rgb(self.files[index])
        h, w = image.shape[-2:]
        return image, self._target(index, h=int(h), w=int(w))

    def _target(self, index: int, *, h: int, w: int) -> dict[str, Any]:
        y = self.targets[index]
        target = {"labels": y.clone()} if isinstance(y, torch.Tensor) else {"label": y}
        return {**target, "image_id": index, "orig_size": (h, w)}

    def target(self, index: int) -> dict[str, Any]:
        """Target of sample ``index`` from the image header only (falls back to a full load on errors)."""
        try:
            h, w = image_size(self.files[index])
        except DataError:
            return self[index][1]
        return self._target(index, h=h, w=w)

    def annotation_counts(self) -> dict[str, int]:
        if self.task_type == "classification":
            return {"labels": len(self.targets)}
        return {"positive_labels": int(sum(int((t == 1).sum()) for t in self.targets))}


def _read_csv(path: Path, ds: TableDataset) -> tuple[list[str] | None, list[Row]]:
    """Rows of a CSV table; returns the class columns (``None`` for the ``labels`` column form)."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = [c.strip() for c in next(reader, [])]
        if not header or header[0] != "image" or len(header) < 2:
            raise DataError(f"{path}:1: header must be 'image,<label columns...>' or 'image,labels'")
        columns = None if header[1:] == ["labels"] else header[1:]
        rows = []
        for cells in reader:
            where = f"{path}:{reader.line_num}"
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header) or not cells[0].strip():
                ds.drop(SampleError(f"{where}: malformed row: expected {len(header)} fields, got {len(cells)}",
                                    kind="malformed_row"))
                continue
            image = cells[0].strip()
            if columns is None:
                rows.append(Row(where, image, names=[n.strip() for n in cells[1].split(";") if n.strip()]))
            else:
                rows.append(Row(where, image, values=[c.strip() for c in cells[1:]]))
    return columns, rows


def _read_json(path: Path, ds: TableDataset) -> list[Row]:
    """Rows of a JSON table: a list of ``{"image": str, "labels": [names]}``."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a list of {{'image': ..., 'labels': [...]}} entries")
    rows = []
    for i, entry in enumerate(data):
        where = f"{path} entry {i}"
        ok = isinstance(entry, dict) and isinstance(entry.get("image"), str) and entry["image"]
        labels = entry.get("labels") if isinstance(entry, dict) else None
        if not ok or not isinstance(labels, list) or not all(isinstance(n, str) for n in labels):
            ds.drop(SampleError(f"{where}: malformed entry: need 'image' (str) and 'labels' (list of names)",
                                kind="malformed_row"))
            continue
        rows.append(Row(where, entry["image"], names=list(labels)))
    return rows


def _read(path: Path, ds: TableDataset) -> tuple[list[str] | None, list[Row]]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise DataError(f"label table {path}: unsupported extension (use .csv or .json)")
    try:
        return _read_csv(path, ds) if suffix == ".csv" else (None, _read_json(path, ds))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read label table {path}: {exc}") from exc


def _vector(row: Row, *, classes: list[str]) -> torch.Tensor:
    """Label vector of ``row``; raises ``SampleError`` naming the row."""
    y = torch.zeros(len(classes), dtype=torch.float32)
    if row.names is not None:
        for name in row.names:
            if name not in classes:
                raise SampleError(f"{row.where}: unknown label name '{name}'", kind="unknown_label")
            y[classes.index(name)] = 1.0
        return y
    for i, (col, cell) in enumerate(zip(classes, row.values or [])):
        if cell not in ("0", "1", "-1", "0.0", "1.0", "-1.0"):
            raise SampleError(f"{row.where}: column '{col}' has {cell!r}; expected 0, 1 or -1",
                              kind="malformed_row")
        y[i] = float(cell)
    return y


def _classes(cfg: DataConfig, *, root: Path, split: str, columns: list[str] | None, rows: list[Row]) -> list[str]:
    """``cfg.classes``, the CSV class columns, or the sorted label names of the train table."""
    if columns is not None:
        if cfg.classes is not None and sorted(cfg.classes) != sorted(columns):
            raise DataError(f"data.classes {cfg.classes} do not match the table columns {columns}")
        return list(cfg.classes) if cfg.classes is not None else columns
    if cfg.classes is not None:
        return list(cfg.classes)
    train = root / cfg.train
    if split == "val" and train.is_file():
        probe = TableDataset(classes=[], policy="skip", where=str(train), task_type="multilabel")
        rows = _read(train, probe)[1]
    return sorted({n for r in rows for n in (r.names or [])})


def _target(row: Row, *, classes: list[str], task_type: str) -> torch.Tensor | int:
    y = _vector(row, classes=classes)
    if task_type == "multilabel":
        return y
    if (y < 0).any() or int((y == 1).sum()) != 1:
        raise SampleError(f"{row.where}: classification needs exactly one positive label", kind="malformed_row")
    return int(y.argmax())


def build(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: OnBad) -> TableDataset:
    """Build the ``table`` dataset of ``split`` (see docs/data-formats.md)."""
    opts = check_options(cfg, allowed={"images": (str, dict)}, reader=FORMAT)
    require_task(reader=FORMAT, task_type=task_type, supported=TASK_TYPES)
    root = root_dir(cfg)
    path = require_file(root / split_name(cfg, split), what=f"{split} label table")
    image_dir = require_dir(root / str(per_split(opts.get("images", ""), split=split, key="images")),
                            what="image folder")
    ds = TableDataset(classes=[], policy=on_bad_sample, where=str(path), task_type=task_type)
    columns, rows = _read(path, ds)
    ds.classes = _classes(cfg, root=root, split=split, columns=columns, rows=rows)
    if columns is not None and cfg.classes is not None:
        order = [columns.index(c) for c in ds.classes]
        for row in rows:
            row.values = [row.values[i] for i in order] if row.values else row.values
    seen: set[str] = set()
    for row in rows:
        try:
            if row.image in seen:
                raise SampleError(f"{row.where}: duplicate image '{row.image}'", kind="malformed_row")
            image = image_dir / row.image
            if not image.is_file():
                raise SampleError(f"{row.where}: image file not found: {image}", kind="missing_image")
            target = _target(row, classes=ds.classes, task_type=task_type)
        except SampleError as exc:
            ds.drop(exc)
            continue
        seen.add(row.image)
        ds.files.append(image)
        ds.targets.append(target)
    if not ds.files:
        raise DataError(f"label table {path} has no usable rows")
    return ds
