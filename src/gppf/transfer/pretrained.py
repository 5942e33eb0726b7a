"""Load a pre-trained run from its directory alone: config, routed backbone, heads and task specs.

Needs only ``RUN_DIR/config.yaml``, ``RUN_DIR/tasks.json`` (written by ``gppf pretrain``) and the last
checkpoint; no dataset is opened. Heads are rebuilt from the constructor arguments recorded in
``tasks.json`` (``TaskType.head_arguments``) by their registered task type, never by an import path read
from a file. Weights are read with safetensors only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gppf.config import RunConfig, load_config
from gppf.engine import checkpoint as ckpt
from gppf.engine.model import MultiTaskModel

__all__ = ["Pretrained", "PretrainedError", "TaskSpec", "load_pretrained", "read_task_specs"]


class PretrainedError(RuntimeError):
    """A run directory cannot be loaded; the message names the missing or broken file."""


@dataclass(frozen=True)
class TaskSpec:
    """What a pre-training task needs at inference: its type, head arguments, classes and input."""

    name: str
    type: str
    head_args: dict[str, Any]
    classes: list[str]
    num_classes: int
    image_size: int
    mean: list[float]
    std: list[float]
    primary_metric: str


@dataclass
class Pretrained:
    """A loaded run: its config, the multi-task model (eval mode) and each task's spec."""

    run_dir: Path
    cfg: RunConfig
    model: MultiTaskModel
    specs: dict[str, TaskSpec]
    step: int


def read_task_specs(run_dir: Path | str) -> dict[str, TaskSpec]:
    """``RUN_DIR/tasks.json`` as ``TaskSpec`` objects (``PretrainedError`` naming the file when absent)."""
    path = Path(run_dir) / "tasks.json"
    if not path.is_file():
        raise PretrainedError(f"{path}: missing (written by `gppf pretrain` since gppf 0.1; re-run or resume the "
                              "run to write it)")
    try:
        doc = json.loads(path.read_text())
        return {name: TaskSpec(name=name, **fields) for name, fields in doc.items()}
    except (ValueError, TypeError) as exc:
        raise PretrainedError(f"{path}: not a gppf task spec file ({exc})") from exc


def build_head(spec: TaskSpec) -> nn.Module:
    """The head of ``spec`` with fresh weights, built by its registered task type."""
    from gppf.tasks.base import TASK_TYPES

    task_type = TASK_TYPES.get(spec.type)
    return task_type.head(**spec.head_args)


def load_pretrained(run_dir: Path | str, *, device: str | torch.device = "cpu") -> Pretrained:
    """Rebuild the run's model from ``config.yaml`` + ``tasks.json`` and load its last checkpoint."""
    from gppf.engine.trainer import build_model
    from gppf.registry import TASK_TYPES

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise PretrainedError(f"{config}: missing; '{run_dir}' is not a gppf run directory")
    cfg = load_config(config, [], task_types=TASK_TYPES.names())
    specs = read_task_specs(run_dir)
    latest = ckpt.find_latest(run_dir)
    if latest is None:
        raise PretrainedError(f"{run_dir / 'checkpoints'}: no checkpoint to load")
    model = build_model(cfg)
    for name in [t.name for t in cfg.tasks]:  # a fine-tuning run's backbone also routes its source's tasks
        if name not in specs:
            raise PretrainedError(f"{run_dir / 'tasks.json'}: no entry for task '{name}'")
        model.heads[name] = build_head(specs[name])
    tensors = ckpt.load_weights(latest / "model.safetensors")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PretrainedError(f"{latest / 'model.safetensors'}: does not match {config}: {exc}") from exc
    step = int(json.loads((latest / "state.json").read_text())["step"])
    return Pretrained(run_dir=run_dir, cfg=cfg, model=model.to(device).eval(), specs=specs, step=step)
