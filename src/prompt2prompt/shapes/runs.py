"""Training runs that outlive a session: where they live, how they resume, and what they have reached.

    python -m prompt2prompt.shapes.runs                      # each run: stage, step, hours, latest evaluation
    python -m prompt2prompt.shapes.runs resume               # start every unfinished run again, in the background
                                                             # (and restart a lost run from training/NAME.safetensors)
    python -m prompt2prompt.shapes.runs point NAME           # write its resume point, training/NAME.safetensors
    python -m prompt2prompt.shapes.runs evaluate NAME        # evaluate NAME's newest milestone (evals.jsonl)
    python -m prompt2prompt.shapes.runs row NAME             # its progress row for BENCHMARKS.md "Training runs"

A run is a folder `RUNS/NAME` (RUNS is `$P2P_RUNS`, else `~/.cache/prompt2prompt/runs`: outside any checkout, so a
checkout laid anew keeps its runs). The trainer (`python -m prompt2prompt.shapes.train --run NAME ...`) writes there:
`checkpoint.pt` (everything a resume needs; at least every `--checkpoint-minutes`), `loss.jsonl`, `command.json` (the
arguments it was started with, which `resume` replays), `milestones/step-NNNNNN.safetensors` (the EMA weights in fp16
with the step, the hours trained and the recipe as metadata: what `evaluate` measures, and the resume point a session
may commit), and `train.log` when started by `resume`. `evaluate` exports a milestone to a pipeline folder beside it and
appends the evaluator's figures to `evals.jsonl`. `point` writes the run's resume point (`points.py`): the file a
session commits, from which `resume` restarts the run if its folder is ever lost (a point at a milestone's step
writes that milestone back into the new folder, so it can still be evaluated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import InputError

DEFAULT_ROOT = "~/.cache/prompt2prompt/runs"
MILESTONES = "milestones"
POINTS = "training"  # the checkout's folder of committed resume points, one NAME.safetensors per run


def runs_root() -> Path:
    """Where runs live: $P2P_RUNS, else ~/.cache/prompt2prompt/runs."""
    return Path(os.environ.get("P2P_RUNS") or DEFAULT_ROOT).expanduser()


def run_folder(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"a run's name is one folder name under {runs_root()}, like 'shapes-v2'; got {name!r}")
    return runs_root() / name


def milestone_path(folder: Path, step: int) -> Path:
    return folder / MILESTONES / f"step-{step:06d}.safetensors"


def milestones(folder: Path) -> list[tuple[int, Path]]:
    """(step, file) of a run's milestones, oldest first."""
    found = []
    for path in (folder / MILESTONES).glob("step-*.safetensors"):
        try:
            found.append((int(path.stem.split("-")[1]), path))
        except ValueError:
            continue
    return sorted(found)


def milestone_info(path: Path) -> dict:
    """A milestone's metadata: step, hours, config (the recipe), scaling and shift factors."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def typed_arguments(folder: Path) -> list[str]:
    """The arguments a run was first started with, as typed, without the thread count (no part of its recipe); []
    for a folder without command.json."""
    path = folder / "command.json"
    typed = (json.loads(path.read_text()).get("typed") or []) if path.exists() else []
    return [a for i, a in enumerate(typed) if a != "--threads" and (i == 0 or typed[i - 1] != "--threads")]


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a stop mid-write
            continue
    return rows


def _running(folder: Path) -> int | None:
    """The pid of a trainer working in this folder now, if any (its lock file names a live process)."""
    lock = folder / "train.pid"
    try:
        pid = int(lock.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def status(folder: Path) -> dict:
    """What a run has reached: stage, step of steps, hours, whether it is finished or running now, last evaluation."""
    import torch

    command = json.loads((folder / "command.json").read_text()) if (folder / "command.json").exists() else {}
    argv = command.get("argv", [])  # what a resume replays
    losses = _rows(folder / "loss.jsonl")
    last = losses[-1] if losses else {}
    ckpt = folder / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False, map_location="cpu", mmap=True) if ckpt.exists() else {}
    evals = _rows(folder / "evals.jsonl")
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else None
    step = state.get("step", 0)
    return {"name": folder.name, "stage": last.get("stage", "-"), "step": step, "steps": steps,
            "vae_step": state.get("vae_step", 0), "hours": state.get("seconds", 0.0) / 3600,
            "finished": (folder / "pipeline" / "model_index.json").exists() and steps is not None and step >= steps,
            "running": _running(folder), "loss": last.get("loss"), "eval": evals[-1] if evals else None,
            "milestones": [s for s, _ in milestones(folder)]}


def resume(folder: Path, python: str = sys.executable) -> int | None:
    """Start the run again in the background with the arguments it was started with; returns the new pid, or None
    if it is finished or already running."""
    info = status(folder)
    if info["finished"] or info["running"]:
        return None
    command = json.loads((folder / "command.json").read_text())
    log = (folder / "train.log").open("a")
    log.write(f"\n== resumed {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    log.flush()
    process = subprocess.Popen([python, "-m", "prompt2prompt.shapes.train", *command["argv"]], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


def restart(point: Path, python: str = sys.executable) -> int | None:
    """Start the run a resume point belongs to (its file name) from that point, in the background, when the run's
    folder holds no checkpoint; returns the new pid, or None when the folder has one (`resume` carries it on)."""
    from .points import read_point

    folder = run_folder(point.stem)
    if (folder / "checkpoint.pt").exists():
        return None
    meta = read_point(point)[1]
    typed = meta.get("typed") or []
    if not typed:
        raise InputError(f"{point} does not say how its run was started (no typed command in its metadata)")
    argv = [a for i, a in enumerate(typed) if a not in ("--run", "--out") and (i == 0 or typed[i - 1] not in
                                                                                ("--run", "--out"))]
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "train.log").open("a")
    log.write(f"\n== restarted from {point} (step {meta['step']:,}) {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    log.flush()
    process = subprocess.Popen([python, "-m", "prompt2prompt.shapes.train", "--run", folder.name, *argv,
                                "--restart-from", str(point.resolve())], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


def write_point(folder: Path, to: Path) -> Path:
    """The run's resume point, `to/NAME.safetensors`, from its checkpoint's EMA weights (the trainer's --point)."""
    if not (folder / "checkpoint.pt").exists():
        raise InputError(f"{folder} holds no checkpoint to write a resume point from")
    command = json.loads((folder / "command.json").read_text())
    path = to / f"{folder.name}.safetensors"
    subprocess.run([sys.executable, "-m", "prompt2prompt.shapes.train", *command["argv"], "--point", str(path)],
                   check=True)
    return path


def evaluate(folder: Path, step: int | None = None, count: int = 200, guidance: float | None = None,
             threads: int = 0) -> dict:
    """Export a milestone (the newest by default) to `milestones/step-N/` and run the evaluator on it (200 captions;
    guidance 7.5 for the UNet, the SD3 pipeline's own default, 7.0, for the flow model); appends to evals.jsonl."""
    import torch

    found = dict(milestones(folder))
    if not found:
        raise InputError(f"{folder} has no milestones yet (the trainer writes one every --milestone-every steps)")
    step = max(found) if step is None else step
    if step not in found:
        raise InputError(f"{folder} has no milestone at step {step}; it has {sorted(found)}")
    info = milestone_info(found[step])
    export = found[step].with_suffix("")
    if not (export / "model_index.json").exists():
        command = json.loads((folder / "command.json").read_text())
        subprocess.run([sys.executable, "-m", "prompt2prompt.shapes.train", *command["argv"], "--export", str(export),
                        "--weights", str(found[step])], check=True)
    from ..generation import GenerationOptions
    from ..loading import load_pipeline
    from .evaluate import MEASURES
    from .evaluate import evaluate as run_evaluator

    if threads:
        torch.set_num_threads(threads)
    flow = info["config"].get("family") == "sd3"
    if guidance is None:
        guidance = 7.0 if flow else 7.5  # StableDiffusion3Pipeline's default guidance_scale; SD 1.x's 7.5
    started = time.time()
    result = run_evaluator(load_pipeline(export), count, 1234, GenerationOptions(steps=50, guidance=guidance))
    row = {"step": step, "hours": info["hours"], "count": count, "guidance": guidance,
           "seconds": round(time.time() - started, 1), **{key: getattr(result, key) for key in MEASURES}}
    from dataclasses import asdict

    # the whole evaluation beside the milestone (what `shapes.ship --step` ships with)
    export.with_name(export.name + ".eval.json").write_text(json.dumps({**asdict(result), "model": str(export)},
                                                                       indent=2))
    with (folder / "evals.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def progress_row(folder: Path) -> str:
    """The run's BENCHMARKS.md row: name, command, step reached, hours so far, the latest evaluation's figures."""
    info = status(folder)
    argv = " ".join(typed_arguments(folder))
    e = info["eval"] or {}

    def f(key):
        return f"{e[key]:.3f}" if isinstance(e.get(key), float) else "-"

    at = f"{e['step']:,} ({e['guidance']:g})" if e else "-"
    return (f"| {folder.name} | `python -m prompt2prompt.shapes.train {argv}` | {info['step']:,} | {info['hours']:.2f} "
            f"| {at} | {f('colour_accuracy')} | {f('shape_accuracy')} | {f('exact_count')} | {f('exact_count_two')} "
            f"| {f('attention_iou')} | {f('autoencoder_psnr')} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what")
    sub.add_parser("status", help="each run: stage, step, hours, milestones, latest evaluation (the default)")
    res = sub.add_parser("resume", help="start every unfinished run that is not running, in the background; a run "
                         "whose folder is gone (or holds no checkpoint) restarts from its resume point, if it has one")
    res.add_argument("--points", default=POINTS, metavar="DIR",
                     help=f"where the resume points are, NAME.safetensors each (default: {POINTS}, in this folder)")
    pt = sub.add_parser("point", help="write a run's resume point (EMA weights in fp16, <= 10 MB), to commit")
    pt.add_argument("name", help="the run's folder name under the runs root")
    pt.add_argument("--to", default=POINTS, metavar="DIR", help=f"the folder it goes to (default: {POINTS})")
    ev = sub.add_parser("evaluate", help="evaluate a run's milestone and append the figures to its evals.jsonl")
    ev.add_argument("name", help="the run's folder name under the runs root")
    ev.add_argument("--step", type=int, default=None, help="the milestone's step (default: the newest)")
    ev.add_argument("--count", type=int, default=200, help="captions (default: 200)")
    ev.add_argument("--guidance", type=float, default=None,
                    help="guidance scale (default: 7.5 for the UNet, 7.0 for the flow model: its pipeline's own)")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    row = sub.add_parser("row", help="print the run's progress row for BENCHMARKS.md")
    row.add_argument("name", help="the run's folder name under the runs root")
    args = parser.parse_args(argv)
    root = runs_root()
    try:
        if args.what == "evaluate":
            print(json.dumps(evaluate(run_folder(args.name), args.step, args.count, args.guidance, args.threads)))
            return 0
        if args.what == "row":
            print(progress_row(run_folder(args.name)))
            return 0
        if args.what == "point":
            path = write_point(run_folder(args.name), Path(args.to))
            print(f"{args.name}: resume point {path}")
            return 0
        restarted = set()
        if args.what == "resume":
            for point in sorted(Path(args.points).glob("*.safetensors")):
                pid = restart(point)
                if pid:
                    restarted.add(point.stem)
                    print(f"{point.stem}: restarted from {point} (pid {pid}, log {run_folder(point.stem)}/train.log)")
        folders = sorted(p for p in root.glob("*") if (p / "command.json").exists() and p.name not in restarted
                         ) if root.exists() else []
        if restarted and not folders:
            return 0
        if not folders:
            print(f"no runs in {root}")
            return 0
        for folder in folders:
            if args.what == "resume":
                pid = resume(folder)
                print(f"{folder.name}: " + (f"resumed (pid {pid}, log {folder / 'train.log'})" if pid else
                                            "finished or already running"))
                continue
            s = status(folder)
            state = "finished" if s["finished"] else f"running (pid {s['running']})" if s["running"] else "stopped"
            e = s["eval"]
            seen = (f"; eval at {e['step']:,}: count {e['exact_count']:.3f}, two {e['exact_count_two']:.3f}, shape "
                    f"{e['shape_accuracy']:.3f}, IoU {e['attention_iou']:.3f}") if e else ""
            where = (f"autoencoder step {s['vae_step']:,}" if s["stage"] == "vae" else
                     f"{s['stage']} step {s['step']:,} of {s['steps']:,}")
            print(f"{s['name']}: {state}, {where}, {s['hours']:.2f} h trained{seen}")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
