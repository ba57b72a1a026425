"""Attention control at the cost of plain generation: seconds per denoising step and peak memory, side by side.

    python benchmarks/speed.py                         # SD 1.5 architecture (random weights) at 32x32 and 64x64
    python benchmarks/speed.py --model shapes --sizes 16 --steps 10 --repeats 7   # the bundled model
    python benchmarks/speed.py --model sd3 --sizes 32  # SD3 medium's blocks (4 of 24), random weights, 256 px
    python benchmarks/speed.py --model flux --sizes 32 # Flux.1-dev's blocks (1 double, 4 single), random weights
    python benchmarks/speed.py --device cuda --dtype bf16   # on a GPU (benchmarks/gpu.sh: every model, both dtypes)
    python benchmarks/speed.py --model tiny-sd3 --sizes 16 --steps 4   # a tiny pipeline of prompt2prompt.testing
    python benchmarks/speed.py --model tiny-flux2 --sizes 16 --steps 4 # any family's tiny pipeline (narrow blocks)

Configurations:
  stock-1 / stock-2   the unmodified pipeline with 1 and 2 prompts
  attend              1 prompt, recording cross-attention everywhere and self-attention at small maps (AttentionStore)
  edit+blend          2 prompts, replace edit with local blend (the default schedule)
  attend+concepts     (SD3) attend and concept maps of 3 concepts in every joint block (ConceptAttention's concept
                      stream, `prompt2prompt.concepts`), against attend
  edit+blend explicit the same edit with every attention layer's probabilities read (UNet: explicit, what the
                      reference implementation does; MM-DiT: every block of the joint softmax, from the kernel's
                      logsumexp)

Operations: aten operations per denoising step (the torch profiler on the CPU, every dispatched operation, nested ones
included; a run of --steps steps minus one of half as many, so set-up, text encoding and decoding cancel), as a ratio to
the stock pipeline's, in the timing process; "kernel ops" leaves out the operations that only make views or read
metadata (`prompt2prompt.profiling.VIEW_OPS`); "kernels/stock" is that ratio on the CPU and the ratio of CUDA kernel
launches on a GPU (where peak memory is also measured per configuration inside the timing process).

Time: one process per latent size builds the pipeline once and runs the configurations interleaved, repeat after
repeat (A B C D E, then E D C B A, ...), so a machine that slows down mid-run biases none of them. Each repeat gives a
paired ratio (its configuration's median seconds per step over its stock pipeline's in the same repeat); the table
shows the median of those ratios and their range. Memory: each configuration once more in a fresh process of its own
(peak RSS on the CPU, which includes the weights; torch.cuda.max_memory_allocated on a GPU), as a ratio to its stock.
"""

from __future__ import annotations

import argparse
import contextlib
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
PROMPTS = ["a red circle and a blue square", "a red circle and a blue cross"]
CONCEPTS = ("circle", "square", "background")
CONCEPT_MODELS = ("sd3", "tiny-sd3")  # models whose family has a concept stream: they get the attend+concepts row


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


def build_sdxl(size: int, dtype, device):
    """SDXL base's architecture (the published configs of stabilityai/stable-diffusion-xl-base-1.0: UNet, CLIP ViT-L
    and OpenCLIP ViT-bigG text encoders, autoencoder), random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from prompt2prompt.shapes.model import SD_SCHEDULE
    from prompt2prompt.testing import tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=size * 8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=True,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu"))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))
    folder = tempfile.mkdtemp()
    tokenizer = tiny_tokenizer(f"{folder}/tokenizer")
    tokenizer_2 = tiny_tokenizer(f"{folder}/tokenizer_2", pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe.to(device, dtype)


def build_mmdit(model: str, size: int, dtype, device, layers: int):
    """SD3 medium's or Flux.1-dev's transformer (their published configs) cut to a few blocks, random weights; text
    encoders with the real output widths but one layer (the denoising loop never runs them); SD3 without T5."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from prompt2prompt.testing import tiny_t5, tiny_t5_tokenizer, tiny_tokenizer

    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    tokenizer = tiny_tokenizer(f"{folder}/tokenizer")

    def clip(width, projection=None):
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width,
                                num_hidden_layers=1, num_attention_heads=8, max_position_embeddings=77,
                                projection_dim=projection or width)
        return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)

    vae = AutoencoderKL(block_out_channels=(64, 64, 64, 64), layers_per_block=1, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=size * 8, shift_factor=0.0609, scaling_factor=1.5035)
    if model == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        transformer = SD3Transformer2DModel(  # stabilityai/stable-diffusion-3-medium-diffusers, num_layers cut
            sample_size=size, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=clip(768, 768), tokenizer=tokenizer, text_encoder_2=clip(1280, 1280), tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None)
    else:
        from diffusers import FluxPipeline, FluxTransformer2DModel

        t5_tokenizer = tiny_t5_tokenizer(f"{folder}/t5")
        transformer = FluxTransformer2DModel(  # black-forest-labs/FLUX.1-dev, double and single blocks cut
            patch_size=1, in_channels=64, num_layers=max(1, layers // 3), num_single_layers=layers,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                            text_encoder=clip(768), tokenizer=tokenizer, text_encoder_2=tiny_t5(t5_tokenizer, 4096),
                            tokenizer_2=t5_tokenizer)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe.to(device, dtype)


def build(model: str, size: int, dtype, device, layers: int = 4):
    import torch

    with torch.device(device):  # random weights made where they run (fast on a GPU)
        return _build(model, size, dtype, device, layers)


def _build(model: str, size: int, dtype, device, layers: int):
    if model.startswith("tiny"):  # the tiny random pipelines of prompt2prompt.testing (tiny = tiny-sd1)
        import tempfile

        from prompt2prompt.testing import tiny_pipeline

        pipe = tiny_pipeline(model.removeprefix("tiny").lstrip("-") or "sd1", tempfile.mkdtemp())
        if hasattr(pipe, "unet"):
            pipe.unet.register_to_config(sample_size=size)
        return pipe.to(device, dtype)
    if model == "sd15":
        return build_sd15(size, dtype, device)
    if model == "sdxl":
        return build_sdxl(size, dtype, device)
    if model in ("sd3", "flux"):
        return build_mmdit(model, size, dtype, device, layers)
    from prompt2prompt.loading import load_pipeline

    return load_pipeline(model, device=device, dtype=dtype)  # shapes


def peak_memory(device) -> int:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Runner:
    """One pipeline, each configuration run on demand; returns the per-step seconds of one run."""

    def __init__(self, args):
        import torch

        from prompt2prompt.generation import GenerationOptions

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        self.pipe = build(args.model, args.size, self.dtype, args.device, args.layers)
        self.pipe.set_progress_bar_config(disable=True)
        factor = self.pipe.vae_scale_factor
        self.options = GenerationOptions(steps=args.steps, seed=0, height=args.size * factor,
                                         width=args.size * factor, max_sequence_length=args.text_tokens,
                                         guidance=args.guidance).resolved(self.pipe)  # None: the pipeline's own

    def controller(self, config: str, prompts: list[str]):
        from prompt2prompt.attention import AttentionController, Controllers
        from prompt2prompt.edits import EditOptions, edit_controller, edit_controllers
        from prompt2prompt.store import AttentionStore

        class Everything(AttentionController):  # every layer's probabilities read, nothing changed
            def wants(self, site):
                return True

        if config in ("attend", "attend+concepts"):
            return AttentionStore()
        if config.startswith("edit"):
            _, p2p, blend = edit_controllers(self.pipe, prompts, EditOptions(blend=("square", "cross")),
                                             max_sequence_length=self.options.max_sequence_length)
            edit = edit_controller(p2p, blend)
            return Controllers(*edit.controllers, Everything()) if "explicit" in config else edit
        return None

    def run(self, config: str, steps: int | None = None) -> list[float]:
        import torch

        from prompt2prompt.attention import control
        from prompt2prompt.families import family_of
        from prompt2prompt.generation import guidance_arguments, initial_latent

        args, pipe = self.args, self.pipe
        prompts = PROMPTS[: CONFIGS[config][0]]
        stamps = [time.perf_counter()]

        def tick(pipe_, step, timestep, kwargs):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return {}

        ctl = self.controller(config, prompts)
        latent = initial_latent(pipe, self.options)
        latents = latent.expand(len(prompts), *latent.shape[1:]).to(args.device, self.dtype)
        kwargs = dict(prompt=prompts, num_inference_steps=steps or args.steps, latents=latents.clone(),
                      output_type="latent", callback_on_step_end_tensor_inputs=["latents"],
                      height=self.options.height, width=self.options.width,
                      **guidance_arguments(pipe, self.options.guidance, None, len(prompts)))
        if family_of(pipe).joint:  # given to the pipelines that take it (Qwen-Image 2.1 never cuts its text)
            kwargs["max_sequence_length"] = args.text_tokens
        concepts = contextlib.nullcontext()
        if config == "attend+concepts":
            from prompt2prompt.concepts import ConceptOptions, ConceptRecorder

            concepts = ConceptRecorder(pipe, ConceptOptions(CONCEPTS), len(prompts), steps or args.steps)
        with torch.inference_mode(), concepts:
            run = family_of(pipe).run  # the pipeline's call with the callback (a modular pipeline: its blocks)
            if ctl is None:
                run(pipe, kwargs, tick)
            else:
                with control(pipe, ctl) as router:

                    def both(p, s, t, kw):
                        out = router.callback(p, s, t, kw)
                        tick(p, s, t, kw)
                        return out

                    run(pipe, kwargs, both)
        return [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the first step dropped (warm-up)


def timing_worker(args) -> None:
    """All configurations interleaved in one process: per repeat, each one's median seconds per step."""
    runner = Runner(args)
    names = list(CONFIGS)
    runner.run("stock-2")  # warm-up, not counted
    rows = []
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        rows.append({name: statistics.median(runner.run(name)) for name in order})
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()),
              file=sys.stderr, flush=True)
    from prompt2prompt.profiling import ops_per_step, summary

    ops, memory = {}, {}
    for name in names:  # on a GPU, "launches" counts the kernels the host launched
        counts = ops_per_step(lambda steps, name=name: runner.run(name, steps), steps=max(2, args.steps))
        ops[name] = summary(counts)
        if args.device == "cuda":  # peak memory per configuration, in this process (the weights included)
            import torch

            torch.cuda.reset_peak_memory_stats()
            runner.run(name)
            memory[name] = torch.cuda.max_memory_allocated()
    print(json.dumps({"rounds": rows, "ops": ops, "memory": memory}))


def memory_worker(args) -> None:
    runner = Runner(args)
    runner.run(args.config)
    print(json.dumps({"peak_bytes": peak_memory(args.device)}))


def _call(args, extra: list[str]) -> str:
    cmd = [sys.executable, __file__, "--size", str(args.size), "--model", args.model, "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads),
           "--layers", str(args.layers), "--text-tokens", str(args.text_tokens), *extra]
    cmd += ["--guidance", str(args.guidance)] if args.guidance is not None else []
    cmd += ["--dtype", args.dtype]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        sys.exit(f"{' '.join(extra)} at {args.size} failed")
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    from prompt2prompt.testing import KINDS  # tiny-KIND: every family's tiny pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "sd3", "flux", "shapes", "tiny",
                                                             *(f"tiny-{kind}" for kind in KINDS)],
                        help="sd15 / sdxl: SD 1.5's / SDXL base's architecture with random weights; sd3 / flux: SD3 "
                        "medium's / Flux.1-dev's transformer blocks with random weights, cut to --layers; shapes: the "
                        "bundled model; tiny-KIND: a tiny random pipeline of prompt2prompt.testing (tiny = tiny-sd1) "
                        "(default: sd15)")
    parser.add_argument("--layers", type=int, default=4,
                        help="sd3: transformer blocks; flux: single-stream blocks (and a third as many double-stream "
                        "ones) (default: 4)")
    parser.add_argument("--text-tokens", type=int, default=128, help="sd3 / flux: T5 sequence length (default: 128)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default: the pipeline's own; Qwen-Image 2.1's is 1, guidance off)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sides (default: 32 64)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per run (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every configuration (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="precision (default: fp32)")
    parser.add_argument("--fp16", action="store_true", help="the same as --dtype fp16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fp16 and args.dtype not in (None, "fp16"):
        parser.error(f"--fp16 is --dtype fp16, but --dtype {args.dtype} was given too")
    args.dtype = "fp16" if args.fp16 else args.dtype or "fp32"
    if args.model in CONCEPT_MODELS:
        CONFIGS["attend+concepts"] = (1, "attend")
    if args.timing:
        timing_worker(args)
        return
    if args.memory:
        args.config = args.memory
        memory_worker(args)
        return
    device = args.device
    if device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    print(f"\n{args.model}, {device}, {args.dtype}, {args.steps} steps, {args.repeats} "
          "interleaved repeats (median s/step; time ratio: median of the paired per-repeat ratios, and their range)",
          flush=True)
    print(f"{'latent':>6}  {'configuration':<20}{'s/step':>8}{'time/stock':>12}{'range':>15}{'peak GiB':>10}"
          f"{'mem/stock':>11}{'ops/step':>10}{'ops/stock':>11}{'kernels/stock':>15}", flush=True)
    table = []
    for size in args.sizes:  # each size's rows printed (and the JSON written) as soon as they are measured
        args.size = size
        print(f"[{size}x{size}] timing, interleaved ...", file=sys.stderr, flush=True)
        measured = json.loads(_call(args, ["--timing"]))
        rounds, ops, memory = measured["rounds"], measured["ops"], measured["memory"]
        for name in CONFIGS if not memory else ():  # on the CPU: peak RSS of a fresh process per configuration
            print(f"[{size}x{size}] memory of {name} ...", file=sys.stderr, flush=True)
            memory[name] = json.loads(_call(args, ["--memory", name]))["peak_bytes"]
        for name, (_, base) in CONFIGS.items():
            base = base or name
            ratios = [r[name] / r[base] for r in rounds]
            row = {"latent": size, "config": name, "baseline": base,
                   "step_s": statistics.median(r[name] for r in rounds),
                   "time_ratio": statistics.median(ratios), "time_ratio_min": min(ratios),
                   "time_ratio_max": max(ratios), "peak_gib": memory[name] / 2**30,
                   "memory_ratio": memory[name] / memory[base]}
            if ops:
                kernel = "launches" if "launches" in ops[name] else "kernel"  # CUDA launches where they were counted
                row.update(ops_step=ops[name]["all"], ops_ratio=ops[name]["all"] / ops[base]["all"],
                           kernel_ops_step=ops[name][kernel], kernel_ops_ratio=ops[name][kernel] / ops[base][kernel],
                           kernel_ops_are=kernel)
            table.append(row)
            spread = f"{row['time_ratio_min']:.3f}-{row['time_ratio_max']:.3f}"
            counted = (f"{row['ops_step']:>10.0f}{row['ops_ratio']:>11.3f}{row['kernel_ops_ratio']:>15.3f}" if ops
                       else "")
            print(f"{size:>6}  {name:<20}{row['step_s']:>8.4f}{row['time_ratio']:>12.3f}{spread:>15}"
                  f"{row['peak_gib']:>10.2f}{row['memory_ratio']:>11.3f}{counted}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": args.model, "device": device, "steps": args.steps, "repeats": args.repeats,
                           "rows": table}, f, indent=2)


if __name__ == "__main__":
    main()
