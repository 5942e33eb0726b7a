"""The trainer and the benchmarks keep the long-lived objects out of garbage collection while they step;
the ``gppf`` command keeps freed memory in the C allocator's heap for reuse."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gppf.bench.common import interleaved_times
from gppf.engine import simt
from gppf.engine.heap import _USER_SETTINGS, OPT_OUT, keep_freed_memory, long_lived_frozen
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


# Allocates and frees a 64 MiB tensor (and a small one after it) eight times; prints the page faults of
# the last three allocations, each of which touches all of its 16 k pages. (glibc's aligned allocation
# asks for a little more than a freed block of the same size, so reuse sets in after a few rounds.)
_FAULTS = """
import resource, sys
import torch
if sys.argv[1] == "cli":
    from gppf.cli import set_process_defaults
    set_process_defaults()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(8):
    if i == 5:
        f0 = faults()
    x, y = torch.ones(16 * 2**20), torch.ones(1000); del x, y
print(faults() - f0)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in _USER_SETTINGS and k != OPT_OUT}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _thp_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="glibc's malloc only")
def test_gppf_command_reuses_freed_large_blocks_without_page_faults() -> None:
    kept = _faults("cli")
    assert kept < 2_000, kept  # the freed block is reused: its pages are already mapped
    if not _thp_always():  # control: glibc's default unmaps and faults in 3 x 16 k pages again
        assert _faults("none") > 30_000


def test_explicit_allocator_settings_win() -> None:
    # each returns before touching this process's allocator
    assert not keep_freed_memory({OPT_OUT: "0"})
    assert not keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert not keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert not keep_freed_memory({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
