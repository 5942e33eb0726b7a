"""Route selection for a new task before training (``finetune.route: auto``, ``gppf route``).

``candidate_routes(backbone)`` lists the routes worth trying (``copy:<task>``: every pre-training task's
route); ``rank_routes`` embeds a seeded sample of the NEW task's training split (never its val split),
with the deterministic val transform, through each candidate route of the frozen backbone (eval mode) and
scores the features with the task type's transferability estimator (``gppf.transfer.transferability``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from gppf.backbones.base import LegoBackbone
from gppf.interfaces import Batch
from gppf.lego.router import Route
from gppf.tasks.base import Task, TransformedDataset, reader_of
from gppf.transfer.transferability import Estimator, TransferabilityError, estimator_for

__all__ = ["RouteScore", "candidate_routes", "embed_batches", "iter_scores", "rank_routes", "statistics_task"]

BATCH = 64


@dataclass(frozen=True)
class RouteScore:
    """One candidate's transferability score (higher = better) and how it was computed."""

    candidate: str
    route: list[list[int]]
    score: float
    method: str


def candidate_routes(backbone: LegoBackbone) -> dict[str, list[list[int]]]:
    """``{"copy:<task>": route}`` for every task the backbone routes (its pre-training tasks)."""
    return {f"copy:{task}": route for task, route in backbone.router.routes().items()}


def statistics_task(backbone: LegoBackbone, *, candidate: str, route: Sequence[Sequence[int]]) -> str:
    """The pre-training task whose BN statistics embed ``route``: ``<task>`` of ``copy:<task>``, else the
    task whose route shares the most legos with ``route`` (the first such task on a tie)."""
    routes = backbone.router.routes()
    if candidate.startswith("copy:") and candidate[5:] in routes:
        return candidate[5:]

    def shared(task: str) -> int:
        return sum(len(set(a) & set(b)) for a, b in zip(routes[task], route))

    return max(routes, key=lambda t: (shared(t), -list(routes).index(t)))


def _sample(task: Task, *, samples: int, seed: int) -> TransformedDataset:
    """A seeded subset of the TRAIN split seen through the deterministic val transform."""
    train = reader_of(task.train_set)
    n = len(train)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(samples, n)].sort().values.tolist()
    return TransformedDataset(train, transform=task.type.val_transform(task.cfg), indices=idx)


def embed_batches(task: Task, *, samples: int, seed: int) -> list[Batch]:
    """The collated batches of the sample ``rank_routes`` scores (``samples`` train items, seeded)."""
    data = _sample(task, samples=samples, seed=seed)
    items = [data[i] for i in range(len(data))]
    return [task.collate(items[i:i + BATCH]) for i in range(0, len(items), BATCH)]


@torch.no_grad()
def _score(backbone: LegoBackbone, batches: list[Batch], *, route: Route, stats: str, estimator: Estimator,
           device: torch.device, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)  # the same pixels for every candidate
    rows: list[Tensor] = []
    labels: list[Tensor] = []
    for batch in batches:
        batch = batch.to(device)
        feats = backbone(batch.images, stats, route=route)
        x, y = estimator.pairs(feats, batch, gen)
        rows.append(x.cpu())
        labels.append(y.cpu())
    f, y = torch.cat(rows), torch.cat(labels)
    if len(f) < 2:
        raise TransferabilityError(f"{estimator.method}: the sample holds {len(f)} labelled rows; need >= 2")
    return float(estimator.score(f, y))


def rank_routes(
    *,
    backbone: LegoBackbone,
    task: Task,
    candidates: Mapping[str, Sequence[Sequence[int]]],
    samples: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    score: str | None = None,
) -> list[RouteScore]:
    """Score every candidate route for ``task`` on ``samples`` items of its train split; best first.

    The backbone is used frozen, in eval mode (its training flag is restored after). A ``copy:<task>``
    candidate embeds with that task's BN statistics; any other candidate with those of the pre-training
    task whose route shares the most legos with it (``statistics_task``). ``score`` ("logme" / "gbc")
    overrides the task type's default score. Ties keep the candidates' order.
    """
    estimator = estimator_for(task.type.name, score=score)
    device = torch.device(device)
    batches = embed_batches(task, samples=samples, seed=seed)
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for name, route in candidates.items():
            idx_LK = torch.as_tensor(route, dtype=torch.long, device=device).sort(dim=1).values
            stats = statistics_task(backbone, candidate=name, route=idx_LK.tolist())
            value = _score(backbone, batches, route=Route(idx_LK=idx_LK, gate_LK=None), stats=stats,
                           estimator=estimator, device=device, seed=seed)
            out.append(RouteScore(candidate=name, route=idx_LK.tolist(), score=value, method=estimator.method))
    finally:
        backbone.train(was_training)
    return sorted(out, key=lambda r: -r.score)


def iter_scores(ranked: Sequence[RouteScore]) -> Iterator[dict[str, object]]:
    """Plain dicts (JSON-ready) of ranked scores."""
    for r in ranked:
        yield {"candidate": r.candidate, "score": r.score, "method": r.method, "route": r.route}
