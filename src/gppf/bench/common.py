"""Shared benchmark helpers: fixed threads, interleaved timing, allocator-level peak memory, output.

Benchmarks measure every variant in one process, interleaved (A B C A B C ...) after warm-up, with a
fixed thread count, and report medians and ratios: the machines are shared and noisy, so single
absolute times mean little.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import time
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from gppf.engine.heap import long_lived_frozen


def _cuda_wall() -> float:
    """Wall time once the CUDA queue has drained (a timed region ends when its kernels do)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_parser(name: str, doc: str | None, *, quick: str, config: bool = False) -> argparse.ArgumentParser:
    """The parser of ``gppf bench <name>`` with the options every benchmark shares: ``--json``, ``--quick``
    (``quick``: what it does) and, with ``config``, ``--config``."""
    p = argparse.ArgumentParser(prog=f"gppf bench {name}", description=(doc or "").split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quick", action="store_true", help=quick)
    if config:
        p.add_argument("--config", help="run config YAML (default: the built-in six-task recipe)")
    return p


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU time of this process: with one compute thread, the step's own work, and far less sensitive
    # than wall time to other processes competing for a shared machine's cores.
    "cpu": time.process_time,
    "cuda": _cuda_wall,  # wall time with the CUDA queue synchronised (benchmarks on a GPU)
}


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Pin ``torch``'s intra-op thread count (``None``: keep the current one); restore it on exit."""
    before = torch.get_num_threads()
    n = before if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def interleaved_times(
    fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int,
    setup: Mapping[str, Callable[[], object]] | None = None, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Run ``warmup`` untimed rounds, then ``repeats`` timed rounds of every fn in order (A B C A B C).

    ``setup[name]``, if given, runs untimed right before every call of ``fns[name]``. ``clock``: wall
    time (default) or e.g. ``time.process_time`` (see ``CLOCKS``). The objects alive before are kept
    out of garbage collection meanwhile, as the trainer keeps them during its steps
    (``gppf.engine.heap.long_lived_frozen``).
    Returns the per-round times in seconds of each fn.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    setup = setup or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with long_lived_frozen():
        for r in range(warmup + repeats):
            for name, fn in fns.items():
                if name in setup:
                    setup[name]()
                t0 = clock()
                fn()
                if r >= warmup:
                    times[name].append(clock() - t0)
    return times


class Repeat:
    """An endless iterator that returns the same batch every time (data loading excluded)."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return self.batch


class Stepper:
    """Calls a ``SIMTStep`` with increasing step numbers and counts skipped (non-finite) steps."""

    def __init__(self, step_fn: Callable[[int], Any]) -> None:
        self.step_fn = step_fn
        self.calls = 0
        self.skipped = 0

    def __call__(self) -> None:
        result = self.step_fn(self.calls)
        self.calls += 1
        self.skipped += int(result.skipped)


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_alloc_bytes(fn: Callable[[], object], *, device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated on the CPU allocator while ``fn`` runs, above what existed before it.

    On a CUDA ``device``: the CUDA caching allocator's peak (``max_memory_allocated``) above what was
    allocated before ``fn``.

    Uses the profiler's ``[memory]`` events (one per allocation / free, ``nbytes`` signed): sorted by
    time, the maximum of their running sum. The profiler does not see frees of blocks allocated
    before it started, so memory from before ``fn`` is neither counted nor subtracted: the result is
    an upper bound of the rise, exact when ``fn`` frees nothing older than itself.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    running, peak = 0, 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def meets(values: Mapping[str, float], goals: Mapping[str, float]) -> dict[str, bool]:
    """``value <= goal`` for each goal (all benchmark goals are upper bounds on a ratio)."""
    return {key: bool(values[key] <= goal) for key, goal in goals.items()}


def env_info() -> dict[str, Any]:
    import torchvision

    from gppf.engine.amp import native_bf16

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
    }


def dtype_name(amp_dtype: torch.dtype | None) -> str:
    """How a bench computes: ``bfloat16 autocast`` or ``float32``."""
    return "float32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast"


def emit(result: Mapping[str, Any], *, as_json: bool) -> None:
    """Print ONE JSON object (``as_json``) or a readable two-column table."""
    if as_json:
        print(json.dumps(result, sort_keys=False))
        return
    for key, value in _flatten(result):
        print(f"{key:<44} {_fmt(value)}")


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)
