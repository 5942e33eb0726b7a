"""Count-normalised losses (``loss_parts``): split over two "ranks" with the counts summed over both,
they add up to the loss of the whole batch, which dividing each half by its own count does not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gppf.backbones import create_backbone
from gppf.config import DataConfig, TaskConfig
from gppf.interfaces import CountedHead, normalized_loss
from gppf.tasks import build_task

HEADS = {"detection": {"width": 16}, "keypoints": {"width": 16}, "segmentation": {"width": 16},
         "multilabel": {}, "reid": {"emb_dim": 16}}


UNLABEL = {"keypoints": ("keypoints", lambda t: t[:4, 2].zero_()),  # visibility 0
           "segmentation": ("mask", lambda t: t[:16].fill_(255)),  # ignored pixels
           "multilabel": ("labels", lambda t: t[:5].fill_(-1))}  # unknown labels


def _unlabel(task_type: str, target: dict) -> None:
    if task_type in UNLABEL:
        key, fn = UNLABEL[task_type]
        fn(target[key])


def _task_and_batches(task_type: str):
    options = {"domain": "pastel", "size": 32, "num_train": 16, "num_val": 4}
    if task_type == "reid":
        options["num_identities"] = 10
    cfg = TaskConfig(name=task_type, type=task_type, image_size=32, batch_size=8, augment=False,
                     head=HEADS[task_type], data=DataConfig(format="synthetic", options=options))
    backbone = create_backbone("gppf_r18", tasks=[task_type], legos=2, active=2, width_mult=0.125).eval()
    task = build_task(cfg, feature_channels=backbone.feature_channels, pooled_dim=backbone.pooled_dim)
    task.head.eval()  # the reid BNNeck: running statistics, so the halves see the same normalisation
    torch.manual_seed(0)
    items = [task.train_set[i] for i in range(8)]
    for _, target in items[:3]:  # some unlabelled entries in the first share only: its count differs
        _unlabel(task_type, target)
    whole, halves = task.collate(items), [task.collate(items[:3]), task.collate(items[3:])]  # unequal shares
    run = lambda b: task.head(backbone(b.images, task_type))  # noqa: E731
    return task.head, whole, halves, run


@pytest.mark.parametrize("task_type", sorted(HEADS))
def test_counted_loss_of_split_batch_equals_whole_batch(task_type):
    head, whole, halves, run = _task_and_batches(task_type)
    assert isinstance(head, CountedHead)
    with torch.no_grad():
        ref_parts = head.loss_parts(run(whole), whole)
        ref = head.loss(run(whole), whole)
        parts = [head.loss_parts(run(b), b) for b in halves]
    if task_type == "reid":  # batch-hard mining is local to a rank's share: only the CE term adds up
        ref_parts = {"ce": ref_parts["ce"]}
        parts = [{"ce": p["ce"]} for p in parts]
        ref = normalized_loss(ref_parts)
    assert float(ref) == pytest.approx(float(normalized_loss(ref_parts)), rel=1e-6)  # loss == its parts
    counts_P = sum(torch.stack([c for _, c in p.values()]) for p in parts)
    assert torch.allclose(counts_P, torch.stack([c for _, c in ref_parts.values()]))
    global_norm = sum(normalized_loss(p, counts_P=counts_P) for p in parts)
    assert float(global_norm) == pytest.approx(float(ref), rel=1e-5)
    # dividing by each share's own count and weighting by its share of samples (the rule for plain
    # means) differs, since the shares hold different numbers of positives / labels
    shares = [len(b) / len(whole) for b in halves]
    local = sum(s * normalized_loss(p) for s, p in zip(shares, parts))
    own = [torch.stack([c for _, c in p.values()]) for p in parts]
    if task_type != "reid":  # (every reid sample has a known identity: counts follow the shares)
        assert not torch.allclose(own[0] / shares[0], own[1] / shares[1])
        assert abs(float(local) - float(ref)) > 1e-4 * abs(float(ref))


def test_label_smoothed_sum_over_count_equals_torch_mean_with_ignored_pixels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 4, generator=gen)
    mask = torch.randint(0, 5, (2, 4, 4), generator=gen)
    mask[0, :2] = 255
    mean = F.cross_entropy(logits, mask, ignore_index=255, label_smoothing=0.1)
    total = F.cross_entropy(logits, mask, ignore_index=255, label_smoothing=0.1, reduction="sum")
    parts = {"ce": (total, (mask != 255).sum().float())}
    assert float(normalized_loss(parts)) == pytest.approx(float(mean), rel=1e-6)
    nothing = {"ce": (logits.sum() * 0.0, torch.tensor(0.0))}
    assert float(normalized_loss(nothing)) == 0.0  # no labelled pixel: zero, not NaN
