"""``train.amp``: auto picks bf16 only where the device computes it natively; the run records it."""
from __future__ import annotations

import json

import pytest
import torch

from gppf.engine import amp as amp_mod
from gppf.engine.amp import native_bf16, resolve_amp
from gppf.engine.trainer import train


def test_forced_modes_and_unknown_mode():
    cpu = torch.device("cpu")
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("none", cpu) is None
    with pytest.raises(ValueError, match="train.amp"):
        resolve_amp("fp16", cpu)


def test_auto_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(amp_mod, "native_bf16", lambda device: True)
    assert resolve_amp("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(amp_mod, "native_bf16", lambda device: False)
    assert resolve_amp("auto", cpu) is None


def test_cpu_probe_is_the_mkldnn_op():
    """Pins the probe (``torch.ops.mkldnn._is_mkldnn_bf16_supported``): fails on a torch without it."""
    expected = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert native_bf16(torch.device("cpu")) is expected
    assert native_bf16(torch.device("meta")) is False


def test_run_records_the_resolved_precision(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(amp_mod, "native_bf16", lambda device: False)
    train(tiny_cfg(steps=1, extra=["train.amp=auto", "train.checkpoint_every=0"]), run_dir=tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    run = [r for r in recs if r["kind"] == "run"]
    assert run == [{"kind": "run", "step": 0, "device": "cpu", "world": 1, "amp_setting": "auto",
                    "autocast": "float32 (off)"}]
