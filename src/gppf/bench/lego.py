"""``gppf bench lego``: cost of routed lego steps against their dense twins, in three regimes.

* ``r50_1task``: GPPF-R50 at 224 px, batch 16, one task (see ``gppf.bench.r50``): routed N=16, k=4
  against torchvision's ResNet-50 (weights channels_last and contiguous both measured, the faster one
  is the baseline) and against routed N=4. With one task a step uses k of N legos per layer, so
  ``LegoSGD`` skips most of them.
* ``r50_6tasks``: the same models with one head per task and the routes of the default recipe's six
  tasks (learned, N=16, k=4, batch 4 per task): every step runs all six tasks' forward and backward
  (SIMT-like) and one SGD step, which now touches the legos of six routes; skipped legos are caught up
  when a route next reads them.
* ``r18_32px``: GPPF-R18 at 32 px, batch 64 per task, two tasks, the engine's whole ``SIMTStep``
  (see ``gppf.bench.small``): learned routes (with gates) and fixed routes at N=8, k=2 against hard
  sharing (N=k=2: the dense network of the same active width). At small resolution the convolutions
  are cheap, so every per-step pass over the stored parameters shows. A fourth variant runs both
  tasks on one shared fixed route of the N=8 network (``shared_route_vs_hard_sharing_step``): the
  routing machinery at hard sharing's parameter volume, so the two figures separate what routing
  costs from what the larger union of distinct routes costs (``updated_parameters`` per step). Learned
  routes start from fresh logits with the engine's default learning rates; ``learned_route_churn``
  is the fraction of their routing points that change per step (each change is a catch-up). Hard
  sharing runs as two independently built instances: their mean is the baseline, and their ratio
  (``control_vs_hard_sharing_step``, A/A, ideally 1) is the resolution of the process's ratios.

Ratios (goals are upper bounds): ``<regime>/routed_vs_dense_step`` (median step time, routed N large /
best dense), ``<regime>/routed_n_large_vs_small_step`` (routed N large / routed N small, same k),
``<regime>/routed_vs_dense_act_mem`` (allocator peak of one step beyond parameters, gradients and
optimizer state), ``r18_32px/learned_vs_hard_sharing_step``, ``r18_32px/fixed_vs_hard_sharing_step``,
``r18_32px/learned_vs_hard_sharing_act_mem``.

Precision: ``--amp`` as ``train.amp`` (default ``auto``: bf16 autocast where the device computes bf16
natively, float32 elsewhere; the JSON's ``config.dtype`` says which).

Every model of a regime is stepped interleaved in one process after warm-up rounds, with a fixed
thread count (default 1: on a shared 2-core machine OpenMP barriers make multi-threaded timings
erratic). Steps are timed by the process's CPU time (``--clock cpu``, the default: with one thread,
the step's own work, robust to other processes competing for the cores) or by wall time
(``--clock wall``); with ``--device cuda`` by wall time with the CUDA queue synchronised, and memory is
the CUDA allocator's peak. ``--regime`` picks one regime (default all); ``--quick`` shrinks everything to a smoke test
(not a measurement). ``--processes K`` runs the whole bench in K fresh ``gppf`` processes one after the
other and reports each ratio's median over them, with every process's value (``per_process``) and the
range (``spread``): on a shared machine one process's ratios move by several points (the same code gave
a routed/dense ratio of 0.98 in one process and 1.10 in the next), more than the goals' margins.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from typing import Any

import torch

from gppf.bench.common import bench_parser, dtype_name, emit, env_info, fixed_threads, meets
from gppf.engine.amp import resolve_amp

REGIMES = ("r50_1task", "r50_6tasks", "r18_32px")
GOALS: dict[str, dict[str, float]] = {
    "r50_1task": {"routed_vs_dense_step": 1.05, "routed_n_large_vs_small_step": 1.05,
                  "routed_vs_dense_act_mem": 1.10},
    "r50_6tasks": {"routed_vs_dense_step": 1.05, "routed_n_large_vs_small_step": 1.05,
                   "routed_vs_dense_act_mem": 1.10},
    "r18_32px": {"learned_vs_hard_sharing_step": 1.05, "fixed_vs_hard_sharing_step": 1.05,
                 "learned_vs_hard_sharing_act_mem": 1.10},
}
# A/A ratios of two identical baseline instances in one process (not goals: how far apart the same model
# times in that process)
CONTROLS: dict[str, str] = {"r18_32px": "control_vs_hard_sharing_step"}
COMMON: dict[str, Any] = dict(repeats=None, warmup=2, threads=1)
# timed rounds per regime unless --repeats says: more where a step is short (an R18 32 px step takes
# ~0.4 s, an R50 one 3-6 s), as one shared machine's step times spread by +-10%
REPEATS: dict[str, int] = {"r50_1task": 5, "r50_6tasks": 5, "r18_32px": 15}
R50: dict[str, dict[str, Any]] = {
    "r50_1task": dict(tasks=1, batch=16, image_size=224, legos_small=4, legos_large=16, active=4),
    "r50_6tasks": dict(tasks=6, batch=4, image_size=224, legos_small=4, legos_large=16, active=4),
}
R50_QUICK: dict[str, Any] = dict(batch=2, image_size=64, legos_small=2, legos_large=4, active=2)
QUICK: dict[str, Any] = dict(repeats=1, warmup=1)


def goal_keys(regimes: list[str]) -> dict[str, float]:
    """``{"<regime>/<ratio>": goal}`` of the given regimes."""
    return {f"{r}/{k}": g for r in regimes for k, g in GOALS[r].items()}


def run_regime(name: str, *, quick: bool, repeats: int, warmup: int, sgd: str, lazy: bool, clock: str,
               overrides: dict[str, Any], device: str = "cpu",
               amp_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """Run one regime with its defaults (``quick`` sizes), then ``overrides`` (CLI values)."""
    if name == "r18_32px":
        from gppf.bench.small import SMALL_DEFAULTS, SMALL_QUICK, run_small_regime

        kw = {**(SMALL_QUICK if quick else SMALL_DEFAULTS)}
        kw.update({k: v for k, v in overrides.items() if k in kw and v is not None})
        return run_small_regime(**kw, repeats=repeats, warmup=warmup, sgd=sgd, clock=clock, device=device,
                                amp_dtype=amp_dtype)
    from gppf.bench.r50 import default_recipe_tasks, run_r50_regime

    kw = {**R50[name], **(R50_QUICK if quick else {})}
    kw.update({k: v for k, v in overrides.items() if k in kw and k != "tasks" and v is not None})
    n_tasks = kw.pop("tasks")
    tasks = default_recipe_tasks()[:n_tasks] if n_tasks > 1 else ["t"]
    return run_r50_regime(tasks=tasks, **kw, repeats=repeats, warmup=warmup, sgd=sgd, lazy=lazy, clock=clock,
                          device=device, amp_dtype=amp_dtype)


def run_lego_bench(*, regimes: list[str], quick: bool, repeats: int | None, warmup: int, threads: int | None,
                   sgd: str = "fused", lazy: bool = True, clock: str = "cpu",
                   overrides: dict[str, Any] | None = None, device: str = "cpu",
                   amp: str = "auto") -> dict[str, Any]:
    """Measure the given regimes (``repeats`` None: each regime's ``REPEATS``); a JSON-ready dict with the
    flat ratios, per-regime details and goals."""
    results: dict[str, Any] = {}
    amp_dtype = resolve_amp(amp, torch.device(device))
    with fixed_threads(threads) as n_threads:
        for name in regimes:
            results[name] = run_regime(name, quick=quick, repeats=repeats or REPEATS[name], warmup=warmup, sgd=sgd,
                                       lazy=lazy,
                                       clock=clock, overrides=overrides or {}, device=device,
                                       amp_dtype=amp_dtype)
    goals = goal_keys(regimes)
    values = {key: results[key.split("/")[0]][key.split("/")[1]] for key in goals}
    return {
        "bench": "lego",
        **values,
        "regimes": results,
        "goals": goals,
        "meets_goals": meets(values, goals),
        "config": dict(regimes=regimes, quick=quick, repeats={r: repeats or REPEATS[r] for r in regimes},
                       warmup=warmup, threads=n_threads,
                       sgd=sgd, lazy=lazy, clock=clock, device=device, amp=amp,
                       dtype=dtype_name(amp_dtype), **env_info()),
    }


def combine_processes(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from whole bench runs in separate processes: each goal ratio is the median over the runs
    (``per_process``: every run's value, ``spread``: their range); ``processes``: every run's regimes."""
    goals: dict[str, float] = runs[0]["goals"]
    per_process = {key: [run[key] for run in runs] for key in goals}
    values = {key: statistics.median(v) for key, v in per_process.items()}
    controls = {f"{name}/{key}": [run["regimes"][name][key] for run in runs]  # A/A: each process's resolution
                for name, key in CONTROLS.items() if name in runs[0]["regimes"]}
    return {
        "bench": "lego",
        **values,
        "per_process": per_process,
        "controls_per_process": controls,
        "spread": {key: [min(v), max(v)] for key, v in per_process.items()},
        "goals": goals,
        "meets_goals": meets(values, goals),
        "config": {**runs[0]["config"], "processes": len(runs)},
        "processes": [run["regimes"] for run in runs],
    }


# a fresh process with the ``gppf`` command's process defaults (allocator, OpenMP waiting)
_CHILD = "import sys; from gppf.cli import main; sys.exit(main(sys.argv[1:]))"


def run_processes(argv: list[str], processes: int) -> dict[str, Any]:
    """``gppf bench lego ARGV --json`` in ``processes`` fresh processes, one after the other, combined."""
    runs = []
    for i in range(processes):
        out = subprocess.run([sys.executable, "-c", _CHILD, "bench", "lego", *argv, "--json"],
                             capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"gppf bench lego process {i + 1} of {processes} failed (exit {out.returncode}):\n"
                               f"{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return combine_processes(runs)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser("lego", __doc__, quick="tiny smoke-test sizes (not a measurement)")
    p.add_argument("--regime", choices=[*REGIMES, "all"], default="all", help="which regime (default all)")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                   help="autocast as train.amp (default auto: bf16 where the device computes it natively)")
    p.add_argument("--repeats", type=int, help="timed interleaved rounds (default 5 for R50, 15 for R18; quick 1)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 2; quick 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]: on CUDA steps are timed by wall "
                   "time with the queue synchronised and memory is the CUDA allocator's peak")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="time steps by this process's CPU time (default: with one thread, the step's own work, "
                        "robust to other processes on a shared machine) or by wall time")
    p.add_argument("--sgd", choices=["fused", "foreach", "default"], default="fused",
                   help="SGD kernels of every model (default fused; 'default': torch's choice, a per-tensor loop "
                        "on CPU, as the trainer's LegoSGD today)")
    p.add_argument("--no-lazy", action="store_true",
                   help="R50 routed models use torch.optim.SGD (every lego updated every step) instead of LegoSGD")
    p.add_argument("--batch", type=int, help="batch size per task of the chosen regime(s)")
    p.add_argument("--image-size", type=int, help="square input size in px of the chosen regime(s)")
    p.add_argument("--legos-small", type=int, help="N of the smaller routed R50 (default 4)")
    p.add_argument("--legos-large", type=int, help="N of the larger routed R50 (default 16)")
    p.add_argument("--legos", type=int, help="N of the routed R18 (default 8)")
    p.add_argument("--active", type=int, help="k active legos per routing point (default 4 for R50, 2 for R18)")
    p.add_argument("--tasks", type=int, help="number of tasks of the R18 regime (default 2)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the whole bench in this many fresh processes, one after the other, and report each "
                        "ratio's median over them with every process's value (default 1: this process)")
    return p.parse_args(argv)


def _child_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--json`` and ``--processes K`` (either spelling)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif a != "--json" and not a.startswith("--processes="):
            out.append(a)
    return out


def main_lego(argv: list[str]) -> int:
    """CLI entry: ``gppf bench lego [--json] [--quick] [--regime R] ...``."""
    args = parse_args(argv)
    if args.processes < 1:
        raise SystemExit(f"gppf bench lego: --processes must be >= 1, got {args.processes}")
    if args.processes > 1:
        result = run_processes(_child_argv(argv), args.processes)
        emit(result, as_json=args.json)
        return 0 if all(math.isfinite(result[k]) for k in result["goals"]) else 1
    kw = {**COMMON, **(QUICK if args.quick else {})}
    kw.update({k: v for k, v in vars(args).items() if k in kw and v is not None})
    regimes = list(REGIMES) if args.regime == "all" else [args.regime]
    overrides = {k: getattr(args, k) for k in ("batch", "image_size", "legos_small", "legos_large", "legos",
                                               "active", "tasks")}
    clock = "cuda" if args.device.startswith("cuda") else args.clock
    result = run_lego_bench(regimes=regimes, quick=args.quick, sgd=args.sgd, lazy=not args.no_lazy,
                            clock=clock, overrides=overrides, device=args.device, amp=args.amp, **kw)
    emit(result, as_json=args.json)
    return 0 if all(math.isfinite(result[k]) for k in result["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main_lego(sys.argv[1:]))
