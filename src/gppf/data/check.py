"""``gppf data check``: build every task's readers, decode images, count annotations and problems."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import gppf.data.readers  # noqa: F401  (registers the file formats)
import gppf.data.synthetic  # noqa: F401  (registers the built-in synthetic format)
from gppf.config import ConfigError, RunConfig, TaskConfig, load_config
from gppf.data.base import READERS, DataError, SampleDataset
from gppf.registry import RegistryError

MAX_PROBLEMS = 50  # problem messages kept per split (the count is always exact)


def _decode_indices(n: int, decode: bool | int) -> list[int]:
    """All indices (``True``), none (``False``/``0``) or ``decode`` evenly spaced ones."""
    if decode is True:
        return list(range(n))
    if decode is False or decode <= 0 or n == 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(int(decode), n))})


def _count_target(target: dict[str, Any], counts: dict[str, int]) -> None:
    """Annotation counts from a decoded target (datasets without ``annotation_counts``)."""
    if "boxes" in target:
        counts["boxes"] = counts.get("boxes", 0) + len(target["boxes"])
    elif "keypoints" in target:
        counts["keypoints"] = counts.get("keypoints", 0) + int((target["keypoints"][:, 2] > 0).sum())
    elif "mask" in target:
        counts["masks"] = counts.get("masks", 0) + 1
    elif isinstance(target.get("labels"), torch.Tensor):
        counts["positive_labels"] = counts.get("positive_labels", 0) + int((target["labels"] == 1).sum())
    elif "label" in target or "identity" in target:
        counts["labels"] = counts.get("labels", 0) + 1


def _add_problem(row: dict[str, Any], message: str, *, count: int = 1) -> None:
    row["problem_count"] += count
    if len(row["problems"]) < MAX_PROBLEMS:
        row["problems"].append(message)


def _decode_all(ds: SampleDataset, row: dict[str, Any], *, decode: bool | int) -> dict[str, int]:
    """Load the chosen samples; ``DataError`` (policy ``error``) becomes a problem, not a crash."""
    counts: dict[str, int] = {}
    for i in _decode_indices(len(ds), decode):
        try:
            _, target = ds[i]
        except DataError as exc:
            _add_problem(row, str(exc))
            continue
        row["decoded"] += 1
        _count_target(target, counts)
    return counts


def check_split(task: TaskConfig, *, split: str, decode: bool | int = True) -> dict[str, Any]:
    """Check one split of one task; returns a report row (see ``check_config``)."""
    data = task.data
    row: dict[str, Any] = {
        "task": task.name, "split": split, "type": task.type, "format": data.format,
        "path": f"{data.root}/{data.train if split == 'train' else data.val}", "policy": task.on_bad_sample,
        "classes": 0, "images": 0, "samples": 0, "annotations": {}, "decoded": 0, "skipped": 0,
        "annotations_source": "index", "skipped_by_kind": {}, "problems": [], "problem_count": 0, "seconds": 0.0,
    }
    start = time.perf_counter()
    try:
        reader = READERS.get(data.format)
        ds = reader(data, split=split, task_type=task.type, on_bad_sample=task.on_bad_sample)
    except (DataError, RegistryError, OSError) as exc:
        _add_problem(row, str(exc))
        row["seconds"] = time.perf_counter() - start
        return row
    num_images = getattr(ds, "num_images", len(ds))
    row.update(classes=len(ds.classes), images=int(num_images), samples=len(ds))
    for message in ds.verify() if callable(getattr(ds, "verify", None)) else []:  # shards: manifest checks
        _add_problem(row, message)
    decoded_counts = _decode_all(ds, row, decode=decode)
    counter = getattr(ds, "annotation_counts", None)
    indexed = counter() if callable(counter) else {}
    row["annotations"] = indexed or decoded_counts
    row["annotations_source"] = "index" if indexed else "decoded"
    summary = ds.bad.summary()
    row["skipped"], row["skipped_by_kind"] = summary["skipped"], summary["by_kind"]
    if summary["skipped"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(summary["by_kind"].items()))
        _add_problem(row, f"skipped {summary['skipped']} bad samples ({kinds})", count=summary["skipped"])
        for example in summary["examples"]:
            _add_problem(row, f"  skipped: {example}", count=0)
    row["seconds"] = time.perf_counter() - start
    return row


def check_config(cfg: RunConfig, *, decode: bool | int = True) -> list[dict[str, Any]]:
    """Check the train and val split of every task in ``cfg``.

    ``decode``: ``True`` decodes every sample (finds corrupt images), an int decodes that many evenly
    spaced samples per split, ``False`` none. Returns one row per (task, split) with the keys ``task,
    split, type, format, path, policy, classes, images, samples, annotations, annotations_source (``index``
    or ``decoded``: counted from decoded samples only), decoded, skipped, skipped_by_kind, problems,
    problem_count, seconds``. Skipped samples count as problems.
    """
    return [check_split(task, split=split, decode=decode) for task in cfg.tasks for split in ("train", "val")]


def print_check(report: list[dict[str, Any]], *, console: Console | None = None) -> None:
    """Print a per-task summary table, then every problem found."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
            console = Console(width=160)
    table = Table(title="gppf data check")
    for col in ("task", "split", "type", "format", "classes", "images", "samples", "annotations", "decoded",
                "skipped", "problems", "time"):
        table.add_column(col, justify="left" if col in ("task", "split", "type", "format", "annotations") else "right")
    for r in report:
        ann = ", ".join(f"{k}={v}" for k, v in r["annotations"].items()) or "-"
        if r["annotations"] and r.get("annotations_source") == "decoded":
            ann += " (decoded only)"
        style = "red" if r["problem_count"] else None
        table.add_row(r["task"], r["split"], r["type"], r["format"], str(r["classes"]), str(r["images"]),
                      str(r["samples"]), ann, str(r["decoded"]), str(r["skipped"]), str(r["problem_count"]),
                      f"{r['seconds']:.1f}s", style=style)
    console.print(table)
    for r in report:
        for message in r["problems"]:
            console.print(f"[red]{escape(r['task'])}/{r['split']}:[/red] {escape(message)}", highlight=False)
        hidden = r["problem_count"] - len(r["problems"])
        if hidden > 0:
            console.print(f"[red]{escape(r['task'])}/{r['split']}:[/red] ... and {hidden} more problems")
    total = sum(r["problem_count"] for r in report)
    console.print("[green]no problems found[/green]" if total == 0 else f"[red]{total} problem(s) found[/red]")


def main_check(config_path: str, overrides: list[str], *, decode: bool | int = True) -> int:
    """``gppf data check <config> [key=value ...]``: print the report; 0 if no problems, 1 otherwise."""
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        Console(stderr=True).print(f"[red]config error:[/red] {exc}", highlight=False)
        return 1
    report = check_config(cfg, decode=decode)
    print_check(report)
    return 0 if all(r["problem_count"] == 0 for r in report) else 1
