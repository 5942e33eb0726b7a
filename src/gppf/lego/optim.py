"""``LegoSGD``: SGD whose step touches only the legos a step used, equal to ``torch.optim.SGD``.

A lego layer stores all ``N`` legos, but a step's tasks use ``k`` of them per layer; the others get
no loss gradient. Plain SGD still reads and writes every lego (weight decay, momentum) and
``zero_grad`` clears every gradient, which costs more than the routed forward saves once ``N`` is
large. ``LegoSGD`` defers that work:

* A lego parameter (declared with :func:`mark_lego_param`) has lego channels as rows (dim 0).
  ``lego_gather`` records which rows a backward wrote into ``.grad`` (``dirty``). ``step()`` runs the
  same fused / foreach kernel as ``torch.optim.SGD`` on contiguous views of the dirty row runs only,
  and ``zero_grad()`` clears only them: no gather, no copy. A gather that selects only columns (an
  input lego) dirties all rows; a parameter that also got an ordinary autograd gradient is updated
  whole.
* A skipped row has a zero loss gradient, so each skipped step maps its ``(w, v)`` linearly:
  ``v' = mu v + wd w``, ``w' = w - lr (wd w + mu v')`` (Nesterov) or ``w - lr v'``. ``LegoSGD`` keeps the
  product of these 2x2 maps since each earlier step (per parameter group, float64) and applies it
  when the row is next read: ``lego_gather`` catches up the rows it is about to gather, and
  :meth:`LegoSGD.flush` (called by ``state_dict()`` and by a ``state_dict`` pre-hook on modules passed
  to :meth:`LegoSGD.attach`) catches up everything. Values equal plain SGD up to float rounding.
* Under ``torch.distributed`` the dirty masks are OR-ed over ranks (one small all-reduce per step),
  so every rank updates the same rows, also those only another rank's tasks used.

Supported: ``momentum``, ``weight_decay``, ``nesterov``, learning-rate schedules; ``dampening`` and
``maximize`` are not (use ``torch.optim.SGD``). The optimizer state is that of ``torch.optim.SGD``
(``momentum_buffer``), so checkpoints load into either.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.sgd import sgd as _functional_sgd
from torch.utils.weak import WeakIdKeyDictionary

Mat = tuple[float, float, float, float]  # row-major 2x2 map of (w, v)

_MARKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # lego parameters (rows are lego channels)
_LAZY: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> its _LazyCells while a LegoSGD owns it
_GC_EVERY = 64  # steps between prunes of unused skipped-step maps


def mark_lego_param(param: Tensor) -> None:
    """Declare ``param`` a lego parameter: its rows (dim 0) are lego channels that a step may leave unused."""
    if param.dim() < 1:
        raise ValueError("a lego parameter needs a row dimension (dim 0)")
    _MARKED[param] = True


def lazy_cells(param: Tensor) -> _LazyCells | None:
    """The deferred-update bookkeeping of ``param`` (``None`` if no ``LegoSGD`` manages it)."""
    return _LAZY.get(param)


def _compose(a: Mat, b: Mat) -> Mat:
    """``a @ b``."""
    return (a[0] * b[0] + a[1] * b[2], a[0] * b[1] + a[1] * b[3],
            a[2] * b[0] + a[3] * b[2], a[2] * b[1] + a[3] * b[3])


def skipped_step_map(*, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> Mat:
    """The linear map of ``(w, v)`` by one SGD step with a zero loss gradient."""
    if nesterov:
        return (1.0 - lr * weight_decay * (1.0 + momentum), -lr * momentum * momentum, weight_decay, momentum)
    return (1.0 - lr * weight_decay, -lr * momentum, weight_decay, momentum)


class _Clock:
    """Step count of a parameter group and the map of all steps since each earlier step."""

    def __init__(self) -> None:
        self.t = 0
        self.since: dict[int, Mat] = {}  # s -> map of steps s+1..t

    def advance(self, m: Mat) -> None:
        self.since = {s: _compose(m, a) for s, a in self.since.items()}
        self.since[self.t] = m
        self.t += 1


def row_runs(mask_R: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[r0, r1)`` of consecutive ``True`` rows."""
    edges = np.diff(np.concatenate(([0], mask_R.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _views(t: Tensor, runs: list[tuple[int, int]]) -> list[Tensor]:
    """Row runs of ``t`` as contiguous views."""
    return [t[r0:r1] for r0, r1 in runs]


class _LazyCells:
    """Dirty / last-updated bookkeeping of the rows of one lego parameter (see the module docstring).

    The bookkeeping lives on the CPU (``numpy``, 9 bytes per row); updates run on contiguous row views
    of the parameter, gradient and momentum buffer, so nothing is gathered or copied.
    """

    def __init__(self, param: Tensor, *, clock: _Clock, state: dict) -> None:
        self.param, self.clock, self.state = param, clock, state
        self.rows = param.shape[0]
        self.synced_R = np.full(self.rows, clock.t, dtype=np.int64)  # the step each row is at
        self.dirty_R = np.zeros(self.rows, dtype=bool)  # rows with gradient since zero_grad
        self.dense_dirty = False
        self.stale = False  # some row missed a step and is not caught up yet
        self.hook = param.register_hook(self._on_grad) if param.requires_grad else None

    def _on_grad(self, grad: Tensor | None) -> None:
        """An ordinary autograd gradient (not a lego gather's, which arrives as ``None``): a dense use."""
        if grad is not None:
            self.dense_dirty = True

    @staticmethod
    def region(rows: Any) -> Any:
        """``numpy`` index of the rows a gather of ``rows`` (``None``: all) reads and writes."""
        return slice(None) if rows is None else _numpy_channels(rows)

    def catch_up(self, mask_R: np.ndarray) -> None:
        """Apply the skipped steps to the rows of ``mask_R`` that are behind."""
        behind_R = mask_R & (self.synced_R < self.clock.t)
        if not behind_R.any():
            return
        buf = self.state.get("momentum_buffer")
        for s in np.unique(self.synced_R[behind_R]).tolist():
            sel_R = behind_R & (self.synced_R == s)
            a, b, c, d = self.clock.since[s]
            runs = row_runs(sel_R)
            ws = _views(self.param.data, runs)
            if buf is None:
                torch._foreach_mul_(ws, a)
            else:
                vs = _views(buf, runs)
                old = torch._foreach_mul(ws, c)
                torch._foreach_mul_(ws, a)
                torch._foreach_add_(ws, vs, alpha=b)
                torch._foreach_mul_(vs, d)
                torch._foreach_add_(vs, old)
            self.synced_R[sel_R] = self.clock.t

    def before_gather(self, region: Any) -> None:
        """Bring the rows a forward is about to read up to date."""
        if self.stale and (self.synced_R[region] < self.clock.t).any():
            mask_R = np.zeros_like(self.dirty_R)
            mask_R[region] = True
            with torch.no_grad():
                self.catch_up(mask_R)

    def track(self, region: Any) -> None:
        """Record that a backward accumulated into these rows of ``.grad``."""
        self.dirty_R[region] = True

    def flush(self) -> None:
        if self.stale:
            with torch.no_grad():
                self.catch_up(np.ones_like(self.dirty_R))
            self.stale = False

    def zero_grad(self, *, set_to_none: bool) -> None:
        grad = self.param.grad
        if grad is not None:
            if set_to_none:
                self.param.grad = None
            elif self.dense_dirty or not grad.is_contiguous() or self.dirty_R.all():
                grad.zero_()
            elif self.dirty_R.any():
                torch._foreach_zero_(_views(grad, row_runs(self.dirty_R)))
        self.dirty_R[:] = False
        self.dense_dirty = False


def _numpy_channels(index: Any) -> np.ndarray:
    return index.cpu().numpy() if isinstance(index, Tensor) else index.host_channels()


class LegoSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` (momentum, Nesterov, weight decay) that updates only the lego cells a step used.

    Parameters marked with :func:`mark_lego_param` are updated lazily (see the module docstring); all
    others exactly as ``torch.optim.SGD``. ``lazy``: defer (``True``), never (``False``: then it *is*
    SGD), or ``None`` (default) for parameters on the CPU only (the bookkeeping reads the routes on the
    host, a device sync per gather on a GPU). ``fused`` / ``foreach`` pick the kernel as in
    ``torch.optim.SGD``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
        self._lazy: list[_LazyCells] = []
        for group, clock in zip(self.param_groups, self._clocks):
            for p in group["params"]:
                wanted = lazy if lazy is not None else p.device.type == "cpu"
                if wanted and p in _MARKED and p.is_contiguous():
                    previous = _LAZY.get(p)
                    if previous is not None:  # a newer optimizer takes the parameter over
                        previous.flush()
                    cells = _LazyCells(p, clock=clock, state=self.state[p])
                    _LAZY[p] = cells
                    self._lazy.append(cells)

    def _managed(self) -> dict[int, _LazyCells]:
        """The lego parameters this optimizer still manages (by ``id``)."""
        return {id(c.param): c for c in self._lazy if _LAZY.get(c.param) is c}

    def attach(self, *modules: nn.Module) -> LegoSGD:
        """Flush deferred updates whenever one of ``modules`` is asked for its ``state_dict``."""
        for m in modules:
            m.register_state_dict_pre_hook(lambda *_args, **_kw: self.flush())
        return self

    def release(self) -> None:
        """Flush and stop managing the parameters (another optimizer may then take them)."""
        self.flush()
        for cells in self._lazy:
            if cells.hook is not None:
                cells.hook.remove()
            if _LAZY.get(cells.param) is cells:
                del _LAZY[cells.param]
        self._lazy = []

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every deferred lego cell up to date (parameters and momentum equal plain SGD's)."""
        for cells in self._lazy:
            cells.flush()
        for clock in self._clocks:
            clock.since.clear()

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flush()
        super().load_state_dict(state_dict)
        for cells in self._lazy:  # the state dict is a fresh dict per parameter: re-link it
            cells.state = self.state[cells.param]
            buf = cells.state.get("momentum_buffer")
            if buf is not None and not buf.is_contiguous():
                cells.state["momentum_buffer"] = buf.contiguous()

    def zero_grad(self, set_to_none: bool = True) -> None:
        managed = self._managed()
        for group in self.param_groups:
            for p in group["params"]:
                cells = managed.get(id(p))
                if cells is not None:
                    cells.zero_grad(set_to_none=set_to_none)
                elif p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().requires_grad_(False).zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One SGD step: dense parameters whole, lego parameters only at their dirty cells."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._share_dirty()
        managed = self._managed()
        for group, clock in zip(self.param_groups, self._clocks):
            self._step_group(group, clock, managed)
        if self._clocks and self._clocks[0].t % _GC_EVERY == 0:
            self._prune()
        return loss

    def _step_group(self, group: dict[str, Any], clock: _Clock, managed: dict[int, _LazyCells]) -> None:
        lr, mom, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor | None] = []
        updated: list[tuple[_LazyCells, np.ndarray | None]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if mom > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state.get("momentum_buffer")
            cells = managed.get(id(p))
            if cells is None or cells.dense_dirty or not p.grad.is_contiguous() or cells.dirty_R.all():
                if cells is not None:
                    cells.flush()
                    updated.append((cells, None))
                params.append(p), grads.append(p.grad), bufs.append(buf)
                continue
            mask_R = cells.dirty_R.copy()
            cells.stale = True  # some rows skip this step
            if not mask_R.any():
                continue
            cells.catch_up(mask_R)  # rows only another rank used were not read here yet
            updated.append((cells, mask_R))
            for r0, r1 in row_runs(mask_R):  # contiguous views: SGD's own kernel updates them in place
                params.append(p[r0:r1]), grads.append(p.grad[r0:r1])
                bufs.append(None if buf is None else buf[r0:r1])
        if params:
            _functional_sgd(params, grads, bufs, foreach=self.foreach, fused=self.fused, weight_decay=wd,
                            momentum=mom, lr=lr, dampening=0.0, nesterov=nesterov, maximize=False)
        for cells, mask_R in updated:
            if mask_R is None:
                cells.synced_R[:] = clock.t + 1
            else:
                cells.synced_R[mask_R] = clock.t + 1
        clock.advance(skipped_step_map(lr=float(lr), momentum=mom, weight_decay=wd, nesterov=nesterov))

    def _share_dirty(self) -> None:
        """OR the dirty cells (and dense-use flags) over ranks: every rank updates the same cells."""
        if not self._lazy or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        flat = np.concatenate([c.dirty_R for c in self._lazy] + [np.array([c.dense_dirty for c in self._lazy])])
        shared = torch.from_numpy(flat.astype(np.uint8))
        if dist.get_backend() == "nccl":
            shared = shared.cuda()
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        merged = shared.cpu().numpy().astype(bool)
        start = 0
        for c in self._lazy:
            n = c.dirty_R.size
            c.dirty_R[:] = merged[start:start + n]
            start += n
        for c, f in zip(self._lazy, merged[start:].tolist()):
            c.dense_dirty = c.dense_dirty or bool(f)

    def _prune(self) -> None:
        """Drop skipped-step maps that no cell still needs."""
        live: set[int] = set()
        for c in self._lazy:
            if c.stale:
                live.update(np.unique(c.synced_R).tolist())
        for clock in self._clocks:
            clock.since = {s: m for s, m in clock.since.items() if s in live}

