"""Re-identification retrieval metrics on the val split: ``recall@1`` and ``map``.

Protocol: val samples are ordered by ``image_id``; the first sample of each identity is its query, all
other samples form the gallery (shared by all queries). The gallery is ranked by cosine similarity to the
query. Queries whose identity has no gallery sample are skipped. ``recall@1`` is the fraction of queries
whose top-ranked gallery sample has the query's identity; ``map`` is the mean over queries of the
sklearn-style average precision (``gppf.metrics.multilabel.average_precision``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gppf.data.collate import Batch
from gppf.metrics.multilabel import average_precision, expected_random_ap


def query_gallery_split(identities_N: Tensor, image_ids_N: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of queries (first sample by ``image_id`` of each identity) and of the gallery (the rest)."""
    order_N = torch.argsort(image_ids_N, stable=True)
    is_query_N = torch.zeros_like(order_N, dtype=torch.bool)
    seen: set[int] = set()
    for pos, identity in enumerate(identities_N[order_N].tolist()):
        if identity not in seen:
            seen.add(identity)
            is_query_N[pos] = True
    return order_N[is_query_N], order_N[~is_query_N]


def retrieval_metrics(emb_ND: Tensor, identities_N: Tensor, image_ids_N: Tensor) -> dict[str, float]:
    """``recall@1`` and ``map`` of the query/gallery protocol (see module doc)."""
    query_Q, gallery_G = query_gallery_split(identities_N, image_ids_N)
    emb_ND = F.normalize(emb_ND.float(), dim=1)
    sims_QG = emb_ND[query_Q] @ emb_ND[gallery_G].T
    match_QG = identities_N[query_Q].view(-1, 1) == identities_N[gallery_G].view(1, -1)
    hits, aps = [], []
    for q in range(query_Q.numel()):
        if not bool(match_QG[q].any()):
            continue
        best = int(torch.argmax(sims_QG[q]))
        hits.append(float(match_QG[q, best]))
        aps.append(average_precision(sims_QG[q], match_QG[q]))
    if not aps:
        raise ValueError("retrieval_metrics: no identity has both a query and a gallery sample")
    return {"recall@1": sum(hits) / len(hits), "map": sum(aps) / len(aps)}


class RetrievalMetric:
    """Accumulates embeddings ``[B, D]`` (``preds``), ``identity`` and ``image_id`` from the batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._emb: list[Tensor] = []
        self._ids: list[Tensor] = []
        self._image_ids: list[Tensor] = []

    @torch.no_grad()
    def update(self, preds: Tensor, batch: Batch) -> None:
        self._emb.append(preds.detach().float().cpu())
        self._ids.append(batch.stacked["identity"].detach().cpu())
        self._image_ids.append(batch.stacked["image_id"].detach().cpu())

    def compute(self) -> dict[str, float]:
        if not self._emb:
            raise ValueError("RetrievalMetric.compute: no samples were seen")
        return retrieval_metrics(torch.cat(self._emb), torch.cat(self._ids), torch.cat(self._image_ids))


def retrieval_chance(identities_N: Tensor, image_ids_N: Tensor) -> dict[str, float]:
    """Random ranking: per valid query, ``recall@1 = n_pos / G`` and ``E[AP]`` of a random ranking."""
    query_Q, gallery_G = query_gallery_split(identities_N, image_ids_N)
    gallery_ids = identities_N[gallery_G]
    size = int(gallery_G.numel())
    recalls, aps = [], []
    for identity in identities_N[query_Q].tolist():
        num_pos = int((gallery_ids == identity).sum())
        if num_pos > 0:
            recalls.append(num_pos / size)
            aps.append(expected_random_ap(num_pos=num_pos, num_total=size))
    if not aps:
        raise ValueError("retrieval_chance: no identity has both a query and a gallery sample")
    return {"recall@1": sum(recalls) / len(recalls), "map": sum(aps) / len(aps)}
