"""``load_pretrained`` rebuilds a run from its directory alone and gives the trained model's outputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from gppf.transfer.pretrained import PretrainedError, load_pretrained, read_task_specs
from tests.transfer.conftest import TASK_TYPES


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    return [t for v in out for t in _flat(v)]


def test_specs_record_head_arguments(pretrained_run):
    specs = read_task_specs(pretrained_run)
    assert sorted(specs) == sorted(TASK_TYPES)
    assert specs["classification"].num_classes == len(specs["classification"].classes) > 1
    assert specs["keypoints"].head_args["num_keypoints"] > 0
    assert specs["detection"].image_size == 32 and len(specs["detection"].mean) == 3


def test_outputs_equal_the_training_build(pretrained_run):
    from gppf.config import load_config
    from gppf.engine.trainer import build_run

    loaded = load_pretrained(pretrained_run)
    run = build_run(load_config(pretrained_run / "config.yaml"), run_dir=pretrained_run, resume=True)
    run.model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for task in TASK_TYPES:
            ref, got = _flat(run.model(x, task)), _flat(loaded.model(x, task))
            assert len(ref) == len(got) > 0
            for a, b in zip(ref, got):
                assert torch.equal(a, b), task


def test_missing_files_are_named(pretrained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(pretrained_run, copy)
    (copy / "tasks.json").unlink()
    with pytest.raises(PretrainedError, match="tasks.json"):
        load_pretrained(copy)
    (copy / "tasks.json").write_text(json.dumps({"classification": {"type": "classification"}}))
    with pytest.raises(PretrainedError, match="tasks.json"):
        load_pretrained(copy)
