"""Safe image decoding: every failure becomes a ``SampleError`` naming the file."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from gppf.data.readers.common import SampleError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def is_image_file(path: Path) -> bool:
    """True for a visible file with a known image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _decode(path: Path, *, what: str, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Fully decode ``path`` (so truncation is detected now) and ``convert`` it inside the open file."""
    try:
        if path.stat().st_size == 0:
            raise SampleError(f"empty (zero-byte) {what} file {path}", kind=f"corrupt_{what}")
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore", UserWarning)  # e.g. 'Corrupt EXIF data', palette transparency
            im.load()
            return convert(im)
    except SampleError:
        raise
    except FileNotFoundError as exc:
        raise SampleError(f"{what} file not found: {path}", kind=f"missing_{what}") from exc
    except _DECODE_ERRORS as exc:
        raise SampleError(f"cannot decode {what} {path}: {exc}", kind=f"corrupt_{what}") from exc


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.array(im.convert("RGB"), dtype=np.uint8)


def load_rgb(path: Path) -> tv_tensors.Image:
    """Decode ``path`` to a ``tv_tensors.Image`` uint8 ``[3, H, W]`` (grey and palette become RGB).

    EXIF orientation is not applied: annotations refer to the stored pixel grid (as in pycocotools).
    """
    arr = _decode(path, what="image", convert=_to_rgb)
    return tv_tensors.Image(torch.from_numpy(arr).permute(2, 0, 1).contiguous())


def _to_ids(im: Image.Image, *, path: Path) -> np.ndarray:
    if im.mode not in ("L", "P"):
        raise SampleError(
            f"label image {path} has mode {im.mode}; expected single-channel class ids (L or P)",
            kind="bad_label",
        )
    return np.array(im, dtype=np.uint8)


def load_label_map(path: Path) -> np.ndarray:
    """Decode a single-channel (L or P mode) PNG of class ids to ``uint8 [H, W]``."""
    return _decode(path, what="label", convert=lambda im: _to_ids(im, path=path))


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the image header only (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError as exc:
        raise SampleError(f"image file not found: {path}", kind="missing_image") from exc
    except _DECODE_ERRORS as exc:
        raise SampleError(f"cannot read image header of {path}: {exc}", kind="corrupt_image") from exc
    return int(h), int(w)
