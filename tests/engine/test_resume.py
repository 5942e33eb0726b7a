"""A killed run resumes from its last checkpoint and continues exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gppf.engine import simt
from gppf.engine.trainer import TrainError, train




def _train_losses(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith("loss")}
    return out


class Killed(Exception):
    pass


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
def test_resume_after_kill_gives_identical_loss_sequence(tmp_path, monkeypatch, extra, tiny_cfg):
    cfg = tiny_cfg(steps=6, extra=extra)
    full = train(cfg, run_dir=tmp_path / "full")
    ref = _train_losses(tmp_path / "full")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]

    original = simt.SIMTStep.__call__

    def dies_at_step_4(self, step):
        if step == 4:  # 0-based: steps 1..4 done, checkpoint at 3 exists
            raise Killed()
        return original(self, step)

    monkeypatch.setattr(simt.SIMTStep, "__call__", dies_at_step_4)
    with pytest.raises(Killed):
        train(cfg, run_dir=tmp_path / "killed")
    monkeypatch.setattr(simt.SIMTStep, "__call__", original)
    assert (tmp_path / "killed" / "checkpoints" / "step_000003").is_dir()
    resumed_metrics = train(cfg, run_dir=tmp_path / "killed", resume=True)
    got = _train_losses(tmp_path / "killed")
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
