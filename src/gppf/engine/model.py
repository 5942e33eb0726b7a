"""The multi-task model: one lego backbone shared by every task, one head per task."""
from __future__ import annotations

from torch import Tensor, nn

from gppf.backbones.base import LegoBackbone
from gppf.interfaces import Features, Outputs
from gppf.lego.router import Route


class MultiTaskModel(nn.Module):
    """``backbone`` routed per task plus ``heads[task]``; ``forward`` returns the head's raw outputs."""

    def __init__(self, *, backbone: LegoBackbone, heads: dict[str, nn.Module], frozen_backbone: bool = False) -> None:
        """``heads``: task -> an ``nn.Module`` satisfying ``gppf.interfaces.Head``. ``frozen_backbone``
        (linear probing): the backbone stays in eval mode (BatchNorm running statistics used and left
        unchanged) whatever ``train()`` says; only its router follows ``train()``."""
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.frozen_backbone = frozen_backbone
        self.train()

    def train(self, mode: bool = True) -> MultiTaskModel:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
            self.backbone.router.train(mode)
        return self

    def features(self, images_BCHW: Tensor, task: str, *, route: Route | None = None) -> Features:
        return self.backbone(images_BCHW, task, route=route)

    def forward(self, images_BCHW: Tensor, task: str, *, route: Route | None = None) -> Outputs:
        """``route``: the task's route if the caller drew it already (default: the backbone's router)."""
        return self.heads[task](self.backbone(images_BCHW, task, route=route))

    def param_groups(self, *, lr: float, weight_decay: float, router_lr_mult: float) -> list[dict]:
        """Optimizer groups: weights with decay, norms/biases without, router logits with their own lr."""
        decay, no_decay, router = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("backbone.router."):
                router.append(p)
            elif p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embedding" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": "no_decay"},
        ]
        if router:
            groups.append({"params": router, "weight_decay": 0.0, "lr": lr * router_lr_mult, "name": "router"})
        return groups
