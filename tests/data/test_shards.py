"""``gppf data pack`` + the ``shards`` format: exact round trip, layout, streaming, bad shards, data check."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gppf.cli import main as cli_main
from gppf.config import DataConfig, load_config
from gppf.data.base import READERS, DataError
from gppf.data.check import check_config
from gppf.data.pack import pack_config
from gppf.data.shards import MANIFEST
from gppf.data.collate import collate_batch

TYPES = [("classification", "flat"), ("multilabel", "pastel"), ("detection", "pastel"), ("segmentation", "noisy"),
         ("keypoints", "night"), ("reid", "mixed")]


def _task(kind: str, domain: str, *, num_train: int = 12, num_val: int = 6) -> dict:
    opts = {"domain": domain, "size": 32, "num_train": num_train, "num_val": num_val}
    if kind == "reid":
        opts.update(num_identities=10, num_val=20)
    return {"name": kind, "type": kind, "data": {"format": "synthetic", "options": opts}}


@pytest.fixture(scope="module")
def packed_all(tmp_path_factory):
    cfg = load_config(base={"tasks": [_task(k, d) for k, d in TYPES]})
    out = tmp_path_factory.mktemp("packed")
    manifests = pack_config(cfg, out=out, shard_mb=0.01, show_progress=False)
    return cfg, out, manifests


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (type(a) is type(b) and a.dtype == b.dtype and getattr(a, "format", None) == getattr(b, "format", None)
                and torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _shards(root: Path, **opts) -> DataConfig:
    return DataConfig(format="shards", root=str(root), options=opts)


def test_every_task_type_round_trips_exactly(packed_all):
    cfg, out, manifests = packed_all
    assert [(m["task"], m["split"]) for m in manifests] == [(k, s) for k, _ in TYPES for s in ("train", "val")]
    for task in cfg.tasks:
        for split in ("train", "val"):
            src = READERS.get("synthetic")(task.data, split=split, task_type=task.type, on_bad_sample="error")
            got = READERS.get("shards")(_shards(out / task.name), split=split, task_type=task.type,
                                        on_bad_sample="error")
            assert len(got) == len(src) and got.classes == src.classes
            for i in range(len(src)):
                (im_a, t_a), (im_b, t_b) = src[i], got[i]
                assert _equal(im_a, im_b), (task.name, split, i)
                assert _equal(t_a, t_b), (task.name, split, i, t_a, t_b)
    kp_src = READERS.get("synthetic")(cfg.tasks[4].data, split="val", task_type="keypoints", on_bad_sample="error")
    kp = READERS.get("shards")(_shards(out / "keypoints"), split="val", task_type="keypoints", on_bad_sample="error")
    for attr in ("keypoint_names", "sigmas", "skeleton", "flip_pairs"):
        assert _equal(getattr(kp_src, attr), getattr(kp, attr)), attr
    manifest = json.loads((out / "segmentation" / "train" / MANIFEST).read_text())
    assert manifest["count"] == 12 and len(manifest["shards"]) > 1
    assert sum(s["count"] for s in manifest["shards"]) == 12
    for s in manifest["shards"]:
        assert hashlib.sha256((out / "segmentation" / "train" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    with tarfile.open(out / "segmentation" / "train" / manifest["shards"][0]["name"]) as tar:  # standard tar
        names = tar.getnames()
    assert {"000000000.png", "000000000.mask.png", "000000000.target.json"} <= set(names)


def _imagefolder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.jpg")


def test_cli_pack_keeps_split_names_and_original_file_bytes(tmp_path, capsys):
    _imagefolder(tmp_path / "src")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"tasks": [{"name": "pets", "type": "classification", "data": {
        "format": "imagefolder", "root": str(tmp_path / "src"), "train": "train", "val": "test"}}]}))
    assert cli_main(["data", "pack", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "out/pets/test: 6 samples in 1 shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "pets").iterdir()) == ["test", "train"]
    with tarfile.open(tmp_path / "out" / "pets" / "test" / "shard-000000.tar") as tar:
        first = tar.extractfile("000000000.jpg").read()
    assert first == (tmp_path / "src" / "test" / "cat" / "0.jpg").read_bytes()
    assert cli_main(["data", "pack", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    cfg = load_config(base={"tasks": [{"name": "pets", "type": "classification", "data": {
        "format": "shards", "root": str(tmp_path / "out" / "pets"), "train": "train", "val": "test"}}]})
    report = check_config(cfg)
    assert [(r["split"], r["samples"], r["classes"], r["decoded"], r["problem_count"]) for r in report] == [
        ("train", 6, 2, 6, 0), ("val", 6, 2, 6, 0)]


def _stream_ids(reader, *, shard=(0, 1), start=None, batches: int, batch_size: int = 4):
    stream = iter(reader.stream(transform=None, collate=collate_batch, batch_size=batch_size, seed=3, shard=shard,
                                start=start))
    out = []
    for _ in range(batches):
        batch, meta = next(stream)
        out.append(([t["image_id"] for t in batch.targets], meta))
    return out


def test_stream_splits_shards_over_ranks_and_resumes_exactly(packed_all):
    _, out, _ = packed_all
    reader = READERS.get("shards")(_shards(out / "detection", shuffle_buffer=5), split="train",
                                   task_type="detection", on_bad_sample="error")
    assert len(reader.shards) == 3
    ranks = [_stream_ids(reader, shard=(r, 2), batches=3, batch_size=2) for r in (0, 1)]
    per_rank = [set(i for ids, meta in r if meta["epoch"] == 0 for i in ids) for r in ranks]
    assert not per_rank[0] & per_rank[1]  # disjoint shards per rank within an epoch
    full = _stream_ids(reader, batches=7)  # 12 samples, 4 per batch: crosses two epoch boundaries
    assert sorted(i for ids, _ in full[:3] for i in ids) == list(range(12))  # one epoch = every sample once
    assert [ids for ids, _ in full[:3]] != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # shuffled
    assert [ids for ids, _ in full[3:6]] != [ids for ids, _ in full[:3]]  # a new order each epoch
    for k in (1, 4):
        meta = full[k - 1][1]
        resumed = _stream_ids(reader, start={"workers": {"0": [meta["epoch"], meta["pulled"]]}}, batches=7 - k)
        assert [ids for ids, _ in resumed] == [ids for ids, _ in full[k:]]


def _split_copy(packed: Path, tmp_path: Path, task: str = "classification") -> tuple[Path, dict]:
    root = tmp_path / task
    shutil.copytree(packed / task, root)
    return root, json.loads((root / "train" / MANIFEST).read_text())


def _open(root: Path, policy: str = "error", task_type: str = "classification"):
    return READERS.get("shards")(_shards(root), split="train", task_type=task_type, on_bad_sample=policy)


def test_bad_shards_are_named(packed_all, tmp_path):
    _, out, _ = packed_all
    root, manifest = _split_copy(out, tmp_path)
    shard = root / "train" / manifest["shards"][1]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"shard {shard} is truncated: {len(data) // 2} of {len(data)} bytes"):
        _open(root)
    shard.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])
    ds = _open(root)
    first = manifest["shards"][0]["count"]
    with pytest.raises(DataError, match=rf"shard {shard}: checksum mismatch"):
        ds[first]
    assert ds[0][1]["image_id"] == 0  # other shards still read
    skipping = _open(root, policy="skip")
    image_ids = [skipping[i][1]["image_id"] for i in range(len(skipping))]
    assert skipping.bad.counts == {"bad_shard": manifest["shards"][1]["count"]}
    assert first not in image_ids and len(image_ids) == 12
    stream = iter(skipping.stream(transform=None, collate=collate_batch, batch_size=12, seed=0, shard=(0, 1),
                                  start={}))
    batch, meta = next(stream)
    assert any("checksum mismatch" in m for m in meta["bad"]) and first not in [t["image_id"] for t in batch.targets]
    (root / "train" / MANIFEST).unlink()
    with pytest.raises(DataError, match=rf"shard manifest not found: {root / 'train' / MANIFEST}"):
        _open(root)


def test_missing_target_member_is_named_and_data_check_reports_checksums(packed_all, tmp_path):
    _, out, _ = packed_all
    root, manifest = _split_copy(out, tmp_path)
    entry = manifest["shards"][0]
    shard = root / "train" / entry["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name != "000000001.target.json":
                tar.addfile(m, __import__("io").BytesIO(data))
    entry.update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (root / "train" / MANIFEST).write_text(json.dumps(manifest))
    ds = _open(root)
    assert ds[0][1]["image_id"] == 0
    with pytest.raises(DataError, match=rf"shard {shard} key '000000001': target member 'target.json' is missing"):
        ds[1]
    stream = iter(ds.stream(transform=None, collate=collate_batch, batch_size=4, seed=0, shard=(0, 1), start={}))
    with pytest.raises(DataError, match="key '000000001': target member 'target.json' is missing"):
        for _ in range(4):
            next(stream)
    other = root / "train" / manifest["shards"][1]["name"]
    other.write_bytes(other.read_bytes()[:-1] + b"\x01")
    cfg = load_config(base={"tasks": [{"name": "c", "type": "classification", "data": {
        "format": "shards", "root": str(root)}, "on_bad_sample": "skip"}]})
    row = check_config(cfg)[0]
    assert row["samples"] == 12 and row["classes"] == len(manifest["classes"])
    assert any(f"shard {other}: checksum mismatch" in p for p in row["problems"])
    assert any("target member 'target.json' is missing" in p for p in row["problems"])
