"""LegoResNet: ResNet-18/50 whose residual-block inner widths are made of lego units.

Following the torchvision layout (same module names), the stem, the residual stream, the last conv of
each block and the downsample projections stay dense and shared. The inner widths (basic block: conv1
out / conv2 in; bottleneck: conv1 out, conv2 in and out, conv3 in) are ``N`` legos of width
``w = planes / k``. A task's active sub-network is therefore exactly a standard ResNet, which is what
``gppf.transfer.extract_resnet`` produces.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gppf.backbones.base import LegoBackbone
from gppf.lego.layers import LegoBatchNorm2d, LegoConv2d, LegoIndex, LegoRows
from gppf.lego.router import Route, TaskRouter, gate_channels

RouteList = list[tuple[Tensor, Tensor | None]]


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
    )


class _LegoBlock(nn.Module):
    """Shared helpers of the two block kinds."""

    route_points: int
    lego_width: int
    legos: int
    active: int

    def _sel(self, route: tuple[Tensor, Tensor | None]) -> tuple[LegoIndex | None, Tensor | None]:
        idx_K, gate_K = route
        if self.legos == self.active and gate_K is None:
            return None, None  # every lego active: the dense fast path
        return LegoIndex(idx_K, self.lego_width), gate_channels(gate_K, self.lego_width)

    def lego_rows(self, point: int) -> list[LegoRows]:
        """Routed parameters: conv ``i`` and BN ``i`` rows are legos of routing point ``point + i - 1``;
        the in-channels of conv ``i > 1`` are legos of point ``point + i - 2``. A conv whose in-channels
        are legos is stored lego-major when ``N > k`` (``LegoConv2d(in_legos=N)``, one row per in-channel
        lego): its in-channel legos are declared, and for the bottleneck ``conv2``, routed on both
        sides, its (in-channel lego, out-channel) cells (``LegoRows.cell_point``: an optimizer then
        touches the ``k x k`` lego blocks a route reads, not ``k x N``). Otherwise the last conv declares
        its columns and the bottleneck ``conv2`` its rows."""
        out = []
        for i in range(1, self.route_points + 2):
            conv = getattr(self, f"conv{i}")
            if conv.in_legos is not None:
                cells = dict(cell_point=point + i - 1, cell_width=self.lego_width) if i <= self.route_points else {}
                out.append(LegoRows(param=conv.weight, point=point + i - 2, width=1, legos=self.legos, **cells))
            elif i > self.route_points:  # the last conv: its in-channels (columns) are legos
                out.append(LegoRows(param=conv.weight, point=point + i - 2, width=self.lego_width,
                                    legos=self.legos, dim=1))
            else:
                out.append(LegoRows(param=conv.weight, point=point + i - 1, width=self.lego_width, legos=self.legos))
            if i <= self.route_points:
                bn = getattr(self, f"bn{i}")
                params = [conv.bias] + ([bn.weight, bn.bias] if bn.affine else [])
                out += [LegoRows(param=p, point=point + i - 1, width=self.lego_width, legos=self.legos)
                        for p in params if p is not None]
        return out

    def _in_legos(self) -> int | None:
        """``in_legos`` of a conv whose in-channels are legos: lego-major wherever a route selects a subset."""
        return self.legos if self.legos > self.active else None


class LegoBasicBlock(_LegoBlock):
    """ResNet basic block with a lego inner width (one routing point)."""

    expansion = 1
    route_points = 1

    def __init__(self, *, inplanes: int, planes: int, stride: int, legos: int, active: int) -> None:
        super().__init__()
        if planes % active:
            raise ValueError(f"planes={planes} not divisible by active={active}")
        self.legos, self.active, self.lego_width = legos, active, planes // active
        mid = legos * self.lego_width
        self.conv1 = LegoConv2d(in_channels=inplanes, out_channels=mid, kernel_size=3, stride=stride,
                                padding=1, active_out_channels=planes)
        self.bn1 = LegoBatchNorm2d(mid)
        self.conv2 = LegoConv2d(in_channels=mid, out_channels=planes, kernel_size=3, padding=1,
                                in_legos=self._in_legos())
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x_BCHW: Tensor, routes: RouteList) -> Tensor:
        ch, gate = self._sel(routes[0])
        out = F.relu(self.bn1(self.conv1(x_BCHW, out_idx=ch), idx=ch, gate=gate), inplace=True)
        out = self.bn2(self.conv2(out, in_idx=ch))
        out += x_BCHW if self.downsample is None else self.downsample(x_BCHW)
        return F.relu(out, inplace=True)


class LegoBottleneck(_LegoBlock):
    """ResNet bottleneck (stride on the 3x3, as torchvision) with two lego routing points."""

    expansion = 4
    route_points = 2

    def __init__(self, *, inplanes: int, planes: int, stride: int, legos: int, active: int) -> None:
        super().__init__()
        if planes % active:
            raise ValueError(f"planes={planes} not divisible by active={active}")
        self.legos, self.active, self.lego_width = legos, active, planes // active
        mid, out = legos * self.lego_width, planes * self.expansion
        self.conv1 = LegoConv2d(in_channels=inplanes, out_channels=mid, kernel_size=1,
                                active_out_channels=planes)
        self.bn1 = LegoBatchNorm2d(mid)
        self.conv2 = LegoConv2d(in_channels=mid, out_channels=mid, kernel_size=3, stride=stride,
                                padding=1, active_out_channels=planes, in_legos=self._in_legos())
        self.bn2 = LegoBatchNorm2d(mid)
        self.conv3 = LegoConv2d(in_channels=mid, out_channels=out, kernel_size=1, in_legos=self._in_legos())
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = _downsample(inplanes, out, stride)

    def forward(self, x_BCHW: Tensor, routes: RouteList) -> Tensor:
        ch1, gate1 = self._sel(routes[0])
        ch2, gate2 = self._sel(routes[1])
        out = F.relu(self.bn1(self.conv1(x_BCHW, out_idx=ch1), idx=ch1, gate=gate1), inplace=True)
        out = F.relu(self.bn2(self.conv2(out, in_idx=ch1, out_idx=ch2), idx=ch2, gate=gate2), inplace=True)
        out = self.bn3(self.conv3(out, in_idx=ch2))
        out += x_BCHW if self.downsample is None else self.downsample(x_BCHW)  # in place, as torchvision
        return F.relu(out, inplace=True)


class LegoResNet(LegoBackbone[list[Tensor]]):
    """ResNet with lego inner widths and a task router; features at strides 4, 8, 16, 32.

    Trunk output: the four stage maps (the pyramid itself); ``pool`` averages the last one.
    """

    def __init__(
        self,
        *,
        block: type[_LegoBlock],
        layers: Sequence[int],
        tasks: Sequence[str],
        legos: int = 8,
        active: int = 2,
        width_mult: float = 1.0,
        router_kwargs: dict | None = None,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        self.depth_layers, self.legos, self.active, self.width_mult = list(layers), legos, active, width_mult
        self.block_type = block
        stem = int(64 * width_mult)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, chans = stem, []
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            planes = int(planes * width_mult)
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(block(inplanes=inplanes, planes=planes, stride=stride, legos=legos, active=active))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.ModuleList(blocks))
            chans.append(inplanes)
        self.feature_channels, self.feature_strides, self.pooled_dim = chans, [4, 8, 16, 32], chans[-1]
        self.blocks: list[_LegoBlock] = [b for i in range(4) for b in getattr(self, f"layer{i + 1}")]
        num_points = sum(b.route_points for b in self.blocks)
        self.router = TaskRouter(tasks=tasks, num_layers=num_points, num_legos=legos, active=active,
                                 **(router_kwargs or {}))
        self._init_weights(zero_init_residual)
        self.init_task_statistics()

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for b in self.blocks:
                last = b.bn3 if isinstance(b, LegoBottleneck) else b.bn2
                nn.init.zeros_(last.weight)

    def forward_features(self, x_BCHW: Tensor, task: str, *, route: Route | None = None) -> list[Tensor]:
        route = self.router(task) if route is None else route
        x = self.maxpool(F.relu(self.bn1(self.conv1(x_BCHW)), inplace=True))
        outs, point = [], 0
        for i in range(4):
            for blk in getattr(self, f"layer{i + 1}"):
                routes = [route.layer(point + j) for j in range(blk.route_points)]
                x = blk(x, routes)
                point += blk.route_points
            outs.append(x)
        return outs

    def pyramid(self, trunk: list[Tensor]) -> list[Tensor]:
        return trunk

    def pool(self, trunk: list[Tensor]) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(trunk[-1], 1), 1)

    def lego_rows(self) -> list[LegoRows]:
        out, point = [], 0
        for blk in self.blocks:
            out += blk.lego_rows(point)
            point += blk.route_points
        return out


def gppf_r18(*, tasks: Sequence[str], legos: int = 8, active: int = 2, width_mult: float = 1.0,
             router: dict | None = None) -> LegoResNet:
    """GPPF-R18: ResNet-18 depth, lego basic blocks."""
    return LegoResNet(block=LegoBasicBlock, layers=[2, 2, 2, 2], tasks=tasks, legos=legos, active=active,
                      width_mult=width_mult, router_kwargs=router)


def gppf_r50(*, tasks: Sequence[str], legos: int = 16, active: int = 4, width_mult: float = 1.0,
             router: dict | None = None) -> LegoResNet:
    """GPPF-R50: ResNet-50 depth, lego bottlenecks."""
    return LegoResNet(block=LegoBottleneck, layers=[3, 4, 6, 3], tasks=tasks, legos=legos, active=active,
                      width_mult=width_mult, router_kwargs=router)
