"""A tiny pre-trained run with every built-in task type, shared by the transfer tests (trained once)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gppf.config import RunConfig, load_config

TASK_TYPES = ("classification", "multilabel", "detection", "segmentation", "keypoints", "reid")
DOMAINS = {"classification": "flat", "multilabel": "pastel", "detection": "pastel", "segmentation": "noisy",
           "keypoints": "night", "reid": "mixed"}


def all_types_config(*, steps: int = 4, extra: list[str] | None = None) -> RunConfig:
    """Six tasks, one per built-in type, 32 px, a narrow gppf_r18 (legos 4, active 2)."""
    tasks = []
    for kind in TASK_TYPES:
        options = {"domain": DOMAINS[kind], "size": 32, "num_train": 64, "num_val": 16}
        if kind == "reid":
            options["num_identities"] = 16
        tasks.append({"name": kind, "type": kind, "batch_size": 8, "image_size": 32, "augment": False,
                      "data": {"format": "synthetic", "options": options}})
    base = {
        "model": {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.125},
        "tasks": tasks,
        "train": {"steps": steps, "lr": 0.05, "warmup_steps": 1, "checkpoint_every": steps, "eval_every": 0,
                  "progress": False, "amp": "none", "channels_last": False, "deterministic": True,
                  "num_workers": 0},
    }
    return load_config(base=base, overrides=extra or [])


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a finished 4-step run of ``all_types_config()`` (checkpoint, tasks.json, routes)."""
    from gppf.engine.trainer import train

    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    train(all_types_config(), run_dir=run_dir)
    return run_dir
