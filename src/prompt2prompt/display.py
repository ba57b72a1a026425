"""How results show themselves in a notebook: a picture (`_repr_png_`, with token labels) and a one-line summary
(`__repr__`). The result classes call these; the pictures are the ones `figures` and `plot` already draw for the
command line's reports, so computing stays apart from drawing."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .plot import argmax_image, grid, line_plot, titled  # drawing primitives; no result module is imported here


def png(image: Image.Image) -> bytes:
    """A picture as PNG bytes (what Jupyter's `_repr_png_` returns)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def changed_words(prompts: list[str]) -> list[list[tuple[str, bool]]]:
    """Each prompt as (word, changed) runs: a word is changed where the global word alignment with the source (or,
    for the source, with any edited prompt) does not pair it with the same word."""
    from .alignment import align_sequences

    words = [p.split() for p in prompts]
    kept_in_source = set(range(len(words[0])))
    runs = [None]
    for w in words[1:]:
        pairs = align_sequences(words[0], w)
        kept_in_source &= {i for i, _ in pairs}
        same = {j for _, j in pairs}
        runs.append([(word, j not in same) for j, word in enumerate(w)])
    runs[0] = [(word, i not in kept_in_source) for i, word in enumerate(words[0])]
    return runs


def edit_title(settings: dict) -> str:
    """'mode replace', 'mode refine', 'mode reweight: blue x0, circle x2', with a replace or refine that also
    re-weights naming its words too."""
    requested, mode = settings.get("requested_mode", settings["mode"]), settings["mode"]
    words = ", ".join(f"{w} x{f:g}" for w, f in settings.get("reweight") or ())
    if requested == "reweight" or (words and requested == "auto" and _same_prompts(settings)):
        return f"mode reweight: {words}"
    return f"mode {mode}" + (f", re-weighted {words}" if words else "")


def _same_prompts(settings: dict) -> bool:
    prompts = settings.get("prompts") or []
    return len(set(prompts)) == 1


def edit_grid(result, cell: int = 160, inversion=None) -> Image.Image:
    """Columns: the prompts (changed words highlighted). Rows: vanilla (same seed, no control) and Prompt-to-Prompt."""
    prompts = [p.prompt for p in result.prompts]
    images = list(result.controlled.images)
    rows = ["p2p"]
    if result.vanilla is not None:
        images = list(result.vanilla.images) + images
        rows = ["vanilla", "p2p"]
    labels = changed_words(prompts) * len(rows)
    mode = edit_title(result.settings)
    if inversion is not None:
        title = f"edit of a real image ({inversion.options.method} inversion), {mode}"
    else:
        title = f"{mode}, seed {result.settings['seed']}"
    return grid(images, labels, columns=len(prompts), cell=cell, row_labels=rows, title=title)


def swap_figures(result) -> dict[str, Image.Image]:
    """A swap analysis's pictures: each prompt's most-attended word per pixel at the first step, the drift over the
    steps, and the images vanilla and controlled."""
    maps = result.first_step_maps
    pictures = {}
    for k in range(2):
        words = maps.prompts[k].words
        first = np.array([w.tokens[0] for w in words] + [-1])  # each word's first token position; -1: none
        positions = first[maps.word_index(k).numpy()]  # (h, w) as the attention figures number tokens
        names = {w.tokens[0]: f"{w.tokens[0]}: {w.text}" for w in words}  # repeated words told apart
        picture = argmax_image(positions, names)
        pictures[f"argmax_step0_{k}"] = titled(picture, f"step 0, “{result.prompts[k]}”: most-attended word")
    pictures["drift"] = line_plot(
        {"vanilla": result.drift_vanilla, "p2p controlled": result.drift_controlled}, "denoising step",
        "|x_edit - x_source| / |x_source|", title="how far the edited latents drift from the source's")
    prompts = result.prompts
    pictures["images"] = grid(list(result.vanilla.images) + list(result.controlled.images),
                                   changed_words(prompts) * 2, columns=2, cell=160, row_labels=["vanilla", "p2p"])
    return pictures


def heat_map_picture(heat) -> Image.Image:
    return grid([heat.image()], [heat.label], cell=160)


def maps_picture(maps, cell: int = 96) -> Image.Image:
    """Each prompt's token maps in a row, each labelled with its token."""
    images, labels, rows = [], [], []
    widest = max(len(maps.tokens(k)) for k in range(len(maps.prompts)))
    for k in range(len(maps.prompts)):
        heats = maps.tokens(k)
        images += [h.image() for h in heats] + [Image.new("RGB", (8, 8), "white")] * (widest - len(heats))
        labels += [h.label for h in heats] + [""] * (widest - len(heats))
        rows.append(f"prompt {k}")
    return grid(images, labels, columns=widest, cell=cell, row_labels=rows if len(rows) > 1 else None,
                title=" | ".join(p.prompt for p in maps.prompts), max_columns=widest)


def attend_picture(result) -> Image.Image:
    """The image and its per-token overlays."""
    maps = result.maps()
    heats = maps.tokens(0)
    return grid([result.images[0], *(h.overlay(result.images[0]) for h in heats)],
                ["image", *(h.label for h in heats)], cell=128, title=result.settings["prompts"][0])


def pair_picture(images: list[Image.Image], labels: list[str], title: str = "") -> Image.Image:
    return grid(images, labels, cell=160, title=title or None)


def maps_summary(maps) -> str:
    h, w = maps.values.shape[1:3]
    words = ", ".join(maps.prompts[0].word_list()[:8])
    return f"CrossAttentionMaps({len(maps.prompts)} prompt(s), {h}x{w}, words: {words})"
