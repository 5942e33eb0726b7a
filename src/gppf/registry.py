"""Name -> object registries, used only at the user edge (configs, CLI, ``create_*`` helpers).

The three extension points of gppf live here, in one place:

* ``TASK_TYPES``: task-type name -> ``gppf.tasks.TaskType`` instance (a registered class is instantiated);
* ``READERS``: data-format name -> reader ``(data_cfg, *, split, task_type, on_bad_sample) -> dataset``;
* ``BACKBONES``: backbone name -> builder ``(*, tasks, **kwargs) -> LegoBackbone``.

Built-ins are listed below by import path and imported only when first looked up, so importing this
module imports nothing of gppf (and no torch). A package outside gppf adds entries with no edit here by
declaring entry points in the groups ``gppf.task_types``, ``gppf.readers`` and ``gppf.backbones``
(``name = "package.module:object"``); they are listed on first lookup and imported when used.
"""
from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Raised for duplicate registrations or unknown names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def closest_hint(name: str, known: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known`` to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A listable mapping from names to objects; duplicates are errors.

    ``builtins`` maps names to ``"module:attr"`` import paths resolved on first lookup; ``group`` is an
    entry-point group whose entries are added (also lazily) on the first lookup of any name; ``convert``
    maps a loaded object to the stored one (e.g. instantiate a class).
    """

    def __init__(
        self,
        kind: str,
        *,
        builtins: Mapping[str, str] | None = None,
        group: str | None = None,
        convert: Callable[[Any], T] | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self._convert = convert
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(builtins or {})
        self._discovered = group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` (converted like a lazily loaded entry)."""
        if name in self._items or name in self._lazy:
            raise RegistryError(f"{self.kind} '{name}' is already registered")
        self._items[name] = self._convert(obj) if self._convert else obj

    def _discover(self) -> None:
        """List the entry points of ``group`` (once); a name clash with another entry is an error."""
        if self._discovered:
            return
        self._discovered = True
        for ep in entry_points(group=self.group):
            where = f"entry point '{ep.name} = {ep.value}' (group {self.group})"
            if ep.name in self._items or (ep.name in self._lazy and self._lazy[ep.name] != ep.value):
                raise RegistryError(f"{where}: {self.kind} '{ep.name}' is already registered")
            self._lazy[ep.name] = ep.value

    def _resolve(self, name: str) -> T:
        path = self._lazy[name]
        module, _, attr = path.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(f"{self.kind} '{name}': cannot load '{path}': {exc}") from exc
        del self._lazy[name]
        self._items[name] = self._convert(obj) if self._convert else obj
        return self._items[name]

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        self._discover()
        if name in self._lazy:
            return self._resolve(name)
        known = self.names()
        raise RegistryError(
            f"unknown {self.kind} '{name}'{closest_hint(name, known)} (available: {', '.join(known)})"
        )

    def names(self) -> list[str]:
        """All registered names (built-in, added and entry points) without importing any of them."""
        self._discover()
        return sorted({*self._items, *self._lazy})

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def _instantiate(obj: Any) -> Any:
    """Task types are registered as classes or instances; store an instance."""
    return obj() if isinstance(obj, type) else obj


# Typed views: gppf.tasks.base.TASK_TYPES, gppf.data.base.READERS, gppf.backbones.base.BACKBONES (importing
# those types here would import torch and close import circles).
TASK_TYPES: Registry[Any] = Registry(
    "task type",
    builtins={
        "classification": "gppf.tasks.classification:ClassificationType",
        "multilabel": "gppf.tasks.multilabel:MultilabelType",
        "segmentation": "gppf.tasks.segmentation:SegmentationType",
        "detection": "gppf.tasks.detection:DetectionType",
        "keypoints": "gppf.tasks.keypoints:KeypointsType",
        "reid": "gppf.tasks.reid:ReidType",
    },
    group="gppf.task_types",
    convert=_instantiate,
)

READERS: Registry[Any] = Registry(
    "data format",
    builtins={
        **{f: f"gppf.data.readers.{f}:build" for f in ("imagefolder", "coco", "yolo", "mask_png", "table", "idx")},
        "synthetic": "gppf.data.synthetic.dataset:build",
        "shards": "gppf.data.shards:build",
    },
    group="gppf.readers",
)

BACKBONES: Registry[Any] = Registry(
    "backbone",
    builtins={
        **{name: f"gppf.backbones.lego_resnet:{name}" for name in ("gppf_r18", "gppf_r50")},
        **{name: f"gppf.backbones.lego_vit:{name}" for name in ("gppf_vit_tiny", "gppf_vit_small", "gppf_vit_base")},
    },
    group="gppf.backbones",
)
