"""Real images: how well each inversion method reconstructs, what it costs, and how much an edit from it keeps.

    python benchmarks/inversion.py [--images 20] [--steps 50] [--json inversion.json]

The images are drawn by the shapes world's renderer (pictures the model never produced, with true masks). Per method
(ddim, negative-prompt, null-text): reconstruction PSNR against the input and against the autoencoder's own
reconstruction (the ceiling of any inversion), and seconds per image. Then, from each null-text inversion, a replace
edit (one object's shape swapped) with local blend: PSNR against the input over the unedited object and the
background, i.e. outside both the edited object's true mask and its new shape's region in the edit (colour
segmentation), grown by 2 pixels.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
from PIL import Image

from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.generation import GenerationOptions, generate, native_size
from prompt2prompt.inversion import (
    METHODS,
    InversionOptions,
    autoencoder_reconstruction,
    invert,
    prepare_image,
    psnr,
)
from prompt2prompt.loading import load_pipeline
from prompt2prompt.measure import grow
from prompt2prompt.shapes import world
from prompt2prompt.shapes.evaluate import segment


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="bundled name or pipeline folder (default: shapes)")
    parser.add_argument("--images", type=int, default=20, help="rendered images (default: 20)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the scenes (default: 7)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    gen = GenerationOptions(steps=args.steps, guidance=args.guidance)
    rows = {m: {"psnr_input": [], "psnr_ae": [], "seconds": []} for m in METHODS}
    ae_psnr = []  # the autoencoder's own reconstruction against the input: the ceiling of any inversion
    edits = []
    items = scenes(args.images, args.seed)
    for n, scene in enumerate(items):
        # the input as the model sees it (the world draws 64x64; another model may want another size)
        image = prepare_image(scene.image(), native_size(pipe))
        ae = autoencoder_reconstruction(pipe, image)
        ae_psnr.append(psnr(ae, image))
        for method in METHODS:
            start = time.perf_counter()
            inv = invert(pipe, image, scene.caption, InversionOptions(method=method, steps=args.steps,
                                                                      guidance=args.guidance), progress=False)
            seconds = time.perf_counter() - start
            rec = generate(pipe, scene.caption, None, gen, latent=inv.latent, uncond=inv.uncond,
                           progress=False).images[0]
            rows[method]["psnr_input"].append(psnr(rec, image))
            rows[method]["psnr_ae"].append(psnr(rec, ae))
            rows[method]["seconds"].append(seconds)
            if method == "null-text":
                target, new = swapped(scene)
                r = edit(pipe, scene.caption, target, EditOptions(blend=(scene.objects[1].shape, new)), gen,
                         vanilla=False, progress=False, inversion=inv)
                edited = r.controlled.images[1]
                old = np.asarray(Image.fromarray(scene.masks()[1]).resize(image.size, Image.NEAREST))
                new = segment(np.asarray(edited, dtype=np.float32) / 255).get(scene.objects[1].colour)
                outside = ~grow(old | new) if new is not None else ~grow(old)
                edits.append({"caption": scene.caption, "target": target,
                              "psnr_outside": psnr(edited, image, outside),
                              "psnr_source_vs_input": psnr(r.controlled.images[0], image)})
        print(f"[{n + 1}/{len(items)}] " + "  ".join(
            f"{m}: {rows[m]['psnr_input'][-1]:.1f} dB" for m in METHODS) +
            f"  edit outside: {edits[-1]['psnr_outside']:.1f} dB", flush=True)
    print(f"\n{len(items)} rendered images, {args.steps} DDIM steps, guidance {args.guidance}, model {args.model}")
    print(f"{'method':<17}{'PSNR vs input':>15}{'PSNR vs AE':>12}{'s/image':>10}")
    summary = {}
    for m in METHODS:
        s = {k: float(np.mean(v)) for k, v in rows[m].items()}
        summary[m] = s
        print(f"{m:<17}{s['psnr_input']:>15.2f}{s['psnr_ae']:>12.2f}{s['seconds']:>10.2f}")
    ae_ceiling = float(np.mean(ae_psnr))
    outside = float(np.mean([e["psnr_outside"] for e in edits]))
    print(f"autoencoder reconstruction vs input (the ceiling): {ae_ceiling:.2f} dB")
    print(f"replace + local blend from null-text inversion: PSNR outside the edited object vs input {outside:.2f} dB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "summary": summary, "autoencoder_psnr": ae_ceiling,
                       "edit_outside_psnr": outside, "edits": edits, "per_image": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
