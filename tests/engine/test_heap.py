"""The trainer and the benchmarks keep the long-lived objects out of garbage collection while they step."""
from __future__ import annotations

import gc

from gppf.bench.common import interleaved_times
from gppf.engine import simt
from gppf.engine.heap import long_lived_frozen
from gppf.engine.trainer import train


def test_objects_alive_at_entry_are_frozen_and_released_after() -> None:
    assert gc.get_freeze_count() == 0
    with long_lived_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the modules and objects of this process
        with long_lived_frozen():  # nested: the enclosing block keeps them frozen
            assert gc.get_freeze_count() >= frozen
        assert gc.get_freeze_count() >= frozen
        garbage = [[]]
        garbage[0].append(garbage)  # a cycle made inside is still collected
        del garbage
        assert gc.collect() > 0
    assert gc.get_freeze_count() == 0


def test_training_steps_and_bench_rounds_run_frozen(tmp_path, tiny_cfg, monkeypatch) -> None:
    seen: list[int] = []
    original = simt.SIMTStep.__call__

    def step(self, n):
        seen.append(gc.get_freeze_count())
        return original(self, n)

    monkeypatch.setattr(simt.SIMTStep, "__call__", step)
    train(tiny_cfg(steps=2, extra=["train.num_workers=0"]), run_dir=tmp_path)
    assert len(seen) == 2 and min(seen) > 1000
    assert gc.get_freeze_count() == 0
    rounds: list[int] = []
    interleaved_times({"a": lambda: rounds.append(gc.get_freeze_count())}, repeats=2, warmup=1)
    assert len(rounds) == 3 and min(rounds) > 1000 and gc.get_freeze_count() == 0
