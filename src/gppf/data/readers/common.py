"""Machinery shared by the readers: option checks, split paths and the bad-sample policy."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping

from gppf.config import DataConfig
from gppf.data.base import BadSamples, DataError, OnBad, SampleDataset


SKIPPED_KEY = "bad_skipped"  # target key: indices skipped to produce this sample


class SampleError(DataError):
    """A problem with one sample or annotation; ``kind`` labels it in the bad-sample counts.

    Constructible from the message alone, so that it survives pickling and DataLoader worker re-raising.
    """

    def __init__(self, message: str, *, kind: str = "bad_sample") -> None:
        super().__init__(message)
        self.kind = kind


def check_options(
    cfg: DataConfig, *, allowed: Mapping[str, type | tuple[type, ...]], reader: str
) -> dict[str, Any]:
    """Return ``cfg.options`` after rejecting unknown keys and values of the wrong type."""
    for key, value in cfg.options.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(sorted(allowed)) or "none"
            raise DataError(f"data.options.{key}: unknown option for format '{reader}'{hint} (known: {known})")
        if not isinstance(value, allowed[key]) or isinstance(value, bool) and allowed[key] is not bool:
            raise DataError(f"data.options.{key}: invalid value {value!r} for format '{reader}'")
    return dict(cfg.options)


def require_task(*, reader: str, task_type: str, supported: tuple[str, ...]) -> None:
    """Raise ``DataError`` unless the reader can produce targets for ``task_type``."""
    if task_type not in supported:
        raise DataError(
            f"format '{reader}' does not support task type '{task_type}' (supports: {', '.join(supported)})"
        )


def split_name(cfg: DataConfig, split: str) -> str:
    """The on-disk name of ``split`` (``cfg.train`` or ``cfg.val``)."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    return cfg.train if split == "train" else cfg.val


def root_dir(cfg: DataConfig) -> Path:
    """``cfg.root`` as a path (relative paths resolve against the working directory)."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    return root


def require_dir(path: Path, *, what: str) -> Path:
    """Raise ``DataError`` naming ``path`` unless it is a directory."""
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


def require_file(path: Path, *, what: str) -> Path:
    """Raise ``DataError`` naming ``path`` unless it is a file."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def per_split(value: Any, *, split: str, key: str) -> Any:
    """An option that is either one value or a ``{train: ..., val: ...}`` mapping."""
    if isinstance(value, Mapping):
        if split not in value:
            raise DataError(f"data.options.{key}: mapping has no entry for split '{split}'")
        return value[split]
    return value


def names_from_yaml(value: Any, *, source: str) -> list[str]:
    """Class names from a ``names:`` list or ``{index: name}`` mapping with indices 0..C-1."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, Mapping):
        keys = sorted(value)
        if keys != list(range(len(keys))):
            raise DataError(f"{source}: 'names' indices must be 0..{len(keys) - 1}, got {keys}")
        return [str(value[k]) for k in keys]
    raise DataError(f"{source}: 'names' must be a list or an index -> name mapping")


class ReaderDataset(SampleDataset):
    """Base of all readers: lazy ``_load`` plus the bad-sample policy in ``__getitem__``.

    A sample whose ``_load`` raises ``DataError`` is re-raised under policy ``error``; under ``skip``
    it is counted once in ``bad`` and the next index (cyclically) is returned instead.
    """

    def __init__(self, *, classes: list[str], policy: OnBad, where: str, task_type: str) -> None:
        self.classes = list(classes)
        self.bad = BadSamples(policy=policy, where=where)
        self.where = where
        self.task_type = task_type
        self._failed: set[int] = set()

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def drop(self, exc: SampleError) -> None:
        """Construction-time problem: raise under ``error``, count under ``skip``."""
        self.bad.report(exc.kind, str(exc))

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples in {self.where}")
        index %= n
        skipped: list[int] = []
        for step in range(n):
            j = (index + step) % n
            try:
                image, target = self._load(j)
            except DataError as exc:
                if self.bad.policy == "error":
                    raise
                skipped.append(j)
                if j not in self._failed:
                    self._failed.add(j)
                    self.bad.report(getattr(exc, "kind", "bad_sample"), str(exc))
                continue
            if skipped:  # lets a training stream count skips made inside DataLoader workers
                target = {**target, SKIPPED_KEY: skipped}
            return image, target
        raise DataError(f"{self.where}: none of the {n} samples could be loaded")

    @property
    def num_images(self) -> int:
        """Distinct images (differs from ``len`` for top-down keypoint datasets)."""
        return len(self)

    def annotation_counts(self) -> dict[str, int]:
        """Annotation totals from the index (no decoding), e.g. ``{"boxes": 12}``."""
        return {}
