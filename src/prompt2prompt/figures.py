"""What the CLI writes: pictures, JSON and a self-contained HTML page for attend, edit and swap-analysis results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from . import plot
from .analysis import SwapAnalysis
from .attend import AttendResult
from .display import edit_grid, edit_title, swap_figures
from .edits import EditResult
from .maps import CrossAttentionMaps, HeatMap
from .outputs import staged
from .report import Section, page, write_json

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
                                                                  for i in tokens.word_positions()}),
    }
    if not tokens.words:  # a prompt without words has no argmax map to show
        figures.pop("argmax")
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
        if result.concepts is not None:
            sections.append(_write_concepts(result, tmp, files))
        maps.save(tmp / "maps")
        files.update(maps="maps.safetensors", maps_json="maps.json", settings="settings.json", html="index.html")
        write_json(tmp / "settings.json", maps.settings)
        (tmp / "index.html").write_text(page("prompt2prompt: attention maps", sections, maps.settings))
    return {k: Path(out) / v for k, v in files.items()}


def _write_concepts(result: AttendResult, tmp: Path, files: dict) -> Section:
    """Concept maps of every prompt (both kinds: pictures, the argmax concept, safetensors); their page section."""
    from .concepts import KINDS

    shown = []
    for kind in KINDS:
        cmaps = result.concept_maps(kind)
        name = "concepts" if kind == "output" else f"concepts_{kind}"
        for p in range(len(result.prompts)):
            suffix = "" if len(result.prompts) == 1 else f"_{p}"
            picture = cmaps.picture(p, result.images[p])
            picture.save(tmp / f"{name}{suffix}.png")
            files[f"{name}{suffix}"] = f"{name}{suffix}.png"
            shown.append((f"{'output-space' if kind == 'output' else 'cross-attention'} concept maps{suffix}",
                          picture))
            if kind == "output":
                argmax = cmaps.argmax_picture(p)
                argmax.save(tmp / f"concepts_argmax{suffix}.png")
                files[f"concepts_argmax{suffix}"] = f"concepts_argmax{suffix}.png"
                shown.append((f"the concept with the largest share{suffix}", argmax))
        cmaps.save(tmp / f"{name}.safetensors")
        files[f"{name}_tensor"] = f"{name}.safetensors"
    c = result.settings["concepts"]
    return Section("Concept maps", f"Concepts {', '.join(c['concepts'])}: each one's share of every image token "
                   f"(ConceptAttention), from joint blocks {c['blocks']} over steps {c['steps'][0]} to "
                   f"{c['steps'][1] - 1}. Output space: image tokens' attention outputs against the concepts'; "
                   "cross-attention: image queries against concept keys.", shown)


def write_image_concepts(result, out) -> dict:
    """An input image's concept maps: the image as read, the maps of both kinds over it, the argmax concept, the maps
    as safetensors, settings.json and index.html into out; returns the files."""
    files, shown = {"image": "image.png"}, []
    with staged(out) as tmp:
        result.image.save(tmp / "image.png")
        for cmaps, name in ((result.maps, "concepts"), (result.cross, "concepts_cross")):
            picture = cmaps.picture(0, result.image)
            picture.save(tmp / f"{name}.png")
            cmaps.save(tmp / f"{name}.safetensors")
            files.update({name: f"{name}.png", f"{name}_tensor": f"{name}.safetensors"})
            shown.append((f"{'output-space' if cmaps.kind == 'output' else 'cross-attention'} concept maps", picture))
        argmax = result.maps.argmax_picture(0)
        argmax.save(tmp / "concepts_argmax.png")
        files["concepts_argmax"] = "concepts_argmax.png"
        shown.append(("the concept with the largest share", argmax))
        settings = result.maps.settings
        write_json(tmp / "settings.json", settings)
        files.update(settings="settings.json", html="index.html")
        text = (f"Concepts {', '.join(result.maps.concepts)} of the image captioned “{settings['prompts'][0]}”, read "
                f"at noise level {settings['noise']:g} in one step of the model (ConceptAttention), from joint blocks "
                f"{settings['concepts']['blocks']}.")
        (tmp / "index.html").write_text(page("prompt2prompt: concept maps of an image",
                                             [Section("Concept maps", text, shown)], settings))
    return {k: Path(out) / v for k, v in files.items()}


def _inversion_summary(inversion) -> dict:
    """What an inversion's settings say, without the per-step arrays."""
    settings = dict(inversion.settings)
    losses = settings.pop("losses", [])
    if losses:
        settings["null-text loss, first and last step (before -> after)"] = [losses[0], losses[-1]]
    return {"method": inversion.options.method, "caption": inversion.prompt, **settings}


def write_edit(result: EditResult, out, model: str = "", inversion=None) -> dict:
    from .metrics import psnr

    settings = {**result.settings, "model": str(model or result.settings.get("model", ""))}
    page_settings = {k: v for k, v in settings.items() if k != "inversion"}
    files = {}
    with staged(out) as tmp:
        grid = edit_grid(result, inversion=inversion)
        grid.save(tmp / "grid.png")
        files["grid"] = "grid.png"
        if inversion is not None:
            vanilla = "the same prompts from the inverted latent without attention control"
        else:
            vanilla = f"the same prompts and seed ({settings['seed']}) without attention control"
        shown = [(f"vanilla row: {vanilla}; p2p row: attention-controlled (changed words in red)", grid)]
        sections = []
        if inversion is not None:
            rec = result.controlled.images[0]
            table = [("reconstruction vs input (PSNR)", f"{psnr(rec, inversion.image):.2f} dB",
                      "the source column against the image that was inverted")]
            sections.append(Section("Input", f"The image inverted under “{inversion.prompt}” "
                                    f"({inversion.options.method}, {inversion.options.steps} steps, guidance "
                                    f"{inversion.options.guidance:g}), and its reconstruction.",
                                    [("input", inversion.image), ("reconstruction (the edit's source)", rec)], table))
            page_settings["inversion"] = _inversion_summary(inversion)
        for k, image in enumerate(result.controlled.images):
            name = "source" if k == 0 else f"edit_{k}"
            image.save(tmp / f"{name}.png")
            files[name] = f"{name}.png"
            if result.vanilla is not None:
                result.vanilla.images[k].save(tmp / f"vanilla_{name}.png")
                files[f"vanilla_{name}"] = f"vanilla_{name}.png"
        if result.mask is not None:
            masks = [plot.mask_overlay(result.controlled.images[k + 1], m[0].float().cpu().numpy() > 0.5)
                     for k, m in enumerate(result.mask[1:])]
            mask_grid = plot.grid(masks, [f"edit {k + 1}" for k in range(len(masks))], cell=160,
                                  title="local-blend mask over each edited image")
            mask_grid.save(tmp / "blend_mask.png")
            files["blend_mask"] = "blend_mask.png"
            if result.kept is not None:
                feather = result.settings["background"]["feather"]
                outside = (f"outside (greyed) is the input image's own pixels, exactly beyond {feather} px of the "
                           "mask (--no-keep-background shows the decoded pixels instead)")
            elif inversion is not None:
                outside = ("outside (greyed) the latents are the source's, but the decoded pixels there may shift "
                           "(the input's background was not kept)")
            else:
                outside = "outside (greyed) is the source's"
            shown.append((f"local-blend mask at the last step: inside (bright, red outline) may change, {outside}",
                          mask_grid))
        write_json(tmp / "settings.json", settings)
        files["settings"] = "settings.json"
        title = ("prompt2prompt: edit of a real image" if inversion is not None else "prompt2prompt: edit") + \
            f" ({edit_title(result.settings)})"
        (tmp / "index.html").write_text(page(title, [*sections, Section("Edit", "", shown)], page_settings))
        files["html"] = "index.html"
    return {k: Path(out) / v for k, v in files.items()}


def write_flowedit(result, out, model: str = "") -> dict:
    """A FlowEdit result (`flowedit.FlowEditResult`): input.png, edit.png, a labelled pair, the local-blend mask
    (blend_mask.png, with blend words), settings.json and a self-contained index.html, written whole or not at all."""
    from .metrics import psnr

    settings = {**result.settings, "model": str(model or result.settings.get("model", ""))}
    source, target = settings["prompts"]
    files = {}
    with staged(out) as tmp:
        result.source.save(tmp / "input.png")
        result.image.save(tmp / "edit.png")
        pair = plot.grid([result.source, result.image], [f"input: {source}", f"FlowEdit: {target}"], cell=256,
                         title="FlowEdit (inversion-free)")
        pair.save(tmp / "grid.png")
        files.update(input="input.png", edit="edit.png", grid="grid.png")
        write_json(tmp / "settings.json", settings)
        files["settings"] = "settings.json"
        shown = [("input and edit", pair)]
        table = [("edit vs input (PSNR)", f"{psnr(result.image, result.source):.2f} dB", "how much of the picture "
                  "changed" + ("" if result.mask is not None else " (no mask: FlowEdit edits the whole image)"))]
        if result.mask is not None:  # the local blend's mask, at the image's size
            inside = np.asarray(Image.fromarray(result.mask[0, 0].numpy().astype(np.uint8) * 255).resize(
                result.source.size, Image.NEAREST)) > 0
            overlay = plot.mask_overlay(result.image, inside, size=256)
            overlay.save(tmp / "blend_mask.png")
            files["blend_mask"] = "blend_mask.png"
            shown.append((f"local-blend mask ({', '.join(settings['blend'])}): inside (bright, red outline) may "
                          "change, outside the latent is the input's own", overlay))
            table.append(("outside the mask (PSNR)", f"{psnr(result.image, result.source, ~inside):.2f} dB",
                          "decoded pixels outside the mask against the input (the latent there is the input's; "
                          "the autoencoder's round trip remains)"))
        table.append(("model calls", str(settings["model_calls"]), f"{settings['n_max']} of {settings['steps']} "
                      f"steps, {settings['n_avg']} noise draw(s), source and target"))
        text = (f"The image, captioned “{source}”, moved towards “{target}” by the difference of the target's and "
                f"the source's velocities (guidance {settings['source_guidance']:g} and "
                f"{settings['target_guidance']:g}), without inverting it"
                + (", and kept to the input's own latent outside the blend words' attention mask." if
                   result.mask is not None else "."))
        (tmp / "index.html").write_text(page(f"prompt2prompt: FlowEdit ({source} -> {target})",
                                             [Section("FlowEdit", text, shown, table)],
                                             settings))
        files["html"] = "index.html"
    return {k: Path(out) / v for k, v in files.items()}


def layout_verdict(vanilla: float, controlled: float) -> str:
    """One sentence that says what the final drifts show (and no more)."""
    if controlled < 0.8 * vanilla:
        return (f"With attention control the edited latents end {controlled / max(vanilla, 1e-12):.0%} as far from "
                f"the source's as without it ({controlled:.3f} vs {vanilla:.3f}): control keeps more of the "
                "source's layout.")
    if controlled > 1.25 * vanilla:
        return (f"Here control did not keep the layout closer: the controlled drift ({controlled:.3f}) is larger "
                f"than the vanilla one ({vanilla:.3f}).")
    return (f"Here the two drifts are alike ({controlled:.3f} controlled vs {vanilla:.3f} vanilla): these numbers do "
            "not show control keeping the layout (a model without learned attention, or an edit that moves little).")


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
        verdict = layout_verdict(result.drift_vanilla[-1], result.drift_controlled[-1])
        sections = [
            Section("One word, whole image", "From one seed, the source and the swapped prompt, without and with "
                    f"attention control. {verdict}", [("vanilla and controlled images", pictures["images"])], table),
            Section("First step", "Most-attended word per pixel at the first denoising step, for each prompt.",
                    [(f"“{p}”", pictures[f"argmax_step0_{k}"]) for k, p in enumerate(result.prompts)]),
            Section("Drift over the steps", "The full per-step series are in swap_analysis.json.",
                    [("latent drift per step", pictures["drift"])]),
        ]
        summary = {k: v for k, v in numbers.items() if k not in ("drift_vanilla", "drift_controlled")}
        (tmp / "index.html").write_text(page("prompt2prompt: swap analysis", sections, summary))
        files["html"] = "index.html"
    return {k: Path(out) / v for k, v in files.items()}
