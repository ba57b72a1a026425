"""The rectified-flow solvers at equal model calls: Euler, FireFlow, RF-Solver.

    python benchmarks/flow_solvers.py [--json flow_solvers.json] [--kinds sd3 flux ...]

1. Sampling an ODE with a known solution (dx/ds = cos(3 s) x + s from s = 1 to 0; the reference is RK4 on 4000
   steps), through each solver's diffusers scheduler as a pipeline loop runs it: the largest error at 10, 20, 40 and 80
   model calls, and the observed order between 40 and 80 calls.
2. Inversion then sampling back through real pipeline loops (the tiny random pipeline of every flow family, as the
   tests build them: 32x32 images; `--kinds` picks some), at 10, 20 and 40 model calls each way: the RMS gap between
   the latent sampled back and the image's own latent, relative to that latent's standard deviation. Random weights
   make a rougher velocity field than a trained model's; the ranking, not the size of the gaps, is the point.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import numpy as np
import torch
from PIL import Image

from prompt2prompt.families import FAMILIES
from prompt2prompt.flow import SOLVERS
from prompt2prompt.inversion import InversionOptions, encode, invert, sample_back, unpack
from prompt2prompt.testing import tiny_pipeline

CALLS = (10, 20, 40, 80)

FLOW = [name for name, family in FAMILIES.items() if family.latents is not None]  # families with flow inversion
TRIP_CALLS = (10, 20, 40)  # model calls each way of part 2

def steps_for(method: str, calls: int) -> int:
    """Steps that cost `calls` model calls: Euler one a step, FireFlow one a step plus one, RF-Solver two a step."""
    return {"euler": calls, "fireflow": calls - 1, "rf-solver": calls // 2}[method]


def field(x, t):
    s = t / 1000
    return torch.cos(3 * s) * x + s


def reference(x, steps: int = 4000):
    s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for a, b in zip(s[:-1], s[1:]):
        h = b - a
        k1 = field(x, a * 1000)
        k2 = field(x + h / 2 * k1, (a + h / 2) * 1000)
        k3 = field(x + h / 2 * k2, (a + h / 2) * 1000)
        k4 = field(x + h * k3, b * 1000)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def ode(shift: float = 3.0) -> dict:
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)
    exact = reference(x.clone())
    rows = {}
    for method, cls in SOLVERS.items():
        errors = {}
        for calls in CALLS:
            scheduler = cls(shift=shift)
            scheduler.set_timesteps(steps_for(method, calls))
            y, used = x.clone(), 0
            for t in scheduler.timesteps:
                y = scheduler.step(field(y, t), t, y, return_dict=False)[0]
                used += 1
            assert used == calls, (method, used, calls)
            errors[calls] = (y - exact).abs().max().item()
        rows[method] = {"errors": errors, "order": math.log2(errors[40] / errors[80])}
    return rows


def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    a = np.full((32, 32, 3), 90, np.uint8)
    a[6:20, 8:24] = (200, 40, 40)
    a[20:28, 4:12] = (40, 40, 200)
    return Image.fromarray(np.clip(a + rng.integers(0, 10, a.shape), 0, 255).astype(np.uint8))


def round_trips(kinds) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in kinds:
            pipe = tiny_pipeline(kind, f"{folder}/{kind}")
            pipe.set_progress_bar_config(disable=True)
            image = picture()
            target = encode(pipe, image).float()
            rows[kind] = {}
            for method in SOLVERS:
                rows[kind][method] = {}
                for calls in TRIP_CALLS:
                    options = InversionOptions(method=method, steps=steps_for(method, calls), guidance=1.0,
                                               height=32, width=32)
                    inv = invert(pipe, image, "a red square", options, progress=False)
                    back = unpack(pipe, sample_back(pipe, inv, progress=False).latents, inv.image.size).float()
                    rows[kind][method][calls] = ((back - target).pow(2).mean().sqrt() / target.std()).item()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--kinds", nargs="+", default=FLOW, choices=FLOW,
                        help=f"tiny pipelines of part 2 (default: every flow family: {' '.join(FLOW)})")
    args = parser.parse_args()
    torch.manual_seed(0)
    solved = ode()
    print("1. ODE with a known solution (shift 3): largest error at equal model calls")
    print(f"{'solver':<12}" + "".join(f"{c:>12} calls" for c in CALLS) + f"{'order':>8}")
    for method, row in solved.items():
        print(f"{method:<12}" + "".join(f"{row['errors'][c]:>18.2e}" for c in CALLS) + f"{row['order']:>8.2f}")
    trips = round_trips(args.kinds)
    print("\n2. invert then sample back (tiny random pipelines, 32x32): RMS gap / latent std")
    print(f"{'pipeline':<10}{'solver':<12}" + "".join(f"{f'{c} calls':>10}" for c in TRIP_CALLS))
    for kind, by_method in trips.items():
        for method, gaps in by_method.items():
            print(f"{kind:<10}{method:<12}" + "".join(f"{gaps[c]:>10.4f}" for c in TRIP_CALLS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ode": solved, "round_trips": trips}, f, indent=2)


if __name__ == "__main__":
    main()
