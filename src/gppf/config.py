"""Typed run configuration: dataclasses loaded from YAML with dotted ``key=value`` overrides.

Unknown or mistyped keys are errors that name the dotted key and the closest valid one.
Only builders read configs; modules take explicit keyword arguments. This module imports nothing of gppf:
names of registered things (task types, readers, backbones) are checked where they are built, or here when
the caller passes the known names (``load_config(..., task_types=TASK_TYPES.names())``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Collection, Literal, Union

import yaml


DEFAULT_RECIPE = "default.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key or file."""


def default_config_path() -> Path:
    """The packaged built-in recipe (six tasks over the built-in synthetic domains)."""
    return Path(str(resources.files(__package__ or "gppf") / "configs" / DEFAULT_RECIPE))


@dataclass
class DataConfig:
    """Where a task's data lives and in which format.

    ``format`` is a reader name registered in ``gppf.registry.READERS`` (built-in: ``imagefolder``,
    ``coco``, ``yolo``, ``mask_png``, ``table``, ``idx``, ``synthetic``). ``train``/``val`` are split
    folders or annotation files relative to ``root``.
    ``options`` holds reader-specific settings; each reader rejects options it does not know.
    """

    format: str = "synthetic"
    root: str = ""
    train: str = "train"
    val: str = "val"
    classes: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """One task of a multi-task run."""

    name: str = ""
    type: str = "classification"  # a name registered in gppf.registry.TASK_TYPES (checked at build time)
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 32
    eval_batch_size: int | None = None
    image_size: int = 224
    loss_weight: float = 1.0
    sample_weight: float = 1.0
    route: list[list[int]] | None = None
    on_bad_sample: Literal["error", "skip"] = "error"
    augment: bool = True
    num_workers: int | None = None
    max_val_samples: int | None = None
    head: dict[str, Any] = field(default_factory=dict)


@dataclass
class RouterConfig:
    """Task router settings (see ``gppf.lego.router``).

    ``search_until``: fraction of training spent searching (``soft_topk``: every lego softly active);
    ``freeze_at``: routes fixed from here on (a fraction of training if <= 1, else a step);
    ``mi_weight`` / ``balance_weight``: RMS of each auxiliary loss's gradient on the logits as a fraction
    of the task loss's (which is rescaled to RMS 1); ``router_lr_mult``: router LR = ``train.lr`` times
    this, in logit units per unit-RMS gradient (no weight decay).
    """

    mode: Literal["soft_topk", "topk_st", "gumbel"] = "soft_topk"
    mi_weight: float = 0.0
    balance_weight: float = 0.0
    tau_start: float = 1.0
    tau_end: float = 0.05
    init_std: float = 0.01
    search_until: float = 0.2
    freeze_at: float = 0.3
    router_lr_mult: float = 0.2


@dataclass
class ModelConfig:
    """Backbone choice and lego layout."""

    backbone: str = "gppf_r18"
    legos: int = 8
    active: int = 2
    width_mult: float = 1.0
    router: RouterConfig = field(default_factory=RouterConfig)
    init: str | None = None


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of the SIMT loop."""

    steps: int = 600
    lr: float = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lazy_legos: Literal["auto", "on", "off"] = "auto"  # SGD: defer unused legos (auto: on CPU only)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 5.0  # max norm of the network's gradient (router logits excluded; 0: off)
    loss_weighting: str = "static"
    seed: int = 0
    amp: Literal["auto", "bf16", "none"] = "auto"  # auto: bf16 where the device computes it natively
    channels_last: bool = True
    device: str = "auto"
    deterministic: bool = False
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 200
    keep_last: int = 3
    max_bad_steps: int = 5
    num_workers: int = 1  # DataLoader workers per task (0 = load in the training process)
    threads: int = 0  # intra-op CPU threads; 0 = auto: half the cores (>= 1), the rest feed the loaders
    progress: bool = True


@dataclass
class DistConfig:
    """Distributed layout: every rank trains every task (``all``), ranks form task groups (``groups``), or
    ``auto``: ``groups`` where the measured task costs pack onto the ranks within 15% of a perfect split,
    else ``all`` (docs/distributed.md)."""

    planner: Literal["auto", "all", "groups"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # BatchNorm batch statistics over all ranks that train a task (lego channels of its route only);
    # off: each rank normalises with its own share of the batch, as DDP without SyncBatchNorm
    # (no extra collective per BN layer; see docs/distributed.md, Semantics)
    sync_bn: bool = False
    # ``groups`` / ``auto`` planner's task costs: timed on the run's model and data before training,
    # or batch x pixels
    task_costs: Literal["measured", "static"] = "measured"
    # gradient sync of a bucket whose written regions (the lego rows any rank's routes used, every dense
    # gradient whole) hold at most this fraction of it: those regions packed (two copies) and reduced
    # instead of the whole bucket in place (0: never; 1: always; docs/distributed.md)
    sync_sparse_below: float = 0.6


@dataclass
class FinetuneConfig:
    """Transfer of a pre-trained run to downstream tasks (``gppf finetune``; see ``docs/transfer.md``).

    ``mode``: ``linear`` (backbone frozen, its BatchNorms in eval mode, only heads train) or ``full`` (the
    route's legos, the shared parts and the heads train; lego parameters get no weight decay so that
    unselected legos stay bit-identical). ``route``: one method for every downstream task, or a mapping
    task -> method; methods: ``auto``, ``learn``, ``copy:<pre-training task>`` or an explicit ``[L][k]``
    list (mapping form only); a task's own ``route:`` list wins. ``layer_decay``: layer-wise LR decay
    (1.0 = off; the stem gets ``lr * layer_decay**(depth+1)``, the last stage ``lr * layer_decay``);
    ``head_lr_mult``: head LR = ``train.lr`` times this. ``learn_steps``: length of the ``learn`` phase
    (a fraction of ``train.steps`` if <= 1, else steps); ``auto_samples``: training samples ``auto``
    embeds per candidate route. Written by ``gppf finetune`` (do not set by hand): ``source`` (the
    pre-trained run, or ``none``), ``source_tasks`` (its tasks, still routed by the backbone) and
    ``resolved`` (task -> how its route was chosen).
    """

    mode: Literal["linear", "full"] = "full"
    route: str | dict[str, Any] = "auto"
    layer_decay: float = 1.0
    head_lr_mult: float = 1.0
    learn_steps: float = 0.2
    auto_samples: int = 256
    source: str = ""
    source_tasks: list[str] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    """A whole run (``finetune``: only in fine-tuning runs)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    finetune: FinetuneConfig | None = None


# ----------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to annotation ``tp`` or raise ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise with the closest valid key."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config (for YAML dumps and JSON logs)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- overrides


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': cannot parse value: {exc}") from exc
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, full)]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, full)] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, full: str) -> int:
    """Index into a list by position or, for task lists, by task name."""
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise ConfigError(f"override '{full}': index {idx} out of range (list has {len(node)})")
        return idx
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [item.get("name") for item in node if isinstance(item, dict)]
    raise ConfigError(f"override '{full}': no list entry named '{part}' (have {names})")


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides onto a raw config mapping (validated later)."""
    for item in overrides:
        path, value = _parse_override(item)
        _set_path(tree, path, value, item)
    return tree


# ----------------------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {p}{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: dict[str, Any] | None = None,
    task_types: Collection[str] | None = None,
) -> RunConfig:
    """Load a ``RunConfig`` from YAML (or ``base``) plus dotted overrides, validating every key.

    ``task_types``: the registered task-type names; when given, ``tasks[i].type`` is checked against them.
    """
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        tree = read_yaml(path)
    tree = apply_overrides(tree, list(overrides or []))
    cfg = from_dict(RunConfig, tree)
    validate(cfg, task_types=task_types)
    return cfg


def validate(cfg: RunConfig, *, task_types: Collection[str] | None = None) -> None:
    """Cross-field checks that types alone cannot express (and task types, when ``task_types`` is given)."""
    if cfg.model.active < 1 or cfg.model.active > cfg.model.legos:
        raise ConfigError(
            f"model.active must be in [1, model.legos={cfg.model.legos}], got {cfg.model.active}"
        )
    seen: set[str] = set()
    for i, task in enumerate(cfg.tasks):
        if not task.name:
            raise ConfigError(f"tasks.{i}.name is required")
        if task.name in seen:
            raise ConfigError(f"tasks.{i}.name: duplicate task name '{task.name}'")
        seen.add(task.name)
        if task_types is not None:
            check_name(task.type, sorted(task_types), key=f"tasks.{i}.type", kind="task type")
        if task.batch_size < 1:
            raise ConfigError(f"tasks.{task.name}.batch_size must be >= 1")
    if cfg.train.steps < 0:
        raise ConfigError("train.steps must be >= 0")
    if not 0.0 <= cfg.dist.sync_sparse_below <= 1.0:
        raise ConfigError(f"dist.sync_sparse_below must be in [0, 1], got {cfg.dist.sync_sparse_below}")
    if cfg.finetune is not None:
        _validate_finetune(cfg.finetune)


def _validate_finetune(ft: FinetuneConfig) -> None:
    if not 0.0 < ft.layer_decay <= 1.0:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1] (1.0 = off), got {ft.layer_decay}")
    if ft.head_lr_mult <= 0:
        raise ConfigError(f"finetune.head_lr_mult must be > 0, got {ft.head_lr_mult}")
    if ft.learn_steps <= 0:
        raise ConfigError(f"finetune.learn_steps must be > 0 (a fraction of train.steps if <= 1, else steps), "
                          f"got {ft.learn_steps}")
    if ft.auto_samples < 2:
        raise ConfigError(f"finetune.auto_samples must be >= 2, got {ft.auto_samples}")


def check_name(name: str, known: list[str], *, key: str, kind: str) -> None:
    """``ConfigError`` naming ``key`` and the closest of ``known`` when ``name`` is not among them."""
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key}: unknown {kind} '{name}'{hint} (known: {', '.join(known)})")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)
