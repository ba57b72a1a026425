"""Running a diffusers pipeline under an attention controller, from one shared initial latent."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from .attention import AttentionController, control
from .errors import P2PError


@dataclass(frozen=True)
class GenerationOptions:
    steps: int = 50  # denoising steps (SD's default)
    guidance: float = 7.5  # classifier-free guidance scale (SD's default)
    seed: int = 0  # seeds the initial latent, shared by every prompt of the batch
    height: int | None = None  # pixels; None: the model's native size
    width: int | None = None
    negative_prompt: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    images: list[Image.Image]  # one per prompt
    latents: torch.Tensor  # (prompts, channels, h, w) final latents
    initial: torch.Tensor  # (1, channels, h, w) the shared initial noise (before the scheduler's sigma)
    options: GenerationOptions


def native_size(pipe) -> tuple[int, int]:
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (side, side) if isinstance(side, int) else tuple(side)


def initial_latent(pipe, options: GenerationOptions) -> torch.Tensor:
    """(1, channels, h, w) standard normal noise drawn on the CPU, so a seed means the same image on every device."""
    height, width = options.height or native_size(pipe)[0], options.width or native_size(pipe)[1]
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise P2PError(f"height and width must be multiples of {factor}, got {height}x{width}")
    shape = (1, pipe.unet.config.in_channels, height // factor, width // factor)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(options.seed), dtype=torch.float32)


def generate(
    pipe,
    prompts: list[str] | str,
    controller: AttentionController | None = None,
    options: GenerationOptions = GenerationOptions(),
    latent: torch.Tensor | None = None,
    progress: bool = True,
    uncond: torch.Tensor | None = None,
    **pipe_kwargs,
) -> Generation:
    """Generate one image per prompt, all from the same initial latent, with the controller in the loop.

    latent: (1, channels, h, w) shared by every prompt (default: drawn from options.seed), or one row per prompt.
    uncond: (steps, tokens, width) an unconditional embedding per step (from an inversion), swapped in through the
    step callback; it needs classifier-free guidance (guidance > 1).
    With no controller the pipeline runs untouched (the stock processors). Extra keyword arguments go to the pipeline.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise P2PError("expected at least one prompt, got none")
    latent = initial_latent(pipe, options) if latent is None else latent
    device, dtype = pipe.unet.device, pipe.unet.dtype
    if latent.shape[0] not in (1, len(prompts)):
        raise P2PError(f"expected one initial latent or one per prompt ({len(prompts)}), got {latent.shape[0]}")
    latents = latent.expand(len(prompts), *latent.shape[1:]).to(device, dtype).clone()
    pipe.set_progress_bar_config(disable=not progress, desc="denoising", leave=False)
    final = {}
    inputs = ["latents"]
    if uncond is not None:
        if uncond.shape[0] != options.steps:
            raise P2PError(f"the per-step unconditional embeddings are for {uncond.shape[0]} steps, "
                           f"but {options.steps} steps were asked")
        if options.guidance <= 1 or options.negative_prompt:
            raise P2PError("per-step unconditional embeddings need classifier-free guidance (guidance > 1) "
                           "and no negative prompt")
        uncond = uncond.to(device, pipe.text_encoder.dtype)
        pipe_kwargs["negative_prompt_embeds"] = uncond[0].expand(len(prompts), -1, -1)
        inputs.append("prompt_embeds")

    def keep_latents(pipe_, step, timestep, kwargs, changed=None):
        changed = {} if changed is None else changed
        final["latents"] = changed.get("latents", kwargs["latents"])
        if uncond is not None and step + 1 < options.steps:  # the next step's unconditional embedding
            embeds = kwargs["prompt_embeds"]  # (2 * prompts, tokens, width): [unconditional, conditional]
            n = embeds.shape[0] // 2
            changed["prompt_embeds"] = torch.cat([uncond[step + 1].expand(n, -1, -1), embeds[n:]])
        return changed

    args = dict(
        prompt=prompts,
        negative_prompt=[options.negative_prompt] * len(prompts) if options.negative_prompt else None,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance,
        latents=latents,
        height=latents.shape[2] * pipe.vae_scale_factor,
        width=latents.shape[3] * pipe.vae_scale_factor,
        output_type="np",
        callback_on_step_end_tensor_inputs=inputs,
        **pipe_kwargs,
    )
    if controller is None:
        out = pipe(**args, callback_on_step_end=keep_latents)
    else:
        with control(pipe, controller, prompts=len(prompts)) as router:

            def callback(pipe_, step, timestep, kwargs):
                return keep_latents(pipe_, step, timestep, kwargs, router.callback(pipe_, step, timestep, kwargs))

            out = pipe(**args, callback_on_step_end=callback)
    images = [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in out.images]
    return Generation(images, final["latents"].detach(), latent, options)
