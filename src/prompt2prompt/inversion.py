"""Real images: DDIM inversion and null-text inversion (Mokady et al. 2022), rectified-flow inversion (`flow.py`),
saved to one file and edited from.

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

Sampling from an inversion needs the same DDIM schedule and guidance; `generate(..., uncond=inversion.uncond)` swaps
the per-step unconditional embeddings in through the pipeline's step callback.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .errors import InputError, ModelError, PromptError
from .families import FAMILIES, family_of
from .flow import FLOW_METHODS, is_flow
from .generation import check_size, check_steps, image_size_for, size_multiple
from .images import prepare_image
from .loading import execution_device
from .metrics import psnr  # noqa: F401  (re-exported: inversion.psnr is public)
from .numbers import MAX_STEPS, check_finite, check_whole
from .routing import exclusive

DDIM_METHODS = ("null-text", "ddim", "negative-prompt", "direct")
DDIM_GUIDANCE = 7.5  # the default guidance of DDIM-family inversions: the null-text notebook's
METHODS = ("auto", *DDIM_METHODS, *FLOW_METHODS)


@dataclass(frozen=True)
class InversionOptions:
    method: str = "auto"  # null-text, ddim, negative-prompt, direct (DDPM-type models); fireflow, euler (flow models);
    # auto: null-text or fireflow, by the model
    steps: int = 50  # DDIM or flow steps
    guidance: float | None = None  # guidance scale sampling will use; None: the method family's (DDIM_GUIDANCE,
    # flow.INVERSION_GUIDANCE)
    inner_steps: int = 10  # null-text: Adam steps per timestep at most
    lr: float = 1e-2  # null-text: learning rate at the first timestep, times (1 - i/100) at the i-th
    early_stop: float = 1e-5  # null-text: stop a timestep's optimisation once the loss < early_stop + i * 2e-5
    offsets: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels cut from the left, right, top, bottom before the crop
    height: int | None = None  # pixels to invert at; None: the model's native size
    width: int | None = None
    max_sequence_length: int | None = None  # MM-DiT: T5 tokens of the caption; None: the pipeline's default

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown inversion method {self.method!r}: expected one of {', '.join(METHODS)}")
        check_whole(self.steps, "steps", 1, MAX_STEPS)
        check_whole(self.inner_steps, "inner steps", 1)
        if self.guidance is not None:
            check_finite(self.guidance, "guidance", 0)
        if self.method == "null-text" and self.guidance is not None and self.guidance <= 1:
            raise InputError(f"null-text inversion optimises the unconditional embedding, which only matters with "
                             f"classifier-free guidance: expected guidance > 1, got {self.guidance!r}")
        check_finite(self.lr, "lr", 0, open_low=True)
        check_finite(self.early_stop, "early_stop", 0)
        if len(self.offsets) != 4 or any(not isinstance(v, int) or v < 0 for v in self.offsets):
            raise InputError(f"offsets must be four whole numbers >= 0 (left, right, top, bottom), got {self.offsets}")
        for name, unit in (("height", "pixels"), ("width", "pixels"), ("max_sequence_length", "tokens")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name.replace('_', ' ')} must be a positive number of {unit}, got {value!r}")
        check_size(self.height, self.width)


@dataclass
class Inversion:
    latent: torch.Tensor  # (1, channels, h, w): the noise that regenerates the image
    uncond: torch.Tensor  # (steps, tokens, width): the unconditional embedding for each sampling step
    prompt: str
    options: InversionOptions
    image: Image.Image  # the image as prepared (cropped, resized) for the model
    settings: dict = field(default_factory=dict)  # model, sizes, timings, final losses
    path: torch.Tensor | None = None  # direct: (steps, channels, h, w) the latent after each sampling step
    uncond_pooled: torch.Tensor | None = None  # SDXL: (1, width) the pooled embedding of the unconditional rows

    def _repr_png_(self) -> bytes:
        from .display import pair_picture, png

        return png(pair_picture([self.image], [self.prompt], f"{self.options.method} inversion"))

    def __repr__(self) -> str:
        size = f"{self.image.width}x{self.image.height}"
        return (f"Inversion({self.prompt!r}, {self.options.method}, {self.options.steps} steps, guidance "
                f"{self.options.guidance}, {size}, model {self.settings.get('model')!r})")

    def to_bytes(self) -> bytes:
        """The inversion as one safetensors file's bytes (tensors float32 on the CPU; metadata as JSON)."""
        from safetensors.torch import save

        meta = {"kind": KIND, "prompt": self.prompt, "options": asdict(self.options), "settings": self.settings}
        tensors = {"latent": self.latent.float().cpu().contiguous(), "uncond": self.uncond.float().cpu().contiguous(),
                   "image": torch.from_numpy(np.array(self.image.convert("RGB"))).contiguous()}
        for name in ("path", "uncond_pooled"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).float().cpu().contiguous()
        return save(tensors, metadata={"p2p": json.dumps(meta)})

    def save(self, path: str | Path) -> Path:
        """Write to path (".safetensors" added if missing): a missing folder is created; an existing file is replaced
        only if it is an inversion file (`is_inversion_file`); written whole or not at all (`outputs.staged_file`)."""
        from .outputs import check_output_file, staged_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        check_output_file(path, owned=is_inversion_file, what="the inversion file")
        with staged_file(path) as f:
            f.write(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        """Read an inversion file, every field and shape checked (`check_file`) before it is used."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"no inversion file at {path}: expected the .safetensors file `p2p invert` writes")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("p2p", "{}")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise InputError(f"{path} is not a safetensors file ({type(e).__name__}: {e}); expected the file "
                             "`p2p invert` writes") from None
        try:
            meta = json.loads(raw)
        except ValueError:
            raise InputError(f"{path}: its p2p metadata is not JSON; expected the file `p2p invert` writes") from None
        return check_file(meta, tensors, path)


KIND = "p2p_inversion"  # the metadata "kind" of an inversion file


def is_inversion_file(path: Path) -> bool:
    """Whether a file is an inversion file this tool wrote (its safetensors metadata), read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("p2p", "{}")).get("kind") == KIND
    except Exception:
        return False


_OPTION_FIELDS = tuple(f.name for f in fields(InversionOptions))


def check_file(meta, tensors: dict, path: Path) -> Inversion:
    """An `Inversion` from a file's metadata and tensors, each checked (types, option values, tensor dtypes and
    shapes, and that they agree with each other), or one sentence saying what is wrong."""
    def bad(what: str) -> InputError:
        return InputError(f"{path} is not a usable inversion file: {what}")

    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise InputError(f"{path} holds no prompt2prompt inversion (no p2p metadata of kind {KIND!r})")
    prompt, opts, settings = meta.get("prompt"), meta.get("options"), meta.get("settings", {})
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad(f"expected its caption (prompt) as text, got {prompt!r}")
    if not isinstance(opts, dict):
        raise bad(f"expected its options as a mapping, got {type(opts).__name__}")
    unknown = sorted(set(opts) - set(_OPTION_FIELDS))
    if unknown:
        raise bad(f"unknown option(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(_OPTION_FIELDS)}")
    if not isinstance(settings, dict):
        raise bad(f"expected its settings as a mapping, got {type(settings).__name__}")
    opts = dict(opts)
    offsets = opts.get("offsets", (0, 0, 0, 0))
    if not isinstance(offsets, (list, tuple)):
        raise bad(f"expected offsets as four whole numbers, got {offsets!r}")
    opts["offsets"] = tuple(offsets)
    try:
        options = InversionOptions(**opts)
    except (InputError, TypeError) as e:
        raise bad(str(e)) from None
    if options.method == "auto" or options.guidance is None:
        raise bad(f"expected the method and guidance it was made with, got method {options.method!r} and guidance "
                  f"{options.guidance!r}")
    missing = {"latent", "uncond", "image"} - set(tensors)
    if missing:
        raise bad(f"it lacks the tensor(s) {', '.join(sorted(missing))}")

    def tensor(name: str, ndim: int, floating: bool = True) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            return None
        if t.ndim != ndim or (floating and not t.is_floating_point()) or (not floating and t.dtype != torch.uint8):
            raise bad(f"tensor {name!r} is {t.dtype} with shape {tuple(t.shape)}; expected {ndim} dimensions of "
                      f"{'floats' if floating else 'uint8 pixels'}")
        if floating and not torch.isfinite(t).all():
            raise bad(f"tensor {name!r} holds non-finite values")
        return t

    flow = options.method in FLOW_METHODS
    if flow and tensors["uncond"].numel() == 0:
        tensors = {**tensors, "uncond": tensors["uncond"].reshape(0, 0, 0)}  # flow inversions keep no null text
    latent, uncond, path_t, pooled = tensor("latent", 4), tensor("uncond", 3), tensor("path", 4), \
        tensor("uncond_pooled", 2)
    image = tensor("image", 3, floating=False)
    if latent.shape[0] != 1:
        raise bad(f"tensor 'latent' has shape {tuple(latent.shape)}; expected one image (1, channels, h, w)")
    if image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise bad(f"tensor 'image' has shape {tuple(image.shape)}; expected (height, width, 3) RGB pixels")
    if not flow and uncond.shape[0] != options.steps:
        raise bad(f"tensor 'uncond' has {uncond.shape[0]} steps; expected one per step ({options.steps})")
    if options.method == "direct" and path_t is None:
        raise bad("a direct inversion needs its latent path (tensor 'path')")
    if path_t is not None and (path_t.shape[0] != options.steps or path_t.shape[1:] != latent.shape[1:]):
        raise bad(f"tensor 'path' has shape {tuple(path_t.shape)}; expected ({options.steps}, "
                  f"{', '.join(map(str, latent.shape[1:]))})")
    return Inversion(latent, uncond, prompt, options, Image.fromarray(image.numpy()), settings, path_t, pooled)


def image_to_tensor(pipe, image: Image.Image) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1], by the pipeline's own image processor."""
    return pipe.image_processor.preprocess(image, height=image.height, width=image.width)


def tensor_to_image(pipe, x: torch.Tensor) -> Image.Image:
    return pipe.image_processor.postprocess(x.float().cpu(), output_type="pil")[0]


def _codec(pipe):
    """The family's latent codec and layouts (`families/latents.py`); DDIM-family models use the generic one."""
    from .families.latents import FlowLatents

    return family_of(pipe).latents or FlowLatents


@torch.no_grad()
def encode(pipe, image: Image.Image) -> torch.Tensor:
    """The image's latent as the pipeline's denoiser sees it, in the image layout (1, channels, h, w): SD's
    (mean - shift_factor) * scaling_factor, or the family's own codec."""
    x = image_to_tensor(pipe, image).to(execution_device(pipe), pipe.vae.dtype)
    return _codec(pipe).encode(pipe, x)


@torch.no_grad()
def decode(pipe, latent: torch.Tensor) -> Image.Image:
    return tensor_to_image(pipe, _codec(pipe).decode(pipe, latent))


def pack(pipe, latent: torch.Tensor) -> torch.Tensor:
    """Latents (n, channels, h, w) in the layout the pipeline's loop holds them (Flux's packed token sequence)."""
    return _codec(pipe).pack(pipe, latent)


def unpack(pipe, latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`pack` undone for an image of size (width, height) in pixels."""
    cell = _codec(pipe).cell(pipe)
    return _codec(pipe).unpack(pipe, latent, (size[1] // cell, size[0] // cell))


def autoencoder_reconstruction(pipe, image: Image.Image) -> Image.Image:
    """The best any inversion can do: the autoencoder's own reconstruction."""
    return decode(pipe, encode(pipe, image))


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


def inversion_model(inversion: Inversion) -> str:
    """The model an inversion was made with, as its file records it (a bundled name, a folder, a hub id): the model
    an edit from it uses unless told otherwise. A file that names none, or a folder that is not here, is refused."""
    recorded = inversion.settings.get("model")
    if not isinstance(recorded, str) or not recorded:
        raise InputError("the inversion file does not record the model it was made with: pass --model, the model "
                         "it was inverted with")
    from .loading import BUNDLED

    path = Path(recorded).expanduser()
    if recorded not in BUNDLED and (path.is_absolute() or recorded.startswith((".", "~"))) and not path.is_dir():
        raise InputError(f"the inversion was made with the model folder {recorded}, which is not there now: pass "
                         "--model FOLDER, the same model elsewhere")
    return recorded


def check_inversion(pipe, inversion: Inversion, source: str | None = None) -> None:
    """An inversion fits this source caption (if given) and this pipeline (latent channels, text length and width;
    pipe None: the caption only, before any model is loaded)."""
    if source is not None and inversion.prompt.strip() != source.strip():
        raise PromptError(f"the inversion was made with the caption {inversion.prompt!r}; pass that caption as "
                          f"the source prompt (got {source!r})")
    if pipe is None:
        return
    recorded = inversion.settings.get("model") or "the model it was made with"
    flow = inversion.options.method in FLOW_METHODS
    if flow != is_flow(pipe):
        kind = "a flow-matching model (SD3, Flux, shapes-flow)" if flow else "a DDPM-type model (SD 1.x / 2.x, shapes)"
        raise InputError(f"the inversion ({inversion.options.method}) was made with {kind}, {recorded!r}; "
                         f"this pipeline is not one: pass --model {recorded}")
    family = family_of(pipe)
    if not family.invertible:
        raise ModelError(f"editing from an inversion is not supported on {family.title} yet")
    named = inversion.settings.get("family")  # files from before the family was recorded: not checked
    made = FAMILIES.get(named) if isinstance(named, str) else None
    if made is not None and made is not family:
        raise InputError(f"the inversion was made with a {made.title} pipeline, {recorded!r}; this pipeline is "
                         f"{family.title}: pass --model {recorded}")
    if family_of(pipe).added_conditions != (inversion.uncond_pooled is not None):
        made = "an SDXL" if inversion.uncond_pooled is not None else "a one-text-encoder (SD 1.x / 2.x)"
        raise InputError(f"the inversion was made with {made} pipeline, {recorded!r}: pass --model {recorded}")
    channels = _codec(pipe).channels(pipe) if flow else pipe.unet.config.in_channels
    factor, multiple = _codec(pipe).cell(pipe), size_multiple(pipe)
    side = tuple(int(n) * factor for n in inversion.latent.shape[2:])
    if side != (inversion.image.height, inversion.image.width) or side[0] % multiple or side[1] % multiple:
        raise InputError(f"the inversion's latent {tuple(inversion.latent.shape)} does not fit its "
                         f"{inversion.image.width}x{inversion.image.height} image on this model (latent sides times "
                         f"{factor}, multiples of {multiple} pixels): the file was changed or made for another model "
                         f"({recorded!r})")
    if flow:
        if inversion.latent.shape[1] != channels:
            raise InputError(f"the inversion was made with the model {recorded!r} (latent channels "
                             f"{inversion.latent.shape[1]}); this pipeline has {channels}: pass --model {recorded}")
        return
    tokens, width = pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim
    path = inversion.path
    if path is not None and (path.shape[0] != inversion.options.steps or path.shape[1:] != inversion.latent.shape[1:]):
        raise InputError(f"the inversion's latent path has shape {tuple(path.shape)}; expected "
                         f"({inversion.options.steps}, {', '.join(map(str, inversion.latent.shape[1:]))})")
    if inversion.latent.shape[1] != channels or tuple(inversion.uncond.shape[1:]) != (tokens, width):
        raise InputError(
            f"the inversion was made with the model {recorded!r} (latent channels {inversion.latent.shape[1]}, text "
            f"{tuple(inversion.uncond.shape[1:])}); this pipeline has {channels} channels and text ({tokens}, "
            f"{width}): pass --model {recorded}")


def sampler(pipe, inversion: Inversion):
    """A context manager in which the pipeline samples as the inversion needs: DDIM, or the flow method's solver."""
    if inversion.options.method in FLOW_METHODS:
        from .flow import flow_scheduler

        return flow_scheduler(pipe, inversion.options.method)
    return ddim_scheduler(pipe)


def sampling_kwargs(inversion: Inversion, pipe=None) -> dict:
    """What `generate` needs to sample from the inversion: its latent (in the layout the pipeline's `latents=` takes:
    give the pipe), per-step unconditional embeddings (DDIM methods; flow inversions use the plain empty caption, as
    their inversion did) and, for `direct`, the latent path the source prompt is pinned to."""
    uncond = None if inversion.options.method in FLOW_METHODS else inversion.uncond
    latent = inversion.latent if pipe is None else _codec(pipe).input(pipe, inversion.latent)
    return {"latent": latent, "uncond": uncond, "uncond_pooled": inversion.uncond_pooled,
            "path": inversion.path}


def sampling_options(inversion: Inversion, generation=None):
    """The generation options of sampling from the inversion: its steps, guidance and text length over `generation`'s
    (size, seed and the rest; the seed does not matter, the latent is the inversion's)."""
    from .generation import GenerationOptions

    return replace(generation or GenerationOptions(), steps=inversion.options.steps,
                   guidance=inversion.options.guidance, max_sequence_length=inversion.options.max_sequence_length,
                   height=inversion.image.height, width=inversion.image.width)


def sample_back(pipe, inversion: Inversion, prompts: list[str] | str | None = None, controller=None,
                generation=None, progress: bool = True, **pipe_kwargs):
    """Sample from an inversion as it was made (its sampler, latent, per-step unconditional embeddings, steps,
    guidance and text length): its caption alone (default) gives the reconstruction; with the edited prompts and a
    controller, an edit. Returns the `generation.Generation`."""
    from .generation import generate

    prompts = [inversion.prompt] if prompts is None else prompts
    with sampler(pipe, inversion):
        return generate(pipe, prompts, controller, sampling_options(inversion, generation), progress=progress,
                        **sampling_kwargs(inversion, pipe), **pipe_kwargs)


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
        from .flow import INVERSION_GUIDANCE

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
        from .flow import invert_flow, velocity

        with exclusive(pipe):
            latent = encode(pipe, prepared)  # (1, channels, h, w)
            shape = tuple(latent.shape)
            v = velocity(pipe, prompt, options.guidance, options.max_sequence_length, shape)
            noise = invert_flow(pipe, pack(pipe, latent), v, options.steps, options.method, progress, shape)
            noise = unpack(pipe, noise, prepared.size)  # kept in the image layout whatever the pipeline's loop holds
        uncond, path, pooled = torch.zeros(0, 0, 0), None, None  # sampling uses the empty caption, as the inversion did
    else:
        noise, uncond, losses, path, pooled = _ddim_family(pipe, prepared, prompt, options, progress)
    from .loading import model_name

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
