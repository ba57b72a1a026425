"""Pictures: heat-map colouring, overlays, labelled grids and the argmax-token map. PIL only, PNG out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A perceptual, colour-blind-safe ramp: anchor colours of matplotlib's "viridis" (public colormap data), interpolated.
_ANCHORS = np.array(
    [
        [0.267, 0.005, 0.329],
        [0.283, 0.141, 0.458],
        [0.254, 0.265, 0.530],
        [0.207, 0.372, 0.553],
        [0.164, 0.471, 0.558],
        [0.128, 0.567, 0.551],
        [0.135, 0.659, 0.518],
        [0.267, 0.749, 0.441],
        [0.478, 0.821, 0.318],
        [0.741, 0.873, 0.150],
        [0.993, 0.906, 0.144],
    ]
)

# Distinct colours for categorical maps (the argmax-token map): Glasbey-like, light enough for black text.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def colorize(values: np.ndarray) -> Image.Image:
    """(h, w) values in [0, 1] -> RGB image through the ramp."""
    v = np.clip(np.nan_to_num(values), 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_ANCHORS) - 1)
    frac = (v - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[hi] * frac
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def overlay(image: Image.Image, values: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend the coloured (h, w) map over the image (same size)."""
    heat = colorize(values).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def upscale(image: Image.Image, size: int) -> Image.Image:
    """Nearest-neighbour upscale so that small maps stay crisp."""
    return image.resize((size, size * image.height // image.width), Image.NEAREST)


def grid(
    images: Sequence[Image.Image], labels: Sequence[str] | None = None, columns: int | None = None,
    cell: int = 128, title: str | None = None, row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Images in a grid, each resized to cell x cell with its label written under it."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    f, tf = font(max(10, cell // 10)), font(max(12, cell // 8))
    label_h = (cell // 10 + 8) if labels else 0
    title_h = (cell // 8 + 10) if title else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max((int(measure.textlength(r, font=f)) + 12 for r in row_labels or []), default=0)
    pad = 4
    canvas = Image.new("RGB", (left + columns * (cell + pad) + pad, title_h + rows * (cell + label_h + pad) + pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=tf)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        x, y = left + pad + c * (cell + pad), title_h + pad + r * (cell + label_h + pad)
        resample = Image.NEAREST if im.width < cell else Image.BILINEAR
        canvas.paste(im.convert("RGB").resize((cell, cell), resample), (x, y))
        if labels:
            text = _fit(draw, labels[i], f, cell)
            w = draw.textlength(text, font=f)
            draw.text((x + (cell - w) / 2, y + cell + 3), text, fill="black", font=f)
    for r, text in enumerate(row_labels or []):
        y = title_h + pad + r * (cell + label_h + pad) + cell // 2 - 6
        draw.text((4, y), text, fill="black", font=f)
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, f, width: int) -> str:
    while text and draw.textlength(text, font=f) > width:
        text = text[:-2] + "…" if len(text) > 2 else text[:-1]
    return text


def argmax_image(indices: np.ndarray, labels: dict[int, str], size: int = 256) -> Image.Image:
    """The most-attended token per pixel, one colour per token, with a legend on the right."""
    present = sorted(int(i) for i in np.unique(indices))
    colours = {tok: PALETTE[k % len(PALETTE)] for k, tok in enumerate(sorted(labels))}
    rgb = np.zeros((*indices.shape, 3), dtype=np.uint8)
    for tok in present:
        rgb[indices == tok] = colours.get(tok, (0, 0, 0))
    picture = Image.fromarray(rgb).resize((size, size * indices.shape[0] // indices.shape[1]), Image.NEAREST)
    f = font(13)
    rows = [tok for tok in sorted(labels) if tok in present]
    legend_w = 20 + max((int(ImageDraw.Draw(picture).textlength(labels[t], font=f)) for t in rows), default=40) + 30
    canvas = Image.new("RGB", (picture.width + legend_w, max(picture.height, 20 * len(rows) + 10)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, tok in enumerate(rows):
        y = 6 + 20 * k
        draw.rectangle([picture.width + 8, y, picture.width + 22, y + 14], fill=colours[tok], outline="black")
        draw.text((picture.width + 28, y), labels[tok], fill="black", font=f)
    return canvas


def signed_colorize(values: np.ndarray) -> Image.Image:
    """(h, w) values of either sign -> blue (negative) / white / red (positive), scaled by the largest magnitude."""
    scale = float(np.abs(values).max()) or 1.0
    v = np.clip(values / scale, -1, 1)[..., None]
    pos = np.array([0.84, 0.19, 0.15])
    neg = np.array([0.13, 0.40, 0.67])
    white = np.ones(3)
    rgb = np.where(v >= 0, white * (1 - v) + pos * v, white * (1 + v) - neg * v)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def line_plot(series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str = "",
              size: tuple[int, int] = (520, 320)) -> Image.Image:
    """A small line chart (one line per series, with a legend)."""
    w, h = size
    left, right, top, bottom = 56, 16, 30 if title else 12, 40
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    f = font(12)
    values = [v for s in series.values() for v in s]
    longest = max((len(s) for s in series.values()), default=1)
    hi = max(values, default=1.0) or 1.0
    x0, x1, y0, y1 = left, w - right, h - bottom, top
    draw.line([(x0, y0), (x1, y0)], fill="black")
    draw.line([(x0, y0), (x0, y1)], fill="black")
    for k in range(5):  # y ticks
        v = hi * k / 4
        y = y0 - (y0 - y1) * k / 4
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.text((4, y - 7), f"{v:.2f}", fill="black", font=f)
    for k in range(0, longest, max(1, longest // 5)):  # x ticks
        x = x0 + (x1 - x0) * k / max(1, longest - 1)
        draw.text((x - 4, y0 + 4), str(k), fill="black", font=f)
    draw.text(((x0 + x1) / 2 - 30, h - 18), xlabel, fill="black", font=f)
    if title:
        draw.text((x0, 6), title, fill="black", font=font(13))
    draw.text((x0 + 6, y1), ylabel, fill="gray", font=f)
    for n, (name, s) in enumerate(series.items()):
        colour = PALETTE[[3, 0, 1, 5][n % 4]]
        pts = [(x0 + (x1 - x0) * i / max(1, longest - 1), y0 - (y0 - y1) * v / hi) for i, v in enumerate(s)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        ly = y1 + 18 + 16 * n
        draw.line([(x1 - 150, ly + 7), (x1 - 130, ly + 7)], fill=colour, width=3)
        draw.text((x1 - 125, ly), name, fill="black", font=f)
    return canvas
