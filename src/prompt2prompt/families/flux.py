"""Flux.1: an MM-DiT with text (T5) then image tokens in its double-stream blocks, already concatenated in its
single-stream blocks; latents packed into a sequence of 2x2-patch tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from . import Family
from .latents import FlowLatents, linear_sigmas


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    from ..tokens import PromptTokens, sequence_length

    return PromptTokens.from_tokenizer(pipe.tokenizer_2, prompt, sequence_length(pipe, max_sequence_length))


def noise(pipe, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Standard normal latents (1, channels, h, w) packed into (1, tokens, 4 * channels), as `_pack_latents` does."""
    factor = pipe.vae_scale_factor
    shape = (1, pipe.transformer.config.in_channels // 4, height // factor, width // factor)
    return pipe._pack_latents(torch.randn(shape, generator=generator, dtype=torch.float32), *shape)


def grid(net, sample, kwargs, cache):
    """(batch, tokens, channels) packed latents; `img_ids` hold each token's (0, row, column), read once per tensor
    (every step passes the same one) so the grid costs no host read per call."""
    ids = kwargs["img_ids"]
    if cache.get("ids") is not ids:
        cache["ids"], cache["grid"] = ids, (int(ids[..., 1].max()) + 1, int(ids[..., 2].max()) + 1)
    return cache["grid"], cache["grid"]


def project(attn, call: dict, text_tokens: int, grid):
    """FluxAttnProcessor's projections (diffusers' own helper, which knows fused projections): text then image;
    a single-stream block's sequence holds `text_tokens` text tokens first."""
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    encoder_hidden_states = call.get("encoder_hidden_states")
    query, key, value, eq, ek, ev = _get_qkv_projections(attn, call["hidden_states"], encoder_hidden_states)
    return _joint(attn, query, key, value, eq, ek, ev, encoder_hidden_states, text_tokens, call.get("image_rotary_emb"))


def _joint(attn, query, key, value, eq, ek, ev, encoder_hidden_states, text_tokens, rotary):
    """Flux-style heads, qk-norms, text-first concatenation and rotary embedding (Flux.1 and Flux.2 alike)."""
    from diffusers.models.embeddings import apply_rotary_emb

    query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))  # (b, tokens, heads, d)
    query, key = attn.norm_q(query), attn.norm_k(key)
    t = text_tokens
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        t = eq.shape[1]
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    length = query.shape[1]
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (batch, heads, tokens, head_dim)
    return query, key, value, slice(0, t), slice(t, length)


def place(name: str) -> str:
    """A single-stream block's attention gets text and image already concatenated."""
    return "single" if name.startswith("single") else "joint"


def finish(attn, out, call: dict, text: slice, image: slice):
    if call.get("encoder_hidden_states") is None:  # single-stream: the block projects it itself
        return out
    text_out, image_out = out.split_with_sizes([text.stop - text.start, image.stop - image.start], dim=1)
    return attn.to_out[1](attn.to_out[0](image_out)), attn.to_add_out(text_out)


class FluxConcepts:
    """Flux.1's concept stream (`concepts.py`): a concept is one context token (its T5 embedding through the
    transformer's `context_embedder`), carried through the double-stream `FluxTransformerBlock`s by their text side
    (`norm1_context`, the added projections and qk-norms, `to_add_out`, `norm2_context`, `ff_context`). Text tokens
    sit at position 0 of Flux.1's rotary table (its `txt_ids` are zeros), a rotation by nothing, so the concepts get
    none. The stream ends with the double-stream blocks: a single-stream block has one stream for text and image,
    no text side of its own to carry a concept."""

    last_blocks = 4  # the ConceptAttention code's default on Flux.1: its last 4 double-stream blocks
    # (concepts.default_blocks)

    @staticmethod
    def encode(pipe, concept: str) -> torch.Tensor:
        from ..routing import execution_device

        return pipe.encode_prompt(prompt=concept, prompt_2=None, device=execution_device(pipe))[0]

    @staticmethod
    def blocks(net) -> list:
        return list(net.transformer_blocks)

    @staticmethod
    def start(net, embeds: torch.Tensor) -> torch.Tensor:
        return net.context_embedder(embeds)

    @staticmethod
    def step(block, call: dict, rows: slice, stream: torch.Tensor, read: bool, grid):
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        from ..concepts import concept_attention, text_side_update

        hidden, context, temb = (call[k][rows] for k in ("hidden_states", "encoder_hidden_states", "temb"))
        attn = block.attn
        norm_hidden = block.norm1(hidden, emb=temb)[0]
        norm_context = block.norm1_context(context, emb=temb)[0]
        norm_stream, *gates = block.norm1_context(stream, emb=temb)
        q, k, v, _, image = project(attn, {"hidden_states": norm_hidden, "encoder_hidden_states": norm_context,
                                           "image_rotary_emb": call.get("image_rotary_emb")}, 0, None)
        cq, ck, cv = (x.unflatten(-1, (-1, attn.head_dim)) for x in _get_qkv_projections(attn, norm_stream,
                                                                                          norm_stream)[3:])
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        cq, ck, cv = (x.transpose(1, 2) for x in (cq, ck, cv))  # (rows, heads, concepts, head_dim)
        c_out, maps = concept_attention(q, k, v, image, cq, ck, cv, read)
        return text_side_update(block, stream, c_out, *gates), maps


class FluxLatents(FlowLatents):
    """Flux.1's real-image side: latents packed into 2x2-patch tokens (the pipeline's own `_pack_latents`), its
    linear noise levels shifted by the token count, and one transformer call with its text and image ids and (dev)
    its guidance input; schnell has none."""

    @staticmethod
    def channels(pipe) -> int:
        return int(pipe.transformer.config.in_channels) // 4  # each token holds a 2x2 patch of channels

    @staticmethod
    def pack(pipe, latent):
        n, channels, h, w = latent.shape
        return pipe._pack_latents(latent, n, channels, h, w)

    @staticmethod
    def unpack(pipe, latent, shape):
        factor = pipe.vae_scale_factor
        return pipe._unpack_latents(latent, shape[-2] * factor, shape[-1] * factor, factor)

    @staticmethod
    def tokens(pipe, shape) -> int:
        return (shape[-2] // 2) * (shape[-1] // 2)

    @classmethod
    def timesteps(cls, pipe, config, steps, shape) -> dict:
        from ..flow import shift_mu

        kwargs = {"sigmas": linear_sigmas(steps)}
        if config.get("use_dynamic_shifting"):
            kwargs["mu"] = shift_mu(config, cls.tokens(pipe, shape))
        return kwargs

    @staticmethod
    def velocity(pipe, prompt, guidance, max_sequence_length, shape):
        from ..routing import exclusive, execution_device

        net, device = pipe.transformer, execution_device(pipe)
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad(), exclusive(pipe):
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, **kwargs)
        h, w = shape[-2:]  # the image layout's sides: tokens are 2x2 patches of it
        image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, embeds.dtype)
        embedded = torch.full([1], float(guidance), device=device, dtype=torch.float32) \
            if net.config.guidance_embeds else None  # dev: guidance is an input; schnell: none

        @torch.no_grad()
        def v(x, t):  # x: (1, tokens, channels) packed
            return net(hidden_states=x, timestep=(t.to(device).expand(x.shape[0]) / 1000).to(x.dtype),
                       guidance=embedded, pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                       img_ids=image_ids, return_dict=False)[0]

        return v


def tiny(folder: Path):
    """An MM-DiT with a CLIP and a T5 encoder, text then image in its double-stream blocks, single-stream blocks,
    rotary embeddings: 16x16 latents packed into 8x8 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from ..testing import clip_config, tiny_t5, tiny_t5_tokenizer, tiny_tokenizer, tiny_vae

    tokenizer, tokenizer_2 = tiny_tokenizer(folder / "tokenizer"), tiny_t5_tokenizer(folder / "tokenizer_2")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=tiny_vae(0.05),
        text_encoder=CLIPTextModel(clip_config(tokenizer, 32)), tokenizer=tokenizer,
        text_encoder_2=tiny_t5(tokenizer_2, 32), tokenizer_2=tokenizer_2,
    )


class Flux(Family):
    tokens = staticmethod(tokens)
    noise = staticmethod(noise)
    grid = staticmethod(grid)
    project = staticmethod(project)
    finish = staticmethod(finish)
    place = staticmethod(place)
    tiny = staticmethod(tiny)


FLUX = Flux("flux", "Flux.1", "joint", pipelines=("FluxPipeline",), networks=("FluxTransformer2DModel",), packed=True,
            flow=True, processors=("FluxAttnProcessor", "FluxAttnProcessor2_0"), flowedit=(28, 24, 1.5, 5.5),
            concepts=FluxConcepts, latents=FluxLatents)
FAMILIES = (FLUX,)
