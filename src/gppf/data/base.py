"""Shared data plumbing: the reader interface, data errors and bad-sample accounting.

Readers are registered in ``gppf.registry.READERS`` (re-exported here).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Literal

from torch.utils.data import Dataset

from gppf import registry
from gppf.registry import Registry

OnBad = Literal["error", "skip"]


class DataError(ValueError):
    """A problem with input data; the message names the file (and line / annotation id)."""


class BadSamples:
    """Counts problems found in a split; raises at once when the policy is ``error``."""

    def __init__(self, *, policy: OnBad = "error", where: str = "") -> None:
        self.policy = policy
        self.where = where
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def report(self, kind: str, message: str) -> None:
        """Record a bad sample of ``kind``; raise ``DataError(message)`` unless skipping."""
        if self.policy == "error":
            raise DataError(message)
        self.counts[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"skipped": self.total, "by_kind": dict(self.counts), "examples": list(self.examples)}


class SampleDataset(Dataset):
    """Base for readers: items are ``(tv_tensors.Image uint8 [3,H,W], target dict)``.

    Subclasses set ``classes`` (list of class names, may be empty for reid identities), ``bad``
    (a ``BadSamples``) and implement ``__len__`` / ``__getitem__``.
    """

    classes: list[str]
    bad: BadSamples

    @property
    def num_classes(self) -> int:
        return len(self.classes)


ReaderFn = Callable[..., SampleDataset]
"""``reader(data_cfg, *, split, task_type, on_bad_sample) -> SampleDataset``; registered in ``READERS``."""
READERS: Registry[ReaderFn] = registry.READERS

__all__ = ["READERS", "BadSamples", "DataError", "OnBad", "ReaderFn", "SampleDataset"]
