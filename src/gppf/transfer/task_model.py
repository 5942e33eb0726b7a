"""A whole task model (routed backbone + head) as a plain dense network with no lego code.

``gppf extract`` writes ``FILE.safetensors`` (keys ``backbone.*`` in torchvision naming, ``head.*``) and the
sidecar ``FILE.json`` (``TaskModelSpec``; schema in docs/deploy.md). ``load_task_model(FILE)`` rebuilds a
``TaskModel``: a torchvision ``ResNet`` / ``VisionTransformer`` trunk at the extracted widths that returns
the same ``Features`` as the routed backbone, plus the task's gppf head, rebuilt from its recorded
constructor arguments. Weights are read with safetensors only.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from gppf.interfaces import Features, Outputs
from gppf.transfer.pretrained import TaskSpec, build_head

__all__ = ["FORMAT", "ResNetTrunk", "TaskModel", "TaskModelError", "TaskModelSpec", "ViTTrunk",
           "assemble_task_model", "load_task_model", "read_sidecar", "sidecar_path"]

FORMAT, VERSION = "gppf-task-model", 1


class TaskModelError(ValueError):
    """An extracted task model cannot be loaded; the message names the file and the key."""


def sidecar_path(weights: Path | str) -> Path:
    """``FILE.json`` next to ``FILE.safetensors``."""
    return Path(weights).with_suffix(".json")


# ----------------------------------------------------------------------------- trunks


def _empty_conv(conv: nn.Conv2d, out_ch: int, in_ch: int) -> None:
    conv.weight = nn.Parameter(torch.empty(out_ch, in_ch, *conv.kernel_size, device="meta"))
    conv.out_channels, conv.in_channels = out_ch, in_ch


def _empty_bn(bn: nn.BatchNorm2d, n: int) -> None:
    bn.weight = nn.Parameter(torch.empty(n, device="meta"))
    bn.bias = nn.Parameter(torch.empty(n, device="meta"))
    bn.register_buffer("running_mean", torch.empty(n, device="meta"))
    bn.register_buffer("running_var", torch.empty(n, device="meta"))
    bn.num_features = n


class ResNetTrunk(torchvision.models.ResNet):
    """A torchvision ``ResNet`` (``fc = Identity``) at any widths whose ``forward`` returns ``Features``:
    the four stage maps (strides 4/8/16/32) and the average-pooled last one, as ``LegoResNet``.

    Built on the meta device; call ``load_state_dict(state, strict=True, assign=True)`` to fill it.
    """

    def __init__(self, *, block: str, layers: Sequence[int], stem_width: int, stage_widths: Sequence[int],
                 inner_widths: Sequence[Sequence[Sequence[int]]]) -> None:
        bottleneck = block == "bottleneck"
        tv_block = torchvision.models.resnet.Bottleneck if bottleneck else torchvision.models.resnet.BasicBlock
        with torch.device("meta"):
            super().__init__(tv_block, list(layers))
        self.fc = nn.Identity()
        _empty_conv(self.conv1, stem_width, 3)
        _empty_bn(self.bn1, stem_width)
        inplanes = stem_width
        for i, planes in enumerate(stage_widths):
            out = planes * tv_block.expansion
            for blk, widths in zip(getattr(self, f"layer{i + 1}"), inner_widths[i]):
                convs = [blk.conv1, blk.conv2] + ([blk.conv3] if bottleneck else [])
                bns = [blk.bn1, blk.bn2] + ([blk.bn3] if bottleneck else [])
                chans = [inplanes, *widths, out]
                for conv, bn, c_in, c_out in zip(convs, bns, chans[:-1], chans[1:]):
                    _empty_conv(conv, c_out, c_in)
                    _empty_bn(bn, c_out)
                if blk.downsample is not None:
                    _empty_conv(blk.downsample[0], out, inplanes)
                    _empty_bn(blk.downsample[1], out)
                inplanes = out

    def forward(self, x_BCHW: Tensor) -> Features:  # type: ignore[override]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x_BCHW))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return Features(pyramid=maps, pooled=torch.flatten(self.avgpool(x), 1))


class ViTTrunk(torchvision.models.VisionTransformer):
    """A torchvision ``VisionTransformer`` (``heads = Identity``) plus the ViTDet simple pyramid ``fpn``
    (strides patch/4, patch/2, patch, 2 patch); ``forward`` returns ``Features`` as ``LegoViT`` (pooled =
    class token after the final norm; position embeddings resized bicubically for other input sizes)."""

    def __init__(self, *, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 mlp_dim: int) -> None:
        with torch.device("meta"):
            super().__init__(image_size=image_size, patch_size=patch_size, num_layers=depth, num_heads=heads,
                             hidden_dim=dim, mlp_dim=mlp_dim)
            self.heads = nn.Identity()
            self.fpn = nn.ModuleDict({
                "up4": nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.GELU(),
                                     nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)),
                "up8": nn.ConvTranspose2d(dim, dim // 2, 2, 2),
            })

    def _position(self, gh: int, gw: int) -> Tensor:
        pos_1SD = self.encoder.pos_embedding
        grid = self.image_size // self.patch_size
        if (gh, gw) == (grid, grid):
            return pos_1SD
        maps = pos_1SD[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        maps = F.interpolate(maps, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pos_1SD[:, :1], maps.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x_BCHW: Tensor) -> Features:  # type: ignore[override]
        x = self.conv_proj(x_BCHW)
        batch, dim, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(batch, -1, -1), x], dim=1) + self._position(gh, gw)
        tokens_BSD = self.encoder.ln(self.encoder.layers(x))
        grid_BDhw = tokens_BSD[:, 1:].transpose(1, 2).reshape(batch, dim, gh, gw)
        pyramid = [self.fpn["up4"](grid_BDhw), self.fpn["up8"](grid_BDhw), grid_BDhw,
                   F.max_pool2d(grid_BDhw, 2, ceil_mode=True)]
        return Features(pyramid=pyramid, pooled=tokens_BSD[:, 0])


# ----------------------------------------------------------------------------- sidecar


_RESNET_KEYS = {"block": str, "layers": list, "stem_width": int, "stage_widths": list, "inner_widths": list}
_VIT_KEYS = {"image_size": int, "patch_size": int, "dim": int, "depth": int, "heads": int, "mlp_dim": int}
_JSON_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "list": list, "dict": dict}
_COMMON_BACKBONE_KEYS = {"kind": str, "name": str, "feature_channels": list, "feature_strides": list,
                         "pooled_dim": int}


@dataclass(frozen=True)
class TaskModelSpec(TaskSpec):
    """The sidecar ``FILE.json`` of an extracted task model: the task's ``TaskSpec`` (``name`` is the task)
    plus the format, the backbone architecture, the torchvision match and the source run (docs/deploy.md)."""

    format: str
    version: int
    backbone: dict[str, Any]
    torchvision: dict[str, Any]
    source: dict[str, Any]

    def to_json(self) -> str:
        doc = asdict(self)
        head = {"format": doc.pop("format"), "version": doc.pop("version")}
        return json.dumps({**head, **doc}, indent=1)


def _check_types(doc: dict[str, Any], expected: dict[str, type], where: str, path: Path) -> None:
    for key, kind in expected.items():
        if key not in doc:
            raise TaskModelError(f"{path}: missing key '{where}{key}'")
        value = doc[key]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (kind is int and isinstance(value, bool)):
            raise TaskModelError(f"{path}: key '{where}{key}' must be {kind.__name__}, got {value!r}")


def _check_backbone(bb: dict[str, Any], path: Path) -> None:
    _check_types(bb, _COMMON_BACKBONE_KEYS, "backbone.", path)
    if bb["kind"] == "resnet":
        _check_types(bb, _RESNET_KEYS, "backbone.", path)
        points = {"basic": 1, "bottleneck": 2}.get(bb["block"])
        if points is None:
            raise TaskModelError(f"{path}: 'backbone.block' must be basic|bottleneck, got {bb['block']!r}")
        inner = bb["inner_widths"]
        shape_ok = (len(bb["layers"]) == len(bb["stage_widths"]) == len(inner) == 4
                    and all(len(s) == n for s, n in zip(inner, bb["layers"]))
                    and all(len(w) == points for s in inner for w in s))
        if not shape_ok:
            raise TaskModelError(f"{path}: 'backbone.inner_widths' does not match 'backbone.layers' "
                                 f"{bb['layers']} ({points} width(s) per {bb['block']} block, 4 stages)")
    elif bb["kind"] == "vit":
        _check_types(bb, _VIT_KEYS, "backbone.", path)
    else:
        raise TaskModelError(f"{path}: 'backbone.kind' must be resnet|vit, got {bb['kind']!r}")


def read_sidecar(path: Path | str) -> TaskModelSpec:
    """Read and validate a sidecar (``TaskModelError`` naming the file and the key on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise TaskModelError(f"{path}: missing (the JSON sidecar `gppf extract` writes next to the weights)")
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise TaskModelError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise TaskModelError(f"{path}: not a gppf task model sidecar (a JSON object is expected)")
    types = {f.name: _JSON_TYPES[str(f.type).split("[")[0]] for f in fields(TaskModelSpec)}
    _check_types(doc, types, "", path)
    if doc["format"] != FORMAT or doc["version"] != VERSION:
        raise TaskModelError(f"{path}: 'format'/'version' are {doc['format']!r}/{doc['version']!r}, "
                             f"expected {FORMAT!r}/{VERSION}")
    _check_backbone(doc["backbone"], path)
    unknown = sorted(set(doc) - set(types))
    if unknown:
        raise TaskModelError(f"{path}: unknown key(s) {unknown}")
    return TaskModelSpec(**doc)


# ----------------------------------------------------------------------------- model


class TaskModel(nn.Module):
    """``backbone`` (a torchvision trunk returning ``Features``) + ``head`` (the task's gppf head).

    ``forward(x_BCHW)`` returns the head's raw outputs, equal to the routed ``MultiTaskModel(x, task)``
    in eval mode; ``head.predict(outputs, batch)`` turns them into predictions. ``spec``: the sidecar.
    """

    def __init__(self, *, backbone: nn.Module, head: nn.Module, spec: TaskModelSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec

    def features(self, x_BCHW: Tensor) -> Features:
        return self.backbone(x_BCHW)

    def forward(self, x_BCHW: Tensor) -> Outputs:
        return self.head(self.backbone(x_BCHW))


def build_trunk(spec: TaskModelSpec) -> nn.Module:
    """The empty (meta-device) trunk the sidecar describes."""
    bb = spec.backbone
    if bb["kind"] == "resnet":
        return ResNetTrunk(block=bb["block"], layers=bb["layers"], stem_width=bb["stem_width"],
                           stage_widths=bb["stage_widths"], inner_widths=bb["inner_widths"])
    return ViTTrunk(image_size=bb["image_size"], patch_size=bb["patch_size"], dim=bb["dim"], depth=bb["depth"],
                    heads=bb["heads"], mlp_dim=bb["mlp_dim"])


def _build_head(spec: TaskModelSpec, path: Path) -> nn.Module:
    try:
        return build_head(spec)
    except Exception as exc:  # unknown task type or head arguments: name the sidecar
        raise TaskModelError(f"{path}: cannot build the '{spec.type}' head from 'head_args': {exc}") from exc


def load_task_model(path: Path | str, *, device: str | torch.device = "cpu") -> TaskModel:
    """The extracted task model ``FILE.safetensors`` (+ its sidecar ``FILE.json``), in eval mode."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    side = sidecar_path(path)
    spec = read_sidecar(side)
    if not path.is_file():
        raise TaskModelError(f"{path}: missing (weights of the task model described by {side})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise TaskModelError(f"{path}: not a safetensors file ({exc})") from exc
    if meta.get("format", FORMAT) != FORMAT or meta.get("task", spec.name) != spec.name:
        raise TaskModelError(f"{path}: holds {meta.get('format')} task '{meta.get('task')}' but {side} describes "
                             f"task '{spec.name}'")
    return assemble_task_model(spec, tensors, where=path, sidecar=side).to(device)


def assemble_task_model(spec: TaskModelSpec, tensors: dict[str, Tensor], *, where: Path | str = "<tensors>",
                        sidecar: Path | str = "<sidecar>") -> TaskModel:
    """The ``TaskModel`` (eval mode) of ``spec`` holding ``tensors`` (``backbone.*`` / ``head.*`` keys)."""
    parts: dict[str, dict[str, Tensor]] = {"backbone": {}, "head": {}}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise TaskModelError(f"{where}: unexpected key '{key}' (expected backbone.* and head.*)")
        parts[prefix][rest] = value
    trunk, head = build_trunk(spec), _build_head(spec, Path(sidecar))
    for name, module in (("backbone", trunk), ("head", head)):
        try:
            module.load_state_dict(parts[name], strict=True, assign=name == "backbone")
        except RuntimeError as exc:
            raise TaskModelError(f"{where}: '{name}' weights do not match the architecture in {sidecar}: {exc}") from exc
    return TaskModel(backbone=trunk, head=head, spec=spec).eval()
