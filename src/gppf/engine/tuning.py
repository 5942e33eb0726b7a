"""Which parameters a fine-tuning run trains, and with which learning rates.

Used by the trainer when a run's config has a ``finetune`` section (``gppf finetune``), so that every
build of the run (training, resume, ``gppf eval``) freezes the same parameters and forms the same
optimizer groups:

* ``linear``: every backbone parameter is frozen (its BatchNorms run in eval mode, see
  ``MultiTaskModel(frozen_backbone=True)``); only the heads train.
* ``full``: backbone and heads train. Lego parameters get no weight decay: a lego the route does not
  select gets an exactly zero gradient, so without decay SGD leaves it bit-identical.
* The router logits train only when some task learns its route (``finetune.route: learn``).

Layer-wise LR decay: backbone parameters at depth ``d`` (0: the stem; ``1..D``: the stages / blocks
in order; parts after the last block count as ``D``) get ``lr * layer_decay ** (D + 1 - d)``; heads
get ``lr * head_lr_mult``.
"""
from __future__ import annotations

import re

from torch import nn

from gppf.engine.model import MultiTaskModel

__all__ = ["backbone_depths", "finetune_param_groups", "set_trainable"]

_STAGE = re.compile(r"^(?:layer(\d+)|layers\.(\d+))\.")  # LegoResNet stages (1-based), LegoViT blocks (0-based)
_STEM = ("conv1.", "bn1.", "conv_proj.", "class_token", "pos_embedding")


def set_trainable(model: MultiTaskModel, *, mode: str, learn_routes: bool) -> None:
    """Freeze what ``mode`` (``linear`` / ``full``) does not train; router logits train iff ``learn_routes``."""
    if mode not in ("linear", "full"):
        raise ValueError(f"unknown fine-tuning mode {mode!r} (linear, full)")
    for name, p in model.backbone.named_parameters():
        p.requires_grad_(learn_routes if name.startswith("router.") else mode == "full")
    for p in model.heads.parameters():
        p.requires_grad_(True)


def backbone_depths(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """``(parameter name -> depth, D)``: 0 for the stem, ``1..D`` for the stages or blocks in order, ``D``
    for anything after them (final norm, pyramid); the router is left out."""
    stages: dict[str, int] = {}
    for name, _ in backbone.named_parameters():
        m = _STAGE.match(name)
        if m:
            stages[name] = int(m.group(1)) if m.group(1) is not None else int(m.group(2)) + 1
    top = max(stages.values(), default=0)
    depths = {}
    for name, _ in backbone.named_parameters():
        if name.startswith("router."):
            continue
        depths[name] = stages.get(name, 0 if name.startswith(_STEM) else top)
    return depths, top


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embedding" in name


def finetune_param_groups(model: MultiTaskModel, *, lr: float, weight_decay: float, router_lr_mult: float,
                          layer_decay: float, head_lr_mult: float) -> list[dict]:
    """Optimizer groups of the trainable parameters: per backbone depth (LLRD) and decay / no decay, the
    heads (``lr * head_lr_mult``) and the router logits (``lr * router_lr_mult``, when they train)."""
    lego = {id(r.param) for r in model.backbone.lego_rows()}
    depths, top = backbone_depths(model.backbone)
    buckets: dict[tuple[str, bool], tuple[float, list[nn.Parameter]]] = {}

    def put(group: str, scale: float, decay: bool, p: nn.Parameter) -> None:
        buckets.setdefault((group, decay), (scale, []))[1].append(p)

    for name, p in model.backbone.named_parameters():
        if not p.requires_grad or name.startswith("router."):
            continue
        d = depths[name]
        put(f"backbone.{d}", layer_decay ** (top + 1 - d), not (_no_decay(name, p) or id(p) in lego), p)
    for name, p in model.heads.named_parameters():
        if p.requires_grad:
            put("heads", head_lr_mult, not _no_decay(name, p), p)
    groups = [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale,
               "name": f"{group}.{'decay' if decay else 'no_decay'}"}
              for (group, decay), (scale, params) in sorted(buckets.items())]
    router = [p for p in model.backbone.router.parameters() if p.requires_grad]
    if router:
        groups.append({"params": router, "weight_decay": 0.0, "lr": lr * router_lr_mult, "name": "router"})
    return groups
