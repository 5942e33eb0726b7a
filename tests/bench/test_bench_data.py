"""``gppf bench data``: dataset fallback, the per-worker measurement through the trainer's streams, JSON."""
from __future__ import annotations

import json

import pytest

from gppf.bench.data import main_data, per_worker_rates, task_config
from gppf.config import load_config
from gppf.data.pack import pack_config


def test_absent_dataset_falls_back_to_synthetic_and_says_so(tmp_path):
    (tmp_path / "camvid").mkdir()
    task, source = task_config("cifar10", root=tmp_path, limit=50)
    assert task["data"]["format"] == "synthetic" and task["data"]["options"]["num_train"] == 50
    assert source.startswith(f"synthetic: {tmp_path / 'cifar10'} not found")
    task, source = task_config("camvid", root=tmp_path, limit=50)
    assert task["data"]["format"] == "mask_png" and task["data"]["root"] == str(tmp_path / "camvid")
    assert source == f"real: {tmp_path / 'camvid'}"


def test_per_worker_rate_counts_batches_of_the_shard_stream(tmp_path):
    task = {"name": "t", "type": "classification", "image_size": 32, "batch_size": 4,
            "data": {"format": "synthetic", "options": {"domain": "flat", "size": 32, "num_train": 16, "num_val": 4}}}
    pack_config(load_config(base={"tasks": [task]}), out=tmp_path, show_progress=False)
    cfg = load_config(base={"tasks": [{**task, "data": {"format": "shards", "root": str(tmp_path / "t")}}]})
    rates = per_worker_rates({"shards": cfg}, batches=3, rounds=2)["shards"]
    assert rates["stream"] == "ShardTaskStream" and rates["samples_per_window"] == 12
    assert len(rates["windows_samples_per_s"]) == 2
    assert rates["samples_per_s"] == pytest.approx(sum(rates["windows_samples_per_s"]) / 2)


@pytest.mark.slow
def test_bench_data_quick_json(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GPPF_DATA", str(tmp_path))  # no real data: synthetic fallback, said so
    assert main_data(["--quick", "--json", "--datasets", "cifar10"]) == 0
    out = json.loads(capsys.readouterr().out)
    result = out["datasets"]["cifar10"]
    assert result["source"].startswith("synthetic") and result["packed_samples"] == 1000
    assert set(result["per_worker_samples_per_s"]) == {"files", "shards"}
    assert all(0.0 <= v < 1.0 for v in result["data_wait_fraction"].values())
