"""Task framework: transforms, collate, Batch, head options, build_task plumbing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from gppf.config import ConfigError, DataConfig, TaskConfig
from gppf.data.collate import collate_batch, stack_targets
from gppf.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MASK_IGNORE,
    build_train_transform,
    build_val_transform,
    denormalize,
)
from gppf.registry import RegistryError
from gppf.tasks import TASK_TYPES, Batch, build_task, head_options


def _scene(height: int = 20, width: int = 40):
    image = tv_tensors.Image(torch.full((3, height, width), 128, dtype=torch.uint8))
    target = {
        "mask": tv_tensors.Mask(torch.ones(height, width, dtype=torch.int64)),
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[10.0, 5.0, 30.0, 15.0], [0.0, 0.0, 0.5, 0.5]]), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.tensor([3, 4]),
        "image_id": 7,
        "orig_size": (height, width),
    }
    return image, target


@pytest.mark.parametrize("mode", ["crop", "jitter", "resize", "letterbox"])
def test_train_modes_give_square_normalized_images(mode):
    image, target = _scene()
    out_image, out = build_train_transform(image_size=16, mode=mode, boxes=True)(image, target)
    assert out_image.shape == (3, 16, 16) and out_image.dtype == torch.float32
    assert out["mask"].shape == (16, 16) and set(out["mask"].unique().tolist()) <= {1, MASK_IGNORE}
    assert len(out["boxes"]) == len(out["labels"]) and out["image_id"] == 7 and out["orig_size"] == (20, 40)


def test_letterbox_keeps_aspect_and_pads_ignore():
    image, target = _scene()
    out_image, out = build_val_transform(image_size=16, mode="letterbox", boxes=True)(image, target)
    # scale 16/40 = 0.4: content rows 0..7, padding rows 8..15
    assert out["mask"][:8].eq(1).all() and out["mask"][8:].eq(MASK_IGNORE).all()
    assert out["boxes"].tolist() == [[4.0, 2.0, 12.0, 6.0]]  # the 0.5px box is sanitized away
    assert out["labels"].tolist() == [3]
    pad_value = (0.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert out_image[0, 12, 3].item() == pytest.approx(pad_value, abs=1e-5)


def test_normalize_round_trip():
    image, target = _scene()
    out_image, _ = build_val_transform(image_size=8, mode="resize")(image, target)
    assert torch.allclose(denormalize(out_image[None]), torch.full((1, 3, 8, 8), 128 / 255), atol=1e-5)


def test_mode_validation():
    with pytest.raises(ValueError, match="val mode"):
        build_train_transform(image_size=8, mode="center_crop")
    with pytest.raises(ValueError, match="val transform mode"):
        build_val_transform(image_size=8, mode="crop")


def test_collate_stacks_only_agreeing_values():
    samples = [
        (torch.zeros(3, 4, 4), {"label": 1, "score": 0.5, "boxes": torch.zeros(2, 4), "only_here": 1}),
        (torch.ones(3, 4, 4), {"label": 2, "score": 1.5, "boxes": torch.zeros(3, 4)}),
    ]
    batch = collate_batch(samples)
    assert len(batch) == 2 and batch.images.shape == (2, 3, 4, 4)
    assert set(batch.stacked) == {"label", "score"}
    assert batch.stacked["label"].dtype == torch.int64 and batch.stacked["score"].tolist() == [0.5, 1.5]
    assert batch.targets[1]["boxes"].shape == (3, 4)
    masks = [{"mask": tv_tensors.Mask(torch.zeros(2, 2, dtype=torch.int64))} for _ in range(3)]
    stacked = stack_targets(masks)["mask"]
    assert stacked.shape == (3, 2, 2) and type(stacked) is torch.Tensor
    with pytest.raises(ValueError, match="differ in shape"):
        collate_batch([(torch.zeros(3, 4, 4), {}), (torch.zeros(3, 5, 4), {})])


def test_batch_to_channels_last_keeps_tv_tensors():
    image, target = _scene()
    batch = collate_batch([build_val_transform(image_size=8)(image, target)] * 2)
    moved = batch.to("cpu", channels_last=True)
    assert isinstance(moved, Batch) and moved.images.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(moved.targets[0]["boxes"], tv_tensors.BoundingBoxes)


def test_head_options_coerce_and_reject():
    cfg = TaskConfig(name="t", head={"width": 64.0, "scale": 2})
    assert head_options(cfg, {"width": 128, "scale": 1.0, "flag": True}) == {"width": 64, "scale": 2.0, "flag": True}
    with pytest.raises(ConfigError, match=r"tasks\.t\.head\.width: expected an integer"):
        head_options(TaskConfig(name="t", head={"width": 1.5}), {"width": 128})
    with pytest.raises(ConfigError, match="expected true/false"):
        head_options(TaskConfig(name="t", head={"flag": 1}), {"flag": True})
    with pytest.raises(ConfigError, match="null is not allowed"):
        head_options(TaskConfig(name="t", head={"width": None}), {"width": 128})


def test_build_task_plumbing(tiny_cfg):
    cfg = tiny_cfg("classification", augment=False, max_val_samples=6)
    task = build_task(cfg, feature_channels=[8, 16, 16, 16], pooled_dim=16)
    assert task.val_set.indices == [0, 4, 8, 12, 16, 20]
    assert task.val_set.target(1)["image_id"] == 4
    # augment=False: the train split uses the deterministic val pipeline
    first, second = task.train_set[0][0], task.train_set[0][0]
    assert torch.equal(first, second)
    assert task.primary_metric == "top1" and task.batch_sampler(batch_size=4, seed=0) is None
    assert "tiny_classification" in repr(task)


def test_build_task_unknown_names(tiny_cfg):
    with pytest.raises(RegistryError, match="unknown data format 'nope'"):
        build_task(TaskConfig(name="x", data=DataConfig(format="nope")), feature_channels=[1], pooled_dim=1)
    assert {"classification", "multilabel", "segmentation", "reid"} <= set(TASK_TYPES.names())


def _docs_example() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "tasks.md").read_text()
    section = text.split("## Adding a task type", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_regression_example(monkeypatch, tiny_cfg, tiny_backbone, fit, run_eval):
    monkeypatch.setattr(TASK_TYPES, "_items", dict(TASK_TYPES._items))  # registration undone after the test
    namespace: dict = {"__name__": "docs_regression"}
    exec(compile(_docs_example(), "docs/tasks.md", "exec"), namespace)
    TASK_TYPES.add("regression", namespace["RegressionType"])
    assert TASK_TYPES.get("regression").option_defaults() == {"beta": 0.1}
    task = build_task(tiny_cfg("regression", head={"beta": 0.05}), feature_channels=[8, 16, 16, 16], pooled_dim=16)
    batch = task.collate([task.train_set[i] for i in range(12)])
    assert batch.stacked["value"].shape == (12,)
    losses = fit(task=task, backbone=tiny_backbone, batch=batch, steps=40, lr=0.01)
    assert losses[-1] < 0.5 * losses[0]
    assert set(run_eval(task=task, backbone=tiny_backbone)) == {"within_tol"} == set(task.chance())


@pytest.mark.parametrize("task_type", ["classification", "multilabel", "segmentation", "reid"])
def test_synthetic_reader_with_real_backbone(task_type):
    pytest.importorskip("gppf.data.synthetic")
    backbones = pytest.importorskip("gppf.backbones")
    backbone = backbones.create_backbone("gppf_r18", legos=4, active=2, tasks=[task_type], width_mult=0.25)
    options = {"size": 32, "num_train": 16, "num_val": 8, **({"num_identities": 10} if task_type == "reid" else {})}
    cfg = TaskConfig(name=task_type, type=task_type, data=DataConfig(format="synthetic", options=options),
                     image_size=32, head={"width": 16} if task_type == "segmentation" else {})
    task = build_task(cfg, feature_channels=backbone.feature_channels, pooled_dim=backbone.pooled_dim)
    sampler = task.batch_sampler(batch_size=8, seed=0)
    indices = next(iter(sampler)) if sampler is not None else range(8)
    batch = task.collate([task.train_set[i] for i in indices])
    loss = task.head.loss(task.head(backbone(batch.images, task=task_type)), batch)
    loss.backward()
    assert torch.isfinite(loss)
    backbone.eval()
    task.head.eval()
    metric = task.new_metric()
    with torch.no_grad():
        val = task.collate([task.val_set[i] for i in range(len(task.val_set))])
        metric.update(task.head.predict(task.head(backbone(val.images, task=task_type)), val), val)
    values = metric.compute()
    assert set(values) == set(task.chance()) and all(0.0 <= v <= 1.0 for v in values.values())


@pytest.mark.cuda
@pytest.mark.parametrize("task_type", ["classification", "multilabel", "segmentation", "reid"])
def test_cuda_bf16_channels_last(task_type, tiny_cfg, tiny_backbone):
    head = {"width": 16} if task_type == "segmentation" else {"emb_dim": 16} if task_type == "reid" else {}
    task = build_task(tiny_cfg(task_type, head=head), feature_channels=[8, 16, 16, 16], pooled_dim=16)
    backbone, model = tiny_backbone.cuda().to(memory_format=torch.channels_last), task.head.cuda()
    batch = task.collate([task.val_set[i] for i in range(len(task.val_set))]).to("cuda", channels_last=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(backbone(batch.images))
        loss = model.loss(out, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    metric = task.new_metric()
    metric.update(model.predict(out, batch), batch)
    assert set(metric.compute()) == set(task.chance())


def test_head_options_come_from_the_head_signature():
    from gppf.tasks import TaskType, head_option_defaults

    class ToyHead(torch.nn.Module):
        def __init__(self, pos: int = 1, *, pooled_dim: int, width: int = 8, scale: float = 0.5, fixed: int = 3):
            super().__init__()

    class ToyType(TaskType):
        name, head, primary_metric = "toy", ToyHead, "x"
        fixed_head_args = ("fixed",)
        extra_options = {"sampler_k": 4}

    # keyword-only with defaults only; ``pos`` (positional) and ``pooled_dim`` (no default) are not options
    assert head_option_defaults(ToyHead) == {"width": 8, "scale": 0.5, "fixed": 3}
    assert ToyType().option_defaults() == {"width": 8, "scale": 0.5, "sampler_k": 4}
    assert ToyType().head_kwargs({"width": 2, "scale": 1.0, "sampler_k": 0}) == {"width": 2, "scale": 1.0}
    with pytest.raises(ConfigError, match=r"unknown head option 'tasks\.t\.head\.fixed'.*known: sampler_k, scale, width"):
        ToyType().options(TaskConfig(name="t", type="toy", head={"fixed": 1}))


def test_builtin_option_defaults_match_their_heads():
    from gppf.heads.detection import FCOSHead
    from gppf.heads.reid import ReidHead

    detection = TASK_TYPES.get("detection").option_defaults()
    assert "in_strides" not in detection and detection["strides"] == (8, 16, 32)
    assert detection["score_thresh"] == FCOSHead.__init__.__kwdefaults__["score_thresh"]
    reid = TASK_TYPES.get("reid")
    assert reid.option_defaults() == {**{k: v for k, v in ReidHead.__init__.__kwdefaults__.items()},
                                      "soft_margin": False, "instances_per_id": 4}
    opts = reid.options(TaskConfig(name="r", type="reid", head={"soft_margin": True, "margin": 0.5}))
    assert reid.head_kwargs(opts)["margin"] is None and "instances_per_id" not in reid.head_kwargs(opts)
    strides = TASK_TYPES.get("detection").options(TaskConfig(name="d", type="detection", head={"strides": [16.0, 32]}))
    assert strides["strides"] == [16, 32] and all(type(s) is int for s in strides["strides"])


@pytest.mark.parametrize("task_type", ["classification", "multilabel", "segmentation", "reid"])
def test_built_heads_satisfy_the_head_protocol(task_type, tiny_cfg):
    from gppf.interfaces import Head

    task = build_task(tiny_cfg(task_type), feature_channels=[8, 16, 16, 16], pooled_dim=16)
    assert isinstance(task.head, Head) and isinstance(task.head, torch.nn.Module)
    assert not isinstance(object(), Head)
