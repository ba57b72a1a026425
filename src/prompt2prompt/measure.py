"""Did an edit do what it claims? Measurements on the shapes world, where colour segmentation gives the truth.

For a two-object caption whose one object is edited (its shape or its colour swapped, or, for refine, its colour
named where the source left it out):
- layout kept: IoU of the *unchanged* object's region in the source image and in the edited image;
- edit done: the edited object shows the target shape (in its colour's region) or the target colour;
- change outside the edited object: PSNR and mean absolute difference between source and edit, over the pixels
  outside both images' regions of the edited object (grown by 2 pixels, so its edges do not count).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .metrics import as_float, iou, psnr
from .shapes import world
from .shapes.evaluate import classify_shape, segment


@dataclass(frozen=True)
class EditPair:
    source: str  # "a red circle and a blue square"
    target: str  # "a red circle and a blue triangle"
    edited: int  # which object of the caption changes (0 or 1)
    kind: str  # "shape" or "colour" (word swaps, replace), or "refine" (a colour added)
    old: str  # the word replaced ("" for refine)
    new: str  # the word put in
    blend: tuple[str, ...]  # local-blend words: the changed words, or the object's noun for a colour change
    seed: int


def sample_pairs(count: int, seed: int = 0) -> list[EditPair]:
    """Seeded two-object captions (both colours named) with one object's shape or colour swapped."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        shapes = rng.sample(world.SHAPES, 2)
        colours = rng.sample(sorted(world.COLOURS), 2)
        objects = tuple(world.WorldObject(s, c, (0.0, 0.0), 1.0) for s, c in zip(shapes, colours))
        source = world.caption_for(objects, (True, True))
        k = rng.randrange(2)
        if rng.random() < 0.5:
            new = rng.choice([s for s in world.SHAPES if s not in shapes])
            old, kind, blend = shapes[k], "shape", (shapes[k], new)
            changed = world.WorldObject(new, colours[k], (0.0, 0.0), 1.0)
        else:
            new = rng.choice([c for c in sorted(world.COLOURS) if c not in colours])
            old, kind, blend = colours[k], "colour", (shapes[k],)
            changed = world.WorldObject(shapes[k], new, (0.0, 0.0), 1.0)
        target_objects = tuple(changed if i == k else o for i, o in enumerate(objects))
        target = world.caption_for(target_objects, (True, True))
        if len(target.split()) != len(source.split()):  # "a"/"an" never changes the word count, but be sure
            continue
        pairs.append(EditPair(source, target, k, kind, old, new, blend, seed * 100_003 + len(pairs)))
    return pairs


def sample_refine_pairs(count: int, seed: int = 0) -> list[EditPair]:
    """Seeded two-object captions where one object's colour is not named, and the same caption naming it: "a red
    circle and a square" -> "a red circle and a blue square" (refine: the edited prompt has a word more)."""
    rng = random.Random(seed)
    pairs = []
    for n in range(count):
        shapes = rng.sample(world.SHAPES, 2)
        colours = rng.sample(sorted(world.COLOURS), 2)
        objects = tuple(world.WorldObject(s, c, (0.0, 0.0), 1.0) for s, c in zip(shapes, colours))
        k = rng.randrange(2)
        source = world.caption_for(objects, tuple(i != k for i in range(2)))
        target = world.caption_for(objects, (True, True))
        pairs.append(EditPair(source, target, k, "refine", "", colours[k], (shapes[k],), seed * 100_003 + n))
    return pairs


def grow(mask: np.ndarray, pixels: int = 2) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * pixels + 1, stride=1, padding=pixels)[0, 0].numpy() > 0


@dataclass
class EditScore:
    keep_iou: float  # unchanged object's region, source vs edit (nan if the source lacks it)
    edit_ok: bool  # the edited object shows the target word
    outside_psnr: float  # dB, outside the edited object's regions
    outside_mad: float  # mean absolute difference in [0, 1], same pixels

    def to_dict(self) -> dict:
        return asdict(self)


def score_edit(pair: EditPair, source: Image.Image, edited: Image.Image) -> EditScore:
    src, out = as_float(source), as_float(edited)
    specs = world.parse_caption(pair.source)
    target_specs = world.parse_caption(pair.target)
    regions_src, regions_out = segment(src), segment(out)
    kept_colour = specs[1 - pair.edited][0]
    if kept_colour in regions_src:
        keep = iou(regions_src[kept_colour], regions_out.get(kept_colour, np.zeros_like(regions_src[kept_colour])))
    else:
        keep = float("nan")
    new_colour, new_shape = target_specs[pair.edited]
    region = regions_out.get(new_colour)
    if pair.kind == "colour":
        ok = region is not None
    else:
        ok = region is not None and classify_shape(region)[0] == new_shape
    old_colour = specs[pair.edited][0]
    empty = np.zeros(src.shape[:2], dtype=bool)
    edited_area = regions_src.get(old_colour, empty) | regions_out.get(new_colour, empty)
    if pair.kind == "colour":
        edited_area = edited_area | regions_out.get(old_colour, empty)
    if pair.kind == "refine":  # the source left the object's colour open: whatever it drew besides the kept object
        for colour, region in regions_src.items():
            if colour != kept_colour:
                edited_area = edited_area | region
    outside = ~grow(edited_area)
    diff = np.abs(src - out)[outside]
    return EditScore(keep, bool(ok), psnr(src, out, outside), float(diff.mean()) if diff.size else 0.0)


def summarize(scores: list[EditScore]) -> dict:
    keep = [s.keep_iou for s in scores if not np.isnan(s.keep_iou)]
    return {
        "pairs": len(scores),
        "keep_iou": float(np.mean(keep)) if keep else float("nan"),
        "keep_counted": len(keep),
        "edit_ok": float(np.mean([s.edit_ok for s in scores])) if scores else float("nan"),
        "outside_psnr": float(np.mean([s.outside_psnr for s in scores])) if scores else float("nan"),
        "outside_mad": float(np.mean([s.outside_mad for s in scores])) if scores else float("nan"),
    }


VARIANTS = ("vanilla", "replace", "replace+blend")  # word-swap pairs; refine pairs: vanilla, refine, refine+blend


def run_pairs(pipe, pairs: list[EditPair], generation, options=None, progress: bool = True) -> dict:
    """Each pair three ways from its seed: vanilla, controlled (replace for word swaps, refine for refine pairs), and
    controlled with local blend.

    Returns {"summary": {variant: summarize(...)}, "by_kind": {kind: {variant: summarize(...)}}, "pairs": [...per pair
    scores...], "images": {...first pair...}}, with only the variants and kinds the pairs have.
    """
    from dataclasses import replace

    from tqdm import tqdm

    from .edits import EditOptions, edit

    options = options or EditOptions()
    scores: dict[str, list[tuple[EditPair, EditScore]]] = {}
    rows, first = [], {}
    for pair in tqdm(pairs, desc="edit pairs", disable=not progress):
        gen = replace(generation, seed=pair.seed)
        mode = "refine" if pair.kind == "refine" else "replace"
        plain = edit(pipe, pair.source, pair.target, replace(options, blend=()), gen, vanilla=True, progress=False)
        blended = edit(pipe, pair.source, pair.target, replace(options, blend=pair.blend), gen, vanilla=False,
                       progress=False)
        source = plain.vanilla.images[0]
        outputs = {"vanilla": plain.vanilla.images[1], mode: plain.controlled.images[1],
                   f"{mode}+blend": blended.controlled.images[1]}
        row = {"pair": asdict(pair)}
        for variant, image in outputs.items():
            s = score_edit(pair, source, image)
            scores.setdefault(variant, []).append((pair, s))
            row[variant] = s.to_dict()
        rows.append(row)
        if not first:
            first = {"source": source, **outputs}
    kinds = sorted({p.kind for p in pairs}, key=("shape", "colour", "refine").index)
    by_kind = {kind: {v: summarize([s for p, s in got if p.kind == kind]) for v, got in scores.items()
                      if any(p.kind == kind for p, _ in got)} for kind in kinds}
    return {"summary": {v: summarize([s for _, s in got]) for v, got in scores.items()}, "by_kind": by_kind,
            "pairs": rows, "images": first}


def sweep(pipe, pairs: list[EditPair], generation, fractions=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
          progress: bool = True, options=None) -> dict:
    """Layout kept and edit success as the cross-attention replacement fraction goes from 0 to 1 (the other settings
    from `options`, default `EditOptions()`)."""
    from dataclasses import replace

    from tqdm import tqdm

    from .edits import EditOptions, edit

    options = options or EditOptions()
    curve = {f: [] for f in fractions}
    pictures = {}
    for pair in tqdm(pairs, desc="replacement sweep", disable=not progress):
        gen = replace(generation, seed=pair.seed)
        source = None
        for f in fractions:
            r = edit(pipe, pair.source, pair.target, replace(options, cross_steps=f), gen, vanilla=False,
                     progress=False)
            source = source or r.controlled.images[0]
            curve[f].append(score_edit(pair, source, r.controlled.images[1]))
            if pair is pairs[0]:
                pictures[f] = r.controlled.images[1]
    return {"curve": {str(f): summarize(s) for f, s in curve.items()}, "images": pictures, "pair": asdict(pairs[0])}
