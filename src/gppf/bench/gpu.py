"""``gppf bench gpu``: GPU readiness of a machine, in one JSON object (budget: under 8 minutes).

Checks, each with its status (``ok``, ``failed``, ``skipped``) and figures:

* ``cuda_tests``: the CUDA-marked tests (``pytest -m cuda`` over the source tree's ``tests/``);
* ``bf16_simt_step``: SIMT steps of the built-in recipe on ``cuda:0`` in bf16 autocast, channels_last,
  hard top-k routes: median step seconds and images/s after warm-up, the losses, and the allocator's
  peak memory (``torch.cuda.max_memory_allocated``);
* ``bench_lego``: ``gppf bench lego --quick`` on CUDA when that bench takes ``--device``, else skipped
  with the reason;
* ``nccl_run``: with >= 2 GPUs, ``torchrun --nproc_per_node <GPUs>`` of ``gppf pretrain`` on the recipe
  for ``--steps`` steps with the NCCL backend: wall time, steps logged, last loss; skipped with 1 GPU.

Without CUDA it prints the JSON with ``"cuda": false`` and every check skipped, and exits 0.
Exit status 1 when a check that ran failed.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from gppf.bench.common import bench_parser, emit, env_info

CHECKS = ("cuda_tests", "bf16_simt_step", "bench_lego", "nccl_run")
TESTS = Path(__file__).resolve().parents[3] / "tests"
BUDGET_S = 480


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def _run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def cuda_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m cuda``: counts from its JUnit XML."""
    if not TESTS.is_dir():
        return _skipped(f"no tests/ beside the source tree ({TESTS}): an installed package")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        proc = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                     f"--junitxml={xml}", str(TESTS)], timeout=timeout)
        if not xml.is_file():
            return {"status": "failed", "reason": proc.stdout[-2000:] + proc.stderr[-2000:]}
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    ok = proc.returncode == 0 and counts["failures"] == counts["errors"] == 0
    return {"status": "ok" if ok else "failed", **counts, "passed": counts["tests"] - counts["failures"]
            - counts["errors"] - counts["skipped"], "tail": "" if ok else proc.stdout[-2000:]}


def bf16_simt_step(steps: int, quick: bool) -> dict[str, Any]:
    """Real SIMT steps of the recipe on cuda:0 (bf16, channels_last): time, images/s, peak memory."""
    import torch

    from gppf.bench.dist import QUICK_OVERRIDES, QUICK_TASK
    from gppf.config import default_config_path, load_config
    from gppf.engine.trainer import build_run

    over = ["train.device=cuda:0", "train.amp=bf16", "train.channels_last=true", "train.progress=false",
            "model.router.mode=topk_st", "train.checkpoint_every=0", f"train.steps={steps}"]
    if quick:
        n = len(load_config(default_config_path()).tasks)
        over += QUICK_OVERRIDES + [f"tasks.{i}.{k}={v}" for i in range(n) for k, v in QUICK_TASK.items()]
    cfg = load_config(default_config_path(), over)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(cfg, run_dir=Path(tmp), resume=False)
        torch.cuda.reset_peak_memory_stats()
        times, losses, images = [], [], sum(t.batch_size for t in cfg.tasks)
        for step in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = run.step_fn(step)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(result.loss)
    timed = times[2:] or times
    finite = all(x == x and abs(x) != float("inf") for x in losses)
    med = statistics.median(timed)
    return {"status": "ok" if finite else "failed", "steps": steps, "warmup_steps": len(times) - len(timed),
            "median_step_s": med, "images_per_s": images / med, "losses": losses,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name(0)}


def bench_lego(timeout: float) -> dict[str, Any]:
    """``gppf bench lego --quick --json --device cuda`` when that bench supports a device."""
    from gppf.bench.lego import parse_args

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parse_args(["--device", "cuda"])
    except SystemExit:
        return _skipped("gppf bench lego measures on the CPU only (it has no --device option)")
    proc = _run([sys.executable, "-m", "gppf.bench.lego", "--quick", "--json", "--device", "cuda"], timeout=timeout)
    if proc.returncode != 0:
        return {"status": "failed", "reason": proc.stderr[-2000:]}
    return {"status": "ok", "result": json.loads(proc.stdout.strip().splitlines()[-1])}


def nccl_run(gpus: int, steps: int, quick: bool, timeout: float) -> dict[str, Any]:
    """The recipe for ``steps`` steps on every GPU with NCCL (``gppf pretrain`` under torchrun)."""
    if gpus < 2:
        return _skipped(f"{gpus} GPU: a multi-GPU NCCL run needs >= 2")
    from gppf.bench.dist import QUICK_OVERRIDES

    with tempfile.TemporaryDirectory() as tmp:
        over = ["dist.backend=nccl", f"train.steps={steps}", "train.checkpoint_every=0", "train.eval_every=0",
                "train.progress=false", *(QUICK_OVERRIDES if quick else [])]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "gppf.cli", "pretrain", "--out", f"{tmp}/run", *over]
        t0 = time.perf_counter()
        proc = _run(cmd, timeout=timeout, env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
        wall = time.perf_counter() - t0
        log = Path(tmp) / "run" / "metrics.jsonl"
        train = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        train = [r for r in train if r["kind"] == "train"]
    if proc.returncode != 0 or len(train) != steps:
        return {"status": "failed", "gpus": gpus, "returncode": proc.returncode, "tail": proc.stderr[-3000:]}
    return {"status": "ok", "gpus": gpus, "steps": steps, "wall_s": wall, "last_loss": train[-1]["loss"],
            "median_step_s": statistics.median(r["time"] for r in train[2:] or train)}


def devices() -> list[dict[str, Any]]:
    import torch

    return [{"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_bytes": p.total_memory}
            for p in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))]


def run_gpu_check(*, steps: int, quick: bool, skip: list[str]) -> dict[str, Any]:
    """Every check in order, each within what is left of the budget."""
    import torch

    t0 = time.perf_counter()
    out: dict[str, Any] = {"bench": "gpu", "cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                           **env_info()}
    if not out["cuda"]:
        return out | {"ok": True, "reason": "no CUDA device (torch.cuda.is_available() is False)",
                      "checks": {c: _skipped("no CUDA") for c in CHECKS}, "wall_s": time.perf_counter() - t0}
    out["devices"] = devices()
    left = lambda: max(30.0, BUDGET_S - (time.perf_counter() - t0))  # noqa: E731
    runners = {"cuda_tests": lambda: cuda_tests(min(240.0, left())),
               "bf16_simt_step": lambda: bf16_simt_step(max(steps // 4, 5), quick),
               "bench_lego": lambda: bench_lego(min(120.0, left())),
               "nccl_run": lambda: nccl_run(torch.cuda.device_count(), steps, quick, left())}
    checks: dict[str, Any] = {}
    for name in CHECKS:
        if name in skip:
            checks[name] = _skipped("--skip")
            continue
        try:
            checks[name] = runners[name]()
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, the others still run
            checks[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[-2000:]}
    return out | {"ok": all(c["status"] != "failed" for c in checks.values()), "checks": checks,
                  "wall_s": time.perf_counter() - t0}


def main_gpu(argv: list[str]) -> int:
    """CLI entry: ``gppf bench gpu [--json] [--quick] [--steps N] [--skip CHECK ...]``."""
    p = bench_parser("gpu", __doc__, quick="tiny sizes (smoke test of the script itself)")
    p.add_argument("--steps", type=int, default=20, help="steps of the NCCL run (default 20)")
    p.add_argument("--skip", nargs="*", default=[], choices=CHECKS, help="checks to leave out")
    args = p.parse_args(argv)
    result = run_gpu_check(steps=args.steps, quick=args.quick, skip=args.skip)
    emit(result, as_json=args.json)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main_gpu(sys.argv[1:]))
