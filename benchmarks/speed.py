"""Attention control at the cost of plain generation: seconds per denoising step and peak memory, side by side.

    python benchmarks/speed.py                        # SD 1.5 architecture, random weights, 32x32 and 64x64 latents
    python benchmarks/speed.py --device cuda --fp16   # on a GPU
    python benchmarks/speed.py --model tiny --sizes 16 --steps 3   # a quick look

Builds the Stable Diffusion 1.5 UNet, VAE and text encoder from their published configs with random weights (nothing is
downloaded) and measures, each configuration in a fresh process (so peak memory is its own):
  stock-1 / stock-2   the unmodified pipeline with 1 and 2 prompts
  attend              1 prompt, recording cross-attention everywhere and self-attention at small maps (AttentionStore)
  edit+blend          2 prompts, replace edit with local blend (the p2p default schedule)
  edit+blend explicit the same edit with every attention layer explicit (what the reference implementation does)
Per configuration: the median seconds per denoising step (from the pipeline's step callback, first step dropped, over
all repeats) and the peak memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU), printed as ratios to the stock
pipeline with the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {  # name: (prompts, baseline)
    "stock-1": (1, None),
    "attend": (1, "stock-1"),
    "stock-2": (2, None),
    "edit+blend": (2, "stock-2"),
    "edit+blend explicit": (2, "stock-2"),
}


def build_sd15(size: int, dtype, device):
    """SD 1.5's architecture (the published configs of runwayml/stable-diffusion-v1-5), random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from prompt2prompt.shapes.model import SD_SCHEDULE
    from prompt2prompt.testing import tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=size * 8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu"))
    tokenizer = tiny_tokenizer(tempfile.mkdtemp())  # ids are a subset of CLIP's vocabulary size
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def build(model: str, size: int, dtype, device):
    if model == "sd15":
        return build_sd15(size, dtype, device)
    import tempfile

    from prompt2prompt.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1", tempfile.mkdtemp())
    pipe.unet.register_to_config(sample_size=size)
    return pipe.to(device, dtype)


def peak_memory(device) -> int:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> None:
    import torch

    from prompt2prompt.attention import AttentionController, Controllers, control
    from prompt2prompt.edits import EditOptions, edit_controllers
    from prompt2prompt.generation import GenerationOptions, initial_latent
    from prompt2prompt.store import AttentionStore

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.fp16 else torch.float32
    pipe = build(args.model, args.size, dtype, args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts_n, _ = CONFIGS[args.config]
    prompts = ["a red circle and a blue square", "a red circle and a blue cross"][:prompts_n]
    options = GenerationOptions(steps=args.steps, seed=0, height=args.size * pipe.vae_scale_factor,
                                width=args.size * pipe.vae_scale_factor)

    class Everything(AttentionController):  # every layer explicit, nothing changed
        def wants(self, site):
            return True

    def controller():
        if args.config == "attend":
            return AttentionStore()
        if args.config.startswith("edit"):
            _, p2p, blend = edit_controllers(pipe, prompts, EditOptions(blend=("square", "cross")), args.steps)
            return Controllers(blend, p2p, Everything() if "explicit" in args.config else None)
        return None

    stamps: list[float] = []

    def tick(pipe_, step, timestep, kwargs):
        if args.device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return {}

    per_step = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.repeats):
        stamps.clear()
        stamps.append(time.perf_counter())
        ctl = controller()
        latents = initial_latent(pipe, options).expand(len(prompts), -1, -1, -1).to(args.device, dtype)

        def run(callback, latents=latents):
            pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=options.guidance,
                 latents=latents.clone(), output_type="latent", callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["latents"])

        with torch.inference_mode():
            if ctl is None:
                run(tick)
            else:
                with control(pipe, ctl) as router:

                    def both(p, s, t, kw):
                        out = router.callback(p, s, t, kw)
                        tick(p, s, t, kw)
                        return out

                    run(both)
        per_step += [b - a for a, b in zip(stamps[1:], stamps[2:])]  # first step dropped (warm-up)
    print(json.dumps({"step_s": statistics.median(per_step), "peak_bytes": peak_memory(args.device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=["sd15", "tiny"], help="architecture (default: sd15)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sides (default: 32 64)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per run (default: 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.config = args.worker
        worker(args)
        return
    rows = []
    for size in args.sizes:
        results = {}
        for name in CONFIGS:
            cmd = [sys.executable, __file__, "--worker", name, "--size", str(size), "--model", args.model,
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--device", args.device,
                   "--threads", str(args.threads)] + (["--fp16"] if args.fp16 else [])
            print(f"[{size}x{size}] {name} ...", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode:
                sys.exit(f"{name} at {size} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        for name, (_, base) in CONFIGS.items():
            r = results[name]
            ref = results[base] if base else r
            rows.append({"latent": size, "config": name, "step_s": r["step_s"], "peak_gib": r["peak_bytes"] / 2**30,
                         "time_ratio": r["step_s"] / ref["step_s"], "memory_ratio": r["peak_bytes"] / ref["peak_bytes"],
                         "baseline": base or name})
    device = args.device
    if device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    print(f"\n{args.model}, {device}, {'fp16' if args.fp16 else 'fp32'}, {args.steps} steps x {args.repeats} repeats "
          "(median s/step, first step of each run dropped)")
    print(f"{'latent':>6}  {'configuration':<20}{'s/step':>8}{'peak GiB':>10}{'time/stock':>12}{'mem/stock':>11}")
    for r in rows:
        print(f"{r['latent']:>6}  {r['config']:<20}{r['step_s']:>8.3f}{r['peak_gib']:>10.2f}{r['time_ratio']:>12.3f}"
              f"{r['memory_ratio']:>11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
