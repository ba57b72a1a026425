"""Real images: DDIM inversion and null-text inversion (Mokady et al. 2022), saved to one file and edited from.

Methods:
- `ddim`: deterministic DDIM inversion under the caption; sampling back uses the plain unconditional embedding.
- `null-text` (default): after DDIM inversion, optimise the unconditional embedding step by step so that guided
  sampling retraces the inversion trajectory. Defaults from the authors' notebook: 50 DDIM steps, guidance 7.5,
  10 inner Adam steps per timestep with learning rate 1e-2 * (1 - i/100), early stop once the loss is below
  1e-5 + i * 2e-5.
- `negative-prompt` (Miyake et al. 2023): no optimisation; the caption's embedding stands in for the null one, so guided
  sampling reduces to the conditional prediction that DDIM inversion used.

Sampling from an inversion needs the same DDIM schedule and guidance; `generate(..., uncond=inversion.uncond)` swaps
the per-step unconditional embeddings in through the pipeline's step callback.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from .errors import InputError, ModelError
from .generation import native_size

METHODS = ("null-text", "ddim", "negative-prompt")


@dataclass(frozen=True)
class InversionOptions:
    method: str = "null-text"  # null-text, ddim or negative-prompt
    steps: int = 50  # DDIM steps
    guidance: float = 7.5  # guidance scale sampling will use
    inner_steps: int = 10  # null-text: Adam steps per timestep at most
    lr: float = 1e-2  # null-text: learning rate at the first timestep, times (1 - i/100) at the i-th
    early_stop: float = 1e-5  # null-text: stop a timestep's optimisation once the loss < early_stop + i * 2e-5
    offsets: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels cut from the left, right, top, bottom before the crop


@dataclass
class Inversion:
    latent: torch.Tensor  # (1, channels, h, w): the noise that regenerates the image
    uncond: torch.Tensor  # (steps, tokens, width): the unconditional embedding for each sampling step
    prompt: str
    options: InversionOptions
    image: Image.Image  # the image as prepared (cropped, resized) for the model
    settings: dict = field(default_factory=dict)  # model, sizes, timings, final losses

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        meta = {"kind": "p2p_inversion", "prompt": self.prompt, "options": asdict(self.options),
                "settings": self.settings}
        tensors = {"latent": self.latent.float().cpu().contiguous(), "uncond": self.uncond.float().cpu().contiguous(),
                   "image": torch.from_numpy(np.array(self.image.convert("RGB"))).contiguous()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"p2p": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"no inversion file at {path}: expected the .safetensors file `p2p invert` writes")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("p2p", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise InputError(f"{path} is not a safetensors file: {e}") from e
        if meta.get("kind") != "p2p_inversion":
            raise InputError(f"{path} holds no prompt2prompt inversion")
        opts = meta["options"]
        opts["offsets"] = tuple(opts["offsets"])
        image = Image.fromarray(tensors["image"].numpy())
        return cls(tensors["latent"], tensors["uncond"], meta["prompt"], InversionOptions(**opts), image,
                   meta["settings"])


def prepare_image(image: str | Path | Image.Image, size: tuple[int, int],
                  offsets: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Image.Image:
    """Any image file or PIL image, any mode: offsets cut, centre-cropped to size's aspect, resized to size (h, w)."""
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"no image file at {path}")
        try:
            with Image.open(path) as im:
                image = ImageOps.exif_transpose(im)
                image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read {path} as an image ({e}); expected a PNG, JPEG or another image") from e
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image)
    image = image.convert("RGB")
    left, right, top, bottom = offsets
    w, h = image.size
    if left + right >= w or top + bottom >= h:
        raise InputError(f"offsets {offsets} leave nothing of a {w}x{h} image")
    image = image.crop((left, top, w - right, h - bottom))
    return ImageOps.fit(image, (size[1], size[0]), Image.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    arr = ((x[0].permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
    return Image.fromarray(arr)


@torch.no_grad()
def encode(pipe, image: Image.Image) -> torch.Tensor:
    x = image_to_tensor(image).to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode(pipe, latent: torch.Tensor) -> Image.Image:
    return tensor_to_image(pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample)


def autoencoder_reconstruction(pipe, image: Image.Image) -> Image.Image:
    """The best any inversion can do: the autoencoder's own reconstruction."""
    return decode(pipe, encode(pipe, image))


def psnr(a: Image.Image, b: Image.Image, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two images (optionally only where mask is true)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64) / 255
    y = np.asarray(b.convert("RGB"), dtype=np.float64) / 255
    err = (x - y) ** 2
    mse = err[mask].mean() if mask is not None else err.mean()
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def ensure_ddim(pipe) -> None:
    """Inversion and sampling from it assume deterministic DDIM: swap the pipeline's scheduler if it is another."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


class _DDIM:
    """Deterministic DDIM steps in both directions, for epsilon and v-prediction models."""

    def __init__(self, scheduler, steps: int):
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


def _embed(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0].to(pipe.unet.dtype)  # (1, tokens, width)


def invert(pipe, image, prompt: str, options: InversionOptions = InversionOptions(), progress: bool = True,
           model: str = "") -> Inversion:
    """Invert an image (path or PIL) under its caption; see the module docstring for the methods."""
    import time

    if options.method not in METHODS:
        raise InputError(f"unknown inversion method {options.method!r}: expected one of {', '.join(METHODS)}")
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ModelError("inversion supports SD 1.x and 2.x pipelines; SDXL is not supported yet")
    ensure_ddim(pipe)
    start = time.perf_counter()
    prepared = prepare_image(image, native_size(pipe), options.offsets)
    ddim = _DDIM(pipe.scheduler, options.steps)
    unet = pipe.unet
    cond, null = _embed(pipe, prompt), _embed(pipe, "")
    latent = encode(pipe, prepared)
    trajectory = [latent]
    with torch.no_grad():
        for t in tqdm(ddim.timesteps.flip(0), desc="DDIM inversion", disable=not progress, leave=False):
            out = unet(latent, t, encoder_hidden_states=cond).sample
            latent = ddim.next(out, t, latent)
            trajectory.append(latent)
    losses: list[tuple[float, float]] = []  # null-text: per step, the loss before and after optimising
    if options.method == "ddim":
        uncond = null.expand(options.steps, -1, -1).clone()
    elif options.method == "negative-prompt":
        uncond = cond.expand(options.steps, -1, -1).clone()
    else:
        uncond, losses = _null_text(pipe, ddim, trajectory, cond, null, options, progress)
    settings = {"model": str(model), "size": list(prepared.size), "seconds": time.perf_counter() - start,
                "losses": losses, "scaling_factor": float(pipe.vae.config.scaling_factor)}
    return Inversion(trajectory[-1].detach().cpu(), uncond.detach().cpu(), prompt, options, prepared, settings)


def _null_text(pipe, ddim: _DDIM, trajectory, cond, null, options: InversionOptions, progress: bool):
    unet = pipe.unet
    trainable = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)  # gradients flow to the embedding only
    try:
        return _optimise(unet, ddim, trajectory, cond, null, options, progress)
    finally:
        for p, flag in zip(unet.parameters(), trainable):
            p.requires_grad_(flag)


def _optimise(unet, ddim: _DDIM, trajectory, cond, null, options: InversionOptions, progress: bool):
    g = options.guidance
    uncond = null.clone()
    per_step, losses = [], []
    current = trajectory[-1]
    bar = tqdm(list(enumerate(ddim.timesteps)), desc="null-text optimisation", disable=not progress, leave=False)
    for i, t in bar:
        target = trajectory[len(trajectory) - i - 2]
        with torch.no_grad():
            out_cond = unet(current, t, encoder_hidden_states=cond).sample
        # a fresh leaf each timestep: Adam updates it in place, and the embeddings kept for earlier steps must not move
        uncond = uncond.detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=options.lr * (1.0 - i / 100.0))
        loss_value = first = float("nan")
        for j in range(options.inner_steps):
            out_uncond = unet(current, t, encoder_hidden_states=uncond.to(unet.dtype)).sample
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
            both = unet(torch.cat([current, current]), t,
                        encoder_hidden_states=torch.cat([uncond.to(unet.dtype), cond])).sample
            out_uncond, out_cond = both.chunk(2)  # (1, channels, h, w) each
            guided = out_uncond + g * (out_cond - out_uncond)
            current = ddim.prev(guided, t, current)
            loss_value = F.mse_loss(current.float(), target.float()).item()
        losses.append((first, loss_value))
        bar.set_postfix(loss=f"{loss_value:.2e}")
        uncond = uncond.detach().to(unet.dtype)
        per_step.append(uncond[0].clone())
    return torch.stack(per_step), losses
