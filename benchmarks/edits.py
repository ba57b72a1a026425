"""Do the edits do what they claim? Seeded word-swap pairs on the bundled shapes model, measured against truth.

    python benchmarks/edits.py [--model shapes|shapes-flow] [--pairs 50] [--refine-pairs 50] [--sweep-pairs 20]
                               [--steps 50] [--joint renormalize|raw] [--self-max-side N] [--json edits.json]

For each pair (a two-object caption, one object's shape or colour swapped), the same seed three ways: vanilla (no
control), Prompt-to-Prompt replace, replace with local blend. Prints, per variant: the unchanged object's mask IoU
between source and edit (layout kept), the share of edits whose object shows the target word, and PSNR / mean absolute
difference outside the edited object. Then refine pairs measured the same way (one object's colour named in the
edited prompt only: "a red circle and a square" -> "a red circle and a blue square"; vanilla, refine, refine with
local blend), and the sweep of the cross-attention replacement fraction from 0 to 1.
"""

from __future__ import annotations

import argparse
import json
import time

from prompt2prompt.edits import JOINT, EditOptions
from prompt2prompt.generation import GenerationOptions
from prompt2prompt.loading import load_pipeline
from prompt2prompt.measure import run_pairs, sample_pairs, sample_refine_pairs, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="bundled name or pipeline folder (default: shapes)")
    parser.add_argument("--pairs", type=int, default=50, help="edit pairs (default: 50)")
    parser.add_argument("--refine-pairs", type=int, default=50, help="refine pairs (default: 50; 0: none)")
    parser.add_argument("--sweep-pairs", type=int, default=20, help="pairs in the fraction sweep (default: 20)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs (default: 0)")
    parser.add_argument("--joint", choices=JOINT, default=EditOptions.joint,
                        help=f"MM-DiT: how a replaced image-to-text block enters the joint softmax "
                             f"(default: {EditOptions.joint})")
    parser.add_argument("--self-max-side", type=int, default=None,
                        help="replace self-attention at maps this small or smaller (default: the library's, latent "
                             "side / 4, which is none on an MM-DiT)")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="MM-DiT: T5 tokens of the caption (default: the pipeline's)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    gen = GenerationOptions(steps=args.steps, guidance=args.guidance, max_sequence_length=args.max_sequence_length)
    options = EditOptions(joint=args.joint, self_max_side=args.self_max_side)
    pairs = sample_pairs(args.pairs, args.seed)
    start = time.perf_counter()
    result = run_pairs(pipe, pairs, gen, options)
    refine = run_pairs(pipe, sample_refine_pairs(args.refine_pairs, args.seed), gen, options) \
        if args.refine_pairs else None
    curve = sweep(pipe, pairs[: args.sweep_pairs], gen, options=options) if args.sweep_pairs else {"curve": {}}
    print(f"\n{args.pairs} pairs, {args.steps} steps, guidance {args.guidance}, model {args.model}, "
          f"joint {args.joint}, self-attention max side {args.self_max_side or 'default'} "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"{'variant':<15}{'keep IoU':>10}{'edit ok':>10}{'PSNR out':>10}{'MAD out':>10}")
    for variant, s in [*result["summary"].items(), *(refine["summary"].items() if refine else ())]:
        if refine and variant == "vanilla" and s is refine["summary"]["vanilla"]:
            print(f"{args.refine_pairs} refine pairs (a colour named in the edited prompt only)")
        print(f"{variant:<15}{s['keep_iou']:>10.3f}{s['edit_ok']:>10.1%}{s['outside_psnr']:>10.2f}"
              f"{s['outside_mad']:>10.4f}")
    print(f"\n{'keep IoU by kind':<17}" + "".join(f"{v:>15}" for v in result["summary"]))
    for kind, per in result["by_kind"].items():
        print(f"{kind + ' swaps':<13}({per['vanilla']['pairs']:>2})" + "".join(
            f"{per[v]['keep_iou']:>15.3f}" for v in per))
    gain = result["summary"]["replace+blend"]["outside_psnr"] - result["summary"]["replace"]["outside_psnr"]
    print(f"local blend raises PSNR outside the edited object by {gain:.2f} dB")
    if curve["curve"]:
        print(f"\ncross-attention replacement sweep ({args.sweep_pairs} pairs; self-attention at its default)")
        print(f"{'fraction':>9}{'keep IoU':>10}{'edit ok':>10}{'PSNR out':>10}")
        for f, s in curve["curve"].items():
            print(f"{f:>9}{s['keep_iou']:>10.3f}{s['edit_ok']:>10.1%}{s['outside_psnr']:>10.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "summary": result["summary"], "by_kind": result["by_kind"],
                       "pairs": result["pairs"], "sweep": curve["curve"],
                       "refine": {"summary": refine["summary"], "pairs": refine["pairs"]} if refine else None},
                      fh, indent=2)


if __name__ == "__main__":
    main()
