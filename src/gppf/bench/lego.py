"""``gppf bench lego``: cost of a routed GPPF-R50 training step against its dense ResNet-50 twin.

One process, fixed thread count, bf16 autocast + channels_last on CPU. Three models are stepped
interleaved (dense, routed with ``legos_large`` legos, routed with ``legos_small`` legos, all with
``active`` legos of width ``planes / active``, so the active sub-network is a standard ResNet-50):

* ``step_ratio_vs_dense``: median step time routed(N=legos_large) / dense ``torchvision`` ResNet-50.
* ``step_ratio_n16_vs_n4``: median step time routed(N=legos_large) / routed(N=legos_small).
* ``act_mem_ratio_vs_dense``: allocator peak of one step above parameters, gradients and optimizer
  state (taken after a warm-up step, ``zero_grad(set_to_none=False)``), routed(N=legos_large) / dense.

``median_phase_s`` splits each model's timed steps into zero_grad / forward (with loss) / backward /
optimizer.

A step is ``zero_grad(set_to_none=False)`` (gppf's engine keeps every ``.grad``), forward,
cross-entropy of a ``Linear(pooled, 1000)`` head on random labels, backward and
``SGD(lr=1e-3, momentum=0.9, weight_decay=1e-4)`` with the same kernels for every model
(``--sgd fused``, the default: one kernel per tensor, though on CPU it clones channels_last tensors,
i.e. the dense model's convolution weights (full-size lego weights are kept contiguous); or
``--sgd foreach``): ``torch.optim.SGD`` for the dense model and gppf's ``LegoSGD`` (what gppf trains
with) for the routed ones. ``LegoSGD`` gives the same parameters as ``torch.optim.SGD`` but updates and
zeroes only the legos a step used (the step tells it which, from its route), catching the others up in
closed form before a step next reads them, so its cost does not grow with N. ``--no-lazy``:
``torch.optim.SGD`` for the routed models too (every lego read and written every step).
Defaults: batch 16 at 224 px, N=16 vs N=4 at k=4, 7 timed rounds after 2 warm-up rounds, 1 thread (on
a shared 2-core machine, OpenMP barriers of multi-threaded ops make timings erratic; pass
``--threads``).
``--quick``: batch 2 at 64 px, N=4 vs N=2 at k=2, one timed round (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import gppf
from gppf.lego.layers import rows_used
from gppf.lego.optim import LegoSGD
from gppf.lego.router import Route
from gppf.bench.common import (
    emit,
    env_info,
    fixed_threads,
    interleaved_times,
    medians,
    meets,
    peak_alloc_bytes,
    ratio,
)

GOALS: dict[str, float] = {
    "step_ratio_vs_dense": 1.05,
    "step_ratio_n16_vs_n4": 1.05,
    "act_mem_ratio_vs_dense": 1.10,
}
DEFAULTS: dict[str, Any] = dict(
    batch=16, image_size=224, repeats=7, warmup=2, threads=1, legos_small=4, legos_large=16, active=4
)
QUICK: dict[str, Any] = dict(batch=2, image_size=64, repeats=1, warmup=1, legos_small=2, legos_large=4, active=2)
NUM_CLASSES = 1000
TASK = "t"
SGD_KW: dict[str, Any] = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
SgdImpl = Literal["fused", "foreach"]
PHASES = ("zero_grad", "forward", "backward", "optimizer")


class RoutedClassifier(nn.Module):
    """GPPF-R50 (routed, one task) + linear head on the pooled features: the dense model's twin."""

    def __init__(self, *, legos: int, active: int) -> None:
        super().__init__()
        self.backbone = gppf.create_backbone("gppf_r50", legos=legos, active=active, tasks=[TASK])
        self.fc = nn.Linear(self.backbone.pooled_dim, NUM_CLASSES)

    def forward(self, x_BCHW: Tensor, *, route: Route | None = None) -> Tensor:
        return self.fc(self.backbone.forward_pooled(x_BCHW, TASK, route=route))

    def route_and_prepare(self, opt: LegoSGD) -> Route:
        """The task's route, after telling ``opt`` which lego rows it uses (as gppf's SIMT step does)."""
        route = self.backbone.router(TASK)
        opt.prepare(rows_used(self.backbone.lego_rows(), [route.idx_LK]))
        return route


@dataclass
class Trainee:
    """A model in training mode (channels_last) with its optimizer and a fixed batch."""

    model: nn.Module
    opt: torch.optim.Optimizer
    x_BCHW: Tensor
    y_B: Tensor
    phases_s: dict[str, list[float]] = field(default_factory=dict)  # wall time of each step's phases

    def step(self, *, set_to_none: bool = False) -> None:
        """One SGD step under bf16 autocast (gradients persist, as in gppf's engine)."""
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=set_to_none)
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if isinstance(self.opt, LegoSGD):  # routed with LegoSGD: route first, prepare the used rows
                route = self.model.route_and_prepare(self.opt)
                logits = self.model(self.x_BCHW, route=route)
            else:
                logits = self.model(self.x_BCHW)
            loss = F.cross_entropy(logits.float(), self.y_B)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        t4 = time.perf_counter()
        for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.phases_s.setdefault(name, []).append(dt)

    def median_phases(self, last: int) -> dict[str, float]:
        """Median wall time of each phase over the ``last`` steps."""
        return {name: statistics.median(self.phases_s[name][-last:]) for name in PHASES}


def make_sgd(params: Any, *, impl: SgdImpl, lazy: bool,
             lego_params: Sequence[Tensor] = ()) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, ``fused`` or ``foreach`` kernels: ``torch.optim.SGD`` for the
    dense model, gppf's ``LegoSGD`` (the same update, deferred for unused rows of ``lego_params``) if ``lazy``."""
    if impl not in ("fused", "foreach"):
        raise ValueError(f"unknown SGD implementation {impl!r}")
    kernels = dict(fused=impl == "fused", foreach=impl == "foreach")
    if lazy:
        return LegoSGD(params, **SGD_KW, **kernels, lego_params=lego_params)
    return torch.optim.SGD(params, **SGD_KW, **kernels)


def make_trainee(
    model: nn.Module, *, batch: int, image_size: int, sgd: SgdImpl, lazy: bool, seed: int = 0
) -> Trainee:
    """Put ``model`` in train mode and channels_last; the batch depends only on ``seed``."""
    model.train().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    lego_params = [d.param for d in model.backbone.lego_rows()] if lazy else []
    opt = make_sgd(model.parameters(), impl=sgd, lazy=lazy, lego_params=lego_params)
    return Trainee(model=model, opt=opt, x_BCHW=x, y_B=y)


def build_trainees(
    *, batch: int, image_size: int, legos_small: int, legos_large: int, active: int, sgd: SgdImpl, lazy: bool = True
) -> dict[str, Trainee]:
    """``dense``, ``routed_large`` and ``routed_small`` trainees on the same batch (init seeded once)."""
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {
        "dense": torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES),
        "routed_large": RoutedClassifier(legos=legos_large, active=active),
        "routed_small": RoutedClassifier(legos=legos_small, active=active),
    }
    return {name: make_trainee(m, batch=batch, image_size=image_size, sgd=sgd, lazy=lazy and name != "dense")
            for name, m in models.items()}


def step_memory(trainee: Trainee) -> int:
    """Allocator peak of one step beyond params/grads/optimizer state (after a warm-up step)."""
    trainee.step()  # .grad and momentum buffers exist and persist from here on
    return peak_alloc_bytes(trainee.step)


def state_bytes(trainee: Trainee) -> int:
    """Bytes of parameters + optimizer state (gradients have the size of the parameters)."""
    params = sum(p.numel() * p.element_size() for p in trainee.model.parameters())
    state = sum(
        t.numel() * t.element_size()
        for s in trainee.opt.state.values() for t in s.values() if isinstance(t, Tensor)
    )
    return params + state


def run_lego_bench(
    *,
    batch: int,
    image_size: int,
    repeats: int,
    warmup: int,
    threads: int | None,
    legos_small: int,
    legos_large: int,
    active: int,
    quick: bool,
    sgd: SgdImpl = "fused",
    lazy: bool = True,
) -> dict[str, Any]:
    """Measure the routed-vs-dense step time and activation memory ratios; returns a JSON-ready dict."""
    with fixed_threads(threads) as n_threads:
        trainees = build_trainees(batch=batch, image_size=image_size, legos_small=legos_small,
                                  legos_large=legos_large, active=active, sgd=sgd, lazy=lazy)
        steps: dict[str, Callable[[], None]] = {name: t.step for name, t in trainees.items()}
        samples = interleaved_times(steps, repeats=repeats, warmup=warmup)
        phases = {name: t.median_phases(repeats) for name, t in trainees.items()}
        mem = {name: step_memory(t) for name, t in trainees.items()}
    med = medians(samples)
    values = {
        "step_ratio_vs_dense": ratio(med["routed_large"], med["dense"]),
        "step_ratio_n16_vs_n4": ratio(med["routed_large"], med["routed_small"]),
        "act_mem_ratio_vs_dense": ratio(mem["routed_large"], mem["dense"]),
    }
    config = dict(
        batch=batch, image_size=image_size, repeats=repeats, warmup=warmup, threads=n_threads,
        legos_small=legos_small, legos_large=legos_large, active=active, quick=quick,
        dtype="bfloat16 autocast", memory_format="channels_last", device="cpu",
        optimizer=f"SGD({', '.join(f'{k}={v}' for k, v in SGD_KW.items())}, {sgd} kernels): torch.optim.SGD "
                  f"for the dense model, {'gppf LegoSGD' if lazy else 'torch.optim.SGD'} for the routed ones",
        zero_grad="set_to_none=False (as gppf's engine)", **env_info(),
    )
    return {
        "bench": "lego",
        **values,
        "median_step_s": med,
        "step_samples_s": samples,
        "median_phase_s": phases,
        "step_act_peak_bytes": mem,
        "param_and_optim_state_bytes": {name: state_bytes(t) for name, t in trainees.items()},
        "goals": dict(GOALS),
        "meets_goals": meets(values, GOALS),
        "config": config,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gppf bench lego", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (batch 2, 64 px, N=4 vs 2, k=2)")
    p.add_argument("--batch", type=int, help="batch size (default 16; quick 2)")
    p.add_argument("--image-size", type=int, help="square input size in px (default 224; quick 64)")
    p.add_argument("--repeats", type=int, help="timed interleaved rounds (default 7; quick 1)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 2; quick 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1)")
    p.add_argument("--sgd", choices=["fused", "foreach"], default="fused", help="SGD implementation (default fused)")
    p.add_argument("--no-lazy", action="store_true",
                   help="routed models use torch.optim.SGD (every lego updated every step) instead of LegoSGD")
    p.add_argument("--legos-small", type=int, help="N of the smaller routed model (default 4)")
    p.add_argument("--legos-large", type=int, help="N of the larger routed model (default 16)")
    p.add_argument("--active", type=int, help="k active legos per routing point (default 4)")
    return p.parse_args(argv)


def main_lego(argv: list[str]) -> int:
    """CLI entry: ``gppf bench lego [--json] [--quick] [--batch B] ...``."""
    args = parse_args(argv)
    kw = {**DEFAULTS, **(QUICK if args.quick else {})}
    kw.update({k: v for k, v in vars(args).items() if k in kw and v is not None})
    result = run_lego_bench(**kw, quick=args.quick, sgd=args.sgd, lazy=not args.no_lazy)
    emit(result, as_json=args.json)
    return 0 if all(math.isfinite(result[k]) for k in GOALS) else 1


if __name__ == "__main__":
    sys.exit(main_lego(sys.argv[1:]))
