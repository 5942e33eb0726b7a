"""Shared fixtures: fast deterministic CPU settings, paths to the optional real datasets."""
from __future__ import annotations

import os
from pathlib import Path

# As the ``gppf`` command does: passive OpenMP waiting, set before torch loads (also for subprocesses).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from gppf.config import RunConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


def shared_data_root() -> Path | None:
    """``$GPPF_DATA`` or ``<repo>/../shared/data``; None when absent."""
    env = os.environ.get("GPPF_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root if root.is_dir() else None


@pytest.fixture
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real datasets not found (set GPPF_DATA or provide ../shared/data)")
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip cleanly on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no CUDA device here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """One intra-op thread per test process: on small shared CI machines oversubscribed oneDNN
    convolutions run an order of magnitude slower (measured ~100 ms vs 0.25 ms per conv)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)





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



@pytest.fixture
def tiny_cfg():
    """Factory: ``tiny_cfg(steps=6, extra=[...])`` -> RunConfig of a tiny two-task run."""
    return tiny_run_config


def train_losses(run_dir: Path) -> dict[int, dict]:
    """``{step: {loss keys: values}}`` from a run's ``metrics.jsonl``."""
    import json

    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in recs if r["kind"] == "train"}


@pytest.fixture
def killed_and_resumed(tmp_path, monkeypatch):
    """Factory: ``killed_and_resumed(cfg, kill_at)`` trains ``cfg`` uninterrupted into ``tmp_path/full``,
    then into ``tmp_path/killed`` dying at 0-based step ``kill_at`` and resumed from its last checkpoint.
    Returns ``(full losses, resumed-run losses, full metrics, resumed metrics)``."""
    from gppf.engine import simt
    from gppf.engine.trainer import train

    class Killed(Exception):
        pass

    def run(cfg: RunConfig, kill_at: int) -> tuple[dict, dict, dict, dict]:
        full = train(cfg, run_dir=tmp_path / "full")
        original = simt.SIMTStep.__call__

        def dies(self, step):
            if step == kill_at:
                raise Killed()
            return original(self, step)

        monkeypatch.setattr(simt.SIMTStep, "__call__", dies)
        with pytest.raises(Killed):
            train(cfg, run_dir=tmp_path / "killed")
        monkeypatch.setattr(simt.SIMTStep, "__call__", original)
        resumed = train(cfg, run_dir=tmp_path / "killed", resume=True)
        return train_losses(tmp_path / "full"), train_losses(tmp_path / "killed"), full, resumed

    return run
