"""Flux.2 [klein]: an MM-DiT like Flux.1 (text then image tokens in its double-stream blocks, concatenated in its
single-stream ones, whose attention shares one projection with the MLP), with a Qwen3 text encoder that reads the
prompt inside its chat template (the denoiser sees every templated position, padding included), latents patchified
2x2 and packed by the pipeline, and classifier-free guidance as two transformer calls a step, the conditional first.
Real-image inversion is not supported on it yet; Flux.2 [dev] (Flux2Pipeline, a Mistral text encoder) is not routed.
"""

from __future__ import annotations

import torch

from . import Family
from .flux import _joint
from .flux import grid as flux_grid


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """The prompt's tokens inside the chat text the pipeline encodes (`_get_qwen3_prompt_embeds`: one user turn,
    generation prompt added, thinking off), padded to max_sequence_length."""
    from ..tokens import PromptTokens, sequence_length

    return PromptTokens.from_template(pipe.tokenizer, prompt, chat(pipe.tokenizer, thinking=False),
                                      sequence_length(pipe, max_sequence_length))


def chat(tokenizer, thinking: bool):
    """content -> the chat text a Qwen3 reads for one user turn with the generation prompt (Flux.2 klein: thinking
    off; Z-Image: on)."""

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)

    return render


def guidance(scale: float, negative_prompt: str | None, prompts: int) -> dict:
    """Guidance by two calls a step against the empty prompt; the pipeline takes no negative prompt."""
    if negative_prompt:
        from ..errors import InputError

        raise InputError(f"Flux.2 [klein] takes no negative prompt (it guides against the empty one); expected none, "
                         f"got {negative_prompt!r}")
    return {"guidance_scale": scale}


def noise(pipe, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Standard normal latents as the pipeline takes them: patchified, (1, 4 * channels, h / 2, w / 2)."""
    side = pipe.vae_scale_factor * 2
    shape = (1, pipe.transformer.config.in_channels, height // side, width // side)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def project(attn, call: dict, text_tokens: int, grid):
    """Flux2AttnProcessor's and Flux2ParallelSelfAttnProcessor's projections; the parallel one's MLP half is kept in
    `call` for `finish`."""
    hidden_states, encoder_hidden_states = call["hidden_states"], call.get("encoder_hidden_states")
    if hasattr(attn, "to_qkv_mlp_proj"):  # single-stream: one projection gives q, k, v and the MLP's input
        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)  # the processor's own split rule
        qkv, call["_mlp"] = fused.split([local, fused.shape[-1] - local], -1)
        query, key, value = qkv.chunk(3, -1)
        eq = ek = ev = None
    else:
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    return _joint(attn, query, key, value, eq, ek, ev, encoder_hidden_states, text_tokens, call.get("image_rotary_emb"))


def finish(attn, out, call: dict, text: slice, image: slice):
    if "_mlp" in call:  # single-stream: attention and MLP outputs through one projection
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(call["_mlp"])], -1))
    if call.get("encoder_hidden_states") is None:
        return attn.to_out[1](attn.to_out[0](out))
    return attn.to_out[1](attn.to_out[0](out[:, image])), attn.to_add_out(out[:, text])


FLUX2 = Family("flux2", "Flux.2 [klein]", "joint", pipelines=("Flux2KleinPipeline",),
               networks=("Flux2Transformer2DModel",), text_first=True, packed=True, flow=True, text_parts=("qwen3",),
               processors=("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"), invertible=False,
               guidance_calls=True, guidance=guidance, tokens=tokens, noise=noise, grid=flux_grid,
               project=project, finish=finish)
FAMILIES = (FLUX2,)
