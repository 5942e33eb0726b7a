"""Task-level router: each task selects ``k`` of ``N`` legos at every routing point of a backbone.

Choice of estimator (``mode``):

* ``topk_st`` (default): hard top-k on the task's logits in the forward pass; gradient reaches the
  logits through a straight-through gate ``g = 1 + p - p.detach()`` (``p`` = softmax probability of
  a selected lego) that multiplies the lego's output. ``g`` is exactly 1 in the forward pass, so a
  routed forward equals the extracted dense network bit for bit. Routes are task-level (one decision
  per task and layer, not per sample), so the low variance of a deterministic top-k matters more than
  exploration; the mutual-information and balance losses supply the exploration pressure.
* ``gumbel``: Gumbel-top-k: the selection uses ``logits + tau * G`` with ``G`` Gumbel noise and a
  temperature ``tau`` annealed from ``tau_start`` to ``tau_end`` (``set_progress``); the gate uses
  the tempered softmax. More exploration early, converging to top-k.

At eval (``self.training`` False) both modes use deterministic top-k and no gate. Routes fixed by
hand (``fixed_routes``) bypass the logits for that task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

RouterMode = Literal["topk_st", "gumbel"]


@dataclass
class Route:
    """One task's choice at every routing point: sorted lego ids and optional straight-through gates."""

    idx_LK: Tensor  # long [L, k], sorted ascending per layer
    gate_LK: Tensor | None  # float [L, k] equal to 1 in value, or None (eval / fixed route)

    def layer(self, l: int) -> tuple[Tensor, Tensor | None]:
        return self.idx_LK[l], None if self.gate_LK is None else self.gate_LK[l]


class TaskRouter(nn.Module):
    """Learnable ``logits_TLN`` (tasks x routing points x legos) selecting ``k`` legos per task."""

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        num_layers: int,
        num_legos: int,
        active: int,
        mode: RouterMode = "topk_st",
        init_std: float = 0.01,
        tau_start: float = 1.0,
        tau_end: float = 0.1,
        mi_weight: float = 0.01,
        balance_weight: float = 0.01,
        fixed_routes: Mapping[str, Sequence[Sequence[int]]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= active <= num_legos:
            raise ValueError(f"active={active} must be in [1, num_legos={num_legos}]")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {list(tasks)}")
        self.num_layers, self.num_legos, self.active = num_layers, num_legos, active
        self.mode: RouterMode = mode
        self.tau_start, self.tau_end, self.tau = tau_start, tau_end, tau_start
        self.mi_weight, self.balance_weight = mi_weight, balance_weight
        self.tasks: list[str] = list(tasks)
        gen = torch.Generator().manual_seed(seed)
        init_TLN = torch.randn(len(self.tasks), num_layers, num_legos, generator=gen) * init_std
        self.logits_TLN = nn.Parameter(init_TLN)
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
        """Add a task (e.g. a downstream task for sparse transfer), optionally copying another's logits."""
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
        self.tasks.append(task)

    def set_progress(self, frac: float) -> None:
        """Anneal the Gumbel temperature geometrically; ``frac`` in [0, 1] is training progress."""
        frac = min(max(frac, 0.0), 1.0)
        self.tau = self.tau_start * (self.tau_end / self.tau_start) ** frac

    # ------------------------------------------------------------------ routing
    def forward(self, task: str) -> Route:
        """Select ``k`` legos per routing point for ``task``."""
        device = self.logits_TLN.device
        if task in self.fixed:
            return Route(idx_LK=self.fixed[task].to(device), gate_LK=None)
        logits_LN = self.logits_TLN[self.task_id(task)]
        if not self.training:
            return Route(idx_LK=_topk_sorted(logits_LN.detach(), self.active), gate_LK=None)
        tau = 1.0
        scores_LN = logits_LN.detach()
        if self.mode == "gumbel":
            tau = self.tau
            uniform_LN = torch.rand_like(scores_LN).clamp_(1e-9, 1 - 1e-9)
            scores_LN = scores_LN + tau * -torch.log(-torch.log(uniform_LN))
        idx_LK = _topk_sorted(scores_LN, self.active)
        prob_LN = torch.softmax(logits_LN / tau, dim=-1)
        p_LK = prob_LN.gather(1, idx_LK)
        return Route(idx_LK=idx_LK, gate_LK=(p_LK - p_LK.detach()) + 1.0)  # exactly 1 in value

    def routes(self) -> dict[str, list[list[int]]]:
        """Current deterministic routes of every task (for configs, reports, extraction)."""
        with torch.no_grad():
            out = {}
            for t in self.tasks:
                idx = self.fixed.get(t)
                if idx is None:
                    idx = _topk_sorted(self.logits_TLN[self.task_id(t)], self.active)
                out[t] = idx.tolist()
            return out

    def usage_TLN(self) -> Tensor:
        """0/1 tensor [T, L, N]: which legos each task uses (deterministic routes)."""
        usage = torch.zeros(len(self.tasks), self.num_layers, self.num_legos)
        for t, route in enumerate(self.routes().values()):
            usage[t].scatter_(1, torch.tensor(route), 1.0)
        return usage

    # ------------------------------------------------------------------ auxiliary losses
    def aux_losses(self, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Weighted router losses over ``tasks`` (default: all learnable ones), computed once per step.

        ``router_mi``: minus the task-lego mutual information (Mod-Squad),
        ``MI = H(mean_t p_t) - mean_t H(p_t)`` per layer, averaged over layers and normalised by
        ``log N``. Maximising it makes each task decisive while spreading tasks over legos.
        ``router_balance``: squared coefficient of variation of mean lego usage per layer, so that no
        lego dies. Both are zero-weighted terms when the weights are 0.
        """
        names = [t for t in (tasks or self.tasks) if t not in self.fixed]
        if not names:
            zero = self.logits_TLN.sum() * 0.0
            return {"router_mi": zero, "router_balance": zero}
        ids = torch.tensor([self.task_id(t) for t in names], device=self.logits_TLN.device)
        prob_TLN = torch.softmax(self.logits_TLN.index_select(0, ids), dim=-1)
        usage_LN = prob_TLN.mean(0)
        h_marginal_L = _entropy(usage_LN)
        h_cond_L = _entropy(prob_TLN).mean(0)
        mi = ((h_marginal_L - h_cond_L) / math.log(self.num_legos)).mean()
        cv2 = (usage_LN.var(dim=-1, unbiased=False) / usage_LN.mean(dim=-1).pow(2)).mean()
        return {"router_mi": -self.mi_weight * mi, "router_balance": self.balance_weight * cv2}


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


__all__ = ["Route", "TaskRouter", "lego_channels", "gate_channels"]
