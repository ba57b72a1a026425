"""What the CLI writes: pictures, JSON and a self-contained HTML page for attend, edit and swap-analysis results."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from . import plot
from .analysis import SwapAnalysis
from .attend import AttendResult
from .edits import EditResult
from .maps import CrossAttentionMaps, HeatMap
from .report import Section, page, staged, write_json

CAPTIONS = {
    "image": "generated image",
    "cross_attention": "cross-attention of each token (each map normalised to its own range)",
    "overlays": "each token's map over the image",
    "argmax": "most-attended token per pixel (start token and padding ignored)",
    "self_attention": "top principal components of the self-attention (mean-centred rows, SVD)",
}


def attention_figures(result: AttendResult, maps: CrossAttentionMaps, prompt: int = 0, components: int = 6,
                      cell: int = 128) -> dict[str, Image.Image]:
    """The pictures of one prompt: image, per-token grid, overlays, argmax-token map, self-attention components."""
    image = result.images[prompt]
    heat = maps.tokens(prompt)
    labels = [m.label for m in heat]
    tokens = maps.prompts[prompt]
    figures = {
        "image": image,
        "cross_attention": plot.grid([m.image() for m in heat], labels, cell=cell,
                                     title=f"cross-attention per token: {tokens.prompt}"),
        "overlays": plot.grid([m.overlay(image) for m in heat], labels, cell=cell, title="overlaid on the image"),
        "argmax": plot.argmax_image(maps.argmax(prompt).numpy(), {i: f"{i}: {tokens.tokens[i]}"
                                                                  for i in range(1, tokens.end)}),
    }
    if components and result.store.resolutions(cross=False):
        selfmaps = result.self_maps()
        comps = selfmaps.components(components, prompt)
        figures["self_attention"] = plot.grid(
            [HeatMap(c, "").image() for c in comps], [f"component {i + 1}" for i in range(len(comps))],
            cell=cell, title=f"self-attention components at {selfmaps.size[0]}x{selfmaps.size[1]}")
    return figures


def write_attend(result: AttendResult, out, res: int | tuple[int, ...] | None = None, components: int = 6) -> dict:
    """Image(s), grids, maps (safetensors + JSON), settings and index.html into out; returns the files."""
    maps = result.maps(res=res)
    files, sections = {}, []
    sel = maps.settings["selection"]
    with staged(out) as tmp:
        for p in range(len(result.prompts)):
            suffix = "" if len(result.prompts) == 1 else f"_{p}"
            figures = attention_figures(result, maps, p, components)
            for name, fig in figures.items():
                fig.save(tmp / f"{name}{suffix}.png")
                files[f"{name}{suffix}"] = f"{name}{suffix}.png"
            sections.append(Section(f"“{result.prompts[p].prompt}”",
                                    f"Maps at {sel['map_size']} from {sel['layers']} cross-attention layers, "
                                    "averaged over heads and steps.",
                                    [(CAPTIONS[n], f) for n, f in figures.items()]))
        maps.save(tmp / "maps")
        files.update(maps="maps.safetensors", maps_json="maps.json", settings="settings.json", html="index.html")
        write_json(tmp / "settings.json", maps.settings)
        (tmp / "index.html").write_text(page("prompt2prompt: attention maps", sections, maps.settings))
    return {k: Path(out) / v for k, v in files.items()}


def edit_grid(result: EditResult, cell: int = 160) -> Image.Image:
    """Columns: the prompts. Rows: vanilla (same seed, no control) and Prompt-to-Prompt."""
    prompts = [p.prompt for p in result.prompts]
    images = list(result.controlled.images)
    rows = ["p2p"]
    if result.vanilla is not None:
        images = list(result.vanilla.images) + images
        rows = ["vanilla", "p2p"]
    labels = prompts * len(rows)
    return plot.grid(images, labels, columns=len(prompts), cell=cell, row_labels=rows,
                     title=f"mode {result.settings['mode']}, seed {result.settings['seed']}")


def write_edit(result: EditResult, out, model: str = "") -> dict:
    settings = {**result.settings, "model": str(model)}
    files = {}
    with staged(out) as tmp:
        grid = edit_grid(result)
        grid.save(tmp / "grid.png")
        files["grid"] = "grid.png"
        shown = [("Vanilla row: the same prompts and seed without control; p2p row: attention-controlled", grid)]
        for k, image in enumerate(result.controlled.images):
            name = "source" if k == 0 else f"edit_{k}"
            image.save(tmp / f"{name}.png")
            files[name] = f"{name}.png"
            if result.vanilla is not None:
                result.vanilla.images[k].save(tmp / f"vanilla_{name}.png")
                files[f"vanilla_{name}"] = f"vanilla_{name}.png"
        if result.mask is not None:
            masks = [plot.upscale(Image.fromarray((m[0].float().cpu().numpy() * 255).astype("uint8")), 128)
                     for m in result.mask[1:]]
            mask_grid = plot.grid(masks, [f"edit {k + 1}" for k in range(len(masks))], title="local-blend mask")
            mask_grid.save(tmp / "blend_mask.png")
            files["blend_mask"] = "blend_mask.png"
            shown.append(("local-blend mask at the last step: white may change, black is the source's", mask_grid))
        write_json(tmp / "settings.json", settings)
        files["settings"] = "settings.json"
        (tmp / "index.html").write_text(page("prompt2prompt: edit", [Section("Edit", "", shown)], settings))
        files["html"] = "index.html"
    return {k: Path(out) / v for k, v in files.items()}


def swap_figures(result: SwapAnalysis) -> dict[str, Image.Image]:
    from .analysis import word_index_map

    maps = result.first_step_maps
    pictures = {}
    for k in range(2):
        words = word_index_map(maps, k).numpy()
        names = {i: w.text for i, w in enumerate(maps.prompts[k].words)}
        pictures[f"argmax_step0_{k}"] = plot.argmax_image(words, names)
    pictures["drift"] = plot.line_plot(
        {"vanilla": result.drift_vanilla, "p2p controlled": result.drift_controlled}, "denoising step",
        "|x_edit - x_source| / |x_source|", title="how far the edited latents drift from the source's")
    prompts = result.prompts
    pictures["images"] = plot.grid(list(result.vanilla.images) + list(result.controlled.images), prompts * 2,
                                   columns=2, cell=160, row_labels=["vanilla", "p2p"])
    return pictures


def write_swap(result: SwapAnalysis, out, model: str = "") -> dict:
    files = {}
    numbers = {**result.to_dict(), "model": str(model)}
    with staged(out) as tmp:
        pictures = swap_figures(result)
        for name, pic in pictures.items():
            pic.save(tmp / f"{name}.png")
            files[name] = f"{name}.png"
        write_json(tmp / "swap_analysis.json", numbers)
        files["json"] = "swap_analysis.json"
        table = [
            ("pixels whose most-attended word changes at step 0", f"{result.argmax_changed:.1%}",
             "swapping one token column re-ranks the words of many pixels"),
            ("pixels attending most to the swapped word (source, edit)",
             f"{result.swapped_word_share[0]:.1%}, {result.swapped_word_share[1]:.1%}", "the column that changed"),
            ("final latent drift, vanilla", f"{result.drift_vanilla[-1]:.3f}", "relative L2 distance to the source"),
            ("final latent drift, controlled", f"{result.drift_controlled[-1]:.3f}", "the same with p2p control"),
        ]
        sections = [
            Section("One word, whole image", "From one seed, the swapped prompt without control diverges early and "
                    "ends in another layout; with attention control it keeps the source's layout.",
                    [("vanilla and controlled images", pictures["images"])], table),
            Section("First step", "Most-attended word per pixel at the first denoising step, for each prompt.",
                    [(f"“{p}”", pictures[f"argmax_step0_{k}"]) for k, p in enumerate(result.prompts)]),
            Section("Drift over the steps", "", [("latent drift per step", pictures["drift"])]),
        ]
        (tmp / "index.html").write_text(page("prompt2prompt: swap analysis", sections, numbers))
        files["html"] = "index.html"
    return {k: Path(out) / v for k, v in files.items()}
