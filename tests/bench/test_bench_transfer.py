"""`gppf bench transfer`: Spearman helper, task selection, and an end-to-end smoke run (tiny setting)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gppf.bench import transfer as bt


def test_spearman_of_scores_and_results() -> None:
    scores = {"copy:a": 0.3, "copy:b": 0.1, "copy:c": 0.2}
    assert bt.spearman(scores, {"copy:a": 0.9, "copy:b": 0.5, "copy:c": 0.7}) == pytest.approx(1.0)
    assert bt.spearman(scores, {"copy:a": 0.5, "copy:b": 0.9, "copy:c": 0.7}) == pytest.approx(-1.0)
    assert bt.spearman(scores, {"copy:a": 0.5, "copy:b": 0.5, "copy:c": 0.5}) is None  # constant results
    assert bt.spearman({"copy:a": 1.0, "copy:b": 0.0}, {"copy:a": 1.0, "copy:b": 0.0}) is None  # < 3 candidates


def test_downstream_tasks_skip_missing_real_data(tmp_path: Path) -> None:
    (tmp_path / "cifar10").mkdir()
    configs, skipped = bt.downstream_tasks(["shapes_textured", "cifar10", "camvid"], root=tmp_path)
    assert [c["name"] for c in configs] == ["shapes_textured", "cifar10"]
    assert configs[1]["data"]["root"] == str(tmp_path / "cifar10")
    assert skipped == ["camvid"]
    with pytest.raises(ValueError, match="unknown downstream task"):
        bt.downstream_tasks(["imagenet"], root=tmp_path)


def test_pretraining_never_sees_the_downstream_domain() -> None:
    cfg = bt.pretrain_config(steps=2, width_mult=0.125)
    domains = {t.data.options["domain"] for t in cfg.tasks}
    assert "textured" not in domains
    assert all(bt.DOWNSTREAM[n](Path("."))["data"]["options"]["domain"] == "textured"
               for n in ("shapes_textured", "parts_textured"))


def test_bench_transfer_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pre-trains its own 2-step run, then every variant of one synthetic task for 2 steps; one JSON object."""
    argv = ["--tasks", "shapes_textured", "--pretrain-steps", "2", "--steps", "2", "--samples", "16",
            "--max-val", "8", "--width-mult", "0.125", "--data", str(tmp_path / "none"), "--json",
            "--out", str(tmp_path / "work")]
    assert bt.main_transfer(argv) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)  # stdout holds exactly one JSON object
    assert "gppf bench transfer" in out.err  # the table
    task = result["tasks"]["shapes_textured"]
    candidates = [f"copy:{t}" for t in result["pretrain"]["tasks"]]
    assert sorted(task["auto"]["scores"]) == sorted(candidates)
    copies = {f"full ({c})" for c in candidates}
    assert set(task["runs"]) == {"scratch", "linear", "full (auto)", "full (learn)", *copies}
    assert task["runs"]["full (auto)"]["same_run_as"] == f"full ({task['auto']['pick']})"
    assert task["auto"]["pick"] == max(task["auto"]["scores"], key=task["auto"]["scores"].get)
    assert all(0.0 <= r["metric"] <= 1.0 for r in task["runs"].values())
    assert task["spearman"] is None or -1.0 <= task["spearman"] <= 1.0
    # the fine-tuning runs are ordinary run directories; scratch did not load the pre-trained run
    assert (tmp_path / "work" / "shapes_textured-scratch" / "config.yaml").is_file()
    assert "source: none" in (tmp_path / "work" / "shapes_textured-scratch" / "config.yaml").read_text()
