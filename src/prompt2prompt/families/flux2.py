"""Flux.2 [klein]: an MM-DiT like Flux.1 (text then image tokens in its double-stream blocks, concatenated in its
single-stream ones, whose attention shares one projection with the MLP), with a Qwen3 text encoder that reads the
prompt inside its chat template (the denoiser sees every templated position, padding included), latents patchified
2x2 and packed by the pipeline, and classifier-free guidance as two transformer calls a step, the conditional first.
Real images through `Flux2Latents`; Flux.2 [dev] (Flux2Pipeline, a Mistral text encoder) in `flux2dev.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import Family
from .flux import _joint, place
from .flux import grid as flux_grid
from .latents import CFG_FLOWEDIT, FlowLatents, linear_sigmas
from .shared import chat


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """The prompt's tokens inside the chat text the pipeline encodes (`_get_qwen3_prompt_embeds`: one user turn,
    generation prompt added, thinking off), padded to max_sequence_length."""
    from ..tokens import PromptTokens, sequence_length

    return PromptTokens.from_template(pipe.tokenizer, prompt, chat(pipe.tokenizer, thinking=False),
                                      sequence_length(pipe, max_sequence_length))


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


class Flux2Concepts:
    """Flux.2 [klein]'s concept stream (`concepts.py`): a concept is one context token (its Qwen3 embedding, the
    pipeline's stacked hidden layers, through the transformer's `context_embedder`), carried through the
    double-stream `Flux2TransformerBlock`s by their text side: the transformer's text modulation (`temb_mod_txt`,
    shared by every double block), `norm1_context`, the added projections and qk-norms, `to_add_out`,
    `norm2_context`, `ff_context`. A concept gets no rotary embedding (position 0 on every axis: it has no place in
    the prompt). The stream ends with the double-stream blocks, as on Flux.1."""

    last_blocks = None  # every block (concepts.default_blocks)

    @staticmethod
    def encode(pipe, concept: str) -> torch.Tensor:
        from ..routing import execution_device

        return pipe.encode_prompt(prompt=concept, device=execution_device(pipe))[0]

    @staticmethod
    def blocks(net) -> list:
        return list(net.transformer_blocks)

    @staticmethod
    def start(net, embeds: torch.Tensor) -> torch.Tensor:
        return net.context_embedder(embeds)

    @staticmethod
    def step(block, call: dict, rows: slice, stream: torch.Tensor, read: bool, grid):
        from diffusers.models.transformers.transformer_flux2 import Flux2Modulation, _get_qkv_projections

        from ..concepts import concept_attention, merge_heads

        hidden, context = call["hidden_states"][rows], call["encoder_hidden_states"][rows]
        mods = []
        for name in ("temb_mod_img", "temb_mod_txt"):  # (batch or 1, 6 * width)
            m = call[name]
            mods.append(Flux2Modulation.split(m[rows] if m.shape[0] > 1 else m, 2))
        ((shift, scale, _), _), ((c_shift, c_scale, c_gate), (c_shift2, c_scale2, c_gate2)) = mods
        attn = block.attn
        norm_hidden = (1 + scale) * block.norm1(hidden) + shift
        norm_context = (1 + c_scale) * block.norm1_context(context) + c_shift
        norm_stream = (1 + c_scale) * block.norm1_context(stream) + c_shift
        q, k, v, _, image = project(attn, {"hidden_states": norm_hidden, "encoder_hidden_states": norm_context,
                                           "image_rotary_emb": call.get("image_rotary_emb")}, 0, grid)
        cq, ck, cv = (x.unflatten(-1, (-1, attn.head_dim)) for x in _get_qkv_projections(attn, norm_stream,
                                                                                          norm_stream)[3:])
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        cq, ck, cv = (x.transpose(1, 2) for x in (cq, ck, cv))  # (rows, heads, concepts, head_dim)
        c_out, maps = concept_attention(q, k, v, image, cq, ck, cv, read)
        stream = stream + c_gate * attn.to_add_out(merge_heads(c_out))
        normed = block.norm2_context(stream) * (1 + c_scale2) + c_shift2
        return stream + c_gate2 * block.ff_context(normed), maps


class Flux2Latents(FlowLatents):
    """Flux.2 [klein]'s real-image side. Its image layout is the autoencoder's latent patchified 2x2 and normalised
    by the autoencoder's batch-norm statistics (`_patchify_latents`, `bn`): what the pipeline's `latents=` takes and
    packs itself into a token sequence (the loop layout); its noise levels are linear, shifted by its empirical `mu`;
    guidance is two transformer calls against the empty prompt (none on a distilled model)."""

    @staticmethod
    def cell(pipe) -> int:
        return 2 * int(pipe.vae_scale_factor)  # a cell is a 2x2 patch of the autoencoder's latent

    @staticmethod
    def _statistics(pipe, like):
        bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        return mean, torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(like.device, like.dtype)

    @staticmethod
    def patchify(pipe, latent):
        return pipe._patchify_latents(latent)  # (n, channels, h, w) -> (n, 4 * channels, h / 2, w / 2)

    @staticmethod
    def unpatchify(pipe, latent):
        return pipe._unpatchify_latents(latent)

    @classmethod
    def encode(cls, pipe, x):
        latent = cls.patchify(pipe, pipe.vae.encode(x).latent_dist.mode())
        mean, std = cls._statistics(pipe, latent)
        return (latent - mean) / std

    @classmethod
    def decode(cls, pipe, latent):
        mean, std = cls._statistics(pipe, latent)
        return pipe.vae.decode(cls.unpatchify(pipe, latent * std + mean)).sample

    @staticmethod
    def pack(pipe, latent):
        return pipe._pack_latents(latent)  # (n, h * w, channels)

    @staticmethod
    def unpack(pipe, latent, shape):
        return latent.transpose(1, 2).reshape(latent.shape[0], -1, *shape[-2:])

    @staticmethod
    def input(pipe, latent):
        return latent

    @staticmethod
    def tokens(pipe, shape) -> int:
        return shape[-2] * shape[-1]

    @classmethod
    def timesteps(cls, pipe, config, steps, shape) -> dict:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sigmas = None if config.get("use_flow_sigmas") else linear_sigmas(steps)
        return {"sigmas": sigmas, "mu": compute_empirical_mu(image_seq_len=cls.tokens(pipe, shape), num_steps=steps)}

    @staticmethod
    def velocity(pipe, prompt, guidance, max_sequence_length, shape):
        from ..routing import exclusive, execution_device

        net, device = pipe.transformer, execution_device(pipe)
        guided = guidance > 1 and not pipe.config.get("is_distilled", False)
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad(), exclusive(pipe):
            texts = [pipe.encode_prompt(prompt=p, device=device, **kwargs) for p in ([prompt, ""] if guided
                                                                                     else [prompt])]
        image_ids = pipe._prepare_latent_ids(torch.empty(1, 1, *shape[-2:])).to(device)

        @torch.no_grad()
        def v(x, t):  # x: (1, tokens, channels)
            timestep = (t.to(device).expand(x.shape[0]) / 1000).to(x.dtype)
            cond, *uncond = (net(hidden_states=x, timestep=timestep, guidance=None, encoder_hidden_states=embeds,
                                 txt_ids=ids, img_ids=image_ids, return_dict=False)[0] for embeds, ids in texts)
            return cond if not uncond else uncond[0] + guidance * (cond - uncond[0])

        return v


def tiny(folder: Path):
    """A 28-layer Qwen3 text encoder read at layers 9, 18 and 27, parallel single-stream attention, patchified
    latents."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ..testing import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer(folder / "tokenizer")
    width = 16  # Flux.2 klein stacks the encoder's hidden states after layers 9, 18 and 27: 28 tiny layers
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id))
    return Flux2KleinPipeline(text_encoder=text_encoder, tokenizer=tokenizer,
                              **tiny_parts(3 * width, guidance_embeds=False))


def tiny_parts(text_width: int, guidance_embeds: bool) -> dict:
    """The tiny transformer (reading `text_width`-wide text, with or without the guidance embedding), autoencoder and
    scheduler of a Flux.2 pipeline ([klein] and [dev] share them)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_width, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                             sample_size=32, layers_per_block=1)
    return {"transformer": transformer, "vae": vae,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)}


class Flux2(Family):
    guidance = staticmethod(guidance)
    tokens = staticmethod(tokens)
    noise = staticmethod(noise)
    grid = staticmethod(flux_grid)
    project = staticmethod(project)
    finish = staticmethod(finish)
    place = staticmethod(place)
    tiny = staticmethod(tiny)


FLUX2 = Flux2("flux2", "Flux.2 [klein]", "joint", pipelines=("Flux2KleinPipeline",),
              networks=("Flux2Transformer2DModel",), packed=True, flow=True,
              processors=("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"), guidance_calls=True,
              concepts=Flux2Concepts, latents=Flux2Latents, flowedit=CFG_FLOWEDIT)
FAMILIES = (FLUX2,)
