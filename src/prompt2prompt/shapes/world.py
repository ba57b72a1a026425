"""A synthetic world of flat-coloured shapes, with captions and the true mask of every object.

It is the bundled model's training data, the evaluator's ground truth, and the source of "real" images
(pictures the model never produced) for the inversion tests. Everything is seeded and pure numpy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64  # the world's images are IMAGE_SIZE x IMAGE_SIZE RGB

SHAPES = ("circle", "square", "triangle", "cross")

# Saturated colours whose hues are far apart, so a colour is recognised from its hue alone.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.80),
}


@dataclass(frozen=True)
class WorldObject:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float  # half the object's extent, in pixels


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]  # in caption order
    background: float  # grey level in [0, 1]
    caption: str
    size: int = IMAGE_SIZE

    def masks(self) -> np.ndarray:
        """(objects, size, size) booleans: the true mask of each object, in caption order."""
        return np.stack([shape_mask(o.shape, o.centre, o.radius, self.size) for o in self.objects])

    def render(self) -> np.ndarray:
        """(size, size, 3) float32 RGB in [0, 1]."""
        image = np.full((self.size, self.size, 3), self.background, dtype=np.float32)
        for obj, mask in zip(self.objects, self.masks()):
            image[mask] = COLOURS[obj.colour]
        return image

    def image(self):
        """The render as an 8-bit PIL image (what a user would hand to `p2p invert`)."""
        from PIL import Image

        return Image.fromarray((self.render() * 255).round().astype(np.uint8))


def shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) boolean mask of one shape, sampled at pixel centres."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * 0.85  # a square of the same area reads as larger than the circle
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # upright isosceles triangle in the box [-r, r]^2
        inside_y = (dy >= -radius) & (dy <= radius)
        half_width = radius * (dy + radius) / (2 * radius)
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "cross":  # a plus sign whose arms are 2/5 of its width
        arm = radius * 0.4
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
        return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def caption_for(objects: tuple[WorldObject, ...], with_colour: tuple[bool, ...]) -> str:
    """'a red circle and an orange square': each object's colour is named where with_colour says so."""
    parts = []
    for obj, named in zip(objects, with_colour):
        noun = f"{obj.colour} {obj.shape}" if named else obj.shape
        parts.append(("an " if noun[0] in "aeiou" else "a ") + noun)
    return " and ".join(parts)


def _separated(a: tuple[float, float, float], b: tuple[float, float, float], margin: float) -> bool:
    # boxes [c - r, c + r] must not overlap, with a margin between them
    return abs(a[0] - b[0]) > a[2] + b[2] + margin or abs(a[1] - b[1]) > a[2] + b[2] + margin


# Radii as fractions of the side, by the number of objects: objects span 5-8 latent cells alone, 4-7 in pairs, so the
# 4x autoencoder and the 16x16 / 8x8 cross-attention maps can tell their shapes apart (smaller shapes came out as round
# blobs); three objects (training data only, see sample_scene) span 4-6.
RADII = {1: (0.16, 0.26), 2: (0.13, 0.21), 3: (0.12, 0.18)}


def sample_scene(rng: random.Random, size: int = IMAGE_SIZE, two_objects: float = 0.6, margin: float = 2.0,
                 three_objects: float = 0.0) -> Scene:
    """One random scene: one object or, with probability two_objects, two (with probability three_objects, three) of
    different shapes and colours whose bounding boxes are at least margin pixels apart.

    Three-object scenes are contrast data for training: a model that has seen a third object named whenever one is
    drawn learns that a two-object caption rules a third object out. With three_objects=0 (the default, and the
    evaluator's captions) the random draws are exactly those of the one- and two-object world."""
    if three_objects and two_objects + three_objects > 1:
        raise ValueError(f"two_objects + three_objects must be at most 1, got {two_objects} + {three_objects}")
    u = rng.random()
    count = 3 if u < three_objects else 2 if u >= 1 - two_objects else 1
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    lo, hi = RADII[count]
    while True:  # rejection-sample positions until the objects are apart
        boxes = []
        for _ in range(count):
            r = rng.uniform(lo, hi) * size
            boxes.append((rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1), r))
        if all(_separated(a, b, margin) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            break
    objects = tuple(WorldObject(s, c, (x, y), r) for s, c, (x, y, r) in zip(shapes, colours, boxes))
    u = rng.random()  # how many colours the caption names
    if u < 0.65:
        with_colour = (True,) * count
    elif u < 0.85 or count == 1:
        with_colour = (False,) * count
    elif count == 2:
        with_colour = tuple(rng.sample([True, False], 2))
    else:  # some named, some not
        with_colour = tuple(rng.sample([True, True, False], 3) if rng.random() < 0.5 else
                            rng.sample([True, False, False], 3))
    background = rng.choice([rng.uniform(0.08, 0.3), rng.uniform(0.7, 0.95)])  # dark or light grey
    return Scene(objects, round(background, 3), caption_for(objects, with_colour), size)


def scene_from_caption(caption: str, rng: random.Random, size: int = IMAGE_SIZE) -> Scene:
    """A scene that matches a caption of the world's grammar ('a red circle and a square')."""
    specs = parse_caption(caption)
    if len(specs) > 3:
        raise ValueError(f"a caption of the world names at most 3 objects, got {len(specs)}: {caption!r}")
    while True:
        scene = sample_scene(rng, size, three_objects=0.4 if len(specs) == 3 else 0.0)
        if len(scene.objects) == len(specs):
            break
    objects = []
    used = {c for c, _ in specs if c}
    free = [c for c in sorted(COLOURS) if c not in used]
    rng.shuffle(free)
    for (colour, shape), obj in zip(specs, scene.objects):
        objects.append(WorldObject(shape, colour or free.pop(), obj.centre, obj.radius))
    return Scene(tuple(objects), scene.background, caption, size)


def parse_caption(caption: str) -> list[tuple[str | None, str]]:
    """[(colour or None, shape), ...] for each object a caption names, in order."""
    specs = []
    for part in caption.lower().split(" and "):
        words = [w for w in part.split() if w not in ("a", "an")]
        shape = next((w for w in words if w in SHAPES), None)
        colour = next((w for w in words if w in COLOURS), None)
        if shape is None:
            raise ValueError(f"caption part {part!r} names no shape: expected one of {', '.join(SHAPES)}")
        specs.append((colour, shape))
    return specs


def vocabulary() -> list[str]:
    """Every word the world's captions use."""
    return ["a", "an", "and", *SHAPES, *COLOURS]


def batch(seed: int, count: int, size: int = IMAGE_SIZE, two_objects: float = 0.6, margin: float = 2.0,
          three_objects: float = 0.0) -> tuple[list[Scene], np.ndarray]:
    """count scenes from one seed, and their images as (count, 3, size, size) float32 in [-1, 1]."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, size, two_objects, margin, three_objects) for _ in range(count)]
    images = np.stack([s.render() for s in scenes]).transpose(0, 3, 1, 2) * 2 - 1
    return scenes, images.astype(np.float32)
