"""Shape vocabulary of the synthetic scenes: unit outlines, placements and exact pixel masks.

Coordinates are continuous pixels with pixel ``(i, j)`` covering ``[j, j+1) x [i, i+1)``; PIL rasterises
with pixel centres on integers, so outlines are shifted by ``-0.5`` before drawing. Every class is
closed under mirroring (a flipped arrow is still an arrow), so horizontal flips keep labels valid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "hexagon", "ellipse", "diamond", "arrow",
)


def _ngon(n: int, *, rx: float = 1.0, ry: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


_CROSS = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
          (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
_ARROW = [(-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22), (-1, 0.22)]

# name -> (outer outline, hole outline or None), unit radius around the origin
OUTLINES: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
    "circle": (_ngon(48), None),
    "square": (_ngon(4, phase=np.pi / 4) * 0.95, None),
    "triangle": (_ngon(3, phase=-np.pi / 2), None),
    "star": (_star(), None),
    "cross": (np.array(_CROSS, dtype=float), None),
    "ring": (_ngon(48), _ngon(48) * 0.55),
    "hexagon": (_ngon(6), None),
    "ellipse": (_ngon(48, ry=0.55), None),
    "diamond": (np.array([(0, -1), (0.58, 0), (0, 1), (-0.58, 0)], dtype=float), None),
    "arrow": (np.array(_ARROW, dtype=float), None),
}


@dataclass(frozen=True)
class Placement:
    """Where an object sits: centre (pixels), radius (pixels) and rotation (radians)."""

    cx: float
    cy: float
    radius: float
    angle: float


def random_placement(rng: np.random.Generator, *, size: int, r_lo: float, r_hi: float) -> Placement:
    """A placement with radius ``U(r_lo, r_hi) * size`` whose unit disc stays inside the canvas."""
    radius = rng.uniform(r_lo, r_hi) * size
    lo, hi = radius, max(radius, size - radius)
    return Placement(
        cx=float(rng.uniform(lo, hi)), cy=float(rng.uniform(lo, hi)),
        radius=float(radius), angle=float(rng.uniform(0.0, 2.0 * math.pi)),
    )


def _to_pixels(points: np.ndarray, place: Placement) -> list[tuple[float, float]]:
    c, s = math.cos(place.angle), math.sin(place.angle)
    x = place.radius * (points[:, 0] * c - points[:, 1] * s) + place.cx - 0.5
    y = place.radius * (points[:, 0] * s + points[:, 1] * c) + place.cy - 0.5
    return list(zip(x.tolist(), y.tolist()))


def shape_mask(shape: str, place: Placement, *, size: int) -> np.ndarray:
    """Exact boolean ``[size, size]`` mask of ``shape`` drawn at ``place``."""
    outer, hole = OUTLINES[shape]
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    draw.polygon(_to_pixels(outer, place), fill=1)
    if hole is not None:
        draw.polygon(_to_pixels(hole, place), fill=0)
    return np.asarray(img, dtype=bool)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight XYXY box of a boolean mask in pixel-edge convention (``x1 = last column + 1``)."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
