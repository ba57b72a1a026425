"""`p2p demo`: what attention shows and what controlling it does, each as pictures and numbers, on the bundled model.

1. cross-attention maps of a two-object prompt, the most-attended token per pixel, self-attention components;
2. a word swap, vanilla versus controlled, same seed ("no local control for vanilla stable diffusion");
3. replace without and with local blend ("the other object also changes", and the fix);
4. the cross-attention replacement fraction swept from 0 to 1 ("from 0% to 100% of the steps");
5. refine (adding colour words) and re-weight (one word from -1 to 3);
6. the swap analysis: how many pixels change their most-attended word at the first step, and the latent drift;
7. the measurements over a few seeded pairs (the benchmark `benchmarks/edits.py` runs 50).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace

from . import plot
from .analysis import swap_analysis
from .attend import attend
from .display import edit_grid, swap_figures
from .edits import EditOptions, edit
from .families import family_of
from .figures import attention_figures
from .generation import GenerationOptions
from .measure import EditPair, run_pairs, sample_pairs, score_edit
from .outputs import staged
from .report import Section, page, write_json

SOURCE = "a red circle and a blue square"
SWAPPED = "a red circle and a blue triangle"
PLAIN = "a red circle and a square"  # refine: the square's colour named in SOURCE only


@dataclass(frozen=True)
class DemoOptions:
    steps: int = 50  # denoising steps
    guidance: float = 7.5
    seed: int = 2  # seed of the showcased prompts
    pairs: int = 6  # seeded edit pairs measured in the report
    fractions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # cross-attention replacement sweep
    weights: tuple[float, ...] = (-1.0, 0.0, 1.0, 2.0, 3.0)  # re-weight row
    reweight_word: str = "blue"


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _fmt(x: float, pct: bool = False) -> str:
    return f"{x:.1%}" if pct else f"{x:.3f}"


def _sweep_text(fractions, curve: dict) -> str:
    """What the sweep's pictures show, from their measurements (not a claim written in advance)."""
    drawn = [f for f in fractions if curve[str(f)]["edit_ok"]]
    keep = {f: curve[str(f)]["keep_iou"] for f in fractions}
    said = (f" Here the triangle is drawn at {', '.join(f'{f:.0%}' for f in drawn)} of the steps"
            if drawn else " Here no fraction drew the triangle")
    missed = [f for f in fractions if f not in drawn]
    if drawn and missed:
        said += f" and not at {', '.join(f'{f:.0%}' for f in missed)}"
    return (said + "; the red circle's mask IoU with the source goes " +
            ", ".join(f"{keep[f]:.2f}" for f in fractions) + " across the fractions.")


def _colour_area(image, colour: str) -> float:
    """Share of the image's pixels segmented as the colour (0 when it is not a colour of the shapes world)."""
    import numpy as np

    from .shapes.evaluate import segment

    region = segment(np.asarray(image, dtype=np.float32) / 255).get(colour)
    return float(region.mean()) if region is not None else 0.0


def _objects_iou(a, b) -> float:
    """IoU of the pixels of any object (every segmented colour) in two images: how much of the layout is kept."""
    import numpy as np

    from .metrics import iou
    from .shapes.evaluate import segment

    def objects(image):
        regions = segment(np.asarray(image, dtype=np.float32) / 255).values()
        return np.any(np.stack(list(regions)), axis=0) if regions else np.zeros(image.size[::-1], dtype=bool)

    return iou(objects(a), objects(b))


def _reweight_text(word: str, drawn: dict) -> str:
    shown = [w for w, area in drawn.items() if area > 0]
    gone = [w for w, area in drawn.items() if area == 0]
    text = f": {word} pixels cover " + ", ".join(f"{area:.1%} at x{w:g}" for w, area in drawn.items())
    if gone:
        text += f"; nothing {word} is drawn at x{', x'.join(f'{w:g}' for w in gone)}"
    if shown and min(shown) <= 0:
        text += f" (at x{min(shown):g} a {word} object remains: the factor scales one word's attention, the other " \
                "words and the self-attention still carry it)"
    return text + "."


def run_demo(pipe, out, options: DemoOptions = DemoOptions(), model: str = "shapes", quiet: bool = False) -> dict:
    """Run the tour and write index.html (pictures embedded), the PNGs and demo.json into out."""
    start = time.perf_counter()
    gen = GenerationOptions(steps=options.steps, guidance=options.guidance, seed=options.seed)
    numbers: dict = {"settings": {**asdict(options), "model": model}}
    sections, pictures = [], {}
    joint = family_of(pipe).joint  # MM-DiT: no self-attention is replaced by default (docs/how-it-works.md, joint.py)

    _say("[1/7] cross-attention maps", quiet)
    att = attend(pipe, SOURCE, gen, progress=False)
    maps = att.maps()
    figs = attention_figures(att, maps)
    pictures.update({f"attend_{k}": v for k, v in figs.items()})
    sections.append(Section(
        f"1. What each word attends to: “{SOURCE}”",
        "Cross-attention of each token, averaged over layers, heads and steps; the most-attended word per pixel; the "
        "principal components of the self-attention (they follow the objects).",
        [(k, v) for k, v in figs.items()]))

    _say("[2/7] word swap, vanilla versus controlled", quiet)
    swap = edit(pipe, SOURCE, SWAPPED, EditOptions(), gen, vanilla=True, progress=False)
    pair = EditPair(SOURCE, SWAPPED, 1, "shape", "square", "triangle", ("square", "triangle"), options.seed)
    src = swap.vanilla.images[0]
    s_van = score_edit(pair, src, swap.vanilla.images[1])
    s_rep = score_edit(pair, src, swap.controlled.images[1])
    pictures["swap"] = edit_grid(swap)
    numbers["swap"] = {"vanilla": s_van.to_dict(), "replace": s_rep.to_dict()}
    sections.append(Section(
        "2. One word changed, same seed",
        f"Vanilla: the same seed with 'square' swapped for 'triangle'; the red circle's mask overlaps its place in the "
        f"source by IoU {_fmt(s_van.keep_iou)}. Prompt-to-Prompt injects the source's cross-attention: IoU "
        f"{_fmt(s_rep.keep_iou)}, and the square {'became' if s_rep.edit_ok else 'did not become'} a triangle. "
        "BENCHMARKS.md has the numbers over 50 pairs, shape and colour swaps apart.",
        [("top: vanilla; bottom: attention-controlled", pictures["swap"])],
        [("red circle kept (mask IoU), vanilla", _fmt(s_van.keep_iou), "1 = the unchanged object did not move"),
         ("red circle kept (mask IoU), controlled", _fmt(s_rep.keep_iou), "the same with attention control"),
         ("triangle drawn, controlled", str(s_rep.edit_ok), "the edited object shows the new word")]))

    _say("[3/7] local blend", quiet)
    blended = edit(pipe, SOURCE, SWAPPED, EditOptions(blend=("square", "triangle")), gen, vanilla=False,
                   progress=False)
    s_blend = score_edit(pair, src, blended.controlled.images[1])
    mask_img = plot.mask_overlay(blended.controlled.images[1], blended.mask[1, 0].float().numpy() > 0.5)
    pictures["blend"] = plot.grid([src, swap.controlled.images[1], blended.controlled.images[1], mask_img],
                                  ["source", "replace", "replace + local blend", "blend mask (greyed: kept)"],
                                  cell=160)
    numbers["blend"] = {"replace": s_rep.to_dict(), "replace+blend": s_blend.to_dict()}
    sections.append(Section(
        "3. Keeping the rest exactly: local blend",
        "Replace alone still changes pixels away from the edit (" + (
            "the image tokens' attention to each other spreads it" if joint else
            "convolutions and self-attention spread it") + "). Local blend takes the words' attention as a mask "
        "and resets the latents outside it to the source's after each step (p2p paper, Algorithm 1, lines 11-14).",
        [("source, replace, replace + blend, mask", pictures["blend"])],
        [("PSNR outside the edited object, replace", f"{s_rep.outside_psnr:.2f} dB", "higher = less collateral change"),
         ("PSNR outside the edited object, + blend", f"{s_blend.outside_psnr:.2f} dB", "the same with local blend")]))

    _say("[4/7] replacement fraction sweep", quiet)
    row, table, curve = [], [], {}
    for f in options.fractions:
        r = edit(pipe, SOURCE, SWAPPED, EditOptions(cross_steps=f), gen, vanilla=False, progress=False)
        s = score_edit(pair, src, r.controlled.images[1])
        row.append(r.controlled.images[1])
        curve[str(f)] = s.to_dict()
        table.append((f"fraction {f:.1f}: kept IoU / triangle", f"{s.keep_iou:.3f} / {s.edit_ok}", ""))
    pictures["sweep"] = plot.grid([src, *row], ["source", *[f"{f:.0%} of steps" for f in options.fractions]],
                                  cell=128)
    numbers["sweep"] = curve
    table[0] = (table[0][0], table[0][1], "0: no cross-attention injected" + (
        "" if joint else f" (self-attention still for {EditOptions().self_steps:.0%})"))
    sections.append(Section(
        "4. How long to inject: 0% to 100% of the steps",
        "The source's cross-attention (" + ("the image-to-text block of the joint attention" if joint else
                                           "image-to-text") + ") is injected for the first fraction of the steps. "
        + _sweep_text(options.fractions, curve),
        [("replacement fraction sweep", pictures["sweep"])], table))

    _say("[5/7] refine and re-weight", quiet)
    refine = edit(pipe, PLAIN, SOURCE, EditOptions(), gen, vanilla=True, progress=False)
    pictures["refine"] = edit_grid(refine)
    refine_keep = {"vanilla": _objects_iou(refine.vanilla.images[0], refine.vanilla.images[1]),
                   "refine": _objects_iou(refine.controlled.images[0], refine.controlled.images[1])}
    numbers["refine"] = {"objects_iou": refine_keep}
    weights, drawn = [], {}
    for w in options.weights:
        r = edit(pipe, SOURCE, SOURCE, EditOptions(mode="reweight", reweight=((options.reweight_word, w),)), gen,
                 vanilla=False, progress=False)
        weights.append(r.controlled.images[1])
        drawn[w] = _colour_area(r.controlled.images[1], options.reweight_word)
    numbers["reweight"] = {f"{w:g}": area for w, area in drawn.items()}
    pictures["reweight"] = plot.grid([src, *weights], ["source", *[f"{options.reweight_word} x {w:g}"
                                                                   for w in options.weights]], cell=128)
    sections.append(Section(
        "5. Refine and re-weight",
        f"Refine: “{PLAIN}” to “{SOURCE}”, a colour word added; aligned tokens keep the source's attention, the "
        "new one its own. "
        f"The objects' pixels overlap the source's by IoU {refine_keep['refine']:.2f} (vanilla, the same seed "
        f"without control: {refine_keep['vanilla']:.2f}); BENCHMARKS.md measures refine over 20 pairs beside replace. "
        f"Re-weight: the attention to '{options.reweight_word}' "
        f"scaled from {options.weights[0]:g} to {options.weights[-1]:g}" + _reweight_text(options.reweight_word, drawn),
        [("refine: vanilla and controlled", pictures["refine"]), ("re-weight", pictures["reweight"])]))

    _say("[6/7] swap analysis", quiet)
    analysis = swap_analysis(pipe, SOURCE, SWAPPED, gen, progress=False)
    sw = swap_figures(analysis)
    pictures.update({f"swap_analysis_{k}": v for k, v in sw.items()})
    numbers["swap_analysis"] = analysis.to_dict()
    sections.append(Section(
        "6. Why one word moves everything",
        "Swapping one word replaces one column of each pixel's attention over the tokens, yet many pixels change "
        "which word they attend to most at the very first step; the difference then grows over the steps unless "
        "attention is controlled.",
        [("most-attended word at step 0, source", sw["argmax_step0_0"]),
         ("most-attended word at step 0, swapped", sw["argmax_step0_1"]), ("latent drift", sw["drift"])],
        [("pixels whose most-attended word changes at step 0", _fmt(analysis.argmax_changed, True),
          "one swapped token column changes many pixels' ranking of the words"),
         ("final latent drift, vanilla / controlled",
          f"{analysis.drift_vanilla[-1]:.3f} / {analysis.drift_controlled[-1]:.3f}", "relative L2 to the source")]))

    _say(f"[7/7] measurements over {options.pairs} seeded pairs", quiet)
    measured = run_pairs(pipe, sample_pairs(options.pairs, seed=1), gen, progress=not quiet) if options.pairs else None
    if measured:
        numbers["pairs"] = measured["summary"]
        table = []
        for variant, s in measured["summary"].items():
            table.append((f"{variant}: unchanged object kept (IoU)", _fmt(s["keep_iou"]), "1 = same mask as source"))
            table.append((f"{variant}: edit shows the target word", _fmt(s["edit_ok"], True), "shape or colour"))
            table.append((f"{variant}: PSNR outside the edit", f"{s['outside_psnr']:.2f} dB", "higher = less change"))
        sections.append(Section(f"7. Measured over {options.pairs} seeded edit pairs",
                                "Each pair: a two-object caption with one object's shape or colour swapped, the same "
                                "seed three ways. `python benchmarks/edits.py` runs 50.", [], table))
    numbers["seconds"] = time.perf_counter() - start
    with staged(out) as tmp:
        for name, pic in pictures.items():
            pic.save(tmp / f"{name}.png")
        write_json(tmp / "demo.json", numbers)
        (tmp / "index.html").write_text(page(f"prompt2prompt: a tour on the {model} model", sections,
                                             numbers["settings"]))
    _say(f"done in {numbers['seconds']:.0f} s", quiet)
    return numbers


def quick_options() -> DemoOptions:
    """A reduced tour for tests: few steps, two sweep points, two weights, one pair."""
    return replace(DemoOptions(), steps=8, pairs=1, fractions=(0.0, 1.0), weights=(0.0, 2.0))

