"""``gppf route --from RUN_DIR --config FILE [--json]``: rank candidate routes for each downstream task of
FILE with the pre-trained run's frozen backbone and print the chosen route, without training."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from gppf.config import RunConfig
from gppf.tasks.base import build_task
from gppf.transfer.pretrained import load_pretrained
from gppf.transfer.select import RouteScore, candidate_routes, iter_scores, rank_routes
from gppf.transfer.transferability import TransferabilityError

__all__ = ["print_report", "route_report"]


def _method_of(cfg: RunConfig, task: str) -> Any:
    """The route method ``FILE`` asks for (``finetune.route``, a mapping or one value; the task's own
    ``route:`` list wins); ``auto`` when the config says nothing."""
    own = next(t.route for t in cfg.tasks if t.name == task)
    if own is not None:
        return own
    ft = getattr(cfg, "finetune", None)
    method = getattr(ft, "route", "auto") if ft is not None else "auto"
    if isinstance(method, dict):
        method = method.get(task, "auto")
    return method


def _chosen(method: Any, ranked: list[RouteScore], candidates: dict[str, list[list[int]]]) -> tuple[str, Any]:
    """(how, route) of the route fine-tuning will use: the best candidate for ``auto``."""
    if method == "auto":
        return f"auto -> {ranked[0].candidate}", ranked[0].route
    if isinstance(method, str) and method in candidates:
        return method, candidates[method]
    if method == "learn":
        return method, None  # decided by training
    if isinstance(method, str):
        raise TransferabilityError(f"route method {method!r}: not auto, learn, an [L][k] list or one of the "
                                   f"candidates ({', '.join(candidates)})")
    return "explicit", [list(map(int, row)) for row in method]


def route_report(*, run_dir: Path | str, cfg: RunConfig, samples: int = 256, seed: int = 0,
                 device: str | torch.device = "cpu", score: str | None = None) -> dict[str, Any]:
    """Scores of every candidate route for each task of ``cfg`` (JSON-ready), with timings."""
    start = time.perf_counter()
    pre = load_pretrained(run_dir, device=device)
    backbone = pre.model.backbone
    candidates = candidate_routes(backbone)
    out: dict[str, Any] = {"from": str(run_dir), "step": pre.step, "samples": samples, "seed": seed, "tasks": {}}
    for tc in cfg.tasks:
        t0 = time.perf_counter()
        task = build_task(tc, feature_channels=backbone.feature_channels, pooled_dim=backbone.pooled_dim)
        ranked = rank_routes(backbone=backbone, task=task, candidates=candidates, samples=samples,
                             device=device, seed=seed, score=score)
        how, route = _chosen(_method_of(cfg, tc.name), ranked, candidates)
        out["tasks"][tc.name] = {
            "type": tc.type, "method": ranked[0].method, "chosen": how, "route": route,
            "candidates": list(iter_scores(ranked)), "seconds": round(time.perf_counter() - t0, 3),
        }
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _short(route: list[list[int]] | None) -> str:
    """``[[0, 1], [2, 3]]`` as ``0,1|2,3`` (one group per routing point)."""
    return "learned" if route is None else "|".join(",".join(map(str, row)) for row in route)


def print_report(report: dict[str, Any], *, as_json: bool) -> None:
    """One JSON object (``as_json``) or a rich table per task."""
    if as_json:
        print(json.dumps(report, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, task in report["tasks"].items():
        table = Table(title=f"{name} ({task['type']}): {task['method']}, {task['seconds']:.2f} s")
        for col in ("rank", "candidate", "score", "route"):
            table.add_column(col)
        for i, cand in enumerate(task["candidates"], 1):
            table.add_row(str(i), cand["candidate"], f"{cand['score']:.4f}", _short(cand["route"]))
        console.print(table)
        console.print(f"chosen: {task['chosen']}  route: {_short(task['route'])}")
    console.print(f"{len(report['tasks'])} task(s) ranked in {report['seconds']:.2f} s "
                  f"({report['samples']} train samples each, from {report['from']} step {report['step']})")
