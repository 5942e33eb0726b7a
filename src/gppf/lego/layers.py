"""Lego layers: convolution, linear and BatchNorm whose channels are groups of lego units.

A layer stores the weights of all ``N`` legos. A task's forward gathers the rows (out-channels) and
columns (in-channels) of its selected legos into one weight and runs one ``F.conv2d`` / ``F.linear``:
no Python loop over legos. Selections are channel indices (``Tensor``) or, faster, a ``LegoIndex``
(lego ids and their width: the gather then copies whole lego blocks).

Gradients of lego parameters are accumulated in place: the backward of ``lego_gather`` adds the
gradient of the gathered (task-size) weight directly into the persistent full-size ``param.grad`` at
the selected rows/columns (created as zeros, with the parameter's strides, if ``None``) and hands
autograd no gradient for the parameter. No full-size temporary is allocated and the cost is O(k) per
step, not O(N); unselected legos keep exactly their previous gradient (zero after ``zero_grad``).
Several backward passes in one step (one per task, then router losses) accumulate as usual, and
under autocast the accumulated gradient keeps the parameter's dtype. Consequences:

* Only ``loss.backward()`` (gradients into ``.grad``) is supported for lego parameters:
  ``torch.autograd.grad(loss, lego_param)`` raises, double backward (``create_graph``) raises, and
  tensor / post-accumulate hooks on a lego parameter do not see the gathered contributions.
  gppf's engine uses none of them; its ``GradSync`` all-reduces ``.grad``.
* ``LegoConv2d`` keeps its full-size weight contiguous (``_apply``), also through
  ``model.to(memory_format=torch.channels_last)``: the gather is a flat block copy, and optimizers
  (fused SGD on CPU re-lays out channels_last tensors) run on plain contiguous memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LegoIndex:
    """Legos ``idx_K`` of ``width`` consecutive channels each: channels ``idx * width + [0, width)``."""

    idx_K: Tensor
    width: int

    def channels(self) -> Tensor:
        """The ``[k * width]`` channel indices (as ``gppf.lego.lego_channels``)."""
        offs = torch.arange(self.width, device=self.idx_K.device)
        return (self.idx_K[:, None] * self.width + offs[None, :]).reshape(-1)


Index = Union[Tensor, LegoIndex]


def _blocks(index: Index) -> tuple[Tensor, int]:
    """``(block ids, block width)``; plain channel indices are blocks of width 1."""
    return (index.idx_K, index.width) if isinstance(index, LegoIndex) else (index, 1)


@dataclass(frozen=True)
class _Plan:
    """A gather as one ``index_select(dim, index)`` on a flat view of a contiguous tensor."""

    view: tuple[int, ...]  # the full tensor's view
    dim: int
    index: Tensor
    out_shape: tuple[int, ...]  # the gathered tensor's shape

    @property
    def picked(self) -> tuple[int, ...]:
        """Shape of the selection in the view's coordinates."""
        shape = list(self.view)
        shape[self.dim] = self.index.numel()
        return tuple(shape)

    def gather(self, full: Tensor) -> Tensor:
        """The selection of ``full`` (a strided ``full`` is first copied: the slow path)."""
        return full.contiguous().view(self.view).index_select(self.dim, self.index).view(self.out_shape)

    def accumulate(self, full_grad: Tensor, grad: Tensor) -> None:
        """``full_grad[selection] += grad`` in place (via a contiguous temporary if it is strided)."""
        target = full_grad
        if not full_grad.is_contiguous():
            target = torch.zeros_like(full_grad, memory_format=torch.contiguous_format)
        source = grad.to(target.dtype).reshape(self.picked)
        target.view(self.view).index_add_(self.dim, self.index, source)
        if target is not full_grad:
            full_grad.add_(target)


def _plan(shape: torch.Size, rows: Index | None, cols: Index | None) -> _Plan:
    """Flat view + index that selects ``rows`` (dim 0) and/or ``cols`` (dim 1) of a tensor of ``shape``."""
    rest = shape[2:]
    if cols is None:
        if rows is None:
            raise ValueError("nothing to select: rows and cols are both None")
        r, bo = _blocks(rows)
        return _Plan((shape[0] // bo, -1), 0, r, (r.numel() * bo, *shape[1:]))
    c, bi = _blocks(cols)
    n_cols = c.numel() * bi
    if rows is None:
        return _Plan((shape[0], shape[1] // bi, -1), 1, c, (shape[0], n_cols, *rest))
    row_ch = rows.channels() if isinstance(rows, LegoIndex) else rows
    cells = (row_ch[:, None] * (shape[1] // bi) + c[None, :]).reshape(-1)  # (row, column block) pairs
    return _Plan((shape[0] * (shape[1] // bi), -1), 0, cells, (row_ch.numel(), n_cols, *rest))


class _GatherIntoGrad(torch.autograd.Function):
    """Forward: the selected rows/columns. Backward: accumulate into ``param.grad``, return None."""

    @staticmethod
    def forward(ctx: Any, param: Tensor, plan: _Plan) -> Tensor:  # type: ignore[override]
        ctx.param, ctx.plan = param, plan
        return plan.gather(param)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("lego parameters accumulate into .grad: double backward is not supported")
        if not torch._C._will_engine_execute_node(ctx.next_functions[0][0]):  # the param's AccumulateGrad
            raise RuntimeError("lego parameters accumulate into .grad: use backward(), not autograd.grad")
        param: Tensor = ctx.param
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        ctx.plan.accumulate(param.grad, grad)
        return None, None


def lego_gather(param: Tensor, rows: Index | None = None, cols: Index | None = None) -> Tensor:
    """``param[rows][:, cols]`` (``None``: all); its gradient accumulates in place into ``param.grad``.

    Only a leaf ``param`` takes the in-place path; a non-leaf tensor is gathered with plain autograd.
    """
    if rows is None and cols is None:
        return param
    plan = _plan(param.shape, rows, cols)
    if not (param.is_leaf and param.requires_grad and torch.is_grad_enabled()):
        return plan.gather(param)
    return _GatherIntoGrad.apply(param, plan)


def _channels(index: Index) -> Tensor:
    return index.channels() if isinstance(index, LegoIndex) else index


class LegoConv2d(nn.Module):
    """``Conv2d`` over the full lego width; ``forward`` runs only the selected channels.

    ``in_channels`` / ``out_channels`` are full widths (all legos). ``in_idx`` / ``out_idx`` select
    channels (indices or a ``LegoIndex``); ``None`` means the dense (shared) side.
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

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LegoConv2d:
        """As ``Module._apply``, but the full-size tensors stay contiguous (see the module docstring)."""
        return super()._apply(lambda t: fn(t).contiguous(), recurse)

    def forward(self, x_BCHW: Tensor, *, in_idx: Index | None = None, out_idx: Index | None = None) -> Tensor:
        weight = lego_gather(self.weight, out_idx, in_idx)
        bias = None if self.bias is None else lego_gather(self.bias, out_idx)
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
        in_idx: Index | None = None,
        out_idx: Index | None = None,
        gate_out: Tensor | None = None,
    ) -> Tensor:
        weight = lego_gather(self.weight, out_idx, in_idx)
        bias = None if self.bias is None else lego_gather(self.bias, out_idx)
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

    def forward(self, x_BCHW: Tensor, *, idx: Index | None = None, gate: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if idx is None and gate is None:
            return super().forward(x_BCHW)
        weight, bias = lego_gather(self.weight, idx), lego_gather(self.bias, idx)
        if gate is not None:
            weight, bias = weight * gate, bias * gate
        use_batch_stats = self.training or self.running_mean is None
        if idx is None:
            return F.batch_norm(
                x_BCHW, self.running_mean, self.running_var, weight, bias,
                use_batch_stats, self.momentum or 0.0, self.eps,
            )
        ch = _channels(idx)
        mean_C = self.running_mean.index_select(0, ch)
        var_C = self.running_var.index_select(0, ch)
        out = F.batch_norm(
            x_BCHW, mean_C, var_C, weight, bias, use_batch_stats, self.momentum or 0.0, self.eps
        )
        if self.training:
            with torch.no_grad():
                self.running_mean.index_copy_(0, ch, mean_C)
                self.running_var.index_copy_(0, ch, var_C)
        return out
