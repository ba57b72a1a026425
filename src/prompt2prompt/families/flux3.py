"""Flux.3: a Modular Diffusers pipeline (`Flux3ModularPipeline`, and `Flux3DistilledModularPipeline` for the
step-distilled flow-map model), blocks and a loop of steps rather than a `__call__` with `callback_on_step_end`.

Its transformer keeps three token modes: the text (a Qwen3-VL's hidden states after several layers, stacked along the
channels, the prompt inside its chat template, right-padded to a multiple of 80 tokens that the transformer attends
to), the image's tokens (one per 16x16 pixels: the autoencoder's latent patchified 2x2 and normalised by its batch
norm, as Flux.2's) and reference images (image-to-image). Each mode first runs through its own blocks, attending only
within itself (`mode_blocks`, `txt_mode_blocks`); then the text and the image are concatenated, text first, for the
joint single blocks. Every attention module is a `Flux3Attention` with `Flux3AttnProcessor` (qk-norms in float32,
rotary embeddings on every token).

Attention control routes the joint blocks (text and image: `single`) and the image's own mode blocks (`image`:
self-attention only); the text's and the references' mode blocks are left to their stock processors. Guidance is
the pipeline's `ClassifierFreeGuidance` guider: one transformer call per branch, the conditional first.

Generation (`run`) drives the pipeline's own blocks: the prompts are encoded here, one Qwen3-VL call each as the
pipeline's text step does, into one batch sharing the longest prompt's window; the blocks run without their prompt
upsampler (a prompt rewritten by a language model has no words to align) and their text step, and with one more
block in the denoising loop, after the scheduler's step, that calls the step-end callback with the latents (counting
the steps, and setting the latents a local blend or a direct inversion changes). The pipeline's blocks and guider
are left as they were. Text-to-image only: reference images are refused under control.
"""

from __future__ import annotations

from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch

from . import Family
from .flux2 import Flux2Latents
from .flux2 import noise as flux2_noise
from .latents import CFG_FLOWEDIT, linear_sigmas


# -- the pipeline's blocks -------------------------------------------------------------------------------------------
def _walk(blocks):
    """Every block under `blocks` (itself first), depth first."""
    yield blocks
    for child in getattr(blocks, "sub_blocks", {}).values():
        yield from _walk(child)


def _text_step(pipe):
    """The pipeline's text-encoder block (its pad multiple and its stacked layers are the model's recipe)."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    from ..errors import ModelError

    found = next((b for b in _walk(pipe._blocks) if isinstance(b, Flux3TextEncoderStep)), None)
    if found is None:
        raise ModelError(f"this {type(pipe).__name__}'s blocks hold no Flux3TextEncoderStep: attention control "
                         "encodes the prompts as that step does")
    return found


def recipe(pipe) -> tuple[int, tuple[int, ...], int]:
    """(pad multiple, stacked hidden layers, maximum prompt tokens) of the pipeline's text step: its own settings
    and its inputs' defaults."""
    step = _text_step(pipe)
    defaults = {p.name: p.default for p in step.inputs}
    return int(step.pad_multiple), tuple(defaults["text_encoder_out_layers"]), int(defaults["max_sequence_length"])


def render(pipe):
    """content -> the chat text the text step reads (one user turn, the generation prompt added)."""

    def text(content: str) -> str:
        out = pipe.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        return out if isinstance(out, str) else out[0]

    return text


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """The prompt's tokens as the text step keeps them: the chat text, right-padded to a multiple of the step's pad
    multiple (80), at most max_sequence_length (the step's default: 8192) tokens."""
    from dataclasses import replace

    from ..tokens import PromptTokens

    multiple, _, longest = recipe(pipe)
    length = int(max_sequence_length or longest)
    found = PromptTokens.from_template(pipe.tokenizer.tokenizer, prompt, render(pipe), length, padded=False,
                                       multiple=multiple)
    return replace(found, length=min(found.length, length))  # the window stops at the maximum


def encode(pipe, prompts: list[str], window: int | None, max_sequence_length: int | None = None) -> torch.Tensor:
    """(prompts, window, width) stacked Qwen3-VL hidden states, one text-step encoding per prompt (the step takes
    one prompt a call), each padded to `window` tokens; None: each to its own window (the step's rule), which must
    then be the same for all."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    from ..routing import execution_device

    multiple, layers, longest = recipe(pipe)
    longest = int(max_sequence_length or longest)
    out = [Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
        pipe.text_encoder, pipe.tokenizer, p, device=execution_device(pipe),
        max_sequence_length=window or longest, pad_multiple=window or multiple, hidden_states_layers=layers)
        for p in prompts]
    return torch.cat(out)


def _step_end(callback):
    """The block appended to the denoising loop: after the scheduler's step, `callback(pipe, step, timestep,
    {"latents": ...})` is called as diffusers' callback_on_step_end is, and the latents it returns are kept."""
    from diffusers.modular_pipelines.modular_pipeline import ModularPipelineBlocks
    from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam

    class StepEnd(ModularPipelineBlocks):
        model_name = "flux3"

        @property
        def description(self) -> str:
            return "prompt2prompt's step end: the controller's step callback, after the scheduler's step"

        @property
        def inputs(self):
            return [InputParam("latents", required=True, type_hint=torch.Tensor)]

        @property
        def intermediate_outputs(self):
            return [OutputParam("latents", type_hint=torch.Tensor)]

        def __call__(self, components, block_state, i: int, t: torch.Tensor):
            changed = callback(components, i, t, {"latents": block_state.latents}) or {}
            if changed.get("latents") is not None:
                block_state.latents = changed["latents"]
            return components, block_state

    return StepEnd()


def _loop_blocks(pipe, callback):
    """A copy of the pipeline's blocks for one controlled generation: no prompt upsampler, no text step (the
    embeddings are given), and the step end in the denoising loop."""
    from diffusers.modular_pipelines.flux3.denoise import Flux3DistilledLoopDenoiser, Flux3LoopDenoiser
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep
    from diffusers.modular_pipelines.flux3.prompt_upsampler import Flux3AutoPromptUpsampleStep
    from diffusers.modular_pipelines.modular_pipeline import LoopSequentialPipelineBlocks

    from ..errors import ModelError

    blocks = deepcopy(pipe._blocks)
    for parent in list(_walk(blocks)):
        children = getattr(parent, "sub_blocks", None)
        if not children:
            continue
        for name in [n for n, b in children.items()
                     if isinstance(b, (Flux3AutoPromptUpsampleStep, Flux3TextEncoderStep))]:
            children.pop(name)
    loops = [b for b in _walk(blocks) if isinstance(b, LoopSequentialPipelineBlocks)
             and any(isinstance(s, (Flux3LoopDenoiser, Flux3DistilledLoopDenoiser)) for s in b.sub_blocks.values())]
    if not loops:
        raise ModelError(f"this {type(pipe).__name__}'s blocks hold no denoising loop with a Flux3LoopDenoiser: "
                         "attention control drives that loop")
    config = dict(vars(pipe).get("_progress_bar_config") or {"disable": True})
    for loop in loops:
        loop.sub_blocks["prompt2prompt_step_end"] = _step_end(callback)
        loop.set_progress_bar_config(**config)
    return blocks


@contextmanager
def _guided(pipe, scale: float):
    """The pipeline's guider at this scale for the block (classifier-free guidance on when scale > 1), put back as
    it was afterwards."""
    guider = getattr(pipe, "guider", None)
    if guider is None:
        yield False
        return
    saved = guider.guidance_scale, guider._enabled
    guider.guidance_scale, guider._enabled = float(scale), scale > 1
    try:
        yield scale > 1
    finally:
        guider.guidance_scale, guider._enabled = saved


@contextmanager
def _blocks_swapped(pipe, blocks):
    saved = pipe._blocks
    pipe._blocks = blocks
    try:
        yield
    finally:
        pipe._blocks = saved


def run(pipe, args: dict, callback) -> list:
    """One generation through the pipeline's blocks (see the module's docstring); `args` as `Family.run` gets them."""
    from ..tokens import batch_tokens

    args = dict(args)
    args.pop("callback_on_step_end_tensor_inputs", None)
    prompts, scale = args.pop("prompt"), float(args.pop("guidance_scale", 1.0))
    negative, longest = args.pop("negative_prompt", None), args.pop("max_sequence_length", None)
    embeds, negative_embeds = args.pop("prompt_embeds", None), args.pop("negative_prompt_embeds", None)
    if embeds is None:
        window = batch_tokens(pipe, prompts, longest)[0].length  # the batch's: the longest prompt's window
        embeds = encode(pipe, prompts, window)
    if scale > 1 and getattr(pipe, "guider", None) is None:
        from ..errors import InputError

        raise InputError(f"this {type(pipe).__name__} has no guider (the distilled model samples without guidance): "
                         f"expected guidance 1, got {scale:g}")
    with _guided(pipe, scale) as guided:
        if guided and negative_embeds is None:
            negative_embeds = encode(pipe, [negative or ""], None, longest)  # its own window, as the step's
        blocks = _loop_blocks(pipe, callback)
        with _blocks_swapped(pipe, blocks):
            unconditional = {"negative_prompt_embeds": negative_embeds} if guided else {}  # the distilled: none
            return pipe(prompt_embeds=embeds, **unconditional, output="images", **args)


def defaults(pipe) -> tuple[int, float]:
    """(the timestep step's default steps, the guider's scale; 1: none on a pipeline without a guider)."""
    from diffusers.modular_pipelines.flux3.before_denoise import Flux3SetTimestepsStep

    step = next((b for b in _walk(pipe._blocks) if isinstance(b, Flux3SetTimestepsStep)), None)
    steps = step.num_inference_steps if step is not None else 50
    guider = getattr(pipe, "guider", None)
    return int(steps), float(guider.guidance_scale) if guider is not None and guider._enabled else 1.0


def guidance(scale: float, negative_prompt: str | None, prompts: int) -> dict:
    """The guider's scale (set for the call by `run`) and the negative prompt ("" by default, as the text step's)."""
    return {"guidance_scale": scale, **({"negative_prompt": negative_prompt} if negative_prompt else {})}


def size(pipe):
    """The latent step's default (1024 pixels a side); rotary positions set no largest size."""
    from diffusers.modular_pipelines.flux3.before_denoise import Flux3PrepareLatentsStep

    step = next((b for b in _walk(pipe._blocks) if isinstance(b, Flux3PrepareLatentsStep)), None)
    side = (step.default_height, step.default_width) if step is not None else (1024, 1024)
    return side, None


def multiple(pipe) -> int:
    return int(pipe.vae_scale_factor) * 2  # a token is a 2x2 patch of the autoencoder's latent


def sampling(pipe, steps: int) -> dict:
    return {"sigmas": [float(s) for s in linear_sigmas(steps)]}  # the timestep step's default noise levels


def inputs(args: tuple, kwargs: dict, prompts: int | None) -> tuple:
    """The transformer's latents, its batch and the text's tokens; reference images are refused."""
    from ..errors import P2PError

    if kwargs.get("image_cond_hidden_states") is not None:
        raise P2PError("attention control on Flux.3 reads text-to-image generation; this call has reference images")
    sample = kwargs.get("hidden_states", args[0] if args else None)
    return sample, sample.shape[0], kwargs["encoder_hidden_states"].shape[1]


def grid(net, sample, kwargs, cache):
    """`img_ids` hold each image token's (t, row, column, l), rows and columns scaled: counted once per tensor."""
    ids = kwargs["img_ids"]
    if cache.get("ids") is not ids:
        rows, columns = (int(torch.unique(ids[:, axis]).numel()) for axis in (1, 2))
        cache["ids"], cache["grid"] = ids, (rows, columns)
    return cache["grid"], cache["grid"]


def modules(net) -> dict:
    """The joint single blocks' and the image mode blocks' attention (not the text's or the references' modes)."""
    return {f"{name}.processor": module for name, module in net.named_modules()
            if name.endswith(".attn") and name.split(".")[0] in ("single_transformer_blocks", "mode_blocks")
            and (name.split(".")[0] != "mode_blocks" or name.split(".")[1] == "image")}


def place(name: str) -> str:
    return "image" if name.startswith("mode_blocks") else "single"


def project(attn, call: dict, text_tokens: int, grid):
    """Flux3AttnProcessor's projections (diffusers' own helper, fused or not), qk-norms in float32 and rotary
    embeddings: a joint block's sequence holds the text first, then the grid's image tokens; an image mode block's
    the image alone."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux3 import _get_qkv_projections

    query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in _get_qkv_projections(attn, call["hidden_states"]))
    query, key = attn.norm_q(query.float()), attn.norm_k(key.float())
    rotary = call.get("image_rotary_emb")
    if rotary is not None:
        query, key = (apply_rotary_emb(x, rotary, sequence_dim=1) for x in (query, key))
    query, key = query.to(value.dtype), key.to(value.dtype)  # (batch, tokens, heads, head_dim)
    length = query.shape[1]
    text = length - grid[0] * grid[1]  # 0 in an image mode block
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (batch, heads, tokens, head_dim)
    return query, key, value, slice(0, text), slice(text, length)


def finish(attn, out, call: dict, text: slice, image: slice):
    return attn.to_out[1](attn.to_out[0](out))


class Flux3Latents(Flux2Latents):
    """Flux.3's real-image side: Flux.2's autoencoder and layout (patchified 2x2, normalised by its batch norm: what
    the latent step's `latents=` takes and packs), the timestep step's noise levels (1 down to 1 / steps, shifted by
    the scheduler's constant shift), and the guider's classifier-free guidance, one call per branch. Not the distilled
    model's: its flow map takes the timestep each step jumps to (refused by name)."""

    @staticmethod
    def image(pipe, image):
        """As VaeImageProcessor reads an image at its own size (Flux3ImageProcessor's own `preprocess` fits
        reference images to a canvas instead)."""
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor.preprocess(pipe.image_processor, image, height=image.height, width=image.width)

    @staticmethod
    def patchify(pipe, latent):
        from diffusers.modular_pipelines.flux3.encoders import Flux3VaeEncoderStep

        return Flux3VaeEncoderStep._patchify_latents(latent)  # the pipeline has none of its own: its blocks'

    @staticmethod
    def unpatchify(pipe, latent):
        from diffusers.modular_pipelines.flux3.decoders import Flux3DecodeStep

        return Flux3DecodeStep._unpatchify_latents(latent)

    @staticmethod
    def pack(pipe, latent):
        return latent.flatten(2).transpose(1, 2)  # (n, h * w, channels), as the latent step packs

    @classmethod
    def timesteps(cls, pipe, config, steps, shape) -> dict:
        return sampling(pipe, steps)

    @staticmethod
    def velocity(pipe, prompt, guidance, max_sequence_length, shape):
        from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids

        from ..errors import ModelError
        from ..routing import exclusive, execution_device

        net, device = pipe.transformer, execution_device(pipe)
        if net.config.flow_map:
            raise ModelError("real-image editing on the distilled Flux.3 is not supported: its flow map takes the "
                             "timestep each step jumps to, which the inversion solvers and FlowEdit do not give; use "
                             "Flux3ModularPipeline's model")
        with torch.no_grad(), exclusive(pipe):
            texts = [encode(pipe, [p], None, max_sequence_length) for p in ([prompt, ""] if guidance > 1 else [prompt])]
        texts = [(t, Flux3TextRoPEInputsStep._prepare_text_ids(t).to(device)) for t in texts]
        scale = next((b.image_rope_scale for b in _walk(pipe._blocks) if hasattr(b, "image_rope_scale")), 0.5)
        image_ids = _prepare_image_ids(shape[-2], shape[-1], scale).to(device)

        @torch.no_grad()
        def v(x, t):  # x: (1, tokens, channels)
            timestep = (t.to(device).expand(x.shape[0]) / 1000).to(x.dtype)
            cond, *uncond = (net(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, txt_ids=ids,
                                 img_ids=image_ids, return_dict=False)[0] for embeds, ids in texts)
            return cond if not uncond else uncond[0] + guidance * (cond - uncond[0])

        return v


def tiny(folder: Path):
    """A 32-layer, 16-wide Qwen3-VL (read after layers 4, 8, ..., 32 as the real recipe; a one-layer vision tower
    never run), its processor's text half (`standins.TextProcessor`: Qwen3VLProcessor needs torchvision here) saved
    as a Qwen3VLProcessor folder, a transformer of one mode block per mode and two joint blocks over 16-channel
    tokens, Flux.2's tiny autoencoder, a guider at scale 4, and the blocks without their prompt upsampler (no
    language model here to rewrite prompts): the tiny autoencoder halves a side, so 32x32 images are 8x8 tokens."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from diffusers.modular_pipelines.flux3 import Flux3AutoBlocks

    from .flux2 import tiny_parts
    from .qwenimage21 import tiny_qwen3_vl

    width = 16  # read after layers 4, 8, ..., 32, as the real recipe: 32 tiny layers
    processor, text_encoder = tiny_qwen3_vl(folder / "tokenizer", width, layers=32, head_dim=8, mrope=[1, 1, 2])
    transformer = Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=8 * width,
                                          timestep_channels=32, axes_dims_rope=(4, 4, 4, 4))
    blocks = Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")  # the tiny pipeline has no language model to rewrite prompts
    pipe = blocks.init_pipeline()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=6.93)  # the timestep step's constant shift
    pipe.update_components(text_encoder=text_encoder, tokenizer=processor, transformer=transformer,
                           vae=tiny_parts(8 * width, False)["vae"], scheduler=scheduler,
                           guider=ClassifierFreeGuidance(guidance_scale=4.0))
    entry = list(pipe.config["tokenizer"])
    pipe.register_to_config(tokenizer=("transformers", "Qwen3VLProcessor", *entry[2:]))  # saved as the model names it
    return pipe


class Flux3(Family):
    tokens = staticmethod(tokens)
    defaults = staticmethod(defaults)
    run = staticmethod(run)
    guidance = staticmethod(guidance)
    size = staticmethod(size)
    multiple = staticmethod(multiple)
    sampling = staticmethod(sampling)
    noise = staticmethod(flux2_noise)
    inputs = staticmethod(inputs)
    grid = staticmethod(grid)
    modules = staticmethod(modules)
    place = staticmethod(place)
    project = staticmethod(project)
    finish = staticmethod(finish)
    tiny = staticmethod(tiny)

    def from_folder(self, folder: Path, index: dict, dtype):
        """A saved modular pipeline: its blocks and class from modular_model_index.json, every component loaded from
        its subfolder here (wherever the index recorded it was saved), the processors transformers cannot build here
        stood in (`standins.py`)."""
        from diffusers import ModularPipeline

        from ..errors import ModelError
        from ..standins import after_loading, stand_ins

        after, passed = stand_ins(folder, index)
        pipe = ModularPipeline.from_pretrained(str(folder), local_files_only=True)
        names = [n for n, v in index.items() if not n.startswith("_") and isinstance(v, list) and v[0] is not None
                 and n not in after and n not in passed]
        pipe.load_components(names=names, pretrained_model_name_or_path=str(folder), dtype=dtype)
        missing = [n for n in names if getattr(pipe, n, None) is None]
        if missing:
            raise ModelError(f"could not load {', '.join(missing)} of the modular pipeline in {folder}")
        pipe.update_components(**after, **passed)
        after_loading(pipe, index, {}, passed)
        return pipe


FLUX3 = Flux3("flux3", "Flux.3", "joint", pipelines=("Flux3ModularPipeline", "Flux3DistilledModularPipeline"),
              networks=("Flux3Transformer2DModel",), packed=True, flow=True, processors=("Flux3AttnProcessor",),
              guidance_calls=True, batch_padded=True,
              arguments=("attn", "hidden_states", "attention_mask", "image_rotary_emb"),
              latents=Flux3Latents, flowedit=CFG_FLOWEDIT)
FAMILIES = (FLUX3,)
