"""Training logs route churn, k/(k+1) logit margins and router gradient ratios; frozen routes never churn."""
from __future__ import annotations

import json

import pytest

from gppf.engine.trainer import train


def _records(run_dir, kind):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


def test_router_records_churn_margins_and_freeze(tmp_path, tiny_cfg):
    cfg = tiny_cfg(steps=10, extra=["train.log_every=2", "train.checkpoint_every=0", "model.router.search_until=0.3",
                                    "model.router.freeze_at=0.6", "model.router.mi_weight=0.1",
                                    "model.router.balance_weight=0.05"])
    train(cfg, run_dir=tmp_path)
    router = _records(tmp_path, "router")
    assert [r["step"] for r in router] == [0, 2, 4, 6, 8, 10]
    assert "churn" not in router[0] and all(0.0 <= r["churn"] <= 1.0 for r in router[1:])
    assert set(router[0]["routes"]) == {"cls", "seg"} and "margin/cls" in router[0]
    frozen = [r for r in router if r["frozen"]]
    assert [r["step"] for r in frozen] == [6, 8, 10]  # freeze_at 0.6 of 10 steps: frozen from step 6
    assert all(r["churn"] == 0.0 and r["routes"] == frozen[0]["routes"] for r in frozen[1:])
    assert router[-1]["routes"] == json.loads((tmp_path / "routes.json").read_text())
    steps = {r["step"]: r for r in _records(tmp_path, "train")}
    assert steps[1]["router_grad/task"] == 0.0  # zero-initialised residual branches: no gradient yet
    for s in (2, 3, 4, 5, 6):  # learning: aux gradients are the configured fraction of the task gradient
        assert steps[s]["router_grad/task"] > 0
        assert steps[s]["router_grad/router_mi/rel"] == pytest.approx(0.1, rel=1e-3)
        assert steps[s]["router_grad/router_balance/rel"] == pytest.approx(0.05, rel=1e-3)
    assert steps[7]["router_grad/task"] == 0.0 and "router_grad/router_mi/rel" not in steps[7]  # frozen
