"""Checkpoints: safetensors + JSON, atomic directory writes, keep-last-K, never pickle.

Layout of ``<run_dir>/checkpoints/step_000123/``:

- ``model.safetensors``: ``model.<name>`` and ``extra.<module>.<name>`` state-dict tensors
- ``optimizer.safetensors``: optimizer tensors (``state.<param_index>.<key>``) and any ``scheduler.*`` tensors
- ``rng.safetensors``: RNG states (see :func:`capture_rng`)
- ``state.json``: format and version, step, optimizer param groups (lr, ...) and non-tensor state,
  scheduler state dict, extra module names, user state. Tensors are referenced as
  ``{"__tensor__": name}``, tuples as ``{"__tuple__": [...]}``, int-keyed dicts as ``{"__int_keys__": {...}}``.

A checkpoint is written into ``step_000123.tmp/`` and renamed into place with ``os.replace``; the file
``checkpoints/latest`` (also replaced atomically) names the newest. One writer per run directory.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

FORMAT = "gppf-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_REQUIRED = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
_ALLOWED_SUFFIXES = (".safetensors", ".json")
_MARKERS = ("__tensor__", "__tuple__", "__int_keys__")

__all__ = [
    "CheckpointError",
    "capture_rng",
    "find_latest",
    "load_checkpoint",
    "load_weights",
    "restore_rng",
    "save_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint or weight file that cannot be written or safely read; the message names it."""


# ----------------------------------------------------------------------------- JSON <-> tensors


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _encode(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able view of ``obj``; tensors are moved into ``tensors`` under their dotted path ``key``."""
    if isinstance(obj, Tensor):
        if key in tensors:
            raise CheckpointError(f"cannot store '{key}': two tensors map to the same name")
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, _join(key, i), tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        return _encode_dict(obj, key, tensors)
    raise CheckpointError(f"cannot store '{key}': {type(obj).__name__} is neither JSON data nor a tensor")


def _encode_dict(obj: dict[Any, Any], key: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    if all(isinstance(k, str) for k in obj):
        reserved = [k for k in obj if k in _MARKERS]
        if reserved:
            raise CheckpointError(f"cannot store '{key}': key {reserved[0]!r} is reserved")
        return {k: _encode(v, _join(key, k), tensors) for k, v in obj.items()}
    if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
        return {"__int_keys__": {str(k): _encode(v, _join(key, k), tensors) for k, v in obj.items()}}
    raise CheckpointError(f"cannot store '{key}': dict keys must be all strings or all integers")


def _decode(obj: Any, tensors: Mapping[str, Tensor], where: Path) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        name = obj["__tensor__"]
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor '{name}' referenced by state.json is missing")
        return tensors[name]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__int_keys__" in obj:
        return {int(k): _decode(v, tensors, where) for k, v in obj["__int_keys__"].items()}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _check_json(state: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        json.dumps(state)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} must be JSON data: {exc}") from exc
    return dict(state)


# ----------------------------------------------------------------------------- files


def _storable(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors without shared storage, as safetensors requires."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_tensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    meta = {"format": FORMAT, "version": str(VERSION)}
    save_file(_storable(tensors), str(path), metadata=meta)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file (the only way weights are read); damage becomes a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable or corrupt JSON ({exc})") from exc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- save


def _model_tensors(model: nn.Module, extra: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    parts = [("model", model)] + [(f"extra.{name}", mod) for name, mod in sorted(extra.items())]
    for prefix, module in parts:
        for key, value in module.state_dict().items():
            if not isinstance(value, Tensor):
                raise CheckpointError(f"state entry '{prefix}.{key}' is a {type(value).__name__}, not a tensor")
            out[f"{prefix}.{key}"] = value
    return out


def _write_payload(
    folder: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler | None,
    extra: Mapping[str, nn.Module],
    state: Mapping[str, Any],
    rng: Mapping[str, Tensor],
) -> None:
    opt_tensors: dict[str, Tensor] = {}
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "optimizer": _encode(optimizer.state_dict(), "", opt_tensors),
        "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), "scheduler", opt_tensors),
        "extra_modules": sorted(extra),
        "user": _check_json(state, "checkpoint user state"),
    }
    _write_tensors(folder / "model.safetensors", _model_tensors(model, extra))
    _write_tensors(folder / "optimizer.safetensors", opt_tensors)
    _write_tensors(folder / "rng.safetensors", dict(rng))
    (folder / "state.json").write_text(json.dumps(doc, indent=1))
    for name in _REQUIRED:
        _fsync(folder / name)
    _fsync(folder)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` (same step saved again) is replaced."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders under ``root``, oldest step first (``.tmp``/``.old`` are ignored)."""
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir() and (entry / "state.json").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(root: Path, *, keep_last: int, keep: Path) -> None:
    """Keep ``keep`` plus the ``keep_last - 1`` highest other steps; drop stale ``.tmp``/``.old`` folders."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith("step_") and entry.suffix in (".tmp", ".old"):
            shutil.rmtree(entry, ignore_errors=True)
    if keep_last == 0:
        return
    others = [path for _, path in reversed(_step_dirs(root)) if path != keep]
    for path in others[keep_last - 1 :]:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    run_dir: Path | str,
    *,
    step: int,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler | None = None,
    extra_modules: Mapping[str, nn.Module] | None = None,
    state: Mapping[str, Any] | None = None,
    rng: Mapping[str, Tensor] | None = None,
    keep_last: int = 3,
) -> Path:
    """Atomically write ``<run_dir>/checkpoints/step_<step>/`` and return its path.

    ``extra_modules`` (e.g. loss weighting) are saved next to the model; ``state`` is JSON user state
    (sampler positions, counters, config); ``rng`` comes from :func:`capture_rng`. Afterwards only the
    newest ``keep_last`` checkpoints remain (the one just written always does); ``keep_last=0`` keeps all.
    """
    if step < 0 or keep_last < 0:
        raise ValueError(f"step and keep_last must be >= 0, got step={step}, keep_last={keep_last}")
    extra = dict(extra_modules or {})
    dotted = [name for name in extra if not name or "." in name]
    if dotted:
        raise ValueError(f"extra module names must be non-empty and contain no '.': {dotted}")
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_payload(
        tmp, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
        extra=extra, state=state or {}, rng=rng or {},
    )
    _replace_dir(tmp, final)
    _fsync(root)
    atomic_write_text(root / "latest", final.name + "\n")
    _prune(root, keep_last=keep_last, keep=final)
    return final


def find_latest(run_dir: Path | str) -> Path | None:
    """Newest complete checkpoint of a run (per ``checkpoints/latest``, else the highest step), or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_RE.match(name) and (root / name / "state.json").is_file():
            return root / name
    found = _step_dirs(root)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- load


def _check_dir(ckpt: Path) -> None:
    """Refuse anything in a checkpoint folder that is not safetensors or JSON."""
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    for entry in sorted(ckpt.iterdir()):
        if not entry.is_file() or entry.suffix not in _ALLOWED_SUFFIXES:
            raise CheckpointError(
                f"{entry}: refused: checkpoint directories may only hold .safetensors and .json files"
            )
    missing = [name for name in _REQUIRED if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, missing {missing}")


def _read_state(path: Path) -> dict[str, Any]:
    doc = _read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gppf checkpoint state file")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise CheckpointError(f"{path}: format version {doc.get('version')} is newer than supported ({VERSION})")
    return doc


def _load_modules(
    path: Path, doc: Mapping[str, Any], model: nn.Module, extra: Mapping[str, nn.Module]
) -> None:
    saved = list(doc.get("extra_modules", []))
    if sorted(extra) != sorted(saved):
        raise CheckpointError(f"{path}: checkpoint has extra modules {sorted(saved)}, caller passed {sorted(extra)}")
    tensors = _read_tensors(path)
    parts = [("model", model)] + [(f"extra.{name}", mod) for name, mod in extra.items()]
    for prefix, module in parts:
        sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: '{prefix}' does not match the checkpoint: {exc}") from exc
    prefixes = tuple(["model."] + [f"extra.{name}." for name in extra])
    unexpected = sorted(k for k in tensors if not k.startswith(prefixes))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected entries {unexpected[:5]}")


def _load_optim(
    ckpt: Path, doc: Mapping[str, Any], optimizer: Optimizer | None, scheduler: LRScheduler | None
) -> None:
    path = ckpt / "optimizer.safetensors"
    if scheduler is not None and doc.get("scheduler") is None:
        raise CheckpointError(f"{ckpt}: checkpoint holds no scheduler state")
    tensors = _read_tensors(path)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(_decode(doc["optimizer"], tensors, path))
        if scheduler is not None:
            scheduler.load_state_dict(_decode(doc["scheduler"], tensors, path))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: optimizer/scheduler state does not match: {exc}") from exc


def load_checkpoint(
    path: Path | str,
    *,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    extra_modules: Mapping[str, nn.Module] | None = None,
) -> tuple[int, dict[str, Any], dict[str, Tensor]]:
    """Restore a checkpoint folder in place; return ``(step, user_state, rng_states)``.

    RNG states are returned, not applied: pass them to :func:`restore_rng` with the run's generators.
    """
    ckpt = Path(path)
    _check_dir(ckpt)
    doc = _read_state(ckpt / "state.json")
    _load_modules(ckpt / "model.safetensors", doc, model, dict(extra_modules or {}))
    if optimizer is not None or scheduler is not None:
        _load_optim(ckpt, doc, optimizer, scheduler)
    rng = _read_tensors(ckpt / "rng.safetensors")
    return int(doc["step"]), dict(doc.get("user") or {}), rng


# ----------------------------------------------------------------------------- user weight files


def _unpickler_reason(exc: Exception) -> str:
    for line in str(exc).splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the file holds a pickle payload with arbitrary Python objects "
            f"({_unpickler_reason(exc)}). Unpickling such payloads can run code, so gppf only reads "
            "tensors (torch.load with weights_only=True) or safetensors. If you trust the file, convert it "
            "once: sd = torch.load(path, weights_only=False); "
            "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'weights.safetensors')"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read PyTorch weight file, corrupt or truncated ({exc})") from exc


def _tensor_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The name -> tensor mapping in ``obj``, unwrapping a ``state_dict``/``model`` entry if needed."""

    def is_tensor_dict(x: Any) -> bool:
        return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in x.items())

    if is_tensor_dict(obj):
        return dict(obj)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and is_tensor_dict(obj.get(key)):
            return dict(obj[key])
    raise CheckpointError(f"{path}: expected a mapping of names to tensors, got {type(obj).__name__}")


def load_weights(path: Path | str) -> dict[str, Tensor]:
    """Read a user-supplied weight file into a name -> tensor dict, without unpickling objects.

    ``.safetensors`` files are read with safetensors; ``.pt``/``.pth``/``.bin`` with
    ``torch.load(weights_only=True)`` (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped).
    A checkpoint folder gives its model tensors with the ``model.`` prefix removed.
    """
    p = Path(path)
    if p.is_dir():
        tensors = _read_tensors(p / "model.safetensors")
        return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    if not p.is_file():
        raise CheckpointError(f"{p}: weight file not found")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return _read_tensors(p)
    if suffix in (".pt", ".pth", ".bin"):
        return _tensor_dict(_torch_load(p), p)
    raise CheckpointError(f"{p}: unsupported weight file type '{suffix}' (use .safetensors, .pt, .pth or .bin)")


# ----------------------------------------------------------------------------- RNG


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _python_state() -> Tensor:
    """``random.getstate()`` as int64 ``[version, *internal(625), has_gauss, gauss_bits]``."""
    version, internal, gauss = random.getstate()
    has = gauss is not None
    return torch.tensor([version, *internal, int(has), _float_bits(gauss if has else 0.0)], dtype=torch.int64)


def _set_python_state(t: Tensor) -> None:
    v = t.tolist()
    gauss = _bits_float(v[-1]) if v[-2] else None
    random.setstate((v[0], tuple(v[1:-2]), gauss))


def _numpy_state() -> Tensor:
    """Legacy global numpy state as int64 ``[pos, has_gauss, gauss_bits, *keys(624)]``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    if name != "MT19937":
        raise CheckpointError(f"unsupported numpy bit generator {name}")
    head = torch.tensor([pos, has_gauss, _float_bits(float(cached))], dtype=torch.int64)
    return torch.cat([head, torch.from_numpy(keys.astype(np.int64))])


def _set_numpy_state(t: Tensor) -> None:
    v = t.tolist()
    keys = np.asarray(v[3:], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(v[0]), int(v[1]), _bits_float(v[2])))


def capture_rng(*, generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Tensor]:
    """Snapshot global RNGs (torch CPU, initialised CUDA devices, numpy, python) and named generators.

    Keys: ``torch``, ``cuda.<i>``, ``numpy``, ``python``, ``generator.<name>``.
    """
    out = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = state
    for name, gen in (generators or {}).items():
        out[f"generator.{name}"] = gen.get_state()
    return out


def restore_rng(states: Mapping[str, Tensor], *, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Apply states from :func:`capture_rng`; CUDA states are skipped where the device is absent."""
    wanted = ["torch", "numpy", "python"] + [f"generator.{name}" for name in generators or {}]
    missing = [key for key in wanted if key not in states]
    if missing:
        raise CheckpointError(f"RNG states {missing} missing (have {sorted(states)})")
    torch.set_rng_state(states["torch"].to(torch.uint8))
    _set_numpy_state(states["numpy"])
    _set_python_state(states["python"])
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key, state in states.items():
        if key.startswith("cuda.") and int(key.split(".")[1]) < cuda_count:
            torch.cuda.set_rng_state(state.to(torch.uint8), int(key.split(".")[1]))
    for name, gen in (generators or {}).items():
        gen.set_state(states[f"generator.{name}"].to(torch.uint8))
