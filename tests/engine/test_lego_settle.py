"""The trainer with LegoSGD: equal to plain SGD; reading, evaluating and checkpointing never change weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gppf.config import load_config
from gppf.engine import checkpoint as ckpt
from gppf.engine.trainer import Run, TrainError, build_run, evaluate, save


def _run(tmp_path: Path, lazy: str) -> Run:
    task = lambda name, domain: {  # noqa: E731
        "name": name, "type": "classification", "batch_size": 4, "image_size": 32, "augment": False,
        "data": {"format": "synthetic", "options": {"domain": domain, "size": 32, "num_train": 16, "num_val": 8}},
    }
    cfg = load_config(base={
        "model": {"backbone": "gppf_r18", "legos": 5, "active": 2, "width_mult": 0.125},  # lego 4: never used
        "tasks": [task("a", "flat") | {"route": [[0, 1]] * 8}, task("b", "textured") | {"route": [[1, 3]] * 8}],
        "train": {"steps": 3, "amp": "none", "channels_last": False, "progress": False, "warmup_steps": 0,
                  "checkpoint_every": 0, "grad_clip": 0.0, "weight_decay": 0.05, "lazy_legos": lazy,
                  "threads": 1},
    })
    return build_run(cfg, run_dir=tmp_path / lazy, resume=False)


def _params(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters()}


def _unchanged(run: Run, before: dict[str, torch.Tensor]) -> None:
    for n, p in run.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"


def test_lazy_run_equals_plain_sgd_and_reads_change_nothing(tmp_path: Path) -> None:
    lazy, plain = _run(tmp_path, "on"), _run(tmp_path, "off")
    assert lazy.optimizer.lazy_params and not plain.optimizer.lazy_params
    for step in range(3):
        got, ref = lazy.step_fn(step), plain.step_fn(step)
        assert got.loss == pytest.approx(ref.loss, rel=1e-5)  # the forward reads prepared, current rows
    assert lazy.optimizer.pending  # lego 4 has deferred weight decay and momentum
    before = _params(lazy)
    lazy.model.state_dict()
    lazy.model.eval()
    with torch.no_grad():
        lazy.model(torch.randn(2, 3, 32, 32), "a")
    lazy.model.train()
    with pytest.raises(TrainError, match="settle"):
        evaluate(lazy)
    with pytest.raises(RuntimeError, match="flush"):
        lazy.optimizer.state_dict()
    _unchanged(lazy, before)

    save(lazy, 3)  # settles (flush) on every rank, then writes
    assert not lazy.optimizer.pending
    w = lazy.model.backbone.blocks[0].lego_width
    unused = lazy.model.backbone.blocks[0].conv1.weight[4 * w:]  # lego 4's rows
    assert not torch.equal(unused, before["backbone.layer1.0.conv1.weight"][4 * w:])  # they were behind
    for n, p in plain.model.named_parameters():
        torch.testing.assert_close(dict(lazy.model.named_parameters())[n], p, atol=1e-6, rtol=1e-5, msg=n)
    settled = _params(lazy)
    evaluate(lazy)
    ckpt.save_checkpoint(lazy.run_dir, step=4, model=lazy.model, optimizer=lazy.optimizer,
                         scheduler=lazy.scheduler, state={}, rng=ckpt.capture_rng())
    _unchanged(lazy, settled)
