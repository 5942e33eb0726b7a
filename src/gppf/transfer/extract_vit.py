"""Extraction of a ``LegoViT`` task route into ``torchvision.models.VisionTransformer``."""
from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from gppf.backbones.lego_vit import LegoViT
from gppf.lego.router import lego_channels


def vit_dense_state(backbone: LegoViT, task: str) -> dict[str, Tensor]:
    """State dict in torchvision ViT naming for ``task``'s active sub-network (no classifier)."""
    route = torch.tensor(backbone.router.routes()[task])
    sd = {k: v.detach() for k, v in backbone.state_dict().items()}
    state = {
        "class_token": sd["class_token"], "conv_proj.weight": sd["conv_proj.weight"],
        "conv_proj.bias": sd["conv_proj.bias"], "encoder.pos_embedding": sd["pos_embedding"],
        "encoder.ln.weight": sd["ln.weight"], "encoder.ln.bias": sd["ln.bias"],
    }
    for i, blk in enumerate(backbone.layers):
        src, dst = f"layers.{i}", f"encoder.layers.encoder_layer_{i}"
        attn, mlp = blk.self_attention, blk.mlp
        ch_a = lego_channels(route[2 * i], attn.lego_width)
        rows = torch.cat([ch_a, ch_a + attn.total, ch_a + 2 * attn.total])
        ch_m = lego_channels(route[2 * i + 1], mlp.lego_width)
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                state[f"{dst}.{ln}.{p}"] = sd[f"{src}.{ln}.{p}"]
        state[f"{dst}.self_attention.in_proj_weight"] = sd[f"{src}.self_attention.in_proj_weight"][rows]
        state[f"{dst}.self_attention.in_proj_bias"] = sd[f"{src}.self_attention.in_proj_bias"][rows]
        state[f"{dst}.self_attention.out_proj.weight"] = sd[f"{src}.self_attention.out_proj.weight"][:, ch_a]
        state[f"{dst}.self_attention.out_proj.bias"] = sd[f"{src}.self_attention.out_proj.bias"]
        state[f"{dst}.mlp.0.weight"] = sd[f"{src}.mlp.fc1.weight"][ch_m]
        state[f"{dst}.mlp.0.bias"] = sd[f"{src}.mlp.fc1.bias"][ch_m]
        state[f"{dst}.mlp.3.weight"] = sd[f"{src}.mlp.fc2.weight"][:, ch_m]
        state[f"{dst}.mlp.3.bias"] = sd[f"{src}.mlp.fc2.bias"]
    return {k: v.contiguous().clone() for k, v in state.items()}


def extract_vit(backbone: LegoViT, task: str) -> torchvision.models.VisionTransformer:
    """A torchvision ViT (``heads = Identity``) whose output equals ``backbone.forward_pooled(x, task)``."""
    model = torchvision.models.VisionTransformer(
        image_size=backbone.image_size, patch_size=backbone.patch_size, num_layers=backbone.depth,
        num_heads=backbone.heads, hidden_dim=backbone.dim, mlp_dim=backbone.mlp_dim,
    )
    model.load_state_dict(vit_dense_state(backbone, task), strict=False)
    model.heads = nn.Identity()
    return model.eval()
