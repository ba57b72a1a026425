"""Z-Image: a single-stream DiT. Its image tokens are refined alone (`noise_refiner`), its caption tokens alone
(`context_refiner`, left on its stock processor: no image query attends there), then image and caption tokens attend
jointly in its main `layers`, image first: each part padded with learned tokens to a multiple of 32 (attended), the
batch padded to its longest sequence (masked out). The caption is a Qwen3's second-to-last hidden layer over the
chat-templated prompt, its padding removed. Classifier-free guidance is one call whose batch holds the conditional
rows first; its pipeline's scale g means pos + g (pos - neg), the usual scale s - 1. Its transformer has no
`attn_processors`: each attention module's own processor slot is used. Real images through `ZImageLatents`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import Family
from .latents import CFG_FLOWEDIT, FlowLatents
from .shared import chat

PAD = 32  # the transformer pads image and caption tokens to multiples of this (transformer_z_image.SEQ_MULTI_OF)
DEFAULT_SIDE = 1024  # ZImagePipeline.__call__'s height and width when none is given


def _ceil(n: int) -> int:
    return -(-n // PAD) * PAD


def caption_limit(net) -> int:
    """Caption tokens (padded to a multiple of 32) the transformer can position: they take rotary positions 1..n on
    the first axis and the image the next one, so n + 1 must stay inside that axis's table (`axes_lens[0]`)."""
    return (net.config.axes_lens[0] - 2) // PAD * PAD


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """The chat-templated prompt (thinking on, as the pipeline asks), up to max_sequence_length tokens, padded by
    the transformer to a multiple of 32 (the batch to its longest: `tokens.batch_tokens`). A prompt longer than the
    transformer can position (its rotary table) is refused: the stock pipeline would fail inside the transformer."""
    from ..errors import PromptError
    from ..tokens import PromptTokens, sequence_length

    seen = PromptTokens.from_template(pipe.tokenizer, prompt, chat(pipe.tokenizer, thinking=True),
                                      sequence_length(pipe, max_sequence_length), padded=False, multiple=PAD)
    limit = caption_limit(pipe.transformer)
    if seen.length > limit:
        raise PromptError(f"the prompt takes {len(seen.ids)} tokens in Z-Image's chat template ({seen.length} as the "
                          f"transformer pads them); this model positions at most {limit} (its rotary table, "
                          f"axes_lens[0] = {pipe.transformer.config.axes_lens[0]}): shorten the prompt")
    return seen


def size(pipe):
    """The pipeline's default (1024 pixels a side) within what the transformer's rotary table positions
    (`axes_lens[1:]` image tokens a side, each patch_size latent cells of vae_scale_factor pixels), and that
    largest size."""
    net, factor = pipe.transformer, int(pipe.vae_scale_factor)
    cell = net.config.all_patch_size[0] * factor
    largest = tuple(int(n) * cell for n in net.config.axes_lens[1:3])
    step = 2 * factor  # the pipeline's own rounding of a size (vae_scale_factor * 2)
    return tuple(min(DEFAULT_SIDE, side) // step * step for side in largest), largest


def guidance(scale: float, negative_prompt: str | None, prompts: int) -> dict:
    """The pipeline's `guidance_scale` is the usual scale minus one (pos + g (pos - neg)); <= 1 turns it off."""
    return {"guidance_scale": max(float(scale) - 1, 0.0),
            **({"negative_prompt": [negative_prompt] * prompts} if negative_prompt else {})}


def modules(net) -> dict:
    """The image refiner's and the main layers' attention modules (not the caption refiner's)."""
    return {f"{name}.processor": module for name, module in net.named_modules()
            if name.rsplit(".", 1)[-1] == "attention" and name.split(".")[0] in ("noise_refiner", "layers")}


def place(name: str) -> str:
    return "image" if name.startswith("noise_refiner") else "joint"


def inputs(args, kwargs, prompts: int | None):
    """(first image latent (channels, frames, h, w), rows, the conditional rows' caption tokens in the main layers)
    of a transformer call (x and cap_feats are lists, one tensor per row; the conditional rows first). A longer
    negative prompt's extra caption tokens are masked out of the conditional rows: they are not part of their text."""
    images = args[0] if args else kwargs["x"]
    captions = args[2] if len(args) > 2 else kwargs["cap_feats"]
    return images[0], len(images), max(_ceil(len(c)) for c in captions[: prompts or len(captions)])


def grid(net, sample, kwargs, cache):
    patch = kwargs.get("patch_size", 2)
    latent = tuple(sample.shape[-2:])
    return latent, (latent[0] // patch, latent[1] // patch)


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as complex products: x (batch, tokens, heads, head_dim), freqs (batch, tokens, head_dim / 2)
    complex."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


def project(attn, call: dict, text_tokens: int, grid):
    """ZSingleStreamAttnProcessor's projections: image tokens first (`grid` of them, then its padding to a multiple
    of 32), the caption after them in the main layers. The batch's padding mask becomes the key mask."""
    hidden_states = call["hidden_states"]
    query, key, value = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k,
                                                                                            attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    freqs = call.get("freqs_cis")
    if freqs is not None:
        query, key = _rotate(query, freqs), _rotate(key, freqs)
    mask = call.get("attention_mask")
    if mask is not None:
        call["_key_mask"] = mask.reshape(mask.shape[0], -1).bool()  # (batch, tokens)
    length, n = hidden_states.shape[1], grid[0] * grid[1]
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (batch, heads, tokens, head_dim)
    text = slice(min(_ceil(n), length), min(_ceil(n) + text_tokens, length))  # empty in the image refiner
    return query, key, value, text, slice(0, n)


def finish(attn, out, call: dict, text: slice, image: slice):
    out = attn.to_out[0](out)
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class ZImageConcepts:
    """Z-Image's concept stream (`concepts.py`). Z-Image has one set of weights for text and image tokens, so a
    concept is carried as its caption tokens are: its Qwen3 embedding through `cap_embedder` and the caption refiner
    (`context_refiner`, the concepts attending among themselves there, as the caption's tokens do), then through the
    main `layers` with their modulation (`adaLN_modulation`), norms, projections and feed-forward. A concept gets no
    rotary embedding (it has no place in the caption). The image's own attention output keeps the layer's padding
    mask."""

    last_blocks = None  # every block (concepts.default_blocks)

    @staticmethod
    def encode(pipe, concept: str) -> torch.Tensor:
        from ..routing import execution_device

        embeds = pipe.encode_prompt(prompt=concept, device=execution_device(pipe), do_classifier_free_guidance=False)
        return embeds[0][0][None]  # (1, caption tokens, width): the pipeline gives a list of (tokens, width)

    @staticmethod
    def blocks(net) -> list:
        return list(net.layers)

    @staticmethod
    def start(net, embeds: torch.Tensor) -> torch.Tensor:
        stream = net.cap_embedder(embeds)[None]  # (1, concepts, width)
        for layer in net.context_refiner:  # unmodulated, no mask, no rotary
            stream = layer(stream, None, None)
        return stream[0]

    @staticmethod
    def step(block, call: dict, rows: slice, stream: torch.Tensor, read: bool, grid):
        from ..concepts import concept_attention, merge_heads
        from ..errors import InputError

        if call.get("noise_mask") is not None:
            raise InputError("concept maps follow Z-Image's text-to-image layers; this call modulates clean and "
                             "noisy tokens apart (an omni model's reference images), which the concept stream does "
                             "not follow")
        x, adaln = call["x"][rows], call["adaln_input"][rows]
        mask, freqs = call.get("attn_mask"), call.get("freqs_cis")
        attn = block.attention
        scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        gate_msa, gate_mlp, scale_msa, scale_mlp = gate_msa.tanh(), gate_mlp.tanh(), 1 + scale_msa, 1 + scale_mlp
        projected = {"hidden_states": block.attention_norm1(x) * scale_msa,
                     "attention_mask": None if mask is None else mask[rows],
                     "freqs_cis": None if freqs is None else freqs[rows]}
        q, k, v, _, image = project(attn, projected, 0, grid)
        normed = block.attention_norm1(stream) * scale_msa
        cq, ck, cv = (proj(normed).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            cq = attn.norm_q(cq)
        if attn.norm_k is not None:
            ck = attn.norm_k(ck)
        cq, ck, cv = (t.transpose(1, 2) for t in (cq, ck, cv))  # (rows, heads, concepts, head_dim)
        c_out, maps = concept_attention(q, k, v, image, cq, ck, cv, read, projected.get("_key_mask"))
        stream = stream + gate_msa * block.attention_norm2(finish(attn, merge_heads(c_out), {}, image, image))
        return stream + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(stream) * scale_mlp)), maps


class ZImageLatents(FlowLatents):
    """Z-Image's real-image side: latents as images (scaling and shift factors), its own noise levels
    (`get_default_z_image_sigmas`) shifted by the token count, and its transformer's convention: rows as a list of
    (channels, 1 frame, h, w), the time given as 1 - t, the output the negative of the velocity; guidance one call of
    [conditional, unconditional] rows, pos + (s - 1)(pos - neg), as the pipeline's loop combines them."""

    @staticmethod
    def tokens(pipe, shape) -> int:
        patch = pipe.transformer.config.all_patch_size[0]
        return (shape[-2] // patch) * (shape[-1] // patch)

    @classmethod
    def timesteps(cls, pipe, config, steps, shape) -> dict:
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        from ..flow import shift_mu

        return {"sigmas": get_default_z_image_sigmas(steps), "mu": shift_mu(config, cls.tokens(pipe, shape))}

    @staticmethod
    def velocity(pipe, prompt, guidance, max_sequence_length, shape):
        from ..routing import exclusive, execution_device

        net, device = pipe.transformer, execution_device(pipe)
        guided = guidance > 1
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad(), exclusive(pipe):
            positive, negative = pipe.encode_prompt(prompt=prompt, device=device, do_classifier_free_guidance=guided,
                                                    **kwargs)
        captions = positive + negative  # lists of (tokens, width): the conditional row first

        @torch.no_grad()
        def v(x, t):  # x: (1, channels, h, w)
            rows = [x[0].unsqueeze(1).to(net.dtype)] * len(captions)  # (channels, 1 frame, h, w) each
            time = ((1000 - t.to(device).float()) / 1000).expand(len(captions))
            out = [o.float()[:, 0] for o in net(rows, time, captions, return_dict=False)[0]]
            pred = out[0] if not guided else out[0] + (guidance - 1) * (out[0] - out[1])
            return -pred[None]

        return v


def multiple(pipe) -> int:
    """The autoencoder's factor times the transformer's (first) patch size."""
    return int(pipe.vae_scale_factor) * pipe.transformer.config.all_patch_size[0]


def tiny(folder: Path):
    """A Qwen3 base text encoder, refiners and image-first main layers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from ..testing import tiny_qwen_tokenizer, tiny_vae

    tokenizer = tiny_qwen_tokenizer(folder / "tokenizer")
    width = 16
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=width, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(0.05),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


class ZImage(Family):
    tokens = staticmethod(tokens)
    guidance = staticmethod(guidance)
    modules = staticmethod(modules)
    size = staticmethod(size)
    multiple = staticmethod(multiple)
    place = staticmethod(place)
    inputs = staticmethod(inputs)
    grid = staticmethod(grid)
    project = staticmethod(project)
    finish = staticmethod(finish)
    tiny = staticmethod(tiny)


Z_IMAGE = ZImage("zimage", "Z-Image", "joint", pipelines=("ZImagePipeline",), networks=("ZImageTransformer2DModel",),
                 flow=True, processors=("ZSingleStreamAttnProcessor",), conditional_first=True, batch_padded=True,
                 scale=("guidance_scale", 1.0),
                 arguments=("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "freqs_cis"),
                 concepts=ZImageConcepts, latents=ZImageLatents, flowedit=CFG_FLOWEDIT)
FAMILIES = (Z_IMAGE,)
