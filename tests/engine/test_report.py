"""Run report: HTML + PNGs from a synthetic run directory, affinity / usage helpers, partial runs."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from gppf.engine.report import (
    PLOT_NAMES,
    ema,
    plot_usage,
    read_metrics,
    task_affinity,
    usage_matrix,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["cls", "det", "seg"]
METRICS = {"cls": ["top1", "top5"], "det": ["map", "map50"], "seg": ["miou", "pixel_acc"]}


def make_run(
    run_dir: Path,
    *,
    tasks: list[str] = TASKS,
    train_lines: int = 20,
    val_lines: int = 3,
    num_layers: int = 4,
    num_legos: int = 8,
    active: int = 2,
    seed: int = 0,
) -> Path:
    """Fake run dir: metrics.jsonl, routes.json, router.json, config.yaml."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(train_lines):
        step = 10 * (i + 1)
        per_task = {f"loss/{t}": float(2.0 * math.exp(-step / 80) + 0.3 * rng.random() + 0.1 * k)
                    for k, t in enumerate(tasks)}
        lines.append({"kind": "train", "step": step, "loss": sum(per_task.values()), **per_task,
                      "lr": 1e-3, "time": 0.5 * step, "img_per_s": 400.0 + rng.random()})
    for v in range(val_lines):
        rec = {"kind": "val", "step": 10 * train_lines * (v + 1) // val_lines}
        for t in tasks:
            for m, metric in enumerate(METRICS.get(t, ["acc"])):
                rec[f"{t}/{metric}"] = 0.2 + 0.2 * v + 0.1 * m
                rec[f"{t}/chance/{metric}"] = 0.1 * (m + 1)
        lines.append(rec)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    routes = {t: [sorted(rng.choice(num_legos, active, replace=False).tolist())
                  for _ in range(num_layers)] for t in tasks}
    (run_dir / "routes.json").write_text(json.dumps(routes))
    router = {"tasks": tasks, "num_layers": num_layers, "num_legos": num_legos, "active": active,
              "layer_names": [f"layer{i // 4 + 1}.{i % 4}" for i in range(num_layers)],
              "primary_metric": {t: METRICS.get(t, ["acc"])[0] for t in tasks}}
    (run_dir / "router.json").write_text(json.dumps(router))
    (run_dir / "config.yaml").write_text("model:\n  backbone: gppf_r18\n  legos: 8\n  active: 2\n")
    return run_dir


def test_write_report_html_references_valid_pngs(tmp_path):
    index = write_report(make_run(tmp_path / "run"))
    assert index == tmp_path / "run" / "report" / "index.html"
    page = index.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == sorted(PLOT_NAMES)
    for name in srcs:
        png = index.parent / name
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 10_000, name
    assert "<style>" in page and "http" not in page.split("</head>")[0]  # self-contained
    for task in TASKS:
        assert f"<b>{task}</b>" in page
    assert "chance 0.1" in page and "<pre>" in page and "gppf_r18" in page
    assert "malformed" not in page and "no validation" not in page


def test_task_affinity_hand_example():
    # k=2: layer 1 shares one lego (1/2), layer 2 shares both (2/2) -> mean 0.75; c shares nothing
    routes = {"a": [[0, 1], [2, 3]], "b": [[1, 4], [2, 3]], "c": [[5, 6], [0, 1]]}
    tasks, aff = task_affinity(routes, active=2)
    assert tasks == ["a", "b", "c"]
    expected = np.array([[1.0, 0.75, 0.0], [0.75, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(aff, expected)
    with pytest.raises(ValueError, match="routing points"):
        task_affinity({"a": [[0, 1]], "b": [[0, 1], [2, 3]]}, active=2)


def test_usage_matrix_matches_routes():
    routes = {"a": [[0, 1], [2, 3]], "b": [[1, 4], [2, 3]]}
    usage = usage_matrix(routes, num_legos=6, tasks=["b", "a"])
    assert usage.shape == (2, 2, 6)
    assert usage[0, 0].tolist() == [0, 1, 0, 0, 1, 0]
    assert usage.sum(-1).tolist() == [[2, 2], [2, 2]]
    assert usage_matrix(routes).shape == (2, 2, 5)  # N inferred from the largest id
    with pytest.raises(ValueError, match="outside"):
        usage_matrix(routes, num_legos=3)


def test_usage_matrix_agrees_with_task_router():
    from gppf.lego.router import TaskRouter

    router = TaskRouter(tasks=["a", "b", "c"], num_layers=5, num_legos=8, active=3)
    usage = usage_matrix(router.routes(), num_legos=8, tasks=router.tasks)
    np.testing.assert_array_equal(usage, router.usage_TLN().numpy())


def test_partial_run_without_val_routes_or_config(tmp_path):
    run = make_run(tmp_path / "run", val_lines=0)
    for name in ("routes.json", "router.json", "config.yaml"):
        (run / name).unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 9\n')  # truncated line of a crashed run
        f.write("not json\n\n")
        f.write('["a list"]\n')
    page = write_report(run).read_text()
    assert "no validation results yet" in page
    assert "3 malformed line(s)" in page
    assert "no routes.json yet" in page and "no config.yaml" in page
    assert re.findall(r'<img src="([^"]+)"', page) == ["loss.png"]
    assert not (run / "report" / "val_metrics.png").exists()


def test_empty_run_dir(tmp_path):
    page = write_report(tmp_path).read_text()
    assert "no metrics.jsonl" in page and "<img" not in page
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


def test_read_metrics_sorts_and_keeps_last_write(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"kind": "train", "step": 2, "loss": 1.0}, {"kind": "train", "step": 1, "loss": 2.0},
            {"kind": "train", "step": 2, "loss": 0.5}, {"kind": "event", "step": 3}]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    train, val, skipped = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 2.0), (2, 0.5)]
    assert val == [] and skipped == 0


def test_ema_is_debiased_and_skips_nan():
    out = ema([1.0, 1.0, float("nan"), 1.0], span=3)
    np.testing.assert_allclose(out, [1.0, 1.0, 1.0, 1.0])
    assert ema([0.0, 10.0], span=1)[-1] == 10.0


def test_large_usage_layout_renders(tmp_path):
    """32 routing points x 16 legos x 6 tasks wraps into several rows and still renders."""
    rng = np.random.default_rng(0)
    tasks = ["cls", "det", "seg", "kp", "reid", "attr"]
    routes = {t: [sorted(rng.choice(16, 4, replace=False).tolist()) for _ in range(32)] for t in tasks}
    usage = usage_matrix(routes, num_legos=16)
    path = plot_usage(usage, tasks=tasks, layer_names=None, path=tmp_path / "usage.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
