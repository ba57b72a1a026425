"""What kind of model a pipeline holds, worked out once: one `Family` record per supported family.

Every module that behaves differently per model reads this record (`family_of(pipe)`) instead of probing the pipeline
itself: which attention installer routes its layers (UNet cross-attention or MM-DiT joint attention), in which order
a joint sequence holds text and image tokens, whether latents are packed into tokens, which text encoders fill a
prompt's positions, whether it samples by flow matching or in the DDIM family, and whether a pooled text embedding
travels with the prompt. A pipeline is recognised by its class (diffusers' own pipelines), else by its components
(a pipeline class this table does not name, e.g. an img2img variant), and a bare denoising network (training) by its
class. The record is computed once per object and kept while the object lives.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from .errors import ModelError


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl", "sd3" or "flux"
    title: str  # for people: "Stable Diffusion 1.x"
    denoiser: str  # "unet": cross-attention layers to the text; "joint": MM-DiT attention over text and image tokens
    text_first: bool = False  # joint: the sequence is text then image (Flux) rather than image then text (SD3)
    packed: bool = False  # latents are a sequence of 2x2-patch tokens (Flux's `_pack_latents`), not an image
    flow: bool = False  # samples by flow matching (SD3, Flux); else a DDIM-family sampler (epsilon or v)
    pooled: bool = False  # `encode_prompt` gives each prompt a pooled embedding beside its sequence (SDXL, SD3)
    added_conditions: bool = False  # the UNet takes that pooled embedding and size ids as added conditions (SDXL): a
    # DDIM-family inversion carries an unconditional pooled embedding
    text_parts: tuple[str, ...] = ("clip",)  # encoders filling a prompt's token positions, in sequence order
    default_part: str | None = None  # the part a word's map is read from by default; None: the only one
    processors: tuple[str, ...] = ()  # joint: diffusers' stock processor classes of its attention modules
    invertible: bool = True  # real images can be inverted and edited (DDIM-family or flow methods, by `flow`)
    flowedit: tuple[int, int, float, float] | None = None  # FlowEdit's defaults (steps, n_max, source and target
    # guidance), from the paper's published settings (fallenshock/FlowEdit, SD3_exp.yaml / FLUX_exp.yaml); None: n/a

    @property
    def joint(self) -> bool:
        return self.denoiser == "joint"


SD1 = Family("sd1", "Stable Diffusion 1.x", "unet")
SD2 = Family("sd2", "Stable Diffusion 2.x", "unet")
SDXL = Family("sdxl", "Stable Diffusion XL", "unet", pooled=True, added_conditions=True)
# SD3 / SD3.5: joint sequence image then text; the text is CLIP's 77 positions (its two CLIP encoders side by side in
# the channels) then T5's; the CLIP part is read by default (the T5 part is zeros in a pipeline without T5)
SD3 = Family("sd3", "Stable Diffusion 3 / 3.5", "joint", flow=True, pooled=True, text_parts=("clip", "t5"),
             default_part="clip", processors=("JointAttnProcessor2_0",), flowedit=(50, 33, 3.5, 13.5))
# Flux.1: text (T5) then image in its double-stream blocks, already concatenated in its single-stream blocks
FLUX = Family("flux", "Flux.1", "joint", text_first=True, packed=True, flow=True, text_parts=("t5",),
              processors=("FluxAttnProcessor", "FluxAttnProcessor2_0"), flowedit=(28, 24, 1.5, 5.5))
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL, SD3, FLUX)}
SUPPORTED = "Stable Diffusion 1.x, 2.x, XL or 3 / 3.5, or Flux.1"  # for messages: what a model may be

# diffusers' classes -> family; None: SD 1.x or 2.x, told apart by the model itself (`_sd1_or_sd2`)
PIPELINES = {"StableDiffusionPipeline": None, "StableDiffusionXLPipeline": SDXL, "StableDiffusion3Pipeline": SD3,
             "FluxPipeline": FLUX}
NETWORKS = {"UNet2DConditionModel": SD1, "SD3Transformer2DModel": SD3, "FluxTransformer2DModel": FLUX}

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
        return PIPELINES[name] or _sd1_or_sd2(pipe)
    if name in NETWORKS:
        return NETWORKS[name]
    # another pipeline class: its components say which family's parts it holds
    if hasattr(pipe, "text_encoder_3"):
        return SD3
    if getattr(pipe, "transformer", None) is not None:
        return FLUX
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    if getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None:
        return _sd1_or_sd2(pipe)
    if hasattr(pipe, "transformer_blocks"):  # a bare MM-DiT of a class not named above
        raise ModelError(f"{name} is an MM-DiT this version cannot route; supported: {', '.join(NETWORKS)}")
    if hasattr(pipe, "attn_processors"):  # a bare UNet-like network
        return SD1
    raise ModelError(f"expected a {SUPPORTED} pipeline, got {name}")


def _sd1_or_sd2(pipe) -> Family:
    v_pred = pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    return SD2 if v_pred or pipe.text_encoder.config.hidden_size >= 1024 else SD1
