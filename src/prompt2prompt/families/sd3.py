"""Stable Diffusion 3 / 3.5: an MM-DiT whose joint attention holds image tokens then text tokens.

Its text is CLIP's 77 positions (its two CLIP encoders side by side in the channels) then T5's; the CLIP part is read
by default (the T5 part is zeros in a pipeline without T5). SD3.5's dual-attention blocks add an image-only attention.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import Family
from .latents import FlowLatents
from .shared import text_side_qkv


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """CLIP's part (77 positions) then T5's (max_sequence_length; zeros when the pipeline has no T5)."""
    from ..tokens import PromptTokens, sequence_length

    length = sequence_length(pipe, max_sequence_length)
    clip = PromptTokens.from_tokenizer(pipe.tokenizer, prompt)
    if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
        t5 = PromptTokens.from_tokenizer(pipe.tokenizer_3, prompt, length)
    else:
        t5 = PromptTokens(prompt, (), (), length)  # the pipeline feeds zeros there
    return PromptTokens.joint(prompt, [("clip", clip), ("t5", t5)])


def grid(net, sample, kwargs, cache):
    """(batch, channels, h, w) latents, patchified inside the transformer."""
    patch = net.config.patch_size
    latent = tuple(sample.shape[2:])
    return latent, (latent[0] // patch, latent[1] // patch)


def project(attn, call: dict, text_tokens: int, grid):
    """JointAttnProcessor2_0's projections: image queries then text queries."""
    hidden_states, encoder_hidden_states = call["hidden_states"], call.get("encoder_hidden_states")
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    n = query.shape[2]
    if encoder_hidden_states is None:  # SD3.5's image-only attention
        return query, key, value, slice(n, n), slice(0, n)
    eq, ek, ev = text_side_qkv(attn, encoder_hidden_states)
    t = eq.shape[2]
    return torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2), slice(n, n + t), slice(0, n)


def place(name: str) -> str:
    """SD3.5's second attention of a dual-attention block (`attn2`) sees the image tokens only."""
    return "image" if name.split(".")[2:3] == ["attn2"] else "joint"


def finish(attn, out, call: dict, text: slice, image: slice):
    """out: (batch, tokens, width); the processor's output projections and return values."""
    if call.get("encoder_hidden_states") is None:
        return attn.to_out[1](attn.to_out[0](out))
    image_out, text_out = out[:, image], out[:, text]
    if not attn.context_pre_only:
        text_out = attn.to_add_out(text_out)
    return attn.to_out[1](attn.to_out[0](image_out)), text_out


class SD3Concepts:
    """SD3's concept stream (`concepts.py`): a concept is one context token, embedded by the transformer's
    `context_embedder`, carried through every `JointTransformerBlock` by the block's own text-side modulation
    (`norm1_context`), projections (`add_q/k/v_proj`, `norm_added_q/k`), output projection (`to_add_out`) and
    feed-forward (`norm2_context`, `ff_context`), as the block carries a prompt token. The last block
    (`context_pre_only`) reads maps but has no text output: the stream ends there."""

    last_blocks = None  # every block (concepts.default_blocks)

    @staticmethod
    def encode(pipe, concept: str) -> torch.Tensor:
        """(1, text tokens, joint width): the prompt embedding the transformer reads, of the concept alone."""
        from ..routing import execution_device

        return pipe.encode_prompt(prompt=concept, prompt_2=None, prompt_3=None, device=execution_device(pipe),
                                  do_classifier_free_guidance=False)[0]

    @staticmethod
    def blocks(net) -> list:
        return list(net.transformer_blocks)

    @staticmethod
    def start(net, embeds: torch.Tensor) -> torch.Tensor:
        return net.context_embedder(embeds)  # (concepts, width)

    @staticmethod
    def step(block, call: dict, rows: slice, stream: torch.Tensor, read: bool, grid):
        """One block of the concept stream on a call's conditional rows: (the stream after the block, None after the
        last; if read, the (rows, image tokens, concepts) scores in the output space and of cross-attention)."""
        from ..concepts import concept_attention, text_side_update

        hidden, context, temb = (call[k][rows] for k in ("hidden_states", "encoder_hidden_states", "temb"))
        norm_hidden = block.norm1(hidden, emb=temb)[0]  # the image tokens as the block's attention reads them
        if block.context_pre_only:
            norm_context, norm_stream = block.norm1_context(context, temb), block.norm1_context(stream, temb)
        else:
            norm_context = block.norm1_context(context, emb=temb)[0]
            norm_stream, *gates = block.norm1_context(stream, emb=temb)
        q, k, v, _, image = project(block.attn, {"hidden_states": norm_hidden, "encoder_hidden_states": norm_context},
                                    0, None)  # (rows, heads, tokens, head_dim)
        cq, ck, cv = text_side_qkv(block.attn, norm_stream)  # the concepts through the text side's layers
        c_out, maps = concept_attention(q, k, v, image, cq, ck, cv, read)
        if block.context_pre_only:
            return None, maps
        return text_side_update(block, stream, c_out, *gates), maps


def load(index: dict) -> dict:
    """SD3 without T5 (as the bundled shapes-flow): diffusers wants the absent components named."""
    return {k: None for k in ("text_encoder_3", "tokenizer_3")
            if not isinstance(index.get(k), list) or index[k][0] is None}


def tiny(folder: Path):
    """An MM-DiT with two CLIP encoders and a T5 encoder, image tokens then text in each joint attention, a
    context-only last block, qk-norm and a dual-attention block as SD3.5: 16x16 latents in 8x8 tokens (patch 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from ..testing import clip_config, tiny_t5, tiny_t5_tokenizer, tiny_tokenizer, tiny_vae

    tokenizer, tokenizer_2 = tiny_tokenizer(folder / "tokenizer"), tiny_tokenizer(folder / "tokenizer_2")
    tokenizer_3 = tiny_t5_tokenizer(folder / "tokenizer_3")
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(0.05),
        text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer, 32)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2, 32)), tokenizer_2=tokenizer_2,
        text_encoder_3=tiny_t5(tokenizer_3, 64), tokenizer_3=tokenizer_3,
    )


class StableDiffusion3(Family):
    load = staticmethod(load)
    tokens = staticmethod(tokens)
    grid = staticmethod(grid)
    project = staticmethod(project)
    finish = staticmethod(finish)
    place = staticmethod(place)
    tiny = staticmethod(tiny)


SD3 = StableDiffusion3("sd3", "Stable Diffusion 3 / 3.5", "joint", pipelines=("StableDiffusion3Pipeline",),
                       networks=("SD3Transformer2DModel",), flow=True, pooled=True, default_part="clip",
                       processors=("JointAttnProcessor2_0",), flowedit=(50, 33, 3.5, 13.5), concepts=SD3Concepts,
                       latents=FlowLatents)
FAMILIES = (SD3,)
