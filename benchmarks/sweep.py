"""Sweep throughput: cases per second on 1 and on N processes (accelerate launch), the same study, side by side.

    python benchmarks/sweep.py [--processes 2] [--cases 16] [--steps 20] [--rounds 2]

The study: one word swap on the bundled shapes model over seeds (attention-controlled, local blend). Each round runs
1 process (with all the machine's threads), then N processes (the threads divided among them), each into a fresh
folder, alternating the order between rounds; the time includes starting the processes and loading the model, as a
user's sweep does. Prints cases per second of each and their ratio, per round and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def run(study: Path, out: Path, processes: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "prompt2prompt.cli", "sweep", str(study), "--out", str(out), "--quiet",
           "--threads", str(threads), "--processes", str(processes)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel run (default: 2)")
    parser.add_argument("--cases", type=int, default=16, help="cases in the study (default: 16)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per case (default: 20)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both runs (default: 2)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study.yaml"
        study.write_text(yaml.safe_dump({
            "model": "shapes", "generation": {"steps": args.steps},
            "edits": [{"source": "a red circle and a blue square", "target": "a red circle and a blue triangle",
                       "options": {"blend": ["square", "triangle"]}}],
            "grid": {"seed": list(range(args.cases))}}))
        ratios = []
        print(f"{args.cases} cases, {args.steps} steps, shapes model, {cores} cores")
        print(f"{'round':>5}{'1 process c/s':>15}{f'{args.processes} processes c/s':>18}{'speed-up':>10}")
        for r in range(args.rounds):
            order = [1, args.processes] if r % 2 == 0 else [args.processes, 1]
            seconds = {}
            for n in order:
                seconds[n] = run(study, Path(tmp) / f"out-{r}-{n}", n, max(1, cores // n))
            one, many = args.cases / seconds[1], args.cases / seconds[args.processes]
            ratios.append(many / one)
            print(f"{r + 1:>5}{one:>15.3f}{many:>18.3f}{many / one:>10.2f}", flush=True)
        print(f"median speed-up of {args.processes} processes over 1: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
