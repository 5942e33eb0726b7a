"""`gppf bench transfer`: downstream tasks not seen in pre-training, every way of starting them, one budget.

For each downstream task (built-in synthetic data on a domain no pre-training task of the default recipe
or of this bench's recipe uses, and real data from ``$GPPF_DATA`` / ``--data`` when present), the same
fine-tuning budget (steps, batch, LR, schedule, seed) is spent on each variant:

* ``scratch``: ``--from none`` (same architecture, fresh weights);
* ``linear``: backbone frozen along the ``auto`` route, head trained;
* ``full (auto)``: route chosen by ``auto`` (LogME on the frozen features), everything on it trained;
* ``full (copy:<task>)``: each pre-training task's route, fully fine-tuned (the candidates ``auto`` ranks);
* ``full (learn)``: the router learns the route on the new task, then it is frozen.

``full (auto)`` is the run of the ``copy:`` candidate ``auto`` picked (same route, same statistics, so it
is not trained twice). Reported per task: the primary validation metric and wall time of each variant,
``auto``'s scores, and the Spearman rank correlation between ``auto``'s scores and the fine-tuned metric
of the candidate routes (``scipy.stats.spearmanr``). Without ``--from`` the bench first pre-trains its own
short run (``pretrain_config``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from gppf.bench.common import bench_parser
from gppf.config import RunConfig, load_config, to_dict

__all__ = ["DOWNSTREAM", "bench_transfer", "downstream_tasks", "main_transfer", "pretrain_config", "spearman"]

QUICK = {"pretrain_steps": 250, "steps": 60, "samples": 128, "max_val": 300, "width_mult": 0.25,
         "tasks": ["shapes_textured", "parts_textured", "cifar10", "camvid"]}
FULL = {"pretrain_steps": 1000, "steps": 200, "samples": 256, "max_val": 1000, "width_mult": 0.25,
        "tasks": ["shapes_textured", "parts_textured", "cifar10", "fashion_mnist", "camvid", "coco8_det"]}
SIZE = 32
"""Image side of the synthetic tasks (pre-training and downstream)."""


def _synthetic(name: str, kind: str, **options: Any) -> dict[str, Any]:
    opts = {"domain": "textured", "size": SIZE, "num_train": 1000, "num_val": 300, "seed": 17, **options}
    return {"name": name, "type": kind, "batch_size": 32, "image_size": SIZE, "augment": False,
            "data": {"format": "synthetic", "options": opts}}


DOWNSTREAM: dict[str, Any] = {
    # built-in data on the `textured` domain: no task of the default recipe or of pretrain_config uses it
    "shapes_textured": lambda root: _synthetic("shapes_textured", "classification", num_classes=3),
    "parts_textured": lambda root: _synthetic("parts_textured", "segmentation", num_classes=3, max_objects=3),
    # real data (configs/shared_data.yaml layouts), read in place
    "cifar10": lambda root: {"name": "cifar10", "type": "classification", "image_size": 32, "batch_size": 32,
                             "data": {"format": "imagefolder", "root": str(root / "cifar10"), "train": "train",
                                      "val": "test"}},
    "fashion_mnist": lambda root: {"name": "fashion_mnist", "type": "classification", "image_size": 28,
                                   "batch_size": 32, "augment": False,
                                   "data": {"format": "idx", "root": str(root / "fashion-mnist"), "train": "train",
                                            "val": "t10k", "options": {"names": "fashion-mnist"}}},
    "camvid": lambda root: {"name": "camvid", "type": "segmentation", "image_size": 64, "batch_size": 8,
                            "data": {"format": "mask_png", "root": str(root / "camvid"), "train": "train",
                                     "val": "val", "options": {"ignore_index": 11},
                                     "classes": ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                                                 "Fence", "Car", "Pedestrian", "Bicyclist", "Unlabelled"]}},
    "coco8_det": lambda root: {"name": "coco8_det", "type": "detection", "image_size": 64, "batch_size": 4,
                               "data": {"format": "yolo", "root": str(root / "ultralytics" / "coco8"),
                                        "options": {"yaml": "coco8.yaml"}}},
}
"""Downstream task configs by name (``root``: the real-data folder)."""
REAL_DIRS = {"cifar10": "cifar10", "fashion_mnist": "fashion-mnist", "camvid": "camvid",
             "coco8_det": "ultralytics/coco8"}


def data_root(explicit: str | None) -> Path:
    """``--data``, else ``$GPPF_DATA``, else ``../shared/data`` (relative to the working directory)."""
    return Path(explicit or os.environ.get("GPPF_DATA") or Path.cwd().parent / "shared" / "data")


def downstream_tasks(names: Sequence[str], *, root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The task configs of ``names`` whose data exists, and the names skipped (real data absent)."""
    unknown = [n for n in names if n not in DOWNSTREAM]
    if unknown:
        raise ValueError(f"unknown downstream task(s) {unknown} (choose from {', '.join(DOWNSTREAM)})")
    found = [n for n in names if n not in REAL_DIRS or (root / REAL_DIRS[n]).is_dir()]
    return [DOWNSTREAM[n](root) for n in found], [n for n in names if n not in found]


def pretrain_config(*, steps: int, width_mult: float) -> RunConfig:
    """The bench's own short pre-training: four 32 px synthetic tasks on the flat / pastel / noisy / night
    domains (never `textured`), gppf_r18 with 4 legos of which 2 active, ``width_mult``, hard top-k
    routing with a straight-through gate (``topk_st``: no dense search phase), SGD LR 0.1."""
    def task(name: str, kind: str, domain: str, **options: Any) -> dict[str, Any]:
        opts = {"domain": domain, "size": SIZE, "num_train": 2000, "num_val": 100, **options}
        return {"name": name, "type": kind, "batch_size": 32, "image_size": SIZE, "augment": False,
                "data": {"format": "synthetic", "options": opts}}

    base = {
        "model": {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": width_mult,
                  "router": {"mode": "topk_st"}},
        "tasks": [task("shapes_flat", "classification", "flat", num_classes=3),
                  task("attributes_pastel", "multilabel", "pastel", num_classes=5, max_objects=3),
                  task("parsing_noisy", "segmentation", "noisy", num_classes=3, max_objects=3),
                  task("creatures_night", "keypoints", "night")],
        "train": _train(steps, lr=0.1),
    }
    return load_config(base=base, overrides=[])


def _train(steps: int, *, lr: float, seed: int = 0) -> dict[str, Any]:
    return {"steps": steps, "lr": lr, "seed": seed, "warmup_steps": max(steps // 10, 1), "checkpoint_every": steps,
            "eval_every": 0, "progress": False, "amp": "none", "channels_last": False, "num_workers": 0,
            "log_every": max(steps, 1)}


def spearman(scores: dict[str, float], results: dict[str, float]) -> float | None:
    """Spearman rank correlation between ``auto``'s scores and the fine-tuned metrics of the same
    candidates (``None`` with fewer than 3 candidates or a constant side)."""
    from scipy.stats import spearmanr

    keys = [k for k in scores if k in results]
    xs, ys = [scores[k] for k in keys], [results[k] for k in keys]
    if len(keys) < 3 or len(set(xs)) == 1 or len(set(ys)) == 1:
        return None
    return float(spearmanr(xs, ys).statistic)


def _variants(candidates: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(label, finetune section) of every variant; ``None`` source marks ``scratch``."""
    out = [("scratch", {"mode": "full", "route": "auto"}), ("linear", {"mode": "linear", "route": "auto"})]
    out += [(f"full ({c})", {"mode": "full", "route": c}) for c in candidates]
    return out + [("full (learn)", {"mode": "full", "route": "learn"})]


def _finetune_one(task: dict[str, Any], ft: dict[str, Any], *, source: Path | None, model: dict[str, Any],
                  steps: int, max_val: int, samples: int, seed: int, out: Path) -> dict[str, Any]:
    from gppf.registry import TASK_TYPES
    from gppf.transfer.finetune import finetune

    task = {**task, "max_val_samples": max_val}
    base = {"model": model, "tasks": [task], "train": _train(steps, lr=0.05, seed=seed),
            "finetune": {**ft, "auto_samples": samples}}
    cfg = load_config(base=base, overrides=[], task_types=TASK_TYPES.names())
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON object
        metrics = finetune(cfg, from_run=source, run_dir=out)
    key = f"{task['name']}/{TASK_TYPES.get(task['type']).primary_metric}"
    return {"metric": float(metrics[key]), "metric_name": key, "wall_s": round(time.perf_counter() - start, 2),
            "chance": metrics.get(f"{task['name']}/chance/{key.split('/', 1)[1]}")}


def auto_scores(task: dict[str, Any], *, source: Path, samples: int) -> dict[str, Any]:
    """``auto``'s ranking of the source run's candidate routes for ``task`` (as fine-tuning computes it)."""
    from gppf.registry import TASK_TYPES
    from gppf.tasks.base import build_task
    from gppf.transfer.pretrained import load_pretrained
    from gppf.transfer.select import candidate_routes, rank_routes

    backbone = load_pretrained(source).model.backbone
    tc = load_config(base={"tasks": [task]}, overrides=[], task_types=TASK_TYPES.names()).tasks[0]
    start = time.perf_counter()
    built = build_task(tc, feature_channels=backbone.feature_channels, pooled_dim=backbone.pooled_dim)
    ranked = rank_routes(backbone=backbone, task=built, candidates=candidate_routes(backbone), samples=samples, seed=0)
    return {"scores": {r.candidate: r.score for r in ranked}, "method": ranked[0].method, "pick": ranked[0].candidate,
            "seconds": round(time.perf_counter() - start, 2)}


def bench_task(task: dict[str, Any], *, source: Path, steps: int, samples: int, max_val: int, seed: int,
               work: Path) -> dict[str, Any]:
    """Every variant of one downstream task at the same budget, ``auto``'s scores and their Spearman rho."""
    from gppf.transfer.pretrained import load_pretrained

    model = to_dict(load_pretrained(source).cfg)["model"]
    auto = auto_scores(task, source=source, samples=samples)
    runs: dict[str, Any] = {}
    for label, ft in _variants(list(auto["scores"])):
        out = work / f"{task['name']}-{label.replace(' ', '').replace('(', '-').replace(')', '').replace(':', '-')}"
        runs[label] = _finetune_one(task, ft, source=None if label == "scratch" else source, model=model,
                                    steps=steps, max_val=max_val, samples=samples, seed=seed, out=out)
    runs["full (auto)"] = {**runs[f"full ({auto['pick']})"], "same_run_as": f"full ({auto['pick']})"}
    copies = {c: runs[f"full ({c})"]["metric"] for c in auto["scores"]}
    best = max(copies, key=copies.get)  # type: ignore[arg-type]
    return {"type": task["type"], "metric": runs["scratch"]["metric_name"], "auto": auto, "runs": runs,
            "best_copy": best, "auto_picked_best": auto["pick"] == best, "spearman": spearman(auto["scores"], copies)}


def bench_transfer(*, tasks: Sequence[str], source: Path | None, pretrain_steps: int, steps: int, samples: int,
                   max_val: int, width_mult: float, root: Path, work: Path, seed: int = 0) -> dict[str, Any]:
    """The whole benchmark (see the module doc); ``source`` None: pre-train ``pretrain_config`` first."""
    from gppf.bench.common import env_info
    from gppf.engine.trainer import train

    start = time.perf_counter()
    result: dict[str, Any] = {"steps": steps, "samples": samples, "max_val": max_val, "seed": seed,
                              "env": env_info()}
    if source is None:
        source = work / "pretrain"
        cfg = pretrain_config(steps=pretrain_steps, width_mult=width_mult)
        t0 = time.perf_counter()
        metrics = train(cfg, run_dir=source, resume=False)
        result["pretrain"] = {"run": str(source), "steps": pretrain_steps, "width_mult": width_mult,
                              "tasks": [t.name for t in cfg.tasks], "wall_s": round(time.perf_counter() - t0, 1),
                              "metrics": {k: round(v, 4) for k, v in metrics.items() if "/chance/" not in k}}
    else:
        result["pretrain"] = {"run": str(source)}
    configs, skipped = downstream_tasks(tasks, root=root)
    result["skipped"] = skipped
    result["tasks"] = {t["name"]: bench_task(t, source=source, steps=steps, samples=samples, max_val=max_val,
                                             seed=seed, work=work) for t in configs}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def print_table(result: dict[str, Any], *, stderr: bool = False) -> None:
    """One rich table: variants x downstream tasks (primary metric, wall seconds), then auto's agreement
    (on stderr when stdout carries the JSON object)."""
    from rich.console import Console
    from rich.table import Table

    tasks = result["tasks"]
    table = Table(title=f"gppf bench transfer: {result['steps']} fine-tuning steps per variant")
    table.add_column("variant")
    for name, t in tasks.items():
        table.add_column(f"{name}\n{t['metric'].split('/', 1)[1]}", justify="right")
    labels = list(next(iter(tasks.values()))["runs"]) if tasks else []
    order = ["scratch", "linear", "full (auto)", "full (learn)"] + [l for l in labels if l.startswith("full (copy:")]
    for label in order:
        table.add_row(label, *[_cell(t["runs"].get(label)) for t in tasks.values()])
    table.add_row("auto pick", *[t["auto"]["pick"] for t in tasks.values()])
    table.add_row("auto seconds", *[f"{t['auto']['seconds']:.1f}" for t in tasks.values()])
    table.add_row("spearman(auto, copy)", *["n/a" if t["spearman"] is None else f"{t['spearman']:+.2f}"
                                             for t in tasks.values()])
    Console(stderr=stderr).print(table)


def _cell(run: dict[str, Any] | None) -> str:
    return "-" if run is None else f"{run['metric']:.3f} ({run['wall_s']:.0f} s)"


def main_transfer(argv: list[str]) -> int:
    """CLI entry: ``gppf bench transfer [--quick] [--from RUN] [--json] [--tasks ...] [--steps N] ...``."""
    p = bench_parser("transfer", __doc__, quick=f"{QUICK}")
    p.add_argument("--from", dest="source", metavar="RUN", help="pre-trained run (default: pre-train one first)")
    p.add_argument("--tasks", nargs="+", help=f"downstream tasks among {', '.join(DOWNSTREAM)}")
    p.add_argument("--steps", type=int, help="fine-tuning steps of every variant")
    p.add_argument("--pretrain-steps", type=int, dest="pretrain_steps")
    p.add_argument("--samples", type=int, help="train samples auto embeds per candidate")
    p.add_argument("--max-val", type=int, dest="max_val", help="val samples per task")
    p.add_argument("--width-mult", type=float, dest="width_mult", help="width of the bench's own pre-training")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every fine-tuning run")
    p.add_argument("--data", help="real-data folder (default $GPPF_DATA or ../shared/data)")
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    kw = dict(QUICK if args.quick else FULL)
    kw.update({k: getattr(args, k) for k in ("tasks", "steps", "pretrain_steps", "samples", "max_val", "width_mult")
               if getattr(args, k) is not None})
    logging.getLogger("gppf").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gppf-bench-transfer-") as tmp:
        work = Path(args.out or tmp)
        result = bench_transfer(source=Path(args.source) if args.source else None, root=data_root(args.data),
                                work=work, seed=args.seed, **kw)
    print_table(result, stderr=args.json)
    if args.json:
        print(json.dumps(result))
    return 0
