"""Visual domains: backgrounds, object looks, colour statistics and camera finish (vectorised numpy).

A canvas is ``float32 [H, W, 3]`` in ``0..255``; ``Domain.finish`` turns it into the final ``uint8``
image. Domains differ only in appearance, never in geometry, so labels mean the same in every domain.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gppf.data.synthetic.shapes import Placement

Rng = np.random.Generator
PATTERNS: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "halves")


@dataclass(frozen=True)
class Look:
    """How an object is filled: two colours, a pattern in the object's frame and optional shading.

    ``freq`` is pattern repeats per object radius, ``angle`` the pattern rotation relative to the
    object, ``shade`` the strength of a light gradient from the top left of the image.
    """

    c1: tuple[float, float, float]
    c2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pattern: str = "solid"
    freq: float = 2.0
    angle: float = 0.0
    shade: float = 0.0


# ----------------------------------------------------------------------------- helpers


def hsv(h: float, s: float, v: float) -> np.ndarray:
    """RGB colour in ``0..255`` from HSV in ``0..1`` (hue wraps)."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def far_colour(rng: Rng, sample: Callable[[Rng], np.ndarray], ref: np.ndarray, min_dist: float) -> np.ndarray:
    """A colour from ``sample`` at least ``min_dist`` (RGB distance) from ``ref``; best of 16 tries."""
    best, best_d = np.zeros(3, dtype=np.float32), -1.0
    for _ in range(16):
        c = sample(rng)
        d = float(np.linalg.norm(c - ref))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


@lru_cache(maxsize=16)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(X, Y)``, each ``float32 [size, size]``."""
    c = np.arange(size, dtype=np.float32) + 0.5
    xs, ys = np.meshgrid(c, c)
    return xs, ys


def smooth_noise(rng: Rng, *, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in ``[0, 1]``, ``float32 [size, size]`` (bilinear upsampled cells)."""
    small = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray | None:
    """Boolean selector of the second colour, or ``None`` for a solid fill."""
    if pattern == "stripes":
        return (u * freq) % 1.0 < 0.5
    if pattern == "checker":
        return (np.floor(u * freq) + np.floor(v * freq)) % 2 == 0
    if pattern == "dots":
        fu, fv = (u * freq) % 1.0 - 0.5, (v * freq) % 1.0 - 0.5
        return fu * fu + fv * fv < 0.09
    if pattern == "halves":
        return u < 0
    return None


def render_look(look: Look, place: Placement, *, size: int) -> np.ndarray:
    """The fill of an object over the whole canvas, ``float32 [size, size, 3]``."""
    xs, ys = pixel_grid(size)
    dx, dy = (xs - place.cx) / place.radius, (ys - place.cy) / place.radius
    a = place.angle + look.angle
    u = dx * math.cos(a) + dy * math.sin(a)
    v = -dx * math.sin(a) + dy * math.cos(a)
    sel = _pattern(look.pattern, u, v, look.freq)
    c1 = np.asarray(look.c1, dtype=np.float32)
    if sel is None:
        out = np.broadcast_to(c1, (size, size, 3)).copy()
    else:
        out = np.where(sel[..., None], np.asarray(look.c2, dtype=np.float32), c1)
    if look.shade:
        gain = 1.0 - look.shade * np.clip(0.5 * dx + 0.7 * dy, -1.2, 1.2)
        out *= gain[..., None]
    return out


def paint(canvas: np.ndarray, mask: np.ndarray, fill: np.ndarray | tuple[float, float, float]) -> None:
    """Write ``fill`` (a colour or a canvas-sized array) into ``canvas`` where ``mask`` is set."""
    canvas[mask] = fill[mask] if isinstance(fill, np.ndarray) and fill.ndim == 3 else fill


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def _blur_noise(rng: Rng, canvas: np.ndarray, *, blur: float, sigma: float) -> np.ndarray:
    img = to_uint8(canvas)
    if blur > 0:
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return to_uint8(np.asarray(img, dtype=np.float32) + noise)


def _gradient(rng: Rng, *, size: int) -> np.ndarray:
    """A linear ramp in ``[-1, 1]`` along a random direction, ``float32 [size, size]``."""
    xs, ys = pixel_grid(size)
    a = rng.uniform(0, 2 * math.pi)
    return ((xs - size / 2) * math.cos(a) + (ys - size / 2) * math.sin(a)) / (size / 2)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[..., None]


# ----------------------------------------------------------------------------- backgrounds


def _flat_bg(rng: Rng, size: int) -> np.ndarray:
    c = hsv(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.15, 0.95))
    return np.broadcast_to(c, (size, size, 3)).copy()


def _texture(rng: Rng, size: int) -> np.ndarray:
    """A background texture in ``[0, 1]``: stripes, checker, plaid or blotches."""
    xs, ys = pixel_grid(size)
    kind = int(rng.integers(4))
    a, period = rng.uniform(0, math.pi), rng.uniform(3.0, 9.0) * size / 64
    u = (xs * math.cos(a) + ys * math.sin(a)) / period
    v = (-xs * math.sin(a) + ys * math.cos(a)) / period
    if kind == 0:
        return (u % 1.0 < 0.5).astype(np.float32)
    if kind == 1:
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    if kind == 2:
        return 0.5 * ((u % 1.0 < 0.3).astype(np.float32) + (v % 1.0 < 0.3))
    return (smooth_noise(rng, size=size, cells=int(rng.integers(6, 12))) > 0.5).astype(np.float32)


def _textured_bg(rng: Rng, size: int) -> np.ndarray:
    a = hsv(rng.random(), rng.uniform(0.15, 0.6), rng.uniform(0.3, 0.8))
    b = np.clip(a + rng.normal(0, 45, 3).astype(np.float32), 0, 255)
    return _mix(a, b, _texture(rng, size))


def _clutter(rng: Rng, canvas: np.ndarray) -> np.ndarray:
    """Thin lines and small blobs (background, never labelled) drawn onto ``canvas``."""
    size = canvas.shape[0]
    img = Image.fromarray(to_uint8(canvas))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(x) for x in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (rng.random(4) * size).tolist()
        if rng.random() < 0.6:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(0.5, 2.5) * size / 64
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
    return np.asarray(img, dtype=np.float32)


def _noisy_bg(rng: Rng, size: int) -> np.ndarray:
    a = hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.9))
    b = hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.9))
    canvas = _mix(a, b, 0.5 + 0.5 * _gradient(rng, size=size))
    canvas += (smooth_noise(rng, size=size, cells=int(rng.integers(4, 10)))[..., None] - 0.5) * 60.0
    return _clutter(rng, canvas)


def _pastel_bg(rng: Rng, size: int) -> np.ndarray:
    c = hsv(rng.random(), rng.uniform(0.08, 0.3), rng.uniform(0.82, 0.97))
    return c + 10.0 * _gradient(rng, size=size)[..., None]


def _night_bg(rng: Rng, size: int) -> np.ndarray:
    c = hsv(rng.uniform(0.55, 0.72), rng.uniform(0.3, 0.7), rng.uniform(0.04, 0.18))
    xs, ys = pixel_grid(size)
    lx, ly = rng.random(2) * size
    glow = np.exp(-((xs - lx) ** 2 + (ys - ly) ** 2) / (2 * (0.25 * size) ** 2))
    lamp = hsv(rng.uniform(0.05, 0.15), 0.6, 1.0) * rng.uniform(0.1, 0.25)
    return c + glow[..., None] * lamp


# ----------------------------------------------------------------------------- looks


def _flat_look(rng: Rng, bg: np.ndarray) -> Look:
    c = far_colour(rng, lambda r: hsv(r.random(), r.uniform(0.6, 1.0), r.uniform(0.55, 1.0)), bg, 90)
    return Look(c1=tuple(c.tolist()))


def _textured_look(rng: Rng, bg: np.ndarray) -> Look:
    c1 = far_colour(rng, lambda r: hsv(r.random(), r.uniform(0.5, 1.0), r.uniform(0.5, 1.0)), bg, 70)
    c2 = far_colour(rng, lambda r: hsv(r.random(), r.uniform(0.0, 1.0), r.uniform(0.1, 1.0)), c1, 90)
    pattern = ("stripes", "checker", "dots")[int(rng.integers(3))]
    return Look(c1=tuple(c1.tolist()), c2=tuple(c2.tolist()), pattern=pattern,
                freq=float(rng.uniform(1.5, 3.5)), angle=float(rng.uniform(0, math.pi)))


def _noisy_look(rng: Rng, bg: np.ndarray) -> Look:
    c = far_colour(rng, lambda r: hsv(r.random(), r.uniform(0.3, 0.9), r.uniform(0.35, 0.95)), bg, 70)
    return Look(c1=tuple(c.tolist()), shade=float(rng.uniform(0.15, 0.4)))


def _pastel_look(rng: Rng, bg: np.ndarray) -> Look:
    c = far_colour(rng, lambda r: hsv(r.random(), r.uniform(0.2, 0.45), r.uniform(0.75, 1.0)), bg, 40)
    return Look(c1=tuple(c.tolist()))


def _night_look(rng: Rng, bg: np.ndarray) -> Look:
    c = far_colour(rng, lambda r: hsv(r.random(), r.uniform(0.3, 0.8), r.uniform(0.25, 0.55)), bg, 40)
    return Look(c1=tuple(c.tolist()), shade=float(rng.uniform(0.0, 0.2)))


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Domain:
    """One visual domain: how backgrounds, object looks and the camera finish are drawn."""

    name: str
    summary: str
    background: Callable[[Rng, int], np.ndarray]
    look: Callable[[Rng, np.ndarray], Look]
    tone: Callable[[np.ndarray], np.ndarray]
    finish: Callable[[Rng, np.ndarray], np.ndarray]


def _identity(c: np.ndarray) -> np.ndarray:
    return c


def _plain_finish(rng: Rng, canvas: np.ndarray) -> np.ndarray:
    return to_uint8(canvas)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("flat", "saturated flat shapes on a plain background; no noise",
               _flat_bg, _flat_look, _identity, _plain_finish),
        Domain("textured", "striped / checkered / dotted objects on low-contrast textured backgrounds",
               _textured_bg, _textured_look, _identity, _plain_finish),
        Domain("noisy", "photographic: gradients, blotches, clutter, shading, blur and sensor noise",
               _noisy_bg, _noisy_look, _identity,
               lambda r, c: _blur_noise(r, c, blur=float(r.uniform(0.4, 1.0)), sigma=float(r.uniform(3, 9)))),
        Domain("pastel", "light, desaturated, low-contrast colours with soft gradients",
               _pastel_bg, _pastel_look, lambda c: 0.5 * c + 0.5 * 235.0,
               lambda r, c: _blur_noise(r, c, blur=0.0, sigma=1.5)),
        Domain("night", "dark blue-tinted scenes, dim objects, a lamp glow and strong sensor noise",
               _night_bg, _night_look, lambda c: 0.4 * c + np.array([5.0, 8.0, 20.0], dtype=np.float32),
               lambda r, c: _blur_noise(r, c, blur=0.5, sigma=float(r.uniform(4, 8)))),
    )
}
