"""What kind of model a pipeline holds, worked out once: one `Family` record per supported family.

Every module that behaves differently per model reads this record (`family_of(pipe)`) instead of probing the pipeline
itself: which attention installer routes its layers (UNet cross-attention or MM-DiT joint attention), how a joint
attention module's arguments become queries, keys and values and its sequence splits into text and image tokens, how
the image-token grid is read from the denoiser's call, which tokens of the text sequence are a prompt's words (a
chat template's offset, several encoders' parts), what initial noise the pipeline takes, how classifier-free guidance
is run (rows of one call, or one call per branch), whether it samples by flow matching or in the DDIM family, and how
its tiny pipeline is built for the tests. The record's methods are the generic behaviour; an adapter subclasses
`Family` and overrides what differs in its family.

Each family lives in its own adapter module in this package (`sd.py`, `sd3.py`, `flux.py`, `flux2.py`, ...), found
when the package is imported: adding a family is one adapter file (its `FAMILIES` records, its tiny pipeline;
`by_parts` where one pipeline or network class serves several families) and its tests. A pipeline
is recognised by its class (diffusers' own pipelines), else (a pipeline class no record names, e.g. an img2img
variant) by its adapters' `by_parts` or its denoising network's class, and a bare denoising network (training) by its
class. The record is computed once per object and kept while the object lives.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import weakref
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError


@dataclass(frozen=True)
class Family:
    """A family's facts (the fields) and its behaviour (the methods). The methods here are the generic behaviour,
    Stable Diffusion's; an adapter whose family differs subclasses `Family` and overrides what differs (a joint
    family always overrides `grid`, `project` and `finish`; a family the tests build overrides `tiny`)."""

    name: str  # "sd1", "sd2", "sdxl", "sd3", "flux", "flux2", ...
    title: str  # for people: "Stable Diffusion 1.x"
    denoiser: str  # "unet": cross-attention layers to the text; "joint": MM-DiT attention over text and image tokens
    pipelines: tuple[str, ...] = ()  # diffusers' pipeline classes of this family (loading accepts these)
    networks: tuple[str, ...] = ()  # its denoising network's classes (a bare network, in training)
    packed: bool = False  # the pipeline's latents are a sequence of grid tokens (Flux), not an image
    flow: bool = False  # samples by flow matching (SD3, Flux); else a DDIM-family sampler (epsilon or v)
    pooled: bool = False  # `encode_prompt` gives each prompt a pooled embedding beside its sequence (SDXL, SD3)
    added_conditions: bool = False  # the UNet takes that pooled embedding and size ids as added conditions (SDXL): a
    # DDIM-family inversion carries an unconditional pooled embedding
    default_part: str | None = None  # the part a word's map is read from by default; None: the only one
    processors: tuple[str, ...] = ()  # joint: diffusers' stock processor classes of its attention modules
    flowedit: tuple[int, int, float, float] | None = None  # FlowEdit's defaults (steps, n_max, source and target
    # guidance), from the paper's published settings (fallenshock/FlowEdit, SD3_exp.yaml / FLUX_exp.yaml; the other
    # flow families: `latents.CFG_FLOWEDIT`); None: n/a
    guidance_calls: bool = False  # classifier-free guidance runs the denoiser twice a step, the conditional call
    # first (Flux.2 klein, Qwen-Image); else the unconditional rows come first in one call's batch
    conditional_first: bool = False  # one call's batch holds the conditional rows first, then the unconditional
    # ones (Z-Image); else the unconditional rows come first (diffusers' SD, SD3 and Flux pipelines)
    batch_padded: bool = False  # the pipeline pads each call's texts to the longest of the batch (Qwen-Image): the
    # prompts of one generation share that length (`tokens.batch_tokens`)
    arguments: tuple[str, ...] = ("attn", "hidden_states", "encoder_hidden_states", "attention_mask",
                                  "image_rotary_emb")  # joint: the stock processors' arguments `project` understands
    scale: tuple[str, float] = ("guidance_scale", 0.0)  # the pipeline's argument for the guidance scale and what to
    # add to its value to get the usual scale (Z-Image's pos + g (pos - neg) is the usual g + 1): its default there is
    # the default guidance here
    concepts: type | None = None  # joint: the concept stream's adapter (`concepts.py`: encode, blocks, start, step);
    # None: no concept maps
    latents: type | None = None  # flow: the real-image side (`latents.FlowLatents` or a subclass: the latent codec
    # and layouts, the noise levels, one guided velocity call); None: no flow inversion, FlowEdit or image concepts

    tiny_side = 32  # the side, in pixels, of the tiny pipeline's images in the tests (8x8 image tokens); a class
    # attribute, not a field

    @property
    def joint(self) -> bool:
        return self.denoiser == "joint"

    @property
    def installed(self) -> bool:
        """The installed diffusers has this family's pipeline classes (a newer family needs a newer diffusers:
        Qwen-Image 2.1 0.42 or later)."""
        import diffusers

        return all(hasattr(diffusers, name) for name in self.pipelines)

    @property
    def invertible(self) -> bool:
        """Real images can be inverted and edited: DDIM-family methods, or flow methods through `latents`."""
        return not self.flow or self.latents is not None

    # -- loading, running and sizes ------------------------------------------------------------------------------
    def load(self, index: dict) -> dict:
        """(model_index.json as a dict) -> extra keyword arguments for `from_pretrained`."""
        return {}

    def from_folder(self, folder: Path, index: dict, dtype):
        """The pipeline saved in `folder` (its index file read as `index`), on the CPU: diffusers'
        `DiffusionPipeline.from_pretrained`, offline, with the processors transformers cannot build here stood in
        (`standins.py`) and the family's own loading arguments (`load`)."""
        from diffusers import DiffusionPipeline

        from ..standins import after_loading, stand_ins

        put_after, passed = stand_ins(folder, index)
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **self.load(index),
                                                 **dict.fromkeys(put_after), **passed)
        after_loading(pipe, index, put_after, passed)
        return pipe

    def defaults(self, pipe) -> tuple[int, float]:
        """(steps, guidance) the pipeline uses when its call names none: its `__call__`'s defaults, the guidance
        scale read from the argument the family guides with and put in the usual convention (`scale`)."""
        import inspect

        params = inspect.signature(type(pipe).__call__).parameters
        name, offset = self.scale
        steps = params["num_inference_steps"].default if "num_inference_steps" in params else 50
        scale = params[name].default if name in params else None
        return int(steps), float(scale if isinstance(scale, (int, float)) else 1.0) + offset

    def run(self, pipe, args: dict, callback) -> list:
        """One generation: the pipeline run with `args` (prompt, the guidance arguments of `guidance`,
        num_inference_steps and `sampling`'s, latents, generator, height, width, output_type,
        callback_on_step_end_tensor_inputs, the caller's extras), `callback(pipe, step, timestep, tensors) -> changed
        tensors` called after every step as diffusers' `callback_on_step_end` is; returns its images. A pipeline with
        that callback simply gets it (max_sequence_length only where its call takes one: Qwen-Image 2.1's does not);
        a family whose pipeline has none drives its loop's steps itself."""
        import inspect

        if "max_sequence_length" not in inspect.signature(type(pipe).__call__).parameters:
            args = {k: v for k, v in args.items() if k != "max_sequence_length"}
        return pipe(**args, callback_on_step_end=callback).images

    def size(self, pipe) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """((height, width) the pipeline draws by default, (height, width) the largest its denoiser can position, or
        None: no limit): the pipeline's default_sample_size or the denoiser's sample_size, times the autoencoder's
        factor."""
        from ..routing import denoiser

        sample = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
        factor = pipe.vae_scale_factor
        side = sample * factor if isinstance(sample, int) else None
        return ((side, side) if side else tuple(s * factor for s in sample)), None

    def multiple(self, pipe) -> int:
        """Image sides must be multiples of this: the autoencoder's factor times the patch (an MM-DiT; packed
        latents: 2x2 patches), or with 8 (diffusers' UNet pipelines check it)."""
        from ..routing import denoiser

        factor = int(pipe.vae_scale_factor)
        if self.packed:
            return factor * 2
        patch = getattr(denoiser(pipe).config, "patch_size", None)
        return factor * patch if patch else math.lcm(8, factor)

    # -- prompts and guidance ------------------------------------------------------------------------------------
    def tokens(self, pipe, prompt: str, max_sequence_length: int | None = None):
        """The prompt's `PromptTokens` (`tokens.py`) as the denoiser sees its text: every adapter says it."""
        raise NotImplementedError(f"the {self.title} adapter does not say how its prompts are tokenised")

    def guidance(self, scale: float, negative_prompt: str | None, prompts: int) -> dict:
        """The pipeline's guidance arguments: guidance_scale and negative_prompt, as SD's pipelines take them."""
        return {"guidance_scale": scale, **({"negative_prompt": [negative_prompt] * prompts} if negative_prompt else
                                            {})}

    def encode(self, pipe, prompts: list[str], negative_prompt: str | None, max_sequence_length: int | None,
               guided: bool) -> tuple:
        """(embeds, negative embeds, pooled, negative pooled) of the prompts by the pipeline's `encode_prompt`, every
        text encoder reading the same prompts (and negative prompt), as the pipeline does when only `prompt` is
        given: its `prompt_2`, `prompt_3`, ... are named from its own signature. A family with pooled embeddings."""
        import inspect
        import re

        from ..routing import execution_device

        names = inspect.signature(pipe.encode_prompt).parameters
        negative = [negative_prompt] * len(prompts) if negative_prompt else None
        texts = {k: list(prompts) for k in names if k == "prompt" or re.fullmatch(r"prompt_\d", k)}
        texts.update({k: negative for k in names if re.fullmatch(r"negative_prompt(_\d)?", k)})
        if "max_sequence_length" in names and max_sequence_length is not None:
            texts["max_sequence_length"] = max_sequence_length
        return pipe.encode_prompt(**texts, device=execution_device(pipe), num_images_per_prompt=1,
                                  do_classifier_free_guidance=guided)

    def sampling(self, pipe, steps: int) -> dict:
        """Keyword arguments of the pipeline's call, besides num_inference_steps, that make it sample `steps` steps on
        the family's grid of noise levels; {}: num_inference_steps alone does."""
        return {}

    def noise(self, pipe, height: int, width: int, generator):
        """The initial latent the pipeline takes, drawn on the CPU: (1, in_channels, height / vae factor, width / vae
        factor) standard normal."""
        import torch

        from ..routing import denoiser

        factor = pipe.vae_scale_factor
        shape = (1, denoiser(pipe).config.in_channels, height // factor, width // factor)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    # -- joint attention -----------------------------------------------------------------------------------------
    def modules(self, net) -> dict | None:
        """{processor key: attention module} to route, for a network without `attn_processors` or whose other
        modules stay untouched; None: every one of `net.attn_processors`."""
        return None

    def place(self, name: str) -> str:
        """Joint: a module's place: "joint" (text and image), "single" (text already concatenated in front),
        "image" (image only)."""
        return "joint"

    def inputs(self, args: tuple, kwargs: dict, prompts: int | None) -> tuple:
        """Joint: (its image input, batch rows, text tokens) of a denoiser call (`prompts`: its conditional rows,
        None if unknown): `hidden_states` and `encoder_hidden_states`."""
        sample = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states")
        return sample, sample.shape[0], 0 if text is None else text.shape[1]

    def grid(self, net, sample, kwargs: dict, cache: dict) -> tuple:
        """Joint: (latent size, image-token grid) of a denoiser call."""
        raise NotImplementedError(f"{self.title} has no joint attention")

    def project(self, attn, call: dict, text_tokens: int, grid) -> tuple:
        """Joint: (q, k, v, text, image slices), q, k, v (batch, heads, tokens, head_dim), from its stock
        processor's bound arguments `call`; it may leave call["_key_mask"], (batch, tokens) bool, False on padded
        text keys. The queries may be the keys' last tokens only (their earlier tokens' outputs cached, or computed
        by the adapter and kept in `call` for `finish`); the slices index the keys."""
        raise NotImplementedError(f"{self.title} has no joint attention")

    def finish(self, attn, out, call: dict, text: slice, image: slice):
        """Joint: out (batch, queries, width) -> what its stock processor returns."""
        raise NotImplementedError(f"{self.title} has no joint attention")

    # -- tests ---------------------------------------------------------------------------------------------------
    def tiny(self, folder: Path):
        """A tiny random pipeline of this family, built offline in code (`testing.tiny_pipeline`); folder receives
        its tokenizer files."""
        raise ModelError(f"no tiny pipeline of {self.title} is built here")

    @property
    def has_tiny(self) -> bool:
        return type(self).tiny is not Family.tiny


def _adapters() -> list:
    """The adapter modules of this package."""
    modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
    return [m for m in modules if hasattr(m, "FAMILIES")]


_ADAPTERS = _adapters()
# listed UNets first, then Stable Diffusion's MM-DiT, then the others by name
FAMILIES: dict[str, Family] = {f.name: f for f in sorted((f for m in _ADAPTERS for f in m.FAMILIES),
                                                         key=lambda f: (f.joint, not f.name.startswith("sd"), f.name))}
PIPELINES: dict[str, tuple[Family, ...]] = {}  # diffusers' pipeline classes -> the families that use them
NETWORKS: dict[str, Family] = {}  # denoising network classes -> the family routed on a bare network
for _family in FAMILIES.values():
    for _cls in _family.pipelines:
        PIPELINES.setdefault(_cls, ())
        PIPELINES[_cls] += (_family,)
    for _cls in _family.networks:
        NETWORKS.setdefault(_cls, _family)
SUPPORTED = ", ".join(dict.fromkeys(f.title for f in FAMILIES.values()))  # for messages: what a model may be

_KNOWN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def family_of(pipe) -> Family:
    """The family of a pipeline (or of a bare denoising network), computed once per object."""
    try:
        return _KNOWN[pipe]
    except (KeyError, TypeError):
        pass
    family = _detect(pipe)
    try:
        _KNOWN[pipe] = family
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return family


def _detect(pipe) -> Family:
    name = type(pipe).__name__
    if name in PIPELINES:
        candidates = PIPELINES[name]
        if len(candidates) == 1:
            return candidates[0]
        for adapter in _ADAPTERS:  # one class, several families (SD 1.x and 2.x): the adapter tells them apart
            found = getattr(adapter, "by_parts", lambda p: None)(pipe)
            if found in candidates:
                return found
    if name in NETWORKS:
        return NETWORKS[name]
    for adapter in _ADAPTERS:  # another pipeline class: its components say which family's parts it holds
        found = getattr(adapter, "by_parts", lambda p: None)(pipe)
        if found is not None:
            return found
    net = getattr(pipe, "transformer", None)  # or its denoising network's class does
    if type(net).__name__ in NETWORKS:
        return NETWORKS[type(net).__name__]
    if hasattr(pipe, "transformer_blocks"):  # a bare MM-DiT of a class not named above
        raise ModelError(f"{name} is an MM-DiT this version cannot route; supported: {', '.join(NETWORKS)}")
    if hasattr(pipe, "attn_processors"):  # a bare UNet-like network
        return FAMILIES["sd1"]
    raise ModelError(f"expected a {SUPPORTED} pipeline, got {name}")
