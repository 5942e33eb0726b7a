"""``gppf bench simt``: cost of one SIMT step against per-task steps, its peak memory, and data wait.

One process with the run's thread count (``train.threads``; ``--threads`` sets it) and the run built by
``build_run`` from a config (default: the built-in six-task recipe): its model, optimizer, SIMT step
and task streams with the config's loader settings:

* ``simt_vs_alternating_kept_grads``: median time of one SIMT step over all T tasks / median over
  rounds of the summed times of T single-task steps (same model, optimizer and pre-fetched batches;
  each step is the real ``SIMTStep`` restricted to one task: forward, backward, aux losses, gradient
  norm, sync, clip, optimizer and scheduler step), gradients kept as zero tensors between steps as the
  engine does. This measures *fixed-cost amortisation*: each single-task step pays the per-step costs
  that do not shrink with the task's share of the work (router losses, the optimizer step over every
  head and shared parameter, scheduler, host syncs) that SIMT pays once; it is not a comparison at
  equal work per parameter.
* ``simt_vs_alternating_none_grads``: the same SIMT step / T single-task steps that set the gradients
  to ``None`` after each step (``zero_grad(set_to_none=True)``, PyTorch's default), so that a task's step
  leaves other tasks' heads alone; a lego gather then allocates its full-size gradient again each
  step. Reported, no goal.
  Steps run interleaved (SIMT, task 1, ..., task T, task 1 (None), ..., SIMT, ...); before each step
  the gradients are put in the state that step expects (untimed); data loading is excluded (every
  stream repeats its one pre-fetched batch).
* ``peak_mem_vs_largest_task``: allocator peak of one SIMT step above parameters, gradients and
  optimizer state / the largest such peak of a single-task step (after warm-up steps).
* ``data_wait_fraction``: share of the wall time of real training steps (real ``TaskStream``s with the
  config's loader settings) spent blocked in ``next(stream)``, after warm-up steps.

Routes are hard top-k with their gates (``model.router.mode=topk_st``, the step after the router's
search phase; a later override wins). ``--quick``: tiny images, batches, width and step counts, for
smoke tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from gppf.bench.common import (
    Repeat,
    Stepper,
    bench_parser,
    emit,
    env_info,
    fixed_threads,
    interleaved_times,
    medians,
    peak_alloc_bytes,
    ratio,
)

GOALS: dict[str, float] = {
    "simt_vs_alternating_kept_grads": 0.95,
    "peak_mem_vs_largest_task": 1.3,
    "data_wait_fraction": 0.05,
}
STRICT_GOALS = frozenset({"data_wait_fraction"})  # value < goal (others: value <= goal)
DEFAULTS: dict[str, Any] = dict(repeats=7, warmup=2, threads=None)
QUICK: dict[str, Any] = dict(repeats=2, warmup=1)
DATA_STEPS = {"full": (3, 20), "quick": (1, 3)}  # (warm-up steps, measured steps)
QUICK_TASK = {"batch_size": 8, "image_size": 32}  # format-agnostic; 8: reid P x K sampling needs >= 2k
QUICK_MODEL = ["model.width_mult=0.25"]


class TimedStream:
    """Wraps a stream; ``waited`` accumulates the seconds spent blocked in ``next``."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.waited = 0.0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        batch = next(self.stream)
        self.waited += time.perf_counter() - t0
        return batch


# ----------------------------------------------------------------------------- config and run


def load_bench_config(*, config: str | None, overrides: list[str], quick: bool) -> Any:
    """The run config (default recipe), progress bar off; ``quick`` shrinks every task first."""
    from gppf.config import default_config_path
    from gppf.config import load_config

    path = config or default_config_path()
    # hard top-k routes: the step of the 80% of training after the router's search phase (the search
    # runs every lego, N/k x the compute, and is not what SIMT vs alternating is about)
    base = ["train.progress=false", "model.router.mode=topk_st"]
    if quick:
        n_tasks = len(load_config(path, overrides).tasks)
        base += QUICK_MODEL + [f"tasks.{i}.{k}={v}" for i in range(n_tasks) for k, v in QUICK_TASK.items()]
    return load_config(path, base + list(overrides))


def loader_settings(run: Any) -> dict[str, Any]:
    """The loader settings the run's streams use (``train.num_workers`` and per-task values)."""
    per_task = {name: s.loader.num_workers for name, s in run.streams.items()}
    any_workers = any(w > 0 for w in per_task.values())
    return {
        "train.num_workers": run.cfg.train.num_workers,
        "num_workers_per_task": per_task,
        "prefetch_factor": 4 if any_workers else None,
        "persistent_workers": any_workers,
        "pin_memory": False,
    }


def config_summary(run: Any, *, threads: int, quick: bool) -> dict[str, Any]:
    """Tasks, batch and image sizes, backbone, amp and threads of the benchmarked run."""
    cfg = run.cfg
    return {
        "tasks": {t.name: t.type for t in cfg.tasks},
        "batch_size": {t.name: t.batch_size for t in cfg.tasks},
        "image_size": {t.name: t.image_size for t in cfg.tasks},
        "backbone": cfg.model.backbone, "legos": cfg.model.legos, "active": cfg.model.active,
        "width_mult": cfg.model.width_mult, "amp": cfg.train.amp, "channels_last": cfg.train.channels_last,
        "optimizer": cfg.train.optimizer, "grad_clip": cfg.train.grad_clip,
        "loss_weighting": cfg.train.loss_weighting, "device": str(run.device), "threads": threads,
        "train.threads": cfg.train.threads,
        "quick": quick, **env_info(),
    }


# ----------------------------------------------------------------------------- measurements


def measure_data_wait(run: Any, *, warmup: int, steps: int) -> dict[str, Any]:
    """Real training steps over the run's own streams; time blocked in ``next(stream)`` / wall time."""
    timed = {name: TimedStream(s) for name, s in run.streams.items()}
    stepper = Stepper(dataclasses.replace(run.step_fn, streams=timed))
    for _ in range(warmup):
        stepper()
    for t in timed.values():
        t.waited = 0.0
    walls, waits = timed_steps(stepper, list(timed.values()), steps=steps)
    return {"wall_s": sum(walls), "wait_s": sum(waits), "median_step_s": statistics.median(walls),
            "median_wait_s": statistics.median(waits),
            "median_step_fraction": statistics.median(q / w for q, w in zip(waits, walls)),
            "wait_s_per_task": {n: t.waited for n, t in timed.items()}, "step_samples_s": walls,
            "wait_samples_s": waits, "steps": steps, "warmup_steps": warmup, "skipped_steps": stepper.skipped}


def timed_steps(stepper: Stepper, timed: list[TimedStream], *, steps: int) -> tuple[list[float], list[float]]:
    """Wall time and data-wait time of each of ``steps`` steps."""
    walls, waits = [], []
    for _ in range(steps):
        before, t0 = sum(t.waited for t in timed), time.perf_counter()
        stepper()
        walls.append(time.perf_counter() - t0)
        waits.append(sum(t.waited for t in timed) - before)
    return walls, waits


class NoneGrads:
    """Optimizer stand-in whose ``zero_grad`` sets every gradient to ``None`` (steps the real optimizer)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def lazy_params(self) -> list[torch.Tensor]:
        return getattr(self.optimizer, "lazy_params", [])

    def prepare(self, used: Any) -> None:  # a LegoSGD needs the step's rows (gppf.lego.optim.RowOptimizer)
        self.optimizer.prepare(used)

    def grad_regions(self, param: torch.Tensor) -> list[torch.Tensor] | None:
        regions = getattr(self.optimizer, "grad_regions", None)
        return None if regions is None else regions(param)

    def share_used(self) -> None:
        share = getattr(self.optimizer, "share_used", None)
        if share is not None:
            share()

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def fixed_batch_steppers(run: Any) -> tuple[Stepper, dict[str, Stepper], dict[str, Stepper]]:
    """The SIMT step over all tasks, one single-task step per task, and one per task that sets the
    gradients to ``None`` after its step; each on one pre-fetched batch per task."""
    batches = {name: next(stream) for name, stream in run.streams.items()}
    simt = Stepper(dataclasses.replace(run.step_fn, streams={n: Repeat(b) for n, b in batches.items()}))
    singles = {n: Stepper(dataclasses.replace(run.step_fn, streams={n: Repeat(b)})) for n, b in batches.items()}
    none_opt = NoneGrads(run.optimizer)
    nones = {n: Stepper(dataclasses.replace(run.step_fn, streams={n: Repeat(b)}, optimizer=none_opt))
             for n, b in batches.items()}
    return simt, singles, nones


def grads_kept(run: Any) -> None:
    """Every parameter owns a (zero) gradient buffer again, as the engine keeps them."""
    for p in run.step_fn.grad_sync.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def time_steps(run: Any, simt: Stepper, singles: dict[str, Stepper], nones: dict[str, Stepper], *,
               repeats: int, warmup: int) -> dict[str, Any]:
    """Interleaved timing: SIMT step, each single-task step, each single-task step with ``None``
    gradients, per round; medians and per-round sums of each alternating schedule."""
    fns = {"simt": simt, **{f"single/{n}": s for n, s in singles.items()},
           **{f"single_none/{n}": s for n, s in nones.items()}}
    kept = lambda: grads_kept(run)  # noqa: E731
    setup = {name: kept for name in fns if not name.startswith("single_none/")}
    setup[f"single_none/{next(iter(nones))}"] = lambda: run.optimizer.zero_grad(set_to_none=True)
    samples = interleaved_times(fns, repeats=repeats, warmup=warmup, setup=setup)
    grads_kept(run)
    alternating = [sum(samples[f"single/{n}"][i] for n in singles) for i in range(repeats)]
    none = [sum(samples[f"single_none/{n}"][i] for n in nones) for i in range(repeats)]
    return {"samples": {**samples, "alternating_kept_grads": alternating, "alternating_none_grads": none},
            "median": {**medians(samples), "alternating_kept_grads": statistics.median(alternating),
                       "alternating_none_grads": statistics.median(none)}}


def measure_peaks(simt: Stepper, singles: dict[str, Stepper]) -> dict[str, int]:
    """Allocator peak of one step above params, grads and optimizer state (all exist after warm-up)."""
    peaks = {"simt": peak_alloc_bytes(simt)}
    peaks.update({f"single/{n}": peak_alloc_bytes(s) for n, s in singles.items()})
    return peaks


def state_bytes(run: Any) -> int:
    """Bytes of parameters, gradients and optimizer state."""
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    size = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in run.optimizer.state.values()
                for t in s.values() if isinstance(t, torch.Tensor))
    return size + grads + state


# ----------------------------------------------------------------------------- the benchmark


def run_simt_bench(*, config: str | None, overrides: list[str], repeats: int, warmup: int,
                   threads: int | None, quick: bool) -> dict[str, Any]:
    """Build the run, measure step-time ratio, peak-memory ratio and data wait; a JSON-ready dict.

    ``threads`` becomes ``train.threads`` (``build_run`` sets the intra-op thread count; ``None``: the
    config's, whose 0 means auto); the caller's thread count is restored on return.
    """
    from gppf.engine.trainer import build_run

    extra = [] if threads is None else [f"train.threads={threads}"]
    cfg = load_bench_config(config=config, overrides=[*overrides, *extra], quick=quick)
    load_before = os.getloadavg()[0]
    with fixed_threads(None), tempfile.TemporaryDirectory(prefix="gppf-bench-simt-") as tmp:
        run = build_run(cfg, run_dir=Path(tmp), resume=False)
        try:
            result = measure_run(run, repeats=repeats, warmup=warmup, threads=torch.get_num_threads(), quick=quick)
        finally:
            close_streams(run)
    result["config"]["load_avg_1m"] = [load_before, os.getloadavg()[0]]  # before, after: context for noise
    return result


def close_streams(run: Any) -> None:
    """Stop the loader worker processes of the run's streams now (not at garbage collection)."""
    for stream in run.streams.values():
        shutdown = getattr(getattr(stream, "_it", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def measure_run(run: Any, *, repeats: int, warmup: int, threads: int, quick: bool) -> dict[str, Any]:
    """Data wait first (real streams), then interleaved fixed-batch step times, then peak memory."""
    data_warmup, data_steps = DATA_STEPS["quick" if quick else "full"]
    data = measure_data_wait(run, warmup=data_warmup, steps=data_steps)
    simt, singles, nones = fixed_batch_steppers(run)
    timing = time_steps(run, simt, singles, nones, repeats=repeats, warmup=warmup)
    peaks = measure_peaks(simt, singles)
    skipped = simt.skipped + sum(s.skipped for s in [*singles.values(), *nones.values()])
    return assemble(run, data=data, timing=timing, peaks=peaks, skipped=skipped, repeats=repeats,
                    warmup=warmup, threads=threads, quick=quick)


def assemble(run: Any, *, data: dict[str, Any], timing: dict[str, Any], peaks: dict[str, int], skipped: int,
             repeats: int, warmup: int, threads: int, quick: bool) -> dict[str, Any]:
    """The JSON result: headline ratios, raw measurements, goals and config."""
    med = timing["median"]
    single_peaks = {k.removeprefix("single/"): v for k, v in peaks.items() if k.startswith("single/")}
    largest = max(single_peaks, key=lambda n: single_peaks[n])
    values = {
        "simt_vs_alternating_kept_grads": ratio(med["simt"], med["alternating_kept_grads"]),
        "peak_mem_vs_largest_task": ratio(peaks["simt"], single_peaks[largest]),
        "data_wait_fraction": ratio(data["wait_s"], data["wall_s"]),
    }
    return {
        "bench": "simt",
        **values,
        "simt_vs_alternating_none_grads": ratio(med["simt"], med["alternating_none_grads"]),
        "T": len(run.streams),
        "median_step_s": med,
        "step_samples_s": timing["samples"],
        "step_peak_bytes": peaks,
        "largest_task": largest,
        "param_grad_and_optim_state_bytes": state_bytes(run),
        "data_wait": data,
        "loader": loader_settings(run),
        "skipped_steps": skipped,
        "goals": dict(GOALS),
        "meets_goals": meets_goals(values),
        "config": {**config_summary(run, threads=threads, quick=quick), "repeats": repeats, "warmup": warmup},
    }


def meets_goals(values: dict[str, float]) -> dict[str, bool]:
    """``value <= goal`` per goal, ``value < goal`` for the strict ones."""
    return {k: bool(values[k] < g if k in STRICT_GOALS else values[k] <= g) for k, g in GOALS.items()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser("simt", __doc__, quick="tiny smoke-test sizes and step counts", config=True)
    p.add_argument("--repeats", type=int, help="timed interleaved rounds (default 7; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 2; quick 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads = train.threads (default: the config's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def main_simt(argv: list[str]) -> int:
    """CLI entry: ``gppf bench simt [--json] [--quick] [--config C] [key=value ...]``."""
    args = parse_args(argv)
    kw = {**DEFAULTS, **(QUICK if args.quick else {})}
    kw.update({k: v for k, v in vars(args).items() if k in kw and v is not None})
    result = run_simt_bench(config=args.config, overrides=args.overrides, quick=args.quick, **kw)
    emit(result, as_json=args.json)
    return 0 if all(math.isfinite(result[k]) for k in GOALS) else 1


if __name__ == "__main__":
    sys.exit(main_simt(sys.argv[1:]))
