"""LegoViT: a ViT whose attention heads and MLP hidden units are grouped into lego units.

Per block there are two routing points: attention (``N`` legos of ``heads / k`` heads each) and MLP
(``N`` legos of ``mlp_dim / k`` hidden units). A task's active network is a standard ViT with
``heads`` heads and ``mlp_dim`` hidden units, laid out like ``torchvision.models.VisionTransformer``
(class token, learned position embedding, pre-norm blocks), which is what extraction produces.
Dense features for detection/segmentation come from a simple feature pyramid (ViTDet style).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gppf.backbones.base import LegoBackbone
from gppf.lego.layers import LegoIndex, LegoRows, autocast_dtype, lego_gather
from gppf.lego.router import Route, TaskRouter, gate_channels


class LegoAttention(nn.Module):
    """Multi-head self-attention with heads grouped into legos; one gathered matmul per projection."""

    def __init__(self, *, dim: int, heads: int, legos: int, active: int) -> None:
        super().__init__()
        if heads % active:
            raise ValueError(f"heads={heads} not divisible by active={active}")
        self.head_dim = dim // heads
        self.lego_width = heads // active * self.head_dim
        self.total = legos * self.lego_width
        self.in_proj_weight = nn.Parameter(torch.empty(3 * self.total, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * self.total))
        self.out_proj = nn.Linear(self.total, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def lego_rows(self, point: int) -> list[LegoRows]:
        """The in-projection rows: q, k and v channels of the lego heads (3 stacked copies); the
        out-projection columns: the lego heads' outputs."""
        legos = self.total // self.lego_width
        return [LegoRows(param=p, point=point, width=self.lego_width, legos=legos, copies=3)
                for p in (self.in_proj_weight, self.in_proj_bias)] + [
            LegoRows(param=self.out_proj.weight, point=point, width=self.lego_width, legos=legos, dim=1)]

    def forward(self, x_BSD: Tensor, idx_K: Tensor, gate_K: Tensor | None) -> Tensor:
        legos = self.total // self.lego_width
        ch = LegoIndex(idx_K, self.lego_width)
        rows = LegoIndex(torch.cat([idx_K, idx_K + legos, idx_K + 2 * legos]), self.lego_width)  # q, k, v
        dtype = autocast_dtype(x_BSD)  # gather straight into the compute dtype
        w_qkv = lego_gather(self.in_proj_weight, rows, dtype=dtype)
        b_qkv = lego_gather(self.in_proj_bias, rows, dtype=dtype)
        gate = gate_channels(gate_K, self.lego_width)
        w_out = lego_gather(self.out_proj.weight, None, ch, dtype=dtype)
        if gate is not None:
            w_out = w_out * gate[None, :]
        B, S, _ = x_BSD.shape
        qkv_3BHSd = F.linear(x_BSD, w_qkv, b_qkv).view(B, S, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_BHSd = F.scaled_dot_product_attention(qkv_3BHSd[0], qkv_3BHSd[1], qkv_3BHSd[2])
        return F.linear(attn_BHSd.transpose(1, 2).reshape(B, S, -1), w_out, self.out_proj.bias)


class LegoMLP(nn.Module):
    """Transformer MLP with the hidden layer grouped into legos."""

    def __init__(self, *, dim: int, mlp_dim: int, legos: int, active: int) -> None:
        super().__init__()
        if mlp_dim % active:
            raise ValueError(f"mlp_dim={mlp_dim} not divisible by active={active}")
        self.lego_width = mlp_dim // active
        self.fc1 = nn.Linear(dim, legos * self.lego_width)
        self.fc2 = nn.Linear(legos * self.lego_width, dim)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def lego_rows(self, point: int) -> list[LegoRows]:
        """The rows of ``fc1`` and the columns of ``fc2`` are the hidden (lego) units."""
        legos = self.fc1.out_features // self.lego_width
        return [LegoRows(param=p, point=point, width=self.lego_width, legos=legos) for p in (self.fc1.weight, self.fc1.bias)] + [
            LegoRows(param=self.fc2.weight, point=point, width=self.lego_width, legos=legos, dim=1)]

    def forward(self, x_BSD: Tensor, idx_K: Tensor, gate_K: Tensor | None) -> Tensor:
        ch = LegoIndex(idx_K, self.lego_width)
        dtype = autocast_dtype(x_BSD)
        w2 = lego_gather(self.fc2.weight, None, ch, dtype=dtype)
        gate = gate_channels(gate_K, self.lego_width)
        if gate is not None:
            w2 = w2 * gate[None, :]
        h = F.gelu(F.linear(x_BSD, lego_gather(self.fc1.weight, ch, dtype=dtype),
                            lego_gather(self.fc1.bias, ch, dtype=dtype)))
        return F.linear(h, w2, self.fc2.bias)


class LegoEncoderBlock(nn.Module):
    """Pre-norm transformer block (torchvision naming: ln_1, self_attention, ln_2, mlp)."""

    def __init__(self, *, dim: int, heads: int, mlp_dim: int, legos: int, active: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = LegoAttention(dim=dim, heads=heads, legos=legos, active=active)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = LegoMLP(dim=dim, mlp_dim=mlp_dim, legos=legos, active=active)

    def forward(self, x_BSD: Tensor, attn_route: tuple, mlp_route: tuple) -> Tensor:
        x_BSD = x_BSD + self.self_attention(self.ln_1(x_BSD), *attn_route)
        return x_BSD + self.mlp(self.ln_2(x_BSD), *mlp_route)


class TokenGrid(NamedTuple):
    """The ViT trunk output: normalised tokens ``[B, 1 + H*W, D]`` (class token first) and the patch grid."""

    tokens_BSD: Tensor
    height: int
    width: int


class LegoViT(LegoBackbone[TokenGrid]):
    """Vision transformer with lego attention and MLP; pyramid strides 4, 8, 16, 32 (patch 16).

    Trunk output: a ``TokenGrid``; ``pyramid`` is the simple pyramid of the patch tokens, ``pool`` the class
    token.
    """

    def __init__(self, *, tasks: Sequence[str], image_size: int = 224, patch_size: int = 16, dim: int = 192,
                 depth: int = 12, heads: int = 3, mlp_dim: int = 768, legos: int = 6, active: int = 3,
                 router_kwargs: dict | None = None) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.dim = image_size, patch_size, dim
        self.depth, self.heads, self.mlp_dim, self.legos, self.active = depth, heads, mlp_dim, legos, active
        self.conv_proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = image_size // patch_size
        self.pos_embedding = nn.Parameter(torch.empty(1, grid * grid + 1, dim).normal_(std=0.02))
        self.layers = nn.ModuleList(
            LegoEncoderBlock(dim=dim, heads=heads, mlp_dim=mlp_dim, legos=legos, active=active) for _ in range(depth)
        )
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.fpn = _SimplePyramid(dim=dim, patch_size=patch_size)
        self.feature_channels, self.feature_strides = self.fpn.channels, self.fpn.strides
        self.pooled_dim = dim
        self.router = TaskRouter(tasks=tasks, num_layers=2 * depth, num_legos=legos, active=active,
                                 **(router_kwargs or {}))

    def _pos(self, gh: int, gw: int) -> Tensor:
        grid = self.image_size // self.patch_size
        if (gh, gw) == (grid, grid):
            return self.pos_embedding
        cls_pos, grid_pos = self.pos_embedding[:, :1], self.pos_embedding[:, 1:]
        grid_pos = grid_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], dim=1)

    def lego_rows(self) -> list[LegoRows]:
        return [d for i, blk in enumerate(self.layers)
                for d in blk.self_attention.lego_rows(2 * i) + blk.mlp.lego_rows(2 * i + 1)]

    def forward_features(self, x_BCHW: Tensor, task: str, *, route: Route | None = None) -> TokenGrid:
        """Token sequence after the final norm, with the patch grid size."""
        route = self.router(task) if route is None else route
        x = self.conv_proj(x_BCHW)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self._pos(gh, gw)
        for i, blk in enumerate(self.layers):
            x = blk(x, route.layer(2 * i), route.layer(2 * i + 1))
        return TokenGrid(self.ln(x), gh, gw)

    def pyramid(self, trunk: TokenGrid) -> list[Tensor]:
        tokens = trunk.tokens_BSD
        grid = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], self.dim, trunk.height, trunk.width)
        return self.fpn(grid)

    def pool(self, trunk: TokenGrid) -> Tensor:
        return trunk.tokens_BSD[:, 0]


class _SimplePyramid(nn.Module):
    """ViTDet-style simple feature pyramid from the single stride-``patch`` map."""

    def __init__(self, *, dim: int, patch_size: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
        self.up8 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.channels = [dim // 4, dim // 2, dim, dim]
        self.strides = [patch_size // 4, patch_size // 2, patch_size, patch_size * 2]

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.up4(x), self.up8(x), x, F.max_pool2d(x, 2, ceil_mode=True)]


_VIT_SIZES = {"tiny": (192, 3, 768, 6, 3), "small": (384, 6, 1536, 12, 6), "base": (768, 12, 3072, 8, 4)}


def _make_vit(size: str) -> Callable[..., LegoViT]:
    dim, heads, mlp_dim, default_legos, default_active = _VIT_SIZES[size]

    def build(*, tasks: Sequence[str], legos: int = default_legos, active: int = default_active,
              depth: int = 12, image_size: int = 224, patch_size: int = 16, width_mult: float = 1.0,
              router: dict | None = None) -> LegoViT:
        d = int(dim * width_mult) // heads * heads
        return LegoViT(tasks=tasks, image_size=image_size, patch_size=patch_size, dim=d, depth=depth,
                       heads=heads, mlp_dim=int(mlp_dim * width_mult), legos=legos, active=active,
                       router_kwargs=router)

    build.__name__ = build.__qualname__ = f"gppf_vit_{size}"
    build.__doc__ = f"GPPF-ViT-{size}: dim {dim}, {heads} heads, MLP {mlp_dim}; default {default_legos} legos, {default_active} active."
    return build


gppf_vit_tiny = _make_vit("tiny")  # registered by name in gppf.registry.BACKBONES
gppf_vit_small = _make_vit("small")
gppf_vit_base = _make_vit("base")
