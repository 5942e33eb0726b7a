"""Route decisiveness in the run report: churn, k/(k+1) logit margins and per-task lego usage over time.

Reads the ``{"kind": "router", "step", "churn"?, "margin/<task>", "routes", "frozen"}`` records of
``metrics.jsonl`` (written at every log step by the trainer). Self-contained so that the report module
only calls ``routing_section``.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

PLOTS = ("route_churn.png", "lego_usage_over_time.png")


def read_router_records(path: Path) -> list[dict[str, Any]]:
    """Router records of ``metrics.jsonl`` sorted by step (last write wins); malformed lines skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            if rec.get("kind") == "router" and isinstance(rec.get("routes"), dict):
                by_step[int(rec["step"])] = rec
        except (ValueError, TypeError, AttributeError):
            continue
    return [by_step[s] for s in sorted(by_step)]


def plot_churn_and_margins(recs: Sequence[dict[str, Any]], *, path: Path) -> Path:
    """Left: fraction of routes changed since the previous log; right: mean k/(k+1) logit margin per task."""
    tasks = list(recs[0]["routes"])
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    steps = [r["step"] for r in recs if "churn" in r]
    ax.plot(steps, [r["churn"] for r in recs if "churn" in r], marker=".", color="black")
    frozen = [r["step"] for r in recs if r.get("frozen")]
    for a in (ax, ax2 := fig.add_subplot(1, 2, 2)):
        if frozen:
            a.axvline(frozen[0], color="grey", ls="--", lw=1, label="routes frozen")
        a.set_xlabel("step", fontsize=9)
        a.grid(alpha=0.3)
    ax.set_title("route churn (fraction of routes changed since last log)", fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    cmap = colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    for i, t in enumerate(tasks):
        pts = [(r["step"], r[f"margin/{t}"]) for r in recs if isinstance(r.get(f"margin/{t}"), (int, float))]
        if pts:
            ax2.plot(*zip(*pts), color=cmap(i % cmap.N), label=t)
    ax2.set_yscale("log")
    ax2.set_title("k-th minus (k+1)-th logit (mean over routing points)", fontsize=10)
    ax2.legend(fontsize=7, frameon=False)
    fig.savefig(path, dpi=110, facecolor="white")
    return path


def usage_over_time(recs: Sequence[dict[str, Any]], task: str, num_legos: int) -> np.ndarray:
    """[N, steps]: fraction of the task's routing points that use each lego, at every log step."""
    cols = []
    for r in recs:
        route = r["routes"][task]
        counts = np.bincount(np.asarray(route).reshape(-1), minlength=num_legos)[:num_legos]
        cols.append(counts / max(len(route), 1))
    return np.stack(cols, axis=1)


def plot_usage_over_time(recs: Sequence[dict[str, Any]], *, num_legos: int, path: Path) -> Path:
    """One heatmap per task: lego id (rows) x log step (columns), colour = share of routing points."""
    tasks = list(recs[0]["routes"])
    steps = [r["step"] for r in recs]
    fig = Figure(figsize=(3.2 * len(tasks), 2.8), layout="constrained")
    for i, t in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        im = ax.imshow(usage_over_time(recs, t, num_legos), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       extent=(steps[0], steps[-1], num_legos - 0.5, -0.5), interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if i == 0:
            ax.set_ylabel("lego", fontsize=8)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="share of routing points")
    fig.suptitle("Per-task lego usage over training", fontsize=11)
    fig.savefig(path, dpi=110, facecolor="white")
    return path


def routing_section(run_dir: Path, out: Path, *, num_legos: int | None = None) -> str:
    """HTML of the report's routing section (plots written to ``out``), or a note if nothing was logged."""
    for name in PLOTS:
        (out / name).unlink(missing_ok=True)
    recs = read_router_records(Path(run_dir) / "metrics.jsonl")
    if len(recs) < 2:
        return '<p class="note">no route records in metrics.jsonl yet (logged every train.log_every steps)</p>'
    legos = num_legos or 1 + max(i for r in recs for route in r["routes"].values() for row in route for i in row)
    plot_churn_and_margins(recs, path=out / PLOTS[0])
    plot_usage_over_time(recs, num_legos=legos, path=out / PLOTS[1])
    last_churn = next((r["step"] for r in reversed(recs) if r.get("churn", 0) > 0), None)
    frozen = next((r["step"] for r in recs if r.get("frozen")), None)
    first, last = recs[0], recs[-1]
    ratios = [last[k] / first[k] for k in first if k.startswith("margin/") and first[k] > 0 and k in last]
    meta = (f"routes last changed at step {last_churn}; " if last_churn is not None else "routes never changed; ")
    meta += f"frozen from step {frozen}; " if frozen is not None else "not frozen; "
    if ratios:
        meta += f"k/(k+1) logit margin grew {min(ratios):.3g}x-{max(ratios):.3g}x from step {first['step']}."
    return "".join(f'<img src="{n}" alt="{html.escape(n)}">' for n in PLOTS) + f'<p class="meta">{html.escape(meta)}</p>'
