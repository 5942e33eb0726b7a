"""Loss weighting strategies: small modules mapping each task's loss to its term of the total loss.

The SIMT step calls ``weighting.weight(task, loss)`` once per task and backpropagates that term alone
(freeing the task's graph), then ``weighting.observe({task: float(loss)})`` once per step. Strategies
are ``nn.Module``s so their state travels in checkpoints (as an extra module) and learnable weights are
parameters the optimizer sees (exclude them from weight decay).
"""
from __future__ import annotations

import abc
import inspect
import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from gppf.registry import Registry

__all__ = [
    "LOSS_WEIGHTINGS",
    "DynamicWeightAverage",
    "LossWeighting",
    "StaticWeighting",
    "UncertaintyWeighting",
    "build_weighting",
]

LOSS_WEIGHTINGS: Registry[type["LossWeighting"]] = Registry("loss weighting")


class LossWeighting(nn.Module, abc.ABC):
    """Base class: per-task weighted loss terms for a fixed list of task names."""

    def __init__(self, *, tasks: Sequence[str]) -> None:
        super().__init__()
        names = list(tasks)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"loss weighting needs distinct task names, got {names}")
        self.tasks = names
        self._index = {name: i for i, name in enumerate(names)}

    def index(self, task: str) -> int:
        """Position of ``task``; unknown names raise ``ValueError`` listing the known ones."""
        if task not in self._index:
            raise ValueError(f"unknown task '{task}' for loss weighting (tasks: {', '.join(self.tasks)})")
        return self._index[task]

    @abc.abstractmethod
    def weight(self, task: str, loss: Tensor) -> Tensor:
        """The weighted term of ``task``'s scalar ``loss`` in the total loss (differentiable)."""

    @abc.abstractmethod
    def weights(self) -> dict[str, float]:
        """Current effective weight of each task, for logging."""

    def observe(self, losses: Mapping[str, float]) -> None:
        """Record one step's detached per-task loss values (validated; stateless strategies ignore them)."""
        for task in losses:
            self.index(task)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


def _check_static(tasks: Sequence[str], static_weights: Mapping[str, float]) -> dict[str, float]:
    missing = [t for t in tasks if t not in static_weights]
    unknown = [t for t in static_weights if t not in tasks]
    if missing or unknown:
        raise ValueError(f"static loss weights: missing tasks {missing}, unknown tasks {unknown}")
    bad = {t: w for t, w in static_weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"static loss weights must be finite and >= 0, got {bad}")
    return {t: float(static_weights[t]) for t in tasks}


@LOSS_WEIGHTINGS.register("static")
class StaticWeighting(LossWeighting):
    """Fixed weights: each task's configured ``loss_weight``."""

    def __init__(self, *, tasks: Sequence[str], static_weights: Mapping[str, float]) -> None:
        super().__init__(tasks=tasks)
        self._weights = _check_static(self.tasks, static_weights)

    def weight(self, task: str, loss: Tensor) -> Tensor:
        self.index(task)
        return loss * self._weights[task]

    def weights(self) -> dict[str, float]:
        return dict(self._weights)


@LOSS_WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

    One learnable ``s_t = log sigma_t^2`` per task; task term ``exp(-s_t) * L_t + s_t``. This is the
    common single-form variant used for every task type: the paper's classification form is
    ``exp(-s) L + s/2`` and its regression form ``exp(-s) L / 2 + s/2``; they differ only by constant
    factors, and here the optimum is ``exp(s_t) = L_t``. Static weights are not used.
    """

    def __init__(
        self, *, tasks: Sequence[str], static_weights: Mapping[str, float], init_log_var: float = 0.0
    ) -> None:
        super().__init__(tasks=tasks)
        _check_static(self.tasks, static_weights)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))

    def weight(self, task: str, loss: Tensor) -> Tensor:
        s = self.log_vars[self.index(task)]
        return torch.exp(-s) * loss + s

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, torch.exp(-self.log_vars.detach()).tolist()))


@LOSS_WEIGHTINGS.register("dwa")
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019) over windows of ``window`` steps.

    With ``r_k = mean_k(last window) / mean_k(window before)``, the weights are
    ``w_k = K * softmax(r / temperature)_k`` (they sum to the number of tasks K) and hold for the next
    window; all weights are 1 until two windows are complete. Non-finite observations are ignored, and a
    task without observations (or a zero mean) in either window gets ``r_k = 1``. Static weights are not
    used. The state lives in a CPU float64 tensor (``get_extra_state``), so it is checkpointed and never
    forces a device sync.
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        static_weights: Mapping[str, float],
        window: int = 100,
        temperature: float = 2.0,
    ) -> None:
        super().__init__(tasks=tasks)
        _check_static(self.tasks, static_weights)
        if window < 1 or not temperature > 0:
            raise ValueError(f"dwa needs window >= 1 and temperature > 0, got {window}, {temperature}")
        self.window = int(window)
        self.temperature = float(temperature)
        n = len(self.tasks)
        self._sums = [0.0] * n
        self._counts = [0] * n
        self._steps = 0  # steps observed in the current window
        self._windows = 0  # windows completed
        self._means = [[math.nan] * n, [math.nan] * n]  # [window before, last window]
        self._weights = [1.0] * n

    def weight(self, task: str, loss: Tensor) -> Tensor:
        return loss * self._weights[self.index(task)]

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self._weights))

    def observe(self, losses: Mapping[str, float]) -> None:
        for task, value in losses.items():
            i = self.index(task)
            if math.isfinite(value):
                self._sums[i] += float(value)
                self._counts[i] += 1
        self._steps += 1
        if self._steps >= self.window:
            self._close_window()

    def _close_window(self) -> None:
        means = [s / c if c else math.nan for s, c in zip(self._sums, self._counts)]
        self._means = [self._means[1], means]
        self._windows += 1
        self._sums = [0.0] * len(self.tasks)
        self._counts = [0] * len(self.tasks)
        self._steps = 0
        if self._windows >= 2:
            self._weights = self._dwa_weights(*self._means)

    def _dwa_weights(self, before: list[float], last: list[float]) -> list[float]:
        ratios = [_ratio(b, l) for b, l in zip(before, last)]
        top = max(ratios)
        exps = [math.exp((r - top) / self.temperature) for r in ratios]
        return [len(exps) * e / sum(exps) for e in exps]

    def get_extra_state(self) -> Tensor:
        """``[steps, windows, *sums, *counts, *means_before, *means_last, *weights]`` as CPU float64."""
        values = [self._steps, self._windows, *self._sums, *self._counts, *self._means[0], *self._means[1]]
        return torch.tensor(values + self._weights, dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        n = len(self.tasks)
        if not isinstance(state, Tensor) or state.numel() != 2 + 5 * n:
            raise ValueError(f"dwa state must be a tensor of {2 + 5 * n} values for tasks {self.tasks}")
        v = state.detach().cpu().to(torch.float64).tolist()
        self._steps, self._windows = int(v[0]), int(v[1])
        chunks = [v[2 + k * n : 2 + (k + 1) * n] for k in range(5)]
        self._sums, self._means, self._weights = chunks[0], [chunks[2], chunks[3]], chunks[4]
        self._counts = [int(c) for c in chunks[1]]

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, window={self.window}, temperature={self.temperature}"


def _ratio(before: float, last: float) -> float:
    """``last / before``, or 1 where a window had no finite, positive mean."""
    r = last / before if before > 0 else math.nan
    return r if math.isfinite(r) else 1.0


def build_weighting(
    name: str, *, tasks: Sequence[str], static_weights: Mapping[str, float], **options: Any
) -> LossWeighting:
    """Build the strategy registered as ``name`` (unknown names/options raise, listing valid ones)."""
    cls = LOSS_WEIGHTINGS.get(name)
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(k for k in params if k not in ("self", "tasks", "static_weights"))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        options_text = ", ".join(allowed) or "none"
        raise ValueError(f"loss weighting '{name}' has no option(s) {unknown} (options: {options_text})")
    return cls(tasks=tasks, static_weights=static_weights, **options)
