"""Run report: a self-contained ``report/index.html`` with PNG plots, built from a run directory.

Inputs (all optional, a partial run gives a partial page):

* ``metrics.jsonl``: one JSON object per line, ``{"kind": "train", "step", "loss", "loss/<task>", "lr",
  "time", "img_per_s"}`` or ``{"kind": "val", "step", "<task>/<metric>", "<task>/chance/<metric>"}``;
  malformed lines are skipped and counted;
* ``routes.json``: ``{task: [[lego ids] per routing point]}``;
* ``router.json``: ``{"tasks", "num_layers", "num_legos", "active", "layer_names"?, "primary_metric"?}``;
* ``config.yaml``: shown verbatim.

Plots are drawn with ``matplotlib.figure.Figure`` (Agg, no pyplot global state).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from gppf.report.routes import routing_section

Routes = Mapping[str, Sequence[Sequence[int]]]

PLOT_NAMES = ("loss.png", "val_metrics.png", "lego_usage.png", "task_affinity.png")
_MAX_COLUMNS_PER_ROW = 128  # lego columns per row of the usage heatmap before wrapping
_DPI = 110


# ----------------------------------------------------------------------------- analysis helpers
def task_affinity(routes: Routes, active: int) -> tuple[list[str], np.ndarray]:
    """Tasks and their affinity matrix: mean over routing points of ``|S_i ∩ S_j| / active``."""
    if active < 1:
        raise ValueError(f"active must be >= 1, got {active}")
    tasks = list(routes)
    sets = [[set(map(int, layer)) for layer in routes[t]] for t in tasks]
    num_layers = {len(s) for s in sets}
    if len(num_layers) > 1:
        raise ValueError(f"routes have different numbers of routing points: {sorted(num_layers)}")
    if num_layers and 0 in num_layers:
        raise ValueError("routes have no routing points")
    aff = np.eye(len(tasks))
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            shared = [len(a & b) / active for a, b in zip(sets[i], sets[j])]
            aff[i, j] = aff[j, i] = float(np.mean(shared))
    return tasks, aff


def usage_matrix(
    routes: Routes, *, num_legos: int | None = None, tasks: Sequence[str] | None = None
) -> np.ndarray:
    """0/1 array ``[T, L, N]`` of which legos each task uses (like ``TaskRouter.usage_TLN``).

    ``num_legos`` defaults to the largest id + 1; ``tasks`` (default: ``routes`` order) picks rows.
    """
    tasks = list(routes) if tasks is None else list(tasks)
    if not tasks:
        return np.zeros((0, 0, num_legos or 0))
    num_layers = {len(routes[t]) for t in tasks}
    if len(num_layers) != 1:
        raise ValueError(f"routes have different numbers of routing points: {sorted(num_layers)}")
    ids = [int(i) for t in tasks for layer in routes[t] for i in layer]
    n = num_legos if num_legos is not None else (max(ids) + 1 if ids else 0)
    if ids and (min(ids) < 0 or max(ids) >= n):
        raise ValueError(f"lego ids outside [0, {n}) in routes")
    usage = np.zeros((len(tasks), num_layers.pop(), n))
    for t, name in enumerate(tasks):
        for l, layer in enumerate(routes[name]):
            usage[t, l, [int(i) for i in layer]] = 1.0
    return usage


def ema(values: Sequence[float], *, span: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average; ``span`` defaults to ~1/15 of the length.

    Non-finite values are carried over (the average ignores them) so one NaN does not erase a curve.
    """
    x = np.asarray(values, dtype=float)
    span = span or max(2, len(x) // 15)
    alpha = 2.0 / (span + 1.0)
    out, acc, weight = np.full_like(x, np.nan), 0.0, 0.0
    for i, v in enumerate(x):
        if math.isfinite(v):
            acc = (1 - alpha) * acc + alpha * v
            weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight if weight > 0 else np.nan
    return out


# ----------------------------------------------------------------------------- reading a run
@dataclass
class RunData:
    """Everything the report reads from a run directory; ``notes`` collects reading problems."""

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0
    routes: dict[str, list[list[int]]] | None = None
    router: dict[str, Any] = field(default_factory=dict)
    config_text: str | None = None
    notes: list[str] = field(default_factory=list)
    has_metrics: bool = False

    @property
    def tasks(self) -> list[str]:
        """Task order: ``router.json``, then ``routes.json``, then names seen in the metrics."""
        names: list[str] = list(self.router.get("tasks") or [])
        names += [t for t in (self.routes or {}) if t not in names]
        for rec in self.train:
            names += [k[5:] for k in rec if k.startswith("loss/") and k[5:] not in names]
        for rec in self.val:
            names += [t for t in (_split_val_key(k, names)[0] for k in rec) if t and t not in names]
        return names


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Train records, val records (each sorted by step, last write wins) and the malformed-line count."""
    by_kind: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "val": {}}
    skipped = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                kind, step = rec["kind"], int(rec["step"])
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            if isinstance(kind, str) and kind in by_kind:  # other kinds are not plotted
                by_kind[kind][step] = rec
    return (
        [by_kind["train"][s] for s in sorted(by_kind["train"])],
        [by_kind["val"][s] for s in sorted(by_kind["val"])],
        skipped,
    )


def load_run(run_dir: Path) -> RunData:
    """Read metrics, routes, router and config of ``run_dir``; missing/broken files become notes."""
    run = RunData()
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        run.train, run.val, run.skipped_lines = read_metrics(metrics)
        run.has_metrics = True
    for name in ("routes.json", "router.json"):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("top level is not an object")
        except ValueError as err:
            run.notes.append(f"could not read {name}: {err}")
            continue
        if name == "routes.json":
            run.routes = obj
        else:
            run.router = obj
    config = run_dir / "config.yaml"
    if config.is_file():
        run.config_text = config.read_text(encoding="utf-8", errors="replace")
    return run


def _split_val_key(key: str, tasks: Sequence[str]) -> tuple[str | None, str | None, bool]:
    """``"<task>/<metric>"`` or ``"<task>/chance/<metric>"`` -> (task, metric, is_chance)."""
    if key in ("kind", "step") or "/" not in key:
        return None, None, False
    task = next((t for t in sorted(tasks, key=len, reverse=True) if key.startswith(t + "/")), None)
    task = task or key.split("/", 1)[0]
    rest = key[len(task) + 1 :]
    if rest.startswith("chance/"):
        return task, rest[len("chance/") :], True
    return task, rest, False


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def val_series(
    val: Sequence[Mapping[str, Any]], task: str, tasks: Sequence[str]
) -> tuple[dict[str, tuple[list[int], list[float]]], dict[str, float]]:
    """``{metric: (steps, values)}`` and the latest ``{metric: chance}`` of ``task``."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    chance: dict[str, float] = {}
    for rec in val:
        for key, v in rec.items():
            t, metric, is_chance = _split_val_key(key, tasks)
            if t != task or metric is None or not _is_number(v):
                continue
            if is_chance:
                chance[metric] = float(v)
            else:
                steps, values = series.setdefault(metric, ([], []))
                steps.append(int(rec["step"]))
                values.append(float(v))
    return series, chance


# ----------------------------------------------------------------------------- plots
def _task_colors(tasks: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    cmap = colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    return {t: to_rgb(cmap(i % cmap.N)) for i, t in enumerate(tasks)}


def _grid(n: int) -> tuple[int, int]:
    """(rows, cols) of a subplot grid for ``n`` panels: 3 columns, 2 for 4 panels, 4 from 7 on."""
    cols = 2 if n == 4 else min(max(1, n), 4 if n >= 7 else 3)
    return math.ceil(n / cols), cols


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, facecolor="white")  # constrained layout: no tight-bbox pass
    return path


def plot_losses(train: Sequence[Mapping[str, Any]], *, tasks: Sequence[str], path: Path) -> Path:
    """Total and per-task training loss: raw (faint) and EMA-smoothed, one subplot each."""
    panels = [("total", "loss")] + [(t, f"loss/{t}") for t in tasks]
    panels = [(title, key) for title, key in panels if any(_is_number(r.get(key)) for r in train)]
    rows, cols = _grid(len(panels))
    fig = Figure(figsize=(4.6 * cols, 3.2 * rows), layout="constrained")
    colors = {"total": (0.15, 0.15, 0.15), **_task_colors(tasks)}
    for i, (title, key) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        recs = [r for r in train if _is_number(r.get(key))]
        steps = np.array([r["step"] for r in recs])
        values = np.array([float(r[key]) for r in recs])
        ax.plot(steps, values, color=colors[title], alpha=0.25, lw=1.0, label="raw")
        smooth = ema(values)
        ax.plot(steps, smooth, color=colors[title], lw=2.0, label="EMA")
        finite, trend = values[np.isfinite(values)], smooth[np.isfinite(smooth)]
        if trend.size and finite.min() > 0 and trend.max() / trend.min() > 30:
            ax.set_yscale("log")  # judged on the smoothed curve: raw noise must not force log scale
        last = finite[-1] if finite.size else float("nan")
        ax.set_title(f"{title}  (last {last:.4g})", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if i == 0:
            ax.legend(fontsize=8, frameon=False)
    fig.suptitle("Training loss", fontsize=12)
    return _save(fig, path)


def plot_val_metrics(val: Sequence[Mapping[str, Any]], *, tasks: Sequence[str], path: Path) -> Path:
    """Every validation metric of every task over steps; chance levels dashed in the same colour."""
    panels = [(t, *val_series(val, t, tasks)) for t in tasks]
    panels = [p for p in panels if p[1]]
    rows, cols = _grid(len(panels))
    fig = Figure(figsize=(4.6 * cols, 3.3 * rows), layout="constrained")
    cmap = colormaps["tab10"]
    for i, (task, series, chance) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for m, (metric, (steps, values)) in enumerate(sorted(series.items())):
            color = cmap(m % cmap.N)
            ax.plot(steps, values, marker="o", ms=3.5, lw=1.8, color=color, label=metric)
            if metric in chance:
                ax.axhline(chance[metric], color=color, ls="--", lw=1.1, alpha=0.8)
        ax.plot([], [], color="0.4", ls="--", lw=1.1, label="chance (dashed)")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7.5, frameon=False, loc="best")
    fig.suptitle("Validation metrics (dashed: chance level)", fontsize=12)
    return _save(fig, path)


def _usage_image(usage_TLN: np.ndarray, colors: Sequence[tuple[float, float, float]]) -> np.ndarray:
    """RGB image ``[T + 1, L * N, 3]``: task rows in the task colour, last row = #tasks per lego."""
    t, l, n = usage_TLN.shape
    flat = usage_TLN.reshape(t, l * n)
    img = np.empty((t + 1, l * n, 3))
    empty = np.array([0.96, 0.96, 0.96])
    for i in range(t):
        img[i] = np.where(flat[i, :, None] > 0, np.asarray(colors[i]), empty)
    count = flat.sum(0) / max(t, 1)
    img[t] = np.asarray(colormaps["Greys"](0.15 + 0.8 * count))[:, :3]
    img[t, count == 0] = (1.0, 0.72, 0.72)  # unused lego
    return img


def plot_usage(
    usage_TLN: np.ndarray, *, tasks: Sequence[str], layer_names: Sequence[str] | None, path: Path
) -> Path:
    """Task x (routing point, lego) heatmap, wrapped into rows of at most ~128 lego columns."""
    t, l, n = usage_TLN.shape
    per_row = max(1, min(l, _MAX_COLUMNS_PER_ROW // max(n, 1)))
    n_rows = math.ceil(l / per_row)
    names = list(layer_names) if layer_names and len(layer_names) == l else [f"L{i}" for i in range(l)]
    rotate = 7.5 / 72 * 0.6 * max(map(len, names)) > 0.85 * 14 / per_row  # label wider than block
    img = _usage_image(usage_TLN, list(_task_colors(tasks).values()))
    fig = Figure(figsize=(15, n_rows * (0.32 * (t + 1) + 1.0) + 1.0), layout="constrained")
    for r in range(n_rows):
        lo, hi = r * per_row, min(l, (r + 1) * per_row)
        ax = fig.add_subplot(n_rows, 1, r + 1)
        ax.imshow(img[:, lo * n : hi * n], aspect="auto", interpolation="nearest",
                  extent=(lo * n - 0.5, hi * n - 0.5, t + 0.5, -0.5))
        ax.set_xlim(lo * n - 0.5, lo * n + per_row * n - 0.5)  # equal cell width in every row
        edges = np.arange(lo * n, hi * n + 1) - 0.5
        ax.vlines(edges, -0.5, t + 0.5, colors="white", lw=0.4)
        ax.vlines(edges[::n], -0.5, t + 0.5, colors="black", lw=1.4)
        ax.hlines(np.arange(t - 1) + 0.5, edges[0], edges[-1], colors="white", lw=0.6)
        ax.hlines([t - 0.5], edges[0], edges[-1], colors="black", lw=1.2)
        ax.set_yticks(range(t + 1), [*tasks, "# tasks"], fontsize=8)
        ax.set_xticks([k * n + (n - 1) / 2 for k in range(lo, hi)], names[lo:hi],
                      fontsize=7.5, rotation=30 if rotate else 0)
        ax.tick_params(axis="x", length=0)
    fig.suptitle(f"Lego usage: {t} tasks x {l} routing points x {n} legos "
                 f"(each block = one routing point, legos 0..{n - 1} left to right)", fontsize=10)
    _usage_legend(fig, t)
    return _save(fig, path)


def _usage_legend(fig: Figure, num_tasks: int) -> None:
    """Legend of the bottom '# tasks' row: unused (red) and grey levels for 1..T sharing tasks."""
    from matplotlib.patches import Patch

    counts = range(1, num_tasks + 1) if num_tasks <= 8 else sorted({1, 2, num_tasks // 2, num_tasks})
    handles = [Patch(facecolor=(1.0, 0.72, 0.72), edgecolor="0.5", label="unused")] + [
        Patch(facecolor=colormaps["Greys"](0.15 + 0.8 * c / num_tasks), edgecolor="0.5",
              label=f"{c} task{'s' if c > 1 else ''}")
        for c in counts
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
               frameon=False, title="# tasks row", title_fontsize=8)


def plot_affinity(tasks: Sequence[str], affinity: np.ndarray, *, path: Path) -> Path:
    """Annotated task-affinity heatmap in [0, 1]."""
    t = len(tasks)
    side = max(3.8, 0.6 * t + 2.2)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(affinity, vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.8, label="shared legos / k (mean over layers)")
    ax.set_xticks(range(t), tasks, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(t), tasks, fontsize=9)
    if t <= 24:
        size = 9 if t <= 10 else 7
        for i in range(t):
            for j in range(t):
                v = affinity[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size,
                        color="black" if v > 0.6 else "white")
    ax.set_title("Task affinity (shared legos)", fontsize=11)
    return _save(fig, path)


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#666;font-size:.9em}.note{background:#fff8e1;border-left:4px solid #f0c040;padding:6px 10px}
.chance{color:#888}.good{color:#1a7f37}.bad{color:#b42318}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:.85em;max-height:480px}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if _is_number(v) else _esc(v)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _img(name: str, alt: str) -> str:
    return f'<img src="{_esc(name)}" alt="{_esc(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_cell(metric: str, value: float, chance: float | None, primary: bool) -> str:
    name = f"<b>{_esc(metric)}</b>" if primary else _esc(metric)
    if chance is None:
        return f"{name} {value:.4g}"
    cls = "good" if value > chance else "bad"
    return f'{name} <span class="{cls}">{value:.4g}</span> <span class="chance">(chance {chance:.4g})</span>'


def summary_section(run: RunData) -> str:
    """Per-task table (final val metrics vs chance, final loss) and run overview."""
    tasks, primary = run.tasks, run.router.get("primary_metric") or {}
    rows = []
    for task in tasks:
        series, chance = val_series(run.val, task, tasks)
        main = str(primary.get(task, "")).removeprefix(f"{task}/")
        order = sorted(series, key=lambda m: (m != main, m))
        cells = [_metric_cell(m, series[m][1][-1], chance.get(m), m == main) for m in order]
        last_step = max((s[0][-1] for s in series.values()), default=None)
        losses = [float(r[f"loss/{task}"]) for r in run.train if _is_number(r.get(f"loss/{task}"))]
        loss = f"{losses[-1]:.4g} (EMA {ema(losses)[-1]:.4g})" if losses else "–"
        rows.append([f"<b>{_esc(task)}</b>", "<br>".join(cells) or "no validation yet",
                     _esc(last_step if last_step is not None else "–"), loss])
    parts = [_table(["task", "final validation metrics", "val step", "final loss"], rows)]
    parts.append(_overview(run))
    if run.config_text is not None:
        parts.append(f"<details open><summary>config.yaml</summary><pre>{_esc(run.config_text)}</pre>"
                     "</details>")
    else:
        parts.append(_note("no config.yaml in the run directory"))
    return "\n".join(parts)


def _overview(run: RunData) -> str:
    """One-row facts: steps, total loss, lr, throughput, time, router layout."""
    last = run.train[-1] if run.train else {}
    speeds = [float(r["img_per_s"]) for r in run.train if _is_number(r.get("img_per_s"))]
    facts = [
        ("train records", str(len(run.train))),
        ("val records", str(len(run.val))),
        ("last step", _fmt(last.get("step", "–"))),
        ("final total loss", _fmt(last.get("loss", "–"))),
        ("final lr", _fmt(last.get("lr", "–"))),
        ("mean img/s", f"{np.mean(speeds):.1f}" if speeds else "–"),
        ("time (s)", _fmt(last.get("time", "–"))),
    ]
    r = run.router
    if r:
        facts.append(("legos", f"{r.get('active', '?')} of {r.get('num_legos', '?')} active "
                               f"at {r.get('num_layers', '?')} routing points"))
    return _table([f for f, _ in facts], [[v for _, v in facts]])


def _losses_section(run: RunData, out: Path) -> str:
    if not run.has_metrics:
        return _note("no metrics.jsonl in the run directory")
    if not any(_is_number(r.get(k)) for r in run.train for k in r if k.split("/")[0] == "loss"):
        return _note("no training loss records yet")
    return _img(plot_losses(run.train, tasks=run.tasks, path=out / PLOT_NAMES[0]).name, "training loss")


def _val_section(run: RunData, out: Path) -> str:
    tasks = run.tasks
    if not any(val_series(run.val, t, tasks)[0] for t in tasks):
        return _note("no validation results yet")
    path = plot_val_metrics(run.val, tasks=tasks, path=out / PLOT_NAMES[1])
    return _img(path.name, "validation metrics")


def _routes_sections(run: RunData, out: Path) -> tuple[str, str]:
    """(usage section, affinity section) HTML from routes.json / router.json."""
    if not run.routes:
        msg = _note("no routes.json yet (written at the end of training)")
        return msg, msg
    tasks = [t for t in run.tasks if t in run.routes]
    routes = {t: run.routes[t] for t in tasks}
    try:
        usage = usage_matrix(routes, num_legos=run.router.get("num_legos"), tasks=tasks)
        active = int(run.router.get("active") or len(next(iter(routes.values()))[0]))
        names, aff = task_affinity(routes, active)
    except (ValueError, TypeError, IndexError) as err:
        msg = _note(f"routes.json could not be used: {err}")
        return msg, msg
    path = plot_usage(usage, tasks=tasks, layer_names=run.router.get("layer_names"),
                      path=out / PLOT_NAMES[2])
    shared = usage.sum(0)
    usage_html = _img(path.name, "lego usage") + (
        f'<p class="meta">{int((shared == 0).sum())} of {shared.size} legos unused, '
        f"{int((shared > 1).sum())} shared by two or more tasks.</p>"
    )
    path = plot_affinity(names, aff, path=out / PLOT_NAMES[3])
    return usage_html, _img(path.name, "task affinity") + _affinity_table(names, aff)


def _affinity_table(tasks: Sequence[str], aff: np.ndarray) -> str:
    """Per task: most / least similar other task and the mean affinity to the others."""
    if len(tasks) < 2:
        return ""
    rows = []
    for i, task in enumerate(tasks):
        others = [j for j in range(len(tasks)) if j != i]
        hi = max(others, key=lambda j: aff[i, j])
        lo = min(others, key=lambda j: aff[i, j])
        rows.append([_esc(task), f"{_esc(tasks[hi])} ({aff[i, hi]:.2f})",
                     f"{_esc(tasks[lo])} ({aff[i, lo]:.2f})", f"{aff[i, others].mean():.2f}"])
    return _table(["task", "most similar", "least similar", "mean affinity"], rows)


def write_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report/index.html`` and its PNG plots; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOT_NAMES:  # no stale plots from an earlier, longer report
        (out / name).unlink(missing_ok=True)
    run = load_run(run_dir)
    notes = list(run.notes)
    if run.skipped_lines:
        notes.append(f"{run.skipped_lines} malformed line(s) in metrics.jsonl were skipped")
    usage_html, affinity_html = _routes_sections(run, out)
    sections = [
        ("Summary", summary_section(run)),
        ("Training loss", _losses_section(run, out)),
        ("Validation metrics", _val_section(run, out)),
        ("Lego usage", usage_html),
        ("Task affinity", affinity_html),
        ("Route decisiveness", routing_section(run_dir, out, num_legos=run.router.get("num_legos"))),
    ]
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    page = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>gppf report: {_esc(run_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>gppf run report: {_esc(run_dir.name)}</h1>",
        f'<p class="meta">{_esc(run_dir.resolve())} · generated {stamp}</p>',
        *(_note(n) for n in notes),
        *(f"<h2>{_esc(title)}</h2>\n{body}" for title, body in sections),
        "</body></html>",
    ]
    index = out / "index.html"
    index.write_text("\n".join(page), encoding="utf-8")
    return index


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m gppf.report RUN_DIR``: write the report and print its path."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    print(write_report(parser.parse_args(argv).run_dir))



__all__ = [
    "RunData", "ema", "load_run", "plot_affinity", "plot_losses", "plot_usage", "plot_val_metrics",
    "read_metrics", "task_affinity", "usage_matrix", "val_series", "write_report",
]

if __name__ == "__main__":
    main()
