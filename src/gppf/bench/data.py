"""``gppf bench data``: data throughput from packed shards vs the original files, and data wait in training.

For CIFAR-10 (many small JPEG files) and CamVid (480x360 JPEG + PNG label maps), read in place from
``$GPPF_DATA`` or ``<repo>/../shared/data`` (falling back to the built-in synthetic data, said so in
``source``, when a dataset is absent):

* ``per_worker_samples_per_s``: samples/s of ONE loader process (one intra-op thread, as in a DataLoader
  worker) producing training batches: read + decode + train transform + collate, through the trainer's own
  streams (``TaskStream`` over the file reader in random order; ``ShardTaskStream`` over the packed split:
  sequential tar reads, sha256 check, shuffle buffer); median of interleaved timing windows. The files
  were just read by the packer, the shards just written: both from a warm page cache (local disk);
* ``data_wait_fraction``: share of the wall time of real training steps (one task, ``--workers`` loader
  workers) spent blocked waiting for the next batch, from shards and from files.

``--quick``: subsets (CIFAR-10 1,000 images, CamVid 48) and few steps.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gppf.bench.common import bench_parser, emit, env_info, fixed_threads

DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "type": "classification", "image_size": 32, "batch_size": 64,
        "data": {"format": "imagefolder", "train": "train", "val": "test"},
        "synthetic": {"domain": "flat", "size": 32}, "limit": {"full": 10000, "quick": 1000},
    },
    "camvid": {
        "type": "segmentation", "image_size": 128, "batch_size": 8,
        "data": {"format": "mask_png", "train": "train", "val": "val", "options": {"ignore_index": 11},
                 "classes": ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                             "Pedestrian", "Bicyclist", "Unlabelled"]},
        "synthetic": {"domain": "noisy", "size": 360}, "limit": {"full": 367, "quick": 48},
    },
}
SIZES = {"full": {"batches": 4, "rounds": 5, "warmup": 2, "steps": 20},
         "quick": {"batches": 2, "rounds": 1, "warmup": 1, "steps": 4}}
MODEL = {"backbone": "gppf_r18", "legos": 8, "active": 2, "width_mult": 0.5}


def data_root() -> Path:
    """``$GPPF_DATA`` or ``<repo>/../shared/data`` (may not exist)."""
    env = os.environ.get("GPPF_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "data"


def task_config(name: str, *, root: Path, limit: int) -> tuple[dict[str, Any], str]:
    """The file-reader task dict of dataset ``name`` and where its data comes from."""
    spec = DATASETS[name]
    task = {"name": name, "type": spec["type"], "image_size": spec["image_size"], "batch_size": spec["batch_size"]}
    if (root / name).is_dir():
        return {**task, "data": {**spec["data"], "root": str(root / name)}}, f"real: {root / name}"
    synth = {**spec["synthetic"], "num_train": limit, "num_val": 8}
    return ({**task, "data": {"format": "synthetic", "options": synth}},
            f"synthetic: {root / name} not found, built-in synthetic data instead (generated in memory, no files)")


def train_stream(run_cfg: Any) -> Any:
    """The trainer's stream of the run's only task (rank 0 of 1, ``train.num_workers`` of the config)."""
    from gppf.engine.distributed import DistInfo
    from gppf.engine.trainer import _streams, build_tasks

    tasks = build_tasks(run_cfg, feature_channels=[8, 16, 32, 64], pooled_dim=64)
    (stream,) = _streams(run_cfg, tasks, {n: [0] for n in tasks}, DistInfo(), None).values()
    return stream


def per_worker_rates(run_cfgs: dict[str, Any], *, batches: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Samples/s of one single-threaded loader per config, timed in ``rounds`` interleaved windows of
    ``batches`` batches (load on a shared machine hits both alike); the median window counts."""
    with fixed_threads(1):
        streams = {k: train_stream(cfg) for k, cfg in run_cfgs.items()}
        for s in streams.values():
            next(s)  # first batch: opens shards / fills the shuffle buffer
        windows: dict[str, list[float]] = {k: [] for k in streams}
        for _ in range(rounds):
            for kind, s in streams.items():
                t0, n = time.perf_counter(), 0
                for _ in range(batches):
                    n += len(next(s))
                windows[kind].append(n / (time.perf_counter() - t0))
    return {k: {"samples_per_s": statistics.median(w), "windows_samples_per_s": w, "samples_per_window": n,
                "stream": type(streams[k]).__name__} for k, w in windows.items()}


def data_wait(run_cfg: Any, *, warmup: int, steps: int) -> dict[str, Any]:
    """Data wait of real training steps on the run config (``bench simt``'s measurement)."""
    from gppf.bench.simt import close_streams, measure_data_wait
    from gppf.engine.trainer import build_run

    with tempfile.TemporaryDirectory(prefix="gppf-bench-data-") as tmp:
        run = build_run(run_cfg, run_dir=Path(tmp), resume=False)
        try:
            m = measure_data_wait(run, warmup=warmup, steps=steps)
        finally:
            close_streams(run)
    return {"fraction": m["wait_s"] / m["wall_s"], "median_step_s": m["median_step_s"],
            "median_wait_s": m["median_wait_s"], "steps": steps}


def bench_dataset(name: str, *, root: Path, out: Path, quick: bool, workers: int, shard_mb: float) -> dict[str, Any]:
    """Pack ``name``'s train split (a subset) and measure files vs shards."""
    from gppf.config import load_config
    from gppf.data.pack import pack_split

    size = SIZES["quick" if quick else "full"]
    limit = DATASETS[name]["limit"]["quick" if quick else "full"]
    task, source = task_config(name, root=root, limit=limit)
    files_cfg = load_config(base={"tasks": [task]})
    t0 = time.perf_counter()
    split = files_cfg.tasks[0].data.train
    manifest = pack_split(files_cfg.tasks[0], split="train", out=out / name / split,
                          shard_bytes=int(shard_mb * 2**20), progress=None, limit=limit)
    pack_s = time.perf_counter() - t0
    packed = {**task, "data": {"format": "shards", "root": str(out / name), "train": split, "val": split}}
    train = {"progress": False, "eval_every": 0, "checkpoint_every": 0, "num_workers": workers,
             "steps": size["steps"] + size["warmup"], "amp": "none"}
    # the files run samples from the same subset: the packed indices are its ``max`` evenly spaced samples
    runs = {kind: load_config(base={"model": MODEL, "tasks": [t], "train": train})
            for kind, t in (("files", task), ("shards", packed))}
    workers0 = {k: load_config(base={"tasks": [t]}, overrides=["train.num_workers=0"])
                for k, t in (("files", task), ("shards", packed))}
    rates = per_worker_rates(workers0, batches=size["batches"], rounds=size["rounds"])
    waits = {kind: data_wait(cfg, warmup=size["warmup"], steps=size["steps"]) for kind, cfg in runs.items()}
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    return {
        "source": source, "task_type": task["type"], "image_size": task["image_size"],
        "batch_size": task["batch_size"], "packed_samples": manifest["count"], "shards": len(manifest["shards"]),
        "bytes_per_sample": shard_bytes / max(1, manifest["count"]), "pack_s": pack_s,
        "per_worker_samples_per_s": {k: v["samples_per_s"] for k, v in rates.items()},
        "shards_vs_files": rates["shards"]["samples_per_s"] / rates["files"]["samples_per_s"],
        "data_wait_fraction": {k: v["fraction"] for k, v in waits.items()},
        "detail": {"per_worker": rates, "data_wait": waits},
    }


def run_data_bench(*, quick: bool, workers: int, shard_mb: float, datasets: list[str]) -> dict[str, Any]:
    root = data_root()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gppf-bench-shards-") as tmp:
        results = {name: bench_dataset(name, root=root, out=Path(tmp), quick=quick, workers=workers,
                                       shard_mb=shard_mb) for name in datasets}
    return {
        "bench": "data",
        "per_worker_samples_per_s": {n: r["per_worker_samples_per_s"] for n, r in results.items()},
        "data_wait_fraction": {n: r["data_wait_fraction"] for n, r in results.items()},
        "datasets": results,
        "config": {"quick": quick, "loader_workers": workers, "shard_mb": shard_mb, "model": MODEL,
                   "data_root": str(root), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "load_avg_1m": [load_before, os.getloadavg()[0]], **env_info()},
    }


def main_data(argv: list[str]) -> int:
    """CLI entry: ``gppf bench data [--json] [--quick] [--workers N] [--shard-size MB] [--datasets ...]``."""
    p = bench_parser("data", __doc__, quick="dataset subsets and few steps")
    p.add_argument("--workers", type=int, default=1, help="loader workers of the data-wait runs (default 1)")
    p.add_argument("--shard-size", type=float, default=64.0, metavar="MB")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    args = p.parse_args(argv)
    result = run_data_bench(quick=args.quick, workers=args.workers, shard_mb=args.shard_size,
                            datasets=args.datasets)
    emit(result, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main_data(sys.argv[1:]))
