"""Training on packed shards: the stream resumes exactly (same loss sequence as an uninterrupted run)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gppf.config import load_config
from gppf.data.pack import pack_config
from gppf.engine.trainer import train
from tests.conftest import train_losses


def _synth(domain: str) -> dict:
    return {"format": "synthetic", "options": {"domain": domain, "size": 32, "num_train": 40, "num_val": 8}}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """A tiny two-task config packed into several shards per split."""
    tasks = [{"name": "cls", "type": "classification", "data": _synth("flat")},
             {"name": "seg", "type": "segmentation", "data": _synth("noisy")}]
    out = tmp_path_factory.mktemp("shards")
    pack_config(load_config(base={"tasks": tasks}), out=out, shard_mb=0.02, show_progress=False)
    return out


def shard_cfg(packed: Path, *, steps: int, extra: list[str]):
    def data(name: str) -> dict:
        return {"format": "shards", "root": str(packed / name), "options": {"shuffle_buffer": 8}}

    base = {
        "model": {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.125},
        "tasks": [
            {"name": "cls", "type": "classification", "batch_size": 8, "image_size": 32, "data": data("cls")},
            {"name": "seg", "type": "segmentation", "batch_size": 4, "image_size": 32, "data": data("seg")},
        ],
        "train": {"steps": steps, "lr": 0.05, "warmup_steps": 2, "checkpoint_every": 3, "eval_every": 0,
                  "progress": False, "amp": "none", "channels_last": False, "deterministic": True},
    }
    return load_config(base=base, overrides=extra)


def test_resume_on_shards_gives_identical_loss_sequence(packed, killed_and_resumed):
    """Two loader workers (the in-process stream's resume is tested in tests/data/test_shards.py)."""
    # 40 samples, batch 8: crosses an epoch; global-RNG consumers (Gumbel routing, dropout) as in test_resume
    cfg = shard_cfg(packed, steps=6, extra=["train.num_workers=2", "model.router.mode=gumbel",
                                            "tasks.cls.head.dropout=0.3", "train.eval_every=2"])
    ref, got, full, resumed = killed_and_resumed(cfg, kill_at=4)  # checkpoint at 3: an odd worker offset
    assert sorted(ref) == list(range(1, 7))
    for step in range(4, 7):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    assert resumed == full


def test_builtin_recipe_packs_and_trains_from_shards(tmp_path):
    """``gppf data pack default`` -> ``format: shards`` for all six tasks -> train; re-id (P x K sampling)
    reads its shards map-style, every other task streams them."""
    from gppf.cli import main as cli_main
    from gppf.config import default_config_path
    from gppf.tasks import TASK_TYPES

    recipe = load_config(default_config_path())
    small = [f"tasks.{i}.data.options.{k}={v}" for i in range(6) for k, v in (("num_train", 24), ("num_val", 8))]
    small += ["tasks.5.data.options.num_identities=10", "tasks.5.data.options.num_val=20"]
    assert cli_main(["data", "pack", "default", "--out", str(tmp_path / "packed"), "--no-progress", *small]) == 0
    tasks = [{"name": t.name, "type": t.type, "batch_size": 8, "image_size": 32, "max_val_samples": 8,
              "data": {"format": "shards", "root": str(tmp_path / "packed" / t.name)}} for t in recipe.tasks]
    cfg = load_config(base={"model": {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.125},
                            "tasks": tasks, "train": {"steps": 2, "eval_every": 2, "checkpoint_every": 0,
                                                      "progress": False, "amp": "none"}})
    metrics = train(cfg, run_dir=tmp_path / "run")
    for t in recipe.tasks:
        key = f"{t.name}/{TASK_TYPES.get(t.type).primary_metric}"
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2] and all(len(v) > 1 for v in losses.values())
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/state.json")).read_text())
    positions = state["user"]["positions"]["0"]  # which stream each task used, by its saved position
    assert {n: p.get("format", "map") for n, p in positions.items()} == {
        **{t.name: "shards" for t in recipe.tasks[:5]}, recipe.tasks[5].name: "map"}
