"""Shared fixtures: fast deterministic CPU settings, paths to the optional real datasets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


def pytest_configure(config):
    """One intra-op thread per test process: on small shared CI machines oversubscribed oneDNN
    convolutions run an order of magnitude slower (measured ~100 ms vs 0.25 ms per conv)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
