"""Engine test fixtures."""
from __future__ import annotations

from gppf.config import RunConfig, load_config


def tiny_run_config(*, steps: int = 6, extra: list[str] | None = None) -> RunConfig:
    def synth(domain: str, size: int = 32) -> dict:
        return {"format": "synthetic", "options": {"domain": domain, "size": size, "num_train": 48, "num_val": 16}}

    base = {
        "model": {"backbone": "gppf_r18", "legos": 4, "active": 2, "width_mult": 0.125},
        "tasks": [
            {"name": "cls", "type": "classification", "batch_size": 8, "image_size": 32, "data": synth("flat")},
            {"name": "seg", "type": "segmentation", "batch_size": 4, "image_size": 32, "data": synth("noisy")},
        ],
        "train": {"steps": steps, "lr": 0.05, "warmup_steps": 2, "checkpoint_every": 3, "eval_every": 0,
                  "progress": False, "amp": "none", "channels_last": False, "deterministic": True},
    }
    return load_config(base=base, overrides=extra or [])


import pytest


@pytest.fixture
def tiny_cfg():
    """Factory: ``tiny_cfg(steps=6, extra=[...])`` -> RunConfig of a tiny two-task run."""
    return tiny_run_config
