"""When does a word swap lose the layout? Prompt switching on the shapes model (the seed notes' analysis, tested).

    python benchmarks/layout.py [--pairs 50] [--switch 2 5 10 25] [--json layout.json]

The seed notes argue that the early denoising steps fix the global structure, so a swapped word that changes what the
first steps attend to moves the whole image. Here, for each edit pair of `benchmarks/edits.py` (same pairs, same
seeds), one batch from one initial noise:
- the source caption, and the edited caption from the first step (the vanilla swap);
- the source caption for the first k steps, then the edited caption (no attention control): if the layout is decided
  early, the unchanged object's mask is kept once k covers those steps;
- the source caption from another seed: the IoU two unrelated layouts have by chance.
Keep IoU is the unchanged object's colour region against the source image's, as in `benchmarks/edits.py`; it is
reported for shape swaps and colour swaps apart.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm import tqdm

from prompt2prompt.generation import GenerationOptions, initial_latent
from prompt2prompt.loading import load_pipeline
from prompt2prompt.measure import sample_pairs, score_edit


def run_pair(pipe, pair, gen: GenerationOptions, switches: list[int]) -> dict[str, float]:
    """Keep IoU of each variant of one pair: 'vanilla', 'switch@k' for each k, and 'other seed'."""
    # rows: source, edited from step 0, then one row per switch step, then the source from another seed
    prompts = [pair.source, pair.target] + [pair.source] * len(switches) + [pair.source]
    noise = initial_latent(pipe, gen)
    other = initial_latent(pipe, replace(gen, seed=gen.seed + 1_000_000))
    latents = torch.cat([noise.expand(len(prompts) - 1, -1, -1, -1), other]).to(pipe.unet.device, pipe.unet.dtype)
    target_row = 1

    def switch(pipe_, step, timestep, kwargs):
        embeds = kwargs["prompt_embeds"]  # (2 * rows, tokens, width): [unconditional rows, conditional rows]
        rows = embeds.shape[0] // 2
        changed = embeds.clone()
        for j, k in enumerate(switches):
            if step + 1 == k:  # the next step is the k-th: the edited caption from there on
                changed[rows + 2 + j] = embeds[rows + target_row]
        return {"prompt_embeds": changed}

    images = pipe(prompt=prompts, num_inference_steps=gen.steps, guidance_scale=gen.guidance, latents=latents,
                  output_type="pil", callback_on_step_end=switch,
                  callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    source = images[0]
    result = {"vanilla": score_edit(pair, source, images[1]).keep_iou}
    for j, k in enumerate(switches):
        result[f"switch@{k}"] = score_edit(pair, source, images[2 + j]).keep_iou
    result["other seed"] = score_edit(pair, source, images[-1]).keep_iou
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="bundled name or pipeline folder (default: shapes)")
    parser.add_argument("--pairs", type=int, default=50, help="edit pairs (default: 50, the pairs of edits.py)")
    parser.add_argument("--switch", type=int, nargs="+", default=[2, 5, 10, 25],
                        help="steps run with the source caption before switching (default: 2 5 10 25)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs (default: 0)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    if any(not 0 < k < args.steps for k in args.switch):
        parser.error(f"--switch steps must lie between 1 and {args.steps - 1}, got {args.switch}")
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    gen = GenerationOptions(steps=args.steps, guidance=args.guidance)
    pairs = sample_pairs(args.pairs, args.seed)
    start = time.perf_counter()
    rows = []
    for pair in tqdm(pairs, desc="pairs"):
        rows.append({"pair": asdict(pair), "keep_iou": run_pair(pipe, pair, replace(gen, seed=pair.seed),
                                                                   args.switch)})
    variants = list(rows[0]["keep_iou"])
    summary = {}
    print(f"\n{len(pairs)} pairs, {args.steps} steps, guidance {args.guidance}, model {args.model} "
          f"({time.perf_counter() - start:.0f} s). Keep IoU of the unchanged object, source vs variant:")
    print(f"{'variant':<14}" + "".join(f"{k:>14}" for k in ("all", "shape swaps", "colour swaps")))
    for v in variants:
        cells = {}
        for kind in ("all", "shape", "colour"):
            values = [r["keep_iou"][v] for r in rows if kind == "all" or r["pair"]["kind"] == kind]
            values = [x for x in values if not np.isnan(x)]
            cells[kind] = {"mean": float(np.mean(values)) if values else float("nan"), "counted": len(values)}
        summary[v] = cells
        print(f"{v:<14}" + "".join(f"{cells[k]['mean']:>14.3f}" for k in ("all", "shape", "colour")))
    counts = {k: sum(r["pair"]["kind"] == k for r in rows) for k in ("shape", "colour")}
    print(f"({counts['shape']} shape swaps, {counts['colour']} colour swaps; 'switch@k': the source caption for the "
          f"first k of {args.steps} steps, then the edited one)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "summary": summary, "pairs": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
