"""A killed run resumes from its last checkpoint and continues exactly."""
from __future__ import annotations

import pytest

from gppf.engine.trainer import TrainError, train


@pytest.mark.parametrize(
    "extra",
    [
        ["train.num_workers=0"],
        # the default recipe's layout: checkpoints hold contiguous momentum buffers of channels_last weights
        ["train.num_workers=0", "train.channels_last=true"],
        # global-RNG consumers (Gumbel routing noise, dropout) and a loader worker process
        ["train.num_workers=1", "model.router.mode=gumbel", "tasks.cls.head.dropout=0.3", "train.eval_every=2"],
    ],
    ids=["plain", "channels-last", "gumbel-dropout-worker"],
)
def test_resume_after_kill_gives_identical_loss_sequence(tmp_path, extra, tiny_cfg, killed_and_resumed):
    # dies at 0-based step 4: steps 1..4 done, the checkpoint at step 3 exists
    ref, got, full, resumed_metrics = killed_and_resumed(tiny_cfg(steps=6, extra=extra), kill_at=4)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "killed" / "checkpoints" / "step_000003").is_dir()
    for step in (4, 5, 6):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    assert resumed_metrics == full


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_cfg):
    with pytest.raises(TrainError, match="no checkpoint found"):
        train(tiny_cfg(steps=1), run_dir=tmp_path / "empty", resume=True)


def test_fresh_run_into_a_dir_with_checkpoints_is_refused(tmp_path, tiny_cfg):
    train(tiny_cfg(steps=3), run_dir=tmp_path)
    with pytest.raises(TrainError, match="already holds checkpoints.*--resume"):
        train(tiny_cfg(steps=3), run_dir=tmp_path)
