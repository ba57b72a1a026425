"""Measure the shapes model against the world's truth: colours, shapes, object count, attention-mask IoU, autoencoder.

    python -m prompt2prompt.shapes.evaluate [--model shapes] [--count 200] [--json eval.json]

Captions come from the world's sampler with fixed seeds, one initial latent per caption (seeded). Each generated image
is segmented by colour: pixels whose chroma (max - min of RGB) exceeds 0.3 are object pixels (the world's colours have
0.6 or more, its greys 0), labelled with the nearest of the world's hues; a colour counts as present with at least
`min_pixels` pixels. A region's shape is the world shape whose rendered template (fitted to the bounding box of the
region's largest connected part, so stray specks do not stretch it) overlaps that part best (IoU). The attention IoU
compares each noun's cross-attention map (all recorded resolutions, upsampled, min-max normalised, thresholded at 0.5
or --attention-threshold, resized to the image) with the region of its object; a noun whose object is missing scores 0.
Objects are counted as the 8-connected parts of at least `min_pixels` pixels of every colour region (two objects of
one colour count as two, touching objects of two colours too): exact count is the share of captions whose image has as
many objects as the caption names, split by one- and two-object captions, with duplicates (more) and misses (fewer).
The autoencoder's reconstruction of 200 seeded world renders is measured against the renders (PSNR).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..attention import AttentionController, Controllers
from ..generation import GenerationOptions, generate, initial_latent
from ..maps import cross_maps
from ..metrics import iou
from ..store import AttentionStore, RecordOptions
from ..tokens import prompt_tokens
from . import world

CHROMA = 0.3  # object pixels are coloured, backgrounds are grey. (Relative saturation, (max-min)/max, was used first:
# on dark backgrounds it blows the autoencoder's faint tints up into object pixels, and 13% of reconstructions of
# correct shapes failed the shape test.)
MIN_PIXELS = 25  # a colour region smaller than this is noise
ATTENTION_THRESHOLD = 0.5

_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in world.COLOURS.items()}


def segment(image: np.ndarray, min_pixels: int = MIN_PIXELS) -> dict[str, np.ndarray]:
    """{colour: (h, w) bool mask} of the world colours present in an (h, w, 3) float image in [0, 1]."""
    mx, mn = image.max(-1), image.min(-1)
    objects = (mx - mn) > CHROMA
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    hue = np.zeros_like(mx)  # standard RGB -> hue, vectorised
    delta = np.maximum(mx - mn, 1e-6)
    hue = np.where(mx == r, ((g - b) / delta) % 6, hue)
    hue = np.where(mx == g, (b - r) / delta + 2, hue)
    hue = np.where(mx == b, (r - g) / delta + 4, hue)
    hue = hue / 6.0
    names = list(_HUES)
    ref = np.array([_HUES[n] for n in names])
    dist = np.abs(hue[..., None] - ref)
    dist = np.minimum(dist, 1 - dist)
    label = dist.argmin(-1)
    regions = {}
    for k, name in enumerate(names):
        mask = objects & (label == k)
        if mask.sum() >= min_pixels:
            regions[name] = mask
    return regions


def parts(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, largest first."""
    if not mask.any():
        return []
    inside = torch.from_numpy(mask)[None, None]
    labels = torch.arange(1, mask.size + 1, dtype=torch.float32).view(1, 1, *mask.shape) * inside
    while True:  # every pixel takes the largest label among its neighbours until the components agree
        grown = torch.nn.functional.max_pool2d(labels, 3, stride=1, padding=1) * inside
        if torch.equal(grown, labels):
            break
        labels = grown
    values, counts = labels[inside].unique(return_counts=True)
    return [(labels == values[k])[0, 0].numpy() for k in counts.argsort(descending=True).tolist()]


def largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask."""
    found = parts(mask)
    return found[0] if found else mask


def count_objects(regions: dict[str, np.ndarray], min_pixels: int = MIN_PIXELS) -> int:
    """Objects in an image: the connected parts of every colour region with at least min_pixels pixels. Objects of
    different colours that touch count as two; one colour in two places counts as two."""
    return sum(1 for m in regions.values() for part in parts(m) if part.sum() >= min_pixels)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The world shape whose template best overlaps the mask's largest part, and that IoU."""
    mask = largest_part(mask)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return "none", 0.0
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    half = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 2
    best = ("none", 0.0)
    for shape in world.SHAPES:
        for r in [half * f * k for f in (0.9, 0.95, 1.0, 1.05, 1.1) for k in (1.0, 1 / 0.85)]:
            template = world.shape_mask(shape, (cx, cy), r, mask.shape[0])
            iou = (template & mask).sum() / max(1, (template | mask).sum())
            if iou > best[1]:
                best = (shape, float(iou))
    return best


MEASURES = {  # EvalResult field: what it measures
    "colour_accuracy": "colour accuracy",
    "shape_accuracy": "shape accuracy",
    "exact_count": "exact object count",
    "exact_count_one": "exact object count, one-object captions",
    "exact_count_two": "exact object count, two-object captions",
    "duplicates": "more objects than named",
    "misses": "fewer objects than named",
    "both_present": "two colour regions (two-object captions)",
    "attention_iou": "attention-mask IoU (nouns)",
    "autoencoder_psnr": "autoencoder reconstruction vs input (dB)",
}
BARS = {  # the bars a bundled model must pass to ship
    "shapes": {"colour_accuracy": 0.99, "shape_accuracy": 0.93, "exact_count": 0.95, "exact_count_two": 0.90,
               "attention_iou": 0.60, "autoencoder_psnr": 32.0},  # issue "shapes v2"
    "shapes-flow": {"colour_accuracy": 0.95, "shape_accuracy": 0.85, "exact_count": 0.90,
                    "attention_iou": 0.50},  # issue "shapes-flow"
}


@dataclass
class EvalResult:
    colour_accuracy: float  # named colours found in the image
    shape_accuracy: float  # caption shapes recognised (in the named colour's region where a colour is named)
    both_present: float  # two-object captions with two colour regions
    attention_iou: float  # mean IoU of each noun's thresholded cross-attention with its object's region
    count: int
    exact_count: float = float("nan")  # captions whose image has exactly as many objects as the caption names
    exact_count_one: float = float("nan")  # ... among one-object captions
    exact_count_two: float = float("nan")  # ... among two-object captions
    duplicates: float = float("nan")  # captions with more objects than named (a duplicate or an extra object)
    misses: float = float("nan")  # captions with fewer objects than named (one missing, or two merged)
    autoencoder_psnr: float = float("nan")  # dB, the autoencoder's reconstruction of world renders vs the renders
    settings: dict = field(default_factory=dict)
    per_caption: list[dict] = field(default_factory=list)

    def table(self, bars: dict[str, float] | None = None) -> str:
        bars = BARS["shapes"] if bars is None else bars
        lines = [f"{'measure':<44}{'value':>8}{'bar':>8}  pass", "-" * 66]
        for key, name in MEASURES.items():
            value, bar = getattr(self, key), bars.get(key)
            verdict = "" if bar is None else ("yes" if value >= bar else "NO")
            lines.append(f"{name:<44}{value:>8.3f}{'' if bar is None else f'{bar:.2f}':>8}  {verdict}")
        return "\n".join(lines) + f"\n({self.count} captions)"


def match_objects(regions: dict[str, np.ndarray], caption: str,
                  shapes_of: dict[str, str] | None = None) -> list[tuple[str | None, str, str | None]]:
    """Each object the caption names, as (colour named or None, shape, the colour key of its region in `regions`
    or None when it is missing): a named colour's region, else the unclaimed region with that shape (`shapes_of`:
    each region's shape, `classify_shape`'s, when already known)."""
    shapes_of = shapes_of if shapes_of is not None else {c: classify_shape(m)[0] for c, m in regions.items()}
    unclaimed, found = dict(regions), []
    for colour, shape in world.parse_caption(caption):
        if colour is not None:
            key = colour if colour in regions else None
        else:  # colour left to the model: the region with that shape, if any
            key = next((c for c in unclaimed if shapes_of[c] == shape), None)
        unclaimed.pop(key, None)
        found.append((colour, shape, key))
    return found


def score_image(image: np.ndarray, caption: str, maps=None, prompt: int = 0,
                threshold: float = ATTENTION_THRESHOLD) -> dict:
    """Per-caption scores: colours found, shapes recognised, both objects, attention IoU per noun."""
    regions = segment(image)
    shapes_of = {c: classify_shape(m)[0] for c, m in regions.items()}
    row = {"caption": caption, "found": {c: shapes_of[c] for c in regions}, "colour_ok": [], "shape_ok": [],
           "iou": []}
    matched = match_objects(regions, caption, shapes_of)
    for colour, shape, key in matched:
        if colour is not None:
            row["colour_ok"].append(key is not None)
        region = regions.get(key)
        row["shape_ok"].append(region is not None and shapes_of[key] == shape)
        if maps is not None:
            heat = maps.word(shape, prompt=prompt)
            attention = heat.mask(threshold, size=image.shape[:2]).numpy()
            row["iou"].append(iou(attention, region) if region is not None else 0.0)
    if len(matched) == 2:
        row["both"] = len(regions) >= 2
    row["named"], row["objects"] = len(matched), count_objects(regions)
    return row


def evaluate(pipe, count: int = 200, seed: int = 1234, options: GenerationOptions = GenerationOptions(),
             batch: int = 25, progress: bool = True, threshold: float = ATTENTION_THRESHOLD,
             controller: AttentionController | None = None) -> EvalResult:
    """Generate `count` seeded captions (batches of `batch`) and score them; controller: one more controller in the
    loop besides the attention recorder (a benchmark's), or None."""
    rng = random.Random(seed)
    captions = [world.sample_scene(rng).caption for _ in range(count)]
    rows = []
    from tqdm import tqdm

    for start in tqdm(range(0, count, batch), desc="evaluating", disable=not progress):
        chunk = captions[start : start + batch]
        tokens = [prompt_tokens(pipe, c, options.max_sequence_length) for c in chunk]
        latents = torch.cat([initial_latent(pipe, replace(options, seed=seed + start + k)) for k in range(len(chunk))])
        store = AttentionStore(RecordOptions(self_attention=False))
        gen = generate(pipe, chunk, Controllers(store, controller), options, latent=latents, progress=False)
        maps = cross_maps(store, tokens)
        for k, (caption, image) in enumerate(zip(chunk, gen.images)):
            rows.append(score_image(np.asarray(image, dtype=np.float32) / 255.0, caption, maps, k, threshold))
    colour = [ok for r in rows for ok in r["colour_ok"]]
    shape = [ok for r in rows for ok in r["shape_ok"]]
    both = [r["both"] for r in rows if "both" in r]
    ious = [v for r in rows for v in r["iou"]]
    counts = count_summary(rows)
    settings = {"count": count, **options.to_dict(), "seed": seed, "chroma": CHROMA,  # seed: captions and latents
                "min_pixels": MIN_PIXELS, "attention_threshold": threshold}
    return EvalResult(float(np.mean(colour)), float(np.mean(shape)), float(np.mean(both)), float(np.mean(ious)),
                      count, autoencoder_psnr=autoencoder_psnr(pipe, count, seed), settings=settings,
                      per_caption=rows, **counts)


@torch.no_grad()
def autoencoder_psnr(pipe, count: int = 200, seed: int = 1234) -> float:
    """Mean PSNR (dB) of the autoencoder's reconstruction of count seeded world renders against the renders: the
    ceiling of every inversion."""
    from ..inversion import autoencoder_reconstruction
    from ..metrics import psnr

    scenes, _ = world.batch(seed=seed, count=count)
    values = []
    for scene in scenes:
        image = scene.image()
        values.append(psnr(autoencoder_reconstruction(pipe, image), image))
    return float(np.mean(values))


def count_summary(rows: list[dict]) -> dict[str, float]:
    """Exact-count accuracy overall and by the number of objects named; duplicates and misses."""
    def share(selected, test):
        selected = list(selected)
        return float(np.mean([test(r) for r in selected])) if selected else float("nan")

    return {"exact_count": share(rows, lambda r: r["objects"] == r["named"]),
            "exact_count_one": share((r for r in rows if r["named"] == 1), lambda r: r["objects"] == 1),
            "exact_count_two": share((r for r in rows if r["named"] == 2), lambda r: r["objects"] == 2),
            "duplicates": share(rows, lambda r: r["objects"] > r["named"]),
            "misses": share(rows, lambda r: r["objects"] < r["named"])}


def main(argv: list[str] | None = None) -> None:
    from ..loading import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="bundled name or pipeline folder (default: shapes)")
    parser.add_argument("--count", type=int, default=200, help="captions to generate (default: 200)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the captions and latents (default: 1234)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    parser.add_argument("--attention-threshold", type=float, default=ATTENTION_THRESHOLD,
                        help=f"threshold of the min-max normalised noun maps (default: {ATTENTION_THRESHOLD})")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="MM-DiT: T5 (or, without T5, zero) tokens per caption (default: the pipeline's)")
    parser.add_argument("--json", default=None, help="write the results (with per-caption rows) to this file")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    options = GenerationOptions(steps=args.steps, guidance=args.guidance, max_sequence_length=args.max_sequence_length)
    result = evaluate(pipe, args.count, args.seed, options, threshold=args.attention_threshold)
    from ..flow import is_flow

    print(result.table(BARS.get(str(args.model)) or BARS["shapes-flow" if is_flow(pipe) else "shapes"]))
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(result), "model": args.model}, indent=2))


if __name__ == "__main__":
    main()
