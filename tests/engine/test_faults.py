"""NaN losses, tasks that fail to load, pickle payloads in checkpoints."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from gppf.engine import trainer
from gppf.engine.checkpoint import CheckpointError
from gppf.engine.trainer import TrainError, build_run, train




def test_nan_loss_skips_step_and_names_task(tmp_path, tiny_cfg):
    run = build_run(tiny_cfg(), run_dir=tmp_path, resume=False)
    good = run.step_fn.losses["seg"]
    run.step_fn.losses["seg"] = lambda out, batch: good(out, batch) * math.nan
    before = {k: v.clone() for k, v in run.model.state_dict().items() if v.is_floating_point()}
    result = run.step_fn(0)
    assert result.skipped and result.bad_tasks == ["seg"]
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in run.model.parameters())
    run.step_fn.losses["seg"] = good
    assert not run.step_fn(1).skipped


def test_consecutive_nan_steps_stop_the_run_with_clear_message(tmp_path, monkeypatch, tiny_cfg):
    real_build = trainer.build_run

    def poisoned(cfg, **kw):
        run = real_build(cfg, **kw)
        run.step_fn.losses["cls"] = lambda out, batch: out.sum() * math.inf
        return run

    monkeypatch.setattr(trainer, "build_run", poisoned)
    with pytest.raises(TrainError, match=r"3 consecutive steps with non-finite loss.*task\(s\) cls"):
        train(tiny_cfg(steps=10, extra=["train.max_bad_steps=3"]), run_dir=tmp_path)
    log = (tmp_path / "metrics.jsonl").read_text()
    assert "non-finite loss from cls" in log


def test_task_that_fails_to_load_is_named_before_training(tmp_path, tiny_cfg):
    cfg = tiny_cfg(extra=["tasks.seg.data.format=imagefolder", f"tasks.seg.data.root={tmp_path / 'nope'}"])
    with pytest.raises(TrainError, match=r"task 'seg' \(segmentation, imagefolder\) failed to load"):
        train(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_checkpoint_with_pickle_payload_is_refused(tmp_path, tiny_cfg):
    cfg = tiny_cfg(steps=3)
    train(cfg, run_dir=tmp_path)
    step_dir = tmp_path / "checkpoints" / "step_000003"
    (step_dir / "extra.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="extra.pkl"):
        train(cfg, run_dir=tmp_path, resume=True)


def test_sample_weights_pick_a_weighted_subset_per_step(tmp_path, tiny_cfg):
    run = build_run(tiny_cfg(extra=["tasks.seg.sample_weight=0.25"]), run_dir=tmp_path, resume=False)
    picks = [run.step_fn.tasks_this_step(s) for s in range(400)]
    assert all("cls" in p for p in picks)
    share = sum("seg" in p for p in picks) / len(picks)
    assert 0.17 < share < 0.33
    assert picks == [run.step_fn.tasks_this_step(s) for s in range(400)]  # deterministic per step
    step = next(s for s in range(400) if "seg" not in picks[s])
    result = run.step_fn(step)
    assert result.samples["seg"] == 0 and result.samples["cls"] == 8


def _imagefolder(root, *, corrupt: str):
    from PIL import Image

    for split in ("train", "val"):
        for c, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (24, 24), colour).save(d / f"{i}.png")
    (root / "train" / "red" / corrupt).write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")


@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_bad_samples_are_counted_in_the_run_log(tmp_path, tiny_cfg, workers):
    import json

    _imagefolder(tmp_path / "data", corrupt="broken.png")
    cfg = tiny_cfg(steps=4, extra=[
        "tasks.cls.data.format=imagefolder", f"tasks.cls.data.root={tmp_path / 'data'}", "tasks.cls.data.options={}",
        "tasks.cls.data.train=train", "tasks.cls.data.val=val", "tasks.cls.on_bad_sample=skip",
        "tasks.cls.batch_size=13", f"train.num_workers={workers}", "train.checkpoint_every=0",
    ])
    train(cfg, run_dir=tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    data = [r for r in records if r["kind"] == "data" and r["task"] == "cls"]
    assert data and data[-1]["skipped_load_train"] == 1


def test_corrupt_image_without_skip_names_the_file(tmp_path, tiny_cfg):
    from gppf.data.base import DataError

    _imagefolder(tmp_path / "data", corrupt="broken.png")
    cfg = tiny_cfg(steps=4, extra=[
        "tasks.cls.data.format=imagefolder", f"tasks.cls.data.root={tmp_path / 'data'}", "tasks.cls.data.options={}",
        "tasks.cls.data.train=train", "tasks.cls.data.val=val", "tasks.cls.batch_size=13", "train.checkpoint_every=0",
    ])
    with pytest.raises(DataError, match="broken.png"):
        train(cfg, run_dir=tmp_path / "run")


def test_packed_targets_keep_values_types_and_metadata():
    from torchvision import tv_tensors

    from gppf.engine.data import pack_targets

    targets = [
        {"boxes": tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2, 3, 4]]), format="XYXY", canvas_size=(8, 9)),
         "labels": torch.tensor([3]), "keypoints": torch.rand(5, 3), "image_id": 7},
        {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(8, 9)),
         "labels": torch.zeros(0, dtype=torch.long), "keypoints": torch.rand(5, 3), "image_id": 8},
    ]
    packed = pack_targets(targets)
    for old, new in zip(targets, packed):
        assert new["image_id"] == old["image_id"]
        for key in ("boxes", "labels", "keypoints"):
            assert type(new[key]) is type(old[key]) and torch.equal(new[key], old[key])
        assert new["boxes"].format == old["boxes"].format and new["boxes"].canvas_size == (8, 9)
    # one storage per dtype
    assert packed[0]["keypoints"].untyped_storage().data_ptr() == packed[1]["boxes"].untyped_storage().data_ptr()
