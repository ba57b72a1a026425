"""Running a diffusers pipeline under an attention controller, from one shared initial latent."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
from PIL import Image

from .attention import control
from .errors import InputError, NonFiniteError
from .families import family_of
from .numbers import MAX_STEPS, check_finite, check_seed, check_whole
from .routing import AttentionController, Controllers, denoiser, exclusive, execution_device
from .tokens import prompt_tokens

MAX_SIDE = 4096  # pixels: an image side above this is refused (8192 x 8192 took 8 GB of latents and activations)


def check_size(height: int | None, width: int | None) -> None:
    """Image sides of at most MAX_SIDE pixels (None: the model's own)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SIDE:
            raise InputError(f"{name} {value} is over {MAX_SIDE} pixels; expected at most {MAX_SIDE}")


@dataclass(frozen=True)
class GenerationOptions:
    steps: int | None = None  # denoising steps; None: the pipeline's own default (SD 50, SD3 and Flux.1 28)
    guidance: float | None = None  # classifier-free guidance scale (<= 1 turns guidance off); None: the pipeline's
    # own default (SD 1.x 7.5, SDXL 5, SD3 7, Flux.1 3.5), in the usual convention whatever the pipeline's
    seed: int = 0  # seeds the initial latent, shared by every prompt of the batch, and the schedulers' noise
    height: int | None = None  # pixels; None: the model's native size
    width: int | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None  # MM-DiT: the T5 tokens the text is padded to; None: the pipeline's default
    # (a pipeline that never cuts its text, Qwen-Image 2.1, has none: there it does not apply)

    def __post_init__(self):
        if self.steps is not None:
            check_whole(self.steps, "steps", 1, MAX_STEPS)
        if self.guidance is not None:
            check_finite(self.guidance, "guidance (1 or less turns it off)", 0)
        check_seed(self.seed)
        for name in ("height", "width", "max_sequence_length"):
            if getattr(self, name) is not None:
                check_whole(getattr(self, name), name, 1)
        check_size(self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, pipe) -> GenerationOptions:
        """These options with steps and guidance left unset taken from the pipeline's own defaults."""
        if self.steps is not None and self.guidance is not None:
            return self
        steps, guidance = pipeline_defaults(pipe)
        return replace(self, steps=steps if self.steps is None else self.steps,
                       guidance=guidance if self.guidance is None else self.guidance)


def pipeline_defaults(pipe) -> tuple[int, float]:
    """(steps, guidance) the pipeline uses when its call names none, by its family's adapter (`Family.defaults`)."""
    return family_of(pipe).defaults(pipe)


@dataclass
class Generation:
    images: list[Image.Image]  # one per prompt
    latents: torch.Tensor  # (prompts, channels, h, w) final latents ((prompts, tokens, channels) when packed)
    initial: torch.Tensor  # (1, channels, h, w) the shared initial noise (before the scheduler's sigma)
    options: GenerationOptions


def native_size(pipe) -> tuple[int, int]:
    """(height, width) in pixels the pipeline draws when none is given, by its family's adapter."""
    return family_of(pipe).size(pipe)[0]


def largest_size(pipe) -> tuple[int, int] | None:
    """(height, width) in pixels beyond which the denoiser cannot place image tokens (a rotary table's length), or
    None where nothing in the model bounds it."""
    return family_of(pipe).size(pipe)[1]


def packed(pipe) -> bool:
    """Whether the pipeline keeps its latents as a sequence of 2x2 patches (Flux) rather than an image."""
    return family_of(pipe).packed


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the autoencoder's factor times the patch (MM-DiT), or with 8 (diffusers'
    UNet pipelines check it), by the family's adapter."""
    return family_of(pipe).multiple(pipe)


def image_size_for(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) in pixels to work at: the given sides or the model's native ones, checked to be multiples of
    what the model needs."""
    native = native_size(pipe)
    size = (height or native[0], width or native[1])
    multiple = size_multiple(pipe)
    if size[0] % multiple or size[1] % multiple:
        raise InputError(f"height and width must be multiples of {multiple} for this model, got {size[0]}x{size[1]}")
    largest = largest_size(pipe)
    if largest is not None and (size[0] > largest[0] or size[1] > largest[1]):
        raise InputError(f"this model places image tokens up to {largest[0]}x{largest[1]} pixels (height x width; its "
                         f"position table ends there); got {size[0]}x{size[1]}")
    return size


def check_steps(pipe, steps: int) -> None:
    """A DDIM-family scheduler takes at most its training timesteps as steps (diffusers raises deep inside otherwise);
    a flow scheduler only `MAX_STEPS`, checked with the options."""
    total = pipe.scheduler.config.get("num_train_timesteps")
    if total and not family_of(pipe).flow and steps > total:
        raise InputError(f"this model's scheduler has {total} timesteps: expected at most {total} steps, got {steps}")


def initial_latent(pipe, options: GenerationOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """(1, channels, h, w) standard normal noise drawn on the CPU, so a seed means the same image on every device, in
    the form the pipeline takes it (its family's `noise`: Flux.1 packs it into (1, tokens, 4 * channels)).

    generator: draw from it (it advances); default: a fresh CPU generator seeded with options.seed.
    """
    height, width = image_size_for(pipe, options.height, options.width)
    generator = generator or torch.Generator("cpu").manual_seed(options.seed)
    return family_of(pipe).noise(pipe, height, width, generator)


def image_size(pipe, latents: torch.Tensor, options: GenerationOptions) -> tuple[int, int]:
    """(height, width) in pixels of latents as the pipeline holds them."""
    if packed(pipe):
        return options.height or native_size(pipe)[0], options.width or native_size(pipe)[1]
    return latents.shape[2] * pipe.vae_scale_factor, latents.shape[3] * pipe.vae_scale_factor


def guidance_arguments(pipe, scale: float, negative_prompt: str | None, prompts: int) -> dict:
    """The pipeline's own arguments for guidance at this scale, against this negative prompt (None: its default)."""
    return family_of(pipe).guidance(scale, negative_prompt, prompts)


def _rgb(image: Image.Image) -> Image.Image:
    """A pipeline's picture as RGB: one drawn with an alpha channel (Qwen-Image 2.1's RGBA autoencoder) composited
    over white."""
    if image.mode == "RGB":
        return image
    if image.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def _copy(generator: torch.Generator) -> torch.Generator:
    twin = torch.Generator(generator.device)
    twin.set_state(generator.get_state())
    return twin


@contextmanager
def _progress_bar(pipe, show: bool):
    """The pipeline's progress bar for one call; the caller's setting is put back afterwards. The setting is kept on
    the pipeline object (`_progress_bar_config`, where diffusers' pipelines keep it) also where the pipeline's own
    `set_progress_bar_config` puts it elsewhere (a modular pipeline's: on its top-level blocks), for a family that
    drives the loop itself (`Family.run`) to read."""
    had = "_progress_bar_config" in vars(pipe)
    saved = dict(pipe._progress_bar_config) if had else None
    config = {"disable": not show, "desc": "denoising", "leave": False}
    pipe.set_progress_bar_config(**config)
    pipe._progress_bar_config = config
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = saved
        else:
            vars(pipe).pop("_progress_bar_config", None)


class SourcePath(AttentionController):
    """Direct inversion's correction: after every step, the first prompt's latents are set to the inversion's path
    (the others are left alone). It runs before every other controller's step end (a local blend then resets the
    edited prompts outside its mask to the pinned source)."""

    def __init__(self, path: torch.Tensor):
        self.path = path  # (steps, channels, h, w)

    def step_end(self, step, timestep, latents):
        if step >= self.path.shape[0]:
            return None
        pinned = self.path[step : step + 1].to(latents.device, latents.dtype)  # (1, channels, h, w)
        return torch.cat([pinned, latents[1:]])


def generate(
    pipe,
    prompts: list[str] | str,
    controller: AttentionController | None = None,
    options: GenerationOptions = GenerationOptions(),
    latent: torch.Tensor | None = None,
    progress: bool = True,
    uncond: torch.Tensor | None = None,
    uncond_pooled: torch.Tensor | None = None,
    path: torch.Tensor | None = None,
    **pipe_kwargs,
) -> Generation:
    """Generate one image per prompt, all from the same initial latent, with the controller in the loop.

    latent: (1, channels, h, w) shared by every prompt (default: drawn from options.seed), or one row per prompt.
    Stochastic schedulers (Euler ancestral, DDPM, DDIM with eta > 0, DPM++ SDE) are seeded too: every prompt gets
    the same noise at every step, drawn from the seed's generator after the initial latent (one prompt therefore
    reproduces `pipe(prompt, generator=torch.Generator().manual_seed(seed))`).
    uncond: (steps, tokens, width) an unconditional embedding per step (from an inversion), swapped in through the
    step callback; it needs classifier-free guidance (guidance > 1).
    uncond_pooled: SDXL, with uncond: (1, width) the unconditional rows' pooled embedding.
    path: (steps, channels, h, w) latents the first prompt is set to after each step (a direct inversion's path), before
    any controller's step end.
    With no controller the pipeline runs untouched (the stock processors). Extra keyword arguments go to the pipeline
    (prompt_embeds and its kind replace the prompts' own encoding; cross_attention_kwargs reach every processor).
    The pipeline's scheduler state aside, the caller's pipeline is left as it was (processors, progress bar).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("expected at least one prompt, got none")
    options = options.resolved(pipe)
    check_steps(pipe, options.steps)
    generator = torch.Generator("cpu").manual_seed(options.seed)
    latent = initial_latent(pipe, options, generator) if latent is None else latent
    device, dtype = execution_device(pipe), denoiser(pipe).dtype
    if latent.shape[0] not in (1, len(prompts)):
        raise InputError(f"expected one initial latent or one per prompt ({len(prompts)}), got {latent.shape[0]}")
    latents = latent.expand(len(prompts), *latent.shape[1:]).to(device, dtype).clone()
    final = {}
    inputs = ["latents"]
    if uncond is not None:
        if uncond.shape[0] != options.steps:
            raise InputError(f"the per-step unconditional embeddings are for {uncond.shape[0]} steps, "
                             f"but {options.steps} steps were asked")
        if options.guidance <= 1 or options.negative_prompt:
            raise InputError("per-step unconditional embeddings need classifier-free guidance (guidance > 1) "
                             "and no negative prompt")
        uncond = uncond.to(device, pipe.text_encoder.dtype)
        pipe_kwargs["negative_prompt_embeds"] = uncond[0].expand(len(prompts), -1, -1)
        inputs.append("prompt_embeds")
        if (uncond_pooled is not None) != family_of(pipe).added_conditions:
            raise InputError("per-step unconditional embeddings on SDXL need their pooled embedding (uncond_pooled), "
                             "and only SDXL takes one")
        if uncond_pooled is not None:
            pipe_kwargs["negative_pooled_prompt_embeds"] = uncond_pooled.to(device, pipe.text_encoder.dtype).expand(
                len(prompts), -1)

    if path is not None:
        if path.shape[0] != options.steps or path.shape[1:] != latents.shape[1:]:
            raise InputError(f"the latent path has shape {tuple(path.shape)}; expected ({options.steps}, "
                             f"{', '.join(map(str, latents.shape[1:]))}) for {options.steps} steps")
        controller = SourcePath(path) if controller is None else Controllers(SourcePath(path), controller)

    def keep_latents(pipe_, step, timestep, kwargs, changed=None):
        changed = {} if changed is None else changed
        final["latents"] = changed.get("latents", kwargs["latents"])
        if uncond is not None and step + 1 < options.steps:  # the next step's unconditional embedding
            embeds = kwargs["prompt_embeds"]  # (2 * prompts, tokens, width): [unconditional, conditional]
            n = embeds.shape[0] // 2
            changed["prompt_embeds"] = torch.cat([uncond[step + 1].expand(n, -1, -1), embeds[n:]])
        return changed

    embedded = "prompt_embeds" in pipe_kwargs
    if not embedded:  # a prompt the model cannot take (beyond what its text positions reach) is refused by name
        for prompt in prompts:
            prompt_tokens(pipe, prompt, options.max_sequence_length)
    if options.max_sequence_length is not None:  # given to the pipelines that take it (`Family.run`)
        pipe_kwargs["max_sequence_length"] = options.max_sequence_length
    args = dict(
        prompt=None if embedded else list(prompts),  # a copy: some pipelines (Z-Image) rewrite the list they get
        **guidance_arguments(pipe, options.guidance, None if embedded else options.negative_prompt, len(prompts)),
        num_inference_steps=options.steps,
        **family_of(pipe).sampling(pipe, options.steps),
        latents=latents,
        generator=[_copy(generator) for _ in prompts],  # the same noise for every prompt at every step
        height=image_size(pipe, latents, options)[0],
        width=image_size(pipe, latents, options)[1],
        output_type="pil",
        callback_on_step_end_tensor_inputs=inputs,
        **pipe_kwargs,
    )
    family = family_of(pipe)
    with exclusive(pipe), _progress_bar(pipe, progress):
        if controller is None:
            images = family.run(pipe, args, keep_latents)
        else:
            with control(pipe, controller, prompts=len(prompts)) as router:

                def callback(pipe_, step, timestep, kwargs):
                    return keep_latents(pipe_, step, timestep, kwargs, router.callback(pipe_, step, timestep, kwargs))

                images = family.run(pipe, args, callback)
    # once NaN or infinite, the latents stay so to the end (every step adds to them): one read after the loop,
    # nothing added to each step
    if not bool(torch.isfinite(final["latents"]).all()):
        cause = f"guidance {options.guidance:g}" if options.guidance > 1 else "no guidance"
        raise NonFiniteError(f"the latents became NaN or infinite in the {options.steps} steps ({cause}): a setting "
                             "overflowed the model's numbers (a guidance scale or an edit's factor too large for "
                             "them); lower it")
    return Generation([_rgb(image) for image in images], final["latents"].detach(), latent, options)
