"""``gppf bench dist``: training throughput of 2 gloo ranks vs 1 on a recipe (default: the built-in one).

Each variant is a ``torchrun --standalone --nproc_per_node W`` launch of this module's worker, which
builds the run with ``build_run`` (its model, optimizer, real task streams and SIMT step) on the CPU,
one intra-op thread per rank (``train.threads=1``, ``OMP_NUM_THREADS=1``), takes ``--warmup`` untimed
steps, then ``--steps`` timed ones between two barriers. Every variant trains the same global batch
(each task's ``batch_size``; a rank draws its shard of it), so the same images per step:

* ``steps_per_s``: timed steps / wall seconds of rank 0 between the barriers; ``images_per_s``: that x
  the images of one global step (every task's batch, or the sampled tasks' with ``sample_weight``).
* ``scaling_efficiency[planner]`` = ``steps_per_s(2 ranks, planner)`` / (2 x ``steps_per_s(1 rank)``), for
  ``all``, ``groups`` and ``auto`` (the default: ``groups`` when the measured costs pack within
  ``gppf.engine.distributed.AUTO_MAX_IMBALANCE`` of a perfect split, else ``all``; each rank's ``plan``
  says which it took).
* per rank, summed over the timed steps: ``data_wait_s`` (blocked in ``next(stream)``), ``wait_ranks_s``
  (blocked in the step's first collective, the non-finite flag: the other rank is still computing, i.e.
  load imbalance), ``grad_allreduce_s`` (the gradient all-reduce), ``loss_count_sync_s`` (the
  count-normalised losses' count reductions, one per counted task and step; each also waits for the task's
  other ranks), ``used_rows_sync_s`` (``LegoSGD.share_used``: the OR of the used lego rows), ``loss_scalars_sync_s`` (the
  step's loss/sample-count reduction), ``compute_s`` (the rest), and
  ``cpu_s`` (CPU time of the rank's process over the timed steps, blocking waits excluded);
  ``grad_synced_elements`` (gradient elements the last timed step all-reduced: of sparsely written
  buckets only the spans holding the regions any rank's routes wrote) of ``grad_elements`` (every synced
  parameter's), in ``grad_sync_collectives`` all-reduces.
* ``scaling_efficiency_cpu_time[planner]`` = ``cpu_s(1 rank)`` / (2 x max over ranks ``cpu_s(2 ranks)``):
  the same ratio from CPU time, insensitive to other processes sharing the cores but blind to time
  spent waiting on the network or another rank: read it beside the wall-time figure, not instead.

Routes are hard top-k (``model.router.mode=topk_st``: the step after the router's search phase, as in
``gppf bench simt``); loader workers per task: ``--workers`` (default 0: every rank loads its own shard in
its training process, so data work is split like compute). ``--quick``: tiny sizes for smoke tests.
On a shared machine the figures move with the load of other processes: compare variants of one call.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from gppf.bench.common import bench_parser, emit, env_info

GOAL = 0.8
PLANNERS = ("all", "groups", "auto")
DEFAULTS: dict[str, Any] = dict(steps=20, warmup=3)
QUICK: dict[str, Any] = dict(steps=2, warmup=1)
QUICK_OVERRIDES = ["model.width_mult=0.125"]
QUICK_TASK = {"batch_size": 8, "image_size": 32}
LAUNCH_TIMEOUT_S = 1800


class Timed:
    """Calls ``fn`` and adds the seconds it took to ``seconds``; other attributes are ``fn``'s."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)


class TimedIter:
    """A stream whose ``next`` is timed (``seconds``: blocked waiting for batches)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.seconds = 0.0

    def __iter__(self) -> TimedIter:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.stream)
        finally:
            self.seconds += time.perf_counter() - t0


def bench_config(*, config: str | None, overrides: list[str], quick: bool, planner: str, steps: int,
                 workers: int) -> Any:
    """The run config of one variant: CPU, gloo, 1 thread, no checkpoints/eval/progress, hard top-k."""
    from gppf.config import default_config_path, load_config

    path = config or default_config_path()
    base = ["train.progress=false", "model.router.mode=topk_st", "train.device=cpu", "dist.backend=gloo",
            "train.threads=1", "train.checkpoint_every=0", "train.eval_every=0", f"train.steps={steps}",
            f"train.num_workers={workers}", f"dist.planner={planner}"]
    if quick:
        n_tasks = len(load_config(path, overrides).tasks)
        base += QUICK_OVERRIDES + [f"tasks.{i}.{k}={v}" for i in range(n_tasks) for k, v in QUICK_TASK.items()]
    return load_config(path, base + list(overrides))


@contextlib.contextmanager
def timing(owner: Any, name: str) -> Iterator[Timed]:
    """While open, ``owner.name`` (a module function or a method) runs timed; restored on exit."""
    original = vars(owner)[name]
    timer = Timed(original)

    def timed(*args: Any, **kwargs: Any) -> Any:  # a plain function: a method stays a method
        return timer(*args, **kwargs)

    setattr(owner, name, timed)
    try:
        yield timer
    finally:
        setattr(owner, name, original)


def worker(args: argparse.Namespace) -> int:
    """One rank of one variant: warm up, time ``steps`` steps, write this rank's figures to JSON."""
    import torch

    from gppf.engine import simt
    from gppf.engine.distributed import TaskGroup
    from gppf.lego.optim import LegoSGD

    cfg = bench_config(config=args.config, overrides=args.overrides, quick=args.quick, planner=args.planner,
                       steps=args.warmup + args.steps, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # the step's collectives: the non-finite flag (the first: waits for the other rank), the
        # count-normalised losses' counts (one per counted task trained by several ranks), LegoSGD's
        # used-row OR, the step's loss scalars
        flag = stack.enter_context(timing(simt, "broadcast_flag"))
        counts = stack.enter_context(timing(TaskGroup, "sum_"))
        rows = stack.enter_context(timing(LegoSGD, "share_used"))
        scalars = stack.enter_context(timing(simt, "all_reduce_scalars"))
        mine = _timed_steps(cfg, args, Path(tmp), timers={"flag": flag, "counts": counts, "rows": rows,
                                                          "scalars": scalars})
        mine["threads"] = torch.get_num_threads()
        Path(f"{args.out}.rank{mine['rank']}").write_text(json.dumps(mine))
    return 0


def _timed_steps(cfg: Any, args: argparse.Namespace, tmp: Path, *, timers: dict[str, Timed]) -> dict[str, Any]:
    """Build the run, take the warm-up then the timed steps; this rank's figures."""
    import torch.distributed as dist

    from gppf.engine.trainer import build_run

    run = build_run(cfg, run_dir=tmp, resume=False)
    streams = {n: TimedIter(s) for n, s in run.streams.items()}
    sync = Timed(run.step_fn.grad_sync)
    step_fn = dataclasses.replace(run.step_fn, streams=streams, grad_sync=sync)
    for step in range(args.warmup):
        step_fn(step)
    barrier = dist.barrier if run.info.enabled else (lambda: None)
    images = 0
    for t in [*streams.values(), sync, *timers.values()]:
        t.seconds = 0.0
    barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(args.warmup, args.warmup + args.steps):
        result = step_fn(step)
        images += sum(run.tasks[t].cfg.batch_size for t in step_fn.tasks_this_step(step))
    cpu = time.process_time() - c0
    barrier()
    wall = time.perf_counter() - t0
    data = sum(t.seconds for t in streams.values())
    other = timers["counts"].seconds + timers["rows"].seconds + timers["scalars"].seconds
    mine = {"rank": run.info.rank, "wall_s": wall, "data_wait_s": data, "wait_ranks_s": timers["flag"].seconds,
            "grad_allreduce_s": sync.seconds, "loss_count_sync_s": timers["counts"].seconds,
            "used_rows_sync_s": timers["rows"].seconds, "loss_scalars_sync_s": timers["scalars"].seconds,
            "compute_s": wall - data - timers["flag"].seconds - sync.seconds - other, "cpu_s": cpu,
            "tasks": sorted(run.streams), "images": images, "last_loss": result.loss,
            "task_costs_s": run.task_costs, "plan": run.plan,
            "grad_synced_elements": run.step_fn.grad_sync.synced_elements,  # the last step's all-reduces
            "grad_sync_collectives": run.step_fn.grad_sync.collectives,
            "grad_elements": sum(p.numel() for p in run.step_fn.grad_sync.params)}
    if run.info.enabled:
        dist.destroy_process_group()
    return mine


def launch(*, world: int, planner: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run one variant under torchrun; its ranks' figures and the launch's wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           f"--nproc_per_node={world}", "-m", "gppf.bench.dist", "--worker", "--out", str(out),
           "--planner", planner, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--workers", str(args.workers), *(["--quick"] if args.quick else []),
           *(["--config", args.config] if args.config else []), *args.overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"bench dist: {world} rank(s), planner {planner} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
    return {"ranks": ranks, "launch_s": time.perf_counter() - t0}


def summarise(variant: dict[str, Any], steps: int) -> dict[str, Any]:
    """Throughput of a variant from its ranks' figures (rank 0's wall time between the barriers)."""
    r0 = variant["ranks"][0]
    sps = steps / r0["wall_s"]
    busy = [r["compute_s"] + r["data_wait_s"] + r["grad_allreduce_s"] for r in variant["ranks"]]
    return {"steps_per_s": sps, "images_per_s": r0["images"] / r0["wall_s"],
            "imbalance": max(busy) / (sum(busy) / len(busy)), **variant}


def run_dist_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant: 1 rank, then 2 ranks under each planner (a 1-rank run is the same for both)."""
    variants: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants["1_rank"] = summarise(launch(world=1, planner="all", args=args, out=Path(tmp) / "w1"), args.steps)
        for planner in args.planners:
            out = Path(tmp) / f"w2_{planner}"
            variants[f"2_ranks_{planner}"] = summarise(launch(world=2, planner=planner, args=args, out=out),
                                                      args.steps)
    one = variants["1_rank"]["steps_per_s"]
    eff = {p: variants[f"2_ranks_{p}"]["steps_per_s"] / (2 * one) for p in args.planners}
    cpu_one = variants["1_rank"]["ranks"][0]["cpu_s"]
    eff_cpu = {p: cpu_one / (2 * max(r["cpu_s"] for r in variants[f"2_ranks_{p}"]["ranks"])) for p in args.planners}
    cfg = bench_config(config=args.config, overrides=args.overrides, quick=args.quick, planner="all",
                       steps=args.warmup + args.steps, workers=args.workers)
    return {
        "bench": "dist",
        "scaling_efficiency": eff,
        "goal": GOAL,
        "meets_goal": {p: bool(e >= GOAL) for p, e in eff.items()},
        "scaling_efficiency_cpu_time": eff_cpu,
        "measured": "steps/s and images/s of rank 0 over the timed steps (after warm-up), same global batch",
        "variants": variants,
        "config": {"recipe": args.config or "built-in default", "quick": args.quick, "steps": args.steps,
                   "warmup_steps": args.warmup, "threads_per_rank": 1, "loader_workers_per_task": args.workers,
                   "backend": "gloo", "device": "cpu", "router_mode": "topk_st", "cpus": os.cpu_count(),
                   "global_batch": {t.name: t.batch_size for t in cfg.tasks},
                   "image_size": {t.name: t.image_size for t in cfg.tasks}, "overrides": args.overrides},
        "env": env_info(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser("dist", __doc__, quick="tiny smoke-test sizes and step counts", config=True)
    p.add_argument("--steps", type=int, help="timed steps per variant (default 20; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; quick 1)")
    p.add_argument("--workers", type=int, default=0, help="loader workers per task and rank (default 0)")
    p.add_argument("--planners", default=",".join(PLANNERS),
                   help="comma-separated: all,groups,auto (default: all three)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--planner", default="all", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_args(argv)
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.planners, str):
        args.planners = [x for x in args.planners.split(",") if x]
    if set(args.planners) - set(PLANNERS):
        p.error(f"--planners: choose from {', '.join(PLANNERS)}")
    return args


def main_dist(argv: list[str]) -> int:
    """CLI entry: ``gppf bench dist [--json] [--quick] [--config C] [key=value ...]``."""
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    emit(run_dist_bench(args), as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_dist(sys.argv[1:]))
