"""Real images: how well each inversion method reconstructs, what it costs, and how much an edit from it keeps.

    python benchmarks/inversion.py [--model shapes|shapes-flow] [--images 20] [--steps 50] [--json inversion.json]

The images are drawn by the shapes world's renderer (pictures the model never produced, with true masks). Per method
of the model's family (UNet: ddim, negative-prompt, null-text; flow matching: euler, fireflow, euler with one step
more, i.e. as many model calls as fireflow, and rf-solver with half the steps, two calls each): reconstruction PSNR
against the input and against the autoencoder's own reconstruction (the ceiling of any inversion), model calls and
seconds per image. Then, from each method's inversion, a replace edit (one object's shape swapped) with local blend:
PSNR against the input over the unedited object and the background, i.e. outside both the edited object's true mask
and its new shape's region in the edit (colour segmentation), grown by 2 pixels, and whether the edited object shows
the new shape; both as decoded and with the input's background kept outside the blend mask (`p2p edit --from` does
that by default; background.py). On a flow model the same edit is also made by FlowEdit (no inversion; the family's
FlowEdit defaults), without and with the local blend, measured the same way.

    python benchmarks/inversion.py --cost sd15 [--cost-size 32] [--steps 5]   # or --cost sdxl

What each method costs on a real architecture (SD 1.5's or SDXL base's, random weights, as benchmarks/speed.py builds
them): seconds and peak memory per image, each as a ratio to one plain generation of the same pipeline at the same
steps and size. Every measurement runs in a fresh process of its own (peak RSS on the CPU includes the weights; on a
GPU, torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from prompt2prompt.background import keep_background
from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.flow import is_flow
from prompt2prompt.flowedit import FlowEditOptions, flowedit
from prompt2prompt.generation import GenerationOptions, generate, native_size
from prompt2prompt.inversion import (
    InversionOptions,
    autoencoder_reconstruction,
    invert,
    prepare_image,
    psnr,
    sample_back,
)
from prompt2prompt.loading import load_pipeline
from prompt2prompt.measure import grow
from prompt2prompt.metrics import iou
from prompt2prompt.shapes import world
from prompt2prompt.shapes.evaluate import classify_shape, segment


def scenes(count: int, seed: int):
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        scene = world.sample_scene(rng)
        if len(scene.objects) == 2:
            out.append(scene)
    return out


def swapped(scene) -> tuple[str, str]:
    """The caption with the second object's shape swapped, and the new shape."""
    shapes = [o.shape for o in scene.objects]
    new = next(s for s in world.SHAPES if s not in shapes)
    words = scene.caption.split()
    last = len(words) - 1 - words[::-1].index(shapes[1])
    words[last] = new
    return " ".join(words), new


def methods(pipe, steps: int, guidance: float, max_sequence_length: int | None):
    """(label, options, model calls per inversion) of each method compared."""
    def opts(method, n):
        return InversionOptions(method=method, steps=n, guidance=guidance, max_sequence_length=max_sequence_length)

    if is_flow(pipe):  # FireFlow: one call per step plus one; Euler: one per step; RF-Solver: two per step
        half = max(1, steps // 2)
        return [("fireflow", opts("fireflow", steps), steps + 1), ("euler", opts("euler", steps), steps),
                (f"euler {steps + 1} steps", opts("euler", steps + 1), steps + 1),
                (f"rf-solver {half} steps", opts("rf-solver", half), 2 * half)]
    return [(m, opts(m, steps), None) for m in ("null-text", "ddim", "negative-prompt", "direct")]


FLOWEDITS = ("flowedit", "flowedit + blend")  # FlowEdit rows of a flow model: without and with the local blend


COST_METHODS = ("plain", "ddim", "negative-prompt", "direct", "null-text")


def measure_edit(row: dict, scene, image, shape: str, pictures: dict) -> None:
    """Adds to `row`, for each picture ("edit": as decoded, "kept": with the input's background kept), the PSNR against
    the input outside the edited object's old and new regions (grown by 2 pixels), whether it shows the new shape, and
    the unchanged object's IoU (its colour's region in the picture against its true mask)."""
    masks = [np.asarray(Image.fromarray(m).resize(image.size, Image.NEAREST)) for m in scene.masks()[:2]]
    kept_mask, old = masks
    for key, edited in pictures.items():
        regions = segment(np.asarray(edited, dtype=np.float32) / 255)
        new = regions.get(scene.objects[1].colour)
        outside = ~grow(old | new) if new is not None else ~grow(old)
        row[f"{key}_outside"].append(psnr(edited, image, outside))
        row[f"{key}_ok"].append(float(new is not None and classify_shape(new)[0] == shape))
        row[f"{key}_keep"].append(iou(kept_mask, regions.get(scene.objects[0].colour, np.zeros_like(kept_mask))))


def _last(values: list) -> str:
    return f"{values[-1]:.1f}" if values else "-"


def cost_worker(args) -> None:
    """In a fresh process: one method's inversion (or, for "plain", one generation) on a random-weight architecture;
    prints {"seconds", "peak_bytes"}."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from speed import build, peak_memory

    dtype = torch.float16 if args.fp16 else torch.float32
    pipe = build(args.cost, args.cost_size, dtype, args.device)
    pipe.set_progress_bar_config(disable=True)
    side = args.cost_size * pipe.vae_scale_factor
    scene = scenes(1, args.seed)[0]
    image = scene.image().resize((side, side), Image.LANCZOS)
    start = time.perf_counter()
    if args.cost_method == "plain":
        generate(pipe, scene.caption, None, GenerationOptions(steps=args.steps, guidance=args.guidance or 7.5,
                                                              height=side, width=side), progress=False)
    else:
        invert(pipe, image, scene.caption, InversionOptions(method=args.cost_method, steps=args.steps,
                                                            guidance=args.guidance, height=side, width=side),
               progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_bytes": peak_memory(args.device)}))


def cost(args) -> None:
    print(f"\n{args.cost} architecture (random weights), latent {args.cost_size}x{args.cost_size}, {args.steps} steps, "
          f"{args.device}{' fp16' if args.fp16 else ''}; each row a fresh process", flush=True)
    print(f"{'method':<17}{'seconds':>9}{'time/plain':>12}{'peak GiB':>10}{'mem/plain':>11}", flush=True)
    rows = {}
    for method in COST_METHODS:
        cmd = [sys.executable, __file__, "--cost", args.cost, "--cost-size", str(args.cost_size), "--cost-method",
               method, "--steps", str(args.steps), *(["--guidance", str(args.guidance)] if args.guidance else []),
               "--device", args.device,
               "--seed", str(args.seed), *(["--fp16"] if args.fp16 else [])]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            sys.exit(f"{method} on {args.cost} failed")
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        r, base = rows[method], rows["plain"]
        r.update(time_ratio=r["seconds"] / base["seconds"], memory_ratio=r["peak_bytes"] / base["peak_bytes"])
        print(f"{method:<17}{r['seconds']:>9.1f}{r['time_ratio']:>12.2f}{r['peak_bytes'] / 2**30:>10.2f}"
              f"{r['memory_ratio']:>11.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "rows": rows}, fh, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="bundled name or pipeline folder (default: shapes)")
    parser.add_argument("--images", type=int, default=20, help="rendered images (default: 20)")
    parser.add_argument("--steps", type=int, default=50, help="inversion and sampling steps (default: 50)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default: the method's: 7.5 for DDIM methods, 2 for flow methods)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the scenes (default: 7)")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="MM-DiT: T5 tokens of the caption (default: the pipeline's)")
    parser.add_argument("--cost", choices=["sd15", "sdxl", "tiny"], default=None,
                        help="measure seconds and peak memory per method on this architecture instead (random weights)")
    parser.add_argument("--cost-size", type=int, default=32, help="--cost: latent side (default: 32)")
    parser.add_argument("--device", default="cpu", help="--cost: cpu or cuda (default: cpu)")
    parser.add_argument("--fp16", action="store_true", help="--cost: half precision (GPU)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--cost-method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cost:
        cost_worker(args) if args.cost_method else cost(args)
        return
    pipe = load_pipeline(args.model)
    compared = methods(pipe, args.steps, args.guidance, args.max_sequence_length)
    calls = {label: n for label, _, n in compared}
    labels = [label for label, _, _ in compared] + list(FLOWEDITS if is_flow(pipe) else ())
    rows = {m: {"psnr_input": [], "psnr_ae": [], "seconds": [], "edit_keep": [], "edit_outside": [], "edit_ok": [],
                "kept_keep": [], "kept_outside": [], "kept_ok": []} for m in labels}
    ae_psnr = []  # the autoencoder's own reconstruction against the input: the ceiling of any inversion
    edits = {m: [] for m in labels}
    items = scenes(args.images, args.seed)
    for n, scene in enumerate(items):
        # the input as the model sees it (the world draws 64x64; another model may want another size)
        image = prepare_image(scene.image(), native_size(pipe))
        ae = autoencoder_reconstruction(pipe, image)
        ae_psnr.append(psnr(ae, image))
        for method, options, _ in compared:
            start = time.perf_counter()
            inv = invert(pipe, image, scene.caption, options, progress=False)
            seconds = time.perf_counter() - start
            rec = sample_back(pipe, inv, progress=False).images[0]
            rows[method]["psnr_input"].append(psnr(rec, image))
            rows[method]["psnr_ae"].append(psnr(rec, ae))
            rows[method]["seconds"].append(seconds)
            target, shape = swapped(scene)
            r = edit(pipe, scene.caption, target, EditOptions(blend=(scene.objects[1].shape, shape),
                                                              keep_background=False), GenerationOptions(),
                     vanilla=False, progress=False, inversion=inv)
            decoded = r.controlled.images[1]
            (kept,), _ = keep_background([decoded], inv.image, r.mask[1:], int(pipe.vae_scale_factor))
            measure_edit(rows[method], scene, image, shape, {"edit": decoded, "kept": kept})
            edits[method].append({"caption": scene.caption, "target": target, "edit_ok": rows[method]["edit_ok"][-1],
                                  "psnr_outside": rows[method]["edit_outside"][-1],
                                  "psnr_outside_kept": rows[method]["kept_outside"][-1],
                                  "kept_ok": rows[method]["kept_ok"][-1],
                                  "psnr_source_vs_input": psnr(r.controlled.images[0], image)})
        for method in FLOWEDITS if is_flow(pipe) else ():
            target, shape = swapped(scene)
            words = (scene.objects[1].shape, shape) if method.endswith("blend") else ()
            start = time.perf_counter()
            options = FlowEditOptions(blend=words, max_sequence_length=args.max_sequence_length)
            fe = flowedit(pipe, image, scene.caption, target, options, progress=False)
            rows[method]["seconds"].append(time.perf_counter() - start)
            calls[method] = fe.settings["model_calls"]
            pictures = {"edit": fe.image}
            if fe.mask is not None:
                (pictures["kept"],), _ = keep_background([fe.image], fe.source, fe.mask, int(pipe.vae_scale_factor))
            measure_edit(rows[method], scene, image, shape, pictures)
            edits[method].append({"caption": scene.caption, "target": target, "edit_ok": rows[method]["edit_ok"][-1],
                                  "psnr_outside": rows[method]["edit_outside"][-1],
                                  "keep_iou": rows[method]["edit_keep"][-1]})
        print(f"[{n + 1}/{len(items)}] " + "  ".join(
            f"{m}: {_last(rows[m]['psnr_input'])} dB, edit outside {_last(rows[m]['edit_outside'])} dB "
            f"(kept {_last(rows[m]['kept_outside'])})"
            for m in labels), flush=True)
    guidance = args.guidance or "the method's"
    print(f"\n{len(items)} rendered images, {args.steps} steps, guidance {guidance}, model {args.model}")
    print(f"{'method':<20}{'PSNR vs input':>15}{'PSNR vs AE':>12}{'calls':>7}{'s/image':>10}{'edit: keep IoU':>16}"
          f"{'PSNR out':>10}{'edit ok':>9}{'kept: keep IoU':>16}{'PSNR out':>10}{'kept ok':>9}")
    summary = {}
    for m in labels:
        s = {k: float(np.mean(v)) if v else None for k, v in rows[m].items()}
        summary[m] = {**s, "model_calls": calls.get(m)}

        def cell(key, width, form=".2f", s=s):
            return f"{'-' if s[key] is None else format(s[key], form):>{width}}"

        print(f"{m:<20}{cell('psnr_input', 15)}{cell('psnr_ae', 12)}{calls.get(m) or '':>7}{cell('seconds', 10)}"
              f"{cell('edit_keep', 16, '.3f')}{cell('edit_outside', 10)}{cell('edit_ok', 9, '.0%')}"
              f"{cell('kept_keep', 16, '.3f')}{cell('kept_outside', 10)}{cell('kept_ok', 9, '.0%')}")
    ae_ceiling = float(np.mean(ae_psnr))
    print(f"autoencoder reconstruction vs input (the ceiling): {ae_ceiling:.2f} dB")
    print("edit: replace + local blend from each inversion; keep IoU: the unchanged object's region against its true "
          "mask; PSNR outside the edited object against the input; edit ok: the share of edits that show the new "
          "shape; kept: the same edit with the input's background kept outside the blend mask (the default of "
          "`p2p edit --from`); flowedit: FlowEdit from the image itself (no inversion), without and with the local "
          "blend")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "summary": summary, "autoencoder_psnr": ae_ceiling, "edits": edits,
                       "per_image": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
