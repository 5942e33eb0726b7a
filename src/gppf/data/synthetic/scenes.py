"""Per-task-type scene rendering: geometry from one RNG (``geo``), appearance from another (``sty``).

Because the two streams are separate, a given (seed, split, index) has the same layout and labels in
every domain; only the appearance changes. Later objects occlude earlier ones and every ground truth
is computed from the drawn masks.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gppf.data.synthetic.creature import creature_mask, creature_pose, keypoint_table, occluder_box
from gppf.data.synthetic.domains import PATTERNS, Domain, Look, hsv, paint, render_look
from gppf.data.synthetic.shapes import SHAPES, Placement, mask_box, random_placement, shape_mask

Rng = np.random.Generator
ObjectSpec = tuple[np.ndarray, Placement, Look | None]  # full mask, placement, look (None = domain's)


@dataclass
class Scene:
    """A rendered sample before conversion to tensors.

    ``masks`` are the visible pixels of each labelled object in drawing order and ``labels`` their
    classes (shape index, identity, or 0 for the creature). Keypoint scenes also fill ``keypoints``
    (``float32 [K, 3]``), ``box`` (the full figure, XYXY) and ``area`` (its pixel count);
    ``extra_masks`` holds the visible pixels of unlabelled occluders.
    """

    image: np.ndarray
    masks: list[np.ndarray]
    labels: list[int]
    keypoints: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None
    area: float = 0.0
    extra_masks: list[np.ndarray] = field(default_factory=list)


def compose(
    *, domain: Domain, rng: Rng, size: int, objects: Sequence[ObjectSpec]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw background and objects in order; return the finished image and visible masks."""
    canvas = domain.background(rng, size)
    bg_mean = canvas.reshape(-1, 3).mean(axis=0)
    visible: list[np.ndarray] = []
    for mask, place, look in objects:
        paint(canvas, mask, render_look(look or domain.look(rng, bg_mean), place, size=size))
        visible = [v & ~mask for v in visible]
        visible.append(mask.copy())
    return domain.finish(rng, canvas), visible


def layout(
    rng: Rng, *, size: int, shapes: Sequence[int], r_lo: float, r_hi: float,
    min_visible: float = 0.7, tries: int = 20,
) -> list[tuple[int, Placement, np.ndarray]]:
    """Place shapes so each keeps ``min_visible`` of its pixels after later objects are drawn.

    Shapes that find no such spot in ``tries`` attempts are dropped (the first always fits).
    """
    placed: list[tuple[int, Placement, np.ndarray]] = []
    visible: list[np.ndarray] = []
    for shape in shapes:
        for _ in range(tries):
            place = random_placement(rng, size=size, r_lo=r_lo, r_hi=r_hi)
            mask = shape_mask(SHAPES[shape], place, size=size)
            after = [v & ~mask for v in visible]
            if all(a.sum() >= min_visible * full.sum() for a, (_, _, full) in zip(after, placed)):
                placed.append((int(shape), place, mask))
                visible = after + [mask]
                break
    return placed


def _layout_scene(geo: Rng, sty: Rng, *, domain: Domain, size: int, shapes: Sequence[int],
                  r_lo: float, r_hi: float) -> Scene:
    placed = layout(geo, size=size, shapes=shapes, r_lo=r_lo, r_hi=r_hi)
    image, visible = compose(domain=domain, rng=sty, size=size,
                             objects=[(mask, place, None) for _, place, mask in placed])
    return Scene(image=image, masks=visible, labels=[s for s, _, _ in placed])


def render_classification(geo: Rng, sty: Rng, *, domain: Domain, size: int, num_classes: int) -> Scene:
    """One dominant shape of random colour, scale, position and rotation; label = its shape."""
    label = int(geo.integers(num_classes))
    return _layout_scene(geo, sty, domain=domain, size=size, shapes=[label], r_lo=0.24, r_hi=0.42)


def render_multilabel(geo: Rng, sty: Rng, *, domain: Domain, size: int, num_classes: int,
                      max_objects: int) -> Scene:
    """1..max_objects distinct shapes; the labels are the set of shapes present."""
    count = int(geo.integers(1, min(max_objects, num_classes) + 1))
    shapes = geo.choice(num_classes, size=count, replace=False)
    return _layout_scene(geo, sty, domain=domain, size=size, shapes=shapes, r_lo=0.13, r_hi=0.24)


def render_detection(geo: Rng, sty: Rng, *, domain: Domain, size: int, num_classes: int,
                     max_objects: int) -> Scene:
    """1..max_objects shapes (classes may repeat), overlapping a little."""
    count = int(geo.integers(1, max_objects + 1))
    shapes = geo.integers(num_classes, size=count)
    return _layout_scene(geo, sty, domain=domain, size=size, shapes=shapes, r_lo=0.1, r_hi=0.25)


def render_segmentation(geo: Rng, sty: Rng, *, domain: Domain, size: int, num_classes: int,
                        max_objects: int) -> Scene:
    """Like detection with somewhat larger objects; the mask is composited from the drawn shapes."""
    count = int(geo.integers(1, max_objects + 1))
    shapes = geo.integers(num_classes, size=count)
    return _layout_scene(geo, sty, domain=domain, size=size, shapes=shapes, r_lo=0.12, r_hi=0.28)


def render_keypoints(geo: Rng, sty: Rng, *, domain: Domain, size: int) -> Scene:
    """A creature crop; an optional rectangle occludes part of it (its landmarks get v=1)."""
    creature = creature_pose(geo, size=size)
    body = creature_mask(creature, size=size)
    centre = Placement(cx=size / 2, cy=size / 2, radius=size / 2, angle=0.0)
    objects: list[ObjectSpec] = [(body, centre, None)]
    occ_box = occluder_box(geo, creature, size=size)
    occ = None
    if occ_box is not None:
        occ = np.zeros((size, size), dtype=bool)
        occ[occ_box[1]:occ_box[3], occ_box[0]:occ_box[2]] = True
        objects.append((occ, centre, None))
    image, visible = compose(domain=domain, rng=sty, size=size, objects=objects)
    return Scene(image=image, masks=visible[:1], labels=[0], extra_masks=visible[1:],
                 keypoints=keypoint_table(creature, size=size, occluded=occ),
                 box=mask_box(body), area=float(body.sum()))


# ----------------------------------------------------------------------------- reid identities

COLOURS: dict[str, np.ndarray] = {
    "red": hsv(0.0, 0.85, 0.9), "orange": hsv(0.08, 0.9, 0.95), "yellow": hsv(0.15, 0.85, 0.95),
    "green": hsv(0.33, 0.8, 0.7), "teal": hsv(0.48, 0.8, 0.75), "blue": hsv(0.62, 0.85, 0.9),
    "purple": hsv(0.78, 0.7, 0.75), "pink": hsv(0.92, 0.5, 1.0), "white": hsv(0.0, 0.0, 0.97),
    "black": hsv(0.0, 0.0, 0.12), "grey": hsv(0.0, 0.0, 0.55), "brown": hsv(0.07, 0.7, 0.45),
}
_PATTERN_FREQ = {"solid": 1.0, "stripes": 2.0, "checker": 1.6, "dots": 2.2, "halves": 1.0}


@dataclass(frozen=True)
class Identity:
    """One reid identity: a shape with a fixed two-colour pattern."""

    name: str
    shape: int
    look: Look


def identity_table(*, seed: int, count: int) -> list[Identity]:
    """``count`` distinct (shape, colours, pattern) identities, shuffled by ``seed``."""
    names = list(COLOURS)
    combos = [
        (s, p, a, b)
        for s, p in itertools.product(range(len(SHAPES)), PATTERNS)
        for a, b in itertools.product(names, names)
        if (p == "solid") == (a == b)
    ]
    order = np.random.default_rng([seed, 0x1D]).permutation(len(combos))[:count]
    out = []
    for s, p, a, b in (combos[i] for i in order):
        name = f"{SHAPES[s]}-{a}" if p == "solid" else f"{SHAPES[s]}-{a}-{b}-{p}"
        look = Look(c1=tuple(COLOURS[a].tolist()), c2=tuple(COLOURS[b].tolist()), pattern=p,
                    freq=_PATTERN_FREQ[p])
        out.append(Identity(name=name, shape=s, look=look))
    return out


def _jitter(rng: Rng, look: Look, domain: Domain) -> Look:
    """Light colour jitter, then the domain's colour statistics."""
    gain = rng.uniform(0.9, 1.1)

    def shift(c: tuple[float, float, float]) -> tuple[float, float, float]:
        raw = np.asarray(c, dtype=np.float32) * gain + rng.normal(0, 6, 3).astype(np.float32)
        return tuple(np.clip(domain.tone(raw), 0, 255).tolist())

    return Look(c1=shift(look.c1), c2=shift(look.c2), pattern=look.pattern, freq=look.freq, angle=look.angle)


def render_reid(geo: Rng, sty: Rng, *, domain: Domain, size: int, identity: Identity, label: int) -> Scene:
    """The identity's object with a random pose, scale, position and background."""
    place = random_placement(geo, size=size, r_lo=0.28, r_hi=0.42)
    mask = shape_mask(SHAPES[identity.shape], place, size=size)
    image, visible = compose(domain=domain, rng=sty, size=size,
                             objects=[(mask, place, _jitter(sty, identity.look, domain))])
    return Scene(image=image, masks=visible, labels=[label])
