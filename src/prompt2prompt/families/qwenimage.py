"""Qwen-Image: an MM-DiT of double-stream blocks only (text then image in one joint attention each), whose text is a
Qwen2.5-VL's last hidden layer over the prompt inside a fixed template, with the template's opening dropped (the
denoiser sees the prompt's tokens first, then the template's closing); each call's texts are padded to the longest of
them, the padding masked out of the attention. Latents are packed into 2x2-patch tokens; classifier-free guidance
("true CFG") is two transformer calls a step, the conditional first. Real images through `QwenImageLatents`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import Family
from .flux import FluxLatents, noise
from .latents import CFG_FLOWEDIT, linear_sigmas


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """The prompt's tokens as `_get_qwen_prompt_embeds` keeps them: the template's first
    `prompt_template_encode_start_idx` tokens dropped, cut at max_sequence_length, not padded (the batch is padded
    to its longest: `tokens.batch_tokens`)."""
    from ..tokens import PromptTokens, sequence_length

    skip = pipe.prompt_template_encode_start_idx
    length = sequence_length(pipe, max_sequence_length)
    return PromptTokens.from_template(pipe.tokenizer, prompt, pipe.prompt_template_encode.format, length, skip,
                                      padded=False, max_tokens=pipe.tokenizer_max_length + skip)


def guidance(scale: float, negative_prompt: str | None, prompts: int) -> dict:
    """True classifier-free guidance: `true_cfg_scale` with a negative prompt, " " by default (what diffusers'
    QwenImagePipeline documents as enabling it); guidance_scale is left out (it is for guidance-distilled models)."""
    if scale <= 1:
        return {"true_cfg_scale": 1.0}
    return {"true_cfg_scale": scale, "negative_prompt": [negative_prompt or " "] * prompts}


def grid(net, sample, kwargs, cache):
    """(batch, tokens, channels) packed latents; `img_shapes` holds each image's (frames, rows, columns)."""
    _, rows, columns = kwargs["img_shapes"][0][0]
    return (rows, columns), (rows, columns)


def project(attn, call: dict, text_tokens: int, grid):
    """QwenDoubleStreamAttnProcessor2_0's projections, qk-norms and complex rotary embeddings; text then image.
    Padded text keys (`encoder_hidden_states_mask`) are left in `call["_key_mask"]`."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    hidden_states, encoder_hidden_states = call["hidden_states"], call["encoder_hidden_states"]
    head_dim = attn.inner_dim // attn.heads
    image = [proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
    text = [proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]  # (batch, tokens, heads, head_dim)
    for streams, norms in ((image, (attn.norm_q, attn.norm_k)), (text, (attn.norm_added_q, attn.norm_added_k))):
        for i, norm in enumerate(norms):
            if norm is not None:
                streams[i] = norm(streams[i])
    rotary = call.get("image_rotary_emb")
    if rotary is not None:
        image_freqs, text_freqs = rotary
        for streams, freqs in ((image, image_freqs), (text, text_freqs)):
            streams[0], streams[1] = (apply_rotary_emb_qwen(x, freqs, use_real=False) for x in streams[:2])
    t = encoder_hidden_states.shape[1]
    mask = call.get("encoder_hidden_states_mask")
    if mask is not None:
        ones = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        call["_key_mask"] = torch.cat([mask.bool(), ones], 1)  # (batch, tokens)
    query, key, value = (torch.cat([a, b], 1).transpose(1, 2) for a, b in zip(text, image))  # (b, heads, tokens, d)
    return query, key, value, slice(0, t), slice(t, query.shape[2])


def finish(attn, out, call: dict, text: slice, image: slice):
    image_out = attn.to_out[0](out[:, image].contiguous())
    if len(attn.to_out) > 1:
        image_out = attn.to_out[1](image_out)
    return image_out, attn.to_add_out(out[:, text].contiguous())


class QwenImageConcepts:
    """Qwen-Image's concept stream (`concepts.py`): a concept is one context token (its Qwen2.5-VL embedding through
    the transformer's `txt_norm` and `txt_in`), carried through every `QwenImageTransformerBlock` by its text side
    (`txt_mod`, `txt_norm1`, the added projections and qk-norms, `to_add_out`, `txt_norm2`, `txt_mlp`). A concept
    gets no rotary embedding (it has no place in the prompt). The image's own attention output keeps the block's
    padding mask over the prompt's keys."""

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
        return net.txt_in(net.txt_norm(embeds))

    @staticmethod
    def step(block, call: dict, rows: slice, stream: torch.Tensor, read: bool, grid):
        from ..concepts import concept_attention, merge_heads
        from ..errors import InputError
        from .shared import text_side_qkv

        if block.zero_cond_t or call.get("modulate_index") is not None:
            raise InputError("concept maps read Qwen-Image's text-to-image blocks; this model modulates reference "
                             "images' tokens apart (zero_cond_t), which the concept stream does not follow")
        hidden, context, temb = (call[k][rows] for k in ("hidden_states", "encoder_hidden_states", "temb"))
        mask = call.get("encoder_hidden_states_mask")
        img_mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
        txt_mod1, txt_mod2 = block.txt_mod(temb).chunk(2, dim=-1)
        norm_hidden = block._modulate(block.img_norm1(hidden), img_mod1)[0]
        norm_context = block._modulate(block.txt_norm1(context), txt_mod1)[0]
        norm_stream, gate1 = block._modulate(block.txt_norm1(stream), txt_mod1)
        projected = {"hidden_states": norm_hidden, "encoder_hidden_states": norm_context,
                     "encoder_hidden_states_mask": None if mask is None else mask[rows],
                     "image_rotary_emb": call.get("image_rotary_emb")}
        q, k, v, _, image = project(block.attn, projected, 0, grid)
        cq, ck, cv = text_side_qkv(block.attn, norm_stream)  # (rows, heads, concepts, head_dim)
        c_out, maps = concept_attention(q, k, v, image, cq, ck, cv, read, projected.get("_key_mask"))
        stream = stream + gate1 * block.attn.to_add_out(merge_heads(c_out))
        normed, gate2 = block._modulate(block.txt_norm2(stream), txt_mod2)
        return stream + gate2 * block.txt_mlp(normed), maps


class QwenImageLatents(FluxLatents):
    """Qwen-Image's real-image side: a video autoencoder (one frame) whose latents are normalised by its
    `latents_mean` / `latents_std`, packed into 2x2-patch tokens as Flux.1's (the pipeline's `_pack_latents`), linear
    noise levels shifted by the token count, and true classifier-free guidance: two calls, the guided velocity
    rescaled to the conditional one's norm per token, as the pipeline's loop does."""

    @staticmethod
    def _statistics(pipe, like):
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(like.device, like.dtype)

    @classmethod
    def encode(cls, pipe, x):
        latent = pipe.vae.encode(x[:, :, None]).latent_dist.mode()  # (1, channels, 1 frame, h, w)
        mean, std = cls._statistics(pipe, latent)
        return ((latent - mean) / std)[:, :, 0]

    @classmethod
    def decode(cls, pipe, latent):
        latent = latent[:, :, None]
        mean, std = cls._statistics(pipe, latent)
        return pipe.vae.decode(latent * std + mean).sample[:, :, 0]

    @staticmethod
    def unpack(pipe, latent, shape):
        factor = pipe.vae_scale_factor
        return pipe._unpack_latents(latent, shape[-2] * factor, shape[-1] * factor, factor)[:, :, 0]

    @classmethod
    def timesteps(cls, pipe, config, steps, shape) -> dict:
        from ..flow import shift_mu

        return {"sigmas": linear_sigmas(steps), "mu": shift_mu(config, cls.tokens(pipe, shape))}

    @staticmethod
    def velocity(pipe, prompt, guidance, max_sequence_length, shape):
        from ..errors import ModelError
        from ..routing import exclusive, execution_device

        net, device = pipe.transformer, execution_device(pipe)
        if net.config.guidance_embeds:
            raise ModelError("a guidance-distilled Qwen-Image (guidance_embeds) is not supported for real images")
        guided = guidance > 1
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad(), exclusive(pipe):  # the negative prompt " " as the family's guidance passes it
            texts = [pipe.encode_prompt(prompt=p, device=device, **kwargs) for p in ([prompt, " "] if guided
                                                                                     else [prompt])]
        shapes = [[(1, shape[-2] // 2, shape[-1] // 2)]]

        @torch.no_grad()
        def v(x, t):  # x: (1, tokens, channels)
            timestep = (t.to(device).expand(x.shape[0]) / 1000).to(x.dtype)
            cond, *uncond = (net(hidden_states=x, timestep=timestep, guidance=None, encoder_hidden_states_mask=mask,
                                 encoder_hidden_states=embeds, img_shapes=shapes, return_dict=False)[0]
                             for embeds, mask in texts)
            if not uncond:
                return cond
            guided_v = uncond[0] + guidance * (cond - uncond[0])
            return guided_v * (cond.norm(dim=-1, keepdim=True) / guided_v.norm(dim=-1, keepdim=True))

        return v


# the words of Qwen-Image's prompt template (its system line), one token each as in Qwen's own vocabulary
TEMPLATE_WORDS = ("system Describe image by detailing color shape size texture quantity text spatial relationships "
                  "of objects background").split()


def tiny(folder: Path):
    """A Qwen2.5-VL text encoder (its 34-token template opening dropped), complex rotary embeddings, a 5D
    autoencoder."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..testing import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer(folder / "tokenizer", TEMPLATE_WORDS)
    width = 32
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                  fullatt_block_indexes=[0])
    text.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(tokenizer),
                              image_token_id=0, video_token_id=0, vision_start_token_id=0, vision_end_token_id=0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=width, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=0.9)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config),
                             tokenizer=tokenizer, transformer=transformer)


class QwenImage(Family):
    tokens = staticmethod(tokens)
    guidance = staticmethod(guidance)
    noise = staticmethod(noise)
    grid = staticmethod(grid)
    project = staticmethod(project)
    finish = staticmethod(finish)
    tiny = staticmethod(tiny)


QWEN_IMAGE = QwenImage("qwenimage", "Qwen-Image", "joint", pipelines=("QwenImagePipeline",),
                       networks=("QwenImageTransformer2DModel",), packed=True, flow=True,
                       processors=("QwenDoubleStreamAttnProcessor2_0",), guidance_calls=True, batch_padded=True,
                       scale=("true_cfg_scale", 0.0),
                       arguments=("attn", "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask",
                                  "attention_mask", "image_rotary_emb"),
                       concepts=QwenImageConcepts, latents=QwenImageLatents, flowedit=CFG_FLOWEDIT)
FAMILIES = (QWEN_IMAGE,)
