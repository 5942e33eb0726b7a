"""``gppf data pack CONFIG --out DIR``: write every task's splits, from any reader, as WebDataset shards.

Layout: ``DIR/<task name>/<split name>/{shard-000000.tar, ..., manifest.json}`` with the split names of the
source config; read back with ``data: {format: shards, root: DIR/<task name>, train: ..., val: ...}``.
Each split is written into a temporary directory and renamed into place when complete (atomic).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from webdataset.writer import TarWriter

import gppf.data.readers  # noqa: F401  (registers the file formats)
import gppf.data.synthetic  # noqa: F401  (registers the built-in synthetic format)
from gppf.config import ConfigError, RunConfig, TaskConfig, default_config_path, load_config
from gppf.data.base import READERS, DataError, SampleDataset
from gppf.data.check import _count_target
from gppf.data.readers.common import SKIPPED_KEY
from gppf.data.shards import FORMAT, IMAGE_SUFFIXES, MANIFEST, READER_META, TARGET_MEMBER, VERSION, decode_sample, encode_value


def source_path(ds: Any, index: int) -> Path | None:
    """The image file of sample ``index`` for the built-in file readers (``None`` when unknown)."""
    samples = getattr(ds, "samples", None)
    try:
        if hasattr(ds, "pairs"):
            return Path(ds.pairs[index][0])
        if samples is not None and hasattr(ds, "images") and not hasattr(ds, "files"):
            return Path(ds.images[samples[index][0]].path)
        if samples is not None and hasattr(ds, "files"):
            return Path(ds.files[samples[index][0]])
        if hasattr(ds, "files"):
            return Path(ds.files[index])
    except (AttributeError, IndexError, TypeError):
        return None
    return None


def image_member(ds: Any, index: int, image: torch.Tensor) -> tuple[str, bytes]:
    """``(suffix, bytes)``: the source file's bytes when they decode to exactly ``image``, else a PNG."""
    path = source_path(ds, index)
    suffix = path.suffix.lower().lstrip(".") if path is not None else ""
    if path is not None and suffix in IMAGE_SUFFIXES and path.is_file():
        data = path.read_bytes()
        probe = {suffix: data, TARGET_MEMBER: b"{}"}
        try:
            decoded, _ = decode_sample(probe, where=str(path))
        except DataError:
            decoded = None
        if decoded is not None and torch.equal(decoded.as_subclass(torch.Tensor), image.as_subclass(torch.Tensor)):
            return suffix, data
    buf = io.BytesIO()
    Image.fromarray(image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return "png", buf.getvalue()


class SplitWriter:
    """Writes numbered shards of at most ``shard_bytes`` into ``folder``; records name, count, bytes, sha256."""

    def __init__(self, folder: Path, *, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: TarWriter | None = None
        self._count = self._bytes = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._writer is not None and self._bytes >= self.shard_bytes:
            self._close()
        if self._writer is None:
            name = f"shard-{len(self.shards):06d}.tar"
            self._writer = TarWriter(str(self.folder / name), encoder=False, mtime=0, user="gppf", group="gppf")
            self.shards.append({"name": name})
            self._count = self._bytes = 0
        self._bytes += self._writer.write({"__key__": key, **members}) + 512 * (len(members) + 1)
        self._count += 1

    def _close(self) -> None:
        assert self._writer is not None
        self._writer.close()
        path = self.folder / self.shards[-1]["name"]
        data = path.read_bytes()
        self.shards[-1].update(count=self._count, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._close()
        return self.shards


def _reader_meta(ds: Any) -> dict[str, Any]:
    members: dict[str, bytes] = {}
    meta = {k: encode_value(getattr(ds, k), name=k, members=members) for k in READER_META
            if getattr(ds, k, None) is not None}
    if members:
        raise DataError(f"reader metadata {sorted(members)} cannot be stored in a manifest")
    return meta


def pack_split(task: TaskConfig, *, split: str, out: Path, shard_bytes: int, progress: Progress | None,
               limit: int | None = None) -> dict:
    """Pack one split of ``task`` into ``out`` (replaced atomically); returns its manifest.

    ``limit``: pack only that many evenly spaced samples (benchmarks, smoke tests).
    """
    ds: SampleDataset = READERS.get(task.data.format)(task.data, split=split, task_type=task.type,
                                                      on_bad_sample=task.on_bad_sample)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = SplitWriter(tmp, shard_bytes=shard_bytes)
    n = len(ds)
    indices = range(n) if limit is None or limit >= n else [(i * n) // limit for i in range(limit)]
    bar = progress.add_task(f"{task.name}/{out.name}", total=len(indices)) if progress is not None else None
    counts: dict[str, int] = {}
    written = 0
    for i in indices:
        image, target = ds[i]
        if progress is not None and bar is not None:
            progress.advance(bar)
        if i in target.get(SKIPPED_KEY, ()):  # bad sample (policy skip): the reader returned a later one
            continue
        target = {k: v for k, v in target.items() if k != SKIPPED_KEY}
        members: dict[str, bytes] = {}
        encoded = {k: encode_value(v, name=k, members=members) for k, v in target.items()}
        suffix, data = image_member(ds, i, image)
        members[suffix] = data
        members[TARGET_MEMBER] = json.dumps(encoded, separators=(",", ":")).encode()
        writer.write(f"{written:09d}", members)
        _count_target(target, counts)
        written += 1
    counter = getattr(ds, "annotation_counts", None)
    manifest = {
        "format": FORMAT, "version": VERSION, "task": task.name, "task_type": task.type, "split": out.name,
        "source": {"format": task.data.format, "root": task.data.root, "split": out.name}, "classes": list(ds.classes),
        "count": written, "skipped": ds.bad.total, "annotations": (counter() if callable(counter) else {}) or counts,
        "reader_meta": _reader_meta(ds), "shards": writer.close(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


def pack_config(cfg: RunConfig, *, out: Path, shard_mb: float = 64.0, overwrite: bool = False,
                show_progress: bool = True, limit: int | None = None) -> list[dict]:
    """Pack every task's train and val split into ``out/<task>/<split name>/``; returns the manifests."""
    targets = []
    for task in cfg.tasks:
        for split in ("train", "val"):
            name = task.data.train if split == "train" else task.data.val
            dest = out / task.name / name
            if any(d == dest for _, _, d in targets):
                continue  # train and val are the same split on disk
            if dest.exists() and not overwrite:
                raise DataError(f"{dest} already exists (pass --overwrite to replace it)")
            targets.append((task, split, dest))
    manifests = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, console=Console(stderr=True)) as progress:
        for task, split, dest in targets:
            manifests.append(pack_split(task, split=split, out=dest, shard_bytes=int(shard_mb * 2**20),
                                        progress=progress, limit=limit))
    return manifests


def main_pack(argv: list[str]) -> int:
    """``gppf data pack CONFIG --out DIR [--shard-size MB] [--overwrite] [key=value ...]``."""
    p = argparse.ArgumentParser(prog="gppf data pack", description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config YAML whose tasks are packed ('default': the built-in recipe)")
    p.add_argument("--out", required=True, help="output directory (DIR/<task>/<split>/)")
    p.add_argument("--shard-size", type=float, default=64.0, metavar="MB", help="target shard size (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace splits that already exist")
    p.add_argument("--limit", type=int, metavar="N", help="pack only N evenly spaced samples per split")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # overrides may follow options
    try:
        cfg = load_config(default_config_path() if args.config == "default" else args.config, args.overrides)
        manifests = pack_config(cfg, out=Path(args.out), shard_mb=args.shard_size, overwrite=args.overwrite,
                                show_progress=not args.no_progress, limit=args.limit)
    except (ConfigError, DataError) as exc:
        print(f"gppf data pack: error: {exc}", file=sys.stderr)
        return 1
    for m in manifests:
        print(f"{args.out}/{m['task']}/{m['split']}: {m['count']} samples in {len(m['shards'])} shard(s), "
              f"{m['skipped']} skipped, {len(m['classes'])} classes")
    return 0
