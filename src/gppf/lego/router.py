"""Task-level router: each task selects ``k`` of ``N`` legos at every routing point of a backbone.

Schedule (``set_progress(step, total)``): a *search* phase (the first ``search_until`` of training),
then hard top-k routing, then frozen routes from ``freeze_at`` on.

Estimators for the search phase (``mode``):

* ``soft_topk`` (default): dense-to-sparse. Every lego is computed, weighted by a soft top-k mask
  ``m = sigmoid((logits - thr) / tau)`` with ``thr`` the midpoint of the k-th and (k+1)-th logit,
  renormalised to sum to ``k`` (``gate = k m / sum m``). Every lego, selected or not, gets the
  gradient of the task loss with respect to its weight, so the router learns which legos *would*
  help (DARTS / dense-to-sparse MoE). ``tau`` anneals geometrically from ``tau_start`` to ``tau_end``
  over the phase, so the mask approaches the hard top-k it hands over to (cost: ``N/k`` x backbone
  compute during the phase only).
* ``topk_st``: hard top-k; the gradient reaches the logits through a straight-through gate
  ``g = 1 + p - p.detach()`` on the selected legos only (it says whether to keep them, nothing about
  the unselected ones).
* ``gumbel``: Gumbel-top-k, ``logits + tau * G`` with annealed ``tau``, straight-through gate.

After the search phase every mode routes by hard top-k with the straight-through gate (value 1, so
the routed forward equals the extracted dense network). From ``freeze_at`` (a fraction of training
if <= 1, else a step) the routes are a stored snapshot: no gate, no gradient, no churn.

Gradient scale: the task loss's gradient on a task's logits is rescaled (in the backward pass only)
to unit RMS per routing point, so the router's learning rate is a step size in logit units whatever
the loss scale (a zero gradient stays zero). The auxiliary losses' gradients are rescaled the same way
to RMS ``mi_weight`` / ``balance_weight``: those weights are the stated fraction of the task gradient.

At eval (``self.training`` False) routes are deterministic top-k (or the frozen snapshot) with no gate.
Routes fixed by hand (``fixed_routes``) bypass the logits for that task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

RouterMode = Literal["soft_topk", "topk_st", "gumbel"]


@dataclass
class Route:
    """One task's choice at every routing point: sorted lego ids and optional gates.

    ``idx_LK`` has ``k`` columns, or ``N`` (every lego) with a soft gate during a ``soft_topk`` search.
    """

    idx_LK: Tensor  # long [L, k] (or [L, N]), sorted ascending per layer
    gate_LK: Tensor | None  # float [L, k]: 1 in value (straight-through) or the soft mask; None at eval / frozen

    def layer(self, l: int) -> tuple[Tensor, Tensor | None]:
        return self.idx_LK[l], None if self.gate_LK is None else self.gate_LK[l]


class _RescaleGrad(torch.autograd.Function):
    """Identity forward; backward rescales the gradient to RMS ``scale`` over ``dims`` (zero stays zero)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, dims: tuple[int, ...]) -> Tensor:
        ctx.scale, ctx.dims = scale, dims
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        rms = grad.pow(2).mean(dim=ctx.dims, keepdim=True).sqrt()
        return grad * (ctx.scale / rms.clamp_min(1e-30)), None, None


def rescale_grad(x: Tensor, *, scale: float, dims: tuple[int, ...]) -> Tensor:
    """``x`` whose gradient is rescaled to RMS ``scale`` over ``dims`` in the backward pass."""
    return _RescaleGrad.apply(x, scale, dims)


class TaskRouter(nn.Module):
    """Learnable ``logits_TLN`` (tasks x routing points x legos) selecting ``k`` legos per task."""

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        num_layers: int,
        num_legos: int,
        active: int,
        mode: RouterMode = "soft_topk",
        init_std: float = 0.01,
        tau_start: float = 1.0,
        tau_end: float = 0.05,
        search_until: float = 0.2,
        freeze_at: float = 0.3,
        mi_weight: float = 0.0,
        balance_weight: float = 0.0,
        fixed_routes: Mapping[str, Sequence[Sequence[int]]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= active <= num_legos:
            raise ValueError(f"active={active} must be in [1, num_legos={num_legos}]")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {list(tasks)}")
        if not 0.0 <= search_until <= 1.0:
            raise ValueError(f"search_until={search_until} must be a fraction of training in [0, 1]")
        if freeze_at < 0:
            raise ValueError(f"freeze_at={freeze_at} must be >= 0 (fraction if <= 1, else a step)")
        self.num_layers, self.num_legos, self.active = num_layers, num_legos, active
        self.mode: RouterMode = mode
        self.tau_start, self.tau_end, self.tau = tau_start, tau_end, tau_start
        self.search_until, self.freeze_at, self.searching = search_until, freeze_at, mode == "soft_topk"
        self.mi_weight, self.balance_weight = mi_weight, balance_weight
        self.tasks: list[str] = list(tasks)
        gen = torch.Generator().manual_seed(seed)
        init_TLN = torch.randn(len(self.tasks), num_layers, num_legos, generator=gen) * init_std
        self.logits_TLN = nn.Parameter(init_TLN)
        # frozen route snapshot (checkpointed); -1 = not frozen
        self.register_buffer("frozen_TLK", torch.full((len(self.tasks), num_layers, active), -1, dtype=torch.long))
        self.fixed: dict[str, Tensor] = {}
        for name, route in (fixed_routes or {}).items():
            self.fix_route(name, route)

    # ------------------------------------------------------------------ task management
    def task_id(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise KeyError(f"unknown task '{task}' (router knows {self.tasks})") from None

    def fix_route(self, task: str, route: Sequence[Sequence[int]] | Tensor) -> None:
        """Pin ``task`` to a hand-written route ``[L][k]`` of lego ids."""
        self.task_id(task)
        idx_LK = torch.as_tensor(route, dtype=torch.long)
        if idx_LK.shape != (self.num_layers, self.active):
            raise ValueError(
                f"route for '{task}' must have shape [{self.num_layers}, {self.active}], "
                f"got {list(idx_LK.shape)}"
            )
        if idx_LK.min() < 0 or idx_LK.max() >= self.num_legos:
            raise ValueError(f"route for '{task}' has lego ids outside [0, {self.num_legos})")
        if any(len(set(row.tolist())) != self.active for row in idx_LK):
            raise ValueError(f"route for '{task}' repeats a lego within a layer")
        self.fixed[task] = idx_LK.sort(dim=1).values

    def add_task(self, task: str, *, init_from: str | None = None) -> None:
        """Add a task (e.g. a downstream task for sparse transfer), optionally copying another's logits.

        The new task's route is learnable (not frozen) even if the others are.
        """
        if task in self.tasks:
            raise ValueError(f"task '{task}' already routed")
        with torch.no_grad():
            new_LN = (
                self.logits_TLN[self.task_id(init_from)].clone()
                if init_from
                else torch.randn(self.num_layers, self.num_legos) * 0.01
            )
            grown = torch.cat([self.logits_TLN.data, new_LN[None].to(self.logits_TLN)], 0)
        self.logits_TLN = nn.Parameter(grown)
        self.frozen_TLK = torch.cat([self.frozen_TLK, torch.full_like(self.frozen_TLK[:1], -1)])
        self.tasks.append(task)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "frozen_TLK"  # checkpoints from before route freezing: nothing frozen
        logits = state_dict.get(prefix + "logits_TLN")
        if key not in state_dict and logits is not None:
            state_dict[key] = torch.full((*logits.shape[:2], self.active), -1, dtype=torch.long)
        if key in state_dict and state_dict[key].shape != self.frozen_TLK.shape:
            self.frozen_TLK = torch.full_like(state_dict[key], -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ schedule
    def freeze_step(self, total: int) -> int:
        """The step from which routes are frozen (``freeze_at`` as a fraction of ``total``, or a step)."""
        return round(self.freeze_at * total) if self.freeze_at <= 1.0 else int(self.freeze_at)

    def set_progress(self, step: int, total: int) -> None:
        """Advance the schedule to ``step`` of ``total``: search phase and ``tau``, then the freeze."""
        search_steps = self.search_until * total
        frac = min(step / search_steps, 1.0) if search_steps > 0 else 1.0
        self.tau = self.tau_start * (self.tau_end / self.tau_start) ** frac
        self.searching = self.mode == "soft_topk" and step < search_steps
        if step >= self.freeze_step(total) and not self.frozen:
            self.freeze()

    @property
    def frozen(self) -> bool:
        return bool((self.frozen_TLK >= 0).all())

    def freeze(self) -> None:
        """Snapshot every task's current route; from now on routes stay fixed (no gate, no gradient)."""
        with torch.no_grad():
            for t, name in enumerate(self.tasks):
                self.frozen_TLK[t] = self._deterministic(name).to(self.frozen_TLK.device)

    # ------------------------------------------------------------------ routing
    def _deterministic(self, task: str) -> Tensor:
        if task in self.fixed:
            return self.fixed[task].to(self.logits_TLN.device)
        t = self.task_id(task)
        if bool((self.frozen_TLK[t] >= 0).all()):
            return self.frozen_TLK[t]
        return _topk_sorted(self.logits_TLN[t].detach(), self.active)

    def forward(self, task: str, *, grad_rms: float = 1.0) -> Route:
        """Select ``k`` legos per routing point for ``task`` (all ``N``, softly, while searching).

        ``grad_rms``: the RMS per routing point that the task loss's gradient on these logits is rescaled
        to. A task trained on ``R`` ranks takes ``1 / R`` on each (``gppf.engine.simt``): the gradient
        sync sums the ranks' shares, so the router's step stays at most one logit unit (exactly one
        where the ranks' gradients agree) instead of growing with the number of ranks."""
        t = self.task_id(task)
        if not self.training or task in self.fixed or bool((self.frozen_TLK[t] >= 0).all()):
            return Route(idx_LK=self._deterministic(task), gate_LK=None)
        logits_LN = rescale_grad(self.logits_TLN[t], scale=grad_rms, dims=(-1,))
        if self.searching:
            return self._soft_route(logits_LN)
        tau, scores_LN = 1.0, logits_LN.detach()
        if self.mode == "gumbel":
            tau = self.tau
            uniform_LN = torch.rand_like(scores_LN).clamp_(1e-9, 1 - 1e-9)
            scores_LN = scores_LN + tau * -torch.log(-torch.log(uniform_LN))
        idx_LK = _topk_sorted(scores_LN, self.active)
        p_LK = torch.softmax(logits_LN / tau, dim=-1).gather(1, idx_LK)
        return Route(idx_LK=idx_LK, gate_LK=(p_LK - p_LK.detach()) + 1.0)  # exactly 1 in value

    def _soft_route(self, logits_LN: Tensor) -> Route:
        """Every lego, weighted by the soft top-k mask renormalised to sum ``k`` per routing point."""
        top_LK = logits_LN.detach().topk(min(self.active + 1, self.num_legos), dim=-1).values
        thr_L1 = top_LK[:, -2:].mean(-1, keepdim=True) if self.active < self.num_legos else top_LK[:, -1:] - 1.0
        mask_LN = torch.sigmoid((logits_LN - thr_L1) / self.tau)
        gate_LN = mask_LN * (self.active / mask_LN.sum(-1, keepdim=True))
        idx_LN = torch.arange(self.num_legos, device=logits_LN.device).expand(self.num_layers, -1)
        return Route(idx_LK=idx_LN, gate_LK=gate_LN)

    def routes(self) -> dict[str, list[list[int]]]:
        """Current deterministic routes of every task (for configs, reports, extraction)."""
        with torch.no_grad():
            return {t: self._deterministic(t).tolist() for t in self.tasks}

    def usage_TLN(self) -> Tensor:
        """0/1 tensor [T, L, N]: which legos each task uses (deterministic routes)."""
        usage = torch.zeros(len(self.tasks), self.num_layers, self.num_legos)
        for t, route in enumerate(self.routes().values()):
            usage[t].scatter_(1, torch.tensor(route), 1.0)
        return usage

    def margins(self) -> dict[str, float]:
        """Per task: mean over routing points of the k-th minus the (k+1)-th logit (decisiveness).

        Empty when every lego is active (nothing to decide)."""
        if self.active >= self.num_legos:
            return {}
        with torch.no_grad():
            top_TLK = self.logits_TLN.detach().topk(self.active + 1, dim=-1).values
            gap_T = (top_TLK[..., -2] - top_TLK[..., -1]).mean(-1)
        return {t: float(g) for t, g in zip(self.tasks, gap_T)}

    # ------------------------------------------------------------------ auxiliary losses
    def aux_losses(self, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Router losses over ``tasks`` (default: all learnable ones), computed once per step.

        ``router_mi``: minus the task-lego mutual information (Mod-Squad),
        ``MI = H(mean_t p_t) - mean_t H(p_t)`` per layer, averaged over layers and normalised by
        ``log N``. Maximising it makes each task decisive while spreading tasks over legos.
        ``router_balance``: squared coefficient of variation of mean lego usage per layer, so that no
        lego dies. Values are weighted by ``mi_weight`` / ``balance_weight``; their gradients on the
        logits are rescaled to RMS equal to the weight per routing point (the task gradient has RMS 1),
        because near a uniform softmax both are quadratic and their raw gradients vanish. Frozen or
        fixed routes get no auxiliary loss (constant zeros).
        """
        names = [t for t in (tasks or self.tasks)
                 if t not in self.fixed and not bool((self.frozen_TLK[self.task_id(t)] >= 0).all())]
        if not names:
            zero = self.logits_TLN.new_zeros(())
            return {"router_mi": zero, "router_balance": zero}
        ids = torch.tensor([self.task_id(t) for t in names], device=self.logits_TLN.device)
        out = {}
        for key, weight, fn in (("router_mi", self.mi_weight, _neg_mi), ("router_balance", self.balance_weight, _cv2)):
            if weight <= 0:
                out[key] = self.logits_TLN.new_zeros(())
                continue
            logits_TLN = rescale_grad(self.logits_TLN.index_select(0, ids), scale=weight, dims=(0, 2))
            out[key] = weight * fn(torch.softmax(logits_TLN, dim=-1), self.num_legos)
        return out


def _neg_mi(prob_TLN: Tensor, num_legos: int) -> Tensor:
    """Minus the task-lego mutual information per layer / log N, averaged over layers."""
    h_marginal_L = _entropy(prob_TLN.mean(0))
    h_cond_L = _entropy(prob_TLN).mean(0)
    return -((h_marginal_L - h_cond_L) / math.log(num_legos)).mean()


def _cv2(prob_TLN: Tensor, num_legos: int) -> Tensor:
    """Squared coefficient of variation of the mean lego usage per layer, averaged over layers."""
    usage_LN = prob_TLN.mean(0)
    return (usage_LN.var(dim=-1, unbiased=False) / usage_LN.mean(dim=-1).pow(2)).mean()


def route_churn(prev: Mapping[str, Sequence[Sequence[int]]], cur: Mapping[str, Sequence[Sequence[int]]]) -> float:
    """Fraction of (task, routing point) routes whose lego set differs between ``prev`` and ``cur``."""
    pairs = [(a, b) for t in cur if t in prev for a, b in zip(prev[t], cur[t])]
    return sum(sorted(a) != sorted(b) for a, b in pairs) / max(len(pairs), 1)


def _topk_sorted(scores_LN: Tensor, k: int) -> Tensor:
    return scores_LN.topk(k, dim=-1).indices.sort(dim=-1).values


def _entropy(prob: Tensor) -> Tensor:
    return -(prob * torch.log(prob.clamp_min(1e-12))).sum(-1)


def lego_channels(idx_K: Tensor, width: int) -> Tensor:
    """Channel indices ``[k * width]`` covered by legos ``idx_K`` of ``width`` channels each."""
    offs = torch.arange(width, device=idx_K.device)
    return (idx_K[:, None] * width + offs[None, :]).reshape(-1)


def gate_channels(gate_K: Tensor | None, width: int) -> Tensor | None:
    """Per-channel gate ``[k * width]`` from a per-lego gate."""
    return None if gate_K is None else gate_K.repeat_interleave(width)


__all__ = ["Route", "TaskRouter", "gate_channels", "lego_channels", "rescale_grad", "route_churn"]
