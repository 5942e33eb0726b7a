"""Extract one task of a pre-trained run as a whole dense model: backbone route + head, plus a sidecar.

``extract_task_model(RUN_DIR, task=, out=)`` needs only the run directory (``load_pretrained``: config,
``tasks.json``, last checkpoint; no dataset). It writes ``out`` (safetensors; ``backbone.*`` keys in
torchvision naming, ``head.*`` keys of the gppf head) and ``out.with_suffix(".json")`` (the sidecar,
``gppf.transfer.task_model.TaskModelSpec``), which ``gppf.load_task_model`` reads back.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gppf.backbones.lego_resnet import LegoBottleneck, LegoResNet
from gppf.backbones.lego_vit import LegoViT
from gppf.transfer.extract import resnet_dense_state
from gppf.transfer.extract_vit import vit_dense_state
from gppf.transfer.pretrained import Pretrained, PretrainedError, TaskSpec, load_pretrained
from gppf.transfer.task_model import (FORMAT, VERSION, TaskModel, TaskModelError, TaskModelSpec, assemble_task_model,
                                      load_task_model, sidecar_path)

__all__ = ["extract_task_model", "open_task_model", "task_model_from_run", "task_model_spec", "task_model_tensors", "torchvision_match"]

_TV_RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
               ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
               ("bottleneck", (3, 8, 36, 3)): "resnet152"}
_TV_VITS = {"vit_b_16": (16, 768, 12, 12, 3072), "vit_b_32": (32, 768, 12, 12, 3072),
            "vit_l_16": (16, 1024, 24, 16, 4096), "vit_l_32": (32, 1024, 24, 16, 4096),
            "vit_h_14": (14, 1280, 32, 16, 5120)}  # (patch, dim, depth, heads, mlp_dim), image 224


def _resnet_arch(backbone: LegoResNet, state: dict[str, Tensor]) -> dict[str, Any]:
    """Widths read from the extracted tensors (the routed sub-network), not from the lego layout."""
    bottleneck = backbone.block_type is LegoBottleneck
    inner = [[[state[f"layer{i + 1}.{b}.conv{j + 1}.weight"].shape[0] for j in range(1 + bottleneck)]
              for b in range(n)] for i, n in enumerate(backbone.depth_layers)]
    expansion = 4 if bottleneck else 1
    return {"kind": "resnet", "block": "bottleneck" if bottleneck else "basic",
            "layers": list(backbone.depth_layers), "stem_width": state["conv1.weight"].shape[0],
            "stage_widths": [c // expansion for c in backbone.feature_channels], "inner_widths": inner,
            "legos": backbone.legos, "active": backbone.active, "width_mult": backbone.width_mult}


def _vit_arch(backbone: LegoViT) -> dict[str, Any]:
    return {"kind": "vit", "image_size": backbone.image_size, "patch_size": backbone.patch_size,
            "dim": backbone.dim, "depth": backbone.depth, "heads": backbone.heads, "mlp_dim": backbone.mlp_dim,
            "legos": backbone.legos, "active": backbone.active}


def torchvision_match(arch: dict[str, Any]) -> dict[str, Any]:
    """``{"model": name | None, "reason": why not | None, "set_aside": [...]}`` for the sidecar.

    ``model``: the ``torchvision.models`` builder whose ``state_dict`` the backbone weights load into with
    ``strict=True`` once the ``set_aside`` modules are replaced by ``nn.Identity`` (ResNet ``fc``, ViT
    ``heads``) and, for a ViT, the ``fpn.*`` (gppf's simple pyramid) keys are dropped.
    """
    if arch["kind"] == "resnet":
        name = _TV_RESNETS.get((arch["block"], tuple(arch["layers"])))
        if name is None:
            return {"model": None, "reason": f"no torchvision ResNet has {arch['block']} blocks {arch['layers']}",
                    "set_aside": ["fc"]}
        std = [64, 128, 256, 512]
        inner = sorted({w for stage in arch["inner_widths"] for blk in stage for w in blk})
        if arch["stem_width"] != 64 or arch["stage_widths"] != std or any(
                w != std[i] for i, s in enumerate(arch["inner_widths"]) for blk in s for w in blk):
            return {"model": None, "set_aside": ["fc"],
                    "reason": f"width_mult {arch['width_mult']}: widths differ from {name} (stem "
                              f"{arch['stem_width']} vs 64, stages {arch['stage_widths']} vs {std}, "
                              f"inner widths {inner})"}
        return {"model": name, "reason": None, "set_aside": ["fc"]}
    dims = (arch["patch_size"], arch["dim"], arch["depth"], arch["heads"], arch["mlp_dim"])
    for name, ref in _TV_VITS.items():
        if dims == ref and arch["image_size"] == 224:
            return {"model": name, "reason": None, "set_aside": ["heads", "fpn"]}
    return {"model": None, "set_aside": ["heads", "fpn"],
            "reason": f"no torchvision ViT has image {arch['image_size']}, patch {dims[0]}, dim {dims[1]}, "
                      f"depth {dims[2]}, heads {dims[3]}, mlp {dims[4]}"}


def task_model_tensors(model: nn.Module, task: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The ``backbone.*`` + ``head.*`` tensors of ``task`` and the backbone architecture (sidecar part).

    ``model``: a ``MultiTaskModel`` (its backbone a ``LegoResNet`` or ``LegoViT``).
    """
    backbone = model.backbone
    if isinstance(backbone, LegoResNet):
        state = resnet_dense_state(backbone, task)
        arch = _resnet_arch(backbone, state)
    elif isinstance(backbone, LegoViT):
        state = vit_dense_state(backbone, task)
        state.update({k: v.detach().clone() for k, v in backbone.state_dict().items() if k.startswith("fpn.")})
        arch = _vit_arch(backbone)
    else:
        raise TypeError(f"no task-model extraction for {type(backbone).__name__}")
    arch.update(feature_channels=list(backbone.feature_channels), feature_strides=list(backbone.feature_strides),
                pooled_dim=int(backbone.pooled_dim), route=backbone.router.routes()[task])
    tensors = {f"backbone.{k}": v.contiguous() for k, v in state.items()}
    tensors.update({f"head.{k}": v.detach().clone().contiguous() for k, v in model.heads[task].state_dict().items()})
    return tensors, arch


def task_model_spec(spec: TaskSpec, arch: dict[str, Any], *, source: dict[str, Any]) -> TaskModelSpec:
    """The sidecar of task ``spec`` with backbone ``arch``."""
    return TaskModelSpec(**asdict(spec), format=FORMAT, version=VERSION, backbone=arch,
                         torchvision=torchvision_match(arch), source=source)


def _run_task(run_dir: Path | str, task: str, pretrained: Pretrained | None) -> tuple[dict[str, Tensor], TaskModelSpec]:
    loaded = pretrained or load_pretrained(run_dir)
    if task not in loaded.specs or task not in loaded.model.heads:
        raise PretrainedError(f"{loaded.run_dir / 'tasks.json'}: no task '{task}' (tasks: {sorted(loaded.specs)})")
    tensors, arch = task_model_tensors(loaded.model, task)
    arch["name"] = loaded.cfg.model.backbone
    source = {"run_dir": str(Path(loaded.run_dir).resolve()), "step": loaded.step, "task": task}
    return tensors, task_model_spec(loaded.specs[task], arch, source=source)


def extract_task_model(run_dir: Path | str, *, task: str, out: Path | str,
                       pretrained: Pretrained | None = None) -> TaskModelSpec:
    """Write ``out`` (weights) and its sidecar ``out.with_suffix('.json')`` for ``task`` of ``run_dir``."""
    from safetensors.torch import save_file

    from gppf.engine.checkpoint import atomic_write_text

    tensors, spec = _run_task(run_dir, task, pretrained)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": FORMAT, "task": task})
    atomic_write_text(sidecar_path(out), spec.to_json() + "\n")
    return spec


def task_model_from_run(run_dir: Path | str, *, task: str, pretrained: Pretrained | None = None) -> TaskModel:
    """The ``TaskModel`` of ``task`` straight from a run directory (what extract + load give, no file)."""
    tensors, spec = _run_task(run_dir, task, pretrained)
    return assemble_task_model(spec, tensors, where=Path(run_dir), sidecar=Path(run_dir) / "tasks.json")


def open_task_model(source: Path | str, *, task: str | None = None, device: str | torch.device = "cpu") -> TaskModel:
    """``source``: a run directory (``task`` required) or an extracted ``FILE.safetensors`` (``task``, when
    given, must be the file's task). ``PretrainedError`` / ``TaskModelError`` name what is wrong."""
    source = Path(source)
    if source.is_dir():
        if not task:
            raise PretrainedError(f"{source}: a run directory needs --task (tasks.json lists them)")
        return task_model_from_run(source, task=task).to(device)
    model = load_task_model(source, device=device)
    if task and task != model.spec.name:
        raise TaskModelError(f"{sidecar_path(source)}: holds task '{model.spec.name}', not '{task}'")
    return model
