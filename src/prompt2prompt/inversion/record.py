"""The inversion file: an `Inversion` (the noise that regenerates the image, the per-step unconditional embeddings,
the caption, the `InversionOptions` it was made with, the image as prepared, the settings) written as one
safetensors file and read back with every field and shape checked; and the checks that an inversion fits a source
caption and a pipeline before an edit samples from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, ModelError, PromptError
from ..families import FAMILIES, family_of
from ..flow import FLOW_METHODS, is_flow
from ..generation import check_size, size_multiple
from ..numbers import MAX_STEPS, check_finite, check_whole
from .codec import _codec

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
        from ..display import pair_picture, png

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
        from ..outputs import check_output_file, staged_file

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


def inversion_model(inversion: Inversion) -> str:
    """The model an inversion was made with, as its file records it (a bundled name, a folder, a hub id): the model
    an edit from it uses unless told otherwise. A file that names none, or a folder that is not here, is refused."""
    recorded = inversion.settings.get("model")
    if not isinstance(recorded, str) or not recorded:
        raise InputError("the inversion file does not record the model it was made with: pass --model, the model "
                         "it was inverted with")
    from ..loading import BUNDLED

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
