"""Task framework: ``TaskType`` (the base class a task type subclasses), ``Task`` (a built task), ``build_task``.

A task type is one subclass of ``TaskType`` registered in ``gppf.registry.TASK_TYPES`` (built-ins by import
path there; a package outside gppf through the ``gppf.task_types`` entry-point group; see ``docs/tasks.md``).
``build_task`` turns a ``TaskConfig`` into datasets + head + metric; it never imports backbones: heads only
get ``feature_channels`` (channels of the stride 4/8/16/32 pyramid) and ``pooled_dim``.

Contracts (typed in ``gppf.interfaces``): heads satisfy ``Head`` (``forward(feats) -> outputs``,
``loss(outputs, batch) -> Tensor``, ``predict(outputs, batch) -> preds``; output types never depend on
``training``); metrics satisfy ``Metric``. Readers come from ``READERS.get(cfg.data.format)(cfg.data,
split=..., task_type=..., on_bad_sample=...)``; a reader may offer ``target(i) -> dict`` for cheap
target-only access (used by ``iter_targets``, e.g. for chance levels), otherwise ``dataset[i][1]`` is used.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

from torch import nn
from torch.utils.data import Dataset

from gppf import registry
from gppf.config import ConfigError, RunConfig, TaskConfig, check_name
from gppf.data.base import READERS, SampleDataset
from gppf.data.collate import collate_batch
from gppf.data.transforms import build_train_transform, build_val_transform
from gppf.interfaces import Batch, Head, Metric
from gppf.registry import Registry, RegistryError, closest_hint

__all__ = [
    "Batch",
    "Head",
    "Metric",
    "TaskType",
    "TASK_TYPES",
    "Task",
    "TransformedDataset",
    "build_task",
    "check_task_types",
    "head_option_defaults",
    "head_options",
    "iter_targets",
    "raw_target",
    "reader_of",
    "collate_batch",
]


def head_option_defaults(head: Callable[..., Any], *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The user-settable options of a head: its keyword-only constructor arguments with defaults
    (minus ``exclude``, the ones its task type sets itself), mapped to those defaults."""
    params = inspect.signature(head).parameters.values()
    skip = set(exclude)
    return {
        p.name: p.default
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in skip
    }


class TaskType:
    """Base class of task types: shared behaviour and defaults; subclasses override what differs.

    Class attributes: ``name`` (registry name), ``head`` (the head class), ``primary_metric`` (model
    selection key, higher is better), ``train_mode`` / ``val_mode`` / ``boxes`` (arguments of
    ``build_train_transform`` / ``build_val_transform``), ``fixed_head_args`` (defaulted head arguments the
    type sets itself, hidden from users), ``extra_options`` (``cfg.head`` options read by the type, not
    passed to the head). Head options are ``head_option_defaults(head)`` plus ``extra_options``.

    Subclasses implement ``new_metric`` and ``chance``; they override ``head_inputs`` (the head's
    structural arguments; default ``pooled_dim`` and ``num_classes``) when the head needs others.
    """

    name: ClassVar[str]
    head: ClassVar[Callable[..., Head]]
    primary_metric: ClassVar[str]
    train_mode: ClassVar[str] = "resize"
    val_mode: ClassVar[str] = "resize"
    boxes: ClassVar[bool] = False
    fixed_head_args: ClassVar[tuple[str, ...]] = ()
    extra_options: ClassVar[Mapping[str, Any]] = {}
    collate: ClassVar[Callable[[list], Batch]] = staticmethod(collate_batch)  # picklable module function

    def option_defaults(self) -> dict[str, Any]:
        """Every ``cfg.head`` key this type accepts, with its default."""
        return {**head_option_defaults(self.head, exclude=self.fixed_head_args), **self.extra_options}

    def options(self, cfg: TaskConfig) -> dict[str, Any]:
        """``cfg.head`` validated and merged over ``option_defaults()``."""
        return head_options(cfg, self.option_defaults())

    def head_inputs(
        self, cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
    ) -> dict[str, Any]:
        """The head's structural constructor arguments (``dataset``: the raw train split)."""
        return {"pooled_dim": pooled_dim, "num_classes": num_classes}

    def head_kwargs(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The user options passed to the head constructor (``extra_options`` stay with the type)."""
        return {k: v for k, v in options.items() if k not in self.extra_options}

    def head_arguments(
        self, cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
    ) -> dict[str, Any]:
        """Every keyword argument of the head's constructor (structural inputs + user options).

        Stored in a run's ``tasks.json`` so the head can be rebuilt without its dataset
        (``self.head(**args)``, see ``gppf.transfer.pretrained``).
        """
        inputs = self.head_inputs(
            cfg, feature_channels=feature_channels, pooled_dim=pooled_dim, num_classes=num_classes, dataset=dataset
        )
        return {**inputs, **self.head_kwargs(self.options(cfg))}

    def build_head(
        self, cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
    ) -> Head:
        return self.head(**self.head_arguments(
            cfg, feature_channels=feature_channels, pooled_dim=pooled_dim, num_classes=num_classes, dataset=dataset
        ))

    def train_transform(self, cfg: TaskConfig) -> Callable:
        """``tf(image, target) -> (image, target)`` for training (used only when ``cfg.augment``)."""
        return build_train_transform(image_size=cfg.image_size, mode=self.train_mode, boxes=self.boxes)

    def val_transform(self, cfg: TaskConfig) -> Callable:
        """Deterministic ``tf(image, target)`` for evaluation (and training when ``cfg.augment`` is false)."""
        return build_val_transform(image_size=cfg.image_size, mode=self.val_mode, boxes=self.boxes)

    def new_metric(self, cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> Metric:
        """A fresh metric for the val split (``dataset``: the transformed val split)."""
        raise NotImplementedError

    def chance(self, *, num_classes: int, dataset: Dataset) -> dict[str, float]:
        """Chance level of every metric key on the val split (raw targets)."""
        raise NotImplementedError

    def count_classes(self, dataset: Dataset) -> int:
        """Number of classes of the raw train split."""
        return int(dataset.num_classes)  # type: ignore[attr-defined]

    def train_batch_sampler(
        self, cfg: TaskConfig, *, dataset: Dataset, batch_size: int, seed: int
    ) -> Iterable[list[int]] | None:
        """Training batch sampler (e.g. P x K identity sampling); ``None`` = plain random batches."""
        return None


TASK_TYPES: Registry[TaskType] = registry.TASK_TYPES


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
        return raw_target(self.base, self._base_index(i))

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.base, "classes", []))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def bad(self) -> Any:
        return getattr(self.base, "bad", None)


def raw_target(dataset: Dataset, i: int) -> dict[str, Any]:
    """Target ``i`` of ``dataset`` without its image when the dataset offers ``target(i)``."""
    getter = getattr(dataset, "target", None)
    if callable(getter):
        return getter(i)
    return dataset[i][1]


def reader_of(dataset: Any) -> Any:
    """The reader under (possibly nested) ``TransformedDataset`` wrappers."""
    while hasattr(dataset, "base"):
        dataset = dataset.base
    return dataset


def iter_targets(dataset: Dataset) -> Iterator[dict[str, Any]]:
    """Yield every target of ``dataset`` in order (``dataset.target(i)`` when offered)."""
    for i in range(len(dataset)):  # type: ignore[arg-type]
        yield raw_target(dataset, i)


def head_options(cfg: TaskConfig, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg.head`` merged over ``defaults``; unknown keys or wrong types raise ``ConfigError``."""
    out = dict(defaults)
    for key, value in cfg.head.items():
        where = f"tasks.{cfg.name or cfg.type}.head.{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(
                f"unknown head option '{where}' for task type '{cfg.type}'{closest_hint(key, list(defaults))} "
                f"(known: {known})"
            )
        out[key] = _coerce_option(value, defaults[key], where)
    return out


def _coerce_option(value: Any, default: Any, where: str) -> Any:
    """``value`` converted to the type of ``default`` (lists/tuples element-wise, to a list)."""
    if default is None:
        return value
    if value is None:
        raise ConfigError(f"{where}: null is not allowed (default {default!r})")
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = default[0] if default else None
        return [_coerce_option(v, item, f"{where}.{i}") for i, v in enumerate(value)]
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
        head_args: Mapping[str, Any] | None = None,
    ) -> None:
        """``head_args``: the head's constructor arguments (``TaskType.head_arguments``), when known."""
        self.name = cfg.name
        self.cfg = cfg
        self.type = type
        self.head = head
        self.train_set = train_set
        self.val_set = val_set
        self.num_classes = num_classes
        self.head_args = dict(head_args or {})
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
        return self.type.train_batch_sampler(self.cfg, dataset=self.train_set, batch_size=batch_size, seed=seed)

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, type={self.type.name!r}, num_classes={self.num_classes}, "
            f"train={len(self.train_set)}, val={len(self.val_set)})"
        )


def check_task_types(cfg: RunConfig) -> None:
    """Every ``tasks[i].type`` is a registered task type, else ``ConfigError`` naming the key and the
    closest valid name (the config module itself imports nothing of gppf, so this check lives here)."""
    known = TASK_TYPES.names()
    for i, task in enumerate(cfg.tasks):
        check_name(task.type, known, key=f"tasks.{i}.type", kind="task type")


def task_type_of(cfg: TaskConfig) -> TaskType:
    """The registered ``TaskType`` instance named by ``cfg.type`` (``ConfigError`` when unknown)."""
    try:
        task_type = TASK_TYPES.get(cfg.type)
    except RegistryError as exc:
        raise ConfigError(f"tasks.{cfg.name or cfg.type}.type: {exc}") from exc
    if not isinstance(task_type, TaskType):
        raise ConfigError(f"task type '{cfg.type}' is a {type(task_type).__name__}, not a gppf.tasks.TaskType")
    return task_type


def _val_indices(n: int, limit: int | None) -> list[int] | None:
    """Evenly spaced deterministic subset of ``n`` items (``None`` = all)."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ConfigError(f"max_val_samples must be >= 1, got {limit}")
    return [(i * n) // limit for i in range(limit)]


def build_task(cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int) -> Task:
    """Build readers, transformed datasets, head and metric factory for one ``TaskConfig``."""
    task_type = task_type_of(cfg)
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
    num_classes = int(task_type.count_classes(train_raw))
    head_args = task_type.head_arguments(
        cfg,
        feature_channels=list(feature_channels),
        pooled_dim=int(pooled_dim),
        num_classes=num_classes,
        dataset=train_raw,
    )
    return Task(
        cfg=cfg, type=task_type, head=task_type.head(**head_args), train_set=train_set, val_set=val_set,
        num_classes=num_classes, head_args=head_args,
    )
