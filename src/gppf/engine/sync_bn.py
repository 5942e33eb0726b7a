"""Lego-aware synchronised BatchNorm: batch statistics over every rank that trains a task.

``with SyncBatchStats(group): model(x, task, route=route)`` makes every training-mode
``F.batch_norm`` in the block (``nn.BatchNorm1d/2d``, ``LegoBatchNorm2d``, a plugin's BN) normalise
with the mean and variance of the task's *global* batch: the batch of every rank in ``group``
(a ``TaskGroup``). A ``LegoBatchNorm2d`` calls ``F.batch_norm`` on the channels of the task's
route only (it gathers them with its weights), so exactly the routed channel subset is synchronised;
every rank of a group routes the task alike, so every rank reduces tensors of the same shape.

It is a ``TorchFunctionMode`` the SIMT step enters around a task's forward, like autocast: the model
and its modules stay as they are (no module swap, no hook, no extra argument through the backbone),
eval-mode BN and every other function pass through untouched, and outside the block nothing changes.

Per layer the forward all-gathers ``(mean, M2, count)`` of the local channels (Chan's parallel
combination: exact, no cancellation) and the backward all-reduces ``(sum dy, sum dy (x - mean))``
(the input gradient of BN over the global batch, as ``torch.nn.SyncBatchNorm``, whose kernels have
no CPU implementation); the weight and bias gradients stay local (``GradSync`` sums them). Running
statistics are updated with the global mean and unbiased variance, identically on every rank.
Statistics are computed in float32 whatever the input dtype (bf16 autocast).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from gppf.engine.distributed import TaskGroup

_BN_SIGNATURE = inspect.signature(F.batch_norm)


class _GroupBatchNorm(torch.autograd.Function):
    """BatchNorm over the union of the batches of ``group``'s ranks (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
                group: TaskGroup) -> Tensor:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        x32 = x.float()
        var_C, mean_C = torch.var_mean(x32, dim=dims, correction=0)
        n = x.numel() // c
        local = torch.cat([mean_C, var_C * n, mean_C.new_full((1,), float(n))])
        every_RX = group.gather(local)  # [ranks, 2C + 1]
        mean_RC, m2_RC, n_R1 = every_RX[:, :c], every_RX[:, c:2 * c], every_RX[:, 2 * c:]
        total = n_R1.sum()
        mean = (mean_RC * n_R1).sum(0) / total
        m2 = (m2_RC + n_R1 * (mean_RC - mean) ** 2).sum(0)
        invstd = torch.rsqrt(m2 / total + eps)
        if running_mean is not None and running_var is not None and momentum > 0:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = m2 / (total - 1).clamp(min=1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.total, ctx.dims = group, total, dims
        shape = [1, c] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        return (x32 * scale.view(shape) + shift.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        c, dims = x.shape[1], ctx.dims
        shape = [1, c] + [1] * (x.dim() - 2)
        dy = grad.float()
        xmu = x.float() - mean.view(shape)
        sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(dy.dtype)
        if ctx.needs_input_grad[0]:  # the same on every rank of the group (same model, same inputs' graph)
            both = ctx.group.sum_(torch.cat([sum_dy, sum_dy_xmu]))
            mean_dy, mean_dy_xmu = both[:c] / ctx.total, both[c:] / ctx.total
            w = invstd if weight is None else invstd * weight.float()
            grad_x = ((dy - mean_dy.view(shape) - xmu * (invstd**2 * mean_dy_xmu).view(shape))
                      * w.view(shape)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def group_batch_norm(x: Tensor, *, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                     running_var: Tensor | None, momentum: float, eps: float, group: TaskGroup) -> Tensor:
    """Training-mode ``F.batch_norm`` with the batch statistics of every rank of ``group``."""
    return _GroupBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps, group)


class SyncBatchStats(TorchFunctionMode):
    """Inside the block, training-mode ``F.batch_norm`` uses ``group``'s global batch statistics."""

    def __init__(self, group: TaskGroup) -> None:
        super().__init__()
        self.group = group

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        a = _BN_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        if not p["training"]:
            return func(*args, **kwargs)
        return group_batch_norm(p["input"], weight=p["weight"], bias=p["bias"], running_mean=p["running_mean"],
                                running_var=p["running_var"], momentum=float(p["momentum"] or 0.0),
                                eps=float(p["eps"]), group=self.group)
