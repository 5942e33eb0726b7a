"""Lego layers: convolution, linear and BatchNorm whose channels are groups of lego units.

A layer stores the weights of all ``N`` legos. A task's forward gathers the rows (out-channels) and
columns (in-channels) of its selected legos into one weight and runs one ``F.conv2d`` / ``F.linear``:
no Python loop over legos. The backward of ``index_select`` scatters gradient into the selected rows
only, so unselected legos receive exactly zero gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _gather(weight: Tensor, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
    if out_idx is not None:
        weight = weight.index_select(0, out_idx)
    if in_idx is not None:
        weight = weight.index_select(1, in_idx)
    return weight


class LegoConv2d(nn.Module):
    """``Conv2d`` over the full lego width; ``forward`` runs only the selected channels.

    ``in_channels`` / ``out_channels`` are full widths (all legos). ``in_idx`` / ``out_idx`` are
    channel indices (see ``lego_channels``); ``None`` means the dense (shared) side.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        active_out_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Kaiming fan-out of the *active* sub-network, so a routed net starts like its dense twin.
        fan_out = (active_out_channels or out_channels) * kernel_size * kernel_size
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x_BCHW: Tensor, *, in_idx: Tensor | None = None, out_idx: Tensor | None = None) -> Tensor:
        weight = _gather(self.weight, out_idx, in_idx)
        bias = None if self.bias is None else (self.bias if out_idx is None else self.bias[out_idx])
        return F.conv2d(x_BCHW, weight, bias, self.stride, self.padding)


class LegoLinear(nn.Module):
    """``Linear`` over the full lego width; ``forward`` runs only the selected rows/columns."""

    def __init__(self, *, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        x: Tensor,
        *,
        in_idx: Tensor | None = None,
        out_idx: Tensor | None = None,
        gate_out: Tensor | None = None,
    ) -> Tensor:
        weight = _gather(self.weight, out_idx, in_idx)
        bias = None if self.bias is None else (self.bias if out_idx is None else self.bias[out_idx])
        if gate_out is not None:  # straight-through gate folded into the (small) weight, value 1
            weight = weight * gate_out[:, None]
            bias = None if bias is None else bias * gate_out
        return F.linear(x, weight, bias)


class LegoBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with per-lego statistics: a BN over all channels, gathered like the weights.

    Running statistics of the selected channels are updated in place; others are untouched. The
    straight-through router gate is folded into the gathered affine parameters (value 1), so it costs
    no activation memory or elementwise pass.
    """

    def forward(self, x_BCHW: Tensor, *, idx: Tensor | None = None, gate: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if idx is None and gate is None:
            return super().forward(x_BCHW)
        weight = self.weight if idx is None else self.weight.index_select(0, idx)
        bias = self.bias if idx is None else self.bias.index_select(0, idx)
        if gate is not None:
            weight, bias = weight * gate, bias * gate
        use_batch_stats = self.training or self.running_mean is None
        if idx is None:
            return F.batch_norm(
                x_BCHW, self.running_mean, self.running_var, weight, bias,
                use_batch_stats, self.momentum or 0.0, self.eps,
            )
        mean_C = self.running_mean.index_select(0, idx)
        var_C = self.running_var.index_select(0, idx)
        out = F.batch_norm(
            x_BCHW, mean_C, var_C, weight, bias, use_batch_stats, self.momentum or 0.0, self.eps
        )
        if self.training:
            with torch.no_grad():
                self.running_mean.index_copy_(0, idx, mean_C)
                self.running_var.index_copy_(0, idx, var_C)
        return out
