"""`gppf bench routing`: learned routes vs random fixed routes vs hard sharing vs disjoint routes.

Every variant trains the same recipe with the same steps, batches, seeds and active width ``k``; only
the routes differ:

* ``learned``: the router's routes (``model.router``: search, hard top-k, freeze);
* ``random``: every task pinned to its own random route (``k`` of ``N`` legos per routing point);
* ``hard``: every task pinned to the same ``k`` legos, i.e. a dense multi-task network of width ``k``;
* ``disjoint``: task ``i`` pinned to legos ``[i k, (i + 1) k)`` (only where ``T k <= N``).

Reported per recipe and variant: each task's primary validation metric (mean and spread over seeds),
the mean over tasks of the gain over ``hard``, and wall time. For recipes whose task relation is known
(``KNOWN_PAIRS``) the learned routes' shared-lego fractions within and across pairs are reported too.
The learned variant also pays for its search phase (``soft_topk``: every lego active), so its wall time
is higher at equal steps.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from gppf.bench.common import bench_parser, emit
from gppf.config import RunConfig, load_config

VARIANTS = ("learned", "random", "hard", "disjoint")
KNOWN_PAIRS: dict[str, list[tuple[str, str]]] = {"known_pairs": [("shape_a", "shape_b"), ("night_a", "night_b")]}
QUICK = {"recipes": ["known_pairs"], "seeds": [0, 1], "steps": 120}
FULL = {"recipes": ["known_pairs", "default"], "seeds": [0, 1], "steps": None}


def recipe_path(name: str) -> Path:
    """A packaged recipe (``src/gppf/configs/<name>.yaml``) or a path to a config file."""
    from importlib import resources

    packaged = Path(str(resources.files("gppf") / "configs" / f"{name}.yaml"))
    return packaged if packaged.is_file() else Path(name)


def variant_routes(variant: str, *, tasks: Sequence[str], layers: int, legos: int, active: int,
                   seed: int) -> dict[str, list[list[int]]] | None:
    """Fixed routes of a variant (``None`` for ``learned``); raises if ``disjoint`` does not fit."""
    if variant == "learned":
        return None
    if variant == "hard":
        return {t: [list(range(active))] * layers for t in tasks}
    if variant == "disjoint":
        if len(tasks) * active > legos:
            raise ValueError(f"disjoint routes need T*k <= N, got {len(tasks)}*{active} > {legos}")
        return {t: [list(range(i * active, (i + 1) * active))] * layers for i, t in enumerate(tasks)}
    if variant == "random":
        gen = torch.Generator().manual_seed(10_007 + seed)
        return {t: [sorted(torch.randperm(legos, generator=gen)[:active].tolist()) for _ in range(layers)]
                for t in tasks}
    raise ValueError(f"unknown variant '{variant}' (choose from {VARIANTS})")


def shared_fraction(routes: Mapping[str, Sequence[Sequence[int]]], a: str, b: str) -> float:
    """Fraction of ``a``'s active legos that ``b`` also uses, averaged over routing points."""
    per_layer = [len(set(x) & set(y)) / len(x) for x, y in zip(routes[a], routes[b])]
    return sum(per_layer) / len(per_layer)


def pair_statistic(routes: Mapping[str, Sequence[Sequence[int]]], pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Mean shared-lego fraction within the known pairs and across them (random routes: ``k / N``)."""
    within = [shared_fraction(routes, a, b) for a, b in pairs]
    members = [t for p in pairs for t in p]
    across = [shared_fraction(routes, a, b) for i, a in enumerate(members) for b in members[i + 1:]
              if (a, b) not in pairs and (b, a) not in pairs]
    return {"within": statistics.mean(within), "across": statistics.mean(across)}


def train_variant(cfg: RunConfig, variant: str, *, seed: int, out: Path) -> dict[str, Any]:
    """Train one variant of ``cfg`` with ``seed``; return primary metrics, wall time and final routes."""
    import json

    from gppf.backbones import create_backbone
    from gppf.engine.trainer import train

    cfg.train.seed, cfg.train.progress, cfg.train.checkpoint_every, cfg.train.eval_every = seed, False, 0, 0
    names = [t.name for t in cfg.tasks]
    probe = create_backbone(cfg.model.backbone, tasks=names, legos=cfg.model.legos, active=cfg.model.active,
                            width_mult=cfg.model.width_mult)
    routes = variant_routes(variant, tasks=names, layers=probe.router.num_layers, legos=cfg.model.legos,
                            active=cfg.model.active, seed=seed)
    for t in cfg.tasks:
        t.route = None if routes is None else routes[t.name]
    t0 = time.perf_counter()
    metrics = train(cfg, run_dir=out)
    wall = time.perf_counter() - t0
    primary = json.loads((out / "router.json").read_text())["primary_metric"]
    final = json.loads((out / "routes.json").read_text())
    return {"metrics": {n: metrics[f"{n}/{m}"] for n, m in primary.items()}, "wall_s": wall, "routes": final}


def bench_recipe(recipe: str, *, seeds: Sequence[int], steps: int | None, overrides: Sequence[str],
                 work: Path) -> dict[str, Any]:
    """Every applicable variant of ``recipe`` over ``seeds``; aggregated as described in the module doc."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in VARIANTS:
        for seed in seeds:
            cfg = load_config(recipe_path(recipe), [*overrides] + ([f"train.steps={steps}"] if steps else []))
            if variant == "disjoint" and len(cfg.tasks) * cfg.model.active > cfg.model.legos:
                break
            runs.setdefault(variant, []).append(train_variant(cfg, variant, seed=seed, out=work / f"{recipe}-{variant}-{seed}"))
    return summarise(runs, pairs=KNOWN_PAIRS.get(recipe))


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: Mapping[str, list[dict[str, Any]]], *, pairs: Sequence[tuple[str, str]] | None) -> dict[str, Any]:
    """Per variant: per-task metric (mean/std over seeds), mean gain over ``hard`` per seed, wall time."""
    hard = runs["hard"]
    out: dict[str, Any] = {}
    for variant, seeds in runs.items():
        tasks = list(seeds[0]["metrics"])
        gains = [statistics.mean(r["metrics"][t] - h["metrics"][t] for t in tasks) for r, h in zip(seeds, hard)]
        row: dict[str, Any] = {
            "tasks": {t: _spread([r["metrics"][t] for r in seeds]) for t in tasks},
            "mean_metric": _spread([statistics.mean(r["metrics"].values()) for r in seeds]),
            "gain_vs_hard": _spread(gains),
            "wall_s": _spread([r["wall_s"] for r in seeds]),
        }
        if pairs:
            stats = [pair_statistic(r["routes"], pairs) for r in seeds]
            row["shared_within_pairs"] = _spread([s["within"] for s in stats])
            row["shared_across_pairs"] = _spread([s["across"] for s in stats])
        out[variant] = row
    return out


def run_routing_bench(*, recipes: Sequence[str], seeds: Sequence[int], steps: int | None,
                      overrides: Sequence[str] = ()) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gppf-bench-routing-") as tmp:
        result: dict[str, Any] = {"seeds": list(seeds), "steps": steps}
        for recipe in recipes:
            result[recipe] = bench_recipe(recipe, seeds=seeds, steps=steps, overrides=overrides, work=Path(tmp))
    return result


def main_routing(argv: list[str]) -> int:
    """CLI entry: ``gppf bench routing [--quick] [--json] [--recipes ...] [--seeds ...] [--steps N] [key=value ...]``."""
    p = bench_parser("routing", __doc__, quick=f"{QUICK} (about 10 min on 2 CPU cores)")
    p.add_argument("--recipes", nargs="+", help="packaged recipe names or config paths")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--steps", type=int, help="override train.steps of every recipe")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every recipe")
    args = p.parse_args(argv)
    kw = dict(QUICK if args.quick else FULL)
    kw.update({k: getattr(args, k) for k in ("recipes", "seeds", "steps") if getattr(args, k) is not None})
    import logging

    logging.getLogger("gppf").setLevel(logging.WARNING)
    emit(run_routing_bench(overrides=args.overrides, **kw), as_json=args.json)
    return 0
