"""The trainer with LegoSGD: equal to plain SGD; reading, evaluating and checkpointing never change weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gppf.config import load_config
from gppf.engine import checkpoint as ckpt
from gppf.engine.trainer import Run, TrainError, build_run, evaluate, save


def _run(tmp_path: Path, lazy: str, router: str = "fixed") -> Run:
    """Tiny two-task run; ``router``: ``fixed`` routes (lego 4 never used), or learned ``gumbel`` routes."""
    task = lambda name, domain: {  # noqa: E731
        "name": name, "type": "classification", "batch_size": 4, "image_size": 32, "augment": False,
        "data": {"format": "synthetic", "options": {"domain": domain, "size": 32, "num_train": 16, "num_val": 8}},
    }
    tasks = [task("a", "flat"), task("b", "textured")]
    if router == "fixed":
        tasks = [tasks[0] | {"route": [[0, 1]] * 8}, tasks[1] | {"route": [[1, 3]] * 8}]
    cfg = load_config(base={
        "model": {"backbone": "gppf_r18", "legos": 5, "active": 2, "width_mult": 0.125,
                  "router": {"mode": "gumbel" if router == "gumbel" else "topk_st"}},
        "tasks": tasks,
        "train": {"steps": 3, "amp": "none", "channels_last": False, "progress": False, "warmup_steps": 0,
                  "checkpoint_every": 0, "grad_clip": 0.0, "weight_decay": 0.05, "lazy_legos": lazy,
                  "threads": 1},
    })
    return build_run(cfg, run_dir=tmp_path / f"{lazy}_{router}", resume=False)


@pytest.mark.parametrize("router", ["fixed", "gumbel"])
def test_lazy_run_equals_plain_sgd(tmp_path: Path, router: str) -> None:
    """Routes drawn up front (Gumbel noise included) are the routes the forward runs and LegoSGD prepares."""
    results = {}
    for lazy in ("on", "off"):  # one after the other: each run draws the same Gumbel noise from its seed
        run = _run(tmp_path, lazy, router)
        assert bool(run.optimizer.lazy_params) == (lazy == "on")
        losses = [run.step_fn(step).loss for step in range(3)]
        assert run.optimizer.pending == (lazy == "on")
        save(run, 3)
        results[lazy] = (losses, dict(run.model.named_parameters()))
    assert results["on"][0] == pytest.approx(results["off"][0], rel=1e-5)
    for n, p in results["off"][1].items():
        torch.testing.assert_close(results["on"][1][n], p, atol=1e-6, rtol=1e-5, msg=n)


def _params(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters()}


def _unchanged(run: Run, before: dict[str, torch.Tensor]) -> None:
    for n, p in run.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"


def test_reading_evaluating_and_checkpointing_change_no_weight(tmp_path: Path) -> None:
    run = _run(tmp_path, "on")
    for step in range(3):
        run.step_fn(step)
    assert run.optimizer.pending  # lego 4 has deferred weight decay and momentum
    before = _params(run)
    run.model.state_dict()
    run.model.eval()
    with torch.no_grad():
        run.model(torch.randn(2, 3, 32, 32), "a")
    run.model.train()
    with pytest.raises(TrainError, match="settle"):
        evaluate(run)
    with pytest.raises(RuntimeError, match="flush"):
        run.optimizer.state_dict()
    _unchanged(run, before)

    save(run, 3)  # settles (flush) on every rank, then writes
    assert not run.optimizer.pending
    w = run.model.backbone.blocks[0].lego_width
    unused = run.model.backbone.blocks[0].conv1.weight[4 * w:]  # lego 4's rows
    assert not torch.equal(unused, before["backbone.layer1.0.conv1.weight"][4 * w:])  # they were behind
    settled = _params(run)
    evaluate(run)
    ckpt.save_checkpoint(run.run_dir, step=4, model=run.model, optimizer=run.optimizer,
                         scheduler=run.scheduler, state={}, rng=ckpt.capture_rng())
    _unchanged(run, settled)
