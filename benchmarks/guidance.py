"""Where do extra objects come from? The evaluator's object count under classifier-free guidance schedules.

    python benchmarks/guidance.py [--model shapes] [--count 100] [--below 800 600 400] [--json guidance.json]

The evaluator's captions and initial latents (`prompt2prompt.shapes.evaluate`, seed 1234), generated with a constant
guidance scale (1, 3, and the evaluator's 7.5), and with 7.5 only at timesteps at or below a level (no guidance
above it: the "guidance interval" of Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample
and Distribution Quality in Diffusion Models"). Prints per schedule: exact count (all, one- and two-object captions),
one-object captions drawn with no object, two-object captions with more or fewer than two objects, colour and shape
accuracy. If guidance at the noisiest steps is what adds objects, skipping it there brings the count up while colour
stays; if the model cannot count, no schedule helps.
"""

from __future__ import annotations

import argparse
import json

from prompt2prompt.attention import AttentionController
from prompt2prompt.generation import GenerationOptions
from prompt2prompt.loading import load_pipeline
from prompt2prompt.shapes.evaluate import evaluate

OFF = 1 + 1e-6  # keeps the pipeline's unconditional rows (it drops them at a scale <= 1) but guides by 1e-6


class GuidanceBelow(AttentionController):
    """Guidance `scale` at timesteps <= `below`, none above. Sets the pipeline's scale for the first step when the loop
    starts (its timesteps are set by then) and for each next step from the step's callback (diffusers' pipelines read
    it every step); the pipeline must start with a scale above 1, so that it keeps its unconditional rows."""

    def __init__(self, pipe, scale: float, below: float):
        self.pipe, self.scale, self.below = pipe, scale, below

    def wants(self, site) -> bool:
        return False

    def _set(self, index: int) -> None:
        timesteps = self.pipe.scheduler.timesteps
        if index < len(timesteps):
            self.pipe._guidance_scale = self.scale if float(timesteps[index]) <= self.below else OFF

    def begin(self, run) -> None:
        self._set(0)

    def step_end(self, step, timestep, latents):
        self._set(step + 1)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="bundled name or pipeline folder (default: shapes)")
    parser.add_argument("--count", type=int, default=100, help="captions per schedule (default: 100)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 7.5],
                        help="constant guidance scales (default: 1 3 7.5)")
    parser.add_argument("--below", type=float, nargs="+", default=[800, 600, 400],
                        help="timesteps at or below which 7.5 applies, none above (default: 800 600 400)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    schedules = [(f"{w:g} throughout", w, None) for w in args.scales]
    schedules += [(f"7.5 at t <= {b:g}, none above", 7.5, b) for b in args.below]
    print(f"{'guidance':<30}{'exact':>7}{'one':>7}{'two':>7}{'1: none':>8}{'2: more':>8}{'2: fewer':>9}"
          f"{'colour':>8}{'shape':>7}")
    for name, scale, below in schedules:
        controller = None if below is None else GuidanceBelow(pipe, scale, below)
        options = GenerationOptions(steps=args.steps, guidance=scale)
        result = evaluate(pipe, args.count, options=options, progress=False, controller=controller)
        one = [r["objects"] for r in result.per_caption if r["named"] == 1]
        two = [r["objects"] for r in result.per_caption if r["named"] == 2]
        row = {"schedule": name, "scale": scale, "below": below, "exact_count": result.exact_count,
               "exact_count_one": result.exact_count_one, "exact_count_two": result.exact_count_two,
               "one_empty": sum(n == 0 for n in one) / len(one), "two_more": sum(n > 2 for n in two) / len(two),
               "two_fewer": sum(n < 2 for n in two) / len(two), "colour_accuracy": result.colour_accuracy,
               "shape_accuracy": result.shape_accuracy}
        rows.append(row)
        print(f"{name:<30}" + "".join(f"{row[k]:>{w}.3f}" for k, w in (
            ("exact_count", 7), ("exact_count_one", 7), ("exact_count_two", 7), ("one_empty", 8), ("two_more", 8),
            ("two_fewer", 9), ("colour_accuracy", 8), ("shape_accuracy", 7))), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "count": args.count, "steps": args.steps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
