"""The ``shards`` data format: WebDataset tar shards written by ``gppf data pack`` (see docs/shards.md).

A split directory holds ``shard-NNNNNN.tar`` files and ``manifest.json`` (format version, task type,
classes, reader metadata, sample count, and per shard: name, samples, bytes, sha256). A sample is the
group of tar members sharing a key (WebDataset convention ``<key>.<suffix>``): the encoded image
(``jpg``/``png``/..., the source file's bytes when it had one) and ``target.json``; masks are stored as
``<key>.<name>.png`` (or ``.npy`` when not uint8-representable).

Two ways to read a split:

* ``ShardReader`` (registered reader): map-style, indexes tar members on first access; used for
  validation, ``gppf data check`` and task types that need random access (P x K re-id sampling);
* ``ShardStream``: the training stream; shard-level splitting over ranks x loader workers, a seeded
  shuffle buffer, and an exact position (see ``ShardStream``).
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import random
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision import tv_tensors
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_iterator

from gppf.config import DataConfig
from gppf.data.base import BadSamples, DataError, OnBad
from gppf.data.readers.common import ReaderDataset, SampleError, check_options, split_name
from gppf.data.readers.images import IMAGE_EXTENSIONS, _DECODE_ERRORS, _to_rgb

FORMAT = "gppf-shards"
VERSION = 1
MANIFEST = "manifest.json"
TARGET_MEMBER = "target.json"
IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
READER_META = ("cat_ids", "num_keypoints", "keypoint_names", "sigmas", "skeleton", "flip_pairs", "identity_offset")
"""JSON-able reader attributes task types read (``reader_of(ds).<attr>``); packed into the manifest."""


# ----------------------------------------------------------------------------- target (de)serialisation
def encode_value(value: Any, *, name: str, members: dict[str, bytes]) -> Any:
    """A target value as JSON; 2-D masks go to ``members[<name>.png|npy]`` (referenced by suffix)."""
    if isinstance(value, tv_tensors.Mask) and value.ndim == 2:
        arr = value.as_subclass(torch.Tensor).numpy()
        buf = io.BytesIO()
        if arr.size and 0 <= arr.min() and arr.max() <= 255:
            Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
            suffix = f"{name}.png"
        else:
            np.save(buf, arr, allow_pickle=False)
            suffix = f"{name}.npy"
        members[suffix] = buf.getvalue()
        return {"t": "mask", "member": suffix, "dtype": str(arr.dtype)}
    if isinstance(value, torch.Tensor):
        plain = value.as_subclass(torch.Tensor)
        out = {"t": "tensor", "dtype": str(plain.dtype).removeprefix("torch."), "shape": list(plain.shape),
               "data": plain.reshape(-1).tolist()}
        if isinstance(value, tv_tensors.BoundingBoxes):
            out.update(t="boxes", format=value.format.name, canvas_size=list(value.canvas_size))
        elif isinstance(value, tv_tensors.Mask):
            out["t"] = "masktensor"
        return out
    if isinstance(value, np.ndarray):
        return {"t": "ndarray", "dtype": str(value.dtype), "shape": list(value.shape), "data": value.reshape(-1).tolist()}
    if isinstance(value, tuple):
        return {"t": "tuple", "v": [encode_value(v, name=f"{name}_{i}", members=members) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_value(v, name=f"{name}_{i}", members=members) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {"t": "dict", "v": {k: encode_value(v, name=f"{name}_{k}", members=members) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DataError(f"cannot store target value {name!r} of type {type(value).__name__} in a shard")


def decode_value(value: Any, *, members: dict[str, bytes], where: str) -> Any:
    """Inverse of ``encode_value``."""
    if isinstance(value, list):
        return [decode_value(v, members=members, where=where) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value["t"]
    if kind == "tuple":
        return tuple(decode_value(v, members=members, where=where) for v in value["v"])
    if kind == "dict":
        return {k: decode_value(v, members=members, where=where) for k, v in value["v"].items()}
    if kind == "mask":
        data = members.get(value["member"])
        if data is None:
            raise SampleError(f"{where}: target member '{value['member']}' is missing", kind="missing_target")
        arr = np.load(io.BytesIO(data)) if value["member"].endswith(".npy") else np.array(Image.open(io.BytesIO(data)))
        return tv_tensors.Mask(torch.from_numpy(arr.astype(value["dtype"])))
    if kind == "ndarray":
        return np.array(value["data"], dtype=value["dtype"]).reshape(value["shape"])
    tensor = torch.tensor(value["data"], dtype=getattr(torch, value["dtype"])).reshape(value["shape"])
    if kind == "boxes":
        return tv_tensors.BoundingBoxes(tensor, format=value["format"], canvas_size=tuple(value["canvas_size"]))
    return tv_tensors.Mask(tensor) if kind == "masktensor" else tensor


def decode_sample(members: dict[str, bytes], *, where: str) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """``(image uint8 [3,H,W], target)`` from one sample's tar members (``SampleError`` names ``where``)."""
    images = [s for s in members if s in IMAGE_SUFFIXES]
    if len(images) != 1:
        raise SampleError(f"{where}: expected one image member, found {sorted(members)}", kind="missing_image")
    if TARGET_MEMBER not in members:
        raise SampleError(f"{where}: target member '{TARGET_MEMBER}' is missing (members: {sorted(members)})",
                          kind="missing_target")
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(members[images[0]])) as im:
            warnings.simplefilter("ignore", UserWarning)
            im.load()
            arr = _to_rgb(im)
        target = json.loads(members[TARGET_MEMBER])
    except (*_DECODE_ERRORS, json.JSONDecodeError) as exc:
        raise SampleError(f"{where}: cannot decode: {exc}", kind="corrupt_image") from exc
    image = tv_tensors.Image(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
    return image, {k: decode_value(v, members=members, where=where) for k, v in target.items()}


# ----------------------------------------------------------------------------- manifest and shard files
@dataclass(frozen=True)
class ShardInfo:
    path: Path
    count: int
    bytes: int
    sha256: str


def read_manifest(split_dir: Path) -> dict[str, Any]:
    """The split's manifest; ``DataError`` naming the file when missing, unreadable or of another format."""
    path = split_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"shard manifest not found: {path} (write shards with 'gppf data pack')")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"shard manifest {path} is unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"shard manifest {path}: format {manifest.get('format')!r} version "
                        f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    return manifest


def shard_infos(split_dir: Path, manifest: dict[str, Any]) -> list[ShardInfo]:
    return [ShardInfo(split_dir / s["name"], int(s["count"]), int(s["bytes"]), str(s["sha256"]))
            for s in manifest["shards"]]


def check_size(shard: ShardInfo) -> None:
    """Cheap check (stat only): the shard exists and has the manifest's size."""
    if not shard.path.is_file():
        raise SampleError(f"shard {shard.path} is missing (listed in the manifest)", kind="bad_shard")
    size = shard.path.stat().st_size
    if size < shard.bytes:
        raise SampleError(f"shard {shard.path} is truncated: {size} of {shard.bytes} bytes (manifest)",
                          kind="bad_shard")
    if size != shard.bytes:
        raise SampleError(f"shard {shard.path} has {size} bytes, the manifest says {shard.bytes}", kind="bad_shard")


def read_shard(shard: ShardInfo) -> bytes:
    """The shard's bytes after checking size and sha256 against the manifest."""
    check_size(shard)
    data = shard.path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise SampleError(f"shard {shard.path}: checksum mismatch (sha256 {digest[:16]}..., manifest "
                          f"{shard.sha256[:16]}...)", kind="bad_shard")
    return data


def shard_samples(shard: ShardInfo, data: bytes) -> Iterator[dict[str, Any]]:
    """Group a verified shard's members into samples ``{"__key__", <suffix>: bytes}`` (WebDataset)."""
    files = ({**f, "__url__": str(shard.path)} for f in tar_file_iterator(io.BytesIO(data)))
    count = 0
    try:
        for sample in group_by_keys(files):
            count += 1
            yield sample
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise SampleError(f"shard {shard.path} is not a readable tar: {exc}", kind="bad_shard") from exc
    if count != shard.count:
        raise SampleError(f"shard {shard.path} holds {count} samples, the manifest says {shard.count}",
                          kind="bad_shard")


def members_of(sample: dict[str, Any]) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


# ----------------------------------------------------------------------------- map-style reader
class ShardReader(ReaderDataset):
    """Map-style view of a packed split; sample ``i`` is the i-th in manifest order (= the source reader's)."""

    def __init__(self, *, split_dir: Path, manifest: dict[str, Any], policy: OnBad, task_type: str,
                 shuffle_buffer: int) -> None:
        super().__init__(classes=manifest["classes"], policy=policy, where=str(split_dir), task_type=task_type)
        self.split_dir = split_dir
        self.manifest = manifest
        self.shards = shard_infos(split_dir, manifest)
        self.shuffle_buffer = shuffle_buffer
        for key, value in manifest.get("reader_meta", {}).items():
            setattr(self, key, decode_value(value, members={}, where=str(split_dir)))
        self._starts = np.cumsum([0] + [s.count for s in self.shards]).tolist()
        self._index: dict[int, list[tuple[str, dict[str, tuple[int, int]]]]] = {}
        self._bad_shards: dict[int, SampleError] = {}
        for i, shard in enumerate(self.shards):
            try:
                check_size(shard)
            except SampleError as exc:
                if policy == "error":
                    raise
                self._bad_shards[i] = exc

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard_index(self, i: int) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        """Member offsets of shard ``i`` (verified against the manifest on first use)."""
        if i in self._bad_shards:
            raise self._bad_shards[i]
        if i not in self._index:
            try:
                data = read_shard(self.shards[i])
                entries: list[tuple[str, dict[str, tuple[int, int]]]] = []
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                    for m in tar.getmembers():
                        if m.isreg() and "." in m.name:
                            key, suffix = m.name.split(".", 1)
                            if not entries or entries[-1][0] != key:
                                entries.append((key, {}))
                            entries[-1][1][suffix] = (m.offset_data, m.size)
            except tarfile.TarError as exc:
                self._bad_shards[i] = SampleError(f"shard {self.shards[i].path} is not a readable tar: {exc}",
                                                  kind="bad_shard")
                raise self._bad_shards[i] from exc
            except SampleError as exc:
                self._bad_shards[i] = exc
                raise
            if len(entries) != self.shards[i].count:
                self._bad_shards[i] = SampleError(f"shard {self.shards[i].path} holds {len(entries)} samples, "
                                                  f"the manifest says {self.shards[i].count}", kind="bad_shard")
                raise self._bad_shards[i]
            self._index[i] = entries
        return self._index[i]

    def _load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        s = bisect.bisect_right(self._starts, index) - 1
        key, offsets = self._shard_index(s)[index - self._starts[s]]
        members = {}
        with self.shards[s].path.open("rb") as f:
            for suffix, (offset, size) in offsets.items():
                f.seek(offset)
                members[suffix] = f.read(size)
        return decode_sample(members, where=f"shard {self.shards[s].path} key '{key}'")

    def verify(self) -> list[str]:
        """Every shard against the manifest (size, sha256, sample count); one message per bad shard."""
        problems = []
        for i in range(len(self.shards)):
            try:
                self._shard_index(i)
            except SampleError as exc:
                problems.append(str(exc))
        return problems

    def annotation_counts(self) -> dict[str, int]:
        return dict(self.manifest.get("annotations", {}))

    def stream(self, *, transform: Callable | None, collate: Callable, batch_size: int, seed: int,
               shard: tuple[int, int], start: dict[str, Any] | None) -> "ShardStream":
        """The training stream of this split (see ``ShardStream``)."""
        return ShardStream(shards=self.shards, transform=transform, collate=collate, batch_size=batch_size,
                           seed=seed, shard=shard, buffer=self.shuffle_buffer, start=start or {},
                           bad=BadSamples(policy=self.bad.policy, where=self.where))


# ----------------------------------------------------------------------------- training stream
class ShardStream(IterableDataset):
    """Infinite stream of collated batches ``(batch, meta)`` for one rank, split over its loader workers.

    Slots: rank ``r`` of ``R`` (ranks training the task) and loader worker ``w`` of ``W`` read slot
    ``r * W + w`` of ``S = R * W``. Each epoch the shard list is permuted (seed, epoch); a slot reads shards
    ``[slot::S]`` (shard-level splitting) or, with fewer shards than slots, every shard keeping samples
    ``n % S == slot``. Samples pass a seeded WebDataset shuffle buffer (seed, epoch, slot), then decode +
    transform under a per-sample RNG seed. ``meta`` = ``{"worker", "epoch", "pulled", "bad"}``: ``pulled``
    counts raw samples taken from the shuffle buffer in that epoch when the batch was complete, so resuming
    at ``(epoch, pulled)`` re-reads (without decoding) that prefix and continues on the same samples.
    ``start`` = ``{"offset": o, "workers": {logical worker: [epoch, pulled]}}``; physical worker ``p`` plays
    logical worker ``(p + o) % W`` so the loader's round-robin continues where it stopped.
    """

    def __init__(self, *, shards: list[ShardInfo], transform: Callable | None, collate: Callable, batch_size: int,
                 seed: int, shard: tuple[int, int], buffer: int, start: dict[str, Any], bad: BadSamples) -> None:
        self.shards, self.transform, self.collate = shards, transform, collate
        self.batch_size, self.seed, self.buffer, self.bad = batch_size, seed, buffer, bad
        self.rank, self.ranks = shard
        self.start = start

    def _epoch_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        order = list(range(len(self.shards)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        by_shard = len(order) >= slots
        mine = order[slot::slots] if by_shard else order
        n = 0
        for i in mine:
            try:
                data = read_shard(self.shards[i])
                for sample in shard_samples(self.shards[i], data):
                    n += 1
                    if by_shard or (n - 1) % slots == slot:
                        yield sample
            except SampleError as exc:
                self.bad.report(exc.kind, str(exc))  # raises under policy 'error'
                yield {"__bad__": str(exc)}

    def _decode(self, sample: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
        where = f"shard {sample.get('__url__')} key '{sample.get('__key__')}'"
        image, target = decode_sample(members_of(sample), where=where)
        if self.transform is None:
            return image, target
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(image, dict(target))

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        info = get_worker_info()
        phys, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (phys + int(self.start.get("offset", 0))) % workers
        slots, slot = self.ranks * workers, self.rank * workers + logical
        epoch, skip = self.start.get("workers", {}).get(str(logical), [0, 0])
        samples: list[tuple[Any, dict[str, Any]]] = []
        bad: list[str] = []
        while True:
            stream = wds_shuffle(bufsize=self.buffer, initial=self.buffer, seed=hash((self.seed, epoch, slot)))(
                self._epoch_samples(epoch, slot, slots))
            pulled = 0
            for raw in stream:
                pulled += 1
                if pulled <= skip:
                    continue
                if "__bad__" in raw:
                    bad.append(raw["__bad__"])
                    continue
                try:
                    samples.append(self._decode(raw, (hash((self.seed, epoch, slot, pulled)) & (2**62 - 1))))
                except SampleError as exc:
                    self.bad.report(exc.kind, str(exc))
                    bad.append(str(exc))
                    continue
                if len(samples) == self.batch_size:
                    yield self.collate(samples), {"worker": logical, "epoch": epoch, "pulled": pulled, "bad": bad}
                    samples, bad = [], []
            if pulled == 0:
                raise DataError(f"shard stream slot {slot} of {slots} read no samples in epoch {epoch} "
                                f"({len(self.shards)} shards)")
            epoch, skip = epoch + 1, 0


def build(cfg: DataConfig, *, split: str, task_type: str, on_bad_sample: OnBad = "error") -> ShardReader:
    """Reader of ``<root>/<split name>/`` written by ``gppf data pack``; options: ``shuffle_buffer`` (1000)."""
    opts = check_options(cfg, allowed={"shuffle_buffer": int}, reader="shards")
    split_dir = Path(cfg.root).expanduser() / split_name(cfg, split)
    manifest = read_manifest(split_dir)
    if manifest["task_type"] != task_type:
        raise DataError(f"shards in {split_dir} were packed for task type '{manifest['task_type']}', "
                        f"not '{task_type}'")
    buffer = int(opts.get("shuffle_buffer", 1000))
    if buffer < 1:
        raise DataError("data.options.shuffle_buffer must be >= 1")
    return ShardReader(split_dir=split_dir, manifest=manifest, policy=on_bad_sample, task_type=task_type,
                       shuffle_buffer=buffer)
