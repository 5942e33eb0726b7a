"""Checkpoints: exact resume, atomic layout, keep-last-K, and refusal of unsafe or damaged files."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gppf.engine.checkpoint import (
    CheckpointError,
    capture_rng,
    find_latest,
    load_checkpoint,
    load_weights,
    restore_rng,
    save_checkpoint,
)
from gppf.engine.weighting import LossWeighting, build_weighting

TASKS = ["a", "b"]


@dataclass
class Run:
    model: nn.Module
    weighting: LossWeighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: torch.Generator


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _make_run(opt: str, sched: str, weighting: str, *, init_seed: int) -> Run:
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    options = {"window": 2} if weighting == "dwa" else {}
    weights = build_weighting(weighting, tasks=TASKS, static_weights={"a": 1.0, "b": 0.5}, **options)
    params = list(model.parameters()) + list(weights.parameters())
    if opt == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)
    if sched == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=8)
    elif sched == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step)
    return Run(model, weights, optimizer, scheduler, torch.Generator().manual_seed(init_seed + 1))


def _train(run: Run, steps: int) -> list[float]:
    """SIMT-like steps: per-task forward/backward, global + numpy + python + generator randomness."""
    totals = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=run.data)
        y = torch.randn(8, 2, generator=run.data)
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        run.optimizer.zero_grad()
        values = {}
        for i, task in enumerate(TASKS):
            loss = F.mse_loss(run.model(x)[:, i], y[:, i]) * scale
            run.weighting.weight(task, loss).backward()
            values[task] = loss.item()
        run.optimizer.step()
        run.scheduler.step()
        run.weighting.observe(values)
        totals.append(sum(values.values()))
    return totals


def _save(run: Run, run_dir: Path, step: int, *, keep_last: int = 3) -> Path:
    return save_checkpoint(
        run_dir,
        step=step,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        extra_modules={"weighting": run.weighting},
        state={"sampler": {"a": step * 8, "b": step * 8}, "note": "x"},
        rng=capture_rng(generators={"data": run.data}),
        keep_last=keep_last,
    )


@pytest.mark.parametrize(
    ("opt", "sched", "weighting"),
    [("sgd", "onecycle", "dwa"), ("adamw", "cosine", "uncertainty"), ("adamw", "lambda", "static")],
)
def test_resume_is_bitwise_identical(tmp_path: Path, opt: str, sched: str, weighting: str) -> None:
    _seed_all(0)
    ref = _make_run(opt, sched, weighting, init_seed=1)
    ref_losses = _train(ref, 6)

    _seed_all(0)
    first = _make_run(opt, sched, weighting, init_seed=1)
    losses = _train(first, 3)
    _save(first, tmp_path, 3)

    _seed_all(123)  # scramble every global RNG; fresh objects with different weights
    second = _make_run(opt, sched, weighting, init_seed=7)
    step, user, rng = load_checkpoint(
        find_latest(tmp_path),
        model=second.model,
        optimizer=second.optimizer,
        scheduler=second.scheduler,
        extra_modules={"weighting": second.weighting},
    )
    restore_rng(rng, generators={"data": second.data})
    losses += _train(second, 3)

    assert (step, user) == (3, {"sampler": {"a": 24, "b": 24}, "note": "x"})
    assert losses == ref_losses
    for (name, p), q in zip(ref.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert second.weighting.weights() == ref.weighting.weights()
    assert second.scheduler.state_dict() == ref.scheduler.state_dict()
    assert second.optimizer.state_dict()["param_groups"] == ref.optimizer.state_dict()["param_groups"]


def test_layout_is_safetensors_and_json(tmp_path: Path) -> None:
    run = _make_run("sgd", "onecycle", "uncertainty", init_seed=1)
    _train(run, 2)
    ckpt = _save(run, tmp_path, 2)
    assert ckpt == tmp_path / "checkpoints" / "step_000002"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
    ]
    doc = json.loads((ckpt / "state.json").read_text())
    assert doc["step"] == 2 and doc["version"] == 1
    assert doc["optimizer"]["param_groups"][0]["lr"] == run.optimizer.param_groups[0]["lr"]
    assert doc["scheduler"]["last_epoch"] == 2
    model_keys = set(load_file(ckpt / "model.safetensors"))
    assert {"model.0.weight", "extra.weighting.log_vars"} <= model_keys
    assert "state.0.momentum_buffer" in load_file(ckpt / "optimizer.safetensors")
    rng = load_file(ckpt / "rng.safetensors")
    assert {"torch", "numpy", "python", "generator.data"} <= set(rng)
    assert rng["torch"].dtype == torch.uint8
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_keep_last_and_leftover_tmp(tmp_path: Path) -> None:
    run = _make_run("adamw", "cosine", "static", init_seed=1)
    for step in range(1, 6):
        _save(run, tmp_path, step, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_000004", "step_000005"]

    leftover = root / "step_000009.tmp"  # a save killed half-way
    leftover.mkdir()
    (leftover / "state.json").write_text("{")
    assert find_latest(tmp_path) == root / "step_000005"
    (root / "latest").unlink()
    assert find_latest(tmp_path) == root / "step_000005"

    _save(run, tmp_path, 6, keep_last=2)
    assert not leftover.exists()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_000005", "step_000006"]
    assert find_latest(tmp_path / "elsewhere") is None


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    run = _make_run("sgd", "lambda", "static", init_seed=1)
    _save(run, tmp_path, 4)
    _train(run, 1)
    ckpt = _save(run, tmp_path, 4)
    fresh = _make_run("sgd", "lambda", "static", init_seed=5)
    load_checkpoint(ckpt, model=fresh.model, extra_modules={"weighting": fresh.weighting})
    assert torch.equal(fresh.model[0].weight, run.model[0].weight)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["latest", "step_000004"]


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    run = _make_run("sgd", "lambda", "static", init_seed=1)
    ckpt = _save(run, tmp_path, 1)
    with pytest.raises(CheckpointError, match="extra modules"):
        load_checkpoint(ckpt, model=run.model)
    with pytest.raises(CheckpointError, match="'model' does not match"):
        load_checkpoint(ckpt, model=nn.Linear(4, 2), extra_modules={"weighting": run.weighting})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, step=2, model=run.model, optimizer=run.optimizer, state={"x": object()})
    (ckpt / "evil.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match=r"evil\.pkl: refused"):
        load_checkpoint(ckpt, model=run.model, extra_modules={"weighting": run.weighting})


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_truncated_safetensors_refused(tmp_path: Path, name: str) -> None:
    run = _make_run("adamw", "cosine", "static", init_seed=1)
    _train(run, 1)
    ckpt = _save(run, tmp_path, 1)
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{name}: corrupt or truncated safetensors"):
        load_checkpoint(ckpt, model=run.model, optimizer=run.optimizer, extra_modules={"weighting": run.weighting})


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class Plain:
    """A custom class: unpickling it needs arbitrary globals."""

    def __init__(self) -> None:
        self.value = 3


class Payload:
    """A malicious pickle payload: unpickling it calls ``_touch``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_touch, (self.path,))


@pytest.mark.parametrize("kind", ["plain", "payload"])
def test_pickled_objects_are_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    bad = tmp_path / "weights.pt"
    obj = Plain() if kind == "plain" else Payload(str(marker))
    torch.save({"w": torch.ones(2), "extra": obj}, bad)
    with pytest.raises(CheckpointError) as info:
        load_weights(bad)
    message = str(info.value)
    assert str(bad) in message and "pickle payload" in message and "safetensors" in message
    assert not marker.exists()


def test_load_weights_reads_safe_formats(tmp_path: Path) -> None:
    sd = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pt")
    save_file(sd, tmp_path / "w.safetensors")
    for name in ("plain.pth", "wrapped.pt", "w.safetensors"):
        got = load_weights(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"w\.npz: unsupported weight file type"):
        load_weights(tmp_path / "w.npz")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: corrupt or truncated"):
        load_weights(tmp_path / "cut.safetensors")


def test_load_weights_from_checkpoint_dir(tmp_path: Path) -> None:
    run = _make_run("sgd", "lambda", "static", init_seed=1)
    ckpt = _save(run, tmp_path, 1)
    got = load_weights(ckpt)
    assert got.keys() == run.model.state_dict().keys()
    assert torch.equal(got["3.bias"], run.model[3].bias)


def test_rng_roundtrip() -> None:
    gen = torch.Generator().manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's

    def draw() -> list[float]:
        return [
            torch.rand(1).item(), torch.rand(1, generator=gen).item(),
            float(np.random.standard_normal()), random.gauss(0, 1), random.random(),
        ]

    states = capture_rng(generators={"g": gen})
    first = draw()
    _seed_all(99)
    gen.manual_seed(99)
    restore_rng(states, generators={"g": gen})
    assert draw() == first
    with pytest.raises(CheckpointError, match=r"generator\.other"):
        restore_rng(states, generators={"other": torch.Generator()})


@pytest.mark.cuda
def test_cuda_roundtrip(tmp_path: Path) -> None:
    dev = torch.device("cuda")
    model = nn.Linear(4, 2).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4, device=dev)).sum().backward()
    opt.step()
    ckpt = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, rng=capture_rng())
    expected = torch.rand(3, device=dev)
    fresh = nn.Linear(4, 2).to(dev)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    _, _, rng = load_checkpoint(ckpt, model=fresh, optimizer=fresh_opt)
    restore_rng(rng)
    assert "cuda.0" in rng
    assert torch.equal(torch.rand(3, device=dev), expected)
    assert torch.equal(fresh.weight, model.weight)
    restored, original = fresh_opt.state_dict()["state"][0], opt.state_dict()["state"][0]
    assert restored["exp_avg"].device.type == "cuda"
    assert torch.equal(restored["exp_avg"], original["exp_avg"])
