"""``LegoSGD``: SGD whose step touches only the legos a step used, equal to ``torch.optim.SGD``.

A lego layer stores all ``N`` legos, but a step's tasks use ``k`` of them per layer; the others get
no loss gradient. Plain SGD still reads and writes every lego (weight decay, momentum) and
``zero_grad`` clears every gradient, which costs more than the routed forward saves once ``N`` is
large. ``LegoSGD`` defers that work.

The contract (all state lives in the optimizer instance; nothing is registered globally and no hook
runs when a model is read):

* ``LegoSGD(params, lego_params=...)``: the lego parameters as a model declares them
  (``gppf.lego.layers.LegoRows``: rows, dim 0, or columns, dim 1, are lego channels, or the
  (row, dim-1 channel) cells of a contiguous weight routed on both sides; a bare tensor means rows).
  Every other parameter is plain SGD. Below, "rows" are the lego channels along the declared dim, or
  the cells (each a contiguous stretch of memory, handled as a row).
* Each step, **before its forward**, the training step calls :meth:`LegoSGD.prepare` with the rows
  of each lego parameter that the step's routes use (``gppf.lego.layers.rows_used``; ``None``: the
  whole parameter). ``prepare`` brings exactly those rows up to date, so the forward reads current
  weights and never has to change one. ``step()`` without a ``prepare`` since the last ``step()``
  raises (it would silently drop gradients). Why before the forward: a row left behind is next read
  by a later step's forward, and only that step knows its routes (Gumbel routes are random), so it
  draws them once, up front, and passes them both here and to the forward. Catching up inside the
  forward would make reading a model change it; catching up every row each step costs what plain
  SGD costs.
* ``step()`` runs the same fused / foreach kernel as ``torch.optim.SGD`` on flat views of the used
  row runs' memory (and on dense parameters whole, a channels_last one as a flat view of its memory,
  which the fused CPU kernel would otherwise re-lay out). Parameters are taken in their memory order,
  contiguous or channels_last: a run of rows (out-channels, outermost in both) is one stretch of
  memory. Column runs are strided views (``[outer, run * inner]``: ``w[:, c0:c1]`` of a contiguous
  weight, ``[out x kh x kw, run]`` of a channels_last one, whose in-channels are innermost),
  which torch's fused CPU kernel silently treats as contiguous memory (wrong results), so they take
  four elementwise passes with SGD's arithmetic (:func:`strided_sgd`); these cost more per element,
  so a column parameter that is up to date and used above ``_STRIDED_MAX_FRACTION`` takes a whole
  fused step instead. ``zero_grad()`` clears only the runs used since the last ``zero_grad``. The
  rows a step did not use must have no gradient there (the gather of ``gppf.lego.layers`` writes only
  the rows it read); updating *more* rows than were used is exact.
* A skipped row has a zero loss gradient, so each skipped step maps its ``(w, v)`` linearly:
  ``v' = mu v + wd w``, ``w' = w - lr (wd w + mu v')`` (Nesterov) or ``w - lr v'``. ``LegoSGD`` keeps the
  product of these 2x2 maps since each earlier step (per parameter group, float64) and applies it
  when a row is next prepared or updated. Where ``prepare`` brings rows up to date before the step's
  backward, their gradient is zero (by the contract above), and SGD's own kernel does it in one pass
  each, batched over parameters: a row one step behind replays that step (``torch.optim.SGD``'s
  arithmetic, bit for bit); a row further behind takes its composed map in one pass of the fused
  kernel, whose Nesterov update on a zero gradient is a 2x2 map with four free coefficients
  (:func:`map_as_sgd`; equal up to float rounding). Elsewhere (rows only another rank used, a whole
  update, ``flush``) and for maps the kernel cannot carry accurately, the map takes five elementwise
  passes. (GPPF-R18 at 32 px, learned routes from fresh logits: 6.8 M elements caught up per step,
  2.3 M of them one step behind, in 6.1 ms; 11.6 ms when rows two steps behind were replayed twice and
  the 2.7 M further behind took the five passes.) :meth:`LegoSGD.flush` catches up everything: the trainer
  calls it on every rank before evaluation and checkpoints, so replicas stay bit-identical.
  Reading the model (``state_dict``, an eval forward) changes nothing; before ``flush`` it reads the
  deferred rows as they are (``pending`` says whether any are), and ``LegoSGD.state_dict()`` refuses.
* A parameter whose ``.grad`` is ``None`` at a step is skipped by that step entirely, as by
  ``torch.optim.SGD`` (no deferred weight decay or momentum is charged for it).
* Under ``torch.distributed`` the prepared rows are OR-ed over ranks (one small all-reduce) by
  :meth:`LegoSGD.share_used`, which a training step calls before its gradient sync (``step()`` calls it
  if the step did not): every rank then updates the same rows, also those only another rank's tasks
  used, and ``grad_regions`` lists the same regions on every rank (the union of the ranks' rows), so a
  gradient sync can reduce just those (``gppf.engine.distributed.GradSync``).

Supported: ``momentum``, ``weight_decay``, ``nesterov``, learning-rate schedules; ``dampening`` and
``maximize`` are not (use ``torch.optim.SGD``). The optimizer state is that of ``torch.optim.SGD``
(``momentum_buffer``), so checkpoints load into either.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.sgd import sgd as _functional_sgd

from gppf.lego.layers import LegoRows, memory_order

Mat = tuple[float, float, float, float]  # row-major 2x2 map of (w, v)

_GC_EVERY = 64  # steps between prunes of unused skipped-step maps
# Column runs are strided views; on CPU (torch 2.14) SGD's four strided passes over a fraction f of a
# weight's columns cost about what the fused kernel costs over all of it at f = 1/8 (AVX512 machine,
# weights channels_last as trained: GPPF-R18 layer-4 conv2 [512, 2048, 3, 3], N=8: fused whole 5.9-6.6
# ms, strided 1/8: 4.0-7.6, 2/8: 10-18.5; R50 conv3 [2048, 2048, 1, 1], N=16: whole 2.2, 2/16: 0.7,
# 3/16: 2.1). Above it a column parameter that is up to date is updated whole (exact, and it stays up
# to date).
_STRIDED_MAX_FRACTION = 0.125


def _compose(a: Mat, b: Mat) -> Mat:
    """``a @ b``."""
    return (a[0] * b[0] + a[1] * b[2], a[0] * b[1] + a[1] * b[3],
            a[2] * b[0] + a[3] * b[2], a[2] * b[1] + a[3] * b[3])


def skipped_step_map(*, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> Mat:
    """The linear map of ``(w, v)`` by one SGD step with a zero loss gradient."""
    if nesterov:
        return (1.0 - lr * weight_decay * (1.0 + momentum), -lr * momentum * momentum, weight_decay, momentum)
    return (1.0 - lr * weight_decay, -lr * momentum, weight_decay, momentum)


Hyper = tuple[float, float, float, bool]  # lr, momentum, weight_decay, nesterov of one step
_REPLAYED_STEPS = 1  # rows this many steps behind (or fewer) are caught up by replaying SGD's own steps
# The fused kernel carries a composed map only while its momentum coefficient ``d`` is at least this:
# its learning rate is ``-b / d**2``; at ``d >= 1e-3`` (momentum 0.9: 65 skipped steps) the result stays
# within a few float32 roundings of the five-pass map (tests/lego/test_optim.py).
_MIN_KERNEL_DECAY = 1e-3
SgdCoefficients = tuple[float, float, float, float]  # lr, momentum, weight_decay, dampening (Nesterov)
_FUSED_DEVICES = ("cpu", "cuda")  # where torch.optim.SGD(fused=True) runs (torch 2.14)


def map_as_sgd(m: Mat) -> SgdCoefficients | None:
    """Coefficients of a Nesterov SGD step whose update on a zero gradient is the map ``m`` of ``(w, v)``.

    On a zero gradient, ``torch.optim.SGD``'s Nesterov step with dampening ``q`` computes
    ``v' = mu v + (1 - q) wd w`` and ``w' = w - lr (wd w + mu v')``: the map
    ``[[1 - lr wd - lr mu (1 - q) wd, -lr mu^2], [(1 - q) wd, mu]]``, so ``mu = d``, ``lr = -b / d^2``,
    ``(1 - q) wd = c`` and ``wd = (1 - a - lr d c) / lr``. ``None`` where that has no finite solution or
    ``d`` is below ``_MIN_KERNEL_DECAY`` (the large learning rate would amplify rounding)."""
    a, b, c, d = m
    if d < _MIN_KERNEL_DECAY or b == 0.0:
        return None
    lr = -b / (d * d)
    wd = (1.0 - a - lr * d * c) / lr
    if wd == 0.0:
        return (lr, d, 0.0, 0.0) if c == 0.0 else None
    out = (lr, d, wd, 1.0 - c / wd)
    return out if all(math.isfinite(x) for x in out) else None


class _Clock:
    """Step count of a parameter group, the map of all steps since each earlier step, and the
    hyper-parameters of its last few steps."""

    def __init__(self) -> None:
        self.t = 0
        self.since: dict[int, Mat] = {}  # s -> map of steps s..t-1 (a row at step s missed them)
        self.hyper: dict[int, Hyper] = {}  # s -> hyper-parameters of step s (the last few)

    def advance(self, m: Mat, hyper: Hyper) -> None:
        self.since = {s: _compose(m, a) for s, a in self.since.items()}
        self.since[self.t] = m
        self.hyper[self.t] = hyper
        self.hyper.pop(self.t - _REPLAYED_STEPS, None)
        self.t += 1


def row_runs(mask_R: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[r0, r1)`` of consecutive ``True`` rows."""
    edges = np.diff(np.concatenate(([0], mask_R.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _lanes(t: Tensor, dim: int) -> Tensor:
    """A dense ``t`` as a contiguous ``[outer, t.shape[dim], inner]`` view in memory order."""
    perm = memory_order(t)
    if perm is None:
        raise ValueError(f"a tensor with strides {t.stride()} is not dense in memory")
    at = perm.index(dim)
    mem = t.permute(perm)
    return mem.view(math.prod(mem.shape[:at]), t.shape[dim], math.prod(mem.shape[at + 1:]))


def flat(t: Tensor) -> Tensor:
    """A dense ``t`` as a 1-D view of its memory (elementwise kernels then never re-lay it out)."""
    return _lanes(t, 0).view(-1)


def _views(t: Tensor, runs: list[tuple[int, int]], dim: int = 0, cells: bool = False) -> list[Tensor]:
    """Runs of a dense ``t`` along ``dim`` in memory order: where ``dim`` is outermost in memory (rows
    of a contiguous or channels_last weight) each run is one contiguous 1-D view; otherwise (columns)
    a 2-D strided view ``[outer, run * inner]`` whose rows are contiguous. ``cells``: runs of the
    ``shape[0] * shape[1]`` (row, dim-1 channel) cells of a contiguous ``t`` (``LegoRows.cell_point``)."""
    lanes = t.view(1, t.shape[0] * t.shape[1], -1) if cells else _lanes(t, dim)
    if lanes.shape[0] == 1:
        return [lanes[0, r0:r1].reshape(-1) for r0, r1 in runs]
    return [lanes[:, r0:r1].reshape(lanes.shape[0], -1) for r0, r1 in runs]


def _same_layout(p: Tensor, *others: Tensor | None) -> bool:
    """Whether ``p`` is dense and every other tensor has its shape and strides."""
    return memory_order(p) is not None and all(o is None or (o.shape == p.shape and o.stride() == p.stride())
                                               for o in others)


def strided_sgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], *, lr: float,
                momentum: float, weight_decay: float, nesterov: bool) -> None:
    """``torch.optim.SGD``'s update (no dampening) on strided views, in place, one tensor at a time:
    ``d = g + wd w``; ``v = mu v + d``; ``w -= lr (d + mu v)`` (Nesterov) or ``lr v``. ``bufs`` start
    at zero (as ``LegoSGD`` creates them), so the first step equals SGD's ``v = d``."""
    for w, g, v in zip(params, grads, bufs):
        d = g.add(w, alpha=weight_decay) if weight_decay else g
        if momentum and v is not None:
            torch.add(d, v, alpha=momentum, out=v)
            if not nesterov:
                d = v
            elif d is g:
                d = g.add(v, alpha=momentum)
            else:
                d.add_(v, alpha=momentum)
        w.add_(d, alpha=-lr)


class _Replay:
    """Catch-up passes of SGD's kernel on zero gradients, batched over parameters: replayed steps (one
    kernel call per step and hyper-parameters, in order) and composed maps (one fused call per map)."""

    def __init__(self, *, fused: bool | None, foreach: bool | None) -> None:
        self.kernels = dict(fused=fused, foreach=foreach)  # SGD's kernel choice, as the optimizer's step
        self.todo: dict[tuple[int, Hyper], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        self.maps: dict[SgdCoefficients, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}

    def add(self, step: int, hyper: Hyper, ws: list[Tensor], gs: list[Tensor], vs: list[Tensor]) -> None:
        lists = self.todo.setdefault((step, hyper), ([], [], []))
        lists[0].extend(ws), lists[1].extend(gs), lists[2].extend(vs)

    def add_map(self, m: Mat, ws: list[Tensor], gs: list[Tensor], vs: list[Tensor]) -> bool:
        """Queue the map ``m`` of these rows as one fused SGD pass; ``False`` (nothing queued) where the
        kernel cannot carry it (:func:`map_as_sgd`) or has no fused version on this device."""
        coef = map_as_sgd(m)
        if coef is None or not ws or ws[0].device.type not in _FUSED_DEVICES:
            return False
        lists = self.maps.setdefault(coef, ([], [], []))
        lists[0].extend(ws), lists[1].extend(gs), lists[2].extend(vs)
        return True

    def run(self) -> None:
        for step, (lr, mom, wd, nesterov) in sorted(self.todo, key=lambda key: key[0]):
            ws, gs, vs = self.todo[(step, (lr, mom, wd, nesterov))]
            _functional_sgd(ws, gs, vs, **self.kernels, weight_decay=wd, momentum=mom, lr=lr, dampening=0.0,
                            nesterov=nesterov, maximize=False)
        for (lr, mom, wd, damp), (ws, gs, vs) in self.maps.items():  # (each row is in one map or step)
            _functional_sgd(ws, gs, vs, fused=True, foreach=None, weight_decay=wd, momentum=mom, lr=lr,
                            dampening=damp, nesterov=True, maximize=False)
        self.todo, self.maps = {}, {}


class _LazyCells:
    """Row bookkeeping of one lego parameter (see the module docstring), owned by one ``LegoSGD``.

    "Rows" are the lego channels along ``dim`` (0: rows, 1: columns). The bookkeeping lives on the
    CPU (``numpy``, 10 bytes per row); updates run on views of the parameter, gradient and momentum
    buffer (contiguous row runs, strided column runs), so nothing is gathered or copied.
    """

    def __init__(self, param: Tensor, *, clock: _Clock, state: dict, dim: int = 0, cells: bool = False) -> None:
        self.param, self.clock, self.state, self.dim, self.cells = param, clock, state, dim, cells
        self.rows = param.shape[0] * param.shape[1] if cells else param.shape[dim]
        self.synced_R = np.full(self.rows, clock.t, dtype=np.int64)  # the step each row is at
        self.used_R = np.zeros(self.rows, dtype=bool)  # rows prepared for the coming step()
        self.dirty_R = np.zeros(self.rows, dtype=bool)  # rows whose .grad may be non-zero (since zero_grad)
        self.stale = False  # some row missed a step and is not caught up yet
        self._last_runs: tuple[bytes, list[tuple[int, int]]] = (b"", [])
        self._last_views: dict[int, list[Tensor]] = {}  # data_ptr -> views of the last runs

    def runs(self, mask_R: np.ndarray) -> list[tuple[int, int]]:
        """``row_runs(mask_R)``, remembered for the last mask (a step asks for the same rows in
        ``step``, ``grad_regions`` and ``zero_grad``)."""
        key = mask_R.tobytes()
        if key != self._last_runs[0]:
            self._last_runs = (key, row_runs(mask_R))
            self._last_views = {}
        return self._last_runs[1]

    def catch_up(self, mask_R: np.ndarray, *, replay: _Replay | None = None) -> None:
        """Apply the skipped steps to the rows of ``mask_R`` that are behind. ``replay`` (given when the
        gradient is zero at those rows, before a step's backward): rows are queued there, to replay
        SGD's own steps on their zero gradient (at most ``_REPLAYED_STEPS`` behind) or to take their
        composed map in one fused pass, and count as caught up once it runs; the others apply the
        composed map of their skipped steps in five elementwise passes (equal up to float rounding)."""
        behind_R = mask_R & (self.synced_R < self.clock.t)
        if not behind_R.any():
            return
        buf = self.state.get("momentum_buffer")
        grad = self.param.grad
        if replay is not None and not (self.dim == 0 and buf is not None and grad is not None
                                       and _same_layout(self.param, grad, buf)):
            replay = None
        for s in np.unique(self.synced_R[behind_R]).tolist():
            sel_R = behind_R & (self.synced_R == s)
            runs = self.runs(sel_R)
            ws = self.views(self.param.data, runs)
            if replay is not None:
                gs, vs = self.views(grad, runs), self.views(buf, runs)  # type: ignore[arg-type]
                if self.clock.t - s <= _REPLAYED_STEPS and all(k in self.clock.hyper for k in range(s, self.clock.t)):
                    for k in range(s, self.clock.t):
                        replay.add(k, self.clock.hyper[k], ws, gs, vs)
                    self.synced_R[sel_R] = self.clock.t
                    continue
                if replay.add_map(self.clock.since[s], ws, gs, vs):
                    self.synced_R[sel_R] = self.clock.t
                    continue
            a, b, c, d = self.clock.since[s]
            if buf is None:
                torch._foreach_mul_(ws, a)
            else:
                vs = self.views(buf, runs)
                old = torch._foreach_mul(ws, c)
                torch._foreach_mul_(ws, a)
                torch._foreach_add_(ws, vs, alpha=b)
                torch._foreach_mul_(vs, d)
                torch._foreach_add_(vs, old)
            self.synced_R[sel_R] = self.clock.t

    def whole_is_cheaper(self) -> bool:
        """Whether to update this parameter whole this step: columns that are all up to date and used
        in a fraction above ``_STRIDED_MAX_FRACTION`` (then the fused kernel beats strided passes)."""
        return self.dim == 1 and not self.stale and self.used_R.mean() > _STRIDED_MAX_FRACTION

    def views(self, t: Tensor, runs: list[tuple[int, int]]) -> list[Tensor]:
        """The runs of ``t`` (laid out like the parameter) along this parameter's lego dim; those of the
        last ``runs()`` are remembered per tensor (the views keep its memory alive, so an address names
        one tensor: parameter, gradient or momentum buffer)."""
        if runs is not self._last_runs[1]:
            return _views(t, runs, self.dim, self.cells)
        out = self._last_views.get(t.data_ptr())
        if out is None:
            out = self._last_views[t.data_ptr()] = _views(t, runs, self.dim, self.cells)
        return out

    def prepare(self, mask_R: np.ndarray | None, *, replay: _Replay | None = None) -> None:
        """The coming step uses these rows (``None``: all): bring them up to date (rows queued on
        ``replay`` once it runs) and remember them."""
        if mask_R is None:
            mask_R = np.ones(self.rows, dtype=bool)
        elif mask_R.shape != (self.rows,) or mask_R.dtype != np.bool_:
            raise ValueError(f"expected a bool row mask of shape ({self.rows},), got {mask_R.dtype} {mask_R.shape}")
        if self.stale:  # (rows not yet used since the last zero_grad have a zero gradient)
            self.catch_up(mask_R & ~self.dirty_R, replay=replay)
            self.catch_up(mask_R)
        self.used_R |= mask_R
        self.dirty_R |= mask_R

    def flush(self) -> None:
        if self.stale:
            self.catch_up(np.ones(self.rows, dtype=bool))
            self.stale = False

    def skip(self) -> None:
        """No gradient this step: ``torch.optim.SGD`` leaves the parameter alone, so no row is charged it."""
        self.flush()
        self.synced_R[:] = self.clock.t + 1

    def zero_grad(self, *, set_to_none: bool) -> None:
        grad = self.param.grad
        if grad is not None:
            if set_to_none:
                self.param.grad = None
                self._last_views = {}  # (they would keep the gradient's memory)
            elif not _same_layout(self.param, grad) or self.dirty_R.all():
                grad.zero_()
            elif self.dirty_R.any():
                torch._foreach_zero_(self.views(grad, self.runs(self.dirty_R)))
        self.dirty_R[:] = False


RowMasks = Mapping[Tensor, "np.ndarray | None"]  # lego parameter -> bool mask of the rows used (None: all)


@runtime_checkable
class RowOptimizer(Protocol):
    """What a training step needs of an optimizer that updates only the lego rows a step used
    (``LegoSGD``, or a wrapper of one): the rows are declared before the forward (``prepare``), the
    gradient regions written since ``zero_grad`` can be listed (``grad_regions``), and under
    ``torch.distributed`` the rows are merged over ranks before the gradient sync (``share_used``)."""

    @property
    def lazy_params(self) -> list[Tensor]: ...

    def prepare(self, used: RowMasks) -> None: ...

    def grad_regions(self, param: Tensor) -> list[Tensor] | None: ...

    def share_used(self) -> None: ...


def _declared_dims(lego_params: Iterable[Tensor | LegoRows]) -> dict[int, tuple[int, bool]]:
    """``id(param) -> (lego dim, by cells)`` of declarations (``LegoRows``) or bare tensors (rows)."""
    dims: dict[int, tuple[int, bool]] = {}
    for d in lego_params:
        p, dim = (d, (0, False)) if isinstance(d, Tensor) else (d.param, (d.dim, d.cell_point is not None))
        seen = dims.setdefault(id(p), dim)
        if seen[0] != dim[0]:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is declared along dims 0 and 1: "
                             "declare its rows only")
        if seen != dim:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is declared by rows and by cells: declare it once")
    return dims


class LegoSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` (momentum, Nesterov, weight decay) that updates only the lego rows a step used.

    ``lego_params`` are updated lazily (see the module docstring; call :meth:`prepare` before each
    step's forward); all others exactly as ``torch.optim.SGD``. ``lazy``: defer (``True``), never
    (``False``: then it *is* SGD and ``prepare`` is a no-op), or ``None`` (default) for parameters on the
    CPU only. ``fused`` / ``foreach`` pick the kernel as in ``torch.optim.SGD``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        lego_params: Iterable[Tensor | LegoRows] = (),
        lazy: bool | None = None,
        fused: bool | None = None,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD hyper-parameters lr={lr} momentum={momentum} weight_decay={weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))
        self.fused, self.foreach = fused, foreach
        self._clocks: list[_Clock] = [_Clock() for _ in self.param_groups]
        declared = _declared_dims(lego_params)
        self._cells: dict[int, _LazyCells] = {}  # id(param) -> its rows' bookkeeping
        for group, clock in zip(self.param_groups, self._clocks):
            for p in group["params"]:
                wanted = lazy if lazy is not None else p.device.type == "cpu"
                dim, cells = declared.get(id(p), (None, False))
                if wanted and dim is not None and p.dim() > dim and memory_order(p) is not None:
                    self._cells[id(p)] = _LazyCells(p, clock=clock, state=self.state[p], dim=dim, cells=cells)
        self._prepared = False
        self._shared = False  # share_used() ran for the coming step()

    @property
    def lazy_params(self) -> list[Tensor]:
        """The parameters whose unused rows this optimizer defers (empty: it is plain SGD)."""
        return [c.param for c in self._cells.values()]

    @property
    def pending(self) -> bool:
        """Whether some rows miss deferred updates (then :meth:`flush` before reading the weights)."""
        return any(c.stale for c in self._cells.values())

    @torch.no_grad()
    def prepare(self, used: RowMasks) -> None:
        """Declare the lego rows the coming step uses (``gppf.lego.layers.rows_used`` of its routes) and
        bring them up to date; call before the step's forward. Parameters not in ``used`` are unused.
        Several calls before one ``step()`` add up (all before ``share_used``)."""
        if self._shared:
            raise RuntimeError("LegoSGD.prepare() after share_used(): declare every row before the rows are shared")
        replay = _Replay(fused=self.fused, foreach=self.foreach)
        for p, mask_R in used.items():
            cells = self._cells.get(id(p))
            if cells is not None:
                cells.prepare(mask_R, replay=replay)
        replay.run()
        self._prepared = True

    def grad_regions(self, param: Tensor) -> list[Tensor] | None:
        """Views of ``param.grad`` that backward passes may have written since the last ``zero_grad``
        (the row or column runs prepared since then; every other one is exactly zero), or ``None``
        where this optimizer does not track ``param``'s legos (then the whole gradient counts).
        Column runs are 2-D strided views ``[rows, run * inner]``; their norm should be taken per row
        (``gppf.engine.simt.total_norm``): torch's norm of a whole strided view sums naively."""
        cells, grad = self._cells.get(id(param)), param.grad
        if cells is None or grad is None or not _same_layout(param, grad):
            return None
        if cells.dirty_R.all() or (cells.dim == 1 and cells.dirty_R.mean() > _STRIDED_MAX_FRACTION):
            return [grad]  # (strided column runs cost more per element: above 1/8, read the whole gradient)
        return cells.views(grad, cells.runs(cells.dirty_R))

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every deferred lego row up to date (parameters and momentum equal plain SGD's)."""
        for cells in self._cells.values():
            cells.flush()
        for clock in self._clocks:
            clock.since.clear()

    def state_dict(self) -> dict[str, Any]:
        if self.pending:
            raise RuntimeError("LegoSGD has deferred lego updates: call flush() (on every rank) before "
                               "reading its state or the model's weights")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flush()
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                # A checkpoint stores contiguous tensors; the fused kernel reads a momentum buffer as if it
                # had its parameter's layout, so a channels_last weight needs a channels_last buffer
                # (without this, resuming a channels_last run silently updated the wrong elements).
                buf = self.state[p].get("momentum_buffer") if p in self.state else None
                if buf is not None and buf.shape != p.shape:
                    raise ValueError(f"optimizer state: a momentum buffer of shape {tuple(buf.shape)} for a parameter "
                                     f"of shape {tuple(p.shape)} (saved for another model, or before its lego "
                                     "weights were stored lego-major: resume with the code that wrote it)")
                if buf is not None and buf.stride() != p.stride():
                    self.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)
        for cells in self._cells.values():  # the state dict is a fresh dict per parameter: re-link it
            cells.state = self.state[cells.param]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                cells = self._cells.get(id(p))
                if cells is not None:
                    cells.zero_grad(set_to_none=set_to_none)
                elif p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().requires_grad_(False).zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One SGD step: dense parameters whole, lego parameters at the rows prepared for it."""
        if self._cells and not self._prepared:
            raise RuntimeError("LegoSGD.step(): call prepare(rows used) before the step's forward")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.share_used()
        while len(self._clocks) < len(self.param_groups):  # groups added after construction: dense
            self._clocks.append(_Clock())
        for group, clock in zip(self.param_groups, self._clocks):
            self._step_group(group, clock)
        for cells in self._cells.values():
            cells.used_R[:] = False
        self._prepared = self._shared = False
        if self._clocks and self._clocks[0].t % _GC_EVERY == 0:
            self._prune()
        return loss

    def _step_group(self, group: dict[str, Any], clock: _Clock) -> None:
        lr, mom, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor | None] = []
        strided: tuple[list[Tensor], list[Tensor], list[Tensor | None]] = ([], [], [])  # column runs
        updated: list[tuple[_LazyCells, np.ndarray | None]] = []
        for p in group["params"]:
            cells = self._cells.get(id(p))
            if p.grad is None:  # torch.optim.SGD skips it: so do its deferred rows
                if cells is not None:
                    cells.skip()
                continue
            state = self.state[p]
            if mom > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state.get("momentum_buffer")
            same = _same_layout(p, p.grad, buf)
            if cells is None or not same or cells.used_R.all() or cells.whole_is_cheaper():
                if cells is not None:
                    cells.flush()
                    updated.append((cells, None))
                if same and not p.is_contiguous():  # e.g. channels_last: one flat pass, no re-layout
                    params.append(flat(p)), grads.append(flat(p.grad)), bufs.append(None if buf is None else flat(buf))
                else:
                    params.append(p), grads.append(p.grad), bufs.append(buf)
                continue
            mask_R = cells.used_R.copy()
            cells.stale = True  # some rows skip this step
            if not mask_R.any():
                continue
            cells.catch_up(mask_R)  # rows only another rank used were not prepared here
            updated.append((cells, mask_R))
            runs = cells.runs(mask_R)
            ps, gs = cells.views(p.detach(), runs), cells.views(p.grad, runs)
            bs: list[Tensor | None] = [None] * len(runs) if buf is None else cells.views(buf, runs)
            target = (params, grads, bufs) if cells.dim == 0 else strided  # rows: SGD's own kernel
            target[0].extend(ps), target[1].extend(gs), target[2].extend(bs)
        if params:
            _functional_sgd(params, grads, bufs, foreach=self.foreach, fused=self.fused, weight_decay=wd,
                            momentum=mom, lr=lr, dampening=0.0, nesterov=nesterov, maximize=False)
        if strided[0]:
            strided_sgd(*strided, lr=float(lr), momentum=mom, weight_decay=wd, nesterov=nesterov)
        for cells, mask_R in updated:
            if mask_R is None:
                cells.synced_R[:] = clock.t + 1
            else:
                cells.synced_R[mask_R] = clock.t + 1
        clock.advance(skipped_step_map(lr=float(lr), momentum=mom, weight_decay=wd, nesterov=nesterov),
                      (float(lr), mom, wd, nesterov))

    def share_used(self) -> None:
        """OR the rows prepared for the coming ``step()`` over ranks (one small all-reduce; every rank
        updates the same rows, their gradients summed), and count them as written (``grad_regions``).
        Once per step: ``step()`` calls it unless the training step did (before its gradient sync).
        Every rank must call it at the same point of a step (a collective)."""
        if self._shared:
            return
        self._shared = True
        cells = list(self._cells.values())
        if cells and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = torch.from_numpy(np.concatenate([c.used_R for c in cells]).astype(np.uint8))
            shared = shared.to(cells[0].param.device)  # the training device (NCCL reduces CUDA tensors only)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            merged = shared.cpu().numpy().astype(bool)
            start = 0
            for c in cells:
                c.used_R[:] = merged[start:start + c.rows]
                start += c.rows
        for c in cells:
            c.dirty_R |= c.used_R

    def _prune(self) -> None:
        """Drop skipped-step maps that no row still needs."""
        live: set[int] = set()
        for c in self._cells.values():
            if c.stale:
                live.update(np.unique(c.synced_R).tolist())
        for clock in self._clocks:
            clock.since = {s: m for s, m in clock.since.items() if s in live}
