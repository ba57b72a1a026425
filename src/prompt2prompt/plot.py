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

# Distinct colours for the lines of a plot: Glasbey-like.
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


Label = str | Sequence[tuple[str, bool]]  # plain text, or runs of (text, highlighted)
HIGHLIGHT = (200, 30, 30)  # highlighted words (the words an edit changed) are drawn in this colour, underlined


def _runs(label: Label) -> list[tuple[str, bool]]:
    """A label as a list of (word, highlighted)."""
    if isinstance(label, str):
        return [(w, False) for w in label.split()]
    return [(w, hl) for text, hl in label for w in text.split()]


def _wrap(draw: ImageDraw.ImageDraw, label: Label, f, width: int, max_lines: int = 4) -> list[list[tuple[str, bool]]]:
    """Word-wrap a label into lines that fit width; a word too long for a line is cut with an ellipsis."""
    lines: list[list[tuple[str, bool]]] = [[]]
    for word, hl in _runs(label):
        word = _fit(draw, word, f, width)
        trial = " ".join(w for w, _ in lines[-1] + [(word, hl)])
        if lines[-1] and draw.textlength(trial, font=f) > width:
            lines.append([])
        lines[-1].append((word, hl))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        lines[-1] = last[:-1] + [(_fit(draw, last[-1][0] + " …", f, width), last[-1][1])] if last else [("…", False)]
    return lines


def _draw_lines(draw: ImageDraw.ImageDraw, lines, f, x: int, y: int, width: int, line_h: int) -> None:
    for k, line in enumerate(lines):
        total = draw.textlength(" ".join(w for w, _ in line), font=f)
        cx = x + (width - total) / 2
        for word, hl in line:
            colour = HIGHLIGHT if hl else (0, 0, 0)
            draw.text((cx, y + k * line_h), word, fill=colour, font=f)
            w = draw.textlength(word, font=f)
            if hl:
                draw.line([(cx, y + k * line_h + line_h - 2), (cx + w, y + k * line_h + line_h - 2)], fill=colour)
            cx += w + draw.textlength(" ", font=f)


def grid(
    images: Sequence[Image.Image], labels: Sequence[Label] | None = None, columns: int | None = None,
    cell: int = 128, title: str | None = None, row_labels: Sequence[str] | None = None, max_columns: int = 8,
) -> Image.Image:
    """Images in a grid (at most max_columns wide unless columns is given), each resized to cell x cell with its label
    word-wrapped under it; highlighted words of a label are drawn in red and underlined."""
    columns = columns or min(len(images), max_columns) or 1
    rows = -(-len(images) // columns)
    f, tf = font(max(10, cell // 10)), font(max(12, cell // 8))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(10, cell // 10) + 3
    wrapped = [_wrap(measure, label, f, cell) for label in labels] if labels else []
    label_h = (max(len(w) for w in wrapped) * line_h + 6) if wrapped else 0
    title_lines = _wrap(measure, title, tf, columns * (cell + 4), max_lines=3) if title else []
    title_h = len(title_lines) * (max(12, cell // 8) + 4) + 8 if title else 0
    left = max((int(measure.textlength(r, font=f)) + 12 for r in row_labels or []), default=0)
    pad = 4
    width = left + columns * (cell + pad) + pad
    canvas = Image.new("RGB", (width, title_h + rows * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title_lines:
        for k, line in enumerate(title_lines):
            draw.text((pad, 4 + k * (max(12, cell // 8) + 4)), " ".join(w for w, _ in line), fill="black", font=tf)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        x, y = left + pad + c * (cell + pad), title_h + pad + r * (cell + label_h + pad)
        resample = Image.NEAREST if im.width < cell else Image.BILINEAR
        canvas.paste(im.convert("RGB").resize((cell, cell), resample), (x, y))
        if wrapped:
            _draw_lines(draw, wrapped[i], f, x, y + cell + 3, cell, line_h)
    for r, text in enumerate(row_labels or []):
        y = title_h + pad + r * (cell + label_h + pad) + cell // 2 - 6
        draw.text((4, y), text, fill="black", font=f)
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, f, width: int) -> str:
    while text and draw.textlength(text, font=f) > width:
        text = text[:-2] + "…" if len(text) > 2 else text[:-1]
    return text


# The argmax-token map's colours, one per token position: chosen away from the shapes world's saturated red, orange,
# yellow, green, blue and purple (shapes/world.py), so a word's legend colour is never read as an object's colour.
TOKEN_COLOURS = [
    (0, 0, 0), (128, 128, 128), (70, 230, 230), (255, 200, 150), (255, 255, 255), (140, 90, 40), (0, 90, 110),
    (250, 190, 212), (60, 60, 60), (255, 250, 200), (200, 200, 200), (128, 128, 0), (170, 255, 210), (180, 160, 120),
]


def token_colour(position: int) -> tuple[int, int, int]:
    """The colour of a token position in every argmax map (the same position, the same colour, across a report);
    beyond the list, muted hues spaced by the golden angle."""
    import colorsys

    if 0 <= position < len(TOKEN_COLOURS):
        return TOKEN_COLOURS[position]
    k = position - len(TOKEN_COLOURS)
    hue = (k * 0.618033988749895) % 1.0
    return tuple(int(round(255 * c)) for c in colorsys.hls_to_rgb(hue, (0.25, 0.85)[k % 2], 0.3))


def argmax_image(indices: np.ndarray, labels: dict[int, str], size: int = 256) -> Image.Image:
    """The most-attended token per pixel, coloured by token position (`token_colour`; black where the index has no
    label), with a legend (in columns) on the right. indices: (h, w) token positions; labels: position -> text."""
    present = sorted(int(i) for i in np.unique(indices))
    rows = [tok for tok in sorted(labels) if tok in present]
    colours = {tok: token_colour(tok) for tok in rows}
    rgb = np.zeros((*indices.shape, 3), dtype=np.uint8)
    for tok in present:
        rgb[indices == tok] = colours.get(tok, (0, 0, 0))
    picture = Image.fromarray(rgb).resize((size, size * indices.shape[0] // indices.shape[1]), Image.NEAREST)
    f = font(13)
    per_column = max(1, (max(picture.height, 200) - 10) // 20)
    columns = [rows[k : k + per_column] for k in range(0, len(rows), per_column)] or [[]]
    measure = ImageDraw.Draw(picture)
    widths = [28 + max((int(measure.textlength(labels[t], font=f)) for t in col), default=40) + 12 for col in columns]
    canvas = Image.new("RGB", (picture.width + 8 + sum(widths), max(picture.height, 20 * min(len(rows), per_column)
                                                                    + 10)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = picture.width + 8
    for col, w in zip(columns, widths):
        for k, tok in enumerate(col):
            y = 6 + 20 * k
            draw.rectangle([x, y, x + 14, y + 14], fill=colours[tok], outline="black")
            draw.text((x + 20, y), labels[tok], fill="black", font=f)
        x += w
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
    """A small line chart (one line per series), its legend beside the plot so it hides no curve."""
    f = font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = 40 + max((int(measure.textlength(name, font=f)) for name in series), default=0)
    w, h = size[0] + legend_w, size[1]
    left, right, top, bottom = 56, 16 + legend_w, 30 if title else 12, 40
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
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
        ly = y1 + 4 + 18 * n
        draw.line([(x1 + 12, ly + 7), (x1 + 32, ly + 7)], fill=colour, width=3)
        draw.text((x1 + 36, ly), name, fill="black", font=f)
    return canvas


def titled(image: Image.Image, title: str, size: int = 13) -> Image.Image:
    """The image with a title line above it (word-wrapped to its width)."""
    f = font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(measure, title, f, max(image.width - 8, 40), max_lines=3)
    top = len(lines) * (size + 4) + 8
    canvas = Image.new("RGB", (image.width, image.height + top), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, 4 + k * (size + 4)), " ".join(w for w, _ in line), fill="black", font=f)
    canvas.paste(image.convert("RGB"), (0, top))
    return canvas


def mask_overlay(image: Image.Image, mask: np.ndarray, size: int = 160) -> Image.Image:
    """A (h, w) boolean mask drawn over the image: outside dimmed to grey, inside kept, its edge outlined in red."""
    base = image.convert("RGB").resize((size, size * image.height // image.width), Image.BILINEAR)
    inside = Image.fromarray((mask * 255).astype(np.uint8)).resize(base.size, Image.NEAREST)
    grey = Image.blend(base, Image.new("RGB", base.size, (128, 128, 128)), 0.7)
    out = Image.composite(base, grey, inside)
    m = np.asarray(inside) > 0
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    arr = np.asarray(out).copy()
    arr[edge] = HIGHLIGHT
    return Image.fromarray(arr)
