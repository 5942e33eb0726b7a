"""Smoke test of ``gppf bench lego``: quick sizes, JSON keys, positive finite ratios; memory probe."""
from __future__ import annotations

import json
import math

import torch

from gppf.bench.common import peak_alloc_bytes
from gppf.bench.lego import GOALS, main_lego


def test_peak_alloc_bytes_counts_a_known_allocation():
    def region() -> None:
        a = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB, live while b is allocated
        b = torch.empty(500_000, dtype=torch.float32)  # 2 MB
        del a, b
        c = torch.empty(250_000, dtype=torch.float32)  # 1 MB after both are freed
        del c

    assert peak_alloc_bytes(region) == 6_000_000


def test_peak_alloc_bytes_ignores_memory_from_before_the_region():
    held = [torch.ones(2_000_000)]  # 8 MB allocated before the region and freed inside it

    def region() -> None:
        small = torch.empty(250_000, dtype=torch.float32)  # +1 MB
        held.clear()  # not seen: the profiler does not know the size of a block older than itself
        again = torch.empty(500_000, dtype=torch.float32)  # +2 MB: peak 3 MB
        del small, again

    assert peak_alloc_bytes(region) == 3_000_000
    assert peak_alloc_bytes(lambda: None) == 0


def test_bench_lego_quick_json(capsys):
    assert main_lego(["--quick", "--json", "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1, "exactly one JSON object on stdout"
    result = json.loads(out)
    for key in GOALS:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0
    assert set(result["goals"]) == set(result["meets_goals"]) == set(GOALS)
    assert all(isinstance(v, bool) for v in result["meets_goals"].values())
    for key in ("median_step_s", "step_act_peak_bytes"):
        assert set(result[key]) == {"dense", "routed_large", "routed_small"}
        assert all(v > 0 for v in result[key].values())
    for phases in result["median_phase_s"].values():
        assert list(phases) == ["zero_grad", "forward", "backward", "optimizer"]
        assert all(v >= 0 for v in phases.values())
    assert set(result["median_phase_s"]) == {"dense", "routed_large", "routed_small"}
    cfg = result["config"]
    assert (cfg["batch"], cfg["image_size"], cfg["threads"], cfg["quick"]) == (2, 64, 1, True)
    assert cfg["torch"] == torch.__version__ and "bfloat16" in cfg["dtype"]
    assert "set_to_none=False" in cfg["zero_grad"]
