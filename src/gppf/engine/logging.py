"""Run logging: ``metrics.jsonl`` (one JSON object per line), TensorBoard, console, progress bar."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gppf")


def _console() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[gppf] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class MetricsLogger:
    """Writes training/validation records to ``metrics.jsonl`` and TensorBoard (main rank only)."""

    def __init__(self, *, run_dir: Path, enabled: bool, append: bool = False) -> None:
        _console()
        self.enabled = enabled
        self.run_dir = run_dir
        self._file = None
        self._tb = None
        if enabled:
            self._file = open(run_dir / "metrics.jsonl", "a" if append else "w", buffering=1)  # noqa: SIM115
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        self._imgs, self._secs = 0, 0.0

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    def train(self, result: Any, *, lr: float, seconds: float, every: int) -> None:
        """Log one SIMT step (every step to jsonl, TensorBoard every ``every`` steps)."""
        if not self.enabled:
            return
        self._imgs += sum(result.samples.values())
        self._secs += seconds
        rec = {"kind": "train", "step": result.step + 1, "loss": result.loss, "lr": lr, "time": seconds,
               "img_per_s": sum(result.samples.values()) / max(seconds, 1e-9), "skipped": result.skipped}
        rec.update({f"loss/{t}": v for t, v in result.task_losses.items()})
        rec.update({f"aux/{k}": v for k, v in result.aux_losses.items()})
        if result.grad_norm:
            rec["grad_norm"] = result.grad_norm
        rec.update({f"router_grad/{k}": v for k, v in getattr(result, "router_grads", {}).items()})
        self._write(rec)
        if self._tb is not None and (result.step + 1) % max(every, 1) == 0:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("kind", "step"):
                    self._tb.add_scalar(f"train/{k}", v, result.step + 1)
            log.debug("step %d loss %.4f", result.step + 1, result.loss)

    def router(self, step: int, *, churn: float | None, margins: dict[str, float],
               routes: dict[str, list[list[int]]], frozen: bool) -> None:
        """Route decisiveness at a log step: churn since the previous log, k/(k+1) logit margins, routes."""
        if not self.enabled:
            return
        rec: dict[str, Any] = {"kind": "router", "step": step, "frozen": frozen}
        if churn is not None:
            rec["churn"] = churn
        rec.update({f"margin/{t}": m for t, m in margins.items()})
        rec["routes"] = routes
        self._write(rec)
        if self._tb is not None:
            for k, v in rec.items():
                if k == "churn" or k.startswith("margin/"):
                    self._tb.add_scalar(f"router/{k}", v, step)

    def val(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        self._write({"kind": "val", "step": step, **metrics})
        if self._tb is not None:
            for k, v in metrics.items():
                if "/chance/" not in k:
                    self._tb.add_scalar(f"val/{k}", v, step)
        shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "/chance/" not in k)
        log.info("validation @ step %d: %s", step, shown)

    def data_problems(self, *, task: str, **counts: int) -> None:
        """Record skipped bad samples of a task (``on_bad_sample: skip``): never silent."""
        if not self.enabled:
            return
        self._write({"kind": "data", "task": task, **counts})
        log.warning("task '%s': skipped bad samples %s", task, counts)

    def run_info(self, step: int, **info: Any) -> None:
        """Record how this (re)start of the run executes (device, precision, ranks), as resolved."""
        if not self.enabled:
            return
        self._write({"kind": "run", "step": step, **info})
        log.info("run: %s", ", ".join(f"{k}={v}" for k, v in info.items()))

    def warn(self, message: str) -> None:
        log.warning(message)
        self._write({"kind": "warning", "message": message, "time": time.time()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A rich progress bar: step, throughput, ETA and per-task losses."""

    def __init__(self, *, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        self._ema: dict[str, float] = {}
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
            refresh_per_second=2,
        )
        self.bar.start()
        self.task = self.bar.add_task("pretrain", total=total, completed=start, speed="", losses="")

    def update(self, result: Any, *, seconds: float) -> None:
        if self.bar is None:
            return
        for t, v in result.task_losses.items():
            self._ema[t] = v if t not in self._ema else 0.9 * self._ema[t] + 0.1 * v
        losses = " ".join(f"{t}:{v:.3f}" for t, v in self._ema.items())
        speed = f"{sum(result.samples.values()) / max(seconds, 1e-9):.0f} img/s"
        self.bar.update(self.task, advance=1, speed=speed, losses=losses)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
