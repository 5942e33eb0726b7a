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
(``LegoBatchNorm2d``'s affine parameters, ``N * w`` values each, take plain autograd instead: there a
full-size gradient costs less than the autograd function.)
Several backward passes in one step (one per task, then router losses) accumulate as usual, and
under autocast the accumulated gradient keeps the parameter's dtype. Consequences:

* Only ``loss.backward()`` (gradients into ``.grad``) is supported for lego parameters:
  ``torch.autograd.grad(loss, lego_param)`` raises, double backward (``create_graph``) raises, and
  tensor / post-accumulate hooks on a lego parameter do not see the gathered contributions.
  gppf's engine uses none of them; its ``GradSync`` all-reduces ``.grad``.
* ``LegoConv2d`` (no bias) without autocast keeps no gathered weight for its backward
  (``routed_conv2d``): the backward gathers again, so until its backward a routed network holds what
  its dense twin holds (the convolutions' inputs), not also a copy of every gathered weight (CPU,
  float32, GPPF-R18 32 px, two tasks: a step's working memory 1.58x -> 1.00x the dense twin's, for one
  more block copy per weight). Under autocast both keep one cast copy per layer.
* A ``LegoConv2d`` weight takes the layout its module is given, as any ``nn.Conv2d``:
  ``model.to(memory_format=torch.channels_last)`` (gppf's default) stores it channels_last, the
  layout its gathered weights are made in for channels_last inputs, so a gather and its gradient's
  accumulation copy runs of memory in the same order instead of transposing every element (a
  transposing copy with a cast cost 2-3x a plain one on CPU). ``gppf.lego.optim.LegoSGD`` updates such
  a weight on flat views of its memory.
* ``LegoConv2d(in_legos=N)`` (a conv whose in-channels are legos) stores its weight lego-major,
  ``[N, O, kh * kw * w]``: reading ``w`` in-channels out of every ``[kh, kw]`` row of a channels_last
  weight is bound by memory latency on CPU (3-4x the cast of a dense weight of the same size); whole
  lego blocks are read at the speed of a plain copy, and ``LegoSGD`` sees one row per lego.

Which parameters are lego parameters is declared, not registered: a model lists its routed
parameters as :class:`LegoRows` (parameter, routing point, lego width, number of legos, copies, and
the routed dim: 0 for rows, 1 for columns; or (row, column) cells of a weight routed on both sides), and
:func:`rows_used` turns the routes a step runs into the rows (columns, cells) of each such parameter
those routes read and write. That is the whole link between a training step and a lazy optimizer
(``gppf.lego.optim.LegoSGD``): this module imports no optimizer, a gather never changes a weight,
and nothing here keeps state between calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Union

import numpy as np
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


@dataclass(frozen=True, eq=False)
class LegoRows:
    """Declares that dim ``dim`` of ``param`` (0: rows, out-channels; 1: columns, in-channels) is made
    of lego channels chosen at routing point ``point``.

    Along ``dim`` there are ``copies`` stacked blocks (e.g. q, k, v: 3) of ``legos`` legos of
    ``width`` channels each; a route choosing legos ``idx_K`` at ``point`` reads and writes channels
    ``(idx_K + c * legos) * width + [0, width)`` of every block ``c`` along ``dim``, and no others.
    Models list these (``LegoBackbone.lego_rows()``); parameters that are not listed are dense (every
    channel used). A parameter routed on both sides (rows and columns) is declared once, by its rows:
    a row a route uses is then updated whole, which is exact; or, where its dim 1 follows dim 0 in
    memory (a lego-major ``[N, O, kh * kw * w]`` weight), by *cells*: ``cell_point`` / ``cell_width``
    say that dim 1 is lego channels too, of ``cell_width`` channels chosen at routing point
    ``cell_point``, and the declared units are then the ``shape[0] * shape[1]`` (row, dim-1 channel)
    pairs, each a contiguous stretch of memory: a route uses the pairs of its own legos on both sides,
    so an optimizer touches ``k * k`` of the ``N * N`` lego blocks a route reads, not ``k * N``.
    """

    param: nn.Parameter
    point: int
    width: int
    legos: int
    copies: int = 1
    dim: int = 0
    cell_point: int | None = None
    cell_width: int = 1

    def __post_init__(self) -> None:
        if self.dim not in (0, 1) or self.param.dim() <= self.dim:
            raise ValueError(f"a lego parameter of shape {tuple(self.param.shape)} has no lego dim {self.dim}")
        if self.param.shape[self.dim] != self.copies * self.legos * self.width:
            raise ValueError(f"a lego parameter of shape {tuple(self.param.shape)} does not have "
                             f"{self.copies} x {self.legos} legos x {self.width} channels along dim {self.dim}")
        if self.cell_point is not None and (self.dim != 0 or self.param.dim() < 2 or not self.param.is_contiguous()
                                            or self.param.shape[1] % self.cell_width):
            raise ValueError(f"cells of a lego parameter of shape {tuple(self.param.shape)}: need rows (dim 0), a "
                             f"contiguous tensor and dim 1 made of legos of {self.cell_width} channels")

    @property
    def units(self) -> int:
        """How many units an optimizer tracks: channels along ``dim``, or (row, dim-1 channel) cells."""
        return self.param.shape[0] * self.param.shape[1] if self.cell_point is not None else self.param.shape[self.dim]

    def rows(self, idx_K: np.ndarray) -> np.ndarray:
        """Channel indices along ``dim`` read by a route that picks legos ``idx_K`` (host ``int`` array)."""
        ids = (idx_K[None, :] + self.legos * np.arange(self.copies)[:, None]).reshape(-1)
        return (ids[:, None] * self.width + np.arange(self.width)[None, :]).reshape(-1)

    def used(self, idx_LK: np.ndarray) -> np.ndarray:
        """Units (``units``) read by the route ``idx_LK`` (legos per routing point; host ``int`` array)."""
        rows = self.rows(idx_LK[self.point])
        if self.cell_point is None:
            return rows
        cols = (idx_LK[self.cell_point][:, None] * self.cell_width + np.arange(self.cell_width)[None, :]).reshape(-1)
        return (rows[:, None] * self.param.shape[1] + cols[None, :]).reshape(-1)


def rows_used(declared: Iterable[LegoRows], routes_idx_LK: Iterable[Tensor]) -> dict[Tensor, np.ndarray]:
    """Per declared parameter, the ``bool`` mask of its units (``LegoRows.units``: channels along its
    declared ``dim``, or cells) that any of these routes (``idx_LK``) uses.

    One host copy per route (a device sync per route on a GPU); a parameter declared twice gets the
    union of its masks (declaring one parameter along two dims raises).
    """
    host = [idx.detach().cpu().numpy() for idx in routes_idx_LK]
    used: dict[Tensor, np.ndarray] = {}
    dims: dict[int, int] = {}
    for d in declared:
        if dims.setdefault(id(d.param), d.dim) != d.dim:
            raise ValueError(f"a parameter of shape {tuple(d.param.shape)} is declared along dims 0 and 1: "
                             "declare its rows only")
        mask_R = used.get(d.param)
        if mask_R is None:
            mask_R = used[d.param] = np.zeros(d.units, dtype=bool)
        elif mask_R.size != d.units:
            raise ValueError(f"a parameter of shape {tuple(d.param.shape)} is declared by rows and by cells")
        for idx_LK in host:
            mask_R[d.used(idx_LK)] = True
    return used


def _blocks(index: Index) -> tuple[Tensor, int]:
    """``(block ids, block width)``; plain channel indices are blocks of width 1."""
    return (index.idx_K, index.width) if isinstance(index, LegoIndex) else (index, 1)


@dataclass(frozen=True)
class _Plan:
    """A gather as one ``index_select(dim, index)`` on a flat view of the tensor in memory order.

    ``perm`` is the memory order of the full tensor (``(0, 2, 3, 1)`` for a channels_last weight, else
    the identity); ``view``, ``dim`` and ``index`` address the tensor permuted so, and the gathered
    tensor has the full tensor's layout (a channels_last weight gives a channels_last selection).
    """

    view: tuple[int, ...]  # the full tensor's view (in memory order)
    dim: int
    index: Tensor
    out_shape: tuple[int, ...]  # the gathered tensor's shape (in memory order)
    perm: tuple[int, ...]

    @property
    def picked(self) -> tuple[int, ...]:
        """Shape of the selection in the view's coordinates."""
        shape = list(self.view)
        shape[self.dim] = self.index.numel()
        return tuple(shape)

    def _inverse(self) -> tuple[int, ...]:
        return tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))

    def gather(self, full: Tensor) -> Tensor:
        """The selection of ``full`` (a ``full`` not laid out as planned is first copied: the slow path)."""
        mem = full.permute(self.perm).contiguous().view(self.view)
        return mem.index_select(self.dim, self.index).view(self.out_shape).permute(self._inverse())

    def accumulate(self, full_grad: Tensor, grad: Tensor) -> None:
        """``full_grad[selection] += grad`` in place (via a temporary if it is not laid out as planned)."""
        target = full_grad.permute(self.perm)
        if not target.is_contiguous():
            target = torch.zeros_like(target, memory_format=torch.contiguous_format)
        source = grad.permute(self.perm).to(target.dtype).reshape(self.picked)
        target.view(self.view).index_add_(self.dim, self.index, source)
        if target.data_ptr() != full_grad.data_ptr():
            full_grad.add_(target.permute(self._inverse()))


def memory_order(t: Tensor) -> tuple[int, ...] | None:
    """The permutation of ``t``'s dims that makes it contiguous (outermost dim first: ``(0, 2, 3, 1)``
    for a channels_last weight), or ``None`` if ``t`` is not dense in memory."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return (0, 2, 3, 1)
    perm = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))  # stable: ties keep dim order
    return perm if t.permute(perm).is_contiguous() else None


def _plan(full: Tensor, rows: Index | None, cols: Index | None) -> _Plan:
    """Flat view + index that selects ``rows`` (dim 0) and/or ``cols`` (dim 1) of ``full``, in its
    memory order (channels_last: ``[O, kh, kw, I]``, in-channels innermost)."""
    if rows is None and cols is None:
        raise ValueError("nothing to select: rows and cols are both None")
    cl = memory_order(full) == (0, 2, 3, 1)  # (a 1x1 weight's two layouts are one: contiguous)
    perm = (0, 2, 3, 1) if cl else tuple(range(full.dim()))
    shape = full.shape
    lead = shape[2:] if cl else ()  # dims between rows and columns in memory order
    rest = () if cl else shape[2:]  # dims after columns in memory order
    n_lead = math.prod(lead)
    if cols is None:
        r, bo = _blocks(rows)  # type: ignore[arg-type]
        mem = (r.numel() * bo, *lead, *shape[1:2], *rest)
        return _Plan((shape[0] // bo, -1), 0, r, mem, perm)
    c, bi = _blocks(cols)
    n_cols = c.numel() * bi
    if rows is None:
        view = (shape[0] * n_lead, shape[1] // bi, -1)
        return _Plan(view, 1, c, (shape[0], *lead, n_cols, *rest), perm)
    row_ch = rows.channels() if isinstance(rows, LegoIndex) else rows
    lanes = (row_ch[:, None] * n_lead + torch.arange(n_lead, device=row_ch.device)[None, :]).reshape(-1)
    cells = (lanes[:, None] * (shape[1] // bi) + c[None, :]).reshape(-1)  # (row, lead, column block)
    return _Plan((shape[0] * n_lead * (shape[1] // bi), -1), 0, cells, (row_ch.numel(), *lead, n_cols, *rest),
                 perm)


Run = tuple[int, int, int]  # (first channel in the gathered tensor, first channel in the full one, count)


def _runs(index: LegoIndex | None, size: int) -> list[Run]:
    """Channel runs of a lego selection, consecutive legos merged (``None``: everything, one run)."""
    if index is None:
        return [(0, 0, size)]
    runs: list[Run] = []
    for lego in index.idx_K.tolist():
        start = lego * index.width
        if runs and runs[-1][1] + runs[-1][2] == start:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + index.width)
        else:
            runs.append((runs[-1][0] + runs[-1][2] if runs else 0, start, index.width))
    return runs


def _block(t: Tensor, starts: tuple[int, ...], sizes: tuple[int, ...],
           strides: tuple[int, ...] | None = None) -> Tensor:
    """``t[s0:s0 + n0, s1:s1 + n1, ...]`` over its leading dims as one ``as_strided`` view (``strides``:
    of another view of ``t``'s memory, e.g. a permutation). A Python slice per dim (and the permuted
    view under it) costs a dispatch each; a lego gather takes one block per run pair, forward and back."""
    st = t.stride() if strides is None else strides
    return t.as_strided((*sizes, *t.shape[len(sizes):]) if strides is None else sizes, st,
                        t.storage_offset() + sum(a * b for a, b in zip(starts, st)))


@dataclass(frozen=True)
class _BlockPlan:
    """A gather of whole lego blocks on the host: one strided ``copy_`` per (row run, column run).

    Each copy also casts (e.g. to the autocast dtype) and lays the result out as asked (channels_last
    for a convolution fed channels_last), so a routed weight costs one pass over the selected
    elements, as the cast of a dense weight does; the backward adds each gradient block into the
    full-size ``.grad`` (a bf16 block is cast to float32 inside ``add_``, as autograd casts a dense
    weight's gradient before accumulating it). Each block is one ``as_strided`` view (``_block``).
    """

    row_runs: list[Run]
    col_runs: list[Run] | None  # None: a 1-D tensor
    out_shape: tuple[int, ...]

    def _pairs(self) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``(gathered starts, full starts, sizes)`` of each block over the leading one or two dims."""
        if self.col_runs is None:
            return [((dr,), (sr,), (nr,)) for dr, sr, nr in self.row_runs]
        return [((dr, dc), (sr, sc), (nr, nc)) for dr, sr, nr in self.row_runs for dc, sc, nc in self.col_runs]

    def gather(self, full: Tensor, *, dtype: torch.dtype | None = None, channels_last: bool = False) -> Tensor:
        fmt = torch.channels_last if channels_last and len(self.out_shape) == 4 else torch.contiguous_format
        out = torch.empty(self.out_shape, dtype=dtype or full.dtype, device=full.device, memory_format=fmt)
        for dst, src, sizes in self._pairs():
            _block(out, dst, sizes).copy_(_block(full, src, sizes))
        return out

    def accumulate(self, full_grad: Tensor, grad: Tensor) -> None:
        for dst, src, sizes in self._pairs():
            _block(full_grad, src, sizes).add_(_block(grad, dst, sizes))


def _block_plan(shape: torch.Size, rows: Index | None, cols: Index | None, device: torch.device) -> _BlockPlan | None:
    """A ``_BlockPlan`` for lego selections of a host tensor (``None`` where it does not apply)."""
    if device.type != "cpu" or isinstance(rows, Tensor) or isinstance(cols, Tensor) or (rows is None and cols is None):
        return None
    if len(shape) == 1 and cols is not None:
        return None
    row_runs = _runs(rows, shape[0])
    col_runs = None if len(shape) == 1 else _runs(cols, shape[1])
    out_rows = sum(n for _, _, n in row_runs)
    out_shape = (out_rows,) if col_runs is None else (out_rows, sum(n for _, _, n in col_runs), *shape[2:])
    return _BlockPlan(row_runs, col_runs, out_shape)


def to_lego_major(weight: Tensor, legos: int) -> Tensor:
    """A ``[O, N * w, kh, kw]`` convolution weight as its lego-major storage ``[N, O, kh * kw * w]``
    (contiguous: in-channel lego ``l`` is the block ``[O, kh, kw, w]`` at ``[l]``)."""
    o, c, kh, kw = weight.shape
    if c % legos:
        raise ValueError(f"a weight with {c} in-channels is not made of {legos} legos")
    return weight.unflatten(1, (legos, c // legos)).permute(1, 0, 3, 4, 2).contiguous().view(legos, o, -1)


def from_lego_major(stored: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """The ``[O, N * w, kh, kw]`` weight of a lego-major storage (a copy; differentiable)."""
    o, c, kh, kw = shape
    legos = stored.shape[0]
    return stored.view(legos, o, kh, kw, c // legos).permute(1, 0, 4, 2, 3).reshape(shape)


@dataclass(frozen=True)
class _LegoMajorPlan:
    """A gather of in-channel legos (and optionally rows) from a lego-major weight
    (``LegoConv2d(in_legos=N)``, stored ``[N, O, kh * kw * w]``) into the ``[R, k * w, kh, kw]`` weight a
    convolution reads.

    Each stored lego is one contiguous block (its rows contiguous sub-blocks), so a gather reads whole
    blocks and a channels_last result is written in runs of ``w`` within its own (small) memory: on CPU
    about 3x faster than reading runs of ``w`` in-channels out of every ``[kh, kw]`` row of all ``N``
    legos of a channels_last ``[O, kh, kw, N * w]`` weight (``docs/benchmarks.md``). On the host one
    ``copy_`` per (run of consecutive legos, run of rows), each between two ``as_strided`` views; elsewhere
    one ``index_select`` (no host sync).
    """

    idx_K: Tensor
    rows: Tensor | None  # row (out-channel) indices for the index_select path; None: all (or the host path)
    runs: list[tuple[Run, Run]] | None  # (lego run, row run) pairs (see ``_runs``); None: index_select
    out_shape: tuple[int, int, int, int]  # [R, k * w, kh, kw]
    width: int
    stored_rows: int  # O

    def _blocks(self, t: Tensor) -> Tensor:
        """``[k, R, kh, kw, w]`` view of a gathered ``[R, k * w, kh, kw]`` tensor (any layout)."""
        return t.unflatten(1, (-1, self.width)).permute(1, 0, 3, 4, 2)

    def _block_strides(self, gathered: Tensor, stored: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Strides of ``_blocks(gathered)`` and ``_stored(stored)`` (for ``_block``: one view per run pair)."""
        s0, s1, s2, s3 = gathered.stride()
        a, b, c = stored.stride()
        kw, w = self.out_shape[3], self.width
        return (w * s1, s0, s2, s3, s1), (a, b, kw * w * c, w * c, c)

    def _run_pairs(self, gathered: Tensor, stored: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(block of gathered, block of stored)`` views of each (lego run, row run) (the host path)."""
        g_st, s_st = self._block_strides(gathered, stored)
        tail = (*self.out_shape[2:], self.width)
        return [(_block(gathered, (d, dr), (n, nr, *tail), g_st), _block(stored, (s, sr), (n, nr, *tail), s_st))
                for (d, s, n), (dr, sr, nr) in self.runs or []]

    def _stored(self, full: Tensor) -> Tensor:
        return full.view(-1, self.stored_rows, *self.out_shape[2:], self.width)

    def _cells(self) -> Tensor:
        """Flat ``(lego, row)`` indices into the stored ``[N * O, kh * kw * w]`` (the device path)."""
        rows = torch.arange(self.stored_rows, device=self.idx_K.device) if self.rows is None else self.rows
        return (self.idx_K[:, None] * self.stored_rows + rows[None, :]).reshape(-1)

    def gather(self, full: Tensor, *, dtype: torch.dtype | None = None, channels_last: bool = False) -> Tensor:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(self.out_shape, dtype=dtype or full.dtype, device=full.device, memory_format=fmt)
        if self.runs is None:
            dst, src = self._blocks(out), self._stored(full)
            picked = full.view(-1, full.shape[-1]).index_select(0, self._cells())
            dst.copy_(picked.view(dst.shape[:2] + src.shape[2:]))
        for dst_block, src_block in self._run_pairs(out, full):
            dst_block.copy_(src_block)
        return out

    def accumulate(self, full_grad: Tensor, grad: Tensor) -> None:
        if self.runs is None:
            flat_grad = full_grad.view(-1, full_grad.shape[-1])
            src = self._blocks(grad)
            flat_grad.index_add_(0, self._cells(), src.reshape(-1, flat_grad.shape[-1]).to(flat_grad.dtype))
        for grad_block, full_block in self._run_pairs(grad, full_grad):
            full_block.add_(grad_block)


def _lego_major_plan(stored: Tensor, cols: LegoIndex, rows: Index | None,
                     shape: tuple[int, int, int, int]) -> _LegoMajorPlan:
    """The plan for in-channel legos ``cols`` and rows ``rows`` of a lego-major weight of ``shape``."""
    o, _, kh, kw = shape
    row_ch, runs = None, None
    if stored.device.type == "cpu" and not isinstance(rows, Tensor):
        row_runs = _runs(rows, o)
        runs = [(c, r) for c in _runs(LegoIndex(cols.idx_K, 1), stored.shape[0]) for r in row_runs]
        n_rows = sum(n for _, _, n in row_runs)  # (the runs path needs no channel index tensor)
    else:
        row_ch = None if rows is None else _channels(rows)
        n_rows = o if row_ch is None else row_ch.numel()
    return _LegoMajorPlan(cols.idx_K, row_ch, runs, (n_rows, cols.idx_K.numel() * cols.width, kh, kw), cols.width, o)


Plan = Union[_Plan, _BlockPlan, _LegoMajorPlan]


class _GatherIntoGrad(torch.autograd.Function):
    """Forward: the selected rows/columns. Backward: accumulate into ``param.grad``, return None.

    ``autograd.grad`` must not write into ``.grad``, so the backward first asks the engine whether the
    parameter's ``AccumulateGrad`` node runs in this backward pass: ``torch._C._will_engine_execute_node``
    is private, there is no public equivalent; ``tests/lego/test_layers.py`` pins it (a torch upgrade
    that removes or changes it fails there, not silently here).
    """

    @staticmethod
    def forward(ctx: Any, param: Tensor, plan: Plan,  # type: ignore[override]
                dtype: torch.dtype | None, channels_last: bool) -> Tensor:
        ctx.param, ctx.plan = param, plan
        return _apply_plan(plan, param, dtype, channels_last)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("lego parameters accumulate into .grad: double backward is not supported")
        if not torch._C._will_engine_execute_node(ctx.next_functions[0][0]):  # the param's AccumulateGrad
            raise RuntimeError("lego parameters accumulate into .grad: use backward(), not autograd.grad")
        param: Tensor = ctx.param
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        ctx.plan.accumulate(param.grad, grad)
        return None, None, None, None


def _apply_plan(plan: Plan, full: Tensor, dtype: torch.dtype | None, channels_last: bool) -> Tensor:
    if isinstance(plan, (_BlockPlan, _LegoMajorPlan)):
        return plan.gather(full, dtype=dtype, channels_last=channels_last)
    out = plan.gather(full)
    return out if dtype is None else out.to(dtype)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device if autocast is on there (gathered weights are made in it)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def lego_gather(
    param: Tensor,
    rows: Index | None = None,
    cols: Index | None = None,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Tensor:
    """``param[rows][:, cols]`` (``None``: all); its gradient accumulates in place into ``param.grad``.

    Only a leaf ``param`` takes the in-place path; a non-leaf tensor is gathered with plain autograd.
    """
    if rows is None and cols is None:
        return param
    return _gather(param, _block_plan(param.shape, rows, cols, param.device) or _plan(param, rows, cols), dtype,
                   channels_last)


def _grad_path(param: Tensor) -> bool:
    """Whether ``param``'s gradient takes the in-place path (a leaf that needs it, grad mode on)."""
    return param.is_leaf and param.requires_grad and torch.is_grad_enabled()


def _gather(param: Tensor, plan: Plan, dtype: torch.dtype | None, channels_last: bool) -> Tensor:
    if not _grad_path(param):
        return _apply_plan(plan, param, dtype, channels_last)
    return _GatherIntoGrad.apply(param, plan, dtype, channels_last)


class _RoutedConv(torch.autograd.Function):
    """``conv2d(x, param[rows][:, cols])`` (no cast) that keeps no gathered weight for its backward.

    The forward gathers the task's weight, convolves and saves only ``x``; the backward gathers it
    again (one pass over the selected elements: far cheaper than the convolution it feeds) and runs
    ``aten.convolution_backward``, the kernel autograd runs for ``F.conv2d``, so the gradients are
    those of gather + ``F.conv2d`` (bit for bit: tested). The weight gradient accumulates into
    ``param.grad`` as in ``lego_gather``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, param: Tensor, plan: Plan,  # type: ignore[override]
                channels_last: bool, stride: int, padding: int) -> Tensor:
        weight = _apply_plan(plan, param, None, channels_last)
        ctx.param, ctx.plan, ctx.channels_last, ctx.stride, ctx.padding = param, plan, channels_last, stride, padding
        ctx.weight_layout = (weight.shape, weight.stride())
        ctx.save_for_backward(x)
        return torch.ops.aten.convolution(x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor  # type: ignore[override]
                 ) -> tuple[Tensor | None, None, None, None, None, None]:
        if torch.is_grad_enabled():
            raise RuntimeError("lego parameters accumulate into .grad: double backward is not supported")
        if not torch._C._will_engine_execute_node(ctx.next_functions[1][0]):  # the param's AccumulateGrad
            raise RuntimeError("lego parameters accumulate into .grad: use backward(), not autograd.grad")
        (x,) = ctx.saved_tensors
        param: Tensor = ctx.param.detach()
        conv = ([ctx.stride] * 2, [ctx.padding] * 2, [1, 1], False, [0, 0], 1)
        grad_x = None
        if ctx.needs_input_grad[0]:  # the gathered weight lives only for this call
            weight = _apply_plan(ctx.plan, param, None, ctx.channels_last)
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, *conv, [True, False, False])[0]
            del weight
        # the weight gradient reads only x and grad; the kernel wants a weight of the gathered shape and
        # layout for its metadata: a view of the parameter's own memory (its values are never read; the
        # equality tests pin the result), so no gathered copy is alive here
        shaped = param.as_strided(*ctx.weight_layout)  # the gathered weight's shape and strides, no copy
        grad_w = torch.ops.aten.convolution_backward(grad, x, shaped, None, *conv, [False, True, False])[1]
        if ctx.param.grad is None:
            ctx.param.grad = torch.zeros_like(ctx.param)
        ctx.plan.accumulate(ctx.param.grad, grad_w)
        return grad_x, None, None, None, None, None


def routed_conv2d(x_BCHW: Tensor, weight: Tensor, *, out_idx: Index | None, in_idx: Index | None,
                  stride: int, padding: int, dtype: torch.dtype | None, channels_last: bool,
                  plan: Plan | None = None) -> Tensor:
    """``F.conv2d(x, lego_gather(weight, out_idx, in_idx, ...))`` (no bias); ``plan``: the gather of a
    weight not stored ``[O, I, kh, kw]`` (``LegoConv2d(in_legos=...)``), which then replaces the indices.

    Without a cast (``dtype`` None) its backward gathers the weight again instead of keeping it
    (``_RoutedConv``): the dense twin reads its weight in place and keeps no copy, so neither does
    this. Under autocast (``dtype`` set) the dense twin keeps its cast weight for the backward, and so
    does this (the gathered weight is that cast; no second gather). Plain gather + conv also where no
    gradient flows into ``weight`` as a lego parameter."""
    if plan is None:
        if out_idx is None and in_idx is None:
            return F.conv2d(x_BCHW, weight, None, stride, padding)
        plan = _block_plan(weight.shape, out_idx, in_idx, weight.device) or _plan(weight, out_idx, in_idx)
    if dtype is not None or memory_order(weight) is None or not _grad_path(weight):
        return F.conv2d(x_BCHW, _gather(weight, plan, dtype, channels_last), None, stride, padding)
    return _RoutedConv.apply(x_BCHW, weight, plan, channels_last, stride, padding)


def _channels(index: Index) -> Tensor:
    return index.channels() if isinstance(index, LegoIndex) else index


class LegoConv2d(nn.Module):
    """``Conv2d`` over the full lego width; ``forward`` runs only the selected channels.

    ``in_channels`` / ``out_channels`` are full widths (all legos). ``in_idx`` / ``out_idx`` select
    channels (indices or a ``LegoIndex``); ``None`` means the dense (shared) side.

    ``in_legos=N``: the in-channels are ``N`` legos, selected only as whole legos (``in_idx`` a
    ``LegoIndex`` of width ``in_channels / N``; rows as usual). The weight is then stored
    *lego-major*, ``[N, O, kh * kw * w]`` (``to_lego_major``), so each lego is one contiguous block:
    a task's gather, its gradient's accumulation and ``LegoSGD``'s update of the used legos read and
    write whole blocks instead of a run of ``w`` channels out of every ``[kh, kw]`` row of all ``N``
    legos. ``dense_weight()`` gives the ``[O, I, kh, kw]`` weight; a state dict stores the lego-major
    tensor and loads either form.
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
        in_legos: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.in_legos = in_channels, out_channels, in_legos
        self.stride, self.padding = stride, padding
        self.dense_shape = (out_channels, in_channels, kernel_size, kernel_size)
        weight = torch.empty(self.dense_shape)
        # Kaiming fan-out of the *active* sub-network, so a routed net starts like its dense twin.
        fan_out = (active_out_channels or out_channels) * kernel_size * kernel_size
        nn.init.normal_(weight, 0.0, math.sqrt(2.0 / fan_out))
        self.weight = nn.Parameter(weight if in_legos is None else to_lego_major(weight, in_legos))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def dense_weight(self) -> Tensor:
        """The ``[O, I, kh, kw]`` weight (the parameter itself, or a differentiable copy if lego-major)."""
        return self.weight if self.in_legos is None else from_lego_major(self.weight, self.dense_shape)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        weight = state_dict.get(prefix + "weight")
        if self.in_legos is not None and weight is not None and tuple(weight.shape) == self.dense_shape:
            state_dict[prefix + "weight"] = to_lego_major(weight, self.in_legos)  # an [O, I, kh, kw] weight
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _lego_major_plan(self, in_idx: Index | None, out_idx: Index | None) -> _LegoMajorPlan:
        legos = self.weight.shape[0]
        width = self.in_channels // legos
        if in_idx is None:
            in_idx = LegoIndex(torch.arange(legos, device=self.weight.device), width)
        if not isinstance(in_idx, LegoIndex) or in_idx.width != width:
            raise ValueError(f"a LegoConv2d with in_legos={legos} selects whole in-channel legos only "
                             f"(in_idx a LegoIndex of width {width}, or None)")
        return _lego_major_plan(self.weight, in_idx, out_idx, self.dense_shape)

    def forward(self, x_BCHW: Tensor, *, in_idx: Index | None = None, out_idx: Index | None = None) -> Tensor:
        dtype = autocast_dtype(x_BCHW)  # gather straight into the compute dtype and layout
        # (channels_last for channels_last inputs: a weight stored so is gathered without transposing;
        # contiguous gathers made the bf16 convolutions slower, r50_6tasks 1.14 -> 1.21)
        cl = self.dense_shape[-1] > 1 and x_BCHW.is_contiguous(memory_format=torch.channels_last)
        if self.in_legos is not None and in_idx is None and out_idx is None:
            return F.conv2d(x_BCHW, self.dense_weight(), self.bias, self.stride, self.padding)
        plan = None if self.in_legos is None else self._lego_major_plan(in_idx, out_idx)
        if self.bias is None:
            return routed_conv2d(x_BCHW, self.weight, out_idx=out_idx, in_idx=in_idx, stride=self.stride,
                                 padding=self.padding, dtype=dtype, channels_last=cl, plan=plan)
        weight = (lego_gather(self.weight, out_idx, in_idx, dtype=dtype, channels_last=cl) if plan is None
                  else _gather(self.weight, plan, dtype, cl))
        bias = lego_gather(self.bias, out_idx, dtype=dtype)
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
        dtype = autocast_dtype(x)
        weight = lego_gather(self.weight, out_idx, in_idx, dtype=dtype)
        bias = None if self.bias is None else lego_gather(self.bias, out_idx, dtype=dtype)
        if gate_out is not None:  # straight-through gate folded into the (small) weight, value 1
            weight = weight * gate_out[:, None]
            bias = None if bias is None else bias * gate_out
        return F.linear(x, weight, bias)


class LegoBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with per-lego statistics: a BN over all channels, gathered like the weights.

    Running statistics of the selected channels are updated in place; others are untouched. The
    straight-through router gate is folded into the gathered affine parameters (value 1), so it costs
    no activation memory or elementwise pass.

    The affine parameters are gathered with plain autograd (``index_select``), not ``lego_gather``: they
    are ``N * w`` values, so a full-size gradient costs less than the Python autograd function of an
    in-place accumulation (GPPF-R18, two tasks: 32 such functions per step, about 100 us each).
    Unselected channels get a zero gradient, which leaves them as they were.
    """

    def forward(self, x_BCHW: Tensor, *, idx: Index | None = None, gate: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if idx is None and gate is None:
            return super().forward(x_BCHW)
        ch = None if idx is None else _channels(idx)
        weight, bias = ((self.weight, self.bias) if ch is None
                        else (self.weight.index_select(0, ch), self.bias.index_select(0, ch)))
        if gate is not None:
            weight, bias = weight * gate, bias * gate
        use_batch_stats = self.training or self.running_mean is None
        if idx is None:
            return F.batch_norm(
                x_BCHW, self.running_mean, self.running_var, weight, bias,
                use_batch_stats, self.momentum or 0.0, self.eps,
            )
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
