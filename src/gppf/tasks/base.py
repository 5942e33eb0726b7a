"""Task framework: ``TaskType`` (what a task-type file registers), ``Task`` (a built task), ``build_task``.

A task type is one file in ``gppf/tasks/`` that builds a ``TaskType`` and adds it to ``TASK_TYPES``
(see ``docs/tasks.md``). ``build_task`` turns a ``TaskConfig`` into datasets + head + metric; it never
imports backbones: heads only get ``feature_channels`` (channels of the stride 4/8/16/32 pyramid) and
``pooled_dim``.

Contracts used by the task types:

* head: ``nn.Module`` with ``forward(feats) -> outputs`` (``feats.pyramid`` list of ``[B, C_l, H_l, W_l]``,
  ``feats.pooled`` ``[B, D]``; return type independent of ``training``), ``loss(outputs, batch) -> Tensor``
  scalar and ``predict(outputs, batch) -> preds`` (consumed by the metric).
* metric: ``update(preds, batch)``, ``compute() -> dict[str, float]`` (all values in ``[0, 1]``),
  ``reset()``.
* datasets: readers come from ``READERS.get(cfg.data.format)(cfg.data, split=..., task_type=...,
  on_bad_sample=...)``; a reader may offer ``target(i) -> dict`` for cheap target-only access (used by
  ``iter_targets``, e.g. for chance levels), otherwise ``dataset[i][1]`` is used.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from torch import nn
from torch.utils.data import Dataset

from gppf.config import ConfigError, TaskConfig
from gppf.data.base import READERS, SampleDataset
from gppf.data.collate import Batch, collate_batch
from gppf.registry import Registry

__all__ = [
    "Batch",
    "Metric",
    "TaskType",
    "TASK_TYPES",
    "Task",
    "TransformedDataset",
    "build_task",
    "head_options",
    "iter_targets",
    "collate_batch",
]


class Metric(Protocol):
    """Accumulates predictions over a split; ``compute`` returns the task type's stable keys."""

    def update(self, preds: Any, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class TaskType:
    """What one task-type file registers in ``TASK_TYPES``.

    * ``build_head(cfg, *, feature_channels, pooled_dim, num_classes, dataset) -> nn.Module``
      (``dataset``: the raw train split).
    * ``train_transform(cfg)`` / ``val_transform(cfg)`` -> callable ``tf(image, target) -> (image, target)``
      (transforms v2; ``build_task`` uses ``val_transform`` for training when ``cfg.augment`` is false).
    * ``collate(samples) -> Batch``.
    * ``new_metric(cfg, *, dataset, num_classes) -> Metric`` (``dataset``: the raw val split).
    * ``chance(*, num_classes, dataset) -> dict`` chance level of each metric key on the raw val split.
    * ``primary_metric``: the key used for model selection (higher is better).
    * ``count_classes(dataset) -> int`` (optional): number of classes of the raw train split;
      default ``dataset.num_classes``.
    * ``train_batch_sampler(cfg, *, dataset, batch_size, seed) -> Iterable[list[int]]`` (optional): batch
      sampler for training (e.g. P x K identity sampling for reid); ``None`` = plain random batches.
    """

    name: str
    build_head: Callable[..., nn.Module]
    train_transform: Callable[[TaskConfig], Callable]
    val_transform: Callable[[TaskConfig], Callable]
    collate: Callable[[list], Batch]
    new_metric: Callable[..., Metric]
    chance: Callable[..., dict[str, float]]
    primary_metric: str
    count_classes: Callable[[Dataset], int] | None = None
    train_batch_sampler: Callable[..., Iterable[list[int]]] | None = None


TASK_TYPES: Registry[TaskType] = Registry("task type")


class TransformedDataset(Dataset):
    """A reader split seen through a transform (and optionally an index subset).

    Items are ``transform(image, target)``; ``target(i)`` returns the raw (untransformed) target;
    ``classes`` / ``num_classes`` / ``bad`` forward to the reader.
    """

    def __init__(
        self, base: Dataset, *, transform: Callable | None, indices: Sequence[int] | None = None
    ) -> None:
        self.base = base
        self.transform = transform
        self.indices = list(indices) if indices is not None else None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def _base_index(self, i: int) -> int:
        return self.indices[i] if self.indices is not None else i

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.base[self._base_index(i)]
        if self.transform is None:
            return image, target
        return self.transform(image, dict(target))

    def target(self, i: int) -> dict[str, Any]:
        """The raw target of item ``i`` (cheap when the reader offers ``target``)."""
        return _raw_target(self.base, self._base_index(i))

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.base, "classes", []))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def bad(self) -> Any:
        return getattr(self.base, "bad", None)


def _raw_target(dataset: Dataset, i: int) -> dict[str, Any]:
    getter = getattr(dataset, "target", None)
    if callable(getter):
        return getter(i)
    return dataset[i][1]


def iter_targets(dataset: Dataset) -> Iterator[dict[str, Any]]:
    """Yield every target of ``dataset`` in order (``dataset.target(i)`` when offered)."""
    for i in range(len(dataset)):  # type: ignore[arg-type]
        yield _raw_target(dataset, i)


def head_options(cfg: TaskConfig, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg.head`` merged over ``defaults``; unknown keys or wrong types raise ``ConfigError``."""
    out = dict(defaults)
    for key, value in cfg.head.items():
        where = f"tasks.{cfg.name or cfg.type}.head.{key}"
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"unknown head option '{where}' for task type '{cfg.type}'{hint} (known: {known})")
        out[key] = _coerce_option(value, defaults[key], where)
    return out


def _coerce_option(value: Any, default: Any, where: str) -> Any:
    if default is None:
        return value
    if value is None:
        raise ConfigError(f"{where}: null is not allowed (default {default!r})")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(default, float):
            return float(value)
        if not float(value).is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


class Task:
    """A built task: config, type, head, transformed train/val splits and metric factory."""

    def __init__(
        self,
        *,
        cfg: TaskConfig,
        type: TaskType,
        head: nn.Module,
        train_set: TransformedDataset,
        val_set: TransformedDataset,
        num_classes: int,
    ) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.type = type
        self.head = head
        self.train_set = train_set
        self.val_set = val_set
        self.num_classes = num_classes
        self._chance: dict[str, float] | None = None

    @property
    def collate(self) -> Callable[[list], Batch]:
        """The task type's collate function (a plain module-level function: picklable)."""
        return self.type.collate

    @property
    def primary_metric(self) -> str:
        return self.type.primary_metric

    def new_metric(self) -> Metric:
        """A fresh metric for the val split."""
        return self.type.new_metric(self.cfg, dataset=self.val_set, num_classes=self.num_classes)

    def chance(self) -> dict[str, float]:
        """Chance level of each metric key on the val split (computed once, from raw targets)."""
        if self._chance is None:
            self._chance = self.type.chance(num_classes=self.num_classes, dataset=self.val_set)
        return dict(self._chance)

    def batch_sampler(self, *, batch_size: int, seed: int) -> Iterable[list[int]] | None:
        """The task type's training batch sampler, or ``None`` for plain random batches."""
        if self.type.train_batch_sampler is None:
            return None
        return self.type.train_batch_sampler(
            self.cfg, dataset=self.train_set, batch_size=batch_size, seed=seed
        )

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, type={self.type.name!r}, num_classes={self.num_classes}, "
            f"train={len(self.train_set)}, val={len(self.val_set)})"
        )


def _load_builtin_readers() -> None:
    """Import the reader modules so that their ``READERS`` registrations exist."""
    for module in ("gppf.data.readers", "gppf.data.synthetic"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def _val_indices(n: int, limit: int | None) -> list[int] | None:
    """Evenly spaced deterministic subset of ``n`` items (``None`` = all)."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ConfigError(f"max_val_samples must be >= 1, got {limit}")
    return [(i * n) // limit for i in range(limit)]


def build_task(cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int) -> Task:
    """Build readers, transformed datasets, head and metric factory for one ``TaskConfig``."""
    import gppf.tasks  # noqa: F401  (registers the built-in task types)

    task_type = TASK_TYPES.get(cfg.type)
    _load_builtin_readers()
    reader = READERS.get(cfg.data.format)
    kwargs = {"task_type": cfg.type, "on_bad_sample": cfg.on_bad_sample}
    train_raw: SampleDataset = reader(cfg.data, split="train", **kwargs)
    val_raw: SampleDataset = reader(cfg.data, split="val", **kwargs)
    train_tf = task_type.train_transform(cfg) if cfg.augment else task_type.val_transform(cfg)
    train_set = TransformedDataset(train_raw, transform=train_tf)
    val_set = TransformedDataset(
        val_raw,
        transform=task_type.val_transform(cfg),
        indices=_val_indices(len(val_raw), cfg.max_val_samples),
    )
    count = task_type.count_classes or (lambda ds: ds.num_classes)
    num_classes = int(count(train_raw))
    head = task_type.build_head(
        cfg,
        feature_channels=list(feature_channels),
        pooled_dim=int(pooled_dim),
        num_classes=num_classes,
        dataset=train_raw,
    )
    return Task(
        cfg=cfg, type=task_type, head=head, train_set=train_set, val_set=val_set, num_classes=num_classes
    )
