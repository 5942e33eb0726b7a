"""Pack -> stream -> train on the shared CIFAR-10 and CamVid (opt-in: ``pytest -m realdata``).

Data location: ``$GPPF_DATA`` or ``<repo>/../shared/data``; skips cleanly when absent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gppf.cli import main as cli_main
from gppf.config import load_config
from gppf.data.base import READERS
from gppf.data.check import check_config

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("GPPF_DATA") or REPO.parent / "shared" / "data")
CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist", "Unlabelled"]
TASKS = [
    {"name": "cifar10", "type": "classification", "image_size": 32, "batch_size": 16,
     "data": {"format": "imagefolder", "root": str(DATA / "cifar10"), "train": "train", "val": "test"}},
    {"name": "camvid", "type": "segmentation", "image_size": 64, "batch_size": 4, "max_val_samples": 8,
     "data": {"format": "mask_png", "root": str(DATA / "camvid"), "train": "train", "val": "val", "classes": CAMVID,
              "options": {"ignore_index": 11}}},
]
EXPECTED = {("cifar10", "train"): 50000, ("cifar10", "test"): 10000, ("camvid", "train"): 367, ("camvid", "val"): 101}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    for sub in ("cifar10", "camvid"):
        if not (DATA / sub).is_dir():
            pytest.skip(f"real dataset {DATA / sub} not available (set GPPF_DATA)")
    config = tmp_path_factory.mktemp("cfg") / "real.yaml"
    config.write_text(json.dumps({"tasks": TASKS}))
    out = tmp_path_factory.mktemp("shards")
    assert cli_main(["data", "pack", str(config), "--out", str(out), "--shard-size", "16", "--no-progress"]) == 0
    return out


def _shard_tasks(out: Path) -> list[dict]:
    tasks = []
    for t in TASKS:
        data = {k: v for k, v in t["data"].items() if k in ("train", "val")}
        tasks.append({**t, "data": {**data, "format": "shards", "root": str(out / t["name"])}})
    return tasks


def test_pack_keeps_every_sample_split_name_and_class(packed):
    for (task, split), count in EXPECTED.items():
        manifest = json.loads((packed / task / split / "manifest.json").read_text())
        assert manifest["count"] == count and manifest["skipped"] == 0
    assert len(json.loads((packed / "cifar10" / "train" / "manifest.json").read_text())["shards"]) > 1
    report = check_config(load_config(base={"tasks": _shard_tasks(packed)}), decode=200)
    assert [(r["task"], r["split"], r["samples"], r["classes"], r["problem_count"]) for r in report] == [
        ("cifar10", "train", 50000, 10, 0), ("cifar10", "val", 10000, 10, 0),
        ("camvid", "train", 367, 11, 0), ("camvid", "val", 101, 11, 0)]  # 'Unlabelled' is ignore_index
    for t, shard_t in zip(TASKS, _shard_tasks(packed)):
        cfgs = load_config(base={"tasks": [t, {**shard_t, "name": "packed"}]}).tasks
        src, got = (READERS.get(c.data.format)(c.data, split="val", task_type=c.type, on_bad_sample="error")
                    for c in cfgs)
        assert got.classes == src.classes
        for i in range(0, len(src), max(1, len(src) // 25)):
            (im_a, t_a), (im_b, t_b) = src[i], got[i]
            assert im_a.equal(im_b) and t_a.keys() == t_b.keys()
            for key in t_a:
                assert (t_a[key].equal(t_b[key]) if hasattr(t_a[key], "equal") else t_a[key] == t_b[key]), key


def test_train_on_real_shards_and_resume_exactly(packed, killed_and_resumed):
    base = {"model": {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.125},
            "tasks": _shard_tasks(packed),
            "train": {"steps": 5, "lr": 0.05, "warmup_steps": 1, "checkpoint_every": 2, "eval_every": 5,
                      "num_workers": 1, "progress": False, "amp": "none", "deterministic": True}}
    ref, got, metrics, resumed = killed_and_resumed(load_config(base=base), kill_at=3)
    assert 0.0 <= metrics["cifar10/top1"] <= 1.0 and 0.0 <= metrics["camvid/miou"] <= 1.0
    assert [got[s] for s in (3, 4, 5)] == [ref[s] for s in (3, 4, 5)]
    assert resumed == metrics
