"""The GPPF-R50 regimes of ``gppf bench lego``: routed GPPF-R50 steps against the dense ResNet-50.

One process, fixed thread count, bf16 autocast, channels_last inputs on CPU. Every model has one
``Linear(pooled, 1000)`` head per task; a step is ``zero_grad(set_to_none=False)`` (gppf's engine keeps
every ``.grad``), then for every task its forward, cross-entropy on random labels scaled by ``1 / T``
and its own backward (as the SIMT step), the router losses (routed models), and one SGD step
(``lr=1e-3, momentum=0.9, weight_decay=1e-4``): ``torch.optim.SGD`` for the dense model, gppf's
``LegoSGD`` (what gppf trains with; ``lazy=False``: ``torch.optim.SGD``) for the routed ones, with the
same kernels (``fused`` or ``foreach``). Routes are learned (``topk_st``, with their gates) and may
change between steps, so ``LegoSGD``'s catch-up of skipped legos is part of the measured step.

Models, stepped interleaved:

* ``dense_channels_last`` / ``dense_contiguous``: torchvision ResNet-50 with channels_last or
  contiguous weights (CPU fused SGD re-lays out channels_last tensors, so the layout matters); both
  are reported and the faster one (``dense``) is the baseline;
* ``routed_large`` / ``routed_small``: GPPF-R50 with ``legos_large`` / ``legos_small`` legos, ``active``
  of them per task and routing point (lego width ``planes / active``: the active sub-network is a
  standard ResNet-50).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch import Tensor, nn

import gppf
from gppf.bench.common import CLOCKS, dtype_name, interleaved_times, medians, peak_alloc_bytes, ratio
from gppf.lego.layers import LegoRows, rows_used
from gppf.lego.optim import LegoSGD
from gppf.lego.router import Route

NUM_CLASSES = 1000
SGD_KW: dict[str, Any] = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
SgdImpl = Literal["fused", "foreach", "default"]  # default: torch's choice (a per-tensor loop on CPU)
PHASES = ("zero_grad", "forward", "backward", "optimizer")
DENSE = ("dense_channels_last", "dense_contiguous")


def default_recipe_tasks() -> list[str]:
    """The task names of the packaged default recipe (six tasks)."""
    text = (resources.files("gppf") / "configs" / "default.yaml").read_text()
    return [t["name"] for t in yaml.safe_load(text)["tasks"]]


class MultiHead(nn.Module):
    """A trunk giving pooled features (``trunk(x, task)``) and one linear head per task."""

    def __init__(self, *, trunk: Callable[[Tensor, str], Tensor], modules: dict[str, nn.Module], dim: int,
                 tasks: list[str]) -> None:
        super().__init__()
        self.trunk_fn = trunk
        self.parts = nn.ModuleDict(modules)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, NUM_CLASSES) for t in tasks})

    def forward(self, x_BCHW: Tensor, task: str, *, route: Route | None = None) -> Tensor:
        pooled = self.trunk_fn(x_BCHW, task) if route is None else self.trunk_fn(x_BCHW, task, route=route)
        return self.heads[task](pooled)


def dense_model(tasks: list[str]) -> MultiHead:
    """torchvision ResNet-50 (its ``fc`` removed) + one head per task."""
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()
    return MultiHead(trunk=lambda x, task: net(x), modules={"net": net}, dim=2048, tasks=tasks)


def routed_model(tasks: list[str], *, legos: int, active: int) -> MultiHead:
    """GPPF-R50 (learned routes) + one head per task."""
    # hard top-k with gates (the routed step after the router's search phase)
    backbone = gppf.create_backbone("gppf_r50", legos=legos, active=active, tasks=tasks, router={"mode": "topk_st"})
    return MultiHead(trunk=backbone.forward_pooled, modules={"backbone": backbone}, dim=backbone.pooled_dim,
                     tasks=tasks)


@dataclass
class Trainee:
    """A model in training mode with its optimizer and one fixed batch per task."""

    model: MultiHead
    opt: torch.optim.Optimizer
    batches: dict[str, tuple[Tensor, Tensor]]
    clock: Callable[[], float] = time.perf_counter
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = torch.bfloat16  # None: float32
    phases_s: dict[str, list[float]] = field(default_factory=dict)

    def step(self) -> None:
        """One SIMT-like step: every task's forward + backward, router losses, one SGD step."""
        clock = self.clock
        t0 = clock()
        self.opt.zero_grad(set_to_none=False)
        backbone = self.model.parts["backbone"] if "backbone" in self.model.parts else None
        ta = clock()
        routes = {} if backbone is None else self.route(backbone)  # counted as forward
        fwd, bwd = clock() - ta, 0.0
        for task, (x, y) in self.batches.items():
            ta = clock()
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(x, task, route=routes.get(task))
                loss = F.cross_entropy(logits.float(), y) / len(self.batches)
            tb = clock()
            loss.backward()
            fwd, bwd = fwd + tb - ta, bwd + clock() - tb
        if backbone is not None:
            ta = clock()
            aux = sum(backbone.router.aux_losses().values())
            if aux.requires_grad:
                aux.backward()
            bwd += clock() - ta
        t3 = clock()
        self.opt.step()
        t4 = clock()
        zero = t3 - t0 - fwd - bwd
        for name, dt in zip(PHASES, (zero, fwd, bwd, t4 - t3)):
            self.phases_s.setdefault(name, []).append(dt)

    def route(self, backbone: nn.Module) -> dict[str, Route]:
        """Every task's route, drawn once up front; a ``LegoSGD`` is told the rows they use (as the
        engine's SIMT step does)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            routes = {t: backbone.router(t) for t in self.batches}
        if isinstance(self.opt, LegoSGD) and self.opt.lazy_params:
            self.opt.prepare(rows_used(backbone.lego_rows(), [r.idx_LK for r in routes.values()]))
        return routes

    def median_phases(self, last: int) -> dict[str, float]:
        return {name: statistics.median(self.phases_s[name][-last:]) for name in PHASES}


def make_sgd(params: Any, *, impl: SgdImpl, lazy: bool, lego_params: Sequence[LegoRows] = ()) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay: ``torch.optim.SGD``, or gppf's ``LegoSGD`` if ``lazy``; ``fused``
    or ``foreach`` kernels, or torch's ``default`` choice (a per-tensor loop on CPU)."""
    if impl not in ("fused", "foreach", "default"):
        raise ValueError(f"unknown SGD implementation {impl!r}")
    kernels = {} if impl == "default" else dict(fused=impl == "fused", foreach=impl == "foreach")
    if lazy:
        return LegoSGD(params, **SGD_KW, **kernels, lego_params=lego_params)
    return torch.optim.SGD(params, **SGD_KW, **kernels)


def make_trainee(model: MultiHead, *, tasks: list[str], batch: int, image_size: int, sgd: SgdImpl, lazy: bool,
                 weights_channels_last: bool, clock: Callable[[], float], device: str = "cpu",
                 amp_dtype: torch.dtype | None = torch.bfloat16) -> Trainee:
    """Train mode, weights (lego weights too) in the asked layout, seeded batches, on ``device``."""
    model.train().to(device)
    if weights_channels_last:
        model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    batches = {}
    for t in tasks:
        x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(memory_format=torch.channels_last)
        batches[t] = (x.to(device), torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device))
    declared = model.parts["backbone"].lego_rows() if "backbone" in model.parts else []
    opt = make_sgd(model.parameters(), impl=sgd, lazy=lazy, lego_params=declared)
    return Trainee(model=model, opt=opt, batches=batches, clock=clock, device=torch.device(device),
                   amp_dtype=amp_dtype)


def build_trainees(*, tasks: list[str], batch: int, image_size: int, legos_small: int, legos_large: int,
                   active: int, sgd: SgdImpl, lazy: bool, clock: Callable[[], float],
                   device: str = "cpu", amp_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Trainee]:
    """The two dense layouts and the two routed models, on the same batches (init seeded once)."""
    torch.manual_seed(0)
    models = {
        "dense_channels_last": (dense_model(tasks), True),
        "dense_contiguous": (dense_model(tasks), False),
        "routed_large": (routed_model(tasks, legos=legos_large, active=active), True),
        "routed_small": (routed_model(tasks, legos=legos_small, active=active), True),
    }
    return {name: make_trainee(m, tasks=tasks, batch=batch, image_size=image_size, sgd=sgd,
                               lazy=lazy and name.startswith("routed"), weights_channels_last=cl, clock=clock,
                               device=device, amp_dtype=amp_dtype)
            for name, (m, cl) in models.items()}


def step_memory(trainee: Trainee) -> int:
    """Allocator peak of one step beyond params/grads/optimizer state (after a warm-up step)."""
    trainee.step()
    return peak_alloc_bytes(trainee.step, device=trainee.device)


def state_bytes(trainee: Trainee) -> int:
    """Bytes of parameters + optimizer state (gradients have the size of the parameters)."""
    params = sum(p.numel() * p.element_size() for p in trainee.model.parameters())
    state = sum(t.numel() * t.element_size()
                for s in trainee.opt.state.values() for t in s.values() if isinstance(t, Tensor))
    return params + state


def run_r50_regime(*, tasks: list[str], batch: int, image_size: int, repeats: int, warmup: int,
                   legos_small: int, legos_large: int, active: int, sgd: SgdImpl, lazy: bool,
                   clock: str = "wall", device: str = "cpu",
                   amp_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """Interleaved step times, phases and step memory of the four models; ratios against the best dense."""
    trainees = build_trainees(tasks=tasks, batch=batch, image_size=image_size, legos_small=legos_small,
                              legos_large=legos_large, active=active, sgd=sgd, lazy=lazy, clock=CLOCKS[clock],
                              device=device, amp_dtype=amp_dtype)
    samples = interleaved_times({n: t.step for n, t in trainees.items()}, repeats=repeats, warmup=warmup,
                                clock=CLOCKS[clock])
    med = medians(samples)
    best = min(DENSE, key=lambda n: med[n])
    phases = {name: t.median_phases(repeats) for name, t in trainees.items()}  # before the profiled steps
    mem = {name: step_memory(t) for name, t in trainees.items()}
    return {
        "routed_vs_dense_step": ratio(med["routed_large"], med[best]),
        "routed_n_large_vs_small_step": ratio(med["routed_large"], med["routed_small"]),
        "routed_vs_dense_act_mem": ratio(mem["routed_large"], mem[best]),
        "dense_weights": best.removeprefix("dense_"),
        "dense_contiguous_vs_channels_last_step": ratio(med["dense_contiguous"], med["dense_channels_last"]),
        "median_step_s": med,
        "step_samples_s": samples,
        "median_phase_s": phases,
        "step_act_peak_bytes": mem,
        "param_and_optim_state_bytes": {name: state_bytes(t) for name, t in trainees.items()},
        "config": dict(
            backbone="gppf_r50 vs torchvision resnet50", tasks=len(tasks), task_names=tasks,
            batch_per_task=batch, image_size=image_size, legos_small=legos_small, legos_large=legos_large,
            active=active, repeats=repeats, warmup=warmup, clock=clock, device=device,
            routes="learned (topk_st gates, router losses)",
            dtype=dtype_name(amp_dtype), inputs="channels_last",
            optimizer=f"SGD({', '.join(f'{k}={v}' for k, v in SGD_KW.items())}, {sgd} kernels): torch.optim.SGD "
                      f"for dense, {'gppf LegoSGD' if lazy else 'torch.optim.SGD'} for routed",
            zero_grad="set_to_none=False (as gppf's engine)"),
    }
