"""Inverting a real image (`invert`), and the DDIM-family methods.

Methods for DDPM-type models (SD 1.x, 2.x, the bundled `shapes`):
- `ddim`: deterministic DDIM inversion under the caption; sampling back uses the plain unconditional embedding.
- `null-text` (default): after DDIM inversion, optimise the unconditional embedding step by step so that guided
  sampling retraces the inversion trajectory. Defaults from the authors' notebook (null_text_w_ptp.ipynb): 50 DDIM
  steps, guidance 7.5, 10 inner Adam steps per timestep with learning rate 1e-2 * (1 - i/100) at the i-th, early stop
  once the loss is below 1e-5 + i * 2e-5. The notebook's decay is written for 50 steps; here it is
  1 - i / (2 * steps), the same at 50 steps and never negative at more than 100.
- `negative-prompt` (Miyake et al. 2023): no optimisation; the caption's embedding stands in for the null one, so guided
  sampling reduces to the conditional prediction that DDIM inversion used.
- `direct` (Ju et al. 2023, "PnP Inversion"): no optimisation; the DDIM inversion's whole latent path is kept, and
  sampling pins the source prompt's latents to it after every step (`generation.SourcePath`), so the source is
  reconstructed exactly (up to the autoencoder) while edited prompts run free under plain guidance, with the source's
  attention injected. The paper adds each step's difference (path minus the source's own step) to the source's latents;
  setting them to the path is that sum without its rounding.

Methods for flow-matching models (SD3 / SD3.5, Flux.1, the bundled `shapes-flow`): `fireflow` (default; second
order, one model call a step), `rf-solver` (second order, two calls a step), `euler`; see `flow.py`. `auto` picks
null-text or fireflow by the model. Which families invert: `Family.invertible` (the `p2p invert` help lists them).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..errors import InputError, ModelError, PromptError
from ..families import family_of
from ..flow import FLOW_METHODS, is_flow
from ..generation import check_steps, image_size_for
from ..images import prepare_image
from ..routing import exclusive, execution_device
from .codec import encode, pack, unpack
from .record import DDIM_GUIDANCE, DDIM_METHODS, Inversion, InversionOptions


@contextmanager
def ddim_scheduler(pipe):
    """Inversion, and sampling from it, assume deterministic DDIM: the pipeline runs with a DDIM scheduler made from
    its own scheduler's config inside the block, and gets its own scheduler back afterwards."""
    from diffusers import DDIMScheduler

    original = pipe.scheduler
    if not isinstance(original, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


class _DDIM:
    """Deterministic DDIM steps in both directions, for epsilon and v-prediction models."""

    def __init__(self, scheduler, steps: int):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler.config)  # its own copy: the pipeline's is not touched
        scheduler.set_timesteps(steps)
        self.timesteps = scheduler.timesteps  # descending
        self.alphas = scheduler.alphas_cumprod
        self.final = scheduler.final_alpha_cumprod
        self.stride = scheduler.config.num_train_timesteps // steps
        self.prediction = scheduler.config.prediction_type

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas[t] if t >= 0 else self.final

    def split(self, output, a, sample):
        """(eps, x0) from the model output, with a the cumulative alpha of sample's noise level."""
        if self.prediction == "v_prediction":
            return a**0.5 * output + (1 - a) ** 0.5 * sample, a**0.5 * sample - (1 - a) ** 0.5 * output
        return output, (sample - (1 - a) ** 0.5 * output) / a**0.5

    def prev(self, output, t, sample):
        """x_t -> x_{t - stride} (what DDIMScheduler.step does with eta=0)."""
        eps, x0 = self.split(output, self.alpha(int(t)), sample)
        a_prev = self.alpha(int(t) - self.stride)
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def next(self, output, t, sample):
        """x_{t - stride} -> x_t, with the model output evaluated at t (the inversion's approximation)."""
        eps, x0 = self.split(output, self.alpha(int(t) - self.stride), sample)
        a_next = self.alpha(int(t))
        return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


class _Text:
    """The caption's and the pipeline's own unconditional conditioning, as the UNet takes them, from the pipeline's
    `encode_prompt` (SDXL: both encoders' tokens side by side, the pooled embedding and the added time ids, with the
    pipeline's zeros for the empty prompt where its config asks for them).

    Null-text inversion on SDXL learns the unconditional token embeddings (77 x 2048) only, as the paper does for SD;
    the unconditional pooled embedding stays the pipeline's own: it enters through the time embedding, outside
    attention, and one vector shared by every step could not follow a per-step path anyway."""

    def __init__(self, pipe, prompt: str, size: tuple[int, int]):
        self.unet = pipe.unet
        device = self.device = execution_device(pipe)
        with torch.no_grad(), exclusive(pipe):  # the pipeline's lock: its tokenizers are not shared by threads
            if family_of(pipe).added_conditions:  # SDXL: the second encoder's pooled embedding and the added conditions
                self.cond, self.null, self.pooled, self.null_pooled = pipe.encode_prompt(
                    prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
                # the pipeline's default added conditions: original size = target size = the image's, no crop
                self.time_ids = torch.tensor([[*size, 0, 0, *size]], device=device, dtype=self.cond.dtype)
            else:
                self.cond, self.null = pipe.encode_prompt(prompt, device, 1, True)  # (1, tokens, width) each
                self.pooled = self.null_pooled = self.time_ids = None
        self.cond, self.null = self.cond.to(self.unet.dtype), self.null.to(self.unet.dtype)

    def __call__(self, latent: torch.Tensor, t, embeds: torch.Tensor, pooled: torch.Tensor | None = None):
        """The UNet's output for latent (batch, channels, h, w) under embeds (batch, tokens, width); pooled (batch,
        width) on SDXL (default: the caption's)."""
        kwargs = {}
        if self.time_ids is not None:
            pooled = self.pooled.expand(latent.shape[0], -1) if pooled is None else pooled
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.unet.dtype),
                                           "time_ids": self.time_ids.expand(latent.shape[0], -1)}
        return self.unet(latent, t, encoder_hidden_states=embeds, **kwargs).sample

    def pair(self, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch [unconditional, conditional], as the pipeline runs it: (embeds, pooled or None)."""
        embeds = torch.cat([uncond.to(self.unet.dtype), self.cond])
        return embeds, None if self.pooled is None else torch.cat([self.null_pooled, self.pooled])


def invert(pipe, image, prompt: str, options: InversionOptions = InversionOptions(), progress: bool = True,
           model: str = "") -> Inversion:
    """Invert an image (path or PIL) under its caption; see the module docstring for the methods."""
    if not family_of(pipe).invertible:
        raise ModelError(f"inversion is not supported on {family_of(pipe).title} yet")
    if not prompt.strip():
        raise PromptError("expected a caption of the image, got an empty one")
    flow = is_flow(pipe)
    if options.method == "auto":
        options = replace(options, method="fireflow" if flow else "null-text")
    if options.guidance is None:
        from ..flow import INVERSION_GUIDANCE

        options = replace(options, guidance=INVERSION_GUIDANCE if options.method in FLOW_METHODS else DDIM_GUIDANCE)
    if (options.method in FLOW_METHODS) != flow:
        expected = FLOW_METHODS if flow else DDIM_METHODS
        raise InputError(f"the {options.method} inversion does not apply to this "
                         f"{'flow-matching' if flow else 'DDPM-type'} model: expected one of {', '.join(expected)}")
    check_steps(pipe, options.steps)
    size = image_size_for(pipe, options.height, options.width)
    notes: list[str] = []
    prepared = prepare_image(image, size, options.offsets, notes)
    start = time.perf_counter()
    losses: list[tuple[float, float]] = []  # null-text: per step, the loss before and after optimising
    if flow:
        from ..flow import invert_flow, velocity

        with exclusive(pipe):
            latent = encode(pipe, prepared)  # (1, channels, h, w)
            shape = tuple(latent.shape)
            v = velocity(pipe, prompt, options.guidance, options.max_sequence_length, shape)
            noise = invert_flow(pipe, pack(pipe, latent), v, options.steps, options.method, progress, shape)
            noise = unpack(pipe, noise, prepared.size)  # kept in the image layout whatever the pipeline's loop holds
        uncond, path, pooled = torch.zeros(0, 0, 0), None, None  # sampling uses the empty caption, as the inversion did
    else:
        noise, uncond, losses, path, pooled = _ddim_family(pipe, prepared, prompt, options, progress)
    from ..loading import model_name

    settings = {"model": model_name(pipe, model), "family": family_of(pipe).name, "size": list(prepared.size),
                "seconds": time.perf_counter() - start,
                "losses": losses, "scaling_factor": pipe.vae.config.get("scaling_factor"), "conversions": notes}
    return Inversion(noise.detach().cpu(), uncond.detach().cpu(), prompt, options, prepared, settings,
                     None if path is None else path.detach().cpu(), None if pooled is None else pooled.detach().cpu())


def _ddim_family(pipe, prepared: Image.Image, prompt: str, options: InversionOptions, progress: bool):
    """DDIM inversion, then the method's unconditional embeddings: (noise, uncond (steps, tokens, width), losses,
    path (steps, channels, h, w) for `direct` else None, the unconditional pooled embedding (1, width) on SDXL else
    None)."""
    losses: list[tuple[float, float]] = []
    with exclusive(pipe):
        ddim = _DDIM(pipe.scheduler, options.steps)
        text = _Text(pipe, prompt, (prepared.height, prepared.width))
        latent = encode(pipe, prepared)
        trajectory = [latent]
        with torch.no_grad():
            for t in tqdm(ddim.timesteps.flip(0), desc="DDIM inversion", disable=not progress, leave=False):
                latent = ddim.next(text(latent, t, text.cond), t, latent)
                trajectory.append(latent)
        path, pooled = None, text.null_pooled
        if options.method in ("ddim", "direct"):
            uncond = text.null.expand(options.steps, -1, -1).clone()
            if options.method == "direct":  # in sampling order: the latent after sampling step i
                path = torch.cat(trajectory[-2::-1])  # (steps, channels, h, w)
        elif options.method == "negative-prompt":  # the caption in the unconditional rows: guidance cancels
            uncond, pooled = text.cond.expand(options.steps, -1, -1).clone(), text.pooled
        else:
            uncond, losses = _null_text(pipe, ddim, trajectory, text, options, progress)
    return trajectory[-1], uncond, losses, path, pooled


def _null_text(pipe, ddim: _DDIM, trajectory, text: _Text, options: InversionOptions, progress: bool):
    unet = pipe.unet
    trainable = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)  # gradients flow to the embedding only; one step's graph at a time
    try:
        return _optimise(ddim, trajectory, text, options, progress)
    finally:
        for p, flag in zip(unet.parameters(), trainable):
            p.requires_grad_(flag)


def _optimise(ddim: _DDIM, trajectory, text: _Text, options: InversionOptions, progress: bool):
    g = options.guidance
    uncond = text.null.clone()
    per_step, losses = [], []
    current = trajectory[-1]
    bar = tqdm(list(enumerate(ddim.timesteps)), desc="null-text optimisation", disable=not progress, leave=False)
    for i, t in bar:
        target = trajectory[len(trajectory) - i - 2]
        with torch.no_grad():
            out_cond = text(current, t, text.cond)
        # a fresh leaf each timestep: Adam updates it in place, and the embeddings kept for earlier steps must not move
        uncond = uncond.detach().float().clone().requires_grad_(True)
        # the notebook's 1e-2 * (1 - i / 100) at 50 steps, scaled to the number of steps so it never turns negative
        opt = torch.optim.Adam([uncond], lr=options.lr * (1.0 - i / (2.0 * options.steps)))
        loss_value = first = float("nan")
        for j in range(options.inner_steps):
            out_uncond = text(current, t, uncond.to(text.unet.dtype), text.null_pooled)
            guided = out_uncond + g * (out_cond - out_uncond)
            loss = F.mse_loss(ddim.prev(guided, t, current).float(), target.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = loss.item()
            first = loss_value if j == 0 else first
            if loss_value < options.early_stop + i * 2e-5:
                break
        with torch.no_grad():
            # advance exactly as sampling will: one UNet batch [unconditional, conditional], as the pipeline runs it.
            # Guided sampling from an optimised embedding can be chaotic: on some images a batch-1 versus batch-2
            # rounding difference alone grows into a visibly different image by the last step.
            embeds, pooled = text.pair(uncond)
            out_uncond, out_cond = text(torch.cat([current, current]), t, embeds, pooled).chunk(2)  # (1, c, h, w)
            guided = out_uncond + g * (out_cond - out_uncond)
            current = ddim.prev(guided, t, current)
            loss_value = F.mse_loss(current.float(), target.float()).item()
        losses.append((first, loss_value))
        bar.set_postfix(loss=f"{loss_value:.2e}")
        uncond = uncond.detach().to(text.unet.dtype)
        per_step.append(uncond[0].clone())
    return torch.stack(per_step), losses
