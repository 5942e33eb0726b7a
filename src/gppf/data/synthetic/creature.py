"""The articulated "creature" of the keypoint task: a front-facing stick figure with 9 landmarks.

The figure faces the viewer, so its left limbs are on the image's right (as in COCO person crops) and
horizontal flips map left to right. Limbs are thick lines, joints are discs, so every landmark pixel
lies on the drawn body.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Rng = np.random.Generator

KEYPOINT_NAMES: tuple[str, ...] = (
    "head", "neck", "left_hand", "right_hand", "pelvis", "left_knee", "right_knee", "left_foot", "right_foot",
)
KEYPOINT_SIGMAS: tuple[float, ...] = (0.06, 0.07, 0.09, 0.09, 0.08, 0.08, 0.08, 0.09, 0.09)
SKELETON: tuple[tuple[int, int], ...] = ((0, 1), (1, 2), (1, 3), (1, 4), (4, 5), (5, 7), (4, 6), (6, 8))
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((2, 3), (5, 6), (7, 8))


@dataclass(frozen=True)
class Creature:
    """Landmarks in continuous pixels ``float [K, 2]`` and stroke sizes in pixels."""

    points: np.ndarray
    limb: float
    torso: float
    head: float


def _limb_pair(rng: Rng, *, hip: float, length: tuple[float, float], side: float) -> list[np.ndarray]:
    """Knee and foot of one leg; ``side`` is +1 for the image-right (creature's left) leg."""
    t = rng.uniform(0.05, 0.55)
    k = rng.uniform(max(-0.45, -0.2 - t), 0.45)
    knee = np.array([side * (hip + length[0] * math.sin(t)), length[0] * math.cos(t)])
    foot = knee + np.array([side * length[1] * math.sin(t + k), length[1] * math.cos(t + k)])
    return [knee, foot]


def _body_points(rng: Rng) -> np.ndarray:
    """Landmarks in body units (y down, pelvis at the origin), ``float [K, 2]``."""
    torso, arm = rng.uniform(0.28, 0.34), rng.uniform(0.26, 0.34)
    legs = (rng.uniform(0.2, 0.25), rng.uniform(0.2, 0.25))
    neck = np.array([0.0, -torso])
    tilt = rng.uniform(-0.35, 0.35)
    head = neck + 0.14 * np.array([math.sin(tilt), -math.cos(tilt)])
    a, b = rng.uniform(-1.2, 1.0, size=2)
    left_hand = neck + arm * np.array([math.cos(a), math.sin(a)])
    right_hand = neck + arm * np.array([-math.cos(b), math.sin(b)])
    left_knee, left_foot = _limb_pair(rng, hip=0.04, length=legs, side=1.0)
    right_knee, right_foot = _limb_pair(rng, hip=0.04, length=legs, side=-1.0)
    pelvis = np.zeros(2)
    return np.stack([head, neck, left_hand, right_hand, pelvis, left_knee, right_knee, left_foot, right_foot])


def creature_pose(rng: Rng, *, size: int, truncate_p: float = 0.15) -> Creature:
    """A random pose filling most of a ``size`` crop; sometimes shifted so limbs leave the crop."""
    pts = _body_points(rng)
    rot = rng.uniform(-0.35, 0.35)
    c, s = math.cos(rot), math.sin(rot)
    pts = pts @ np.array([[c, s], [-s, c]])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    scale = size * rng.uniform(0.68, 0.85) / (float((hi - lo).max()) + 0.2)
    pts = (pts - (lo + hi) / 2) * scale + size / 2 + rng.uniform(-0.05, 0.05, size=2) * size
    if rng.random() < truncate_p:
        a = rng.uniform(0, 2 * math.pi)
        pts = pts + np.array([math.cos(a), math.sin(a)]) * rng.uniform(0.2, 0.3) * size
    jitter = rng.uniform(0.85, 1.15, size=3)
    return Creature(points=pts.astype(np.float32), limb=0.07 * scale * jitter[0],
                    torso=0.13 * scale * jitter[1], head=0.1 * scale * jitter[2])


def _disc(draw: ImageDraw.ImageDraw, p: np.ndarray, r: float) -> None:
    draw.ellipse((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=1)


def creature_mask(creature: Creature, *, size: int) -> np.ndarray:
    """Exact boolean ``[size, size]`` mask of the figure."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    p = creature.points.astype(np.float64) - 0.5  # PIL pixel centres sit on integers
    limb, torso = max(2, round(creature.limb)), max(3, round(creature.torso))
    for i, j in SKELETON[1:]:
        width = torso if (i, j) == (1, 4) else limb
        draw.line([tuple(p[i]), tuple(p[j])], fill=1, width=width)
    _disc(draw, p[0], max(2.0, creature.head))
    for k in range(1, len(KEYPOINT_NAMES)):
        r = limb * 0.75 if k in (2, 3, 7, 8) else max(1.5, limb / 2)
        _disc(draw, p[k], max(1.5, r))
    return np.asarray(img, dtype=bool)


def occluder_box(rng: Rng, creature: Creature, *, size: int, p: float = 0.3) -> tuple[int, int, int, int] | None:
    """With probability ``p`` a rectangle (XYXY, pixel edges) over part of the figure, else ``None``."""
    if rng.random() >= p:
        return None
    k = int(rng.integers(len(KEYPOINT_NAMES)))
    cx, cy = creature.points[k] + rng.normal(0, 0.05 * size, size=2)
    w, h = rng.uniform(0.15, 0.35, size=2) * size
    x0, y0 = int(np.clip(cx - w / 2, 0, size - 1)), int(np.clip(cy - h / 2, 0, size - 1))
    return x0, y0, int(np.clip(cx + w / 2, x0 + 1, size)), int(np.clip(cy + h / 2, y0 + 1, size))


def keypoint_table(creature: Creature, *, size: int, occluded: np.ndarray | None) -> np.ndarray:
    """``float32 [K, 3]`` of ``(x, y, v)``: v=2 visible, 1 under the occluder, 0 outside (x=y=0)."""
    out = np.zeros((len(KEYPOINT_NAMES), 3), dtype=np.float32)
    for k, (x, y) in enumerate(creature.points):
        if not (0 <= x < size and 0 <= y < size):
            continue
        hidden = occluded is not None and bool(occluded[int(y), int(x)])
        out[k] = (x, y, 1.0 if hidden else 2.0)
    return out
