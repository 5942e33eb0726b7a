from __future__ import annotations

import pytest
import torch

from gppf.data.collate import Batch
from gppf.metrics.retrieval import RetrievalMetric, query_gallery_split, retrieval_chance, retrieval_metrics

# image_id -> (identity, embedding); queries are image 0 (A=0) and image 1 (B=1)
TOY = {
    0: (0, [1.0, 0.0]),
    1: (1, [0.0, 1.0]),
    2: (0, [0.6, 0.8]),
    3: (1, [0.8, 0.6]),
    4: (0, [1.0, 0.1]),
}


def _arrays(order):
    ids = torch.tensor([TOY[i][0] for i in order])
    emb = torch.tensor([TOY[i][1] for i in order])
    return emb, ids, torch.tensor(order)


def test_query_gallery_split_by_image_id():
    _, ids, image_ids = _arrays([3, 0, 4, 1, 2])
    query, gallery = query_gallery_split(ids, image_ids)
    assert image_ids[query].tolist() == [0, 1]
    assert image_ids[gallery].tolist() == [2, 3, 4]


def test_recall_and_map_hand_computed():
    # query A ranks 4(A) 3(B) 2(A): hit, AP = (1 + 2/3) / 2; query B ranks 2(A) 3(B) 4(A): miss, AP = 1/2
    emb, ids, image_ids = _arrays([3, 0, 4, 1, 2])
    expected = {"recall@1": 0.5, "map": ((1 + 2 / 3) / 2 + 0.5) / 2}
    assert retrieval_metrics(emb, ids, image_ids) == pytest.approx(expected)
    metric = RetrievalMetric()
    for part in ((3, 0), (4, 1, 2)):
        emb, ids, image_ids = _arrays(list(part))
        batch = Batch(images=torch.zeros(len(part), 3, 2, 2), targets=[{} for _ in part],
                      stacked={"identity": ids, "image_id": image_ids})
        metric.update(emb * 3.0, batch)  # scale must not matter (cosine)
    assert metric.compute() == pytest.approx(expected)


def test_queries_without_gallery_match_are_skipped():
    emb, ids, image_ids = _arrays([0, 1, 2, 3, 4])
    emb = torch.cat([emb, torch.tensor([[0.0, 1.0]])])
    ids, image_ids = torch.cat([ids, torch.tensor([9])]), torch.cat([image_ids, torch.tensor([5])])
    assert retrieval_metrics(emb, ids, image_ids)["recall@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no identity"):
        retrieval_metrics(emb[:2], ids[:2], image_ids[:2])


def test_chance_from_gallery_composition():
    # gallery of 3: A has 2 positives, B 1; E[AP] = (H_N + (n-1)/(N-1) (N - H_N)) / N with H_3 = 11/6
    _, ids, image_ids = _arrays([0, 1, 2, 3, 4])
    expected_map = (29 / 36 + 11 / 18) / 2
    assert retrieval_chance(ids, image_ids) == pytest.approx({"recall@1": 0.5, "map": expected_map})
