"""``--resume auto`` and torchrun-restart detection: continue only a run of the same config."""
from __future__ import annotations

import json

import pytest

from gppf import cli
from gppf.config import save_config
from gppf.engine.trainer import TrainError, can_resume, train


def _train_steps(run_dir) -> list[int]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"]


def test_can_resume_only_a_complete_checkpoint_of_the_same_config(tmp_path, tiny_cfg):
    cfg = tiny_cfg(steps=3)
    assert can_resume(cfg, tmp_path / "run") is False  # nothing there: start afresh
    train(cfg, run_dir=tmp_path / "run")
    assert can_resume(cfg, tmp_path / "run") is True
    with pytest.raises(TrainError, match=r"another config \(config.yaml differs\)"):
        can_resume(tiny_cfg(steps=3, extra=["train.lr=0.2"]), tmp_path / "run")
    half = tmp_path / "half"  # a job killed while writing its first checkpoint left only a .tmp folder
    (half / "checkpoints" / "step_000003.tmp").mkdir(parents=True)
    (half / "checkpoints" / "step_000003.tmp" / "model.safetensors").write_bytes(b"\x00" * 5)
    assert can_resume(cfg, half) is False


def test_elastic_job_continues_its_checkpoints(tmp_path, tiny_cfg, monkeypatch):
    cfg = tiny_cfg(steps=3)
    train(cfg, run_dir=tmp_path)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    more = tiny_cfg(steps=3)  # the same config: continue (here: nothing left to train)
    train(more, run_dir=tmp_path)
    assert _train_steps(tmp_path) == [1, 2, 3]
    warnings = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "warning" and r["message"].endswith("resumed from step 3") for r in warnings)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # relaunch on the shared store: named
    with pytest.raises(TrainError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        train(more, run_dir=tmp_path)


def test_cli_resume_auto_starts_afresh_and_refuses_another_config(tmp_path, tiny_cfg):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_cfg(steps=3, extra=["train.checkpoint_every=2"]), config)
    out = tmp_path / "run"
    assert cli.main(["pretrain", "--config", str(config), "--out", str(out), "--resume", "auto"]) == 0
    assert _train_steps(out) == [1, 2, 3]
    assert cli.main(["pretrain", "--config", str(config), "--out", str(out), "--resume", "auto",
                     "train.steps=5"]) == 1  # another config: refused, nothing appended
    assert _train_steps(out) == [1, 2, 3]
