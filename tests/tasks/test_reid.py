from __future__ import annotations

from collections import Counter

import pytest
import torch

from gppf.tasks import build_task
from gppf.tasks.reid import IdentityBatchSampler


def _task(tiny_cfg, **kw):
    return build_task(tiny_cfg("reid", **kw), feature_channels=[8, 16, 16, 16], pooled_dim=16)


def test_identity_count_and_head_lookup(tiny_cfg):
    task = _task(tiny_cfg)
    assert task.num_classes == 6
    assert task.head.rows(torch.tensor([3, 40, 5, 99])).tolist() == [0, 5, -1, -1]


def test_soft_margin_option(tiny_cfg):
    assert _task(tiny_cfg, head={"soft_margin": True}).head.margin is None
    assert _task(tiny_cfg, head={"margin": 0.5}).head.margin == 0.5


def test_pk_sampler_batches_and_epochs():
    identities = [i // 3 for i in range(15)] + [9]  # ids 0..4 with 3 samples, id 9 with one
    sampler = IdentityBatchSampler(identities, batch_size=9, k=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    for batch in batches:
        counts = Counter(identities[i] for i in batch)
        assert len(batch) == 9 and len(counts) == 3 and set(counts.values()) == {3}
    assert list(sampler) != batches  # next epoch, new permutation
    with pytest.raises(ValueError, match="at least 2 identities"):
        IdentityBatchSampler([1, 1, 1], batch_size=4, k=2)


def test_chance_from_gallery(tiny_cfg):
    task = _task(tiny_cfg)
    # 24 val samples, 6 ids x 4: 6 queries, gallery of 18 with 3 positives per query
    chance = task.chance()
    assert chance["recall@1"] == pytest.approx(3 / 18)
    assert chance["map"] > 3 / 18


def test_loss_falls_with_pk_batches(tiny_cfg, tiny_backbone, fit, run_eval):
    task = _task(tiny_cfg, head={"emb_dim": 16, "instances_per_id": 2})
    sampler = task.batch_sampler(batch_size=12, seed=0)
    indices = next(iter(sampler))
    batch = task.collate([task.train_set[i] for i in indices])
    per_identity = Counter(batch.stacked["identity"].tolist())
    assert len(per_identity) == 6 and set(per_identity.values()) == {2}
    losses = fit(task=task, backbone=tiny_backbone, batch=batch, steps=30, lr=0.01)
    assert losses[-1] < 0.5 * losses[0]
    metrics = run_eval(task=task, backbone=tiny_backbone)
    assert set(metrics) == {"recall@1", "map"}
    assert metrics["recall@1"] > task.chance()["recall@1"]
