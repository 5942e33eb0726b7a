"""Task type ``reid``: person/object re-identification, metrics ``recall@1`` / ``map`` on the val split.

Training uses P x K identity sampling (``IdentityBatchSampler``: P identities, K samples each) so that the
batch-hard triplet loss sees positive pairs; ``Task.batch_sampler(batch_size=..., seed=...)`` returns it.
The loss stays finite (triplet term 0) on batches without positive pairs, e.g. with plain random batches.
Val protocol: first sample (by ``image_id``) of each identity is the query, the rest is the gallery.

Head options: ``emb_dim``, ``margin``, ``triplet_weight``, ``label_smoothing`` (from ``ReidHead``) and the
task type's own ``soft_margin`` (softplus instead of the hinge with ``margin``) and ``instances_per_id``
(K of the sampler; 0 disables P x K sampling).
Transforms: resize to ``S x S`` + flip (train), resize (val).
"""
from __future__ import annotations

import weakref
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from gppf.config import TaskConfig
from gppf.heads.reid import ReidHead
from gppf.metrics.retrieval import RetrievalMetric, retrieval_chance
from gppf.tasks.base import TaskType, iter_targets

_IDENTITY_CACHE: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()


def dataset_identities(dataset: Dataset) -> list[int]:
    """``identity`` of every item of ``dataset`` (read once per dataset object, then cached)."""
    if dataset not in _IDENTITY_CACHE:
        _IDENTITY_CACHE[dataset] = [int(t["identity"]) for t in iter_targets(dataset)]
    return list(_IDENTITY_CACHE[dataset])


class IdentityBatchSampler:
    """P x K batch sampler: each batch holds ``P = min(batch_size // k, #ids)`` identities with ``k``
    samples each (drawn with replacement only for identities with fewer than ``k`` samples).

    Each ``__iter__`` is one epoch over a fresh identity permutation seeded by ``seed + epoch``.
    """

    def __init__(self, identities: Sequence[int], *, batch_size: int, k: int = 4, seed: int = 0) -> None:
        groups: dict[int, list[int]] = {}
        for index, identity in enumerate(identities):
            groups.setdefault(int(identity), []).append(index)
        if len(groups) < 2:
            raise ValueError(f"P x K sampling needs at least 2 identities, got {len(groups)}")
        if k < 1 or batch_size < 2 * k:
            raise ValueError(f"P x K sampling needs k >= 1 and batch_size >= 2k, got k={k}, batch_size={batch_size}")
        self.groups = [groups[i] for i in sorted(groups)]
        self.k = int(k)
        self.p = min(batch_size // self.k, len(self.groups))
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.groups) // self.p

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.groups), generator=gen).tolist()
        for start in range(0, len(order) - self.p + 1, self.p):
            batch: list[int] = []
            for group_index in order[start : start + self.p]:
                members = self.groups[group_index]
                if len(members) >= self.k:
                    picks = torch.randperm(len(members), generator=gen)[: self.k]
                else:
                    picks = torch.randint(len(members), (self.k,), generator=gen)
                batch.extend(members[i] for i in picks.tolist())
            yield batch


def identity_sampler(
    dataset: Dataset, *, batch_size: int, k: int = 4, seed: int = 0
) -> IdentityBatchSampler:
    """``IdentityBatchSampler`` over the identities of ``dataset``."""
    return IdentityBatchSampler(dataset_identities(dataset), batch_size=batch_size, k=k, seed=seed)


def training_identities(dataset: Dataset) -> list[int]:
    """Sorted identities of the train split. A reader with ``classes`` (identity names) has identities
    ``0 .. len(classes) - 1`` (no scan); otherwise every target is read once."""
    classes = list(getattr(dataset, "classes", []) or [])
    if classes:
        return list(range(len(classes)))
    return sorted(set(dataset_identities(dataset)))


class ReidType(TaskType):
    name = "reid"
    head = ReidHead
    primary_metric = "map"
    extra_options = {"soft_margin": False, "instances_per_id": 4}

    def count_classes(self, dataset: Dataset) -> int:
        """Number of training identities."""
        return len(training_identities(dataset))

    def head_inputs(
        self, cfg: TaskConfig, *, feature_channels: list[int], pooled_dim: int, num_classes: int, dataset: Dataset
    ) -> dict[str, Any]:
        return {"pooled_dim": pooled_dim, "identities": training_identities(dataset)}

    def head_kwargs(self, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().head_kwargs(options)
        if options["soft_margin"]:
            kwargs["margin"] = None  # softplus instead of the hinge
        return kwargs

    def train_batch_sampler(
        self, cfg: TaskConfig, *, dataset: Dataset, batch_size: int, seed: int
    ) -> IdentityBatchSampler | None:
        k = int(self.options(cfg)["instances_per_id"])
        if k <= 0:
            return None
        return identity_sampler(dataset, batch_size=batch_size, k=k, seed=seed)

    def new_metric(self, cfg: TaskConfig, *, dataset: Dataset, num_classes: int) -> RetrievalMetric:
        return RetrievalMetric()

    def chance(self, *, num_classes: int, dataset: Dataset) -> dict[str, float]:
        targets = list(iter_targets(dataset))
        identities_N = torch.tensor([int(t["identity"]) for t in targets])
        image_ids_N = torch.tensor([int(t["image_id"]) for t in targets])
        return retrieval_chance(identities_N, image_ids_N)
