"""Turn one task's route into a plain dense model.

For ``LegoResNet`` the result is a ``torchvision.models.ResNet`` (``fc = Identity``, so its output is
the backbone's pooled features); at ``width_mult=1`` its state dict loads into
``torchvision.models.resnet18`` / ``resnet50`` unchanged. For ``LegoViT`` it is a
``torchvision.models.VisionTransformer`` with ``heads = Identity``.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torchvision
from torch import Tensor, nn

from gppf.backbones.lego_resnet import LegoBottleneck, LegoResNet
from gppf.lego.router import lego_channels


def _route_channels(backbone: LegoResNet, task: str) -> list[Tensor]:
    """Channel indices of every routing point of ``task`` (deterministic route)."""
    routes = backbone.router.routes()[task]
    out, point = [], 0
    for blk in backbone.blocks:
        for j in range(blk.route_points):
            out.append(lego_channels(torch.tensor(routes[point + j]), blk.lego_width))
        point += blk.route_points
    return out


def _bn_state(prefix: str, bn: nn.BatchNorm2d, idx: Tensor | None) -> dict[str, Tensor]:
    """Affine + running statistics of one BN (call inside ``backbone.task_statistics(task)``)."""
    names = ["weight", "bias", "running_mean", "running_var"]
    state = {f"{prefix}.{n}": getattr(bn, n).detach().clone() for n in names}
    if idx is not None:
        state = {k: v.index_select(0, idx) for k, v in state.items()}
    state[f"{prefix}.num_batches_tracked"] = bn.num_batches_tracked.detach().clone()
    return state


def _conv(w: Tensor, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
    w = w.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx)
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    return w.contiguous()


def resnet_dense_state(backbone: LegoResNet, task: str) -> dict[str, Tensor]:
    """State dict in torchvision ResNet naming for ``task``'s active sub-network (no ``fc``)."""
    was_training = backbone.training
    backbone.eval()  # read the task's own BN running statistics, change nothing
    try:
        with backbone.task_statistics(task):
            return _resnet_dense_state(backbone, task)
    finally:
        backbone.train(was_training)


def _resnet_dense_state(backbone: LegoResNet, task: str) -> dict[str, Tensor]:
    chans = iter(_route_channels(backbone, task))
    sd = {k: v.detach().clone() for k, v in backbone.state_dict().items() if ".task_running_" not in k}
    shared = {k: v for k, v in sd.items() if k.startswith(("conv1.", "bn1.")) or ".downsample." in k}
    state = dict(shared)
    for name, blk in _named_blocks(backbone):
        c1 = next(chans)
        state[f"{name}.conv1.weight"] = _conv(blk.conv1.dense_weight(), c1, None)
        state.update(_bn_state(f"{name}.bn1", blk.bn1, c1))
        if isinstance(blk, LegoBottleneck):
            c2 = next(chans)
            state[f"{name}.conv2.weight"] = _conv(blk.conv2.dense_weight(), c2, c1)
            state.update(_bn_state(f"{name}.bn2", blk.bn2, c2))
            state[f"{name}.conv3.weight"] = _conv(blk.conv3.dense_weight(), None, c2)
            state.update(_bn_state(f"{name}.bn3", blk.bn3, None))
        else:
            state[f"{name}.conv2.weight"] = _conv(blk.conv2.dense_weight(), None, c1)
            state.update(_bn_state(f"{name}.bn2", blk.bn2, None))
    return state


def _named_blocks(backbone: LegoResNet) -> Iterator[tuple[str, nn.Module]]:
    for i in range(4):
        for b, blk in enumerate(getattr(backbone, f"layer{i + 1}")):
            yield f"layer{i + 1}.{b}", blk


def extract_resnet(backbone: LegoResNet, task: str) -> torchvision.models.ResNet:
    """A torchvision ResNet (``fc = Identity``) computing ``task``'s routed pooled features."""
    bottleneck = backbone.block_type is LegoBottleneck
    block = torchvision.models.resnet.Bottleneck if bottleneck else torchvision.models.resnet.BasicBlock
    model = torchvision.models.ResNet(block, backbone.depth_layers)
    state = resnet_dense_state(backbone, task)
    if backbone.width_mult != 1.0:
        _reshape_to(model, state)
    model.fc = nn.Identity()
    model.load_state_dict(state, strict=True)
    return model.eval()


def _reshape_to(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Resize a torchvision model's tensors in place to the shapes of ``state`` (non-standard widths)."""
    for key, value in state.items():
        mod_name, attr = key.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        old = getattr(mod, attr)
        new = torch.empty_like(value)
        if isinstance(old, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new))
        else:
            mod.register_buffer(attr, new)
        if isinstance(mod, nn.Conv2d) and attr == "weight":
            mod.out_channels, mod.in_channels = value.shape[0], value.shape[1]
        if isinstance(mod, nn.BatchNorm2d) and attr == "weight":
            mod.num_features = value.shape[0]


def extract(backbone: nn.Module, task: str) -> nn.Module:
    """Dense model of ``task`` for any supported backbone."""
    if isinstance(backbone, LegoResNet):
        return extract_resnet(backbone, task)
    from gppf.backbones.lego_vit import LegoViT
    from gppf.transfer.extract_vit import extract_vit

    if isinstance(backbone, LegoViT):
        return extract_vit(backbone, task)
    raise TypeError(f"no extraction for {type(backbone).__name__}")
