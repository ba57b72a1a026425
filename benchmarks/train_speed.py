"""The shapes trainer's speed: a baseline revision's trainer beside this tree's, steps/s and samples/s, in one run.

    python benchmarks/train_speed.py                        # today's trainer (--baseline) vs this tree, batch 1 and 32
    python benchmarks/train_speed.py --family sd3           # the flow model's recipe (an MM-DiT)
    python benchmarks/train_speed.py --device cuda --batches 32 256   # on a GPU

What is timed: `train.train_diffusion` of each trainer on the shapes v2 recipe's networks (the seventh candidate's
settings: 16 text tokens, cross-attention at all three levels, timestep bias 1.5, both grounding losses on), a small
encoded dataset (random autoencoder: the data's values do not change the cost), run for a short and a long number of
steps from fresh weights; (long - short seconds) / (long - short steps) is the cost of a step, with set-up, the first
steps and the final checkpoint cancelled out. The baseline's source is taken from git (`git archive REV`), so it runs
unchanged. Each (trainer, batch) runs in a fresh process, interleaved over repeats (A B C D, then D C B A, ...); a
repeat gives paired ratios (this tree's steps/s over the baseline's at the same batch), and the table shows their
median and range. A last row, "network alone", times the trainer's own loss (denoising and grounding, through the
same attention path) forward and backward on one batch drawn once, with no optimiser, EMA, clipping, data draws or
logging: what no trainer of this recipe can go below on this machine. (The stock networks' forward and backward,
without the grounding controller, is no floor: their fused attention's backward is slower on the CPU than the
explicit products the grounding loss needs, 1.07 s against the trainer's 0.62-0.70 s at batch 32 in a first run.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "54fe088"  # the last commit with the per-tensor trainer (AdamW per tensor, diffusers' EMAModel, .item())

CHILD = r"""
import json, sys, time, copy
from dataclasses import replace
from pathlib import Path
import torch
from prompt2prompt.shapes import train as T
from prompt2prompt.shapes.model import ShapesModelConfig
from transformers import CLIPTokenizer

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
work = Path(args["work"])
cfg = T.TrainConfig(family=args["family"], text_length=16, two_objects=0.7, margin=4, timestep_bias=1.5,
                    batch=args["batch"], dataset_size=args["dataset"], coverage_from=0, checkpoint_every=10**9,
                    device=args["device"], zero_tokens=16)
tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer", model_max_length=16)
model = replace(ShapesModelConfig(), cross_attention_levels=(True, True, True), vocab_size=len(tokenizer),
                max_length=16)
data = torch.load(work / "latents.pt")
torch.manual_seed(0)
nets = {k: v.to(cfg.device) for k, v in T.build_nets(cfg, model).items()}
out = Path(args["out"])
out.mkdir(parents=True, exist_ok=True)

def sync():
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()

def run(steps):
    fresh = copy.deepcopy(nets)
    sync()
    t = time.perf_counter()
    T.train_diffusion(fresh, data, tokenizer, replace(cfg, steps=steps), out, {}, None)
    sync()
    return time.perf_counter() - t

if args["what"] == "network":  # the trainer's own loss (denoising + grounding, the same attention path), forward and
    # backward on one batch drawn once: no optimiser, EMA, clipping, data draws or logging
    from prompt2prompt.attention import control
    objective, batches, grounding = T.DenoisingLoss(nets, tokenizer, cfg), T.Batches(data, cfg), T.Grounding()
    b = batches.draw(0)
    denoiser = nets.get("unet", nets.get("transformer"))
    recording = control(denoiser, grounding, prompts=cfg.batch)
    recording.__enter__()
    def step():
        loss, text = objective(b["latents"], b["ids"], b["drop"], b["noise"], b["t"], b["zeros"])
        owner = torch.nn.functional.pad(b["owner"].masked_fill(b["drop"][:, None], -1), (0, text - b["owner"].shape[1]),
                                        value=-1)
        ground, cover = grounding.loss(owner, b["masks"])
        (loss + cfg.grounding_weight * ground + cfg.coverage_weight * cover).backward()
    def timed(n):
        sync()
        s = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return time.perf_counter() - s
    timed(3)  # warm-up: first calls allocate and initialise
    short, long = timed(args["short"]), timed(args["long"])
else:
    run(3)  # warm-up: first calls allocate and initialise
    short, long = run(args["short"]), run(args["long"])
print("RESULT", json.dumps({"s_per_step": (long - short) / (args["long"] - args["short"])}))
"""


def prepare(work: Path, baseline: str, family: str, dataset: int) -> dict[str, Path]:
    """The two source trees (the baseline's from git, this tree's src) and a small encoded dataset both read."""
    trees = {"this tree": ROOT / "src"}
    if baseline:
        archive = work / "baseline.tar"
        with archive.open("wb") as f:
            subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", baseline, "src/prompt2prompt"],
                           stdout=f, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(work / "baseline", filter="data")
        trees = {f"baseline ({baseline})": work / "baseline" / "src", **trees}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from dataclasses import replace\n"
        "from transformers import CLIPTokenizer\n"
        "from prompt2prompt.shapes import train as T\n"
        "from prompt2prompt.shapes.model import ShapesModelConfig, build_vae\n"
        "work = Path(sys.argv[1])\n"
        "tok = CLIPTokenizer.from_pretrained(T.train_tokenizer(work / 'tokenizer'), model_max_length=16)\n"
        f"cfg = T.TrainConfig(family={family!r}, text_length=16, two_objects=0.7, margin=4, dataset_size={dataset})\n"
        "torch.manual_seed(0)\n"
        "vae = build_vae(replace(ShapesModelConfig(), vocab_size=len(tok), max_length=16)).eval()\n"
        "torch.save(T.encode_dataset(vae, tok, cfg), work / 'latents.pt')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(work)], env=env, check=True, capture_output=True)
    return trees


def measure(src: Path, what: str, batch: int, args, work: Path) -> float:
    short, long = (5, 5 + args.steps) if batch < 8 else (2, 2 + max(4, args.steps // 4))
    payload = {"what": what, "batch": batch, "family": args.family, "device": args.device, "threads": args.threads,
               "dataset": args.dataset, "short": short, "long": long, "work": str(work),
               "out": str(work / f"out-{os.getpid()}")}
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{src} ({what}, batch {batch}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])["s_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the trainer to compare with ('' for "
                        f"none; default {BASELINE}, the per-tensor trainer)")
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd3"], help="sd1: the shapes UNet; sd3: the "
                        "flow model's MM-DiT")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps at batch < 8 (a quarter of it, at least 4, "
                        "at larger batches; default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each process (default 2)")
    parser.add_argument("--dataset", type=int, default=512, help="scenes encoded for the timing (default 512)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = prepare(work, args.baseline, args.family, args.dataset)
        jobs = [(name, src, "train", b) for b in args.batches for name, src in trees.items()]
        jobs += [("network alone", ROOT / "src", "network", b) for b in args.batches]
        times: dict[tuple[str, int], list[float]] = {}
        for repeat in range(args.repeats):
            for name, src, what, batch in jobs if repeat % 2 == 0 else jobs[::-1]:
                seconds = measure(src, what, batch, args, work)
                times.setdefault((name, batch), []).append(seconds)
                print(f"repeat {repeat + 1}: {name:<28} batch {batch:>4}: {seconds:.4f} s/step", flush=True)
    base = next((n for n in trees if n.startswith("baseline")), None)
    rows = []
    print("\n| trainer | batch | s/step | steps/s | samples/s | speed / baseline (range) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, batch), values in times.items():
        s = statistics.median(values)
        if base and name != base:
            ratios = [b / x for b, x in zip(times[(base, batch)], values)]
            ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        else:
            ratio = "1.00" if name == base else ""
        rows.append({"trainer": name, "batch": batch, "s_per_step": s, "runs": values})
        print(f"| {name} | {batch} | {s:.4f} | {1 / s:.2f} | {batch / s:.1f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
